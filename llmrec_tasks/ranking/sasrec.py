"""SASRec: a causal self-attention next-item model, the sequential baseline of the evaluation.

Kang & McAuley, *Self-Attentive Sequential Recommendation* (2018), trained here with a full
softmax cross-entropy over the catalog at every position (as in later re-evaluations of SASRec,
which make it much stronger than the paper's sampled binary loss):

- data (:func:`training_windows`): each user's items known before the validation targets, oldest
  first; the last ``max_len + 1`` of them, left-padded (index 0 is padding), input ``w[:-1]``
  predicting ``w[1:]`` wherever the input is an item (the paper's setup);
- model (:class:`SasrecModel`, over the shared :class:`CausalEncoder`): item embedding + learned positional embedding, ``layers``
  pre-LayerNorm blocks of causal self-attention and a position-wise feed-forward layer, dropout,
  a final LayerNorm; the logits are the hidden state times the item embeddings (weights tied);
- training (:func:`fit_sasrec`, the shared loop :func:`train_next_item`): Adam, shuffled batches, seeded (``torch.manual_seed``);
  validation NDCG@10 after every epoch, the best epoch's weights kept, stopped after ``patience``
  epochs without a better one (never within the first :data:`MIN_EPOCHS`);
- tuning (:func:`tune_sasrec`): a small grid (:data:`GRID`) chosen on validation NDCG@10;
- scoring (:func:`score_users`; a run's baseline: :func:`sasrec_runs`): the last ``max_len``
  items of each history, every item ranked except the history (as the baselines do). Test
  histories include the validation targets, as in the paper; the model never trains on them.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from llmrec_tasks.core.config import SasrecConfig
from llmrec_tasks.core.errors import ConfigError
from llmrec_tasks.ranking.baselines import top_items
from llmrec_tasks.ranking.evaluate import PRIMARY, Targets, per_user_metrics
from llmrec_tasks.ranking.events import Histories
from llmrec_tasks.ranking.protocols import SASREC
from llmrec_tasks.ranking.ranker import Stage

log = logging.getLogger(__name__)

DEVICES = ("cpu", "cuda")
PAD = 0  # item i is token i + 1
SCORE_BATCH = 256  # users scored per forward pass
# The first epochs learn popularity: validation NDCG@10 sits at popularity's level (flat, even
# falling, with strong dropout) before the sequential signal lifts it; no early stop before this.
MIN_EPOCHS = 8


@dataclass(frozen=True)
class SasrecParams:
    """One SASRec configuration and its training schedule."""

    hidden: int = 64
    layers: int = 2
    heads: int = 1
    max_len: int = 200
    dropout: float = 0.2
    learning_rate: float = 0.005
    batch_size: int = 32
    max_epochs: int = 20
    patience: int = 5
    seed: int = 0
    device: str = "cpu"

    @classmethod
    def from_config(cls, cfg: SasrecConfig, seed: int) -> SasrecParams:
        """The run's ``sasrec_*`` settings (the grid sets the rest) and its seed."""
        return cls(
            learning_rate=cfg.learning_rate,
            batch_size=cfg.batch_size,
            max_epochs=cfg.max_epochs,
            patience=cfg.patience,
            seed=seed,
            device=cfg.device,
        )

    def grid_point(self) -> dict[str, Any]:
        """The tuned hyper-parameters (what the report shows)."""
        return {k: getattr(self, k) for k in ("hidden", "layers", "max_len", "dropout")}


# Tuned on validation NDCG@10: the paper's two MovieLens-scale settings (its dense ML-1M one and
# its setting for sparse data). Every epoch costs a full softmax at each of up to users x max_len
# positions, so the grid is kept to two points (the benchmark's time budget).
GRID: tuple[dict[str, Any], ...] = (
    {"hidden": 64, "layers": 2, "max_len": 200, "dropout": 0.2},
    {"hidden": 64, "layers": 2, "max_len": 50, "dropout": 0.5},
)


