"""Full-ranking baselines on the synthetic chain data, and their tuning on the validation stage."""

from __future__ import annotations

import numpy as np
import pytest

from llmrec_tasks.ranking import baselines
from llmrec_tasks.ranking.baselines import (
    BASELINES,
    GRIDS,
    VALID_KEY,
    KnownEvents,
    baseline_rankings,
    describe_params,
    grid_points,
    history_matrix,
    top_items,
    tune_baselines,
)
from llmrec_tasks.ranking.context import ContextParams
from llmrec_tasks.ranking.evaluate import Targets, per_user_metrics
from llmrec_tasks.ranking.events import DAY, Events, Histories
from tests.unit.ranking_data import N_ITEMS, embeddings

DEFAULTS = {name: grid_points(name)[0] for name in BASELINES}


@pytest.fixture(scope="module")
def ranked(chain):
    events, users, ctx = chain
    hist = Histories.from_events(events, len(users))
    lists = baseline_rankings(
        events, len(users), ctx.embeddings, hist, DEFAULTS, depth=10, ctx_params=ContextParams()
    )
    return events, users, ctx, hist, lists


def _rank(chain_fixture, name: str, params: dict, hist: Histories, depth: int = 10) -> np.ndarray:
    events, users, ctx, _, _ = chain_fixture
    return baseline_rankings(
        events, len(users), ctx.embeddings, hist, {name: params}, depth=depth, ctx_params=ContextParams()
    )[name]


def test_every_baseline_excludes_history(ranked):
    *_, hist, lists = ranked
    assert set(lists) == set(BASELINES)
    for name, lst in lists.items():
        assert lst.shape == (hist.n_users, 10), name
        for u in range(hist.n_users):
            seen = set(hist.items[hist.indptr[u] : hist.indptr[u + 1]].tolist())
            assert not seen & set(lst[u].tolist()), name


def test_popularity_ranks_the_most_popular_unseen_item_first(ranked):
    _, _, ctx, hist, lists = ranked
    for u in range(hist.n_users):
        seen = hist.items[hist.indptr[u] : hist.indptr[u + 1]]
        pop = ctx.item_pop.astype(float).copy()
        pop[seen] = -1
        assert pop[lists["popularity"][u, 0]] == pop.max()


@pytest.mark.parametrize("window", GRIDS["covis"]["window"])
def test_covis_from_the_last_item_predicts_the_next_item_of_the_chain(ranked, window):
    hist = ranked[3]
    lists = _rank(ranked, "covis", {"window": window, "half_life": 0}, hist)
    expected = (hist.last(1)[:, 0] + 1) % N_ITEMS
    assert (lists[:, 0] == expected).mean() == 1.0


def test_semantic_with_the_last_item_only_ranks_its_closest_embedding_first(ranked):
    ctx = ranked[2]
    hist = Histories.from_lists([np.array([7, 3])], [np.array([0.0, 1.0])], np.array([1.0]))
    top = _rank(ranked, "semantic", {"half_life": 0}, hist, depth=1)[0, 0]
    sims = ctx.embeddings @ ctx.embeddings[3]
    sims[[3, 7]] = -np.inf
    assert top == int(np.argmax(sims))


def test_history_matrix_weights_by_recency_and_keeps_an_items_latest_occurrence():
    # One user, oldest first: items 4, 2, 4, 1 (4 is repeated: its latest occurrence is 1 step back).
    hist = Histories.from_lists([np.array([4, 2, 4, 1])], [np.arange(4.0)], np.array([4.0]))
    dense = {hl: history_matrix(hist, 6, hl).toarray()[0] for hl in (None, 0, 1)}
    np.testing.assert_allclose(dense[None], [0, 1, 1, 0, 1, 0])
    np.testing.assert_allclose(dense[0], [0, 1, 0, 0, 0, 0])
    np.testing.assert_allclose(dense[1], [0, 1, 0.25, 0, 0.5, 0])


def test_grid_points_cover_every_combination_default_first():
    points = grid_points("itemknn")
    grid = GRIDS["itemknn"]
    assert len(points) == len(grid["neighbours"]) * len(grid["shrinkage"]) * len(grid["half_life"])
    assert len({tuple(p.items()) for p in points}) == len(points)
    assert points[0] == {"neighbours": 20, "shrinkage": 0, "half_life": 0}


def test_describe_params_in_words():
    assert describe_params({"window_days": None}) == "popularity all time"
    assert describe_params({"neighbours": 200, "shrinkage": 10, "half_life": 3}) == (
        "neighbours 200, shrinkage 10, history half-life 3 items"
    )
    assert describe_params({"window": 3, "half_life": 0}) == "window 3 steps, history last item only"
    assert describe_params({"lambda": 500, "half_life": None}) == "lambda 500, history uniform"


def test_top_items_orders_and_pads():
    scores = np.array([[0.1, 0.5, -np.inf, 0.5]])
    assert top_items(scores, 4).tolist() == [[1, 3, 0, -1]]


def test_unknown_baseline_or_parameter_is_refused(ranked):
    hist = ranked[3]
    with pytest.raises(ValueError, match="unknown baseline"):
        _rank(ranked, "nope", {}, hist)
    with pytest.raises(ValueError, match="takes the parameters window, half_life"):
        _rank(ranked, "covis", {"window": 3}, hist)


