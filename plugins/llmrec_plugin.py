"""llmrec runs in the Airflow UI: a FastAPI app mounted by the api-server at ``/llmrec`` and a
"llmrec runs" entry in the UI's navigation that shows it.

Per namespace and version: the ranker's metrics against the baselines, the quality gate's outcome,
the promotion status (current / promoted before / rolled back / not promoted) and a link to the
bundle's HTML report (served by this app too). Everything is read from the object store (bundle
manifests, ``current.json`` and the run's ``stages/publish.json`` that the DAG's publish task
records), so the page also shows bundles published from the CLI. Above the versions: the running
A/B experiment (``current.json``) and the newest online metrics (``llmrec online-metrics``:
CTR@k, conversion, coverage per version x arm) with a link to their report (plots over days).

Pages and the JSON API require the Airflow login (the UI's JWT cookie or a bearer token) and read
permission on the ``llmrec_daily`` DAG's runs. An ``s3://`` store is read with the ``aws_default``
connection.

Stores: the plugin lists the stores it knows, each under its store key (``store_key`` in
``llmrec_tasks.airflow_glue``, e.g. ``file-llmrec-store-1a2b3c4d``, also part of the bundle Asset
URIs):

- the deployment default (Variable ``llmrec_store_uri``, env ``LLMREC_STORE_URI``, else
  ``$AIRFLOW_HOME/llmrec-store``), shown when no store is selected;
- the Variable ``llmrec_stores``: a JSON list of store URIs or comma-separated URIs;
- the ``store_uri`` of the newest 200 ``llmrec_daily`` runs' confs and of the newest 200 bundle
  asset events, read from Airflow's metadata DB (the plugin runs in the api-server).

The list is cached for 30 s. Pages and the API take ``?store=<key>``; an unknown key is a 404: the
plugin opens only the stores it knows, never a URI from the request. ``GET /api/stores`` lists them.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

from airflow.plugins_manager import AirflowPlugin
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from jinja2 import Environment, FileSystemLoader, select_autoescape

from llmrec_tasks.airflow_glue import DAG_ID
from llmrec_tasks.core.constants import (
    DEFAULT_NAMESPACE,
    METRIC_COLUMNS,
    ONLINE_METRICS_DIR,
    ONLINE_METRICS_JSON,
    ONLINE_REPORT_HTML,
    PRIMARY_METRIC,
)
from llmrec_tasks.storage import registry

log = logging.getLogger(__name__)

URL_PREFIX = "/llmrec"
MAX_VERSIONS = 200
NAMESPACE_TTL_S = 30.0
STORES_TTL_S = 30.0
RECENT_RUNS = 200  # the newest llmrec_daily runs whose conf may name a store
RECENT_EVENTS = 200  # the newest bundle asset events (their metadata names the store)
STORE_SCHEMES = ("file", "s3")  # what open_store reads; other URIs seen in confs are not listed
TEMPLATES = Path(__file__).resolve().parent / "llmrec_templates"
# The report is generated HTML: render it without scripts, forms or same-origin access, so nothing
# in it can act with the viewer's Airflow session.
REPORT_HEADERS = {
    "Content-Security-Policy": "sandbox; default-src 'none'; img-src data: blob:; style-src 'unsafe-inline'; "
    "font-src data:",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


# --- reading the store ---------------------------------------------------------------------------


def open_plugin_store(store_uri: str) -> Any:
    """A known store, through the ``aws_default`` connection for ``s3://``."""
    from llmrec_tasks.airflow_glue import s3_client_from_connection
    from llmrec_tasks.storage.store import open_store

    client = None
    if store_uri.startswith("s3://"):
        try:
            client = s3_client_from_connection(store_uri)
        except Exception as exc:  # no connection defined: the standard AWS environment applies
            log.warning("aws_default connection not usable (%s): using the AWS environment", exc)
    return open_store(store_uri, s3_client=client)


# --- the stores the plugin knows -----------------------------------------------------------------


