"""Candidate generation: what the ranker chooses from, per user.

:func:`generate_candidates` takes a :class:`~llmrec_tasks.ranking.events.Histories` (each user's
items, oldest first, and the time the recommendation is made) and unions the top lists of the
sources :data:`SOURCES`, each recording its score and rank for the ranker:

- ``faiss_profile`` / ``faiss_last``: retrieval-index neighbours of the recency-weighted profile /
  of the most recent items (read from the per-item neighbour table :func:`item_neighbours`, built
  once per context, instead of a search per request);
- ``faiss_new``: the profile's nearest items among those without any known interaction (new in
  the catalog): they reach no collaborative list, and among every item's neighbours they are few;
- ``next``, ``prev``, ``cooc``, ``ease``: the context's relations from the recent (``next``,
  ``prev``), long-term (``cooc``) or whole (``ease``) history;
- ``pop``: the most popular items at the reference time;
- ``seq``: the text-aware sequence model's best unseen items for the user state after the latest
  events (:mod:`llmrec_tasks.ranking.seqstate`; empty when the context has no sequence model).

The same code runs in training, in the benchmark and at serving time (where the context is rebuilt
from published artifacts, see :func:`llmrec_tasks.ranking.context.context_from_artifacts`). A
user's lists and scores do not depend on the other users of its batch: a request is a batch of
one, and its candidates are those training computes for the same history and time.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from llmrec_tasks.core.errors import ConfigError
from llmrec_tasks.ranking.context import RankContext, recent_weights, user_profile
from llmrec_tasks.ranking.events import Histories
from llmrec_tasks.ranking.keys import in_sorted, lookup, rank_lists, weighted_row_sums
from llmrec_tasks.ranking.seqstate import score_histories

log = logging.getLogger(__name__)

SOURCES = ("faiss_profile", "faiss_last", "faiss_new", "next", "prev", "cooc", "ease", "pop", "seq")
POP_PRIOR = 1e-3  # weight of overall popularity in the `pop` score: below one count, a tie-breaker
RESCORE_MARGIN = 16  # FAISS hits rescored exactly beyond the list depth (near-ties at its end)
# Seen items a row of the neighbour table (item_neighbours) can lose and still hold a full list;
# a user who has seen more of an item's neighbours gets a live search for that item.
NEIGHBOUR_HISTORY = 100
NEIGHBOUR_CHUNK = 1024  # items searched per batch when building the neighbour table
# Larger tables are not built (faiss_last then searches per request): 256 MiB is ~200k items.
NEIGHBOUR_TABLE_MAX_BYTES = 256 << 20


@dataclass(frozen=True)
class CandidateParams:
    """Per-source list lengths and the cap on the union."""

    num_candidates: int = 200
    per_source: int = 60  # each source contributes its top `per_source` items
    rank_depth: int = 200  # ranks beyond this are recorded as rank_depth + 1
    faiss_last_items: int = 3  # `faiss_last`: neighbours of this many most recent items (scored by max)
    seq_candidates: int | None = None  # the `seq` source contributes its top this many (None: per_source)

    def __post_init__(self) -> None:
        for name in ("per_source", "seq_candidates"):
            value = getattr(self, name)
            if value is not None and value > self.rank_depth:
                raise ConfigError(f"{name} ({value}) must not exceed rank_depth ({self.rank_depth})")

    def contribution(self, source: str) -> int:
        """How many of ``source``'s best items join the union."""
        if source == "seq" and self.seq_candidates is not None:
            return self.seq_candidates
        return self.per_source


@dataclass
class CandidateSet:
    """Candidates per user (ragged) with each source's score and rank for every candidate."""

    indptr: np.ndarray  # int64, n_users + 1
    items: np.ndarray  # int64
    scores: np.ndarray  # (n, len(SOURCES)) float32
    ranks: np.ndarray  # (n, len(SOURCES)) float32; rank_depth + 1 when outside a source's top list
    # (n_users,) float64 log-sum-exp of the sequence model's scores over the catalog (NaN: no model)
    seq_lse: np.ndarray = field(default_factory=lambda: np.zeros(0))
    source_recall: dict[str, float] = field(default_factory=dict)

    @property
    def n_users(self) -> int:
        return len(self.indptr) - 1

    @property
    def user_of(self) -> np.ndarray:
        return np.repeat(np.arange(self.n_users), np.diff(self.indptr))


