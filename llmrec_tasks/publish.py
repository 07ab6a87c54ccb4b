"""Stage `publish`: copy a run's allowed artifacts into an immutable bundle (its report completed
with the trend over published versions and example recommendations), write its manifest last,
check it through serving, apply the quality gate and promote it; operator promote/rollback.

The store layout, the allow-list of bundle files, the manifest and the ``current`` pointer (with
its compare-and-swap) belong to :mod:`llmrec_tasks.storage.registry`; this module only runs the
workflow. A scheduled run never moves ``current`` back to an older logical date.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import subprocess
import tempfile
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

import llmrec_tasks
from llmrec_tasks.core import constants as C
from llmrec_tasks.core.config import RunConfig, validate_name
from llmrec_tasks.core.errors import BundleError, ConfigError, QualityGateError
from llmrec_tasks.core.results import Embedded, Indexed, Published, StageResult, Trained, Validated
from llmrec_tasks.storage import registry
from llmrec_tasks.storage.registry import Decision, bundle_prefix, manifest_key, read_manifest
from llmrec_tasks.storage.store import (
    LocalStore,
    ObjectStore,
    PreconditionFailed,
    file_sha256,
    open_store,
    split_uri,
)

if TYPE_CHECKING:  # the report and serving load matplotlib, LightGBM and FAISS: imported when used
    from llmrec_tasks.ranking.report import Example, Trend, VersionPoint
    from llmrec_tasks.serving.recommender import Recommender

log = logging.getLogger(__name__)

HISTORY_PER_USER = 100  # most recent interactions per user kept for serving
TREND_VERSIONS = 12  # earlier versions in the report's trend
EXAMPLE_USERS = 4  # users whose recommendations the report shows
EXAMPLE_K = 5
EXAMPLE_HISTORY = 5  # recent history titles shown per example user
GATE_METRICS = (C.PRIMARY_METRIC, "recall@10")  # the headline metrics the gate record keeps
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


def logical_date(cfg: RunConfig, validated: Validated) -> str:
    """The run's logical date: ``cfg.cutoff``, else the cutoff the validate stage applied."""
    cutoff = cfg.cutoff
    if cutoff is None:
        if not validated.cutoff:
            raise ConfigError("the run has no cutoff (RunConfig.cutoff or the validate result's 'cutoff')")
        cutoff = datetime.fromisoformat(validated.cutoff)
    cutoff = cutoff if cutoff.tzinfo else cutoff.replace(tzinfo=UTC)
    return cutoff.astimezone(UTC).isoformat(timespec="seconds")


# --- publishing ----------------------------------------------------------------------------------


def _artifact_sources(*results: StageResult) -> dict[str, str]:
    """Bundle file name -> source URI of every upstream artifact (each result lists its own).

    Other ``*_uri`` results (the run's folders, evaluation features, ...) stay in the work area.
    """
    sources: dict[str, str] = {}
    for result in results:
        for name, uri in result.artifacts().items():
            if not registry.is_bundle_file(name) and name not in registry.FOLDERS:
                raise BundleError(f"{type(result).__name__} lists {name!r}, which no bundle may hold")
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
    validated: Validated,
    embedded: Embedded,
    indexed: Indexed,
    files: Mapping[str, Any],
) -> dict[str, Any]:
    return redact(
        {
            "dataset_fingerprint": validated.fingerprint,
            "counts": validated.counts,
            "code_version": llmrec_tasks.__version__,
            "git_commit": git_commit(),
            "params": cfg.result_params(),
            "params_hash": cfg.params_hash(),
            "model_ids": {
                "encoder": embedded.encoder,
                "index": {"kind": indexed.kind, "n_items": indexed.n_items, "dim": indexed.dim},
                "ranker_sha256": files[C.RANKER_MODEL]["sha256"],
            },
            "dag_id": cfg.dag_id,
            "run_id": cfg.run_id,
            "logical_date": logical_date(cfg, validated),
            "work_uri": validated.work_uri,
        }
    )


def _file_meta(path: Path) -> dict[str, Any]:
    return {"sha256": file_sha256(path), "size": path.stat().st_size}


