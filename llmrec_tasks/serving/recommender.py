"""Serving: load a published bundle (checksums verified), and ``recommend()`` from it.

Loading trusts nothing but the manifest: every file's size (stat, first) and sha256 (streamed in
1 MiB reads) are compared with the manifest on a local copy, and a partial or corrupt bundle is
refused with :class:`BundleError`. A ``file://`` store's bundle is used in place, an S3 bundle
from a verified local cache (:meth:`ObjectStore.local_file`). The large artifacts are then
memory-mapped, not read: ``embeddings.npy`` (``np.load(mmap_mode="r")``) and the FAISS index
(:func:`~llmrec_tasks.retrieval.index.load_index`), so a load costs little more resident memory
than the rest of the bundle (``benchmarks/bench_load.py``), and replicas on one host share the
mapped pages. Nothing is unpickled: FAISS and LightGBM load from their native formats, the rest is
JSON, ``.npy`` (``allow_pickle=False``) and Parquet.

``recommend(user_id | recent items, k, exclude_seen)``: the user's published history plus the
request's recent events (real-time personalisation) go to a :data:`Scorer`, which returns
candidates and their ranker features; the LightGBM ranker scores them. Each item comes with a
``reason`` a person reads and the ``signals`` behind it: the ranker's largest feature contributions
(Saabas, :func:`path_contributions`), each feature worded by :data:`FEATURE_REASONS` and naming the
history item that drove it where there is one. No usable history -> the most popular items
(``strategy: "popular"``).

The default scorer (:func:`ranker_scorer`) is the ranking stage's own code, so serving computes
exactly the training features: ``candidates.context_from_artifacts`` (built once per bundle from
``serving_stats.parquet``, ``item_neighbors.parquet`` and ``feature_spec.json`` keys ``context``,
``stats_end``, ``candidates``, ``features``), then ``generate_candidates`` + ``build_features``
per request, as a batch of one user. What depends only on the bundle (the popularity ranking,
the per-item FAISS neighbour table ``faiss_last`` reads, item centrality, category vectors) is
built at load (``sources.precompute``, ``features.precompute``: about a second of CPU for the
MovieLens bundle); a request gathers the relation rows of its history items, runs one FAISS
search (its profile), with no sparse matrix built, and adds every sum up in the same order as a
training batch does, so its feature rows are bit-identical to training's
(``tests/unit/test_feature_parity.py``). The sequence model's user states are kept per history
(bounded, :class:`~llmrec_tasks.ranking.seqstate.StateMemo`): a user's next request without new
events skips its encoder. Candidates never include the history (as in training):
``exclude_seen=False`` only lets seen items into the popularity fill.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from llmrec_tasks.core import constants as C
from llmrec_tasks.core.config import validate_name
from llmrec_tasks.core.errors import BundleError, ConfigError, DataContractError, LlmrecError
from llmrec_tasks.ranking import context, events, features, sources
from llmrec_tasks.ranking.keys import lookup
from llmrec_tasks.ranking.seqstate import SeqScorer, SeqWeights
from llmrec_tasks.storage import registry
from llmrec_tasks.storage.store import ObjectStore, open_store

log = logging.getLogger(__name__)

REASON_ITEMS = 50  # most recent history items a reason may point to
REASON_PARTS = 2  # phrases per reason
SIGNALS = 5  # largest feature contributions (by magnitude) kept per item
DOWNLOAD_WORKERS = 4


@dataclass(frozen=True)
class Event:
    """One interaction sent with a request (real-time personalisation)."""

    item_id: str
    weight: float = 1.0
    timestamp: float | None = None  # unix seconds; orders the events when given


@dataclass(frozen=True)
class History:
    """A user's interactions as item rows of the bundle, oldest first."""

    items: np.ndarray  # int64 rows into the bundle's item arrays
    weights: np.ndarray  # float32
    timestamps: np.ndarray  # float64 unix seconds, NaN when unknown

    @classmethod
    def empty(cls) -> History:
        return cls(np.empty(0, np.int64), np.empty(0, np.float32), np.empty(0, np.float64))

    def __len__(self) -> int:
        return len(self.items)


