"""A run of ``llmrec_daily`` without a data source fails at its ``config`` task with the message
that says how to configure one: there is no default data, so a schedule never trains on the demo
sample (``tests/dags/run_dag_test.py`` in a child process, stage functions stubbed)."""

from __future__ import annotations

import pytest

from llmrec_tasks.core.settings import DATA_ENV
from tests.dags.test_dag_e2e import LOGICAL_DATE, run_dag

pytestmark = pytest.mark.slow

DOWNSTREAM = {"validate", "plan_shards", "merge_shards", "index", "train", "publish", "gate"}


def test_a_run_without_a_data_source_fails_at_config_with_the_message(tmp_path, monkeypatch):
    monkeypatch.delenv(DATA_ENV, raising=False)
    conf = {"store_uri": (tmp_path / "store").as_uri(), "namespace": "exp-nodata"}
    (run,) = run_dag(tmp_path, {"logical_date": LOGICAL_DATE, "stub_stages": True, "conf": conf}, timeout=300)

    assert run["state"] == "failed", run["tasks"]
    assert run["tasks"]["config[-1]"] == "failed"
    assert {k.split("[")[0] for k, v in run["tasks"].items() if v == "upstream_failed"} >= DOWNSTREAM
    log = (tmp_path / "dag-test.log").read_text()
    assert "no data source configured" in log and "Variable `llmrec_data_uri`" in log
    assert "`make demo` (data `sample`, namespace `demo`)" in log
    assert not (tmp_path / "store").exists()  # nothing written
