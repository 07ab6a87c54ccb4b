"""Failure and deadline alerts: the LLMREC_ALERT log line, the webhook POST, the run deadline."""

from __future__ import annotations

import json
import logging
import threading
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, HTTPServer
from types import SimpleNamespace

import pytest

from llmrec_tasks import alerts
from llmrec_tasks.core.errors import ConfigError, QualityGateError


class Webhook:
    """A local HTTP server in a thread that records the JSON bodies POSTed to it."""

    def __init__(self, status: int = 200) -> None:
        received = self.received = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                received.append((self.headers["Content-Type"], json.loads(body)))
                self.send_response(status)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def webhook():
    hook = Webhook()
    yield hook
    hook.close()


def failed_gate_context() -> dict:
    ti = SimpleNamespace(
        dag_id="llmrec_daily",
        run_id="scheduled__2026-10-02T00:00:00+00:00",
        task_id="gate",
        map_index=-1,
        try_number=1,
        log_url="http://airflow:8080/dags/llmrec_daily/runs/r/tasks/gate?try_number=1",
    )
    return {"ti": ti, "run_id": ti.run_id, "exception": QualityGateError("bundle v failed the gate")}


def alert_lines(caplog: pytest.LogCaptureFixture) -> list[dict]:
    prefix = f"{alerts.ALERT_PREFIX} "
    return [
        json.loads(r.getMessage()[len(prefix) :]) for r in caplog.records if r.getMessage().startswith(prefix)
    ]


def test_task_failure_logs_one_alert_line_with_the_run_task_and_error(caplog, monkeypatch):
    monkeypatch.setattr(alerts, "webhook_url", lambda: None)
    with caplog.at_level(logging.ERROR, logger=alerts.__name__):
        alerts.on_failure_callback(failed_gate_context())
    (line,) = alert_lines(caplog)
    assert line == {
        "alert": alerts.TASK_FAILED,
        "dag_id": "llmrec_daily",
        "run_id": "scheduled__2026-10-02T00:00:00+00:00",
        "task_id": "gate",
        "map_index": -1,
        "try_number": 1,
        "exception_type": "QualityGateError",
        "exception": "bundle v failed the gate",
        "log_url": "http://airflow:8080/dags/llmrec_daily/runs/r/tasks/gate?try_number=1",
    }


def test_the_alert_is_posted_to_the_configured_webhook(webhook, monkeypatch, caplog):
    monkeypatch.setattr(alerts, "webhook_url", lambda: webhook.url)
    with caplog.at_level(logging.ERROR, logger=alerts.__name__):
        alerts.on_failure_callback(failed_gate_context())
    ((content_type, body),) = webhook.received
    assert content_type == "application/json"
    assert body == alert_lines(caplog)[0] and body["task_id"] == "gate"


def test_no_webhook_configured_no_post(webhook):
    assert alerts.send_alert({"alert": "x"}, resolve_url=lambda: None) is False
    assert webhook.received == []


@pytest.mark.parametrize("kind", ["refused", "error status", "not http"])
def test_a_failing_webhook_is_logged_and_never_raises(kind, caplog):
    if kind == "refused":
        closed = Webhook()
        closed.close()  # nothing listens on its port any more
        url = closed.url
    elif kind == "error status":
        failing = Webhook(status=500)
        url = failing.url
    else:
        url = "file:///etc/passwd"  # not a webhook: never opened
    with caplog.at_level(logging.WARNING, logger=alerts.__name__):
        assert alerts.send_alert({"alert": "x"}, resolve_url=lambda: url) is False
    assert alert_lines(caplog) == [{"alert": "x"}]  # the log line is there all the same
    assert any(
        r.getMessage().startswith("alert webhook") for r in caplog.records if r.levelno == logging.WARNING
    )
    if kind == "error status":
        assert failing.received == [("application/json", {"alert": "x"})]
        failing.close()


def test_webhook_variable_wins_over_env_and_blank_means_unset():
    env = {alerts.WEBHOOK_ENV: " http://env/hook "}
    assert alerts.webhook_url(lambda key: "http://var/hook", env) == "http://var/hook"
    assert alerts.webhook_url(lambda key: None, env) == "http://env/hook"
    assert alerts.webhook_url(lambda key: "  ", {alerts.WEBHOOK_ENV: ""}) is None
    seen = []
    alerts.webhook_url(lambda key: seen.append(key), {})
    assert seen == [alerts.WEBHOOK_VARIABLE]


def test_missed_deadline_alert_names_the_run(webhook, monkeypatch, caplog):
    monkeypatch.setattr(alerts, "webhook_url", lambda: webhook.url)
    context = {  # what Airflow passes a deadline callback
        "dag_run": {
            "dag_id": "llmrec_daily",
            "dag_run_id": "scheduled__2026-10-02T00:00:00+00:00",
            "state": "running",
            "queued_at": "2026-10-02T00:00:05Z",
        },
        "deadline": {"id": "d1", "deadline_time": "2026-10-02T06:00:05Z"},
    }
    with caplog.at_level(logging.ERROR, logger=alerts.__name__):
        alerts.on_deadline_missed(context)
    (line,) = alert_lines(caplog)
    assert line["alert"] == alerts.DEADLINE_MISSED and line["state"] == "running"
    assert (
        line["run_id"] == "scheduled__2026-10-02T00:00:00+00:00"
        and line["deadline"] == "2026-10-02T06:00:05Z"
    )
    assert [body for _, body in webhook.received] == [line]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [(None, timedelta(hours=6)), ("", timedelta(hours=6)), ("2.5", timedelta(hours=2.5)), ("0", None)],
)
def test_run_deadline_from_the_environment(raw, expected):
    env = {} if raw is None else {alerts.DEADLINE_ENV: raw}
    assert alerts.run_deadline(env) == expected


@pytest.mark.parametrize("raw", ["six", "-1"])
def test_a_bad_deadline_setting_is_refused(raw):
    with pytest.raises(ConfigError, match=alerts.DEADLINE_ENV):
        alerts.run_deadline({alerts.DEADLINE_ENV: raw})


def test_deadline_alert_calls_the_alert_function_from_queued():
    from airflow.sdk.definitions.deadline import DeadlineReference

    assert alerts.deadline_alert({alerts.DEADLINE_ENV: "0"}) is None
    deadline = alerts.deadline_alert({alerts.DEADLINE_ENV: "3"})
    assert deadline.reference == DeadlineReference.DAGRUN_QUEUED_AT
    assert deadline.interval == timedelta(hours=3)
    assert deadline.callback.path == "llmrec_tasks.alerts.on_deadline_missed"