def resolve_device(name: str) -> torch.device:
    """The torch device of the ``sasrec_device`` setting; CUDA must really be there (no fallback)."""
    if name not in DEVICES:
        raise ConfigError(f"sasrec_device must be one of {', '.join(DEVICES)}, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "sasrec_device is 'cuda' but torch sees no CUDA device on this worker (torch "
            f"{torch.__version__}, CUDA build {torch.version.cuda or 'none'}): run on a GPU worker with a "
            "CUDA build of torch, or set sasrec_device=cpu"
        )
    return torch.device(name)


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run with ``n`` torch intra-op threads, then restore the process's setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# --- data ----------------------------------------------------------------------------------------


def last_items(hist: Histories, max_len: int) -> np.ndarray:
    """``(n_users, max_len)`` tokens of each history's last ``max_len`` items, left-padded."""
    out = np.full((hist.n_users, max_len), PAD, dtype=np.int64)
    lengths = np.minimum(hist.lengths, max_len)
    rows = np.repeat(np.arange(hist.n_users), lengths)
    offset = np.arange(len(rows)) - np.repeat(np.cumsum(lengths) - lengths, lengths)  # 0.. per user
    src = np.repeat(hist.indptr[1:] - lengths, lengths) + offset
    out[rows, max_len - np.repeat(lengths, lengths) + offset] = hist.items[src] + 1
    return out


def training_windows(hist: Histories, max_len: int) -> np.ndarray:
    """``(n_users, max_len + 1)`` tokens of each history's last ``max_len + 1`` items, left-padded.

    Input ``w[:-1]`` predicts ``w[1:]`` at every position whose input is an item (the paper's
    setup: the most recent items of each user; the cost is bounded by users x ``max_len``).
    Histories of one item teach nothing and are left out.
    """
    windows = last_items(hist, max_len + 1)
    return windows[hist.lengths >= 2]


# --- model ---------------------------------------------------------------------------------------


class Block(nn.Module):
    """Pre-LayerNorm causal self-attention and a position-wise feed-forward layer, with residuals."""

    def __init__(self, hidden: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.norm_attn = nn.LayerNorm(hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.out = nn.Linear(hidden, hidden)
        self.norm_ffn = nn.LayerNorm(hidden)
        self.ffn = nn.Sequential(
            nn.Linear(hidden, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, hidden)
        )
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, length, d = x.shape
        q, k, v = self.qkv(self.norm_attn(x)).view(b, length, 3, self.heads, d // self.heads).unbind(2)
        attn = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=mask,
            dropout_p=self.dropout.p if self.training else 0.0,
        )
        x = x + self.dropout(self.out(attn.transpose(1, 2).reshape(b, length, d)))
        return x + self.dropout(self.ffn(self.norm_ffn(x)))


class CausalEncoder(nn.Module):
    """Positions + ``layers`` causal :class:`Block` s + a final LayerNorm over input item vectors.

    Shared by SASRec (learned item embeddings) and the text-aware sequence model
    (:mod:`llmrec_tasks.ranking.seqmodel`, projected text vectors): both feed it a token table whose
    row 0 is the padding token.
    """

    def __init__(self, hidden: int, layers: int, heads: int, max_len: int, dropout: float) -> None:
        super().__init__()
        if hidden % heads:
            raise ConfigError(f"hidden size {hidden} is not a multiple of {heads} heads")
        self.positions = nn.Embedding(max_len, hidden)
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(hidden, heads, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(hidden)
        self.scale = math.sqrt(hidden)

    def forward(self, tokens: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """``(batch, length)`` tokens -> ``(batch, length, hidden)``; padded positions are zero."""
        length = tokens.shape[1]
        real = tokens != PAD
        pos = torch.arange(length, device=tokens.device)
        x = self.dropout(table[tokens] * self.scale + self.positions(pos)) * real.unsqueeze(-1)
        # Attend to real items up to here; a padded position attends to itself only (never to
        # nothing, which would give NaN) and is zeroed after every block.
        causal = torch.ones(length, length, dtype=torch.bool, device=tokens.device).tril()
        eye = torch.eye(length, dtype=torch.bool, device=tokens.device)
        mask = (causal & (real.unsqueeze(1) | eye)).unsqueeze(1)
        for block in self.blocks:
            x = block(x, mask) * real.unsqueeze(-1)
        return self.norm(x)


class NextItemModel(nn.Module):
    """A causal next-item model: a token table (row 0 = padding) and a :class:`CausalEncoder`;
    the logits are the hidden state times the item rows of the table (weights tied)."""

    encoder: CausalEncoder

    @property
    def n_items(self) -> int:
        raise NotImplementedError

    def item_table(self) -> torch.Tensor:
        """``(n_items + 1, hidden)``: the padding row (zeros), then one vector per item."""
        raise NotImplementedError

    def forward(self, tokens: torch.Tensor, table: torch.Tensor | None = None) -> torch.Tensor:
        return self.encoder(tokens, self.item_table() if table is None else table)

    def logits(self, hidden: torch.Tensor, table: torch.Tensor | None = None) -> torch.Tensor:
        """Scores of every item (not the padding token) for each hidden state."""
        table = self.item_table() if table is None else table
        return hidden @ table[1:].T


class SasrecModel(NextItemModel):
    """Learned item embeddings (0 = padding) + positions -> causal blocks -> hidden state per position."""

    def __init__(self, n_items: int, params: SasrecParams) -> None:
        super().__init__()
        self.items = nn.Embedding(n_items + 1, params.hidden, padding_idx=PAD)
        self.encoder = CausalEncoder(
            params.hidden, params.layers, params.heads, params.max_len, params.dropout
        )
        nn.init.normal_(self.items.weight, std=0.02)
        nn.init.normal_(self.encoder.positions.weight, std=0.02)
        with torch.no_grad():
            self.items.weight[PAD].zero_()

    @property
    def n_items(self) -> int:
        return self.items.num_embeddings - 1

    def item_table(self) -> torch.Tensor:
        return self.items.weight


# --- training ------------------------------------------------------------------------------------


def score_users(model: NextItemModel, hist: Histories, params: Any, depth: int) -> np.ndarray:
    """``(n_users, depth)`` items ranked by the model from each history's last ``params.max_len``
    items, history excluded."""
    device = next(model.parameters()).device
    tokens = last_items(hist, params.max_len)
    out = np.full((hist.n_users, min(depth, model.n_items)), -1, dtype=np.int64)
    model.eval()
    with torch.no_grad():
        table = model.item_table()
        for start in range(0, hist.n_users, SCORE_BATCH):
            rows = np.arange(start, min(start + SCORE_BATCH, hist.n_users))
            batch = torch.from_numpy(tokens[rows]).to(device)
            scores = model.logits(model(batch, table)[:, -1], table).double().cpu().numpy()
            sub = hist.subset(rows)
            scores[np.repeat(np.arange(len(rows)), sub.lengths), sub.items] = -np.inf
            out[rows] = top_items(scores, depth)
    return out


def validation_ndcg(model: NextItemModel, hist: Histories, targets: Targets, params: Any) -> float:
    ranked = score_users(model, hist, params, depth=10)
    return float(per_user_metrics(ranked, targets, ks=(10,))[PRIMARY].mean())


def train_next_item(
    model: NextItemModel,
    windows: torch.Tensor,
    params: Any,
    evaluate: Callable[[NextItemModel], float],
    label: str,
    time_budget: float | None = None,
) -> dict[str, Any]:
    """Full-softmax next-item training of ``model`` on ``windows`` (:func:`training_windows`).

    ``params`` has ``learning_rate``, ``batch_size``, ``max_epochs``, ``patience``, ``seed`` and
    ``device``. Adam, shuffled batches (seeded); ``evaluate(model)`` (validation NDCG@10) after
    every epoch, the best epoch's weights kept, stopped after ``patience`` epochs without a better
    one (never within the first :data:`MIN_EPOCHS`) or once ``time_budget`` seconds have passed.
    Logs one line per epoch. Returns ``{"epochs", "best_epoch", "valid_ndcg@10", "seconds", "curve"}``.
    """
    started = time.monotonic()
    device = next(model.parameters()).device
    optimizer = torch.optim.Adam(model.parameters(), lr=params.learning_rate, betas=(0.9, 0.98))
    order_rng = torch.Generator().manual_seed(params.seed)
    best, best_epoch, best_state, curve = -1.0, 0, None, []
    stopped = "max_epochs"
    for epoch in range(1, params.max_epochs + 1):
        model.train()
        total, count = 0.0, 0
        for idx in torch.randperm(len(windows), generator=order_rng).split(params.batch_size):
            batch = windows[idx].to(device)
            inputs, targets = batch[:, :-1], batch[:, 1:]
            real = inputs != PAD  # left padding: a real input is always followed by a real target
            table = model.item_table()
            hidden = model(inputs, table)[real]  # only the positions with a target: padding costs nothing
            loss = F.cross_entropy(model.logits(hidden, table), targets[real] - 1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * int(real.sum())
            count += int(real.sum())
        ndcg = evaluate(model)
        curve.append(round(ndcg, 5))
        if ndcg > best:
            best, best_epoch, best_state = ndcg, epoch, copy.deepcopy(model.state_dict())
        elapsed = time.monotonic() - started
        log.info(
            "%s epoch %d: loss %.4f, valid NDCG@10 %.4f (best %.4f at %d), %.0fs",
            label,
            epoch,
            total / max(count, 1),
            ndcg,
            best,
            best_epoch,
            elapsed,
        )
        if epoch >= MIN_EPOCHS and epoch - best_epoch >= params.patience:
            stopped = "patience"
            break
        if time_budget is not None and elapsed >= time_budget:
            stopped = "time_budget"
            break
    model.load_state_dict(best_state)
    return {
        "epochs": len(curve),
        "best_epoch": best_epoch,
        "valid_ndcg@10": best,
        "seconds": round(time.monotonic() - started, 1),
        "stopped": stopped,
        "curve": curve,
    }


def fit_sasrec(
    train: Histories,
    n_items: int,
    valid_hist: Histories,
    valid_targets: Targets,
    params: SasrecParams,
) -> tuple[SasrecModel, dict[str, Any]]:
    """Train on ``train``'s windows, keep the epoch with the best validation NDCG@10.

    Returns the model with that epoch's weights and ``{"epochs", "best_epoch", "valid_ndcg@10",
    "seconds", "curve"}``.
    """
    device = resolve_device(params.device)
    torch.manual_seed(params.seed)
    windows = torch.from_numpy(training_windows(train, params.max_len))
    if len(windows) == 0:
        raise ConfigError("no user has two known items: SASRec has nothing to learn from")
    model = SasrecModel(n_items, params).to(device)
    info = train_next_item(
        model,
        windows,
        params,
        lambda m: validation_ndcg(m, valid_hist, valid_targets, params),
        f"sasrec {params.grid_point()}",
    )
    return model, info


def tune_sasrec(
    train: Histories,
    n_items: int,
    valid_hist: Histories,
    valid_targets: Targets,
    base: SasrecParams,
    grid: Sequence[dict[str, Any]] = GRID,
) -> tuple[SasrecModel, SasrecParams, dict[str, Any]]:
    """Fit every grid point (early-stopped), keep the one with the best validation NDCG@10.

    Returns the best model, its parameters and ``{"chosen", "grid": [...], "seconds"}``.
    """
    started = time.monotonic()
    best: tuple[float, SasrecModel, SasrecParams] | None = None
    trials = []
    for point in grid:
        params = dataclasses.replace(base, **point)
        model, info = fit_sasrec(train, n_items, valid_hist, valid_targets, params)
        trials.append({**params.grid_point(), **{k: v for k, v in info.items() if k != "curve"}})
        log.info(
            "sasrec %s: valid NDCG@10 %.4f at epoch %d (%.0fs)",
            point,
            info["valid_ndcg@10"],
            info["best_epoch"],
            info["seconds"],
        )
        if best is None or info["valid_ndcg@10"] > best[0]:
            best = (info["valid_ndcg@10"], model, params)
    if best is None:
        raise ConfigError("the SASRec grid is empty: give at least one configuration")
    _, model, params = best
    chosen = next(t for t in trials if all(t[k] == v for k, v in params.grid_point().items()))
    return model, params, {"chosen": chosen, "grid": trials, "seconds": round(time.monotonic() - started, 1)}


def sasrec_runs(
    cfg: SasrecConfig,
    seed: int,
    sequences: Histories,
    n_items: int,
    valid: Stage,
    test: Stage,
    depth: int,
    grid: Sequence[dict[str, Any]] = GRID,
) -> tuple[dict[str, list[np.ndarray]], dict[str, Any]]:
    """SASRec as a baseline of one run: tuned on ``valid``, ranking ``test``'s users.

    ``sequences``: every user's items known before the validation targets (the training data);
    ``n_items``: the catalog size (every item is ranked).
    Returns ``({"sasrec": [ranked]}, {"sasrec": tuning info})``, both empty when disabled, for
    :func:`llmrec_tasks.ranking.protocols.evaluate_stages` (``extra_runs``) and the results.
    """
    if not cfg.enabled:
        return {}, {}
    resolve_device(cfg.device)  # refuse a missing GPU before any work
    with torch_threads(cfg.threads):
        model, params, info = tune_sasrec(
            sequences, n_items, valid.hist, valid.targets, SasrecParams.from_config(cfg, seed), grid
        )
        ranked = score_users(model, test.hist, params, depth)
    info = {**info, "threads": cfg.threads, "device": cfg.device, "seed": seed}
    log.info(
        "sasrec chosen %s: valid NDCG@10 %.4f at epoch %d; tuning took %.0fs",
        params.grid_point(),
        info["chosen"]["valid_ndcg@10"],
        info["chosen"]["best_epoch"],
        info["seconds"],
    )
    return {SASREC: [ranked]}, {SASREC: info}
