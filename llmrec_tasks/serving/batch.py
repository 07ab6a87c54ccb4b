"""Batch scoring: the top ``k`` items of many users through the serving code, into Parquet.

For teams that precompute recommendations instead of calling the API. Three steps, the same from
the CLI (``llmrec score-batch``, shards one after the other) and the DAG ``llmrec_batch_score``
(one mapped task per shard):

1. :func:`plan_scoring` pins the bundle version (``current`` is read once, here: a promotion
   during the run changes nothing), the reference time of every recommendation and the user list
   (every user with a published history, or a list file: duplicates dropped, unknown users
   reported with examples), writes the plan and the user list next to the output, and cuts the
   users into shards of ``batch_users_per_shard``.
2. :func:`score_shard` loads that version (every checksum verified), scores its users with
   :func:`recommend_many` and writes ``part-<i>.parquet`` atomically (a rerun replaces the same
   part; the plan's reference time makes it the same bytes).
3. :func:`finalize` checks that every shard reported, then writes ``_manifest.json`` (counts and
   each part's sha256): readers wait for it, it is the done marker.

Output (default ``<namespace>/scores/<version>/`` in the store): columns :data:`SCORE_COLUMNS`,
one row per (user, rank). Users without a published history get the most popular items, as
``Recommender.recommend`` answers them, with ``cold`` true.
"""

from __future__ import annotations

import io
import json
import logging
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from llmrec_tasks.core import constants as C
from llmrec_tasks.core.config import validate_name
from llmrec_tasks.core.errors import BundleError, ConfigError, DataContractError
from llmrec_tasks.core.results import StageResult
from llmrec_tasks.core.settings import BATCH_SETTINGS
from llmrec_tasks.ranking import events, features, sources
from llmrec_tasks.serving.recommender import (
    RankerScorer,
    Recommender,
    load_bundle,
    single_threaded_native_code,
)
from llmrec_tasks.storage import registry
from llmrec_tasks.storage.store import ObjectNotFound, ObjectStore, check_key, open_store, split_uri

log = logging.getLogger(__name__)

SCORE_COLUMNS = C.SCORE_COLUMNS
MANIFEST_FORMAT = "llmrec-scores/1"
CHUNK_USERS = 1024  # users per recommend_many call: bounds the candidate feature matrix in memory
LOG_EVERY_USERS = 10_000  # progress line (users/s) at least this often
UNKNOWN_EXAMPLES = 5  # unknown user ids named in the log and the plan


@dataclass(frozen=True)
class BatchScores:
    """Top items of many users, in columns: user ``u``'s are ``items[indptr[u]:indptr[u + 1]]``."""

    user_ids: list[str]
    indptr: np.ndarray  # int64, len(user_ids) + 1
    items: np.ndarray  # int64 item rows of the bundle, best first per user
    scores: np.ndarray  # float64: the ranker's score, or the popularity count of a popular item
    cold: np.ndarray  # bool per user: no published history, so the most popular items


def _histories(recommender: Recommender, rows: np.ndarray, now: float) -> events.Histories:
    """The published histories of bundle user rows as one :class:`Histories` (reference time ``now``)."""
    bundle = recommender.bundle
    starts, ends = bundle.hist_indptr[rows], bundle.hist_indptr[rows + 1]
    lengths = ends - starts
    indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    take = np.arange(indptr[-1], dtype=np.int64) - np.repeat(indptr[:-1] - starts, lengths)
    return events.Histories(
        indptr, bundle.hist_items[take], bundle.hist_timestamps[take], np.full(len(rows), now, dtype=float)
    )


