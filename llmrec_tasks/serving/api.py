"""HTTP recommendation service (FastAPI) over a namespace's ``current`` bundle.

- ``GET /recommendations/{user_id}?k=10&exclude_seen=true``: the user's published history plus
  their latest events from the real-time state (what ``POST /events`` recorded), so real-time
  personalisation needs no client-side history
- ``POST /recommendations`` ``{"user_id": ..., "events": [{"item_id": ..., "weight": 1, "timestamp": ...}],
  "k": 10, "exclude_seen": true}``: the request's events personalise it too
- ``POST /events`` ``{"events": [{"event_id", "user_id", "item_id", "type", "timestamp", "weight"?,
  "request_id"?}]}``: a batch of feedback, validated as a whole (one bad event: 422 naming it, and
  nothing is written), acknowledged once durable (fsync'ed in the write-ahead log), idempotent by
  event id (a replayed event is acknowledged as a duplicate and not stored again); 503 when the
  log or the real-time state fails (nothing acknowledged: retry)
- ``GET /healthz`` (503 until a bundle is loaded), ``GET /version`` (the version being served)
- ``GET /metrics``: Prometheus text (:mod:`llmrec_tasks.serving.metrics`), summed over workers

A new ``current`` is picked up without a restart (:class:`llmrec_tasks.serving.recommender.BundleHolder`).
Bad requests get a 4xx with ``{"error": "..."}``: k outside [1, 100], malformed ids, too many
events, bodies over 64 KiB. Every response body has a pydantic model below, so the OpenAPI schema
(``/openapi.json``) describes it field by field; the recommendation routes encode their answer
with msgspec straight from the recommender's dataclasses (the models only document it).

Every response carries ``X-Request-ID`` (the client's when it is short and safe, else a new one);
recommendations also carry it in the body, and ``X-Bundle-Version``: the version that answered,
the same as the body's ``version``. Each request is one JSON line on the ``llmrec.access`` logger.
``llmrec serve --workers N`` runs N uvicorn worker processes, each loading the bundle and
following ``current`` by itself.

Feedback (settings ``feedback_*``, :class:`~llmrec_tasks.core.config.FeedbackConfig`): accepted
events go to this process's write-ahead log first (:mod:`llmrec_tasks.serving.feedback_log`, the
durable copy), then to the real-time state (:mod:`llmrec_tasks.serving.realtime`: Redis, or the
embedded per-process state). Every recommendation response is logged as an impression (request id,
user, items in order, bundle version, arm) through the same log; ``llmrec flush-events`` moves
closed segments into the object store as Parquet (:mod:`llmrec_tasks.feedback`).
"""

from __future__ import annotations

import asyncio
import copy
import gc
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from pathlib import Path as FilePath
from typing import Annotated, Any, Literal

import msgspec
from fastapi import FastAPI, HTTPException, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import multiprocess
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from llmrec_tasks.core import constants as C
from llmrec_tasks.core import settings
from llmrec_tasks.core.config import FeedbackConfig
from llmrec_tasks.core.constants import DEFAULT_NAMESPACE
from llmrec_tasks.core.errors import ConfigError, FeedbackError
from llmrec_tasks.serving import metrics as service_metrics
from llmrec_tasks.serving.feedback_log import EVENTS_KIND, IMPRESSIONS_KIND, FeedbackLog, encode_record
from llmrec_tasks.serving.metrics import ServiceMetrics
from llmrec_tasks.serving.realtime import FeedbackEvent, RealtimeState, open_state
from llmrec_tasks.serving.recommender import BundleHolder, Event, Recommender, single_threaded_native_code

log = logging.getLogger(__name__)
access_log = logging.getLogger("llmrec.access")

