"""``llmrec_daily`` publishing to a real S3-compatible server (moto in server mode) through the
``aws_default`` connection: publish and promote; the service on that bundle takes a click (the next
response changes at once), `flush-events` moves it to the store, and the second run trains on it,
each event id once; rollback, a corrupt file refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from llmrec_tasks import publish
from llmrec_tasks.core import constants as C
from llmrec_tasks.core.errors import BundleError
from llmrec_tasks.feedback import flush_events
from llmrec_tasks.serving import api
from llmrec_tasks.serving.recommender import Bundle, load_bundle
from llmrec_tasks.storage.registry import bundle_prefix, run_prefix
from llmrec_tasks.storage.store import BUNDLE_CACHE_ENV, open_store
from tests.dags.test_dag_e2e import SHORT_SEQ, run_dag

pytestmark = [pytest.mark.slow, pytest.mark.integration]

CONF = {"ranker_n_estimators": 60, "ranker_train_windows": 2, **SHORT_SEQ}
# Distinctive credentials (moto accepts any): none may appear in a log or a stored object.
ACCESS_KEY, SECRET_KEY = "AKIALLMRECCANARY7Q2", "llmrec-canary-secret-5f0d9c"
NS = C.DEFAULT_NAMESPACE
DAYS = ("2026-10-30T00:00:00+00:00", "2026-11-01T00:00:00+00:00")
# Served between the two runs: after the sample's last interaction, before the second run's cutoff.
FEEDBACK_AT = "2026-10-31T12:00:00+00:00"
USER, NEWCOMER = "u0001", "loop-newcomer"


def serve_and_flush(store_uri: str, log_dir: Path) -> str:
    """The service on the current bundle (embedded state): a click changes the very next response;
    stopped, its log is flushed. Restarted (the state is empty), the client's retry of the same
    click is accepted again and flushed again: the store holds that event id twice. Returns the
    clicked item."""
    app = api.create_app(store_uri, NS, poll_seconds=3600)
    with TestClient(app) as client:
        before = client.get(f"/recommendations/{USER}", params={"k": 100}).json()
        clicked = before["items"][-1]["item_id"]
        click = {"event_id": "loop-click", "user_id": USER, "item_id": clicked, "type": "click"}
        view = {"event_id": "loop-view", "user_id": NEWCOMER, "item_id": clicked, "type": "view"}
        batch = [{**e, "timestamp": FEEDBACK_AT} for e in (click, view)]
        assert client.post("/events", json={"events": batch}).json()["accepted"] == 2
        after = client.get(f"/recommendations/{USER}", params={"k": 100}).json()
        assert after["history_length"] == before["history_length"] + 1
        assert clicked not in [i["item_id"] for i in after["items"]]
    assert flush_events(store_uri, NS, log_dir).events == 2
    with TestClient(api.create_app(store_uri, NS, poll_seconds=3600)) as client:
        assert client.post("/events", json={"events": batch[:1]}).json()["accepted"] == 1
    assert flush_events(store_uri, NS, log_dir).events == 1
    return clicked


def history_items(bundle: Bundle, user_id: str) -> list[str]:
    return [bundle.item_ids[row] for row in bundle.history(user_id).items]


def test_dag_runs_publish_to_s3_train_on_served_feedback_and_roll_back(
    tmp_path, s3_store_uri, moto_server, sample_folder, feedback_log_dir, monkeypatch
):
    connection = {
        "conn_type": "aws",
        "login": ACCESS_KEY,
        "password": SECRET_KEY,
        "extra": {"endpoint_url": moto_server, "region_name": "us-east-1"},
    }
    # Inside Airflow the endpoint and credentials come from the connection only.
    env = {"AIRFLOW_CONN_AWS_DEFAULT": json.dumps(connection), "AWS_ENDPOINT_URL": "http://127.0.0.1:9"}
    conf = {**CONF, "data_uri": str(sample_folder), "store_uri": s3_store_uri, "feedback_ingest": True}
    versions, bundles = [], []
    for day in DAYS:
        if bundles:  # between the runs: served feedback reaches the store
            clicked = serve_and_flush(s3_store_uri, feedback_log_dir)
        folder = tmp_path / day[:10]
        folder.mkdir()
        (run,) = run_dag(folder, {"logical_date": day, "conf": conf}, timeout=1200, env_extra=env)
        published = run["xcom"]["publish[-1]"]
        assert published["promoted"] is True, published["reason"]
        versions.append(published["version"])
        # The serving side loads the current bundle, verifying every checksum in the manifest.
        bundles.append(load_bundle(s3_store_uri, NS))
        assert bundles[-1].version == published["version"]
    assert versions[0] != versions[1]

    # The second run trained on the flushed events, each event id once (3 rows flushed, 2 ids).
    store = open_store(s3_store_uri)
    summary = json.loads(store.get_bytes(f"{run_prefix(NS, versions[1])}/{C.VALIDATION_SUMMARY}"))
    assert summary["feedback"] == {"events": 2, "unknown_items": 0}
    counts = [b.manifest["lineage"]["counts"][C.INTERACTIONS] for b in bundles]
    assert counts[1] == counts[0] + 2, counts
    assert clicked not in history_items(bundles[0], USER)
    assert history_items(bundles[1], USER)[-1] == clicked  # its latest interaction
    assert history_items(bundles[1], NEWCOMER) == [clicked] and not history_items(bundles[0], NEWCOMER)

    publish.rollback(s3_store_uri, NS)
    assert load_bundle(s3_store_uri, NS).version == versions[0]

    key = f"{bundle_prefix(NS, versions[1])}/ranker.txt"
    data = bytearray(store.get_bytes(key))
    data[len(data) // 2] ^= 0x01
    store.put_bytes(key, bytes(data))
    # This process cached a verified copy above (it keeps serving that); a fresh host refuses the object.
    monkeypatch.setenv(BUNDLE_CACHE_ENV, str(tmp_path / "empty-cache"))
    with pytest.raises(BundleError, match=r"ranker\.txt"):
        load_bundle(s3_store_uri, NS, versions[1])

    # Credential scan: every object the runs wrote (bundles, work folders, reports, Data Docs) and
    # every log of the runs.
    keys = store.list("")
    assert any(key.endswith("report.html") for key in keys) and any("/validation/" in key for key in keys)
    for key in keys:
        data = store.get_bytes(key)
        assert ACCESS_KEY.encode() not in data and SECRET_KEY.encode() not in data, key
    logs = [p for p in tmp_path.rglob("*") if p.is_file() and (p.suffix == ".log" or "logs" in p.parts)]
    assert logs
    for path in logs:
        text = path.read_bytes()
        assert ACCESS_KEY.encode() not in text and SECRET_KEY.encode() not in text, path
