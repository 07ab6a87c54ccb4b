"""The text-aware sequential user model: a candidate source and features of the ranker.

A SASRec-like causal transformer (the :class:`~llmrec_tasks.ranking.sasrec.CausalEncoder` and
training loop :func:`~llmrec_tasks.ranking.sasrec.train_next_item` it shares with the SASRec
baseline) whose item vectors come from the items' text: ``P t_i + b + delta_i``, with ``t_i`` the
frozen encoder vector, ``P, b`` a learned projection and ``delta_i`` a learned per-item delta of
norm below ``delta_bound`` (``c tanh(|r|/c) r/|r|``), zero for items without training
interactions, so a new item's vector is its projected text. Logits are the hidden state times the
item vectors (tied); full-softmax cross-entropy at every position, Adam, early stopping on
validation NDCG@10, a time budget, seeded.

No leakage: :func:`fit_seq_model` is given only the events known before the first ranker training
target (the protocols call it so), and validates on the next item after that prefix. At inference
(:mod:`llmrec_tasks.ranking.seqstate`, NumPy) the state reads each user's full known history.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from llmrec_tasks.core.config import SeqConfig
from llmrec_tasks.core.errors import ConfigError
from llmrec_tasks.ranking.evaluate import Targets
from llmrec_tasks.ranking.events import Histories
from llmrec_tasks.ranking.sasrec import (
    PAD,
    CausalEncoder,
    NextItemModel,
    last_items,
    resolve_device,
    torch_threads,
    train_next_item,
    training_windows,
    validation_ndcg,
)
from llmrec_tasks.ranking.seqstate import SeqScorer, SeqWeights

log = logging.getLogger(__name__)

NORM_EPS = 1e-12  # inside the delta's norm: its gradient at zero stays finite


@dataclass(frozen=True)
class SeqParams:
    """Architecture and training schedule (fed from the ``seq_*`` settings)."""

    hidden: int = 64
    layers: int = 2
    heads: int = 1
    max_len: int = 200
    dropout: float = 0.2
    learning_rate: float = 0.005
    batch_size: int = 32
    max_epochs: int = 30
    patience: int = 5
    delta_bound: float = 1.0
    delta_dropout: float = 0.0
    mask_unseen: bool = False
    time_budget: float = 300.0
    seed: int = 0
    device: str = "cpu"

    @classmethod
    def from_config(cls, cfg: SeqConfig, seed: int) -> SeqParams:
        """The run's ``seq_*`` settings and its seed."""
        names = ("hidden", "layers", "max_len", "dropout", "learning_rate", "batch_size")
        names += (
            "max_epochs",
            "patience",
            "delta_bound",
            "delta_dropout",
            "mask_unseen",
            "time_budget",
            "device",
        )
        return cls(**{name: getattr(cfg, name) for name in names}, seed=seed)


class TextSeqModel(NextItemModel):
    """Item vectors from frozen text vectors through a learned projection plus a bounded delta."""

    def __init__(self, text: np.ndarray, known: np.ndarray, params: SeqParams) -> None:
        super().__init__()
        n_items, dim = text.shape
        self.register_buffer("text", torch.from_numpy(np.ascontiguousarray(text, dtype=np.float32)))
        self.register_buffer("known", torch.from_numpy(known.astype(np.float32)).unsqueeze(1))
        self.project = nn.Linear(dim, params.hidden)
        self.delta_raw = nn.Parameter(torch.zeros(n_items, params.hidden))
        self.bound = params.delta_bound
        self.delta_dropout = params.delta_dropout
        self.mask_unseen = params.mask_unseen
        self.encoder = CausalEncoder(
            params.hidden, params.layers, params.heads, params.max_len, params.dropout
        )
        nn.init.normal_(self.encoder.positions.weight, std=0.02)

    @property
    def n_items(self) -> int:
        return self.text.shape[0]

    def delta(self) -> torch.Tensor:
        """``(n_items, hidden)`` deltas, each of norm below ``delta_bound``; zero for unknown items.

        In training, each call also zeroes a random ``delta_dropout`` share of the items' deltas
        (not rescaled): those items score with their text-only vector, as a new item does, so the
        projection learns text-only vectors that compete with the warm items' full ones.
        """
        norm = torch.sqrt((self.delta_raw**2).sum(dim=1, keepdim=True) + NORM_EPS)
        keep = self.known
        if self.training and self.delta_dropout > 0:
            keep = keep * (torch.rand_like(keep) >= self.delta_dropout)
        return keep * self.delta_raw * (self.bound * torch.tanh(norm / self.bound) / norm)

    def logits(self, hidden: torch.Tensor, table: torch.Tensor | None = None) -> torch.Tensor:
        """Scores of every item; in training with ``mask_unseen``, the items without training
        interactions score -inf: they did not exist yet, so they are not taught as negatives (a
        new item's text would otherwise learn to score low)."""
        logits = super().logits(hidden, table)
        if self.training and self.mask_unseen:
            logits = logits.masked_fill(self.known[:, 0] == 0, float("-inf"))
        return logits

    def item_vectors(self) -> torch.Tensor:
        return self.project(self.text) + self.delta()

    def item_table(self) -> torch.Tensor:
        vectors = self.item_vectors()
        return torch.cat([vectors.new_zeros(1, vectors.shape[1]), vectors])

    def export(self, params: SeqParams) -> SeqWeights:
        """The NumPy inference weights (:mod:`llmrec_tasks.ranking.seqstate`)."""
        with torch.no_grad():
            arrays = {
                name: value.detach().cpu().numpy().astype(np.float32)
                for name, value in self.state_dict().items()
                if name.startswith(("project.", "encoder."))
            }
            arrays["delta"] = self.delta().cpu().numpy().astype(np.float32)
        return SeqWeights(
            arrays=arrays,
            hidden=params.hidden,
            heads=params.heads,
            layers=params.layers,
            max_len=params.max_len,
        )


