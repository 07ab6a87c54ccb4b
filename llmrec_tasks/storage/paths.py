"""Key layout in the object store, and version ids. Every stage builds keys here, nowhere else."""

from __future__ import annotations

from datetime import datetime

from llmrec_tasks.core.config import validate_name
from llmrec_tasks.core.constants import CURRENT_POINTER, MANIFEST


def make_version(cutoff: datetime, fingerprint: str, params_hash: str) -> str:
    """Same logical date, data and params -> same version id (reruns are idempotent)."""
    return f"{cutoff:%Y%m%dT%H%M%SZ}-{fingerprint[:8]}-{params_hash[:6]}"


def run_prefix(namespace: str, version: str) -> str:
    """Work area of one run: snapshot and intermediate artifacts, before publishing."""
    return f"{validate_name('namespace', namespace)}/runs/{validate_name('version', version)}"


def bundles_prefix(namespace: str) -> str:
    return f"{validate_name('namespace', namespace)}/bundles"


def bundle_prefix(namespace: str, version: str) -> str:
    """Immutable published bundle."""
    return f"{bundles_prefix(namespace)}/{validate_name('version', version)}"


def manifest_key(namespace: str, version: str) -> str:
    return f"{bundle_prefix(namespace, version)}/{MANIFEST}"


def current_key(namespace: str) -> str:
    return f"{validate_name('namespace', namespace)}/{CURRENT_POINTER}"