def recommend_many(recommender: Recommender, user_ids: Sequence[str], k: int, now: float) -> BatchScores:
    """What ``recommender.recommend(user_id=u, k=k)`` returns for each user at time ``now`` (same
    items, order and scores; no reasons), computed for all of them at once by the ranking stage's
    batched ``generate_candidates`` and ``build_features``, exactly as the per-request scorer
    calls them."""
    bundle, scorer = recommender.bundle, recommender.scorer
    if not isinstance(scorer, RankerScorer):
        raise ConfigError("batch scoring runs the ranking stage's scorer; this recommender has another one")
    k = max(1, min(int(k), len(bundle.item_ids)))
    rows = np.array([bundle.user_row.get(u, -1) for u in user_ids], dtype=np.int64)
    warm = np.flatnonzero(rows >= 0)
    # Users of similar history length together: each candidate batch's searches go as deep as its
    # longest history (the history is filtered out of them), so mixing lengths costs time.
    lengths = bundle.hist_indptr[rows[warm] + 1] - bundle.hist_indptr[rows[warm]]
    by_length = np.argsort(lengths, kind="stable")
    hist = _histories(recommender, rows[warm][by_length], now)
    cands = sources.generate_candidates(scorer.context, hist, scorer.params)
    matrix = features.build_features(scorer.context, hist, cands)
    if matrix.shape != (len(cands.items), len(bundle.feature_names)):
        raise BundleError(
            f"{bundle.uri}: features of shape {matrix.shape} for {len(cands.items)} candidates; the "
            f"ranker expects {len(bundle.feature_names)} columns ({', '.join(bundle.feature_names)})"
        )
    scores = bundle.booster.predict(matrix, num_threads=1) if len(matrix) else np.zeros(0)
    # Per user, by score, ties in candidate order: recommend's stable argsort(-scores).
    user_of = cands.user_of
    order = np.lexsort((-scores, user_of))
    position = np.arange(len(order)) - cands.indptr[user_of[order]]
    top = order[position < k]
    counts = np.minimum(np.diff(cands.indptr), k)
    top_indptr = np.concatenate([[0], np.cumsum(counts)])

    popular = bundle.popular_order[:k]
    segments: list[tuple[np.ndarray, np.ndarray]] = []
    warm_of = np.full(len(rows), -1, dtype=np.int64)  # each user's position in `hist`, -1 if cold
    warm_of[warm[by_length]] = np.arange(len(warm))
    for w in warm_of.tolist():
        if w < 0:  # cold start: the k most popular items
            segments.append((popular, bundle.popularity[popular]))
            continue
        chosen = top[top_indptr[w] : top_indptr[w + 1]]
        items, item_scores = cands.items[chosen], scores[chosen]
        if len(items) < k:  # tiny catalogs or long histories: recommend fills with popular items
            items, item_scores = _fill_popular(recommender, hist, w, items, item_scores, k)
        segments.append((items, item_scores))
    lengths = [len(items) for items, _ in segments]
    return BatchScores(
        user_ids=list(user_ids),
        indptr=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        items=np.concatenate([s[0] for s in segments]).astype(np.int64)
        if segments
        else np.zeros(0, np.int64),
        scores=np.concatenate([s[1] for s in segments]).astype(np.float64) if segments else np.zeros(0),
        cold=rows < 0,
    )


