"""Publishing on a local store: manifest, promotion rules, rollback, retention, races."""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from datetime import UTC, datetime

import pytest

from llmrec_tasks import publish
from llmrec_tasks.core import constants as C
from llmrec_tasks.core.errors import BundleError, ConfigError, QualityGateError
from llmrec_tasks.core.results import Published
from llmrec_tasks.serving import recommender as serving
from llmrec_tasks.storage import registry
from llmrec_tasks.storage.registry import current_key, manifest_key
from llmrec_tasks.storage.store import open_store, split_uri
from tests.bundle_factory import make_run, race, toy_scorer

DAY1 = datetime(2024, 2, 1, tzinfo=UTC)
DAY2 = datetime(2024, 2, 2, tzinfo=UTC)
DAY3 = datetime(2024, 2, 3, tzinfo=UTC)

pytestmark = pytest.mark.usefixtures("toy_ranker_features")


def publish_run(store_uri: str, **kwargs: object) -> Published:
    return publish.run_publish(*make_run(store_uri, **kwargs))


def current_version(store_uri: str, namespace: str = C.DEFAULT_NAMESPACE) -> str | None:
    pointer, _ = registry.read_pointer(open_store(store_uri), namespace)
    return pointer and pointer["version"]


def test_publish_writes_a_verified_bundle_and_moves_current(store_uri: str) -> None:
    result = publish_run(store_uri)
    assert result.promoted is True and result.status == "published"
    assert result.namespace == C.DEFAULT_NAMESPACE
    assert result.check["queries"] >= 3
    store = open_store(store_uri)
    manifest = json.loads(store.get_bytes(manifest_key(C.DEFAULT_NAMESPACE, result.version)))
    for name in (
        C.EMBEDDINGS,
        C.FAISS_INDEX,
        C.RANKER_MODEL,
        C.ITEM_IDS,
        C.FEATURE_SPEC,
        C.METRICS,
        C.VALIDATION_SUMMARY,
        C.SERVING_STATS,
        C.REPORT_HTML,
        C.BUNDLE_ITEMS,
        C.USER_HISTORIES,
    ):
        assert name in manifest["files"], name
        assert manifest["files"][name]["size"] > 0 and len(manifest["files"][name]["sha256"]) == 64
    lineage = manifest["lineage"]
    assert lineage["dataset_fingerprint"] and lineage["params"]["namespace"] == C.DEFAULT_NAMESPACE
    assert lineage["dag_id"] == "llmrec_daily" and lineage["run_id"].startswith("scheduled__")
    assert lineage["logical_date"] == "2024-02-01T00:00:00+00:00"
    assert (
        lineage["code_version"]
        and lineage["model_ids"]["ranker_sha256"] == manifest["files"][C.RANKER_MODEL]["sha256"]
    )
    assert manifest["metrics"]["ranker"]["ndcg@10"] == pytest.approx(0.30)
    assert current_version(store_uri) == result.version
    assert result.manifest_uri.endswith(f"bundles/{result.version}/manifest.json")


