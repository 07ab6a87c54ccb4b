"""Serving benchmark: latency and throughput of top-10 requests, beside the raw model floor.

Measured on a published bundle (by default the MovieLens one; ``--build`` runs the pipeline first
when the namespace has no current bundle):

- ``load``: fetching + verifying + parsing the bundle (what a new ``current`` costs the service);
- ``in_process``: ``Recommender.recommend(user_id, k=10)`` one request after another;
- ``http``: ``GET /recommendations/{user_id}?k=10`` against ``llmrec serve --workers N`` in its own
  processes, for each N of ``--workers`` (default 1 and 2), ``--clients`` client threads (default 8)
  each on its own keep-alive connection; errors are non-200 answers and transport failures;
- ``switch``: the same load on the most workers while ``current`` is promoted to another complete
  version and rolled back (each awaited until every worker serves it, read from ``/metrics``):
  errors, and answers whose ``X-Bundle-Version`` header differs from the body's ``version`` (mixed);
  skipped when the namespace has a single version. The promote and rollback skip the publisher's
  serving check (``check=False``): what is measured is the service, not the publisher;
- ``floor``: for the same users, only the FAISS search (profile vector, ``num_candidates``) plus
  LightGBM scoring of that user's precomputed candidate features: the time no serving code adds.

The in-process figures run with the native thread pools at one thread, as the service's compute
thread does (``recommender.single_threaded_native_code``). The ratios are p50(end to end) / p50(floor) and
p99(HTTP) / p99(in process). Users are drawn (with replacement, fixed seed) from the bundle's users
with a history. The service's access log goes to /dev/null. The results also hold each stage's p50
(``recommend(..., timings=)``) and the top ``k`` of the first ``--answers`` users.

``--before results.json`` (the ``--out`` of a run on the code before a change, same bundle) prints
floor, before and after side by side as ratios to the floor, and the users whose recommendations
changed; ``--in-process-only`` skips the HTTP runs. Usage::

    python benchmarks/bench_serving.py --store file:///tmp/llmrec-bench --build ../shared/data/ml-latest-small
    python benchmarks/bench_serving.py --store file:///tmp/llmrec-bench --in-process-only --before old.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llmrec_tasks import publish  # noqa: E402
from llmrec_tasks.core import constants as C  # noqa: E402
from llmrec_tasks.serving import recommender as serving  # noqa: E402
from llmrec_tasks.storage import registry  # noqa: E402
from llmrec_tasks.storage.store import open_store  # noqa: E402

log = logging.getLogger("bench_serving")
DEFAULT_DATA = ROOT.parent / "shared/data/ml-latest-small"


def percentiles(ms: list[float]) -> dict[str, float]:
    values = np.asarray(ms)
    return {
        "p50_ms": round(float(np.percentile(values, 50)), 3),
        "p99_ms": round(float(np.percentile(values, 99)), 3),
        "mean_ms": round(float(values.mean()), 3),
    }


def ensure_bundle(store_uri: str, namespace: str, data: str | None) -> None:
    """Run the whole pipeline on ``data`` when the namespace has nothing promoted yet."""
    pointer, _ = registry.read_pointer(open_store(store_uri), namespace)
    if pointer is not None:
        return
    if data is None:
        raise SystemExit(f"{store_uri} has no current bundle in {namespace!r}: pass --build DATA")
    from llmrec_tasks.core.config import RunConfig
    from llmrec_tasks.pipeline import run_pipeline

    log.info("building a bundle from %s (whole pipeline)", data)
    result = run_pipeline(RunConfig(data_uri=data, store_uri=store_uri, namespace=namespace))
    log.info("published %s", result["publish"].to_json()["version"])


def sample_users(bundle: serving.Bundle, n: int, seed: int) -> list[str]:
    users = list(bundle.user_row)
    return [users[i] for i in np.random.default_rng(seed).integers(0, len(users), n)]


def bench_in_process(rec: serving.Recommender, users: list[str], k: int) -> dict[str, Any]:
    for user in users[:20]:  # warm-up
        rec.recommend(user_id=user, k=k)
    times, cpu = [], []
    started = time.perf_counter()
    for user in users:
        t0, c0 = time.perf_counter(), time.thread_time()
        result = rec.recommend(user_id=user, k=k)
        times.append((time.perf_counter() - t0) * 1000)
        cpu.append((time.thread_time() - c0) * 1000)
        assert len(result.items) == k
    wall = time.perf_counter() - started
    return {
        **percentiles(times),
        **{f"cpu_{name}": value for name, value in percentiles(cpu).items()},
        "requests": len(users),
        "throughput_rps": round(len(users) / wall, 1),
    }


def answers(rec: serving.Recommender, users: list[str], k: int) -> dict[str, list[str]]:
    """Top ``k`` item ids per user: to check that a change keeps the recommendations."""
    return {user: [i.item_id for i in rec.recommend(user_id=user, k=k).items] for user in users}


def bench_floor(rec: serving.Recommender, users: list[str], num_candidates: int) -> dict[str, Any]:
    """FAISS search of a profile vector + LightGBM on features computed beforehand (not timed)."""
    bundle = rec.bundle
    prepared = []
    for user in dict.fromkeys(users):
        history = bundle.history(user)
        profile = bundle.embeddings[history.items[-50:]].mean(axis=0)
        profile /= max(float(np.linalg.norm(profile)), 1e-9)
        _, features = rec.scorer(history, time.time())
        prepared.append((user, np.ascontiguousarray(profile[None, :], dtype=np.float32), features))
    by_user = {user: (profile, features) for user, profile, features in prepared}
    faiss_ms, lgbm_ms, total_ms, cpu_ms = [], [], [], []
    k = min(num_candidates, bundle.index.ntotal)
    for user in users:
        profile, features = by_user[user]
        t0, c0 = time.perf_counter(), time.thread_time()
        bundle.index.search(profile, k)
        t1 = time.perf_counter()
        bundle.booster.predict(features, num_threads=1)
        t2 = time.perf_counter()
        cpu_ms.append((time.thread_time() - c0) * 1000)
        faiss_ms.append((t1 - t0) * 1000)
        lgbm_ms.append((t2 - t1) * 1000)
        total_ms.append((t2 - t0) * 1000)
    mean_candidates = float(np.mean([len(f) for _, _, f in prepared]))
    return {
        **percentiles(total_ms),
        **{f"cpu_{name}": value for name, value in percentiles(cpu_ms).items()},
        "faiss_p50_ms": percentiles(faiss_ms)["p50_ms"],
        "lightgbm_p50_ms": percentiles(lgbm_ms)["p50_ms"],
        "candidates_per_request": round(mean_candidates, 1),
    }


@contextmanager
def service(store_uri: str, namespace: str, port: int, workers: int) -> Iterator[str]:
    """``llmrec serve --workers N`` in its own processes until healthy; yields its base URL."""
    import httpx

    command = [
        *(sys.executable, "-m", "llmrec_tasks.cli", "serve", "--store", store_uri, "--namespace", namespace),
        *("--port", str(port), "--workers", str(workers), "--poll-seconds", "0.5"),
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)  # serve makes a fresh one per start
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(f"{base}/healthz", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the HTTP service did not become healthy")
            time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=60)


class Load:
    """``clients`` threads, each with its own keep-alive connection, sending GETs for ``users`` in turn.

    ``run(users)`` sends each user once (spread over the clients); ``until(stop)`` cycles through
    them until ``stop`` is set. Every answer is kept as (ms, status, header version, body version).
    """

    def __init__(self, base: str, clients: int, k: int) -> None:
        import httpx

        self.clients = [httpx.Client(base_url=base, timeout=30) for _ in range(clients)]
        self.k = k
        self.answers: list[tuple[float, int, str | None, str | None]] = []

    def one(self, client: Any, user: str) -> None:
        import httpx

        t0 = time.perf_counter()
        try:
            response = client.get(f"/recommendations/{user}", params={"k": self.k})
        except httpx.TransportError:
            self.answers.append(((time.perf_counter() - t0) * 1000, 0, None, None))
            return
        elapsed = (time.perf_counter() - t0) * 1000
        body = response.json().get("version") if response.status_code == 200 else None
        self.answers.append((elapsed, response.status_code, response.headers.get("x-bundle-version"), body))

    def run(self, users: list[str]) -> float:
        """Wall seconds to answer every user once."""
        shares = [users[i :: len(self.clients)] for i in range(len(self.clients))]
        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=len(self.clients)) as pool:
            list(pool.map(lambda c, share: [self.one(c, u) for u in share], self.clients, shares))
        return time.perf_counter() - started

    def until(self, stop: threading.Event, users: list[str]) -> list[threading.Thread]:
        def loop(n: int, client: Any) -> None:
            while not stop.is_set():
                self.one(client, users[n % len(users)])
                n += len(self.clients)

        threads = [threading.Thread(target=loop, args=(i, c)) for i, c in enumerate(self.clients)]
        for thread in threads:
            thread.start()
        return threads

    def close(self) -> None:
        for client in self.clients:
            client.close()

    def summary(self, wall: float) -> dict[str, Any]:
        ok = [ms for ms, status, _, _ in self.answers if status == 200]
        return {
            **percentiles(ok or [float("nan")]),
            "requests": len(self.answers),
            "errors": sum(status != 200 for _, status, _, _ in self.answers),
            "throughput_rps": round(len(self.answers) / wall, 1),
        }


def bench_http(
    store_uri: str, namespace: str, users: list[str], k: int, clients: int, port: int, workers: int
) -> dict[str, Any]:
    with service(store_uri, namespace, port, workers) as base:
        warm = Load(base, clients, k)
        warm.run(users[: 10 * clients])
        warm.close()
        load = Load(base, clients, k)
        wall = load.run(users)
        load.close()
    return {**load.summary(wall), "workers": workers, "clients": clients}


def served_versions(base: str) -> dict[str, float]:
    """``llmrec_bundle_info`` from /metrics: version -> max over live workers (1 while any serves it)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{base}/metrics", timeout=10).text
    return {
        s.labels["version"]: s.value
        for family in text_string_to_metric_families(text)
        if family.name == "llmrec_bundle_info"
        for s in family.samples
    }


