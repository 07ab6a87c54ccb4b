"""Stage `validate`: load the input, run the Great Expectations suites, write the snapshot.

Nothing downstream runs on data that failed: a failing suite raises ``ValidationFailedError``
after the report (``validation.json``, ``validation_stats.json`` and GX Data Docs under
``validation/``) is written to the run's work folder, and before any snapshot is written.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from llmrec_tasks.core import constants as C
from llmrec_tasks.core.config import RunConfig
from llmrec_tasks.core.errors import BundleError, ConfigError, StoreError, ValidationFailedError
from llmrec_tasks.core.results import Validated
from llmrec_tasks.data import expectations
from llmrec_tasks.data.contract import (
    Dataset,
    apply_cutoff,
    normalize,
    read_raw,
    write_snapshot,
)
from llmrec_tasks.data.feedback import with_feedback
from llmrec_tasks.storage import registry
from llmrec_tasks.storage.registry import make_version, run_prefix
from llmrec_tasks.storage.store import ObjectStore, open_store

if TYPE_CHECKING:
    from great_expectations.core import ExpectationSuiteValidationResult

log = logging.getLogger(__name__)

# Data Docs pages reference only their styles and favicon; GX's fonts and tutorial images (4 MB)
# are not uploaded.
DOCS_SUFFIXES = (".html", ".css", ".ico")
EMPTY_CUTOFF = datetime(1970, 1, 1, tzinfo=UTC)  # version cutoff when no timestamp parses
MAX_CELL = 60


def run_validate(cfg: RunConfig) -> Validated:
    """Validate ``cfg.data_uri``; on success write the typed snapshot into the run's work folder."""
    started = time.monotonic()
    now = datetime.now(UTC)
    raw = read_raw(cfg.data_uri)
    store = open_store(cfg.store_uri)
    feedback_counts = None
    if cfg.feedback_ingest:
        raw, feedback_counts = with_feedback(raw, store, cfg.namespace)
    frames = expectations.prepare_frames(raw, cfg.validation, now)
    bad_items, bad_interactions = expectations.bad_rows(frames, cfg.validation, now)
    kept = Dataset(raw.items[~bad_items], raw.interactions[~bad_interactions], raw.users)
    typed = apply_cutoff(normalize(kept), cfg.cutoff)
    cutoff = cfg.cutoff or _latest(typed)
    fingerprint = typed.fingerprint()
    version = make_version(cutoff, fingerprint, cfg.params_hash())

    work = run_prefix(cfg.namespace, version)
    previous, notes = _previous_stats(store, cfg.namespace)
    suites = expectations.build_suites(cfg.validation, frames, previous["stats"] if previous else None, now)
    with tempfile.TemporaryDirectory(prefix="llmrec-docs-") as tmp:
        docs_dir = Path(tmp) if cfg.validation.data_docs else None
        results = expectations.run_suites(frames.by_suite(), suites, docs_dir, version)
        docs_uri = _upload_docs(store, f"{work}/{C.VALIDATION_DOCS_DIR}", docs_dir) if docs_dir else None
    failures = failed_expectations(results)
    stats = expectations.compute_stats(frames, cfg.validation)
    validation_key, stats_key = f"{work}/{C.VALIDATION_SUMMARY}", f"{work}/{C.VALIDATION_STATS}"
    summary = {
        "success": not failures,
        "version": version,
        "data_uri": cfg.data_uri,
        "cutoff": cutoff.isoformat(),
        "validated_at": now.isoformat(),
        "data_docs_uri": docs_uri,
        "previous": {"version": previous["version"], "stats_uri": previous["uri"]} if previous else None,
        "notes": notes,
        "feedback": feedback_counts,  # served events added to the interactions (None: not ingested)
        "suites": {
            r.suite_name: {
                "success": r.success,
                **{k: r.statistics[k] for k in ("evaluated_expectations", "unsuccessful_expectations")},
            }
            for r in results
        },
        "failed": failures,
        # Rows breaking a row rule (tolerated by `mostly`): dropped from the snapshot of a passing run.
        "bad_rows": {C.ITEMS: int(bad_items.sum()), C.INTERACTIONS: int(bad_interactions.sum())},
    }
    store.put_bytes(stats_key, json.dumps({"version": version, **stats}, indent=2).encode())
    store.put_bytes(validation_key, json.dumps(summary, indent=2, default=str).encode())
    report_uri = f"{docs_uri}/index.html" if docs_uri else store.uri_for(validation_key)
    elapsed = time.monotonic() - started
    if failures:
        table = format_failures(failures)
        log.error(
            "validation of %s failed after %.1fs:\n%s\nreport: %s", cfg.data_uri, elapsed, table, report_uri
        )
        raise ValidationFailedError(
            f"{_headline(failures, results, cfg.data_uri)} Report: {report_uri}\n{table}",
            report_uri=report_uri,
        )

    write_snapshot(typed, store, work)
    counts = {
        C.ITEMS: len(typed.items),
        C.INTERACTIONS: len(typed.interactions),
        C.USERS: int(typed.interactions[C.USER_ID].nunique()),
    }
    log.info(
        "validated %s in %.1fs: %d expectations passed, %s rows dropped, version %s, report %s",
        cfg.data_uri,
        elapsed,
        sum(r.statistics["evaluated_expectations"] for r in results),
        summary["bad_rows"],
        version,
        report_uri,
    )
    return Validated(
        version=version,
        work_uri=store.uri_for(work),
        snapshot_uri=store.uri_for(f"{work}/{C.SNAPSHOT_DIR}"),
        fingerprint=fingerprint,
        validation_uri=store.uri_for(validation_key),
        validation_stats_uri=store.uri_for(stats_key),
        data_docs_uri=docs_uri,
        counts=counts,
        cutoff=cutoff.isoformat(),
    )


