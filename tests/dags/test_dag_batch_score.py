"""``dag.test()`` of ``llmrec_batch_score`` in a child process over a small real bundle
(``tests/bundle_factory.py``): plan -> mapped score_shard -> finalize, parts and manifest in the store."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from llmrec_tasks import publish
from llmrec_tasks.core import constants as C
from tests.bundle_factory import N_USERS, make_run
from tests.dags.test_dag_e2e import LOGICAL_DATE, assert_all_success, run_dag

pytestmark = pytest.mark.slow

TASKS = {"plan", "score_shard", "finalize"}


def test_batch_scoring_dag_end_to_end(tmp_path):
    store = (tmp_path / "store").as_uri()
    published = publish.run_publish(*make_run(store, real_features=True))
    users = tmp_path / "users.txt"
    users.write_text("u3\nghost\nu4\n")
    every = {"store_uri": store, "k": 5, "batch_users_per_shard": 7}
    listed = {**every, "users_uri": str(users), "batch_users_per_shard": 2, "version": published.version}
    first, second = run_dag(
        tmp_path,
        {"dag_id": "llmrec_batch_score", "logical_date": LOGICAL_DATE, "confs": [every, listed]},
        timeout=600,
    )
    out = tmp_path / "store" / C.DEFAULT_NAMESPACE / C.SCORES_DIR / published.version
    for run, shards, users_count in ((first, 3, N_USERS), (second, 2, 3)):
        assert_all_success(run, TASKS)
        assert sorted(k for k in run["tasks"] if k.startswith("score_shard")) == [
            f"score_shard[{i}]" for i in range(shards)
        ]
        summary = run["xcom"]["finalize[-1]"]
        assert (summary["users"], summary["parts"], summary["version"]) == (
            users_count,
            shards,
            published.version,
        )
    # The second run replaced the first one's output: its manifest, its two parts.
    manifest = json.loads((out / C.SCORES_MANIFEST).read_text())
    assert (
        manifest["users"] == 3
        and manifest["unknown_users"] == 1
        and manifest["unknown_examples"] == ["ghost"]
    )
    assert sorted(p.name for p in out.glob("part-*")) == ["part-00000.parquet", "part-00001.parquet"]
    frame = pd.concat(pd.read_parquet(out / p["name"]) for p in manifest["parts"])
    assert list(frame.columns) == list(C.SCORE_COLUMNS) and len(frame) == 15
    assert frame.groupby(C.USER_ID)[C.COLD].first().to_dict() == {"u3": False, "ghost": True, "u4": False}
