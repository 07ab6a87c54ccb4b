"""DAG integrity: the DAG files import cleanly, fast, without heavy imports or side effects at
parse time, and the daily DAG has the shape, params and settings the issues ask for.

No metadata DB is needed: DagBag parsing and param validation are in memory.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from tests.airflow_env import DAGS, ROOT, airflow_env, use_test_airflow_home

use_test_airflow_home()

DAG_FILES = sorted(DAGS.glob("*.py"))
PROBE = Path(__file__).with_name("parse_probe.py")
PARSE_BUDGET_S = 2.0
SECTIONS = {
    "Data source",
    "Encoder model",
    "Index",
    "Ranker hyper-parameters",
    "Sequential baseline (SASRec)",
    "Text-aware sequence model",
    "Namespace",
    "Quality gate",
    "Advanced: data validation thresholds",
}
# Modules a DAG file may import at its top level (everything else goes inside the tasks).
TOP_LEVEL_IMPORTS = {
    "__future__",
    "datetime",
    "airflow.sdk",
    "llmrec_tasks.airflow_glue",
    "llmrec_tasks.alerts",
    "llmrec_tasks.core.settings",
}


@pytest.fixture(scope="module")
def bag():
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(DAGS))


@pytest.fixture(scope="module")
def daily(bag):
    return bag.dags["llmrec_daily"]


@pytest.fixture(scope="module")
def scheduler_daily(daily):
    """The DAG as the api-server and scheduler see it (serialized): they validate run confs."""
    from airflow.serialization.serialized_objects import DagSerialization

    return DagSerialization.deserialize_dag(DagSerialization.serialize_dag(daily))


BAD_DAG = """
import time
from datetime import datetime
import numpy
from airflow.sdk import Variable, dag, task
try:
    Variable.get("llmrec_store_uri")
except RuntimeError:
    pass
time.sleep(0.3)

@dag(schedule=None, start_date=datetime(2026, 1, 1))
def bad():
    @task
    def t():
        pass
    t()

bad()
"""


@pytest.fixture(scope="module")
def probe(tmp_path_factory) -> tuple[dict, str]:
    """Parse every DAG file, plus a deliberately bad one, in one fresh process."""
    tmp = tmp_path_factory.mktemp("probe")
    bad = tmp / "bad_dag.py"
    bad.write_text(BAD_DAG)
    out = subprocess.run(
        [sys.executable, str(PROBE), *map(str, DAG_FILES), str(bad)],
        env=airflow_env(tmp / "airflow-home"),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1]), str(bad)


def test_no_import_errors(bag):
    assert bag.import_errors == {}
    assert {"llmrec_daily", "llmrec_serving_refresh", "llmrec_batch_score"} <= set(bag.dag_ids)


def test_each_dag_file_parses_fast_and_without_side_effects(probe):
    report, _ = probe
    for path in map(str, DAG_FILES):
        result = report[path]
        assert result["import_errors"] == {}, path
        assert result["dag_ids"], f"{path} defines no DAG"
        assert result["seconds"] < PARSE_BUDGET_S, f"{path} took {result['seconds']:.2f}s to parse"
        assert result["heavy_modules"] == [], f"{path} imports {result['heavy_modules'][:5]} at parse time"
        assert result["side_effects"] == [], f"{path} did {result['side_effects']} at parse time"


def test_probe_catches_parse_time_side_effects(probe):
    """The probe really detects a Variable read, a heavy import and measures the parse."""
    report, bad = probe
    result = report[bad]
    assert result["side_effects"] == ["Variable.get"]
    assert "numpy" in result["heavy_modules"]
    assert result["seconds"] >= 0.3


@pytest.mark.parametrize("path", DAG_FILES, ids=lambda p: p.name)
def test_dag_files_are_wiring_only(path):
    """Top level imports only Airflow's SDK and our light glue; each task imports inside its body."""
    tree = ast.parse(path.read_text())
    for node in tree.body:
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
        else:
            continue
        assert set(names) <= TOP_LEVEL_IMPORTS, f"{path.name}: top-level import of {names}"
    tasks = [
        fn
        for fn in ast.walk(tree)
        if isinstance(fn, ast.FunctionDef)
        and any("task" in ast.unparse(d) for d in fn.decorator_list)
        and not any("dag(" in ast.unparse(d) for d in fn.decorator_list)
    ]
    assert tasks
    for fn in tasks:
        body_imports = [n for n in ast.walk(fn) if isinstance(n, ast.ImportFrom)]
        assert any((n.module or "").startswith("llmrec_tasks") for n in body_imports), fn.name


