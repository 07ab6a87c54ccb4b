"""The HTML report: self-contained, every section, numbers in words, no raw dicts or constant columns."""

from __future__ import annotations

import html
import json
import re

import pytest

from llmrec_tasks.core import constants as C
from llmrec_tasks.core.config import RankerConfig
from llmrec_tasks.ranking.baselines import BASELINES, describe_params
from llmrec_tasks.ranking.benchmark import loo_known, loo_stages
from llmrec_tasks.ranking.protocols import evaluate_stages, json_default
from llmrec_tasks.ranking.report import (
    Example,
    Trend,
    VersionPoint,
    ablation_sentence,
    build_report,
    segments_table,
)
from tests.unit.ranking_data import embeddings


def _model(ndcg: float) -> dict:
    return {
        "ndcg@10": ndcg,
        "recall@10": 2 * ndcg,
        "recall@50": 3 * ndcg,
        "mrr": ndcg,
        "coverage@10": 0.2 + ndcg,
        "ndcg@10_ci95": [ndcg - 0.01, ndcg + 0.01],
        "recall@10_ci95": [2 * ndcg - 0.01, 2 * ndcg + 0.01],
        "ndcg@10_std": 0.002,
        "users": 100,
        "runs": 2,
        "slices": {
            "cold_items": {"ndcg@10": ndcg / 2, "recall@10": ndcg, "users": 10, "runs": 2},
            "history 0-4": {"ndcg@10": ndcg / 3, "recall@10": ndcg, "users": 0, "runs": 2},
            "history 5-19": {
                "ndcg@10": ndcg / 4,
                "recall@10": ndcg / 2,
                "ndcg@10_ci95": [ndcg / 5, ndcg / 3],
                "users": 40,
                "runs": 2,
            },
        },
    }


