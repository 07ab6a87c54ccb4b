"""SASRec: sequence windows, masking, learning a deterministic pattern, seeds and the device check."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from llmrec_tasks.core.config import SasrecConfig
from llmrec_tasks.core.errors import ConfigError
from llmrec_tasks.ranking import sasrec
from llmrec_tasks.ranking.evaluate import Targets
from llmrec_tasks.ranking.events import Histories
from llmrec_tasks.ranking.sasrec import (
    PAD,
    SasrecModel,
    SasrecParams,
    fit_sasrec,
    last_items,
    resolve_device,
    sasrec_runs,
    score_users,
    training_windows,
    tune_sasrec,
)

N_ITEMS = 20
SMALL = SasrecParams(
    hidden=32, layers=1, max_len=8, dropout=0.0, learning_rate=0.01, batch_size=16, max_epochs=40, patience=40
)


def histories(seqs: list[list[int]]) -> Histories:
    return Histories.from_lists(
        [np.array(s) for s in seqs], [np.arange(len(s), dtype=float) for s in seqs], np.zeros(len(seqs))
    )


def chains(n_users: int = 60, length: int = 10, seed: int = 0) -> tuple[Histories, Targets]:
    """Users walk i -> i + 1 (mod N_ITEMS) from a random start; the target is the next step."""
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, N_ITEMS, n_users)
    seqs = [[(s + k) % N_ITEMS for k in range(length)] for s in starts]
    return histories(seqs), Targets.single((starts + length) % N_ITEMS)


def test_last_items_left_pads_and_keeps_the_most_recent():
    tokens = last_items(histories([[4, 5, 6], [1, 2, 3, 4, 5, 6]]), 4)
    assert tokens.tolist() == [[PAD, 5, 6, 7], [4, 5, 6, 7]]  # token = item + 1


def test_training_windows_never_predict_from_padding():
    windows = training_windows(histories([[4, 5, 6], [9], [1, 2, 3, 4, 5, 6]]), 4)
    assert windows.tolist() == [[PAD, PAD, 5, 6, 7], [3, 4, 5, 6, 7]]  # one item: nothing to learn
    inputs, targets = windows[:, :-1], windows[:, 1:]
    real = inputs != PAD
    # Every target position has a real input, so the first item of a history is never a target.
    assert targets[real].tolist() == [6, 7, 4, 5, 6, 7]
    assert (targets[real] != PAD).all()


@pytest.fixture(scope="module")
def chain_model():
    train, _ = chains(seed=1)
    hist, targets = chains(seed=2)
    with sasrec.torch_threads(1):
        model, info = fit_sasrec(train, N_ITEMS, hist, targets, SMALL)
    return model, info, hist, targets


def test_learns_the_next_item_of_a_chain(chain_model):
    model, info, hist, targets = chain_model
    ranked = score_users(model, hist, SMALL, depth=5)
    assert (ranked[:, 0] == targets.items).mean() >= 0.95
    assert info["valid_ndcg@10"] >= 0.95 and 1 <= info["best_epoch"] <= info["epochs"]


def test_seen_items_are_never_ranked_and_padding_is_no_item(chain_model):
    model, _, _, _ = chain_model
    hist = histories([[3, 4, 5], list(range(N_ITEMS - 2)), [7]])
    ranked = score_users(model, hist, SMALL, depth=N_ITEMS)
    assert ranked.shape == (3, N_ITEMS)
    for u in range(3):
        seen = set(hist.items[hist.indptr[u] : hist.indptr[u + 1]].tolist())
        listed = [i for i in ranked[u].tolist() if i >= 0]
        assert not seen & set(listed)
        assert sorted(listed) == sorted(set(range(N_ITEMS)) - seen)  # every unseen item, once
        assert (ranked[u, len(listed) :] == -1).all()
    with torch.no_grad():
        assert model.logits(torch.zeros(1, SMALL.hidden)).shape == (1, N_ITEMS)  # no padding class


def test_padding_is_masked():
    """Left padding is masked: padded positions are empty and give the real positions nothing."""
    torch.manual_seed(0)
    model = SasrecModel(N_ITEMS, SasrecParams(hidden=16, layers=2, max_len=8, dropout=0.0)).eval()
    short = torch.tensor([[PAD, PAD, PAD, PAD, PAD, 4, 5, 6]])
    garbage = torch.tensor([[9, 3, 2, 1, 8, 4, 5, 6]])  # same real items after other items
    with torch.no_grad():
        padded = model(short)
        other = model(garbage)
    assert not torch.allclose(padded[0, -1], other[0, -1])  # the model does read real history
    # Padded positions carry nothing: their hidden states are all the same (the final norm of 0).
    assert torch.allclose(padded[0, 0], padded[0, 4])
    # And a padded position gives the real ones nothing: whatever the padding embedding holds.
    with torch.no_grad():
        model.items.weight[PAD].fill_(5.0)
        again = model(short)
    assert torch.allclose(again[0, 5:], padded[0, 5:], atol=1e-6)


def test_training_is_deterministic_under_a_seed():
    train, _ = chains(seed=3)
    hist, targets = chains(seed=4)
    params = SasrecParams(hidden=16, layers=1, max_len=8, dropout=0.3, max_epochs=3, patience=3, seed=7)
    runs = []
    for seed in (7, 7, 8):
        with sasrec.torch_threads(1):
            model, info = fit_sasrec(train, N_ITEMS, hist, targets, dataclasses.replace(params, seed=seed))
        runs.append((model.state_dict(), info["curve"]))
    same = all(torch.equal(runs[0][0][k], runs[1][0][k]) for k in runs[0][0])
    assert same and runs[0][1] == runs[1][1]
    assert not all(torch.equal(runs[0][0][k], runs[2][0][k]) for k in runs[0][0])


def test_tuning_keeps_the_grid_point_with_the_best_validation_ndcg():
    train, _ = chains(seed=5)
    hist, targets = chains(seed=6)
    grid = (
        {"hidden": 16, "layers": 1, "max_len": 2, "dropout": 0.0},
        {"hidden": 32, "layers": 1, "max_len": 8, "dropout": 0.0},
    )
    base = SasrecParams(learning_rate=0.01, batch_size=16, max_epochs=5, patience=5)
    with sasrec.torch_threads(1):
        _, params, info = tune_sasrec(train, N_ITEMS, hist, targets, base, grid)
    best = max(info["grid"], key=lambda t: t["valid_ndcg@10"])
    assert info["chosen"] == best and params.grid_point() == {k: best[k] for k in grid[0]}
    assert [t["max_len"] for t in info["grid"]] == [2, 8]


def test_threads_are_restored():
    before = torch.get_num_threads()
    with sasrec.torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_cuda_without_cuda_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="sasrec_device is 'cuda' but torch sees no CUDA device"):
        resolve_device("cuda")
    with pytest.raises(ConfigError, match="set sasrec_device=cpu"):
        sasrec_runs(SasrecConfig(enabled=True, device="cuda"), 0, chains()[0], N_ITEMS, None, None, 10)
    assert resolve_device("cpu") == torch.device("cpu")


def test_disabled_sasrec_does_nothing():
    assert sasrec_runs(SasrecConfig(), 0, chains()[0], N_ITEMS, None, None, 10) == ({}, {})


def test_sasrec_is_scored_and_compared_like_a_baseline(chain_loo):
    """On the chain data's leave-one-out split SASRec joins the run's models and comparisons."""
    from llmrec_tasks.core import constants as C
    from llmrec_tasks.core.config import RankerConfig
    from llmrec_tasks.ranking.benchmark import loo_known, loo_stages
    from llmrec_tasks.ranking.protocols import evaluate_stages
    from tests.unit.ranking_data import embeddings

    rcfg = RankerConfig(
        n_estimators=20, early_stopping_rounds=0, train_windows=2, num_candidates=20, per_source=10
    )
    vectors = embeddings()[chain_loo.items[C.ITEM_ID].astype(int).to_numpy()]
    train, valid, test = loo_stages(chain_loo, vectors, rcfg)
    sequences = Histories.from_events(chain_loo.events.take(chain_loo.pos > 1), chain_loo.n_users)
    grid = ({"hidden": 32, "layers": 1, "max_len": 8, "dropout": 0.0},)
    cfg = SasrecConfig(enabled=True, max_epochs=30, patience=30, batch_size=16, learning_rate=0.01, threads=1)
    extra, info = sasrec_runs(cfg, 3, sequences, chain_loo.n_items, valid, test, 50, grid)
    results, _, _ = evaluate_stages(train, valid, test, rcfg, known=loo_known(chain_loo), extra_runs=extra)
    assert results["models"]["sasrec"]["ndcg@10"] >= 0.9  # the chain is learnt
    assert "ranker_vs_sasrec" in results["comparisons"]
    assert info["sasrec"]["chosen"]["max_len"] == 8 and info["sasrec"]["seed"] == 3


def test_early_stopping_waits_for_the_first_epochs(monkeypatch):
    """A validation plateau in the first epochs (popularity is learnt first) does not stop training."""
    train, _ = chains(seed=7)
    hist, targets = chains(seed=8)
    monkeypatch.setattr(sasrec, "validation_ndcg", lambda *args: 0.5)  # flat from the first epoch
    params = SasrecParams(hidden=8, layers=1, max_len=4, max_epochs=50, patience=2)
    _, info = fit_sasrec(train, N_ITEMS, hist, targets, params)
    assert info["epochs"] == sasrec.MIN_EPOCHS and info["best_epoch"] == 1
