"""Stage `train`: the production protocol end to end, and the artifacts serving and publish read.

:func:`run_train` builds the production protocol's stages
(:func:`llmrec_tasks.ranking.protocols.production_stages`), fits and evaluates the ranker
(:func:`llmrec_tasks.ranking.protocols.evaluate_stages`), checks it against popularity
(:func:`llmrec_tasks.ranking.evaluate.quality_gate`), trains the text-aware sequence model first
when ``seq_enabled`` (on the events before the first training window; its weights go into the
bundle), scores SASRec beside it when
``sasrec_enabled`` (:func:`sasrec_baseline`) and writes the ranker, its feature spec, the metrics
and report, the serving statistics and neighbours, and the test stage's evaluation data (for
:func:`llmrec_tasks.ranking.ranker.evaluate_published_ranker`).
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import time
from typing import Any

import lightgbm as lgb
import numpy as np
import pandas as pd

from llmrec_tasks.core import constants as C
from llmrec_tasks.core.config import RankerConfig, RunConfig
from llmrec_tasks.core.errors import DataContractError
from llmrec_tasks.core.results import Embedded, Trained, Validated
from llmrec_tasks.data.contract import read_snapshot
from llmrec_tasks.ranking.context import ContextParams, RankContext, build_context, serving_frames
from llmrec_tasks.ranking.evaluate import quality_gate
from llmrec_tasks.ranking.events import Events, Histories, encode_events
from llmrec_tasks.ranking.features import FEATURE_NAMES, LLM_FEATURES
from llmrec_tasks.ranking.protocols import (
    RANKER,
    SEQMODEL,
    evaluate_stages,
    json_default,
    production_known,
    production_seq_data,
    production_stages,
    seq_rankings,
    small_metrics,
)
from llmrec_tasks.ranking.ranker import RankerParams, Stage, candidate_params, lgb_params
from llmrec_tasks.ranking.seqstate import SeqScorer, describe
from llmrec_tasks.ranking.sources import SOURCES
from llmrec_tasks.storage.store import open_store
from llmrec_tasks.text.embed import read_embeddings

log = logging.getLogger(__name__)


def align_items(items: pd.DataFrame, item_ids: list[str]) -> pd.DataFrame:
    """Snapshot items in embedding row order."""
    indexed = items.drop_duplicates(C.ITEM_ID, keep="last").set_index(C.ITEM_ID)
    missing = pd.Index(item_ids).difference(indexed.index)
    if len(missing):
        raise DataContractError(
            f"{len(missing)} embedded items are not in the snapshot (e.g. {list(missing[:3])}): "
            "re-run the embed stage for this snapshot"
        )
    return indexed.loc[item_ids].reset_index()


def run_train(cfg: RunConfig, validated: Validated, embedded: Embedded) -> Trained:
    """Production protocol end to end; writes the ranker, spec, metrics, report and serving stats."""
    from llmrec_tasks.ranking.report import build_report, report_title

    started = time.monotonic()
    rcfg = cfg.ranker
    store = open_store(validated.work_uri)
    data = read_snapshot(store.uri_for(C.SNAPSHOT_DIR))
    item_ids, embeddings = read_embeddings(embedded)
    items = align_items(data.items, item_ids)
    events, user_index = encode_events(data.interactions, pd.Index(item_ids))
    seq, seq_info = sequence_model(cfg, events, len(user_index), embeddings)
    train, valid, test, windows = production_stages(events, len(user_index), embeddings, items, rcfg, seq=seq)
    known = production_known(events, len(user_index), windows)
    extra, sasrec_info = sasrec_baseline(cfg, events, len(user_index), len(item_ids), valid, test, windows)
    extra.update(seq_rankings(seq, test.hist, RankerParams.from_config(rcfg).list_depth))
    results, booster, fit_info = evaluate_stages(
        train, valid, test, rcfg, known=known, seeds=1, extra_runs=extra
    )
    results.update(sasrec_info)
    if seq_info:
        results[SEQMODEL] = seq_info
    summary = small_metrics(results)
    passed, reason = quality_gate(summary, None, cfg.gate_tolerance)
    results.update(
        protocol="time",
        windows={name: [_iso(a), _iso(b)] for name, (a, b) in windows.items()},
        gate_vs_popularity={"passed": passed, "reason": reason},
        run={"version": validated.version, "seconds": time.monotonic() - started},
    )
    log.info("quality gate vs popularity: %s", reason)

    serving_ctx = build_context(events, len(user_index), embeddings, items, ContextParams.from_config(rcfg))
    stats, neighbours = serving_frames(serving_ctx, item_ids)
    spec = feature_spec(serving_ctx, rcfg, booster, fit_info, embedded, seq)
    if seq is not None:
        # The weights the ranker's features were computed with (trained before the first
        # training window): serving reads the same model, over each request's latest events.
        store.put_bytes(C.SEQ_MODEL, seq.weights.to_bytes())
    _put_parquet(store, C.SERVING_STATS, stats)
    _put_parquet(store, C.ITEM_NEIGHBORS, neighbours)
    store.put_bytes(C.RANKER_MODEL, booster.model_to_string().encode())
    store.put_bytes(C.FEATURE_SPEC, json.dumps(spec, indent=2).encode())
    store.put_bytes(C.METRICS, json.dumps(results, indent=2, default=json_default).encode())
    store.put_bytes(C.REPORT_HTML, build_report(results, title=report_title(validated.version)).encode())
    _put_eval(store, test)
    log.info(
        "train done in %.0fs: ranker NDCG@10 %.4f vs popularity %.4f",
        time.monotonic() - started,
        summary[RANKER]["ndcg@10"],
        summary["popularity"]["ndcg@10"],
    )
    return Trained(
        model_uri=store.uri_for(C.RANKER_MODEL),
        feature_spec_uri=store.uri_for(C.FEATURE_SPEC),
        metrics_uri=store.uri_for(C.METRICS),
        report_uri=store.uri_for(C.REPORT_HTML),
        serving_stats_uri=store.uri_for(C.SERVING_STATS),
        item_neighbors_uri=store.uri_for(C.ITEM_NEIGHBORS),
        ranker_eval_uri=store.uri_for(C.RANKER_EVAL),
        metrics=summary,
        candidate_recall=round(float(results["candidate_recall"]["test"].get("all", 0.0)), 6),
        gate_vs_popularity={"passed": passed, "reason": reason},
        best_iteration=fit_info["best_iteration"],
        seq_model_uri=store.uri_for(C.SEQ_MODEL) if seq is not None else None,
    )


def sasrec_baseline(
    cfg: RunConfig,
    events: Events,
    n_users: int,
    n_items: int,
    valid: Stage,
    test: Stage,
    windows: dict[str, tuple[float, float]],
) -> tuple[dict[str, list[np.ndarray]], dict[str, Any]]:
    """SASRec's test rankings and tuning info when ``sasrec_enabled`` (else nothing, and no torch
    import): trained on every user's interactions before the validation window."""
    if not cfg.sasrec.enabled:
        return {}, {}
    from llmrec_tasks.ranking.sasrec import sasrec_runs

    sequences = Histories.from_events(events.take(events.ts < windows["valid"][0]), n_users)
    depth = RankerParams.from_config(cfg.ranker).list_depth
    return sasrec_runs(cfg.sasrec, cfg.ranker.seed, sequences, n_items, valid, test, depth)


