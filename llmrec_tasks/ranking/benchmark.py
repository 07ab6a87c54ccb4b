"""Leave-one-out benchmark (the published protocol), on any dataset of the input contract.

Protocol: every interaction is an implicit positive; items without a title are dropped; users and
items are filtered iteratively to at least ``min_count`` interactions; per user, interactions are
sorted by (timestamp, item id) and de-duplicated (first occurrence kept); the last one is the test
item, the one before it the validation item, the rest training. The test item is predicted from
training + validation history, ranking every item except the user's history.

New-item protocol (``new-items``): what text is for, items without interactions yet. On the same
split, the newest ``newitems_fraction`` of the items by first interaction are *new*: every event on
them is removed from all training data (each stage's statistics and histories, the validation and
training targets, the baselines' known events, SASRec's sequences); validation and training
positions count the remaining events (:func:`training_positions`). The test target stays each
user's last item: a new item (the new-item slice) or a warm one (the warm slice). A test user's
history holds their earlier events on warm items only (an earlier event on a new item was never
logged as far as the system knows); a user whose every earlier item is new has no history and is
not tested. New items are in the retrieval index, so the text sources can retrieve them; their
collaborative features are zero or missing. Optionally (``newitems_simulated_fraction``, off by
default), a seeded random share of the items loses its events in each training stage
(:func:`loo_stages`): simulated new items, so the ranker sees positives without collaborative signal. The *all-warm ranker* is the same fitted ranker with its lists
restricted to warm items: the best a system without text could do for these users; the goal is
that letting new items in does not lower the total below it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from llmrec_tasks.core import constants as C
from llmrec_tasks.core.config import EncoderConfig, NewItemsConfig, RankerConfig, SasrecConfig, SeqConfig
from llmrec_tasks.core.errors import ConfigError, DataContractError
from llmrec_tasks.data.contract import Dataset, item_texts, normalize, read_raw
from llmrec_tasks.ranking.baselines import VALID_KEY, KnownEvents, describe_params
from llmrec_tasks.ranking.context import ContextParams, build_context
from llmrec_tasks.ranking.evaluate import NEW_ITEMS, WARM_ITEMS, Targets
from llmrec_tasks.ranking.events import Events, Histories, encode_events
from llmrec_tasks.ranking.protocols import (
    RANKER,
    SASREC,
    SEQMODEL,
    evaluate_stages,
    json_default,
    production_known,
    production_seq_data,
    production_stages,
    seq_rankings,
)
from llmrec_tasks.ranking.ranker import RankerParams, Stage, make_stage
from llmrec_tasks.ranking.sasrec import sasrec_runs
from llmrec_tasks.ranking.seqmodel import train_seq
from llmrec_tasks.ranking.seqstate import SeqScorer

log = logging.getLogger(__name__)

PROTOCOLS = ("loo", "time", "new-items")
CACHE_DIR = Path(os.environ.get("LLMREC_CACHE_DIR", Path(tempfile.gettempdir()) / "llmrec-rank-cache"))


@dataclass(frozen=True)
class LooData:
    """Filtered dataset, encoded: ``pos`` is each event's position from its user's end (0 = test)."""

    items: pd.DataFrame  # typed items in index order
    item_index: pd.Index
    user_index: pd.Index
    events: Events
    pos: np.ndarray

    @property
    def n_users(self) -> int:
        return len(self.user_index)

    @property
    def n_items(self) -> int:
        return len(self.item_index)


def k_core(interactions: pd.DataFrame, min_count: int) -> pd.DataFrame:
    """Iteratively keep users and items with at least ``min_count`` interactions."""
    frame = interactions
    while True:
        users = frame[C.USER_ID].value_counts()
        items = frame[C.ITEM_ID].value_counts()
        keep = frame[C.USER_ID].map(users).ge(min_count) & frame[C.ITEM_ID].map(items).ge(min_count)
        if keep.all():
            return frame
        frame = frame[keep]


def loo_split(data: Dataset, min_count: int = 5) -> LooData:
    """Apply the leave-one-out protocol's filtering and ordering (see the module docstring)."""
    items = data.items[data.items[C.TITLE].fillna("").str.strip() != ""]
    inter = data.interactions[data.interactions[C.ITEM_ID].isin(items[C.ITEM_ID])]
    inter = inter.sort_values([C.TIMESTAMP], kind="stable").drop_duplicates(
        [C.USER_ID, C.ITEM_ID], keep="first"
    )
    inter = k_core(inter, min_count)
    if inter.empty:
        raise DataContractError(
            f"no user and item has {min_count} interactions after filtering: the dataset is too small "
            "for the leave-one-out benchmark"
        )
    items = items[items[C.ITEM_ID].isin(inter[C.ITEM_ID])].reset_index(drop=True)
    item_index = pd.Index(items[C.ITEM_ID])
    events, user_index = encode_events(inter, item_index)
    counts = np.bincount(events.user, minlength=len(user_index))
    ends = np.cumsum(counts)
    pos = (ends[events.user] - 1 - np.arange(len(events))).astype(np.int64)
    log.info(
        "loo split: %d users, %d items, %d interactions (min %d per user/item)",
        len(user_index),
        len(item_index),
        len(events),
        min_count,
    )
    return LooData(items=items, item_index=item_index, user_index=user_index, events=events, pos=pos)


