"""The llmrec Airflow UI plugin: registration, the pages and JSON API over a store, the report,
escaping, and authorization. Requests go straight to the ASGI app (no server, no httpx)."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import sys
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlsplit

import pytest

from tests.airflow_env import PLUGINS, use_test_airflow_home

use_test_airflow_home()

V1 = "20261001T000000Z-aaaaaaaa-111111"  # promoted, then replaced
V2 = "20261002T000000Z-bbbbbbbb-111111"  # current
V3 = "20261003T000000Z-cccccccc-111111"  # failed the gate
V4 = "20261004T000000Z-dddddddd-111111"  # publishing (no manifest yet)
REPORT = b"<html><body><h1>llmrec report</h1></body></html>"


@pytest.fixture(scope="module")
def plugin():
    spec = importlib.util.spec_from_file_location("llmrec_plugin_under_test", PLUGINS / "llmrec_plugin.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def put_json(root: Path, key: str, data) -> None:
    path = root / key
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def manifest(namespace: str, version: str, ndcg: float, *, report: bool = True, run_id: str | None = None):
    files = {"ranker.txt": {"sha256": "0" * 64, "size": 10}}
    if report:
        files["report.html"] = {"sha256": "1" * 64, "size": len(REPORT)}
    return {
        "format": "llmrec-bundle/1",
        "namespace": namespace,
        "version": version,
        "created_at": "2026-10-05T00:00:00+00:00",
        "files": files,
        "metrics": {
            "ranker": {"ndcg@10": ndcg, "recall@10": 0.5, "ndcg@10_ci95": [0.1, 0.2]},
            "popularity": {"ndcg@10": 0.10, "recall@10": 0.2},
            "item_knn": {"ndcg@10": 0.15, "recall@10": 0.3},
            "ranker_no_llm": {"ndcg@10": ndcg - 0.01, "recall@10": 0.45, "mrr": 0.2},
        },
        "lineage": {
            "logical_date": f"{version[:4]}-{version[4:6]}-{version[6:8]}T00:00:00+00:00",
            "dag_id": "llmrec_daily" if run_id else None,
            "run_id": run_id,
            "params_hash": "111111",
        },
    }


@pytest.fixture
def store_root(tmp_path: Path) -> Path:
    root = tmp_path / "store"
    ns = "production"
    for version, ndcg, run_id in ((V1, 0.30, "scheduled__2026-10-01T00:00:00+00:00"), (V2, 0.32, None)):
        put_json(root, f"{ns}/bundles/{version}/manifest.json", manifest(ns, version, ndcg, run_id=run_id))
        (root / f"{ns}/bundles/{version}/report.html").write_bytes(REPORT)
        put_json(root, f"{ns}/runs/{version}/stages/publish.json", {"promoted": True, "reason": "beats"})
    put_json(root, f"{ns}/bundles/{V3}/manifest.json", manifest(ns, V3, 0.05, report=False))
    put_json(
        root,
        f"{ns}/runs/{V3}/stages/publish.json",
        {"promoted": False, "reason": "quality gate: ranker ndcg@10 0.0500 does not beat popularity 0.1000"},
    )
    (root / f"{ns}/bundles/{V4}").mkdir(parents=True)
    (root / f"{ns}/bundles/{V4}/ranker.txt").write_text("partial")
    put_json(root, f"{ns}/current.json", {"version": V2, "history": [{"version": V1}], "rolled_back": []})
    # An experiment namespace whose version name tries to smuggle markup.
    exp = "exp-a"
    evil = manifest(exp, V1, 0.2, report=False)
    evil["metrics"]["<script>alert(1)</script>"] = {"ndcg@10": 0.01}
    put_json(root, f"{exp}/bundles/{V1}/manifest.json", evil)
    return root


async def allow() -> None:
    return None


@pytest.fixture
def app(plugin, store_root):
    from llmrec_tasks.storage.store import open_store

    return plugin.create_app(
        open_store, authorize=allow, store_sources=lambda: plugin.StoreSources(default=store_root.as_uri())
    )


def key(root: Path) -> str:
    from llmrec_tasks.airflow_glue import store_key

    return store_key(root.as_uri())


def get(app, url: str, headers: dict[str, str] | None = None, root_path: str = "/llmrec"):
    """One GET through the ASGI app; returns (status, headers, body)."""
    parts = urlsplit(url)
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": parts.path,
        "raw_path": parts.path.encode(),
        "root_path": root_path,
        "query_string": parts.query.encode(),
        "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()],
        "client": ("127.0.0.1", 1234),
        "server": ("testserver", 80),
    }
    messages: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        messages.append(message)

    asyncio.run(app(scope, receive, send))
    start = next(m for m in messages if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")
    return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, body


def test_plugin_loads_without_being_registered_in_sys_modules():
    """As ``tests/dags/test_dag_e2e.py`` and other tools load it (no ``sys.modules`` entry)."""
    spec = importlib.util.spec_from_file_location("llmrec_plugin_unregistered", PLUGINS / "llmrec_plugin.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.known_stores(module.StoreSources(default="file:///a"))


def test_plugin_registration(plugin):
    from airflow.api_fastapi.app import RESERVED_URL_PREFIXES
    from airflow.api_fastapi.core_api.datamodels.plugins import ExternalViewResponse
    from airflow.plugins_manager import AirflowPlugin

    cls = plugin.LlmrecPlugin
    assert issubclass(cls, AirflowPlugin) and cls.name == "llmrec"
    (fastapi_app,) = cls.fastapi_apps
    assert fastapi_app["url_prefix"] == "/llmrec" and fastapi_app["app"] is plugin.app
    assert not any(fastapi_app["url_prefix"].startswith(p) for p in RESERVED_URL_PREFIXES)
    (view,) = cls.external_views
    ExternalViewResponse.model_validate(view)  # what the UI's plugin endpoint serves
    assert view["href"] == "llmrec/" and not view["href"].startswith("/")
    assert view["destination"] == "nav" and view["url_route"] == "llmrec"


def test_api_lists_namespaces_production_first(app):
    status, _, body = get(app, "/api/namespaces")
    assert status == 200
    assert json.loads(body)["namespaces"] == ["production", "exp-a"]


def test_api_versions_status_gate_and_metrics(app):
    status, _, body = get(app, "/api/versions?namespace=production")
    assert status == 200
    data = json.loads(body)
    assert data["current"] == V2 and data["warning"] is None
    rows = {r["version"]: r for r in data["versions"]}
    assert list(rows) == [V4, V3, V2, V1]  # newest first
    assert rows[V2]["status"] == "current" and rows[V2]["gate"]["status"] == "passed"
    assert rows[V1]["status"] == "promoted before"
    assert rows[V3]["status"] == "not promoted" and rows[V3]["gate"]["status"] == "failed"
    assert "does not beat popularity" in rows[V3]["gate"]["reason"]
    assert rows[V4]["complete"] is False and rows[V4]["status"] == "incomplete"
    # The ranker's own variants (ranker_no_llm) are not baselines.
    assert rows[V2]["primary"] == 0.32 and rows[V2]["best_baseline"] == "item_knn"
    assert rows[V2]["lift"] == pytest.approx(0.32 - 0.15)
    assert rows[V2]["has_report"] and not rows[V3]["has_report"]
    assert rows[V1]["run_id"].startswith("scheduled__")


def test_index_page(app, store_root):
    status, headers, body = get(app, "/?namespace=production")
    assert status == 200 and headers["content-type"].startswith("text/html")
    html = body.decode()
    for version in (V1, V2, V3, V4):
        assert version in html
    store = key(store_root)
    assert f'href="/llmrec/report/production/{V2}?store={store}"' in html
    assert f'href="/llmrec/versions/production/{V2}?store={store}"' in html
    assert 'data-testid="current-version"' in html
    assert html.count('data-testid="gate"') == 4
    # The Airflow run link points into Airflow's UI (base path = mount point minus /llmrec).
    assert 'href="/dags/llmrec_daily/runs/scheduled__2026-10-01T00%3A00%3A00%2B00%3A00"' in html


def test_index_page_behind_a_base_path(app):
    _, _, body = get(app, "/?namespace=production", root_path="/airflow/llmrec")
    html = body.decode()
    assert f'href="/airflow/llmrec/report/production/{V2}?store=' in html
    assert 'href="/airflow/dags/llmrec_daily/runs/' in html


def test_version_page_shows_metrics_against_baselines(app):
    status, _, body = get(app, f"/versions/production/{V3}")
    assert status == 200
    html = body.decode()
    assert "not promoted" in html and "failed" in html and "does not beat popularity" in html
    for model in ("ranker", "popularity", "item_knn", "ranker_no_llm"):
        assert f"<td>{model}</td>" in html or f"<strong>{model}</strong>" in html
    assert "0.0500" in html and "0.1500" in html
    # Only the metrics the manifest has, the usual ones first.
    header = html.split('data-testid="metrics"')[1].split("</thead>")[0]
    assert header.count("<th>") == 4 and header.index("ndcg@10") < header.index("recall@10") < header.index(
        "mrr"
    )
    assert "ndcg@50" not in header and "_ci95" not in header


def test_markup_from_the_store_is_escaped(app):
    _, _, body = get(app, f"/versions/exp-a/{V1}")
    html = body.decode()
    assert "<script>alert(1)</script>" not in html
    assert "&lt;script&gt;" in html


def test_report_is_served_sandboxed(app):
    status, headers, body = get(app, f"/report/production/{V2}")
    assert status == 200 and body == REPORT
    assert headers["content-type"].startswith("text/html")
    assert headers["content-security-policy"].startswith("sandbox")
    assert headers["x-content-type-options"] == "nosniff"


def test_report_of_unpublished_or_reportless_versions_is_404(app):
    assert get(app, f"/report/production/{V4}")[0] == 404  # no manifest yet
    assert get(app, f"/report/production/{V3}")[0] == 404  # no report.html
    assert get(app, "/versions/production/20991231T000000Z-none-000000")[0] == 404


def test_bad_names_are_refused(app):
    assert get(app, "/api/versions?namespace=a..b")[0] == 400
    assert get(app, "/api/versions?namespace=%2Fetc")[0] == 400
    assert get(app, "/report/production/..%2F..%2Fcurrent.json")[0] in (400, 404)
    assert get(app, "/versions/production/a..b")[0] == 400


def test_empty_namespace_and_missing_current_bundle(app, store_root):
    status, _, body = get(app, "/?namespace=exp-empty")
    assert status == 200 and 'data-testid="no-versions"' in body.decode()
    put_json(store_root, "exp-a/current.json", {"version": "20990101T000000Z-gone-000000", "history": []})
    data = json.loads(get(app, "/api/versions?namespace=exp-a")[2])
    assert "missing" in data["warning"]


def test_store_unavailable_is_503(plugin):
    from llmrec_tasks.core.errors import StoreError

    def broken(uri):
        raise StoreError("bucket 'x' does not exist")

    app = plugin.create_app(
        broken, authorize=allow, store_sources=lambda: plugin.StoreSources(default="s3://x")
    )
    status, _, body = get(app, "/api/versions")
    assert status == 503 and b"does not exist" in body


def test_pages_require_an_airflow_login(plugin, store_root):
    """Default authorization: no JWT (cookie or bearer) -> 401; health stays open."""
    from llmrec_tasks.storage.store import open_store

    app = plugin.create_app(
        open_store, store_sources=lambda: plugin.StoreSources(default=store_root.as_uri())
    )
    for url in (
        "/",
        "/api/stores",
        "/api/versions",
        f"/report/production/{V2}",
        f"/versions/production/{V2}",
    ):
        assert get(app, url)[0] == 401, url
    assert get(app, "/health")[0] == 200


def test_authorization_uses_the_auth_manager(plugin, store_root, monkeypatch):
    """A valid token of a user without read access to the DAG's runs -> 403; with access -> 200."""
    import airflow.api_fastapi.app as api_app
    import airflow.api_fastapi.core_api.security as security

    from llmrec_tasks.storage.store import open_store

    seen = {}

    class FakeAuthManager:
        allowed = False

        def is_authorized_dag(self, *, method, user, access_entity=None, details=None):
            seen.update(method=method, user=user, entity=access_entity, dag_id=details.id)
            return self.allowed

    async def fake_resolve(token):
        assert token == "good-token"
        return "alice"

    manager = FakeAuthManager()
    monkeypatch.setattr(security, "resolve_user_from_token", fake_resolve)
    monkeypatch.setattr(api_app, "get_auth_manager", lambda: manager)
    app = plugin.create_app(
        open_store, store_sources=lambda: plugin.StoreSources(default=store_root.as_uri())
    )
    assert get(app, "/api/namespaces", {"Authorization": "Bearer good-token"})[0] == 403
    assert seen["dag_id"] == "llmrec_daily" and seen["method"] == "GET" and seen["user"] == "alice"
    manager.allowed = True
    assert get(app, "/api/namespaces", {"Cookie": "_token=good-token"})[0] == 200


