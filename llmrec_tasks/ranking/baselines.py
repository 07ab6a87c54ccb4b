"""Full-ranking baselines, each tuned on the validation stage before it is scored on the test stage.

A baseline ranks every item (the user's history excluded) from the interactions known before a
stage's targets and returns ``(n_users, depth)`` item indices, best first. Its few hyper-parameters
are chosen on the validation stage by the primary metric (:data:`PRIMARY`) over a small grid
(:data:`GRIDS`, every combination); the test stage is then ranked once, with the chosen values,
from the interactions known before the test targets. :func:`tune_baselines` is never given the
test targets, so the test stage cannot take part in the choice. A strong baseline is the only
honest comparison for the ranker.

- ``popularity``: interactions per item, all time or in the last ``window_days`` days before the
  time of the ranking;
- ``itemknn``: sum of item-kNN similarities to the history items (cosine with ``shrinkage``,
  ``neighbours`` per item);
- ``ease``: EASE scores (Steck 2019; dense weights, L2 ``lambda``, on the ``ease_max_items`` most
  popular items);
- ``covis``: sequential co-visitation (items that followed the history items within ``window``
  steps of a sequence);
- ``semantic``: cosine of the item embedding to the profile (weighted mean embedding) of the
  history: LLM text features only, no collaborative signal.

History weighting (``half_life``, every baseline but popularity): the p-th most recent item weighs
``0.5 ** (p / half_life)``; 0 = the last item only, None = the whole history uniformly. Matrices
that do not depend on a grid value are built once per stage (EASE's Gram matrix, one inverse per
``lambda``; item-kNN's similarities per shrinkage at the largest ``neighbours``).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import cached_property, partial
from typing import Any

import numpy as np
import scipy.sparse as sp

from llmrec_tasks.ranking.context import ContextParams
from llmrec_tasks.ranking.evaluate import PRIMARY, Targets, per_user_metrics
from llmrec_tasks.ranking.events import DAY, Events, Histories, ItemTimes
from llmrec_tasks.ranking.relations import (
    cooc_cosine,
    ease_dense,
    ease_gram,
    row_normalise,
    sequential_covis,
    topk_rows,
    user_item_matrix,
)

log = logging.getLogger(__name__)

BASELINES = ("popularity", "itemknn", "ease", "semantic", "covis")
HALF_LIVES = (0, 1, 3, 10, None)  # history positions; 0 = last item only, None = uniform
GRIDS: dict[str, dict[str, tuple[Any, ...]]] = {
    "popularity": {"window_days": (None, 7, 30, 90)},  # None = all time
    "itemknn": {"neighbours": (20, 50, 100, 200), "shrinkage": (0, 20), "half_life": HALF_LIVES},
    "ease": {"lambda": (50, 100, 200, 500, 1000), "half_life": HALF_LIVES},
    "covis": {"window": (1, 3, 10), "half_life": HALF_LIVES},
    "semantic": {"half_life": HALF_LIVES},
}
VALID_KEY = f"valid_{PRIMARY}"
POP_PRIOR = 1e-9  # weight of overall popularity: orders the items without evidence, never more
MIN_HISTORY_WEIGHT = 2.0**-10  # history items weighing less are left out (cheaper, same lists)

Params = dict[str, Any]
Scorer = Callable[[Histories], np.ndarray]  # dense (n_users, n_items) scores of a batch of users


def grid_points(name: str) -> list[Params]:
    """Every combination of the baseline's grid values, in grid order (ties go to the first)."""
    if name not in GRIDS:
        raise ValueError(f"unknown baseline {name!r}; baselines are {', '.join(BASELINES)}")
    grid = GRIDS[name]
    return [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]


@dataclass(frozen=True)
class KnownEvents:
    """Where the baselines learn their statistics: one event set and, per evaluation stage, the
    mask of the events known before that stage's targets (the same events its context saw)."""

    events: Events
    n_users: int
    valid: np.ndarray  # bool per event
    test: np.ndarray  # bool per event