def sequence_model(
    cfg: RunConfig, events: Events, n_users: int, embeddings: np.ndarray
) -> tuple[SeqScorer | None, dict[str, Any]]:
    """The text-aware sequence model when ``seq_enabled`` (else nothing, and no torch import):
    trained on every user's interactions before the first training window."""
    if not cfg.seq.enabled:
        return None, {}
    from llmrec_tasks.ranking.seqmodel import train_seq

    data = production_seq_data(events, n_users, cfg.ranker)
    return train_seq(cfg.seq, cfg.ranker.seed, embeddings, *data)


def feature_spec(
    ctx: RankContext,
    rcfg: RankerConfig,
    booster: lgb.Booster,
    fit_info: dict[str, Any],
    embedded: Embedded,
    seq: SeqScorer | None = None,
) -> dict[str, Any]:
    """What serving needs to rebuild candidates and features exactly as in training (``seq``: the
    sequence model, whose weights are the bundle's :data:`~llmrec_tasks.core.constants.SEQ_MODEL`)."""
    cparams = candidate_params(rcfg)
    return {
        "features": list(booster.feature_name()),
        "llm_features": LLM_FEATURES,
        "sources": list(SOURCES),
        "context": ctx.params.to_dict(),
        "candidates": dataclasses.asdict(cparams),
        "stats_end": ctx.stats_end,
        "n_items": ctx.n_items,
        "model": {"kind": "lightgbm-lambdarank", **fit_info, "params": lgb_params(rcfg, rcfg.seed)},
        "encoder": embedded.encoder,
        "seq": describe(seq.weights) if seq is not None else None,
    }


def _put_eval(store: Any, test: Stage) -> None:
    buf = io.BytesIO()
    np.savez_compressed(
        buf,
        X=test.X,
        columns=np.array(FEATURE_NAMES),
        indptr=test.cands.indptr,
        items=test.cands.items,
        target_indptr=test.targets.indptr,
        target_items=test.targets.items,
    )
    store.put_bytes(C.RANKER_EVAL, buf.getvalue())


def _put_parquet(store: Any, key: str, frame: pd.DataFrame) -> None:
    buf = io.BytesIO()
    frame.to_parquet(buf, index=False)
    store.put_bytes(key, buf.getvalue())


def _iso(ts: float) -> str:
    return pd.Timestamp(ts, unit="s", tz="UTC").isoformat()
