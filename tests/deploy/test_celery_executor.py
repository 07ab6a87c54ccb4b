"""``llmrec_daily`` with the CeleryExecutor: Redis broker, PostgreSQL result backend, one
``airflow celery worker`` (concurrency 2) on a private queue, next to api-server, scheduler and
dag-processor.

The embedding stage is dynamic task mapping over item shards: the mapped ``embed_shard`` tasks run
on the Celery worker, at least two of them at the same time, and ``merge_shards`` merges them
deterministically: same item order and bit-identical vectors as the LocalExecutor run with another
shard count (same logical date and params, hence the same version id: the shard count is not a
result parameter).

Airflow 3.3 + celery 5.7: see ``airflow_proc.py`` (the provider imports a celery helper that 5.7
removed; the deployment's ``airflow_local_settings.py`` puts it back).

Run: ``.venv/bin/python -m pytest -m integration tests/deploy -k celery``.
"""

from __future__ import annotations

import json

import numpy as np

from tests.deploy.checks import (
    DAG_ID,
    PRODUCTION_DATE,
    current_pointer,
    overlapping,
    production_conf,
    run_and_wait,
    store_root,
    verify_bundle,
    xcom,
)

SHARDS = 4


def _bundle_arrays(store_uri: str, namespace: str, version: str) -> tuple[list[str], np.ndarray]:
    folder = store_root(store_uri) / namespace / "bundles" / version
    return json.loads((folder / "item_ids.json").read_text()), np.load(folder / "embeddings.npy")


def test_celery_mapped_shards_run_in_parallel_and_merge_deterministically(
    celery_airflow, results, sample_folder
):
    dep = celery_airflow
    conf = production_conf(dep.store_uri, sample_folder, shards=SHARDS)
    run, tis = run_and_wait(dep, conf, logical_date=PRODUCTION_DATE, timeout=480)
    run_id = run["dag_run_id"]

    shards = [ti for ti in tis if ti["task_id"] == "embed_shard"]
    assert sorted(ti["map_index"] for ti in shards) == list(range(SHARDS)), [t["map_index"] for t in shards]
    assert all(ti["state"] == "success" for ti in tis)

    # Executed by the Celery worker: every task went to our private queue, and the worker's log
    # shows Celery executing workloads.
    assert {ti["queue"] for ti in tis} == {dep.queue}, {ti["queue"] for ti in tis}
    worker_log = (dep.log_dir / "celery-worker.log").read_text(errors="replace")
    assert worker_log.count("execute_workload") >= len(tis), "the Celery worker did not run the tasks"

    # In parallel: at least two shard tasks overlapped in time (worker concurrency 2).
    pairs = overlapping(shards)
    assert pairs, "no two embed_shard tasks ran at the same time:\n" + dep.describe_run(DAG_ID, run_id)

    # Merged in item order, whatever the shard count and finishing order.
    shard_results = [xcom(dep, run_id, "embed_shard", map_index=i) for i in range(SHARDS)]
    merged = xcom(dep, run_id, "merge_shards")
    published = xcom(dep, run_id, "publish")
    version = published["version"]
    assert current_pointer(dep.store_uri, "production")["version"] == version
    ids, emb = _bundle_arrays(dep.store_uri, "production", version)
    assert len(ids) == emb.shape[0] == len(set(ids)), "duplicate or missing items after the merge"
    assert merged.get("n_items", len(ids)) == len(ids), merged
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-3), "rows are not L2-normalised"

    manifest = verify_bundle(dep.store_uri, "production", version)
    reference = results.get("local")
    if reference is not None:
        # Same logical date and params, another executor and shard count. The encoder's batches are
        # planned over the whole catalog and dealt to the shards, so the vectors are bit-identical.
        assert ids == json.loads(reference["item_ids"]), "item order differs from the LocalExecutor run"
        assert np.array_equal(emb, reference["embeddings"]), (
            f"embeddings differ from the {len(json.loads(reference['item_ids']))}-item LocalExecutor run "
            f"(max abs diff {np.abs(emb - reference['embeddings']).max():.3g})"
        )
        assert manifest["files"]["embeddings.npy"] == reference["manifest"]["files"]["embeddings.npy"]
        # The shard count is not a result parameter: same params, same version id. (Only when the
        # code did not change between the two runs: a developer editing stages meanwhile changes
        # the params' defaults.)
        if manifest["lineage"]["params"] == reference["manifest"]["lineage"]["params"]:
            assert version == reference["version"], (version, reference["version"])
    else:
        # Run alone: the same run again with one shard in another namespace must agree.
        single = dict(conf, namespace="exp-one-shard", encoder_shards=1)
        run1, _ = run_and_wait(dep, single, logical_date=PRODUCTION_DATE, timeout=480)
        version1 = xcom(dep, run1["dag_run_id"], "publish")["version"]
        ids1, emb1 = _bundle_arrays(dep.store_uri, "exp-one-shard", version1)
        assert ids == ids1, "item order depends on the shard count"
        assert np.array_equal(emb, emb1), (
            f"embeddings depend on the shard count ({np.abs(emb - emb1).max():.3g})"
        )
    print(
        f"celery run {run_id}: {SHARDS} shards, overlapping pairs {pairs}, "
        f"shard sizes {[r.get('n_items', '?') if isinstance(r, dict) else '?' for r in shard_results]}, "
        f"version {version}"
    )
