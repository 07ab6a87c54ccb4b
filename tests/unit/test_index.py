"""Index kind choice, recall tuning against exact search, and the recall floor."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from llmrec_tasks.core import constants as C
from llmrec_tasks.core.config import RunConfig
from llmrec_tasks.core.errors import ConfigError, IndexRecallError
from llmrec_tasks.core.results import Embedded, Validated
from llmrec_tasks.retrieval import index as ix
from llmrec_tasks.storage.store import open_store
from tests.stage_results import DATA_URI, embedded_for, validated_for


@pytest.mark.parametrize(
    "n, budget_mb, kind",
    [
        (1_000, 2048, "flat"),
        (50_000, 2048, "flat"),
        (200_000, 2048, "ivf"),
        (1_000_000, 2048, "ivf"),
        (1_000_000, 1400, "ivfsq8"),  # float32 vectors (1465 MB) do not fit, 8-bit ones do
        (1_000_000, 300, "ivfpq"),
        (1_000_000, 300, "ivfpq"),
        (10_000, 3, "ivfpq"),  # even a small catalog goes compressed under a tiny budget
    ],
)
def test_auto_kind_follows_size_and_memory_budget(n, budget_mb, kind):
    choice = ix.choose_kind(n, 384, budget_mb)
    assert choice["kind"] == kind
    assert choice["estimated_mb"] <= budget_mb
    if kind == "ivfpq":
        assert 384 % choice["pq_m"] == 0 and choice["pq_m"] <= 192


def test_explicit_kind_wins_and_impossible_budget_is_refused():
    assert ix.choose_kind(1_000, 384, 2048, "hnsw")["kind"] == "hnsw"
    with pytest.raises(ConfigError, match="memory_budget"):
        ix.choose_kind(10_000_000, 384, 10)


def test_recall_counts_ties_with_the_kth_exact_score_as_found():
    vectors = np.eye(4, dtype=np.float32)[[0, 0, 1, 2]]  # items 0 and 1 are identical
    queries = np.eye(4, dtype=np.float32)[:1]
    exact_ids = np.array([[0]])
    exact_scores = np.array([[1.0]], dtype=np.float32)
    assert ix.recall_at_k(vectors, queries, np.array([[1]]), exact_ids, exact_scores) == 1.0
    assert ix.recall_at_k(vectors, queries, np.array([[2]]), exact_ids, exact_scores) == 0.0
    assert ix.recall_at_k(vectors, queries, np.array([[-1]]), exact_ids, exact_scores) == 0.0


def clustered(n: int, d: int, clusters: int, seed: int = 0) -> np.ndarray:
    """Unit vectors around random centres: the structure real text embeddings have."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, d))
    x = centres[rng.integers(clusters, size=n)] + 0.6 * rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _work(store_uri: str, vectors: np.ndarray, users: int = 300) -> tuple[Validated, Embedded]:
    store = open_store(store_uri)
    work = "production/runs/v1"
    buf = io.BytesIO()
    np.save(buf, vectors)
    store.put_bytes(f"{work}/{C.EMBEDDINGS}", buf.getvalue())
    ids = [f"i{i}" for i in range(len(vectors))]
    store.put_bytes(f"{work}/{C.ITEM_IDS}", json.dumps(ids).encode())
    rng = np.random.default_rng(1)
    inter = pd.DataFrame(
        {C.USER_ID: [f"u{u}" for u in range(users) for _ in range(5)], C.ITEM_ID: rng.choice(ids, users * 5)}
    )
    buf = io.BytesIO()
    inter.to_parquet(buf, index=False)
    store.put_bytes(f"{work}/{C.SNAPSHOT_INTERACTIONS}", buf.getvalue())
    work_uri = store.uri_for(work)
    return validated_for(work_uri), embedded_for(work_uri, *vectors.shape)


def test_user_profile_queries_are_normalised_means_of_their_items(store_uri):
    vectors = clustered(50, 8, 3)
    validated, _ = _work(store_uri, vectors, users=4)
    queries, source = ix.profile_queries(validated.work_uri, [f"i{i}" for i in range(50)], vectors)
    assert source == "user_profiles" and queries.shape == (4, 8)
    np.testing.assert_allclose(np.linalg.norm(queries, axis=1), 1.0, atol=1e-6)


@pytest.mark.parametrize("kind", ["hnsw", "ivf", "ivfsq8", "ivfpq"])
def test_approximate_index_is_tuned_to_the_recall_floor(store_uri, kind):
    import faiss

    vectors = clustered(4000, 32, 20)
    validated, embedded = _work(store_uri, vectors)
    cfg = RunConfig.from_dict(
        {"data_uri": DATA_URI, "store_uri": store_uri, "index_kind": kind, "index_recall_floor": 0.95}
    )
    result = ix.run_index(cfg, validated, embedded)
    assert result.kind == kind and result.recall_at_10 >= 0.95
    assert result.recall_query_source == "user_profiles" and result.recall_queries == 300
    assert result.search_param is not None and result.memory_mb > 0 and result.build_seconds >= 0
    info = json.loads(open_store(validated.work_uri).get_bytes(C.INDEX_INFO))
    assert info["recall_at_10"] == result.recall_at_10
    # The tuned parameter travels inside the FAISS file: plain faiss.read_index serves at the floor.
    loaded = faiss.read_index(result.index_uri.removeprefix("file://"))
    if kind == "hnsw":
        assert faiss.downcast_index(loaded).hnsw.efSearch == result.search_param
    else:
        assert faiss.extract_index_ivf(loaded).nprobe == result.search_param
    served = ix.load_index(Path(result.index_uri.removeprefix("file://")), info, vectors)
    assert isinstance(served, ix.RefinedIndex) == (kind == "ivfpq")
    queries = ix.profile_queries(validated.work_uri, [f"i{i}" for i in range(len(vectors))], vectors)[0]
    exact_scores, exact_ids = ix.exact_top_k(vectors, queries, 10)
    _, found = served.search(queries, 10)
    assert ix.recall_at_k(vectors, queries, found, exact_ids, exact_scores) >= 0.95


