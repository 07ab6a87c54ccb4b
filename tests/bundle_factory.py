"""Small real run artifacts for publish/serving tests, independent of the upstream stages.

`make_run()` writes what validate/embed/index/train would leave in a run's work folder (snapshot,
embeddings, a FAISS IndexFlatIP, a tiny LightGBM ranker trained on random features, feature spec,
metrics, ...) and returns the typed stage results `run_publish` takes. `toy_scorer` gives
that ranker its candidates and features (the real scorer is `serving.ranker_scorer`).
`race()` runs conditional writes at the same instant and reports the winners.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pandas as pd

from llmrec_tasks.core import constants as C
from llmrec_tasks.core.config import RunConfig
from llmrec_tasks.core.results import Embedded, Indexed, Trained, Validated
from llmrec_tasks.storage.registry import make_version, run_prefix
from llmrec_tasks.storage.store import PreconditionFailed, open_store
from tests.stage_results import DATA_URI, embedded_for, indexed_for

FEATURES = ["profile_sim", "log_popularity", "last_item_sim"]
N_ITEMS = 60
N_USERS = 20
DIM = 16


def toy_scorer(bundle: Any) -> Callable[[Any, float], tuple[np.ndarray, np.ndarray]]:
    """FAISS candidates around the mean history vector, with the three features of the toy ranker."""

    def score(history: Any, now: float) -> tuple[np.ndarray, np.ndarray]:
        profile = bundle.embeddings[history.items[-20:]].mean(axis=0)
        profile /= max(float(np.linalg.norm(profile)), 1e-9)
        sims, rows = bundle.index.search(profile[None, :].astype(np.float32), bundle.index.ntotal)
        seen = set(history.items.tolist())
        keep = [(r, s) for r, s in zip(rows[0], sims[0], strict=True) if r >= 0 and r not in seen][:30]
        candidates = np.array([r for r, _ in keep], dtype=np.int64)
        similarity = np.array([s for _, s in keep], dtype=np.float32)
        last = bundle.embeddings[history.items[-1]]
        features = np.column_stack(
            [similarity, np.log1p(bundle.popularity[candidates]), bundle.embeddings[candidates] @ last]
        )
        return candidates, features.astype(np.float32)

    return score


def toy_dataset(seed: int) -> tuple[pd.DataFrame, pd.DataFrame, np.ndarray]:
    """Items in 3 topics with clustered embeddings; users who mostly stay on one topic."""
    rng = np.random.default_rng(seed)
    topics = np.arange(N_ITEMS) % 3
    centers = rng.normal(size=(3, DIM))
    vectors = centers[topics] + 0.3 * rng.normal(size=(N_ITEMS, DIM))
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)
    items = pd.DataFrame(
        {
            C.ITEM_ID: [f"i{n}" for n in range(N_ITEMS)],
            C.TITLE: [f"Item {n} (topic {t})" for n, t in enumerate(topics)],
            C.TEXT: "",
            C.CATEGORIES: [f"topic{t}" for t in topics],
        }
    )
    rows = []
    start = datetime(2024, 1, 1, tzinfo=UTC).timestamp()
    for u in range(N_USERS):
        topic = u % 3
        pool = np.flatnonzero(topics == topic)
        for step, item in enumerate(rng.choice(pool, size=8, replace=False)):
            rows.append(
                (f"u{u}", f"i{item}", pd.Timestamp(start + 3600 * (u * 10 + step), unit="s", tz="UTC"), 1.0)
            )
    inter = pd.DataFrame(rows, columns=[C.USER_ID, C.ITEM_ID, C.TIMESTAMP, C.WEIGHT])
    return items, inter, vectors


def toy_ranker(seed: int) -> str:
    """LightGBM model text (native format) over FEATURES, trained on random data."""
    import lightgbm

    rng = np.random.default_rng(seed)
    x = rng.normal(size=(400, len(FEATURES)))
    y = (x[:, 0] + 0.3 * x[:, 1] + 0.5 * x[:, 2] + 0.2 * rng.normal(size=400) > 0).astype(int)
    params = {"objective": "binary", "num_leaves": 7, "verbose": -1, "seed": seed, "num_threads": 1}
    booster = lightgbm.train(params, lightgbm.Dataset(x, y, feature_name=FEATURES), num_boost_round=15)
    return booster.model_to_string()


REAL_CONTEXT = {"neighbors_k": 20, "ease_max_items": 100, "pop_windows": (10, 50)}
REAL_CANDIDATES = {"num_candidates": 30, "per_source": 10, "rank_depth": 20, "seq_candidates": 12}
SEQ_MAX_LEN = 6  # shorter than the toy histories: the user state reads the latest events only


def toy_seq_weights(vectors: np.ndarray, seed: int = 0) -> Any:
    """An untrained (random, seeded) text-aware sequence model over ``vectors``, exported as trained ones are."""
    import torch

    from llmrec_tasks.ranking.seqmodel import SeqParams, TextSeqModel

    params = SeqParams(hidden=16, layers=2, heads=2, max_len=SEQ_MAX_LEN, dropout=0.0, delta_bound=0.5)
    torch.manual_seed(seed)
    known = np.arange(len(vectors)) % 4 != 0  # every fourth item never seen in training: no delta
    model = TextSeqModel(vectors, known, params)
    with torch.no_grad():
        model.delta_raw.normal_()
    return model.export(params)


def real_context(items: pd.DataFrame, inter: pd.DataFrame, vectors: np.ndarray) -> tuple[Any, Any, Any]:
    """The training side of :func:`real_ranker`: ``(context, encoded events, user index)``."""
    from llmrec_tasks.ranking import context, events
    from llmrec_tasks.ranking.seqstate import SeqScorer

    encoded, users = events.encode_events(inter, pd.Index(items[C.ITEM_ID]))
    params = context.ContextParams(**REAL_CONTEXT)
    ctx = context.build_context(encoded, len(users), vectors, items, params)
    ctx.seq = SeqScorer.build(toy_seq_weights(vectors), vectors)
    return ctx, encoded, users


def real_ranker(
    items: pd.DataFrame, inter: pd.DataFrame, vectors: np.ndarray, seed: int, label_feature: str | None = None
) -> dict[str, bytes]:
    """Ranker, feature spec, serving stats and neighbours from the ranking stage's own code.

    The labels are random, or with ``label_feature`` its top fifth: a ranker that prefers high
    values of that feature (e.g. ``sem_last_1``, the similarity to the user's last item)."""

    import lightgbm

    from llmrec_tasks.ranking import context, events, features, sources
    from llmrec_tasks.ranking.seqstate import describe

    ctx, encoded, users = real_context(items, inter, vectors)
    params = ctx.params
    stats, neighbours = context.serving_frames(ctx, items[C.ITEM_ID].tolist())
    cand_params = sources.CandidateParams(**REAL_CANDIDATES)
    hist = events.Histories.from_events(encoded, len(users))
    cands = sources.generate_candidates(ctx, hist, cand_params)
    x = features.build_features(ctx, hist, cands)
    y = np.random.default_rng(seed).random(len(x)) < 0.2
    if label_feature is not None:
        column = x[:, features.FEATURE_NAMES.index(label_feature)]
        y = column > np.nanquantile(column, 0.8)
    train_params = {"objective": "binary", "num_leaves": 7, "verbose": -1, "seed": seed, "num_threads": 1}
    dataset = lightgbm.Dataset(x, y.astype(int), feature_name=features.FEATURE_NAMES)
    booster = lightgbm.train(train_params, dataset, num_boost_round=10)
    spec = {
        "features": features.FEATURE_NAMES,
        "context": params.to_dict(),
        "stats_end": ctx.stats_end,
        "candidates": dataclasses.asdict(cand_params),
        "seq": describe(ctx.seq.weights),
    }
    return {
        C.SEQ_MODEL: ctx.seq.weights.to_bytes(),
        C.RANKER_MODEL: booster.model_to_string().encode(),
        C.FEATURE_SPEC: json.dumps(spec).encode(),
        C.SERVING_STATS: parquet(stats),
        C.ITEM_NEIGHBORS: parquet(neighbours),
    }


def parquet(frame: pd.DataFrame) -> bytes:
    buf = io.BytesIO()
    frame.to_parquet(buf, index=False)
    return buf.getvalue()


def toy_results(ndcg: float) -> dict[str, Any]:
    """A train stage's ``metrics.json`` in shape (models with intervals and slices, comparisons)."""

    def model(value: float) -> dict[str, Any]:
        sliced = {"ndcg@10": value, "recall@10": value, "users": N_USERS, "runs": 1}
        return {
            "ndcg@10": value,
            "recall@10": value + 0.1,
            "ndcg@10_ci95": [value - 0.02, value + 0.02],
            "recall@10_ci95": [value + 0.08, value + 0.12],
            "users": N_USERS,
            "runs": 1,
            "slices": {"cold_items": sliced, "history 5-19": sliced},
        }

    paired = {"diff": 0.01, "ci95": [-0.005, 0.025], "p_not_better": 0.1}
    return {
        "protocol": "time",
        "models": {"ranker": model(ndcg), "ranker_no_llm": model(ndcg - 0.01), "popularity": model(0.1)},
        "comparisons": {"ranker_vs_ranker_no_llm": {"ndcg@10": paired, "recall@10": paired}},
    }


def make_run(
    store_uri: str,
    *,
    namespace: str = C.DEFAULT_NAMESPACE,
    data_uri: str = DATA_URI,
    cutoff: datetime = datetime(2024, 2, 1, tzinfo=UTC),
    seed: int = 0,
    ndcg: float = 0.30,
    real_features: bool = False,
    label_feature: str | None = None,
    **cfg_values: Any,
) -> tuple[RunConfig, Validated, Embedded, Indexed, Trained]:
    """Write a run's artifacts; returns ``(cfg, validated, embedded, indexed, trained)``."""
    import faiss

    cfg = RunConfig(
        data_uri=data_uri,
        store_uri=store_uri,
        namespace=namespace,
        cutoff=cutoff,
        dag_id="llmrec_daily",
        run_id=f"scheduled__{cutoff.isoformat()}",
        **cfg_values,
    )
    items, inter, vectors = toy_dataset(seed)
    fingerprint = hashlib.sha256(f"toy-{seed}".encode()).hexdigest()[:16]
    version = make_version(cutoff, fingerprint, cfg.params_hash())
    store = open_store(store_uri)
    work = run_prefix(namespace, version)

    def put(name: str, data: bytes) -> str:
        store.put_bytes(f"{work}/{name}", data)
        return store.uri_for(f"{work}/{name}")

    put(C.SNAPSHOT_ITEMS, parquet(items))
    put(C.SNAPSHOT_INTERACTIONS, parquet(inter))
    npy = io.BytesIO()
    np.save(npy, vectors, allow_pickle=False)
    index = faiss.IndexFlatIP(DIM)
    index.add(vectors)
    metrics = {"ranker": {"ndcg@10": ndcg, "recall@10": ndcg + 0.1}, "popularity": {"ndcg@10": 0.1}}
    validated = Validated(
        version=version,
        work_uri=store.uri_for(work),
        snapshot_uri=store.uri_for(f"{work}/{C.SNAPSHOT_DIR}"),
        fingerprint=fingerprint,
        validation_uri=put(C.VALIDATION_SUMMARY, json.dumps({"success": True}).encode()),
        validation_stats_uri=put(C.VALIDATION_STATS, json.dumps({"version": version}).encode()),
        data_docs_uri=put(f"{C.VALIDATION_DOCS_DIR}/index.html", b"<html>docs</html>").rsplit("/", 1)[0],
        counts={"items": N_ITEMS, "interactions": len(inter)},
        cutoff=cutoff.isoformat(),
    )
    put(f"{C.VALIDATION_DOCS_DIR}/static/style.css", b"body {}")
    keys = [hashlib.sha256(f"toy|{i}".encode()).hexdigest() for i in items[C.ITEM_ID]]
    put(C.EMBEDDINGS, npy.getvalue())
    put(C.ITEM_IDS, json.dumps(items[C.ITEM_ID].tolist()).encode())
    put(C.EMBEDDING_KEYS, json.dumps({"cache_id": "toy", "keys": keys}).encode())
    embedded = dataclasses.replace(
        embedded_for(store.uri_for(work), N_ITEMS, DIM), encoder={"model": "toy", "identity": "toy:16"}
    )
    put(C.FAISS_INDEX, faiss.serialize_index(index).tobytes())
    put(C.INDEX_INFO, json.dumps({"kind": "flat"}).encode())
    indexed = indexed_for(store.uri_for(work), N_ITEMS, DIM)
    if real_features:
        ranker = real_ranker(items, inter, vectors, seed, label_feature)
    else:
        ranker = {
            C.RANKER_MODEL: toy_ranker(seed).encode(),
            C.FEATURE_SPEC: json.dumps({"features": FEATURES}).encode(),
            C.SERVING_STATS: parquet(inter.groupby(C.ITEM_ID).size().rename("count").reset_index()),
            C.ITEM_NEIGHBORS: parquet(pd.DataFrame({"item": [0], "neighbor": [1], "score": [1.0]})),
        }
    # Evaluation data with no feature columns: the gate cannot score the current ranker on it and
    # compares against its recorded metrics (the toy rankers' features are not the real ones).
    no_eval = io.BytesIO()
    np.savez(no_eval, columns=np.array([], dtype=str))
    trained = Trained(
        model_uri=put(C.RANKER_MODEL, ranker[C.RANKER_MODEL]),
        feature_spec_uri=put(C.FEATURE_SPEC, ranker[C.FEATURE_SPEC]),
        metrics_uri=put(C.METRICS, json.dumps(toy_results(ndcg)).encode()),
        report_uri=put(C.REPORT_HTML, b"<html><body>toy report</body></html>"),
        serving_stats_uri=put(C.SERVING_STATS, ranker[C.SERVING_STATS]),
        item_neighbors_uri=put(C.ITEM_NEIGHBORS, ranker[C.ITEM_NEIGHBORS]),
        ranker_eval_uri=put(C.RANKER_EVAL, no_eval.getvalue()),
        seq_model_uri=put(C.SEQ_MODEL, ranker[C.SEQ_MODEL]) if C.SEQ_MODEL in ranker else None,
        metrics=metrics,
        candidate_recall=0.5,
        gate_vs_popularity={"passed": True, "reason": "toy ranker"},
        best_iteration=15,
    )
    return cfg, validated, embedded, indexed, trained


def race(attempts: list[Callable[[], object]]) -> list[int]:
    """Start every attempt at once (one thread each); indices of those not refused by PreconditionFailed."""
    barrier = threading.Barrier(len(attempts))
    winners: list[int] = []

    def run(i: int) -> None:
        barrier.wait()
        try:
            attempts[i]()
        except PreconditionFailed:
            return
        winners.append(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(attempts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return winners
