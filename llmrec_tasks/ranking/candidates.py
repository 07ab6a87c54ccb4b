"""Candidate generation: what the ranker chooses from, per user.

A :class:`RankContext` holds everything learned from one set of *known* interactions (the
statistics side of a split): item embeddings and a FAISS index over them, per-item popularity over
time, and sparse item-to-item relations (top ``neighbors_k`` per item):

- ``next``: sequential co-visitation, item -> items that followed it within ``covis_window`` steps
  in a user's sequence (weight distance ** -covis_distance_power), divided by the item's outgoing
  mass ** covis_norm_power;
- ``prev``: the same, backwards (items that usually come *before* the item);
- ``cooc``: item-kNN cosine of the user-item co-occurrence matrix;
- ``ease``: EASE item-item weights (closed form, on the ``ease_max_items`` most popular items).

:func:`generate_candidates` takes a :class:`Histories` (each user's items, oldest first, and the
time the recommendation is made) and unions the top lists of the sources :data:`SOURCES`, each
recording its score and rank for the ranker. The same code runs in training, in the benchmark and
at serving time (where the context is rebuilt from published artifacts, see
:func:`context_from_artifacts`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from llmrec_tasks.core import constants as C
from llmrec_tasks.core.errors import ConfigError, DataContractError

log = logging.getLogger(__name__)

SOURCES = ("faiss_profile", "faiss_last", "next", "prev", "cooc", "ease", "pop")
RELATIONS = ("next", "prev", "cooc", "ease")
DAY = 86400.0


@dataclass(frozen=True)
class ContextParams:
    """How relations and user profiles are built (saved in the feature spec for serving)."""

    covis_window: int = 10
    covis_distance_power: float = 0.5
    covis_norm_power: float = 0.5
    neighbors_k: int = 100
    ease_lambda: float = 100.0
    ease_max_items: int = 4000
    recent_items: int = 5  # last items whose neighbours feed `next`, `prev` and `faiss_last`
    recent_decay: float = 0.6  # weight of the p-th most recent item: recent_decay ** p
    profile_half_life: float = 10.0  # in history positions, for the recency-weighted profile
    pop_windows: tuple[int, ...] = (1000, 10000)  # popularity over the last N events before the ref time

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "pop_windows": list(self.pop_windows)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ContextParams:
        return cls(**{**values, "pop_windows": tuple(values["pop_windows"])})


@dataclass(frozen=True)
class CandidateParams:
    """Per-source list lengths and the cap on the union."""

    num_candidates: int = 200
    per_source: int = 60  # each source contributes its top `per_source` items
    rank_depth: int = 200  # ranks beyond this are recorded as rank_depth + 1

    def __post_init__(self) -> None:
        if self.per_source > self.rank_depth:
            raise ConfigError(
                f"per_source ({self.per_source}) must not exceed rank_depth ({self.rank_depth})"
            )


@dataclass(frozen=True)
class Events:
    """Encoded interactions sorted by (user, time, item order): the input of every statistic."""

    user: np.ndarray  # int64 user index
    item: np.ndarray  # int64 item index
    ts: np.ndarray  # float64 unix seconds
    weight: np.ndarray  # float32

    def __len__(self) -> int:
        return len(self.user)

    def take(self, mask: np.ndarray) -> Events:
        return Events(self.user[mask], self.item[mask], self.ts[mask], self.weight[mask])


def item_order(item_ids: list[str] | np.ndarray) -> np.ndarray:
    """Rank of each id in natural order (numeric when every id is an integer): the tie-breaker
    for interactions with the same timestamp."""
    ids = pd.Series(np.asarray(item_ids, dtype=str))
    numeric = pd.to_numeric(ids, errors="coerce")
    keys = numeric.to_numpy() if numeric.notna().all() else ids.to_numpy()
    order = np.argsort(keys, kind="stable")
    rank = np.empty(len(ids), dtype=np.int64)
    rank[order] = np.arange(len(ids))
    return rank


def encode_events(
    interactions: pd.DataFrame, item_index: pd.Index, user_index: pd.Index | None = None
) -> tuple[Events, pd.Index]:
    """Map a typed interaction frame to :class:`Events` (unknown items dropped); returns the user index."""
    frame = interactions[interactions[C.ITEM_ID].isin(item_index)]
    if user_index is None:
        user_index = pd.Index(np.sort(frame[C.USER_ID].unique()))
    frame = frame[frame[C.USER_ID].isin(user_index)]
    user = user_index.get_indexer(frame[C.USER_ID]).astype(np.int64)
    item = item_index.get_indexer(frame[C.ITEM_ID]).astype(np.int64)
    ts = frame[C.TIMESTAMP].to_numpy(dtype="datetime64[ns]").astype(np.int64) / 1e9
    weight = (
        frame[C.WEIGHT].to_numpy(dtype=np.float32) if C.WEIGHT in frame else np.ones(len(frame), np.float32)
    )
    tie = item_order(item_index.to_numpy())[item]
    order = np.lexsort((tie, ts, user))
    return Events(user[order], item[order], ts[order], weight[order]), user_index


@dataclass(frozen=True)
class Histories:
    """Each user's items (oldest first) with timestamps, and the time the ranking is made."""

    indptr: np.ndarray  # int64, n_users + 1
    items: np.ndarray  # int64
    ts: np.ndarray  # float64
    ref_ts: np.ndarray  # float64 per user

    @property
    def n_users(self) -> int:
        return len(self.indptr) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.indptr)

    @classmethod
    def from_events(cls, events: Events, n_users: int, ref_ts: np.ndarray | None = None) -> Histories:
        """Histories of users 0..n_users-1 from sorted events; ref time defaults to the last event."""
        counts = np.bincount(events.user, minlength=n_users)
        indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        if ref_ts is None:
            last = np.where(counts > 0, events.ts[np.maximum(indptr[1:] - 1, 0)], np.nan)
            ref_ts = last
        return cls(
            indptr, events.item.astype(np.int64), events.ts.astype(np.float64), np.asarray(ref_ts, float)
        )

    @classmethod
    def from_lists(
        cls, items: list[np.ndarray], timestamps: list[np.ndarray], ref_ts: np.ndarray
    ) -> Histories:
        """Build from per-user arrays (serving: one request = one user), each oldest first."""
        counts = np.array([len(x) for x in items], dtype=np.int64)
        indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        flat_items = (
            np.concatenate([np.asarray(x, np.int64) for x in items]) if items else np.zeros(0, np.int64)
        )
        flat_ts = np.concatenate([np.asarray(x, float) for x in timestamps]) if items else np.zeros(0)
        return cls(indptr, flat_items, flat_ts, np.asarray(ref_ts, float))

    def subset(self, rows: np.ndarray) -> Histories:
        starts, ends = self.indptr[rows], self.indptr[rows + 1]
        take = np.concatenate([np.arange(s, e) for s, e in zip(starts, ends, strict=True)] or [[]]).astype(
            int
        )
        indptr = np.concatenate([[0], np.cumsum(ends - starts)]).astype(np.int64)
        return Histories(indptr, self.items[take], self.ts[take], self.ref_ts[rows])

    def last(self, k: int) -> np.ndarray:
        """``(n_users, k)`` most recent items first, ``-1`` padded."""
        out = np.full((self.n_users, k), -1, dtype=np.int64)
        lengths = self.lengths
        for p in range(k):
            has = lengths > p
            out[has, p] = self.items[self.indptr[1:][has] - 1 - p]
        return out

    def position_from_end(self) -> np.ndarray:
        """For every history entry: 0 for the user's most recent item, 1 for the one before, ..."""
        user_of = np.repeat(np.arange(self.n_users), self.lengths)
        return (self.indptr[1:][user_of] - 1 - np.arange(len(self.items))).astype(np.int64)

    def weight_matrix(self, n_items: int, weights: np.ndarray) -> sp.csr_matrix:
        """Sparse ``(n_users, n_items)`` with the given weight per history entry (duplicates summed)."""
        user_of = np.repeat(np.arange(self.n_users), self.lengths)
        return sp.csr_matrix(
            (weights.astype(np.float32), (user_of, self.items)), shape=(self.n_users, n_items)
        )


