"""Served feedback in the object store, as the flush writes it and the daily run reads it.

``<ns>/feedback/events/day=YYYY-MM-DD/<segment>.parquet`` (``EVENT_SCHEMA``: the interaction
contract's user_id, item_id, timestamp, weight, plus event_id, event_type, request_id,
received_at) and ``<ns>/feedback/impressions/...`` (``IMPRESSION_SCHEMA``: one row per item shown).
Written by :mod:`llmrec_tasks.feedback` (``llmrec flush-events``); :func:`with_feedback` adds the
events to a run's interactions before validation (setting ``feedback_ingest``), each event id once,
so tomorrow's bundle learns from today's feedback.
"""

from __future__ import annotations

import io
import logging

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from llmrec_tasks.core import constants as C
from llmrec_tasks.core.errors import DataContractError
from llmrec_tasks.data.dataset import Dataset
from llmrec_tasks.storage.store import ObjectStore

log = logging.getLogger(__name__)

_TIMESTAMP = pa.timestamp("us", tz="UTC")
EVENT_SCHEMA = pa.schema(
    [
        (C.EVENT_ID, pa.string()),
        (C.USER_ID, pa.string()),
        (C.ITEM_ID, pa.string()),
        (C.TIMESTAMP, _TIMESTAMP),
        (C.WEIGHT, pa.float64()),
        (C.EVENT_TYPE, pa.string()),
        (C.REQUEST_ID, pa.string()),
        (C.RECEIVED_AT, _TIMESTAMP),
    ]
)
IMPRESSION_SCHEMA = pa.schema(
    [
        (C.REQUEST_ID, pa.string()),
        (C.USER_ID, pa.string()),
        (C.TIMESTAMP, _TIMESTAMP),
        (C.VERSION, pa.string()),
        (C.ARM, pa.string()),
        (C.POSITION, pa.int32()),
        (C.ITEM_ID, pa.string()),
    ]
)
TIMESTAMP_COLUMNS = {C.TIMESTAMP, C.RECEIVED_AT}


def feedback_key(namespace: str, kind: str, day: str, segment: str) -> str:
    """The object key of one segment's rows of one kind and day."""
    partition = C.DAY_PARTITION.format(day=day)
    return f"{namespace}/{C.FEEDBACK_DIR}/{kind}/{partition}/{segment}.parquet"


def read_parquet_frames(store: ObjectStore, keys: list[str], schema: pa.Schema) -> pd.DataFrame:
    """The flushed Parquet files ``keys`` as one frame (an empty frame of ``schema`` for none);
    an unreadable file is a :class:`DataContractError` that says how to rewrite it."""
    frames = []
    for key in keys:
        try:
            frames.append(pq.read_table(io.BytesIO(store.get_bytes(key))).to_pandas())
        except (pa.ArrowInvalid, OSError) as exc:
            raise DataContractError(
                f"{store.uri_for(key)} is not readable Parquet: {exc}. Delete it and rerun "
                "`llmrec flush-events` if its segment is still in the service's log"
            ) from exc
    if not frames:
        return schema.empty_table().to_pandas()
    return pd.concat(frames, ignore_index=True)


def read_feedback_events(store: ObjectStore, namespace: str) -> pd.DataFrame:
    """Every flushed event of the namespace, each event id once (the earliest received), in
    ``EVENT_COLUMNS``; empty when nothing was flushed."""
    prefix = f"{namespace}/{C.FEEDBACK_DIR}/{C.FEEDBACK_EVENTS}/"
    keys = [k for k in store.list(prefix) if k.endswith(".parquet")]
    events = read_parquet_frames(store, keys, EVENT_SCHEMA).sort_values(C.RECEIVED_AT, kind="stable")
    return events.drop_duplicates(C.EVENT_ID, keep="first").reset_index(drop=True)


def _like(values: pd.Series, template: pd.Series) -> pd.Series:
    """Feedback values in the dtype of the input's column: text for a CSV's, else the column's type."""
    if pd.api.types.is_datetime64_any_dtype(template):
        return values
    if pd.api.types.is_datetime64_any_dtype(values):
        values = (values - pd.Timestamp(0, tz="UTC")).dt.total_seconds()
    if pd.api.types.is_numeric_dtype(template):
        return (
            values.astype(template.dtype)
            if pd.api.types.is_float_dtype(template)
            else values.round().astype(template.dtype)
        )
    return values.astype(str)


def with_feedback(raw: Dataset, store: ObjectStore, namespace: str) -> tuple[Dataset, dict[str, int]]:
    """The raw dataset plus the namespace's flushed events as interactions (contract columns, in
    the input's column types), before validation; events on items the catalog lacks are dropped."""
    events = read_feedback_events(store, namespace)
    known = events[C.ITEM_ID].isin(set(raw.items[C.ITEM_ID].astype(str)))
    counts = {"events": int(known.sum()), "unknown_items": int((~known).sum())}
    if not known.any():
        return raw, counts
    events = events[known]
    inter = raw.interactions
    added = pd.DataFrame(
        {
            column: _like(events[column].reset_index(drop=True), inter[column])
            for column in (C.USER_ID, C.ITEM_ID, C.TIMESTAMP, C.WEIGHT)
            if column in inter.columns
        }
    )
    merged = pd.concat([inter, added], ignore_index=True)
    log.info(
        "added %d served feedback events to the interactions (%d on unknown items dropped)",
        counts["events"], counts["unknown_items"],
    )  # fmt: skip
    return Dataset(items=raw.items, interactions=merged, users=raw.users), counts
