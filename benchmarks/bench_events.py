"""Feedback ingestion benchmark: ``POST /events`` throughput and ack latency, embedded state vs Redis.

For each state (``embedded``: no Redis URL; ``redis``: ``--redis-url``, a unique key prefix removed
afterwards) a ``llmrec serve --workers N`` runs in its own processes (``--workers``, default 2) over
an empty store (``/events`` needs no bundle), with its feedback log in a temporary folder. For each
batch size (``--batches``, default 1, 100, 1000), ``--clients`` client processes (default 8), each on
its own keep-alive connection, post batches of new event ids for ``--seconds`` (default 5): as fast
as they can (closed loop: the capacity, with queueing in the latency), or with ``--rate E`` at an
offered load of E events/s (open loop: each client sends on a fixed schedule and a latency counts
from the scheduled send time, so a slow answer also delays, and is charged to, the requests queued
behind it: no coordinated omission; every request scheduled within the run is sent). An ack is a 200 answer: the batch is fsync'ed in the log and recorded in the state. Reported per run:
events/s acknowledged, ack latency p50/p99 (ms), fsyncs (group commits) per request, errors, and the
CPU seconds of the service's processes and of the client processes; then the Redis/embedded ratios.

The clients are processes, not threads of one process: threads shared one GIL, and that process's
own full garbage collections stalled every client at once, a delay the open loop charged to the
service. They still share the host's cores with the service: on a 2-core machine they take a good
part of the CPU, so the figures are a lower bound of the service alone. Usage::

    python benchmarks/bench_events.py --redis-url redis://127.0.0.1:6379/0 --out /tmp/bench_events.json
"""

from __future__ import annotations

import argparse
import gc
import http.client
import json
import multiprocessing
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from itertools import count
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llmrec_tasks.core.settings import feedback_env  # noqa: E402
from llmrec_tasks.serving.feedback_log import EVENTS_KIND, read_segment, seal_segments  # noqa: E402


def percentiles(ms: list[float]) -> dict[str, float]:
    if not ms:
        return {"p50": float("nan"), "p99": float("nan")}
    return {"p50": round(float(np.percentile(ms, 50)), 2), "p99": round(float(np.percentile(ms, 99)), 2)}


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def service(workers: int, redis_url: str | None, prefix: str, log_dir: Path) -> Iterator[tuple[str, Any]]:
    """``llmrec serve`` until it answers; yields its base URL and its psutil process."""
    import httpx
    import psutil

    store = Path(tempfile.mkdtemp(prefix="llmrec-bench-events-store-"))
    port = free_port()
    command = [
        *(sys.executable, "-m", "llmrec_tasks.cli", "serve", "--store", store.as_uri()),
        *("--port", str(port), "--workers", str(workers), "--feedback-dir", str(log_dir)),
        *(("--redis-url", redis_url) if redis_url else ()),
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), feedback_env("feedback_key_prefix"): prefix}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    env.pop("LLMREC_REDIS_URL", None)
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{base}/openapi.json", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the service did not start")
            time.sleep(0.2)
        yield base, psutil.Process(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        shutil.rmtree(store, ignore_errors=True)


def cpu_seconds(process: Any) -> float:
    """User + system CPU of the service: the uvicorn parent and its worker processes."""
    total = 0.0
    for p in [process, *process.children(recursive=True)]:
        times = p.cpu_times()
        total += times.user + times.system
    return total


def body_template(size: int) -> tuple[bytes, bytes]:
    """A batch body with ``@B@`` where the batch number goes (unique event ids per batch)."""
    now = time.time()
    events = [
        f'{{"event_id":"@B@-{j}","user_id":"u{j % 97}","item_id":"i{j % 501}","type":"click","timestamp":{now}}}'
        for j in range(size)
    ]
    return ('{"events":[' + ",".join(events) + "]}").encode(), b"@B@"


def _client(
    base: str,
    body: tuple[bytes, bytes],
    batch_prefix: str,
    first_send: float,
    interval: float,
    seconds: float,
    ready: Any,
    go: Any,
    begin: Any,
    results: Any,
) -> None:
    """One client process on one keep-alive connection: post batches until ``seconds`` after
    ``begin``; every ``interval`` seconds from ``begin + first_send`` (open loop) or back to back
    (``interval`` 0). Puts its latencies (ms), errors, end time and CPU seconds on ``results``.

    ``http.client``, not httpx: 0.25 ms of client CPU per request instead of 0.9 ms (measured on
    this host), CPU the service then has on a shared 2-core machine."""
    template, mark = body
    url = urlsplit(base)
    connection = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port, timeout=30)
    headers = {"content-type": "application/json"}
    latencies: list[float] = []
    errors = 0
    connection.connect()  # before the clock starts
    gc.collect()
    gc.freeze()  # this process's own full collections then walk nothing of the imports
    ready.put(None)
    go.wait()
    cpu_before = resource.getrusage(resource.RUSAGE_SELF)
    scheduled = begin.value + first_send
    stop = begin.value + seconds
    for batch in count():
        body_bytes = template.replace(mark, f"{batch_prefix}-{batch}".encode())
        if interval:
            if scheduled >= stop:
                break
            time.sleep(max(0.0, scheduled - time.perf_counter()))
            started, scheduled = scheduled, scheduled + interval
        else:
            started = time.perf_counter()
            if started >= stop:
                break
        try:
            connection.request("POST", "/events", body=body_bytes, headers=headers)
            response = connection.getresponse()
            response.read()
            ok = response.status == 200
        except (OSError, http.client.HTTPException):
            connection.close()  # the next request reconnects
            ok = False
        if ok:
            latencies.append((time.perf_counter() - started) * 1000)
        else:
            errors += 1
    cpu_after = resource.getrusage(resource.RUSAGE_SELF)
    connection.close()
    cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    results.put({"latencies": latencies, "errors": errors, "end": time.perf_counter(), "cpu_s": cpu})