MAX_K = 100
MAX_EVENTS = 200
MAX_BODY_BYTES = 64 * 1024
MAX_EVENT_BATCH = 1000  # events per POST /events
EVENTS_MAX_BODY_BYTES = 1024 * 1024
EVENTS_PATH = "/events"
MAX_CLOCK_SKEW_SECONDS = 86_400  # an event timestamp further in the future is refused
TIMESTAMP_RULE = (
    "unix seconds or ISO 8601 with a time zone, from 1970 up to a day ahead of the server's clock"
)
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$"
ID_RULE = "1-128 characters: letters, digits, '.', '_', ':', '@', '-', starting with a letter or digit"

REQUEST_ID_HEADER = "X-Request-ID"
BUNDLE_VERSION_HEADER = "X-Bundle-Version"
REQUEST_ID_RULE = "1-64 characters: letters, digits, '.', '_', ':', '-', starting with a letter or digit"
_REQUEST_ID = re.compile(rb"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")
_REQUEST_ID_KEY = b"x-request-id"
REQUEST_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$"
REQUEST_STATE = "llmrec.request"  # ASGI scope key of the RequestState

# What `llmrec serve` hands its worker processes (uvicorn imports the app factory in each).
STORE_ENV = "LLMREC_SERVING_STORE"
NAMESPACE_ENV = "LLMREC_SERVING_NAMESPACE"
POLL_ENV = "LLMREC_SERVING_POLL_SECONDS"
APP_FACTORY = f"{__name__}:app_from_env"

_json = msgspec.json.Encoder()

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class EventIn(BaseModel):
    """One recent interaction of the user, sent with the request."""

    model_config = ConfigDict(extra="forbid")
    item_id: str = Field(pattern=ID_PATTERN)
    weight: float = Field(1.0, ge=0, le=1e6, allow_inf_nan=False)
    timestamp: float | None = Field(None, ge=0, allow_inf_nan=False)


class RecommendRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user_id: str | None = Field(None, pattern=ID_PATTERN)
    events: list[EventIn] = Field(default_factory=list, max_length=MAX_EVENTS)
    k: int = Field(10, ge=1, le=MAX_K)
    exclude_seen: bool = True

    @model_validator(mode="after")
    def _someone(self) -> RecommendRequest:
        if self.user_id is None and not self.events:
            raise ValueError("give a user_id, recent events, or both")
        return self


class FeedbackEventIn(BaseModel):
    """One feedback event: the interaction contract's columns plus its id, type and request id."""

    model_config = ConfigDict(extra="forbid")
    event_id: str = Field(pattern=ID_PATTERN, description="unique per event: a retried batch is stored once")
    user_id: str = Field(pattern=ID_PATTERN)
    item_id: str = Field(pattern=ID_PATTERN)
    type: Literal[C.EVENT_TYPES] = Field(description="what happened")  # type: ignore[valid-type]
    timestamp: float = Field(description=TIMESTAMP_RULE)
    weight: float = Field(1.0, ge=0, le=1e6, allow_inf_nan=False)
    request_id: str | None = Field(
        None, pattern=REQUEST_ID_PATTERN, description="the recommendation response the event followed"
    )

    @field_validator("timestamp", mode="before")
    @classmethod
    def _unix(cls, value: Any) -> float:
        return unix_seconds(value)