def cached_embeddings(items: pd.DataFrame, encoder: EncoderConfig, cache_dir: Path = CACHE_DIR) -> np.ndarray:
    """Encode item texts, cached on disk by a hash of the texts and the encoder's cache id
    (weights, max length, backend, precision)."""
    from llmrec_tasks.text.embed import EncoderSpec, encode_texts

    texts = item_texts(items)
    digest = hashlib.sha256()
    digest.update(EncoderSpec.resolve(encoder).cache_id().encode())
    for text in texts:
        digest.update(text.encode())
        digest.update(b"\0")
    path = cache_dir / f"emb-{digest.hexdigest()[:20]}.npy"
    if path.is_file():
        log.info("embeddings from cache %s", path)
        return np.load(path, allow_pickle=False)
    vectors = encode_texts(texts, encoder)
    cache_dir.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    np.save(buf, vectors, allow_pickle=False)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(buf.getvalue())
    tmp.replace(path)
    return vectors


def newest_items(loo: LooData, fraction: float) -> np.ndarray:
    """Bool per item: the newest ``fraction`` of the items by first interaction (ties: the later
    item index counts as newer), at least one item and never every item."""
    first = np.full(loo.n_items, np.inf)
    np.minimum.at(first, loo.events.item, loo.events.ts)
    n_new = round(fraction * loo.n_items)
    if not 1 <= n_new < loo.n_items:
        raise DataContractError(
            f"newitems_fraction {fraction:g} of {loo.n_items} items leaves {n_new} new item(s): "
            "the new-item protocol needs at least one new and one warm item (raise or lower the fraction)"
        )
    order = np.lexsort((np.arange(loo.n_items), first))
    new = np.zeros(loo.n_items, dtype=bool)
    new[order[-n_new:]] = True
    return new


def training_positions(loo: LooData, new_items: np.ndarray | None = None) -> np.ndarray:
    """Per event: its position from its user's end among the events the test stage knows (every
    event before the user's test item, events on ``new_items`` left out), -1 for the others.

    Without new items this is ``pos - 1``: position 0 is the validation target, 1.. the training
    stages' targets.
    """
    known = loo.pos > 0
    if new_items is not None:
        known &= ~new_items[loo.events.item]
    user = loo.events.user[known]
    ends = np.cumsum(np.bincount(user, minlength=loo.n_users))
    out = np.full(len(loo.events), -1, dtype=np.int64)
    out[known] = ends[user] - 1 - np.arange(len(user))
    return out


def _position_stage(
    name: str,
    loo: LooData,
    known_mask: np.ndarray,
    target_mask: np.ndarray,
    embeddings: np.ndarray,
    rcfg: RankerConfig,
    catalog: np.ndarray | None = None,
    seq: SeqScorer | None = None,
) -> Stage:
    """Users with a target (at most one each) predicted from their known events; users without a
    known event are left out.

    ``catalog`` (sorted item indices holding every known and target item): the stage is built on
    those items only, as if the others did not exist yet (its context indexes them alone, and so
    does its view of the sequence model ``seq``); its histories, targets and candidates are given
    back in the full item indices.
    """
    events, items = loo.events.take(known_mask), loo.items
    target = loo.events.take(target_mask)  # in user order
    if catalog is not None:
        local = np.full(loo.n_items, -1, dtype=np.int64)
        local[catalog] = np.arange(len(catalog))
        events = dataclasses.replace(events, item=local[events.item])
        target = dataclasses.replace(target, item=local[target.item])
        embeddings, items = embeddings[catalog], items.iloc[catalog].reset_index(drop=True)
        if seq is not None:
            seq = dataclasses.replace(seq, vectors=seq.vectors[catalog])
    ctx = build_context(events, loo.n_users, embeddings, items, ContextParams.from_config(rcfg))
    ctx.seq = seq
    hist = Histories.from_events(events, loo.n_users)
    keep = hist.lengths[target.user] > 0
    stage = make_stage(name, ctx, hist.subset(target.user[keep]), Targets.single(target.item[keep]), rcfg)
    if catalog is not None:
        stage.hist = dataclasses.replace(stage.hist, items=catalog[stage.hist.items])
        stage.targets = Targets(stage.targets.indptr, catalog[stage.targets.items])
        stage.cands.items = catalog[stage.cands.items]
        stage.ctx = None  # in the catalog's indices: nothing after the fit reads a training context
    return stage


