"""The Airflow glue: run config from params + run dates, store resolution, bundle asset events."""

from __future__ import annotations

import dataclasses
import json
import threading
from datetime import UTC, datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest

from llmrec_tasks import airflow_glue as glue
from llmrec_tasks.core.config import RunConfig
from llmrec_tasks.core.errors import ConfigError
from llmrec_tasks.core.results import EncodedShard, Published, Validated
from tests.airflow_env import use_test_airflow_home
from tests.stage_results import embedded_for, validated_for

use_test_airflow_home()

CUTOFF = datetime(2026, 10, 2, tzinfo=UTC)
DATA = "s3://acme-data/llmrec"  # configured data: the config never reads it


# --- store ---------------------------------------------------------------------------------------


def test_store_param_wins_over_variable_and_env():
    env = {glue.STORE_ENV: "s3://env/x", "AIRFLOW_HOME": "/opt/airflow"}
    assert glue.resolve_store_uri(" file:///p ", variable_get=lambda k: "s3://var/x", env=env) == "file:///p"


def test_store_variable_then_env_then_airflow_home(tmp_path):
    env = {glue.STORE_ENV: "s3://env/x", "AIRFLOW_HOME": str(tmp_path)}
    seen = []

    def variable(key):
        seen.append(key)
        return "s3://var/x"

    assert glue.resolve_store_uri("", variable_get=variable, env=env) == "s3://var/x"
    assert seen == [glue.STORE_VARIABLE]
    assert glue.resolve_store_uri(None, variable_get=lambda k: None, env=env) == "s3://env/x"
    assert glue.resolve_store_uri("", variable_get=lambda k: "  ", env={"AIRFLOW_HOME": str(tmp_path)}) == (
        (tmp_path / "llmrec-store").as_uri()
    )


def test_data_param_then_variable_then_env_and_no_default():
    env = {glue.DATA_ENV: " s3://env/data ", "AIRFLOW_HOME": "/opt/airflow"}
    seen = []

    def variable(key):
        seen.append(key)
        return "s3://var/data"

    assert glue.resolve_data_uri(" /data/p ", variable_get=variable, env=env) == "/data/p"
    assert seen == []  # the param wins without reading the Variable
    assert glue.resolve_data_uri("", variable_get=variable, env=env) == "s3://var/data"
    assert seen == [glue.DATA_VARIABLE] == ["llmrec_data_uri"]
    assert glue.resolve_data_uri(None, variable_get=lambda k: "  ", env=env) == "s3://env/data"
    assert glue.DATA_ENV == "LLMREC_DATA_URI"
    # Unlike the store, there is no fallback: no sample, no folder under AIRFLOW_HOME.
    assert (
        glue.resolve_data_uri(None, variable_get=lambda k: None, env={"AIRFLOW_HOME": "/opt/airflow"}) is None
    )


def test_default_store_without_airflow_home_is_under_home():
    assert glue.default_store_uri({}) == (Path.home() / "airflow" / "llmrec-store").resolve().as_uri()


def test_s3_client_only_for_s3_stores():
    assert glue.s3_client_from_connection("file:///tmp/x") is None


# --- cutoff --------------------------------------------------------------------------------------


def test_cutoff_prefers_data_interval_end():
    end = datetime(2026, 10, 2, 0, 0, tzinfo=UTC)
    logical = datetime(2026, 10, 1, tzinfo=UTC)
    assert glue.run_cutoff(end, logical, datetime(2030, 1, 1, tzinfo=UTC)) == end


def test_cutoff_falls_back_to_logical_date_then_run_after():
    logical = datetime(2026, 10, 1, 12, tzinfo=UTC)
    run_after = datetime(2026, 10, 3, 8, 30, tzinfo=UTC)
    assert glue.run_cutoff(None, logical, run_after) == logical
    assert glue.run_cutoff(None, None, run_after) == run_after


def test_cutoff_is_plain_utc_datetime():
    import pendulum

    local = pendulum.datetime(2026, 10, 2, 2, 0, tz="Europe/Berlin")
    cutoff = glue.run_cutoff(local)
    assert type(cutoff) is datetime and cutoff.tzinfo == UTC
    assert cutoff == datetime(2026, 10, 2, 0, 0, tzinfo=UTC)
    assert glue.run_cutoff(datetime(2026, 1, 1, tzinfo=timezone(timedelta(hours=-5)))).hour == 5


