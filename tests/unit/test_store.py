"""LocalStore: atomic writes, conditional writes (create-if-absent, compare-and-swap), key safety."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest

from llmrec_tasks.core.errors import StoreError
from llmrec_tasks.storage.store import (
    LocalStore,
    ObjectNotFound,
    PreconditionFailed,
    content_etag,
    open_store,
)
from tests.bundle_factory import race


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "root")


def test_round_trip_list_delete(store: LocalStore, tmp_path: Path) -> None:
    etag = store.put_bytes("a/b/c.json", b"{}")
    assert etag == content_etag(b"{}")
    source = tmp_path / "src.bin"
    source.write_bytes(b"x" * 3_000_000)
    assert store.put_file("a/d.bin", source) == content_etag(source.read_bytes())
    assert store.get_bytes("a/b/c.json") == b"{}"
    assert store.get_file("a/d.bin", tmp_path / "out.bin").read_bytes() == source.read_bytes()
    assert store.list("a") == ["a/b/c.json", "a/d.bin"]
    assert store.exists("a/d.bin") and not store.exists("a/b")
    store.delete("a/d.bin")
    store.delete("a/d.bin")  # idempotent
    assert store.list("") == ["a/b/c.json"]


def test_missing_object_is_object_not_found(store: LocalStore, tmp_path: Path) -> None:
    with pytest.raises(ObjectNotFound, match="does not exist"):
        store.get_bytes("nope.json")
    with pytest.raises(ObjectNotFound):
        store.get_with_etag("nope.json")
    with pytest.raises(ObjectNotFound):
        store.get_file("nope.json", tmp_path / "x")


@pytest.mark.parametrize("key", ["", "/abs", "a/../b", "a//b", "./a", ".."])
def test_keys_cannot_escape_the_root(store: LocalStore, key: str) -> None:
    with pytest.raises(StoreError, match="invalid object key"):
        store.put_bytes(key, b"x")


def test_if_absent_refuses_an_existing_object(store: LocalStore) -> None:
    store.put_bytes("k", b"first", if_absent=True)
    with pytest.raises(PreconditionFailed, match="already exists"):
        store.put_bytes("k", b"second", if_absent=True)
    assert store.get_bytes("k") == b"first"
    assert store.list("") == ["k"]  # no temp files left behind


def test_if_match_swaps_only_the_version_read(store: LocalStore) -> None:
    store.put_bytes("p", b"v1")
    _, etag = store.get_with_etag("p")
    store.put_bytes("p", b"v2", if_match=etag)
    with pytest.raises(PreconditionFailed, match="changed"):
        store.put_bytes("p", b"v3", if_match=etag)  # stale ETag
    assert store.get_bytes("p") == b"v2"
    with pytest.raises(PreconditionFailed):
        store.put_bytes("absent", b"x", if_match=etag)


@pytest.mark.parametrize("mode", ["if_absent", "if_match"])
def test_racing_conditional_writes_have_exactly_one_winner(store: LocalStore, mode: str) -> None:
    for trial in range(30):
        key = f"race/{trial}"
        etag = store.put_bytes(key, b"start") if mode == "if_match" else None
        kwargs = {"if_match": etag} if etag else {"if_absent": True}
        attempts = [functools.partial(store.put_bytes, key, f"w{i}".encode(), **kwargs) for i in range(4)]
        winners = race(attempts)
        assert len(winners) == 1, f"trial {trial}: winners {winners}"
        assert store.get_bytes(key) == f"w{winners[0]}".encode()


def test_open_store_schemes(tmp_path: Path) -> None:
    assert isinstance(open_store(tmp_path.as_uri()), LocalStore)
    assert isinstance(open_store(str(tmp_path)), LocalStore)
    with pytest.raises(StoreError, match="unsupported store URI"):
        open_store("ftp://host/x")
    with pytest.raises(StoreError, match="without a bucket"):
        open_store("s3:///prefix")
