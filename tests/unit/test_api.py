"""HTTP service: endpoints, 4xx on bad requests, hot reload of `current`."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

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
    assert set(body["items"][0]) == {"item_id", "score", "reason", "title"}
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


def test_readme_post_example_is_a_valid_request() -> None:
    """The README's POST body is what the API accepts (it once sent `recent`, a 422)."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("`llmrec serve --store URI`", 1)[1]
    body = json.loads(re.search(r"```json\n(.*?)\n```", section, re.S).group(1))
    request = api.RecommendRequest.model_validate(body)
    assert request.events and request.user_id == body["user_id"]
