"""Stage `index`: a FAISS inner-product index over the L2-normalised item embeddings.

The kind follows the catalog size and the memory budget (``index_kind=auto``): exact search
(flat) for small catalogs, IVF above that; when the float32 vectors do not fit the budget,
IVF with 8-bit scalar-quantised vectors (4x smaller, recall close to IVF), and IVF-PQ (8x and
more smaller) when even those do not fit. PQ codes alone lose too much recall for the floor, so
IVF-PQ re-scores a shortlist of ``refine_factor * k`` exactly with the item vectors
(:class:`RefinedIndex`): serving holds those vectors anyway for its features, so the budget still
bounds what the index adds, and the factor is tuned together with ``nprobe``. HNSW is available
by name (``index_kind=hnsw``) but not chosen automatically: at 100k items
(``benchmarks/bench_index.py``) IVF reached the recall floor at 4x HNSW's queries/s, built 11x
faster and used less memory. The search parameter (HNSW ``efSearch``, IVF ``nprobe``) is tuned to the
smallest value whose recall@10 against exact search, measured on real user-profile queries
(mean of the vectors of each user's items), reaches ``index_recall_floor``; a build that cannot
reach it raises :class:`IndexRecallError`. The tuned parameter is saved inside the index (FAISS
native format keeps ``efSearch``/``nprobe``) and in ``index.json`` (with the refine factor).
"""

from __future__ import annotations

import io
import json
import logging
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from llmrec_tasks.core import constants as C
from llmrec_tasks.core.config import RunConfig
from llmrec_tasks.core.errors import ConfigError, IndexRecallError
from llmrec_tasks.core.results import Embedded, Indexed, Validated
from llmrec_tasks.storage.store import open_store
from llmrec_tasks.text.embed import read_embeddings

log = logging.getLogger(__name__)

IVF_KINDS = ("ivf", "ivfsq8", "ivfpq")
RECALL_K = 10
RECALL_QUERIES = 1000
RECALL_SEED = 0
# Above this many items exact search gets slow per query (~4 ms/query/core at 50k x 384).
FLAT_MAX_ITEMS = 50_000
# Above this HNSW builds too slowly to benchmark here (~2 min at 100k on 2 shared cores, superlinear).
HNSW_MAX_ITEMS = 250_000
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80
EF_SEARCH_GRID = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
IVF_TRAIN_PER_LIST = 40  # faiss warns below 39 training points per list
IVF_NITER = 10
PQ_BITS = 8
REFINE_FACTORS = (1, 2, 4, 8, 16, 32)  # IVF-PQ shortlist sizes (x k) re-scored exactly
RERANK_QUERIES_PER_CHUNK = 256  # bounds the gathered (queries, shortlist, d) block
PLATEAU = 0.0005  # recall gained over two grid steps below which a missed floor is given up
SCORE_TOLERANCE = 1e-5  # a returned item scoring as high as the exact k-th is a hit (ties)


def estimate_bytes(kind: str, n: int, d: int, pq_m: int = 0) -> int:
    """Approximate resident size of an index of ``n`` vectors (what serving will load)."""
    if kind == "flat":
        return n * d * 4
    if kind == "hnsw":
        return n * (d * 4 + HNSW_M * 2 * 4 + 24)  # vectors, level-0 links, levels/offsets
    nlist = ivf_lists(n)
    if kind == "ivf":
        return n * (d * 4 + 8) + nlist * d * 4
    if kind == "ivfsq8":
        return n * (d + 8) + nlist * d * 4 + d * 8
    if kind == "ivfpq":
        return n * (pq_m + 8) + nlist * d * 4 + d * (1 << PQ_BITS) * 4
    raise ConfigError(f"unknown index kind {kind!r}")