def loo_stages(
    loo: LooData,
    embeddings: np.ndarray,
    rcfg: RankerConfig,
    *,
    new_items: np.ndarray | None = None,
    simulated_fraction: float = 0.0,
    seq: SeqScorer | None = None,
) -> tuple[list[Stage], Stage, Stage]:
    """Stages by position from each user's end: 0 = test, 1 = validation, 2.. = training groups.

    Stage ``s`` predicts the item at position ``s`` from the items before it; its statistics come
    from every user's items before position ``s`` (so no stage sees its own or later targets).

    ``new_items`` (the new-item protocol): every event on them is left out of every stage's
    statistics and histories, and of the validation and training targets; positions of those
    stages count the remaining events (:func:`training_positions`). The validation and training
    stages are built on the warm catalog (the new items do not exist yet: never a candidate there,
    so the ranker never learns that an item without interactions is never the target); the test
    stage on the whole catalog. The test target stays the user's last item, new or warm. ``simulated_fraction``: in each training stage, that seeded
    random share of the items loses its events from the stage's statistics and histories (not its
    targets) and scores from its text alone in the sequence model (its delta removed, as a new
    item has none): simulated new items, so the ranker learns to rank items without collaborative
    signal. ``seq``: the sequence model every stage shares (trained on :func:`loo_seq_data`'s prefix).
    """
    tpos = training_positions(loo, new_items)
    warm = None if new_items is None else np.flatnonzero(~new_items)
    stages = [_position_stage("test", loo, tpos >= 0, loo.pos == 0, embeddings, rcfg, seq=seq)]
    for s in range(rcfg.train_windows + 1):
        known, stage_seq = tpos > s, seq
        if s > 0 and simulated_fraction > 0:
            simulated = np.random.default_rng([rcfg.seed, s]).random(loo.n_items) < simulated_fraction
            known &= ~simulated[loo.events.item]
            stage_seq = None if seq is None else seq.text_only(simulated)
        name = "valid" if s == 0 else f"train{s - 1}"
        stages.append(_position_stage(name, loo, known, tpos == s, embeddings, rcfg, warm, stage_seq))
    test, valid, *train = stages
    return train[::-1], valid, test


def loo_seq_data(
    loo: LooData, rcfg: RankerConfig, new_items: np.ndarray | None = None
) -> tuple[Histories, Histories, Targets]:
    """The sequence model's data: every user's items before the first (earliest) ranker training
    target (:func:`training_positions` ``train_windows``, new items left out); validated on that
    position from the same prefix."""
    tpos = training_positions(loo, new_items)
    first = rcfg.train_windows
    train = Histories.from_events(loo.events.take(tpos > first), loo.n_users)
    target = loo.events.take(tpos == first)
    keep = train.lengths[target.user] > 0
    return train, train.subset(target.user[keep]), Targets.single(target.item[keep])


def loo_known(loo: LooData, new_items: np.ndarray | None = None) -> KnownEvents:
    """The events the validation and test stages of :func:`loo_stages` know (same ``new_items``)."""
    tpos = training_positions(loo, new_items)
    return KnownEvents(loo.events, loo.n_users, valid=tpos > 0, test=tpos >= 0)