def test_cutoff_refuses_naive_or_missing_dates():
    with pytest.raises(ConfigError, match="time zone"):
        glue.run_cutoff(datetime(2026, 1, 1))
    with pytest.raises(ConfigError, match="no data interval"):
        glue.run_cutoff(None, None, None)


# --- run config ----------------------------------------------------------------------------------


def build(params, **kw):
    kw.setdefault("cutoff", CUTOFF)
    kw.setdefault("dag_id", glue.DAG_ID)
    kw.setdefault("run_id", "scheduled__2026-10-02T00:00:00+00:00")
    kw.setdefault("env", {"AIRFLOW_HOME": "/opt/airflow", glue.DATA_ENV: DATA})
    return glue.build_run_config(params, **kw)


def test_a_run_without_a_data_source_is_refused_with_how_to_configure_one():
    with pytest.raises(ConfigError, match="no data source configured") as caught:
        build({"namespace": "exp-a"}, variable_get=lambda k: None, env={"AIRFLOW_HOME": "/opt/airflow"})
    assert "Variable `llmrec_data_uri`" in str(caught.value) and "`make demo`" in str(caught.value)
    assert build({}).data_uri == DATA
    assert build({"data_uri": "/data/param"}).data_uri == "/data/param"


def test_the_sample_is_refused_in_production_whichever_way_it_is_configured():
    """A Variable or environment set to `sample` is refused in production like the param."""
    demo_env = {"AIRFLOW_HOME": "/opt/airflow", glue.DATA_ENV: "sample"}
    assert build({"namespace": "demo"}, env=demo_env).data_uri == "sample"
    for kw in ({"env": demo_env}, {"variable_get": {glue.DATA_VARIABLE: "sample:3"}.get}):
        with pytest.raises(ConfigError, match="generated demo data and never goes to the `production`"):
            build({}, **kw)
    with pytest.raises(ConfigError, match="generated demo data"):
        build({"data_uri": "sample"}, run_type="scheduled")


def test_build_run_config_from_flat_params():
    cfg = build(
        {
            "data_uri": "sample",
            "store_uri": "",
            "namespace": "exp-a",
            "encoder_shards": 3,
            "index_kind": "flat",
            "ranker_learning_rate": 0.1,
            "validation": {"duplicates_mostly": 0.9},
            "promote": False,
        }
    )
    assert cfg.store_uri == "file:///opt/airflow/llmrec-store"
    assert cfg.cutoff == CUTOFF and cfg.namespace == "exp-a"
    assert cfg.encoder.shards == 3 and cfg.index.kind == "flat" and cfg.ranker.learning_rate == 0.1
    assert cfg.validation.duplicates_mostly == 0.9 and cfg.promote is False
    assert cfg.dag_id == glue.DAG_ID and cfg.run_id.startswith("scheduled__")


def test_same_run_dates_and_params_give_the_same_version_params():
    """Reruns (other run id, other trigger time) hash the same: same version id."""
    a = build({"namespace": "exp-a"}, run_id="scheduled__1")
    b = build({"namespace": "exp-a"}, run_id="manual__2", dag_id="other")
    assert a.params_hash() == b.params_hash()
    later = build({"namespace": "exp-a"}, cutoff=CUTOFF + timedelta(days=1))
    assert later.params_hash() != a.params_hash()


def test_config_round_trips_through_xcom_json():
    cfg = build({"namespace": "exp-a", "encoder_shards": 2})
    restored = glue.task_config(json.loads(json.dumps(cfg.to_dict())))
    assert restored == cfg


def test_unknown_param_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown settings"):
        build({"ranker_learnig_rate": 0.1})


def test_backfill_into_production_is_refused():
    with pytest.raises(ConfigError, match="experiment namespace"):
        build({}, run_type="backfill")
    with pytest.raises(ConfigError, match="experiment namespace"):
        build({"namespace": "production"}, run_type="BACKFILL")
    assert build({"namespace": "exp-bf"}, run_type="backfill").namespace == "exp-bf"
    assert build({}, run_type="scheduled").namespace == "production"


