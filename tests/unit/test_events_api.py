"""POST /events and the real-time state in the service (embedded state): validation (422 naming
the bad field, nothing written), idempotency by event id, 503 when the log or the state fails,
recommendations that merge the user's latest events, and impressions in the log."""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient

from llmrec_tasks import publish
from llmrec_tasks.core import constants as C
from llmrec_tasks.core.config import FeedbackConfig
from llmrec_tasks.core.constants import DEFAULT_NAMESPACE
from llmrec_tasks.core.errors import FeedbackError
from llmrec_tasks.feedback import flush_events
from llmrec_tasks.serving import api, feedback_log
from llmrec_tasks.serving.recommender import load_bundle
from tests.bundle_factory import make_run

NOW = time.time()


def event(i: int | str, user: str = "u1", item: str = "i3", **extra: Any) -> dict[str, Any]:
    return {"event_id": f"e{i}", "user_id": user, "item_id": item, "type": "click", "timestamp": NOW, **extra}


def flushed(store_uri: str, log_dir: Path, kind: str = C.FEEDBACK_EVENTS) -> pd.DataFrame:
    flush_events(store_uri, DEFAULT_NAMESPACE, log_dir)
    root = Path(store_uri.removeprefix("file://")) / DEFAULT_NAMESPACE / C.FEEDBACK_DIR / kind
    files = sorted(root.rglob("*.parquet"))
    return pd.concat([pd.read_parquet(f) for f in files]) if files else pd.DataFrame()


@pytest.fixture
def client(store_uri: str, toy_ranker_features: None, feedback_log_dir: Path) -> Iterator[TestClient]:
    publish.run_publish(*make_run(store_uri))
    with TestClient(api.create_app(store_uri, DEFAULT_NAMESPACE, poll_seconds=3600)) as c:
        yield c


def test_a_batch_is_acknowledged_once_and_a_replay_is_a_duplicate(
    client: TestClient, store_uri: str, feedback_log_dir: Path
) -> None:
    batch = [event(1), event(2), event(1)]  # e1 twice in the batch: stored once
    first = client.post("/events", json={"events": batch})
    assert first.status_code == 200 and first.json()["accepted"] == 2 and first.json()["duplicates"] == 1
    assert first.json()["request_id"] == first.headers["x-request-id"]
    again = client.post("/events", json={"events": batch}).json()
    assert again["accepted"] == 0 and again["duplicates"] == 3
    client.app.state.feedback_log.close()  # closes the segment (as the service's shutdown does)
    rows = flushed(store_uri, feedback_log_dir)
    assert sorted(rows[C.EVENT_ID]) == ["e1", "e2"]
    assert set(rows.columns) == set(C.EVENT_COLUMNS)
    assert rows[C.TIMESTAMP].dt.tz is not None and (rows[C.EVENT_TYPE] == "click").all()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"type": "poke"}, "events.1.type: Input should be 'view', 'click'"),
        ({"timestamp": "yesterday"}, "events.1.timestamp: must be unix seconds or ISO 8601"),
        ({"timestamp": NOW + 3 * 86_400}, "events.1.timestamp: must be unix seconds or ISO 8601"),
        ({"timestamp": "2024-01-01T00:00:00"}, "events.1.timestamp: an ISO 8601 timestamp needs a time zone"),
        ({"timestamp": -5}, "events.1.timestamp: must be unix seconds"),
        ({"user_id": "bad id"}, "events.1.user_id: must be 1-128 characters"),
        ({"event_id": ""}, "events.1.event_id: must be 1-128 characters"),
        ({"weight": -1}, "events.1.weight: Input should be greater than or equal to 0"),
        ({"request_id": "a/b"}, "events.1.request_id: must be"),
        ({"colour": "red"}, "events.1.colour: Extra inputs are not permitted"),
    ],
)
def test_one_bad_event_refuses_the_whole_batch_with_its_field(
    client: TestClient, change: dict[str, Any], message: str
) -> None:
    response = client.post("/events", json={"events": [event("ok"), {**event("bad"), **change}]})
    assert response.status_code == 422 and response.json()["error"].startswith(message), response.json()
    # nothing of the batch was written: its good event is new afterwards
    assert client.post("/events", json={"events": [event("ok")]}).json()["accepted"] == 1