def fit_seq_model(
    text: np.ndarray,
    train: Histories,
    valid_hist: Histories,
    valid_targets: Targets,
    params: SeqParams,
) -> tuple[TextSeqModel, dict[str, Any]]:
    """Train on ``train``'s windows (:func:`~llmrec_tasks.ranking.sasrec.training_windows`), keep
    the epoch with the best NDCG@10 on ``valid_targets`` (predicted from ``valid_hist``).

    Returns the model and ``{"epochs", "best_epoch", "valid_ndcg@10", "seconds", "stopped", "curve"}``.
    """
    device = resolve_device(params.device)
    torch.manual_seed(params.seed)
    windows = training_windows(train, params.max_len)
    if len(windows) == 0:
        raise ConfigError("no user has two known items: the sequence model has nothing to learn from")
    known = np.zeros(text.shape[0], dtype=bool)
    known[windows[windows != PAD] - 1] = True
    model = TextSeqModel(text, known, params).to(device)
    info = train_next_item(
        model,
        torch.from_numpy(windows),
        params,
        lambda m: validation_ndcg(m, valid_hist, valid_targets, params),
        "seqmodel",
        time_budget=params.time_budget,
    )
    return model, {**info, "items_with_delta": int(known.sum())}


def seq_runs(
    cfg: SeqConfig,
    seed: int,
    text: np.ndarray,
    train: Histories,
    valid_hist: Histories,
    valid_targets: Targets,
) -> tuple[SeqWeights | None, dict[str, Any]]:
    """The run's sequence model: ``(weights, info)``; ``(None, {})`` when ``seq_enabled`` is off,
    ``(None, {"skipped": reason})`` when the prefix has no user with two events or no validation user.

    ``train``: every user's events known before the first ranker training target; ``valid_*``: the
    next item after it (early stopping).
    """
    if not cfg.enabled:
        return None, {}
    resolve_device(cfg.device)
    params = SeqParams.from_config(cfg, seed)
    if not (train.lengths >= 2).any() or valid_hist.n_users == 0:
        reason = (
            f"{int((train.lengths >= 2).sum())} users with two events and {valid_hist.n_users} validation "
            "users before the first training target: too little history to train on (the seq features are "
            "missing); a longer history or fewer ranker_train_windows gives it data"
        )
        log.warning("seqmodel skipped: %s", reason)
        return None, {"skipped": reason}
    started = time.monotonic()
    with torch_threads(cfg.threads):
        model, info = fit_seq_model(text, train, valid_hist, valid_targets, params)
    weights = model.export(params)
    info = {
        **info,
        "params": {
            k: getattr(params, k)
            for k in ("hidden", "layers", "max_len", "dropout", "delta_bound", "delta_dropout", "mask_unseen")
        },
        "train_users": int((train.lengths >= 2).sum()),
        "train_events": int(train.lengths.sum()),
        "threads": cfg.threads,
        "device": cfg.device,
        "seed": seed,
    }
    log.info(
        "seqmodel: valid NDCG@10 %.4f at epoch %d of %d (%s), %.0fs",
        info["valid_ndcg@10"],
        info["best_epoch"],
        info["epochs"],
        info["stopped"],
        time.monotonic() - started,
    )
    return weights, info


def train_seq(
    cfg: SeqConfig,
    seed: int,
    embeddings: np.ndarray,
    train: Histories,
    valid_hist: Histories,
    valid_targets: Targets,
) -> tuple[SeqScorer | None, dict[str, Any]]:
    """:func:`seq_runs` as the NumPy scorer every stage shares (None when disabled or skipped)."""
    weights, info = seq_runs(cfg, seed, embeddings, train, valid_hist, valid_targets)
    return (SeqScorer.build(weights, embeddings) if weights is not None else None), info


def torch_user_states(model: TextSeqModel, hist: Histories, max_len: int) -> np.ndarray:
    """Reference torch inference (tests compare :func:`~llmrec_tasks.ranking.seqstate.user_states` with it)."""
    model.eval()
    with torch.no_grad():
        tokens = torch.from_numpy(last_items(hist, max_len))
        return model(tokens)[:, -1].double().cpu().numpy()