def test_daily_schedule_and_settings(daily):
    assert daily.catchup is False
    assert "0 0 * * *" in str(daily.timetable) or daily.timetable.summary == "@daily"
    assert daily.max_active_runs == 1
    assert daily.doc_md and daily.doc_md.lstrip().startswith("###")
    assert "llmrec" in daily.tags
    for t in daily.tasks:
        assert t.retries >= 1, t.task_id
        assert t.retry_policy is not None, t.task_id
        assert t.execution_timeout is not None, t.task_id


def test_daily_task_graph(daily):
    ids = set(daily.task_ids)
    assert ids == {
        "config",
        "validate",
        "plan_shards",
        "embed_shard",
        "merge_shards",
        "index",
        "train",
        "publish",
        "gate",
    }

    def upstream(task_id: str) -> set[str]:
        return set(daily.get_task(task_id).upstream_task_ids)

    assert upstream("config") == set()
    assert upstream("validate") == {"config"}
    assert upstream("plan_shards") == {"config", "validate"}
    assert upstream("embed_shard") == {"config", "validate", "plan_shards"}
    assert upstream("merge_shards") == {"config", "validate", "embed_shard"}
    assert upstream("index") == {"config", "validate", "merge_shards"}
    assert upstream("train") == {"config", "validate", "merge_shards"}
    assert upstream("publish") == {"config", "validate", "merge_shards", "index", "train"}
    assert upstream("gate") == {"config", "publish"}  # after publish: a failed gate fails the run
    assert daily.get_task("gate").downstream_task_ids == set()
    assert type(daily.get_task("embed_shard")).__name__.endswith("MappedOperator")
    # Results are single small dicts, never split into one XCom per key.
    for t in daily.tasks:
        assert getattr(t, "multiple_outputs", False) is False, t.task_id


def test_every_task_alerts_on_failure(daily):
    from llmrec_tasks.alerts import on_failure_callback

    for t in daily.tasks:
        callbacks = t.on_failure_callback
        assert on_failure_callback in (callbacks if isinstance(callbacks, list) else [callbacks]), t.task_id


def test_the_run_has_a_deadline_from_queued_with_the_alert_callback(daily):
    from airflow.sdk.definitions.deadline import DeadlineReference

    from llmrec_tasks.alerts import DEFAULT_DEADLINE_HOURS, on_deadline_missed

    (deadline,) = daily.deadline
    assert deadline.reference == DeadlineReference.DAGRUN_QUEUED_AT
    assert deadline.interval.total_seconds() == DEFAULT_DEADLINE_HOURS * 3600
    assert deadline.callback.path == f"{on_deadline_missed.__module__}.{on_deadline_missed.__qualname__}"


@pytest.mark.parametrize(("hours", "expected"), [("0", None), ("1.5", 5400.0)])
def test_the_deadline_follows_the_environment(monkeypatch, hours, expected):
    from airflow.dag_processing.dagbag import DagBag

    from llmrec_tasks.alerts import DEADLINE_ENV

    monkeypatch.setenv(DEADLINE_ENV, hours)
    dag = DagBag(dag_folder=str(DAGS / "llmrec_daily.py")).dags["llmrec_daily"]
    assert [d.interval.total_seconds() for d in dag.deadline or []] == (
        [] if expected is None else [expected]
    )


def test_publish_emits_through_the_bundle_alias_only(daily, bag):
    from llmrec_tasks.airflow_glue import BUNDLE_ALIAS

    outlets = {t.task_id: t.outlets for t in daily.tasks if t.outlets}
    assert list(outlets) == ["publish"]
    (alias,) = outlets["publish"]
    assert type(alias).__name__ == "AssetAlias" and alias.name == BUNDLE_ALIAS


def test_serving_refresh_is_scheduled_on_the_bundle_alias(bag):
    """Not on a fixed asset: which store's production bundle it serves is resolved at run time
    (the default store may come from a Variable, which parsing cannot read)."""
    from llmrec_tasks.airflow_glue import BUNDLE_ALIAS

    serving = bag.dags["llmrec_serving_refresh"]
    (condition,) = serving.timetable.asset_condition.objects
    assert type(condition).__name__ == "AssetAlias" and condition.name == BUNDLE_ALIAS
    assert [t.task_id for t in serving.tasks] == ["refresh"]


