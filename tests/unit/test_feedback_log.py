"""The feedback write-ahead log (group commit, segments, torn lines, abandoned segments), the
embedded real-time state, and the flush to day-partitioned Parquet (exactly once over reruns)."""

from __future__ import annotations

import asyncio
import fcntl
import os
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

import pandas as pd
import pytest

from llmrec_tasks.core import constants as C
from llmrec_tasks.core.errors import FeedbackError, StoreError
from llmrec_tasks.data.feedback import feedback_key
from llmrec_tasks.feedback import flush_events
from llmrec_tasks.serving.feedback_log import (
    CLOSED_SUFFIX,
    EVENTS_KIND,
    IMPRESSIONS_KIND,
    OPEN_SUFFIX,
    FeedbackLog,
    encode_record,
    read_segment,
    seal_segments,
)
from llmrec_tasks.serving.realtime import FeedbackEvent, MemoryState
from llmrec_tasks.storage.store import open_store

NS = C.DEFAULT_NAMESPACE
DAY1 = 1_717_200_000.0  # 2024-06-01
DAY2 = DAY1 + 86_400


def event_row(event_id: str, at: float = DAY1, user: str = "u1") -> list[object]:
    return FeedbackEvent(event_id, user, "i1", at, 1.0, "click", None).row(at + 1)


def write(folder: Path, *lines: bytes, segment_bytes: int = 1 << 20) -> None:
    log = FeedbackLog(folder, segment_bytes=segment_bytes, segment_seconds=3600)
    for line in lines:  # one commit each
        log.append(line).result(timeout=10)
    log.close()


def test_group_commit_covers_concurrent_appends_with_few_fsyncs(tmp_path: Path) -> None:
    log = FeedbackLog(tmp_path, segment_bytes=1 << 20, segment_seconds=3600)
    with ThreadPoolExecutor(8) as pool:
        futures = [
            f
            for f in pool.map(
                lambda i: log.append(encode_record(EVENTS_KIND, [event_row(f"e{i}")])), range(400)
            )
        ]
    wait(futures, timeout=30)
    assert all(f.exception() is None for f in futures)
    assert log.commits < 400  # several appends per fsync
    assert list(tmp_path.glob(f"*{OPEN_SUFFIX}"))  # written, still open
    log.close()
    (segment,) = seal_segments(tmp_path)
    assert segment.suffix == CLOSED_SUFFIX
    rows = read_segment(segment).rows[EVENTS_KIND]
    assert sorted(r[0] for r in rows) == sorted(f"e{i}" for i in range(400))


def test_segments_roll_at_their_size(tmp_path: Path) -> None:
    lines = [encode_record(EVENTS_KIND, [event_row(f"e{i}")]) for i in range(30)]
    write(tmp_path, *lines, segment_bytes=1024)
    segments = seal_segments(tmp_path)
    assert len(segments) > 1
    ids = [r[0] for s in segments for r in read_segment(s).rows[EVENTS_KIND]]
    assert ids == [f"e{i}" for i in range(30)]  # oldest segment first, nothing lost or doubled