def test_config_from_context(monkeypatch, tmp_path):
    monkeypatch.setenv(glue.STORE_ENV, (tmp_path / "store").as_uri())
    monkeypatch.delenv(glue.DATA_ENV, raising=False)
    monkeypatch.setattr(glue, "airflow_variable", {glue.DATA_VARIABLE: DATA}.get)
    dag_run = SimpleNamespace(
        dag_id=glue.DAG_ID,
        run_id="manual__x",
        run_after=datetime(2026, 11, 1, 9, tzinfo=UTC),
        run_type=SimpleNamespace(value="manual"),
    )
    context = {
        "params": {"namespace": "exp-ctx", "store_uri": ""},
        "data_interval_end": None,
        "logical_date": None,
        "dag_run": dag_run,
        "run_id": "manual__x",
    }
    config = glue.config_from_context(context)
    assert config["cutoff"] == "2026-11-01T09:00:00+00:00"
    assert config["store_uri"] == (tmp_path / "store").as_uri()
    assert config["run_id"] == "manual__x" and config["namespace"] == "exp-ctx"
    assert config["data_uri"] == DATA  # from the Variable, read at run time
    json.dumps(config)  # XCom-able

    monkeypatch.setattr(glue, "airflow_variable", lambda key: None)
    with pytest.raises(ConfigError, match="no data source configured"):
        glue.config_from_context(context)
    monkeypatch.setattr(glue, "airflow_variable", {glue.DATA_VARIABLE: DATA}.get)

    dag_run.run_type = SimpleNamespace(value="backfill")
    context["params"] = {}
    with pytest.raises(ConfigError, match="experiment namespace"):
        glue.config_from_context(context)


# --- asset events --------------------------------------------------------------------------------


def published(promoted=True, **extra):
    fields = {
        "version": "20261002T000000Z-abcdef12-123456",
        "namespace": "production",
        "bundle_uri": "file:///s/production/bundles/v",
        "manifest_uri": "file:///s/production/bundles/v/manifest.json",
        "status": "published",
        "check": {"queries": 3},
        "promoted": promoted,
        "reason": "ok" if promoted else "quality gate: ranker ndcg@10 0.1 does not beat popularity 0.2",
        "metrics": {
            "ranker": {"ndcg@10": 0.31, "ndcg@10_ci95": [0.3, 0.32], "users": 50, "slices": {"cold": {}}},
            "popularity": {"ndcg@10": 0.12},
        },
    }
    return Published(**{**fields, **extra})


class FakeAccessor:
    def __init__(self):
        self.added = []

    def add(self, asset, extra=None):
        self.added.append((asset, extra))


class FakeOutletEvents(dict):
    def __missing__(self, key):
        self[key] = FakeAccessor()
        return self[key]


def test_event_extra_for_a_promoted_bundle():
    cfg = build({})
    extra = glue.bundle_event_extra(cfg, published())
    assert extra["version"] == "20261002T000000Z-abcdef12-123456"
    assert extra["promoted"] is True and extra["namespace"] == "production"
    assert extra["manifest_uri"].endswith("manifest.json") and extra["store_uri"] == cfg.store_uri
    assert extra["metrics"] == {"ranker": {"ndcg@10": 0.31, "users": 50.0}, "popularity": {"ndcg@10": 0.12}}
    assert extra["cutoff"] == "2026-10-02T00:00:00+00:00"
    json.dumps(extra)


def test_metric_summary_keeps_numbers_only():
    np = pytest.importorskip("numpy")
    summary = glue.metric_summary({"ranker": {"a": np.float32(0.5), "b": "x", "c": True}, "n": np.int64(3)})
    assert summary == {"ranker": {"a": 0.5}, "n": 3.0}


def test_no_event_when_the_gate_fails_or_promotion_is_off():
    events = FakeOutletEvents()
    cfg = build({})
    assert glue.emit_bundle_event(events, cfg, published(promoted=False)) is None
    assert glue.emit_bundle_event(events, build({"promote": False}), published(promoted=False)) is None
    assert events == {}


def test_event_goes_to_the_store_and_namespace_asset_through_the_alias():
    from airflow.sdk import Asset, AssetAlias

    events = FakeOutletEvents()
    cfg = build({"namespace": "exp-a", "store_uri": "s3://acme-models/llmrec"})
    extra = glue.emit_bundle_event(events, cfg, published(namespace="exp-a"))
    ((alias, accessor),) = events.items()
    assert alias == AssetAlias(name=glue.BUNDLE_ALIAS, group="llmrec")
    ((asset, sent),) = accessor.added
    assert isinstance(asset, Asset)
    key = glue.store_key("s3://acme-models/llmrec")
    assert (asset.name, asset.uri) == (f"llmrec_bundle_{key}_exp-a", f"llmrec://bundles/{key}/exp-a")
    assert sent == extra and sent["namespace"] == "exp-a"


