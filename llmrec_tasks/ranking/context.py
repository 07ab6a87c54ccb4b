"""The statistics side of a split: everything candidates and features need, learned once.

A :class:`RankContext` holds what one set of *known* interactions teaches: item embeddings and a
retrieval index over them, the text-aware sequence model (trained once per run on the events before
the first training target, :mod:`llmrec_tasks.ranking.seqmodel`, and shared by every stage), per-item popularity over time (:class:`~llmrec_tasks.ranking.events.ItemTimes`)
and the sparse item-to-item relations of :mod:`llmrec_tasks.ranking.relations` (top ``neighbors_k``
per item). :func:`build_context` learns it from events (training, benchmark);
:func:`context_from_artifacts` rebuilds it at serving time from the frames :func:`serving_frames`
publishes. :func:`user_profiles` and :func:`recent_weights` turn a history into the per-user
weights the candidate sources, features and baselines share.
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
from llmrec_tasks.core.config import RankerConfig
from llmrec_tasks.core.errors import DataContractError
from llmrec_tasks.ranking.events import Events, Histories, ItemTimes
from llmrec_tasks.ranking.relations import (
    RELATIONS,
    category_matrix,
    cooc_cosine,
    ease_weights,
    row_normalise,
    sequential_covis,
    topk_rows,
    user_item_matrix,
)
from llmrec_tasks.ranking.seqstate import SeqScorer

log = logging.getLogger(__name__)


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
    cooc_half_life_factor: float = 4.0  # `cooc` history weights: half-life = this x profile_half_life
    recent_similarity_items: int = 20  # sem_recent_max / sem_recent_mean: over the last N items
    burst_seconds: float = 60.0  # user_burst: the user's items within this many seconds of the last one

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "pop_windows": list(self.pop_windows)}

    @classmethod
    def from_config(cls, rcfg: RankerConfig) -> ContextParams:
        """The run's settings (``ranker_*``) of the same names; the two popularity windows as a pair."""
        named = {f.name: getattr(rcfg, f.name) for f in dataclasses.fields(cls) if f.name != "pop_windows"}
        return cls(**named, pop_windows=(rcfg.pop_window_short, rcfg.pop_window_long))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ContextParams:
        return cls(**{**values, "pop_windows": tuple(values["pop_windows"])})


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
    seq: SeqScorer | None = None  # the text-aware sequence model (None: disabled, seq features NaN)
    frozen: dict[str, np.ndarray] = field(default_factory=dict)
    cache: dict[Any, Any] = field(default_factory=dict)  # per-context derived arrays
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

    def cached(self, key: Any, make: Callable[[], Any]) -> Any:
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
    x = user_item_matrix(events, n_users, n_items)
    covis = sequential_covis(events, n_items, params.covis_window, params.covis_distance_power)
    norm = params.covis_norm_power
    relations = {
        "next": topk_rows(row_normalise(covis, norm), params.neighbors_k),
        "prev": topk_rows(row_normalise(sp.csr_matrix(covis.T), norm), params.neighbors_k),
        "cooc": cooc_cosine(x, params.neighbors_k),
        "ease": ease_weights(x, pop, params.ease_lambda, params.ease_max_items, params.neighbors_k),
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


def user_profiles(ctx: RankContext, hist: Histories) -> tuple[np.ndarray, np.ndarray]:
    """Recency-weighted and uniform mean embeddings of each user's history (L2-normalised)."""
    return user_profile(ctx, hist, recency=True), user_profile(ctx, hist, recency=False)


def user_profile(ctx: RankContext, hist: Histories, *, recency: bool) -> np.ndarray:
    """One of :func:`user_profiles`: the recency-weighted profile, or the uniform (long-term) one."""
    pos = hist.position_from_end()
    weights = np.power(0.5, pos / ctx.params.profile_half_life) if recency else np.ones(len(pos))
    profile = weighted_sums(ctx.embeddings, *hist.entries(weights), hist.n_users)
    norms = np.linalg.norm(profile, axis=1, keepdims=True)
    return np.divide(profile, norms, out=np.zeros_like(profile), where=norms > 0)


def weighted_sums(
    vectors: np.ndarray, user: np.ndarray, row: np.ndarray, weight: np.ndarray, n_users: int
) -> np.ndarray:
    """``(n_users, dim)`` float32: per user, ``sum(weight * vectors[row])`` over its entries
    (sorted by user; e.g. :meth:`Histories.entries`).

    Added up user by user, entry by entry (a reduction over the first axis is a sequential sum):
    a user's sum is the same alone or in a batch, and equals the product of the users' sparse
    weight matrix with ``vectors``.
    """
    out = np.zeros((n_users, vectors.shape[1]), dtype=np.float32)
    bounds = np.searchsorted(user, np.arange(n_users + 1))
    for u in np.flatnonzero(np.diff(bounds)):
        lo, hi = bounds[u], bounds[u + 1]
        out[u] = (weight[lo:hi, None] * vectors[row[lo:hi]]).sum(axis=0)
    return out


def recent_weights(ctx: RankContext, hist: Histories) -> np.ndarray:
    """Weight per history entry: ``recent_decay ** p`` for the ``recent_items`` most recent, else 0."""
    pos = hist.position_from_end()
    return np.where(pos < ctx.params.recent_items, np.power(ctx.params.recent_decay, pos), 0.0)