@dataclass
class ItemTimes:
    """Per-item sorted interaction times: popularity in any window before any reference time."""

    keys: np.ndarray  # item * span + (ts - t0), sorted
    span: float
    t0: float
    all_ts: np.ndarray  # every event time, sorted
    items_by_time: np.ndarray  # the item of each event, in the order of ``all_ts``

    @classmethod
    def build(cls, item: np.ndarray, ts: np.ndarray) -> ItemTimes:
        t0 = float(ts.min()) if len(ts) else 0.0
        span = float(ts.max() - t0 + 2 * DAY) if len(ts) else 1.0
        order = np.argsort(ts, kind="stable")
        return cls(np.sort(item * span + (ts - t0)), span, t0, ts[order], item[order])

    def count(self, items: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray:
        """Interactions of ``items`` with ``start < ts <= end`` (arrays broadcast together)."""
        base = items * self.span - self.t0
        lo = np.searchsorted(
            self.keys, base + np.clip(start, self.t0 - DAY, self.t0 + self.span - DAY), "right"
        )
        hi = np.searchsorted(
            self.keys, base + np.clip(end, self.t0 - DAY, self.t0 + self.span - DAY), "right"
        )
        return (hi - lo).astype(np.float32)

    def window_start(self, ref: np.ndarray, n_events: int) -> np.ndarray:
        """Exclusive start of the window ``(start, ref]`` holding the last ``n_events`` events up to
        ``ref`` (scale-free popularity windows); -inf when there are fewer events."""
        pos = np.searchsorted(self.all_ts, ref, "right") - n_events - 1
        return np.where(pos >= 0, self.all_ts[np.clip(pos, 0, len(self.all_ts) - 1)], -np.inf)

    def window_items(self, ref: float, n_events: int) -> np.ndarray:
        """Distinct items of the window ``(window_start, ref]`` (sorted)."""
        start = self.window_start(np.array([ref]), n_events)[0]
        lo, hi = np.searchsorted(self.all_ts, [start, ref], "right")
        return np.unique(self.items_by_time[lo:hi])

    def first_before(self, items: np.ndarray, ref: np.ndarray) -> np.ndarray:
        """Earliest interaction time of each item, if it is at or before ``ref`` (else NaN)."""
        block = items * self.span  # keys of an item lie in [block, block + span - 2 days]
        first = np.minimum(np.searchsorted(self.keys, block, "left"), len(self.keys) - 1)
        found = self.keys[first] - block + self.t0
        ok = (self.keys[first] >= block) & (self.keys[first] < block + self.span) & (found <= ref)
        return np.where(ok, found, np.nan)

    def last_before(self, items: np.ndarray, ref: np.ndarray) -> np.ndarray:
        """Latest interaction time of each item at or before ``ref`` (NaN if none)."""
        block = items * self.span
        end = block + np.clip(ref - self.t0, -DAY, self.span - DAY)
        idx = np.maximum(np.searchsorted(self.keys, end, "right") - 1, 0)
        ok = (self.keys[idx] >= block) & (self.keys[idx] <= end)
        return np.where(ok, self.keys[idx] - block + self.t0, np.nan)


@dataclass
class RankContext:
    """Everything candidates and features need, learned from one set of known interactions.

    ``times`` is set when the context is built from events (training, benchmark): popularity is
    then exact at any reference time. A context rebuilt for serving has no events: ``frozen``
    holds the per-item popularity at ``stats_end`` and reference times are taken as "now".
    """

    params: ContextParams
    embeddings: np.ndarray  # (n_items, dim) float32, L2-normalised
    categories: sp.csr_matrix  # (n_items, n_categories) binary
    category_names: list[str]
    relations: dict[str, sp.csr_matrix]
    item_pop: np.ndarray  # interactions per item in the statistics
    item_weight: np.ndarray  # mean interaction weight per item (NaN when never seen)
    item_first: np.ndarray  # first interaction time (NaN when never seen)
    item_text_len: np.ndarray  # words in title + text
    stats_end: float
    times: ItemTimes | None = None
    frozen: dict[str, np.ndarray] = field(default_factory=dict)
    cache: dict[Any, np.ndarray] = field(default_factory=dict)  # per-context derived arrays
    _index: Any = None

    @property
    def n_items(self) -> int:
        return self.embeddings.shape[0]

    def faiss_index(self) -> Any:
        """The retrieval index: the one the context was given (training's shared index, serving's
        published one), else exact inner product over the embeddings, built once."""
        if self._index is None:
            import faiss

            index = faiss.IndexFlatIP(self.embeddings.shape[1])
            index.add(np.ascontiguousarray(self.embeddings, dtype=np.float32))
            self._index = index
        return self._index

    def window_counts(self, items: np.ndarray, ref: np.ndarray, n_events: int) -> np.ndarray:
        """Interactions with each item among the last ``n_events`` events before ``ref``."""
        if self.times is None:
            return self.frozen[f"pop_{n_events}"][items]
        start = self.times.window_start(ref, n_events)
        return self.times.count(items, start, ref)

    def cached(self, key: Any, make: Callable[[], np.ndarray]) -> np.ndarray:
        """A derived array computed once per context (serving reuses one context per bundle)."""
        if key not in self.cache:
            self.cache[key] = make()
        return self.cache[key]

    def window_items(self, ref: float, n_events: int) -> np.ndarray:
        """Items with interactions among the last ``n_events`` events before ``ref`` (sorted)."""
        if self.times is None:
            return self.cached(
                ("window_items", n_events), lambda: np.flatnonzero(self.frozen[f"pop_{n_events}"] > 0)
            )
        return self.times.window_items(ref, n_events)

    def pop_before(self, items: np.ndarray, ref: np.ndarray) -> np.ndarray:
        if self.times is None:
            return self.item_pop[items]
        return self.times.count(items, np.full_like(ref, -np.inf), ref)

    def first_before(self, items: np.ndarray, ref: np.ndarray) -> np.ndarray:
        if self.times is None:
            return self.item_first[items]
        return self.times.first_before(items, ref)

    def last_before(self, items: np.ndarray, ref: np.ndarray) -> np.ndarray:
        if self.times is None:
            return self.frozen["last_ts"][items]
        return self.times.last_before(items, ref)


def category_matrix(categories: pd.Series) -> tuple[sp.csr_matrix, list[str]]:
    """Binary item x category matrix from ``|``-separated strings (empty -> no category)."""
    split = categories.fillna("").astype(str).str.split(C.CATEGORY_SEPARATOR, regex=False)
    exploded = split.explode().str.strip()
    exploded = exploded[exploded != ""]
    names = sorted(exploded.unique().tolist())
    col = pd.Index(names).get_indexer(exploded.to_numpy())
    rows = exploded.index.to_numpy()
    matrix = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, col)), shape=(len(categories), len(names)))
    matrix.data[:] = 1.0
    return matrix, names


