"""Experiment backfill on a real scheduler: ``airflow backfill create`` runs one ``llmrec_daily``
run per day into an experiment namespace, with the given params, and production is untouched.

The command is the one the README shows, run with the deployment's environment (the CLI writes
the backfill and its runs to the metadata DB; the running scheduler executes them). The output
and a summary are saved to ``test-artifacts/deploy/backfill-*.txt``.

Run: ``.venv/bin/python -m pytest -m integration tests/deploy -k backfill``.
"""

from __future__ import annotations

import json
import time

from tests.deploy.airflow_proc import DeploymentError, wait_until
from tests.deploy.checks import (
    DAG_ID,
    FAST,
    PRODUCTION_DATE,
    bundle_versions,
    current_bytes,
    current_pointer,
    production_conf,
    run_and_wait,
    verify_bundle,
)

# Inside the sample's time span. Two days prove several backfill runs into one experiment namespace
# (production untouched) as well as three did; each day is a full pipeline run, so one fewer saves ~40%.
DAYS = ["2026-10-20", "2026-10-21"]
FROM_DATE, TO_DATE = DAYS[0], DAYS[-1]
NAMESPACE = "exp-backfill-lr"
CONF = {
    "data_uri": "sample",
    "namespace": NAMESPACE,
    "ranker_learning_rate": 0.1,
    "encoder_shards": 2,
    # Each day is gated against the day before it in the namespace; a day more than 2% worse would
    # fail its run (gate task) by design. This test is about isolation, so every day is promoted.
    "gate_tolerance": 0.2,
    **FAST,
}


def test_backfill_days_into_experiment_namespace(local_airflow, artifacts_dir, sample_folder):
    dep = local_airflow
    if current_pointer(dep.store_uri, "production") is None:  # run alone: make a production first
        run_and_wait(dep, production_conf(dep.store_uri, sample_folder), PRODUCTION_DATE)
    production_before = current_bytes(dep.store_uri, "production")
    production_versions = bundle_versions(dep.store_uri, "production")
    assert production_before is not None
    runs_before = {r["dag_run_id"] for r in dep.dag_runs(DAG_ID)}

    argv = [
        "backfill",
        "create",
        "--dag-id",
        DAG_ID,
        "--from-date",
        FROM_DATE,
        "--to-date",
        TO_DATE,
        "--dag-run-conf",
        json.dumps(CONF),
    ]
    started = time.monotonic()
    out = dep.cli(argv, timeout=180, log_name="backfill-create").stdout
    command = "airflow " + " ".join(a if not a.startswith("{") else f"'{a}'" for a in argv)
    (artifacts_dir / "backfill-output.txt").write_text(f"$ {command}\n{out}")
    print(f"$ {command}\n{out}")

    backfills = dep.api("GET", "backfills", params={"dag_id": DAG_ID})["backfills"]
    assert len(backfills) == 1, backfills
    backfill = backfills[0]
    assert backfill["dag_run_conf"] == CONF

    def backfill_runs() -> list[dict]:
        return [r for r in dep.dag_runs(DAG_ID, run_type="backfill") if r["dag_run_id"] not in runs_before]

    runs = wait_until(
        lambda: (r := backfill_runs()) and len(r) >= len(DAYS) and r, 60, f"{len(DAYS)} backfill runs"
    )
    assert len(runs) == len(DAYS), [r["dag_run_id"] for r in runs]
    assert sorted(r["logical_date"][:10] for r in runs) == DAYS

    def all_done() -> list[dict] | None:
        current = backfill_runs()
        return current if all(r["state"] in ("success", "failed") for r in current) else None

    try:
        runs = wait_until(all_done, 600, "the backfill runs to finish", interval=2, check=dep.check_alive)
    except DeploymentError:
        raise AssertionError(
            "backfill did not finish:\n"
            + "\n".join(
                f"{r['dag_run_id']} {r['state']}\n{dep.describe_run(DAG_ID, r['dag_run_id'])}" for r in runs
            )
        ) from None
    failed = [r for r in runs if r["state"] != "success"]
    assert not failed, "\n".join(
        f"{r['dag_run_id']}:\n{dep.describe_run(DAG_ID, r['dag_run_id'])}" for r in failed
    )
    for r in runs:
        assert r["run_type"] == "backfill" and r["conf"] == CONF, r
    elapsed = time.monotonic() - started
    # The scheduler closes the backfill once its runs are done.
    wait_until(
        lambda: dep.api("GET", f"backfills/{backfill['id']}")["completed_at"], 60, "backfill completed_at"
    )

    # One bundle per day in the experiment namespace, built with the given params.
    versions = bundle_versions(dep.store_uri, NAMESPACE)
    assert len(versions) == len(DAYS), versions
    run_ids = {r["dag_run_id"] for r in runs}
    for version in versions:
        manifest = verify_bundle(dep.store_uri, NAMESPACE, version)
        lineage = manifest["lineage"]
        assert lineage["run_id"] in run_ids, lineage
        assert lineage["params"]["namespace"] == NAMESPACE
        assert lineage["params"]["ranker"]["learning_rate"] == CONF["ranker_learning_rate"], lineage["params"]
    assert sorted(v[:8] for v in versions) == [d.replace("-", "") for d in DAYS], versions

    # Production: the same current.json, byte for byte, and no new bundle.
    assert current_bytes(dep.store_uri, "production") == production_before
    assert bundle_versions(dep.store_uri, "production") == production_versions

    summary = [
        f"backfill {backfill['id']}: {FROM_DATE} .. {TO_DATE} into {NAMESPACE}, conf {json.dumps(CONF)}",
        f"runs ({elapsed:.0f}s):",
        *(
            f"  {r['dag_run_id']}  logical_date={r['logical_date']}  state={r['state']}"
            for r in sorted(runs, key=lambda r: r["logical_date"])
        ),
        f"{NAMESPACE} bundles: {versions}",
        f"{NAMESPACE} current: {current_pointer(dep.store_uri, NAMESPACE)['version']}",
        f"production current unchanged: {json.loads(production_before)['version']} "
        f"(current.json byte-identical before/after; production bundles {production_versions})",
    ]
    (artifacts_dir / "backfill-summary.txt").write_text("\n".join(summary) + "\n")
    print("\n".join(summary))


def test_backfill_into_production_is_refused(local_airflow):
    """No namespace (= production) in a backfill's conf: the run fails in its first task."""
    dep = local_airflow
    production_before = current_bytes(dep.store_uri, "production")
    # Wait for the earlier backfill to be closed: one running backfill per DAG.
    wait_until(
        lambda: all(
            b["completed_at"] for b in dep.api("GET", "backfills", params={"dag_id": DAG_ID})["backfills"]
        ),
        120,
        "earlier backfills to complete",
    )
    runs_before = {r["dag_run_id"] for r in dep.dag_runs(DAG_ID)}
    dep.cli(
        ["backfill", "create", "--dag-id", DAG_ID, "--from-date", "2026-10-10", "--to-date", "2026-10-10"],
        timeout=180,
    )
    run = wait_until(
        lambda: next(
            (r for r in dep.dag_runs(DAG_ID, run_type="backfill") if r["dag_run_id"] not in runs_before), None
        ),
        60,
        "the backfill run",
    )
    final = dep.wait_for_run(DAG_ID, run["dag_run_id"], timeout=240)
    assert final["state"] == "failed", dep.describe_run(DAG_ID, run["dag_run_id"])
    states = {t["task_id"]: t["state"] for t in dep.task_instances(DAG_ID, run["dag_run_id"])}
    assert states.get("config") == "failed", states
    assert current_bytes(dep.store_uri, "production") == production_before
