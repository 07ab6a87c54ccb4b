"""Features: shape and names, cold users, and no leakage of the target into its own features."""

from __future__ import annotations

import numpy as np
import pytest

from llmrec_tasks.core.config import RankerConfig
from llmrec_tasks.core.errors import ConfigError
from llmrec_tasks.ranking.benchmark import LooData, loo_stages
from llmrec_tasks.ranking.events import Events, Histories
from llmrec_tasks.ranking.features import FEATURE_NAMES, LLM_FEATURES, build_features
from llmrec_tasks.ranking.sources import CandidateParams, generate_candidates
from tests.unit.ranking_data import embeddings

PARAMS = CandidateParams(num_candidates=12, per_source=5, rank_depth=20)
SMALL = RankerConfig(num_candidates=12, per_source=5, train_windows=2)


@pytest.fixture(scope="module")
def chain_candidates(chain):
    """Context, histories and candidates of the chain data."""
    events, users, ctx = chain
    hist = Histories.from_events(events, len(users))
    return ctx, hist, generate_candidates(ctx, hist, PARAMS)


def test_feature_matrix_shape_and_values(chain_candidates):
    ctx, hist, cands = chain_candidates
    X = build_features(ctx, hist, cands)
    assert X.shape == (len(cands.items), len(FEATURE_NAMES)) and X.dtype == np.float32
    assert len(set(FEATURE_NAMES)) == len(FEATURE_NAMES)
    assert set(LLM_FEATURES) < set(FEATURE_NAMES)
    assert not np.isinf(X).any()
    col = FEATURE_NAMES.index
    assert (X[:, col("user_hist_len")] == hist.lengths[cands.user_of]).all()
    assert np.abs(X[:, col("sem_last_1")]).max() <= 1.0 + 1e-5
    # The obvious next item gets the top `next_last1` score among each user's candidates.
    expected = (hist.last(1)[:, 0] + 1) % len(ctx.item_pop)
    for u in range(hist.n_users):
        lo, hi = cands.indptr[u], cands.indptr[u + 1]
        best = cands.items[lo:hi][np.argmax(X[lo:hi, col("next_last1")])]
        assert best == expected[u]


def test_cold_user_features_are_missing_not_wrong(chain):
    _, _, ctx = chain
    hist = Histories.from_lists([np.zeros(0, np.int64)], [np.zeros(0)], np.array([ctx.stats_end]))
    cands = generate_candidates(ctx, hist, PARAMS)
    X = build_features(ctx, hist, cands)
    assert len(X) > 0
    assert np.isnan(X[:, FEATURE_NAMES.index("sem_last_1")]).all()
    assert (X[:, FEATURE_NAMES.index("user_hist_len")] == 0).all()


@pytest.fixture(scope="module")
def loo(chain_loo) -> LooData:
    return chain_loo


def _vectors(loo: LooData) -> np.ndarray:
    return embeddings()[loo.items["item_id"].astype(int).to_numpy()]


def test_features_never_see_the_target(loo):
    """Replacing every user's test item changes the test labels only, and no other stage."""
    before = loo_stages(loo, _vectors(loo), SMALL)
    rng = np.random.default_rng(3)
    items = loo.events.item.copy()
    for row in np.flatnonzero(loo.pos == 0):
        user = loo.events.user[row]
        seen = set(items[loo.events.user == user].tolist())
        items[row] = rng.choice([i for i in range(loo.n_items) if i not in seen])
    changed = LooData(
        loo.items,
        loo.item_index,
        loo.user_index,
        Events(loo.events.user, items, loo.events.ts, loo.events.weight),
        loo.pos,
    )
    after = loo_stages(changed, _vectors(loo), SMALL)
    (train_a, valid_a, test_a), (train_b, valid_b, test_b) = before, after
    for a, b in [*zip(train_a, train_b, strict=True), (valid_a, valid_b), (test_a, test_b)]:
        np.testing.assert_array_equal(a.cands.items, b.cands.items, err_msg=a.name)
        np.testing.assert_array_equal(a.X, b.X, err_msg=a.name)
    for a, b in [*zip(train_a, train_b, strict=True), (valid_a, valid_b)]:
        np.testing.assert_array_equal(a.y, b.y)
    assert not np.array_equal(test_a.targets.items, test_b.targets.items)


def test_stage_statistics_exclude_later_positions(loo):
    train, valid, test = loo_stages(loo, _vectors(loo), SMALL)
    assert [s.name for s in train] == ["train1", "train0"]
    # Statistics of the validation stage hold neither validation nor test interactions.
    assert valid.ctx.item_pop.sum() == (loo.pos > 1).sum()
    assert test.ctx.item_pop.sum() == (loo.pos > 0).sum()
    assert train[-1].ctx.item_pop.sum() == (loo.pos > 2).sum()


def test_named_columns_follow_the_requested_order(chain_candidates):
    ctx, hist, cands = chain_candidates
    full = build_features(ctx, hist, cands)
    names = ["sem_last_1", "next_score"]
    picked = build_features(ctx, hist, cands, names)
    np.testing.assert_array_equal(picked, full[:, [FEATURE_NAMES.index(n) for n in names]])
    with pytest.raises(ConfigError, match="unknown feature"):
        build_features(ctx, hist, cands, ["nope"])


def test_recent_similarity_items_below_last_k_is_refused(chain_candidates):
    import dataclasses

    ctx, hist, cands = chain_candidates
    short = dataclasses.replace(
        ctx, params=dataclasses.replace(ctx.params, recent_similarity_items=2), cache={}
    )
    with pytest.raises(ConfigError, match="recent_similarity_items"):
        build_features(short, hist, cands)
