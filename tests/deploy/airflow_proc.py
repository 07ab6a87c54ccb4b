"""Start and stop a real Airflow 3.3 deployment (PostgreSQL metadata DB, api-server, scheduler,
dag-processor, optionally a Celery worker) for the deployment tests, and talk to its REST API.

Used by ``tests/deploy/conftest.py``; also runnable by hand to get a throwaway deployment::

    .venv/bin/python -m tests.deploy.airflow_proc --executor LocalExecutor   # Ctrl-C stops it

Every process runs in its own session (process group) with its output in ``<work_dir>/logs``;
``stop()`` terminates the whole group (and any stray descendants), so nothing outlives the tests.
Nothing here touches ``~/airflow``: AIRFLOW_HOME is ``<work_dir>/home``.

Airflow 3.3 notes (found while writing this, keep them in mind when changing it):

- A ``postgresql+psycopg2://`` metadata DB also needs the ``asyncpg`` driver: Airflow derives
  ``sql_alchemy_conn_async`` (``postgresql+asyncpg://``) from it at import time, and every CLI call
  fails with ``ModuleNotFoundError: No module named 'asyncpg'`` without it (normally pulled in by
  ``apache-airflow[postgres]``): requirements.txt needs ``asyncpg``.
- The simple auth manager generates a random password on first start; we write its password file
  (``[core] simple_auth_manager_passwords_file``) ourselves beforehand so the password is known.
- Workers (LocalExecutor children, Celery workers) reach the api-server's Execution API: the
  ``[core] execution_api_server_url`` and ``[api_auth] jwt_secret`` must agree across processes.
- Each LocalExecutor scheduler / Celery worker serves task logs on ``[logging]
  worker_log_server_port`` (8793 by default): we give each deployment a free port so two
  engineers' deployments on one machine do not collide.
- CeleryExecutor: ``apache-airflow-providers-celery`` 3.26.0 (the newest) does
  ``from celery.backends.database import retry``, a decorator that celery 5.7.0 removed (its
  DatabaseBackend now retries by itself), so with celery 5.7 the scheduler cannot even load the
  executor ("cannot import name 'retry' from 'celery.backends.database'", then "The module/attribute
  could not be loaded ... Current value: ':CeleryExecutor:'"). requirements.txt pins
  ``celery==5.6.3`` for that; for environments that still get 5.7, every deployment here also
  gets an ``airflow_local_settings.py`` (imported by each Airflow process before the executor)
  that puts celery 5.6's ``retry`` back when it is missing (a no-op on celery < 5.7).
- A ``db+postgresql://`` Celery result backend means psycopg 3 under SQLAlchemy 2.1 (not
  installed): the URL names ``postgresql+psycopg2`` explicitly.
- OpenMP threads spin while waiting by default; with two task processes on two busy cores that
  made LightGBM ~5x slower, so the workers get ``OMP_WAIT_POLICY=PASSIVE``.
- The dag-processor's bundle storage defaults to ``$TMPDIR/airflow``, shared by everyone on the
  machine: we point it into the work dir.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

REPO_ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
PG_HOST = os.environ.get("LLMREC_TEST_PG_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("LLMREC_TEST_PG_PORT", "5432"))
PG_USER = os.environ.get("LLMREC_TEST_PG_USER", "postgres")
REDIS_HOST = os.environ.get("LLMREC_TEST_REDIS_HOST", "127.0.0.1")
REDIS_PORT = int(os.environ.get("LLMREC_TEST_REDIS_PORT", "6379"))
REDIS_DB = int(os.environ.get("LLMREC_TEST_REDIS_DB", "11"))
ADMIN_USER = "admin"
ADMIN_PASSWORD = "llmrec-test-admin"  # written into the simple auth manager's password file

TERMINAL_RUN_STATES = {"success", "failed"}

# Written to AIRFLOW_HOME/config/airflow_local_settings.py (see the module docstring).
LOCAL_SETTINGS = '''"""Test deployment local settings (tests/deploy/airflow_proc.py): celery 5.7 shim."""
import functools
import logging

try:
    import celery.backends.database as _celery_db
except Exception:  # celery not installed: nothing to patch
    _celery_db = None

if _celery_db is not None and not hasattr(_celery_db, "retry"):
    from sqlalchemy.exc import DatabaseError, InterfaceError, OperationalError

    _log = logging.getLogger("llmrec.celery_shim")

    def retry(fun):
        """celery 5.6's DatabaseBackend retry decorator (removed in 5.7, still imported by the provider)."""

        @functools.wraps(fun)
        def _inner(*args, **kwargs):
            max_retries = kwargs.pop("max_retries", 3)
            for attempt in range(max_retries):
                try:
                    return fun(*args, **kwargs)
                except (DatabaseError, InterfaceError, OperationalError):
                    _log.warning("Failed operation %s, retrying", fun.__name__, exc_info=True)
                    if attempt + 1 >= max_retries:
                        raise

        return _inner

    _celery_db.retry = retry