def other_version(store_uri: str, namespace: str) -> str | None:
    """A complete version other than current (the newest such), or None."""
    others = [v for v in registry.list_versions(store_uri, namespace) if v["complete"] and not v["current"]]
    return max(others, key=lambda v: (v["logical_date"], v["created_at"]))["version"] if others else None


def bench_switch(
    store_uri: str, namespace: str, users: list[str], k: int, clients: int, port: int, workers: int
) -> dict[str, Any]:
    """Promote another version and roll back while ``clients`` keep asking; wait for every worker."""
    target = other_version(store_uri, namespace)
    if target is None:
        return {"skipped": f"{namespace!r} has no second complete version to promote"}
    start = registry.current_version(open_store(store_uri), namespace)

    def wait_all(version: str, left: str) -> float:
        t0 = time.perf_counter()
        deadline = time.monotonic() + 120
        while (versions := served_versions(base)).get(version) != 1 or versions.get(left, 0) != 0:
            if time.monotonic() > deadline:
                raise SystemExit(f"the workers did not all move to {version}: {versions}")
            time.sleep(0.1)
        return round(time.perf_counter() - t0, 2)

    with service(store_uri, namespace, port, workers) as base:
        warm = Load(base, clients, k)
        warm.run(users[: 10 * clients])
        warm.close()
        load = Load(base, clients, k)
        stop = threading.Event()
        started = time.perf_counter()
        threads = load.until(stop, users)
        try:
            time.sleep(2)
            publish.promote(store_uri, namespace, target, check=False)
            promote_s = wait_all(target, start)
            time.sleep(2)
            publish.rollback(store_uri, namespace, check=False)
            rollback_s = wait_all(start, target)
            time.sleep(2)
        finally:
            stop.set()
            for thread in threads:
                thread.join()
            load.close()
        wall = time.perf_counter() - started
    seen = [(header, body) for _, status, header, body in load.answers if status == 200]
    return {
        **load.summary(wall),
        "mixed_versions": sum(header != body for header, body in seen),
        "answers_by_version": {v: sum(body == v for _, body in seen) for v in (start, target)},
        "all_workers_moved_s": {"promote": promote_s, "rollback": rollback_s},
        "workers": workers,
        "clients": clients,
    }


