"""HTTP service: endpoints, 4xx on bad requests, hot reload of `current`."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from llmrec_tasks import publish
from llmrec_tasks.core.constants import DEFAULT_NAMESPACE
from llmrec_tasks.core.results import Published
from llmrec_tasks.serving import api
from tests.bundle_factory import make_run

pytestmark = pytest.mark.usefixtures("toy_ranker_features")


@pytest.fixture
def first(store_uri: str) -> Published:
    return publish.run_publish(*make_run(store_uri))


@pytest.fixture
def client(store_uri: str, first: Published) -> Iterator[TestClient]:
    with TestClient(api.create_app(store_uri, DEFAULT_NAMESPACE, poll_seconds=3600)) as c:
        yield c


def test_health_and_version(client: TestClient, first: Published) -> None:
    health = client.get("/healthz")
    assert health.status_code == 200 and health.json() == {
        "status": "ok",
        "version": first.version,
        "error": None,
    }
    version = client.get("/version").json()
    assert version["version"] == first.version and version["current"] == first.version
    assert version["namespace"] == DEFAULT_NAMESPACE and version["logical_date"].startswith("2024-02-01")
    assert version["metrics"]["ranker"]["ndcg@10"] == pytest.approx(0.30)


def test_get_recommendations(client: TestClient, first: Published) -> None:
    response = client.get("/recommendations/u1", params={"k": 5})
    assert response.status_code == 200
    body = response.json()
    assert body["user_id"] == "u1" and body["strategy"] == "personalized" and body["version"] == first.version
    assert len(body["items"]) == 5
    assert set(body["items"][0]) == {"item_id", "score", "title", "reason", "signals"}
    cold = client.get("/recommendations/someone-new").json()
    assert cold["strategy"] == "popular" and len(cold["items"]) == 10


def test_post_with_recent_events(client: TestClient) -> None:
    events = [{"item_id": "i2", "timestamp": 1.7e9}, {"item_id": "i5", "weight": 4.5}, {"item_id": "zzz"}]
    body = client.post("/recommendations", json={"events": events, "k": 3}).json()
    assert body["strategy"] == "personalized" and body["history_length"] == 2
    assert body["ignored_item_ids"] == ["zzz"] and len(body["items"]) == 3
    with_user = client.post("/recommendations", json={"user_id": "u1", "events": events[:1]}).json()
    assert with_user["history_length"] == 9


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("/recommendations/u1?k=0", "k: Input should be greater than or equal to 1"),
        ("/recommendations/u1?k=101", "k: Input should be less than or equal to 100"),
        ("/recommendations/u1?k=ten", "k: Input should be a valid integer"),
        ("/recommendations/bad%20id", "user_id: must be 1-128 characters"),
        ("/recommendations/" + "x" * 200, "user_id: must be 1-128 characters"),
    ],
)
def test_bad_get_requests_are_422_with_a_message(client: TestClient, path: str, message: str) -> None:
    response = client.get(path)
    assert response.status_code == 422
    assert message in response.json()["error"]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({}, "give a user_id, recent events, or both"),
        ({"user_id": "u1", "k": 500}, "k: Input should be less than or equal to 100"),
        ({"user_id": "u1", "colour": "red"}, "colour: Extra inputs are not permitted"),
        ({"events": [{"item_id": "../etc"}]}, "events.0.item_id: must be 1-128 characters"),
        (
            {"events": [{"item_id": "i1", "weight": -1}]},
            "events.0.weight: Input should be greater than or equal to 0",
        ),
        ({"events": [{"item_id": "i1"}] * 201}, "events: List should have at most 200 items"),
    ],
)
def test_bad_post_requests_are_422_with_a_message(client: TestClient, body: dict, message: str) -> None:
    response = client.post("/recommendations", json=body)
    assert response.status_code == 422
    assert message in response.json()["error"]


def test_malformed_and_oversized_bodies(client: TestClient) -> None:
    response = client.post(
        "/recommendations", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert response.status_code == 422 and "JSON" in response.json()["error"]
    huge = b'{"user_id": "u1", "pad": "' + b"x" * 70_000 + b'"}'
    response = client.post("/recommendations", content=huge, headers={"content-type": "application/json"})
    assert response.status_code == 413 and "exceeds 65536 bytes" in response.json()["error"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit applies while streaming
        yield b'{"user_id": "u1", "pad": "'
        for _ in range(20):
            yield b"x" * 5000
        yield b'"}'

    response = client.post("/recommendations", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413


def test_unavailable_until_a_bundle_is_promoted(store_uri: str) -> None:
    with TestClient(api.create_app(store_uri, DEFAULT_NAMESPACE, poll_seconds=3600)) as c:
        health = c.get("/healthz")
        assert health.status_code == 503 and health.json()["status"] == "unavailable"
        response = c.get("/recommendations/u1")
        assert response.status_code == 503 and "no bundle loaded" in response.json()["error"]
        publish.run_publish(*make_run(store_uri))
        c.app.state.holder.refresh()
        assert c.get("/recommendations/u1").status_code == 200


def test_new_current_is_served_without_restart(store_uri: str, first: Published) -> None:
    with TestClient(api.create_app(store_uri, DEFAULT_NAMESPACE, poll_seconds=0.2)) as c:
        assert c.get("/version").json()["version"] == first.version
        second = publish.run_publish(*make_run(store_uri, cutoff=datetime(2024, 2, 2, tzinfo=UTC), seed=1))
        deadline = time.monotonic() + 15
        while c.get("/version").json()["version"] != second.version:
            assert time.monotonic() < deadline, "the service did not pick up the new current"
            time.sleep(0.1)
        assert c.get("/recommendations/u1").json()["version"] == second.version
        publish.rollback(store_uri, DEFAULT_NAMESPACE)
        while c.get("/version").json()["version"] != first.version:
            assert time.monotonic() < deadline, "the service did not follow the rollback"
            time.sleep(0.1)


def readme_serving_examples() -> list[Any]:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("`llmrec serve --store URI`", 1)[1].split("\n## ", 1)[0]
    return [json.loads(block) for block in re.findall(r"```json\n(.*?)\n```", section, re.S)]


def test_readme_post_example_is_a_valid_request() -> None:
    """The README's POST body is what the API accepts (it once sent `recent`, a 422)."""
    body = readme_serving_examples()[0]
    request = api.RecommendRequest.model_validate(body)
    assert request.events and request.user_id == body["user_id"]