def test_bundle_holds_exactly_the_allow_list_and_evaluation_features_stay_in_the_run(
    store_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: every upstream ``*_uri`` used to be copied, ranker_eval.npz (most of a bundle) too."""
    monkeypatch.undo()  # the real scorer: the run has the real features and item neighbours
    cfg, validated, embedded, indexed, trained = make_run(store_uri, real_features=True)
    store = open_store(store_uri)
    work = registry.run_prefix(cfg.namespace, validated.version)
    assert store.exists(f"{work}/{C.RANKER_EVAL}") and trained.ranker_eval_uri.endswith(C.RANKER_EVAL)

    result = publish.run_publish(cfg, validated, embedded, indexed, trained)
    manifest = registry.read_manifest(store, cfg.namespace, result.version)
    docs = {f"{C.VALIDATION_DOCS_DIR}/index.html", f"{C.VALIDATION_DOCS_DIR}/static/style.css"}
    assert set(manifest["files"]) == registry.BUNDLE_FILES | docs
    assert C.RANKER_EVAL not in manifest["files"]
    prefix = registry.bundle_prefix(cfg.namespace, result.version)
    assert {key[len(prefix) + 1 :] for key in store.list(prefix)} == set(manifest["files"]) | {C.MANIFEST}
    assert store.exists(f"{work}/{C.RANKER_EVAL}")  # the quality gate reads it from the run
    assert serving.load_bundle(store_uri, cfg.namespace).version == result.version


def test_folders_of_the_run_are_copied_and_the_input_is_not(store_uri: str) -> None:
    cfg, *results = make_run(store_uri, namespace="demo", data_uri="sample")
    validated, embedded, indexed, trained = results
    manifest, written = publish.write_bundle(cfg, validated, embedded, indexed, trained)
    assert written
    assert {"validation/index.html", "validation/static/style.css"} <= set(manifest["files"])
    assert not [name for name in manifest["files"] if "snapshot" in name or name.startswith("items.parquet/")]
    elsewhere = dataclasses.replace(
        validated, data_docs_uri="file:///etc", version="20240202T000000Z-00000000-000000"
    )
    with pytest.raises(BundleError, match="folders are only copied from the run"):
        publish.write_bundle(cfg, elsewhere, embedded, indexed, trained)


def test_logical_date_falls_back_to_the_validated_cutoff(store_uri: str) -> None:
    cfg, validated, *_ = make_run(store_uri)
    no_cutoff = dataclasses.replace(cfg, cutoff=None)
    assert publish.logical_date(no_cutoff, validated) == "2024-02-01T00:00:00+00:00"
    with pytest.raises(ConfigError, match="no cutoff"):
        publish.logical_date(no_cutoff, dataclasses.replace(validated, cutoff=""))


def test_manifest_is_written_last(store_uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from llmrec_tasks.storage.store import LocalStore

    order: list[str] = []

    def spy(method: str) -> object:
        real = getattr(LocalStore, method)

        def put(self: LocalStore, key: str, data: object, **kwargs: object) -> str:
            order.append(key)
            return real(self, key, data, **kwargs)

        return put

    cfg, *results = make_run(store_uri)
    for method in ("put_bytes", "put_file"):
        monkeypatch.setattr(LocalStore, method, spy(method))
    publish.write_bundle(cfg, *results)
    bundle_writes = [k for k in order if "/bundles/" in k]
    assert bundle_writes[-1].endswith(C.MANIFEST) and len(bundle_writes) >= 12


def test_rerun_of_a_published_version_overwrites_nothing(store_uri: str) -> None:
    args = make_run(store_uri)
    first = publish.run_publish(*args)
    store = open_store(store_uri)
    key = manifest_key(C.DEFAULT_NAMESPACE, first.version)
    before = store.get_bytes(key)
    again = publish.run_publish(*args)
    assert again.status == "already published"
    assert again.promoted is True and "already current" in again.reason
    assert store.get_bytes(key) == before


def test_unfinished_publish_is_invisible_and_completed_by_a_rerun(store_uri: str) -> None:
    args = make_run(store_uri)
    cfg, validated = args[0], args[1]
    store = open_store(store_uri)
    leftover = f"{C.DEFAULT_NAMESPACE}/bundles/{validated.version}/{C.EMBEDDINGS}"
    store.put_bytes(leftover, b"half-written garbage")
    rows = registry.list_versions(store_uri, C.DEFAULT_NAMESPACE)
    assert rows == [{"version": validated.version, "complete": False, "current": False}]
    with pytest.raises(BundleError, match="not published"):
        serving.load_bundle(store_uri, cfg.namespace, validated.version)
    result = publish.run_publish(*args)
    assert result.promoted and serving.load_bundle(store_uri, cfg.namespace, result.version)


def test_second_run_publishes_a_new_version_and_rollback_returns(store_uri: str) -> None:
    first = publish_run(store_uri, cutoff=DAY1)
    second = publish_run(store_uri, cutoff=DAY2, seed=1)
    assert second.version != first.version and second.promoted
    rows = registry.list_versions(store_uri, C.DEFAULT_NAMESPACE)
    assert [r["version"] for r in rows] == [first.version, second.version]
    assert [r["current"] for r in rows] == [False, True]
    assert rows[0]["metrics"]["ndcg@10"] == pytest.approx(0.30)

    back = publish.rollback(store_uri, C.DEFAULT_NAMESPACE)
    assert back["version"] == first.version and back["previous"] == second.version
    assert current_version(store_uri) == first.version
    with pytest.raises(BundleError, match="no previous current"):
        publish.rollback(store_uri, C.DEFAULT_NAMESPACE)
    # Re-running the rolled-back day does not put it back; an operator can.
    rerun = publish_run(store_uri, cutoff=DAY2, seed=1)
    assert not rerun.promoted and "rolled back" in rerun.reason
    assert current_version(store_uri) == first.version
    promoted = publish.promote(store_uri, C.DEFAULT_NAMESPACE, second.version)
    assert promoted["promoted"] and promoted["previous"] == first.version
    assert current_version(store_uri) == second.version


def test_scheduled_run_never_moves_current_to_an_older_logical_date(store_uri: str) -> None:
    newer = publish_run(store_uri, cutoff=DAY2)
    older = publish_run(store_uri, cutoff=DAY1, seed=3)
    assert not older.promoted and "newer logical date" in older.reason
    assert current_version(store_uri) == newer.version


def test_failed_gate_leaves_current(store_uri: str) -> None:
    good = publish_run(store_uri, cutoff=DAY1, ndcg=0.30)
    worse = publish_run(store_uri, cutoff=DAY2, seed=1, ndcg=0.20)
    assert not worse.promoted and worse.reason.startswith("quality gate:")
    assert current_version(store_uri) == good.version
    not_beating_popularity = publish_run(store_uri, cutoff=DAY3, seed=2, ndcg=0.05)
    assert not not_beating_popularity.promoted and "popularity" in not_beating_popularity.reason


def test_failed_serving_check_raises_and_leaves_current(
    store_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = publish_run(store_uri, cutoff=DAY1)

    def broken(bundle: serving.Bundle) -> serving.Scorer:
        score = toy_scorer(bundle)
        return lambda history, now: (lambda c, x: (c, x[:, :2]))(*score(history, now))  # a column short

    monkeypatch.setattr(serving, "ranker_scorer", broken)
    with pytest.raises(BundleError, match="ranker expects 3 columns"):
        publish_run(store_uri, cutoff=DAY2, seed=1)
    assert current_version(store_uri) == first.version


def test_promote_false_publishes_without_moving_current(store_uri: str) -> None:
    result = publish_run(store_uri, promote=False)
    assert not result.promoted and "promote=False" in result.reason
    assert current_version(store_uri) is None
    assert registry.list_versions(store_uri, C.DEFAULT_NAMESPACE)[0]["complete"]


def test_namespaces_are_isolated(store_uri: str) -> None:
    prod = publish_run(store_uri, cutoff=DAY2)
    backfill = publish_run(store_uri, namespace="backfill-2024", cutoff=DAY1, seed=5)
    assert backfill.promoted and backfill.bundle_uri.startswith(f"{store_uri}/backfill-2024/bundles/")
    assert current_version(store_uri) == prod.version
    assert current_version(store_uri, "backfill-2024") == backfill.version
    assert [r["version"] for r in registry.list_versions(store_uri, C.DEFAULT_NAMESPACE)] == [prod.version]


@pytest.mark.parametrize("name", ["", "..", "a/b", "../prod", "x..y"])
def test_bad_namespace_or_version_names_are_refused(store_uri: str, name: str) -> None:
    with pytest.raises(ConfigError):
        registry.list_versions(store_uri, name)
    with pytest.raises(ConfigError):
        registry.show(store_uri, C.DEFAULT_NAMESPACE, name)


def test_show_returns_the_manifest(store_uri: str) -> None:
    result = publish_run(store_uri)
    assert registry.show(store_uri, C.DEFAULT_NAMESPACE, result.version)["version"] == result.version
    assert registry.show(store_uri, C.DEFAULT_NAMESPACE, "current")["version"] == result.version
    with pytest.raises(BundleError, match="not published"):
        registry.show(store_uri, C.DEFAULT_NAMESPACE, "20990101T000000Z-deadbeef-abcdef")


def test_gc_keeps_newest_current_and_rollback_target(store_uri: str) -> None:
    versions = [
        publish_run(store_uri, cutoff=datetime(2024, 2, d, tzinfo=UTC), seed=d).version for d in range(1, 6)
    ]
    publish.promote(store_uri, C.DEFAULT_NAMESPACE, versions[0])  # current: the oldest; previous: the newest
    result = registry.gc(store_uri, C.DEFAULT_NAMESPACE, keep=2)
    assert result["deleted"] == versions[1:3]
    assert result["kept"] == sorted([versions[0], versions[3], versions[4]])
    remaining = {r["version"] for r in registry.list_versions(store_uri, C.DEFAULT_NAMESPACE)}
    assert remaining == {versions[0], versions[3], versions[4]}
    assert publish.rollback(store_uri, C.DEFAULT_NAMESPACE)["version"] == versions[4]
    with pytest.raises(ConfigError):
        registry.gc(store_uri, C.DEFAULT_NAMESPACE, keep=0)


def test_manifest_holds_no_credentials(store_uri: str) -> None:
    result = publish_run(store_uri, data_uri="https://alice:s3cr3t@data.example.com/ml")
    text = open_store(store_uri).get_bytes(manifest_key(C.DEFAULT_NAMESPACE, result.version)).decode()
    assert "s3cr3t" not in text and "alice" not in text
    assert "https://data.example.com/ml" in text


def test_racing_pointer_swaps_have_exactly_one_winner(store_uri: str) -> None:
    store = open_store(store_uri)
    registry.swap_current(store, "race", {"version": "v0"}, None)
    for trial in range(20):
        _, etag = store.get_with_etag(current_key("race"))
        versions = [f"v{trial}-{i}" for i in range(2)]
        winners = race(
            [functools.partial(registry.swap_current, store, "race", {"version": v}, etag) for v in versions]
        )
        assert len(winners) == 1
        assert registry.read_pointer(store, "race")[0] == {"version": versions[winners[0]]}


def test_racing_runs_lose_no_promotion(store_uri: str) -> None:
    """Two runs promoting at once: one swap wins, the other re-reads and decides again."""
    runs = [make_run(store_uri, cutoff=DAY1, seed=s) for s in (1, 2)]
    for cfg, *upstream in runs:
        publish.write_bundle(cfg, *upstream)
    results: list[Published] = []
    race([functools.partial(lambda a: results.append(publish.run_publish(*a)), a) for a in runs])
    assert all(r.promoted for r in results)
    pointer, _ = registry.read_pointer(open_store(store_uri), C.DEFAULT_NAMESPACE)
    versions = {r.version for r in results}
    assert {pointer["version"], pointer["history"][0]["version"]} == versions


def test_published_report_holds_trend_and_examples_and_is_the_runs_report(store_uri: str) -> None:
    import hashlib
    import html

    first = publish_run(store_uri, cutoff=DAY1, ndcg=0.30)
    store = open_store(store_uri)
    first_report = store.get_bytes(registry.bundle_key(C.DEFAULT_NAMESPACE, first.version, C.REPORT_HTML))
    assert b"Nothing is promoted in this namespace yet" in first_report
    assert b"no trend yet" in first_report

    cfg, validated, embedded, indexed, trained = make_run(store_uri, cutoff=DAY2, seed=1, ndcg=0.32)
    second = publish.run_publish(cfg, validated, embedded, indexed, trained)
    key = registry.bundle_key(C.DEFAULT_NAMESPACE, second.version, C.REPORT_HTML)
    report = store.get_bytes(key)
    run_store, run_key = split_uri(trained.report_uri)
    assert run_store.get_bytes(run_key) == report  # the run's report is the bundle's
    manifest = registry.read_manifest(store, C.DEFAULT_NAMESPACE, second.version)
    assert manifest["files"][C.REPORT_HTML]["sha256"] == hashlib.sha256(report).hexdigest()

    page = report.decode()
    assert f"Compared with the current bundle <b>{first.version}</b>" in page
    assert "<tr><td>difference</td><td>+0.0200</td><td>+0.0200</td></tr>" in page
    assert '<img alt="trend" src="data:image/png;base64,' in page and "1 earlier published version(s)" in page
    assert "Without the LLM features NDCG@10 drops by 0.010" in page  # from the run's metrics.json
    # The examples are what serving returns for those users, reasons included.
    recommender = serving.Recommender(serving.load_bundle(store_uri, cfg.namespace, second.version))
    users = re.findall(r"<h3>User (\S+) \(\d+ interactions", page)
    assert len(users) == publish.EXAMPLE_USERS
    for user in users:
        for item in recommender.recommend(user_id=user, k=publish.EXAMPLE_K).items:
            assert f"<li>{html.escape(item.title)} <span class='reason'>({html.escape(item.reason)})" in page


def test_trend_lists_at_most_the_newest_versions(store_uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(publish, "TREND_VERSIONS", 2)
    published = [
        publish_run(store_uri, cutoff=day, seed=i).version for i, day in enumerate((DAY1, DAY2, DAY3))
    ]
    new = publish._version_point(
        "99990101T000000Z-ffffffff-ffffff", "9999-01-01", {"ranker": {"ndcg@10": 0.4}}
    )
    trend = publish.report_trend(open_store(store_uri), C.DEFAULT_NAMESPACE, new)
    assert [p.version for p in trend.previous] == published[1:]
    assert trend.replaces is not None and trend.replaces.version == current_version(store_uri)
    assert trend.replaces.metrics == {"ndcg@10": pytest.approx(0.30), "recall@10": pytest.approx(0.40)}


# --- the gate record and the gate task's check -----------------------------------------------------


def test_failed_gate_is_recorded_and_enforce_gate_raises_an_actionable_error(store_uri: str) -> None:
    good = publish_run(store_uri, cutoff=DAY1, ndcg=0.30)
    assert good.gate is not None and good.gate["passed"] and good.gate["current_version"] is None
    publish.enforce_gate(make_run(store_uri, cutoff=DAY1)[0], good)  # passed: nothing raised

    cfg, *rest = make_run(store_uri, cutoff=DAY2, seed=1, ndcg=0.20)
    worse = publish.run_publish(cfg, *rest)
    gate = worse.gate
    assert gate is not None and gate["passed"] is False
    assert gate["current_version"] == good.version and gate["tolerance"] == cfg.gate_tolerance
    assert gate["ranker"] == {"ndcg@10": pytest.approx(0.20), "recall@10": pytest.approx(0.30)}
    assert gate["popularity"] == {"ndcg@10": pytest.approx(0.10)}
    assert set(gate["current"]) == {"ndcg@10", "recall@10"}
    assert worse.reason == f"quality gate: {gate['reason']}"

    with pytest.raises(QualityGateError) as raised:
        publish.enforce_gate(cfg, worse)
    message = str(raised.value)
    assert f"bundle {worse.version}" in message and "NOT promoted" in message
    assert gate["reason"] in message
    assert "new ranker:      ndcg@10 0.2000, recall@10 0.3000" in message
    assert f"current {good.version}" in message
    assert (
        f"`llmrec promote --store {store_uri} --namespace {C.DEFAULT_NAMESPACE} {worse.version}`" in message
    )
    needed = re.search(r"gate_tolerance >= (\d\.\d+)", message)
    assert needed, message
    # The suggested tolerance does pass the gate on the recorded numbers.
    from llmrec_tasks.ranking.evaluate import quality_gate

    current = {"ranker": gate["current"]}
    assert quality_gate(worse.metrics, current, float(needed.group(1)))[0]
    assert not quality_gate(worse.metrics, current, cfg.gate_tolerance)[0]


def test_gate_failure_below_popularity_says_no_tolerance_helps(store_uri: str) -> None:
    cfg, *rest = make_run(store_uri, cutoff=DAY1, ndcg=0.05)
    below = publish.run_publish(cfg, *rest)
    assert below.gate is not None and below.gate["passed"] is False and below.gate["current"] is None
    with pytest.raises(QualityGateError, match="No gate_tolerance helps"):
        publish.enforce_gate(cfg, below)


@pytest.mark.parametrize("case", ["promote=False", "rolled back", "newer logical date", "already current"])
def test_gate_not_evaluated_is_not_a_gate_failure(store_uri: str, case: str) -> None:
    """Not promoted on purpose (or already current): no gate record, enforce_gate passes."""
    if case == "promote=False":
        cfg, *rest = make_run(store_uri, promote=False)
    elif case == "rolled back":
        publish_run(store_uri, cutoff=DAY1)
        publish_run(store_uri, cutoff=DAY2, seed=1)
        publish.rollback(store_uri, C.DEFAULT_NAMESPACE)
        cfg, *rest = make_run(store_uri, cutoff=DAY2, seed=1)
    elif case == "newer logical date":
        publish_run(store_uri, cutoff=DAY2)
        cfg, *rest = make_run(store_uri, cutoff=DAY1, seed=3)
    else:
        publish_run(store_uri, cutoff=DAY1)
        cfg, *rest = make_run(store_uri, cutoff=DAY1)
    result = publish.run_publish(cfg, *rest)
    assert result.gate is None
    assert result.promoted is (case == "already current")
    publish.enforce_gate(cfg, result)
