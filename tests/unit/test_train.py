"""Stage `train` on the generated sample (production protocol), the gate helpers, determinism."""

from __future__ import annotations

import dataclasses
import io
import itertools
import json

import lightgbm as lgb
import numpy as np
import pandas as pd
import pytest

from llmrec_tasks.core import constants as C
from llmrec_tasks.core.config import RankerConfig, RunConfig
from llmrec_tasks.core.errors import DataContractError
from llmrec_tasks.core.results import Trained
from llmrec_tasks.data.contract import write_snapshot
from llmrec_tasks.ranking.benchmark import loo_stages
from llmrec_tasks.ranking.context import context_from_artifacts
from llmrec_tasks.ranking.evaluate import quality_gate
from llmrec_tasks.ranking.events import Histories
from llmrec_tasks.ranking.features import ABLATIONS, build_features
from llmrec_tasks.ranking.protocols import SEQMODEL, time_windows
from llmrec_tasks.ranking.ranker import (
    candidate_params,
    evaluate_published_ranker,
    feature_columns,
    fit_ranker,
)
from llmrec_tasks.ranking.seqstate import SeqWeights
from llmrec_tasks.ranking.sources import CandidateParams, generate_candidates
from llmrec_tasks.ranking.train import run_train
from llmrec_tasks.storage.store import open_store
from tests.stage_results import DATA_URI, embedded_for, validated_for
from tests.unit.ranking_data import embeddings, items_frame

MODELS = {"ranker", *ABLATIONS, "popularity", "itemknn", "ease", "semantic", "covis", SEQMODEL}


def topic_embeddings(items: pd.DataFrame, seed: int = 0) -> np.ndarray:
    """Stand-in for the text encoder: items of one topic point the same way (plus noise)."""
    topics = items[C.CATEGORIES].str.split("|").str[0]
    codes = pd.factorize(topics)[0]
    rng = np.random.default_rng(seed)
    vectors = np.eye(codes.max() + 1, 32, dtype=np.float32)[codes] + 0.3 * rng.normal(size=(len(items), 32))
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, sample_data):
    root = tmp_path_factory.mktemp("store")
    store = open_store(root.as_uri())
    write_snapshot(sample_data, store, "runs/v1")
    work = open_store(store.uri_for("runs/v1"))
    buf = io.BytesIO()
    np.save(buf, topic_embeddings(sample_data.items), allow_pickle=False)
    work.put_bytes(C.EMBEDDINGS, buf.getvalue())
    work.put_bytes(C.ITEM_IDS, json.dumps(sample_data.items[C.ITEM_ID].tolist()).encode())
    embedded = embedded_for(work.uri, len(sample_data.items), 32)
    # Four training windows leave the sequence model a prefix to learn from (eight leave the
    # sample's first event only); a small, short model keeps the test fast.
    cfg = RunConfig.from_dict(
        {
            "data_uri": DATA_URI,
            "store_uri": root.as_uri(),
            "ranker_train_windows": 4,
            "seq_hidden": 16,
            "seq_max_len": 20,
            "seq_max_epochs": 2,
        }
    )
    result = run_train(cfg, validated_for(work.uri), embedded)
    return work, result


def test_ranker_beats_popularity_on_the_sample(trained):
    _, result = trained
    metrics = result.metrics
    assert set(metrics) == MODELS
    assert metrics["ranker"]["ndcg@10"] > metrics["popularity"]["ndcg@10"] + 0.02
    assert metrics["ranker"]["recall@10"] > metrics["popularity"]["recall@10"]
    assert quality_gate(metrics, None, 0.02)[0]
    assert result.gate_vs_popularity["passed"]
    assert 0 < result.candidate_recall <= 1


def test_artifacts_are_written_and_consistent(trained):
    work, result = trained
    bundle_files = tuple(Trained.ARTIFACTS.values())
    for key in bundle_files:
        assert work.exists(key), key
    assert result.artifacts() == {key: work.uri_for(key) for key in bundle_files}
    spec = json.loads(work.get_bytes(C.FEATURE_SPEC))
    booster = lgb.Booster(model_str=work.get_bytes(C.RANKER_MODEL).decode())
    assert booster.feature_name() == spec["features"]
    # Serving rebuilds the candidate parameters from the spec: every field, not only some.
    assert CandidateParams(**spec["candidates"]) == candidate_params(RankerConfig())
    assert set(spec["candidates"]) == {f.name for f in dataclasses.fields(CandidateParams)}
    full = json.loads(work.get_bytes(C.METRICS))
    assert full["protocol"] == "time" and set(full["models"]) == MODELS
    assert "cold_items" in full["models"]["ranker"]["slices"]
    assert set(full["windows"]) >= {"valid", "test"}
    # The baselines the ranker is compared with (and gated against: popularity) are tuned on validation.
    assert set(full["baselines_tuned"]) == MODELS - {"ranker", *ABLATIONS, SEQMODEL}
    for name, tuned in full["baselines_tuned"].items():
        assert tuned["params"] in [point["params"] for point in tuned["grid"]], name
        assert tuned["valid_ndcg@10"] == max(point["valid_ndcg@10"] for point in tuned["grid"]), name
    report = work.get_bytes(C.REPORT_HTML).decode()
    assert "data:image/png;base64," in report and "Baselines, tuned on validation" in report
    # The sequence model: trained in the stage, its weights in the bundle, described in spec and report.
    assert full[SEQMODEL]["epochs"] == 2 and spec["seq"]["max_len"] == 20
    assert SeqWeights.from_bytes(work.get_bytes(C.SEQ_MODEL)).n_items == spec["n_items"]
    assert "Text-aware sequence model" in report
    assert all(not key.endswith((".pkl", ".pickle")) for key in work.list(""))


