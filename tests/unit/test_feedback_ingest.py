"""The validate stage ingests the flushed feedback events as interactions: each event id once
(also across flush runs), items the catalog lacks dropped and counted, `feedback_ingest` off."""

from __future__ import annotations

import json
from pathlib import Path

from llmrec_tasks.core import constants as C
from llmrec_tasks.core.config import RunConfig
from llmrec_tasks.data.contract import parse_timestamps, read_raw, read_snapshot
from llmrec_tasks.data.validate import run_validate
from llmrec_tasks.feedback import flush_events
from llmrec_tasks.serving.feedback_log import EVENTS_KIND, FeedbackLog, encode_record
from llmrec_tasks.serving.realtime import FeedbackEvent


def log_events(log_dir: Path, events: list[FeedbackEvent]) -> None:
    log = FeedbackLog(log_dir, segment_bytes=1 << 20, segment_seconds=3600)
    log.append(encode_record(EVENTS_KIND, [e.row(e.timestamp + 1) for e in events])).result(timeout=10)
    log.close()


def test_the_run_trains_on_the_flushed_events_once(
    store_uri: str, sample_folder: Path, tmp_path: Path
) -> None:
    raw = read_raw(sample_folder.as_uri())
    items = raw.items[C.ITEM_ID].astype(str).tolist()[:3]
    latest = parse_timestamps(raw.interactions[C.TIMESTAMP]).max().timestamp()
    served = [
        FeedbackEvent(f"e{i}", "served-user", items[i % 3], latest - 3600 + i, 1.0, "click", None)
        for i in range(5)
    ]
    unknown = FeedbackEvent("e-unknown", "served-user", "no-such-item", latest - 10, 1.0, "click", None)
    log_dir = tmp_path / "log"
    log_events(log_dir, [*served, unknown])
    flush_events(store_uri, C.DEFAULT_NAMESPACE, log_dir)
    log_events(log_dir, [served[0]])  # a retry stored after its first copy was flushed
    flush_events(store_uri, C.DEFAULT_NAMESPACE, log_dir)

    result = run_validate(RunConfig(data_uri=sample_folder.as_uri(), store_uri=store_uri))
    interactions = read_snapshot(result.snapshot_uri).interactions
    mine = interactions[interactions[C.USER_ID] == "served-user"]
    assert sorted(mine[C.ITEM_ID]) == sorted(e.item_id for e in served)
    assert len(interactions) == len(raw.interactions) + len(served)
    summary = json.loads(Path(result.validation_uri.removeprefix("file://")).read_text())
    assert summary["feedback"] == {"events": 5, "unknown_items": 1}

    off = run_validate(RunConfig(data_uri=sample_folder.as_uri(), store_uri=store_uri, feedback_ingest=False))
    assert "served-user" not in set(read_snapshot(off.snapshot_uri).interactions[C.USER_ID])
    assert off.fingerprint != result.fingerprint


def test_an_unreadable_flushed_file_stops_the_run_and_names_it(store_uri: str) -> None:
    import pytest

    from llmrec_tasks.core.errors import DataContractError
    from llmrec_tasks.data.feedback import read_feedback_events
    from llmrec_tasks.storage.store import open_store

    store = open_store(store_uri)
    key = f"{C.DEFAULT_NAMESPACE}/{C.FEEDBACK_DIR}/{C.FEEDBACK_EVENTS}/day=2026-11-01/broken.parquet"
    store.put_bytes(key, b"not parquet")
    with pytest.raises(DataContractError, match=r"broken\.parquet is not readable Parquet.*flush-events"):
        read_feedback_events(store, C.DEFAULT_NAMESPACE)