def unix_seconds(value: Any) -> float:
    """An event timestamp as unix seconds: a number (or numeric text), or ISO 8601 text with a time
    zone; from 1970 up to MAX_CLOCK_SKEW_SECONDS ahead of this server's clock."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"must be {TIMESTAMP_RULE}")
    try:
        seconds = float(value)
    except ValueError:
        try:
            parsed = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
        except ValueError:
            raise ValueError(f"must be {TIMESTAMP_RULE}, got {str(value)[:40]!r}") from None
        if parsed.tzinfo is None:
            raise ValueError("an ISO 8601 timestamp needs a time zone (e.g. Z or +02:00)") from None
        seconds = parsed.timestamp()
    if not (math.isfinite(seconds) and 0 <= seconds <= time.time() + MAX_CLOCK_SKEW_SECONDS):
        raise ValueError(f"must be {TIMESTAMP_RULE}, got {value!r}")
    return seconds


class EventsIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    events: list[FeedbackEventIn] = Field(min_length=1, max_length=MAX_EVENT_BATCH)


class EventsAck(BaseModel):
    request_id: str
    accepted: int = Field(description="events stored (durable) by this request")
    duplicates: int = Field(description="events whose id was already stored (or repeated in the batch)")


class SignalOut(BaseModel):
    feature: str = Field(description="ranker feature name")
    contribution: float = Field(description="its share of the item's score (Saabas attribution)")


class ItemOut(BaseModel):
    item_id: str
    score: float = Field(description="ranker score; for popular fills, the item's interaction count")
    title: str | None = Field(description="the catalog's title, null when it has none")
    reason: str = Field(description="why, in words: phrases separated by '; '")
    signals: list[SignalOut] = Field(
        description="the largest feature contributions behind the reason, strongest first; empty for popular fills"
    )


class RecommendationsOut(BaseModel):
    user_id: str | None
    request_id: str = Field(description=f"the request's {REQUEST_ID_HEADER} (the client's, or generated)")
    strategy: Literal["personalized", "popular"]
    version: str = Field(description="the bundle version that answered")
    arm: str = Field(
        description=f"the experiment arm that answered ({C.CURRENT_ARM!r}: the current bundle, "
        f"{C.CHALLENGER_ARM!r}: the running experiment's challenger)"
    )
    history_length: int = Field(
        description="interactions used: published history, the user's real-time events and the request's"
    )
    ignored_item_ids: list[str] = Field(description="event item ids the bundle does not know")
    items: list[ItemOut]


class HealthOut(BaseModel):
    status: Literal["ok", "degraded", "unavailable"]
    version: str | None = Field(None, description="the version being served")
    error: str | None = Field(description="the last load error (degraded: an older bundle keeps serving)")


class ExperimentOut(BaseModel):
    name: str
    challenger: str = Field(description="the challenger bundle version")
    share: float = Field(description="fraction of users on the challenger")
    salt: str = Field(description="hash salt of the user assignment")
    started_at: str = Field(description="ISO time the experiment started")


class VersionOut(BaseModel):
    namespace: str
    version: str = Field(description="the version being served")
    current: str | None = Field(description="the version current.json names (differs while a load fails)")
    loaded_at: float = Field(description="unix seconds")
    logical_date: str | None
    dataset_fingerprint: str | None
    code_version: str | None
    git_commit: str | None
    metrics: dict[str, dict[str, float]] = Field(description="per model, e.g. ranker: {ndcg@10, recall@10}")
    last_error: str | None
    experiment: ExperimentOut | None = Field(
        default=None, description="the running A/B experiment served, if any"
    )


class ErrorOut(BaseModel):
    error: str


UNAVAILABLE: dict[int | str, dict[str, Any]] = {
    503: {"model": ErrorOut, "description": "no bundle loaded yet"}
}
INVALID: dict[int | str, dict[str, Any]] = {
    422: {"model": ErrorOut, "description": "invalid parameters or body"}
}
TOO_LARGE: dict[int | str, dict[str, Any]] = {
    413: {"model": ErrorOut, "description": "request body over 64 KiB (1 MiB for /events)"}
}
NOT_DURABLE: dict[int | str, dict[str, Any]] = {
    503: {
        "model": ErrorOut,
        "description": "the log or the real-time state failed: nothing acknowledged, retry",
    }
}


class BodyLimit:
    """Refuse request bodies over ``limit`` bytes (``paths`` name other limits) with 413, declared
    (Content-Length) or streamed.

    The body is read here first (at most the limit is buffered), then replayed to the app.
    """

    def __init__(self, app: ASGIApp, limit: int, paths: dict[str, int] | None = None) -> None:
        self.app = app
        self.limit = limit
        self.paths = paths or {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.paths.get(scope["path"], self.limit)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            await self._too_large(send, limit)
            return
        messages: list[Message] = []
        size = 0
        while True:
            message = await receive()
            messages.append(message)
            size += len(message.get("body", b""))
            if size > limit:
                await self._too_large(send, limit)
                return
            if message["type"] != "http.request" or not message.get("more_body", False):
                break

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, send: Send, limit: int) -> None:
        await _send_json(send, 413, json.dumps({"error": f"request body exceeds {limit} bytes"}).encode())


def request_id(header: bytes | None) -> str:
    """The client's ``X-Request-ID`` when it follows REQUEST_ID_RULE (safe in logs and headers),
    else a new uuid4 hex."""
    if header is not None and _REQUEST_ID.fullmatch(header):
        return header.decode("ascii")
    return uuid.uuid4().hex


@dataclass(slots=True)
class RequestState:
    """What one request's handler tells the access log (kept in the ASGI scope)."""

    request_id: str
    bundle_version: str | None = None
    user_id: str | None = None