def test_after_publish_records_the_result_in_the_work_folder(tmp_path):
    from llmrec_tasks.pipeline import load_stage

    work = (tmp_path / "store" / "production" / "runs" / "v").as_uri()
    events = FakeOutletEvents()
    result = published(promoted=False)
    assert glue.after_publish(events, build({}), validated_for(work), result) is None
    assert load_stage(work, Published) == result


def test_a_rerun_that_changed_nothing_keeps_the_publish_record(tmp_path):
    """The record keeps the decision that was made (its gate reason), not "already current"."""
    from llmrec_tasks.pipeline import load_stage

    work = (tmp_path / "store" / "production" / "runs" / "v").as_uri()
    first = published(status="published", reason="ranker ndcg@10 0.31 beats popularity 0.12")
    glue.after_publish(FakeOutletEvents(), build({}), validated_for(work), first)
    rerun = published(status="already published", reason="v is already current")
    events = FakeOutletEvents()
    assert glue.after_publish(events, build({}), validated_for(work), rerun)["version"] == first.version
    assert load_stage(work, Published).reason == first.reason
    assert len(next(iter(events.values())).added) == 1  # the event is emitted again (at least once)
    # A rerun that changes the outcome (now promoted) replaces the record.
    failed = published(promoted=False, status="published")
    glue.after_publish(FakeOutletEvents(), build({}), validated_for(work), failed)
    later = published(status="already published", reason="now within tolerance")
    glue.after_publish(FakeOutletEvents(), build({}), validated_for(work), later)
    assert load_stage(work, Published).reason == "now within tolerance"


def test_stage_task_hands_the_stage_typed_results_and_returns_json():
    validated, embedded = validated_for("file:///w"), embedded_for("file:///w", 3, 4)
    seen = {}

    def stage(cfg, validated, embedded):
        seen.update(cfg=cfg, validated=validated, embedded=embedded)
        return dataclasses.replace(embedded, reused=2)

    config = build({}).to_dict()
    out = glue.stage_task(stage, config, validated=validated.to_json(), embedded=embedded.to_json())
    assert seen == {"cfg": glue.task_config(config), "validated": validated, "embedded": embedded}
    assert out == {**embedded.to_json(), "reused": 2}
    json.dumps(out)


def test_stage_task_converts_lists_of_shard_results_both_ways():
    shards = [EncodedShard(shard=i, count=1, seconds=0.5) for i in range(2)]
    out = glue.stage_task(
        lambda cfg, shard_results: list(reversed(shard_results)),
        build({}).to_dict(),
        shard_results=[s.to_json() for s in shards],
    )
    assert out == [shards[1].to_json(), shards[0].to_json()]


def test_stage_task_refuses_unknown_inputs_and_foreign_results():
    config = build({}).to_dict()
    with pytest.raises(ConfigError, match="stage input 'checked' has no result type"):
        glue.stage_task(lambda cfg, checked: None, config, checked={})
    with pytest.raises(ConfigError, match=r"validate result .* missing key.*'work_uri'"):
        glue.stage_task(lambda cfg, validated: None, config, validated={"version": "v1"})


def test_publish_task_records_emits_and_returns_json(tmp_path):
    work = (tmp_path / "store" / "production" / "runs" / "v").as_uri()
    validated, embedded = validated_for(work), embedded_for(work, 3, 4)
    events = FakeOutletEvents()

    def run_publish(cfg, validated, embedded):
        assert isinstance(validated, Validated)
        return published()

    out = glue.publish_task(
        run_publish, events, build({}).to_dict(), validated=validated.to_json(), embedded=embedded.to_json()
    )
    assert out == published().to_json()
    from llmrec_tasks.pipeline import load_stage

    assert load_stage(work, Published) == published()
    assert len(next(iter(events.values())).added) == 1


STORE_A = "file:///srv/llmrec-store"
STORE_B = "s3://acme-models/llmrec"


