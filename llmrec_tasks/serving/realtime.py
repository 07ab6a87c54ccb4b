"""Real-time feedback state: each user's latest events (read by every recommendation) and the
event-id dedup keys (a replayed batch is acknowledged, not stored twice).

Two implementations of :class:`RealtimeState`: :class:`RedisState` (``LLMREC_REDIS_URL`` /
``serve --redis-url``), shared by every worker and replica, and :class:`MemoryState`, the embedded
default when no URL is given: one per worker process, gone with it. Neither is the durable copy:
that is the write-ahead log (:mod:`llmrec_tasks.serving.feedback_log`), written before this state.

Redis layout (``<prefix>`` = ``feedback_key_prefix``): ``<prefix>:eid:<event id>`` a dedup key
with the dedup window as TTL; ``<prefix>:recent:<user id>`` a list of the user's latest events
(JSON ``[event_id, item_id, weight, timestamp]``, oldest first, trimmed to ``recent_events``).
A batch is recorded by one Lua script (one command, atomic): a pipeline of two commands per
event cost redis-py ~0.17 ms of CPU per event, the script a fraction of it (benchmarks/bench_events.py).
A script retried after a dropped connection may push a batch twice: reads drop repeats by
event id. Connection errors are retried with backoff; what still fails is a FeedbackError (503).
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

import msgspec

from llmrec_tasks.core.config import FeedbackConfig
from llmrec_tasks.core.errors import FeedbackError
from llmrec_tasks.serving.recommender import Event

REDIS_TIMEOUT_SECONDS = 2.0
REDIS_RETRIES = 5

# KEYS: n dedup keys, then the n events' user keys; ARGV: n, ttl seconds, events kept per user,
# then the n list values.
RECORD_SCRIPT = """
local n, ttl, keep = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
for i = 1, n do
  redis.call('SET', KEYS[i], '1', 'EX', ttl)
  redis.call('RPUSH', KEYS[n + i], ARGV[3 + i])
end
local trimmed = {}
for i = n + 1, 2 * n do
  if not trimmed[KEYS[i]] then
    trimmed[KEYS[i]] = true
    redis.call('LTRIM', KEYS[i], -keep, -1)
    redis.call('EXPIRE', KEYS[i], ttl)
  end