def _fill_popular(
    recommender: Recommender,
    hist: events.Histories,
    user: int,
    items: np.ndarray,
    item_scores: np.ndarray,
    k: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Append the most popular items not seen nor chosen, up to ``k`` (``recommend``'s fill)."""
    bundle = recommender.bundle
    taken = set(hist.items[hist.indptr[user] : hist.indptr[user + 1]].tolist()) | set(items.tolist())
    extra = []
    for row in bundle.popular_order.tolist():
        if len(items) + len(extra) >= k:
            break
        if row not in taken:
            extra.append(row)
    fill = np.array(extra, dtype=np.int64)
    return np.concatenate([items, fill]), np.concatenate([item_scores, bundle.popularity[fill]])


# --- plan, shards, manifest ----------------------------------------------------------------------


@dataclass(frozen=True)
class ScoreShard(StageResult):
    """One shard of a batch scoring run: rows ``[start, stop)`` of the plan's user list."""

    STAGE: ClassVar[str] = "score-plan"

    store_uri: str
    namespace: str
    version: str  # pinned at plan time, never "current"
    out_uri: str
    shard: int
    shards: int
    start: int
    stop: int
    k: int
    now: float  # reference time of every recommendation of the run (unix seconds): the plan's id


@dataclass(frozen=True)
class ShardScores(StageResult):
    """What one shard wrote (also saved as ``_parts/part-<i>.json`` next to the part)."""

    STAGE: ClassVar[str] = "score-shard"

    out_uri: str
    shard: int
    part: str
    now: float  # the plan it belongs to
    users: int
    cold_users: int
    rows: int
    sha256: str
    bytes: int
    seconds: float


@dataclass(frozen=True)
class ScorePlan:
    """The pinned run: where the output goes, its shards, and what the user list held."""

    out_uri: str
    version: str
    users: int
    shard_count: int
    unknown_users: int
    unknown_examples: list[str]
    duplicates: int
    shards: list[ScoreShard]  # the ones to score here (all, or this machine's with a shard filter)


def read_user_list(users_uri: str) -> list[str]:
    """User ids of a list file (local path or URI): one per line (a ``user_id`` header line is
    skipped), or Parquet with a ``user_id`` column. Order kept, blank lines dropped."""
    store, name = split_uri(users_uri)
    try:
        data = store.get_bytes(name)
    except ObjectNotFound as exc:
        raise DataContractError(
            f"users file {users_uri} does not exist: give one user id per line or Parquet with a "
            f"{C.USER_ID} column, or leave it out to score every user of the bundle"
        ) from exc
    if name.endswith(".parquet"):
        try:
            table = pq.read_table(io.BytesIO(data), columns=[C.USER_ID])
        except (KeyError, ValueError, OSError) as exc:
            raise DataContractError(
                f"users file {users_uri}: no readable {C.USER_ID} column ({exc})"
            ) from exc
        users = [str(u).strip() for u in table.column(C.USER_ID).to_pylist() if u is not None]
        users = [u for u in users if u]
    else:
        try:
            lines = data.decode("utf-8").splitlines()
        except UnicodeDecodeError as exc:
            raise DataContractError(f"users file {users_uri} is not UTF-8 text: {exc}") from exc
        users = [line.strip() for line in lines if line.strip()]
        if users and users[0] == C.USER_ID:
            users = users[1:]
    too_long = [u for u in users if len(u) > C.MAX_ID_CHARS]
    if too_long:
        raise DataContractError(
            f"users file {users_uri}: {len(too_long)} id(s) longer than {C.MAX_ID_CHARS} characters "
            f"(e.g. {too_long[0][:40]!r}...): is it one user id per line?"
        )
    if not users:
        raise ConfigError(f"users file {users_uri} lists no user: nothing to score")
    return users


def bundle_users(store_uri: str, namespace: str, version: str) -> list[str]:
    """Every user with a published history in the bundle (sorted), from its verified histories file."""
    store = open_store(store_uri)
    manifest = registry.read_manifest(store, namespace, version)
    path = registry.bundle_file(store, namespace, version, C.USER_HISTORIES, manifest)
    users = pd.read_parquet(path, columns=[C.USER_ID])[C.USER_ID].astype(str).unique()
    return sorted(users.tolist())


def resolve_out_uri(store_uri: str, namespace: str, version: str, out: str | None) -> str:
    """The output folder: ``out`` as a URI or absolute path, else as a key prefix in the store;
    by default ``<store>/<namespace>/scores/<version>``."""
    store = open_store(store_uri)
    if not out:
        return store.uri_for(registry.scores_prefix(namespace, version))
    if "://" in out or out.startswith("/"):
        return out.rstrip("/")
    return store.uri_for(check_key(out.strip("/")))


def part_name(shard: int) -> str:
    return C.SCORE_PART.format(shard=shard)


def record_key(shard: int) -> str:
    return f"{C.SCORE_RECORDS_DIR}/{part_name(shard).removesuffix('.parquet')}.json"


def _read_json(store: ObjectStore, key: str) -> dict[str, Any] | None:
    try:
        return json.loads(store.get_bytes(key))
    except ObjectNotFound:
        return None


def plan_scoring(
    store_uri: str,
    namespace: str,
    *,
    version: str | None = None,
    users_uri: str | None = None,
    k: int = 100,
    users_per_shard: int = 50_000,
    out: str | None = None,
    shard_filter: tuple[int, int] | None = None,
    now: float | None = None,
) -> ScorePlan:
    """Pin the version, write the plan and the user list next to the output, and cut the shards.

    A new plan deletes the output's manifest first (it is not done until this run's finalize),
    the part records and the parts beyond its shard count. ``shard_filter`` ``(i, n)``: this
    machine scores the shards whose index is ``i`` modulo ``n``; an unfinished plan of the same
    inputs in the output (another machine's) is then reused as it is, so every machine scores
    the same users with the same reference time.
    """
    validate_name("namespace", namespace)
    for key, value in (("k", k), ("batch_users_per_shard", users_per_shard)):
        BATCH_SETTINGS[key].check(value)
    store = open_store(store_uri)
    pinned = registry.resolve_version(store, namespace, version or registry.CURRENT)
    out_uri = resolve_out_uri(store_uri, namespace, pinned, out)
    out_store = open_store(out_uri)
    inputs = {
        "store_uri": store_uri,
        "namespace": namespace,
        "version": pinned,
        "users_uri": users_uri,
        "k": k,
        "users_per_shard": users_per_shard,
    }
    record = _read_json(out_store, C.SCORES_PLAN) if shard_filter is not None else None
    reuse = (
        record is not None
        and {key: record.get(key) for key in inputs} == inputs
        and not out_store.exists(C.SCORES_MANIFEST)
    )
    if reuse:
        log.info("score plan of %s reused (planned %s)", out_uri, record["planned_at"])
    else:
        record = _new_plan(out_store, inputs, now)
    n_shards = record["shards"]
    shards = [
        ScoreShard(
            store_uri=store_uri,
            namespace=namespace,
            version=pinned,
            out_uri=out_uri,
            shard=i,
            shards=n_shards,
            start=i * users_per_shard,
            stop=min((i + 1) * users_per_shard, record["users"]),
            k=k,
            now=record["now"],
        )
        for i in range(n_shards)
        if shard_filter is None or i % shard_filter[1] == shard_filter[0]
    ]
    return ScorePlan(
        out_uri=out_uri,
        version=pinned,
        users=record["users"],
        shard_count=n_shards,
        unknown_users=record["unknown_users"],
        unknown_examples=record["unknown_examples"],
        duplicates=record["duplicates"],
        shards=shards,
    )


def _new_plan(out_store: ObjectStore, inputs: dict[str, Any], now: float | None) -> dict[str, Any]:
    """Read and check the users, clear the output's previous run, write the user list and the plan."""
    namespace, version, users_uri = inputs["namespace"], inputs["version"], inputs["users_uri"]
    known = bundle_users(inputs["store_uri"], namespace, version)
    if users_uri:
        listed = read_user_list(users_uri)
        users = list(dict.fromkeys(listed))
        known_set = set(known)
        unknown = [u for u in users if u not in known_set]
    else:
        listed, users, unknown = known, known, []
    if not users:
        raise BundleError(f"bundle {namespace}/{version} has no user with a history: give a users file")
    duplicates = len(listed) - len(users)
    if unknown:
        log.warning(
            "%d of %d listed users have no history in %s/%s (e.g. %s): they get the most popular "
            "items, flagged %s",
            len(unknown),
            len(users),
            namespace,
            version,
            ", ".join(unknown[:UNKNOWN_EXAMPLES]),
            C.COLD,
        )
    if duplicates:
        log.warning("%d duplicate user id(s) in %s: each user is scored once", duplicates, users_uri)
    n_shards = -(-len(users) // inputs["users_per_shard"])
    out_store.delete(C.SCORES_MANIFEST)
    planned = {part_name(i) for i in range(n_shards)}
    for key in out_store.list(""):
        stale_part = key.startswith(C.SCORE_PART_PREFIX) and key not in planned
        if stale_part or key.startswith(f"{C.SCORE_RECORDS_DIR}/"):
            out_store.delete(key)
    _put_parquet(out_store, C.SCORES_USERS, pa.table({C.USER_ID: pa.array(users, pa.string())}))
    record = {
        **inputs,
        "now": time.time() if now is None else float(now),
        "users": len(users),
        "shards": n_shards,
        "unknown_users": len(unknown),
        "unknown_examples": unknown[:UNKNOWN_EXAMPLES],
        "duplicates": duplicates,
        "planned_at": datetime.now(UTC).isoformat(),
    }
    out_store.put_bytes(C.SCORES_PLAN, json.dumps(record, indent=2).encode())
    log.info(
        "score plan: %d users of %s/%s in %d shard(s) of up to %d -> %s",
        len(users),
        namespace,
        version,
        n_shards,
        inputs["users_per_shard"],
        out_store.uri,
    )
    return record


def _put_parquet(store: ObjectStore, key: str, table: Any) -> tuple[str, int]:
    """Write a table as one object: a local file first, then one atomic put; (sha256, bytes)."""
    with tempfile.TemporaryDirectory(prefix="llmrec-scores-") as tmp:
        path = Path(tmp) / "table.parquet"
        pq.write_table(table, path)
        return store.put_file(key, path), path.stat().st_size


SCORE_SCHEMA = pa.schema(
    [
        (C.USER_ID, pa.string()),
        (C.RANK, pa.int32()),
        (C.ITEM_ID, pa.string()),
        (C.SCORE, pa.float64()),
        (C.VERSION, pa.string()),
        (C.COLD, pa.bool_()),
    ]
)


def score_table(recommender: Recommender, scored: BatchScores) -> pa.Table:
    """The Parquet table of scored users: :data:`SCORE_SCHEMA`, one row per (user, rank)."""
    counts = np.diff(scored.indptr)
    user_of = np.repeat(np.arange(len(scored.user_ids)), counts)
    rank = np.arange(len(scored.items)) - np.repeat(scored.indptr[:-1], counts) + 1
    bundle = recommender.bundle
    return pa.table(
        {
            C.USER_ID: pa.array(scored.user_ids, pa.string()).take(pa.array(user_of)),
            C.RANK: pa.array(rank.astype(np.int32)),
            C.ITEM_ID: pa.array(bundle.item_ids, pa.string()).take(pa.array(scored.items)),
            C.SCORE: pa.array(scored.scores, pa.float64()),
            C.VERSION: pa.array([bundle.version], pa.string()).take(
                pa.array(np.zeros(len(user_of), np.int64))
            ),
            C.COLD: pa.array(scored.cold[user_of]),
        },
        schema=SCORE_SCHEMA,
    )


def score_shard(shard: ScoreShard, recommender: Recommender | None = None) -> ShardScores:
    """Score one shard's users with the pinned version; write its part (an atomic replace: a
    rerun overwrites the same part), then its record."""
    with single_threaded_native_code():
        return _score_shard(shard, recommender)


def _score_shard(shard: ScoreShard, recommender: Recommender | None) -> ShardScores:
    started = time.monotonic()
    if recommender is None:
        recommender = Recommender(load_bundle(shard.store_uri, shard.namespace, shard.version))
    if recommender.bundle.version != shard.version:
        raise ConfigError(
            f"shard {shard.shard} is planned for version {shard.version}, the recommender serves "
            f"{recommender.bundle.version}"
        )
    out_store = open_store(shard.out_uri)
    plan = _read_json(out_store, C.SCORES_PLAN)
    if plan is None or plan["now"] != shard.now:
        raise ConfigError(
            f"{shard.out_uri} was planned again since shard {shard.shard} was planned: score the new "
            "plan's shards (rerun the whole run)"
        )
    table = pq.read_table(io.BytesIO(out_store.get_bytes(C.SCORES_USERS)))
    users = table.column(C.USER_ID).to_pylist()[shard.start : shard.stop]
    part = part_name(shard.shard)
    rows = cold = last_log = 0
    with tempfile.TemporaryDirectory(prefix="llmrec-scores-") as tmp:
        path = Path(tmp) / part
        with pq.ParquetWriter(path, SCORE_SCHEMA) as writer:
            for lo in range(0, len(users), CHUNK_USERS):
                scored = recommend_many(recommender, users[lo : lo + CHUNK_USERS], shard.k, shard.now)
                writer.write_table(score_table(recommender, scored))
                rows += len(scored.items)
                cold += int(scored.cold.sum())
                done = lo + len(scored.user_ids)
                if done - last_log >= LOG_EVERY_USERS or done == len(users):
                    last_log = done
                    log.info(
                        "shard %d/%d: %d/%d users (%.0f users/s)",
                        shard.shard,
                        shard.shards,
                        done,
                        len(users),
                        done / max(time.monotonic() - started, 1e-9),
                    )
        sha256 = out_store.put_file(part, path)
        size = path.stat().st_size
    seconds = time.monotonic() - started
    result = ShardScores(
        out_uri=shard.out_uri,
        shard=shard.shard,
        part=part,
        now=shard.now,
        users=len(users),
        cold_users=cold,
        rows=rows,
        sha256=sha256,
        bytes=size,
        seconds=round(seconds, 3),
    )
    out_store.put_bytes(record_key(shard.shard), json.dumps(result.to_json()).encode())
    log.info("shard %d: %d users, %d rows -> %s (%.1fs)", shard.shard, len(users), rows, part, seconds)
    return result


def finalize(out_uri: str) -> dict[str, Any]:
    """Check that every shard of the plan wrote its part, then write ``_manifest.json`` (the done
    marker) with the counts and each part's sha256. ConfigError naming the missing shards otherwise."""
    out_store = open_store(out_uri)
    plan = _read_json(out_store, C.SCORES_PLAN)
    if plan is None:
        raise ConfigError(f"{out_uri} has no {C.SCORES_PLAN}: plan the run first")
    parts, missing = [], []
    for i in range(plan["shards"]):
        found = _read_json(out_store, record_key(i))
        if found is None or found["now"] != plan["now"] or not out_store.exists(part_name(i)):
            missing.append(i)
        else:
            parts.append(ShardScores.from_json(found))
    if missing:
        raise ConfigError(
            f"{out_uri}: {len(missing)} of {plan['shards']} shard(s) not scored yet ({missing[:10]}): "
            "score them, then finalize"
        )
    users = sum(p.users for p in parts)
    if users != plan["users"]:
        raise ConfigError(f"{out_uri}: the parts hold {users} users, the plan {plan['users']}: plan again")
    manifest = {
        "format": MANIFEST_FORMAT,
        **{key: plan[key] for key in ("namespace", "version", "store_uri", "users_uri", "k")},
        "reference_time": plan["now"],
        "columns": list(SCORE_COLUMNS),
        "users": users,
        "rows": sum(p.rows for p in parts),
        "cold_users": sum(p.cold_users for p in parts),
        **{key: plan[key] for key in ("unknown_users", "unknown_examples", "duplicates")},
        "parts": [
            {"name": p.part, "users": p.users, "rows": p.rows, "sha256": p.sha256, "bytes": p.bytes}
            for p in parts
        ],
        "planned_at": plan["planned_at"],
        "finished_at": datetime.now(UTC).isoformat(),
    }
    out_store.put_bytes(C.SCORES_MANIFEST, json.dumps(manifest, indent=2).encode())
    log.info("scores of %d users in %d part(s): %s", users, len(parts), out_store.uri_for(C.SCORES_MANIFEST))
    return manifest


def score_batch(
    store_uri: str,
    namespace: str,
    *,
    version: str | None = None,
    users_uri: str | None = None,
    k: int = 100,
    users_per_shard: int = 50_000,
    out: str | None = None,
    shard_filter: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """Plan, score the shards one after the other (one bundle load) and finalize: the CLI.

    With ``shard_filter`` ``(i, n)`` only this machine's shards are scored; the output is
    finalized by the machine that finds every part written.
    """
    started = time.monotonic()
    plan = plan_scoring(
        store_uri,
        namespace,
        version=version,
        users_uri=users_uri,
        k=k,
        users_per_shard=users_per_shard,
        out=out,
        shard_filter=shard_filter,
    )
    recommender = Recommender(load_bundle(store_uri, namespace, plan.version))
    results = [score_shard(shard, recommender) for shard in plan.shards]
    scored = sum(r.users for r in results)
    seconds = time.monotonic() - started
    out_store = open_store(plan.out_uri)
    waiting = [i for i in range(plan.shard_count) if not out_store.exists(record_key(i))]
    if not waiting:
        finalize(plan.out_uri)
    return {
        "version": plan.version,
        "users": scored,
        "parts": len(results),
        "cold_users": sum(r.cold_users for r in results),
        "unknown_users": plan.unknown_users,
        "unknown_examples": plan.unknown_examples,
        "seconds": round(seconds, 2),
        "users_per_second": round(scored / max(seconds, 1e-9), 1),
        "out_uri": plan.out_uri,
        "finalized": not waiting,
        "waiting_for_shards": waiting[:10],
    }