def test_store_key_is_short_readable_stable_and_uri_safe():
    import re

    key = glue.store_key(STORE_A)
    assert re.fullmatch(r"file-llmrec-store-[0-9a-f]{8}", key), key
    assert re.fullmatch(r"s3-llmrec-[0-9a-f]{8}", glue.store_key(STORE_B))
    assert re.fullmatch(r"s3-acme-models-[0-9a-f]{8}", glue.store_key("s3://acme-models"))
    # One store, several spellings: one key. Same folder name in two stores: two keys.
    for spelling in (
        "file:///srv/llmrec-store/",
        "FILE:///srv/./llmrec-store",
        "/srv/llmrec-store",
        " /srv//llmrec-store ",
    ):
        assert glue.store_key(spelling) == key, spelling
    assert glue.store_key("file:///other/llmrec-store") != key
    assert glue.store_key("s3://acme-models/LLMREC") != glue.store_key(STORE_B)  # S3 keys are case-sensitive
    long = glue.store_key("s3://b/" + "x" * 300 + "?#%")
    assert len(long) <= glue.STORE_SLUG_CHARS + 1 + glue.STORE_HASH_CHARS and re.fullmatch(
        r"[a-z0-9-]+", long
    )


def test_bundle_asset_per_store_and_namespace():
    from airflow.sdk import Asset

    a, b = glue.store_key(STORE_A), glue.store_key(STORE_B)
    assert glue.bundle_asset(STORE_A) == Asset(
        name=f"llmrec_bundle_{a}_production", uri=f"llmrec://bundles/{a}/production", group="llmrec"
    )
    assert glue.bundle_asset_uri(STORE_B, "exp-x") == f"llmrec://bundles/{b}/exp-x"
    uris = {glue.bundle_asset_uri(s, ns) for s in (STORE_A, STORE_B) for ns in ("production", "exp-x")}
    names = {glue.bundle_asset_name(s, ns) for s in (STORE_A, STORE_B) for ns in ("production", "exp-x")}
    assert len(uris) == len(names) == 4


def triggering_events(*events):
    """The run's ``triggering_asset_events`` as the task runner builds them (keyed by asset and alias)."""
    from airflow.sdk.execution_time.comms import AssetEventDagRunReferenceResult
    from airflow.sdk.execution_time.context import TriggeringAssetEventsAccessor

    refs = []
    for store, namespace, version, day in events:
        asset = glue.bundle_asset(store, namespace)
        refs.append(
            AssetEventDagRunReferenceResult(
                asset={"name": asset.name, "uri": asset.uri, "extra": {}},
                extra={"store_uri": store, "namespace": namespace, "version": version},
                source_task_id="publish",
                source_dag_id=glue.DAG_ID,
                source_run_id=f"manual__{version}",
                source_map_index=-1,
                source_aliases=[{"name": glue.BUNDLE_ALIAS}],
                timestamp=datetime(2026, 10, day, tzinfo=UTC),
            )
        )
    return TriggeringAssetEventsAccessor.build(refs)


def test_serving_event_is_the_latest_of_the_stores_production_bundle():
    events = triggering_events(
        (STORE_A, "production", "a-old", 1),
        (STORE_A, "production", "a-new", 2),
        (STORE_B, "production", "b-newest", 4),
        (STORE_A, "exp-x", "exp-newest", 5),
    )
    assert glue.serving_bundle_event(events, STORE_A)["version"] == "a-new"
    assert glue.serving_bundle_event(events, STORE_B)["version"] == "b-newest"
    assert glue.serving_bundle_event(events, STORE_A, "exp-x")["version"] == "exp-newest"
    with pytest.raises(ConfigError, match="not triggered by a bundle event"):
        glue.serving_bundle_event(triggering_events(), STORE_A)


def test_serving_refresh_of_store_a_skips_events_of_store_b(monkeypatch, caplog):
    from airflow.sdk.exceptions import AirflowSkipException

    refreshed = []
    monkeypatch.setattr(glue, "refresh_serving", lambda event: refreshed.append(event) or {"ok": True})
    monkeypatch.setattr(glue, "airflow_variable", lambda key: STORE_A if key == glue.STORE_VARIABLE else None)
    only_b = triggering_events((STORE_B, "production", "b1", 1), (STORE_A, "exp-x", "e1", 2))
    with caplog.at_level("INFO", logger=glue.__name__), pytest.raises(AirflowSkipException, match=STORE_A):
        glue.serving_refresh_task(only_b)
    assert refreshed == []
    ignored = [r.getMessage() for r in caplog.records if r.getMessage().startswith("ignoring asset event")]
    assert len(ignored) == 2 and STORE_B in ignored[0] and "exp-x" in ignored[1]
    assert glue.bundle_asset_uri(STORE_A) in ignored[0]

    assert glue.serving_refresh_task(triggering_events((STORE_A, "production", "a1", 3))) == {"ok": True}
    assert refreshed[0]["version"] == "a1" and refreshed[0]["store_uri"] == STORE_A


