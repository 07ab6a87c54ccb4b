"""Full-ranking baselines on the synthetic chain data."""

from __future__ import annotations

import numpy as np
import pytest

from llmrec_tasks.ranking.baselines import BASELINES, baseline_rankings, top_items
from llmrec_tasks.ranking.events import Histories
from tests.unit.ranking_data import N_ITEMS


@pytest.fixture(scope="module")
def ranked(chain):
    events, users, ctx = chain
    hist = Histories.from_events(events, len(users))
    return ctx, hist, baseline_rankings(ctx, hist, depth=10)


def test_every_baseline_excludes_history(ranked):
    _, hist, lists = ranked
    assert set(lists) == set(BASELINES)
    for name, lst in lists.items():
        assert lst.shape == (hist.n_users, 10), name
        for u in range(hist.n_users):
            seen = set(hist.items[hist.indptr[u] : hist.indptr[u + 1]].tolist())
            assert not seen & set(lst[u].tolist()), name


def test_popularity_ranks_the_most_popular_unseen_item_first(ranked):
    ctx, hist, lists = ranked
    for u in range(hist.n_users):
        seen = hist.items[hist.indptr[u] : hist.indptr[u + 1]]
        pop = ctx.item_pop.astype(float).copy()
        pop[seen] = -1
        assert pop[lists["popularity"][u, 0]] == pop.max()


def test_covis_predicts_the_next_item_of_the_chain(ranked):
    _, hist, lists = ranked
    expected = (hist.last(1)[:, 0] + 1) % N_ITEMS
    assert (lists["covis"][:, 0] == expected).mean() == 1.0


def test_semantic_ranks_the_closest_embedding_first(ranked):
    ctx, _, _ = ranked
    hist = Histories.from_lists([np.array([3])], [np.array([0.0])], np.array([0.0]))
    top = baseline_rankings(ctx, hist, depth=1, names=("semantic",))["semantic"][0, 0]
    sims = ctx.embeddings @ ctx.embeddings[3]
    sims[3] = -np.inf
    assert top == int(np.argmax(sims))


def test_top_items_orders_and_pads():
    scores = np.array([[0.1, 0.5, -np.inf, 0.5]])
    assert top_items(scores, 4).tolist() == [[1, 3, 0, -1]]


def test_unknown_baseline_is_refused(ranked):
    ctx, hist, _ = ranked
    with pytest.raises(ValueError, match="unknown baseline"):
        baseline_rankings(ctx, hist, names=("nope",))