@dataclass
class Bundle:
    """Every artifact of one verified bundle, ready to serve (embeddings and index memory-mapped
    from the verified files, which bundles never change in place)."""

    namespace: str
    version: str
    uri: str
    manifest: dict[str, Any]
    item_ids: list[str]
    item_row: dict[str, int]
    embeddings: np.ndarray
    index: Any
    booster: Any
    path_contrib: np.ndarray  # (n_trees, max_leaves, n_features), see path_contributions()
    feature_spec: dict[str, Any]
    feature_names: list[str]
    titles: list[str]
    popularity: np.ndarray
    popular_order: np.ndarray
    tables: dict[str, pd.DataFrame]  # every Parquet file of the bundle, by file name
    user_row: dict[str, int]
    hist_indptr: np.ndarray
    hist_items: np.ndarray
    hist_weights: np.ndarray
    hist_timestamps: np.ndarray
    seq: SeqWeights | None = None  # the text-aware sequence model (C.SEQ_MODEL), when trained
    loaded_at: float = field(default_factory=time.time)

    @property
    def history_end(self) -> float:
        """Unix seconds of the newest interaction the bundle was built from (-inf when unknown):
        a real-time event after it is not in the published history yet."""
        return float(self.feature_spec.get("stats_end", float("-inf")))

    def history(self, user_id: str) -> History:
        """The user's published history (empty for an unknown user)."""
        row = self.user_row.get(user_id)
        if row is None:
            return History.empty()
        lo, hi = self.hist_indptr[row], self.hist_indptr[row + 1]
        return History(self.hist_items[lo:hi], self.hist_weights[lo:hi], self.hist_timestamps[lo:hi])


# A scorer turns a history (and the time of the request) into candidate item rows and their
# feature matrix: ``(candidates int64 (n,), features float32 (n, len(bundle.feature_names)))``.
Scorer = Callable[[History, float], tuple[np.ndarray, np.ndarray]]


# --- loading -------------------------------------------------------------------------------------


def _local_files(
    store: ObjectStore, namespace: str, version: str, manifest: dict[str, Any]
) -> dict[str, Path]:
    """Every file of the manifest as a local path, checked against the manifest (size and sha256)."""
    where = store.uri_for(registry.bundle_prefix(namespace, version))
    files: dict[str, dict[str, Any]] = manifest["files"]
    missing = registry.missing_required(files)
    if missing:
        raise BundleError(f"{where}: manifest lacks {missing}; re-publish this version")

    def local(name: str) -> tuple[str, Path]:
        return name, registry.bundle_file(store, namespace, version, name, manifest)

    with ThreadPoolExecutor(max_workers=DOWNLOAD_WORKERS) as pool:
        return dict(pool.map(local, sorted(files)))


def _parse(name: str, parse: Callable[[], Any], where: str) -> Any:
    """Parse one verified artifact; a failure means the bundle was published broken."""
    from lightgbm.basic import LightGBMError

    try:
        return parse()
    except (ValueError, TypeError, KeyError, RuntimeError, OSError, LightGBMError) as exc:
        raise BundleError(f"{where}: {name} passed its checksum but cannot be loaded: {exc}") from exc


@dataclass
class Artifacts:
    """The parsed files of a bundle, before the serving structures are derived from them."""

    embeddings: np.ndarray
    item_ids: list[str]
    index: Any
    booster: Any
    spec: dict[str, Any]
    tables: dict[str, pd.DataFrame]  # every Parquet file of the bundle, by file name
    seq: SeqWeights | None = None  # the sequence model, when the run trained one


def read_artifacts(paths: dict[str, Path], where: str) -> Artifacts:
    """Parse verified local files: embeddings and index memory-mapped, the rest read."""
    import lightgbm

    from llmrec_tasks.retrieval.index import load_index

    embeddings = _parse(
        C.EMBEDDINGS, lambda: np.load(paths[C.EMBEDDINGS], mmap_mode="r", allow_pickle=False), where
    )
    if embeddings.dtype != np.float32 or not embeddings.flags.c_contiguous:
        raise BundleError(
            f"{where}: {C.EMBEDDINGS} holds {embeddings.dtype} "
            f"{'C' if embeddings.flags.c_contiguous else 'Fortran'}-order vectors; serving maps "
            "float32 C-order ones: re-publish"
        )
    item_ids = _parse(C.ITEM_IDS, lambda: json.loads(paths[C.ITEM_IDS].read_bytes()), where)
    index_info = _parse(C.INDEX_INFO, lambda: json.loads(paths[C.INDEX_INFO].read_bytes()), where)
    return Artifacts(
        embeddings=embeddings,
        item_ids=[str(i) for i in item_ids],
        index=_parse(C.FAISS_INDEX, lambda: load_index(paths[C.FAISS_INDEX], index_info, embeddings), where),
        booster=_parse(
            C.RANKER_MODEL, lambda: lightgbm.Booster(model_file=str(paths[C.RANKER_MODEL])), where
        ),
        spec=_parse(C.FEATURE_SPEC, lambda: json.loads(paths[C.FEATURE_SPEC].read_bytes()), where),
        tables={
            name: _parse(name, lambda path=path: pd.read_parquet(path), where)
            for name, path in paths.items()
            if name.endswith(".parquet")
        },
        seq=_parse(C.SEQ_MODEL, lambda: SeqWeights.from_bytes(paths[C.SEQ_MODEL].read_bytes()), where)
        if C.SEQ_MODEL in paths
        else None,
    )


