"""Index benchmark: build time, memory, recall@10 and single-core queries/s of the index kinds the
`index` stage chooses, against exact search, on generated 384-d catalogs (100k and 1M items).

Vectors are unit vectors around random centres (text embeddings cluster); queries are
user-profile-like (normalised means of several items). Each approximate index is tuned exactly as
the pipeline does (:func:`llmrec_tasks.retrieval.index.tune`: smallest efSearch/nprobe reaching the recall
floor, and for IVF-PQ the exact re-rank factor); queries/s are then measured one query at a time
on one core, the serving pattern, re-rank included. Memory is the index file; the re-rank reads the
float32 item vectors that serving holds anyway for its features. Usage::

    python -m benchmarks.bench_index [--sizes 100000 1000000] [--floor 0.95]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.catalog import clustered_vectors, profile_like_queries
from llmrec_tasks.retrieval import index as ix

QUERIES = 1000
TIMED_QUERIES = {"flat": 100}  # exact search is slow per query: fewer are enough
DEFAULT_TIMED = 500


def single_core_qps(index: Any, queries: np.ndarray, n: int) -> float:
    """Queries/s answering one query at a time on one thread."""
    import faiss

    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        started = time.perf_counter()
        for q in queries[:n]:
            index.search(q[None, :], ix.RECALL_K)
        return n / (time.perf_counter() - started)
    finally:
        faiss.omp_set_num_threads(threads)


def index_mb(index: Any) -> float:
    import faiss

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "index.faiss"
        faiss.write_index(index, str(path))
        return path.stat().st_size / 2**20


def bench_size(n: int, floor: float, budgets: dict[str, float], only: list[str]) -> list[dict[str, Any]]:
    d = 384
    started = time.monotonic()
    vectors = clustered_vectors(n, d, clusters=max(100, n // 1000))
    queries = profile_like_queries(vectors, QUERIES)
    exact = ix.exact_top_k(vectors, queries, ix.RECALL_K)
    logging.info("generated %d x %d and exact top-%d in %.0fs", n, d, ix.RECALL_K, time.monotonic() - started)
    rows = []
    plans = [("exact (flat)", {"kind": "flat"})]
    auto = ix.choose_kind(n, d, budgets["default"])
    plans.append((f"auto, budget {budgets['default']:.0f} MB -> {auto['kind']}", auto))
    for kind in ("hnsw", "ivf"):
        if kind != auto["kind"] and (kind != "hnsw" or n <= ix.HNSW_MAX_ITEMS):
            plans.append((kind, ix.choose_kind(n, d, budgets["default"], kind)))
    for name in ("medium", "tight"):
        choice = ix.choose_kind(n, d, budgets[name])
        plans.append((f"auto, budget {budgets[name]:.0f} MB -> {choice['kind']}", choice))
    plans = [p for i, p in enumerate(plans) if i == 0 or not only or any(o in p[0] for o in only)]
    flat_qps = None
    for label, choice in plans:
        kind = choice["kind"]
        logging.info("n=%d: building %s %s", n, label, choice)
        started = time.monotonic()
        index = ix.build_index(vectors, choice)
        build = time.monotonic() - started
        tuned = ix.tune(index, kind, vectors, queries, floor, exact=exact)
        factor = tuned["refine_factor"]
        served = ix.RefinedIndex(index, vectors, factor) if factor else index
        qps = single_core_qps(served, queries, TIMED_QUERIES.get(kind, DEFAULT_TIMED))
        flat_qps = flat_qps or qps
        rows.append(
            {
                "n": n,
                "index": label,
                "params": {k: v for k, v in choice.items() if k in ("nlist", "pq_m")},
                "search_param": tuned["search_param"],
                "refine_factor": factor,
                "build_s": build,
                "memory_mb": index_mb(index),
                "recall": tuned["recall_at_10"],
                "qps": qps,
                "speedup": qps / flat_qps,
            }
        )
        logging.info("n=%d: %s", n, rows[-1])
        del index, served
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--floor", type=float, default=0.95)
    parser.add_argument("--budget-mb", type=float, default=2048, help="the default index_memory_budget_mb")
    parser.add_argument("--medium-fraction", type=float, default=0.3, help="medium budget = this x flat size")
    parser.add_argument("--tight-fraction", type=float, default=0.15, help="tight budget = this x flat size")
    parser.add_argument(
        "--only", nargs="*", default=[], help="run only indexes whose label contains one of these"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    rows = []
    for n in args.sizes:
        flat_mb = ix.estimate_bytes("flat", n, 384) / 2**20
        budgets = {
            "default": args.budget_mb,
            "medium": max(1.0, round(args.medium_fraction * flat_mb)),
            "tight": max(1.0, round(args.tight_fraction * flat_mb)),
        }
        rows += bench_size(n, args.floor, budgets, args.only)
    print(
        f"\n## FAISS indexes on generated 384-d catalogs, recall@10 floor {args.floor}, {QUERIES} profile queries"
    )
    print(
        "| items | index | build params | search param | exact re-rank of | build s | memory MB | recall@10 "
        "| QPS (1 core) | vs exact |"
    )
    print("| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        params = ", ".join(f"{k}={v}" for k, v in r["params"].items()) or "-"
        param = (
            "-" if r["search_param"] is None and r["recall"] == 1.0 else r["search_param"] or "MISSED FLOOR"
        )
        rerank = f"{r['refine_factor']} x k" if r["refine_factor"] else "-"
        print(
            f"| {r['n']:,} | {r['index']} | {params} | {param} | {rerank} | {r['build_s']:.1f} | {r['memory_mb']:.0f} "
            f"| {r['recall']:.3f} | {r['qps']:.0f} | {r['speedup']:.1f}x |"
        )


if __name__ == "__main__":
    main()
