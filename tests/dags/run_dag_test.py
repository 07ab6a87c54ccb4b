"""Run ``llmrec_daily`` with ``dag.test()`` (tasks in this process, SQLite metadata DB) and print
what the end-to-end test checks, as one JSON line prefixed ``RESULT``.

    python tests/dags/run_dag_test.py '{"logical_date": "2026-11-01T00:00:00+00:00",
                                        "conf": {...}, "runs": 2}'

``"confs": [{...}, {...}]`` runs once per conf instead; ``"stub_stages": true`` swaps the stage
functions for instant fakes (wiring only), and ``"stub_metrics": {...}`` sets the fake train's
metrics (e.g. a ranker below popularity, which fails the quality gate).

Each run is a fresh DAG run of the same logical date (``dag.test`` replaces the previous one), like
clearing and rerunning it. The metadata DB must be migrated (``airflow db migrate``) first.

The DAG's run deadline is off here (``LLMREC_RUN_DEADLINE_HOURS=0``): in Airflow 3.3.2
``dag.test()`` crashes when a run with a deadline succeeds (``DagRun.update_state`` looks its
deadline alert up by a dict: ``'dict' object has no attribute 'hex'``).
"""

from __future__ import annotations

import json
import sys
import time
from datetime import datetime
from pathlib import Path

DAGS = Path(__file__).resolve().parents[2] / "dags"


def _value(raw):
    if isinstance(raw, bytes | str):
        try:
            return json.loads(raw)
        except ValueError:
            return raw
    return raw


def summarize(dag_run, started: float) -> dict:
    from airflow.models.asset import AssetEvent
    from airflow.models.taskinstance import TaskInstance
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        tis = session.scalars(
            select(TaskInstance).where(
                TaskInstance.dag_id == dag_run.dag_id, TaskInstance.run_id == dag_run.run_id
            )
        ).all()
        xcoms = session.scalars(
            select(XComModel).where(
                XComModel.dag_id == dag_run.dag_id,
                XComModel.run_id == dag_run.run_id,
                XComModel.key == "return_value",
            )
        ).all()
        events = session.scalars(
            select(AssetEvent).where(
                AssetEvent.source_dag_id == dag_run.dag_id, AssetEvent.source_run_id == dag_run.run_id
            )
        ).all()
        return {
            "run_id": dag_run.run_id,
            "state": str(dag_run.state),
            "seconds": round(time.monotonic() - started, 1),
            "tasks": {f"{ti.task_id}[{ti.map_index}]": str(ti.state) for ti in tis},
            "xcom": {f"{x.task_id}[{x.map_index}]": _value(x.value) for x in xcoms},
            "xcom_bytes": {f"{x.task_id}[{x.map_index}]": len(json.dumps(_value(x.value))) for x in xcoms},
            "events": [{"uri": e.asset.uri, "name": e.asset.name, "extra": e.extra} for e in events],
        }


STUB_METRICS = {"ranker": {"ndcg@10": 0.3}, "popularity": {"ndcg@10": 0.1}}


def install_stub_stages(metrics: dict | None = None) -> None:
    """Replace the stage functions by instant fakes (wiring tests): same signatures, typed results.

    The fake train reports ``metrics``; the fake publish applies the real quality gate to them
    (nothing published before) and promotes when it passes, unless the run conf says
    ``promote: false``. The gate task's real check is kept.
    """
    import dataclasses
    import importlib
    import types

    from llmrec_tasks import publish
    from llmrec_tasks.core.results import EmbedShard, EncodedShard, Published
    from llmrec_tasks.ranking.evaluate import quality_gate
    from llmrec_tasks.retrieval import index
    from llmrec_tasks.text import embed
    from tests.stage_results import embedded_for, indexed_for, trained_for, validated_for

    def fake(dotted, **functions):
        module = types.ModuleType(dotted)
        module.__dict__.update(functions)
        sys.modules[dotted] = module
        parent, _, name = dotted.rpartition(".")
        setattr(importlib.import_module(parent), name, module)

    def run_validate(cfg):
        version = f"{cfg.cutoff:%Y%m%dT%H%M%SZ}-stub0000-{cfg.params_hash()[:6]}"
        work = f"{cfg.store_uri}/{cfg.namespace}/runs/{version}"
        return dataclasses.replace(validated_for(work, version), cutoff=cfg.cutoff.isoformat())

    def plan_shards(cfg, validated):
        n = cfg.encoder.shards
        return [
            EmbedShard(shard=s, shards=n, work_uri=validated.work_uri, count=1, precision="fp32")
            for s in range(n)
        ]

    def run_embed_shard(cfg, validated, shard):
        return EncodedShard(shard=shard.shard, count=shard.count, seconds=0.0)

    def merge_shards(cfg, validated, shard_results):
        # `shards` counts the distinct shards merged: every mapped task's result arrived.
        done = len({r.shard for r in shard_results})
        return dataclasses.replace(embedded_for(validated.work_uri, 1, 4), shards=done)

    def run_index(cfg, validated, embedded):
        return indexed_for(validated.work_uri, embedded.n_items, embedded.dim)

    def run_train(cfg, validated, embedded):
        return trained_for(validated.work_uri, metrics or STUB_METRICS)

    def run_publish(cfg, validated, embedded, indexed, trained):
        bundle = f"{cfg.store_uri}/{cfg.namespace}/bundles/{validated.version}"
        result = {
            "version": validated.version,
            "namespace": cfg.namespace,
            "bundle_uri": bundle,
            "manifest_uri": f"{bundle}/manifest.json",
            "status": "published",
            "metrics": trained.metrics,
            "check": {"queries": 0},
        }
        if not cfg.promote:
            return Published(
                **result, promoted=False, reason="promote=False: published without moving current"
            )
        passed, why = quality_gate(trained.metrics, None, cfg.gate_tolerance)
        gate = publish.gate_record(passed, why, cfg.gate_tolerance, trained.metrics, None, None)
        return Published(
            **result, promoted=passed, reason=why if passed else f"quality gate: {why}", gate=gate
        )

    fake("llmrec_tasks.data.validate", run_validate=run_validate)
    embed.plan_shards, embed.run_embed_shard, embed.merge_shards = plan_shards, run_embed_shard, merge_shards
    index.run_index = run_index
    fake("llmrec_tasks.ranking.train", run_train=run_train)
    fake("llmrec_tasks.publish", run_publish=run_publish, enforce_gate=publish.enforce_gate)


def main(spec: dict) -> list[dict]:
    import os

    from airflow.dag_processing.dagbag import DagBag

    from llmrec_tasks.alerts import DEADLINE_ENV

    os.environ[DEADLINE_ENV] = "0"  # dag.test crashes on a DAG with a deadline (see above)

    if spec.get("stub_stages"):
        install_stub_stages(spec.get("stub_metrics"))

    bag = DagBag(dag_folder=str(DAGS))
    assert not bag.import_errors, bag.import_errors
    dag = bag.dags[spec.get("dag_id", "llmrec_daily")]
    logical_date = datetime.fromisoformat(spec["logical_date"])
    results = []
    confs = spec.get("confs") or [spec.get("conf") or {}] * int(spec.get("runs", 1))
    for conf in confs:
        started = time.monotonic()
        dag_run = dag.test(logical_date=logical_date, run_conf=conf)
        results.append(summarize(dag_run, started))
    return results


if __name__ == "__main__":
    print("RESULT " + json.dumps(main(json.loads(sys.argv[1])), default=str))
