"""The text-aware sequence model: item vectors, bounded deltas, training, NumPy inference, settings."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from llmrec_tasks.core.config import SeqConfig
from llmrec_tasks.core.errors import ConfigError, DataContractError
from llmrec_tasks.ranking import sasrec
from llmrec_tasks.ranking.events import Histories
from llmrec_tasks.ranking.seqmodel import SeqParams, TextSeqModel, fit_seq_model, seq_runs, torch_user_states
from llmrec_tasks.ranking.seqstate import (
    SeqScorer,
    SeqWeights,
    forward,
    item_vectors,
    score_histories,
    seq_ranked_lists,
    user_states,
)
from tests.unit.test_sasrec import N_ITEMS, chains, histories

TEXT_DIM = 12
SMALL = SeqParams(
    hidden=32,
    layers=1,
    max_len=8,
    dropout=0.0,
    learning_rate=0.01,
    batch_size=16,
    max_epochs=40,
    patience=40,
    delta_bound=0.5,
)


def text_vectors(n_items: int = N_ITEMS, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(n_items, TEXT_DIM)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def random_model(params: SeqParams, known: np.ndarray | None = None, seed: int = 0) -> TextSeqModel:
    """An untrained model with random (non-zero) deltas and positions."""
    torch.manual_seed(seed)
    known = np.ones(N_ITEMS, dtype=bool) if known is None else known
    model = TextSeqModel(text_vectors(), known, params)
    with torch.no_grad():
        model.delta_raw.normal_(std=3.0)
    return model.eval()


@pytest.fixture(scope="module")
def chain_fit():
    train, _ = chains(seed=1)
    hist, targets = chains(seed=2)
    with sasrec.torch_threads(1):
        model, info = fit_seq_model(text_vectors(), train, hist, targets, SMALL)
    return model, info, hist, targets


def test_learns_the_next_item_of_a_chain(chain_fit):
    model, info, hist, targets = chain_fit
    scorer = SeqScorer.build(model.export(SMALL), text_vectors())
    ranked = seq_ranked_lists(scorer, hist, depth=5)
    assert (ranked[:, 0] == targets.items).mean() >= 0.9
    assert info["valid_ndcg@10"] >= 0.9 and 1 <= info["best_epoch"] <= info["epochs"]
    assert info["curve"] and info["stopped"] in ("max_epochs", "patience", "time_budget")


def test_deltas_are_bounded_and_zero_for_unknown_items():
    known = np.arange(N_ITEMS) % 2 == 0
    model = random_model(dataclasses.replace(SMALL, delta_bound=0.25), known)
    with torch.no_grad():
        norms = model.delta().norm(dim=1).numpy()
    assert (norms[known] <= 0.25 + 1e-6).all() and (norms[known] > 0.2).all()  # raw std 3: near the bound
    assert (norms[~known] == 0).all()


def test_delta_dropout_zeroes_a_random_share_of_deltas_in_training_only():
    model = random_model(dataclasses.replace(SMALL, delta_dropout=0.5))
    with torch.no_grad():
        full = model.delta().norm(dim=1).numpy()
        model.train()
        first, second = (model.delta().norm(dim=1).numpy() for _ in range(2))
    assert (full > 0).all()
    for drawn in (first, second):
        dropped = drawn == 0
        assert 0.2 < dropped.mean() < 0.8  # about half of the 20 items
        np.testing.assert_array_equal(drawn[~dropped], full[~dropped])  # the others are not rescaled
    assert not np.array_equal(first == 0, second == 0)  # a fresh draw per call


def test_mask_unseen_leaves_unseen_items_out_of_the_training_softmax_only():
    known = np.arange(N_ITEMS) % 4 != 0
    model = random_model(dataclasses.replace(SMALL, mask_unseen=True), known)
    hidden = torch.randn(3, SMALL.hidden)
    with torch.no_grad():
        scored = model.logits(hidden)
        model.train()
        masked = model.logits(hidden)
    assert torch.isfinite(scored).all()
    assert torch.isneginf(masked[:, ~known]).all()
    torch.testing.assert_close(masked[:, known], scored[:, known])


def test_text_only_scorer_drops_the_deltas_of_the_given_items():
    model = random_model(SMALL)
    weights, text = model.export(SMALL), text_vectors()
    scorer = SeqScorer.build(weights, text)
    chosen = np.arange(N_ITEMS) % 3 == 0
    cold = scorer.text_only(chosen)
    a = weights.arrays
    projected = text.astype(np.float64) @ a["project.weight"].T.astype(np.float64) + a["project.bias"]
    np.testing.assert_allclose(cold.vectors[chosen], projected[chosen], atol=1e-12)
    np.testing.assert_array_equal(cold.vectors[~chosen], scorer.vectors[~chosen])


def test_a_new_item_vector_is_its_projected_text():
    known = np.arange(N_ITEMS) < N_ITEMS - 3  # the last three items were never seen in training
    model = random_model(SMALL, known)
    weights = model.export(SMALL)
    text = text_vectors()
    vectors = item_vectors(weights, text)
    a = weights.arrays
    projected = text.astype(np.float64) @ a["project.weight"].T.astype(np.float64) + a["project.bias"]
    np.testing.assert_array_equal(vectors[~known], projected[~known])
    assert np.abs(vectors[known] - projected[known]).max() > 0.1  # known items carry their delta
    with torch.no_grad():
        np.testing.assert_allclose(model.item_vectors().numpy(), vectors, atol=1e-5)


def test_numpy_inference_equals_torch():
    params = dataclasses.replace(SMALL, layers=2, heads=2, max_len=6)
    model = random_model(params)
    hist = histories([[3, 4, 5], [1, 2, 3, 4, 5, 6, 7, 8, 9], [7], [0, 19, 4, 4, 11, 2]])
    scorer = SeqScorer.build(model.export(params), text_vectors())
    expected = torch_user_states(model, hist, params.max_len)
    np.testing.assert_allclose(user_states(scorer, hist), expected, atol=1e-5)
    with torch.no_grad():
        logits = model.logits(torch.from_numpy(expected).float()).double().numpy()
    scores, lse, _ = score_histories(scorer, hist, depth=5)
    np.testing.assert_allclose(scores, logits, atol=1e-4)
    np.testing.assert_allclose(lse, np.log(np.exp(scores).sum(axis=1)), rtol=1e-12)


def test_state_reads_the_latest_max_len_events_and_users_are_independent():
    model = random_model(SMALL)
    scorer = SeqScorer.build(model.export(SMALL), text_vectors())
    long = list(range(15))
    np.testing.assert_array_equal(
        forward(scorer, np.array(long)), forward(scorer, np.array(long[-SMALL.max_len :]))
    )
    assert not np.allclose(forward(scorer, np.array(long)), forward(scorer, np.array(long[:-1])))
    batch = histories([[1, 2, 3], long, [5]])
    alone = histories([long])
    full = score_histories(scorer, batch, depth=7)
    one = score_histories(scorer, alone, depth=7)
    for got, want in zip(one, full, strict=True):
        np.testing.assert_array_equal(got[0], want[1])  # bit for bit: a request equals its batch row
    assert (forward(scorer, np.array([], dtype=np.int64)) == 0).all()


def test_lists_exclude_the_history():
    scorer = SeqScorer.build(random_model(SMALL).export(SMALL), text_vectors())
    hist = histories([[3, 4, 5], list(range(N_ITEMS - 2))])
    _, _, lists = score_histories(scorer, hist, depth=N_ITEMS)
    for u in range(2):
        seen = set(hist.items[hist.indptr[u] : hist.indptr[u + 1]].tolist())
        listed = [i for i in lists[u].tolist() if i >= 0]
        assert sorted(listed) == sorted(set(range(N_ITEMS)) - seen)


def test_same_seed_same_weights_other_seed_differs():
    train, _ = chains(seed=1)
    hist, targets = chains(seed=2)
    params = dataclasses.replace(SMALL, max_epochs=2)
    with sasrec.torch_threads(1):
        a = fit_seq_model(text_vectors(), train, hist, targets, params)[0].export(params)
        b = fit_seq_model(text_vectors(), train, hist, targets, params)[0].export(params)
        c = fit_seq_model(text_vectors(), train, hist, targets, dataclasses.replace(params, seed=1))[
            0
        ].export(params)
    for name in a.arrays:
        np.testing.assert_array_equal(a.arrays[name], b.arrays[name])
    assert not np.array_equal(a.arrays["delta"], c.arrays["delta"])


def test_time_budget_stops_training():
    train, _ = chains(seed=1)
    hist, targets = chains(seed=2)
    params = dataclasses.replace(SMALL, max_epochs=50, time_budget=1e-9)
    with sasrec.torch_threads(1):
        _, info = fit_seq_model(text_vectors(), train, hist, targets, params)
    assert info["epochs"] == 1 and info["stopped"] == "time_budget"


def test_weights_round_trip_and_catalog_check():
    weights = random_model(SMALL).export(SMALL)
    again = SeqWeights.from_bytes(weights.to_bytes())
    assert (again.hidden, again.heads, again.layers, again.max_len) == (32, 1, 1, 8)
    for name, value in weights.arrays.items():
        np.testing.assert_array_equal(again.arrays[name], value)
    with pytest.raises(DataContractError, match="different runs"):
        item_vectors(weights, text_vectors(N_ITEMS + 1))


def test_seq_runs_disabled_and_settings():
    train, _ = chains(seed=1)
    hist, targets = chains(seed=2)
    assert seq_runs(SeqConfig(enabled=False), 0, text_vectors(), train, hist, targets) == (None, {})
    weights, info = seq_runs(SeqConfig(), 0, text_vectors(), histories([[1], [2]]), hist, targets)
    assert weights is None and "too little history" in info["skipped"]
    with pytest.raises(ConfigError):
        SeqConfig(delta_bound=-1.0)
    with pytest.raises(ConfigError):
        SeqConfig(time_budget=0.0)
    weights, info = seq_runs(
        SeqConfig(hidden=16, layers=1, max_len=8, max_epochs=1, threads=1),
        3,
        text_vectors(),
        train,
        hist,
        targets,
    )
    assert weights is not None and weights.n_items == N_ITEMS
    assert info["seed"] == 3 and info["epochs"] == 1 and info["params"]["hidden"] == 16


def test_loo_data_stops_before_the_first_ranker_training_target(chain_loo):
    from llmrec_tasks.core.config import RankerConfig
    from llmrec_tasks.ranking.benchmark import loo_seq_data

    rcfg = RankerConfig(train_windows=2)
    train, valid_hist, targets = loo_seq_data(chain_loo, rcfg)
    first = rcfg.train_windows + 1  # the earliest ranker training target (stage train0)
    known = chain_loo.events.take(chain_loo.pos > first)
    assert train.lengths.sum() == len(known) and np.array_equal(train.items, known.item)
    expected = chain_loo.events.take(chain_loo.pos == first)
    assert np.array_equal(targets.items, expected.item[train.lengths[expected.user] > 0])
    assert valid_hist.n_users == targets.n_users


def test_production_data_stops_before_the_first_training_window():
    from llmrec_tasks.core.config import RankerConfig
    from llmrec_tasks.ranking.protocols import production_seq_data, time_windows
    from tests.unit.ranking_data import chain_events

    events, users = chain_events(n_users=40, steps=30)
    rcfg = RankerConfig(train_windows=2)
    start = time_windows(events.ts, rcfg)[0][0]
    train, valid_hist, targets = production_seq_data(events, len(users), rcfg)
    assert train.lengths.sum() == int((events.ts < start).sum()) and (train.ts < start).all()
    assert valid_hist.n_users == targets.n_users > 0 and (valid_hist.ts < start).all()
    # Each validation target is an item the user chose in the first training window, new to them.
    for u in range(valid_hist.n_users):
        history = set(valid_hist.items[valid_hist.indptr[u] : valid_hist.indptr[u + 1]].tolist())
        assert not history & set(targets.items[targets.indptr[u] : targets.indptr[u + 1]].tolist())


def test_seq_features_are_missing_without_a_model_and_log_probabilities_with_one(chain):
    from llmrec_tasks.ranking.features import FEATURE_NAMES, SEQ_FEATURES, build_features
    from llmrec_tasks.ranking.sources import CandidateParams, generate_candidates
    from tests.unit.ranking_data import embeddings

    events, users, ctx = chain
    hist = Histories.from_events(events, len(users))
    params = CandidateParams(num_candidates=60, per_source=5, rank_depth=20, seq_candidates=8)  # no cap
    cols = [FEATURE_NAMES.index(name) for name in SEQ_FEATURES]
    assert ctx.seq is None
    x = build_features(ctx, hist, generate_candidates(ctx, hist, params))
    assert np.isnan(x[:, cols[0]]).all() and np.isnan(x[:, cols[2]]).all()
    text = embeddings(ctx.n_items)
    model = TextSeqModel(text, np.ones(ctx.n_items, dtype=bool), SMALL).eval()
    with_seq = dataclasses.replace(ctx, seq=SeqScorer.build(model.export(SMALL), text), cache={})
    cands = generate_candidates(with_seq, hist, params)
    x = build_features(with_seq, hist, cands)
    assert not np.isnan(x[:, cols]).any() and (x[:, cols[2]] <= 0).all()
    seq_rank = x[:, FEATURE_NAMES.index("seq_rank")]
    per_user = np.bincount(cands.user_of[seq_rank <= 8], minlength=hist.n_users)
    assert (per_user == 8).all()  # the seq source's top eight unseen items are all candidates


def test_a_serving_scorer_keeps_states_and_gives_the_same_bits():
    plain = SeqScorer.build(random_model(SMALL).export(SMALL), text_vectors())
    kept = plain.with_memo(size=2)
    long = list(range(15))  # longer than max_len: the key is the items the encoder reads
    hist = histories([[3, 4, 5], long, [5]])
    want = score_histories(plain, hist, depth=7)
    for _ in range(2):  # computed, then read back
        for got, expected in zip(score_histories(kept, hist, depth=7), want, strict=True):
            np.testing.assert_array_equal(got, expected)
    assert len(kept.memo) == 2  # bounded: the least recently used state is gone
    shifted = histories([[0, *long]])  # same latest max_len items: the same state
    np.testing.assert_array_equal(user_states(kept, shifted), user_states(plain, histories([long])))
    assert plain.memo is None
