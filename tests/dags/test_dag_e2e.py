"""``dag.test()`` runs of ``llmrec_daily`` in a child process with its own AIRFLOW_HOME and SQLite
metadata DB (``tests/dags/run_dag_test.py``).

- wiring: the stage functions replaced by instant fakes; checks the mapping, XComs, the cutoff,
  the asset events (only for promoted bundles) and the gate task (skipped for ``promote=false``,
  failing the run when the bundle fails the quality gate);
- end to end: every stage for real on the generated sample into a temporary store, the published
  bundle checked file by file against its manifest, the asset event, the UI plugin's view of the
  run; then the same logical date again: same version, nothing published is rewritten.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from llmrec_tasks.airflow_glue import store_key
from tests.airflow_env import AIRFLOW_DB, ROOT, airflow_env, use_test_airflow_home

use_test_airflow_home()

RUNNER = Path(__file__).with_name("run_dag_test.py")
LOGICAL_DATE = "2026-11-01T00:00:00+00:00"  # after the sample's last interaction
VERSION_PREFIX = "20261101T000000Z-"

pytestmark = pytest.mark.slow

# The sequence model's best epoch on the sample is the 2nd: without a cap, patience trains 6 more
# (~75% of a DAG run's time). Capped there, the run keeps the same best epoch (same validation
# NDCG@10, weights equal to float32 noise) in 2 epochs.
SHORT_SEQ = {"seq_max_epochs": 2}


_MIGRATED: list[Path] = []  # this process's migrated metadata DB, once made


def migrated_db() -> Path:
    """An empty metadata DB after ``airflow db migrate``, made once per test process: each run's
    home gets a copy, so a DAG test pays one migration (seconds of CPU), not one per run."""
    if not _MIGRATED:
        home = Path(tempfile.mkdtemp(prefix="llmrec-airflow-db-"))
        atexit.register(shutil.rmtree, home, ignore_errors=True)
        migrate = subprocess.run(
            [str(Path(sys.executable).with_name("airflow")), "db", "migrate"],
            env=airflow_env(home),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert migrate.returncode == 0, migrate.stderr[-3000:]
        _MIGRATED.append(home / AIRFLOW_DB)
    return _MIGRATED[0]


def run_dag(tmp_path: Path, spec: dict, timeout: int, env_extra: dict[str, str] | None = None) -> list[dict]:
    home = tmp_path / "airflow-home"
    home.mkdir(exist_ok=True)
    env = airflow_env(home, **(env_extra or {}))
    shutil.copyfile(migrated_db(), home / AIRFLOW_DB)
    out = subprocess.run(
        [sys.executable, str(RUNNER), json.dumps(spec)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    (tmp_path / "dag-test.log").write_text(out.stdout + out.stderr)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    assert out.returncode == 0 and lines, (
        f"dag.test failed (log: {tmp_path / 'dag-test.log'}):\n" + (out.stdout + out.stderr)[-5000:]
    )
    return json.loads(lines[-1][len("RESULT ") :])


def assert_all_success(run: dict, expected_tasks: set[str], skipped: frozenset[str] = frozenset()) -> None:
    """The run succeeded, every task ran and succeeded but the ``skipped`` ones, which skipped."""
    assert run["state"] == "success", run["tasks"]
    assert {key.split("[")[0] for key in run["tasks"]} == expected_tasks
    others = {
        k: v for k, v in run["tasks"].items() if v != ("skipped" if k.split("[")[0] in skipped else "success")
    }
    assert not others, others


TASKS = {
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


def test_wiring_with_stub_stages(tmp_path):
    """Fast check of the DAG's plumbing, independent of the ML stages."""
    store = (tmp_path / "store").as_uri()
    conf = {"data_uri": "sample", "store_uri": store, "namespace": "wiring", "encoder_shards": 3}
    runs = run_dag(
        tmp_path,
        {
            "logical_date": LOGICAL_DATE,
            "stub_stages": True,
            "confs": [conf, {**conf, "promote": False}],
        },
        timeout=300,
    )
    promoted, not_promoted = runs
    assert_all_success(promoted, TASKS)
    assert_all_success(not_promoted, TASKS, skipped=frozenset({"gate"}))  # promote=false: not a failure
    assert promoted["xcom"]["gate[-1]"]["promoted"] is True
    assert sum(key.startswith("embed_shard[") for key in promoted["tasks"]) == 3
    xcom = promoted["xcom"]
    assert xcom["config[-1]"]["cutoff"] == LOGICAL_DATE  # the run's data interval end, not "now"
    assert xcom["config[-1]"]["store_uri"] == store and xcom["config[-1]"]["namespace"] == "wiring"
    assert xcom["merge_shards[-1]"]["shards"] == 3  # the stub merge counts the distinct shards it got
    version = xcom["publish[-1]"]["version"]
    assert version.startswith(VERSION_PREFIX)
    assert not_promoted["xcom"]["publish[-1]"]["version"] == version  # same date + params, same id

    (event,) = promoted["events"]
    key = store_key(store)  # the run's store is part of the asset: another store's run is another asset
    assert event["uri"] == f"llmrec://bundles/{key}/wiring" and event["name"] == f"llmrec_bundle_{key}_wiring"
    assert event["extra"]["store_uri"] == store
    assert event["extra"]["version"] == version and event["extra"]["promoted"] is True
    assert event["extra"]["metrics"] == {"ranker": {"ndcg@10": 0.3}, "popularity": {"ndcg@10": 0.1}}
    assert not_promoted["events"] == []  # not promoted: no event

    # The publish result is recorded next to the run for the UI plugin and the CLI.
    record = tmp_path / "store" / "wiring" / "runs" / version / "stages" / "publish.json"
    assert json.loads(record.read_text())["promoted"] is False  # the latest run's result


