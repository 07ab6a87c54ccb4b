"""Fixtures that start a real Airflow deployment (see ``airflow_proc.py``).

One deployment per executor, created on first use and kept for the session; at most one runs at a
time (asking for the Celery one stops the LocalExecutor one first: the machine has two cores), so
the tests are ordered: LocalExecutor tests (run, backfill, browser) first, then Celery.

Artifacts (screenshots, the logs of every Airflow process, task logs) go to
``<repo>/test-artifacts/deploy/`` (override with ``LLMREC_TEST_ARTIFACTS``). A failed test prints
the tails of the process logs and of the newest task logs in its report.

Skips (with the reason) when PostgreSQL, Redis or chromium is missing; on the project's machines
all are there, and ``LLMREC_REQUIRE_DEPLOY_TESTS=1`` turns such a skip into a failure (CI).
``LLMREC_TEST_DAGS_FOLDER`` runs the tests against another dags folder (e.g. a patched copy).
"""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.deploy.airflow_proc import (
    REPO_ROOT,
    AirflowDeployment,
    DeploymentError,
    postgres_available,
    redis_available,
    skip_or_fail,
)

DAG_ID = "llmrec_daily"
ARTIFACTS = Path(os.environ.get("LLMREC_TEST_ARTIFACTS", REPO_ROOT / "test-artifacts")) / "deploy"
# Tests that use the LocalExecutor deployment run first, in this order; then the Celery ones.
MODULE_ORDER = {"test_local_executor": 0, "test_backfill": 1, "test_browser": 2, "test_celery_executor": 3}
HERE = Path(__file__).resolve().parent
# The repo's dags by default; another folder (e.g. a patched copy) for experiments.
DAGS_FOLDER = Path(os.environ.get("LLMREC_TEST_DAGS_FOLDER") or REPO_ROOT / "dags")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test here ``integration`` + ``slow`` and order them (see the module docstring)."""
    positions = [i for i, item in enumerate(items) if HERE in Path(str(item.path)).resolve().parents]
    if not positions:
        return
    ours = [items[i] for i in positions]
    for item in ours:
        item.add_marker(pytest.mark.integration)
        item.add_marker(pytest.mark.slow)
    ordered = sorted(ours, key=lambda it: MODULE_ORDER.get(Path(str(it.path)).stem, 99))  # stable
    for i, item in zip(positions, ordered, strict=True):
        items[i] = item


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """On failure, append the Airflow process and task log tails to the report."""
    report = yield
    if call.when == "call":
        item.rep_call = report  # fixtures (the browser page) look at it in their teardown
    if report.failed and call.when in ("setup", "call"):
        for value in getattr(item, "funcargs", {}).values():
            if isinstance(value, AirflowDeployment):
                report.sections.append((f"airflow logs ({value.executor})", value.log_tails(60)))
                report.sections.append((f"task logs ({value.executor})", value.task_log_tails(40)))
    return report


class Deployments:
    """At most one running deployment; each executor's is started once and reused."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.started: dict[str, AirflowDeployment] = {}
        self.failed: dict[str, str] = {}
        self.current: AirflowDeployment | None = None

    def get(self, executor: str) -> AirflowDeployment:
        if executor in self.failed:
            pytest.fail(f"the {executor} deployment failed to start earlier:\n{self.failed[executor]}")
        dep = self.started.get(executor)
        if dep is not None and dep is self.current:
            return dep
        if dep is not None:
            pytest.fail(f"the {executor} deployment was already stopped (test order broken?)")
        if self.current is not None:
            self.current.stop()
            self.keep_logs(self.current)
        dep = AirflowDeployment(work_dir=self.base / executor, executor=executor, dags_folder=DAGS_FOLDER)
        self.started[executor] = dep
        self.current = dep
        try:
            dep.start()
            dep.wait_for_dag(DAG_ID, timeout=180)
            dep.unpause(DAG_ID)
        except (DeploymentError, AssertionError) as exc:
            self.failed[executor] = f"{exc}\n{dep.log_tails(60)}"
            dep.stop()
            self.keep_logs(dep)
            pytest.fail(f"could not start the {executor} deployment: {exc}\n{dep.log_tails(60)}")
        return dep

    @staticmethod
    def keep_logs(dep: AirflowDeployment) -> None:
        """Process and task logs to the artifacts folder (CI keeps them)."""
        target = ARTIFACTS / f"logs-{dep.executor}"
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True, exist_ok=True)
        if dep.log_dir.exists():
            shutil.copytree(dep.log_dir, target / "processes")
        if (dep.home / "logs").exists():
            shutil.copytree(dep.home / "logs", target / "tasks")

    def close(self) -> None:
        for dep in self.started.values():
            dep.stop()
            if dep is self.current:
                self.keep_logs(dep)
            dep.cleanup_database()
        self.current = None


def _raise_on_sigterm(signum, frame):  # pragma: no cover - only when CI kills the run
    raise SystemExit(128 + signum)


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    """``test-artifacts/deploy/``. Files have fixed names and are overwritten; only the failure
    screenshots of an earlier session are removed (nothing else: another session in the same
    checkout may be writing here)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for stale in [
        *ARTIFACTS.glob("browser-FAILED-*.png"),
        *ARTIFACTS.glob("browser-*-invalid.png"),
        *ARTIFACTS.glob("browser-*-closed-*.png"),
    ]:
        stale.unlink(missing_ok=True)
    return ARTIFACTS


@pytest.fixture(scope="session")
def deployments(tmp_path_factory: pytest.TempPathFactory, artifacts_dir: Path) -> Iterator[Deployments]:
    if reason := postgres_available():
        skip_or_fail(reason)
    if not (DAGS_FOLDER / f"{DAG_ID}.py").is_file():
        skip_or_fail(f"{DAGS_FOLDER}/{DAG_ID}.py does not exist yet")
    manager = Deployments(tmp_path_factory.mktemp("airflow"))
    # A SIGTERM (CI timeout, Ctrl-\ of a wrapper) must still run the teardown below: the Airflow
    # processes live in their own sessions and would otherwise outlive pytest.
    previous = signal.signal(signal.SIGTERM, _raise_on_sigterm)
    try:
        yield manager
    finally:
        manager.close()
        signal.signal(signal.SIGTERM, previous)


@pytest.fixture
def local_airflow(deployments: Deployments) -> AirflowDeployment:
    """The LocalExecutor deployment (parallelism 2), with ``llmrec_daily`` parsed and unpaused."""
    return deployments.get("LocalExecutor")


@pytest.fixture
def celery_airflow(deployments: Deployments) -> AirflowDeployment:
    """The CeleryExecutor deployment (Redis broker, Postgres result backend, one worker)."""
    if reason := redis_available():
        skip_or_fail(reason)
    return deployments.get("CeleryExecutor")


@pytest.fixture(scope="session")
def results() -> dict:
    """Outcomes shared between tests (e.g. the LocalExecutor run's bundle, for comparisons)."""
    return {}
