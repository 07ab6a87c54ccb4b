"""``llmrec_daily`` on a real Airflow 3.3 deployment with the LocalExecutor.

PostgreSQL metadata DB, ``api-server``, ``scheduler`` and ``dag-processor`` as separate processes
(``conftest.py`` / ``airflow_proc.py``). The run is triggered with a conf through
``POST /api/v2/dags/llmrec_daily/dagRuns``, the endpoint the UI's trigger form calls, and the
published bundle is checked in the store: manifest, checksums, metrics, ``current.json``, and the
UI plugin's JSON API (served by the same api-server) lists it.

Run: ``.venv/bin/python -m pytest -m integration tests/deploy -k local``.
"""

from __future__ import annotations

import json

import numpy as np
import requests

from tests.deploy.checks import (
    DAG_ID,
    PRODUCTION_DATE,
    STAGES,
    current_pointer,
    production_conf,
    run_and_wait,
    store_root,
    verify_bundle,
    xcom,
)

SHARDS = 2


def test_trigger_with_conf_publishes_bundle(local_airflow, results, sample_folder):
    dep = local_airflow
    conf = production_conf(dep.store_uri, sample_folder, shards=SHARDS)
    run, tis = run_and_wait(dep, conf, logical_date=PRODUCTION_DATE)
    run_id = run["dag_run_id"]

    # Every stage ran once, the embedding stage once per shard (dynamic task mapping).
    by_task: dict[str, list[dict]] = {}
    for ti in tis:
        by_task.setdefault(ti["task_id"], []).append(ti)
    assert set(STAGES) <= set(by_task), f"missing tasks: {set(STAGES) - set(by_task)}"
    assert all(ti["state"] == "success" for ti in tis), [(t["task_id"], t["state"]) for t in tis]
    assert sorted(ti["map_index"] for ti in by_task["embed_shard"]) == list(range(SHARDS))

    # The publish task's result names the bundle; the store holds it, complete and checksummed.
    published = xcom(dep, run_id, "publish")
    version, namespace = published["version"], published.get("namespace", "production")
    assert namespace == "production"
    manifest = verify_bundle(dep.store_uri, "production", version)
    assert manifest["lineage"]["run_id"] == run_id, manifest["lineage"]
    assert published["promoted"] is True, f"first production bundle not promoted: {published.get('reason')}"
    pointer = current_pointer(dep.store_uri, "production")
    assert pointer and pointer["version"] == version, pointer
    assert set(manifest["metrics"]) >= {"ranker"}, sorted(manifest["metrics"])

    # The merged embeddings line up with the item ids (kept to compare with the Celery run's).
    folder = store_root(dep.store_uri) / "production" / "bundles" / version
    ids = (folder / "item_ids.json").read_text()
    emb = np.load(folder / "embeddings.npy")
    assert emb.shape[0] == len(json.loads(ids)) > 0
    results["local"] = {
        "version": version,
        "item_ids": ids,
        "embeddings": emb,
        "run_id": run_id,
        "manifest": manifest,
    }

    # The UI plugin (mounted by the api-server at /llmrec) lists the version as current.
    r = requests.get(
        f"{dep.base_url}/llmrec/api/versions",
        params={"namespace": "production"},
        headers={"Authorization": f"Bearer {dep.token()}"},
        timeout=60,
    )
    assert r.status_code == 200, r.text[:500]
    listed = {row["version"]: row for row in r.json()["versions"]}
    assert version in listed, f"plugin does not list {version}: {sorted(listed)}"


def test_dag_is_served_with_its_params(local_airflow):
    """The DAG the UI shows: parsed from the repo's dags folder, its trigger form's params."""
    dep = local_airflow
    dag = dep.api("GET", f"dags/{DAG_ID}")
    assert dag["is_paused"] is False and not dag.get("is_stale"), dag
    details = dep.api("GET", f"dags/{DAG_ID}/details")
    params = details["params"]
    for name in ("data_uri", "store_uri", "namespace", "encoder_shards"):
        assert name in params, f"param {name} missing: {sorted(params)}"
    assert params["data_uri"]["value"] is None  # no default data: the run names it (or Variable, env)
    assert dep.import_errors() == []
