"""HTTP recommendation service (FastAPI) over a namespace's ``current`` bundle.

- ``GET /recommendations/{user_id}?k=10&exclude_seen=true``
- ``POST /recommendations`` ``{"user_id": ..., "events": [{"item_id": ..., "weight": 1, "timestamp": ...}],
  "k": 10, "exclude_seen": true}``: recent events personalise this request
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
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
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
from functools import partial
from pathlib import Path as FilePath
from typing import Annotated, Any, Literal

import msgspec
from fastapi import FastAPI, HTTPException, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import multiprocess
from pydantic import BaseModel, ConfigDict, Field, model_validator

from llmrec_tasks.core.constants import DEFAULT_NAMESPACE
from llmrec_tasks.core.errors import ConfigError
from llmrec_tasks.serving import metrics as service_metrics
from llmrec_tasks.serving.metrics import ServiceMetrics
from llmrec_tasks.serving.recommender import BundleHolder, Event, Recommender, single_threaded_native_code

log = logging.getLogger(__name__)
access_log = logging.getLogger("llmrec.access")

MAX_K = 100
MAX_EVENTS = 200
MAX_BODY_BYTES = 64 * 1024
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$"
ID_RULE = "1-128 characters: letters, digits, '.', '_', ':', '@', '-', starting with a letter or digit"

REQUEST_ID_HEADER = "X-Request-ID"
BUNDLE_VERSION_HEADER = "X-Bundle-Version"
REQUEST_ID_RULE = "1-64 characters: letters, digits, '.', '_', ':', '-', starting with a letter or digit"
_REQUEST_ID = re.compile(rb"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")
_REQUEST_ID_KEY = b"x-request-id"
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
    history_length: int = Field(description="interactions used: published history plus the request's events")
    ignored_item_ids: list[str] = Field(description="event item ids the bundle does not know")
    items: list[ItemOut]


class HealthOut(BaseModel):
    status: Literal["ok", "degraded", "unavailable"]
    version: str | None = Field(None, description="the version being served")
    error: str | None = Field(description="the last load error (degraded: an older bundle keeps serving)")


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


class ErrorOut(BaseModel):
    error: str


UNAVAILABLE: dict[int | str, dict[str, Any]] = {
    503: {"model": ErrorOut, "description": "no bundle loaded yet"}
}
INVALID: dict[int | str, dict[str, Any]] = {
    422: {"model": ErrorOut, "description": "invalid parameters or body"}
}
TOO_LARGE: dict[int | str, dict[str, Any]] = {
    413: {"model": ErrorOut, "description": "request body over 64 KiB"}
}


class BodyLimit:
    """Refuse request bodies over ``limit`` bytes with 413, declared (Content-Length) or streamed.

    The body is read here first (at most ``limit`` bytes are buffered), then replayed to the app.
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            await self._too_large(send)
            return
        messages: list[Message] = []
        size = 0
        while True:
            message = await receive()
            messages.append(message)
            size += len(message.get("body", b""))
            if size > self.limit:
                await self._too_large(send)
                return
            if message["type"] != "http.request" or not message.get("more_body", False):
                break

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, send: Send) -> None:
        await _send_json(
            send, 413, json.dumps({"error": f"request body exceeds {self.limit} bytes"}).encode()
        )


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
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


def create_app(
    store_uri: str,
    namespace: str = DEFAULT_NAMESPACE,
    *,
    poll_seconds: float = 5.0,
) -> FastAPI:
    """The service for one store + namespace; loads ``current`` at startup and follows it."""
    metrics = ServiceMetrics()
    holder = BundleHolder(
        store_uri, namespace, poll_seconds=poll_seconds, on_swap=lambda r: metrics.serving(r.bundle.version)
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # One thread per worker computes recommendations, one request after another: the work is
        # CPU-bound, so more threads only contend for the GIL; the event loop stays free for I/O.
        app.state.compute = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="llmrec-recommend", initializer=single_threaded_native_code
        )
        holder.start()
        try:
            yield
        finally:
            holder.stop()
            app.state.compute.shutdown(wait=True)
            if (folder := service_metrics.multiprocess_dir()) is not None:
                multiprocess.mark_process_dead(os.getpid(), path=str(folder))

    app = FastAPI(title="llmrec", lifespan=lifespan)
    app.state.holder = holder
    app.state.metrics = metrics
    app.add_middleware(BodyLimit, limit=MAX_BODY_BYTES)
    app.add_middleware(RequestObserver, metrics=metrics)  # outermost: sees every response

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(status_code=422, content={"error": _describe(list(exc.errors()))})

    @app.exception_handler(HTTPException)
    async def _http(_: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse(status_code=exc.status_code, content={"error": exc.detail})

    def recommender() -> Recommender:
        current = holder.recommender
        if current is None:
            raise HTTPException(
                503, f"no bundle loaded for namespace {namespace!r}: {holder.last_error or 'none promoted'}"
            )
        return current

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
        )

    @app.get("/metrics", include_in_schema=False)
    def metrics_text() -> Response:
        return Response(metrics.render(), media_type=service_metrics.CONTENT_TYPE)

    async def recommend(request: Request, user_id: str | None, **query: Any) -> Response:
        """Recommend on the compute thread, then answer with msgspec-encoded JSON (the recommender's
        dataclasses as they are: several times faster than validating through the pydantic model)."""
        current = recommender()
        timings: dict[str, float] = {}
        result = await asyncio.get_running_loop().run_in_executor(
            request.app.state.compute, partial(current.recommend, user_id=user_id, timings=timings, **query)
        )
        state: RequestState = request.scope[REQUEST_STATE]
        state.user_id, state.bundle_version = user_id, result.version
        started = time.perf_counter()
        body = _json.encode({"user_id": user_id, "request_id": state.request_id, **vars(result)})
        timings["encode"] = time.perf_counter() - started
        metrics.observe_stages(timings)
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
) -> None:
    """Run the service with uvicorn (blocks) in ``workers`` processes; ``llmrec serve`` calls this."""
    import uvicorn

    if workers < 1:
        raise ConfigError(f"workers must be at least 1, got {workers}")
    os.environ.update({STORE_ENV: store_uri, NAMESPACE_ENV: namespace, POLL_ENV: str(poll_seconds)})
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