# NamedTuples, not dataclasses: a dataclass needs its module in sys.modules, and loaders of this
# file (tests, tools) do not always register it there.
class KnownStore(NamedTuple):
    key: str
    uri: str
    sources: tuple[str, ...]  # "default", "variable", "runs", "events"
    default: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "uri": self.uri, "sources": list(self.sources), "default": self.default}


class StoreSources(NamedTuple):
    """What the plugin learned about stores: the default, then each source's URIs (newest first)."""

    default: str
    found: tuple[tuple[str, tuple[str, ...]], ...] = ()
    warnings: tuple[str, ...] = ()


def known_stores(sources: StoreSources) -> dict[str, KnownStore]:
    """One entry per store key: the default first, then in order of the sources; each lists the
    sources that named it. URIs ``open_store`` cannot read (other schemes, relative paths) are left
    out."""
    from llmrec_tasks.airflow_glue import normalize_store_uri, store_key

    order: list[str] = []
    uris: dict[str, str] = {}
    named: dict[str, list[str]] = {}
    for source, found in (("default", (sources.default,)), *sources.found):
        for uri in found:
            normalized = normalize_store_uri(uri)
            if source != "default" and normalized.partition("://")[0] not in STORE_SCHEMES:
                continue
            key = store_key(normalized)
            if key not in uris:
                order.append(key)
                uris[key] = normalized
                named[key] = []
            if source not in named[key]:
                named[key].append(source)
    return {
        key: KnownStore(key=key, uri=uris[key], sources=tuple(named[key]), default=i == 0)
        for i, key in enumerate(order)
    }


def _conf_store_uris(confs: Iterable[Any]) -> tuple[str, ...]:
    """The distinct non-blank ``store_uri`` values of run confs or event metadata, in order."""
    found: dict[str, None] = {}
    for conf in confs:
        value = conf.get("store_uri") if isinstance(conf, dict) else None
        if isinstance(value, str) and value.strip():
            found.setdefault(value.strip())
    return tuple(found)


def run_store_uris(session: Any, *, limit: int = RECENT_RUNS) -> tuple[str, ...]:
    """The stores named in the confs of the newest ``limit`` ``llmrec_daily`` runs."""
    from airflow.models.dagrun import DagRun
    from sqlalchemy import select

    query = select(DagRun.conf).where(DagRun.dag_id == DAG_ID).order_by(DagRun.id.desc()).limit(limit)
    return _conf_store_uris(session.scalars(query))


def event_store_uris(session: Any, *, limit: int = RECENT_EVENTS) -> tuple[str, ...]:
    """The stores named in the metadata of the newest ``limit`` bundle asset events."""
    from airflow.models.asset import AssetEvent, AssetModel
    from sqlalchemy import select

    from llmrec_tasks.airflow_glue import BUNDLE_ASSET_SCHEME

    query = (
        select(AssetEvent.extra)
        .join(AssetModel, AssetModel.id == AssetEvent.asset_id)
        .where(AssetModel.uri.startswith(f"{BUNDLE_ASSET_SCHEME}://bundles/"))
        .order_by(AssetEvent.id.desc())
        .limit(limit)
    )
    return _conf_store_uris(session.scalars(query))


def discover_stores() -> StoreSources:
    """The api-server side: the default store, Variable ``llmrec_stores``, recent runs and events
    (two bounded queries on Airflow's metadata DB). A malformed Variable is a warning on the page,
    not an error: the other stores stay readable."""
    from airflow.models.variable import Variable
    from airflow.utils.session import create_session

    from llmrec_tasks.airflow_glue import STORES_VARIABLE, parse_store_list, plugin_store_uri
    from llmrec_tasks.core.errors import ConfigError

    warnings: list[str] = []
    try:
        configured = tuple(parse_store_list(Variable.get(STORES_VARIABLE, default_var=None)))
    except ConfigError as exc:
        warnings.append(f"{exc}: its stores are not listed")
        configured = ()
    with create_session() as session:
        runs = run_store_uris(session)
        events = event_store_uris(session)
    return StoreSources(
        default=plugin_store_uri(),
        found=(("variable", configured), ("runs", runs), ("events", events)),
        warnings=tuple(warnings),
    )