def _topk_rows(matrix: sp.csr_matrix | np.ndarray, k: int) -> sp.csr_matrix:
    """Keep the ``k`` largest positive entries of each row (sparse result)."""
    if isinstance(matrix, np.ndarray):
        n = matrix.shape[0]
        k = min(k, matrix.shape[1])
        part = np.argpartition(-matrix, k - 1, axis=1)[:, :k]
        vals = np.take_along_axis(matrix, part, axis=1)
        rows = np.repeat(np.arange(n), k)
        keep = vals.ravel() > 0
        return sp.csr_matrix((vals.ravel()[keep], (rows[keep], part.ravel()[keep])), shape=matrix.shape)
    coo = matrix.tocoo()
    keep = coo.data > 0
    row, col, val = coo.row[keep], coo.col[keep], coo.data[keep]
    order = np.lexsort((col, -val, row))  # ties: lower column first
    row, col, val = row[order], col[order], val[order]
    starts = np.searchsorted(row, row, "left")
    within = np.arange(len(row)) - starts
    keep = within < k
    return sp.csr_matrix((val[keep], (row[keep], col[keep])), shape=matrix.shape)


def _sequential_covis(events: Events, n_items: int, window: int, power: float) -> sp.csr_matrix:
    """Item i followed by item j within ``window`` steps of a user's sequence, weight distance**-power."""
    rows, cols, vals = [], [], []
    for d in range(1, window + 1):
        same = events.user[d:] == events.user[:-d]
        rows.append(events.item[:-d][same])
        cols.append(events.item[d:][same])
        vals.append(np.full(int(same.sum()), d**-power, dtype=np.float32))
    matrix = sp.csr_matrix(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n_items, n_items)
    )
    matrix.setdiag(0)
    matrix.eliminate_zeros()
    return matrix


