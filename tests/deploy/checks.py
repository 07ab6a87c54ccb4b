"""Assertions shared by the deployment tests: runs, task instances, XComs and published bundles."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from tests.deploy.airflow_proc import AirflowDeployment

DAG_ID = "llmrec_daily"
STAGES = (
    "config",
    "validate",
    "plan_shards",
    "embed_shard",
    "merge_shards",
    "index",
    "train",
    "publish",
    "gate",
)
# Lighter ranker settings for every run the tests make (plain DAG params, as a user would pass):
# the default 500 rounds with early stopping after 50 take minutes of LightGBM on two shared cores.
FAST = {"ranker_n_estimators": 60, "ranker_early_stopping_rounds": 10}
PRODUCTION_DATE = "2026-11-01T00:00:00Z"  # after the sample's last interaction


def production_conf(store_uri: str, data: Path, shards: int = 2) -> dict:
    """The conf of the tests' production runs (LocalExecutor and Celery: same params but the
    shard count, which is not a result parameter, so the same version id). ``data`` is the
    ``sample_folder`` fixture: configured data (data ``sample`` is refused in production)."""
    return {
        "data_uri": str(data),
        "store_uri": store_uri,
        "namespace": "production",
        "encoder_shards": shards,
        **FAST,
    }


# The files every bundle must have (llmrec_tasks.storage.registry.REQUIRED_FILES, by name).
BUNDLE_FILES = ("embeddings.npy", "item_ids.json", "manifest.json")


def store_root(store_uri: str) -> Path:
    parsed = urlparse(store_uri)
    assert parsed.scheme == "file", f"the deployment tests use a file:// store, got {store_uri}"
    return Path(unquote(parsed.path))


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def current_pointer(store_uri: str, namespace: str) -> dict | None:
    path = store_root(store_uri) / namespace / "current.json"
    return read_json(path) if path.is_file() else None


def current_bytes(store_uri: str, namespace: str) -> bytes | None:
    path = store_root(store_uri) / namespace / "current.json"
    return path.read_bytes() if path.is_file() else None


def bundle_versions(store_uri: str, namespace: str) -> list[str]:
    """Published versions (a bundle counts once its manifest, written last, exists)."""
    folder = store_root(store_uri) / namespace / "bundles"
    return sorted(p.parent.name for p in folder.glob("*/manifest.json"))


def verify_bundle(store_uri: str, namespace: str, version: str) -> dict:
    """Manifest present; every listed file present with its size and sha256; metrics recorded."""
    folder = store_root(store_uri) / namespace / "bundles" / version
    manifest_path = folder / "manifest.json"
    assert manifest_path.is_file(), f"no manifest at {manifest_path}; bundle has {sorted(os.listdir(folder))}"
    manifest = read_json(manifest_path)
    assert manifest["version"] == version and manifest["namespace"] == namespace, manifest
    files = manifest["files"]
    for name in BUNDLE_FILES[:-1]:
        assert name in files, f"bundle {version} lacks {name}: {sorted(files)}"
    for name, meta in files.items():
        data = (folder / name).read_bytes()
        assert len(data) == meta["size"], f"{name}: size {len(data)} != manifest {meta['size']}"
        assert hashlib.sha256(data).hexdigest() == meta["sha256"], f"{name}: sha256 differs from the manifest"
    assert manifest.get("metrics"), f"bundle {version} has no metrics"
    return manifest


def run_and_wait(
    dep: AirflowDeployment, conf: dict, logical_date: str | None, timeout: float = 420
) -> tuple[dict, list[dict]]:
    """Trigger through the REST API, wait, assert success; returns (run, task instances)."""
    run = dep.trigger(DAG_ID, conf=conf, logical_date=logical_date)
    assert run["state"] in ("queued", "running"), run
    assert run["conf"] == conf, f"the run's conf is not what we sent: {run['conf']}"
    final = dep.wait_for_run(DAG_ID, run["dag_run_id"], timeout=timeout)
    assert final["state"] == "success", (
        f"run {run['dag_run_id']} ended {final['state']}:\n{dep.describe_run(DAG_ID, run['dag_run_id'])}"
    )
    return final, dep.task_instances(DAG_ID, run["dag_run_id"])


def xcom(dep: AirflowDeployment, run_id: str, task_id: str, map_index: int = -1) -> Any:
    entry = dep.api(
        "GET",
        f"dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/{task_id}/xcomEntries/return_value",
        params={"map_index": map_index},
    )
    value = entry["value"]
    if isinstance(value, str):
        with contextlib.suppress(ValueError):  # a plain string result
            value = json.loads(value)
    return value


def parse_time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def overlapping(tis: list[dict]) -> list[tuple[str, str]]:
    """Pairs of task instances (by map index) whose [start, end] intervals overlap."""
    spans = sorted((parse_time(t["start_date"]), parse_time(t["end_date"]), t["map_index"]) for t in tis)
    pairs = []
    for i, (s1, e1, m1) in enumerate(spans):
        for s2, e2, m2 in spans[i + 1 :]:
            if s2 < e1 and s1 < e2:
                pairs.append((m1, m2))
    return pairs
