"""NumPy inference of the text-aware sequence model: the user state from the latest events.

The weights :mod:`llmrec_tasks.ranking.seqmodel` trains (torch) are exported into a
:class:`SeqWeights` (a flat dict of arrays, saved as one ``.npz`` in the bundle). Training stages,
the benchmark and serving all score through :func:`user_states` and :func:`user_scores`, so
training and serving features agree by construction and serving needs no torch.

Item vectors are ``P t_i + b + delta_i`` (:func:`item_vectors`): ``t_i`` the frozen text vector of
item ``i``, ``P, b`` the learned projection, ``delta_i`` the learned, norm-bounded per-item delta
(zero for items the model never saw, and for items added after training: their vector comes from
their text alone). A user's state is the causal encoder's last hidden state over their last
``max_len`` items; an item's score is the state times its vector.

Each user is computed on their own (no padding, no batch-shape-dependent sums): a user's state
and scores are the same bits alone (a request) or in a training batch. Serving keeps the states it
computed in a bounded :class:`StateMemo` (by the exact items read): a returning user whose latest
``max_len`` items did not change skips the encoder and gets the same bits.
"""

from __future__ import annotations

import io
import json
import threading
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from scipy.special import erf
from threadpoolctl import threadpool_limits

from llmrec_tasks.core.errors import DataContractError
from llmrec_tasks.ranking.events import Histories

LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm's default
STATE_MEMO_SIZE = 20_000  # user states a serving scorer keeps (64 float64 each: ~10 MB at hidden 64)
CONFIG_KEY = "__config__"  # the npz entry holding the JSON architecture (hidden, heads, max_len, layers)


@dataclass(frozen=True)
class SeqWeights:
    """The exported weights (float32 arrays by torch ``state_dict`` name) and the architecture."""

    arrays: dict[str, np.ndarray]
    hidden: int
    heads: int
    layers: int
    max_len: int

    @property
    def n_items(self) -> int:
        return self.arrays["delta"].shape[0]

    def to_bytes(self) -> bytes:
        """One ``.npz`` (the bundle artifact :data:`llmrec_tasks.core.constants.SEQ_MODEL`)."""
        config = {"hidden": self.hidden, "heads": self.heads, "layers": self.layers, "max_len": self.max_len}
        buf = io.BytesIO()
        np.savez(buf, **self.arrays, **{CONFIG_KEY: np.array(json.dumps(config))})
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> SeqWeights:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            if CONFIG_KEY not in npz.files:
                raise DataContractError("the sequence model file has no architecture entry: re-run train")
            config = json.loads(str(npz[CONFIG_KEY]))
            arrays = {name: npz[name] for name in npz.files if name != CONFIG_KEY}
        return cls(arrays=arrays, **config)


def item_vectors(weights: SeqWeights, text: np.ndarray) -> np.ndarray:
    """``(n_items, hidden)`` float64 item vectors ``P t + b + delta`` of the text vectors ``text``."""
    if text.shape[0] != weights.n_items:
        raise DataContractError(
            f"the sequence model knows {weights.n_items} items but the catalog has {text.shape[0]}: "
            "the bundle's embeddings and sequence model come from different runs"
        )
    a = weights.arrays
    return text.astype(np.float64) @ a["project.weight"].T.astype(np.float64) + a["project.bias"] + a["delta"]


class StateMemo:
    """The last ``size`` user states computed, by the items the encoder read (least recently used
    dropped first); thread-safe. A state depends on nothing else, so a hit is the same bits."""

    def __init__(self, size: int = STATE_MEMO_SIZE) -> None:
        self.size = size
        self._states: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: bytes) -> np.ndarray | None:
        with self._lock:
            state = self._states.get(key)
            if state is not None:
                self._states.move_to_end(key)
            return state

    def put(self, key: bytes, state: np.ndarray) -> None:
        state.flags.writeable = False  # shared between requests
        with self._lock:
            self._states[key] = state
            self._states.move_to_end(key)
            while len(self._states) > self.size:
                self._states.popitem(last=False)

    def __len__(self) -> int:
        return len(self._states)