def test_store_list_variable_json_or_comma_separated():
    assert glue.parse_store_list(None) == [] and glue.parse_store_list("  ") == []
    assert glue.parse_store_list(f" {STORE_A} ,{STORE_B},, ") == [STORE_A, STORE_B]
    assert glue.parse_store_list(f'["{STORE_A}", " ", "{STORE_B}"]') == [STORE_A, STORE_B]
    with pytest.raises(ConfigError, match="not valid JSON"):
        glue.parse_store_list('["s3://a",')
    with pytest.raises(ConfigError, match="JSON list of store URIs"):
        glue.parse_store_list('[{"uri": "s3://a"}]')


# --- serving refresh -----------------------------------------------------------------------------


class _VersionServer:
    """GET /version gives the answers in turn, then repeats the last one."""

    def __init__(self, answers):
        answers = list(answers)

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                body = json.dumps(answers.pop(0) if len(answers) > 1 else answers[0]).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_refresh_serving_checks_the_bundle_and_waits_for_the_api(monkeypatch):
    calls = []
    monkeypatch.setattr("llmrec_tasks.publish.serving_check", lambda *a: calls.append(a) or {"ok": True})
    monkeypatch.setattr(glue, "airflow_variable", lambda key: None)
    server = _VersionServer([{"version": "v1", "current": None}, {"version": "v2", "current": "v2"}])
    try:
        monkeypatch.setenv(glue.SERVING_URL_ENV, server.url)
        event = {"store_uri": "file:///s", "namespace": "production", "version": "v2"}
        result = glue.refresh_serving(event, wait_s=5, poll_s=0.01)
    finally:
        server.close()
    assert calls == [("file:///s", "production", "v2")]
    assert result["check"] == {"ok": True} and result["serving"]["state"] == "serving"


def test_refresh_serving_without_api_only_checks(monkeypatch):
    monkeypatch.setattr("llmrec_tasks.publish.serving_check", lambda *a: {"ok": True})
    monkeypatch.setattr(glue, "airflow_variable", lambda key: None)
    monkeypatch.delenv(glue.SERVING_URL_ENV, raising=False)
    result = glue.refresh_serving({"store_uri": "file:///s", "namespace": "production", "version": "v"})
    assert result["serving"] is None
    with pytest.raises(ConfigError, match="version"):
        glue.refresh_serving({"store_uri": "file:///s", "namespace": "production"})


def test_wait_for_serving_times_out():
    server = _VersionServer([{"version": "old", "current": None}])
    try:
        with pytest.raises(TimeoutError, match="did not serve"):
            glue.wait_for_serving(server.url, "new", wait_s=0.05, poll_s=0.01)
    finally:
        server.close()


def test_run_config_defaults_match_dataclass():
    """Guard for the DAG params' defaults: RunConfig defaults are what the form shows."""
    assert build({}).encoder == RunConfig(data_uri=DATA, store_uri="file:///x").encoder


# --- the gate task ---------------------------------------------------------------------------------

FAILED_GATE = {
    "passed": False,
    "reason": "ranker ndcg@10 0.2000 is worse than the published ranker 0.3000 by more than the relative "
    "tolerance 2.0% (floor 0.2940)",
    "tolerance": 0.02,
    "ranker": {"ndcg@10": 0.2, "recall@10": 0.3},
    "popularity": {"ndcg@10": 0.1},
    "current_version": "20261001T000000Z-abcdef12-123456",
    "current": {"ndcg@10": 0.3, "recall@10": 0.35},
}


