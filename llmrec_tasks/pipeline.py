"""Run the stages in order without Airflow, the same functions the DAG's tasks call.

Each stage's result dict is also saved in the run's work folder (``stages/<stage>.json``) with the
run's config, so a single stage can be re-run from the CLI with ``--work URI``.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from llmrec_tasks.core.config import RunConfig
from llmrec_tasks.core.errors import ConfigError
from llmrec_tasks.storage.store import open_store

log = logging.getLogger(__name__)

STAGES = ("validate", "embed", "index", "train", "publish")
CONFIG_FILE = "stages/config.json"


def save_stage(work_uri: str, stage: str, result: dict[str, Any]) -> None:
    open_store(work_uri).put_bytes(f"stages/{stage}.json", json.dumps(result, indent=2, default=str).encode())


def load_stage(work_uri: str, stage: str) -> dict[str, Any]:
    store = open_store(work_uri)
    key = f"stages/{stage}.json"
    if not store.exists(key):
        raise ConfigError(f"{store.uri_for(key)} not found: run `llmrec {stage}` for this work folder first")
    return json.loads(store.get_bytes(key))


def load_run_config(work_uri: str) -> RunConfig:
    """The config a run's validate stage saved, so later stages run with the same settings."""
    store = open_store(work_uri)
    if not store.exists(CONFIG_FILE):
        raise ConfigError(f"{work_uri} has no {CONFIG_FILE}: is it a run's work folder (…/runs/<version>)?")
    return RunConfig.from_dict(json.loads(store.get_bytes(CONFIG_FILE)))


def run_stage(stage: str, cfg: RunConfig, work_uri: str | None = None) -> dict[str, Any]:
    """Run one stage; upstream results are read from the work folder (not needed for validate)."""
    from llmrec_tasks import publish
    from llmrec_tasks.data import validate
    from llmrec_tasks.ranking import train
    from llmrec_tasks.retrieval import index
    from llmrec_tasks.text import embed

    started = time.monotonic()
    if stage == "validate":
        result = validate.run_validate(cfg)
        work_uri = result["work_uri"]
        open_store(work_uri).put_bytes(CONFIG_FILE, json.dumps(cfg.to_dict(), indent=2).encode())
    else:
        if work_uri is None:
            raise ConfigError(f"stage {stage!r} needs the run's work folder (--work URI)")
        up = {name: load_stage(work_uri, name) for name in STAGES[: STAGES.index(stage)]}
        if stage == "embed":
            result = embed.run_embed(cfg, up["validate"])
        elif stage == "index":
            result = index.run_index(cfg, up["validate"], up["embed"])
        elif stage == "train":
            result = train.run_train(cfg, up["validate"], up["embed"])
        elif stage == "publish":
            result = publish.run_publish(cfg, up["validate"], up["embed"], up["index"], up["train"])
        else:
            raise ConfigError(f"unknown stage {stage!r}; stages are {', '.join(STAGES)}")
    save_stage(work_uri, stage, result)
    log.info("stage %s done in %.1fs", stage, time.monotonic() - started)
    return result


def run_pipeline(cfg: RunConfig) -> dict[str, Any]:
    """validate -> embed -> index -> train -> publish; returns every stage's result."""
    results: dict[str, Any] = {}
    work_uri = None
    for stage in STAGES:
        results[stage] = run_stage(stage, cfg, work_uri)
        work_uri = results["validate"]["work_uri"]
    return results