@dataclass(frozen=True)
class SeqScorer:
    """What scoring needs, in float64: item vectors and the encoder's weights (built once per context);
    ``memo``: states kept between calls (serving, :meth:`with_memo`), None in training."""

    weights: SeqWeights
    vectors: np.ndarray  # (n_items, hidden)
    arrays: dict[str, np.ndarray]
    memo: StateMemo | None = field(default=None, compare=False)

    def with_memo(self, size: int = STATE_MEMO_SIZE) -> SeqScorer:
        """This scorer keeping its last ``size`` states (serving: a user's requests share them)."""
        return replace(self, memo=StateMemo(size))

    @classmethod
    def build(cls, weights: SeqWeights, text: np.ndarray) -> SeqScorer:
        """Item vectors, and the encoder's weights as float64 with the linear layers' matrices
        transposed (C-contiguous ``x @ W`` is BLAS's fast path)."""
        arrays = {
            k: np.ascontiguousarray(
                v.T if k.endswith(".weight") and v.ndim == 2 and "positions" not in k else v, np.float64
            )
            for k, v in weights.arrays.items()
            if k.startswith("encoder.")
        }
        return cls(weights=weights, vectors=item_vectors(weights, text), arrays=arrays)

    def text_only(self, items: np.ndarray) -> SeqScorer:
        """This scorer with the deltas of ``items`` (bool per item) removed: they score from their
        text alone, as items the model never saw do (simulated new items of a training stage)."""
        delta = np.where(items[:, None], self.weights.arrays["delta"], 0.0)
        return replace(self, vectors=self.vectors - delta)


def _layer_norm(x: np.ndarray, gain: np.ndarray, bias: np.ndarray) -> np.ndarray:
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + LAYER_NORM_EPS) * gain + bias


def _gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + erf(x / np.sqrt(2.0)))


def forward(scorer: SeqScorer, items: np.ndarray) -> np.ndarray:
    """The user state ``(hidden,)`` after the history ``items`` (item rows, oldest first; the last
    ``max_len`` are read). An empty history has no state: zeros."""
    w, a = scorer.weights, scorer.arrays
    items = np.asarray(items, dtype=np.int64)[-w.max_len :]
    length = len(items)
    if length == 0:
        return np.zeros(w.hidden)
    head_dim = w.hidden // w.heads
    scale = np.sqrt(w.hidden)
    x = scorer.vectors[items] * scale + a["encoder.positions.weight"][w.max_len - length :]
    future = np.triu(np.full((length, length), -np.inf), k=1)
    for layer in range(w.layers):
        p = f"encoder.blocks.{layer}."
        h = _layer_norm(x, a[p + "norm_attn.weight"], a[p + "norm_attn.bias"])
        qkv = h @ a[p + "qkv.weight"] + a[p + "qkv.bias"]  # (length, 3 * hidden): q | k | v, heads inside
        # The last block only feeds the state: its queries and feed-forward are the last position's.
        last = layer == w.layers - 1
        rows = slice(length - 1, length) if last else slice(0, length)
        mixed = np.empty((1 if last else length, w.hidden))
        for head in range(w.heads):
            q, k, v = (
                np.ascontiguousarray(
                    qkv[:, (j * w.heads + head) * head_dim : (j * w.heads + head + 1) * head_dim]
                )
                for j in range(3)
            )
            logits = q[rows] @ np.ascontiguousarray(k.T) / np.sqrt(head_dim) + future[rows]
            logits -= logits.max(axis=-1, keepdims=True)
            attn = np.exp(logits)
            attn /= attn.sum(axis=-1, keepdims=True)
            mixed[:, head * head_dim : (head + 1) * head_dim] = attn @ v
        x = x[rows] + mixed @ a[p + "out.weight"] + a[p + "out.bias"]
        h = _layer_norm(x, a[p + "norm_ffn.weight"], a[p + "norm_ffn.bias"])
        h = _gelu(h @ a[p + "ffn.0.weight"] + a[p + "ffn.0.bias"])
        x = x + h @ a[p + "ffn.3.weight"] + a[p + "ffn.3.bias"]
    return _layer_norm(x[-1], a["encoder.norm.weight"], a["encoder.norm.bias"])


