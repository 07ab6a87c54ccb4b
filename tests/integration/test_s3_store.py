"""S3Store against a real S3-compatible HTTP server (moto server mode): same interface as LocalStore."""

from __future__ import annotations

import functools
import json
import logging
import os
import time

import pytest

from llmrec_tasks.core.errors import StoreError
from llmrec_tasks.storage import store as store_module
from llmrec_tasks.storage.store import ObjectNotFound, PreconditionFailed, S3Store, open_store
from tests.bundle_factory import race
from tests.s3server import FlakyProxy, create_bucket, free_port

pytestmark = pytest.mark.integration


def test_round_trip_list_delete(s3_store_uri: str, tmp_path) -> None:
    store = open_store(s3_store_uri)
    assert isinstance(store, S3Store) and store.uri == s3_store_uri
    etag = store.put_bytes("a/b/c.json", b"{}")
    assert store.get_with_etag("a/b/c.json") == (b"{}", etag)
    source = tmp_path / "src.bin"
    source.write_bytes(b"x" * 1_000_000)
    store.put_file("a/d.bin", source)
    assert store.get_file("a/d.bin", tmp_path / "out.bin").read_bytes() == source.read_bytes()
    assert store.list("a") == ["a/b/c.json", "a/d.bin"]
    assert store.list("") == ["a/b/c.json", "a/d.bin"]
    assert store.exists("a/d.bin") and not store.exists("a/b") and not store.exists("a/nope")
    store.delete("a/d.bin")
    assert store.list("a") == ["a/b/c.json"]
    assert store.uri_for("a/b/c.json") == f"{s3_store_uri}/a/b/c.json"


def test_large_files_stream_in_parts(s3_store_uri: str, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_module, "MULTIPART_CHUNK", 5 * 2**20)  # S3's smallest part
    store = open_store(s3_store_uri)
    source = tmp_path / "big.bin"
    source.write_bytes(os.urandom(12 * 2**20))
    etag = store.put_file("big.bin", source)
    assert etag.strip('"').endswith("-3")  # a multipart upload of three parts
    assert store.get_file("big.bin", tmp_path / "back.bin").read_bytes() == source.read_bytes()
    assert store.put_file("once.bin", source, if_absent=True).strip('"').endswith("-3")
    with pytest.raises(PreconditionFailed):
        store.put_file("once.bin", source, if_absent=True)
    assert store.get_file("once.bin", tmp_path / "once.bin").read_bytes() == source.read_bytes()
    client = store.client
    assert not client.list_multipart_uploads(Bucket=store.bucket).get("Uploads")  # the loser's parts are gone
    with pytest.raises(ObjectNotFound):
        store.get_file("missing.bin", tmp_path / "missing.bin")
    assert not (tmp_path / "missing.bin").exists()
    with pytest.raises(StoreError, match="bucket 'no-such-bucket-here' does not exist"):
        open_store("s3://no-such-bucket-here/x").put_file("big.bin", source)


def test_errors_are_store_errors(s3_store_uri: str, s3_env: str) -> None:
    store = open_store(s3_store_uri)
    with pytest.raises(ObjectNotFound, match="does not exist"):
        store.get_bytes("missing.json")
    with pytest.raises(StoreError, match="bucket 'no-such-bucket-here' does not exist"):
        open_store("s3://no-such-bucket-here/x").put_bytes("k", b"x")
    with pytest.raises(StoreError, match="invalid object key"):
        store.put_bytes("../escape", b"x")


def test_conditional_writes(s3_store_uri: str) -> None:
    store = open_store(s3_store_uri)
    store.put_bytes("k", b"first", if_absent=True)
    with pytest.raises(PreconditionFailed):
        store.put_bytes("k", b"second", if_absent=True)
    _, etag = store.get_with_etag("k")
    store.put_bytes("k", b"third", if_match=etag)
    with pytest.raises(PreconditionFailed):
        store.put_bytes("k", b"fourth", if_match=etag)
    assert store.get_bytes("k") == b"third"