def _latest(data: Dataset) -> datetime:
    """Snapshot cutoff when none is given: the latest interaction (epoch when there is none)."""
    latest = data.interactions[C.TIMESTAMP].max()
    return EMPTY_CUTOFF if pd.isna(latest) else latest.to_pydatetime()


def _previous_stats(store: ObjectStore, namespace: str) -> tuple[dict[str, Any] | None, list[str]]:
    """Statistics of the namespace's current published bundle, for volume and drift checks.

    Returns ``({"version", "uri", "stats"} or None, notes)``; any gap only skips those checks.
    """
    pointer = registry.current_key(namespace)
    try:
        version = registry.current_version(store, namespace)
        if version is None:
            return None, _note(f"nothing published in {namespace!r} yet: volume and drift checks skipped")
        key = registry.bundle_key(namespace, version, C.VALIDATION_STATS)
        stats = json.loads(store.get_bytes(key))
    except (StoreError, BundleError, ConfigError, KeyError, TypeError, ValueError) as exc:
        return None, _note(
            f"no usable statistics for {store.uri_for(pointer)} ({exc}): volume and drift checks skipped"
        )
    return {"version": version, "uri": store.uri_for(key), "stats": stats}, []


def _note(message: str) -> list[str]:
    log.warning(message)
    return [message]


def _upload_docs(store: ObjectStore, prefix: str, docs_dir: Path) -> str | None:
    """Copy the Data Docs site into the store (stale pages of an earlier attempt removed last);
    returns the site folder's URI, which publish copies whole into the bundle."""
    if not (docs_dir / "index.html").is_file():
        return None
    uploaded = set()
    for path in sorted(docs_dir.rglob("*")):
        if path.is_file() and path.suffix in DOCS_SUFFIXES:
            key = f"{prefix}/{path.relative_to(docs_dir).as_posix()}"
            store.put_file(key, path)
            uploaded.add(key)
    for key in store.list(prefix):
        if key not in uploaded:
            store.delete(key)
    return store.uri_for(prefix)


