"""Stage `train`: candidates, features, a LightGBM LambdaRank ranker, and its evaluation.

Both protocols share one code path (:func:`evaluate_stages`): a list of training *stages*, a
validation stage and a test stage, each being users with their known history, the items they
interacted with next (targets), candidates, features and labels. Statistics (co-visitation,
EASE, popularity, ...) of a stage only come from interactions known before its targets.

- Production protocol (:func:`run_train`, the daily DAG): a global time cutoff. The latest window
  (``eval_days``, or 10% of the time span) is the test window, the window before it validates,
  ``train_windows`` earlier windows give training groups. A window's targets are the items each
  user interacted with in it (not already in the history); its statistics and histories are the
  interactions before the window's start, which is also the reference time of the ranking.
- Leave-one-out protocol (:mod:`llmrec_tasks.ranking.benchmark`): the same, by position in each user's
  sequence instead of time.

The ranker is fitted on the training stages with early stopping on the validation stage (groups
without a positive are left out), then refitted on training + validation stages with the chosen
number of rounds: the published model never saw the test stage, so its test metrics are honest
and the quality gate (:func:`llmrec_tasks.ranking.evaluate.quality_gate`, re-exported here) can compare it
with the published ranker on the same evaluation data (:func:`evaluate_published_ranker`).
"""

from __future__ import annotations

import io
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import lightgbm as lgb
import numpy as np
import pandas as pd

from llmrec_tasks.core import constants as C
from llmrec_tasks.core.config import RankerConfig, RunConfig
from llmrec_tasks.core.errors import ConfigError, DataContractError
from llmrec_tasks.core.results import Embedded, Trained, Validated
from llmrec_tasks.data.contract import read_snapshot
from llmrec_tasks.ranking.baselines import baseline_rankings
from llmrec_tasks.ranking.candidates import (
    DAY,
    SOURCES,
    CandidateParams,
    CandidateSet,
    ContextParams,
    Events,
    Histories,
    RankContext,
    build_context,
    candidate_hits,
    encode_events,
    generate_candidates,
    serving_frames,
)
from llmrec_tasks.ranking.evaluate import (
    PRIMARY,
    Targets,
    paired_bootstrap,
    per_user_mean,
    per_user_metrics,
    quality_gate,
    restrict,
    summarize_runs,
)
from llmrec_tasks.ranking.features import FEATURE_NAMES, LLM_FEATURES, build_features
from llmrec_tasks.retrieval.index import retrieval_index, user_profile_queries
from llmrec_tasks.storage.store import open_store
from llmrec_tasks.text.embed import read_embeddings

__all__ = [
    "Stage",
    "evaluate_published_ranker",
    "evaluate_stages",
    "fit_ranker",
    "make_stage",
    "quality_gate",
    "run_train",
]

log = logging.getLogger(__name__)

RANKER = "ranker"
ABLATION = "ranker_no_llm"
DEPTH = 50  # ranked list length: Recall@50
COLD_MAX_INTERACTIONS = 10  # cold-start slice: target items with fewer known interactions


@dataclass
class Stage:
    """One prediction task: users, their history, targets, candidates, features and labels."""

    name: str
    ctx: RankContext | None  # kept for the test stage only (baselines); see production_stages
    hist: Histories
    targets: Targets
    cands: CandidateSet
    X: np.ndarray
    y: np.ndarray

    @property
    def n_users(self) -> int:
        return self.hist.n_users

    def positives(self) -> np.ndarray:
        """Target rows among each user's candidates (0 when the candidates missed every target)."""
        return np.bincount(self.cands.user_of[self.y > 0], minlength=self.n_users)


def candidate_params(rcfg: RankerConfig) -> CandidateParams:
    return CandidateParams(
        num_candidates=rcfg.num_candidates,
        per_source=rcfg.per_source,
        rank_depth=max(200, rcfg.per_source),
    )


def make_stage(name: str, ctx: RankContext, hist: Histories, targets: Targets, rcfg: RankerConfig) -> Stage:
    """Candidates, features and integer labels (1 = target) for the users of ``hist``."""
    started = time.monotonic()
    cands = generate_candidates(ctx, hist, candidate_params(rcfg), targets=targets)
    features = build_features(ctx, hist, cands)
    labels = candidate_hits(cands, targets).astype(np.int32)
    log.info(
        "stage %s: %d users, %d candidate rows, candidate recall %.3f (%.1fs)",
        name,
        hist.n_users,
        len(labels),
        cands.source_recall.get("all", 0.0),
        time.monotonic() - started,
    )
    return Stage(name, ctx, hist, targets, cands, features, labels)