'''


class DeploymentError(RuntimeError):
    """A process died, a wait timed out or the API answered unexpectedly."""


def port_open(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(
    predicate: Callable[[], Any],
    timeout: float,
    what: str,
    interval: float = 1.0,
    check: Callable | None = None,
) -> Any:
    """Poll ``predicate`` until it returns something truthy; ``check`` may raise early (dead process)."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        if check is not None:
            check()
        try:
            value = predicate()
        except (requests.RequestException, DeploymentError) as exc:  # not up yet
            last_exc = exc
            value = None
        if value:
            return value
        time.sleep(interval)
    raise DeploymentError(f"timed out after {timeout:.0f}s waiting for {what} (last error: {last_exc!r})")


def _pg_connect(dbname: str = "postgres"):
    import psycopg2

    conn = psycopg2.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname=dbname, connect_timeout=5)
    conn.autocommit = True
    return conn


def skip_or_fail(reason: str) -> None:
    """pytest.skip, or pytest.fail when ``LLMREC_REQUIRE_DEPLOY_TESTS=1`` (CI must run these)."""
    import pytest

    if os.environ.get("LLMREC_REQUIRE_DEPLOY_TESTS") == "1":
        pytest.fail(f"{reason} (LLMREC_REQUIRE_DEPLOY_TESTS=1)")
    pytest.skip(reason)


def postgres_available() -> str | None:
    """None when PostgreSQL answers, else the reason."""
    try:
        _pg_connect().close()
    except Exception as exc:  # ImportError, OperationalError
        return f"PostgreSQL not reachable at {PG_USER}@{PG_HOST}:{PG_PORT}: {exc}"
    return None


def redis_available() -> str | None:
    try:
        import redis

        redis.Redis(host=REDIS_HOST, port=REDIS_PORT, socket_timeout=3).ping()
    except Exception as exc:
        return f"Redis not reachable at {REDIS_HOST}:{REDIS_PORT}: {exc}"
    return None


def recreate_database(name: str) -> None:
    drop_database(name)
    conn = _pg_connect()
    try:
        with conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
    finally:
        conn.close()


DB_PREFIX = "llmrec_airflow_test"


def drop_stale_databases() -> list[str]:
    """Drop test databases left by a run killed before its teardown: the process that created
    one (its pid is in the name) is gone and nothing is connected to it."""
    conn = _pg_connect()
    dropped = []
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT datname FROM pg_database d WHERE datname LIKE %s AND NOT EXISTS "
                "(SELECT 1 FROM pg_stat_activity a WHERE a.datname = d.datname)",
                (DB_PREFIX + "\\_%",),
            )
            names = [row[0] for row in cur.fetchall()]
    finally:
        conn.close()
    for name in names:
        parts = name[len(DB_PREFIX) + 1 :].split("_")
        if len(parts) != 3 or not parts[1].isdigit():
            continue
        pid = int(parts[1])
        try:
            os.kill(pid, 0)
            continue  # still running
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        drop_database(name)
        dropped.append(name)
    return dropped


def drop_database(name: str) -> None:
    conn = _pg_connect()
    try:
        with conn.cursor() as cur:
            # Connections left by a killed run would block DROP DATABASE.
            cur.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
                (name,),
            )
            cur.execute(f'DROP DATABASE IF EXISTS "{name}"')
    finally:
        conn.close()


def tail(path: Path, lines: int = 60) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError as exc:
        return f"<cannot read {path}: {exc}>"
    return "\n".join(text[-lines:])


def _terminate_group(proc: subprocess.Popen, grace: float = 20.0) -> None:
    """SIGTERM the process group (and every descendant), wait, then SIGKILL what is left."""
    try:
        import psutil

        descendants = psutil.Process(proc.pid).children(recursive=True)
    except Exception:
        descendants = []
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)
    for child in descendants:  # children that left the group (setsid) get it too
        with contextlib.suppress(Exception):
            child.terminate()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    for child in descendants:
        with contextlib.suppress(Exception):
            if child.is_running():
                child.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


@dataclass
class AirflowDeployment:
    """One Airflow deployment: its own database, AIRFLOW_HOME, ports and processes."""

    work_dir: Path
    executor: str = "LocalExecutor"
    dags_folder: Path = REPO_ROOT / "dags"
    plugins_folder: Path = REPO_ROOT / "plugins"
    db_name: str = ""
    store_uri: str = ""
    parallelism: int = 2
    extra_env: dict[str, str] = field(default_factory=dict)

    procs: dict[str, subprocess.Popen] = field(default_factory=dict, init=False)
    port: int = field(default=0, init=False)
    queue: str = field(default="", init=False)
    _token: str | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.work_dir = Path(self.work_dir)
        self.home = self.work_dir / "home"
        self.log_dir = self.work_dir / "logs"
        suffix = uuid.uuid4().hex[:8]
        # <prefix>_<executor>_<our pid>_<random>: unique on a shared machine, and databases left by a
        # killed test process can be recognised and dropped (drop_stale_databases).
        self.db_name = self.db_name or f"{DB_PREFIX}_{self.executor.lower()[:6]}_{os.getpid()}_{suffix}"
        self.store_uri = self.store_uri or (self.work_dir / "store").as_uri()
        # A private Celery queue: other engineers' workers on the same Redis never take our tasks.
        self.queue = f"llmrec-test-{suffix}"

    # ----------------------------------------------------------------------------------- config
    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def sql_alchemy_conn(self) -> str:
        return f"postgresql+psycopg2://{PG_USER}@{PG_HOST}:{PG_PORT}/{self.db_name}"

    def build_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
        pythonpath = [str(REPO_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
        env.update(
            {
                "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
                "PYTHONPATH": os.pathsep.join(pythonpath),
                "PYTHONUNBUFFERED": "1",
                "HF_HUB_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1",
                # OpenMP threads (LightGBM, torch) sleep instead of spinning while they wait: with two
                # task processes on two shared cores, spinning made LightGBM ~5x slower.
                "OMP_WAIT_POLICY": "PASSIVE",
                "LLMREC_STORE_URI": self.store_uri,
                "AIRFLOW_HOME": str(self.home),
                "AIRFLOW__CORE__DAGS_FOLDER": str(self.dags_folder),
                "AIRFLOW__CORE__PLUGINS_FOLDER": str(self.plugins_folder),
                "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
                "AIRFLOW__CORE__EXECUTOR": self.executor,
                "AIRFLOW__CORE__PARALLELISM": str(self.parallelism),
                "AIRFLOW__CORE__MAX_ACTIVE_TASKS_PER_DAG": str(self.parallelism),
                "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.base_url}/execution/",
                "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{ADMIN_USER}:admin",
                "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "False",
                "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(self.home / "passwords.json"),
                "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": self.sql_alchemy_conn,
                "AIRFLOW__DATABASE__SQL_ALCHEMY_POOL_SIZE": "3",
                "AIRFLOW__API__HOST": "127.0.0.1",
                "AIRFLOW__API__PORT": str(self.port),
                "AIRFLOW__API__BASE_URL": self.base_url,
                "AIRFLOW__API__WORKERS": "1",
                "AIRFLOW__API__SECRET_KEY": self._secret("api_secret"),
                "AIRFLOW__API__EXPOSE_CONFIG": "True",
                "AIRFLOW__API_AUTH__JWT_SECRET": self._secret("jwt_secret"),
                "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(self._log_port),
                "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(self._trigger_log_port),
                "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
                # New files are parsed at once; unchanged ones every 2 minutes (CPU, UI refreshes).
                "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "120",
                "AIRFLOW__DAG_PROCESSOR__PARSING_PROCESSES": "1",
                "AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_STORAGE_PATH": str(self.work_dir / "bundles"),
                "AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK": "False",
                # Only the runs a test creates (API triggers, backfills): no surprise scheduled run of
                # the latest interval when a test unpauses the dag.
                "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",
                "AIRFLOW__OPERATORS__DEFAULT_QUEUE": self.queue,
            }
        )
        if self.executor == "CeleryExecutor":
            env.update(
                {
                    "AIRFLOW__CELERY__BROKER_URL": f"redis://{REDIS_HOST}:{REDIS_PORT}/{REDIS_DB}",
                    "AIRFLOW__CELERY__RESULT_BACKEND": (
                        f"db+postgresql+psycopg2://{PG_USER}@{PG_HOST}:{PG_PORT}/{self.db_name}"
                    ),
                    "AIRFLOW__CELERY__DEFAULT_QUEUE": self.queue,
                    "AIRFLOW__CELERY__WORKER_CONCURRENCY": str(self.parallelism),
                    "AIRFLOW__CELERY__WORKER_ENABLE_REMOTE_CONTROL": "False",
                }
            )
        env.update(self.extra_env)
        return env

    def _secret(self, name: str) -> str:
        if not hasattr(self, "_secrets"):
            self._secrets: dict[str, str] = {}
        return self._secrets.setdefault(name, secrets.token_urlsafe(32))

    # ----------------------------------------------------------------------------------- lifecycle
    def start(self, timeout: float = 180) -> AirflowDeployment:
        """Fresh database, ``airflow db migrate``, then the long-running processes; waits until healthy."""
        if self.work_dir.exists():
            shutil.rmtree(self.work_dir)
        for d in (self.home, self.log_dir, self.work_dir / "bundles"):
            d.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self._log_port = free_port()
        self._trigger_log_port = free_port()
        # The password is fixed so the tests and the browser can log in.
        (self.home / "passwords.json").write_text(json.dumps({ADMIN_USER: ADMIN_PASSWORD}) + "\n")
        (self.home / "config").mkdir()
        (self.home / "config" / "airflow_local_settings.py").write_text(LOCAL_SETTINGS)
        self.env = self.build_env()
        (self.work_dir / "env.sh").write_text(
            "".join(f"export {k}={json.dumps(v)}\n" for k, v in sorted(self.env.items()) if "AIRFLOW" in k)
        )

        drop_stale_databases()
        recreate_database(self.db_name)
        self.cli(["db", "migrate"], timeout=300, log_name="db-migrate")

        self.spawn("api-server", ["airflow", "api-server", "--port", str(self.port), "--host", "127.0.0.1"])
        self.spawn("dag-processor", ["airflow", "dag-processor"])
        self.spawn("scheduler", ["airflow", "scheduler"])
        if self.executor == "CeleryExecutor":
            self.spawn(
                "celery-worker",
                [
                    "airflow",
                    "celery",
                    "worker",
                    "--queues",
                    self.queue,
                    "--concurrency",
                    str(self.parallelism),
                    "--celery-hostname",
                    f"{self.queue}@%h",
                    "--without-gossip",
                    "--without-mingle",
                ],
            )
        wait_until(
            self._healthy,
            timeout,
            "the api-server, scheduler and dag-processor to be healthy",
            interval=2,
            check=self.check_alive,
        )
        return self

    def stop(self) -> None:
        """Terminate every process group we started (reverse order); safe to call twice."""
        for name in reversed(list(self.procs)):
            proc = self.procs[name]
            if proc.poll() is None:
                _terminate_group(proc)
        self._token = None

    def cleanup_database(self) -> None:
        with contextlib.suppress(Exception):
            drop_database(self.db_name)

    def spawn(self, name: str, argv: list[str]) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - kept open for the child's lifetime
        proc = subprocess.Popen(
            argv,
            env=self.env,
            cwd=self.work_dir,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # own process group: stop() kills the whole tree
        )
        log.close()
        self.procs[name] = proc
        return proc

    def cli(
        self, args: list[str], timeout: float = 120, log_name: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess:
        """Run ``airflow <args>`` with this deployment's environment (short-lived command)."""
        proc = subprocess.Popen(
            ["airflow", *args],
            env=self.env,
            cwd=self.work_dir,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
        )
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _terminate_group(proc, grace=5)
            out = proc.stdout.read() if proc.stdout else ""
            raise DeploymentError(
                f"`airflow {' '.join(args)}` timed out after {timeout}s:\n{out[-3000:]}"
            ) from None
        if log_name:
            (self.log_dir / f"{log_name}.log").write_text(out)
        result = subprocess.CompletedProcess(proc.args, proc.returncode, out, "")
        if check and proc.returncode != 0:
            raise DeploymentError(f"`airflow {' '.join(args)}` exited {proc.returncode}:\n{out[-4000:]}")
        return result

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise DeploymentError(
                    f"{name} exited with {proc.returncode}; last log lines:\n{tail(self.log_dir / f'{name}.log')}"
                )

    def log_tails(self, lines: int = 40) -> str:
        parts = []
        for path in sorted(self.log_dir.glob("*.log")):
            parts.append(f"===== {path} (last {lines} lines) =====\n{tail(path, lines)}")
        return "\n".join(parts)

    def task_log_tails(self, lines: int = 30, max_files: int = 12) -> str:
        """Tails of the newest task log files (AIRFLOW_HOME/logs/dag_id=...)."""
        files = sorted((self.home / "logs").glob("dag_id=*/**/*.log"), key=lambda p: p.stat().st_mtime)[
            -max_files:
        ]
        return "\n".join(f"===== {p} =====\n{tail(p, lines)}" for p in files)

    # ----------------------------------------------------------------------------------- REST API
    def _healthy(self) -> bool:
        r = requests.get(f"{self.base_url}/api/v2/monitor/health", timeout=5)
        if r.status_code != 200:
            return False
        health = r.json()
        wanted = ["metadatabase", "scheduler", "dag_processor"]
        return all((health.get(c) or {}).get("status") == "healthy" for c in wanted)

    def token(self, refresh: bool = False) -> str:
        if self._token is None or refresh:
            r = requests.post(
                f"{self.base_url}/auth/token",
                json={"username": ADMIN_USER, "password": ADMIN_PASSWORD},
                timeout=30,
            )
            if r.status_code not in (200, 201):
                raise DeploymentError(f"POST /auth/token -> {r.status_code}: {r.text[:500]}")
            self._token = r.json()["access_token"]
        return self._token

    def api(self, method: str, path: str, expect: Iterable[int] = (200,), **kwargs: Any) -> Any:
        """Call ``/api/v2/<path>`` with the admin JWT; returns the decoded JSON."""
        url = f"{self.base_url}/api/v2/{path.lstrip('/')}"
        r = requests.request(
            method, url, headers={"Authorization": f"Bearer {self.token()}"}, timeout=60, **kwargs
        )
        if r.status_code == 401:  # token expired
            r = requests.request(
                method,
                url,
                headers={"Authorization": f"Bearer {self.token(refresh=True)}"},
                timeout=60,
                **kwargs,
            )
        if r.status_code not in tuple(expect):
            raise DeploymentError(f"{method} {url} -> {r.status_code}: {r.text[:1000]}")
        return r.json() if r.content else None

    def import_errors(self) -> list[dict]:
        return self.api("GET", "importErrors").get("import_errors", [])

    def wait_for_dag(self, dag_id: str, timeout: float = 180) -> dict:
        """Wait until the dag-processor has serialized ``dag_id``; import errors fail fast."""

        def parsed():
            r = requests.get(
                f"{self.base_url}/api/v2/dags/{dag_id}",
                headers={"Authorization": f"Bearer {self.token()}"},
                timeout=30,
            )
            if r.status_code == 200:
                return r.json()
            errors = self.import_errors()
            if errors:  # the dag is not there and something failed to import: say what, now
                raise AssertionError(
                    f"import errors while waiting for {dag_id}: {json.dumps(errors, indent=1)[:4000]}"
                )
            return None

        return wait_until(parsed, timeout, f"dag {dag_id} to be parsed", interval=2, check=self.check_alive)

    def unpause(self, dag_id: str) -> None:
        self.api("PATCH", f"dags/{dag_id}", json={"is_paused": False})

    def trigger(
        self,
        dag_id: str,
        conf: dict | None = None,
        logical_date: str | None = None,
        run_id: str | None = None,
    ) -> dict:
        """Trigger a run the way the UI's trigger form does (POST /api/v2/dags/{dag_id}/dagRuns)."""
        body: dict[str, Any] = {"logical_date": logical_date, "conf": conf or {}}
        if run_id:
            body["dag_run_id"] = run_id
        return self.api("POST", f"dags/{dag_id}/dagRuns", json=body)

    def dag_run(self, dag_id: str, run_id: str) -> dict:
        return self.api("GET", f"dags/{dag_id}/dagRuns/{run_id}")

    def dag_runs(self, dag_id: str, **params: Any) -> list[dict]:
        return self.api("GET", f"dags/{dag_id}/dagRuns", params={"limit": 100, **params})["dag_runs"]

    def task_instances(self, dag_id: str, run_id: str) -> list[dict]:
        return self.api("GET", f"dags/{dag_id}/dagRuns/{run_id}/taskInstances", params={"limit": 1000})[
            "task_instances"
        ]

    def wait_for_run(self, dag_id: str, run_id: str, timeout: float = 600) -> dict:
        """Wait for a terminal state; returns the dag run (the caller asserts ``state == 'success'``)."""

        def done():
            run = self.dag_run(dag_id, run_id)
            return run if run["state"] in TERMINAL_RUN_STATES else None

        return wait_until(
            done, timeout, f"run {dag_id}/{run_id} to finish", interval=1, check=self.check_alive
        )

    def describe_run(self, dag_id: str, run_id: str) -> str:
        """Task states, for assertion messages."""
        try:
            tis = self.task_instances(dag_id, run_id)
        except Exception as exc:
            return f"<cannot list task instances: {exc}>"
        return "\n".join(
            f"  {ti['task_id']}[{ti.get('map_index', -1)}] {ti['state']} host={ti.get('hostname')}"
            f" start={ti.get('start_date')} end={ti.get('end_date')}"
            for ti in sorted(
                tis, key=lambda t: (t.get("start_date") or "", t["task_id"], t.get("map_index", -1))
            )
        )


def main() -> None:  # pragma: no cover - manual use
    import argparse
    import tempfile

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--executor", default="LocalExecutor", choices=["LocalExecutor", "CeleryExecutor"])
    p.add_argument("--work-dir", default=None)
    p.add_argument("--dags-folder", default=str(REPO_ROOT / "dags"))
    args = p.parse_args()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="llmrec-airflow-"))
    dep = AirflowDeployment(work_dir=work, executor=args.executor, dags_folder=Path(args.dags_folder))

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    # Background jobs of a non-interactive shell ignore SIGINT: handle both explicitly.
    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)
    try:
        dep.start()
        print(f"Airflow UI: {dep.base_url}  user {ADMIN_USER} / {ADMIN_PASSWORD}")
        print(f"env: source {work / 'env.sh'}; logs: {dep.log_dir}; store: {dep.store_uri}")
        while True:
            dep.check_alive()
            time.sleep(5)
    except KeyboardInterrupt:
        pass
    finally:
        dep.stop()
        dep.cleanup_database()


if __name__ == "__main__":  # pragma: no cover
    main()