def print_before_after(before: dict[str, Any], after: dict[str, Any]) -> None:
    """In-process latency before and after a change, beside the floor, as ratios to the floor."""
    floor = after["floor"]
    rows = [
        ("floor (FAISS + LightGBM)", floor),
        ("before: in process", before["in_process"]),
        ("after: in process", after["in_process"]),
    ]
    # Wall time, then the request thread's CPU time (less sensitive to other load on the host).
    for clock in ("", "cpu_"):
        label = "wall" if not clock else "CPU"
        print(f"{label:28} {'p50 ms':>8} {'p99 ms':>8} {'rps':>7} {'p50/floor':>9} {'p99/floor':>9}")
        for name, row in rows:
            if f"{clock}p50_ms" not in row or f"{clock}p50_ms" not in floor:
                print(f"{name:28} {'-':>8}")
                continue
            rps = row.get("throughput_rps", "-") if not clock else "-"
            p50, p99 = row[f"{clock}p50_ms"], row[f"{clock}p99_ms"]
            print(
                f"{name:28} {p50:8.2f} {p99:8.2f} {rps:>7} "
                f"{p50 / floor[f'{clock}p50_ms']:9.1f} {p99 / floor[f'{clock}p99_ms']:9.1f}"
            )
        old_row, new_row = before["in_process"], after["in_process"]
        if f"{clock}p50_ms" in old_row:
            print(
                f"after / before ({label}): p50 {new_row[f'{clock}p50_ms'] / old_row[f'{clock}p50_ms']:.2f}, "
                f"p99 {new_row[f'{clock}p99_ms'] / old_row[f'{clock}p99_ms']:.2f}"
            )
    for label, run in (("before", before), ("after", after)):
        stages = run.get("stages_p50_ms")
        if stages:
            print(f"{label} stages p50 ms: " + ", ".join(f"{k} {v:.3f}" for k, v in stages.items()))
    old, new = before.get("answers", {}), after.get("answers", {})
    common = [u for u in new if u in old]
    same = [u for u in common if old[u] == new[u]]
    print(f"answers: {len(same)}/{len(common)} users get the same items in the same order")
    for user in [u for u in common if old[u] != new[u]]:
        print(f"  user {user}: before {old[user]}\n  {'':{len(user) + 5}} after  {new[user]}")