def _row_normalise(matrix: sp.csr_matrix, power: float) -> sp.csr_matrix:
    """Divide each row by (its mass + 1) ** power: 1 = conditional probability, 0 = raw counts."""
    totals = np.asarray(matrix.sum(axis=1)).ravel()
    return sp.csr_matrix(sp.diags(1.0 / (totals + 1.0) ** power) @ matrix)


def _user_item(events: Events, n_users: int, n_items: int) -> sp.csr_matrix:
    matrix = sp.csr_matrix(
        (np.ones(len(events), np.float32), (events.user, events.item)), shape=(n_users, n_items)
    )
    matrix.data[:] = 1.0  # repeated consumption counts once
    return matrix


def _cooc_cosine(x: sp.csr_matrix, k: int, block_items: int = 4096) -> sp.csr_matrix:
    """Item-kNN: cosine of item columns of ``x``, top ``k`` per item. Sparse products in blocks of
    items: work and memory follow the co-occurrences, not the square of the catalog."""
    n_items = x.shape[1]
    xt = sp.csr_matrix(x.T, dtype=np.float32)
    inv_norm = 1.0 / np.sqrt(np.maximum(np.asarray(x.sum(axis=0)).ravel(), 1.0)).astype(np.float32)
    parts = []
    for start in range(0, n_items, block_items):
        stop = min(start + block_items, n_items)
        block = (xt[start:stop] @ x).tocoo()
        off_diagonal = block.row + start != block.col
        row, col = block.row[off_diagonal], block.col[off_diagonal]
        val = block.data[off_diagonal] * (inv_norm[start + row] * inv_norm[col])
        parts.append(_topk_rows(sp.csr_matrix((val, (row, col)), shape=(stop - start, n_items)), k))
    return sp.csr_matrix(sp.vstack(parts)) if parts else sp.csr_matrix((0, n_items), dtype=np.float32)


def _ease(x: sp.csr_matrix, pop: np.ndarray, lam: float, max_items: int, k: int) -> sp.csr_matrix:
    """EASE (Steck 2019) on the most popular items; top-k weights per item, zero elsewhere."""
    n_items = x.shape[1]
    keep = np.flatnonzero(pop > 0)
    if keep.size > max_items:
        keep = np.sort(keep[np.argsort(-pop[keep], kind="stable")[:max_items]])
    if keep.size < 2:
        return sp.csr_matrix((n_items, n_items), dtype=np.float32)
    sub = x[:, keep]
    gram = (sub.T @ sub).toarray().astype(np.float64)
    gram[np.diag_indices_from(gram)] += lam
    inv = np.linalg.inv(gram)
    weights = -inv / np.diag(inv)
    weights[np.diag_indices_from(weights)] = 0.0
    top = _topk_rows(weights.astype(np.float32), k).tocoo()
    return sp.csr_matrix((top.data, (keep[top.row], keep[top.col])), shape=(n_items, n_items))


def build_context(
    events: Events,
    n_users: int,
    embeddings: np.ndarray,
    items: pd.DataFrame,
    params: ContextParams,
    *,
    index: Any = None,
) -> RankContext:
    """Learn relations and item statistics from ``events`` (the known interactions only).

    ``items`` is the typed item frame in embedding row order (categories, title, text); ``index``
    a retrieval index over the embeddings to share between contexts (else exact, built on use).
    """
    started = time.monotonic()
    n_items = embeddings.shape[0]
    if len(items) != n_items:
        raise DataContractError(f"{len(items)} items but {n_items} embedding rows: re-run the embed stage")
    pop = np.bincount(events.item, minlength=n_items).astype(np.float32)
    x = _user_item(events, n_users, n_items)
    covis = _sequential_covis(events, n_items, params.covis_window, params.covis_distance_power)
    norm = params.covis_norm_power
    relations = {
        "next": _topk_rows(_row_normalise(covis, norm), params.neighbors_k),
        "prev": _topk_rows(_row_normalise(sp.csr_matrix(covis.T), norm), params.neighbors_k),
        "cooc": _cooc_cosine(x, params.neighbors_k),
        "ease": _ease(x, pop, params.ease_lambda, params.ease_max_items, params.neighbors_k),
    }
    weight_sum = np.bincount(events.item, weights=events.weight, minlength=n_items)
    first = np.full(n_items, np.inf)
    np.minimum.at(first, events.item, events.ts)
    last = np.full(n_items, -np.inf)
    np.maximum.at(last, events.item, events.ts)
    categories, names = category_matrix(items[C.CATEGORIES].reset_index(drop=True))
    words = (items[C.TITLE].fillna("") + " " + items[C.TEXT].fillna("")).str.split().str.len()
    times = ItemTimes.build(events.item, events.ts)
    stats_end = float(events.ts.max()) if len(events) else 0.0
    ctx = RankContext(
        params=params,
        embeddings=np.ascontiguousarray(embeddings, dtype=np.float32),
        categories=categories,
        category_names=names,
        relations=relations,
        item_pop=pop,
        item_weight=np.where(pop > 0, weight_sum / np.maximum(pop, 1), np.nan).astype(np.float32),
        item_first=np.where(np.isfinite(first), first, np.nan),
        item_text_len=words.to_numpy(dtype=np.float32),
        stats_end=stats_end,
        times=times,
        _index=index,
    )
    all_items = np.arange(n_items)
    ref = np.full(n_items, stats_end)
    ctx.frozen = {f"pop_{w}": ctx.window_counts(all_items, ref, w) for w in params.pop_windows}
    ctx.frozen["last_ts"] = np.where(np.isfinite(last), last, np.nan)
    log.info(
        "context: %d items, %d events, relations nnz %s (%.1fs)",
        n_items,
        len(events),
        {name: rel.nnz for name, rel in relations.items()},
        time.monotonic() - started,
    )
    return ctx