def failed_expectations(results: list[ExpectationSuiteValidationResult]) -> list[dict[str, Any]]:
    """One row per failed expectation: suite, column, check, expectation type, observed, samples."""
    rows = []
    for suite_result in results:
        for result in suite_result.results:
            if result.success:
                continue
            config = result.expectation_config
            kwargs = config.kwargs
            column = kwargs.get("column") or ", ".join(kwargs.get("column_list") or []) or "(table)"
            details = result.result or {}
            rows.append(
                {
                    "suite": suite_result.suite_name,
                    "column": column,
                    "check": config.description or config.type,
                    "expectation": config.type,
                    "observed": _observed(details, kwargs, _exception_message(result.exception_info)),
                    "samples": _samples(details),
                }
            )
    return rows


def _exception_message(info: dict[str, Any] | None) -> str | None:
    """GX reports exceptions flat or keyed by metric; either way, the first message."""
    if not info:
        return None
    entries = [info] if "raised_exception" in info else list(info.values())
    for entry in entries:
        if isinstance(entry, dict) and entry.get("raised_exception"):
            return str(entry.get("exception_message"))
    return None


def _observed(details: dict[str, Any], kwargs: dict[str, Any], error: str | None) -> str:
    if error:
        return f"error: {error}"
    if "unexpected_count" in details:
        count, total = details["unexpected_count"], details.get("element_count")
        pct = details.get("unexpected_percent") or 0.0
        mostly = kwargs.get("mostly", 1)
        allowed = f", allowed {100 * (1 - mostly):.2g}%" if mostly < 1 else ""
        return f"{count} of {total} rows ({pct:.2f}%{allowed})"
    if "observed_value" in details:
        value = details["observed_value"]
        return "none (no values)" if value is None else _short(value)
    return "no result"


def _samples(details: dict[str, Any]) -> list[str]:
    """Distinct sample bad values; for missing values (nothing to show), their row numbers."""
    values = details.get("partial_unexpected_list") or []
    if values and all(not isinstance(v, dict) and pd.isna(v) for v in values):
        return [f"row {i}" for i in details.get("partial_unexpected_index_list") or []] or ["(missing)"]
    distinct: list[str] = []
    for value in map(_short, values):
        if value not in distinct:
            distinct.append(value)
    return distinct


def _short(value: Any) -> str:
    """A value as one short line: long strings are cut, dicts (compound keys) shown as tuples."""
    if isinstance(value, dict):
        text = "(" + ", ".join(map(str, value.values())) + ")"
    elif isinstance(value, float):
        text = f"{value:.4g}"
    else:
        text = repr(value) if isinstance(value, str) else str(value)
    text = text.replace("\n", " ")
    return text if len(text) <= MAX_CELL else text[: MAX_CELL - 3] + "..."


def format_failures(rows: list[dict[str, Any]]) -> str:
    """The failed expectations as a plain-text table for the task log."""
    headers = ("suite", "column", "check", "expectation", "observed", "sample bad values")
    cells = [
        (r["suite"], r["column"], r["check"], r["expectation"], r["observed"], "; ".join(r["samples"]) or "-")
        for r in rows
    ]
    cells = [
        tuple(c if len(c) <= 2 * MAX_CELL else c[: 2 * MAX_CELL - 3] + "..." for c in row) for row in cells
    ]
    widths = [max(len(h), *(len(row[i]) for row in cells)) for i, h in enumerate(headers)]
    lines = [headers, tuple("-" * w for w in widths), *cells]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines
    )


def _headline(
    rows: list[dict[str, Any]], results: list[ExpectationSuiteValidationResult], data_uri: str
) -> str:
    """First line of the error: how many failed, and the first failure in full."""
    evaluated = sum(r.statistics["evaluated_expectations"] for r in results)
    first = rows[0]
    samples = f", e.g. {'; '.join(first['samples'][:3])}" if first["samples"] else ""
    more = f" (and {len(rows) - 1} more)" if len(rows) > 1 else ""
    return (
        f"Input validation failed for {data_uri}: {len(rows)} of {evaluated} expectations failed; "
        f"{first['suite']}.{first['column']} '{first['check']}': {first['observed']}{samples}{more}."
    )