def test_published_ranker_scores_the_same_on_the_eval_data(trained):
    work, result = trained
    spec = json.loads(work.get_bytes(C.FEATURE_SPEC))
    again = evaluate_published_ranker(work.uri, work.get_bytes(C.RANKER_MODEL).decode(), spec["features"])
    assert again["ndcg@10"] == pytest.approx(result.metrics["ranker"]["ndcg@10"], abs=1e-6)
    with pytest.raises(DataContractError, match="cannot be compared"):
        evaluate_published_ranker(work.uri, work.get_bytes(C.RANKER_MODEL).decode(), ["no_such_feature"])


def test_serving_recomputes_features_from_the_artifacts(trained, sample_data):
    work, _ = trained
    spec = json.loads(work.get_bytes(C.FEATURE_SPEC))
    stats = pd.read_parquet(io.BytesIO(work.get_bytes(C.SERVING_STATS)))
    neighbours = pd.read_parquet(io.BytesIO(work.get_bytes(C.ITEM_NEIGHBORS)))
    item_ids = json.loads(work.get_bytes(C.ITEM_IDS))
    vectors = np.load(io.BytesIO(work.get_bytes(C.EMBEDDINGS)))
    ctx = context_from_artifacts(item_ids, vectors, stats, neighbours, spec["context"], spec["stats_end"])
    hist = Histories.from_lists(
        [np.array([0, 12, 24])],
        [np.array([1.0, 2.0, 3.0]) + spec["stats_end"]],
        np.array([spec["stats_end"] + 10]),
    )
    cands = generate_candidates(ctx, hist, CandidateParams(**spec["candidates"]))
    X = build_features(ctx, hist, cands)
    booster = lgb.Booster(model_str=work.get_bytes(C.RANKER_MODEL).decode())
    from llmrec_tasks.ranking.features import FEATURE_NAMES

    scores = booster.predict(X[:, [FEATURE_NAMES.index(f) for f in spec["features"]]])
    assert scores.shape == (len(cands.items),) and len(cands.items) == spec["candidates"]["num_candidates"]


SMALL_FIT = RankerConfig(
    num_candidates=12, per_source=5, train_windows=2, min_data_in_leaf=5, n_estimators=30
)


@pytest.fixture(scope="module")
def chain_loo_stages(chain_loo):
    """Training and validation stages of the chain data (leave-one-out)."""
    vectors = embeddings()[chain_loo.items[C.ITEM_ID].astype(int).to_numpy()]
    train, valid, _ = loo_stages(chain_loo, vectors, SMALL_FIT)
    return train, valid


def test_fit_is_reproducible(chain_loo_stages):
    train, valid = chain_loo_stages
    columns = feature_columns()
    a, _ = fit_ranker(train, valid, SMALL_FIT, 7, columns)
    b, _ = fit_ranker(train, valid, SMALL_FIT, 7, columns)
    assert a.model_to_string() == b.model_to_string()


def test_zero_early_stopping_rounds_trains_every_round(chain_loo_stages):
    """0 disables early stopping (as documented): all n_estimators rounds, in the fit and the refit."""
    train, valid = chain_loo_stages
    rcfg = dataclasses.replace(SMALL_FIT, early_stopping_rounds=0)
    booster, info = fit_ranker(train, valid, rcfg, 7, feature_columns())
    assert info["best_iteration"] == rcfg.n_estimators
    assert booster.current_iteration() == rcfg.n_estimators


def test_time_windows():
    day = 86400.0
    ts = np.arange(0, 100 * day, day)
    windows = time_windows(ts, RankerConfig(eval_days=10, train_windows=3))
    assert len(windows) == 5
    assert windows[-1][1] > ts.max() and windows[-1][0] == pytest.approx(ts.max() + 1 - 10 * day)
    assert all(a[1] == pytest.approx(b[0]) for a, b in itertools.pairwise(windows))
    with pytest.raises(DataContractError, match="too short"):
        time_windows(ts, RankerConfig(eval_days=40, train_windows=3))


