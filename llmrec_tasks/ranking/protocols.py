"""Evaluation protocols: the stages a ranker is trained, validated and tested on, and the comparison.

Both protocols share one code path (:func:`evaluate_stages`): a list of training *stages*, a
validation stage and a test stage. Statistics (co-visitation, EASE, popularity, ...) of a stage
only come from interactions known before its targets.

- Production protocol (:func:`production_stages`, the daily DAG): a global time cutoff. The latest
  window (``eval_days``, or ``eval_fraction`` of the time span) is the test window, the window
  before it validates, ``train_windows`` earlier windows give training groups. A window's targets
  are the items each user interacted with in it (not already in the history); its statistics and
  histories are the interactions before the window's start, which is also the reference time of
  the ranking.
- Leave-one-out protocol (:mod:`llmrec_tasks.ranking.benchmark`): the same, by position in each
  user's sequence instead of time.

The published model never saw the test stage, so its test metrics are honest and the quality gate
(:func:`llmrec_tasks.ranking.evaluate.quality_gate`) can compare it with the published ranker on
the same evaluation data (:func:`llmrec_tasks.ranking.ranker.evaluate_published_ranker`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import lightgbm as lgb
import numpy as np
import pandas as pd

from llmrec_tasks.core.config import RankerConfig
from llmrec_tasks.core.errors import ConfigError, DataContractError
from llmrec_tasks.ranking.baselines import KnownEvents, tune_baselines
from llmrec_tasks.ranking.context import ContextParams, build_context
from llmrec_tasks.ranking.evaluate import (
    COLD_ITEMS,
    NEW_ITEMS,
    PRIMARY,
    WARM_ITEMS,
    Targets,
    history_segments,
    paired_bootstrap,
    per_user_mean,
    per_user_metrics,
    restrict,
    summarize_runs,
)
from llmrec_tasks.ranking.events import DAY, Events, Histories
from llmrec_tasks.ranking.features import ABLATIONS, FEATURE_NAMES
from llmrec_tasks.ranking.ranker import (
    RankerParams,
    Stage,
    candidate_params,
    feature_columns,
    fit_ranker,
    make_stage,
    ranked_lists,
)
from llmrec_tasks.ranking.seqstate import SeqScorer, seq_ranked_lists
from llmrec_tasks.ranking.sources import generate_candidates
from llmrec_tasks.retrieval.index import retrieval_index, user_profile_queries

log = logging.getLogger(__name__)

RANKER = "ranker"
ABLATION = "ranker_no_llm"  # the headline ablation (one of features.ABLATIONS)
ALL_WARM = "ranker_all_warm"  # new-item protocol: the ranker's lists without the new items
SASREC = "sasrec"  # the sequential baseline (llmrec_tasks.ranking.sasrec), when it runs
SEQMODEL = "seqmodel"  # the text-aware sequence model scored on its own (llmrec_tasks.ranking.seqmodel)


def evaluate_stages(
    train: list[Stage],
    valid: Stage,
    test: Stage,
    rcfg: RankerConfig,
    *,
    known: KnownEvents,
    seeds: int = 1,
    n_boot: int = 1000,
    params: RankerParams | None = None,
    extra_runs: Mapping[str, list[np.ndarray]] | None = None,
    new_items: np.ndarray | None = None,
) -> tuple[dict[str, Any], lgb.Booster, dict[str, Any]]:
    """Fit the ranker and its ablations (:data:`features.ABLATIONS`) per seed, tune the baselines on ``valid`` (their
    statistics from ``known``), compare on the test users.

    ``extra_runs``: ranked lists of the test users from models trained elsewhere (SASRec), scored
    and compared like the baselines. Returns (results, the first seed's ranker, its fit info).
    ``results["models"]`` maps each model to its metrics (mean over seeds, spread, bootstrap CI,
    cold-start slice); ``results["baselines_tuned"]`` what each baseline's tuning chose
    (:class:`llmrec_tasks.ranking.baselines.TunedBaselines`).

    ``new_items`` (bool per item, the new-item protocol): adds the new- and warm-target slices, the
    all-warm ranker (:data:`ALL_WARM`: the same fitted ranker, its lists restricted to warm items:
    the best a system without text could do for these users, whose total the ranker must not fall
    below) and ``results["new_items"]`` (counts, each source's recall of the new targets).
    """
    params = params or RankerParams.from_config(rcfg)
    if seeds < 1:
        raise ConfigError(f"seeds must be at least 1, got {seeds}")
    variants: dict[str, list[str]] = {RANKER: [], **ABLATIONS}
    runs: dict[str, list[np.ndarray]] = {name: [] for name in variants}
    importance = np.zeros(len(FEATURE_NAMES))
    infos: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
    boosters: list[lgb.Booster] = []
    for i in range(seeds):
        seed = rcfg.seed + i
        for model, dropped in variants.items():
            columns = feature_columns(dropped)
            booster, info = fit_ranker(train, valid, rcfg, seed, columns, params)
            scores = booster.predict(test.X[:, columns], num_threads=rcfg.num_threads)
            runs[model].append(ranked_lists(test.cands, scores, params.list_depth))
            infos[model].append(info)
            if model == RANKER and new_items is not None:
                warm_scores = np.where(new_items[test.cands.items], -np.inf, scores)
                warm_lists = ranked_lists(test.cands, warm_scores, params.list_depth)
                runs.setdefault(ALL_WARM, []).append(np.where(new_items[warm_lists], -1, warm_lists))
            if model == RANKER:
                gain = booster.feature_importance("gain")
                importance[columns] += gain / max(gain.sum(), 1e-12)
                boosters.append(booster)
        log.info(
            "seed %d: test NDCG@10 ranker %.4f, without LLM features %.4f",
            seed,
            per_user_metrics(runs[RANKER][-1], test.targets)[PRIMARY].mean(),
            per_user_metrics(runs[ABLATION][-1], test.targets)[PRIMARY].mean(),
        )
    tuned = tune_baselines(
        known,
        test.ctx.embeddings,
        valid.hist,
        valid.targets,
        test.hist,
        depth=params.list_depth,
        ctx_params=ContextParams.from_config(rcfg),
    )
    for name, ranked in tuned.rankings.items():
        runs[name] = [ranked]
    runs.update(extra_runs or {})
    cold = restrict(test.targets, test.ctx.item_pop[test.targets.items] < params.cold_max_interactions)
    slices = {COLD_ITEMS: cold, **history_segments(test.hist.lengths, test.targets)}
    if new_items is not None:
        is_new = new_items[test.targets.items]
        slices[NEW_ITEMS], slices[WARM_ITEMS] = (
            restrict(test.targets, is_new),
            restrict(test.targets, ~is_new),
        )
    models = {
        name: summarize_runs(r, test.targets, test.ctx.n_items, slices=slices, n_boot=n_boot)
        for name, r in runs.items()
    }
    ranker_users = per_user_mean(runs[RANKER], test.targets)
    comparisons = {
        f"{RANKER}_vs_{name}": {
            key: paired_bootstrap(
                per_user_mean(runs[RANKER], test.targets, key),
                per_user_mean(r, test.targets, key),
                n_boot=n_boot,
            )
            for key in ("ndcg@10", "recall@10")
        }
        for name, r in runs.items()
        if name != RANKER
    }
    results = {
        "models": models,
        "comparisons": comparisons,
        "baselines_tuned": tuned.summary,
        "candidate_recall": {"test": test.cands.source_recall, "valid": valid.cands.source_recall},
        "feature_importance": {
            FEATURE_NAMES[j]: float(importance[j] / seeds)
            for j in np.argsort(-importance)
            if importance[j] > 0
        },
        "training": {
            "seeds": [rcfg.seed + i for i in range(seeds)],
            "fits": infos,
            "stages": {
                s.name: {
                    "users": s.n_users,
                    "rows": len(s.y),
                    "users_with_positive": int((s.positives() > 0).sum()),
                }
                for s in [*train, valid, test]
            },
            "test_users": int(ranker_users.size),
        },
    }
    if new_items is not None:
        results["new_items"] = new_item_summary(test, new_items, slices[NEW_ITEMS], models, rcfg)
    return results, boosters[0], infos[RANKER][0]


def new_item_summary(
    test: Stage, new_items: np.ndarray, sliced: Targets, models: Mapping[str, Any], rcfg: RankerConfig
) -> dict[str, Any]:
    """The new-item protocol's figures: catalog and test counts, the ranker's new/warm NDCG@10
    ratio, and each candidate source's recall of the new target items (its top list of the
    candidate settings; ``all``: the capped union, e.g. Recall@200 for 200 candidates)."""
    users = np.flatnonzero(sliced.counts > 0)
    targets = Targets(np.concatenate([[0], np.cumsum(sliced.counts[users])]).astype(np.int64), sliced.items)
    cands = generate_candidates(test.ctx, test.hist.subset(users), candidate_params(rcfg), targets=targets)
    ranker = models[RANKER]["slices"]
    warm = ranker[WARM_ITEMS][PRIMARY]
    return {
        "items": int(new_items.sum()),
        "catalog": int(new_items.size),
        "test_targets": len(sliced.items),
        "test_users": int(test.n_users),
        "ranker_new_vs_warm": float(ranker[NEW_ITEMS][PRIMARY] / warm) if warm > 0 else 0.0,
        "candidate_recall": cands.source_recall,
        "num_candidates": rcfg.num_candidates,
    }


def small_metrics(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """The XCom-sized summary: NDCG@10 and Recall@10 per model."""
    return {
        name: {key: round(float(m[key]), 6) for key in ("ndcg@10", "recall@10")}
        for name, m in results["models"].items()
    }


# --- production protocol ----------------------------------------------------------------------


def time_windows(
    ts: np.ndarray, rcfg: RankerConfig, params: RankerParams | None = None
) -> list[tuple[float, float]]:
    """``[start, end)`` of the training windows (oldest first), then validation, then test."""
    params = params or RankerParams.from_config(rcfg)
    if ts.size == 0:
        raise DataContractError("no interactions with known items: nothing to train on")
    t_min, t_max = float(ts.min()), float(ts.max())
    length = rcfg.eval_days * DAY if rcfg.eval_days > 0 else params.eval_fraction * (t_max - t_min)
    if length <= 0:
        raise DataContractError("all interactions have the same timestamp: a time-based split is impossible")
    end = t_max + 1.0
    windows = [(end - (j + 1) * length, end - j * length) for j in range(rcfg.train_windows + 2)][::-1]
    windows = [w for w in windows if w[0] > t_min]
    if len(windows) < 3:
        raise DataContractError(
            f"interactions span {(t_max - t_min) / DAY:.1f} days: too short for a training, a validation "
            f"and a test window of {length / DAY:.1f} days each; lower ranker eval_days"
        )
    return windows


def window_targets(
    events: Events, n_users: int, known: Events, window: tuple[float, float], rcfg: RankerConfig
) -> tuple[np.ndarray, Targets]:
    """Users active in ``window`` with a known history and the items new to them in it; at most
    ``max_users_per_window`` users, sampled with the run's seed. Returns (sorted users, targets)."""
    start, end = window
    n_items = int(max(events.item.max(initial=-1), known.item.max(initial=-1))) + 1
    inside = events.take((events.ts >= start) & (events.ts < end))
    keys = np.unique(inside.user * n_items + inside.item)  # one target per (user, item)
    keys = keys[~np.isin(keys, known.user * n_items + known.item)]  # only items new to the user
    lengths = np.bincount(known.user, minlength=n_users)
    t_user, t_item = keys // n_items, keys % n_items
    users = np.unique(t_user)
    users = users[lengths[users] > 0]
    if len(users) > rcfg.max_users_per_window:
        rng = np.random.default_rng([rcfg.seed, int(start)])
        users = np.sort(rng.choice(users, size=rcfg.max_users_per_window, replace=False))
    keep = np.isin(t_user, users)
    t_user, t_item = t_user[keep], t_item[keep]
    counts = np.bincount(np.searchsorted(users, t_user), minlength=len(users))
    return users, Targets(np.concatenate([[0], np.cumsum(counts)]).astype(np.int64), t_item)


def window_stage(
    name: str,
    events: Events,
    n_users: int,
    embeddings: np.ndarray,
    items: pd.DataFrame,
    window: tuple[float, float],
    rcfg: RankerConfig,
    index: Any = None,
    seq: SeqScorer | None = None,
) -> Stage:
    """Users active in ``window`` predicted from everything before its start (:func:`window_targets`).
    ``index``: a shared retrieval index over ``embeddings`` (built per context when omitted);
    ``seq``: the run's sequence model."""
    start = window[0]
    known = events.take(events.ts < start)
    ctx = build_context(known, n_users, embeddings, items, ContextParams.from_config(rcfg), index=index)
    ctx.seq = seq
    users, targets = window_targets(events, n_users, known, window, rcfg)
    hist_all = Histories.from_events(known, n_users, ref_ts=np.full(n_users, start))
    return make_stage(name, ctx, hist_all.subset(users), targets, rcfg)


def production_stages(
    events: Events,
    n_users: int,
    embeddings: np.ndarray,
    items: pd.DataFrame,
    rcfg: RankerConfig,
    params: RankerParams | None = None,
    seq: SeqScorer | None = None,
) -> tuple[list[Stage], Stage, Stage, dict[str, tuple[float, float]]]:
    """The production protocol's groups: training windows, then validation, then the latest (test);
    plus each group's time window. ``seq``: the sequence model every stage shares (trained on
    :func:`production_seq_data`)."""
    windows = time_windows(events.ts, rcfg, params)
    names = [f"train{j}" for j in range(len(windows) - 2)] + ["valid", "test"]
    index = retrieval_index(embeddings, user_profile_queries(events.user, events.item, embeddings))
    stages = []
    for name, window in zip(names, windows, strict=True):
        stage = window_stage(name, events, n_users, embeddings, items, window, rcfg, index, seq)
        if name != "test":
            stage.ctx = None  # each window's relations would otherwise stay in memory to the end
        stages.append(stage)
    return stages[:-2], stages[-2], stages[-1], dict(zip(names, windows, strict=True))


def production_seq_data(
    events: Events, n_users: int, rcfg: RankerConfig, params: RankerParams | None = None
) -> tuple[Histories, Histories, Targets]:
    """The sequence model's data in the production protocol: every event before the first training
    window; validated on the items new to each user in that window (at most
    ``max_users_per_window`` users, as the stages sample them)."""
    first = time_windows(events.ts, rcfg, params)[0]
    known = events.take(events.ts < first[0])
    train = Histories.from_events(known, n_users)
    users, targets = window_targets(events, n_users, known, first, rcfg)
    return train, train.subset(users), targets


def seq_rankings(seq: SeqScorer | None, hist: Histories, depth: int) -> dict[str, list[np.ndarray]]:
    """The sequence model's own ranked lists for ``hist``'s users (``extra_runs`` of
    :func:`evaluate_stages`), or nothing without a model."""
    return {} if seq is None else {SEQMODEL: [seq_ranked_lists(seq, hist, depth)]}


def production_known(events: Events, n_users: int, windows: dict[str, tuple[float, float]]) -> KnownEvents:
    """The events each evaluation stage of the production protocol knows: those before its window."""
    return KnownEvents(
        events, n_users, valid=events.ts < windows["valid"][0], test=events.ts < windows["test"][0]
    )


def json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot serialise {type(value).__name__}")
