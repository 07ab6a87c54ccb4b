"""Full-ranking baselines, scored on the same users and split as the ranker.

Each ranks every item (the user's history excluded) from one :class:`RankContext` (the statistics
of the split) and returns ``(n_users, depth)`` item indices, best first:

- ``popularity``: interactions per item in the statistics;
- ``itemknn``: sum of item-kNN cosine similarities to the items of the history;
- ``ease``: EASE scores (the context's top-k EASE weights per item);
- ``semantic``: cosine of the item embedding to the recency-weighted profile of the history
  (LLM text features only, no collaborative signal);
- ``covis``: sequential co-visitation from the most recent items.
"""

from __future__ import annotations

import numpy as np

from llmrec_tasks.ranking.context import RankContext, recent_weights, user_profiles
from llmrec_tasks.ranking.events import Histories

BASELINES = ("popularity", "itemknn", "ease", "semantic", "covis")


def _scores(ctx: RankContext, hist: Histories, name: str) -> np.ndarray:
    """Dense ``(n_users, n_items)`` scores of one baseline for a batch of users."""
    ones = np.ones(len(hist.items))
    if name == "popularity":
        return np.tile(ctx.item_pop.astype(np.float64), (hist.n_users, 1))
    if name == "itemknn":
        return (hist.weight_matrix(ctx.n_items, ones) @ ctx.relations["cooc"]).toarray()
    if name == "ease":
        binary = hist.weight_matrix(ctx.n_items, ones)
        binary.data[:] = 1.0
        return (binary @ ctx.relations["ease"]).toarray()
    if name == "semantic":
        profile, _ = user_profiles(ctx, hist)
        return profile @ ctx.embeddings.T
    if name == "covis":
        return (hist.weight_matrix(ctx.n_items, recent_weights(ctx, hist)) @ ctx.relations["next"]).toarray()
    raise ValueError(f"unknown baseline {name!r}; baselines are {', '.join(BASELINES)}")


def top_items(scores: np.ndarray, depth: int) -> np.ndarray:
    """Best ``depth`` columns per row, best first (ties by lower index); -inf entries become -1."""
    depth = min(depth, scores.shape[1])
    part = np.argpartition(-scores, depth - 1, axis=1)[:, :depth]
    vals = np.take_along_axis(scores, part, axis=1)
    order = np.lexsort((part, -vals), axis=1)
    part = np.take_along_axis(part, order, axis=1)
    return np.where(np.isfinite(np.take_along_axis(vals, order, axis=1)), part, -1)


def baseline_rankings(
    ctx: RankContext, hist: Histories, *, depth: int = 50, names: tuple[str, ...] = BASELINES
) -> dict[str, np.ndarray]:
    """Ranked lists of every baseline for every user of ``hist`` (history excluded)."""
    batch = int(max(16, min(2048, 8_000_000 // max(ctx.n_items, 1))))
    out = {name: np.full((hist.n_users, min(depth, ctx.n_items)), -1, dtype=np.int64) for name in names}
    for start in range(0, hist.n_users, batch):
        rows = np.arange(start, min(start + batch, hist.n_users))
        sub = hist.subset(rows)
        seen_rows = np.repeat(np.arange(len(rows)), sub.lengths)
        for name in names:
            scores = _scores(ctx, sub, name).astype(np.float64)
            # Tiny popularity prior: deterministic, sensible order among items without evidence.
            scores += ctx.item_pop / (ctx.item_pop.max(initial=0) + 1) * 1e-9
            scores[seen_rows, sub.items] = -np.inf
            out[name][rows] = top_items(scores, depth)
    return out
