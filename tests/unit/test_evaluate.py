"""Metrics on hand-computed cases, bootstrap intervals, slices and the quality gate."""

from __future__ import annotations

import numpy as np
import pytest

from llmrec_tasks.ranking.evaluate import (
    Targets,
    bootstrap_ci,
    coverage,
    history_segment,
    history_segments,
    hit_matrix,
    mrr,
    ndcg_at_k,
    paired_bootstrap,
    per_user_metrics,
    quality_gate,
    recall_at_k,
    restrict,
    summarize_runs,
)


def test_single_target_metrics_by_hand():
    ranked = np.array([[5, 3, 7], [1, 2, 4], [8, -1, -1]])
    targets = Targets.single(np.array([3, 9, 8]))
    hits = hit_matrix(ranked, targets)
    assert hits.tolist() == [[False, True, False], [False, False, False], [True, False, False]]
    n_rel = targets.counts
    np.testing.assert_allclose(ndcg_at_k(hits, n_rel, 10), [1 / np.log2(3), 0.0, 1.0])
    np.testing.assert_allclose(ndcg_at_k(hits, n_rel, 1), [0.0, 0.0, 1.0])
    np.testing.assert_allclose(recall_at_k(hits, n_rel, 2), [1.0, 0.0, 1.0])
    np.testing.assert_allclose(mrr(hits), [0.5, 0.0, 1.0])


def test_multi_target_ndcg_and_recall():
    ranked = np.array([[1, 9, 2, 6]])
    targets = Targets(np.array([0, 3]), np.array([1, 2, 5]))
    hits = hit_matrix(ranked, targets)
    ideal = 1 + 1 / np.log2(3) + 1 / np.log2(4)
    np.testing.assert_allclose(ndcg_at_k(hits, targets.counts, 10), [(1 + 1 / np.log2(4)) / ideal])
    np.testing.assert_allclose(recall_at_k(hits, targets.counts, 3), [2 / 3])
    # At k=1 the ideal DCG only counts one relevant item.
    np.testing.assert_allclose(ndcg_at_k(hits, targets.counts, 1), [1.0])


def test_padding_never_counts_as_a_hit():
    ranked = np.array([[-1, -1]])
    assert not hit_matrix(ranked, Targets.single(np.array([0]))).any()


def test_metrics_stay_in_unit_interval():
    rng = np.random.default_rng(0)
    ranked = np.stack([rng.permutation(40)[:20] for _ in range(50)])
    targets = Targets.single(rng.integers(0, 40, 50))
    for values in per_user_metrics(ranked, targets).values():
        assert values.min() >= 0 and values.max() <= 1
    assert 0 < coverage(ranked, 40, 10) <= 1
    assert coverage(np.array([[0, 1], [0, 2]]), 4, 1) == 0.25


def test_bootstrap_interval_contains_mean():
    values = np.random.default_rng(1).random(300)
    lo, hi = bootstrap_ci(values, n_boot=300)
    assert lo < values.mean() < hi
    assert bootstrap_ci(np.zeros(0)) == (0.0, 0.0)
    better = paired_bootstrap(values + 0.1, values, n_boot=200)
    assert better["diff"] == pytest.approx(0.1) and better["p_not_better"] == 0.0


def test_summarize_runs_over_seeds_and_slices():
    targets = Targets.single(np.array([0, 1, 2, 3]))
    run_a = np.array([[0, 9], [9, 1], [9, 8], [9, 8]])  # users 0 and 1 hit
    run_b = np.array([[0, 9], [9, 8], [9, 8], [9, 8]])  # user 0 hits
    cold = restrict(targets, np.array([False, True, True, False]))
    result = summarize_runs([run_a, run_b], targets, 10, slices={"cold": cold}, n_boot=50)
    assert result["recall@10"] == pytest.approx((0.5 + 0.25) / 2)
    assert result["recall@10_seeds"] == [0.5, 0.25]
    assert result["recall@10_std"] == pytest.approx(0.125)
    assert result["runs"] == 2 and result["users"] == 4
    assert result["slices"]["cold"]["users"] == 2
    assert result["slices"]["cold"]["recall@10"] == pytest.approx(0.25)


@pytest.mark.parametrize(
    ("length", "segment"),
    [
        (0, "history 0-4"),
        (4, "history 0-4"),
        (5, "history 5-19"),
        (99, "history 20-99"),
        (100, "history 100+"),
    ],
)
def test_history_segment_ranges(length, segment):
    assert history_segment(length) == segment


def test_history_segments_split_the_users_by_history_length():
    targets = Targets(np.array([0, 1, 3, 4, 5]), np.array([7, 1, 2, 3, 4]))  # user 1 has two targets
    segments = history_segments(np.array([0, 7, 150, 30]), targets)
    assert list(segments) == ["history 0-4", "history 5-19", "history 20-99", "history 100+"]
    assert {name: s.counts.tolist() for name, s in segments.items()} == {
        "history 0-4": [1, 0, 0, 0],
        "history 5-19": [0, 2, 0, 0],
        "history 20-99": [0, 0, 0, 1],
        "history 100+": [0, 0, 1, 0],
    }
    assert segments["history 5-19"].items.tolist() == [1, 2]
    ranked = np.array([[7, 9], [9, 9], [3, 9], [9, 9]])
    sliced = summarize_runs([ranked], targets, 10, slices=segments, n_boot=20)["slices"]
    assert sliced["history 0-4"]["recall@10"] == 1.0 and sliced["history 5-19"]["recall@10"] == 0.0
    assert [sliced[name]["users"] for name in segments] == [1, 1, 1, 1]
    with pytest.raises(ValueError, match="history lengths for 4 users"):
        history_segments(np.array([1, 2]), targets)


@pytest.mark.parametrize(
    ("new", "current", "passed", "reason"),
    [
        ({"ranker": 0.05, "popularity": 0.06}, None, False, "does not beat popularity"),
        ({"ranker": 0.10, "popularity": 0.06}, None, True, "nothing published yet"),
        (
            {"ranker": 0.10, "popularity": 0.06},
            {"ranker": {"ndcg@10": 0.13}},
            False,
            "worse than the published",
        ),
        ({"ranker": 0.108, "popularity": 0.06}, {"ndcg@10": 0.11}, True, "within 2.0% (relative)"),
    ],
)
def test_quality_gate(new, current, passed, reason):
    metrics = {name: {"ndcg@10": value, "recall@10": value} for name, value in new.items()}
    ok, why = quality_gate(metrics, current, tolerance=0.02)
    assert ok is passed
    assert reason in why


@pytest.mark.parametrize(
    ("new", "current", "passed"),
    [
        (0.10, 0.11, False),  # 9% below: an absolute 0.02 would have let it through
        (0.485, 0.50, False),  # 3% below
        (0.495, 0.50, True),  # 1% below
        (0.49, 0.50, True),  # exactly 2% below: on the floor
    ],
)
def test_quality_gate_tolerance_is_relative_to_the_published_ranker(new, current, passed):
    metrics = {"ranker": {"ndcg@10": new}, "popularity": {"ndcg@10": 0.01}}
    ok, why = quality_gate(metrics, {"ndcg@10": current}, tolerance=0.02)
    assert ok is passed, why


def test_quality_gate_needs_ranker_metrics():
    ok, why = quality_gate({"popularity": {"ndcg@10": 0.1}}, None, 0.02)
    assert not ok and "ranker" in why
