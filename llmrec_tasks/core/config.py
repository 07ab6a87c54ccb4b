"""The one typed run configuration, built from Airflow params, CLI flags or a dict.

Fields, defaults and value checks come from :mod:`llmrec_tasks.core.settings`; only the checks
that involve several fields are written here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, make_dataclass
from datetime import datetime
from typing import Any

from llmrec_tasks.core import settings
from llmrec_tasks.core.constants import DEFAULT_NAMESPACE
from llmrec_tasks.core.errors import ConfigError

DEFAULT_ENCODER = settings.DEFAULT_ENCODER
ENCODER_BACKENDS = settings.ENCODER_BACKENDS
_DATA_SOURCES = (
    f"the run's `data_uri` param (trigger form or --conf), the Airflow Variable "
    f"`{settings.DATA_VARIABLE}` or the environment variable `{settings.DATA_ENV}` "
    "(CLI: --data); a folder or s3:// prefix with items + interactions, or a MovieLens folder"
)
NO_DATA_MESSAGE = (
    f"no data source configured: set {_DATA_SOURCES}. To try the generated demo data, run "
    f"`make demo` (data `{settings.SAMPLE_DATA}`, namespace `{settings.DEMO_NAMESPACE}`)."
)
SAMPLE_IN_PRODUCTION_MESSAGE = (
    f"data `{{data}}` is the generated demo data and never goes to the `{DEFAULT_NAMESPACE}` namespace: "
    f"give real data through {_DATA_SOURCES}; or run the sample in another namespace, e.g. "
    f"`{settings.DEMO_NAMESPACE}` as `make demo` does."
)


def is_sample_data(data_uri: str) -> bool:
    """Whether ``data_uri`` names the generated demo dataset (``sample`` or ``sample:SEED``)."""
    return data_uri == settings.SAMPLE_DATA or data_uri.startswith(settings.SAMPLE_DATA + ":")


def validate_name(kind: str, value: str) -> str:
    """Refuse names that would escape their folder or key prefix (``..``, ``/``, empty, odd chars)."""
    if not isinstance(value, str) or not re.search(settings.NAME_PATTERN, value):
        raise ConfigError(f"invalid {kind} {value!r}: {settings.NAME_HELP}")
    return value


def _section_dataclass(
    section: str,
    class_name: str,
    doc: str,
    cross_check: Callable[[Any], None] | None = None,
    table: Sequence[settings.Setting] | None = None,
) -> type:
    """A frozen dataclass with one field per setting of ``section`` (defaults from the table) whose
    ``__post_init__`` checks and normalises every value against the table, then runs
    ``cross_check`` (checks that involve several fields). ``table``: settings outside the run's
    table (keys ``<section>_<name>``), e.g. the benchmark's."""
    if table is None:
        table = settings.section_settings(section)
        names = {s.key: s.name for s in table}
    else:
        names = {s.key: s.key.removeprefix(f"{section}_") for s in table}

    def __post_init__(self: Any) -> None:
        for s in table:
            object.__setattr__(self, names[s.key], s.check(getattr(self, names[s.key])))
        if cross_check is not None:
            cross_check(self)

    cls = make_dataclass(
        class_name,
        [(names[s.key], s.python_type, field(default=s.default)) for s in table],
        namespace={"__post_init__": __post_init__, "__doc__": doc},
        frozen=True,
    )
    cls.__module__ = __name__
    return cls


def _check_ranker(rk: Any) -> None:
    if rk.per_source > rk.num_candidates:
        raise ConfigError(
            f"ranker_per_source ({rk.per_source}) must not exceed ranker_num_candidates ({rk.num_candidates})"
        )


def _check_validation(vc: Any) -> None:
    if vc.min_weight > vc.max_weight:
        raise ConfigError(
            f"validation_min_weight ({vc.min_weight:g}) must not exceed validation_max_weight ({vc.max_weight:g})"
        )


EncoderConfig = _section_dataclass("encoder", "EncoderConfig", "Text encoder settings (stage `embed`).")
IndexConfig = _section_dataclass("index", "IndexConfig", "FAISS index settings (stage `index`).")
RankerConfig = _section_dataclass(
    "ranker",
    "RankerConfig",
    "Candidate generation and LightGBM LambdaRank settings (stage `train`).",
    _check_ranker,
)
SasrecConfig = _section_dataclass(
    "sasrec", "SasrecConfig", "SASRec sequential baseline settings (benchmark; stage `train` when enabled)."
)


SeqConfig = _section_dataclass(
    "seq",
    "SeqConfig",
    "Text-aware sequence model settings (stage `train` and the benchmark: a candidate source and features).",
)
ValidationConfig = _section_dataclass(
    "validation",
    "ValidationConfig",
    "Great Expectations thresholds (stage `validate`); a `*_mostly` is the share of rows that must pass.",
    _check_validation,
)
NewItemsConfig = _section_dataclass(
    "newitems",
    "NewItemsConfig",
    "The benchmark's new-item protocol (`newitems_*`; not a pipeline run setting).",
    table=settings.NEWITEMS_TABLE,
)


_RunSettings = _section_dataclass("run", "_RunSettings", "The run-level settings of :class:`RunConfig`.")


