"""Alerts for runs that need a person: a failed task (``on_failure_callback``) and a run still not
finished after ``LLMREC_RUN_DEADLINE_HOURS`` (a DAG deadline).

Every alert is one log line ``LLMREC_ALERT {json}`` (grep-able in the task or callback log) and,
when a webhook is configured (Airflow Variable ``llmrec_alert_webhook``, else env
``LLMREC_ALERT_WEBHOOK``), the same JSON POSTed to it. A failing webhook is logged and never
raises: the alert must not hide the failure it reports.

Importing this module is cheap (standard library and ``llmrec_tasks.core``): DAG files import it at parse time, and
:func:`run_deadline` reads only the environment (no Variable, no connection at parse time).
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import Any

from llmrec_tasks.core.errors import ConfigError

log = logging.getLogger(__name__)

ALERT_PREFIX = "LLMREC_ALERT"
WEBHOOK_VARIABLE = "llmrec_alert_webhook"
WEBHOOK_ENV = "LLMREC_ALERT_WEBHOOK"
WEBHOOK_TIMEOUT_S = 5.0
DEADLINE_ENV = "LLMREC_RUN_DEADLINE_HOURS"
DEFAULT_DEADLINE_HOURS = 6.0
TASK_FAILED = "task_failed"
DEADLINE_MISSED = "deadline_missed"


def webhook_url(
    variable_get: Callable[[str], str | None] | None = None, env: Mapping[str, str] | None = None
) -> str | None:
    """The alert webhook: Variable ``llmrec_alert_webhook``, else ``$LLMREC_ALERT_WEBHOOK``; None
    when neither is set. ``variable_get`` defaults to Airflow's (read when the alert fires)."""
    env = os.environ if env is None else env
    if variable_get is None:
        from airflow.sdk import Variable

        def variable_get(key: str) -> str | None:
            return Variable.get(key, default=None)

    for value in (variable_get(WEBHOOK_VARIABLE), env.get(WEBHOOK_ENV)):
        if value and value.strip():
            return value.strip()
    return None


def post_alert(url: str, payload: Mapping[str, Any], timeout: float = WEBHOOK_TIMEOUT_S) -> bool:
    """POST ``payload`` as JSON to ``url``; False (logged) when the webhook cannot be reached or
    answers with an error. Only ``http(s)://`` URLs are used."""
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        log.warning("alert webhook %r is not an http(s):// URL: not posted", url)
        return False
    request = urllib.request.Request(
        url,
        data=json.dumps(payload, default=str).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # an operator-set URL
            response.read()
    except (OSError, ValueError, http.client.HTTPException) as exc:  # URLError, HTTPError, timeouts
        log.warning("alert webhook %s failed: %s: %s", url, type(exc).__name__, exc)
        return False
    return True


def send_alert(payload: Mapping[str, Any], resolve_url: Callable[[], str | None] | None = None) -> bool:
    """Log the ``LLMREC_ALERT`` line first, then POST it to the webhook (``resolve_url``, default
    :func:`webhook_url`) when one is configured; True when posted."""
    log.error("%s %s", ALERT_PREFIX, json.dumps(payload, default=str, sort_keys=True))
    url = (resolve_url or webhook_url)()
    if not url:
        return False
    return post_alert(url, payload)


def task_failure_payload(context: Mapping[str, Any]) -> dict[str, Any]:
    """The alert for a failed task, from the task's Airflow context."""
    ti = context.get("ti") or context.get("task_instance")
    error = context.get("exception")
    return {
        "alert": TASK_FAILED,
        "dag_id": getattr(ti, "dag_id", None),
        "run_id": context.get("run_id") or getattr(ti, "run_id", None),
        "task_id": getattr(ti, "task_id", None),
        "map_index": getattr(ti, "map_index", None),
        "try_number": getattr(ti, "try_number", None),
        "exception_type": type(error).__name__ if isinstance(error, BaseException) else None,
        "exception": str(error) if error is not None else None,
        "log_url": getattr(ti, "log_url", None),
    }


def on_failure_callback(context: Mapping[str, Any]) -> None:
    """Task ``on_failure_callback`` (``DEFAULT_ARGS``): alert on a task that failed for good."""
    send_alert(task_failure_payload(context))


def deadline_payload(context: Mapping[str, Any]) -> dict[str, Any]:
    """The alert for a run past its deadline, from the context a deadline callback receives
    (``dag_run`` as JSON, ``deadline`` with its time)."""
    dag_run = context.get("dag_run") or {}
    deadline = context.get("deadline") or {}
    return {
        "alert": DEADLINE_MISSED,
        "dag_id": dag_run.get("dag_id"),
        "run_id": dag_run.get("dag_run_id") or dag_run.get("run_id"),
        "state": dag_run.get("state"),
        "queued_at": dag_run.get("queued_at"),
        "deadline": deadline.get("deadline_time"),
        "message": "the run is not finished by its deadline: check the running task's log",
    }


def on_deadline_missed(context: Mapping[str, Any], **_: Any) -> None:
    """Deadline callback of the daily DAG: alert on a run still not finished at its deadline."""
    send_alert(deadline_payload(context))


def run_deadline(env: Mapping[str, str] | None = None) -> timedelta | None:
    """How long a run may take from being queued: ``$LLMREC_RUN_DEADLINE_HOURS`` (default 6); None
    when it is 0 (no deadline)."""
    env = os.environ if env is None else env
    raw = env.get(DEADLINE_ENV, "").strip()
    try:
        hours = float(raw) if raw else DEFAULT_DEADLINE_HOURS
    except ValueError:
        raise ConfigError(f"{DEADLINE_ENV}={raw!r} is not a number of hours (0 = no deadline)") from None
    if hours < 0:
        raise ConfigError(f"{DEADLINE_ENV}={raw!r} is negative: give hours, or 0 for no deadline")
    return timedelta(hours=hours) if hours else None


def deadline_alert(env: Mapping[str, str] | None = None) -> Any:
    """The DAG's ``DeadlineAlert`` (:func:`on_deadline_missed` once the run is :func:`run_deadline`
    past being queued), or None when the deadline is off."""
    interval = run_deadline(env)
    if interval is None:
        return None
    from airflow.sdk.definitions.callback import SyncCallback
    from airflow.sdk.definitions.deadline import DeadlineAlert, DeadlineReference

    return DeadlineAlert(
        reference=DeadlineReference.DAGRUN_QUEUED_AT,
        interval=interval,
        callback=SyncCallback(on_deadline_missed),
    )
