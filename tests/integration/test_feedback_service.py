"""`llmrec serve --workers 2` as its own process with the real Redis at 127.0.0.1:6379 (a unique key
prefix per test, removed afterwards; skipped when Redis is not reachable) and the flush to a moto S3
store: events change the very next response, and neither a kill -9 of the service during ingestion
and a flush nor Redis dropping the service's connections loses or doubles an acknowledged event;
nor does a kill -9 of `llmrec flush-events` between its uploads, once the flush is rerun."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import pytest

from llmrec_tasks import feedback, publish
from llmrec_tasks.core import constants as C
from llmrec_tasks.core.settings import feedback_env
from llmrec_tasks.data.feedback import read_feedback_events
from llmrec_tasks.feedback import flush_events
from llmrec_tasks.serving.feedback_log import EVENTS_KIND, FeedbackLog, encode_record, seal_segments
from llmrec_tasks.serving.realtime import FeedbackEvent, RedisState
from llmrec_tasks.storage.store import ObjectStore, open_store
from tests.bundle_factory import make_run
from tests.integration.conftest import REDIS_URL
from tests.s3server import FlakyProxy, free_port

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
NS = C.DEFAULT_NAMESPACE
BATCH = 20


@dataclass
class Service:
    store_uri: str
    log_dir: Path
    prefix: str
    tmp: Path
    settings: dict[str, str] = field(default_factory=dict)  # feedback settings by key
    proc: subprocess.Popen[bytes] | None = None
    base: str = ""
    starts: int = 0

    def start(self) -> None:
        port = free_port()
        command = [
            *(
                sys.executable,
                "-m",
                "llmrec_tasks.cli",
                "serve",
                "--store",
                self.store_uri,
                "--namespace",
                NS,
            ),
            *("--port", str(port), "--workers", "2", "--redis-url", REDIS_URL),
            *("--feedback-dir", str(self.log_dir)),
        ]
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            feedback_env("feedback_key_prefix"): self.prefix,
            **{feedback_env(key): value for key, value in self.settings.items()},
        }
        self.starts += 1
        err = (self.tmp / f"service-{self.starts}.err").open("w")
        # its own process group: a kill -9 reaches the workers too
        self.proc = subprocess.Popen(
            command, env=env, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True
        )
        self.base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(f"{self.base}/healthz", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert self.proc.poll() is None, (self.tmp / f"service-{self.starts}.err").read_text()[-3000:]
            assert time.monotonic() < deadline, "the service did not become healthy"
            time.sleep(0.2)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, sig)
        self.proc.wait(timeout=60)


@pytest.fixture
def service(tmp_path: Path, redis_prefix: str, request: pytest.FixtureRequest) -> Iterator[Service]:
    """The running service; ``indirect`` parametrization passes feedback settings by key."""
    store_uri = (tmp_path / "store").as_uri()
    publish.run_publish(*make_run(store_uri, real_features=True, label_feature="sem_last_1"))
    settings = getattr(request, "param", {})
    svc = Service(store_uri, tmp_path / "feedback-log", redis_prefix, tmp_path, settings)
    svc.start()
    try:
        yield svc
    finally:
        if svc.proc is not None and svc.proc.poll() is None:
            svc.kill(signal.SIGTERM)


def events(batch: int, user: str = "u1", item: str = "i3") -> list[dict[str, object]]:
    now = time.time()
    return [
        {"event_id": f"b{batch}-{j}", "user_id": user, "item_id": item, "type": "view", "timestamp": now}
        for j in range(BATCH)
    ]


def all_flushed_events(s3_store_uri: str) -> pd.DataFrame:
    """Every event row in the store, as flushed (repeats across flush runs kept)."""
    store = open_store(s3_store_uri)
    keys = store.list(f"{NS}/{C.FEEDBACK_DIR}/{C.FEEDBACK_EVENTS}/")
    return pd.concat([pd.read_parquet(io.BytesIO(store.get_bytes(k))) for k in keys])


def flushed_events(svc: Service, s3_store_uri: str) -> pd.DataFrame:
    result = flush_events(s3_store_uri, NS, svc.log_dir)
    assert result.segments > 0
    return all_flushed_events(s3_store_uri)


@dataclass
class Sender:
    """Client threads posting numbered batches; which were acknowledged, which not."""

    base: str
    acked: set[int] = field(default_factory=set)
    failed: set[int] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)
    next_batch: int = 0
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        with httpx.Client(base_url=self.base, timeout=10) as client:
            while not self.stop.is_set():
                with self.lock:
                    batch, self.next_batch = self.next_batch, self.next_batch + 1
                try:
                    ok = client.post("/events", json={"events": events(batch)}).status_code == 200
                except httpx.TransportError:
                    ok = False
                with self.lock:
                    (self.acked if ok else self.failed).add(batch)

    def run_threads(
        self, n: int, until: threading.Event | None = None, seconds: float = 30
    ) -> list[threading.Thread]:
        threads = [threading.Thread(target=self.run, daemon=True) for _ in range(n)]
        for t in threads:
            t.start()
        return threads


def retry_until_acked(base: str, batches: set[int]) -> None:
    with httpx.Client(base_url=base, timeout=10) as client:
        for batch in sorted(batches):
            for _ in range(50):
                response = client.post("/events", json={"events": events(batch)})
                if response.status_code == 200:
                    break
                time.sleep(0.1)
            else:
                raise AssertionError(f"batch {batch} never acknowledged: {response.text}")


def assert_exactly_once(rows: pd.DataFrame, batches: int) -> None:
    expected = {f"b{b}-{j}" for b in range(batches) for j in range(BATCH)}
    counts = rows[C.EVENT_ID].value_counts()
    assert counts.max() == 1, counts[counts > 1].head()
    assert set(counts.index) == expected, (
        len(expected - set(counts.index)),
        len(set(counts.index) - expected),
    )


def test_events_change_the_next_response_and_reach_the_store(service: Service, s3_store_uri: str) -> None:
    with httpx.Client(base_url=service.base, timeout=10) as client:
        before = client.get("/recommendations/u1", params={"k": 100}).json()
        x = before["items"][-1]["item_id"]
        click = {
            "event_id": "click-1",
            "user_id": "u1",
            "item_id": x,
            "type": "click",
            "timestamp": time.time(),
        }
        assert client.post("/events", json={"events": [click]}).json()["accepted"] == 1
        # every worker reads the shared state: several requests, all see the click at once
        for _ in range(6):
            after = client.get("/recommendations/u1", params={"k": 100}).json()
            assert after["history_length"] == before["history_length"] + 1
            assert x not in [i["item_id"] for i in after["items"]]
        assert client.post("/events", json={"events": [click]}).json()["duplicates"] == 1
    service.kill(signal.SIGTERM)  # a clean stop closes both workers' segments
    rows = flushed_events(service, s3_store_uri)
    assert rows[C.EVENT_ID].tolist() == ["click-1"] and rows[C.ITEM_ID].tolist() == [x]
    store = open_store(s3_store_uri)
    shown = store.list(f"{NS}/{C.FEEDBACK_DIR}/{C.FEEDBACK_IMPRESSIONS}/")
    impressions = pd.concat([pd.read_parquet(io.BytesIO(store.get_bytes(k))) for k in shown])
    assert impressions[C.REQUEST_ID].nunique() == 7 and (impressions[C.ARM] == C.CURRENT_ARM).all()


@dataclass
class Flusher:
    """`flush_events` over and over beside the live service (as a cron would), until stopped;
    once ``armed``, it kills the service right after its next upload, mid-flush."""

    service: Service
    store_uri: str
    segments: int = 0
    armed: threading.Event = field(default_factory=threading.Event)
    killed: threading.Event = field(default_factory=threading.Event)
    stop: threading.Event = field(default_factory=threading.Event)

    def open_store(self, uri: str) -> ObjectStore:
        """The flush's store: each upload, when armed, is followed by the service's kill -9."""
        store = open_store(uri)
        put = store.put_bytes

        def put_bytes(key: str, data: bytes, **kwargs: Any) -> str:
            etag = put(key, data, **kwargs)
            if self.armed.is_set() and not self.killed.is_set():
                self.service.kill(signal.SIGKILL)  # requests in flight, segments open
                self.killed.set()
            return etag

        store.put_bytes = put_bytes  # type: ignore[method-assign]
        return store

    def run(self) -> None:
        while not self.stop.is_set():
            self.segments += flush_events(self.store_uri, NS, self.service.log_dir).segments
            time.sleep(0.05)


@pytest.mark.parametrize("service", [{"feedback_segment_seconds": "0.5"}], indirect=True)
def test_kill_9_during_ingestion_and_flush_loses_and_doubles_nothing(
    service: Service, s3_store_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    sender = Sender(service.base)
    threads = sender.run_threads(4)
    flusher = Flusher(service, s3_store_uri)  # segments close every 0.5 s: flushed meanwhile
    monkeypatch.setattr(feedback, "open_store", flusher.open_store)
    flushing = threading.Thread(target=flusher.run, daemon=True)
    flushing.start()
    deadline = time.monotonic() + 60
    while (len(sender.acked) < 100 or not flusher.segments) and time.monotonic() < deadline:
        time.sleep(0.05)
    flusher.armed.set()
    assert flusher.killed.wait(timeout=60), "no upload after arming the kill"
    sender.stop.set()
    for t in threads:
        t.join(timeout=30)
    flusher.stop.set()
    flushing.join(timeout=120)
    assert not flushing.is_alive(), "the flush beside the service did not finish"
    acked, failed = set(sender.acked), set(sender.failed)
    assert len(acked) >= 100 and failed and flusher.segments, (len(acked), len(failed), flusher.segments)
    service.start()  # the same log folder: the dead workers' segments are left open, unlocked
    retry_until_acked(service.base, failed)  # the client retries what was never acknowledged
    service.kill(signal.SIGTERM)
    flush_events(s3_store_uri, NS, service.log_dir)
    # What the daily run trains on: every event once (a retry of a batch logged before the kill
    # but never acknowledged is stored again when its first copy was flushed by an earlier run).
    assert_exactly_once(read_feedback_events(open_store(s3_store_uri), NS), sender.next_batch)
    rows = all_flushed_events(s3_store_uri)
    repeated = set(rows[C.EVENT_ID][rows[C.EVENT_ID].duplicated()])
    assert repeated <= {f"b{b}-{j}" for b in failed for j in range(BATCH)}, len(repeated)


def test_redis_dropping_the_service_connections_loses_nothing(service: Service, s3_store_uri: str) -> None:
    import redis

    admin = redis.Redis.from_url(REDIS_URL)
    name = RedisState.client_name(service.prefix)
    sender = Sender(service.base)
    threads = sender.run_threads(4)
    killed = 0
    deadline = time.monotonic() + 60
    while (len(sender.acked) < 200 or killed < 5) and time.monotonic() < deadline:
        for client in admin.client_list():
            if client.get("name") == name:
                killed += admin.client_kill_filter(_id=client["id"])
        time.sleep(0.05)
    sender.stop.set()
    for t in threads:
        t.join(timeout=30)
    admin.close()
    assert killed >= 5 and len(sender.acked) >= 200, (killed, len(sender.acked))
    retry_until_acked(service.base, set(sender.failed))
    service.kill(signal.SIGTERM)
    rows = flushed_events(service, s3_store_uri)
    assert_exactly_once(rows, sender.next_batch)


def test_a_flush_killed_between_uploads_and_rerun_stores_each_event_once(
    tmp_path: Path, moto_server: str, flaky_proxy: FlakyProxy
) -> None:
    import boto3

    from tests.s3server import TEST_CREDENTIALS, create_bucket

    bucket = create_bucket(moto_server)
    log_dir = tmp_path / "log"
    segments = 12
    for s in range(segments):  # one closed segment each; "again" repeats in every third one
        rows = [FeedbackEvent(f"s{s}-{j}", "u1", "i3", 1.7e9 + s, 1.0, "click", None) for j in range(5)]
        if s % 3 == 0:
            rows.append(FeedbackEvent("again", "u1", "i3", 1.7e9, 1.0, "click", None))
        log = FeedbackLog(log_dir, segment_bytes=1 << 20, segment_seconds=3600)
        log.append(encode_record(EVENTS_KIND, [e.row(e.timestamp + 1) for e in rows])).result(timeout=10)
        log.close()
    expected = {f"s{s}-{j}" for s in range(segments) for j in range(5)} | {"again"}
    command = [
        *(sys.executable, "-m", "llmrec_tasks.cli", "flush-events"),
        *("--store", f"s3://{bucket}/llmrec", "--namespace", NS, "--feedback-dir", str(log_dir)),
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # the flush reaches the store through the slow proxy
    # moto itself, seen directly: the first object lands while the flush waits on its read-back
    s3 = boto3.client(
        "s3",
        endpoint_url=moto_server,
        aws_access_key_id=TEST_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=TEST_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        region_name=TEST_CREDENTIALS["AWS_DEFAULT_REGION"],
    )
    prefix = f"llmrec/{NS}/{C.FEEDBACK_DIR}/{C.FEEDBACK_EVENTS}/"

    def stored() -> dict[str, bytes]:
        listed = s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
        return {o["Key"]: s3.get_object(Bucket=bucket, Key=o["Key"])["Body"].read() for o in listed}

    flaky_proxy.plan.delay_s = 0.3  # every store request: the flush takes > 7 s
    flush = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("KeyCount"):
        assert flush.poll() is None, flush.communicate()[1].decode()[-3000:]
        assert time.monotonic() < deadline, "the flush uploaded nothing"
        time.sleep(0.02)
    flush.send_signal(signal.SIGKILL)  # after its first upload, before the last
    flush.communicate(timeout=60)
    before = stored()
    assert 1 <= len(before) < segments, len(before)
    assert len(seal_segments(log_dir)) == segments  # nothing removed: every segment is flushed again

    flaky_proxy.plan.delay_s = 0.0
    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    after = stored()
    assert len(after) == segments and not list(log_dir.iterdir())
    assert {k: after[k] for k in before} == before  # the objects written before the kill, byte for byte
    rows = pd.concat([pd.read_parquet(io.BytesIO(data)) for data in after.values()])
    counts = rows[C.EVENT_ID].value_counts()
    assert counts.max() == 1 and set(counts.index) == expected, counts[counts > 1]