def test_gate_task_fails_a_bundle_that_failed_the_gate_with_how_to_promote_it():
    from llmrec_tasks.core.errors import QualityGateError

    cfg = build({})
    failed = published(promoted=False, reason=f"quality gate: {FAILED_GATE['reason']}", gate=FAILED_GATE)
    with pytest.raises(QualityGateError) as raised:
        glue.gate_task(cfg.to_dict(), failed.to_json())
    message = str(raised.value)
    assert FAILED_GATE["reason"] in message
    assert "new ranker:      ndcg@10 0.2000, recall@10 0.3000" in message
    assert "popularity:      ndcg@10 0.1000" in message
    assert (
        "current 20261001T000000Z-abcdef12-123456 (as the gate scored it on this run's evaluation data): "
        "ndcg@10 0.3000" in message
    )
    assert f"`llmrec promote --store {cfg.store_uri} --namespace production {failed.version}`" in message
    assert "gate_tolerance >= 0.334" in message  # 0.2 >= 0.3 * (1 - 0.334)
    assert "llmrec_tasks.core.errors.QualityGateError" in glue.NON_RETRYABLE_ERRORS  # fails at once


def test_gate_task_passes_a_promoted_bundle():
    passed_gate = {**FAILED_GATE, "passed": True, "reason": "ranker beats popularity"}
    result = glue.gate_task(build({}).to_dict(), published(gate=passed_gate).to_json())
    assert result == {"version": "20261002T000000Z-abcdef12-123456", "promoted": True, "reason": "ok"}


@pytest.mark.parametrize(
    "reason",
    [
        "promote=False: published without moving current",
        "v was rolled back by an operator; promote it explicitly with `llmrec promote`",
        "current w has a newer logical date (2026-10-03T00:00:00+00:00 > 2026-10-02T00:00:00+00:00)",
    ],
)
def test_gate_task_skips_a_bundle_not_promoted_on_purpose(reason):
    from airflow.sdk.exceptions import AirflowSkipException

    with pytest.raises(AirflowSkipException, match="gate not evaluated"):
        glue.gate_task(build({}).to_dict(), published(promoted=False, reason=reason).to_json())


def test_a_publish_record_written_before_the_gate_field_still_loads(tmp_path):
    """Reruns read publish records of older code (no ``gate`` key): they load with gate None."""
    record = published(promoted=False).to_json()
    del record["gate"]
    assert Published.from_json(record).gate is None


def test_batch_plan_scores_the_triggering_bundle_of_its_store_and_namespace(monkeypatch):
    """An event-triggered run pins the event's version (chosen like the serving refresh); a manual
    run the version param (None: current); a run only other stores triggered is skipped."""
    from airflow.sdk.exceptions import AirflowSkipException

    from llmrec_tasks.serving import batch

    planned = []

    def plan_scoring(store_uri, namespace, **kwargs):
        planned.append((store_uri, namespace, kwargs["version"], kwargs["k"], kwargs["users_per_shard"]))
        return SimpleNamespace(shards=[])

    monkeypatch.setattr(batch, "plan_scoring", plan_scoring)
    monkeypatch.setattr(glue, "airflow_variable", lambda key: STORE_A if key == glue.STORE_VARIABLE else None)
    params = {"namespace": "production", "version": None, "k": 7, "batch_users_per_shard": 9}
    events = triggering_events((STORE_A, "production", "a1", 1), (STORE_B, "production", "b2", 2))
    assert glue.batch_plan_task(params, events) == []
    assert glue.batch_plan_task({**params, "version": "pinned-v"}, triggering_events()) == []
    assert glue.batch_plan_task(params, None) == []
    assert planned == [
        (STORE_A, "production", "a1", 7, 9),
        (STORE_A, "production", "pinned-v", 7, 9),
        (STORE_A, "production", None, 7, 9),
    ]
    with pytest.raises(AirflowSkipException, match="this run scores production of " + STORE_A):
        glue.batch_plan_task(params, triggering_events((STORE_B, "production", "b3", 3)))


def test_online_metrics_task_measures_the_complete_days_before_the_logical_date(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(
        "llmrec_tasks.online.run_online_metrics",
        lambda *args, **kwargs: calls.append((args, kwargs)) or SimpleNamespace(to_json=lambda: {"ok": True}),
    )
    params = {"store_uri": tmp_path.as_uri(), "namespace": "exp", "days": 3, "k": 5, "window_hours": 12}
    assert glue.online_metrics_task(params, datetime(2026, 3, 10, tzinfo=UTC)) == {"ok": True}
    assert calls == [((tmp_path.as_uri(), "exp", "2026-03-07", "2026-03-09"), {"k": 5, "window_hours": 12.0})]