def test_a_torn_last_line_is_skipped(tmp_path: Path) -> None:
    write(tmp_path, encode_record(EVENTS_KIND, [event_row("kept")]))
    (segment,) = seal_segments(tmp_path)
    torn = encode_record(EVENTS_KIND, [event_row("torn")])
    with segment.open("ab") as fh:
        fh.write(torn[: len(torn) // 2])  # a kill -9 mid-write: never acknowledged
    read = read_segment(segment)
    assert [r[0] for r in read.rows[EVENTS_KIND]] == ["kept"] and read.torn_lines == 1


def test_an_abandoned_open_segment_is_sealed_a_live_one_is_not(tmp_path: Path) -> None:
    dead = tmp_path / f"20240601T000000000000Z-1-aaaa{OPEN_SUFFIX}"
    dead.write_bytes(encode_record(EVENTS_KIND, [event_row("e1")]))  # no lock: its writer is gone
    live = tmp_path / f"20240601T000001000000Z-2-bbbb{OPEN_SUFFIX}"
    live.write_bytes(encode_record(EVENTS_KIND, [event_row("e2")]))
    fd = os.open(live, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        assert seal_segments(tmp_path) == [dead.with_suffix(CLOSED_SUFFIX)]
        assert live.exists()
    finally:
        os.close(fd)
    assert len(seal_segments(tmp_path)) == 2


def test_memory_state_keeps_the_latest_events_and_remembers_ids() -> None:
    state = MemoryState(recent_events=3, dedup_seconds=3600)

    async def scenario() -> None:
        events = [FeedbackEvent(f"e{i}", "u1", f"i{i}", DAY1 + i, 1.0, "view", None) for i in range(5)]
        assert await state.known(["e0", "e9"]) == [False, False]
        await state.record(events)
        assert await state.known(["e0", "e4", "e9"]) == [True, True, False]
        assert [e.item_id for e in await state.recent("u1")] == ["i2", "i3", "i4"]  # oldest first
        assert await state.recent("u2") == []

    asyncio.run(scenario())


def test_memory_state_forgets_ids_after_the_window() -> None:
    state = MemoryState(recent_events=3, dedup_seconds=0.01)

    async def scenario() -> None:
        await state.record([FeedbackEvent("e1", "u1", "i1", DAY1, 1.0, "view", None)])
        await asyncio.sleep(0.05)
        assert await state.known(["e1"]) == [False]

    asyncio.run(scenario())


def read_kind(store_uri: str, kind: str) -> pd.DataFrame:
    store = open_store(store_uri)
    keys = store.list(f"{NS}/{C.FEEDBACK_DIR}/{kind}")
    return pd.concat([pd.read_parquet(store.uri_for(k)) for k in keys]) if keys else pd.DataFrame()


def test_flush_partitions_by_day_and_drops_repeats(tmp_path: Path, store_uri: str) -> None:
    log_dir = tmp_path / "log"
    impression = ["req-1", "u1", DAY2, "v1", C.CURRENT_ARM, ["i1", "i2"]]
    write(
        log_dir,
        encode_record(EVENTS_KIND, [event_row("e1"), event_row("e2", DAY2)]),
        encode_record(IMPRESSIONS_KIND, [impression]),
    )
    write(log_dir, encode_record(EVENTS_KIND, [event_row("e1"), event_row("e3", DAY2)]))  # e1: a retry
    segments = seal_segments(log_dir)
    result = flush_events(store_uri, NS, log_dir)
    assert (result.segments, result.events, result.duplicates_dropped, result.impressions) == (2, 3, 1, 2)
    assert not list(log_dir.iterdir())  # removed once verified
    store = open_store(store_uri)
    first = segments[0].name.removesuffix(CLOSED_SUFFIX)
    assert store.exists(feedback_key(NS, C.FEEDBACK_EVENTS, "2024-06-01", first))
    assert store.exists(feedback_key(NS, C.FEEDBACK_EVENTS, "2024-06-02", first))
    events = read_kind(store_uri, C.FEEDBACK_EVENTS)
    assert sorted(events[C.EVENT_ID]) == ["e1", "e2", "e3"]
    assert str(events[C.TIMESTAMP].dtype) == "datetime64[us, UTC]"
    shown = read_kind(store_uri, C.FEEDBACK_IMPRESSIONS)
    assert shown[[C.POSITION, C.ITEM_ID]].values.tolist() == [[1, "i1"], [2, "i2"]]
    assert flush_events(store_uri, NS, log_dir).segments == 0


def test_a_flush_killed_midway_and_rerun_stores_each_event_once(
    tmp_path: Path, store_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    log_dir = tmp_path / "log"
    for n in range(3):
        write(log_dir, encode_record(EVENTS_KIND, [event_row(f"e{n}"), event_row("again")]))
    unlink = Path.unlink
    calls = []

    def killed_after_one(path: Path, missing_ok: bool = False) -> None:
        calls.append(path)
        if len(calls) > 1:
            raise KeyboardInterrupt  # the flush dies after removing one segment (the newest)
        unlink(path, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", killed_after_one)
    with pytest.raises(KeyboardInterrupt):
        flush_events(store_uri, NS, log_dir)
    monkeypatch.setattr(Path, "unlink", unlink)
    assert len(seal_segments(log_dir)) == 2
    flush_events(store_uri, NS, log_dir)
    events = read_kind(store_uri, C.FEEDBACK_EVENTS)
    assert sorted(events[C.EVENT_ID]) == ["again", "e0", "e1", "e2"]


def test_a_segment_whose_upload_reads_back_wrong_is_kept(
    tmp_path: Path, store_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    log_dir = tmp_path / "log"
    write(log_dir, encode_record(EVENTS_KIND, [event_row("e1")]))
    store = open_store(store_uri)
    monkeypatch.setattr(type(store), "get_bytes", lambda self, key: b"corrupt")
    with pytest.raises(StoreError, match="reads back different bytes"):
        flush_events(store_uri, NS, log_dir)
    assert len(seal_segments(log_dir)) == 1


def test_an_append_after_close_fails_instead_of_waiting(tmp_path: Path) -> None:
    log = FeedbackLog(tmp_path, segment_bytes=1 << 20, segment_seconds=3600)
    log.close()
    with pytest.raises(FeedbackError, match="closed"):
        log.append(encode_record(EVENTS_KIND, [event_row("late")])).result(timeout=5)
