"""The one typed run configuration, built from Airflow params, CLI flags or a dict."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field, fields
from datetime import datetime
from typing import Any

from llmrec_tasks.core.constants import DEFAULT_NAMESPACE
from llmrec_tasks.core.errors import ConfigError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
DEFAULT_ENCODER = "default"


def validate_name(kind: str, value: str) -> str:
    """Refuse names that would escape their folder or key prefix (``..``, ``/``, empty, odd chars)."""
    if not isinstance(value, str) or not NAME_RE.match(value) or ".." in value:
        raise ConfigError(
            f"invalid {kind} {value!r}: use 1-63 letters, digits, '.', '_' or '-', starting with a "
            "letter or digit, and no '..'"
        )
    return value


ENCODER_BACKENDS = ("onnx", "onnx-int8", "torch")


@dataclass(frozen=True)
class EncoderConfig:
    """Text encoder settings (stage `embed`)."""

    model: str = DEFAULT_ENCODER
    max_length: int = 128
    batch_size: int = 64
    backend: str = "onnx"  # onnx (float32) | onnx-int8 | torch
    shards: int = 1
    # torch backend: auto = bf16 where the CPU has native bf16 (cosine >= 0.9999 to fp32), else fp32
    precision: str = "auto"  # auto | fp32 | bf16


@dataclass(frozen=True)
class IndexConfig:
    """FAISS index settings (stage `index`)."""

    kind: str = "auto"  # auto | flat | hnsw | ivf | ivfsq8 | ivfpq
    memory_budget_mb: int = 2048
    recall_floor: float = 0.95


@dataclass(frozen=True)
class RankerConfig:
    """Candidate generation and LightGBM LambdaRank settings (stage `train`)."""

    num_candidates: int = 200
    learning_rate: float = 0.05
    num_leaves: int = 15
    n_estimators: int = 500
    min_data_in_leaf: int = 100
    early_stopping_rounds: int = 50
    eval_days: float = 0.0  # 0: hold out the latest 10% of the time span
    seed: int = 42
    per_source: int = 60  # candidates each source (FAISS, co-visitation, EASE, ...) contributes
    train_windows: int = 8  # training groups: this many earlier windows (LOO: positions) per user
    max_users_per_window: int = 5000  # users sampled (seeded) per window: training cost stops growing
    negative_fraction: float = 0.3  # share of non-target candidates kept in training groups (speed)
    truncation_level: int = 12  # lambdarank_truncation_level, a little above the NDCG cutoff 10
    feature_fraction: float = 0.8
    bagging_fraction: float = 0.8
    num_threads: int = 1  # fixed for reproducibility; 1 is fastest on a shared 2-core machine


@dataclass(frozen=True)
class ValidationConfig:
    """Great Expectations thresholds (stage `validate`); a `*_mostly` is the share of rows that must pass."""

    ids_mostly: float = 1.0  # ids present (not null, not blank)
    unique_mostly: float = 1.0  # item ids (and user ids of `users`) unique
    duplicates_mostly: float = 0.99  # (user_id, item_id, timestamp) unique
    timestamps_mostly: float = 1.0  # parse, not before min_year, not after now + future_slack_hours
    weights_mostly: float = 1.0  # numeric and in [min_weight, max_weight]
    orphans_mostly: float = 0.99  # interactions whose item is in the catalog
    text_mostly: float = 1.0  # title present; title and text not oversized
    min_year: int = 1990
    future_slack_hours: float = 24.0
    min_weight: float = 0.0
    max_weight: float = 5.0
    max_title_chars: int = 500
    max_text_chars: int = 20_000
    # Against the previous published run's statistics (skipped when nothing is published yet).
    volume_min_ratio: float = 0.5  # row counts at least this share of the previous run's
    volume_max_ratio: float = 3.0
    top_items_fraction: float = 0.01  # "top items" = this share of the catalog, most interacted first
    top_share_max_delta: float = 0.15  # absolute change of the share of interactions on the top items
    category_max_kl: float = 0.25  # KL divergence of the catalog's category distribution
    data_docs: bool = True  # render GX Data Docs HTML next to validation.json


@dataclass(frozen=True)
class RunConfig:
    """Everything one pipeline run needs; identical params give identical version ids."""

    data_uri: str = "sample"
    store_uri: str = ""
    namespace: str = DEFAULT_NAMESPACE
    cutoff: datetime | None = None  # interactions after this are ignored (data interval end)
    gate_tolerance: float = 0.02
    promote: bool = True
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    ranker: RankerConfig = field(default_factory=RankerConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    # Lineage only: never changes results.
    dag_id: str | None = None
    run_id: str | None = None

    def __post_init__(self) -> None:
        validate_name("namespace", self.namespace)
        if not self.store_uri:
            raise ConfigError("store_uri is empty: give file:///path or s3://bucket/prefix")
        if not 0 <= self.gate_tolerance <= 1:
            raise ConfigError(f"gate_tolerance must be in [0, 1], got {self.gate_tolerance}")
        if self.encoder.backend not in ENCODER_BACKENDS:
            raise ConfigError(
                f"encoder backend must be one of {', '.join(ENCODER_BACKENDS)}, got {self.encoder.backend!r}"
            )
        if self.encoder.precision not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"encoder precision must be auto|fp32|bf16, got {self.encoder.precision!r}")
        if not 8 <= self.encoder.max_length <= 512:
            raise ConfigError(f"encoder max_length must be in [8, 512], got {self.encoder.max_length}")
        if not 1 <= self.encoder.shards <= 256:
            raise ConfigError(f"encoder shards must be in [1, 256], got {self.encoder.shards}")
        if self.index.kind not in ("auto", "flat", "hnsw", "ivf", "ivfsq8", "ivfpq"):
            raise ConfigError(f"index kind must be auto|flat|hnsw|ivf|ivfsq8|ivfpq, got {self.index.kind!r}")
        if not 0 < self.index.recall_floor <= 1:
            raise ConfigError(f"index recall_floor must be in (0, 1], got {self.index.recall_floor}")
        if self.ranker.num_candidates < 10:
            raise ConfigError(f"num_candidates must be at least 10, got {self.ranker.num_candidates}")
        rk = self.ranker
        if not 1 <= rk.per_source <= rk.num_candidates:
            raise ConfigError(f"ranker per_source must be in [1, num_candidates], got {rk.per_source}")
        if rk.train_windows < 1:
            raise ConfigError(f"ranker train_windows must be at least 1, got {rk.train_windows}")
        if rk.max_users_per_window < 1:
            raise ConfigError(
                f"ranker max_users_per_window must be at least 1, got {rk.max_users_per_window}"
            )
        if not all(0 < f <= 1 for f in (rk.feature_fraction, rk.bagging_fraction, rk.negative_fraction)):
            raise ConfigError("ranker feature, bagging and negative fractions must be in (0, 1]")
        for f in fields(ValidationConfig):
            value = getattr(self.validation, f.name)
            if f.name.endswith("_mostly") and not 0 <= value <= 1:
                raise ConfigError(f"validation {f.name} must be in [0, 1], got {value}")
        if self.validation.min_weight > self.validation.max_weight:
            raise ConfigError("validation min_weight must not exceed max_weight")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunConfig:
        """Build from a flat or nested dict (Airflow params use flat `encoder_model`-style keys)."""
        values = dict(values)
        nested: dict[str, Any] = {}
        for section, section_cls in (
            ("encoder", EncoderConfig),
            ("index", IndexConfig),
            ("ranker", RankerConfig),
            ("validation", ValidationConfig),
        ):
            section_values = dict(values.pop(section, {}) or {})
            for f in fields(section_cls):
                flat = f"{section}_{f.name}"
                if flat in values:
                    section_values[f.name] = values.pop(flat)
            unknown = set(section_values) - {f.name for f in fields(section_cls)}
            if unknown:
                raise ConfigError(f"unknown {section} settings: {sorted(unknown)}")
            nested[section] = section_cls(**_coerce(section_cls, section_values))
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ConfigError(f"unknown settings: {sorted(unknown)}")
        cutoff = values.get("cutoff")
        if isinstance(cutoff, str) and cutoff:
            try:
                values["cutoff"] = datetime.fromisoformat(cutoff.replace("Z", "+00:00"))
            except ValueError as exc:
                raise ConfigError(f"cutoff {cutoff!r} is not an ISO datetime") from exc
        elif cutoff == "":
            values["cutoff"] = None
        return cls(**_coerce(cls, values), **nested)

    def result_params(self) -> dict[str, Any]:
        """Settings that change results (lineage excluded): hashed into the version id."""
        data = dataclasses.asdict(self)
        for key in ("dag_id", "run_id", "promote", "store_uri"):
            data.pop(key)
        # Shard count must not change the bundle: merges are ordered.
        data["encoder"].pop("shards")
        # Thresholds decide pass/fail, never what a passing run produces.
        data.pop("validation")
        data["cutoff"] = self.cutoff.isoformat() if self.cutoff else None
        return data

    def params_hash(self) -> str:
        payload = json.dumps(self.result_params(), sort_keys=True, default=str)
        return hashlib.sha256(payload.encode()).hexdigest()[:10]

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["cutoff"] = self.cutoff.isoformat() if self.cutoff else None
        return data


def _coerce(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """Cast JSON-ish values (strings from a form or CLI) to the field types, with a clear error."""
    types = {f.name: f.type for f in fields(cls)}
    out: dict[str, Any] = {}
    for key, value in values.items():
        kind = str(types.get(key, ""))
        try:
            if kind == "int" and not isinstance(value, bool):
                out[key] = int(value)
            elif kind == "float":
                out[key] = float(value)
            elif kind == "bool" and isinstance(value, str):
                out[key] = value.strip().lower() in ("1", "true", "yes", "on")
            else:
                out[key] = value
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"setting {key!r} must be {kind}, got {value!r}") from exc
    return out