def _read_json(store: Any, key: str) -> dict[str, Any] | None:
    from llmrec_tasks.storage.store import ObjectNotFound

    try:
        return json.loads(store.get_bytes(key))
    except ObjectNotFound:
        return None
    except (ValueError, UnicodeDecodeError) as exc:
        log.warning("%s is not valid JSON: %s", store.uri_for(key), exc)
        return None


def _models(metrics: dict[str, Any]) -> dict[str, dict[str, float]]:
    """``{"ranker": {...}, "popularity": {...}, ...}`` -> model -> scalar metrics."""
    out: dict[str, dict[str, float]] = {}
    for model, block in (metrics or {}).items():
        if isinstance(block, dict):
            out[model] = {
                k: float(v)
                for k, v in block.items()
                if isinstance(v, int | float) and not isinstance(v, bool)
            }
    if not out and metrics:  # a flat metrics dict: the ranker alone
        out["ranker"] = {
            k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)
        }
    return out


def metric_columns(models: dict[str, dict[str, float]]) -> list[str]:
    """The metrics present in any model: the usual ones first, then the rest alphabetically."""
    present = {name for values in models.values() for name in values}
    known = [c for c in METRIC_COLUMNS if c in present]
    return known + sorted(present - set(known))


def gate_outcome(published: dict[str, Any] | None) -> dict[str, Any]:
    """The quality gate's outcome from the publish stage's recorded result."""
    if not published:
        return {"status": "unknown", "reason": "no publish record for this version"}
    gate = published.get("gate")
    if isinstance(gate, dict) and "passed" in gate:  # recorded explicitly
        return {"status": "passed" if gate["passed"] else "failed", "reason": gate.get("reason", "")}
    reason = str(published.get("reason") or "")
    if published.get("promoted"):
        return {"status": "passed", "reason": reason}
    if reason.startswith("quality gate"):
        return {"status": "failed", "reason": reason}
    return {"status": "not evaluated", "reason": reason}


def version_rows(store: Any, namespace: str, *, limit: int = MAX_VERSIONS) -> dict[str, Any]:
    """Every version of a namespace (newest first) with metrics, gate and promotion status."""
    from llmrec_tasks.core.config import validate_name
    from llmrec_tasks.storage import registry

    validate_name("namespace", namespace)
    pointer = _read_json(store, registry.current_key(namespace)) or {}
    current = pointer.get("version")
    promoted_before = {entry.get("version") for entry in pointer.get("history", [])}
    rolled_back = set(pointer.get("rolled_back", []))
    versions = registry.scan_versions(store, namespace)

    rows = []
    for version in sorted(versions, reverse=True)[:limit]:
        row: dict[str, Any] = {
            "version": version,
            "namespace": namespace,
            "complete": registry.manifest_key(namespace, version) in versions[version],
        }
        if not row["complete"]:
            row.update(status="incomplete", gate={"status": "unknown", "reason": "publishing or crashed"})
            rows.append(row)
            continue
        manifest = _read_json(store, registry.manifest_key(namespace, version)) or {}
        lineage = manifest.get("lineage") or {}
        published = _read_json(store, f"{registry.run_prefix(namespace, version)}/stages/publish.json")
        models = _models(manifest.get("metrics") or {})
        ranker = models.get("ranker", {})
        # Baselines: every other model except the ranker's own variants (e.g. ranker_no_llm).
        baselines = {name: m for name, m in models.items() if not name.startswith("ranker")}
        best = max(baselines.items(), key=lambda kv: kv[1].get(PRIMARY_METRIC, float("-inf")), default=None)
        if version == current:
            status = "current"
        elif version in rolled_back:
            status = "rolled back"
        elif version in promoted_before:
            status = "promoted before"
        else:
            status = "not promoted"
        row.update(
            status=status,
            current=version == current,
            logical_date=lineage.get("logical_date"),
            created_at=manifest.get("created_at"),
            dag_id=lineage.get("dag_id"),
            run_id=lineage.get("run_id"),
            params_hash=lineage.get("params_hash"),
            models=models,
            primary=ranker.get(PRIMARY_METRIC),
            best_baseline=best[0] if best else None,
            best_baseline_primary=best[1].get(PRIMARY_METRIC) if best else None,
            gate=gate_outcome(published),
            has_report="report.html" in (manifest.get("files") or {}),
        )
        if row["primary"] is not None and row["best_baseline_primary"] is not None:
            row["lift"] = row["primary"] - row["best_baseline_primary"]
        rows.append(row)
    warning = None
    if current and current not in versions:
        warning = (
            f"current.json names {current}, whose bundle is missing: roll back or promote another version"
        )
    return {
        "namespace": namespace,
        "current": current,
        "pointer": pointer,
        "versions": rows,
        "warning": warning,
    }