def test_online_metrics_dag_is_one_daily_task_with_typed_params(bag):
    online = bag.dags["llmrec_online_metrics"]
    assert [t.task_id for t in online.tasks] == ["online_metrics"]
    assert "0 0 * * *" in str(online.timetable) and not online.catchup
    assert {"store_uri", "namespace", "days", "k", "window_hours"} == set(online.params)
    assert all(online.params.get_param(key).schema.get("type") for key in online.params)
    assert online.tasks[0].on_failure_callback


def test_daily_dag_serializes(bag):
    """What the dag-processor stores (retry policy, params schema, mapped task) round-trips."""
    from airflow.serialization.serialized_objects import DagSerialization

    for dag_id in ("llmrec_daily", "llmrec_serving_refresh", "llmrec_batch_score", "llmrec_online_metrics"):
        data = DagSerialization.serialize_dag(bag.dags[dag_id])
        restored = DagSerialization.deserialize_dag(data)
        assert set(restored.task_ids) == set(bag.dags[dag_id].task_ids)


# --- params --------------------------------------------------------------------------------------


def test_params_are_typed_titled_documented_and_grouped(daily):
    for name, param in daily.params.items():
        param = daily.params.get_param(name)
        schema = param.schema
        assert schema.get("type"), f"{name} has no type"
        assert schema.get("title"), f"{name} has no title"
        assert param.description or schema.get("description_md"), f"{name} has no description"
        assert schema.get("section") in SECTIONS, f"{name} is in no known section"
    assert {daily.params.get_param(n).schema["section"] for n in daily.params} == SECTIONS


def test_params_cover_the_run_config(daily):
    """Every setting of RunConfig is a param (flat keys), and the defaults build a valid config."""
    from llmrec_tasks.core.config import (
        EncoderConfig,
        IndexConfig,
        RankerConfig,
        RunConfig,
        SasrecConfig,
        SeqConfig,
    )

    expected = {
        "data_uri",
        "store_uri",
        "namespace",
        "gate_tolerance",
        "promote",
        "feedback_ingest",
        "validation",
    }
    sections = (("encoder", EncoderConfig), ("index", IndexConfig), ("ranker", RankerConfig))
    for prefix, section in (*sections, ("sasrec", SasrecConfig), ("seq", SeqConfig)):
        expected |= {f"{prefix}_{f.name}" for f in fields(section)}
    assert set(daily.params) == expected

    values = daily.params.validate()
    assert values["data_uri"] is None  # no default data: resolved at run time, else refused
    data = "s3://acme/llmrec-input"
    cfg = RunConfig.from_dict({**values, "store_uri": "file:///tmp/llmrec", "data_uri": data})
    assert cfg == RunConfig(data_uri=data, store_uri="file:///tmp/llmrec")


def test_params_are_the_settings_table(scheduler_daily):
    """The DAG's params are built from llmrec_tasks/core/settings.py alone (no hand-written copy)."""
    from airflow.sdk import Param

    from llmrec_tasks.core.settings import form_params

    params = scheduler_daily.params
    expected = {key: Param(**kwargs) for key, kwargs in form_params().items()}
    assert list(params) == list(expected)
    for key, param in expected.items():
        assert params.get_param(key).schema == param.schema, key
        assert params.get_param(key).description == param.description, key
        assert params.get_param(key).value == param.value, key


@pytest.mark.parametrize(
    "conf",
    [
        {"namespace": "../prod"},
        {"namespace": "a..b"},
        {"namespace": ""},
        {"encoder_backend": "tensorflow"},
        {"encoder_max_length": 4},
        {"encoder_shards": 0},
        {"index_kind": "annoy"},
        {"index_recall_floor": 0},
        {"ranker_num_candidates": 5},
        {"ranker_learning_rate": "fast"},
        {"gate_tolerance": 1.5},
        {"store_uri": "ftp://host/x"},
        {"data_uri": 7},
        {"promote": "maybe"},
        {"validation": {"ids_mostly": 2}},
        {"validation": {"no_such_threshold": 1}},
        {"validation": {"min_year": 1990.5}},
        {"ranker_max_users_per_window": 0},
        {"namespace": "prod\n"},
    ],
    ids=lambda c: json.dumps(c),
)
def test_invalid_params_are_refused_before_any_task_runs(scheduler_daily, conf):
    """The check the trigger form, the REST API and `backfill create` run on the run conf."""
    from airflow.sdk.exceptions import ParamValidationError

    key = next(iter(conf))
    with pytest.raises(ParamValidationError, match=f"Invalid input for param {key}"):
        scheduler_daily.params.deep_merge(conf).validate()