class RequestObserver:
    """Per HTTP request: the request id (read, echoed as ``X-Request-ID``), the request metrics and
    one JSON line on the ``llmrec.access`` logger. An unhandled exception answers 500 here, with the
    request id, before it propagates (uvicorn logs it)."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        header = next((value for key, value in scope["headers"] if key == _REQUEST_ID_KEY), None)
        state = RequestState(request_id(header))
        scope[REQUEST_STATE] = state
        echo = (_REQUEST_ID_KEY, state.request_id.encode("ascii"))
        status: int | None = None

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), echo]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            if status is None:
                body = json.dumps({"error": "internal error", "request_id": state.request_id}).encode()
                await _send_json(send_with_id, 500, body)
            status = 500
            raise
        finally:
            seconds = time.perf_counter() - started
            route = getattr(scope.get("route"), "path", service_metrics.UNMATCHED_ROUTE)
            self.metrics.observe_request(route, scope["method"], status or 500, seconds)
            if access_log.isEnabledFor(logging.INFO):
                access_log.info(access_line(scope, state, status or 500, seconds))


def access_line(scope: Scope, state: RequestState, status: int, seconds: float) -> str:
    """One request as a JSON object on one line (``user_id`` only when the request named one)."""
    record: dict[str, Any] = {
        "time": round(time.time(), 3),
        "method": scope["method"],
        "path": scope["path"],
        "status": status,
        "duration_ms": round(seconds * 1000, 3),
        "request_id": state.request_id,
        "bundle_version": state.bundle_version,
    }
    if state.user_id is not None:
        record["user_id"] = state.user_id
    return _json.encode(record).decode()


async def _send_json(send: Send, status: int, body: bytes) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _describe(errors: list[Any]) -> str:
    parts = []
    for err in errors:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path"))
        msg = str(err.get("msg", "invalid"))
        if err.get("type") == "string_pattern_mismatch":
            msg = f"must be {ID_RULE}"
        elif err.get("type") == "value_error":
            msg = msg.removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


def settle_heap() -> None:
    """Collect once, then freeze what survives (the imported modules, the app, the loaded bundles)
    out of the garbage collector's reach.

    Why: a full (generation 2) collection walks every tracked object, and a worker holds ~110k of
    them before serving anything: each full collection then held the GIL for 50-250 ms, every few
    seconds under ingestion load, stalling every request of that worker (the tail of ``POST
    /events``). Frozen objects are never walked, so a full collection only visits what serving
    allocated since. Called at startup and after each bundle swap: the previous freeze is undone
    first, so the collection also frees a swapped-out bundle's reference cycles (one pause per
    swap instead of one every few seconds).
    """
    gc.unfreeze()
    gc.collect()
    gc.freeze()


def create_app(
    store_uri: str,
    namespace: str = DEFAULT_NAMESPACE,
    *,
    poll_seconds: float = 5.0,
    feedback: FeedbackConfig | None = None,
) -> FastAPI:
    """The service for one store + namespace; loads ``current`` at startup and follows it.

    ``feedback``: the log folder and real-time state (default: the ``LLMREC_*`` environment)."""
    metrics = ServiceMetrics()
    feedback = feedback or FeedbackConfig.from_env()

    def swapped(current: Recommender) -> None:
        metrics.serving(current.bundle.version)
        settle_heap()

    holder = BundleHolder(store_uri, namespace, poll_seconds=poll_seconds, on_swap=swapped)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # One thread per worker computes recommendations, one request after another: the work is
        # CPU-bound, so more threads only contend for the GIL; the event loop stays free for I/O.
        app.state.compute = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="llmrec-recommend", initializer=single_threaded_native_code
        )
        # Opened here, in the worker process: each process writes its own log segments.
        app.state.feedback_log = FeedbackLog(
            FilePath(feedback.log_dir),
            segment_bytes=feedback.segment_bytes,
            segment_seconds=feedback.segment_seconds,
        )
        app.state.realtime = open_state(feedback)
        holder.start()
        settle_heap()  # last: what startup built is frozen too
        try:
            yield
        finally:
            holder.stop()
            app.state.compute.shutdown(wait=True)
            app.state.feedback_log.close()
            await app.state.realtime.close()
            if (folder := service_metrics.multiprocess_dir()) is not None:
                multiprocess.mark_process_dead(os.getpid(), path=str(folder))

    app = FastAPI(title="llmrec", lifespan=lifespan)
    app.state.holder = holder
    app.state.metrics = metrics
    app.add_middleware(BodyLimit, limit=MAX_BODY_BYTES, paths={EVENTS_PATH: EVENTS_MAX_BODY_BYTES})
    app.add_middleware(RequestObserver, metrics=metrics)  # outermost: sees every response

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(status_code=422, content={"error": _describe(list(exc.errors()))})

    @app.exception_handler(HTTPException)
    async def _http(_: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse(status_code=exc.status_code, content={"error": exc.detail})

    def unavailable() -> HTTPException:
        return HTTPException(
            503, f"no bundle loaded for namespace {namespace!r}: {holder.last_error or 'none promoted'}"
        )

    def recommender() -> Recommender:
        current = holder.recommender
        if current is None:
            raise unavailable()
        return current

    def arm_for(user_id: str | None) -> tuple[Recommender, str]:
        """The recommender and arm serving this user (the experiment's challenger or current)."""
        chosen, arm = holder.for_user(user_id)
        if chosen is None:
            raise unavailable()
        return chosen, arm

    @app.get("/healthz", response_model=HealthOut, responses={503: {"model": HealthOut}})
    def healthz() -> HealthOut | JSONResponse:
        current = holder.recommender
        if current is None:
            down = HealthOut(status="unavailable", error=holder.last_error)
            return JSONResponse(status_code=503, content=down.model_dump())
        status = "degraded" if holder.last_error else "ok"
        return HealthOut(status=status, version=current.bundle.version, error=holder.last_error)

    @app.get("/version", responses=UNAVAILABLE)
    def version() -> VersionOut:
        bundle = recommender().bundle
        lineage = bundle.manifest.get("lineage", {})
        return VersionOut(
            namespace=bundle.namespace,
            version=bundle.version,
            current=holder.pointer_version,
            loaded_at=bundle.loaded_at,
            logical_date=lineage.get("logical_date"),
            dataset_fingerprint=lineage.get("dataset_fingerprint"),
            code_version=lineage.get("code_version"),
            git_commit=lineage.get("git_commit"),
            metrics=bundle.manifest.get("metrics", {}),
            last_error=holder.last_error,
            experiment=None if holder.challenger is None else ExperimentOut(**holder.challenger.experiment),
        )

    @app.get("/metrics", include_in_schema=False)
    def metrics_text() -> Response:
        return Response(metrics.render(), media_type=service_metrics.CONTENT_TYPE)

    async def realtime_events(user_id: str | None, current: Recommender) -> list[Event]:
        """The user's latest recorded events not yet in the bundle's published history. A state
        failure degrades the answer to the published history (logged), it does not fail it."""
        if user_id is None:
            return []
        realtime: RealtimeState = app.state.realtime
        try:
            latest = await realtime.recent(user_id)
        except FeedbackError as exc:
            log.warning("recommending for %s without real-time events: %s", user_id, exc)
            return []
        end = current.bundle.history_end
        return [e for e in latest if e.timestamp is not None and e.timestamp > end]

    async def recommend(
        request: Request, user_id: str | None, recent: list[Event] | None = None, **query: Any
    ) -> Response:
        """Recommend on the compute thread, answer with msgspec-encoded JSON (the recommender's
        dataclasses as they are: several times faster than validating through the pydantic model),
        and log the impression."""
        current, arm = arm_for(user_id)
        events = [*await realtime_events(user_id, current), *(recent or [])]
        timings: dict[str, float] = {}
        result = await asyncio.get_running_loop().run_in_executor(
            request.app.state.compute,
            partial(current.recommend, user_id=user_id, recent=events, timings=timings, **query),
        )
        state: RequestState = request.scope[REQUEST_STATE]
        state.user_id, state.bundle_version = user_id, result.version
        started = time.perf_counter()
        body = _json.encode({"user_id": user_id, "request_id": state.request_id, "arm": arm, **vars(result)})
        timings["encode"] = time.perf_counter() - started
        metrics.observe_stages(timings)
        shown = [item.item_id for item in result.items]
        impression = [state.request_id, user_id, time.time(), result.version, arm, shown]
        app.state.feedback_log.append_nowait(encode_record(IMPRESSIONS_KIND, [impression]))
        return Response(body, media_type="application/json", headers={BUNDLE_VERSION_HEADER: result.version})

    @app.get(
        "/recommendations/{user_id}", response_model=RecommendationsOut, responses={**INVALID, **UNAVAILABLE}
    )
    async def get_recommendations(
        request: Request,
        user_id: Annotated[str, Path(pattern=ID_PATTERN)],
        k: Annotated[int, Query(ge=1, le=MAX_K)] = 10,
        exclude_seen: bool = True,
    ) -> Response:
        return await recommend(request, user_id, k=k, exclude_seen=exclude_seen)

    @app.post(
        "/recommendations",
        response_model=RecommendationsOut,
        responses={**INVALID, **TOO_LARGE, **UNAVAILABLE},
    )
    async def post_recommendations(request: Request, body: RecommendRequest) -> Response:
        events = [Event(e.item_id, e.weight, e.timestamp) for e in body.events]
        return await recommend(request, body.user_id, recent=events, k=body.k, exclude_seen=body.exclude_seen)

    @app.post(EVENTS_PATH, responses={**INVALID, **TOO_LARGE, **NOT_DURABLE})
    async def post_events(request: Request, body: EventsIn) -> EventsAck:
        """Store a batch of feedback: deduplicated by event id, logged durably, then recorded in the
        real-time state. A failure after the log write answers 503 too: the retry is then stored
        again in the log, and the flush and the daily ingestion drop the repeat by event id."""
        received = time.time()
        batch: dict[str, FeedbackEvent] = {}
        for e in body.events:  # a repeated id within the batch: the first one counts
            batch.setdefault(
                e.event_id,
                FeedbackEvent(
                    e.event_id, e.user_id, e.item_id, float(e.timestamp), e.weight, e.type, e.request_id
                ),
            )
        candidates = list(batch.values())
        realtime: RealtimeState = app.state.realtime
        try:
            known = await realtime.known(list(batch))
            fresh = [e for e, seen in zip(candidates, known, strict=True) if not seen]
            if fresh:
                line = encode_record(EVENTS_KIND, [e.row(received) for e in fresh])
                await asyncio.wrap_future(app.state.feedback_log.append(line))
                await realtime.record(fresh)
        except FeedbackError as exc:
            raise HTTPException(503, str(exc)) from exc
        state: RequestState = request.scope[REQUEST_STATE]
        return EventsAck(
            request_id=state.request_id, accepted=len(fresh), duplicates=len(body.events) - len(fresh)
        )

    return app


def app_from_env() -> FastAPI:
    """The app of one worker process, configured by the environment ``serve`` sets (uvicorn factory)."""
    store_uri = os.environ.get(STORE_ENV)
    if not store_uri:
        raise ConfigError(f"${STORE_ENV} is not set: start the service with `llmrec serve --store URI`")
    namespace = os.environ.get(NAMESPACE_ENV, DEFAULT_NAMESPACE)
    return create_app(store_uri, namespace, poll_seconds=float(os.environ.get(POLL_ENV, "5")))


def log_config() -> dict[str, Any]:
    """uvicorn's logging setup (applied in every worker) plus the package's loggers: ``llmrec.access``
    as bare JSON lines on stdout, the rest as timestamped lines on stderr."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["formatters"]["llmrec"] = {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}
    config["formatters"]["json_line"] = {"format": "%(message)s"}
    stream = {"class": "logging.StreamHandler"}
    config["handlers"]["llmrec"] = {**stream, "formatter": "llmrec", "stream": "ext://sys.stderr"}
    config["handlers"]["llmrec_access"] = {**stream, "formatter": "json_line", "stream": "ext://sys.stdout"}
    config["loggers"]["llmrec_tasks"] = {"handlers": ["llmrec"], "level": "INFO", "propagate": False}
    config["loggers"][access_log.name] = {"handlers": ["llmrec_access"], "level": "INFO", "propagate": False}
    return config


@contextmanager
def metrics_dir(workers: int) -> Iterator[FilePath | None]:
    """The prometheus_client multiprocess directory, emptied for this start: ``$PROMETHEUS_MULTIPROC_DIR``
    when set, else (several workers) a temporary one removed afterwards; None for one plain process."""
    given = service_metrics.multiprocess_dir()
    if given is not None:
        service_metrics.reset_multiprocess_dir(given)
        yield given
        return
    if workers == 1:
        yield None
        return
    folder = FilePath(tempfile.mkdtemp(prefix="llmrec-metrics-"))
    os.environ[service_metrics.MULTIPROC_ENV] = str(folder)  # before the workers import prometheus_client
    try:
        yield folder
    finally:
        del os.environ[service_metrics.MULTIPROC_ENV]
        shutil.rmtree(folder, ignore_errors=True)


def serve(
    store_uri: str,
    namespace: str = DEFAULT_NAMESPACE,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    workers: int = 1,
    poll_seconds: float = 5.0,
    redis_url: str | None = None,
    feedback_dir: str | None = None,
) -> None:
    """Run the service with uvicorn (blocks) in ``workers`` processes; ``llmrec serve`` calls this.

    ``redis_url`` / ``feedback_dir`` override ``$LLMREC_REDIS_URL`` / ``$LLMREC_FEEDBACK_LOG_DIR``."""
    import uvicorn

    if workers < 1:
        raise ConfigError(f"workers must be at least 1, got {workers}")
    feedback = FeedbackConfig.from_env(redis_url=redis_url, log_dir=feedback_dir)  # checked before forking
    if feedback.redis_url is None and workers > 1:
        log.warning(
            "no Redis URL: each of the %d workers keeps its own real-time state, so a user's events "
            "reach only the worker that took them; set --redis-url or $%s",
            workers, settings.REDIS_URL_ENV,
        )  # fmt: skip
    os.environ.update({STORE_ENV: store_uri, NAMESPACE_ENV: namespace, POLL_ENV: str(poll_seconds)})
    os.environ[settings.feedback_env("feedback_log_dir")] = str(FilePath(feedback.log_dir).resolve())
    if feedback.redis_url is not None:
        os.environ[settings.REDIS_URL_ENV] = feedback.redis_url
    log.info(
        "serving namespace %r of %s on http://%s:%d (%d worker%s)",
        namespace, store_uri, host, port, workers, "s" if workers > 1 else "",
    )  # fmt: skip
    with metrics_dir(workers):
        uvicorn.run(
            APP_FACTORY,
            factory=True,
            host=host,
            port=port,
            workers=workers,
            log_config=log_config(),
            access_log=False,  # llmrec.access logs every request as JSON instead
        )
