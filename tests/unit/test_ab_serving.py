"""A/B serving: the service answers each user from its experiment arm (current or challenger),
says so in the response and the impression, and follows experiment changes and the promote."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import pytest
from fastapi.testclient import TestClient

from llmrec_tasks import publish
from llmrec_tasks.core import constants as C
from llmrec_tasks.core.constants import DEFAULT_NAMESPACE
from llmrec_tasks.core.results import Published
from llmrec_tasks.feedback import flush_events
from llmrec_tasks.serving import api
from llmrec_tasks.storage import registry
from tests.bundle_factory import make_run

pytestmark = pytest.mark.usefixtures("toy_ranker_features")

USERS = [f"u{i}" for i in range(20)]


@pytest.fixture
def versions(store_uri: str) -> tuple[Published, Published]:
    first = publish.run_publish(*make_run(store_uri))
    second = publish.run_publish(
        *make_run(store_uri, cutoff=datetime(2024, 2, 2, tzinfo=UTC), seed=1, promote=False)
    )
    return first, second


@pytest.fixture
def client(
    store_uri: str, versions: tuple[Published, Published], feedback_log_dir: Path
) -> Iterator[TestClient]:
    with TestClient(api.create_app(store_uri, DEFAULT_NAMESPACE, poll_seconds=3600)) as c:
        yield c


def test_both_arms_answer_with_their_version_and_arm(
    client: TestClient, store_uri: str, versions: tuple[Published, Published], feedback_log_dir: Path
) -> None:
    first, second = versions
    experiment = registry.start_experiment(store_uri, DEFAULT_NAMESPACE, "exp1", second.version, 0.5)
    assert client.app.state.holder.refresh() is True
    expected = {u: registry.assign_arm(experiment, u) for u in USERS}
    assert set(expected.values()) == set(C.ARMS)  # both arms among 20 users (fixed salt)
    version_of = {C.CURRENT_ARM: first.version, C.CHALLENGER_ARM: second.version}
    for user in USERS:
        body = client.get(
            f"/recommendations/{user}", params={"k": 3}, headers={"X-Request-ID": f"r-{user}"}
        ).json()
        assert (body["arm"], body["version"]) == (expected[user], version_of[expected[user]]), user
    anonymous = client.post("/recommendations", json={"events": [{"item_id": "i2"}]}).json()
    assert anonymous["arm"] == C.CURRENT_ARM and anonymous["version"] == first.version
    assert client.get("/version").json()["experiment"]["challenger"] == second.version

    client.app.state.feedback_log.close()
    flush_events(store_uri, DEFAULT_NAMESPACE, feedback_log_dir)
    root = (
        Path(store_uri.removeprefix("file://")) / DEFAULT_NAMESPACE / C.FEEDBACK_DIR / C.FEEDBACK_IMPRESSIONS
    )
    rows = pd.concat([pd.read_parquet(f) for f in sorted(root.rglob("*.parquet"))])
    logged = rows[rows[C.REQUEST_ID].str.startswith("r-")].drop_duplicates(C.REQUEST_ID)
    assert dict(zip(logged[C.USER_ID], logged[C.ARM], strict=True)) == expected
    assert all(version_of[arm] == v for arm, v in zip(logged[C.ARM], logged[C.VERSION], strict=True))


def test_promoting_the_challenger_ends_the_experiment_in_the_service(
    client: TestClient, store_uri: str, versions: tuple[Published, Published]
) -> None:
    second = versions[1]
    registry.start_experiment(store_uri, DEFAULT_NAMESPACE, "exp1", second.version, 1.0)
    holder = client.app.state.holder
    assert holder.refresh() is True and holder.refresh() is False
    assert client.get("/recommendations/u1").json()["arm"] == C.CHALLENGER_ARM
    promoted = publish.promote(store_uri, DEFAULT_NAMESPACE, second.version, check=False)
    assert promoted["experiment_ended"] == "exp1"
    assert holder.refresh() is True and holder.challenger is None
    body = client.get("/recommendations/u1").json()
    assert (body["arm"], body["version"]) == (C.CURRENT_ARM, second.version)
    assert client.get("/version").json()["experiment"] is None


def test_a_challenger_that_fails_to_load_leaves_everyone_on_current(
    client: TestClient, store_uri: str, versions: tuple[Published, Published]
) -> None:
    first, second = versions
    registry.start_experiment(store_uri, DEFAULT_NAMESPACE, "exp1", second.version, 1.0)
    key = registry.bundle_key(DEFAULT_NAMESPACE, second.version, C.RANKER_MODEL)
    Path(store_uri.removeprefix("file://"), key).write_bytes(b"garbage")
    holder = client.app.state.holder
    holder.refresh()
    assert holder.challenger is None and "challenger" in holder.last_error
    body = client.get("/recommendations/u1").json()
    assert (body["arm"], body["version"]) == (C.CURRENT_ARM, first.version)
    assert client.get("/healthz").json()["status"] == "degraded"
