"""Stage `publish`: immutable bundles, the manifest, promotion of ``current``, rollback and retention.

Layout (keys from :mod:`llmrec_tasks.storage.paths`)::

    <namespace>/bundles/<version>/<artifact files>   immutable once its manifest exists
    <namespace>/bundles/<version>/manifest.json      sha256 + size of every file, lineage; written last
    <namespace>/current.json                         the promoted version, its history for rollback

Readers trust a version only through its manifest, so a bundle that is still being written (or
whose publish crashed) is invisible. ``current.json`` only moves by a conditional write (see
:mod:`llmrec_tasks.storage.store`): of two runs racing for a namespace's pointer exactly one write wins;
the loser re-reads the pointer and decides again (a scheduled run never moves ``current`` back to
an older logical date).
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import llmrec_tasks
from llmrec_tasks.core import constants as C
from llmrec_tasks.core.config import RunConfig, validate_name
from llmrec_tasks.core.errors import BundleError, ConfigError
from llmrec_tasks.core.results import Embedded, Indexed, Published, Trained, Validated
from llmrec_tasks.storage.paths import bundle_prefix, bundles_prefix, current_key, manifest_key
from llmrec_tasks.storage.store import (
    ObjectNotFound,
    ObjectStore,
    PreconditionFailed,
    file_sha256,
    open_store,
    split_uri,
)

log = logging.getLogger(__name__)

MANIFEST_FORMAT = "llmrec-bundle/1"
CURRENT = "current"
# Upstream result keys -> bundle file names. Other `*_uri` keys are copied under their own names.
ARTIFACTS: dict[str, str] = {
    "embeddings_uri": C.EMBEDDINGS,
    "item_ids_uri": C.ITEM_IDS,
    "index_uri": C.FAISS_INDEX,
    "index_info_uri": C.INDEX_INFO,
    "model_uri": C.RANKER_MODEL,
    "feature_spec_uri": C.FEATURE_SPEC,
    "metrics_uri": C.METRICS,
    "report_uri": C.REPORT_HTML,
    "serving_stats_uri": C.SERVING_STATS,
    "item_neighbors_uri": C.ITEM_NEIGHBORS,
    "validation_uri": C.VALIDATION_SUMMARY,
}
REQUIRED_FILES = (
    C.EMBEDDINGS,
    C.ITEM_IDS,
    C.FAISS_INDEX,
    C.RANKER_MODEL,
    C.FEATURE_SPEC,
    C.METRICS,
    C.VALIDATION_SUMMARY,
    C.BUNDLE_ITEMS,
    C.USER_HISTORIES,
)
# The run's folders and its input: never copied into a bundle.
NOT_ARTIFACTS = frozenset({"work_uri", "snapshot_uri", "data_uri"})
HISTORY_PER_USER = 100  # most recent interactions per user kept for serving
POINTER_HISTORY = 50  # previous currents remembered for rollback
SWAP_ATTEMPTS = 5
_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]+@")


# --- helpers -------------------------------------------------------------------------------------


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def redact(value: Any) -> Any:
    """Strip ``user:password@`` from URIs anywhere in a JSON-able value (lineage never holds secrets)."""
    if isinstance(value, str):
        return _USERINFO.sub(r"\g<scheme>", value)
    if isinstance(value, Mapping):
        return {k: redact(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact(v) for v in value]
    return value


def git_commit() -> str | None:
    """The code's git commit: ``LLMREC_GIT_COMMIT`` (set in images built without .git), else git."""
    if os.environ.get("LLMREC_GIT_COMMIT"):
        return os.environ["LLMREC_GIT_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(llmrec_tasks.__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _as_time(iso: str) -> datetime:
    value = datetime.fromisoformat(iso)
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def logical_date(cfg: RunConfig, validated: Mapping[str, Any]) -> str:
    """The run's logical date: ``cfg.cutoff``, else the cutoff the validate stage applied."""
    cutoff = cfg.cutoff
    if cutoff is None:
        if not validated.get("cutoff"):
            raise ConfigError("the run has no cutoff (RunConfig.cutoff or the validate result's 'cutoff')")
        cutoff = datetime.fromisoformat(str(validated["cutoff"]))
    cutoff = cutoff if cutoff.tzinfo else cutoff.replace(tzinfo=UTC)
    return cutoff.astimezone(UTC).isoformat(timespec="seconds")


def read_pointer(store: ObjectStore, namespace: str) -> tuple[dict[str, Any] | None, str | None]:
    """``(current.json, its ETag)``, or ``(None, None)`` when nothing was promoted yet."""
    try:
        data, etag = store.get_with_etag(current_key(namespace))
    except ObjectNotFound:
        return None, None
    try:
        return json.loads(data), etag
    except json.JSONDecodeError as exc:
        raise BundleError(f"{store.uri_for(current_key(namespace))} is not valid JSON: {exc}") from exc


def read_manifest(store: ObjectStore, namespace: str, version: str) -> dict[str, Any]:
    """A version's manifest; BundleError when the version is unknown or was never completed."""
    key = manifest_key(namespace, version)
    try:
        manifest = json.loads(store.get_bytes(key))
    except ObjectNotFound as exc:
        raise BundleError(
            f"{store.uri_for(key)} not found: version {version!r} is not published in namespace "
            f"{namespace!r} (or its publish did not finish); see `llmrec versions`"
        ) from exc
    except json.JSONDecodeError as exc:
        raise BundleError(f"{store.uri_for(key)} is not valid JSON: the bundle is corrupt") from exc
    if manifest.get("format") != MANIFEST_FORMAT or not isinstance(manifest.get("files"), dict):
        raise BundleError(f"{store.uri_for(key)} is not an llmrec manifest ({MANIFEST_FORMAT})")
    return manifest


def resolve_version(store: ObjectStore, namespace: str, version: str) -> str:
    """``current`` -> the promoted version id; any other name is validated and returned."""
    if version != CURRENT:
        return validate_name("version", version)
    pointer, _ = read_pointer(store, namespace)
    if pointer is None:
        raise BundleError(
            f"namespace {namespace!r} in {store.uri} has no current bundle: publish and promote one first"
        )
    return str(pointer["version"])


# --- publishing ----------------------------------------------------------------------------------


def _artifact_sources(*results: Mapping[str, Any]) -> dict[str, str]:
    """Bundle file name -> source URI for every ``*_uri`` of the upstream results."""
    sources: dict[str, str] = {}
    for result in results:
        for key, uri in result.items():
            if not key.endswith("_uri") or key in NOT_ARTIFACTS or not uri:
                continue
            name = ARTIFACTS.get(key) or str(uri).rstrip("/").rsplit("/", 1)[-1]
            if sources.get(name, uri) != uri:
                raise ConfigError(
                    f"two upstream artifacts map to bundle file {name!r}: {sources[name]}, {uri}"
                )
            sources[name] = str(uri)
    return sources


def _artifact_keys(uri: str, work_uri: str) -> tuple[ObjectStore, list[tuple[str, str]]]:
    """One object -> ``[("", key)]``; a folder of the run (e.g. data docs) -> ``[(relative key, key)]``."""
    store, name = split_uri(uri)
    if store.exists(name):
        return store, [("", name)]
    if not uri.startswith(work_uri.rstrip("/") + "/"):
        raise BundleError(
            f"artifact {uri} is not an object, and folders are only copied from the run's {work_uri}"
        )
    folder = open_store(uri)
    keys = folder.list("")
    if not keys:
        raise BundleError(f"artifact {uri} does not exist: re-run the stage that writes it")
    return folder, [(key, key) for key in keys]


def _serving_tables(snapshot_uri: str) -> dict[str, bytes]:
    """Item titles + popularity and each user's recent history, from the run's snapshot."""
    import io

    from llmrec_tasks.data.contract import read_snapshot

    data = read_snapshot(snapshot_uri)
    inter = data.interactions
    popularity = inter.groupby(C.ITEM_ID).size()
    items = data.items[[C.ITEM_ID, C.TITLE, C.CATEGORIES]].copy()
    items[C.POPULARITY] = items[C.ITEM_ID].map(popularity).fillna(0).astype("int64")
    histories = inter[[C.USER_ID, C.ITEM_ID, C.TIMESTAMP, C.WEIGHT]].groupby(C.USER_ID).tail(HISTORY_PER_USER)
    out = {}
    for name, frame in ((C.BUNDLE_ITEMS, items), (C.USER_HISTORIES, histories)):
        buf = io.BytesIO()
        frame.reset_index(drop=True).to_parquet(buf, index=False)
        out[name] = buf.getvalue()
    return out


def _put_immutable(store: ObjectStore, key: str, path: Path, sha256: str, manifest: str) -> None:
    """Create ``key`` from a file unless an identical object is there; replace only leftovers of an
    unfinished publish."""
    try:
        store.put_file(key, path, if_absent=True)
        return
    except PreconditionFailed:
        existing = store.get_file(key, path.with_name(path.name + ".existing"))
        same = file_sha256(existing) == sha256
        existing.unlink()
        if same:
            return
    if store.exists(manifest):
        raise PreconditionFailed(f"{store.uri_for(key)} belongs to a bundle published meanwhile")
    log.warning("replacing %s left by an unfinished publish", store.uri_for(key))
    store.put_file(key, path)


def _lineage(
    cfg: RunConfig,
    validated: Mapping[str, Any],
    embedded: Mapping[str, Any],
    indexed: Mapping[str, Any],
    trained: Mapping[str, Any],
    files: Mapping[str, Any],
) -> dict[str, Any]:
    return redact(
        {
            "dataset_fingerprint": validated.get("fingerprint"),
            "counts": validated.get("counts"),
            "code_version": llmrec_tasks.__version__,
            "git_commit": git_commit(),
            "params": cfg.result_params(),
            "params_hash": cfg.params_hash(),
            "model_ids": {
                "encoder": embedded.get("encoder"),
                "index": {k: indexed[k] for k in ("kind", "n_items", "dim") if k in indexed},
                "ranker_sha256": files[C.RANKER_MODEL]["sha256"],
            },
            "dag_id": cfg.dag_id,
            "run_id": cfg.run_id,
            "logical_date": logical_date(cfg, validated),
            "work_uri": validated.get("work_uri"),
        }
    )


def write_bundle(
    cfg: RunConfig,
    validated: Mapping[str, Any],
    embedded: Mapping[str, Any],
    indexed: Mapping[str, Any],
    trained: Mapping[str, Any],
) -> tuple[dict[str, Any], bool]:
    """Copy the artifacts into ``bundles/<version>/`` then write the manifest, last.

    Returns ``(manifest, newly_written)``. A version that already has a manifest is left exactly
    as it is (a cleared and re-run task overwrites nothing that was published).
    """
    store = open_store(cfg.store_uri)
    version = validate_name("version", str(validated["version"]))
    prefix = bundle_prefix(cfg.namespace, version)
    mkey = manifest_key(cfg.namespace, version)
    if store.exists(mkey):
        log.info("version %s is already published at %s: leaving it as is", version, store.uri_for(mkey))
        return read_manifest(store, cfg.namespace, version), False

    # Every file goes through local disk one at a time (streamed both ways): memory stays bounded.
    sources: dict[str, tuple[ObjectStore | None, str]] = {}
    for name, uri in _artifact_sources(validated, embedded, indexed, trained).items():
        source, keys = _artifact_keys(uri, str(validated["work_uri"]))
        for sub, key in keys:
            sources[f"{name}/{sub}" if sub else name] = (source, key)
    with tempfile.TemporaryDirectory(prefix="llmrec-publish-") as tmp_dir:
        tmp = Path(tmp_dir)
        for name, data in _serving_tables(str(validated["snapshot_uri"])).items():
            if name not in sources:
                (tmp / name).write_bytes(data)
                sources[name] = (None, name)
        missing = [name for name in REQUIRED_FILES if name not in sources]
        if missing:
            raise BundleError(f"cannot publish {version}: upstream results lack {missing}")

        files: dict[str, dict[str, Any]] = {}
        try:
            for name, (source, key) in sorted(sources.items()):
                local = tmp / key if source is None else source.get_file(key, tmp / "artifact")
                sha256 = file_sha256(local)
                _put_immutable(store, f"{prefix}/{name}", local, sha256, mkey)
                files[name] = {"sha256": sha256, "size": local.stat().st_size}
                local.unlink()
        except PreconditionFailed:
            log.info("version %s was published by a concurrent run meanwhile: leaving it as is", version)
            return read_manifest(store, cfg.namespace, version), False
    manifest = {
        "format": MANIFEST_FORMAT,
        "namespace": cfg.namespace,
        "version": version,
        "created_at": _now(),
        "files": files,
        "metrics": trained.get("metrics") or {},
        "lineage": _lineage(cfg, validated, embedded, indexed, trained, files),
    }
    try:
        store.put_bytes(
            mkey, json.dumps(manifest, indent=2, sort_keys=True, default=str).encode(), if_absent=True
        )
    except PreconditionFailed:
        log.info("version %s got its manifest from a concurrent run: keeping that one", version)
        return read_manifest(store, cfg.namespace, version), False
    log.info(
        "published %s (%d files, %.1f MB)",
        store.uri_for(prefix),
        len(files),
        sum(f["size"] for f in files.values()) / 1e6,
    )
    return manifest, True


# --- the pointer ---------------------------------------------------------------------------------

# decide(current pointer or None) -> (new pointer to write, or None to write nothing; promoted; reason)
Decision = tuple[dict[str, Any] | None, bool, str]


def swap_current(store: ObjectStore, namespace: str, pointer: Mapping[str, Any], etag: str | None) -> None:
    """Write ``current.json`` only if it is still the one read (ETag), or still absent (``etag=None``).

    Raises PreconditionFailed when another writer moved it first.
    """
    data = json.dumps(pointer, indent=2, sort_keys=True).encode()
    if etag is None:
        store.put_bytes(current_key(namespace), data, if_absent=True)
    else:
        store.put_bytes(current_key(namespace), data, if_match=etag)


def update_current(
    store: ObjectStore,
    namespace: str,
    decide: Callable[[dict[str, Any] | None], Decision],
    *,
    attempts: int = SWAP_ATTEMPTS,
) -> tuple[bool, str]:
    """Read-decide-swap loop: on a lost race re-read the pointer and decide again (with backoff)."""
    for attempt in range(1, attempts + 1):
        pointer, etag = read_pointer(store, namespace)
        new, promoted, reason = decide(pointer)
        if new is None:
            return promoted, reason
        try:
            swap_current(store, namespace, new, etag)
        except PreconditionFailed:
            delay = min(2.0, 0.05 * 2**attempt) * (0.5 + random.random())
            log.warning(
                "current of %r moved while we promoted (attempt %d/%d); re-reading in %.2fs",
                namespace,
                attempt,
                attempts,
                delay,
            )
            time.sleep(delay)
            continue
        log.info("current of namespace %r -> %s (%s)", namespace, new["version"], reason)
        return promoted, reason
    raise PreconditionFailed(
        f"current of namespace {namespace!r} kept changing during {attempts} attempts: "
        "another promotion is running; retry when it has finished"
    )


def _entry(pointer: Mapping[str, Any]) -> dict[str, Any]:
    return {k: pointer.get(k) for k in ("version", "logical_date", "promoted_at")}


def _new_pointer(
    previous: Mapping[str, Any] | None, version: str, logical: str, how: str, reason: str, **extra: Any
) -> dict[str, Any]:
    history = [_entry(previous), *previous.get("history", [])] if previous else []
    rolled_back = [v for v in (previous or {}).get("rolled_back", []) if v != version]
    return {
        "version": version,
        "logical_date": logical,
        "promoted_at": _now(),
        "how": how,
        "reason": reason,
        "history": history[:POINTER_HISTORY],
        "rolled_back": rolled_back,
        **extra,
    }


def serving_check(store_uri: str, namespace: str, version: str) -> dict[str, Any]:
    """Load the bundle through the serving code (all checksums) and answer sample queries."""
    from llmrec_tasks.serving import recommender as serving

    bundle = serving.load_bundle(store_uri, namespace, version)
    return serving.smoke_check(serving.Recommender(bundle))


def run_publish(
    cfg: RunConfig,
    validated: Validated,
    embedded: Embedded,
    indexed: Indexed,
    trained: Trained,
) -> Published:
    """Write the bundle (manifest last), check it through serving, apply the quality gate, move current.

    A failed serving check raises BundleError (``current`` untouched). A failed gate, an older
    logical date than ``current``'s, a version an operator rolled back, or ``promote=False``
    return ``promoted: False`` with the reason (``current`` untouched).
    """
    from llmrec_tasks.ranking.evaluate import quality_gate

    store = open_store(cfg.store_uri)
    manifest, written = write_bundle(
        cfg, validated.to_json(), embedded.to_json(), indexed.to_json(), trained.to_json()
    )
    version = manifest["version"]
    result: dict[str, Any] = {
        "version": version,
        "namespace": cfg.namespace,
        "bundle_uri": store.uri_for(bundle_prefix(cfg.namespace, version)),
        "manifest_uri": store.uri_for(manifest_key(cfg.namespace, version)),
        "status": "published" if written else "already published",
        "metrics": manifest.get("metrics", {}),
    }
    result["check"] = serving_check(cfg.store_uri, cfg.namespace, version)
    if not cfg.promote:
        return Published(**result, promoted=False, reason="promote=False: published without moving current")
    logical = manifest["lineage"]["logical_date"]
    run_ids = {"dag_id": cfg.dag_id, "run_id": cfg.run_id}

    def decide(pointer: dict[str, Any] | None) -> Decision:
        if pointer is not None and pointer["version"] == version:
            return None, True, f"{version} is already current"
        if pointer is not None and version in pointer.get("rolled_back", []):
            return (
                None,
                False,
                (f"{version} was rolled back by an operator; promote it explicitly with `llmrec promote`"),
            )
        if pointer is not None and _as_time(logical) < _as_time(pointer["logical_date"]):
            return (
                None,
                False,
                (
                    f"current {pointer['version']} has a newer logical date ({pointer['logical_date']} > {logical})"
                ),
            )
        current_metrics = (
            current_ranker_metrics(store, cfg.namespace, pointer["version"], validated.work_uri)
            if pointer
            else None
        )
        passed, why = quality_gate(manifest.get("metrics", {}), current_metrics, cfg.gate_tolerance)
        if not passed:
            return None, False, f"quality gate: {why}"
        return (
            _new_pointer(pointer, version, logical, "publish", f"quality gate: {why}", **run_ids),
            True,
            why,
        )

    promoted, reason = update_current(store, cfg.namespace, decide)
    if not promoted:
        log.warning("bundle %s published but not promoted: %s", version, reason)
    return Published(**result, promoted=promoted, reason=reason)


def current_ranker_metrics(store: ObjectStore, namespace: str, version: str, work_uri: str) -> dict[str, Any]:
    """The published ranker scored on *this* run's evaluation data (same users, candidates,
    features), so the gate compares like with like. When the published ranker needs features this
    run does not compute, its own recorded metrics are the only comparison left (logged)."""
    from llmrec_tasks.core.errors import DataContractError
    from llmrec_tasks.ranking.train import evaluate_published_ranker

    prefix = bundle_prefix(namespace, version)
    model_text = store.get_bytes(f"{prefix}/{C.RANKER_MODEL}").decode()
    spec = json.loads(store.get_bytes(f"{prefix}/{C.FEATURE_SPEC}"))
    try:
        return {"ranker": evaluate_published_ranker(work_uri, model_text, spec["features"])}
    except DataContractError as exc:
        log.warning("gate compares against %s's recorded metrics: %s", version, exc)
        return read_manifest(store, namespace, version)["metrics"]


# --- operator commands ---------------------------------------------------------------------------


def promote(store_uri: str, namespace: str, version: str, *, check: bool = True) -> dict[str, Any]:
    """Move ``current`` to a published version (any logical date: an operator's explicit choice)."""
    validate_name("namespace", namespace)
    store = open_store(store_uri)
    version = validate_name("version", version)
    manifest = read_manifest(store, namespace, version)
    checked = serving_check(store_uri, namespace, version) if check else None

    previous: list[str | None] = [None]

    def decide(pointer: dict[str, Any] | None) -> Decision:
        previous[0] = pointer["version"] if pointer else None
        if pointer is not None and pointer["version"] == version:
            return None, True, f"{version} is already current"
        new = _new_pointer(
            pointer, version, manifest["lineage"]["logical_date"], "promote", "promoted by operator"
        )
        return new, True, f"promoted {version}"

    promoted, reason = update_current(store, namespace, decide)
    return {
        "namespace": namespace,
        "version": version,
        "previous": previous[0],
        "promoted": promoted,
        "reason": reason,
        "check": checked,
    }


def rollback(store_uri: str, namespace: str, *, check: bool = True) -> dict[str, Any]:
    """Move ``current`` back to the previous current; the version left is marked rolled back
    (scheduled runs will not promote it again)."""
    validate_name("namespace", namespace)
    store = open_store(store_uri)
    pointer, _ = read_pointer(store, namespace)
    target = _rollback_target(store, namespace, pointer)
    checked = serving_check(store_uri, namespace, target["version"]) if check else None

    def decide(now: dict[str, Any] | None) -> Decision:
        history = list((now or {}).get("history", []))
        position = [e.get("version") for e in history]
        if (
            now is None
            or pointer is None
            or now["version"] != pointer["version"]
            or target["version"] not in position
        ):
            raise PreconditionFailed(
                f"current of {namespace!r} changed while rolling back (now {now and now['version']}); "
                "check `llmrec versions` and run rollback again if still needed"
            )
        rest = history[position.index(target["version"]) + 1 :]
        new = {
            "version": target["version"],
            "logical_date": target["logical_date"],
            "promoted_at": _now(),
            "how": "rollback",
            "reason": f"rolled back from {now['version']}",
            "history": rest,
            "rolled_back": [now["version"], *now.get("rolled_back", [])][:POINTER_HISTORY],
        }
        return new, True, f"rolled back from {now['version']} to {target['version']}"

    _, reason = update_current(store, namespace, decide)
    return {
        "namespace": namespace,
        "version": target["version"],
        "previous": pointer and pointer["version"],
        "reason": reason,
        "check": checked,
    }


def _rollback_target(store: ObjectStore, namespace: str, pointer: Mapping[str, Any] | None) -> dict[str, Any]:
    """The most recent previous current whose bundle still exists."""
    if pointer is None:
        raise BundleError(f"namespace {namespace!r} has no current bundle: nothing to roll back")
    for entry in pointer.get("history", []):
        if store.exists(manifest_key(namespace, entry["version"])):
            return dict(entry)
        log.warning("skipping previous current %s: its bundle was deleted", entry["version"])
    raise BundleError(
        f"namespace {namespace!r}: no previous current to roll back to from {pointer['version']}; "
        "use `llmrec promote VERSION` to choose one"
    )


def _scan_versions(store: ObjectStore, namespace: str) -> dict[str, list[str]]:
    """Version -> its file keys (any state)."""
    base = bundles_prefix(namespace) + "/"
    versions: dict[str, list[str]] = {}
    for key in store.list(bundles_prefix(namespace)):
        version = key[len(base) :].split("/", 1)[0]
        versions.setdefault(version, []).append(key)
    return versions


def _metric_summary(metrics: Mapping[str, Any]) -> dict[str, float]:
    block = metrics.get("ranker", metrics)
    return {k: float(v) for k, v in block.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def list_versions(store_uri: str, namespace: str) -> list[dict[str, Any]]:
    """Every version of a namespace, oldest first: its metrics, logical date, and which is current.

    Versions without a manifest are listed as ``complete: False`` (publishing or crashed).
    """
    validate_name("namespace", namespace)
    store = open_store(store_uri)
    pointer, _ = read_pointer(store, namespace)
    current = pointer["version"] if pointer else None
    rows = []
    for version, keys in sorted(_scan_versions(store, namespace).items()):
        if manifest_key(namespace, version) not in keys:
            rows.append({"version": version, "complete": False, "current": False})
            continue
        manifest = read_manifest(store, namespace, version)
        rows.append(
            {
                "version": version,
                "complete": True,
                "current": version == current,
                "logical_date": manifest["lineage"]["logical_date"],
                "created_at": manifest["created_at"],
                "metrics": _metric_summary(manifest.get("metrics", {})),
            }
        )
    return rows


def show(store_uri: str, namespace: str, version: str) -> dict[str, Any]:
    """A version's manifest (``current`` accepted)."""
    validate_name("namespace", namespace)
    store = open_store(store_uri)
    return read_manifest(store, namespace, resolve_version(store, namespace, version))


def gc(store_uri: str, namespace: str, keep: int) -> dict[str, Any]:
    """Delete complete bundles beyond the newest ``keep``, never the current one nor the one
    ``rollback`` would return to. Manifests go first, so a bundle being deleted is never half-visible.
    Unfinished (manifest-less) versions are reported, not deleted: one may be publishing right now.
    Do not run it concurrently with a promotion of an old version."""
    validate_name("namespace", namespace)
    if keep < 1:
        raise ConfigError(f"--keep must be at least 1, got {keep}")
    store = open_store(store_uri)
    pointer, _ = read_pointer(store, namespace)
    protected = set()
    if pointer is not None:
        protected.add(pointer["version"])
        history = [
            e for e in pointer.get("history", []) if store.exists(manifest_key(namespace, e["version"]))
        ]
        if history:
            protected.add(history[0]["version"])
    scanned = _scan_versions(store, namespace)
    complete = [v for v, keys in scanned.items() if manifest_key(namespace, v) in keys]
    dated = sorted(
        complete,
        key=lambda v: (read_manifest(store, namespace, v)["lineage"]["logical_date"], v),
        reverse=True,
    )
    kept = set(dated[:keep]) | protected
    deleted = []
    for version in dated[keep:]:
        if version in kept:
            continue
        store.delete(manifest_key(namespace, version))
        for key in scanned[version]:
            store.delete(key)
        deleted.append(version)
        log.info("gc: deleted %s/%s", namespace, version)
    return {
        "namespace": namespace,
        "kept": sorted(kept & set(complete)),
        "deleted": sorted(deleted),
        "incomplete": sorted(v for v in scanned if v not in complete),
    }
