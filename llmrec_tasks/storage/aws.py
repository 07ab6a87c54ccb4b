"""boto3 S3 clients: from Airflow's ``aws_default`` connection inside a task, else the AWS environment.

Outside Airflow the standard chain applies (``AWS_ENDPOINT_URL``, ``AWS_DEFAULT_REGION``,
``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, profiles, instance roles). Retries default to
botocore's ``standard`` mode (exponential backoff with jitter on connection errors, 5xx, throttling
and timeouts); ``AWS_MAX_ATTEMPTS`` and ``AWS_RETRY_MODE`` override the defaults. Nothing here logs
or returns a credential.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from typing import Any

log = logging.getLogger(__name__)

AIRFLOW_CONN_ID = "aws_default"
DEFAULT_MAX_ATTEMPTS = 8
CONNECT_TIMEOUT_S = 5
READ_TIMEOUT_S = 60
# Environment that changes which client we build (the secret enters only as a digest).
_ENV_KEYS = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_PROFILE",
    "AWS_ACCESS_KEY_ID",
    "AWS_MAX_ATTEMPTS",
    "AWS_RETRY_MODE",
    "AIRFLOW_CTX_DAG_ID",
)

_lock = threading.Lock()
_clients: dict[tuple[str | None, ...], Any] = {}


def in_airflow_task() -> bool:
    """True inside an Airflow task: the task runner exports ``AIRFLOW_CTX_DAG_ID``."""
    return bool(os.environ.get("AIRFLOW_CTX_DAG_ID"))


def botocore_config() -> Any:
    """Timeouts and retries for every S3 call; environment overrides win."""
    from botocore.config import Config

    return Config(
        connect_timeout=CONNECT_TIMEOUT_S,
        read_timeout=READ_TIMEOUT_S,
        retries={
            "mode": os.environ.get("AWS_RETRY_MODE", "standard"),
            # Total attempts including the first, the meaning AWS_MAX_ATTEMPTS has.
            "total_max_attempts": int(os.environ.get("AWS_MAX_ATTEMPTS", DEFAULT_MAX_ATTEMPTS)),
        },
    )


def _cache_key() -> tuple[str | None, ...]:
    secret = os.environ.get("AWS_SECRET_ACCESS_KEY")
    digest = hashlib.sha256(secret.encode()).hexdigest() if secret else None
    return (*(os.environ.get(k) for k in _ENV_KEYS), digest)


def s3_client() -> Any:
    """A thread-safe S3 client, cached per AWS environment (clients are slow to build)."""
    key = _cache_key()
    with _lock:
        client = _clients.get(key)
        if client is None:
            client = _airflow_client() if in_airflow_task() else _env_client()
            _clients[key] = client
        return client


def _env_client() -> Any:
    import boto3

    # A fresh session per client: boto3's default session is not thread-safe.
    return boto3.session.Session().client("s3", config=botocore_config())


def _airflow_client() -> Any:
    """Endpoint, region and credentials of the ``aws_default`` connection (env chain if it is absent)."""
    from airflow.providers.amazon.aws.hooks.s3 import S3Hook

    log.info("S3 client from Airflow connection %r", AIRFLOW_CONN_ID)
    return S3Hook(aws_conn_id=AIRFLOW_CONN_ID).get_client_type(config=botocore_config())