def test_readme_answer_example_is_a_valid_response() -> None:
    answer = api.RecommendationsOut.model_validate(readme_serving_examples()[1], strict=True)
    assert answer.items[0].signals and "“" in answer.items[0].reason


def resolve(spec: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    if "$ref" in schema:
        return spec["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    return schema


def assert_typed(spec: dict[str, Any], schema: dict[str, Any], where: str) -> None:
    """Every value in the schema has a type: no bare object, no untyped property, recursively."""
    schema = resolve(spec, schema)
    if "anyOf" in schema:
        for option in schema["anyOf"]:
            assert_typed(spec, option, where)
        return
    assert "type" in schema or "enum" in schema, f"{where}: untyped {schema}"
    if schema.get("type") == "object":
        assert schema.get("properties") or isinstance(schema.get("additionalProperties"), dict), (
            f"{where}: bare object"
        )
        for name, prop in schema.get("properties", {}).items():
            assert_typed(spec, prop, f"{where}.{name}")
        if isinstance(schema.get("additionalProperties"), dict):
            assert_typed(spec, schema["additionalProperties"], f"{where}.*")
    if schema.get("type") == "array":
        assert_typed(spec, schema["items"], f"{where}[]")


ROUTES = {
    ("get", "/healthz"): ("HealthOut", {503: "HealthOut"}),
    ("get", "/version"): ("VersionOut", {503: "ErrorOut"}),
    ("get", "/recommendations/{user_id}"): ("RecommendationsOut", {422: "ErrorOut", 503: "ErrorOut"}),
    ("post", "/recommendations"): ("RecommendationsOut", {413: "ErrorOut", 422: "ErrorOut", 503: "ErrorOut"}),
    ("post", "/events"): ("EventsAck", {413: "ErrorOut", 422: "ErrorOut", 503: "ErrorOut"}),
}


def test_openapi_names_a_typed_schema_for_every_response(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    routes = {(m, path) for path, ops in spec["paths"].items() for m in ops}
    assert routes == set(ROUTES)
    for (method, path), (ok, errors) in ROUTES.items():
        responses = spec["paths"][path][method]["responses"]
        assert set(responses) == {"200", *map(str, errors)}, path
        for code, name in {200: ok, **errors}.items():
            schema = responses[str(code)]["content"]["application/json"]["schema"]
            assert schema == {"$ref": f"#/components/schemas/{name}"}, (path, code)
            assert_typed(spec, schema, f"{method} {path} {code}")
    item = spec["components"]["schemas"]["ItemOut"]["properties"]
    assert set(item) == {"item_id", "score", "title", "reason", "signals"}
    assert item["signals"]["items"] == {"$ref": "#/components/schemas/SignalOut"}


def test_responses_validate_against_their_models(client: TestClient, store_uri: str) -> None:
    got = client.get("/recommendations/u1", params={"k": 3})
    api.RecommendationsOut.model_validate(got.json(), strict=True)
    posted = client.post("/recommendations", json={"events": [{"item_id": "i2"}, {"item_id": "zzz"}]})
    assert api.RecommendationsOut.model_validate(posted.json()).ignored_item_ids == ["zzz"]
    cold = api.RecommendationsOut.model_validate(client.get("/recommendations/nobody").json())
    assert cold.strategy == "popular" and all(i.signals == [] for i in cold.items)
    assert api.HealthOut.model_validate(client.get("/healthz").json()).status == "ok"
    version = api.VersionOut.model_validate(client.get("/version").json())
    assert version.metrics["ranker"]["ndcg@10"] == pytest.approx(0.30)
    for response in (
        client.get("/recommendations/u1?k=0"),
        client.post("/recommendations", json={}),
        client.post("/recommendations", content=b"x" * 70_000, headers={"content-type": "application/json"}),
    ):
        assert response.status_code in (413, 422)
        api.ErrorOut.model_validate(response.json(), strict=True)
    with TestClient(api.create_app(store_uri, "empty", poll_seconds=3600)) as empty:
        down = empty.get("/healthz")
        assert down.status_code == 503
        assert api.HealthOut.model_validate(down.json()) == api.HealthOut(status="unavailable", error=None)
        for response in (empty.get("/version"), empty.get("/recommendations/u1")):
            assert response.status_code == 503
            api.ErrorOut.model_validate(response.json(), strict=True)


# --- request id, bundle version header, metrics, access log ---------------------------------------


@pytest.mark.parametrize(
    ("header", "kept"),
    [
        (b"abc-123", True),
        (b"req.7:retry_2", True),
        (b"A" * 64, True),
        (b"A" * 65, False),
        (b"", False),
        (b"-leading-dash", False),
        (b"has space", False),
        (b"new\r\nline", False),
        (b"caf\xc3\xa9", False),
        (b"<script>", False),
    ],
)
def test_request_id_keeps_short_safe_ids_and_replaces_the_rest(header: bytes, kept: bool) -> None:
    rid = api.request_id(header)
    if kept:
        assert rid == header.decode()
    else:
        assert re.fullmatch(r"[0-9a-f]{32}", rid) and rid != api.request_id(header)  # a fresh uuid4


def test_request_id_and_bundle_version_are_echoed(client: TestClient, first: Published) -> None:
    got = client.get("/recommendations/u1", headers={"X-Request-ID": "trace-42"})
    assert got.headers["x-request-id"] == "trace-42" and got.json()["request_id"] == "trace-42"
    assert got.headers["x-bundle-version"] == got.json()["version"] == first.version
    posted = client.post("/recommendations", json={"events": [{"item_id": "i2"}]})
    rid = posted.headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", rid) and posted.json()["request_id"] == rid
    assert posted.headers["x-bundle-version"] == posted.json()["version"] == first.version
    refused = client.get("/recommendations/u1?k=0", headers={"X-Request-ID": "bad id"})
    assert refused.status_code == 422 and re.fullmatch(r"[0-9a-f]{32}", refused.headers["x-request-id"])
    assert "x-bundle-version" not in refused.headers


def scrape(client: TestClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """/metrics as {(sample name, sorted labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }


def test_metrics_count_requests_errors_stages_and_the_bundle(
    store_uri: str, client: TestClient, first: Published
) -> None:
    for _ in range(3):
        assert client.get("/recommendations/u1").status_code == 200
    assert client.get("/recommendations/u1?k=0").status_code == 422
    assert client.get("/nowhere").status_code == 404
    samples = scrape(client)
    route = "/recommendations/{user_id}"
    ok = (("method", "GET"), ("route", route), ("status", "200"))
    assert samples[("llmrec_requests_total", ok)] == 3
    assert samples[("llmrec_requests_total", (("method", "GET"), ("route", route), ("status", "422")))] == 1
    assert samples[("llmrec_request_errors_total", (("kind", "client"), ("route", route)))] == 1
    assert samples[("llmrec_request_errors_total", (("kind", "client"), ("route", "unmatched")))] == 1
    assert samples[("llmrec_request_duration_seconds_count", (("route", route),))] == 4
    inf = (("le", "+Inf"), ("route", route))
    assert samples[("llmrec_request_duration_seconds_bucket", inf)] == 4
    for stage in ("history", "scorer", "score", "reasons", "encode"):  # the toy scorer is one stage
        assert samples[("llmrec_stage_duration_seconds_count", (("stage", stage),))] == 3, stage
        assert samples[("llmrec_stage_duration_seconds_bucket", (("le", "0.128"), ("stage", stage)))] <= 3
    assert samples[("llmrec_bundle_info", (("version", first.version),))] == 1
    second = publish.run_publish(*make_run(store_uri, cutoff=datetime(2024, 2, 2, tzinfo=UTC), seed=1))
    assert client.app.state.holder.refresh()
    samples = scrape(client)
    assert samples[("llmrec_bundle_info", (("version", first.version),))] == 0
    assert samples[("llmrec_bundle_info", (("version", second.version),))] == 1


def test_an_unhandled_error_is_a_500_with_the_request_id_and_counted(
    store_uri: str, first: Published, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = api.create_app(store_uri, DEFAULT_NAMESPACE, poll_seconds=3600)
    with TestClient(app, raise_server_exceptions=False) as c:
        monkeypatch.setattr(app.state.holder.recommender, "recommend", lambda **_: 1 / 0)
        response = c.get("/recommendations/u1", headers={"X-Request-ID": "boom-1"})
        assert response.status_code == 500 and response.headers["x-request-id"] == "boom-1"
        assert response.json() == {"error": "internal error", "request_id": "boom-1"}
        samples = scrape(c)
    errors = (("kind", "server"), ("route", "/recommendations/{user_id}"))
    assert samples[("llmrec_request_errors_total", errors)] == 1


def test_each_request_is_one_json_access_line(
    client: TestClient, first: Published, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("INFO", logger="llmrec.access"):
        client.get("/recommendations/u1?k=3", headers={"X-Request-ID": "line-1"})
        client.post(
            "/recommendations", json={"events": [{"item_id": "i2"}]}, headers={"X-Request-ID": "line-2"}
        )
        client.get("/healthz", headers={"X-Request-ID": "line-3"})
    records = [r for r in caplog.records if r.name == "llmrec.access"]
    lines = [json.loads(r.getMessage()) for r in records]
    assert all("\n" not in r.getMessage() for r in records)
    got, posted, health = lines
    assert set(got) == {
        "time",
        "method",
        "path",
        "status",
        "duration_ms",
        "request_id",
        "bundle_version",
        "user_id",
    }
    assert (got["method"], got["path"], got["status"], got["request_id"]) == (
        "GET",
        "/recommendations/u1",
        200,
        "line-1",
    )
    assert got["bundle_version"] == first.version and got["user_id"] == "u1" and got["duration_ms"] > 0
    assert (posted["method"], posted["request_id"], posted["bundle_version"]) == (
        "POST",
        "line-2",
        first.version,
    )
    assert "user_id" not in posted  # the body named none
    assert (health["path"], health["bundle_version"], health["request_id"]) == ("/healthz", None, "line-3")
    assert "user_id" not in health


def test_the_access_log_config_writes_bare_json_lines_on_stdout() -> None:
    config = api.log_config()
    access = config["loggers"]["llmrec.access"]
    handler = config["handlers"][access["handlers"][0]]
    assert config["formatters"][handler["formatter"]] == {"format": "%(message)s"}
    assert access["propagate"] is False and handler["stream"] == "ext://sys.stdout"


def test_a_dead_workers_live_gauges_are_dropped(tmp_path: Path) -> None:
    import os

    from llmrec_tasks.serving import metrics

    dead_pid = 2**22 + 12345  # above the default pid_max: no such process
    for pid in (os.getpid(), dead_pid):
        (tmp_path / f"gauge_livemax_{pid}.db").write_bytes(b"")
        (tmp_path / f"counter_{pid}.db").write_bytes(b"")
    assert metrics.mark_dead_workers(tmp_path) == [dead_pid]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"gauge_livemax_{os.getpid()}.db", f"counter_{os.getpid()}.db", f"counter_{dead_pid}.db"]
    )  # the dead worker's counts stay in the sums
    metrics.reset_multiprocess_dir(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_serve_runs_uvicorn_workers_over_a_fresh_metrics_dir(
    store_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    import uvicorn

    seen: dict[str, Any] = {}

    def fake_run(app: str, **kwargs: Any) -> None:
        folder = os.environ["PROMETHEUS_MULTIPROC_DIR"]
        seen.update(kwargs, app=app, folder=folder, exists=Path(folder).is_dir())
        seen["env"] = {k: os.environ[k] for k in (api.STORE_ENV, api.NAMESPACE_ENV, api.POLL_ENV)}

    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    for key in (api.STORE_ENV, api.NAMESPACE_ENV, api.POLL_ENV):
        monkeypatch.delenv(key, raising=False)  # serve() sets them; restored after the test
    monkeypatch.setattr(uvicorn, "run", fake_run)
    api.serve(store_uri, "exp", "127.0.0.1", 8123, workers=2, poll_seconds=0.5)
    assert seen["app"] == api.APP_FACTORY and seen["factory"] is True and seen["workers"] == 2
    assert seen["access_log"] is False and seen["exists"]
    assert seen["env"] == {api.STORE_ENV: store_uri, api.NAMESPACE_ENV: "exp", api.POLL_ENV: "0.5"}
    assert not Path(seen["folder"]).exists() and "PROMETHEUS_MULTIPROC_DIR" not in os.environ
    app = api.app_from_env()  # what each worker builds from that environment
    assert app.state.holder.namespace == "exp" and app.state.holder.poll_seconds == 0.5
    with pytest.raises(api.ConfigError, match="workers must be at least 1"):
        api.serve(store_uri, workers=0)


def test_a_given_metrics_dir_is_emptied_at_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import uvicorn

    (tmp_path / "counter_1.db").write_bytes(b"old run")
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    for key in (api.STORE_ENV, api.NAMESPACE_ENV, api.POLL_ENV):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: None)
    api.serve("file:///nowhere", workers=2)
    assert tmp_path.is_dir() and list(tmp_path.iterdir()) == []


def test_the_worker_factory_needs_the_store(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(api.STORE_ENV, raising=False)
    with pytest.raises(api.ConfigError, match="llmrec serve --store"):
        api.app_from_env()


def test_recommendations_are_computed_on_one_thread_with_single_threaded_native_pools(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    from threadpoolctl import threadpool_info

    current = client.app.state.holder.recommender
    original = current.recommend
    seen: list[tuple[str, set[int]]] = []

    def spy(**kwargs: Any) -> Any:
        seen.append((threading.current_thread().name, {pool["num_threads"] for pool in threadpool_info()}))
        return original(**kwargs)

    monkeypatch.setattr(current, "recommend", spy)
    assert client.get("/recommendations/u1").status_code == 200
    assert client.post("/recommendations", json={"user_id": "u2"}).status_code == 200
    (first_thread, pools), (second_thread, _) = seen
    assert first_thread == second_thread and first_thread.startswith("llmrec-recommend")
    assert pools == {1}  # OpenBLAS and every OpenMP runtime (FAISS's, LightGBM's) at one thread
