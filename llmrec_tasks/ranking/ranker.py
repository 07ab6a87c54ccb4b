"""The LightGBM LambdaRank ranker: stages, datasets, early stopping, the fit and its ranked lists.

A :class:`Stage` is one prediction task (users with their known history, the items they
interacted with next, candidates, features and labels). The ranker is fitted on the training
stages with early stopping on the validation stage (groups without a positive are left out), then
refitted on training + validation stages with the chosen number of rounds (:func:`fit_ranker`).
:func:`evaluate_published_ranker` scores another ranker on the test stage a run kept, for the
quality gate.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import time
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import lightgbm as lgb
import numpy as np

from llmrec_tasks.core import constants as C
from llmrec_tasks.core.config import RankerConfig
from llmrec_tasks.core.errors import DataContractError
from llmrec_tasks.ranking.context import RankContext
from llmrec_tasks.ranking.evaluate import Targets, per_user_metrics
from llmrec_tasks.ranking.events import Histories
from llmrec_tasks.ranking.features import FEATURE_NAMES, build_features
from llmrec_tasks.ranking.sources import CandidateParams, CandidateSet, candidate_hits, generate_candidates
from llmrec_tasks.storage.store import open_store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RankerParams:
    """Numbers of the fit and of its evaluation that change results (fed from the run's settings)."""

    smoothing_window: int = 10  # validation rounds averaged by SmoothedEarlyStopping
    list_depth: int = 50  # ranked list length: Recall@50 and MRR are measured on it
    cold_max_interactions: int = 10  # cold-start slice: target items with fewer known interactions
    eval_fraction: float = 0.1  # window length when eval_days is 0: this share of the time span

    @classmethod
    def from_config(cls, rcfg: RankerConfig) -> RankerParams:
        """The run's settings (``ranker_*``) of the same names."""
        return cls(**{f.name: getattr(rcfg, f.name) for f in dataclasses.fields(cls)})


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
    """The run's candidate settings; ``rank_depth`` never below ``per_source`` or ``seq_candidates``
    (each list holds its share)."""
    return CandidateParams(
        num_candidates=rcfg.num_candidates,
        per_source=rcfg.per_source,
        rank_depth=max(CandidateParams.rank_depth, rcfg.per_source, rcfg.seq_candidates),
        faiss_last_items=rcfg.faiss_last_items,
        seq_candidates=rcfg.seq_candidates,
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
    training ended before a window filled). ``patience`` 0 disables stopping: every round is kept.
    """

    def __init__(self, patience: int, window: int) -> None:
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

    @property
    def score(self) -> float:
        """The smoothed metric at ``best_round``: the last full window when stopping is disabled,
        the raw last value when no window filled."""
        if self.best_end:
            return self.best
        if len(self.values) >= self.window:
            return float(np.mean(self.values[-self.window :]))
        return self.values[-1]

    def __call__(self, env: lgb.callback.CallbackEnv) -> None:
        self.values.append(float(env.evaluation_result_list[0][2]))
        if self.patience == 0 or len(self.values) < self.window:
            return
        smoothed = float(np.mean(self.values[-self.window :]))
        if smoothed > self.best:
            self.best, self.best_end = smoothed, len(self.values)
        elif len(self.values) - self.best_end >= self.patience:
            raise lgb.callback.EarlyStopException(self.best_round - 1, env.evaluation_result_list)


def fit_ranker(
    train: list[Stage],
    valid: Stage,
    rcfg: RankerConfig,
    seed: int,
    columns: list[int],
    params: RankerParams | None = None,
) -> tuple[lgb.Booster, dict[str, Any]]:
    """Early stopping on ``valid`` (NDCG@10, smoothed), then a refit on train + valid with that many
    rounds; ``early_stopping_rounds`` 0 keeps all ``n_estimators`` rounds."""
    params = params or RankerParams.from_config(rcfg)
    started = time.monotonic()
    booster_params = lgb_params(rcfg, seed)
    sampling = {"negative_fraction": rcfg.negative_fraction, "seed": seed}
    dtrain = _dataset(train, columns, **sampling)
    dvalid = _dataset([valid], columns, reference=dtrain)
    stopper = SmoothedEarlyStopping(rcfg.early_stopping_rounds, params.smoothing_window)
    lgb.train(
        booster_params,
        dtrain,
        num_boost_round=rcfg.n_estimators,
        valid_sets=[dvalid],
        valid_names=["valid"],
        callbacks=[stopper],
    )
    rounds = stopper.best_round
    valid_ndcg = stopper.score
    final = lgb.train(booster_params, _dataset([*train, valid], columns, **sampling), num_boost_round=rounds)
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


def ranked_lists(cands: CandidateSet, scores: np.ndarray, depth: int) -> np.ndarray:
    """``(n_users, depth)`` candidates sorted by score (ties: lower item index), -1 padded."""
    user_of = cands.user_of
    order = np.lexsort((cands.items, -scores, user_of))
    pos = np.arange(len(order)) - cands.indptr[user_of[order]]
    keep = pos < depth
    out = np.full((cands.n_users, depth), -1, dtype=np.int64)
    out[user_of[order][keep], pos[keep]] = cands.items[order][keep]
    return out


def feature_columns(drop: Collection[str] = ()) -> list[int]:
    """Indices of :data:`FEATURE_NAMES` without the names in ``drop`` (an ablation's columns)."""
    dropped = set(drop)
    return [i for i, name in enumerate(FEATURE_NAMES) if name not in dropped]


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
    metrics = per_user_metrics(ranked_lists(cands, scores, RankerParams().list_depth), targets)
    return {key: float(metrics[key].mean()) for key in ("ndcg@10", "recall@10")}
