"""The whole pipeline on real data (MovieLens ml-latest-small from ../shared; skipped when absent)."""

import pytest

from llmrec_tasks.core.config import RunConfig
from llmrec_tasks.pipeline import run_pipeline
from llmrec_tasks.serving.recommender import Recommender, load_bundle

pytestmark = [pytest.mark.slow, pytest.mark.movielens]


def test_movielens_pipeline_publishes_a_ranker_that_beats_popularity(movielens_dir, store_uri):
    results = run_pipeline(RunConfig(data_uri=str(movielens_dir), store_uri=store_uri))
    metrics = results["train"].metrics
    assert metrics["ranker"]["ndcg@10"] > metrics["popularity"]["ndcg@10"]
    assert results["publish"].promoted, results["publish"].reason
    # Loading verifies every file against the manifest's sha256 and size.
    bundle = load_bundle(store_uri, "production")
    assert bundle.version == results["publish"].version
    recs = Recommender(bundle).recommend(user_id="1", k=10)
    assert len(recs.items) == 10
