"""The bundle registry: the only module that knows the store layout.

Layout::

    <namespace>/runs/<version>/...                   a run's work area (snapshot, intermediate artifacts)
    <namespace>/bundles/<version>/<bundle files>     immutable once its manifest exists
    <namespace>/bundles/<version>/manifest.json      sha256 + size of every file, lineage; written last
    <namespace>/current.json                         the promoted version, its history for rollback,
                                                     and the running A/B experiment (if any)

Readers trust a version only through its manifest, so a bundle that is still being written (or
whose publish crashed) is invisible. ``current.json`` only moves by a conditional write (see
:mod:`llmrec_tasks.storage.store`): of two writers racing for a namespace's pointer exactly one
wins; :func:`update_current` re-reads the pointer and lets the loser decide again.

The A/B experiment (name, challenger version, share of users, salt) is a key of ``current.json``,
so it moves with the pointer under the same conditional write: a service reads both in one get,
and promoting the challenger (:func:`new_pointer`) ends the experiment in the same swap.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from llmrec_tasks.core import constants as C
from llmrec_tasks.core.config import validate_name
from llmrec_tasks.core.errors import BundleError, ConfigError
from llmrec_tasks.core.results import Embedded, Indexed, Trained, Validated
from llmrec_tasks.storage.store import (
    ContentMismatch,
    ObjectNotFound,
    ObjectStore,
    PreconditionFailed,
    open_store,
)

log = logging.getLogger(__name__)

MANIFEST_FORMAT = "llmrec-bundle/1"
CURRENT = "current"
EXPERIMENT = "experiment"  # key of current.json: {name, challenger, share, salt, started_at}
POINTER_HISTORY = 50  # previous currents remembered for rollback
SWAP_ATTEMPTS = 5

# The allow-list of a bundle: every stage result lists its artifacts (result field -> bundle file,
# `core.results`); together they are what a bundle may hold. Serving reads most; the next run reads embedding keys (vector reuse) and validation statistics (drift checks);
# metrics, report, validation summary and Data Docs are for humans and the UI plugin. Anything
# else a stage writes (e.g. the ranker's evaluation features) stays in the run's work area.
ARTIFACTS: dict[str, str] = {
    key: name for result in (Validated, Embedded, Indexed, Trained) for key, name in result.ARTIFACTS.items()
}
# Written by publish from the run's snapshot (not an upstream artifact).
DERIVED_FILES = (C.BUNDLE_ITEMS, C.USER_HISTORIES)
# Folders copied whole: any file below them belongs to the bundle.
FOLDERS = frozenset({C.VALIDATION_DOCS_DIR})
BUNDLE_FILES = (frozenset(ARTIFACTS.values()) - FOLDERS) | frozenset(DERIVED_FILES)
# A manifest lacking one of these is not a servable bundle (publish refuses to write it).
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

# decide(current pointer or None) -> (new pointer to write, or None to write nothing; promoted; reason)
Decision = tuple[dict[str, Any] | None, bool, str]


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# --- keys and version ids ------------------------------------------------------------------------


def make_version(cutoff: datetime, fingerprint: str, params_hash: str) -> str:
    """Same logical date, data and params -> same version id (reruns are idempotent)."""
    return f"{cutoff:%Y%m%dT%H%M%SZ}-{fingerprint[:8]}-{params_hash[:6]}"


def run_prefix(namespace: str, version: str) -> str:
    """Work area of one run: snapshot and intermediate artifacts, before publishing."""
    return f"{validate_name('namespace', namespace)}/runs/{validate_name('version', version)}"


def bundles_prefix(namespace: str) -> str:
    return f"{validate_name('namespace', namespace)}/bundles"


def bundle_prefix(namespace: str, version: str) -> str:
    """Immutable published bundle."""
    return f"{bundles_prefix(namespace)}/{validate_name('version', version)}"


def is_bundle_file(name: str) -> bool:
    """Whether ``name`` may be part of a bundle (the allow-list, or a file inside an allowed folder)."""
    return name in BUNDLE_FILES or any(name.startswith(f"{folder}/") for folder in FOLDERS)


def bundle_key(namespace: str, version: str, name: str) -> str:
    """Key of one file of a bundle (the allow-list is enforced when the manifest is written, so
    bundles published before a file left the list stay loadable)."""
    return f"{bundle_prefix(namespace, version)}/{name}"


def manifest_key(namespace: str, version: str) -> str:
    return f"{bundle_prefix(namespace, version)}/{C.MANIFEST}"


def scores_prefix(namespace: str, version: str) -> str:
    """Default output of batch scoring with one bundle version (Parquet parts + manifest)."""
    return f"{validate_name('namespace', namespace)}/{C.SCORES_DIR}/{validate_name('version', version)}"


def current_key(namespace: str) -> str:
    return f"{validate_name('namespace', namespace)}/{C.CURRENT_POINTER}"


# --- the manifest --------------------------------------------------------------------------------


def missing_required(files: Mapping[str, Any]) -> list[str]:
    """The required bundle files ``files`` (names) lacks."""
    return [name for name in REQUIRED_FILES if name not in files]


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


def write_manifest(store: ObjectStore, manifest: Mapping[str, Any]) -> None:
    """Create the manifest (only if absent: a published version is immutable).

    Raises PreconditionFailed when the version got its manifest meanwhile, BundleError when the
    manifest lists a file outside the allow-list or lacks a required one.
    """
    namespace, version = str(manifest["namespace"]), str(manifest["version"])
    if manifest.get("format") != MANIFEST_FORMAT:
        raise BundleError(f"manifest of {version} is not in the {MANIFEST_FORMAT} format")
    unknown = sorted(name for name in manifest["files"] if not is_bundle_file(name))
    missing = missing_required(manifest["files"])
    if unknown or missing:
        raise BundleError(f"manifest of {version}: files outside the allow-list {unknown}, missing {missing}")
    data = json.dumps(manifest, indent=2, sort_keys=True, default=str)
    store.put_bytes(manifest_key(namespace, version), data.encode(), if_absent=True)


def bundle_file(
    store: ObjectStore, namespace: str, version: str, name: str, manifest: Mapping[str, Any]
) -> Path:
    """A local path of one bundle file with the size and sha256 its manifest records (the store's
    own file, or its verified local cache: :meth:`ObjectStore.local_file`); BundleError otherwise."""
    where = store.uri_for(bundle_prefix(namespace, version))
    meta = manifest["files"][name]
    try:
        return store.local_file(bundle_key(namespace, version, name), int(meta["size"]), str(meta["sha256"]))
    except ObjectNotFound as exc:
        raise BundleError(f"{where} is partial: {name} cannot be read ({exc})") from exc
    except ContentMismatch as exc:
        if exc.what == "size":
            found = f"{name} has {exc.actual} bytes, manifest says {exc.expected}"
        else:
            found = f"sha256 of {name} is {str(exc.actual)[:12]}…, manifest says {str(exc.expected)[:12]}…"
        raise BundleError(
            f"{where} is corrupt: {found}; roll back (`llmrec rollback`) or re-publish"
        ) from exc


# --- the current pointer -------------------------------------------------------------------------


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


def current_version(store: ObjectStore, namespace: str) -> str | None:
    """The promoted version of a namespace, None when nothing was promoted yet."""
    pointer, _ = read_pointer(store, namespace)
    return None if pointer is None else str(pointer["version"])


def resolve_version(store: ObjectStore, namespace: str, version: str) -> str:
    """``current`` -> the promoted version id; any other name is validated and returned."""
    if version != CURRENT:
        return validate_name("version", version)
    promoted = current_version(store, namespace)
    if promoted is None:
        raise BundleError(
            f"namespace {namespace!r} in {store.uri} has no current bundle: publish and promote one first"
        )
    return promoted


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


def _kept_experiment(previous: Mapping[str, Any] | None, version: str) -> dict[str, Any]:
    """The experiment key for a pointer moving to ``version``: kept, unless ``version`` is its
    challenger (promoting the challenger ends the experiment)."""
    experiment = (previous or {}).get(EXPERIMENT)
    if experiment is None or experiment["challenger"] == version:
        return {}
    return {EXPERIMENT: experiment}


def new_pointer(
    previous: Mapping[str, Any] | None, version: str, logical: str, how: str, reason: str, **extra: Any
) -> dict[str, Any]:
    """The pointer promoting ``version``: the previous current goes on top of the history; a
    running experiment carries over unless ``version`` is its challenger."""
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
        **_kept_experiment(previous, version),
        **extra,
    }


def rollback_target(store: ObjectStore, namespace: str, pointer: Mapping[str, Any] | None) -> dict[str, Any]:
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


def rollback_pointer(now: Mapping[str, Any], target: Mapping[str, Any]) -> dict[str, Any]:
    """The pointer rolling ``now`` back to ``target`` (an entry of its history): the history above
    the target is dropped and the version left is marked rolled back (never auto-promoted again)."""
    position = [e.get("version") for e in now.get("history", [])]
    return {
        "version": target["version"],
        "logical_date": target["logical_date"],
        "promoted_at": _now(),
        "how": "rollback",
        "reason": f"rolled back from {now['version']}",
        "history": list(now["history"][position.index(target["version"]) + 1 :]),
        "rolled_back": [now["version"], *now.get("rolled_back", [])][:POINTER_HISTORY],
        **_kept_experiment(now, target["version"]),
    }


# --- A/B experiments -----------------------------------------------------------------------------


def experiment_bucket(salt: str, user_id: str) -> float:
    """A user's stable position in [0, 1) for an experiment salt (blake2b, not Python's per-process
    ``hash``): every worker and every restart assigns the user to the same arm."""
    digest = hashlib.blake2b(f"{salt}\x00{user_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def assign_arm(experiment: Mapping[str, Any] | None, user_id: str | None) -> str:
    """``challenger`` iff the user's bucket is below the experiment's share; anonymous requests
    (no user id) and every request without an experiment get ``current``."""
    if experiment is None or user_id is None:
        return C.CURRENT_ARM
    below = experiment_bucket(str(experiment["salt"]), user_id) < float(experiment["share"])
    return C.CHALLENGER_ARM if below else C.CURRENT_ARM


def read_experiment(store_uri: str, namespace: str) -> dict[str, Any] | None:
    """The running experiment of a namespace (with the current version), None when none runs."""
    validate_name("namespace", namespace)
    pointer, _ = read_pointer(open_store(store_uri), namespace)
    experiment = (pointer or {}).get(EXPERIMENT)
    return None if experiment is None else {**experiment, "current": pointer["version"]}


def start_experiment(
    store_uri: str, namespace: str, name: str, challenger: str, share: float, salt: str | None = None
) -> dict[str, Any]:
    """Serve ``challenger`` to ``share`` of the users (by :func:`experiment_bucket` of ``salt``,
    default the name) next to ``current``; replaces a running experiment.

    ConfigError for a bad name or share, BundleError when the challenger is not a published version
    or is the current one (nothing to compare)."""
    validate_name("namespace", namespace)
    validate_name("experiment name", name)
    challenger = validate_name("version", challenger)
    if not 0.0 <= share <= 1.0:
        raise ConfigError(f"experiment share must be in [0, 1] (the fraction of users), got {share}")
    store = open_store(store_uri)
    read_manifest(store, namespace, challenger)  # BundleError unless published and complete
    experiment = {
        "name": name,
        "challenger": challenger,
        "share": float(share),
        "salt": name if salt is None else salt,
        "started_at": _now(),
    }

    def decide(pointer: dict[str, Any] | None) -> Decision:
        if pointer is None:
            raise BundleError(
                f"namespace {namespace!r} has no current bundle: promote one before starting an experiment"
            )
        if pointer["version"] == challenger:
            raise BundleError(
                f"{challenger} is already current in namespace {namespace!r}: the challenger must be "
                "another published version (see `llmrec versions`)"
            )
        return {**pointer, EXPERIMENT: experiment}, True, f"experiment {name} started"

    update_current(store, namespace, decide)
    return read_experiment(store_uri, namespace) or experiment


def stop_experiment(store_uri: str, namespace: str) -> dict[str, Any]:
    """End the running experiment (every user back on ``current``); the stopped one is returned."""
    validate_name("namespace", namespace)
    store = open_store(store_uri)
    stopped: list[dict[str, Any] | None] = [None]

    def decide(pointer: dict[str, Any] | None) -> Decision:
        stopped[0] = (pointer or {}).get(EXPERIMENT)
        if pointer is None or stopped[0] is None:
            return None, False, "no experiment running"
        return {k: v for k, v in pointer.items() if k != EXPERIMENT}, True, "experiment stopped"

    _, reason = update_current(store, namespace, decide)
    return {"namespace": namespace, "stopped": stopped[0], "reason": reason}


# --- versions ------------------------------------------------------------------------------------


def scan_versions(store: ObjectStore, namespace: str) -> dict[str, list[str]]:
    """Version -> its file keys (any state, complete or not)."""
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
    current = current_version(store, namespace)
    rows = []
    for version, keys in sorted(scan_versions(store, namespace).items()):
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
    """Delete complete bundles beyond the newest ``keep``, never the current one, an experiment's challenger,
    nor the one ``rollback`` would return to. Manifests go first, so a bundle being deleted is never half-visible.
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
        if (experiment := pointer.get(EXPERIMENT)) is not None:
            protected.add(experiment["challenger"])
        history = [
            e for e in pointer.get("history", []) if store.exists(manifest_key(namespace, e["version"]))
        ]
        if history:
            protected.add(history[0]["version"])
    scanned = scan_versions(store, namespace)
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


_NAMESPACE_KEY = re.compile(
    r"^([^/]+)/(?:" + re.escape(C.CURRENT_POINTER) + r"|bundles/[^/]+/" + re.escape(C.MANIFEST) + r")$"
)


def list_namespaces(store: ObjectStore) -> list[str]:
    """Namespaces that have a bundle or a current pointer (the default namespace first)."""
    found = {m.group(1) for key in store.list("") if (m := _NAMESPACE_KEY.match(key))}
    return sorted(found, key=lambda ns: (ns != C.DEFAULT_NAMESPACE, ns))