def load_bundle(store_uri: str, namespace: str, version: str = registry.CURRENT) -> Bundle:
    """Load and verify a bundle by store URI + namespace + version (``current`` or a version id)."""
    validate_name("namespace", namespace)
    store = open_store(store_uri)
    version = registry.resolve_version(store, namespace, version)
    manifest = registry.read_manifest(store, namespace, version)
    where = store.uri_for(registry.bundle_prefix(namespace, version))
    paths = _local_files(store, namespace, version, manifest)
    return assemble_bundle(namespace, version, where, manifest, read_artifacts(paths, where))


def assemble_bundle(
    namespace: str, version: str, where: str, manifest: dict[str, Any], artifacts: Artifacts
) -> Bundle:
    """Check that the artifacts agree and derive what serving looks up (rows, popularity, histories)."""
    embeddings, item_ids, index = artifacts.embeddings, artifacts.item_ids, artifacts.index
    booster, spec, tables = artifacts.booster, artifacts.spec, artifacts.tables
    items, hist = tables[C.BUNDLE_ITEMS], tables[C.USER_HISTORIES]

    n = len(item_ids)
    if embeddings.ndim != 2 or embeddings.shape[0] != n or index.ntotal != n:
        raise BundleError(
            f"{where}: {n} item ids, embeddings {embeddings.shape}, index of {index.ntotal}: they must agree"
        )
    feature_names = list(spec.get("features") or booster.feature_name())
    if booster.num_feature() != len(feature_names):
        raise BundleError(
            f"{where}: ranker expects {booster.num_feature()} features, spec lists {len(feature_names)}"
        )
    item_row = {item: row for row, item in enumerate(item_ids)}
    items = items.set_index(C.ITEM_ID).reindex(item_ids)
    popularity = items[C.POPULARITY].fillna(0).to_numpy(dtype=np.float64)
    users, indptr, h_items, h_weights, h_ts = _histories(hist, item_row)
    log.info("loaded bundle %s (%d items, %d users with history)", where, n, len(users))
    return Bundle(
        namespace=namespace,
        version=version,
        uri=where,
        manifest=manifest,
        item_ids=item_ids,
        item_row=item_row,
        embeddings=embeddings,
        index=index,
        booster=booster,
        path_contrib=path_contributions(booster),
        feature_spec=spec,
        feature_names=feature_names,
        titles=items[C.TITLE].fillna("").astype(str).tolist(),
        popularity=popularity,
        popular_order=np.argsort(-popularity, kind="stable"),
        tables=tables,
        user_row=users,
        hist_indptr=indptr,
        hist_items=h_items,
        hist_weights=h_weights,
        hist_timestamps=h_ts,
        seq=artifacts.seq,
    )


def path_contributions(booster: Any) -> np.ndarray:
    """Per tree and leaf: the change of the expected score at each split on the root-to-leaf path,
    credited to the split's feature (Saabas attribution; per row the sum is score - bias).

    Looked up per request from the leaf indices, this costs well under a millisecond, where
    LightGBM's exact SHAP (``pred_contrib``) takes tens of milliseconds for ten rows of a
    300-tree ranker.
    """
    trees = booster.dump_model()["tree_info"]
    n_features = booster.num_feature()
    out = np.zeros((len(trees), max(t["num_leaves"] for t in trees), n_features), dtype=np.float32)
    for t, tree in enumerate(trees):
        stack = [(tree["tree_structure"], np.zeros(n_features))]
        while stack:
            node, credit = stack.pop()
            if "split_feature" not in node:
                out[t, node.get("leaf_index", 0)] = credit
                continue
            for child in (node["left_child"], node["right_child"]):
                value = child["internal_value"] if "split_feature" in child else child["leaf_value"]
                step = credit.copy()
                step[node["split_feature"]] += value - node["internal_value"]
                stack.append((child, step))
    return out