@dataclass(frozen=True)
class RunConfig(_RunSettings):
    """Everything one pipeline run needs; identical params give identical version ids.

    A run needs a data source (there is no default), and the generated sample never runs in the
    production namespace.

    The run-level settings (``data_uri``, ``store_uri``, ``namespace``, ``gate_tolerance``,
    ``promote``) come from the settings table like the sections' fields.
    """

    cutoff: datetime | None = None  # interactions after this are ignored (data interval end)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    ranker: RankerConfig = field(default_factory=RankerConfig)
    sasrec: SasrecConfig = field(default_factory=SasrecConfig)
    seq: SeqConfig = field(default_factory=SeqConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    # Lineage only: never changes results.
    dag_id: str | None = None
    run_id: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.data_uri is None or not self.data_uri.strip():
            raise ConfigError(NO_DATA_MESSAGE)
        if is_sample_data(self.data_uri) and self.namespace == DEFAULT_NAMESPACE:
            raise ConfigError(SAMPLE_IN_PRODUCTION_MESSAGE.format(data=self.data_uri))
        if not self.store_uri:
            raise ConfigError("store_uri is empty: give file:///path or s3://bucket/prefix")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunConfig:
        """Build from a flat or nested dict (Airflow params use flat `encoder_model`-style keys).

        Values must have the settings' JSON types (numbers, booleans, strings): text from a command
        line goes through :func:`llmrec_tasks.core.settings.parse_text` first.
        """
        values = dict(values)
        nested: dict[str, Any] = {}
        for section, section_cls in (
            ("encoder", EncoderConfig),
            ("index", IndexConfig),
            ("ranker", RankerConfig),
            ("sasrec", SasrecConfig),
            ("seq", SeqConfig),
            ("validation", ValidationConfig),
        ):
            section_values = dict(values.pop(section, {}) or {})
            names = [s.name for s in settings.section_settings(section)]
            for name in names:
                flat = f"{section}_{name}"
                if flat in values:
                    section_values[name] = values.pop(flat)
            unknown = set(section_values) - set(names)
            if unknown:
                raise settings.unknown_settings_error(sorted(unknown), names)
            nested[section] = section_cls(**section_values)
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise settings.unknown_settings_error(sorted(unknown))
        cutoff = values.get("cutoff")
        if isinstance(cutoff, str) and cutoff:
            try:
                values["cutoff"] = datetime.fromisoformat(cutoff.replace("Z", "+00:00"))
            except ValueError as exc:
                raise ConfigError(f"cutoff {cutoff!r} is not an ISO datetime") from exc
        elif cutoff == "":
            values["cutoff"] = None
        return cls(**values, **nested)

    def result_params(self) -> dict[str, Any]:
        """Settings that change results (lineage excluded): hashed into the version id."""
        data = dataclasses.asdict(self)
        for key in ("dag_id", "run_id", "promote", "store_uri"):
            data.pop(key)
        # The data it adds is in the dataset fingerprint already.
        data.pop("feedback_ingest")
        # Shard count must not change the bundle: merges are ordered.
        data["encoder"].pop("shards")
        # Thresholds decide pass/fail, never what a passing run produces.
        data.pop("validation")
        # SASRec is a comparison in the report: its settings count only when it runs.
        if not self.sasrec.enabled:
            data.pop("sasrec")
        data["cutoff"] = self.cutoff.isoformat() if self.cutoff else None
        return data

    def params_hash(self) -> str:
        payload = json.dumps(self.result_params(), sort_keys=True, default=str)
        return hashlib.sha256(payload.encode()).hexdigest()[:10]

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["cutoff"] = self.cutoff.isoformat() if self.cutoff else None
        return data


@dataclass(frozen=True)
class FeedbackConfig:
    """Where the service's feedback goes (settings ``feedback_*``): real-time state and the local log."""

    redis_url: str | None = settings.FEEDBACK_SETTINGS["feedback_redis_url"].default
    log_dir: str = settings.FEEDBACK_SETTINGS["feedback_log_dir"].default
    key_prefix: str = settings.FEEDBACK_SETTINGS["feedback_key_prefix"].default
    recent_events: int = settings.FEEDBACK_SETTINGS["feedback_recent_events"].default
    dedup_hours: float = settings.FEEDBACK_SETTINGS["feedback_dedup_hours"].default
    segment_bytes: int = settings.FEEDBACK_SETTINGS["feedback_segment_bytes"].default
    segment_seconds: float = settings.FEEDBACK_SETTINGS["feedback_segment_seconds"].default

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            object.__setattr__(self, f.name, settings.FEEDBACK_SETTINGS[f"feedback_{f.name}"].check(value))
        if self.redis_url == "":
            object.__setattr__(self, "redis_url", None)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides: Any) -> FeedbackConfig:
        """Settings from ``LLMREC_*`` environment variables, then ``overrides`` (flags; None = unset)."""
        env = dict(os.environ) if env is None else env
        values: dict[str, Any] = {}
        for f in fields(cls):
            key = f"feedback_{f.name}"
            text = env.get(settings.feedback_env(key))
            if text is not None:
                values[f.name] = settings.FEEDBACK_SETTINGS[key].parse_text(text)
        values.update({name: value for name, value in overrides.items() if value is not None})
        return cls(**values)