def run_benchmark(
    data_uri: str,
    protocol: str = "loo",
    seeds: int = 5,
    out: str | Path | None = None,
    encoder_cfg: EncoderConfig | None = None,
    ranker_cfg: RankerConfig | None = None,
    sasrec_cfg: SasrecConfig | None = None,
    seq_cfg: SeqConfig | None = None,
    newitems_cfg: NewItemsConfig | None = None,
    *,
    min_count: int = 5,
    n_boot: int = 1000,
) -> dict[str, Any]:
    """Run the ranker, its no-LLM ablation and the baselines on one split; optionally write JSON.

    ``protocol``: ``loo`` (the published leave-one-out setup), ``time`` (the production
    protocol of the daily DAG on the same data) or ``new-items`` (leave-one-out without the
    newest items' events, ``newitems_cfg``; see the module docstring). ``out`` also gets an HTML
    report next to it (same name, ``.html``). ``sasrec_cfg`` defaults to SASRec enabled (the
    benchmark's baseline to beat). Returns ``{"protocol", "models": {name: metrics}, ...}``.
    """
    if protocol not in PROTOCOLS:
        raise ConfigError(f"unknown protocol {protocol!r}: use one of {', '.join(PROTOCOLS)}")
    if seeds < 1:
        raise ConfigError(f"seeds must be at least 1, got {seeds}")
    started = time.monotonic()
    encoder_cfg = encoder_cfg or EncoderConfig()
    rcfg = ranker_cfg or RankerConfig()
    scfg = sasrec_cfg or SasrecConfig(enabled=True)
    qcfg = seq_cfg or SeqConfig()
    data = normalize(read_raw(str(data_uri)))
    timings: dict[str, float] = {}
    new_items = None
    if protocol in ("loo", "new-items"):
        loo = loo_split(data, min_count)
        embeddings = cached_embeddings(loo.items, encoder_cfg)
        simulated = 0.0
        if protocol == "new-items":
            ncfg = newitems_cfg or NewItemsConfig()
            new_items, simulated = newest_items(loo, ncfg.fraction), ncfg.simulated_fraction
        tick = time.monotonic()
        seq, seq_info = train_seq(qcfg, rcfg.seed, embeddings, *loo_seq_data(loo, rcfg, new_items))
        timings["seqmodel"] = time.monotonic() - tick
        tick = time.monotonic()
        train, valid, test = loo_stages(
            loo, embeddings, rcfg, new_items=new_items, simulated_fraction=simulated, seq=seq
        )
        known = loo_known(loo, new_items)
        dataset = {"users": loo.n_users, "items": loo.n_items, "interactions": len(loo.events)}
        sequences = Histories.from_events(loo.events.take(known.valid), loo.n_users)
    else:
        items = data.items.reset_index(drop=True)
        embeddings = cached_embeddings(items, encoder_cfg)
        events, user_index = encode_events(data.interactions, pd.Index(items[C.ITEM_ID]))
        tick = time.monotonic()
        seq, seq_info = train_seq(
            qcfg, rcfg.seed, embeddings, *production_seq_data(events, len(user_index), rcfg)
        )
        timings["seqmodel"] = time.monotonic() - tick
        tick = time.monotonic()
        train, valid, test, windows = production_stages(
            events, len(user_index), embeddings, items, rcfg, seq=seq
        )
        known = production_known(events, len(user_index), windows)
        dataset = {"users": len(user_index), "items": len(items), "interactions": len(events)}
        sequences = Histories.from_events(events.take(events.ts < windows["valid"][0]), len(user_index))
    timings["stages"] = time.monotonic() - tick
    depth = RankerParams.from_config(rcfg).list_depth
    tick = time.monotonic()
    extra, sasrec_info = sasrec_runs(scfg, rcfg.seed, sequences, dataset["items"], valid, test, depth)
    timings["sasrec"] = time.monotonic() - tick
    extra.update(seq_rankings(seq, test.hist, depth))
    tick = time.monotonic()
    results, _, _ = evaluate_stages(
        train,
        valid,
        test,
        rcfg,
        known=known,
        seeds=seeds,
        n_boot=n_boot,
        extra_runs=extra,
        new_items=new_items,
    )
    timings["ranker_and_baselines"] = time.monotonic() - tick
    result = {
        "protocol": protocol,
        "data": str(data_uri),
        "dataset": dataset,
        **results,
        **sasrec_info,
        **({SEQMODEL: seq_info} if seq_info else {}),
        "timings": {name: round(value, 1) for name, value in timings.items()},
        "seconds": round(time.monotonic() - started, 1),
    }
    if out is not None:
        from llmrec_tasks.ranking.report import build_report

        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2, default=json_default))
        path.with_suffix(".html").write_text(build_report(result, title=f"llmrec benchmark ({protocol})"))
        log.info("wrote %s and %s", path, path.with_suffix(".html"))
    return result


