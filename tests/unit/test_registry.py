"""The bundle registry's own contract: keys, allow-list, manifest, the ``current`` pointer, retention."""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

import pytest

from llmrec_tasks.core import constants as C
from llmrec_tasks.core.errors import BundleError, ConfigError
from llmrec_tasks.storage import registry
from llmrec_tasks.storage.store import ObjectStore, PreconditionFailed, open_store

NS = "reg"
V = [f"2024020{d}T000000Z-abcdef12-123456" for d in range(1, 7)]


@pytest.fixture
def store(store_uri: str) -> ObjectStore:
    return open_store(store_uri)


def publish_fake(store: ObjectStore, version: str, **extra_files: bytes) -> dict[str, Any]:
    """A complete bundle of tiny files (only what the registry checks), manifest written last."""
    blobs = {name: name.encode() for name in registry.REQUIRED_FILES} | extra_files
    for name, data in blobs.items():
        store.put_bytes(registry.bundle_key(NS, version, name), data)
    manifest = {
        "format": registry.MANIFEST_FORMAT,
        "namespace": NS,
        "version": version,
        "created_at": "2024-03-01T00:00:00+00:00",
        "files": {n: {"size": len(d), "sha256": hashlib.sha256(d).hexdigest()} for n, d in blobs.items()},
        "metrics": {"ranker": {"ndcg@10": 0.3}},
        "lineage": {"logical_date": f"{version[:4]}-{version[4:6]}-{version[6:8]}T00:00:00+00:00"},
    }
    registry.write_manifest(store, manifest)
    return manifest


def promote(store: ObjectStore, version: str) -> None:
    def decide(pointer: dict[str, Any] | None) -> registry.Decision:
        return registry.new_pointer(pointer, version, version, "promote", "test"), True, "promoted"

    registry.update_current(store, NS, decide)


def test_keys_follow_the_layout_and_reject_bad_names() -> None:
    assert registry.run_prefix(NS, V[0]) == f"{NS}/runs/{V[0]}"
    assert registry.manifest_key(NS, V[0]) == f"{NS}/bundles/{V[0]}/{C.MANIFEST}"
    assert registry.bundle_key(NS, V[0], C.EMBEDDINGS) == f"{NS}/bundles/{V[0]}/{C.EMBEDDINGS}"
    assert registry.current_key(NS) == f"{NS}/{C.CURRENT_POINTER}"
    with pytest.raises(ConfigError):
        registry.bundle_prefix(NS, "../escape")


def test_allow_list_holds_what_serving_and_the_next_run_read_and_not_evaluation_features() -> None:
    for name in (
        *registry.REQUIRED_FILES,
        C.INDEX_INFO,
        C.ITEM_NEIGHBORS,
        C.EMBEDDING_KEYS,
        C.VALIDATION_STATS,
    ):
        assert registry.is_bundle_file(name), name
    assert registry.is_bundle_file(f"{C.VALIDATION_DOCS_DIR}/index.html")
    assert not registry.is_bundle_file(C.RANKER_EVAL)
    assert not registry.is_bundle_file(C.VALIDATION_DOCS_DIR)  # a folder, not a file
    assert not registry.is_bundle_file(C.SNAPSHOT_ITEMS)


def test_manifest_outside_the_allow_list_or_incomplete_is_refused(store: ObjectStore) -> None:
    with pytest.raises(BundleError, match=C.RANKER_EVAL):
        publish_fake(store, V[0], **{C.RANKER_EVAL: b"features"})
    manifest = {"format": registry.MANIFEST_FORMAT, "namespace": NS, "version": V[0], "files": {}}
    with pytest.raises(BundleError, match="missing"):
        registry.write_manifest(store, manifest)
    assert not store.exists(registry.manifest_key(NS, V[0]))


def test_manifest_is_immutable_and_verified(store: ObjectStore) -> None:
    manifest = publish_fake(store, V[0])
    assert registry.read_manifest(store, NS, V[0]) == manifest
    with pytest.raises(PreconditionFailed):
        registry.write_manifest(store, {**manifest, "created_at": "later"})
    key = registry.bundle_key(NS, V[0], C.METRICS)
    assert registry.bundle_file(store, NS, V[0], C.METRICS, manifest).read_bytes() == C.METRICS.encode()
    store.put_bytes(key, b"short")
    with pytest.raises(BundleError, match=f"corrupt: {re.escape(C.METRICS)} has 5 bytes, manifest says"):
        registry.bundle_file(store, NS, V[0], C.METRICS, manifest)
    store.put_bytes(key, C.METRICS.upper().encode())
    with pytest.raises(BundleError, match=f"corrupt: sha256 of {re.escape(C.METRICS)} is"):
        registry.bundle_file(store, NS, V[0], C.METRICS, manifest)
    store.delete(key)
    with pytest.raises(BundleError, match=f"partial: {re.escape(C.METRICS)} cannot be read"):
        registry.bundle_file(store, NS, V[0], C.METRICS, manifest)


