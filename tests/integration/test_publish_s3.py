"""Publishing and serving on a real S3-compatible server (moto server mode).

The "done when" path: a run publishes, the check passes and `current` moves; a second run
publishes a new version; rollback returns `current` to the first; a corrupted file makes loading
fail loudly (on a host without a verified cached copy); the HTTP service answers real requests from the current bundle.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from llmrec_tasks import publish
from llmrec_tasks.core.constants import DEFAULT_NAMESPACE, MANIFEST, RANKER_MODEL
from llmrec_tasks.core.errors import BundleError, StoreError
from llmrec_tasks.serving import api
from llmrec_tasks.serving import recommender as serving
from llmrec_tasks.storage import registry
from llmrec_tasks.storage.registry import bundle_prefix, current_key
from llmrec_tasks.storage.store import BUNDLE_CACHE_ENV, open_store
from tests.bundle_factory import make_run, race
from tests.s3server import FlakyProxy, create_bucket, free_port

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("toy_ranker_features")]
NS = DEFAULT_NAMESPACE
DAY1 = datetime(2024, 2, 1, tzinfo=UTC)
DAY2 = datetime(2024, 2, 2, tzinfo=UTC)


@pytest.fixture
def http_service(s3_store_uri: str) -> Iterator[str]:
    """`llmrec serve` in a thread: uvicorn on a free port, polling `current` every 0.2 s."""
    import uvicorn

    app = api.create_app(s3_store_uri, NS, poll_seconds=0.2)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def wait_for_version(base: str, version: str) -> None:
    deadline = time.monotonic() + 15
    while httpx.get(f"{base}/healthz").json().get("version") != version:
        assert time.monotonic() < deadline, f"service did not move to {version}"
        time.sleep(0.1)


def test_publish_promote_rollback_corrupt_and_serve(
    s3_store_uri: str, http_service: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert httpx.get(f"{http_service}/healthz").status_code == 503  # nothing promoted yet

    first = publish.run_publish(*make_run(s3_store_uri, cutoff=DAY1))
    assert first.promoted and first.check["queries"] >= 3
    assert first.bundle_uri == f"{s3_store_uri}/{NS}/bundles/{first.version}"
    wait_for_version(http_service, first.version)
    response = httpx.get(f"{http_service}/recommendations/u1", params={"k": 5})
    assert response.status_code == 200 and len(response.json()["items"]) == 5

    second = publish.run_publish(*make_run(s3_store_uri, cutoff=DAY2, seed=1))
    assert second.promoted and second.version != first.version
    wait_for_version(http_service, second.version)
    posted = httpx.post(f"{http_service}/recommendations", json={"events": [{"item_id": "i4"}], "k": 3})
    assert posted.status_code == 200 and posted.json()["version"] == second.version
    assert httpx.get(f"{http_service}/recommendations/u1", params={"k": 0}).status_code == 422

    versions = registry.list_versions(s3_store_uri, NS)
    assert [(v["version"], v["current"]) for v in versions] == [
        (first.version, False),
        (second.version, True),
    ]

    back = publish.rollback(s3_store_uri, NS)
    assert back["version"] == first.version
    wait_for_version(http_service, first.version)

    store = open_store(s3_store_uri)
    key = f"{bundle_prefix(NS, second.version)}/{RANKER_MODEL}"
    data = bytearray(store.get_bytes(key))
    data[100] ^= 0x20
    store.put_bytes(key, bytes(data))
    # This host holds a copy checked against the manifest: it keeps loading exactly what was
    # published. A host without one (an empty cache) downloads the damaged object and refuses it.
    assert serving.load_bundle(s3_store_uri, NS, second.version).version == second.version
    monkeypatch.setenv(BUNDLE_CACHE_ENV, str(tmp_path / "empty-cache"))
    with pytest.raises(BundleError, match=r"corrupt: sha256 of ranker\.txt"):
        serving.load_bundle(s3_store_uri, NS, second.version)
    with pytest.raises(BundleError, match="corrupt"):
        publish.promote(s3_store_uri, NS, second.version)  # the check refuses it
    assert registry.read_pointer(store, NS)[0]["version"] == first.version
    assert httpx.get(f"{http_service}/version").json()["version"] == first.version


def test_flaky_store_during_publish_is_retried(flaky_proxy: FlakyProxy) -> None:
    uri = f"s3://{create_bucket(flaky_proxy.endpoint)}/llmrec"
    args = make_run(uri)
    flaky_proxy.plan.fail_next = 3  # PUTs while copying the bundle answer 503
    flaky_proxy.plan.only_method = "PUT"
    flaky_proxy.plan.delay_s = 0.05
    result = publish.run_publish(*args)
    assert result.promoted and flaky_proxy.plan.failed == 3
    serving.load_bundle(uri, NS)  # complete and verified


def test_store_down_mid_publish_leaves_nothing_visible(flaky_proxy: FlakyProxy) -> None:
    uri = f"s3://{create_bucket(flaky_proxy.endpoint)}/llmrec"
    first = publish.run_publish(*make_run(uri, cutoff=DAY1))
    args = make_run(uri, cutoff=DAY2, seed=1)
    store = open_store(uri)
    prefix = bundle_prefix(NS, args[1].version)

    writes = {"n": 0}
    real_put = store.put_file.__func__  # type: ignore[attr-defined]

    def put_then_fail(self: object, key: str, path: Path, **kwargs: object) -> str:
        if key.startswith(prefix):
            writes["n"] += 1
            if writes["n"] == 4:  # the store goes down after three bundle files
                flaky_proxy.plan.fail_next = 10_000
        return real_put(self, key, path, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(type(store), "put_file", put_then_fail)
        with pytest.raises(StoreError):
            publish.run_publish(*args)
    flaky_proxy.plan.fail_next = 0
    assert 3 <= len(store.list(prefix)) < 12 and not store.exists(f"{prefix}/{MANIFEST}")
    rows = {r["version"]: r for r in registry.list_versions(uri, NS)}
    assert rows[args[1].version]["complete"] is False
    assert registry.read_pointer(store, NS)[0]["version"] == first.version
    with pytest.raises(BundleError, match="not published"):
        serving.load_bundle(uri, NS, args[1].version)
    # The cleared task re-runs once the store is back: the bundle completes and is promoted.
    again = publish.run_publish(*args)
    assert again.promoted and again.status == "published"


def test_racing_promotions_on_s3_have_exactly_one_winner(s3_store_uri: str) -> None:
    store = open_store(s3_store_uri)
    registry.swap_current(store, NS, {"version": "v0"}, None)
    for trial in range(10):
        _, etag = store.get_with_etag(current_key(NS))
        versions = [f"v{trial}-{i}" for i in range(3)]
        winners = race(
            [functools.partial(registry.swap_current, store, NS, {"version": v}, etag) for v in versions]
        )
        assert len(winners) == 1
        assert registry.read_pointer(store, NS)[0] == {"version": versions[winners[0]]}


def test_gc_on_s3(s3_store_uri: str) -> None:
    versions = [
        publish.run_publish(*make_run(s3_store_uri, cutoff=d, seed=i)).version
        for i, d in enumerate([DAY1, DAY2, datetime(2024, 2, 3, tzinfo=UTC)])
    ]
    result = registry.gc(s3_store_uri, NS, keep=1)
    # current (the newest) and the rollback target survive
    assert result["deleted"] == versions[:1] and result["kept"] == versions[1:]
    assert not open_store(s3_store_uri).list(bundle_prefix(NS, versions[0]))
