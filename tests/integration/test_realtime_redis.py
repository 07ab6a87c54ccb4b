"""RedisState on the real Redis at 127.0.0.1:6379 (a unique key prefix, removed afterwards;
skipped when Redis is not reachable): dedup keys, each user's latest events, repeats dropped."""

from __future__ import annotations

import asyncio

import pytest

from llmrec_tasks.serving.realtime import FeedbackEvent, RedisState
from tests.integration.conftest import REDIS_URL

pytestmark = pytest.mark.integration


def test_redis_state_records_reads_and_deduplicates(redis_prefix: str) -> None:
    import redis

    prefix = redis_prefix
    admin = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1)

    async def scenario() -> None:
        state = RedisState(REDIS_URL, prefix, recent_events=3, dedup_seconds=600)
        events = [
            FeedbackEvent(f"e{i}", "u1" if i % 2 else "u2", f"i{i}", 1e9 + i, 1.0, "view", None)
            for i in range(8)
        ]
        try:
            assert await state.known(["e1", "e2"]) == [False, False]
            await state.record(events[:6])
            await state.record(events[4:6])  # a retried script: e4 and e5 pushed again
            await state.record(events[6:])
            assert await state.known(["e1", "e7", "zz"]) == [True, True, False]
            assert [e.item_id for e in await state.recent("u1")] == ["i5", "i7"]  # repeats dropped
            assert [e.item_id for e in await state.recent("u2")] == ["i4", "i6"]
            assert await state.recent("nobody") == []
            assert admin.llen(state.user_key("u1")) == 3  # trimmed to recent_events
            assert 0 < admin.ttl(state.event_key("e1")) <= 600
        finally:
            await state.close()

    try:
        asyncio.run(scenario())
    finally:
        admin.close()