Scores = tuple[np.ndarray, np.ndarray]  # sorted keys ``user * n_items + item`` and their values


@dataclass
class _Batch:
    """Per-source scores and top lists of one batch of users; as sorted keys, so a batch costs
    what its users' histories touch, not the catalog size."""

    scores: dict[str, Scores]  # relation sources; seen items included
    lists: dict[str, np.ndarray]  # (B, rank_depth) item indices, -1 padded
    profile: np.ndarray  # (B, dim) recency-weighted profile
    seen: np.ndarray  # sorted keys ``user * n_items + item`` of the batch's histories
    seq_scores: np.ndarray | None  # (B, n_items) float64 sequence-model scores; None without the model
    seq_lse: np.ndarray  # (B,) log-sum-exp of each row of seq_scores (NaN without the model)


def collaborative_scores(ctx: RankContext, hist: Histories) -> dict[str, Scores]:
    """Scores of the relation sources for a batch of users: the weighted sums of the relation
    rows of each user's history items (:func:`~llmrec_tasks.ranking.keys.weighted_row_sums`)."""
    pos = hist.position_from_end()
    half_life = ctx.params.cooc_half_life_factor * ctx.params.profile_half_life
    weights = {
        "recent": recent_weights(ctx, hist),
        "longterm": np.power(0.5, pos / half_life),
        "binary": np.ones(len(pos)),
    }
    entries = {name: hist.entries(w) for name, w in weights.items()}
    return {
        relation: weighted_row_sums(ctx.relations[relation], *entries[name], hist.n_users)
        for relation, name in (
            ("next", "recent"),
            ("prev", "recent"),
            ("cooc", "longterm"),
            ("ease", "binary"),
        )
    }


