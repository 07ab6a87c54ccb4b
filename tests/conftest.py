"""Shared fixtures: the generated sample (in memory and as a folder), a temporary local store, the MovieLens folder, the toy
ranker's features, and the ranking tests' chain data (tests.unit.ranking_data)."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.airflow_env import use_test_airflow_home

# Before anything imports Airflow: tests never touch ~/airflow.
use_test_airflow_home()

# The moto S3 server fixtures (moto_server, s3_env, s3_store_uri, flaky_proxy); the ranking tests'
# chain data (chain, chain_loo).
pytest_plugins = ["tests.s3server", "tests.unit.ranking_data"]

ROOT = Path(__file__).resolve().parents[1]
# CI clones the project next to shared/; a developer checkout sits at the same place.
MOVIELENS_DIR = Path(os.environ.get("LLMREC_MOVIELENS", ROOT.parent / "shared/data/ml-latest-small"))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Exported ONNX encoders go to one folder per test session, not to the user's ~/.cache.
if "LLMREC_ONNX_CACHE" not in os.environ:
    os.environ["LLMREC_ONNX_CACHE"] = tempfile.mkdtemp(prefix="llmrec-onnx-")
    atexit.register(shutil.rmtree, os.environ["LLMREC_ONNX_CACHE"], ignore_errors=True)
# S3 bundles are cached for serving in one folder per test session, not in ~/.cache.
if "LLMREC_BUNDLE_CACHE" not in os.environ:
    os.environ["LLMREC_BUNDLE_CACHE"] = tempfile.mkdtemp(prefix="llmrec-bundles-")
    atexit.register(shutil.rmtree, os.environ["LLMREC_BUNDLE_CACHE"], ignore_errors=True)


@pytest.fixture(scope="session")
def movielens_dir() -> Path:
    if not (MOVIELENS_DIR / "ratings.csv").is_file():
        pytest.skip(f"MovieLens data not found at {MOVIELENS_DIR}")
    return MOVIELENS_DIR


@pytest.fixture(scope="session")
def sample_data():
    from llmrec_tasks.data.contract import normalize, read_raw

    return normalize(read_raw("sample"))


@pytest.fixture(scope="session")
def sample_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The generated sample as a folder of contract CSVs (what `llmrec sample` writes): configured
    data, so a run may take it into the production namespace, where data `sample` is refused."""
    from llmrec_tasks.data.sample import write_sample

    return write_sample(tmp_path_factory.mktemp("sample-folder") / "data")


@pytest.fixture(autouse=True)
def feedback_log_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The service's feedback log goes to the test's folder, never to the working directory."""
    from llmrec_tasks.core.settings import feedback_env

    folder = tmp_path / "feedback-log"
    monkeypatch.setenv(feedback_env("feedback_log_dir"), str(folder))
    return folder


@pytest.fixture
def store_uri(tmp_path: Path) -> str:
    return (tmp_path / "store").as_uri()


@pytest.fixture
def toy_ranker_features(monkeypatch: pytest.MonkeyPatch) -> None:
    """Serve the toy ranker with its own features (the real ones belong to the ranking stage)."""
    from llmrec_tasks.serving import recommender
    from tests.bundle_factory import toy_scorer

    monkeypatch.setattr(recommender, "ranker_scorer", toy_scorer)