def lgb_params(rcfg: RankerConfig, seed: int) -> dict[str, Any]:
    """LambdaRank parameters: seeded and deterministic for a fixed thread count."""
    return {
        "objective": "lambdarank",
        "metric": "ndcg",
        "eval_at": [10],
        "lambdarank_truncation_level": rcfg.truncation_level,
        "learning_rate": rcfg.learning_rate,
        "num_leaves": rcfg.num_leaves,
        "min_data_in_leaf": rcfg.min_data_in_leaf,
        "feature_fraction": rcfg.feature_fraction,
        "bagging_fraction": rcfg.bagging_fraction,
        "bagging_freq": 1 if rcfg.bagging_fraction < 1 else 0,
        "seed": seed,
        "deterministic": True,
        "force_row_wise": True,
        "num_threads": rcfg.num_threads,
        "verbosity": -1,
    }


def _dataset(
    stages: list[Stage],
    columns: list[int],
    *,
    reference: lgb.Dataset | None = None,
    negative_fraction: float = 1.0,
    seed: int = 0,
) -> lgb.Dataset:
    """Contiguous query groups (one per user and stage) that contain at least one positive.

    ``negative_fraction`` < 1 keeps that random share of the non-target rows (seeded).
    """
    rng = np.random.default_rng(seed)
    xs, ys, groups = [], [], []
    for stage in stages:
        sizes = np.diff(stage.cands.indptr)
        keep_group = stage.positives() > 0
        keep_row = np.repeat(keep_group, sizes)
        if negative_fraction < 1:
            keep_row &= (stage.y > 0) | (rng.random(len(stage.y)) < negative_fraction)
        group_of = np.repeat(np.arange(len(sizes)), sizes)
        xs.append(stage.X[keep_row][:, columns])
        ys.append(stage.y[keep_row])
        groups.append(np.bincount(group_of[keep_row], minlength=len(sizes))[keep_group])
    group = np.concatenate(groups)
    if group.size == 0:
        names = ", ".join(s.name for s in stages)
        raise DataContractError(
            f"no user of stage(s) {names} has a target among the candidates: too little data to train "
            "the ranker (add interactions, or raise ranker num_candidates / eval_days)"
        )
    return lgb.Dataset(
        np.concatenate(xs),
        np.concatenate(ys),
        group=group,
        feature_name=[FEATURE_NAMES[c] for c in columns],
        reference=reference,
        free_raw_data=True,
    )


