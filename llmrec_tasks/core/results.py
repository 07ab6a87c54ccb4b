"""Typed results the stages hand each other (validate -> embed -> index -> train -> publish).

Each result is a frozen dataclass with exactly the fields its stage returns. It crosses process
boundaries (Airflow XCom, ``stages/<stage>.json`` in the run's work folder) as the plain dict of
:meth:`StageResult.to_json`, and comes back through :meth:`StageResult.from_json`, which refuses a
dict with missing or unknown keys (a result written by another code version, or a typo). A field
added later with a default (e.g. ``Published.gate``) may be missing: records written before it
still load.

``ARTIFACTS`` lists, per result, the fields whose URI publish copies into the bundle and the
bundle file name each one gets (:meth:`StageResult.artifacts`). Other ``*_uri`` fields (the run's
work folder, its snapshot, work-only scratch such as ``ranker_eval_uri``) are not artifacts.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, fields
from typing import Any, ClassVar, Self

from llmrec_tasks.core import constants as C
from llmrec_tasks.core.errors import ConfigError


@dataclass(frozen=True)
class StageResult:
    """Base of every stage result: one JSON round trip and the artifact listing."""

    STAGE: ClassVar[str]
    # field name -> bundle file (or folder) name; fields left out are not copied into a bundle.
    ARTIFACTS: ClassVar[Mapping[str, str]] = {}

    def to_json(self) -> dict[str, Any]:
        """The JSON-able dict that travels through XCom and is saved as ``stages/<stage>.json``
        (a deep copy: changing it leaves the frozen result as it is)."""
        return {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Self:
        """The result from its :meth:`to_json` dict; every field without a default must be there,
        and nothing else."""
        if not isinstance(data, Mapping):
            raise ConfigError(
                f"{cls.STAGE} result must be a JSON object, got {type(data).__name__}: "
                f"rerun the {cls.STAGE} stage"
            )
        names = [f.name for f in fields(cls)]
        required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
        missing = [name for name in required if name not in data]
        unknown = sorted(str(key) for key in data if key not in names)
        if missing or unknown:
            problems = []
            if missing:
                problems.append(f"missing key(s) {', '.join(map(repr, missing))}")
            if unknown:
                problems.append(f"unknown key(s) {', '.join(map(repr, unknown))}")
            raise ConfigError(
                f"{cls.STAGE} result ({cls.__name__}) has {' and '.join(problems)}: it was written by "
                f"another version of llmrec; rerun the {cls.STAGE} stage for this run"
            )
        return cls(**{name: data[name] for name in names if name in data})

    def artifacts(self) -> dict[str, str]:
        """Bundle file name -> source URI of this result's artifacts (unset optional ones left out)."""
        return {name: getattr(self, field) for field, name in self.ARTIFACTS.items() if getattr(self, field)}


@dataclass(frozen=True)
class Validated(StageResult):
    """``validate``: the run's version, work folder and typed snapshot, and its validation report."""

    STAGE: ClassVar[str] = "validate"
    ARTIFACTS: ClassVar[Mapping[str, str]] = {
        "validation_uri": C.VALIDATION_SUMMARY,
        "validation_stats_uri": C.VALIDATION_STATS,
        "data_docs_uri": C.VALIDATION_DOCS_DIR,  # a folder (GX Data Docs), copied whole
    }

    version: str
    work_uri: str
    snapshot_uri: str
    fingerprint: str
    validation_uri: str
    validation_stats_uri: str
    data_docs_uri: str | None  # None when Data Docs are turned off
    counts: dict[str, int]
    cutoff: str  # ISO datetime


@dataclass(frozen=True)
class EmbedShard(StageResult):
    """One entry of the embed plan: the input of one mapped ``embed_shard`` task."""

    STAGE: ClassVar[str] = "plan_shards"

    shard: int
    shards: int
    work_uri: str
    count: int  # distinct texts this shard encodes
    precision: str  # fixed by the plan so every shard computes alike