def ivf_lists(n: int) -> int:
    """Number of IVF lists: a power of two near 2*sqrt(n), at most n/39 (enough training points)."""
    target = 2 * math.sqrt(max(n, 1))
    nlist = 1 << max(0, round(math.log2(target)))
    return int(max(1, min(nlist, n // IVF_TRAIN_PER_LIST or 1)))


def pq_subquantizers(d: int, n: int, budget_bytes: int) -> int:
    """Largest PQ code size (bytes/vector, divides d, at most d/2) that fits the budget."""
    for m in (d // 2, d // 4, d // 8, d // 16, d // 32):
        if m >= 1 and d % m == 0 and estimate_bytes("ivfpq", n, d, m) <= budget_bytes:
            return m
    raise ConfigError(
        f"index_memory_budget_mb is too small for {n} vectors of {d} dims even as IVF-PQ with "
        f"{max(1, d // 32)} bytes/vector ({estimate_bytes('ivfpq', n, d, max(1, d // 32)) / 2**20:.0f} MB): "
        "raise it"
    )


def choose_kind(n: int, d: int, memory_budget_mb: float, kind: str = "auto") -> dict[str, Any]:
    """Index kind (and PQ size) for a catalog of ``n`` x ``d`` under a memory budget."""
    budget = int(memory_budget_mb * 2**20)
    if kind == "auto":
        fits = {k: estimate_bytes(k, n, d) <= budget for k in ("flat", "ivf", "ivfsq8")}
        if n <= FLAT_MAX_ITEMS and fits["flat"]:
            kind = "flat"
        elif fits["ivf"]:
            kind = "ivf"
        elif fits["ivfsq8"]:
            kind = "ivfsq8"
        else:
            kind = "ivfpq"
    choice: dict[str, Any] = {"kind": kind}
    if kind == "ivfpq":
        choice["pq_m"] = pq_subquantizers(d, n, budget)
    if kind in IVF_KINDS:
        choice["nlist"] = ivf_lists(n)
    choice["estimated_mb"] = round(estimate_bytes(kind, n, d, choice.get("pq_m", 0)) / 2**20, 1)
    return choice


def build_index(vectors: np.ndarray, choice: dict[str, Any] | None = None, *, seed: int = 0) -> Any:
    """Build the chosen index (default: exact inner product) over float32 unit vectors."""
    import faiss

    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, d = vectors.shape
    kind = (choice or {}).get("kind", "flat")
    ip = faiss.METRIC_INNER_PRODUCT
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, HNSW_M, ip)
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    elif kind in IVF_KINDS:
        nlist = choice["nlist"] if choice else ivf_lists(n)
        quantizer = faiss.IndexFlatIP(d)
        if kind == "ivf":
            index = faiss.IndexIVFFlat(quantizer, d, nlist, ip)
        elif kind == "ivfsq8":
            index = faiss.IndexIVFScalarQuantizer(quantizer, d, nlist, faiss.ScalarQuantizer.QT_8bit, ip)
        else:
            bits = min(PQ_BITS, max(1, int(math.log2(max(n, 2)))))
            index = faiss.IndexIVFPQ(quantizer, d, nlist, choice["pq_m"], bits, ip)
            index.pq.cp.niter = IVF_NITER
        index.cp.niter = IVF_NITER
        index.cp.seed = seed
        train_n = min(n, max(nlist * IVF_TRAIN_PER_LIST, 1 << (PQ_BITS + 6) if kind == "ivfpq" else 0))
        sample = np.random.default_rng(seed).choice(n, size=train_n, replace=False) if train_n < n else None
        index.train(vectors if sample is None else vectors[np.sort(sample)])
    else:
        raise ConfigError(f"unknown index kind {kind!r}: use auto, flat, hnsw, ivf, ivfsq8 or ivfpq")
    for start in range(0, n, 200_000):
        index.add(vectors[start : start + 200_000])
        if n > 200_000:
            log.info("indexed %d/%d vectors", min(start + 200_000, n), n)
    return index


def set_search_param(index: Any, kind: str, value: int) -> None:
    """Apply efSearch (HNSW) or nprobe (IVF); a no-op for flat."""
    import faiss

    if kind == "hnsw":
        faiss.downcast_index(index).hnsw.efSearch = int(value)
    elif kind in IVF_KINDS:
        faiss.extract_index_ivf(index).nprobe = int(value)


def search_grid(kind: str, index: Any) -> list[int]:
    """Search parameter values to try, cheapest first."""
    if kind == "hnsw":
        return list(EF_SEARCH_GRID)
    if kind in IVF_KINDS:
        import faiss

        nlist = faiss.extract_index_ivf(index).nlist
        grid = sorted(
            {min(nlist, v) for v in (1, 2, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)}
        )
        return grid + ([nlist] if grid[-1] < nlist else [])
    return []


def exact_top_k(vectors: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k (scores, ids) without copying the vectors into an index."""
    import faiss

    return faiss.knn(
        np.ascontiguousarray(queries, dtype=np.float32),
        np.ascontiguousarray(vectors, dtype=np.float32),
        k,
        metric=faiss.METRIC_INNER_PRODUCT,
    )


def recall_at_k(
    vectors: np.ndarray,
    queries: np.ndarray,
    found: np.ndarray,
    exact_ids: np.ndarray,
    exact_scores: np.ndarray,
) -> float:
    """Mean fraction of the exact top-k found; an item tied with the exact k-th counts as found."""
    k = exact_ids.shape[1]
    valid = found >= 0
    scores = np.einsum("qkd,qd->qk", vectors[np.where(valid, found, 0)], queries)
    in_exact = (found[:, :, None] == exact_ids[:, None, :]).any(-1)
    tied = scores >= exact_scores[:, -1:] - SCORE_TOLERANCE
    return float(((in_exact | tied) & valid).sum() / (len(found) * k))


def profile_queries(
    work_uri: str, item_ids: list[str], vectors: np.ndarray, n: int = RECALL_QUERIES, seed: int = RECALL_SEED
) -> tuple[np.ndarray, str]:
    """Up to ``n`` user-profile queries from the run's interactions snapshot (see
    :func:`user_profile_queries`); item vectors when it has none. Returns (queries, source)."""
    import pandas as pd

    store = open_store(work_uri)
    if store.exists(C.SNAPSHOT_INTERACTIONS):
        inter = pd.read_parquet(
            io.BytesIO(store.get_bytes(C.SNAPSHOT_INTERACTIONS)), columns=[C.USER_ID, C.ITEM_ID]
        )
        rows = pd.Index(item_ids).get_indexer(inter[C.ITEM_ID])
        known = rows >= 0
        users = pd.factorize(inter[C.USER_ID][known], sort=True)[0]
        queries = user_profile_queries(users, rows[known], vectors, n, seed)
        if len(queries):
            return queries, "user_profiles"
    rng = np.random.default_rng(seed)
    rows = rng.choice(len(vectors), size=min(n, len(vectors)), replace=False)
    return np.asarray(vectors[np.sort(rows)], dtype=np.float32), "item_vectors"


def user_profile_queries(
    users: np.ndarray, rows: np.ndarray, vectors: np.ndarray, n: int = RECALL_QUERIES, seed: int = RECALL_SEED
) -> np.ndarray:
    """Normalised mean item vector of up to ``n`` sampled users: the queries retrieval answers.
    ``users`` (integer codes) and ``rows`` (vector rows) are parallel, one entry per interaction."""
    rng = np.random.default_rng(seed)
    distinct = np.unique(users)
    if not len(distinct):
        return np.zeros((0, vectors.shape[1]), dtype=np.float32)
    chosen = rng.choice(distinct, size=min(n, len(distinct)), replace=False)
    picked = np.isin(users, chosen)
    codes = np.unique(users[picked], return_inverse=True)[1]
    sums = np.zeros((codes.max() + 1, vectors.shape[1]), dtype=np.float64)
    np.add.at(sums, codes, vectors[rows[picked]])
    norms = np.linalg.norm(sums, axis=1, keepdims=True)
    keep = norms[:, 0] > 0
    return (sums[keep] / norms[keep]).astype(np.float32)


class RefinedIndex:
    """An index whose shortlist of ``factor * k`` is re-scored exactly with the item vectors.

    Quacks like a FAISS index where llmrec searches one (``search``, ``ntotal``); the vectors are
    the embeddings serving already holds, so re-scoring adds no memory of its own.
    """

    def __init__(self, index: Any, vectors: np.ndarray, factor: int) -> None:
        self.index = index
        self.vectors = vectors
        self.factor = int(factor)

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        _, shortlist = self.index.search(queries, min(self.ntotal, k * self.factor))
        return rerank(self.vectors, queries, shortlist, k)


def rerank(
    vectors: np.ndarray, queries: np.ndarray, shortlist: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-``k`` (scores, ids) of each query's shortlist; ``-1`` ids stay last."""
    k = min(k, shortlist.shape[1])
    scores = np.empty((len(queries), k), dtype=np.float32)
    ids = np.empty((len(queries), k), dtype=np.int64)
    for lo in range(0, len(queries), RERANK_QUERIES_PER_CHUNK):
        part = shortlist[lo : lo + RERANK_QUERIES_PER_CHUNK]
        exact = np.einsum(
            "qkd,qd->qk", vectors[np.maximum(part, 0)], queries[lo : lo + RERANK_QUERIES_PER_CHUNK]
        )
        exact = np.where(part >= 0, exact, -np.inf).astype(np.float32)
        order = np.argsort(-exact, axis=1, kind="stable")[:, :k]
        scores[lo : lo + len(part)] = np.take_along_axis(exact, order, axis=1)
        ids[lo : lo + len(part)] = np.take_along_axis(part, order, axis=1)
    return scores, ids


def tune(
    index: Any,
    kind: str,
    vectors: np.ndarray,
    queries: np.ndarray,
    floor: float,
    k: int = RECALL_K,
    exact: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict[str, Any]:
    """Smallest search parameter (and, for IVF-PQ, refine factor) reaching the recall floor, set on
    the index; measured figures. ``exact`` = precomputed :func:`exact_top_k` (scores, ids)."""
    if kind == "flat":
        return {"recall_at_10": 1.0, "search_param": None, "refine_factor": None, "tuning": []}
    k = min(k, len(vectors))
    exact_scores, exact_ids = exact or exact_top_k(vectors, queries, k)
    factors = REFINE_FACTORS if kind == "ivfpq" else (None,)
    tried: list[dict[str, Any]] = []
    best: list[float] = []
    for value in search_grid(kind, index):
        set_search_param(index, kind, value)
        started = time.monotonic()
        _, found = index.search(queries, min(len(vectors), k * (factors[-1] or 1)))
        ms = round(1000 * (time.monotonic() - started) / len(queries), 4)
        for factor in factors:
            top = found[:, : k * factor] if factor else found
            ids = rerank(vectors, queries, top, k)[1] if factor else top
            recall = recall_at_k(vectors, queries, ids, exact_ids, exact_scores)
            tried.append(
                {"param": value, "refine_factor": factor, "recall": round(recall, 4), "ms_per_query": ms}
            )
            if recall >= floor:
                return {
                    "recall_at_10": recall,
                    "search_param": value,
                    "refine_factor": factor,
                    "tuning": tried,
                }
        best.append(max(t["recall"] for t in tried if t["param"] == value))
        if len(best) >= 3 and best[-1] - best[-3] < PLATEAU:
            log.info("recall plateaued at %.4f below the floor %.3f: stopping the search", best[-1], floor)
            break
    return {
        "recall_at_10": max(best, default=0.0),
        "search_param": None,
        "refine_factor": None,
        "tuning": tried,
    }


def retrieval_index(vectors: np.ndarray, queries: np.ndarray, floor: float = 0.95) -> Any:
    """Index for batch candidate retrieval while training: exact up to ``FLAT_MAX_ITEMS``, above
    that IVF tuned to ``floor`` on ``queries`` (user profiles: exact search over a large catalog
    for every user of every training window would dominate the train stage)."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, d = vectors.shape
    if n <= FLAT_MAX_ITEMS or not len(queries):
        return build_index(vectors)
    index = build_index(vectors, choose_kind(n, d, 0, "ivf"))
    tuned = tune(index, "ivf", vectors, queries, floor)
    log.info(
        "training retrieval: IVF, nprobe %s, recall@10 %.3f", tuned["search_param"], tuned["recall_at_10"]
    )
    return index


def serialize(index: Any) -> bytes:
    import faiss

    return faiss.serialize_index(index).tobytes()


def load_index(path: Path, info: dict[str, Any] | None = None, vectors: np.ndarray | None = None) -> Any:
    """Index file -> ready index, memory-mapped: ``IO_FLAG_MMAP_IFC`` maps the vectors/codes of
    every kind llmrec builds (flat, IVF lists, HNSW's vectors; its graph is read) read-only from
    the file instead of copying them (faiss 1.15; ``IO_FLAG_MMAP`` alone maps only IVF lists, and
    a kind without mmap support is read into memory as usual). The file must not change in place while the index
    lives (bundle files are immutable; a rename or unlink over it is safe).

    Re-applies the tuned efSearch/nprobe from ``index.json`` (also saved inside the index; this
    guards against one written without it) and, when the index was tuned with a refine factor,
    wraps it in :class:`RefinedIndex` over ``vectors``."""
    import faiss

    index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP_IFC)
    if info and info.get("search_param") is not None:
        set_search_param(index, info["kind"], info["search_param"])
    factor = (info or {}).get("refine_factor")
    if factor:
        if vectors is None or len(vectors) != index.ntotal:
            raise ValueError(f"index tuned with refine_factor={factor} needs its {index.ntotal} item vectors")
        return RefinedIndex(index, vectors, factor)
    return index


def run_index(cfg: RunConfig, validated: Validated, embedded: Embedded) -> Indexed:
    """Build, tune and check the index; write it (FAISS native format) and ``index.json``."""
    import faiss

    item_ids, vectors = read_embeddings(embedded)
    n, d = vectors.shape
    choice = choose_kind(n, d, cfg.index.memory_budget_mb, cfg.index.kind)
    kind = choice["kind"]
    log.info("building %s index over %d x %d (%s)", kind, n, d, choice)
    started = time.monotonic()
    index = build_index(vectors, choice)
    build_seconds = time.monotonic() - started
    queries, source = profile_queries(validated.work_uri, item_ids, vectors)
    started = time.monotonic()
    tuned = tune(index, kind, vectors, queries, cfg.index.recall_floor)
    tune_seconds = time.monotonic() - started
    store = open_store(validated.work_uri)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / C.FAISS_INDEX
        faiss.write_index(index, str(path))
        index_bytes = path.stat().st_size
        info = {
            **choice,
            "n_items": n,
            "dim": d,
            "metric": "inner_product",
            "recall_at_10": round(tuned["recall_at_10"], 4),
            "recall_floor": cfg.index.recall_floor,
            "recall_queries": len(queries),
            "recall_query_source": source,
            "search_param": tuned["search_param"],
            "search_param_name": "efSearch" if kind == "hnsw" else "nprobe" if kind in IVF_KINDS else None,
            "refine_factor": tuned["refine_factor"],
            "tuning": tuned["tuning"],
            "build_seconds": round(build_seconds, 3),
            "tune_seconds": round(tune_seconds, 3),
            "memory_mb": round(index_bytes / 2**20, 2),
            "memory_budget_mb": cfg.index.memory_budget_mb,
        }
        store.put_bytes(C.INDEX_INFO, json.dumps(info, indent=2).encode())
        if tuned["recall_at_10"] < cfg.index.recall_floor:
            raise IndexRecallError(
                f"{kind} index reaches recall@10 {tuned['recall_at_10']:.3f} < floor {cfg.index.recall_floor} "
                f"even at the largest search setting (see {store.uri_for(C.INDEX_INFO)}): raise "
                "index_memory_budget_mb (IVF-PQ codes lose recall), choose index_kind=hnsw or flat, or lower "
                "index_recall_floor"
            )
        store.put_file(C.FAISS_INDEX, path)
    log.info(
        "built %s index over %d items in %.1fs: recall@10 %.3f (%s=%s, refine x%s), %.1f MB",
        kind,
        n,
        build_seconds,
        info["recall_at_10"],
        info["search_param_name"],
        info["search_param"],
        info["refine_factor"],
        info["memory_mb"],
    )
    # pq_m and nlist are in `choice` only for the kinds that have them.
    return Indexed.from_json(
        {
            "index_uri": store.uri_for(C.FAISS_INDEX),
            "index_info_uri": store.uri_for(C.INDEX_INFO),
            "pq_m": None,
            "nlist": None,
            **info,
        }
    )