def _histories(
    hist: pd.DataFrame, item_row: dict[str, int]
) -> tuple[dict[str, int], np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Histories as CSR arrays (one row per user, oldest first); unknown items dropped."""
    rows = hist[C.ITEM_ID].astype(str).map(item_row)
    hist = hist.assign(_row=rows).dropna(subset=["_row"])
    ts = pd.to_datetime(hist[C.TIMESTAMP], utc=True)
    hist = hist.assign(_ts=(ts - pd.Timestamp(0, tz="UTC")).dt.total_seconds())
    hist = hist.sort_values([C.USER_ID, "_ts"], kind="stable")
    codes, users = pd.factorize(hist[C.USER_ID].astype(str), sort=False)
    counts = np.bincount(codes, minlength=len(users))
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return (
        {str(u): i for i, u in enumerate(users)},
        indptr,
        hist["_row"].to_numpy(dtype=np.int64),
        hist[C.WEIGHT].to_numpy(dtype=np.float32),
        hist["_ts"].to_numpy(dtype=np.float64),
    )


# --- recommending --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Signal:
    """One ranker feature's share of an item's score (Saabas contribution): the data behind a reason."""

    feature: str
    contribution: float


@dataclass(frozen=True)
class RecommendedItem:
    item_id: str
    score: float
    reason: str  # phrases a person reads, "; "-separated
    title: str | None  # None when the catalog has no title for the item
    # The largest contributions to the score, strongest first; empty for popular fills.
    signals: list[Signal] = field(default_factory=list)


@dataclass(frozen=True)
class Recommendation:
    items: list[RecommendedItem]
    strategy: str  # "personalized" | "popular"
    version: str
    history_length: int
    ignored_item_ids: list[str]


# --- reasons -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReasonTemplate:
    """How one ranker feature reads as a reason.

    ``when``: the feature explains the item only when its value is above (``high``) or below
    (``low``, e.g. a rank) the median over the request's candidates, or ``any`` value. ``{anchor}``
    in ``text`` names the user's history item behind it: the ``position``-th most recent item, else
    the one with the strongest ``relation`` link to the candidate, else the most similar one.
    """

    text: str
    when: Literal["high", "low", "any"] = "high"
    relation: str | None = None
    position: int | None = None

    @property
    def anchored(self) -> bool:
        return "{anchor}" in self.text


SIMILAR = "similar to “{anchor}” you interacted with"
TASTE = "close to your overall taste, such as “{anchor}”"
NEW_FOR_YOU = "new in the catalog, close to your taste such as “{anchor}”"
RECENT_TASTE = "close to what you chose recently, such as “{anchor}”"
TOGETHER = "often chosen together with “{anchor}”"
FOLLOWS = "follows “{anchor}” in many histories"
PRECEDES = "often chosen just before “{anchor}”"
ALSO_CHOSE = "people who chose “{anchor}” also chose this"
POPULAR_NOW = "popular right now"
POPULAR = "popular overall"
YOUR_CATEGORIES = "in categories you often choose"
YOUR_HABITS = "fits how you usually choose"
WHAT_NEXT = "a likely next step after what you chose recently"

_SOURCE_REASONS = {
    "faiss_profile": ReasonTemplate(TASTE),
    "faiss_last": ReasonTemplate(SIMILAR),
    "faiss_new": ReasonTemplate(NEW_FOR_YOU),
    "next": ReasonTemplate(FOLLOWS, relation="next"),
    "prev": ReasonTemplate(PRECEDES, relation="prev"),
    "cooc": ReasonTemplate(TOGETHER, relation="cooc"),
    "ease": ReasonTemplate(ALSO_CHOSE, relation="ease"),
    "pop": ReasonTemplate(POPULAR_NOW),
    "seq": ReasonTemplate(WHAT_NEXT),
}

# Every ranker feature (llmrec_tasks.ranking.features.FEATURE_NAMES) -> how it reads.
FEATURE_REASONS: dict[str, ReasonTemplate] = {
    **{f"{source}_score": template for source, template in _SOURCE_REASONS.items()},
    **{f"{source}_rank": replace(t, when="low") for source, t in _SOURCE_REASONS.items()},
    "sem_longterm": ReasonTemplate(TASTE),
    **{f"sem_last_{k}": ReasonTemplate(SIMILAR, position=k) for k in range(1, features.LAST_K + 1)},
    "sem_recent_max": ReasonTemplate(SIMILAR),
    "sem_recent_mean": ReasonTemplate(RECENT_TASTE),
    "sem_category": ReasonTemplate(YOUR_CATEGORIES),
    "item_centrality": ReasonTemplate("a broadly appealing choice"),
    "item_text_len": ReasonTemplate("has a detailed description"),
    "seq_logprob": ReasonTemplate(WHAT_NEXT),
    "next_last1": ReasonTemplate(FOLLOWS, position=1),
    "prev_last1": ReasonTemplate(PRECEDES, position=1),
    "cooc_last1": ReasonTemplate(TOGETHER, position=1),
    "next_support": ReasonTemplate(FOLLOWS, relation="next"),
    "cooc_recent": ReasonTemplate(TOGETHER, relation="cooc"),
    "cat_affinity": ReasonTemplate(YOUR_CATEGORIES),
    "cat_affinity_recent": ReasonTemplate("in categories you chose recently"),
    "item_n_categories": ReasonTemplate("spans several categories"),
    "item_pop_log": ReasonTemplate(POPULAR),
    "item_pop_before": ReasonTemplate(POPULAR),
    "item_pop_w0": ReasonTemplate(POPULAR_NOW),
    "item_pop_w1": ReasonTemplate("popular lately"),
    "item_trend": ReasonTemplate("gaining popularity"),
    "item_age_days": ReasonTemplate("new in the catalog", when="low"),
    "item_idle_days": ReasonTemplate("chosen by others very recently", when="low"),
    "item_weight_mean": ReasonTemplate("well received by those who chose it"),
    **{
        name: ReasonTemplate(YOUR_HABITS, when="any")
        for name in (
            "user_hist_len",
            "user_span_days",
            "user_idle_days",
            "user_last_gap_days",
            "user_burst",
            "user_pop_log_mean",
            "pop_vs_user",
        )
    },
}


# --- recommending --------------------------------------------------------------------------------


class Lap:
    """Stage timings for one request: ``lap(stage)`` stores the seconds since the previous lap."""

    __slots__ = ("last", "out")

    def __init__(self, out: dict[str, float]) -> None:
        self.out = out
        self.last = time.perf_counter()

    def __call__(self, stage: str) -> None:
        now = time.perf_counter()
        self.out[stage] = now - self.last
        self.last = now


@dataclass(frozen=True)
class RankerScorer:
    """The ranking stage's candidates and features over one bundle (a :data:`Scorer`)."""

    context: context.RankContext
    params: sources.CandidateParams
    names: list[str] | None = None  # the ranker's columns, in its order (default FEATURE_NAMES)

    def __call__(self, history: History, now: float, lap: Lap | None = None) -> tuple[np.ndarray, np.ndarray]:
        hist = events.Histories.from_lists([history.items], [history.timestamps], np.array([now]))
        cands = sources.generate_candidates(self.context, hist, self.params)
        if lap is not None:
            lap("candidates")
        matrix = features.build_features(self.context, hist, cands, self.names)
        if lap is not None:
            lap("features")
        return cands.items, matrix


def ranker_scorer(bundle: Bundle) -> RankerScorer:
    """The ranking stage's scorer over this bundle (context built once)."""
    spec = bundle.feature_spec
    missing = [k for k in ("context", "stats_end", "candidates") if k not in spec]
    missing += [name for name in (C.SERVING_STATS, C.ITEM_NEIGHBORS) if name not in bundle.tables]
    if missing:
        raise BundleError(f"{bundle.uri}: the ranker cannot be served, the bundle lacks {missing}")
    unknown = [name for name in bundle.feature_names if name not in features.FEATURE_NAMES]
    if unknown:
        raise BundleError(
            f"{bundle.uri}: the ranker reads feature(s) {unknown} this llmrec version does not compute: "
            "serve it with the llmrec version that trained it, or re-train"
        )
    try:
        ctx = context.context_from_artifacts(
            bundle.item_ids,
            bundle.embeddings,
            bundle.tables[C.SERVING_STATS],
            bundle.tables[C.ITEM_NEIGHBORS],
            spec["context"],
            float(spec["stats_end"]),
        )
        params = sources.CandidateParams(**spec["candidates"])
    except (DataContractError, ConfigError, KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"{bundle.uri}: the ranker's serving artifacts do not fit together: {exc}") from exc
    if (spec.get("seq") is not None) != (bundle.seq is not None):
        raise BundleError(
            f"{bundle.uri}: the feature spec {'names' if spec.get('seq') else 'has no'} sequence model but "
            f"the bundle {'lacks' if spec.get('seq') else 'holds'} {C.SEQ_MODEL}: re-publish this version"
        )
    try:
        # Kept states: a user's requests without new events skip the encoder (same bits).
        seq = SeqScorer.build(bundle.seq, bundle.embeddings).with_memo() if bundle.seq is not None else None
    except DataContractError as exc:
        raise BundleError(f"{bundle.uri}: {exc}") from exc
    # The published index, not a rebuilt one; the sequence model the ranker's features were computed with.
    ctx = replace(ctx, _index=bundle.index, seq=seq)
    sources.precompute(ctx, params)
    features.precompute(ctx)
    return RankerScorer(ctx, params, list(bundle.feature_names))


class Recommender:
    """Recommendations from one loaded bundle; thread-safe (read-only after construction)."""

    def __init__(self, bundle: Bundle, *, make_scorer: Callable[[Bundle], Scorer] | None = None) -> None:
        self.bundle = bundle
        self.scorer = (make_scorer or ranker_scorer)(bundle)
        # Item-item relations name the history item behind co-occurrence reasons; a scorer that is
        # not the ranking stage's has none, and those reasons fall back to the most similar item.
        self.relations = self.scorer.context.relations if isinstance(self.scorer, RankerScorer) else {}
        self.templates = [FEATURE_REASONS.get(name) for name in bundle.feature_names]
        self.when = np.array([t.when if t else "never" for t in self.templates])  # vectorised checks

    def _merge(self, user_id: str | None, recent: Sequence[str | Event]) -> tuple[History, list[str]]:
        """Published history + the request's events (newest last); unknown item ids are reported."""
        base = self.bundle.history(user_id) if user_id is not None else History.empty()
        sent = [e if isinstance(e, Event) else Event(str(e)) for e in recent]
        known = [e for e in sent if e.item_id in self.bundle.item_row]
        ignored = [e.item_id for e in sent if e.item_id not in self.bundle.item_row]
        if not known:
            return base, ignored
        now = time.time()
        items = np.concatenate([base.items, [self.bundle.item_row[e.item_id] for e in known]]).astype(
            np.int64
        )
        weights = np.concatenate([base.weights, [e.weight for e in known]]).astype(np.float32)
        stamps = np.concatenate(
            [base.timestamps, [now if e.timestamp is None else e.timestamp for e in known]]
        )
        order = np.argsort(stamps, kind="stable")  # events may predate the published history
        return History(items[order], weights[order], stamps[order]), ignored

    def recommend(
        self,
        user_id: str | None = None,
        recent: Sequence[str | Event] = (),
        k: int = 10,
        exclude_seen: bool = True,
        timings: dict[str, float] | None = None,
    ) -> Recommendation:
        """Top ``k`` items for a user and/or recent events, with a score and a reason each.

        ``timings``, when given, receives the seconds each stage took (``history``, ``candidates``,
        ``features``, ``score``, ``reasons``, ``popular`` for fills; ``scorer`` for candidates and
        features together when the scorer is not the ranking stage's), for the service's metrics.
        """
        bundle = self.bundle
        lap = Lap(timings) if timings is not None else None
        k = max(1, min(int(k), len(bundle.item_ids)))
        history, ignored = self._merge(user_id, recent)
        seen = set(history.items.tolist()) if exclude_seen else set()
        if lap is not None:
            lap("history")
        if len(history) == 0:
            return self._popular(k, seen, [], history, ignored, lap)
        if lap is None:
            candidates, matrix = self.scorer(history, time.time())
        elif isinstance(self.scorer, RankerScorer):
            candidates, matrix = self.scorer(history, time.time(), lap)
        else:
            candidates, matrix = self.scorer(history, time.time())
            lap("scorer")
        matrix = np.asarray(matrix, dtype=np.float32)
        if matrix.shape != (len(candidates), len(bundle.feature_names)):
            raise BundleError(
                f"{bundle.uri}: features of shape {matrix.shape} for {len(candidates)} candidates; the ranker "
                f"expects {len(bundle.feature_names)} columns ({', '.join(bundle.feature_names)})"
            )
        if len(candidates) == 0:
            return self._popular(k, seen, [], history, ignored, lap)
        scores = bundle.booster.predict(matrix, num_threads=1)
        top = np.argsort(-scores, kind="stable")[:k]
        if lap is not None:
            lap("score")
        explained = self._reasons(history, candidates[top], matrix[top], _medians(matrix))
        chosen = [
            RecommendedItem(bundle.item_ids[c], float(scores[t]), reason, bundle.titles[c] or None, signals)
            for t, c, (reason, signals) in zip(top, candidates[top], explained, strict=True)
        ]
        if lap is not None:
            lap("reasons")
        if len(chosen) < k:  # tiny catalogs or long histories: fill with popular items
            return self._popular(k, seen | set(candidates[top].tolist()), chosen, history, ignored, lap)
        return Recommendation(chosen, "personalized", bundle.version, len(history), ignored)

    def _reasons(
        self, history: History, chosen: np.ndarray, matrix: np.ndarray, medians: np.ndarray
    ) -> list[tuple[str, list[Signal]]]:
        """Per chosen item: up to REASON_PARTS phrases from its largest positive contributions, and its signals.

        A feature explains an item when its contribution is positive and its value stands out as
        its template says (above or below the candidates' median). An item no feature explains
        reads "similar to" its most similar history item.
        """
        bundle = self.bundle
        hist_items = history.items[-REASON_ITEMS:]
        similarity = bundle.embeddings[chosen] @ bundle.embeddings[hist_items].T
        leaves = np.asarray(bundle.booster.predict(matrix, pred_leaf=True, num_threads=1), dtype=np.int64)
        trees = np.arange(leaves.shape[1])
        contrib = bundle.path_contrib[trees[None, :], leaves].sum(axis=1)
        when = self.when
        explains = (contrib > 0) & (
            ((when == "high") & (matrix > medians))
            | ((when == "low") & np.isfinite(matrix) & (matrix < medians))
            | (when == "any")
        )
        by_contribution = np.argsort(-np.where(explains, contrib, 0), axis=1, kind="stable")
        strongest = np.argsort(-np.abs(contrib), axis=1, kind="stable")[:, :SIGNALS]
        strongest_values = np.take_along_axis(contrib, strongest, axis=1).astype(float).round(4).tolist()
        links: dict[str, np.ndarray] = {}  # relation -> (chosen, hist_items) values, on first use

        def anchor(template: ReasonTemplate, row: int) -> int | None:
            if template.position is not None:
                return int(history.items[-template.position]) if len(history) >= template.position else None
            if template.relation in self.relations:
                if template.relation not in links:
                    keys, data = features.relation_rows(self.scorer.context, template.relation, hist_items)
                    pairs = hist_items[None, :] * len(bundle.item_ids) + chosen[:, None]
                    links[template.relation] = lookup(keys, data, pairs, 0.0)
                values = links[template.relation][row]
                return int(hist_items[values.argmax()]) if values.max(initial=0) > 0 else None
            return int(hist_items[similarity[row].argmax()])

        out = []
        for row, n_explaining in enumerate(explains.sum(axis=1).tolist()):
            phrases: dict[str, str] = {}  # template text -> phrase: one phrase per template
            for j in by_contribution[row, :n_explaining].tolist():
                template = self.templates[j]
                if len(phrases) == REASON_PARTS:
                    break
                if template is None or template.text in phrases:
                    continue
                if not template.anchored:
                    phrases[template.text] = template.text
                elif (item := anchor(template, row)) is not None:
                    phrases[template.text] = template.text.format(anchor=self._title(item))
            if not phrases:
                nearest = int(hist_items[similarity[row].argmax()])
                phrases[SIMILAR] = SIMILAR.format(anchor=self._title(nearest))
            signals = [
                Signal(bundle.feature_names[j], value)
                for j, value in zip(strongest[row].tolist(), strongest_values[row], strict=True)
                if value != 0
            ]
            out.append(("; ".join(phrases.values()), signals))
        return out

    def _title(self, row: int) -> str:
        return self.bundle.titles[row] or self.bundle.item_ids[row]

    def _popular(
        self,
        k: int,
        exclude: set[int],
        chosen: list[RecommendedItem],
        history: History,
        ignored: list[str],
        lap: Lap | None = None,
    ) -> Recommendation:
        """Fill up to ``k`` with the most popular items not excluded (cold start / fallback)."""
        bundle = self.bundle
        items = list(chosen)
        taken = exclude | {bundle.item_row[i.item_id] for i in chosen}
        for row in bundle.popular_order:
            if len(items) >= k:
                break
            if int(row) in taken:
                continue
            count = int(bundle.popularity[row])
            reason = f"popular: chosen {count} time{'s' if count != 1 else ''} by others"
            items.append(
                RecommendedItem(bundle.item_ids[row], float(count), reason, bundle.titles[row] or None)
            )
        strategy = "personalized" if chosen else "popular"
        if lap is not None:
            lap("popular")
        return Recommendation(items, strategy, bundle.version, len(history), ignored)


def _medians(matrix: np.ndarray) -> np.ndarray:
    """Per feature, the median over the request's candidates (a missing value counts as the lowest)."""
    return np.median(np.where(np.isnan(matrix), -np.inf, matrix), axis=0)


# --- pre-promotion check -------------------------------------------------------------------------


def single_threaded_native_code() -> Any:
    """Limit the native thread pools (OpenBLAS, OpenMP of FAISS and LightGBM) to one thread, at once:
    the worker processes (HTTP) or shards (batch) are the parallelism. On a busy 2-core host their
    spinning teams made ``recommend`` 2-4x and batch features 5-8x slower (MovieLens bundle).
    The returned limiter also works as a context manager that restores the previous limits."""
    import faiss  # noqa: F401  (loads FAISS's own OpenMP runtime, so that the limit reaches it)
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1)


