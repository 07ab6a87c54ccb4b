"""`llmrec serve --workers 2` as its own process over a small real bundle: recommendations, the
request id, X-Bundle-Version, /metrics summed over both workers, the JSON access log, and a
promote then a rollback under load where every answer names one version (header == body)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from llmrec_tasks import publish
from llmrec_tasks.core.constants import DEFAULT_NAMESPACE
from llmrec_tasks.core.results import Published
from tests.bundle_factory import N_USERS, make_run
from tests.s3server import free_port

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
NS = DEFAULT_NAMESPACE
ROUTE = "/recommendations/{user_id}"


@dataclass
class Service:
    base: str
    store_uri: str
    access_log: Path
    metrics_dir: Path
    first: Published
    second: Published  # published, not promoted


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Service]:
    store_uri = (tmp_path / "store").as_uri()
    # The real ranking features: the service process serves with the ranking stage's own scorer.
    first = publish.run_publish(*make_run(store_uri, real_features=True))
    second = publish.run_publish(
        *make_run(
            store_uri, cutoff=datetime(2024, 2, 2, tzinfo=UTC), seed=1, real_features=True, promote=False
        )
    )
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    (metrics_dir / "counter_1.db").write_bytes(b"an earlier run's file")  # serve empties the folder
    port = free_port()
    access_log = tmp_path / "access.log"
    command = [
        *(sys.executable, "-m", "llmrec_tasks.cli", "serve", "--store", store_uri, "--namespace", NS),
        *("--port", str(port), "--workers", "2", "--poll-seconds", "0.2"),
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
    with access_log.open("w") as out, (tmp_path / "service.err").open("w") as err:
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=err)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(f"{base}/healthz", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, (tmp_path / "service.err").read_text()[-3000:]
            assert time.monotonic() < deadline, "the service did not become healthy"
            time.sleep(0.2)
        yield Service(base, store_uri, access_log, metrics_dir, first, second)
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def scrape(base: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"{base}/metrics", timeout=10).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def fresh_get(base: str, user: str) -> httpx.Response:
    """One request on a new connection, so that either worker may accept it."""
    return httpx.get(f"{base}/recommendations/{user}", params={"k": 5}, timeout=30)


def test_two_workers_serve_count_log_and_switch_versions_cleanly(service: Service) -> None:
    base, first, second = service.base, service.first, service.second
    # Recommendations, the request id and the version that answered.
    got = httpx.get(f"{base}/recommendations/u1", params={"k": 5}, headers={"X-Request-ID": "it-trace-1"})
    body = got.json()
    assert got.status_code == 200 and body["strategy"] == "personalized" and len(body["items"]) == 5
    assert got.headers["x-request-id"] == body["request_id"] == "it-trace-1"
    assert got.headers["x-bundle-version"] == body["version"] == first.version
    assert not (service.metrics_dir / "counter_1.db").exists()

    # /metrics: the counts of both workers, summed.
    users = [f"u{n % N_USERS}" for n in range(80)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        assert {r.status_code for r in pool.map(lambda u: fresh_get(base, u), users)} == {200}
    pids = {p.stem.rsplit("_", 1)[1] for p in service.metrics_dir.glob("counter_*.db")}
    assert len(pids) == 2, f"both workers should have answered: {pids}"
    samples = scrape(base)
    ok = (("method", "GET"), ("route", ROUTE), ("status", "200"))
    assert samples[("llmrec_requests_total", ok)] == 81
    assert samples[("llmrec_request_duration_seconds_bucket", (("le", "+Inf"), ("route", ROUTE)))] == 81
    for stage in ("history", "candidates", "features", "score", "reasons", "encode"):
        assert samples[("llmrec_stage_duration_seconds_count", (("stage", stage),))] == 81, stage
        assert ("llmrec_stage_duration_seconds_bucket", (("le", "0.016"), ("stage", stage))) in samples
    assert samples[("llmrec_bundle_info", (("version", first.version),))] == 1

    # The access log: one bare JSON object per line, on stdout.
    lines = [json.loads(line) for line in service.access_log.read_text().splitlines()]
    (traced,) = [line for line in lines if line["request_id"] == "it-trace-1"]
    assert traced["path"] == "/recommendations/u1" and traced["status"] == 200 and traced["user_id"] == "u1"
    assert traced["bundle_version"] == first.version and traced["duration_ms"] > 0
    assert sum(line["path"].startswith("/recommendations/") for line in lines) == 81

    # Promote, then roll back, under load: every answer is whole and names one version.
    answers: list[tuple[int, str | None, str | None]] = []
    stop = threading.Event()

    def load(worker: int) -> None:
        n = worker
        while not stop.is_set():
            response = fresh_get(base, f"u{n % N_USERS}")
            version = response.json().get("version") if response.status_code == 200 else None
            answers.append((response.status_code, response.headers.get("x-bundle-version"), version))
            n += 4

    def wait_serving(version: str, previous: str) -> None:
        deadline = time.monotonic() + 60
        while True:  # the gauge is the max over live workers: previous reads 0 once both moved
            samples = scrape(base)
            if (
                samples.get(("llmrec_bundle_info", (("version", version),))) == 1
                and samples.get(("llmrec_bundle_info", (("version", previous),))) == 0
            ):
                return
            assert time.monotonic() < deadline, f"the workers did not all move to {version}"
            time.sleep(0.2)

    threads = [threading.Thread(target=load, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(0.5)
        publish.promote(service.store_uri, NS, second.version)
        wait_serving(second.version, first.version)
        time.sleep(0.5)
        publish.rollback(service.store_uri, NS)
        wait_serving(first.version, second.version)
        time.sleep(0.5)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert answers and {status for status, _, _ in answers} == {200}
    assert all(header == version for _, header, version in answers), "a response mixed two versions"
    versions = [version for _, _, version in answers]
    assert set(versions) == {first.version, second.version}
    assert versions[-1] == first.version
