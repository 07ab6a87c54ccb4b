"""The leave-one-out benchmark on MovieLens ml-latest-small (one seed, fewer training positions)."""

from __future__ import annotations

import json

import pytest

from llmrec_tasks.core.config import RankerConfig, SasrecConfig
from llmrec_tasks.ranking.benchmark import format_table, run_benchmark

pytestmark = [pytest.mark.movielens, pytest.mark.slow]


def test_loo_benchmark_ranker_beats_baselines(movielens_dir, tmp_path):
    out = tmp_path / "loo.json"
    result = run_benchmark(
        str(movielens_dir),
        "loo",
        seeds=1,
        out=out,
        ranker_cfg=RankerConfig(train_windows=4),
        sasrec_cfg=SasrecConfig(enabled=False),  # ~2 min of CI; tests/unit/test_sasrec.py covers it
    )
    saved = json.loads(out.read_text())
    assert saved["protocol"] == "loo"
    assert saved["dataset"]["users"] == 610
    models = saved["models"]
    assert {"ranker", "ranker_no_llm", "popularity", "itemknn", "ease", "semantic", "covis"} <= set(models)
    for baseline in ("popularity", "itemknn"):
        assert models["ranker"]["ndcg@10"] > models[baseline]["ndcg@10"], baseline
        assert models["ranker"]["recall@10"] > models[baseline]["recall@10"], baseline
    assert 0 < saved["candidate_recall"]["test"]["all"] <= 1
    assert out.with_suffix(".html").read_text().count("data:image/png;base64,") >= 4
    assert format_table(result).splitlines()[1].startswith("model")
