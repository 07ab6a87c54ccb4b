"""Batch scoring: recommend_many equals per-user recommend; plan, shards, parts, manifest; bad inputs."""

from __future__ import annotations

import json
import shutil
import time
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from llmrec_tasks import publish
from llmrec_tasks.core import constants as C
from llmrec_tasks.core.errors import BundleError, ConfigError, DataContractError
from llmrec_tasks.core.results import Published
from llmrec_tasks.serving import batch
from llmrec_tasks.serving import recommender as serving
from llmrec_tasks.storage import registry
from llmrec_tasks.storage.store import open_store
from tests.bundle_factory import N_USERS, make_run

NS = C.DEFAULT_NAMESPACE
NOW = 1_706_745_600.0  # 2024-02-01, the toy bundle's cutoff


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Published]:
    """One published bundle with the ranking stage's features, copied into each test's store."""
    folder = tmp_path_factory.mktemp("template") / "store"
    return folder, publish.run_publish(*make_run(folder.as_uri(), real_features=True))


@pytest.fixture
def published(template: tuple[Path, Published], store_uri: str) -> Published:
    shutil.copytree(template[0], Path(store_uri.removeprefix("file://")), dirs_exist_ok=True)
    return template[1]


@pytest.fixture
def recommender(store_uri: str, published: Published) -> serving.Recommender:
    return serving.Recommender(serving.load_bundle(store_uri, NS))


def users_of(recommender: serving.Recommender) -> list[str]:
    return sorted(recommender.bundle.user_row)


def read_parts(out_uri: str) -> pd.DataFrame:
    store = open_store(out_uri)
    parts = sorted(k for k in store.list("") if k.startswith(C.SCORE_PART_PREFIX))
    return pd.concat([pd.read_parquet(Path(out_uri.removeprefix("file://")) / p) for p in parts])


@pytest.mark.parametrize("k", [5, 50])  # 50 > the toy ranker's 30 candidates: the popular fill
def test_recommend_many_equals_per_user_recommend(
    recommender: serving.Recommender, monkeypatch: pytest.MonkeyPatch, k: int
) -> None:
    users = [*users_of(recommender), "nobody", "u3"]
    scored = batch.recommend_many(recommender, users, k, NOW)
    # recommend() takes the time of the request: the same instant here.
    monkeypatch.setattr(
        serving, "time", types.SimpleNamespace(time=lambda: NOW, perf_counter=time.perf_counter)
    )
    for u, user in enumerate(users):
        expected = recommender.recommend(user_id=user, k=k)
        lo, hi = scored.indptr[u], scored.indptr[u + 1]
        got = [recommender.bundle.item_ids[i] for i in scored.items[lo:hi]]
        assert got == [i.item_id for i in expected.items], user
        np.testing.assert_allclose(scored.scores[lo:hi], [i.score for i in expected.items], rtol=1e-6)
        assert bool(scored.cold[u]) == (expected.strategy == "popular" and expected.history_length == 0)
    assert scored.cold.tolist() == [False] * N_USERS + [True, False]


def test_shards_cover_every_user_exactly_once(store_uri: str, published: Published) -> None:
    plan = batch.plan_scoring(store_uri, NS, users_per_shard=6, k=3)
    assert plan.shard_count == len(plan.shards) == 4 and plan.users == N_USERS
    covered = [i for s in plan.shards for i in range(s.start, s.stop)]
    assert covered == list(range(N_USERS))
    assert {s.version for s in plan.shards} == {published.version}
    mine = batch.plan_scoring(store_uri, NS, users_per_shard=6, k=3, shard_filter=(1, 2))
    assert [s.shard for s in mine.shards] == [1, 3] and mine.shard_count == 4


def test_score_batch_writes_parts_and_manifest(store_uri: str, published: Published) -> None:
    summary = batch.score_batch(store_uri, NS, k=4, users_per_shard=7)
    out_uri = open_store(store_uri).uri_for(registry.scores_prefix(NS, published.version))
    assert summary["out_uri"] == out_uri and summary["users"] == N_USERS and summary["parts"] == 3
    table = pq.read_table(Path(out_uri.removeprefix("file://")) / "part-00000.parquet")
    assert table.schema.names == list(C.SCORE_COLUMNS)
    assert [str(t) for t in table.schema.types] == ["string", "int32", "string", "double", "string", "bool"]
    frame = read_parts(out_uri)
    assert len(frame) == N_USERS * 4 and frame[C.USER_ID].nunique() == N_USERS
    assert frame.groupby(C.USER_ID)[C.RANK].apply(list).map(lambda r: r == [1, 2, 3, 4]).all()
    assert set(frame[C.VERSION]) == {published.version} and not frame[C.COLD].any()
    manifest = json.loads(open_store(out_uri).get_bytes(C.SCORES_MANIFEST))
    assert manifest["users"] == N_USERS and manifest["rows"] == N_USERS * 4
    assert [p["name"] for p in manifest["parts"]] == [f"part-0000{i}.parquet" for i in range(3)]
    first = open_store(out_uri).get_bytes("part-00000.parquet")
    import hashlib

    assert manifest["parts"][0]["sha256"] == hashlib.sha256(first).hexdigest()


