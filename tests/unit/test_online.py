"""Online metrics on a hand-made set of impressions and events with known CTR, conversion and coverage."""

from __future__ import annotations

import io
import json
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llmrec_tasks import online
from llmrec_tasks.core import constants as C
from llmrec_tasks.core.errors import ConfigError
from llmrec_tasks.data.feedback import EVENT_SCHEMA, IMPRESSION_SCHEMA, feedback_key
from llmrec_tasks.storage.store import open_store

NS = "onl"
A, B = "20240301T000000Z-aaaaaaaa-111111", "20240301T000000Z-bbbbbbbb-222222"
CUR, CHA = C.CURRENT_ARM, C.CHALLENGER_ARM


def ts(text: str) -> pd.Timestamp:
    return pd.Timestamp(f"2024-{text}", tz="UTC")


# request id, user, time, version, arm, items shown (position 1 first)
RESPONSES = [
    ("r1", "u1", "03-01 10:00", A, CUR, ["i1", "i2", "i3"]),
    ("r2", "u2", "03-01 11:00", A, CUR, ["i4", "i5"]),
    ("r5", None, "03-01 11:30", A, CUR, ["i8", "i9"]),  # anonymous, nothing follows
    ("r3", "u3", "03-01 12:00", B, CHA, ["i1", "i6"]),
    ("r4", "u1", "03-02 09:00", A, CUR, ["i2", "i7"]),
]
# event id, user, item, time, type, request id
EVENTS = [
    ("e1", "u1", "i2", "03-01 10:05", "click", "r1"),  # r1 engaged, by request id
    ("e2", "u1", "i3", "03-01 10:06", "purchase", "r1"),  # position 3 > k=2: not a conversion of r1
    ("e3", "u2", "i5", "03-01 12:00", "purchase", None),  # r2 engaged and converted, by user + item
    ("e4", "u2", "i4", "03-01 10:00", "click", None),  # before r2 was shown: not attributed
    ("e5", "u3", "i1", "03-01 12:01", "view", "r3"),  # a view is not engagement
    ("e6", "u3", "i6", "03-02 12:30", "click", None),  # 24.5 h after r3: outside the window
    ("e7", "u1", "i2", "03-02 10:30", "add_to_cart", None),  # r4 (r1's window ended at 10:00)
    ("e7", "u1", "i2", "03-02 10:30", "add_to_cart", None),  # a repeat of the same event id
]


def impressions() -> pd.DataFrame:
    rows = [
        (rid, user, ts(at), version, arm, pos, item)
        for rid, user, at, version, arm, items in RESPONSES
        for pos, item in enumerate(items, 1)
    ]
    return pd.DataFrame(rows, columns=list(C.IMPRESSION_COLUMNS))


def events() -> pd.DataFrame:
    rows = [(eid, u, i, ts(at), 1.0, kind, rid, ts(at)) for eid, u, i, at, kind, rid in EVENTS]
    return pd.DataFrame(rows, columns=list(C.EVENT_COLUMNS))


def write_flushed(store_uri: str) -> None:
    """The hand-made rows in the flush's layout: one object per kind and day."""
    store = open_store(store_uri)
    for kind, frame, schema in (
        (C.FEEDBACK_IMPRESSIONS, impressions(), IMPRESSION_SCHEMA),
        (C.FEEDBACK_EVENTS, events(), EVENT_SCHEMA),
    ):
        for day, part in frame.groupby(frame[C.TIMESTAMP].dt.strftime("%Y-%m-%d")):
            buf = io.BytesIO()
            pq.write_table(pa.Table.from_pandas(part, schema=schema, preserve_index=False), buf)
            store.put_bytes(feedback_key(NS, kind, day, "seg-1"), buf.getvalue())


def row(records: list[dict[str, Any]], **match: Any) -> dict[str, Any]:
    (found,) = [r for r in records if all(r[key] == value for key, value in match.items())]
    return found