def test_pq_codes_alone_miss_the_floor_that_the_exact_rerank_reaches(store_uri):
    vectors = clustered(4000, 32, 20)
    validated, embedded = _work(store_uri, vectors)
    cfg = RunConfig.from_dict(
        {"data_uri": DATA_URI, "store_uri": store_uri, "index_kind": "ivfpq", "index_recall_floor": 0.95}
    )
    result = ix.run_index(cfg, validated, embedded)
    assert result.refine_factor > 1
    assert all(t["recall"] < 0.95 for t in result.tuning if t["refine_factor"] == 1)


def test_rerank_orders_the_shortlist_by_exact_score_and_keeps_padding_last():
    vectors = np.eye(4, dtype=np.float32)
    queries = np.array([[0.1, 0.9, 0.5, 0.0]], dtype=np.float32)
    scores, ids = ix.rerank(vectors, queries, np.array([[0, -1, 2, 1]]), 3)
    assert ids.tolist() == [[1, 2, 0]]
    np.testing.assert_allclose(scores, [[0.9, 0.5, 0.1]], rtol=1e-6)
    _, ids = ix.rerank(vectors, queries, np.array([[-1, 3, -1]]), 3)
    assert ids.tolist() == [[3, -1, -1]]


def test_flat_index_is_exact(store_uri):
    vectors = clustered(500, 16, 5)
    validated, embedded = _work(store_uri, vectors)
    result = ix.run_index(
        RunConfig.from_dict({"data_uri": DATA_URI, "store_uri": store_uri}), validated, embedded
    )
    assert result.kind == "flat" and result.recall_at_10 == 1.0
    index = ix.load_index(Path(result.index_uri.removeprefix("file://")), result.to_json())
    _, ids = index.search(vectors[:3], 1)
    assert ids[:, 0].tolist() == [0, 1, 2]


def test_missing_the_recall_floor_fails_the_build(store_uri):
    vectors = clustered(3000, 32, 20)
    validated, embedded = _work(store_uri, vectors)
    cfg = RunConfig.from_dict(
        {"data_uri": DATA_URI, "store_uri": store_uri, "index_kind": "ivfsq8", "index_recall_floor": 1.0}
    )
    with pytest.raises(IndexRecallError, match="recall@10"):
        ix.run_index(cfg, validated, embedded)
    store = open_store(validated.work_uri)
    assert not store.exists(C.FAISS_INDEX)
    assert json.loads(store.get_bytes(C.INDEX_INFO))["recall_at_10"] < 1.0


def test_training_retrieval_is_exact_for_small_catalogs_and_tuned_ivf_above(monkeypatch):
    import faiss

    vectors = clustered(3000, 32, 20)
    rng = np.random.default_rng(2)
    users, rows = rng.integers(0, 400, 4000), rng.integers(0, 3000, 4000)
    queries = ix.user_profile_queries(users, rows, vectors, n=300)
    assert queries.shape == (300, 32)
    assert isinstance(ix.retrieval_index(vectors, queries), faiss.IndexFlatIP)
    monkeypatch.setattr(ix, "FLAT_MAX_ITEMS", 1000)
    index = ix.retrieval_index(vectors, queries)
    ivf = faiss.extract_index_ivf(index)
    assert ivf.nprobe < ivf.nlist
    exact_scores, exact_ids = ix.exact_top_k(vectors, queries, 10)
    assert ix.recall_at_k(vectors, queries, index.search(queries, 10)[1], exact_ids, exact_scores) >= 0.95


def resident_bytes() -> int:
    """This process's resident set size now (Linux ``VmRSS``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf", "ivfsq8"])
def test_a_loaded_index_maps_its_file_instead_of_copying_it(tmp_path: Path, kind: str) -> None:
    import faiss

    vectors = clustered(40_000, 128, 50)
    index = ix.build_index(vectors, ix.choose_kind(len(vectors), 128, 1024, kind))
    path = tmp_path / C.FAISS_INDEX
    faiss.write_index(index, str(path))
    del index
    before = resident_bytes()
    loaded = ix.load_index(path, {"kind": kind, "search_param": 8})
    added = resident_bytes() - before
    # The vectors (SQ8: their codes) stay in the file; only the rest (HNSW: its graph) is read.
    codes = vectors.size * (1 if kind == "ivfsq8" else 4)
    size = path.stat().st_size
    assert added < size - 0.75 * codes, f"{added} bytes resident for a {size}-byte file with {codes} of codes"
    _, ids = loaded.search(vectors[:3], 1)
    assert ids[:, 0].tolist() == [0, 1, 2]