def test_batch_size_limits(client: TestClient) -> None:
    empty = client.post("/events", json={"events": []})
    assert empty.status_code == 422 and "at least 1 item" in empty.json()["error"]
    full = client.post("/events", json={"events": [event(i) for i in range(api.MAX_EVENT_BATCH)]})
    assert full.status_code == 200 and full.json()["accepted"] == api.MAX_EVENT_BATCH  # > 64 KiB body
    over = client.post("/events", json={"events": [event(i) for i in range(api.MAX_EVENT_BATCH + 1)]})
    assert over.status_code == 422 and "at most 1000 items" in over.json()["error"]
    huge = client.post("/events", content=b"x" * (api.EVENTS_MAX_BODY_BYTES + 1))
    assert huge.status_code == 413


def test_iso_timestamps_are_accepted(client: TestClient) -> None:
    body = {
        "events": [event("iso", timestamp="2024-03-01T12:00:00+02:00"), event("num", timestamp="1709287200")]
    }
    assert client.post("/events", json=body).json()["accepted"] == 2


def test_a_log_failure_is_503_and_nothing_is_acknowledged(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full_disk(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(feedback_log.os, "fsync", full_disk)
    response = client.post("/events", json={"events": [event("lost")]})
    assert response.status_code == 503 and "No space left on device" in response.json()["error"]
    monkeypatch.undo()
    # not recorded: the retry is stored
    assert client.post("/events", json={"events": [event("lost")]}).json()["accepted"] == 1


def test_a_state_failure_is_503_and_the_retry_is_stored(client: TestClient) -> None:
    state = client.app.state.realtime
    record = state.record

    async def down(events: Any) -> None:
        raise FeedbackError("Redis went away")

    state.record = down
    response = client.post("/events", json={"events": [event("r")]})
    assert response.status_code == 503 and "Redis went away" in response.json()["error"]
    state.record = record
    assert client.post("/events", json={"events": [event("r")]}).json()["accepted"] == 1


def test_recommendations_merge_the_users_latest_events(client: TestClient) -> None:
    before = client.get("/recommendations/u1").json()
    shown = before["items"][0]["item_id"]
    client.post("/events", json={"events": [event("c1", item=shown), event("c2", item="i7")]})
    after = client.get("/recommendations/u1").json()
    assert after["history_length"] == before["history_length"] + 2
    assert shown not in [i["item_id"] for i in after["items"]]  # seen now
    cold = client.get("/recommendations/newcomer").json()
    assert cold["strategy"] == "popular"
    client.post("/events", json={"events": [event("n1", user="newcomer", item="i4")]})
    warm = client.get("/recommendations/newcomer").json()
    assert warm["strategy"] == "personalized" and warm["history_length"] == 1
    posted = client.post(
        "/recommendations", json={"user_id": "newcomer", "events": [{"item_id": "i5"}]}
    ).json()
    assert posted["history_length"] == 2


def test_every_response_is_logged_as_an_impression(
    client: TestClient, store_uri: str, feedback_log_dir: Path
) -> None:
    got = client.get("/recommendations/u1", params={"k": 4}, headers={"X-Request-ID": "req-1"})
    posted = client.post("/recommendations", json={"events": [{"item_id": "i2"}], "k": 3})
    client.app.state.feedback_log.close()
    rows = flushed(store_uri, feedback_log_dir, C.FEEDBACK_IMPRESSIONS)
    assert set(rows.columns) == set(C.IMPRESSION_COLUMNS)
    first = rows[rows[C.REQUEST_ID] == "req-1"].sort_values(C.POSITION)
    assert first[C.ITEM_ID].tolist() == [i["item_id"] for i in got.json()["items"]]
    assert first[C.POSITION].tolist() == [1, 2, 3, 4] and (first[C.USER_ID] == "u1").all()
    assert (first[C.VERSION] == got.headers["x-bundle-version"]).all() and (
        first[C.ARM] == C.CURRENT_ARM
    ).all()
    second = rows[rows[C.REQUEST_ID] == posted.json()["request_id"]]
    assert len(second) == 3 and second[C.USER_ID].isna().all()


def test_events_already_in_the_published_history_are_not_merged_again(
    store_uri: str, feedback_log_dir: Path
) -> None:
    publish.run_publish(*make_run(store_uri, real_features=True))
    end = load_bundle(store_uri, DEFAULT_NAMESPACE).history_end
    with TestClient(api.create_app(store_uri, DEFAULT_NAMESPACE, poll_seconds=3600)) as c:
        base = c.get("/recommendations/u1").json()["history_length"]
        old, new = event("old", timestamp=end - 10), event("new", timestamp=NOW)
        c.post("/events", json={"events": [old, new]})
        assert c.get("/recommendations/u1").json()["history_length"] == base + 1


def mean_rank(ranked: list[str], items: list[str]) -> float:
    return float(np.mean([ranked.index(n) if n in ranked else len(ranked) for n in items]))


def test_a_click_makes_the_items_neighbours_rise(store_uri: str, feedback_log_dir: Path) -> None:
    """A ranker that values similarity to the last item (sem_last_1): a click on X, the user's
    least recommended candidate, brings X's nearest items up in their very next response."""
    publish.run_publish(*make_run(store_uri, real_features=True, label_feature="sem_last_1"))
    bundle = load_bundle(store_uri, DEFAULT_NAMESPACE)
    with TestClient(api.create_app(store_uri, DEFAULT_NAMESPACE, poll_seconds=3600)) as c:
        for user in ["u0", "u1", "u2", "u3"]:
            before = [
                i["item_id"] for i in c.get(f"/recommendations/{user}", params={"k": 100}).json()["items"]
            ]
            x = bundle.item_row[before[-1]]
            seen = set(bundle.history(user).items.tolist()) | {x}
            order = np.argsort(-(bundle.embeddings @ bundle.embeddings[x]), kind="stable")
            neighbours = [bundle.item_ids[j] for j in order if j not in seen][:5]
            click = event(f"{user}-x", user=user, item=bundle.item_ids[x])
            assert c.post("/events", json={"events": [click]}).json()["accepted"] == 1
            after = [
                i["item_id"] for i in c.get(f"/recommendations/{user}", params={"k": 100}).json()["items"]
            ]
            assert bundle.item_ids[x] not in after
            rank_before, rank_after = mean_rank(before, neighbours), mean_rank(after, neighbours)
            assert rank_after < rank_before - 5, (user, rank_before, rank_after)
            assert len(set(neighbours) & set(after[:10])) > len(set(neighbours) & set(before[:10]))


def test_the_startup_heap_is_frozen_and_a_swap_settles_it_again(
    store_uri: str, toy_ranker_features: None, feedback_log_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What startup built (modules, app, bundle) is out of the collector's reach, so a full
    collection during serving does not walk it; a bundle swap collects and freezes again."""
    publish.run_publish(*make_run(store_uri))
    settled: list[int] = []
    settle = api.settle_heap
    monkeypatch.setattr(api, "settle_heap", lambda: (settle(), settled.append(gc.get_freeze_count())))
    with TestClient(api.create_app(store_uri, DEFAULT_NAMESPACE, poll_seconds=3600)) as c:
        assert len(settled) == 2 and gc.get_freeze_count() > 10_000  # the first load, then startup's end
        publish.run_publish(*make_run(store_uri, cutoff=datetime(2024, 2, 2, tzinfo=UTC), seed=1))
        assert c.app.state.holder.refresh()
        assert len(settled) == 3 and settled[-1] > 10_000
        assert c.post("/events", json={"events": [event(1)]}).json()["accepted"] == 1


def test_feedback_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {"LLMREC_REDIS_URL": "redis://127.0.0.1:6379/3", "LLMREC_FEEDBACK_RECENT_EVENTS": "7"}
    config = FeedbackConfig.from_env(env, log_dir="/tmp/x")
    assert (config.redis_url, config.recent_events, config.log_dir) == (
        "redis://127.0.0.1:6379/3",
        7,
        "/tmp/x",
    )
    assert FeedbackConfig.from_env({"LLMREC_REDIS_URL": ""}).redis_url is None
    with pytest.raises(Exception, match="give redis://host:port/db"):
        FeedbackConfig.from_env({"LLMREC_REDIS_URL": "http://x"})
    with pytest.raises(Exception, match="feedback_recent_events must be in"):
        FeedbackConfig(recent_events=0)
    assert os.environ["LLMREC_FEEDBACK_LOG_DIR"].endswith("feedback-log")  # tests never log into the cwd
