"""Typed stage results for tests that write only the files a stage under test reads.

The values not given are placeholders (``0``, ``None``, ``"test"``): the stage under test reads
the URIs, the other fields only travel on.
"""

from __future__ import annotations

from typing import Any

from llmrec_tasks.core import constants as C
from llmrec_tasks.core.results import Embedded, Indexed, Trained, Validated

# The data source of configs whose stages read a snapshot written by the test: lineage only.
DATA_URI = "/data/llmrec-test-input"


def validated_for(work_uri: str, version: str = "v1") -> Validated:
    """The validate result of a run whose work folder (and snapshot) is ``work_uri``."""
    return Validated(
        version=version,
        work_uri=work_uri,
        snapshot_uri=f"{work_uri}/{C.SNAPSHOT_DIR}",
        fingerprint="test",
        validation_uri=f"{work_uri}/{C.VALIDATION_SUMMARY}",
        validation_stats_uri=f"{work_uri}/{C.VALIDATION_STATS}",
        data_docs_uri=None,
        counts={},
        cutoff="2024-02-01T00:00:00+00:00",
    )


def embedded_for(work_uri: str, n_items: int, dim: int) -> Embedded:
    """The embed result whose embeddings and item ids are in ``work_uri``."""
    return Embedded(
        embeddings_uri=f"{work_uri}/{C.EMBEDDINGS}",
        item_ids_uri=f"{work_uri}/{C.ITEM_IDS}",
        embedding_keys_uri=f"{work_uri}/{C.EMBEDDING_KEYS}",
        encoder={"model": "test"},
        dim=dim,
        n_items=n_items,
        reused=0,
        encoded=n_items,
        texts_encoded=n_items,
        reused_from=None,
        shards=1,
        encode_seconds=0.0,
    )


def indexed_for(work_uri: str, n_items: int, dim: int) -> Indexed:
    """The index result of an exact (flat) index in ``work_uri``."""
    return Indexed(
        index_uri=f"{work_uri}/{C.FAISS_INDEX}",
        index_info_uri=f"{work_uri}/{C.INDEX_INFO}",
        kind="flat",
        pq_m=None,
        nlist=None,
        estimated_mb=0.0,
        n_items=n_items,
        dim=dim,
        metric="inner_product",
        recall_at_10=1.0,
        recall_floor=0.95,
        recall_queries=0,
        recall_query_source="test",
        search_param=None,
        search_param_name=None,
        refine_factor=None,
        tuning=[],
        build_seconds=0.0,
        tune_seconds=0.0,
        memory_mb=0.0,
        memory_budget_mb=512.0,
    )


def trained_for(work_uri: str, metrics: dict[str, Any]) -> Trained:
    """The train result whose ranker files are in ``work_uri``, with these summary metrics."""
    return Trained(
        model_uri=f"{work_uri}/{C.RANKER_MODEL}",
        feature_spec_uri=f"{work_uri}/{C.FEATURE_SPEC}",
        metrics_uri=f"{work_uri}/{C.METRICS}",
        report_uri=f"{work_uri}/{C.REPORT_HTML}",
        serving_stats_uri=f"{work_uri}/{C.SERVING_STATS}",
        item_neighbors_uri=f"{work_uri}/{C.ITEM_NEIGHBORS}",
        ranker_eval_uri=f"{work_uri}/{C.RANKER_EVAL}",
        metrics=metrics,
        candidate_recall=1.0,
        gate_vs_popularity={"passed": True, "reason": "test"},
        best_iteration=1,
    )
