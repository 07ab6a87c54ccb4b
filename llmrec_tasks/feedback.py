"""Stage ``flush-events``: the service's closed feedback log segments -> Parquet in the object store.

Layout (``<ns>`` the namespace): ``<ns>/feedback/events/day=YYYY-MM-DD/<segment>.parquet``
(columns ``constants.EVENT_COLUMNS``: the interaction contract's user_id, item_id, timestamp,
weight, plus event_id, event_type, request_id, received_at; the day is the event's, UTC) and
``<ns>/feedback/impressions/day=YYYY-MM-DD/<segment>.parquet`` (``IMPRESSION_COLUMNS``: one row
per item shown, position from 1).

Exactly once, across a flush killed at any point and rerun: an object's name is its segment's,
and its bytes depend only on that segment and the segments before it (an event id seen in an
earlier segment of the run is dropped: the repeat a retry stored after a failure between the log
write and the state write, or after a restart emptied the embedded state). Every object is
written, then read back and compared by sha256, and only then are the segments deleted, newest
first, so a rerun finds the oldest segments of the run and rewrites their objects byte for byte.
A repeat across flush runs (a retry after its first copy was flushed) is dropped by the daily
ingestion, which deduplicates by event id too.

The daily run reads them back (:func:`llmrec_tasks.data.feedback.with_feedback`, in the validate stage, setting
``feedback_ingest``): every flushed event, each event id once, joins the interactions before the
Great Expectations validation, so tomorrow's bundle learns from today's feedback.

The log is local to the service's host: run the flush there (cron, a sidecar), or point
``--feedback-dir`` at the folder the service writes.
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from llmrec_tasks.core import constants as C
from llmrec_tasks.core.config import validate_name
from llmrec_tasks.core.errors import StoreError
from llmrec_tasks.data.feedback import EVENT_SCHEMA, IMPRESSION_SCHEMA, TIMESTAMP_COLUMNS, feedback_key
from llmrec_tasks.serving.feedback_log import (
    EVENTS_KIND,
    IMPRESSIONS_KIND,
    Segment,
    read_segment,
    seal_segments,
)
from llmrec_tasks.storage.store import ObjectStore, open_store

log = logging.getLogger(__name__)


@dataclass
class FlushResult:
    """What one flush moved into the store."""

    segments: int = 0
    events: int = 0
    impressions: int = 0  # rows: one per item shown
    duplicates_dropped: int = 0
    torn_lines: int = 0
    objects: list[str] = field(default_factory=list)  # URIs written

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _day(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d")


def _event_rows(segment: Segment, seen: set[str], result: FlushResult) -> dict[str, list[list[Any]]]:
    """The segment's events not seen earlier in the run, by day (the event's timestamp)."""
    by_day: dict[str, list[list[Any]]] = defaultdict(list)
    for row in segment.rows[EVENTS_KIND]:
        if row[0] in seen:
            result.duplicates_dropped += 1
            continue
        seen.add(row[0])
        by_day[_day(row[3])].append(row)
    return by_day


def _impression_rows(segment: Segment) -> dict[str, list[list[Any]]]:
    """One row per item shown, by day of the response."""
    by_day: dict[str, list[list[Any]]] = defaultdict(list)
    for request_id, user_id, at, version, arm, items in segment.rows[IMPRESSIONS_KIND]:
        rows = by_day[_day(at)]
        rows.extend([request_id, user_id, at, version, arm, pos, item] for pos, item in enumerate(items, 1))
    return by_day


def _parquet(rows: list[list[Any]], schema: pa.Schema) -> bytes:
    """Rows (log order) as Parquet bytes; the same rows always give the same bytes."""
    columns = {}
    for j, f in enumerate(schema):
        values = [row[j] for row in rows]
        if f.name in TIMESTAMP_COLUMNS:
            values = [round(v * 1_000_000) for v in values]
            columns[f.name] = pa.array(values, pa.int64()).cast(f.type)
        else:
            columns[f.name] = pa.array(values, f.type)
    buf = io.BytesIO()
    pq.write_table(pa.table(columns, schema=schema), buf)
    return buf.getvalue()


def _put_verified(store: ObjectStore, key: str, data: bytes) -> None:
    """Write, read back, compare: a segment goes only once its objects are known good."""
    store.put_bytes(key, data)
    expected = hashlib.sha256(data).hexdigest()
    if hashlib.sha256(store.get_bytes(key)).hexdigest() != expected:
        raise StoreError(
            f"{store.uri_for(key)} reads back different bytes than were written; the segment is kept: "
            "rerun the flush"
        )


def flush_events(store_uri: str, namespace: str, log_dir: str | Path) -> FlushResult:
    """Move every closed segment of ``log_dir`` into the store (see the module docstring)."""
    validate_name("namespace", namespace)
    store = open_store(store_uri)
    result = FlushResult()
    segments = seal_segments(Path(log_dir))
    seen: set[str] = set()
    for path in segments:
        segment = read_segment(path)
        result.torn_lines += segment.torn_lines
        outputs = [
            (C.FEEDBACK_EVENTS, _event_rows(segment, seen, result), EVENT_SCHEMA),
            (C.FEEDBACK_IMPRESSIONS, _impression_rows(segment), IMPRESSION_SCHEMA),
        ]
        for kind, by_day, schema in outputs:
            for day, rows in sorted(by_day.items()):
                key = feedback_key(namespace, kind, day, segment.name)
                _put_verified(store, key, _parquet(rows, schema))
                result.objects.append(store.uri_for(key))
                if kind == C.FEEDBACK_EVENTS:
                    result.events += len(rows)
                else:
                    result.impressions += len(rows)
    for path in reversed(segments):  # newest first: a rerun finds a prefix of this run's segments
        path.unlink()
    result.segments = len(segments)
    log.info(
        "flushed %d segment(s) of %s: %d events (%d repeats dropped), %d impression rows",
        result.segments, log_dir, result.events, result.duplicates_dropped, result.impressions,
    )  # fmt: skip
    return result