class SmoothedEarlyStopping:
    """Early stopping on a trailing moving average of the first validation metric.

    NDCG@10 over a few hundred validation users jumps by several points between rounds, so the raw
    curve can peak by chance after a handful of rounds; the average over ``window`` rounds does
    not. Only full windows count; ``best_round`` is the centre of the best one (every round when
    training ended before a window filled).
    """

    def __init__(self, patience: int, window: int = 10) -> None:
        self.patience = patience
        self.window = window
        self.values: list[float] = []
        self.best = -np.inf
        self.best_end = 0  # 1-based round at which the best window ends

    @property
    def best_round(self) -> int:
        if self.best_end == 0:
            return max(1, len(self.values))
        return max(1, self.best_end - (self.window - 1) // 2)

    def __call__(self, env: lgb.callback.CallbackEnv) -> None:
        self.values.append(float(env.evaluation_result_list[0][2]))
        if len(self.values) < self.window:
            return
        smoothed = float(np.mean(self.values[-self.window :]))
        if smoothed > self.best:
            self.best, self.best_end = smoothed, len(self.values)
        elif len(self.values) - self.best_end >= self.patience:
            raise lgb.callback.EarlyStopException(self.best_round - 1, env.evaluation_result_list)


def fit_ranker(
    train: list[Stage], valid: Stage, rcfg: RankerConfig, seed: int, columns: list[int]
) -> tuple[lgb.Booster, dict[str, Any]]:
    """Early stopping on ``valid`` (NDCG@10, smoothed), then a refit on train + valid with that many rounds."""
    started = time.monotonic()
    params = lgb_params(rcfg, seed)
    sampling = {"negative_fraction": rcfg.negative_fraction, "seed": seed}
    dtrain = _dataset(train, columns, **sampling)
    dvalid = _dataset([valid], columns, reference=dtrain)
    stopper = SmoothedEarlyStopping(rcfg.early_stopping_rounds)
    lgb.train(
        params,
        dtrain,
        num_boost_round=rcfg.n_estimators,
        valid_sets=[dvalid],
        valid_names=["valid"],
        callbacks=[stopper],
    )
    rounds = stopper.best_round
    valid_ndcg = stopper.best if stopper.best_end else stopper.values[-1]  # smoothed
    final = lgb.train(params, _dataset([*train, valid], columns, **sampling), num_boost_round=rounds)
    info = {"best_iteration": rounds, "valid_ndcg@10": valid_ndcg, "seconds": time.monotonic() - started}
    log.info(
        "ranker seed %d (%d features): %d rounds, valid NDCG@10 %.4f (%.0fs)",
        seed,
        len(columns),
        rounds,
        valid_ndcg,
        info["seconds"],
    )
    return final, info


def ranked_lists(cands: CandidateSet, scores: np.ndarray, depth: int = DEPTH) -> np.ndarray:
    """``(n_users, depth)`` candidates sorted by score (ties: lower item index), -1 padded."""
    user_of = cands.user_of
    order = np.lexsort((cands.items, -scores, user_of))
    pos = np.arange(len(order)) - cands.indptr[user_of[order]]
    keep = pos < depth
    out = np.full((cands.n_users, depth), -1, dtype=np.int64)
    out[user_of[order][keep], pos[keep]] = cands.items[order][keep]
    return out


def feature_columns(include_llm: bool) -> list[int]:
    return [i for i, name in enumerate(FEATURE_NAMES) if include_llm or name not in LLM_FEATURES]


def evaluate_stages(
    train: list[Stage], valid: Stage, test: Stage, rcfg: RankerConfig, *, seeds: int = 1, n_boot: int = 1000
) -> tuple[dict[str, Any], lgb.Booster, dict[str, Any]]:
    """Fit the ranker and its no-LLM ablation per seed, score baselines, compare on the test users.

    Returns (results, the first seed's ranker, its fit info). ``results["models"]`` maps each
    model to its metrics (mean over seeds, spread, bootstrap CI, cold-start slice).
    """
    if seeds < 1:
        raise ConfigError(f"seeds must be at least 1, got {seeds}")
    runs: dict[str, list[np.ndarray]] = {RANKER: [], ABLATION: []}
    importance = np.zeros(len(FEATURE_NAMES))
    infos: dict[str, list[dict[str, Any]]] = {RANKER: [], ABLATION: []}
    boosters: list[lgb.Booster] = []
    for i in range(seeds):
        seed = rcfg.seed + i
        for model, include_llm in ((RANKER, True), (ABLATION, False)):
            columns = feature_columns(include_llm)
            booster, info = fit_ranker(train, valid, rcfg, seed, columns)
            scores = booster.predict(test.X[:, columns], num_threads=rcfg.num_threads)
            runs[model].append(ranked_lists(test.cands, scores))
            infos[model].append(info)
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
    for name, ranked in baseline_rankings(test.ctx, test.hist, depth=DEPTH).items():
        runs[name] = [ranked]
    cold = restrict(test.targets, test.ctx.item_pop[test.targets.items] < COLD_MAX_INTERACTIONS)
    models = {
        name: summarize_runs(r, test.targets, test.ctx.n_items, slices={"cold_items": cold}, n_boot=n_boot)
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
    return results, boosters[0], infos[RANKER][0]


def small_metrics(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """The XCom-sized summary: NDCG@10 and Recall@10 per model."""
    return {
        name: {key: round(float(m[key]), 6) for key in ("ndcg@10", "recall@10")}
        for name, m in results["models"].items()
    }


# --- production protocol ----------------------------------------------------------------------


def time_windows(ts: np.ndarray, rcfg: RankerConfig) -> list[tuple[float, float]]:
    """``[start, end)`` of the training windows (oldest first), then validation, then test."""
    if ts.size == 0:
        raise DataContractError("no interactions with known items: nothing to train on")
    t_min, t_max = float(ts.min()), float(ts.max())
    length = rcfg.eval_days * DAY if rcfg.eval_days > 0 else 0.1 * (t_max - t_min)
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


def window_stage(
    name: str,
    events: Events,
    n_users: int,
    embeddings: np.ndarray,
    items: pd.DataFrame,
    window: tuple[float, float],
    rcfg: RankerConfig,
    index: Any = None,
) -> Stage:
    """Users active in ``window`` predicted from everything before its start; at most
    ``max_users_per_window`` of them, sampled with the run's seed. ``index``: a shared retrieval
    index over ``embeddings`` (built per context when omitted)."""
    start, end = window
    known = events.take(events.ts < start)
    ctx = build_context(known, n_users, embeddings, items, ContextParams(), index=index)
    n_items = embeddings.shape[0]
    inside = events.take((events.ts >= start) & (events.ts < end))
    keys = np.unique(inside.user * n_items + inside.item)  # one target per (user, item)
    keys = keys[~np.isin(keys, known.user * n_items + known.item)]  # only items new to the user
    hist_all = Histories.from_events(known, n_users, ref_ts=np.full(n_users, start))
    t_user, t_item = keys // n_items, keys % n_items
    users = np.unique(t_user)
    users = users[hist_all.lengths[users] > 0]
    if len(users) > rcfg.max_users_per_window:
        rng = np.random.default_rng([rcfg.seed, int(start)])
        users = np.sort(rng.choice(users, size=rcfg.max_users_per_window, replace=False))
    keep = np.isin(t_user, users)
    t_user, t_item = t_user[keep], t_item[keep]
    counts = np.bincount(np.searchsorted(users, t_user), minlength=len(users))
    targets = Targets(np.concatenate([[0], np.cumsum(counts)]).astype(np.int64), t_item)
    return make_stage(name, ctx, hist_all.subset(users), targets, rcfg)


def production_stages(
    events: Any, n_users: int, embeddings: np.ndarray, items: pd.DataFrame, rcfg: RankerConfig
) -> tuple[list[Stage], Stage, Stage, dict[str, tuple[float, float]]]:
    """The production protocol's groups: training windows, then validation, then the latest (test);
    plus each group's time window."""
    windows = time_windows(events.ts, rcfg)
    names = [f"train{j}" for j in range(len(windows) - 2)] + ["valid", "test"]
    index = retrieval_index(embeddings, user_profile_queries(events.user, events.item, embeddings))
    stages = []
    for name, window in zip(names, windows, strict=True):
        stage = window_stage(name, events, n_users, embeddings, items, window, rcfg, index)
        if name != "test":
            stage.ctx = None  # each window's relations would otherwise stay in memory to the end
        stages.append(stage)
    return stages[:-2], stages[-2], stages[-1], dict(zip(names, windows, strict=True))


def align_items(items: pd.DataFrame, item_ids: list[str]) -> pd.DataFrame:
    """Snapshot items in embedding row order."""
    indexed = items.drop_duplicates(C.ITEM_ID, keep="last").set_index(C.ITEM_ID)
    missing = pd.Index(item_ids).difference(indexed.index)
    if len(missing):
        raise DataContractError(
            f"{len(missing)} embedded items are not in the snapshot (e.g. {list(missing[:3])}): "
            "re-run the embed stage for this snapshot"
        )
    return indexed.loc[item_ids].reset_index()


def run_train(cfg: RunConfig, validated: Validated, embedded: Embedded) -> Trained:
    """Production protocol end to end; writes the ranker, spec, metrics, report and serving stats."""
    from llmrec_tasks.ranking.report import build_report

    started = time.monotonic()
    rcfg = cfg.ranker
    store = open_store(validated.work_uri)
    data = read_snapshot(store.uri_for(C.SNAPSHOT_DIR))
    item_ids, embeddings = read_embeddings(embedded)
    items = align_items(data.items, item_ids)
    events, user_index = encode_events(data.interactions, pd.Index(item_ids))
    train, valid, test, windows = production_stages(events, len(user_index), embeddings, items, rcfg)
    results, booster, fit_info = evaluate_stages(train, valid, test, rcfg, seeds=1)
    summary = small_metrics(results)
    passed, reason = quality_gate(summary, None, cfg.gate_tolerance)
    results.update(
        protocol="time",
        windows={name: [_iso(a), _iso(b)] for name, (a, b) in windows.items()},
        gate_vs_popularity={"passed": passed, "reason": reason},
        run={"version": validated.version, "seconds": time.monotonic() - started},
    )
    log.info("quality gate vs popularity: %s", reason)

    serving_ctx = build_context(events, len(user_index), embeddings, items, ContextParams())
    stats, neighbours = serving_frames(serving_ctx, item_ids)
    spec = feature_spec(serving_ctx, rcfg, booster, fit_info, embedded.to_json())
    _put_parquet(store, C.SERVING_STATS, stats)
    _put_parquet(store, C.ITEM_NEIGHBORS, neighbours)
    store.put_bytes(C.RANKER_MODEL, booster.model_to_string().encode())
    store.put_bytes(C.FEATURE_SPEC, json.dumps(spec, indent=2).encode())
    store.put_bytes(C.METRICS, json.dumps(results, indent=2, default=json_default).encode())
    store.put_bytes(C.REPORT_HTML, build_report(results, title=f"llmrec ranker {validated.version}").encode())
    _put_eval(store, test)
    log.info(
        "train done in %.0fs: ranker NDCG@10 %.4f vs popularity %.4f",
        time.monotonic() - started,
        summary[RANKER]["ndcg@10"],
        summary["popularity"]["ndcg@10"],
    )
    return Trained(
        model_uri=store.uri_for(C.RANKER_MODEL),
        feature_spec_uri=store.uri_for(C.FEATURE_SPEC),
        metrics_uri=store.uri_for(C.METRICS),
        report_uri=store.uri_for(C.REPORT_HTML),
        serving_stats_uri=store.uri_for(C.SERVING_STATS),
        item_neighbors_uri=store.uri_for(C.ITEM_NEIGHBORS),
        ranker_eval_uri=store.uri_for(C.RANKER_EVAL),
        metrics=summary,
        candidate_recall=round(float(results["candidate_recall"]["test"].get("all", 0.0)), 6),
        gate_vs_popularity={"passed": passed, "reason": reason},
        best_iteration=fit_info["best_iteration"],
    )


def feature_spec(
    ctx: RankContext,
    rcfg: RankerConfig,
    booster: lgb.Booster,
    fit_info: dict[str, Any],
    embedded: dict[str, Any],
) -> dict[str, Any]:
    """What serving needs to rebuild candidates and features exactly as in training."""
    cparams = candidate_params(rcfg)
    return {
        "features": list(booster.feature_name()),
        "llm_features": LLM_FEATURES,
        "sources": list(SOURCES),
        "context": ctx.params.to_dict(),
        "candidates": {
            "num_candidates": cparams.num_candidates,
            "per_source": cparams.per_source,
            "rank_depth": cparams.rank_depth,
        },
        "stats_end": ctx.stats_end,
        "n_items": ctx.n_items,
        "model": {"kind": "lightgbm-lambdarank", **fit_info, "params": lgb_params(rcfg, rcfg.seed)},
        "encoder": embedded.get("encoder"),
    }


def evaluate_published_ranker(work_uri: str, model_text: str, feature_names: list[str]) -> dict[str, float]:
    """Score another ranker (e.g. the published one) on this run's test stage: same users, same
    candidates, same features. Returns ``{"ndcg@10", "recall@10"}`` for :func:`quality_gate`."""
    store = open_store(work_uri)
    if not store.exists(C.RANKER_EVAL):
        raise DataContractError(
            f"{store.uri_for(C.RANKER_EVAL)} is missing: this run kept no evaluation data"
        )
    with np.load(io.BytesIO(store.get_bytes(C.RANKER_EVAL)), allow_pickle=False) as data:
        arrays = {key: data[key] for key in data.files}
    columns = [str(c) for c in arrays["columns"]]
    missing = [f for f in feature_names if f not in columns]
    if missing:
        raise DataContractError(
            f"the published ranker needs features {missing} that this run does not compute: it cannot be "
            "compared on the same evaluation data (publish with the gate against popularity only)"
        )
    booster = lgb.Booster(model_str=model_text)
    scores = booster.predict(arrays["X"][:, [columns.index(f) for f in feature_names]])
    cands = CandidateSet(arrays["indptr"], arrays["items"], np.zeros((0, 0)), np.zeros((0, 0)))
    targets = Targets(arrays["target_indptr"], arrays["target_items"])
    metrics = per_user_metrics(ranked_lists(cands, scores), targets)
    return {key: float(metrics[key].mean()) for key in ("ndcg@10", "recall@10")}


def _put_eval(store: Any, test: Stage) -> None:
    buf = io.BytesIO()
    np.savez_compressed(
        buf,
        X=test.X,
        columns=np.array(FEATURE_NAMES),
        indptr=test.cands.indptr,
        items=test.cands.items,
        target_indptr=test.targets.indptr,
        target_items=test.targets.items,
    )
    store.put_bytes(C.RANKER_EVAL, buf.getvalue())


def _put_parquet(store: Any, key: str, frame: pd.DataFrame) -> None:
    buf = io.BytesIO()
    frame.to_parquet(buf, index=False)
    store.put_bytes(key, buf.getvalue())


def _iso(ts: float) -> str:
    return pd.Timestamp(ts, unit="s", tz="UTC").isoformat()


def json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot serialise {type(value).__name__}")