def online_summary(store: Any, namespace: str) -> dict[str, Any] | None:
    """The newest online metrics of a namespace (the range ending last, then starting first):
    totals per version x arm and the daily rows, as ``llmrec online-metrics`` wrote them; None
    when none were computed. The running experiment comes from ``current.json``."""
    prefix = f"{namespace}/{ONLINE_METRICS_DIR}/"
    ranges = [
        key[len(prefix) :].split("/", 1)[0]
        for key in store.list(prefix)
        if key.endswith(f"/{ONLINE_METRICS_JSON}")
    ]
    if not ranges:
        return None
    newest = max(ranges, key=lambda r: (r.rsplit("_", 1)[-1], r))
    data = _read_json(store, f"{prefix}{newest}/{ONLINE_METRICS_JSON}") or {}
    return {
        "range": newest,
        "start": data.get("start"),
        "end": data.get("end"),
        "k": data.get("k"),
        "totals": data.get("totals") or [],
        "rows": data.get("rows") or [],
        "has_report": store.exists(f"{prefix}{newest}/{ONLINE_REPORT_HTML}"),
    }


# --- the app -------------------------------------------------------------------------------------


async def require_dag_runs_read(request: Request) -> None:
    """Airflow login + read access to the llmrec DAG's runs (the api-server's auth manager)."""
    from airflow.api_fastapi.app import get_auth_manager
    from airflow.api_fastapi.auth.managers.base_auth_manager import COOKIE_NAME_JWT_TOKEN
    from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity, DagDetails
    from airflow.api_fastapi.core_api.security import resolve_user_from_token

    header = request.headers.get("authorization", "")
    token = header[7:] if header.lower().startswith("bearer ") else request.cookies.get(COOKIE_NAME_JWT_TOKEN)
    user = await resolve_user_from_token(token)  # 401 / 403 on a missing or bad token
    allowed = get_auth_manager().is_authorized_dag(
        method="GET", access_entity=DagAccessEntity.RUN, details=DagDetails(id=DAG_ID), user=user
    )
    if not allowed:
        raise HTTPException(status_code=403, detail=f"Forbidden: needs read access to {DAG_ID} runs")


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def create_app(
    store_factory: Callable[[str], Any] = open_plugin_store,
    *,
    authorize: Callable[..., Any] = require_dag_runs_read,
    store_sources: Callable[[], StoreSources] = discover_stores,
) -> FastAPI:
    """The plugin's app; tests pass their own store factory, store sources and authorization."""
    app = FastAPI(title="llmrec runs", docs_url=None, redoc_url=None, openapi_url=None)
    env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape(["html"]))
    env.filters["fmt"] = _fmt
    cache: dict[str, tuple[float, list[str]]] = {}
    stores_cache: list[tuple[float, dict[str, KnownStore], tuple[str, ...]]] = []
    lock = threading.Lock()
    guard = [Depends(authorize)]

    def namespaces(store: Any) -> list[str]:
        with lock:
            hit = cache.get(store.uri)
            if hit and time.monotonic() - hit[0] < NAMESPACE_TTL_S:
                return hit[1]
        found = registry.list_namespaces(store)
        with lock:
            cache[store.uri] = (time.monotonic(), found)
        return found

    def stores() -> tuple[dict[str, KnownStore], tuple[str, ...]]:
        """The known stores (cached for ``STORES_TTL_S``) and the warnings of their discovery."""
        with lock:
            if stores_cache and time.monotonic() - stores_cache[0][0] < STORES_TTL_S:
                return stores_cache[0][1], stores_cache[0][2]
        sources = store_sources()
        known = known_stores(sources)
        with lock:
            stores_cache[:] = [(time.monotonic(), known, sources.warnings)]
        return known, sources.warnings

    def selected_store(key: str | None) -> KnownStore:
        known, _ = stores()
        if not key:
            return next(s for s in known.values() if s.default)
        if key not in known:
            raise HTTPException(
                status_code=404,
                detail=(
                    f"unknown store {key!r}: the plugin opens only the stores it knows (the default, "
                    f"Variable llmrec_stores, the stores of recent {DAG_ID} runs and bundle events; "
                    f"new ones appear within {STORES_TTL_S:.0f} s). Known: {', '.join(known)}"
                ),
            )
        return known[key]

    def checked_name(kind: str, value: str) -> str:
        from llmrec_tasks.core.config import validate_name
        from llmrec_tasks.core.errors import ConfigError

        try:
            return validate_name(kind, value)
        except ConfigError as exc:
            raise HTTPException(status_code=400, detail=str(exc)) from exc

    def store_or_503(known: KnownStore) -> Any:
        from llmrec_tasks.core.errors import LlmrecError

        try:
            return store_factory(known.uri)
        except LlmrecError as exc:
            raise HTTPException(
                status_code=503, detail=f"llmrec store {known.uri} not available: {exc}"
            ) from exc

    def airflow_base(request: Request) -> str:
        """Airflow's base path as seen by the browser (the app is mounted under it at /llmrec)."""
        root = request.scope.get("root_path", "")
        return root[: -len(URL_PREFIX)] if root.endswith(URL_PREFIX) else root

    store_query = Query(None, description="a store key from /api/stores; the default store if absent")

    @app.get("/health", include_in_schema=False)
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/", response_class=HTMLResponse, dependencies=guard)
    def index(
        request: Request, namespace: str = Query(DEFAULT_NAMESPACE), store: str | None = store_query
    ) -> HTMLResponse:
        namespace = checked_name("namespace", namespace)
        known = selected_store(store)
        all_stores, warnings = stores()
        opened = store_or_503(known)
        found = namespaces(opened)
        data = version_rows(opened, namespace)
        html = env.get_template("index.html").render(
            online=online_summary(opened, namespace),
            experiment=data["pointer"].get("experiment"),
            store=known,
            stores=list(all_stores.values()),
            store_warnings=warnings,
            namespaces=found if namespace in found else [*found, namespace],
            namespace=namespace,
            data=data,
            metric=PRIMARY_METRIC,
            airflow_base=airflow_base(request),
            request_root=request.scope.get("root_path", ""),
        )
        return HTMLResponse(html)

    @app.get("/versions/{namespace}/{version}", response_class=HTMLResponse, dependencies=guard)
    def version_page(
        request: Request, namespace: str, version: str, store: str | None = store_query
    ) -> HTMLResponse:
        from llmrec_tasks.storage import registry

        namespace, version = checked_name("namespace", namespace), checked_name("version", version)
        known = selected_store(store)
        opened = store_or_503(known)
        row = next((r for r in version_rows(opened, namespace)["versions"] if r["version"] == version), None)
        manifest = _read_json(opened, registry.manifest_key(namespace, version))
        if row is None or manifest is None:
            raise HTTPException(
                status_code=404, detail=f"no published version {version!r} in {namespace!r} of {known.uri}"
            )
        html = env.get_template("version.html").render(
            row=row,
            manifest=manifest,
            columns=metric_columns(row.get("models") or {}),
            namespace=namespace,
            store=known,
            airflow_base=airflow_base(request),
            request_root=request.scope.get("root_path", ""),
        )
        return HTMLResponse(html)

    @app.get("/report/{namespace}/{version}", dependencies=guard)
    def report(namespace: str, version: str, store: str | None = store_query) -> Response:
        from llmrec_tasks.storage import registry
        from llmrec_tasks.storage.store import ObjectNotFound

        namespace, version = checked_name("namespace", namespace), checked_name("version", version)
        known = selected_store(store)
        opened = store_or_503(known)
        if not opened.exists(registry.manifest_key(namespace, version)):  # unfinished bundles are not shown
            raise HTTPException(
                status_code=404, detail=f"no published version {version!r} in {namespace!r} of {known.uri}"
            )
        try:
            body = opened.get_bytes(registry.bundle_key(namespace, version, "report.html"))
        except ObjectNotFound as exc:
            raise HTTPException(status_code=404, detail=f"version {version} has no report.html") from exc
        return Response(body, media_type="text/html; charset=utf-8", headers=REPORT_HEADERS)

    @app.get("/online/{namespace}/{span}", dependencies=guard)
    def online_report(namespace: str, span: str, store: str | None = store_query) -> Response:
        from llmrec_tasks.storage.store import ObjectNotFound

        namespace, span = checked_name("namespace", namespace), checked_name("range", span)
        opened = store_or_503(selected_store(store))
        try:
            body = opened.get_bytes(f"{namespace}/{ONLINE_METRICS_DIR}/{span}/{ONLINE_REPORT_HTML}")
        except ObjectNotFound as exc:
            raise HTTPException(
                status_code=404, detail=f"no online metrics {span!r} in {namespace!r}"
            ) from exc
        return Response(body, media_type="text/html; charset=utf-8", headers=REPORT_HEADERS)

    @app.get("/api/online", dependencies=guard)
    def api_online(
        namespace: str = Query(DEFAULT_NAMESPACE), store: str | None = store_query
    ) -> JSONResponse:
        namespace = checked_name("namespace", namespace)
        known = selected_store(store)
        opened = store_or_503(known)
        pointer = _read_json(opened, registry.current_key(namespace)) or {}
        return JSONResponse(
            {
                "store": known.key,
                "namespace": namespace,
                "experiment": pointer.get("experiment"),
                "online": online_summary(opened, namespace),
            }
        )

    @app.get("/api/stores", dependencies=guard)
    def api_stores() -> JSONResponse:
        known, warnings = stores()
        default = next(s for s in known.values() if s.default)
        return JSONResponse(
            {
                "default": default.key,
                "stores": [s.to_json() for s in known.values()],
                "warnings": list(warnings),
            }
        )

    @app.get("/api/namespaces", dependencies=guard)
    def api_namespaces(store: str | None = store_query) -> JSONResponse:
        known = selected_store(store)
        opened = store_or_503(known)
        return JSONResponse({"store": known.key, "store_uri": known.uri, "namespaces": namespaces(opened)})

    @app.get("/api/versions", dependencies=guard)
    def api_versions(
        namespace: str = Query(DEFAULT_NAMESPACE), store: str | None = store_query
    ) -> JSONResponse:
        namespace = checked_name("namespace", namespace)
        known = selected_store(store)
        return JSONResponse(
            {"store": known.key, "store_uri": known.uri, **version_rows(store_or_503(known), namespace)}
        )

    return app


app = create_app()


class LlmrecPlugin(AirflowPlugin):
    """Mounts the app and adds "llmrec runs" to the UI's Browse menu."""

    name = "llmrec"
    fastapi_apps: ClassVar[list[dict[str, Any]]] = [
        {"app": app, "url_prefix": URL_PREFIX, "name": "llmrec runs"}
    ]
    external_views: ClassVar[list[dict[str, Any]]] = [
        {
            "name": "llmrec runs",
            "href": URL_PREFIX.lstrip("/") + "/",
            "url_route": "llmrec",
            "destination": "nav",
            "category": "browse",
        }
    ]