def stage_timings(rec: serving.Recommender, users: list[str], k: int) -> dict[str, float]:
    """p50 of each stage of ``recommend`` (its ``timings``) over ``users``."""
    laps: dict[str, list[float]] = {}
    for user in users:
        timings: dict[str, float] = {}
        rec.recommend(user_id=user, k=k, timings=timings)
        for stage, seconds in timings.items():
            laps.setdefault(stage, []).append(seconds * 1000)
    return {stage: round(float(np.percentile(ms, 50)), 3) for stage, ms in laps.items()}


def print_table(results: dict[str, Any]) -> None:
    """The figures side by side; ratios against the floor (p50) and the in-process run (p99)."""
    floor, local = results["floor"], results["in_process"]
    rows = [("floor (FAISS + LightGBM)", floor, None), ("in process, 1 thread", local, None)]
    rows += [
        (f"HTTP, {h['workers']} worker(s), {h['clients']} clients", h, h["errors"]) for h in results["http"]
    ]
    switch = results["switch"]
    if "skipped" not in switch:
        rows.append(
            (f"HTTP during promote + rollback, {switch['workers']} workers", switch, switch["errors"])
        )
    print(
        f"{'':44} {'p50 ms':>8} {'p99 ms':>8} {'rps':>7} {'errors':>6} {'p50/floor':>9} {'p99/in-proc':>11}"
    )
    for name, row, errors in rows:
        rps = row.get("throughput_rps")
        print(
            f"{name:44} {row['p50_ms']:8.2f} {row['p99_ms']:8.2f} {rps if rps is not None else '-':>7} "
            f"{errors if errors is not None else '-':>6} {row['p50_ms'] / floor['p50_ms']:9.1f} "
            f"{row['p99_ms'] / local['p99_ms']:11.2f}"
        )
    if "skipped" in switch:
        print(f"promote/rollback under load: skipped ({switch['skipped']})")
    else:
        print(
            f"promote/rollback under load: {switch['errors']} errors, {switch['mixed_versions']} mixed answers, "
            f"answers by version {switch['answers_by_version']}, every worker moved in "
            f"{switch['all_workers_moved_s']} s"
        )
    print(f"load average (1, 5, 15 min) at the end: {results['load_average']}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--store", required=True, help="file:///path or s3://bucket/prefix")
    parser.add_argument("--namespace", default=C.DEFAULT_NAMESPACE)
    parser.add_argument(
        "--build",
        nargs="?",
        const=str(DEFAULT_DATA),
        default=None,
        metavar="DATA",
        help="run the pipeline on DATA first if nothing is promoted (default: MovieLens)",
    )
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=8, help="HTTP client threads (one connection each)")
    parser.add_argument(
        "--workers", type=lambda text: [int(n) for n in text.split(",")], default=[1, 2], help="e.g. 1,2"
    )
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    parser.add_argument(
        "--in-process-only", action="store_true", help="load, floor and in process: no HTTP service"
    )
    parser.add_argument("--answers", type=int, default=50, help="users whose top k is recorded")
    parser.add_argument(
        "--before",
        type=Path,
        default=None,
        help="results JSON (--out) of a run on the code before a change: printed side by side",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise

    ensure_bundle(args.store, args.namespace, args.build)
    serving.single_threaded_native_code()  # as the service's compute thread runs: figures side by side
    started = time.perf_counter()
    bundle = serving.load_bundle(args.store, args.namespace)
    load_s = time.perf_counter() - started
    rec = serving.Recommender(bundle)
    users = sample_users(bundle, args.requests, args.seed)
    num_candidates = int(bundle.feature_spec.get("candidates", {}).get("num_candidates", 200))

    results: dict[str, Any] = {
        "bundle": {
            "version": bundle.version,
            "items": len(bundle.item_ids),
            "users": len(bundle.user_row),
            "features": len(bundle.feature_names),
            "trees": bundle.booster.num_trees(),
            "index": type(bundle.index).__name__,
            "load_s": round(load_s, 2),
        },
        "cpus": os.cpu_count(),
        "k": args.k,
    }
    results["floor"] = bench_floor(rec, users, num_candidates)
    results["in_process"] = bench_in_process(rec, users, args.k)
    results["stages_p50_ms"] = stage_timings(rec, users[:200], args.k)
    results["answers"] = answers(rec, list(dict.fromkeys(users))[: args.answers], args.k)
    floor = results["floor"]["p50_ms"]
    results["ratio_p50_vs_floor"] = {"in_process": round(results["in_process"]["p50_ms"] / floor, 1)}
    if not args.in_process_only:
        results["http"] = [
            bench_http(args.store, args.namespace, users, args.k, args.clients, args.port, workers)
            for workers in args.workers
        ]
        results["switch"] = bench_switch(
            args.store, args.namespace, users, args.k, args.clients, args.port, max(args.workers)
        )
        results["ratio_p50_vs_floor"].update(
            {f"http_{h['workers']}_workers": round(h["p50_ms"] / floor, 1) for h in results["http"]}
        )
    results["load_average"] = [round(x, 2) for x in os.getloadavg()]
    text = json.dumps(results, indent=2)
    print(json.dumps({name: value for name, value in results.items() if name != "answers"}, indent=2))
    if not args.in_process_only:
        print_table(results)
    if args.before:
        print_before_after(json.loads(args.before.read_text()), results)
    if args.out:
        args.out.write_text(text + "\n")
    return results


if __name__ == "__main__":
    main()
