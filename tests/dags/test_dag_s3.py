"""``llmrec_daily`` publishing to a real S3-compatible server (moto in server mode) through the
``aws_default`` connection: publish and promote, a second version, rollback, a corrupt file refused."""

from __future__ import annotations

import json

import pytest

from llmrec_tasks import publish
from llmrec_tasks.core.errors import BundleError
from llmrec_tasks.serving.recommender import load_bundle
from llmrec_tasks.storage.registry import bundle_prefix
from llmrec_tasks.storage.store import BUNDLE_CACHE_ENV, open_store
from tests.dags.test_dag_e2e import run_dag

pytestmark = [pytest.mark.slow, pytest.mark.integration]

CONF = {"ranker_n_estimators": 60, "ranker_train_windows": 2}
# Distinctive credentials (moto accepts any): none may appear in a log or a stored object.
ACCESS_KEY, SECRET_KEY = "AKIALLMRECCANARY7Q2", "llmrec-canary-secret-5f0d9c"


def test_dag_runs_publish_to_s3_promote_and_roll_back(
    tmp_path, s3_store_uri, moto_server, sample_folder, monkeypatch
):
    connection = {
        "conn_type": "aws",
        "login": ACCESS_KEY,
        "password": SECRET_KEY,
        "extra": {"endpoint_url": moto_server, "region_name": "us-east-1"},
    }
    # Inside Airflow the endpoint and credentials come from the connection only.
    env = {"AIRFLOW_CONN_AWS_DEFAULT": json.dumps(connection), "AWS_ENDPOINT_URL": "http://127.0.0.1:9"}
    conf = {**CONF, "data_uri": str(sample_folder), "store_uri": s3_store_uri}  # production: real data
    versions = []
    for day in ("2026-10-30T00:00:00+00:00", "2026-11-01T00:00:00+00:00"):
        folder = tmp_path / day[:10]
        folder.mkdir()
        (run,) = run_dag(folder, {"logical_date": day, "conf": conf}, timeout=1200, env_extra=env)
        published = run["xcom"]["publish[-1]"]
        assert published["promoted"] is True, published["reason"]
        versions.append(published["version"])
        # The serving side loads the current bundle, verifying every checksum in the manifest.
        assert load_bundle(s3_store_uri, "production").version == published["version"]
    assert versions[0] != versions[1]

    publish.rollback(s3_store_uri, "production")
    assert load_bundle(s3_store_uri, "production").version == versions[0]

    store = open_store(s3_store_uri)
    key = f"{bundle_prefix('production', versions[1])}/ranker.txt"
    data = bytearray(store.get_bytes(key))
    data[len(data) // 2] ^= 0x01
    store.put_bytes(key, bytes(data))
    # This process cached a verified copy above (it keeps serving that); a fresh host refuses the object.
    monkeypatch.setenv(BUNDLE_CACHE_ENV, str(tmp_path / "empty-cache"))
    with pytest.raises(BundleError, match=r"ranker\.txt"):
        load_bundle(s3_store_uri, "production", versions[1])

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
