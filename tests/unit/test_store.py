"""LocalStore: atomic writes, conditional writes (create-if-absent, compare-and-swap), key safety;
verified local files (a file store's own file, an S3 store's checked cache, on the moto server)."""

from __future__ import annotations

import functools
import os
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from llmrec_tasks.core.errors import StoreError
from llmrec_tasks.storage import store as store_module
from llmrec_tasks.storage.store import (
    BUNDLE_CACHE_ENV,
    ContentMismatch,
    LocalStore,
    ObjectNotFound,
    PreconditionFailed,
    S3Store,
    check_file,
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


def test_local_file_is_the_objects_own_file_checked_size_first(
    store: LocalStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = bytes(range(256)) * 12_000
    store.put_bytes("ns/bundles/v/a.bin", data)
    assert (
        store.local_file("ns/bundles/v/a.bin", len(data), content_etag(data))
        == store.root / "ns/bundles/v/a.bin"
    )
    changed = bytearray(data)
    changed[len(data) // 2] ^= 0x01
    store.put_bytes("ns/bundles/v/a.bin", bytes(changed))
    with pytest.raises(ContentMismatch, match="sha256") as mismatch:
        store.local_file("ns/bundles/v/a.bin", len(data), content_etag(data))
    assert mismatch.value.actual == content_etag(bytes(changed))

    def no_hashing(path: Path) -> str:
        raise AssertionError(f"{path} was hashed although its size is wrong")

    monkeypatch.setattr(store_module, "file_sha256", no_hashing)
    with pytest.raises(ContentMismatch, match="size") as mismatch:
        store.local_file("ns/bundles/v/a.bin", len(data) + 1, content_etag(data))
    assert (mismatch.value.actual, mismatch.value.expected) == (len(data), len(data) + 1)
    with pytest.raises(ObjectNotFound):
        store.local_file("ns/bundles/v/missing.bin", 1, content_etag(b"x"))


def test_checking_a_file_streams_it(tmp_path: Path) -> None:
    """The sha256 is computed over 1 MiB reads: Python never holds the whole file."""
    path = tmp_path / "big.bin"
    data = os.urandom(24 * 2**20)
    path.write_bytes(data)
    tracemalloc.start()
    try:
        check_file(path, len(data), content_etag(data), path.as_uri())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * store_module.HASH_CHUNK


@pytest.fixture
def s3_store(s3_store_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[S3Store, list[str]]:
    """An S3 store whose bundle cache is under tmp_path, and the keys of its GetObject calls."""
    monkeypatch.setenv(BUNDLE_CACHE_ENV, str(tmp_path / "cache"))
    s3 = open_store(s3_store_uri)
    assert isinstance(s3, S3Store)
    gets: list[str] = []
    get_object = s3.client.get_object

    def counted(**kwargs: Any) -> Any:
        gets.append(kwargs["Key"])
        return get_object(**kwargs)

    monkeypatch.setattr(s3.client, "get_object", counted)
    return s3, gets


def test_s3_local_file_downloads_once_then_reuses_its_checked_cache(
    s3_store: tuple[S3Store, list[str]], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    s3, gets = s3_store
    key = "ns/bundles/v1/embeddings.npy"
    data = os.urandom(3 * 2**20 + 17)
    s3.put_bytes(key, data)
    size, sha = len(data), content_etag(data)
    path = s3.local_file(key, size, sha)
    assert path == tmp_path / "cache" / s3.bucket / s3.prefix / key
    assert path.read_bytes() == data and len(gets) == 1
    assert s3.local_file(key, size, sha) == path and len(gets) == 1  # the verified copy is reused
    assert [p.name for p in path.parent.iterdir()] == ["embeddings.npy"]  # no temp file left

    tampered = bytearray(data)
    tampered[size // 2] ^= 0x01
    path.write_bytes(bytes(tampered))  # same size: only the sha256 tells
    with caplog.at_level("WARNING", logger="llmrec_tasks.storage.store"):
        assert s3.local_file(key, size, sha).read_bytes() == data
    assert len(gets) == 2 and "fails its check" in caplog.text


def test_s3_local_file_caches_nothing_that_differs_from_the_expected(
    s3_store: tuple[S3Store, list[str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s3, gets = s3_store
    key = "ns/bundles/v1/index.faiss"
    data = os.urandom(2**20)
    s3.put_bytes(key, data)
    with pytest.raises(ContentMismatch, match="sha256"):
        s3.local_file(key, len(data), content_etag(b"something else"))

    def no_body_read(chunks: Any, out: Any) -> str:
        raise AssertionError("the body was read although its length is wrong")

    monkeypatch.setattr(store_module, "_copy_hashing", no_body_read)
    with pytest.raises(ContentMismatch, match="size"):
        s3.local_file(key, len(data) - 1, content_etag(data))
    assert len(gets) == 2
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
