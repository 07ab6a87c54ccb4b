"""A run killed mid-way (SIGKILL, as an OOM kill or a lost worker would) and run again completes:
same version, one complete bundle, nothing half-visible in between."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmrec_tasks.serving.recommender import load_bundle
from llmrec_tasks.storage import registry

pytestmark = pytest.mark.slow

CUTOFF = "2026-11-01T00:00:00+00:00"


def llmrec(store_uri: str, data: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "llmrec_tasks.cli",
        "run",
        "--data",
        str(data),  # the sample as contract CSVs: `sample` itself is refused in production
        "--store",
        store_uri,
        "--cutoff",
        CUTOFF,
        "--set",
        "ranker_n_estimators=60",
        "--set",
        "ranker_train_windows=2",
        "--set",
        "seq_max_epochs=2",  # the sample's best epoch: patience would train 6 more for nothing
    ]


def test_killed_run_is_completed_by_a_rerun(tmp_path: Path, store_uri: str, sample_folder: Path) -> None:
    store = Path(store_uri.removeprefix("file://"))
    proc = subprocess.Popen(llmrec(store_uri, sample_folder), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 600
    # Kill it once the embeddings exist: mid-way between embed and publish.
    while not list(store.glob("production/runs/*/stages/embed.json")):
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "the run never reached the embed stage"
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (store / "production" / "current.json").exists()
    assert not list(store.glob("production/bundles/*/manifest.json"))

    rerun = subprocess.run(llmrec(store_uri, sample_folder), capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    result = json.loads(rerun.stdout)["publish"]
    assert result["promoted"] is True, result["reason"]
    (version,) = [row["version"] for row in registry.list_versions(store_uri, "production")]
    assert version == result["version"]
    assert len(list(store.glob("production/runs/*"))) == 1  # same version id: no duplicate run
    assert load_bundle(store_uri, "production").version == version  # every checksum verified