@dataclass(frozen=True)
class TunedBaselines:
    """Test-stage ranked lists per baseline, and per baseline what the tuning chose and saw:
    ``{"params", "valid_ndcg@10", "grid": [{"params", "valid_ndcg@10"}, ...], "seconds"}``."""

    rankings: dict[str, np.ndarray]
    summary: dict[str, dict[str, Any]]


@dataclass
class _Split:
    """One stage as the baselines see it: known events, the ranked users' histories, embeddings."""

    events: Events
    n_users: int
    embeddings: np.ndarray
    hist: Histories
    batches: list[tuple[np.ndarray, Histories, np.ndarray]] = field(init=False)

    def __post_init__(self) -> None:
        batch = int(max(16, min(2048, 8_000_000 // max(self.n_items, 1))))
        self.batches = []
        for start in range(0, self.hist.n_users, batch):
            rows = np.arange(start, min(start + batch, self.hist.n_users))
            sub = self.hist.subset(rows)
            self.batches.append((rows, sub, np.repeat(np.arange(len(rows)), sub.lengths)))

    @property
    def n_items(self) -> int:
        return self.embeddings.shape[0]

    @cached_property
    def pop(self) -> np.ndarray:
        return np.bincount(self.events.item, minlength=self.n_items).astype(np.float64)

    @cached_property
    def x(self) -> sp.csr_matrix:
        return user_item_matrix(self.events, self.n_users, self.n_items)

    @cached_property
    def times(self) -> ItemTimes:
        return ItemTimes.build(self.events.item, self.events.ts)

    def rank(self, scorer: Scorer, depth: int) -> np.ndarray:
        """Top ``depth`` unseen items per user by ``scorer`` (popularity breaks ties)."""
        prior = self.pop / (self.pop.max(initial=0) + 1) * POP_PRIOR
        out = np.full((self.hist.n_users, min(depth, self.n_items)), -1, dtype=np.int64)
        for rows, sub, seen_rows in self.batches:
            scores = np.array(scorer(sub), dtype=np.float64)
            scores += prior
            scores[seen_rows, sub.items] = -np.inf
            out[rows] = top_items(scores, depth)
        return out


def top_items(scores: np.ndarray, depth: int) -> np.ndarray:
    """Best ``depth`` columns per row, best first (ties by lower index); -inf entries become -1."""
    depth = min(depth, scores.shape[1])
    part = np.argpartition(-scores, depth - 1, axis=1)[:, :depth]
    vals = np.take_along_axis(scores, part, axis=1)
    order = np.lexsort((part, -vals), axis=1)
    part = np.take_along_axis(part, order, axis=1)
    return np.where(np.isfinite(np.take_along_axis(vals, order, axis=1)), part, -1)


def history_matrix(hist: Histories, n_items: int, half_life: float | None) -> sp.csr_matrix:
    """``(n_users, n_items)`` recency weight of each history item (its most recent occurrence);
    weights below :data:`MIN_HISTORY_WEIGHT` are left out."""
    pos = hist.position_from_end()
    if half_life is None:
        weights = np.ones(len(pos))
    elif half_life == 0:
        weights = (pos == 0).astype(np.float64)
    else:
        weights = np.power(0.5, pos / half_life)
    keys = np.repeat(np.arange(hist.n_users, dtype=np.int64), hist.lengths) * n_items + hist.items
    unique, inverse = np.unique(keys, return_inverse=True)
    best = np.zeros(len(unique))
    np.maximum.at(best, inverse.ravel(), weights)
    keep = best >= MIN_HISTORY_WEIGHT
    return sp.csr_matrix(
        (best[keep], (unique[keep] // n_items, unique[keep] % n_items)), shape=(hist.n_users, n_items)
    )


# --- the baselines: each yields a scorer per requested grid point, sharing what it can ----------


def _popularity(split: _Split, points: list[Params], ctx: ContextParams) -> Iterator[tuple[Params, Scorer]]:
    for p in points:
        days = p["window_days"]
        if days is None:
            yield p, lambda sub: np.broadcast_to(split.pop, (sub.n_users, split.n_items))
        else:
            yield p, partial(_window_popularity, split, days * DAY)


def _window_popularity(split: _Split, seconds: float, sub: Histories) -> np.ndarray:
    """Interactions per item in ``(ref - seconds, ref]`` at each user's ranking time."""
    refs, of_user = np.unique(sub.ref_ts, return_inverse=True)
    items = np.arange(split.n_items)[None, :]
    counts = split.times.count(items, (refs - seconds)[:, None], refs[:, None])
    return counts[of_user.ravel()]


def _relation_scorer(rel: sp.csr_matrix, half_life: float | None, sub: Histories) -> np.ndarray:
    return (history_matrix(sub, rel.shape[0], half_life) @ rel).toarray()


def _itemknn(split: _Split, points: list[Params], ctx: ContextParams) -> Iterator[tuple[Params, Scorer]]:
    for shrink in dict.fromkeys(p["shrinkage"] for p in points):
        group = [p for p in points if p["shrinkage"] == shrink]
        widest = cooc_cosine(split.x, max(p["neighbours"] for p in group), shrink=shrink)
        for k in dict.fromkeys(p["neighbours"] for p in group):
            rel = topk_rows(widest, k)
            for p in (p for p in group if p["neighbours"] == k):
                yield p, partial(_relation_scorer, rel, p["half_life"])


def _ease(split: _Split, points: list[Params], ctx: ContextParams) -> Iterator[tuple[Params, Scorer]]:
    keep, gram = ease_gram(split.x, split.pop, ctx.ease_max_items)
    gram = gram.astype(np.float32)  # counts, exact in float32; the inverse per lambda twice as fast
    for lam in dict.fromkeys(p["lambda"] for p in points):
        weights = ease_dense(gram, lam) if keep.size >= 2 else None
        for p in (p for p in points if p["lambda"] == lam):
            yield p, partial(_ease_scorer, split.n_items, keep, weights, p["half_life"])


def _ease_scorer(
    n_items: int, keep: np.ndarray, weights: np.ndarray | None, half_life: float | None, sub: Histories
) -> np.ndarray:
    out = np.zeros((sub.n_users, n_items))
    if weights is not None:
        out[:, keep] = history_matrix(sub, n_items, half_life)[:, keep] @ weights
    return out


def _covis(split: _Split, points: list[Params], ctx: ContextParams) -> Iterator[tuple[Params, Scorer]]:
    for window in dict.fromkeys(p["window"] for p in points):
        covis = sequential_covis(split.events, split.n_items, window, ctx.covis_distance_power)
        rel = row_normalise(covis, ctx.covis_norm_power)
        for p in (p for p in points if p["window"] == window):
            yield p, partial(_relation_scorer, rel, p["half_life"])


def _semantic(split: _Split, points: list[Params], ctx: ContextParams) -> Iterator[tuple[Params, Scorer]]:
    for p in points:
        yield p, partial(_semantic_scorer, split.embeddings, p["half_life"])


def _semantic_scorer(embeddings: np.ndarray, half_life: float | None, sub: Histories) -> np.ndarray:
    profile = np.asarray(history_matrix(sub, embeddings.shape[0], half_life) @ embeddings, dtype=np.float32)
    norms = np.linalg.norm(profile, axis=1, keepdims=True)
    profile = np.divide(profile, norms, out=np.zeros_like(profile), where=norms > 0)
    return profile @ embeddings.T


_FAMILIES: dict[str, Callable[[_Split, list[Params], ContextParams], Iterator[tuple[Params, Scorer]]]] = {
    "popularity": _popularity,
    "itemknn": _itemknn,
    "ease": _ease,
    "covis": _covis,
    "semantic": _semantic,
}


def _key(params: Mapping[str, Any]) -> tuple[Any, ...]:
    return tuple(params.items())


def _check_params(name: str, params: Mapping[str, Any]) -> None:
    if name not in GRIDS:
        raise ValueError(f"unknown baseline {name!r}; baselines are {', '.join(BASELINES)}")
    if set(params) != set(GRIDS[name]):
        raise ValueError(
            f"baseline {name!r} takes the parameters {', '.join(GRIDS[name])}, got {dict(params)}"
        )


def _rank_point(
    split: _Split, name: str, params: Params, depth: int, ctx_params: ContextParams
) -> np.ndarray:
    _check_params(name, params)
    ((_, scorer),) = _FAMILIES[name](split, [params], ctx_params)
    return split.rank(scorer, depth)


def baseline_rankings(
    events: Events,
    n_users: int,
    embeddings: np.ndarray,
    hist: Histories,
    chosen: Mapping[str, Params],
    *,
    depth: int,
    ctx_params: ContextParams,
) -> dict[str, np.ndarray]:
    """Ranked lists of each baseline of ``chosen`` at its grid point, for the users of ``hist``,
    from the known ``events`` (history excluded)."""
    split = _Split(events, n_users, embeddings, hist)
    return {name: _rank_point(split, name, params, depth, ctx_params) for name, params in chosen.items()}


def tune_baselines(
    known: KnownEvents,
    embeddings: np.ndarray,
    valid_hist: Histories,
    valid_targets: Targets,
    test_hist: Histories,
    *,
    depth: int,
    ctx_params: ContextParams,
    names: tuple[str, ...] = BASELINES,
) -> TunedBaselines:
    """Choose each baseline's grid point on the validation stage (best :data:`PRIMARY`, the first
    in grid order on a tie), then rank the test users with it. ``ctx_params`` gives the values that
    are not tuned (co-visitation distance and normalisation powers, EASE items)."""
    valid = _Split(known.events.take(known.valid), known.n_users, embeddings, valid_hist)
    test = _Split(known.events.take(known.test), known.n_users, embeddings, test_hist)
    rankings: dict[str, np.ndarray] = {}
    summary: dict[str, dict[str, Any]] = {}
    for name in names:
        started = time.monotonic()
        points = grid_points(name)
        scored = {
            _key(p): float(per_user_metrics(valid.rank(scorer, depth), valid_targets)[PRIMARY].mean())
            for p, scorer in _FAMILIES[name](valid, points, ctx_params)
        }
        best = max(points, key=lambda p: scored[_key(p)])
        rankings[name] = _rank_point(test, name, best, depth, ctx_params)
        summary[name] = {
            "params": best,
            VALID_KEY: scored[_key(best)],
            "grid": [{"params": p, VALID_KEY: scored[_key(p)]} for p in points],
            "seconds": round(time.monotonic() - started, 2),
        }
        log.info(
            "baseline %s tuned on validation: %s (valid %s %.4f, %d grid points, %.1fs)",
            name,
            describe_params(best),
            PRIMARY,
            scored[_key(best)],
            len(points),
            summary[name]["seconds"],
        )
    return TunedBaselines(rankings, summary)


def describe_value(name: str, value: Any) -> str:
    """One grid value in words (the report and the benchmark table)."""
    if name == "window_days":
        return "all time" if value is None else f"last {value:g} days"
    if name == "half_life":
        if value is None:
            return "uniform"
        return "last item only" if value == 0 else f"half-life {value:g} items"
    if name == "window":
        return f"{value:g} steps"
    return f"{value:g}"


PARAM_LABELS = {
    "window_days": "popularity",
    "neighbours": "neighbours",
    "shrinkage": "shrinkage",
    "lambda": "lambda",
    "window": "window",
    "half_life": "history",
}


def describe_params(params: Mapping[str, Any]) -> str:
    """A grid point in words, e.g. ``neighbours 200, shrinkage 10, history half-life 3 items``."""
    return ", ".join(f"{PARAM_LABELS.get(k, k)} {describe_value(k, v)}" for k, v in params.items())
