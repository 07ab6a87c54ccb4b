"""Serving benchmark: latency and throughput of top-10 requests, beside the raw model floor.

Measured on a published bundle (by default the MovieLens one; ``--build`` runs the pipeline first
when the namespace has no current bundle):

- ``load``: fetching + verifying + parsing the bundle (what a new ``current`` costs the service);
- ``in_process``: ``Recommender.recommend(user_id, k=10)`` one request after another;
- ``http``: ``GET /recommendations/{user_id}?k=10`` against ``llmrec serve`` in its own process,
  ``--concurrency`` client threads;
- ``floor``: for the same users, only the FAISS search (profile vector, ``num_candidates``) plus
  LightGBM scoring of that user's precomputed candidate features: the time no serving code adds.

The ratios are p50(end to end) / p50(floor). Users are drawn (with replacement, fixed seed) from the
bundle's users with a history. Usage::

    python benchmarks/bench_serving.py --store file:///tmp/llmrec-bench --build ../shared/data/ml-latest-small
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

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
    times = []
    started = time.perf_counter()
    for user in users:
        t0 = time.perf_counter()
        result = rec.recommend(user_id=user, k=k)
        times.append((time.perf_counter() - t0) * 1000)
        assert len(result.items) == k
    wall = time.perf_counter() - started
    return {**percentiles(times), "requests": len(users), "throughput_rps": round(len(users) / wall, 1)}


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
    faiss_ms, lgbm_ms, total_ms = [], [], []
    k = min(num_candidates, bundle.index.ntotal)
    for user in users:
        profile, features = by_user[user]
        t0 = time.perf_counter()
        bundle.index.search(profile, k)
        t1 = time.perf_counter()
        bundle.booster.predict(features, num_threads=1)
        t2 = time.perf_counter()
        faiss_ms.append((t1 - t0) * 1000)
        lgbm_ms.append((t2 - t1) * 1000)
        total_ms.append((t2 - t0) * 1000)
    mean_candidates = float(np.mean([len(f) for _, _, f in prepared]))
    return {
        **percentiles(total_ms),
        "faiss_p50_ms": percentiles(faiss_ms)["p50_ms"],
        "lightgbm_p50_ms": percentiles(lgbm_ms)["p50_ms"],
        "candidates_per_request": round(mean_candidates, 1),
    }


def bench_http(
    store_uri: str, namespace: str, users: list[str], k: int, concurrency: int, port: int
) -> dict[str, Any]:
    import httpx

    code = f"from llmrec_tasks.serving.api import serve; serve({store_uri!r}, {namespace!r}, '127.0.0.1', {port})"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
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
        with httpx.Client(
            base_url=base, timeout=30, limits=httpx.Limits(max_connections=concurrency)
        ) as client:

            def one(user: str) -> float:
                t0 = time.perf_counter()
                response = client.get(f"/recommendations/{user}", params={"k": k})
                elapsed = (time.perf_counter() - t0) * 1000
                response.raise_for_status()
                return elapsed

            with ThreadPoolExecutor(max_workers=concurrency) as pool:
                list(pool.map(one, users[:50]))  # warm-up
                started = time.perf_counter()
                times = list(pool.map(one, users))
                wall = time.perf_counter() - started
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return {
        **percentiles(times),
        "requests": len(users),
        "concurrency": concurrency,
        "throughput_rps": round(len(users) / wall, 1),
    }


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
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise

    ensure_bundle(args.store, args.namespace, args.build)
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
    results["http"] = bench_http(args.store, args.namespace, users, args.k, args.concurrency, args.port)
    floor = results["floor"]["p50_ms"]
    results["ratio_p50"] = {
        "in_process_vs_floor": round(results["in_process"]["p50_ms"] / floor, 1),
        "http_vs_floor": round(results["http"]["p50_ms"] / floor, 1),
    }
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return results


if __name__ == "__main__":
    main()