def test_stage_with_a_user_without_candidates(chain):
    """A user who has seen the whole catalog gets no candidates; grouping must still work."""
    from llmrec_tasks.ranking.evaluate import Targets
    from llmrec_tasks.ranking.ranker import _dataset, make_stage
    from tests.unit.ranking_data import N_ITEMS

    _, _, ctx = chain
    everything = np.arange(N_ITEMS)
    hist = Histories.from_lists(
        [np.array([0, 1]), everything],
        [np.array([1.0, 2.0]), np.arange(N_ITEMS, dtype=float)],
        np.array([3.0, float(N_ITEMS)]),
    )
    rcfg = RankerConfig(num_candidates=12, per_source=5)
    stage = make_stage("edge", ctx, hist, Targets.single(np.array([2, 0])), rcfg)
    assert np.diff(stage.cands.indptr).tolist()[1] == 0
    assert stage.positives().tolist() == [1, 0]
    assert _dataset([stage], feature_columns()).construct().num_data() == stage.cands.indptr[1]


def test_smoothed_early_stopping_ignores_an_early_spike():
    from types import SimpleNamespace

    from llmrec_tasks.ranking.ranker import SmoothedEarlyStopping

    # Rises to a plateau at rounds 40-60 and decays; a chance spike at round 3 beats every later value.
    curve = [0.2, 0.2, 0.26] + [0.2 + 0.001 * r for r in range(37)] + [0.24] * 20 + [0.22] * 100
    stopper = SmoothedEarlyStopping(patience=20, window=10)
    with pytest.raises(lgb.callback.EarlyStopException) as stop:
        for value in curve:
            stopper(SimpleNamespace(evaluation_result_list=[("valid", "ndcg@10", value, True)]))
    assert 40 <= stopper.best_round <= 60
    assert stop.value.best_iteration == stopper.best_round - 1
    short = SmoothedEarlyStopping(patience=5, window=10)
    for value in (0.1, 0.2, 0.3):
        short(SimpleNamespace(evaluation_result_list=[("valid", "ndcg@10", value, True)]))
    assert short.best_round == 3  # no full window: keep every round


def test_smoothed_early_stopping_with_zero_patience_never_stops():
    from types import SimpleNamespace

    from llmrec_tasks.ranking.ranker import SmoothedEarlyStopping

    curve = [0.3] * 10 + [0.2] * 30  # falls after the first window: any patience would stop
    stopper = SmoothedEarlyStopping(patience=0, window=10)
    for value in curve:
        stopper(SimpleNamespace(evaluation_result_list=[("valid", "ndcg@10", value, True)]))
    assert stopper.best_round == len(curve)
    assert stopper.score == pytest.approx(0.2)  # the last full window, where training ended


def test_windows_sample_at_most_max_users_per_window_with_the_seed():
    from llmrec_tasks.core.config import RankerConfig
    from llmrec_tasks.ranking.protocols import production_stages
    from tests.unit.ranking_data import chain_events, embeddings

    events, users = chain_events()
    capped = RankerConfig(max_users_per_window=1, train_windows=2)
    first = production_stages(events, len(users), embeddings(), items_frame(), capped)
    again = production_stages(events, len(users), embeddings(), items_frame(), capped)
    for a, b in zip([*first[0], first[1], first[2]], [*again[0], again[1], again[2]], strict=True):
        assert a.hist.n_users <= 3
        np.testing.assert_array_equal(a.hist.items, b.hist.items)
    uncapped = production_stages(
        events, len(users), embeddings(), items_frame(), RankerConfig(train_windows=2)
    )
    assert max(stage.hist.n_users for stage in [*uncapped[0], uncapped[1], uncapped[2]]) > 1


def test_ranking_numbers_come_from_the_run_settings():
    """Each former magic number of the ranking core is a ``ranker_*`` setting, inside the params hash."""
    from llmrec_tasks.core.config import RankerConfig, RunConfig
    from llmrec_tasks.ranking.context import ContextParams
    from llmrec_tasks.ranking.ranker import RankerParams, candidate_params

    rcfg = RankerConfig(
        covis_window=3, pop_window_short=7, pop_window_long=70, list_depth=60, faiss_last_items=5
    )
    ctx = ContextParams.from_config(rcfg)
    assert (ctx.covis_window, ctx.pop_windows) == (3, (7, 70))
    assert RankerParams.from_config(rcfg).list_depth == 60
    assert candidate_params(rcfg).faiss_last_items == 5
    assert ContextParams.from_config(RankerConfig()) == ContextParams()
    assert RankerParams.from_config(RankerConfig()) == RankerParams()
    base = RunConfig(data_uri=DATA_URI, store_uri="file:///tmp/x")
    changed = RunConfig.from_dict(
        {"data_uri": DATA_URI, "store_uri": "file:///tmp/x", "ranker_ease_lambda": 50.0}
    )
    assert base.params_hash() != changed.params_hash()
