"""HTTP recommendation service (FastAPI) over a namespace's ``current`` bundle.

- ``GET /recommendations/{user_id}?k=10&exclude_seen=true``
- ``POST /recommendations`` ``{"user_id": ..., "events": [{"item_id": ..., "weight": 1, "timestamp": ...}],
  "k": 10, "exclude_seen": true}``: recent events personalise this request
- ``GET /healthz`` (503 until a bundle is loaded), ``GET /version`` (the version being served)

A new ``current`` is picked up without a restart (:class:`llmrec_tasks.serving.recommender.BundleHolder`).
Bad requests get a 4xx with ``{"error": "..."}``: k outside [1, 100], malformed ids, too many
events, bodies over 64 KiB. Every response body has a pydantic model below, so the OpenAPI schema
(``/openapi.json``) describes it field by field.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal

from fastapi import FastAPI, HTTPException, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator

from llmrec_tasks.core.constants import DEFAULT_NAMESPACE
from llmrec_tasks.serving.recommender import BundleHolder, Event, Recommender

log = logging.getLogger(__name__)

MAX_K = 100
MAX_EVENTS = 200
MAX_BODY_BYTES = 64 * 1024
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$"
ID_RULE = "1-128 characters: letters, digits, '.', '_', ':', '@', '-', starting with a letter or digit"

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
        body = json.dumps({"error": f"request body exceeds {self.limit} bytes"}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
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
    holder = BundleHolder(store_uri, namespace, poll_seconds=poll_seconds)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        holder.start()
        try:
            yield
        finally:
            holder.stop()

    app = FastAPI(title="llmrec", lifespan=lifespan)
    app.state.holder = holder
    app.add_middleware(BodyLimit, limit=MAX_BODY_BYTES)

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

    # The recommendation routes return plain dicts: FastAPI validates and serialises them against
    # the declared model in one pydantic-core pass (about 0.2 ms for k=10, a fifth of what
    # jsonable_encoder took on the undeclared dict), with no model objects built per item.
    @app.get(
        "/recommendations/{user_id}", response_model=RecommendationsOut, responses={**INVALID, **UNAVAILABLE}
    )
    def get_recommendations(
        user_id: Annotated[str, Path(pattern=ID_PATTERN)],
        k: Annotated[int, Query(ge=1, le=MAX_K)] = 10,
        exclude_seen: bool = True,
    ) -> dict[str, Any]:
        result = recommender().recommend(user_id=user_id, k=k, exclude_seen=exclude_seen)
        return {"user_id": user_id, **result.to_dict()}

    @app.post(
        "/recommendations",
        response_model=RecommendationsOut,
        responses={**INVALID, **TOO_LARGE, **UNAVAILABLE},
    )
    def post_recommendations(request: RecommendRequest) -> dict[str, Any]:
        events = [Event(e.item_id, e.weight, e.timestamp) for e in request.events]
        result = recommender().recommend(
            user_id=request.user_id, recent=events, k=request.k, exclude_seen=request.exclude_seen
        )
        return {"user_id": request.user_id, **result.to_dict()}

    return app


def serve(
    store_uri: str, namespace: str = DEFAULT_NAMESPACE, host: str = "127.0.0.1", port: int = 8000
) -> None:
    """Run the service with uvicorn (blocks); ``llmrec serve`` calls this."""
    import uvicorn

    log.info("serving namespace %r of %s on http://%s:%d", namespace, store_uri, host, port)
    uvicorn.run(create_app(store_uri, namespace), host=host, port=port, log_level="info")