# --- serving artifacts -------------------------------------------------------------------------


def serving_frames(ctx: RankContext, item_ids: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-item statistics and item-item neighbours as frames (Parquet at publish time).

    Item indices in the neighbours frame refer to rows of ``item_ids`` (the embeddings order).
    """
    stats = pd.DataFrame(
        {
            C.ITEM_ID: item_ids,
            "pop": ctx.item_pop,
            "weight_mean": ctx.item_weight,
            "first_ts": ctx.item_first,
            "last_ts": ctx.frozen["last_ts"],
            "text_len": ctx.item_text_len,
            C.CATEGORIES: _categories_strings(ctx),
            **{f"pop_{w}": ctx.frozen[f"pop_{w}"] for w in ctx.params.pop_windows},
        }
    )
    parts = []
    for name in RELATIONS:
        coo = ctx.relations[name].tocoo()
        parts.append(
            pd.DataFrame(
                {
                    "relation": name,
                    "src": coo.row.astype(np.int32),
                    "dst": coo.col.astype(np.int32),
                    "value": coo.data.astype(np.float32),
                }
            )
        )
    neighbours = pd.concat(parts, ignore_index=True)
    neighbours["relation"] = neighbours["relation"].astype("category")
    return stats, neighbours


def _categories_strings(ctx: RankContext) -> list[str]:
    names = np.asarray(ctx.category_names, dtype=object)
    cats = ctx.categories
    return [
        C.CATEGORY_SEPARATOR.join(names[cats.indices[cats.indptr[i] : cats.indptr[i + 1]]])
        for i in range(cats.shape[0])
    ]


def context_from_artifacts(
    item_ids: list[str],
    embeddings: np.ndarray,
    stats: pd.DataFrame,
    neighbours: pd.DataFrame,
    params: dict[str, Any],
    stats_end: float,
) -> RankContext:
    """Rebuild a serving :class:`RankContext` from published artifacts (no interactions needed)."""
    if stats[C.ITEM_ID].astype(str).tolist() != list(item_ids):
        raise DataContractError(
            "serving stats and item_ids.json list different items: the bundle is inconsistent"
        )
    n_items = len(item_ids)
    relations = {}
    for name in RELATIONS:
        part = neighbours[neighbours["relation"] == name]
        relations[name] = sp.csr_matrix(
            (part["value"].to_numpy(np.float32), (part["src"].to_numpy(), part["dst"].to_numpy())),
            shape=(n_items, n_items),
        )
    categories, names = category_matrix(stats[C.CATEGORIES].reset_index(drop=True))
    ctx_params = ContextParams.from_dict(params)
    return RankContext(
        params=ctx_params,
        embeddings=np.ascontiguousarray(embeddings, dtype=np.float32),
        categories=categories,
        category_names=names,
        relations=relations,
        item_pop=stats["pop"].to_numpy(np.float32),
        item_weight=stats["weight_mean"].to_numpy(np.float32),
        item_first=stats["first_ts"].to_numpy(float),
        item_text_len=stats["text_len"].to_numpy(np.float32),
        stats_end=stats_end,
        times=None,
        frozen={
            "last_ts": stats["last_ts"].to_numpy(float),
            **{f"pop_{w}": stats[f"pop_{w}"].to_numpy(np.float32) for w in ctx_params.pop_windows},
        },
    )


# --- candidate generation ----------------------------------------------------------------------


@dataclass
class CandidateSet:
    """Candidates per user (ragged) with each source's score and rank for every candidate."""

    indptr: np.ndarray  # int64, n_users + 1
    items: np.ndarray  # int64
    scores: np.ndarray  # (n, len(SOURCES)) float32
    ranks: np.ndarray  # (n, len(SOURCES)) float32; rank_depth + 1 when outside a source's top list
    source_recall: dict[str, float] = field(default_factory=dict)

    @property
    def n_users(self) -> int:
        return len(self.indptr) - 1

    @property
    def user_of(self) -> np.ndarray:
        return np.repeat(np.arange(self.n_users), np.diff(self.indptr))


@dataclass
class _Batch:
    """Per-source scores and top lists of one batch of users; sparse, so a batch costs what its
    users' histories touch, not the catalog size."""

    scores: dict[str, sp.csr_matrix]  # relation sources, (B, n_items); seen items included
    lists: dict[str, np.ndarray]  # (B, rank_depth) item indices, -1 padded
    profile: np.ndarray  # (B, dim) recency-weighted profile
    seen: np.ndarray  # sorted keys ``user * n_items + item`` of the batch's histories


def user_profiles(ctx: RankContext, hist: Histories) -> tuple[np.ndarray, np.ndarray]:
    """Recency-weighted and uniform mean embeddings of each user's history (L2-normalised)."""
    pos = hist.position_from_end()
    recency = np.power(0.5, pos / ctx.params.profile_half_life)
    out = []
    for weights in (recency, np.ones(len(pos))):
        matrix = hist.weight_matrix(ctx.n_items, weights)
        profile = np.asarray(matrix @ ctx.embeddings, dtype=np.float32)
        norms = np.linalg.norm(profile, axis=1, keepdims=True)
        out.append(np.divide(profile, norms, out=np.zeros_like(profile), where=norms > 0))
    return out[0], out[1]


def recent_weights(ctx: RankContext, hist: Histories) -> np.ndarray:
    """Weight per history entry: ``recent_decay ** p`` for the ``recent_items`` most recent, else 0."""
    pos = hist.position_from_end()
    return np.where(pos < ctx.params.recent_items, np.power(ctx.params.recent_decay, pos), 0.0)


def collaborative_scores(ctx: RankContext, hist: Histories) -> dict[str, sp.csr_matrix]:
    """Sparse ``(n_users, n_items)`` scores of the relation sources for a batch of users."""
    pos = hist.position_from_end()
    recent = hist.weight_matrix(ctx.n_items, recent_weights(ctx, hist))
    longterm = hist.weight_matrix(ctx.n_items, np.power(0.5, pos / (4 * ctx.params.profile_half_life)))
    binary = hist.weight_matrix(ctx.n_items, np.ones(len(pos)))
    binary.data[:] = 1.0
    products = {
        "next": recent @ ctx.relations["next"],
        "prev": recent @ ctx.relations["prev"],
        "cooc": longterm @ ctx.relations["cooc"],
        "ease": binary @ ctx.relations["ease"],
    }
    for matrix in products.values():
        matrix.sum_duplicates()  # canonical: sorted indices, so (row, item) keys come out sorted
    return products


def _in_sorted(sorted_keys: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """``keys`` membership in a sorted unique array."""
    if sorted_keys.size == 0:
        return np.zeros(np.shape(keys), dtype=bool)
    pos = np.searchsorted(sorted_keys, keys).clip(max=len(sorted_keys) - 1)
    return sorted_keys[pos] == keys


def _lookup(sorted_keys: np.ndarray, values: np.ndarray, keys: np.ndarray, default: float) -> np.ndarray:
    """``values`` at ``keys`` in a sorted unique key array, ``default`` where absent."""
    if sorted_keys.size == 0:
        return np.full(np.shape(keys), default, dtype=values.dtype)
    pos = np.searchsorted(sorted_keys, keys).clip(max=len(sorted_keys) - 1)
    return np.where(sorted_keys[pos] == keys, values[pos], default).astype(values.dtype)


def _csr_keys(matrix: sp.csr_matrix) -> np.ndarray:
    """Sorted keys ``row * n_cols + col`` of a canonical CSR matrix's stored entries."""
    rows = np.repeat(np.arange(matrix.shape[0], dtype=np.int64), np.diff(matrix.indptr))
    return rows * matrix.shape[1] + matrix.indices


def _rank_lists(rows: np.ndarray, cols: np.ndarray, vals: np.ndarray, n_rows: int, depth: int) -> np.ndarray:
    """``(n_rows, depth)`` columns of the best positive ``vals`` per row, best first (ties: lower
    column), ``-1`` padded; from (row, col, value) triples with unique (row, col)."""
    keep = vals > 0
    rows, cols, vals = rows[keep], cols[keep], vals[keep]
    order = np.lexsort((cols, -vals, rows))
    rows, cols = rows[order], cols[order]
    pos = np.arange(len(rows)) - np.searchsorted(rows, rows)
    take = pos < depth
    out = np.full((n_rows, depth), -1, dtype=np.int64)
    out[rows[take], pos[take]] = cols[take]
    return out


def _relation_lists(matrix: sp.csr_matrix, seen: np.ndarray, depth: int) -> np.ndarray:
    keys = _csr_keys(matrix)
    unseen = ~_in_sorted(seen, keys)
    n_items = matrix.shape[1]
    return _rank_lists(
        keys[unseen] // n_items, keys[unseen] % n_items, matrix.data[unseen], matrix.shape[0], depth
    )


def _pop_score(ctx: RankContext, items: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Popularity in the first window, plus a tiny prior that breaks ties deterministically."""
    counts = ctx.window_counts(items, ref, ctx.params.pop_windows[0])
    prior = ctx.cached("pop_prior", lambda: ctx.item_pop / (ctx.item_pop.max(initial=0) + 1) * 1e-3)
    return counts + prior[items]


def _pop_lists(ctx: RankContext, hist: Histories, seen: np.ndarray, depth: int) -> np.ndarray:
    """Most popular unseen items at each user's reference time. Only items in the window or among
    the most popular overall can make a list, so only those are scored."""
    n_users, n_items = hist.n_users, ctx.n_items
    need = min(n_items, depth + int(hist.lengths.max(initial=0)))
    prior_top = ctx.cached(
        ("prior_top", need),
        lambda: (
            np.sort(np.argpartition(-ctx.item_pop, need - 1)[:need]) if need < n_items else np.arange(n_items)
        ),
    )
    refs, ref_of_user = np.unique(hist.ref_ts, return_inverse=True)
    ordered = np.full((len(refs), need), -1, dtype=np.int64)
    for j, ref in enumerate(refs):
        pool = np.union1d(ctx.window_items(ref, ctx.params.pop_windows[0]), prior_top)
        score = _pop_score(ctx, pool, np.full(len(pool), ref))
        ordered[j] = _rank_lists(np.zeros(len(pool), np.int64), pool, score, 1, need)[0]
    cand = ordered[ref_of_user.ravel()]
    valid = (cand >= 0) & ~_in_sorted(seen, np.arange(n_users)[:, None] * n_items + cand)
    order = np.argsort(~valid, axis=1, kind="stable")[:, : min(depth, n_items)]
    return np.where(np.take_along_axis(valid, order, axis=1), np.take_along_axis(cand, order, axis=1), -1)


def _faiss_lists(
    ctx: RankContext, queries: np.ndarray, hist: Histories, seen: np.ndarray, depth: int
) -> tuple[np.ndarray, ...]:
    """FAISS top lists for one query vector per user, history removed; returns (items, scores)."""
    extra = int(hist.lengths.max(initial=0))
    k = min(ctx.n_items, depth + extra)
    scores, idx = ctx.faiss_index().search(np.ascontiguousarray(queries, dtype=np.float32), k)
    keys = np.arange(hist.n_users)[:, None] * ctx.n_items + np.maximum(idx, 0)
    valid = (idx >= 0) & ~_in_sorted(seen, keys)
    # Stable compaction: valid entries first, keeping FAISS order.
    order = np.argsort(~valid, axis=1, kind="stable")[:, :depth]
    items = np.where(np.take_along_axis(valid, order, axis=1), np.take_along_axis(idx, order, axis=1), -1)
    return items, np.take_along_axis(scores, order, axis=1)


def _batch_scores(ctx: RankContext, hist: Histories, params: CandidateParams) -> _Batch:
    n_users, n_items = hist.n_users, ctx.n_items
    depth = min(params.rank_depth, n_items)
    seen = np.unique(np.repeat(np.arange(n_users, dtype=np.int64), hist.lengths) * n_items + hist.items)
    scores = collaborative_scores(ctx, hist)
    lists = {name: _relation_lists(matrix, seen, depth) for name, matrix in scores.items()}
    lists["pop"] = _pop_lists(ctx, hist, seen, depth)
    profile, _ = user_profiles(ctx, hist)
    lists["faiss_profile"], _ = _faiss_lists(ctx, profile, hist, seen, depth)
    lists["faiss_profile"][hist.lengths == 0] = -1
    last = hist.last(ctx.params.recent_items)
    rows, cols, vals = [], [], []
    for p in range(min(3, last.shape[1])):
        items_p, sims_p = _faiss_lists(ctx, ctx.embeddings[np.maximum(last[:, p], 0)], hist, seen, depth)
        ok = (items_p >= 0) & (last[:, p : p + 1] >= 0)
        rows.append(np.broadcast_to(np.arange(n_users)[:, None], items_p.shape)[ok])
        cols.append(items_p[ok])
        vals.append(ctx.params.recent_decay**p * sims_p[ok])
    keys = np.concatenate(rows) * n_items + np.concatenate(cols) if rows else np.zeros(0, np.int64)
    vals = np.concatenate(vals) if vals else np.zeros(0, np.float32)
    order = np.argsort(keys, kind="stable")
    keys, first = np.unique(keys[order], return_index=True)
    best = np.maximum.reduceat(vals[order], first) if len(first) else vals[:0]
    lists["faiss_last"] = _rank_lists(keys // n_items, keys % n_items, best + 2.0, n_users, depth)
    return _Batch(scores=scores, lists=lists, profile=profile, seen=seen)


def rowwise_dot(a: np.ndarray, rows_a: np.ndarray, b: np.ndarray, rows_b: np.ndarray) -> np.ndarray:
    """``a[rows_a[i]] . b[rows_b[i]]`` for every i, in chunks (bounded memory)."""
    out = np.empty(len(rows_a), dtype=np.float32)
    for lo in range(0, len(rows_a), 65_536):
        hi = lo + 65_536
        out[lo:hi] = np.einsum("nd,nd->n", a[rows_a[lo:hi]], b[rows_b[lo:hi]])
    return out


def generate_candidates(
    ctx: RankContext,
    hist: Histories,
    params: CandidateParams,
    *,
    targets: Any = None,
    batch_size: int = 512,
) -> CandidateSet:
    """Union of each source's top ``per_source`` items (history excluded), capped at ``num_candidates``.

    When the cap bites, candidates with the best rank in any source are kept (then by item index);
    otherwise they come in item order. ``targets`` (an :class:`llmrec_tasks.ranking.evaluate.Targets`)
    fills ``source_recall``: the share of target items each source's list contains, and ``all`` for
    the final set. Work and memory grow with users x list lengths, not with the catalog size.
    """
    started = time.monotonic()
    n_items, absent = ctx.n_items, np.float32(params.rank_depth + 1)
    parts_items, parts_scores, parts_ranks, counts = [], [], [], []
    source_found = dict.fromkeys(SOURCES, 0)
    for start in range(0, hist.n_users, batch_size):
        rows = np.arange(start, min(start + batch_size, hist.n_users))
        sub = hist.subset(rows)
        batch = _batch_scores(ctx, sub, params)
        ranked = {}  # source -> (sorted keys user * n_items + item, rank)
        for name in SOURCES:
            lst = batch.lists[name]
            r, c = np.nonzero(lst >= 0)
            keys = r * n_items + lst[r, c]
            order = np.argsort(keys)
            ranked[name] = (keys[order], (c[order] + 1).astype(np.float32))
        keys = np.concatenate([k[rank <= params.per_source] for k, rank in ranked.values()])
        best = np.concatenate([rank[rank <= params.per_source] for _, rank in ranked.values()])
        order = np.lexsort((best, keys))
        keys, first = np.unique(keys[order], return_index=True)
        best = best[order][first]
        user, item = keys // n_items, keys % n_items
        per_user = np.bincount(user, minlength=len(rows))
        capped = per_user > params.num_candidates
        if capped.any():
            order = np.lexsort((item, best, user))
            pos = np.arange(len(order)) - np.searchsorted(user[order], user[order])
            keep = np.sort(order[pos < params.num_candidates])
            keys, best, user, item = keys[keep], best[keep], user[keep], item[keep]
            order = np.lexsort((item, np.where(capped[user], best, 0), user))
            keys, user, item = keys[order], user[order], item[order]
        counts.extend(np.bincount(user, minlength=len(rows)).tolist())
        parts_items.append(item)
        parts_ranks.append(np.stack([_lookup(k, rank, keys, absent) for k, rank in ranked.values()], axis=1))
        sc = [rowwise_dot(ctx.embeddings, item, batch.profile, user)]
        last3 = sub.last(3)
        recent = np.full(len(item), -np.inf, dtype=np.float32)
        for p in range(last3.shape[1]):
            has = last3[user, p] >= 0
            sims = rowwise_dot(ctx.embeddings, item[has], ctx.embeddings, last3[user[has], p])
            recent[has] = np.maximum(recent[has], sims)
        sc.append(np.where(np.isfinite(recent), recent, 0.0))
        for name in ("next", "prev", "cooc", "ease"):
            matrix = batch.scores[name]
            sc.append(_lookup(_csr_keys(matrix), matrix.data, keys, 0.0))
        sc.append(_pop_score(ctx, item, sub.ref_ts[user]))
        parts_scores.append(np.stack(sc, axis=1).astype(np.float32))
        if targets is not None:
            local = np.repeat(np.arange(len(rows)), targets.counts[rows])
            tgt_items = np.concatenate(
                [targets.items[targets.indptr[u] : targets.indptr[u + 1]] for u in rows]
            ).astype(np.int64)
            tgt_keys = local * n_items + tgt_items
            for name, (k, rank) in ranked.items():
                source_found[name] += int((_lookup(k, rank, tgt_keys, absent) <= params.per_source).sum())
        if hist.n_users > batch_size:
            log.info("candidates: %d/%d users", rows[-1] + 1, hist.n_users)
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    items = np.concatenate(parts_items).astype(np.int64) if parts_items else np.zeros(0, np.int64)
    n_src = len(SOURCES)
    cands = CandidateSet(
        indptr=indptr,
        items=items,
        scores=np.concatenate(parts_scores) if parts_scores else np.zeros((0, n_src), np.float32),
        ranks=np.concatenate(parts_ranks) if parts_ranks else np.zeros((0, n_src), np.float32),
    )
    if targets is not None:
        total = max(len(targets.items), 1)
        cands.source_recall = {name: source_found[name] / total for name in SOURCES}
        cands.source_recall["all"] = float(candidate_hits(cands, targets).sum() / total)
    # Per-request calls from serving (one user) log at debug level: an INFO line per request is noise.
    log.log(
        logging.INFO if hist.n_users > 1 else logging.DEBUG,
        "candidates for %d users: %.0f per user (%.1fs)",
        hist.n_users,
        len(items) / max(hist.n_users, 1),
        time.monotonic() - started,
    )
    return cands


def candidate_hits(cands: CandidateSet, targets: Any) -> np.ndarray:
    """Boolean per candidate row: is it one of its user's target items."""
    span = np.int64(max(int(cands.items.max(initial=0)), int(targets.items.max(initial=0))) + 2)
    tgt_user = np.repeat(np.arange(targets.n_users), targets.counts)
    relevant = np.unique(tgt_user * span + targets.items)
    keys = cands.user_of * span + cands.items
    if relevant.size == 0:
        return np.zeros(len(keys), dtype=bool)
    pos = np.searchsorted(relevant, keys).clip(max=len(relevant) - 1)
    return relevant[pos] == keys
