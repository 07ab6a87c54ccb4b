"""Keep tests away from ``~/airflow``: call :func:`use_test_airflow_home` before importing Airflow.

Importing Airflow reads ``$AIRFLOW_HOME`` once per process (and creates ``logs/`` there), so this
must run before the first ``import airflow``; values already set in the environment win.
:func:`airflow_env` builds the environment of a child Airflow process with its own home.
"""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DAGS = ROOT / "dags"
PLUGINS = ROOT / "plugins"
AIRFLOW_DB = "airflow.db"  # a child's SQLite metadata DB, in its home


def use_test_airflow_home() -> Path:
    """Point this process's Airflow at the git-ignored ``.airflow/test-home`` unless already set."""
    home = Path(os.environ.setdefault("AIRFLOW_HOME", str(ROOT / ".airflow" / "test-home")))
    os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
    os.environ.setdefault("AIRFLOW__CORE__DAGS_FOLDER", str(DAGS))
    os.environ.setdefault("AIRFLOW__CORE__PLUGINS_FOLDER", str(PLUGINS))
    home.mkdir(parents=True, exist_ok=True)
    return home


def airflow_env(home: Path, **extra: str) -> dict[str, str]:
    """Environment for a child Airflow process with its own home and SQLite metadata DB."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    env.update(
        AIRFLOW_HOME=str(home),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        AIRFLOW__CORE__DAGS_FOLDER=str(DAGS),
        AIRFLOW__CORE__PLUGINS_FOLDER=str(PLUGINS),
        AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=f"sqlite:///{home / AIRFLOW_DB}",
        AIRFLOW__CORE__EXECUTOR="LocalExecutor",
        AIRFLOW__LOGGING__BASE_LOG_FOLDER=str(home / "logs"),
        PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
    )
    env.update(extra)
    return env