@pytest.mark.parametrize("mode", ["if_absent", "if_match"])
def test_racing_conditional_writes_have_exactly_one_winner(s3_store_uri: str, mode: str) -> None:
    store = open_store(s3_store_uri)
    for trial in range(15):
        key = f"race/{trial}"
        etag = store.put_bytes(key, b"start") if mode == "if_match" else None
        kwargs = {"if_match": etag} if etag else {"if_absent": True}
        winners = race(
            [functools.partial(store.put_bytes, key, f"w{i}".encode(), **kwargs) for i in range(3)]
        )
        assert len(winners) == 1, f"trial {trial}: winners {winners}"
        assert store.get_bytes(key) == f"w{winners[0]}".encode()


def test_5xx_answers_are_retried_with_backoff(flaky_proxy: FlakyProxy) -> None:
    bucket = create_bucket(flaky_proxy.endpoint)
    store = open_store(f"s3://{bucket}/p")
    flaky_proxy.plan.fail_next = 3  # AWS_MAX_ATTEMPTS=4: the 4th attempt gets through
    store.put_bytes("k", b"payload")
    assert flaky_proxy.plan.failed == 3
    flaky_proxy.plan.fail_next = 2
    assert store.get_bytes("k") == b"payload"
    assert flaky_proxy.plan.failed == 5


def test_persistent_5xx_fails_with_a_store_error(flaky_proxy: FlakyProxy) -> None:
    bucket = create_bucket(flaky_proxy.endpoint)
    store = open_store(f"s3://{bucket}/p")
    flaky_proxy.plan.fail_next = 100
    with pytest.raises(StoreError, match=r"S3 put .* failed"):
        store.put_bytes("k", b"payload")
    assert flaky_proxy.plan.failed == 4  # every attempt was made


def test_slow_store_still_works(flaky_proxy: FlakyProxy) -> None:
    bucket = create_bucket(flaky_proxy.endpoint)
    store = open_store(f"s3://{bucket}/p")
    flaky_proxy.plan.delay_s = 0.5
    started = time.monotonic()
    store.put_bytes("k", b"slow")
    assert store.get_bytes("k") == b"slow"
    assert time.monotonic() - started >= 1.0


def test_connection_refused_fails_fast_with_a_clear_error(
    s3_env: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    started = time.monotonic()
    with pytest.raises(StoreError, match="failed after retries: Could not connect"):
        open_store("s3://any-bucket/p").get_bytes("k")
    assert time.monotonic() - started < 30


def test_client_from_the_airflow_connection_inside_a_task(
    moto_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Inside an Airflow task the endpoint and credentials come from connection aws_default."""
    from tests.s3server import TEST_CREDENTIALS

    for name, value in TEST_CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    bucket = create_bucket(moto_server)
    for name in (*TEST_CREDENTIALS, "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AIRFLOW_CTX_DAG_ID", "llmrec_daily")
    connection = {
        "conn_type": "aws",
        "login": "testing",
        "password": "testing",
        "extra": {"endpoint_url": moto_server, "region_name": "us-east-1"},
    }
    monkeypatch.setenv("AIRFLOW_CONN_AWS_DEFAULT", json.dumps(connection))
    store = open_store(f"s3://{bucket}/p")
    assert store.client.meta.endpoint_url == moto_server
    store.put_bytes("k", b"via aws_default")
    assert store.get_bytes("k") == b"via aws_default"


def test_secrets_are_never_logged(
    s3_env: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "sekrit-value-0123456789")
    bucket = create_bucket(s3_env)
    caplog.set_level(logging.DEBUG)
    store = open_store(f"s3://{bucket}/p")
    store.put_bytes("k", b"x")
    store.get_bytes("k")
    with pytest.raises(ObjectNotFound):
        store.get_bytes("missing")
    assert caplog.records
    assert not [r for r in caplog.records if "sekrit-value" in r.getMessage()]
