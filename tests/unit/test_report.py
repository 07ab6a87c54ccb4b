"""The HTML report is self-contained and shows every model and plot."""

from __future__ import annotations

import re

from llmrec_tasks.ranking.report import build_report


def _model(ndcg: float) -> dict:
    return {
        "ndcg@10": ndcg,
        "recall@10": 2 * ndcg,
        "recall@50": 3 * ndcg,
        "mrr": ndcg,
        "coverage@10": 0.2,
        "ndcg@10_ci95": [ndcg - 0.01, ndcg + 0.01],
        "recall@10_ci95": [2 * ndcg - 0.01, 2 * ndcg + 0.01],
        "ndcg@10_std": 0.002,
        "users": 100,
        "runs": 2,
        "slices": {"cold_items": {"ndcg@10": ndcg / 2, "recall@10": ndcg, "users": 10, "runs": 2}},
    }


def results() -> dict:
    diff = {"diff": 0.01, "ci95": [0.0, 0.02], "p_not_better": 0.03}
    return {
        "protocol": "loo",
        "models": {"ranker": _model(0.1), "ranker_no_llm": _model(0.09), "popularity": _model(0.02)},
        "comparisons": {
            "ranker_vs_ranker_no_llm": {"ndcg@10": diff, "recall@10": diff},
            "ranker_vs_popularity": {"ndcg@10": diff, "recall@10": diff},
        },
        "candidate_recall": {"test": {"next": 0.3, "pop": 0.2, "all": 0.5}},
        "feature_importance": {"next_score": 0.4, "sem_last_1": 0.1},
        "training": {
            "test_users": 100,
            "stages": {"test": {"users": 100, "rows": 2000, "users_with_positive": 50}},
        },
    }


def test_report_embeds_all_plots_as_png():
    page = build_report(results(), title="demo <run>")
    images = re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert {alt for alt, _ in images} == {"metrics", "gain", "candidate recall", "feature importance"}
    assert all(len(data) > 1000 for _, data in images)
    assert "demo &lt;run&gt;" in page  # escaped
    for name in ("ranker_no_llm", "popularity", "cold-start"):
        assert name in page.lower() or name in page
    assert "http://" not in page and "https://" not in page  # self-contained


def test_report_without_optional_sections():
    minimal = {"protocol": "time", "models": {"ranker": _model(0.1)}}
    page = build_report(minimal, title="t")
    assert page.count("<img") == 1