def _relation_lists(scores: Scores, seen: np.ndarray, n_users: int, n_items: int, depth: int) -> np.ndarray:
    keys, values = scores
    unseen = ~in_sorted(seen, keys)
    return rank_lists(keys[unseen] // n_items, keys[unseen] % n_items, values[unseen], n_users, depth)


def _pop_score(ctx: RankContext, items: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Popularity in the first window, plus a tiny prior that breaks ties deterministically."""
    counts = ctx.window_counts(items, ref, ctx.params.pop_windows[0])
    return counts + _pop_prior(ctx)[items]


def precompute(ctx: RankContext, params: CandidateParams) -> None:
    """Build now the per-context arrays the sources read (serving: once per bundle, at load)."""
    _pop_ranking(ctx, ctx.stats_end, ctx.n_items)
    new_items(ctx)
    item_neighbours(ctx, min(params.rank_depth, ctx.n_items))


def _pop_prior(ctx: RankContext) -> np.ndarray:
    return ctx.cached("pop_prior", lambda: ctx.item_pop / (ctx.item_pop.max(initial=0) + 1) * POP_PRIOR)


def _pop_ranking(ctx: RankContext, ref: float, need: int) -> np.ndarray:
    """The ``need`` best items by :func:`_pop_score` at ``ref``, best first (ties: lower item), -1 padded.

    Only items in the window or among the ``need`` best by prior can rank, so only those are
    scored; the prior order is complete (ties to the lower item, as in rank_lists), so a ranking is
    a prefix of any deeper one. Frozen statistics (serving) score every reference time alike: the
    whole ranking is built once per context and requests read its prefix.
    """
    if ctx.times is None and need < ctx.n_items:
        return _pop_ranking(ctx, ref, ctx.n_items)[:need]
    if ctx.times is None:
        return ctx.cached("pop_ranking", lambda: _rank_by_pop(ctx, ref, need))
    return _rank_by_pop(ctx, ref, need)


def _rank_by_pop(ctx: RankContext, ref: float, need: int) -> np.ndarray:
    by_prior = ctx.cached("prior_order", lambda: np.argsort(-_pop_prior(ctx), kind="stable"))
    pool = np.union1d(ctx.window_items(ref, ctx.params.pop_windows[0]), np.sort(by_prior[:need]))
    score = _pop_score(ctx, pool, np.full(len(pool), ref))
    return rank_lists(np.zeros(len(pool), np.int64), pool, score, 1, need)[0]


def _pop_lists(ctx: RankContext, hist: Histories, seen: np.ndarray, depth: int) -> np.ndarray:
    """Most popular unseen items at each user's reference time (a user's list does not depend on
    the batch's longest history: see :func:`_pop_ranking`)."""
    n_users, n_items = hist.n_users, ctx.n_items
    need = min(n_items, depth + int(hist.lengths.max(initial=0)))
    refs, ref_of_user = np.unique(hist.ref_ts, return_inverse=True)
    ordered = np.stack([_pop_ranking(ctx, float(ref), need) for ref in refs])
    cand = ordered[ref_of_user.ravel()]
    valid = (cand >= 0) & ~in_sorted(seen, np.arange(n_users)[:, None] * n_items + cand)
    order = np.argsort(~valid, axis=1, kind="stable")[:, : min(depth, n_items)]
    return np.where(np.take_along_axis(valid, order, axis=1), np.take_along_axis(cand, order, axis=1), -1)


def new_items(ctx: RankContext) -> tuple[np.ndarray, Any]:
    """The items without any known interaction (sorted) and an exact inner-product index over
    their embeddings (row i is item ``items[i]``), once per context."""

    def make() -> tuple[np.ndarray, Any]:
        import faiss

        items = np.flatnonzero(ctx.item_pop == 0)
        index = faiss.IndexFlatIP(ctx.embeddings.shape[1])
        index.add(np.ascontiguousarray(ctx.embeddings[items], dtype=np.float32))
        return items, index

    return ctx.cached("new_items", make)


def item_neighbours(ctx: RankContext, depth: int) -> np.ndarray | None:
    """``(n_items, width)`` int32: the first FAISS hits of each item's own embedding, in the index's
    order (-1 padded), ``width = depth + RESCORE_MARGIN + NEIGHBOUR_HISTORY``; once per context.
    None when it would exceed ``NEIGHBOUR_TABLE_MAX_BYTES`` (the same decision in every context).

    ``faiss_last`` reads an item's row instead of searching for it: the same hits a search returns,
    up to the order of near-ties (which the exact rescoring of :func:`_rank_hits` settles). Built
    in fixed chunks of items, so training and serving derive the same table from the same index.
    """
    width = min(ctx.n_items, depth + RESCORE_MARGIN + NEIGHBOUR_HISTORY)
    if ctx.n_items * width * np.dtype(np.int32).itemsize > NEIGHBOUR_TABLE_MAX_BYTES:
        return None

    def make() -> np.ndarray:
        index, emb = ctx.faiss_index(), ctx.embeddings
        table = np.empty((ctx.n_items, width), dtype=np.int32)
        for lo in range(0, ctx.n_items, NEIGHBOUR_CHUNK):
            _, table[lo : lo + NEIGHBOUR_CHUNK] = index.search(emb[lo : lo + NEIGHBOUR_CHUNK], width)
        return table

    return ctx.cached(("item_neighbours", depth), make)


def _search(
    ctx: RankContext,
    queries: np.ndarray,
    owner: np.ndarray,
    hist: Histories,
    depth: int,
    subset: tuple[np.ndarray, Any] | None = None,
) -> np.ndarray:
    """FAISS hits ``(len(queries), k)`` of query vectors in one search (query i asks for user
    ``owner[i]``; ``k`` leaves room for its history); ``subset``: only these items, with an index
    over them (:func:`new_items`)."""
    extra = int(hist.lengths[owner].max(initial=0))
    ids, index = subset if subset is not None else (None, ctx.faiss_index())
    k = min(ctx.n_items if ids is None else len(ids), depth + extra + RESCORE_MARGIN)
    _, idx = index.search(queries, k)
    return idx if ids is None else np.where(idx >= 0, ids[np.maximum(idx, 0)], -1)


def _unseen_hits(
    ctx: RankContext, idx: np.ndarray, owner: np.ndarray, seen: np.ndarray, depth: int
) -> np.ndarray:
    """The first ``depth + RESCORE_MARGIN`` hits of each row not in its user's history, in hit
    order, -1 padded."""
    keys = owner[:, None] * ctx.n_items + np.maximum(idx, 0)
    valid = (idx >= 0) & ~in_sorted(seen, keys)
    # Stable compaction: valid entries first, keeping FAISS order.
    order = np.argsort(~valid, axis=1, kind="stable")[:, : depth + RESCORE_MARGIN]
    return np.where(np.take_along_axis(valid, order, axis=1), np.take_along_axis(idx, order, axis=1), -1)


def _rank_hits(
    ctx: RankContext, queries: np.ndarray, items: np.ndarray, depth: int
) -> tuple[np.ndarray, np.ndarray]:
    """Unseen hits (:func:`_unseen_hits`) rescored by exact dot products with their query and
    ranked by them (ties: lower item); returns (items, scores), ``(len(queries), depth)``.

    FAISS sums differently for a batch of queries (a matrix product) than for a few, so its own
    scores would rank near-ties of a training batch and of a request differently.
    """
    kept = items >= 0
    exact = np.full(items.shape, -np.inf, dtype=np.float32)
    rows, cols = np.nonzero(kept)
    exact[rows, cols] = rowwise_dot(ctx.embeddings, items[rows, cols], queries, rows)
    best = np.lexsort((items, -exact), axis=1)[:, :depth]
    return np.take_along_axis(items, best, axis=1), np.take_along_axis(exact, best, axis=1)


def _faiss_lists(
    ctx: RankContext,
    queries: np.ndarray,
    owner: np.ndarray,
    hist: Histories,
    seen: np.ndarray,
    depth: int,
    subset: tuple[np.ndarray, Any] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """FAISS top lists of query vectors, each with its user's history removed: one search
    (:func:`_search`), then :func:`_rank_hits`; returns (items, scores), ``(len(queries), depth)``."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    idx = _search(ctx, queries, owner, hist, depth, subset)
    return _rank_hits(ctx, queries, _unseen_hits(ctx, idx, owner, seen, depth), depth)


def _neighbour_lists(
    ctx: RankContext, items: np.ndarray, owner: np.ndarray, hist: Histories, seen: np.ndarray, depth: int
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_faiss_lists` of the embeddings of ``items`` (query i asks for user ``owner[i]``), from
    their rows of :func:`item_neighbours`; an item whose row has too few hits left once its user's
    history is removed (every item, without a table) is searched for."""
    queries = ctx.embeddings[items]
    table = item_neighbours(ctx, depth)
    if table is None:
        return _faiss_lists(ctx, queries, owner, hist, seen, depth)
    hits = _unseen_hits(ctx, table[items].astype(np.int64), owner, seen, depth)
    short = (hits[:, -1] < 0) & (table.shape[1] < ctx.n_items)  # the row ran out, the catalog did not
    if short.any():
        live = _search(ctx, queries[short], owner[short], hist, depth)
        hits[short] = _unseen_hits(ctx, live, owner[short], seen, depth)
    return _rank_hits(ctx, queries, hits, depth)


def _batch_scores(ctx: RankContext, hist: Histories, params: CandidateParams) -> _Batch:
    n_users, n_items = hist.n_users, ctx.n_items
    depth = min(params.rank_depth, n_items)
    seen = np.unique(np.repeat(np.arange(n_users, dtype=np.int64), hist.lengths) * n_items + hist.items)
    scores = collaborative_scores(ctx, hist)
    lists = {name: _relation_lists(sc, seen, n_users, n_items, depth) for name, sc in scores.items()}
    lists["pop"] = _pop_lists(ctx, hist, seen, depth)
    profile = user_profile(ctx, hist, recency=True)
    users = np.flatnonzero(hist.lengths > 0)
    lists["faiss_profile"] = np.full((n_users, depth), -1, dtype=np.int64)
    lists["faiss_profile"][users] = _faiss_lists(ctx, profile[users], users, hist, seen, depth)[0]
    # faiss_last: the neighbours of each user's p-th most recent item, scored recent_decay ** p x similarity.
    last = hist.last(ctx.params.recent_items)[:, : params.faiss_last_items]
    owner, p = np.nonzero(last >= 0)
    found, sims = _neighbour_lists(ctx, last[owner, p], owner, hist, seen, depth)
    ok = found >= 0
    rows = np.broadcast_to(owner[:, None], ok.shape)[ok]
    vals = (ctx.params.recent_decay ** np.broadcast_to(p[:, None], ok.shape)[ok]).astype(np.float32) * sims[
        ok
    ]
    keys = rows * n_items + found[ok]
    order = np.argsort(keys, kind="stable")
    keys, first = np.unique(keys[order], return_index=True)
    best = np.maximum.reduceat(vals[order], first) if len(first) else vals[:0]
    lists["faiss_last"] = rank_lists(keys // n_items, keys % n_items, best + 2.0, n_users, depth)
    lists["faiss_new"] = np.full((n_users, depth), -1, dtype=np.int64)
    unseen_new = new_items(ctx)
    if unseen_new[0].size and users.size:
        found, _ = _faiss_lists(ctx, profile[users], users, hist, seen, depth, unseen_new)
        lists["faiss_new"][users, : found.shape[1]] = found
    seq_scores, seq_lse, lists["seq"] = _seq_lists(ctx, hist, depth)
    return _Batch(scores, lists, profile, seen, seq_scores, seq_lse)


def _seq_lists(
    ctx: RankContext, hist: Histories, depth: int
) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
    """:func:`~llmrec_tasks.ranking.seqstate.score_histories`, or no scores, NaN log-sum-exp and
    empty lists when the context has no sequence model."""
    if ctx.seq is None:
        return None, np.full(hist.n_users, np.nan), np.full((hist.n_users, depth), -1, dtype=np.int64)
    return score_histories(ctx.seq, hist, depth)


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
    parts_items, parts_scores, parts_ranks, parts_lse, counts = [], [], [], [], []
    source_found = dict.fromkeys(SOURCES, 0)
    for start in range(0, hist.n_users, batch_size):
        rows = np.arange(start, min(start + batch_size, hist.n_users))
        sub = hist if len(rows) == hist.n_users else hist.subset(rows)  # serving: one batch of one
        batch = _batch_scores(ctx, sub, params)
        ranked = {}  # source -> (sorted keys user * n_items + item, rank)
        for name in SOURCES:
            lst = batch.lists[name]
            r, c = np.nonzero(lst >= 0)
            keys = r * n_items + lst[r, c]
            order = np.argsort(keys)
            ranked[name] = (keys[order], (c[order] + 1).astype(np.float32))
        take = {name: rank <= params.contribution(name) for name, (_, rank) in ranked.items()}
        keys = np.concatenate([k[take[name]] for name, (k, _) in ranked.items()])
        best = np.concatenate([rank[take[name]] for name, (_, rank) in ranked.items()])
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
        parts_ranks.append(np.stack([lookup(k, rank, keys, absent) for k, rank in ranked.values()], axis=1))
        sc = [rowwise_dot(ctx.embeddings, item, batch.profile, user)]
        last_items = sub.last(params.faiss_last_items)
        recent = np.full(len(item), -np.inf, dtype=np.float32)
        for p in range(last_items.shape[1]):
            has = last_items[user, p] >= 0
            sims = rowwise_dot(ctx.embeddings, item[has], ctx.embeddings, last_items[user[has], p])
            recent[has] = np.maximum(recent[has], sims)
        sc.append(np.where(np.isfinite(recent), recent, 0.0))
        sc.append(np.where(ctx.item_pop[item] == 0, sc[0], 0.0))  # faiss_new: the profile's, new items only
        for name in ("next", "prev", "cooc", "ease"):
            sc.append(lookup(*batch.scores[name], keys, 0.0))
        sc.append(_pop_score(ctx, item, sub.ref_ts[user]))
        sc.append(np.full(len(item), np.nan) if batch.seq_scores is None else batch.seq_scores[user, item])
        parts_lse.append(batch.seq_lse)
        parts_scores.append(np.stack(sc, axis=1).astype(np.float32))
        if targets is not None:
            local = np.repeat(np.arange(len(rows)), targets.counts[rows])
            tgt_items = np.concatenate(
                [targets.items[targets.indptr[u] : targets.indptr[u + 1]] for u in rows]
            ).astype(np.int64)
            tgt_keys = local * n_items + tgt_items
            for name, (k, rank) in ranked.items():
                found = lookup(k, rank, tgt_keys, absent) <= params.contribution(name)
                source_found[name] += int(found.sum())
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
        seq_lse=np.concatenate(parts_lse) if parts_lse else np.zeros(0),
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