def user_states(scorer: SeqScorer, hist: Histories) -> np.ndarray:
    """``(n_users, hidden)`` float64: :func:`forward` of each user's history, user by user (read
    from and kept in ``scorer.memo`` when it has one)."""
    out = np.zeros((hist.n_users, scorer.weights.hidden))
    memo, max_len = scorer.memo, scorer.weights.max_len
    for u in np.flatnonzero(hist.lengths > 0):
        items = hist.items[max(hist.indptr[u], hist.indptr[u + 1] - max_len) : hist.indptr[u + 1]]
        if memo is None:
            out[u] = forward(scorer, items)
            continue
        key = np.asarray(items, dtype=np.int64).tobytes()
        state = memo.get(key)
        if state is None:
            state = forward(scorer, items)
            memo.put(key, state)
        out[u] = state
    return out


def user_scores(scorer: SeqScorer, state: np.ndarray) -> np.ndarray:
    """``(n_items,)`` float64 scores (logits) of every item for one user state."""
    return scorer.vectors @ state


def score_histories(
    scorer: SeqScorer, hist: Histories, depth: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per user: the scores of every item ``(n_users, n_items)``, their log-sum-exp ``(n_users,)``
    and the ``depth`` best unseen items (ties: lower item; -1 padded, also for an empty history).

    User by user, so a user's row is the same alone (a request) or in a batch.
    """
    n_items = scorer.vectors.shape[0]
    depth = min(depth, n_items)
    if hist.n_users > 1:
        # A batch (training, benchmark): these products are small, BLAS threads would only spin
        # (5-20x slower on a busy host). Serving is single-threaded already; results are the same.
        with threadpool_limits(limits=1, user_api="blas"):
            return _score_histories(scorer, hist, depth)
    return _score_histories(scorer, hist, depth)


def _score_histories(
    scorer: SeqScorer, hist: Histories, depth: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n_items = scorer.vectors.shape[0]
    states = user_states(scorer, hist)
    scores = np.empty((hist.n_users, n_items))
    lse = np.empty(hist.n_users)
    lists = np.full((hist.n_users, depth), -1, dtype=np.int64)
    for u in range(hist.n_users):
        scores[u] = user_scores(scorer, states[u])
        top_score = scores[u].max()
        lse[u] = top_score + np.log(np.exp(scores[u] - top_score).sum())
        if hist.lengths[u] == 0:
            continue
        masked = scores[u].copy()
        masked[hist.items[hist.indptr[u] : hist.indptr[u + 1]]] = -np.inf
        top = np.argpartition(-masked, depth - 1)[:depth] if depth < n_items else np.arange(n_items)
        top = top[np.lexsort((top, -masked[top]))]
        lists[u] = np.where(np.isfinite(masked[top]), top, -1)
    return scores, lse, lists


def seq_ranked_lists(scorer: SeqScorer, hist: Histories, depth: int, batch: int = 512) -> np.ndarray:
    """``(n_users, depth)`` the model's best unseen items per user (the standalone baseline row)."""
    parts = [
        score_histories(scorer, hist.subset(np.arange(lo, min(lo + batch, hist.n_users))), depth)[2]
        for lo in range(0, hist.n_users, batch)
    ]
    return np.concatenate(parts) if parts else np.zeros((0, depth), dtype=np.int64)


def describe(weights: SeqWeights) -> dict[str, Any]:
    """The architecture and the delta's size (what the feature spec records)."""
    norms = np.linalg.norm(weights.arrays["delta"], axis=1)
    return {
        "hidden": weights.hidden,
        "heads": weights.heads,
        "layers": weights.layers,
        "max_len": weights.max_len,
        "n_items": weights.n_items,
        "delta_norm_max": float(norms.max(initial=0.0)),
        "items_with_delta": int((norms > 0).sum()),
    }
