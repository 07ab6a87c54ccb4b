"""Prometheus metrics of the HTTP service (``GET /metrics``, text exposition format).

- ``llmrec_requests_total{route, method, status}``: every request, by route template;
- ``llmrec_request_errors_total{route, kind}``: responses with status >= 400, ``kind`` ``client``
  (4xx) or ``server`` (5xx, unhandled exceptions included);
- ``llmrec_request_duration_seconds{route}``: end to end inside the service (histogram);
- ``llmrec_stage_duration_seconds{stage}``: the recommender's stages (``Recommender.recommend``
  timings: history, candidates, features, score, reasons, popular) and ``encode`` (JSON);
- ``llmrec_bundle_info{version}``: 1 for the version being served.

With several uvicorn workers every process writes its values to files under
``PROMETHEUS_MULTIPROC_DIR`` (prometheus_client multiprocess mode, chosen when that variable is
set before prometheus_client is imported: ``llmrec serve --workers N`` sets it) and a scrape of any
worker sums counters and histograms over all of them, dead ones included; the bundle gauge is the
maximum over live workers (``livemax``), so during a switch both versions read 1.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
UNMATCHED_ROUTE = "unmatched"  # label of requests no route matched (404s): bounded cardinality
REQUEST_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0)
STAGE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128)
_LIVE_GAUGE_FILE = re.compile(r"^gauge_live\w+_(\d+)\.db$")


def multiprocess_dir() -> Path | None:
    """The multiprocess directory when this process runs in prometheus_client multiprocess mode."""
    value = os.environ.get(MULTIPROC_ENV)
    return Path(value) if value else None


class ServiceMetrics:
    """The service's metrics, in a registry of their own (several apps may live in one process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "llmrec_requests", "HTTP requests", ["route", "method", "status"], registry=self.registry
        )
        self.errors = Counter(
            "llmrec_request_errors",
            "HTTP responses with status >= 400 (kind: client 4xx, server 5xx)",
            ["route", "kind"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "llmrec_request_duration_seconds",
            "request latency inside the service",
            ["route"],
            buckets=REQUEST_BUCKETS,
            registry=self.registry,
        )
        self.stages = Histogram(
            "llmrec_stage_duration_seconds",
            "time per recommendation stage",
            ["stage"],
            buckets=STAGE_BUCKETS,
            registry=self.registry,
        )
        self.bundle = Gauge(
            "llmrec_bundle_info",
            "1 for the bundle version being served",
            ["version"],
            multiprocess_mode="livemax",
            registry=self.registry,
        )
        self._version: str | None = None

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.duration.labels(route).observe(seconds)
        if status >= 400:
            self.errors.labels(route, "server" if status >= 500 else "client").inc()

    def observe_stages(self, timings: dict[str, float]) -> None:
        for stage, seconds in timings.items():
            self.stages.labels(stage).observe(seconds)

    def serving(self, version: str) -> None:
        """The bundle gauge follows the version swapped in: the new one 1, the previous one 0."""
        if version == self._version:
            return
        if self._version is not None:
            self.bundle.labels(self._version).set(0)
        self.bundle.labels(version).set(1)
        self._version = version

    def render(self) -> bytes:
        """The text exposition: this process's registry, or every worker's files in multiprocess mode."""
        folder = multiprocess_dir()
        if folder is None:
            return generate_latest(self.registry)
        mark_dead_workers(folder)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=str(folder))
        return generate_latest(registry)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def mark_dead_workers(folder: Path) -> list[int]:
    """Drop the live gauges of worker processes that no longer run (uvicorn restarts crashed workers
    under new pids); their counters and histograms stay in the sums. Returns the pids marked."""
    dead = sorted(
        {
            pid
            for path in folder.glob("gauge_live*.db")
            if (match := _LIVE_GAUGE_FILE.match(path.name)) and not _alive(pid := int(match[1]))
        }
    )
    for pid in dead:
        multiprocess.mark_process_dead(pid, path=str(folder))
    return dead


def reset_multiprocess_dir(folder: Path) -> None:
    """Start a service with an empty multiprocess directory: files of an earlier run would be summed in."""
    folder.mkdir(parents=True, exist_ok=True)
    for path in folder.glob("*.db"):
        path.unlink()
