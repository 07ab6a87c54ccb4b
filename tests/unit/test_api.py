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
