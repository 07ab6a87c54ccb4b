"""Ranking metrics shared by the daily DAG (production protocol) and the benchmark (LOO protocol).

Every metric is computed per user first (arrays in [0, 1]) so that the mean, bootstrap intervals,
slices and paired comparisons between models all use the same numbers.

- ``ranked``: ``(n_users, depth)`` int array of item indices, best first, ``-1`` padded.
- ``targets``: ragged relevant items per user as ``(indptr, items)``.

Definitions (binary relevance):
- NDCG@k = DCG@k / IDCG@k with gain 1/log2(rank+1), IDCG over ``min(k, n_relevant)`` items;
- Recall@k = hits in the top k / n_relevant (leave-one-out: hit rate);
- MRR = 1 / rank of the first relevant item within ``depth`` (0 when none);
- coverage@k = distinct items recommended in anyone's top k / catalog size.

Slices (:func:`restrict`) evaluate a subset of the targets: the cold-start items, the users of
each history-length segment (:func:`history_segments`) and, in the new-item protocol, the new and
the warm target items.

The quality gate used before publishing lives here too (:func:`quality_gate`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from llmrec_tasks.core import constants as C

KS = (10, 50)
PRIMARY = C.PRIMARY_METRIC
# Upper bounds (exclusive) of the history-length segments: 0-4, 5-19, 20-99 and 100+ items.
HISTORY_EDGES = (5, 20, 100)
COLD_ITEMS = "cold_items"
NEW_ITEMS = "new_items"  # the new-item protocol: targets without any known interaction
WARM_ITEMS = "warm_items"  # ... and the other targets


@dataclass(frozen=True)
class Targets:
    """Relevant items per user (ragged, CSR-like)."""

    indptr: np.ndarray
    items: np.ndarray

    @property
    def n_users(self) -> int:
        return len(self.indptr) - 1

    @property
    def counts(self) -> np.ndarray:
        return np.diff(self.indptr)

    @classmethod
    def single(cls, items: np.ndarray) -> Targets:
        """One relevant item per user (leave-one-out)."""
        items = np.asarray(items, dtype=np.int64)
        return cls(np.arange(len(items) + 1, dtype=np.int64), items)


def hit_matrix(ranked: np.ndarray, targets: Targets) -> np.ndarray:
    """Boolean ``(n_users, depth)``: is the item at each rank relevant for that user."""
    if ranked.shape[0] != targets.n_users:
        raise ValueError(f"{ranked.shape[0]} ranked lists for {targets.n_users} users")
    user_of = np.repeat(np.arange(targets.n_users), targets.counts)
    span = np.int64(max(int(ranked.max(initial=0)), int(targets.items.max(initial=0))) + 2)
    relevant = np.unique(user_of * span + targets.items)
    keys = np.arange(ranked.shape[0])[:, None] * span + ranked
    pos = np.searchsorted(relevant, keys).clip(max=max(len(relevant) - 1, 0))
    hits = (relevant[pos] == keys) if len(relevant) else np.zeros(ranked.shape, dtype=bool)
    return hits & (ranked >= 0)


def ndcg_at_k(hits: np.ndarray, n_relevant: np.ndarray, k: int) -> np.ndarray:
    """Per-user NDCG@k in [0, 1]; users without relevant items get 0."""
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    dcg = (hits[:, :k] * discounts[: hits[:, :k].shape[1]]).sum(axis=1)
    ideal_n = np.minimum(n_relevant, k)
    idcg = np.concatenate([[0.0], np.cumsum(discounts)])[ideal_n]
    return np.divide(dcg, idcg, out=np.zeros_like(dcg), where=idcg > 0)


def recall_at_k(hits: np.ndarray, n_relevant: np.ndarray, k: int) -> np.ndarray:
    """Per-user Recall@k in [0, 1] (share of the user's relevant items in the top k)."""
    found = hits[:, :k].sum(axis=1).astype(float)
    return np.divide(found, n_relevant, out=np.zeros_like(found), where=n_relevant > 0)


def mrr(hits: np.ndarray) -> np.ndarray:
    """Per-user reciprocal rank of the first relevant item within the list depth (0 if none)."""
    first = hits.argmax(axis=1)
    found = hits.any(axis=1)
    return np.where(found, 1.0 / (first + 1), 0.0)


def coverage(ranked: np.ndarray, n_items: int, k: int) -> float:
    """Share of the catalog that appears in at least one user's top k, in [0, 1]."""
    top = ranked[:, :k]
    return float(np.unique(top[top >= 0]).size / n_items) if n_items else 0.0


def _boot_means(values: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """Means of ``n_boot`` resamples of the users (with replacement)."""
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    for b in range(n_boot):  # a loop keeps memory at O(n_users)
        means[b] = values[rng.integers(0, values.size, values.size)].mean()
    return means


def bootstrap_ci(
    values: np.ndarray, *, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean over users (resampling users)."""
    values = np.asarray(values, dtype=float)
    if values.size == 0:
        return (0.0, 0.0)
    lo, hi = np.quantile(_boot_means(values, n_boot, seed), [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def paired_bootstrap(a: np.ndarray, b: np.ndarray, *, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Mean difference a - b over the same users, its 95% interval and the share of resamples <= 0."""
    diff = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    if diff.size == 0:
        return {"diff": 0.0, "ci95": [0.0, 0.0], "p_not_better": 1.0}
    boots = _boot_means(diff, n_boot, seed)
    lo, hi = np.quantile(boots, [0.025, 0.975])
    return {
        "diff": float(diff.mean()),
        "ci95": [float(lo), float(hi)],
        "p_not_better": float((boots <= 0).mean()),
    }


def per_user_metrics(ranked: np.ndarray, targets: Targets, ks: tuple[int, ...] = KS) -> dict[str, np.ndarray]:
    """Per-user NDCG@k, Recall@k for each k, and MRR."""
    hits = hit_matrix(ranked, targets)
    n_rel = targets.counts
    out: dict[str, np.ndarray] = {}
    for k in ks:
        out[f"ndcg@{k}"] = ndcg_at_k(hits, n_rel, k)
        out[f"recall@{k}"] = recall_at_k(hits, n_rel, k)
    out["mrr"] = mrr(hits)
    return out


def restrict(targets: Targets, keep: np.ndarray) -> Targets:
    """The same users with only the target entries where ``keep`` is True (a slice)."""
    user_of = np.repeat(np.arange(targets.n_users), targets.counts)
    counts = np.bincount(user_of[keep], minlength=targets.n_users)
    return Targets(np.concatenate([[0], np.cumsum(counts)]).astype(np.int64), targets.items[keep])


def history_segment(length: int, edges: tuple[int, ...] = HISTORY_EDGES) -> str:
    """Name of the history-length segment of a user with ``length`` known interactions."""
    lo = 0
    for hi in edges:
        if length < hi:
            return f"history {lo}-{hi - 1}"
        lo = hi
    return f"history {lo}+"


def history_segments(
    lengths: np.ndarray, targets: Targets, edges: tuple[int, ...] = HISTORY_EDGES
) -> dict[str, Targets]:
    """One slice per history-length segment (:func:`history_segment`), shortest first: the targets
    of the users whose history length falls in it (every segment listed, empty ones too)."""
    lengths = np.asarray(lengths)
    if lengths.shape != (targets.n_users,):
        raise ValueError(f"{lengths.shape} history lengths for {targets.n_users} users")
    user_of = np.repeat(np.arange(targets.n_users), targets.counts)
    bounds = np.array(edges)
    bucket = np.searchsorted(bounds, lengths, side="right")  # 0 .. len(edges)
    names = [history_segment(lo, edges) for lo in (0, *edges)]
    return {name: restrict(targets, bucket[user_of] == b) for b, name in enumerate(names)}


def summarize_runs(
    runs: list[np.ndarray],
    targets: Targets,
    n_items: int,
    *,
    slices: Mapping[str, Targets] | None = None,
    ks: tuple[int, ...] = KS,
    n_boot: int = 1000,
) -> dict[str, Any]:
    """Metrics of one model over one or more runs (seeds) of ranked lists for the same users.

    Means are over users and seeds; ``*_std`` and ``seeds`` show the spread over seeds; the 95%
    bootstrap interval resamples users of the seed-averaged per-user values. ``slices`` maps a
    name to a restricted target set (:func:`restrict`); only users with targets in it count.
    """
    per_run = [per_user_metrics(ranked, targets, ks) for ranked in runs]
    result = _aggregate(per_run, np.ones(targets.n_users, dtype=bool), n_boot=n_boot)
    result["coverage@10"] = float(np.mean([coverage(ranked, n_items, 10) for ranked in runs]))
    for name, sliced in (slices or {}).items():
        mask = sliced.counts > 0
        runs_slice = [per_user_metrics(ranked, sliced, ks) for ranked in runs]
        result.setdefault("slices", {})[name] = _aggregate(runs_slice, mask, n_boot=n_boot)
    return result


def per_user_mean(runs: list[np.ndarray], targets: Targets, key: str = PRIMARY) -> np.ndarray:
    """Per-user metric averaged over runs (for paired comparisons between models)."""
    return np.mean([per_user_metrics(ranked, targets)[key] for ranked in runs], axis=0)


def _aggregate(per_run: list[dict[str, np.ndarray]], mask: np.ndarray, *, n_boot: int) -> dict[str, Any]:
    out: dict[str, Any] = {"users": int(mask.sum()), "runs": len(per_run)}
    for key in per_run[0]:
        values = np.mean([run[key][mask] for run in per_run], axis=0)
        out[key] = float(values.mean()) if values.size else 0.0
        if key in ("ndcg@10", "recall@10"):
            seeds = [float(run[key][mask].mean()) if mask.any() else 0.0 for run in per_run]
            out[f"{key}_std"] = float(np.std(seeds))
            out[f"{key}_seeds"] = seeds
            out[f"{key}_ci95"] = list(bootstrap_ci(values, n_boot=n_boot))
    return out


def quality_gate(
    new_metrics: Mapping[str, Any], current_metrics: Mapping[str, Any] | None, tolerance: float
) -> tuple[bool, str]:
    """Decide whether a new ranker may be published.

    ``new_metrics`` is the ``metrics`` dict of a run (``{"ranker": {...}, "popularity": {...}}``)
    on the production protocol. ``current_metrics`` holds the currently published ranker's metrics
    *on the same evaluation data* (``{"ranker": {...}}`` or the flat ``{"ndcg@10": ...}``), or None
    when nothing is published yet. The new ranker must beat popularity (tuned on validation like every
    baseline, :mod:`llmrec_tasks.ranking.baselines`) on NDCG@10 and must not be
    worse than the current ranker by more than ``tolerance`` relative to it: it passes while
    ``new >= current * (1 - tolerance)`` (0.02 = at most 2% below the published NDCG@10).
    """
    if "ranker" not in new_metrics or "popularity" not in new_metrics:
        return False, "metrics lack 'ranker' or 'popularity': the train stage did not evaluate the ranker"
    new = float(new_metrics["ranker"][PRIMARY])
    pop = float(new_metrics["popularity"][PRIMARY])
    if not new > pop:
        return False, f"ranker {PRIMARY} {new:.4f} does not beat popularity {pop:.4f}"
    if current_metrics is None:
        return True, f"ranker {PRIMARY} {new:.4f} beats popularity {pop:.4f}; nothing published yet"
    current_block = current_metrics.get("ranker", current_metrics)
    current = float(current_block[PRIMARY])
    floor = current * (1 - tolerance)
    if new < floor:
        return False, (
            f"ranker {PRIMARY} {new:.4f} is worse than the published ranker {current:.4f} "
            f"by more than the relative tolerance {tolerance:.1%} (floor {floor:.4f})"
        )
    return True, (
        f"ranker {PRIMARY} {new:.4f} beats popularity {pop:.4f} and is within {tolerance:.1%} "
        f"(relative) of the published ranker {current:.4f}"
    )