def test_known_ctr_conversion_and_coverage() -> None:
    ev = events().drop_duplicates(C.EVENT_ID)
    per_day = online.compute(impressions(), ev, {A: 10, B: 4}, k=2, window_hours=24).to_dict("records")
    day1 = row(per_day, day="2024-03-01", version=A, arm=CUR)
    assert (day1["impressions"], day1["users"], day1["engaged"], day1["converted"]) == (3, 2, 2, 1)
    assert day1["ctr@2"] == pytest.approx(2 / 3) and day1["conversion"] == pytest.approx(1 / 3)
    assert day1["items_shown"] == 6 and day1["coverage"] == pytest.approx(0.6)  # i1 i2 i4 i5 i8 i9
    challenger = row(per_day, day="2024-03-01", version=B, arm=CHA)
    assert (challenger["impressions"], challenger["ctr@2"], challenger["conversion"]) == (1, 0.0, 0.0)
    assert challenger["coverage"] == pytest.approx(0.5)
    day2 = row(per_day, day="2024-03-02", version=A, arm=CUR)
    assert (day2["impressions"], day2["ctr@2"], day2["conversion"], day2["coverage"]) == (1, 1.0, 1.0, 0.2)
    totals = online.compute(impressions(), ev, {A: 10, B: 4}, k=2, window_hours=24, by=(C.VERSION, C.ARM))
    current = row(totals.to_dict("records"), version=A, arm=CUR)
    assert (current["impressions"], current["ctr@2"], current["conversion"]) == (4, 0.75, 0.5)
    # With k=3, r1's purchase of its third item converts it; a 25 h window attributes e6 to r3.
    wide = online.compute(impressions(), ev, {A: 10, B: 4}, k=3, window_hours=25)
    assert row(wide.to_dict("records"), day="2024-03-01", version=A, arm=CUR)["converted"] == 2
    assert row(wide.to_dict("records"), day="2024-03-01", version=B, arm=CHA)["ctr@3"] == 1.0


def test_stage_reads_the_flushed_days_and_writes_json_parquet_and_report(store_uri: str) -> None:
    write_flushed(store_uri)
    result = online.run_online_metrics(store_uri, NS, "2024-03-01", "2024-03-02", k=2)
    day1 = row(result.rows, day="2024-03-01", version=A, arm=CUR)
    assert day1["ctr@2"] == pytest.approx(2 / 3) and day1["coverage"] is None  # no bundle: no catalogue
    assert row(result.totals, version=A, arm=CUR)["conversion"] == 0.5  # e7's repeat counted once
    store = open_store(store_uri)
    prefix = online.online_prefix(NS, "2024-03-01", "2024-03-02")
    written = json.loads(store.get_bytes(f"{prefix}/{C.ONLINE_METRICS_JSON}"))
    assert written["rows"] == result.rows and set(written["uris"]) == {
        C.ONLINE_METRICS_JSON, C.ONLINE_METRICS_PARQUET, C.ONLINE_REPORT_HTML,
    }  # fmt: skip
    table = pd.read_parquet(io.BytesIO(store.get_bytes(f"{prefix}/{C.ONLINE_METRICS_PARQUET}")))
    assert len(table) == 3 and set(table[C.ARM]) == {CUR, CHA}
    page = store.get_bytes(f"{prefix}/{C.ONLINE_REPORT_HTML}").decode()
    assert "data:image/png;base64," in page and B in page
    # Only the first day: r4 and its add-to-cart are outside the range.
    only_day1 = online.run_online_metrics(store_uri, NS, "2024-03-01", "2024-03-01", k=2)
    assert {r["day"] for r in only_day1.rows} == {"2024-03-01"}


def test_empty_range_and_bad_arguments(store_uri: str) -> None:
    empty = online.run_online_metrics(store_uri, NS, "2024-01-01", "2024-01-02")
    assert empty.rows == [] and empty.totals == []
    with pytest.raises(ConfigError, match="end 2024-01-01 is before start"):
        online.run_online_metrics(store_uri, NS, "2024-01-02", "2024-01-01")
    with pytest.raises(ConfigError, match="ISO dates"):
        online.run_online_metrics(store_uri, NS, "yesterday", "2024-01-01")


def test_impressions_without_any_event_have_zero_ctr() -> None:
    none = EVENT_SCHEMA.empty_table().to_pandas()
    per_day = online.compute(impressions(), none, {A: 10, B: 4}, k=2, window_hours=24)
    assert per_day["impressions"].tolist() == [3, 1, 1] and (per_day["ctr@2"] == 0).all()