def test_read_manifest_refuses_unknown_corrupt_and_foreign(store: ObjectStore) -> None:
    with pytest.raises(BundleError, match="not published"):
        registry.read_manifest(store, NS, V[0])
    store.put_bytes(registry.manifest_key(NS, V[0]), b"{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        registry.read_manifest(store, NS, V[0])
    store.put_bytes(registry.manifest_key(NS, V[1]), json.dumps({"files": {}}).encode())
    with pytest.raises(BundleError, match="not an llmrec manifest"):
        registry.read_manifest(store, NS, V[1])


def test_pointer_swap_is_compare_and_swap(store: ObjectStore) -> None:
    assert registry.read_pointer(store, NS) == (None, None)
    registry.swap_current(store, NS, {"version": V[0]}, None)
    with pytest.raises(PreconditionFailed):  # someone created it first
        registry.swap_current(store, NS, {"version": V[1]}, None)
    _, etag = registry.read_pointer(store, NS)
    registry.swap_current(store, NS, {"version": V[1]}, etag)
    with pytest.raises(PreconditionFailed):  # the ETag read is stale now
        registry.swap_current(store, NS, {"version": V[2]}, etag)
    assert registry.current_version(store, NS) == V[1]


def test_update_current_decides_again_after_a_lost_race(store: ObjectStore) -> None:
    registry.swap_current(store, NS, {"version": V[0]}, None)
    seen: list[str] = []

    def decide(pointer: dict[str, Any] | None) -> registry.Decision:
        assert pointer is not None
        seen.append(pointer["version"])
        if len(seen) == 1:  # another writer moves current between our read and our swap
            _, etag = registry.read_pointer(store, NS)
            registry.swap_current(store, NS, {"version": V[1]}, etag)
        return {"version": V[2], "after": pointer["version"]}, True, "ours"

    assert registry.update_current(store, NS, decide) == (True, "ours")
    assert seen == [V[0], V[1]]
    assert registry.read_pointer(store, NS)[0] == {"version": V[2], "after": V[1]}


def test_update_current_gives_up_when_current_keeps_moving(
    store: ObjectStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(registry.time, "sleep", lambda _: None)
    registry.swap_current(store, NS, {"version": V[0]}, None)

    moves: list[int] = []

    def decide(pointer: dict[str, Any] | None) -> registry.Decision:
        moves.append(len(moves))
        _, etag = registry.read_pointer(store, NS)
        registry.swap_current(store, NS, {"version": V[1], "move": len(moves)}, etag)
        return {"version": V[2]}, True, "never"

    with pytest.raises(PreconditionFailed, match="3 attempts"):
        registry.update_current(store, NS, decide, attempts=3)
    assert len(moves) == 3 and registry.current_version(store, NS) == V[1]


def test_history_resolve_and_rollback_target(store: ObjectStore) -> None:
    with pytest.raises(BundleError, match="no current bundle"):
        registry.resolve_version(store, NS, registry.CURRENT)
    for version in V[:3]:
        publish_fake(store, version)
        promote(store, version)
    pointer, _ = registry.read_pointer(store, NS)
    assert pointer["version"] == V[2] and [e["version"] for e in pointer["history"]] == [V[1], V[0]]
    assert registry.resolve_version(store, NS, registry.CURRENT) == V[2]
    assert registry.resolve_version(store, NS, V[0]) == V[0]

    store.delete(registry.manifest_key(NS, V[1]))  # the previous current's bundle is gone
    target = registry.rollback_target(store, NS, pointer)
    assert target["version"] == V[0]
    back = registry.rollback_pointer(pointer, target)
    assert back["version"] == V[0] and back["history"] == [] and back["rolled_back"] == [V[2]]
    # Promoting a rolled-back version again clears its mark and keeps the history.
    again = registry.new_pointer(back, V[2], V[2], "promote", "operator")
    assert again["rolled_back"] == [] and [e["version"] for e in again["history"]] == [V[0]]


def test_pointer_history_is_bounded() -> None:
    pointer: dict[str, Any] | None = None
    for i in range(registry.POINTER_HISTORY + 5):
        pointer = registry.new_pointer(pointer, f"v{i}", "2024-02-01", "publish", "test")
    assert pointer is not None and len(pointer["history"]) == registry.POINTER_HISTORY
    assert pointer["history"][0]["version"] == f"v{registry.POINTER_HISTORY + 3}"


def test_gc_keeps_the_newest_and_every_referenced_version(store: ObjectStore, store_uri: str) -> None:
    for version in V:
        publish_fake(store, version)
    promote(store, V[4])
    promote(store, V[0])  # current: the oldest; rollback target: V[4]
    store.put_bytes(registry.bundle_key(NS, "20240301T000000Z-abcdef12-123456", C.EMBEDDINGS), b"partial")

    result = registry.gc(store_uri, NS, keep=2)
    assert result["kept"] == sorted([V[0], V[4], V[5]])
    assert result["deleted"] == sorted([V[1], V[2], V[3]])
    assert result["incomplete"] == ["20240301T000000Z-abcdef12-123456"]
    assert not store.list(registry.bundle_prefix(NS, V[1]))
    rows = registry.list_versions(store_uri, NS)
    assert [(r["version"], r["complete"], r["current"]) for r in rows] == [
        (V[0], True, True),
        (V[4], True, False),
        (V[5], True, False),
        ("20240301T000000Z-abcdef12-123456", False, False),
    ]
    assert registry.show(store_uri, NS, registry.CURRENT)["version"] == V[0]
    with pytest.raises(ConfigError):
        registry.gc(store_uri, NS, keep=0)


# --- A/B experiments -----------------------------------------------------------------------------


def test_assignment_is_deterministic_and_matches_the_share() -> None:
    experiment = {"name": "exp", "challenger": V[1], "share": 0.3, "salt": "s1"}
    users = [f"user-{i}" for i in range(10_000)]
    arms = [registry.assign_arm(experiment, u) for u in users]
    assert arms == [registry.assign_arm(experiment, u) for u in users]  # stable
    share = arms.count(C.CHALLENGER_ARM) / len(users)
    assert abs(share - 0.3) < 0.015  # 3.3 standard deviations of a binomial(10k, 0.3) share
    other = [registry.assign_arm({**experiment, "salt": "s2"}, u) for u in users]
    assert sum(a != b for a, b in zip(arms, other, strict=True)) > 3000  # another salt reshuffles
    assert {registry.assign_arm({**experiment, "share": 0.0}, u) for u in users} == {C.CURRENT_ARM}
    assert {registry.assign_arm({**experiment, "share": 1.0}, u) for u in users} == {C.CHALLENGER_ARM}
    assert registry.assign_arm(experiment, None) == registry.assign_arm(None, "u1") == C.CURRENT_ARM
    assert all(0.0 <= registry.experiment_bucket("s", u) < 1.0 for u in users[:100])


def test_start_show_stop_an_experiment(store: ObjectStore, store_uri: str) -> None:
    publish_fake(store, V[0])
    publish_fake(store, V[1])
    promote(store, V[0])
    assert registry.read_experiment(store_uri, NS) is None
    started = registry.start_experiment(store_uri, NS, "exp1", V[1], 0.25)
    assert started["challenger"] == V[1] and started["share"] == 0.25 and started["salt"] == "exp1"
    assert started["current"] == V[0]
    assert registry.read_experiment(store_uri, NS) == started
    assert registry.gc(store_uri, NS, keep=1)["deleted"] == []  # the challenger is kept
    stopped = registry.stop_experiment(store_uri, NS)
    assert stopped["stopped"]["name"] == "exp1" and registry.read_experiment(store_uri, NS) is None
    assert registry.stop_experiment(store_uri, NS)["reason"] == "no experiment running"
    assert registry.current_version(store, NS) == V[0]


@pytest.mark.parametrize(
    ("challenger", "share", "error", "message"),
    [
        (V[0], 0.5, BundleError, "already current"),
        (V[2], 0.5, BundleError, "is not published"),
        (V[1], 1.5, ConfigError, "share must be in [0, 1]"),
        (V[1], -0.1, ConfigError, "share must be in [0, 1]"),
        ("../x", 0.5, ConfigError, "invalid version"),
    ],
)
def test_a_bad_experiment_is_refused(
    store: ObjectStore, store_uri: str, challenger: str, share: float, error: type, message: str
) -> None:
    publish_fake(store, V[0])
    publish_fake(store, V[1])
    promote(store, V[0])
    with pytest.raises(error, match=re.escape(message)):
        registry.start_experiment(store_uri, NS, "exp1", challenger, share)
    assert registry.read_experiment(store_uri, NS) is None


def test_an_experiment_needs_a_current(store: ObjectStore, store_uri: str) -> None:
    publish_fake(store, V[1])
    with pytest.raises(BundleError, match="promote one before starting an experiment"):
        registry.start_experiment(store_uri, NS, "exp1", V[1], 0.5)


def test_promoting_the_challenger_ends_the_experiment_another_promote_keeps_it(
    store: ObjectStore, store_uri: str
) -> None:
    for version in V[:3]:
        publish_fake(store, version)
    promote(store, V[0])
    registry.start_experiment(store_uri, NS, "exp1", V[1], 0.5)
    promote(store, V[2])  # e.g. the daily run: the experiment goes on against the new current
    assert registry.read_experiment(store_uri, NS)["current"] == V[2]
    promote(store, V[1])
    assert registry.read_experiment(store_uri, NS) is None
    assert registry.current_version(store, NS) == V[1]