def smoke_check(recommender: Recommender, *, k: int = 10, users: int = 3) -> dict[str, Any]:
    """Answer sample queries from the bundle; BundleError if any answer is wrong (TFX infra validation)."""
    bundle = recommender.bundle
    lengths = np.diff(bundle.hist_indptr)
    by_length = np.argsort(-lengths, kind="stable")
    user_ids = list(bundle.user_row)
    sample_users = [user_ids[i] for i in by_length[:: max(1, len(by_length) // users)][:users]]
    queries: list[tuple[str, dict[str, Any]]] = [(f"user {u}", {"user_id": u}) for u in sample_users]
    if sample_users:
        recent = [bundle.item_ids[r] for r in bundle.history(sample_users[0]).items[-3:]]
        queries.append(("recent items only", {"recent": recent}))
    queries.append(("unknown user", {"user_id": "__llmrec_smoke_unknown__"}))
    from lightgbm.basic import LightGBMError

    timings = []
    for label, query in queries:
        started = time.perf_counter()
        try:
            result = recommender.recommend(k=k, **query)
        except (LightGBMError, ValueError, IndexError, KeyError) as exc:
            raise BundleError(f"serving check of {bundle.uri} failed for {label}: {exc}") from exc
        timings.append((time.perf_counter() - started) * 1000)
        _check_answer(bundle, label, query, result, k)
    return {
        "queries": len(queries),
        "max_ms": round(max(timings), 2),
        "mean_ms": round(float(np.mean(timings)), 2),
    }


def _check_answer(bundle: Bundle, label: str, query: dict[str, Any], result: Recommendation, k: int) -> None:
    ids = [i.item_id for i in result.items]
    expected = min(k, len(bundle.item_ids))
    problems = []
    if len(ids) != expected:
        problems.append(f"{len(ids)} items instead of {expected}")
    if len(set(ids)) != len(ids):
        problems.append("duplicate items")
    if not all(np.isfinite(i.score) for i in result.items):
        problems.append("non-finite scores")
    seen = {bundle.item_ids[r] for r in bundle.history(query.get("user_id", "")).items} | set(
        query.get("recent", [])
    )
    if seen & set(ids) and len(seen) + expected <= len(bundle.item_ids):
        problems.append("already-seen items recommended")
    if problems:
        raise BundleError(f"serving check of {bundle.uri} failed for {label}: {'; '.join(problems)}")


# --- hot reload ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Challenger:
    """The challenger arm of a running A/B experiment: its definition (``current.json`` key
    ``experiment``) and its loaded bundle, swapped as one object so a request never sees a torn pair."""

    experiment: dict[str, Any]
    recommender: Recommender


class BundleHolder:
    """The serving process's current bundle (and an experiment's challenger); picks up a new
    ``current`` or experiment without a restart.

    A background thread reads ``current.json`` every ``poll_seconds``; when it names another
    version, that bundle is loaded and verified, then swapped in. A bundle that fails to load is
    not swapped in: the previous one keeps serving and the error is kept for ``/healthz``. A
    challenger that fails to load leaves every user on the current bundle (error kept likewise).
    """

    def __init__(
        self,
        store_uri: str,
        namespace: str,
        *,
        poll_seconds: float = 5.0,
        on_swap: Callable[[Recommender], None] | None = None,
    ) -> None:
        self.store_uri = store_uri
        self.on_swap = on_swap  # called with each current recommender swapped in (e.g. the version metric)
        self.namespace = validate_name("namespace", namespace)
        self.poll_seconds = poll_seconds
        self.recommender: Recommender | None = None
        self.challenger: Challenger | None = None
        self.pointer_version: str | None = None
        self.last_error: str | None = None
        self._load_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def refresh(self) -> bool:
        """Follow ``current.json``: load ``current`` if it moved, the challenger if the experiment
        changed; returns True when anything was swapped in (or the experiment ended)."""
        with self._load_lock:
            try:
                pointer, _ = registry.read_pointer(open_store(self.store_uri), self.namespace)
            except LlmrecError as exc:  # store trouble: keep serving what is loaded
                self.last_error = str(exc)
                log.error("keeping the bundles already loaded: %s", exc)
                return False
            self.pointer_version = None if pointer is None else str(pointer["version"])
            errors: list[str] = []
            try:
                swapped = self._refresh_current()
            except LlmrecError as exc:  # bundle or config trouble: keep serving the old one
                errors.append(str(exc))
                log.error("keeping the bundle already loaded: %s", exc)
                swapped = False
            try:
                swapped = self._refresh_challenger((pointer or {}).get(registry.EXPERIMENT)) or swapped
            except LlmrecError as exc:
                self.challenger = None
                errors.append(f"challenger: {exc}")
                log.error("serving every user the current bundle: the challenger failed to load: %s", exc)
            self.last_error = "; ".join(errors) or None
            return swapped

    def _refresh_current(self) -> bool:
        loaded = self.recommender.bundle.version if self.recommender else None
        if self.pointer_version is None or self.pointer_version == loaded:
            return False
        bundle = load_bundle(self.store_uri, self.namespace, self.pointer_version)
        self.recommender = Recommender(bundle)
        log.info("now serving %s/%s", self.namespace, bundle.version)
        if self.on_swap is not None:
            self.on_swap(self.recommender)
        return True

    def _refresh_challenger(self, experiment: dict[str, Any] | None) -> bool:
        held = self.challenger
        if experiment is None:
            self.challenger = None
            if held is not None:
                log.info("experiment %s ended: every user on the current bundle", held.experiment["name"])
            return held is not None
        if held is not None and held.experiment == experiment:
            return False
        version = str(experiment["challenger"])
        if held is not None and held.recommender.bundle.version == version:
            recommender = held.recommender  # same bundle, new share or salt
        else:
            recommender = Recommender(load_bundle(self.store_uri, self.namespace, version))
        self.challenger = Challenger(dict(experiment), recommender)
        log.info(
            "experiment %s: %s to %.1f%% of users",
            experiment["name"],
            version,
            100 * float(experiment["share"]),
        )
        return True

    def for_user(self, user_id: str | None) -> tuple[Recommender | None, str]:
        """The recommender and arm serving ``user_id`` (:func:`registry.assign_arm`)."""
        current, challenger = self.recommender, self.challenger
        if challenger is not None and registry.assign_arm(challenger.experiment, user_id) == C.CHALLENGER_ARM:
            return challenger.recommender, C.CHALLENGER_ARM
        return current, C.CURRENT_ARM

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            self.refresh()

    def start(self) -> None:
        """Load once now, then poll in a daemon thread."""
        self.refresh()
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="llmrec-bundle-poll", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.poll_seconds + 5)