def results() -> dict:
    diff = {"diff": 0.01, "ci95": [0.0, 0.02], "p_not_better": 0.03}
    return {
        "protocol": "loo",
        "dataset": {"users": 100, "items": 50, "interactions": 900},
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


def point(version: str, ndcg: float) -> VersionPoint:
    return VersionPoint(
        version, f"2024-02-{version[-2:]}T00:00:00+00:00", {"ndcg@10": ndcg, "recall@10": 2 * ndcg}
    )


EXAMPLE = Example(
    user_id="u7",
    history_length=12,
    segment="history 5-19",
    history=["Heat (1995)", "Alien <1979>"],
    recommendations=[("Aliens (1986)", "often chosen together with “Alien”"), ("Ronin (1998)", "popular")],
    strategy="personalized",
)


@pytest.fixture(scope="module")
def pipeline_results(chain_loo) -> dict:
    """What the train and benchmark stages write to metrics.json, from the real evaluation code."""
    rcfg = RankerConfig(num_candidates=12, per_source=5, train_windows=2, min_data_in_leaf=5, n_estimators=20)
    vectors = embeddings()[chain_loo.items[C.ITEM_ID].astype(int).to_numpy()]
    train, valid, test = loo_stages(chain_loo, vectors, rcfg)
    evaluated, _, _ = evaluate_stages(
        train, valid, test, rcfg, known=loo_known(chain_loo), seeds=2, n_boot=50
    )
    full = {
        "protocol": "time",
        "windows": {"train_0": ["2026-01-01", "2026-01-05"], "test": ["2026-01-09", "2026-01-10"]},
        "gate_vs_popularity": {"passed": True, "reason": "ranker NDCG@10 0.5 beats popularity 0.1"},
        "run": {"version": "v1", "seconds": 3.0},
        **evaluated,
    }
    return json.loads(json.dumps(full, default=json_default))  # as publish reads it back


def text_cells(page: str) -> list[list[list[str]]]:
    """Every table of the page as rows of cell texts (header row first)."""
    tables = []
    for table in re.findall(r"<table>(.*?)</table>", page, flags=re.S):
        rows = re.findall(r"<tr>(.*?)</tr>", table, flags=re.S)
        tables.append(
            [[html.unescape(c) for c in re.findall(r"<t[hd]>(.*?)</t[hd]>", r, flags=re.S)] for r in rows]
        )
    return tables


def assert_readable(page: str) -> None:
    """No dict/list repr anywhere in the text, no column with one value in every row of a table."""
    text = html.unescape(re.sub(r"<style>.*?</style>|<[^>]+>", " ", page, flags=re.S))
    assert not re.search(
        r"\{\s*'[^']*'\s*:|\{\s*\"[^\"]*\"\s*:|\[\s*'[^']*'\s*,|\[\s*-?\d+(\.\d+)?\s*,", text
    ), text
    for table in text_cells(page):
        header, rows = table[0], table[1:]
        if len(rows) < 2:
            continue
        for j in range(1, len(header)):
            assert len({row[j] for row in rows}) > 1, f"column {header[j]!r} is constant: {rows}"


def test_report_embeds_all_plots_as_png():
    page = build_report(results(), title="demo <run>")
    images = re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert {alt for alt, _ in images} == {"metrics", "gain", "candidate recall", "feature importance"}
    assert all(len(data) > 1000 for _, data in images)
    assert "demo &lt;run&gt;" in page  # escaped
    for name in ("ranker_no_llm", "popularity", "cold target items", "100 users, 50 items, 900 interactions"):
        assert name in page
    assert "http://" not in page and "https://" not in page  # self-contained


def test_report_without_optional_sections():
    minimal = {"protocol": "time", "models": {"ranker": _model(0.1)}}
    page = build_report(minimal, title="t")
    assert page.count("<img") == 1
    assert "Against the published versions" not in page and "Example recommendations" not in page


def test_pipeline_report_has_no_raw_dicts_and_no_constant_columns(pipeline_results):
    trend = Trend(point("v03", 0.3), point("v02", 0.25), [point("v01", 0.2), point("v02", 0.25)])
    page = build_report(pipeline_results, "run", trend=trend, examples=[EXAMPLE])
    assert_readable(page)
    # The constant columns are stated once instead: every model has the same test users.
    assert re.search(r"In every row: [^<]*users \d+", page)
    assert "test window 2026-01-09 to 2026-01-10" in page


def test_the_readability_check_catches_raw_dicts_and_constant_columns():
    with pytest.raises(AssertionError):
        assert_readable("<p>{'train_0': ['a', 'b']}</p>")
    constant = "<table><tr><th>m</th><th>users</th></tr><tr><td>a</td><td>5</td></tr><tr><td>b</td><td>5</td></tr></table>"
    with pytest.raises(AssertionError, match="constant"):
        assert_readable(constant)


@pytest.mark.parametrize(
    ("diff", "ci", "expected"),
    [
        (
            0.007,
            [-0.002, 0.016],
            "drops by 0.007 (95% CI −0.002 to 0.016): not significant at this sample size.",
        ),
        (
            0.012,
            [0.004, 0.020],
            "drops by 0.012 (95% CI 0.004 to 0.020): significant, the LLM features improve NDCG@10.",
        ),
        (
            -0.012,
            [-0.020, -0.004],
            "rises by 0.012 (95% CI 0.004 to 0.020): significant, the LLM features make NDCG@10 worse.",
        ),
        (
            -0.003,
            [-0.010, 0.004],
            "rises by 0.003 (95% CI −0.004 to 0.010): not significant at this sample size.",
        ),
    ],
)
def test_ablation_sentence(diff, ci, expected):
    sentence = ablation_sentence({"ndcg@10": {"diff": diff, "ci95": ci, "p_not_better": 0.5}})
    assert sentence == f"Without the LLM features NDCG@10 {expected}"


def test_ablation_is_stated_in_words_in_the_report():
    page = build_report(results(), title="t")
    assert "Without the LLM features NDCG@10 drops by 0.010 (95% CI 0.000 to 0.020)" in page
    assert "Without the LLM features Recall@10 drops by" in page


def test_segment_table_has_a_row_per_segment_with_users_and_intervals():
    table = text_cells(segments_table(results()["models"]))[0]
    header, rows = table[0], table[1:]
    assert header[:4] == ["segment", "users", "ranker NDCG@10 (95% CI)", "ranker Recall@10 (95% CI)"]
    assert [row[0] for row in rows] == [
        "cold target items (few interactions known)",
        "history length 5-19",
    ]  # 0 users: left out
    assert rows[1][1] == "40" and rows[1][2] == "0.0250 (0.0200 to 0.0333)"
    assert rows[0][header.index("popularity NDCG@10")] == "0.0100"


def test_report_shows_the_values_each_baseline_was_tuned_to(pipeline_results):
    tuned = pipeline_results["baselines_tuned"]
    assert set(tuned) == set(BASELINES)
    page = build_report(pipeline_results, "run")
    section = page[page.index("Baselines, tuned on validation") :]
    summary = text_cells(section)[0]
    assert summary[0][:2] == ["baseline", "chosen values"]
    chosen = {row[0]: row[1] for row in summary[1:]}
    assert chosen == {name: describe_params(t["params"]) for name, t in tuned.items()}
    # One folded table per baseline with a row per grid point.
    grids = text_cells(section)[1 : 1 + len(BASELINES)]
    assert [len(table) - 1 for table in grids] == [len(t["grid"]) for t in tuned.values()]


def test_segments_from_the_pipeline_cover_every_test_user(pipeline_results):
    ranker = pipeline_results["models"]["ranker"]
    history = [m["users"] for name, m in ranker["slices"].items() if name.startswith("history")]
    assert sum(history) == ranker["users"]
    assert "By segment" in build_report(pipeline_results, "run")


@pytest.mark.parametrize("n_previous", [0, 1, 5])
def test_trend_section(n_previous):
    previous = [point(f"v{i:02d}", 0.2 + 0.01 * i) for i in range(1, n_previous + 1)]
    replaces = previous[-1] if previous else None
    page = build_report(results(), "t", trend=Trend(point("v10", 0.3), replaces, previous))
    assert "Against the published versions" in page
    if n_previous == 0:
        assert "Nothing is promoted in this namespace yet" in page and 'alt="trend"' not in page
        assert "no trend yet" in page
        return
    assert f"Compared with the current bundle <b>{replaces.version}</b>" in page
    table = next(t for t in text_cells(page) if t[0][0] == "ranker")
    assert table[0] == ["ranker", "NDCG@10", "Recall@10"]
    assert table[1] == ["this version v10", "0.3000", "0.6000"]
    assert table[2][0] == f"replaced {replaces.version}"
    diff = 0.3 - replaces.metrics["ndcg@10"]
    assert table[3] == ["difference", f"+{diff:.4f}", f"+{2 * diff:.4f}"]
    assert re.search(r'<img alt="trend" src="data:image/png;base64,[A-Za-z0-9+/=]{1000,}"', page)
    assert f"{n_previous} earlier published version(s)" in page


def test_examples_show_history_and_reasons_escaped():
    page = build_report(results(), "t", examples=[EXAMPLE])
    assert "User u7 (12 interactions: history 5-19; personalized)" in page
    assert "“Heat (1995)”, “Alien &lt;1979&gt;”" in page
    assert "<li>Aliens (1986) <span class='reason'>(often chosen together with “Alien”)</span></li>" in page


SASREC_INFO = {
    "chosen": {"hidden": 64, "layers": 2, "max_len": 200, "dropout": 0.2, "best_epoch": 12, "epochs": 16}
    | {"valid_ndcg@10": 0.081, "seconds": 40.0},
    "grid": [
        {"hidden": 64, "layers": 2, "max_len": m, "dropout": d, "best_epoch": 9 + i, "epochs": 13 + i}
        | {"valid_ndcg@10": 0.07 + i / 100, "seconds": 30.0 + i}
        for i, (m, d) in enumerate([(50, 0.2), (50, 0.5), (200, 0.5), (200, 0.2)])
    ],
    "seconds": 140.0,
    "threads": 2,
    "device": "cpu",
    "seed": 42,
}


def test_sasrec_section_shows_the_chosen_point_and_the_grid():
    page = build_report({**results(), "sasrec": SASREC_INFO}, title="t")
    assert "<h2>SASRec (sequential baseline)</h2>" in page
    assert "hidden 64, layers 2, max_len 200, dropout 0.2 (best epoch 12" in page
    assert "took 140 s on cpu with 2 thread(s), seed 42" in page
    assert "In every row: hidden 64; layers 2." in page  # constant columns stated once
    assert page.count("<td>0.0") >= 4  # one row per grid point
    assert "SASRec" not in build_report(results(), title="t")