def test_a_failed_quality_gate_fails_the_run_at_the_gate_task(tmp_path):
    """A ranker below popularity: the bundle is published but not promoted, and the run is red."""
    store = (tmp_path / "store").as_uri()
    conf = {"data_uri": "sample", "store_uri": store, "namespace": "wiring-gate"}
    (run,) = run_dag(
        tmp_path,
        {
            "logical_date": LOGICAL_DATE,
            "stub_stages": True,
            "stub_metrics": {"ranker": {"ndcg@10": 0.05}, "popularity": {"ndcg@10": 0.1}},
            "conf": conf,
        },
        timeout=300,
    )
    assert run["state"] == "failed", run["tasks"]
    assert run["tasks"]["gate[-1]"] == "failed"
    assert {k: v for k, v in run["tasks"].items() if k != "gate[-1]"} == {
        k: "success" for k in run["tasks"] if k != "gate[-1]"
    }
    published = run["xcom"]["publish[-1]"]
    assert published["promoted"] is False and published["gate"]["passed"] is False
    assert "gate[-1]" not in run["xcom"]
    assert run["events"] == []  # nothing promoted: no asset event

    log = (tmp_path / "dag-test.log").read_text()
    assert "QualityGateError" in log and f"bundle {published['version']}" in log
    assert "ranker ndcg@10 0.0500 does not beat popularity 0.1000" in log
    assert f"`llmrec promote --store {store} --namespace wiring-gate {published['version']}`" in log
    # The failure alert: one LLMREC_ALERT line naming the gate task and the error, tried once.
    # (Airflow's log formatter appends the logger name after the JSON.)
    decode = json.JSONDecoder().raw_decode
    (alert,) = [
        decode(line.split("LLMREC_ALERT ", 1)[1])[0] for line in log.splitlines() if "LLMREC_ALERT {" in line
    ]
    assert alert["task_id"] == "gate" and alert["exception_type"] == "QualityGateError"
    assert alert["dag_id"] == "llmrec_daily" and alert["run_id"] == run["run_id"] and alert["try_number"] == 1


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def store_path(uri: str) -> Path:
    assert uri.startswith("file://"), uri
    return Path(uri[len("file://") :])