def run_load(
    base: str, size: int, clients: int, seconds: float, run_id: str, rate: float | None = None
) -> dict[str, Any]:
    """Post batches from ``clients`` processes for ``seconds``; at ``rate`` events/s if given, else flat out.

    One process per client, not threads: 8 threads of one process shared its GIL, and that
    process's own garbage collections (30-120 ms under load) stalled every client at once, which
    the open loop then charged to the service as latency."""
    ctx = multiprocessing.get_context("fork")  # the parent runs no threads here; fork is quick
    ready, results, go, begin = ctx.Queue(), ctx.Queue(), ctx.Event(), ctx.Value("d", 0.0)
    interval = clients * size / rate if rate else 0.0
    body = body_template(size)
    processes = [
        ctx.Process(
            target=_client,
            args=(
                base,
                body,
                f"{run_id}-{n}",
                n * interval / clients,
                interval,
                seconds,
                ready,
                go,
                begin,
                results,
            ),
            daemon=True,
        )
        for n in range(clients)
    ]
    for p in processes:
        p.start()
    for _ in processes:
        ready.get(timeout=60)
    begin.value = time.perf_counter()
    go.set()
    outcomes = [results.get(timeout=seconds + 120) for _ in processes]
    for p in processes:
        p.join(timeout=30)
    wall = max(o["end"] for o in outcomes) - begin.value
    acked = [ms for o in outcomes for ms in o["latencies"]]
    return {
        "batch": size,
        "offered_events_per_s": rate,
        "requests": len(acked),
        "events_per_s": round(len(acked) * size / wall),
        "ack_ms": percentiles(acked),
        "errors": sum(o["errors"] for o in outcomes),
        "wall_s": round(wall, 2),
        "client_cpu_s": round(sum(o["cpu_s"] for o in outcomes), 2),
    }


def bench_state(args: argparse.Namespace, state: str) -> list[dict[str, Any]]:
    redis_url = args.redis_url if state == "redis" else None
    prefix = f"llmrec-bench-{uuid.uuid4().hex[:10]}"
    log_dir = Path(tempfile.mkdtemp(prefix="llmrec-bench-events-log-"))
    out = []
    try:
        with service(args.workers, redis_url, prefix, log_dir) as (base, process):
            warmup = run_load(base, 10, args.clients, 1.0, "warmup")
            for size in args.batches:
                cpu_before = cpu_seconds(process)
                result = run_load(base, size, args.clients, args.seconds, f"{state}-{size}", args.rate)
                result["service_cpu_s"] = round(cpu_seconds(process) - cpu_before, 2)
                result["state"] = state
                out.append(result)
                print(json.dumps(result), flush=True)
        # after the service stopped: every acknowledged event is in the log (plus the warm-up's)
        logged = sum(len(read_segment(s).rows[EVENTS_KIND]) for s in seal_segments(log_dir))
        acked = sum(r["requests"] * r["batch"] for r in [warmup, *out])
        out.append({"state": state, "events_in_log": logged, "events_acked": acked})
        print(json.dumps(out[-1]), flush=True)
    finally:
        shutil.rmtree(log_dir, ignore_errors=True)
        if redis_url:
            import redis

            client = redis.Redis.from_url(redis_url)
            keys = list(client.scan_iter(f"{prefix}:*", count=10_000))
            for start in range(0, len(keys), 10_000):
                client.delete(*keys[start : start + 10_000])
            client.close()
    return out


def print_table(results: dict[str, Any]) -> None:
    runs = {(r["state"], r["batch"]): r for rs in results["runs"].values() for r in rs if "batch" in r}
    print(
        f"\nPOST /events, {results['workers']} workers, {results['clients']} clients, "
        f"offered {results['offered_events_per_s'] or 'flat out'} events/s, load {results['load_average']}"
    )
    header = f"{'batch':>6} | {'embedded ev/s':>13} {'p50':>7} {'p99':>7} | {'redis ev/s':>10} {'p50':>7} {'p99':>7} | "
    print(header + f"{'ev/s ratio':>10} {'p99 ratio':>9}")
    for size in results["batches"]:
        e, r = runs.get(("embedded", size)), runs.get(("redis", size))
        left = f"{e['events_per_s']:>13} {e['ack_ms']['p50']:>7} {e['ack_ms']['p99']:>7}" if e else " " * 29
        right = f"{r['events_per_s']:>10} {r['ack_ms']['p50']:>7} {r['ack_ms']['p99']:>7}" if r else " " * 26
        ratio = ""
        if e and r:
            ratio = f"{r['events_per_s'] / e['events_per_s']:>10.2f} {r['ack_ms']['p99'] / e['ack_ms']['p99']:>9.2f}"
        print(f"{size:>6} | {left} | {right} | {ratio}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--redis-url", default=None, help="also measure with Redis (else embedded only)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 100, 1000])
    parser.add_argument(
        "--rate", type=float, default=None, help="offered events/s (open loop); default: flat out"
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    states = ["embedded", *(["redis"] if args.redis_url else [])]
    results: dict[str, Any] = {
        "workers": args.workers,
        "clients": args.clients,
        "batches": args.batches,
        "offered_events_per_s": args.rate,
        "cpus": os.cpu_count(),
        "runs": {state: bench_state(args, state) for state in states},
    }
    results["load_average"] = [round(x, 2) for x in os.getloadavg()]
    print_table(results)
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