def test_valid_experiment_conf_is_accepted(scheduler_daily):
    conf = {
        "namespace": "exp-small-lr",
        "ranker_learning_rate": 0.02,
        "encoder_shards": 4,
        "index_kind": "hnsw",
        "store_uri": "s3://bucket/llmrec",
        "validation": {"duplicates_mostly": 0.95, "data_docs": False},
    }
    values = scheduler_daily.params.deep_merge(conf).validate()
    assert values["namespace"] == "exp-small-lr" and values["encoder_shards"] == 4


@pytest.mark.parametrize("kind", ["auto", "flat", "hnsw", "ivf", "ivfsq8", "ivfpq"])
def test_every_index_kind_of_the_config_is_selectable(scheduler_daily, kind):
    """The form's enum once lacked ivfsq8, which the config and the index stage support."""
    values = scheduler_daily.params.deep_merge({"index_kind": kind}).validate()
    assert values["index_kind"] == kind


def test_the_form_takes_one_user_per_window_like_the_config(scheduler_daily):
    """The form's minimum was 100 while the config allowed 1."""
    values = scheduler_daily.params.deep_merge({"ranker_max_users_per_window": 1}).validate()
    assert values["ranker_max_users_per_window"] == 1


# --- batch scoring -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def batch_dag(bag):
    return bag.dags["llmrec_batch_score"]


def test_batch_dag_is_plan_mapped_shards_finalize(batch_dag):
    assert batch_dag.task_dict["plan"].downstream_task_ids == {"score_shard"}
    assert batch_dag.task_dict["score_shard"].downstream_task_ids == {"finalize"}
    assert type(batch_dag.task_dict["score_shard"]).__name__.endswith("MappedOperator")
    assert batch_dag.doc_md and batch_dag.doc_md.lstrip().startswith("###")
    assert batch_dag.is_paused_upon_creation is True and batch_dag.catchup is False
    for t in batch_dag.tasks:
        assert t.retries >= 1 and t.retry_policy is not None and t.execution_timeout is not None, t.task_id


def test_batch_dag_runs_on_promoted_bundles(batch_dag):
    from llmrec_tasks.airflow_glue import BUNDLE_ALIAS

    (condition,) = batch_dag.timetable.asset_condition.objects
    assert type(condition).__name__ == "AssetAlias" and condition.name == BUNDLE_ALIAS


@pytest.fixture(scope="module")
def scheduler_batch(batch_dag):
    from airflow.serialization.serialized_objects import DagSerialization

    return DagSerialization.deserialize_dag(DagSerialization.serialize_dag(batch_dag))


def test_batch_params_are_the_batch_settings(scheduler_batch):
    from llmrec_tasks.core.settings import BATCH_TABLE

    assert list(scheduler_batch.params) == [s.key for s in BATCH_TABLE]
    values = scheduler_batch.params.deep_merge({}).validate()
    assert values["k"] == 100 and values["version"] is None and values["namespace"] == "production"
    chosen = scheduler_batch.params.deep_merge(
        {"version": "20261101T000000Z-abc", "users_uri": "s3://b/u.txt"}
    )
    assert chosen.validate()["users_uri"] == "s3://b/u.txt"


@pytest.mark.parametrize(
    "conf",
    [
        {"k": 0},
        {"namespace": "../x"},
        {"batch_users_per_shard": 0},
        {"version": "a/b"},
        {"store_uri": "ftp://x"},
    ],
    ids=lambda c: json.dumps(c),
)
def test_invalid_batch_params_are_refused(scheduler_batch, conf):
    from airflow.sdk.exceptions import ParamValidationError

    key = next(iter(conf))
    with pytest.raises(ParamValidationError, match=f"Invalid input for param {key}"):
        scheduler_batch.params.deep_merge(conf).validate()