def test_the_version_is_pinned_at_plan_time(store_uri: str, published: Published) -> None:
    """A promotion between plan and shard does not change what the shards score."""
    plan = batch.plan_scoring(store_uri, NS, k=3)
    from datetime import UTC, datetime

    second = publish.run_publish(
        *make_run(store_uri, real_features=True, cutoff=datetime(2024, 2, 2, tzinfo=UTC), seed=1)
    )
    assert second.promoted and registry.current_version(open_store(store_uri), NS) == second.version
    result = batch.score_shard(plan.shards[0])
    frame = pd.read_parquet(Path(plan.out_uri.removeprefix("file://")) / result.part)
    assert set(frame[C.VERSION]) == {published.version}


def test_rerunning_a_shard_replaces_its_part_atomically(store_uri: str, published: Published) -> None:
    plan = batch.plan_scoring(store_uri, NS, k=3, users_per_shard=10)
    first = batch.score_shard(plan.shards[1])
    again = batch.score_shard(plan.shards[1])
    assert (again.sha256, again.rows) == (first.sha256, first.rows)  # same plan, same bytes
    folder = Path(plan.out_uri.removeprefix("file://"))
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith("part-")) == ["part-00001.parquet"]
    assert not [p for p in folder.rglob("*") if p.name.startswith(".")]  # no temporary file left
    with pytest.raises(ConfigError, match=r"1 of 2 shard\(s\) not scored yet \(\[0\]\)"):
        batch.finalize(plan.out_uri)
    batch.score_shard(plan.shards[0])
    assert batch.finalize(plan.out_uri)["users"] == N_USERS


def test_a_new_plan_clears_the_previous_run(store_uri: str, published: Published) -> None:
    batch.score_batch(store_uri, NS, k=3, users_per_shard=5)
    plan = batch.plan_scoring(store_uri, NS, k=3, users_per_shard=10)
    store = open_store(plan.out_uri)
    assert not store.exists(C.SCORES_MANIFEST)
    assert sorted(k for k in store.list("") if k.startswith("part-")) == [
        "part-00000.parquet",
        "part-00001.parquet",
    ]
    with pytest.raises(ConfigError, match="not scored yet"):
        batch.finalize(plan.out_uri)  # the old parts belong to the old plan


def test_a_stale_shard_of_a_replaced_plan_is_refused(store_uri: str, published: Published) -> None:
    old = batch.plan_scoring(store_uri, NS, k=3, now=NOW)
    batch.plan_scoring(store_uri, NS, k=3, now=NOW + 1)
    with pytest.raises(ConfigError, match="planned again"):
        batch.score_shard(old.shards[0])


def test_machines_with_a_shard_filter_share_one_plan(store_uri: str, published: Published) -> None:
    first = batch.score_batch(store_uri, NS, k=3, users_per_shard=5, shard_filter=(0, 2))
    assert not first["finalized"] and first["waiting_for_shards"] == [1, 3]
    second = batch.score_batch(store_uri, NS, k=3, users_per_shard=5, shard_filter=(1, 2))
    assert second["finalized"] and second["users"] == 10
    manifest = json.loads(open_store(second["out_uri"]).get_bytes(C.SCORES_MANIFEST))
    assert manifest["users"] == N_USERS and len(manifest["parts"]) == 4


def test_unknown_users_are_reported_and_scored_cold(
    store_uri: str, published: Published, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    listed = tmp_path / "users.txt"
    listed.write_text("user_id\nu1\nghost-1\nu2\nu1\n\nghost-2\n")
    summary = batch.score_batch(store_uri, NS, users_uri=str(listed), k=3, out="exports/today")
    assert summary["out_uri"] == open_store(store_uri).uri_for("exports/today")
    assert summary["unknown_users"] == 2 and summary["unknown_examples"] == ["ghost-1", "ghost-2"]
    assert "2 of 4 listed users have no history" in caplog.text and "ghost-1, ghost-2" in caplog.text
    frame = read_parts(summary["out_uri"])
    assert frame[C.USER_ID].drop_duplicates().tolist() == ["u1", "ghost-1", "u2", "ghost-2"]
    assert frame.groupby(C.USER_ID)[C.COLD].first().to_dict() == {
        "u1": False,
        "u2": False,
        "ghost-1": True,
        "ghost-2": True,
    }
    manifest = json.loads(open_store(summary["out_uri"]).get_bytes(C.SCORES_MANIFEST))
    assert (manifest["unknown_users"], manifest["duplicates"], manifest["cold_users"]) == (2, 1, 2)


def test_a_parquet_user_list(store_uri: str, published: Published, tmp_path: Path) -> None:
    path = tmp_path / "users.parquet"
    pd.DataFrame({C.USER_ID: ["u5", "u6"]}).to_parquet(path)
    assert batch.read_user_list(path.as_uri()) == ["u5", "u6"]
    pd.DataFrame({"who": ["u5"]}).to_parquet(path)
    with pytest.raises(DataContractError, match="no readable user_id column"):
        batch.read_user_list(str(path))


def test_bad_inputs_are_domain_errors(store_uri: str, published: Published, tmp_path: Path) -> None:
    with pytest.raises(DataContractError, match="does not exist"):
        batch.plan_scoring(store_uri, NS, users_uri=str(tmp_path / "missing.txt"))
    empty = tmp_path / "empty.txt"
    empty.write_text("user_id\n\n")
    with pytest.raises(ConfigError, match="lists no user"):
        batch.plan_scoring(store_uri, NS, users_uri=str(empty))
    with pytest.raises(BundleError, match="no current bundle"):
        batch.plan_scoring(store_uri, "exp-none")
    with pytest.raises(BundleError):
        batch.plan_scoring(store_uri, NS, version="20990101T000000Z-nothing-000000")
    with pytest.raises(ConfigError, match="k must be"):
        batch.plan_scoring(store_uri, NS, k=0)