end
return n
"""

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(tuple[str, str, float, float])


@dataclass(frozen=True, slots=True)
class FeedbackEvent:
    """One event as ``POST /events`` accepted it (the interaction contract's columns and more)."""

    event_id: str
    user_id: str
    item_id: str
    timestamp: float  # unix seconds
    weight: float
    event_type: str
    request_id: str | None  # the recommendation response it followed, when the client says

    def row(self, received_at: float) -> list[Any]:
        """Its log row (order of ``constants.EVENT_COLUMNS``)."""
        return [
            self.event_id,
            self.user_id,
            self.item_id,
            self.timestamp,
            self.weight,
            self.event_type,
            self.request_id,
            received_at,
        ]


class RealtimeState(Protocol):
    """What the service reads and writes per request; every method may raise FeedbackError."""

    async def known(self, event_ids: Sequence[str]) -> list[bool]:
        """Per id, whether an event with it was already recorded (within the dedup window)."""
        ...

    async def record(self, events: Sequence[FeedbackEvent]) -> None:
        """Remember the events' ids and append them to their users' latest events."""
        ...

    async def recent(self, user_id: str) -> list[Event]:
        """The user's latest events, oldest first."""
        ...

    async def close(self) -> None: ...


class MemoryState:
    """The embedded state: dicts in this process (the default when no Redis URL is set)."""

    def __init__(self, recent_events: int, dedup_seconds: float) -> None:
        self.recent_events = recent_events
        self.dedup_seconds = dedup_seconds
        self._users: dict[str, deque[tuple[str, Event]]] = {}
        self._seen: OrderedDict[str, float] = OrderedDict()  # event id -> expiry, oldest first

    async def known(self, event_ids: Sequence[str]) -> list[bool]:
        now = time.monotonic()
        return [self._seen.get(e, 0.0) > now for e in event_ids]

    async def record(self, events: Sequence[FeedbackEvent]) -> None:
        now = time.monotonic()
        while self._seen and next(iter(self._seen.values())) <= now:
            self._seen.popitem(last=False)
        for e in events:
            self._seen[e.event_id] = now + self.dedup_seconds
            self._seen.move_to_end(e.event_id)
            latest = self._users.setdefault(e.user_id, deque(maxlen=self.recent_events))
            latest.append((e.event_id, Event(e.item_id, e.weight, e.timestamp)))

    async def recent(self, user_id: str) -> list[Event]:
        return [event for _, event in self._users.get(user_id, ())]

    async def close(self) -> None:
        self._users.clear()
        self._seen.clear()


class RedisState:
    """The state in Redis, shared by every worker process and replica."""

    def __init__(self, url: str, prefix: str, recent_events: int, dedup_seconds: float) -> None:
        import redis.asyncio
        from redis.backoff import ExponentialBackoff
        from redis.exceptions import ConnectionError, TimeoutError
        from redis.retry import Retry

        self.where = _redacted(url)
        self.prefix = prefix
        self.recent_events = recent_events
        self.dedup_seconds = max(1, int(dedup_seconds))
        self.client = redis.asyncio.Redis.from_url(
            url,
            retry=Retry(ExponentialBackoff(cap=0.5, base=0.01), REDIS_RETRIES),
            retry_on_error=[ConnectionError, TimeoutError],
            socket_timeout=REDIS_TIMEOUT_SECONDS,
            socket_connect_timeout=REDIS_TIMEOUT_SECONDS,
            client_name=self.client_name(prefix),
        )
        self._record = self.client.register_script(RECORD_SCRIPT)

    @staticmethod
    def client_name(prefix: str) -> str:
        """The connections' CLIENT SETNAME: operators (and tests) find the service's in CLIENT LIST."""
        return f"{prefix}-serving"

    def event_key(self, event_id: str) -> str:
        return f"{self.prefix}:eid:{event_id}"

    def user_key(self, user_id: str) -> str:
        return f"{self.prefix}:recent:{user_id}"

    def _unavailable(self, exc: Exception) -> FeedbackError:
        return FeedbackError(
            f"the real-time state (Redis at {self.where}) failed: {exc}; nothing was acknowledged, "
            "retry (event ids make a retry safe), and check that Redis is up"
        )

    async def known(self, event_ids: Sequence[str]) -> list[bool]:
        from redis.exceptions import RedisError

        try:
            values = await self.client.mget([self.event_key(e) for e in event_ids])
        except RedisError as exc:
            raise self._unavailable(exc) from exc
        return [v is not None for v in values]

    async def record(self, events: Sequence[FeedbackEvent]) -> None:
        from redis.exceptions import RedisError

        keys = [self.event_key(e.event_id) for e in events] + [self.user_key(e.user_id) for e in events]
        values = [_encoder.encode((e.event_id, e.item_id, e.weight, e.timestamp)) for e in events]
        try:
            await self._record(keys=keys, args=[len(events), self.dedup_seconds, self.recent_events, *values])
        except RedisError as exc:
            raise self._unavailable(exc) from exc

    async def recent(self, user_id: str) -> list[Event]:
        from redis.exceptions import RedisError

        try:
            values = await self.client.lrange(self.user_key(user_id), 0, -1)
        except RedisError as exc:
            raise self._unavailable(exc) from exc
        out, seen = [], set()
        for value in values:
            event_id, item_id, weight, timestamp = _decoder.decode(value)
            if event_id not in seen:
                seen.add(event_id)
                out.append(Event(item_id, weight, timestamp))
        return out

    async def close(self) -> None:
        await self.client.aclose()


def _redacted(url: str) -> str:
    """The URL without its credentials (it goes into error messages and logs)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    return f"{parts.scheme}://{host}{f':{parts.port}' if parts.port else ''}{parts.path}"


def open_state(config: FeedbackConfig) -> RealtimeState:
    """Redis when the config names a URL, else the embedded in-process state."""
    dedup_seconds = config.dedup_hours * 3600
    if config.redis_url:
        return RedisState(config.redis_url, config.key_prefix, config.recent_events, dedup_seconds)
    return MemoryState(config.recent_events, dedup_seconds)