@dataclass(frozen=True)
class EncodedShard(StageResult):
    """What one ``embed_shard`` task encoded (its vectors stay in the work folder)."""

    STAGE: ClassVar[str] = "embed_shard"

    shard: int
    count: int
    seconds: float


@dataclass(frozen=True)
class Embedded(StageResult):
    """``embed`` (merged): item vectors in snapshot order and how they were obtained."""

    STAGE: ClassVar[str] = "embed"
    ARTIFACTS: ClassVar[Mapping[str, str]] = {
        "embeddings_uri": C.EMBEDDINGS,
        "item_ids_uri": C.ITEM_IDS,
        "embedding_keys_uri": C.EMBEDDING_KEYS,
    }

    embeddings_uri: str
    item_ids_uri: str
    embedding_keys_uri: str
    encoder: dict[str, Any]  # EncoderSpec.describe()
    dim: int
    n_items: int
    reused: int
    encoded: int
    texts_encoded: int
    reused_from: str | None  # version whose vectors were reused, None on a full refresh
    shards: int
    encode_seconds: float


@dataclass(frozen=True)
class Indexed(StageResult):
    """``index``: the FAISS index and everything ``index.json`` records about it."""

    STAGE: ClassVar[str] = "index"
    ARTIFACTS: ClassVar[Mapping[str, str]] = {"index_uri": C.FAISS_INDEX, "index_info_uri": C.INDEX_INFO}

    index_uri: str
    index_info_uri: str
    kind: str
    pq_m: int | None  # ivfpq only
    nlist: int | None  # IVF kinds only
    estimated_mb: float
    n_items: int
    dim: int
    metric: str
    recall_at_10: float
    recall_floor: float
    recall_queries: int
    recall_query_source: str
    search_param: int | None
    search_param_name: str | None
    refine_factor: int | None
    tuning: list[dict[str, Any]]
    build_seconds: float
    tune_seconds: float
    memory_mb: float
    memory_budget_mb: float


@dataclass(frozen=True)
class Trained(StageResult):
    """``train``: the ranker and its serving files, metrics and gate outcome vs popularity."""

    STAGE: ClassVar[str] = "train"
    ARTIFACTS: ClassVar[Mapping[str, str]] = {
        "model_uri": C.RANKER_MODEL,
        "feature_spec_uri": C.FEATURE_SPEC,
        "metrics_uri": C.METRICS,
        "report_uri": C.REPORT_HTML,
        "serving_stats_uri": C.SERVING_STATS,
        "item_neighbors_uri": C.ITEM_NEIGHBORS,
        "seq_model_uri": C.SEQ_MODEL,
    }

    model_uri: str
    feature_spec_uri: str
    metrics_uri: str
    report_uri: str
    serving_stats_uri: str
    item_neighbors_uri: str
    ranker_eval_uri: str  # work folder only: the gate scores the current ranker on it
    metrics: dict[str, Any]
    candidate_recall: float
    gate_vs_popularity: dict[str, Any]
    best_iteration: int
    seq_model_uri: str | None = None  # None when seq_enabled is off (added later: older records have none)


@dataclass(frozen=True)
class Published(StageResult):
    """``publish``: where the bundle is, the serving check, whether ``current`` moved, and the
    quality gate's outcome.

    ``gate`` is None when the gate was not evaluated (``promote=False``, a rolled-back version, an
    older logical date than current's, the version already current), else a dict:
    ``passed``, its ``reason``, the ``tolerance``, the ranker's and popularity's metrics, and the
    current bundle (``current_version``) with its ranker's metrics on this run's evaluation data
    (``current``, None when nothing was published yet).
    """

    STAGE: ClassVar[str] = "publish"

    version: str
    namespace: str
    bundle_uri: str
    manifest_uri: str
    status: str  # "published" | "already published"
    metrics: dict[str, Any]
    check: dict[str, Any]
    promoted: bool
    reason: str
    gate: dict[str, Any] | None = None  # added later: older publish records have none