def _manifest(
    cfg: RunConfig,
    validated: Validated,
    embedded: Embedded,
    indexed: Indexed,
    trained: Trained,
    files: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    return {
        "format": registry.MANIFEST_FORMAT,
        "namespace": cfg.namespace,
        "version": validated.version,
        "created_at": _now(),
        "files": files,
        "metrics": trained.metrics,
        "lineage": _lineage(cfg, validated, embedded, indexed, files),
    }


# --- the report's publish sections ---------------------------------------------------------------


def _version_point(version: str, logical: str, metrics: Mapping[str, Any]) -> VersionPoint:
    """A version's ranker metrics as the manifest records them (``{"ranker": {...}, ...}``)."""
    from llmrec_tasks.ranking.report import PRIMARY_KEYS, VersionPoint

    ranker = metrics.get("ranker", {})
    return VersionPoint(version, logical, {k: float(ranker[k]) for k in PRIMARY_KEYS if k in ranker})


def _published_point(store: ObjectStore, namespace: str, version: str) -> VersionPoint:
    manifest = read_manifest(store, namespace, version)
    return _version_point(version, manifest["lineage"]["logical_date"], manifest.get("metrics", {}))


def report_trend(store: ObjectStore, namespace: str, new: VersionPoint) -> Trend:
    """The bundle ``new`` replaces (the namespace's current one) and the newest
    ``TREND_VERSIONS`` other published versions, oldest first, from their manifests."""
    from llmrec_tasks.ranking.report import Trend

    scanned = registry.scan_versions(store, namespace)
    published = sorted(  # version ids start with the logical date
        v for v, keys in scanned.items() if v != new.version and manifest_key(namespace, v) in keys
    )
    previous = [_published_point(store, namespace, v) for v in published[-TREND_VERSIONS:]]
    current = registry.current_version(store, namespace)
    replaces = (
        None if current is None or current == new.version else _published_point(store, namespace, current)
    )
    return Trend(new=new, replaces=replaces, previous=previous)


def example_recommendations(recommender: Recommender) -> list[Example]:
    """What serving returns to ``EXAMPLE_USERS`` users spread evenly over history length (least
    to most active, ties by user id): their recent titles and the top items with reasons."""
    from llmrec_tasks.ranking.evaluate import history_segment
    from llmrec_tasks.ranking.report import Example

    bundle = recommender.bundle
    lengths = np.diff(bundle.hist_indptr)
    users = sorted(bundle.user_row, key=lambda u: (int(lengths[bundle.user_row[u]]), u))
    if not users:
        return []
    picks = sorted({round(x) for x in np.linspace(0, len(users) - 1, EXAMPLE_USERS)})
    examples = []
    for user in (users[p] for p in picks):
        rec = recommender.recommend(user_id=user, k=EXAMPLE_K)
        history = bundle.history(user)
        recent = history.items[::-1][:EXAMPLE_HISTORY]
        examples.append(
            Example(
                user_id=user,
                history_length=len(history),
                segment=history_segment(len(history)),
                history=[bundle.titles[r] or bundle.item_ids[r] for r in recent],
                recommendations=[(item.title or item.item_id, item.reason) for item in rec.items],
                strategy=rec.strategy,
            )
        )
    return examples


def final_report(cfg: RunConfig, validated: Validated, trained: Trained, staged_uri: str) -> bytes:
    """The train report rendered again from the run's metrics with the trend and the examples;
    the examples come from the serving code over the bundle staged at ``staged_uri``."""
    from llmrec_tasks.ranking.report import build_report, report_title
    from llmrec_tasks.serving import recommender as serving

    metrics_store, metrics_key = split_uri(trained.metrics_uri)
    results = json.loads(metrics_store.get_bytes(metrics_key))
    if "models" not in results:
        raise BundleError(
            f"{trained.metrics_uri} holds no evaluation results ('models'): re-run the train stage"
        )
    new = _version_point(validated.version, logical_date(cfg, validated), trained.metrics)
    trend = report_trend(open_store(cfg.store_uri), cfg.namespace, new)
    bundle = serving.load_bundle(staged_uri, cfg.namespace, validated.version)
    examples = example_recommendations(serving.Recommender(bundle))
    page = build_report(results, report_title(validated.version), trend=trend, examples=examples)
    return page.encode()


def write_bundle(
    cfg: RunConfig, validated: Validated, embedded: Embedded, indexed: Indexed, trained: Trained
) -> tuple[dict[str, Any], bool]:
    """Copy the artifacts into ``bundles/<version>/`` then write the manifest, last.

    The files are staged locally first: serving loads the staged bundle for the report's example
    recommendations, and the final report (:func:`final_report`) replaces the train report both
    in the bundle and in the run. Returns ``(manifest, newly_written)``. A version that already has a manifest is left exactly
    as it is (a cleared and re-run task overwrites nothing that was published).
    """
    store = open_store(cfg.store_uri)
    version = validate_name("version", validated.version)
    prefix = bundle_prefix(cfg.namespace, version)
    mkey = manifest_key(cfg.namespace, version)
    if store.exists(mkey):
        log.info("version %s is already published at %s: leaving it as is", version, store.uri_for(mkey))
        return read_manifest(store, cfg.namespace, version), False

    # Every file is staged on local disk (streamed both ways, memory stays bounded), where serving
    # loads the staged bundle for the report's examples before anything is uploaded.
    sources: dict[str, tuple[ObjectStore, str]] = {}
    for name, uri in _artifact_sources(validated, embedded, indexed, trained).items():
        source, keys = _artifact_keys(uri, validated.work_uri)
        for sub, key in keys:
            sources[f"{name}/{sub}" if sub else name] = (source, key)
    with tempfile.TemporaryDirectory(prefix="llmrec-publish-") as tmp_dir:
        staging = LocalStore(Path(tmp_dir) / "staging")

        def staged(name: str) -> Path:
            return staging.root / registry.bundle_key(cfg.namespace, version, name)

        for name, (source, key) in sources.items():
            source.get_file(key, staged(name))
        names = sorted(sources)
        for name, data in _serving_tables(validated.snapshot_uri).items():
            if name not in sources:
                staged(name).write_bytes(data)
                names.append(name)
        missing = registry.missing_required(names)
        if missing:
            raise BundleError(f"cannot publish {version}: upstream results lack {missing}")
        staged_files = {name: _file_meta(staged(name)) for name in names}
        registry.write_manifest(staging, _manifest(cfg, validated, embedded, indexed, trained, staged_files))
        report = final_report(cfg, validated, trained, staging.uri)
        staged(C.REPORT_HTML).write_bytes(report)
        report_store, report_key = split_uri(trained.report_uri)
        report_store.put_bytes(report_key, report)  # the run's report is the bundle's

        files: dict[str, dict[str, Any]] = {}
        try:
            for name in sorted(names):
                files[name] = _file_meta(staged(name))
                _put_immutable(
                    store,
                    registry.bundle_key(cfg.namespace, version, name),
                    staged(name),
                    files[name]["sha256"],
                    mkey,
                )
                staged(name).unlink()
        except PreconditionFailed:
            log.info("version %s was published by a concurrent run meanwhile: leaving it as is", version)
            return read_manifest(store, cfg.namespace, version), False
    manifest = _manifest(cfg, validated, embedded, indexed, trained, files)
    try:
        registry.write_manifest(store, manifest)
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


# --- the stage ----------------------------------------------------------------------------------


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
    manifest, written = write_bundle(cfg, validated, embedded, indexed, trained)
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
    gate: list[dict[str, Any] | None] = [None]  # the last decision's gate record (CAS may retry)

    def decide(pointer: dict[str, Any] | None) -> Decision:
        gate[0] = None
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
        gate[0] = gate_record(
            passed,
            why,
            cfg.gate_tolerance,
            manifest.get("metrics", {}),
            pointer["version"] if pointer else None,
            current_metrics,
        )
        if not passed:
            return None, False, f"quality gate: {why}"
        return (
            registry.new_pointer(pointer, version, logical, "publish", f"quality gate: {why}", **run_ids),
            True,
            why,
        )

    promoted, reason = registry.update_current(store, cfg.namespace, decide)
    if not promoted:
        log.warning("bundle %s published but not promoted: %s", version, reason)
    return Published(**result, promoted=promoted, reason=reason, gate=gate[0])


def gate_record(
    passed: bool,
    reason: str,
    tolerance: float,
    new_metrics: Mapping[str, Any],
    current_version: str | None,
    current_metrics: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """What the gate decided and on which numbers (``Published.gate``): the ranker's, popularity's
    and the current ranker's (on this run's evaluation data) headline metrics."""

    def headline(block: Any) -> dict[str, float]:
        block = block if isinstance(block, Mapping) else {}
        return {k: float(block[k]) for k in GATE_METRICS if k in block}

    return {
        "passed": passed,
        "reason": reason,
        "tolerance": tolerance,
        "ranker": headline(new_metrics.get("ranker")),
        "popularity": headline(new_metrics.get("popularity")),
        "current_version": current_version,
        "current": None
        if current_metrics is None
        else headline(current_metrics.get("ranker", current_metrics)),
    }


def _metric_line(metrics: Mapping[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()) or "no metrics"


def gate_failure_message(cfg: RunConfig, published: Published, gate: Mapping[str, Any]) -> str:
    """Why the bundle failed the gate (its record ``gate``), on which numbers, and how to promote
    it anyway."""
    version = published.version
    lines = [
        f"bundle {version} (namespace {published.namespace}) was published but NOT promoted: "
        f"it failed the quality gate: {gate['reason']}",
        f"  new ranker:      {_metric_line(gate['ranker'])}",
        f"  popularity:      {_metric_line(gate['popularity'])}",
    ]
    if gate["current_version"]:
        lines.append(
            f"  current {gate['current_version']} (as the gate scored it on this run's evaluation "
            f"data): {_metric_line(gate['current'] or {})}; it stays current"
        )
    store = redact(cfg.store_uri)
    lines.append(f"  report: {redact(published.bundle_uri)}/{C.REPORT_HTML}")
    lines.append(
        f"To promote it anyway: `llmrec promote --store {store} --namespace {published.namespace} {version}`."
    )
    new = gate["ranker"].get(C.PRIMARY_METRIC)
    pop = gate["popularity"].get(C.PRIMARY_METRIC)
    current = (gate["current"] or {}).get(C.PRIMARY_METRIC)
    if new is not None and pop is not None and new > pop and current:
        # The gate passes while new >= current * (1 - tolerance).
        needed = math.ceil((1 - new / current) * 1000) / 1000
        lines.append(
            f"Or run again with gate_tolerance >= {needed:.3f} (now {gate['tolerance']}; it is part "
            "of the version id: the run trains a new version)."
        )
    else:
        lines.append(
            f"No gate_tolerance helps: the ranker must beat popularity on {C.PRIMARY_METRIC}; "
            "check the report and the training params."
        )
    return "\n".join(lines)


def enforce_gate(cfg: RunConfig, published: Published) -> None:
    """Raise :class:`QualityGateError` when the bundle failed the quality gate, so the run is
    failed, not green. Bundles the gate did not evaluate (``promote=False``, rolled back, older
    than current, already current) pass here: that was decided on purpose."""
    if published.gate is not None and not published.gate["passed"]:
        raise QualityGateError(gate_failure_message(cfg, published, published.gate))


def current_ranker_metrics(store: ObjectStore, namespace: str, version: str, work_uri: str) -> dict[str, Any]:
    """The published ranker scored on *this* run's evaluation data (same users, candidates,
    features), so the gate compares like with like. When the published ranker needs features this
    run does not compute, its own recorded metrics are the only comparison left (logged)."""
    from llmrec_tasks.core.errors import DataContractError
    from llmrec_tasks.ranking.ranker import evaluate_published_ranker

    model_text = store.get_bytes(registry.bundle_key(namespace, version, C.RANKER_MODEL)).decode()
    spec = json.loads(store.get_bytes(registry.bundle_key(namespace, version, C.FEATURE_SPEC)))
    try:
        return {"ranker": evaluate_published_ranker(work_uri, model_text, spec["features"])}
    except DataContractError as exc:
        log.warning("gate compares against %s's recorded metrics: %s", version, exc)
        return read_manifest(store, namespace, version)["metrics"]


# --- operator commands ---------------------------------------------------------------------------


def promote(store_uri: str, namespace: str, version: str, *, check: bool = True) -> dict[str, Any]:
    """Move ``current`` to a published version (any logical date: an operator's explicit choice).
    Promoting a running experiment's challenger ends the experiment (``experiment_ended``)."""
    validate_name("namespace", namespace)
    store = open_store(store_uri)
    version = validate_name("version", version)
    manifest = read_manifest(store, namespace, version)
    checked = serving_check(store_uri, namespace, version) if check else None

    previous: list[str | None] = [None]
    ended: list[str | None] = [None]

    def decide(pointer: dict[str, Any] | None) -> Decision:
        previous[0] = pointer["version"] if pointer else None
        if pointer is not None and pointer["version"] == version:
            return None, True, f"{version} is already current"
        new = registry.new_pointer(
            pointer, version, manifest["lineage"]["logical_date"], "promote", "promoted by operator"
        )
        experiment = (pointer or {}).get(registry.EXPERIMENT)
        ended[0] = experiment["name"] if experiment and registry.EXPERIMENT not in new else None
        return new, True, f"promoted {version}"

    promoted, reason = registry.update_current(store, namespace, decide)
    return {
        "namespace": namespace,
        "version": version,
        "previous": previous[0],
        "promoted": promoted,
        "reason": reason,
        "experiment_ended": ended[0],
        "check": checked,
    }


def rollback(store_uri: str, namespace: str, *, check: bool = True) -> dict[str, Any]:
    """Move ``current`` back to the previous current; the version left is marked rolled back
    (scheduled runs will not promote it again)."""
    validate_name("namespace", namespace)
    store = open_store(store_uri)
    pointer, _ = registry.read_pointer(store, namespace)
    target = registry.rollback_target(store, namespace, pointer)
    checked = serving_check(store_uri, namespace, target["version"]) if check else None

    def decide(now: dict[str, Any] | None) -> Decision:
        position = [e.get("version") for e in (now or {}).get("history", [])]
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
        new = registry.rollback_pointer(now, target)
        return new, True, f"rolled back from {now['version']} to {target['version']}"

    _, reason = registry.update_current(store, namespace, decide)
    return {
        "namespace": namespace,
        "version": target["version"],
        "previous": pointer and pointer["version"],
        "reason": reason,
        "check": checked,
    }
