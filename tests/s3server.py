"""A real S3-compatible HTTP server for integration tests: moto in server mode, in a subprocess.

Fixtures:
- ``moto_server`` (session): starts ``python -m moto.server`` on a free localhost port.
- ``s3_env``: points the standard AWS environment (``AWS_ENDPOINT_URL`` and test credentials) at it.
- ``s3_store_uri``: a fresh bucket per test, as ``s3://<bucket>/llmrec``.
- ``flaky_proxy``: an HTTP proxy in front of moto that can answer 5xx or stall, to test retries.
"""

from __future__ import annotations

import http.client
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

TEST_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
START_TIMEOUT_S = 30.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_listening(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto server exited with code {proc.returncode} before listening")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            conn.request("GET", "/moto-api/")
            conn.getresponse().read()
            conn.close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"moto server did not listen on port {port} within {START_TIMEOUT_S}s")


@pytest.fixture(scope="session")
def moto_server() -> Iterator[str]:
    """Endpoint URL of a moto S3 server running in its own process for the whole session."""
    port = free_port()
    env = {**os.environ, **TEST_CREDENTIALS}
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_listening(port, proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def set_aws_env(monkeypatch: pytest.MonkeyPatch, endpoint: str) -> None:
    """The standard AWS environment a CLI user or a container would set."""
    for name, value in TEST_CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.delenv("AIRFLOW_CTX_DAG_ID", raising=False)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "4")


@pytest.fixture
def s3_env(moto_server: str, monkeypatch: pytest.MonkeyPatch) -> str:
    set_aws_env(monkeypatch, moto_server)
    return moto_server


def create_bucket(endpoint: str) -> str:
    import boto3

    bucket = f"llmrec-test-{uuid.uuid4().hex[:12]}"
    client = boto3.session.Session().client("s3", endpoint_url=endpoint, **_client_credentials())
    client.create_bucket(Bucket=bucket)
    return bucket


def _client_credentials() -> dict[str, str]:
    return {
        "aws_access_key_id": TEST_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": TEST_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        "region_name": TEST_CREDENTIALS["AWS_DEFAULT_REGION"],
    }


@pytest.fixture
def s3_store_uri(s3_env: str) -> str:
    """A fresh bucket on the moto server; the store root is a prefix inside it."""
    return f"s3://{create_bucket(s3_env)}/llmrec"


@dataclass
class FaultPlan:
    """What the proxy does to the next requests: answer with a status, or stall first."""

    fail_next: int = 0
    fail_status: int = 503
    delay_s: float = 0.0
    only_method: str | None = None
    served: int = 0
    failed: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def take_failure(self, method: str) -> bool:
        with self.lock:
            self.served += 1
            if self.fail_next > 0 and (self.only_method is None or self.only_method == method):
                self.fail_next -= 1
                self.failed += 1
                return True
            return False


def _proxy_handler(upstream_port: int, plan: FaultPlan) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:  # quiet
            return

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while True:
                    size = int(self.rfile.readline().strip().split(b";")[0], 16)
                    if size == 0:
                        self.rfile.readline()
                        return b"".join(chunks)
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("Content-Length", 0) or 0))

        def _forward(self) -> None:
            body = self._body()
            if plan.delay_s:
                time.sleep(plan.delay_s)
            if plan.take_failure(self.command):
                payload = b"<Error><Code>ServiceUnavailable</Code><Message>injected</Message></Error>"
                self.send_response(plan.fail_status)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
                return
            conn = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=30)
            headers = {k: v for k, v in self.headers.items() if k.lower() != "transfer-encoding"}
            headers["Content-Length"] = str(len(body))
            conn.request(self.command, self.path, body=body, headers=headers)
            response = conn.getresponse()
            data = response.read()
            self.send_response(response.status)
            for key, value in response.getheaders():
                if key.lower() not in ("content-length", "transfer-encoding", "connection", "server", "date"):
                    self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
            conn.close()

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

    return Handler


@dataclass
class FlakyProxy:
    endpoint: str
    plan: FaultPlan


@pytest.fixture
def flaky_proxy(moto_server: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[FlakyProxy]:
    """A fault-injecting proxy in front of moto; the AWS environment points at the proxy."""
    upstream_port = int(moto_server.rsplit(":", 1)[1])
    plan = FaultPlan()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _proxy_handler(upstream_port, plan))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    set_aws_env(monkeypatch, endpoint)
    try:
        yield FlakyProxy(endpoint=endpoint, plan=plan)
    finally:
        server.shutdown()
        server.server_close()