def test_daily_dag_end_to_end_on_the_sample(tmp_path):
    store_root = tmp_path / "store"
    conf = {
        "data_uri": "sample",
        "store_uri": store_root.as_uri(),
        "namespace": "e2e",
        "encoder_shards": 2,
        # Real training, kept short: the sample's ranker beats popularity by far either way.
        "ranker_n_estimators": 120,
        "ranker_train_windows": 2,
        **SHORT_SEQ,
    }
    first, rerun = run_dag(tmp_path, {"logical_date": LOGICAL_DATE, "conf": conf, "runs": 2}, timeout=1500)

    # --- first run: every stage ran and published a complete bundle ------------------------------
    assert_all_success(first, TASKS)
    assert sum(key.startswith("embed_shard[") for key in first["tasks"]) == 2
    xcom = first["xcom"]
    assert xcom["config[-1]"]["cutoff"] == LOGICAL_DATE
    published = xcom["publish[-1]"]
    version = published["version"]
    assert version.startswith(VERSION_PREFIX) and xcom["validate[-1]"]["version"] == version
    assert published["namespace"] == "e2e" and published["promoted"] is True, published["reason"]
    # Only URIs and small dicts travel through XCom.
    assert max(first["xcom_bytes"].values()) < 64_000, first["xcom_bytes"]

    manifest_path = store_path(published["manifest_uri"])
    manifest = json.loads(manifest_path.read_text())
    assert manifest["version"] == version and manifest["namespace"] == "e2e"
    bundle_dir = manifest_path.parent
    on_disk = {p.relative_to(bundle_dir).as_posix() for p in bundle_dir.rglob("*") if p.is_file()}
    assert on_disk - {"manifest.json"} == set(manifest["files"])  # nothing unlisted, nothing missing
    for name, entry in manifest["files"].items():
        path = bundle_dir / name
        assert path.stat().st_size == entry["size"], name
        assert sha256(path) == entry["sha256"], name
    for required in ("embeddings.npy", "index.faiss", "ranker.txt", "metrics.json", "report.html"):
        assert required in manifest["files"]
    lineage = manifest["lineage"]
    assert lineage["dag_id"] == "llmrec_daily" and lineage["run_id"] == first["run_id"]
    assert lineage["logical_date"].startswith("2026-11-01T00:00:00")
    current = json.loads((store_root / "e2e" / "current.json").read_text())
    assert current["version"] == version

    # The promoted bundle is an asset event with its version, URIs and metrics.
    (event,) = first["events"]
    assert event["uri"] == f"llmrec://bundles/{store_key(store_root.as_uri())}/e2e"
    extra = event["extra"]
    assert extra["version"] == version and extra["manifest_uri"] == published["manifest_uri"]
    assert extra["metrics"]["ranker"]["ndcg@10"] == pytest.approx(manifest["metrics"]["ranker"]["ndcg@10"])

    # The UI plugin shows it (after the rerun too): current, gate passed with the reason of the run
    # that promoted it, with its report.
    import importlib.util

    from llmrec_tasks.storage.store import open_store

    spec = importlib.util.spec_from_file_location("llmrec_plugin_e2e", ROOT / "plugins" / "llmrec_plugin.py")
    plugin = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plugin)
    rows = plugin.version_rows(open_store(store_root.as_uri()), "e2e")["versions"]
    (row,) = rows
    assert row["version"] == version and row["status"] == "current"
    assert row["gate"]["status"] == "passed" and row["has_report"]
    assert "beats popularity" in row["gate"]["reason"], row["gate"]

    # --- the same logical date again: same version, nothing published is rewritten ---------------
    assert_all_success(rerun, TASKS)
    again = rerun["xcom"]["publish[-1]"]
    assert again["version"] == version
    assert again["status"] == "already published"
    assert json.loads(manifest_path.read_text()) == manifest
    for name, entry in manifest["files"].items():
        assert sha256(bundle_dir / name) == entry["sha256"], name
    assert sorted(p.name for p in (store_root / "e2e" / "bundles").iterdir()) == [version]