# --- tuning -----------------------------------------------------------------------------------


def _shifting_popularity() -> tuple[KnownEvents, Histories, Targets, Histories]:
    """Item 0 was popular long ago (8 users, day 0), item 1 is popular now (3 users, day 100).

    Users 8 and 9 (history: item 5) are ranked at day 101: their validation target is item 1, the
    recently popular one. The test stage (ranked at day 102) would prefer all-time popularity: its
    targets would be item 0. All-time popularity is the first grid point (the default)."""
    rows = [(u, 0, 0.0) for u in range(8)] + [(u, 1, 100 * DAY) for u in range(3)]
    rows += [(u, 5, 50 * DAY) for u in (8, 9)]
    rows.sort()
    user, item, ts = (np.array(col) for col in zip(*rows, strict=True))
    events = Events(
        user.astype(np.int64), item.astype(np.int64), ts.astype(float), np.ones(len(rows), np.float32)
    )
    every = np.ones(len(rows), dtype=bool)
    known = KnownEvents(events, 10, valid=every, test=every)
    history = [np.array([5]), np.array([5])]
    times = [np.array([50 * DAY])] * 2
    valid_hist = Histories.from_lists(history, times, np.full(2, 101 * DAY))
    test_hist = Histories.from_lists(history, times, np.full(2, 102 * DAY))
    return known, valid_hist, Targets.single(np.array([1, 1])), test_hist


def test_tuning_picks_the_best_validation_point_not_the_default_and_never_looks_at_test():
    known, valid_hist, valid_targets, test_hist = _shifting_popularity()
    emb = embeddings(n_items=6)
    tuned = tune_baselines(
        known,
        emb,
        valid_hist,
        valid_targets,
        test_hist,
        depth=3,
        ctx_params=ContextParams(),
        names=("popularity",),
    )
    summary = tuned.summary["popularity"]
    grid = {p["params"]["window_days"]: p[VALID_KEY] for p in summary["grid"]}
    assert grid[None] < 1.0 and grid[7] == grid[30] == grid[90] == 1.0
    assert summary["params"] == {"window_days": 7}  # the best; on a tie the first in grid order
    assert summary[VALID_KEY] == 1.0 and summary["seconds"] >= 0
    # The test stage is ranked with the chosen window although all time would score better there.
    test_targets = Targets.single(np.array([0, 0]))
    all_time = baseline_rankings(
        known.events,
        10,
        emb,
        test_hist,
        {"popularity": {"window_days": None}},
        depth=3,
        ctx_params=ContextParams(),
    )["popularity"]
    assert per_user_metrics(all_time, test_targets)["ndcg@10"].mean() == 1.0
    assert tuned.rankings["popularity"][:, 0].tolist() == [1, 1]
    assert per_user_metrics(tuned.rankings["popularity"], test_targets)["ndcg@10"].mean() < 1.0


def test_tuning_ranks_the_test_stage_from_the_events_known_before_it(chain):
    events, users, ctx = chain
    hist = Histories.from_events(events, len(users))
    last = hist.last(1)[:, 0]
    # Validation knows nothing but the users' own items: the co-visitation of the chain is unknown
    # there, so every grid point scores 0 and the first one is kept; the test stage knows everything.
    own = np.zeros(len(events), dtype=bool)
    known = KnownEvents(events, len(users), valid=own, test=np.ones(len(events), dtype=bool))
    tuned = tune_baselines(
        known,
        ctx.embeddings,
        hist,
        Targets.single((last + 1) % N_ITEMS),
        hist,
        depth=5,
        ctx_params=ContextParams(),
        names=("covis",),
    )
    assert tuned.summary["covis"]["params"] == grid_points("covis")[0]
    assert (tuned.rankings["covis"][:, 0] == (last + 1) % N_ITEMS).all()


def test_ease_builds_the_gram_matrix_once_per_stage_and_one_inverse_per_lambda(chain, monkeypatch):
    events, users, ctx = chain
    calls = {"gram": 0, "dense": []}
    gram, dense = baselines.ease_gram, baselines.ease_dense

    def counting_gram(*args):
        calls["gram"] += 1
        return gram(*args)

    def counting_dense(g, lam):
        calls["dense"].append(lam)
        return dense(g, lam)

    monkeypatch.setattr(baselines, "ease_gram", counting_gram)
    monkeypatch.setattr(baselines, "ease_dense", counting_dense)
    hist = Histories.from_events(events, len(users))
    every = np.ones(len(events), dtype=bool)
    tuned = tune_baselines(
        KnownEvents(events, len(users), valid=every, test=every),
        ctx.embeddings,
        hist,
        Targets.single((hist.last(1)[:, 0] + 1) % N_ITEMS),
        hist,
        depth=5,
        ctx_params=ContextParams(),
        names=("ease",),
    )
    lambdas = list(GRIDS["ease"]["lambda"])
    assert calls["gram"] == 2  # validation, then test
    assert calls["dense"] == [*lambdas, tuned.summary["ease"]["params"]["lambda"]]
    assert len(tuned.summary["ease"]["grid"]) == len(lambdas) * len(GRIDS["ease"]["half_life"])
