"""Run the stages in order without Airflow, the same functions the DAG's tasks call.

Each stage's result (:mod:`llmrec_tasks.core.results`) is also saved as JSON in the run's work
folder (``stages/<stage>.json``) with the run's config, so a single stage can be re-run from the
CLI with ``--work URI``.
"""

from __future__ import annotations

import json
import logging
import time
from typing import TypeVar, cast

from llmrec_tasks.core.config import RunConfig
from llmrec_tasks.core.errors import ConfigError
from llmrec_tasks.core.results import Embedded, Indexed, Published, StageResult, Trained, Validated
from llmrec_tasks.storage.store import open_store

log = logging.getLogger(__name__)

STAGES = ("validate", "embed", "index", "train", "publish")
CONFIG_FILE = "stages/config.json"
R = TypeVar("R", bound=StageResult)


def stage_key(result_type: type[StageResult]) -> str:
    """Where a stage's result is saved in the run's work folder."""
    return f"stages/{result_type.STAGE}.json"


def save_stage(work_uri: str, result: StageResult) -> None:
    open_store(work_uri).put_bytes(
        stage_key(type(result)), json.dumps(result.to_json(), indent=2, default=str).encode()
    )


def load_stage(work_uri: str, result_type: type[R]) -> R:
    store = open_store(work_uri)
    key = stage_key(result_type)
    if not store.exists(key):
        raise ConfigError(
            f"{store.uri_for(key)} not found: run `llmrec {result_type.STAGE}` for this work folder first"
        )
    return result_type.from_json(json.loads(store.get_bytes(key)))


def load_run_config(work_uri: str) -> RunConfig:
    """The config a run's validate stage saved, so later stages run with the same settings."""
    store = open_store(work_uri)
    if not store.exists(CONFIG_FILE):
        raise ConfigError(f"{work_uri} has no {CONFIG_FILE}: is it a run's work folder (…/runs/<version>)?")
    return RunConfig.from_dict(json.loads(store.get_bytes(CONFIG_FILE)))


def run_stage(stage: str, cfg: RunConfig, work_uri: str | None = None) -> StageResult:
    """Run one stage; upstream results are read from the work folder (not needed for validate)."""
    from llmrec_tasks import publish
    from llmrec_tasks.data import validate
    from llmrec_tasks.ranking import train
    from llmrec_tasks.retrieval import index
    from llmrec_tasks.text import embed

    started = time.monotonic()
    result: StageResult
    if stage == "validate":
        validated = validate.run_validate(cfg)
        result, work_uri = validated, validated.work_uri
        open_store(work_uri).put_bytes(CONFIG_FILE, json.dumps(cfg.to_dict(), indent=2).encode())
    else:
        if work_uri is None:
            raise ConfigError(f"stage {stage!r} needs the run's work folder (--work URI)")
        if stage not in STAGES:
            raise ConfigError(f"unknown stage {stage!r}; stages are {', '.join(STAGES)}")
        validated = load_stage(work_uri, Validated)
        if stage == "embed":
            result = embed.run_embed(cfg, validated)
        elif stage == "index":
            result = index.run_index(cfg, validated, load_stage(work_uri, Embedded))
        elif stage == "train":
            result = train.run_train(cfg, validated, load_stage(work_uri, Embedded))
        else:
            result = publish.run_publish(
                cfg,
                validated,
                load_stage(work_uri, Embedded),
                load_stage(work_uri, Indexed),
                load_stage(work_uri, Trained),
            )
    save_stage(work_uri, result)
    log.info("stage %s done in %.1fs", stage, time.monotonic() - started)
    return result


def run_pipeline(cfg: RunConfig) -> dict[str, StageResult]:
    """validate -> embed -> index -> train -> publish -> gate; returns every stage's result by
    stage name. A bundle that failed the quality gate raises :class:`QualityGateError` (after it
    was published, not promoted), as the DAG's ``gate`` task does: the run is not a success."""
    validated = cast(Validated, run_stage("validate", cfg))
    results: dict[str, StageResult] = {"validate": validated}
    for stage in STAGES[1:]:
        results[stage] = run_stage(stage, cfg, validated.work_uri)
    from llmrec_tasks import publish

    publish.enforce_gate(cfg, cast(Published, results["publish"]))
    return results