TABLE_COLUMNS = (
    ("ndcg@10", "NDCG@10"),
    ("recall@10", "Recall@10"),
    ("recall@50", "Recall@50"),
    ("mrr", "MRR"),
    ("coverage@10", "Cov@10"),
)


def print_table(result: dict[str, Any]) -> None:
    """Print :func:`format_table` (the CLI's output)."""
    print(format_table(result))


def format_table(result: dict[str, Any]) -> str:
    """Plain-text table: mean over seeds, spread (std over seeds), bootstrap 95% interval, cold slice."""
    header = f"{'model':<15}" + "".join(f"{title:>11}" for _, title in TABLE_COLUMNS)
    header += f"{'±seeds':>9}{'NDCG@10 95% CI':>18}{'R@10 95% CI':>18}{'cold N@10':>11}"
    new_items = result.get("new_items")
    if new_items:
        header += "".join(f"{title:>11}" for title in ("new N@10", "new R@10", "warm N@10", "warm R@10"))
    lines = [
        f"protocol: {result['protocol']}  data: {result.get('data', '')}  {result.get('dataset', '')}",
        header,
    ]
    models = result["models"]
    for name in sorted(models, key=lambda n: -models[n]["ndcg@10"]):
        m = models[name]
        row = f"{name:<15}" + "".join(f"{m[key]:>11.4f}" for key, _ in TABLE_COLUMNS)
        lo, hi = m["ndcg@10_ci95"]
        rlo, rhi = m["recall@10_ci95"]
        cold = m.get("slices", {}).get("cold_items", {})
        row += f"{m['ndcg@10_std']:>9.4f}{f'[{lo:.4f}, {hi:.4f}]':>18}{f'[{rlo:.4f}, {rhi:.4f}]':>18}"
        row += f"{cold.get('ndcg@10', float('nan')):>11.4f}"
        if new_items:
            for sliced in (NEW_ITEMS, WARM_ITEMS):
                values = m.get("slices", {}).get(sliced, {})
                row += "".join(f"{values.get(key, float('nan')):>11.4f}" for key in ("ndcg@10", "recall@10"))
        lines.append(row)
    recall = result.get("candidate_recall", {}).get("test", {})
    if recall:
        lines.append("candidate recall (test): " + ", ".join(f"{k} {v:.3f}" for k, v in recall.items()))
    if new_items:
        lines.append(
            f"new items: {new_items['items']} of {new_items['catalog']}, {new_items['test_targets']} of "
            f"{new_items['test_users']} test targets; ranker new/warm NDCG@10 {new_items['ranker_new_vs_warm']:.3f}"
        )
        lines.append(
            f"candidate recall of new targets ({new_items['num_candidates']} candidates): "
            + ", ".join(f"{k} {v:.3f}" for k, v in new_items["candidate_recall"].items())
        )
    for name, tuned in result.get("baselines_tuned", {}).items():
        lines.append(
            f"{name} tuned on validation: {describe_params(tuned['params'])} "
            f"({VALID_KEY} {tuned[VALID_KEY]:.4f}, {len(tuned['grid'])} grid points, {tuned['seconds']:.1f}s)"
        )
    runs = models.get(RANKER, {}).get("runs", 1)
    lines.append(
        f"ranker: mean over {runs} seed(s); ±seeds = std of NDCG@10 over seeds; CI = bootstrap over users"
    )
    if SASREC in result:
        lines.append(sasrec_line(result[SASREC]))
    return "\n".join(lines)


def sasrec_line(info: dict[str, Any]) -> str:
    """SASRec's chosen grid point, its early-stopped epoch and the tuning time, in one line."""
    chosen = info["chosen"]
    point = ", ".join(f"{k} {chosen[k]:g}" for k in ("hidden", "layers", "max_len", "dropout"))
    return (
        f"sasrec: {point}; best epoch {chosen['best_epoch']} of {chosen['epochs']}, valid NDCG@10 "
        f"{chosen['valid_ndcg@10']:.4f}; grid of {len(info['grid'])} tuned in {info['seconds']:.0f}s "
        f"({info['threads']} thread(s), {info['device']}, seed {info['seed']})"
    )