def test_airflow_loads_the_plugin_from_the_plugins_folder(tmp_path):
    """What the api-server does at start: load plugins/, collect FastAPI apps and UI views."""
    import subprocess

    from tests.airflow_env import ROOT, airflow_env

    code = (
        "import json\n"
        "from airflow import plugins_manager as pm\n"
        "plugins, errors = pm._get_plugins()\n"
        "apps, _ = pm.get_fastapi_plugins()\n"
        "views, _ = pm._get_ui_plugins()\n"
        "print(json.dumps({'plugins': [p.name for p in plugins], 'errors': errors,\n"
        "    'apps': [a['url_prefix'] for a in apps], 'views': [v['url_route'] for v in views]}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=airflow_env(tmp_path / "home"),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["errors"] == {}
    assert "llmrec" in report["plugins"]
    assert "/llmrec" in report["apps"] and "llmrec" in report["views"]


# --- stores ----------------------------------------------------------------------------------------

VB = "20261105T000000Z-eeeeeeee-222222"  # store B's only version


@pytest.fixture
def store_b(tmp_path: Path) -> Path:
    root = tmp_path / "store-b"
    ns = "production"
    put_json(root, f"{ns}/bundles/{VB}/manifest.json", manifest(ns, VB, 0.4, run_id="manual__b"))
    (root / f"{ns}/bundles/{VB}/report.html").write_bytes(b"<html><body>report of store B</body></html>")
    put_json(root, f"{ns}/runs/{VB}/stages/publish.json", {"promoted": True, "reason": "beats"})
    put_json(root, f"{ns}/current.json", {"version": VB, "history": []})
    put_json(root, f"exp-b/bundles/{VB}/manifest.json", manifest("exp-b", VB, 0.4))
    return root


@pytest.fixture
def two_stores(plugin, store_root, store_b):
    """The default store A and store B, which only a recent run's conf names."""
    from llmrec_tasks.storage.store import open_store

    calls = []

    def sources():
        calls.append(1)
        return plugin.StoreSources(default=store_root.as_uri(), found=(("runs", (store_b.as_uri(),)),))

    app = plugin.create_app(open_store, authorize=allow, store_sources=sources)
    app.source_calls = calls
    return app


def test_known_stores_from_each_source_one_per_store(plugin):
    a, b, c = "file:///srv/a", "s3://bucket-b/llmrec", "file:///srv/c"
    sources = plugin.StoreSources(
        default=a,
        found=(
            ("variable", (b, "/srv/a/")),  # another spelling of the default store
            ("runs", (c, "ftp://elsewhere/x", "relative/path", b)),  # unreadable URIs are not listed
            ("events", (b + "/",)),
        ),
    )
    known = plugin.known_stores(sources)
    assert [s.uri for s in known.values()] == [a, b, c]
    assert [s.sources for s in known.values()] == [
        ("default", "variable"),
        ("variable", "runs", "events"),
        ("runs",),
    ]
    assert [s.default for s in known.values()] == [True, False, False]
    from llmrec_tasks.airflow_glue import store_key

    assert list(known) == [store_key(a), store_key(b), store_key(c)]


@pytest.fixture
def metadata_db(monkeypatch):
    """An in-memory SQLite with Airflow's dag_run and asset tables, as the api-server's session."""
    import contextlib
    from datetime import UTC, datetime

    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.models.base import Base
    from airflow.models.dagrun import DagRun
    from sqlalchemy import create_engine
    from sqlalchemy.orm import Session

    engine = create_engine("sqlite://")
    tables = [
        DagRun.__table__,
        AssetModel.__table__,
        AssetEvent.__table__,
        Base.metadata.tables["log_template"],
    ]
    Base.metadata.create_all(engine, tables=tables)
    now = datetime(2026, 11, 5, tzinfo=UTC)

    def add_run(dag_id: str, run_id: str, conf) -> None:
        with Session(engine) as session:
            session.execute(
                DagRun.__table__.insert().values(
                    dag_id=dag_id,
                    run_id=run_id,
                    conf=conf,
                    run_type="manual",
                    run_after=now,
                    state="success",
                    clear_number=0,
                )
            )
            session.commit()

    def add_event(asset_uri: str, extra) -> None:
        with Session(engine) as session:
            asset_id = session.execute(
                AssetModel.__table__.insert().values(
                    name=asset_uri, uri=asset_uri, group="llmrec", extra={}, created_at=now, updated_at=now
                )
            ).inserted_primary_key[0]
            session.execute(
                AssetEvent.__table__.insert().values(asset_id=asset_id, extra=extra, timestamp=now)
            )
            session.commit()

    @contextlib.contextmanager
    def create_session():
        with Session(engine) as session:
            yield session

    monkeypatch.setattr("airflow.utils.session.create_session", create_session)
    return SimpleNamespace(add_run=add_run, add_event=add_event, session=create_session)


def test_discover_stores_reads_the_variable_runs_and_events(plugin, metadata_db, monkeypatch):
    from airflow.models.variable import Variable

    variables = {"llmrec_store_uri": "file:///srv/default", "llmrec_stores": '["s3://configured/llmrec"]'}
    monkeypatch.setattr(
        Variable, "get", staticmethod(lambda key, default_var=None: variables.get(key, default_var))
    )
    metadata_db.add_run("llmrec_daily", "r1", {"store_uri": "s3://from-run/old", "namespace": "exp-a"})
    metadata_db.add_run("llmrec_daily", "r2", {"store_uri": " s3://from-run/new "})
    metadata_db.add_run("llmrec_daily", "r3", {})  # the default store
    metadata_db.add_run("other_dag", "r4", {"store_uri": "s3://not-ours/x"})
    metadata_db.add_event("llmrec://bundles/s3-x-00000000/production", {"store_uri": "s3://from-event/x"})
    metadata_db.add_event("s3://unrelated/asset", {"store_uri": "s3://not-a-bundle/x"})

    found = plugin.discover_stores()
    assert found.default == "file:///srv/default"
    assert dict(found.found) == {
        "variable": ("s3://configured/llmrec",),
        "runs": ("s3://from-run/new", "s3://from-run/old"),  # newest first
        "events": ("s3://from-event/x",),
    }
    assert found.warnings == ()
    with metadata_db.session() as session:  # bounded: the newest runs only
        assert plugin.run_store_uris(session, limit=2) == ("s3://from-run/new",)

    variables["llmrec_stores"] = "[not json"
    broken = plugin.discover_stores()
    assert dict(broken.found)["variable"] == () and "llmrec_stores is not valid JSON" in broken.warnings[0]
    variables["llmrec_stores"] = "s3://a/x, s3://b/y"
    assert dict(plugin.discover_stores().found)["variable"] == ("s3://a/x", "s3://b/y")


def test_api_stores_lists_every_known_store(two_stores, store_root, store_b):
    status, _, body = get(two_stores, "/api/stores")
    assert status == 200
    data = json.loads(body)
    assert data["default"] == key(store_root)
    assert data["stores"] == [
        {"key": key(store_root), "uri": store_root.as_uri(), "sources": ["default"], "default": True},
        {"key": key(store_b), "uri": store_b.as_uri(), "sources": ["runs"], "default": False},
    ]
    get(two_stores, "/api/stores")
    assert len(two_stores.source_calls) == 1  # cached: one discovery for both requests


def test_store_param_selects_the_store(two_stores, store_root, store_b):
    b = key(store_b)
    data = json.loads(get(two_stores, f"/api/versions?store={b}")[2])
    assert data["store"] == b and data["current"] == VB and [r["version"] for r in data["versions"]] == [VB]
    assert json.loads(get(two_stores, "/api/versions")[2])["current"] == V2  # no store: the default
    assert json.loads(get(two_stores, f"/api/namespaces?store={b}")[2])["namespaces"] == [
        "production",
        "exp-b",
    ]
    assert get(two_stores, f"/versions/production/{VB}?store={b}")[0] == 200
    assert get(two_stores, f"/versions/production/{VB}")[0] == 404  # not in the default store
    status, _, body = get(two_stores, f"/report/production/{VB}?store={b}")
    assert status == 200 and b"report of store B" in body


def test_index_shows_the_store_selector_and_links_keep_the_store(two_stores, store_root, store_b):
    a, b = key(store_root), key(store_b)
    html = get(two_stores, f"/?store={b}")[2].decode()
    assert f'data-testid="store-current" title="{store_b.as_uri()}">{b}</strong>' in html
    assert f'href="/llmrec/?store={a}"' in html  # the other store, one click away
    assert f'data-testid="store-uri">{store_b.as_uri()}</code>' in html
    assert f'href="/llmrec/?store={b}&amp;namespace=exp-b"' in html  # namespace links keep the store
    assert f'href="/llmrec/versions/production/{VB}?store={b}"' in html
    assert f'href="/llmrec/report/production/{VB}?store={b}"' in html
    assert V2 not in html  # store A's versions are not shown
    version = get(two_stores, f"/versions/production/{VB}?store={b}")[2].decode()
    assert f'href="/llmrec/?store={b}&amp;namespace=production"' in version
    assert f'href="/llmrec/report/production/{VB}?store={b}"' in version


def test_unknown_store_is_404_and_never_opened(plugin, store_root):
    opened = []

    def factory(uri):
        from llmrec_tasks.storage.store import open_store

        opened.append(uri)
        return open_store(uri)

    app = plugin.create_app(
        factory, authorize=allow, store_sources=lambda: plugin.StoreSources(default=store_root.as_uri())
    )
    for url in (
        "/?store=s3-evil-12345678",
        "/api/versions?store=file:///etc",
        "/api/namespaces?store=nope",
        f"/versions/production/{V2}?store=nope",
        f"/report/production/{V2}?store=nope",
    ):
        status, _, body = get(app, url)
        assert status == 404, url
        assert "unknown store" in json.loads(body)["detail"] and key(store_root) in json.loads(body)["detail"]
    assert opened == []


def test_store_discovery_warnings_are_shown(plugin, store_root):
    from llmrec_tasks.storage.store import open_store

    sources = plugin.StoreSources(
        default=store_root.as_uri(), warnings=("Variable llmrec_stores is not valid JSON",)
    )
    app = plugin.create_app(open_store, authorize=allow, store_sources=lambda: sources)
    assert "llmrec_stores is not valid JSON" in get(app, "/")[2].decode()
    assert json.loads(get(app, "/api/stores")[2])["warnings"] == list(sources.warnings)


def test_index_shows_the_experiment_and_the_newest_online_metrics(app, store_root):
    ns = "production"
    pointer = json.loads((store_root / f"{ns}/current.json").read_text())
    pointer["experiment"] = {"name": "exp1", "challenger": V3, "share": 0.2, "salt": "s", "started_at": "now"}
    put_json(store_root, f"{ns}/current.json", pointer)
    total = {
        "version": V2,
        "arm": "current",
        "impressions": 40,
        "users": 9,
        "ctr@10": 0.25,
        "conversion": 0.05,
    }
    for span, ctr in (("2026-10-01_2026-10-07", 0.25), ("2026-09-01_2026-09-07", 0.99)):
        put_json(store_root, f"{ns}/online_metrics/{span}/online_metrics.json", {
            "start": span[:10], "end": span[11:], "k": 10, "totals": [{**total, "ctr@10": ctr}], "rows": [],
        })  # fmt: skip
        (store_root / f"{ns}/online_metrics/{span}/online_report.html").write_bytes(REPORT)
    status, _, body = get(app, "/?namespace=production")
    html = body.decode()
    assert status == 200 and 'data-testid="experiment"' in html and "20.0% of users" in html
    online = html.split('data-testid="online"')[1].split("</table>")[0]
    assert "0.2500" in online and "0.9900" not in online and f'data-version="{V2}"' in online
    assert f'href="/llmrec/online/production/2026-10-01_2026-10-07?store={key(store_root)}"' in html
    status, headers, body = get(app, "/online/production/2026-10-01_2026-10-07")
    assert status == 200 and body == REPORT and headers["content-security-policy"].startswith("sandbox")
    assert get(app, "/online/production/2020-01-01_2020-01-02")[0] == 404
    api = json.loads(get(app, "/api/online?namespace=production")[2])
    assert api["experiment"]["challenger"] == V3 and api["online"]["range"] == "2026-10-01_2026-10-07"
    assert json.loads(get(app, "/api/online?namespace=exp-a")[2])["online"] is None
