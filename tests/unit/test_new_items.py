"""The new-item protocol: the split (newest items by first interaction, none of their events in any
training statistic), the simulated cold start, and a small end-to-end benchmark on the sample."""

from __future__ import annotations

import json

import numpy as np
import pytest

from llmrec_tasks.core.config import NewItemsConfig, RankerConfig, SasrecConfig
from llmrec_tasks.core.errors import DataContractError
from llmrec_tasks.ranking import benchmark
from llmrec_tasks.ranking.benchmark import (
    format_table,
    loo_known,
    loo_stages,
    newest_items,
    run_benchmark,
    training_positions,
)
from llmrec_tasks.ranking.context import user_profile
from llmrec_tasks.ranking.evaluate import NEW_ITEMS, WARM_ITEMS
from llmrec_tasks.ranking.protocols import ALL_WARM, RANKER
from llmrec_tasks.ranking.ranker import candidate_params
from llmrec_tasks.ranking.seqstate import SeqScorer
from llmrec_tasks.ranking.sources import SOURCES
from tests.bundle_factory import toy_seq_weights
from tests.unit.ranking_data import embeddings
from tests.unit.test_train import topic_embeddings

RCFG = RankerConfig(train_windows=2, n_estimators=20)


def _first_ts(loo) -> np.ndarray:
    first = np.full(loo.n_items, np.inf)
    np.minimum.at(first, loo.events.item, loo.events.ts)
    return first


def test_new_items_are_the_newest_fraction_by_first_interaction(chain_loo):
    new = newest_items(chain_loo, 0.2)
    first = _first_ts(chain_loo)
    assert new.sum() == round(0.2 * chain_loo.n_items)
    assert first[new].min() >= first[~new].max()


def test_a_fraction_without_a_new_item_is_refused(chain_loo):
    with pytest.raises(DataContractError, match="at least one new and one warm item"):
        newest_items(chain_loo, 0.001)


def test_without_new_items_training_positions_are_the_loo_positions(chain_loo):
    expected = np.where(chain_loo.pos > 0, chain_loo.pos - 1, -1)
    assert np.array_equal(training_positions(chain_loo), expected)


def test_no_new_item_event_reaches_any_training_statistic(chain_loo):
    new = newest_items(chain_loo, 0.2)
    emb = embeddings(chain_loo.n_items)
    train, valid, test = loo_stages(chain_loo, emb, RCFG, new_items=new)
    assert test.ctx.item_pop[new].sum() == 0
    for rel in test.ctx.relations.values():
        assert rel[new].nnz == 0 and rel[:, new].nnz == 0
    for stage in [*train, valid, test]:
        assert not new[stage.hist.items].any()
    # Validation and training stages are built on the warm catalog: no new item is a candidate.
    for stage in [*train, valid]:
        assert not new[stage.targets.items].any() and not new[stage.cands.items].any()
        assert stage.positives().sum() > 0
    # The test targets are every user's last item, new ones included.
    last = chain_loo.events.item[chain_loo.pos == 0]
    assert new[test.targets.items].any() and np.isin(test.targets.items, last).all()
    known = loo_known(chain_loo, new)
    assert not new[known.events.item[known.valid | known.test]].any()
    # Validation targets are each user's last warm item before the test item.
    tpos = training_positions(chain_loo, new)
    assert not new[chain_loo.events.item[tpos >= 0]].any()
    ev = chain_loo.events
    has_history = np.bincount(ev.user[tpos > 0], minlength=chain_loo.n_users) > 0
    assert np.array_equal(valid.targets.items, ev.item[tpos == 0][has_history[ev.user[tpos == 0]]])


def test_the_faiss_new_source_lists_the_items_without_interactions(chain_loo):
    new = newest_items(chain_loo, 0.2)
    _, _, test = loo_stages(chain_loo, embeddings(chain_loo.n_items), RCFG, new_items=new)
    listed = test.cands.ranks[:, SOURCES.index("faiss_new")] <= candidate_params(RCFG).per_source
    assert listed.any() and (test.ctx.item_pop[test.cands.items[listed]] == 0).all()
    assert new[test.cands.items].any()
    # Every user with a history gets the new items by profile similarity, best first.
    profile = user_profile(test.ctx, test.hist, recency=True)
    for u in range(test.n_users):
        rows = np.flatnonzero(listed & (test.cands.user_of == u))
        order = rows[np.argsort(test.cands.ranks[rows, SOURCES.index("faiss_new")])]
        sims = test.ctx.embeddings[test.cands.items[order]] @ profile[u]
        assert np.all(np.diff(sims) <= 1e-6)


def test_simulated_cold_items_lose_their_events_in_training_stages_only(chain_loo):
    emb = embeddings(chain_loo.n_items)
    seq = SeqScorer.build(toy_seq_weights(emb), emb)
    plain_train, plain_valid, _ = loo_stages(chain_loo, emb, RCFG, seq=seq)
    train, valid, _ = loo_stages(chain_loo, emb, RCFG, simulated_fraction=0.3, seq=seq)
    assert np.array_equal(valid.ctx.item_pop, plain_valid.ctx.item_pop)
    assert valid.ctx.seq is seq
    delta = seq.weights.arrays["delta"]
    for stage, plain in zip(train, plain_train, strict=True):
        masked = (stage.ctx.item_pop == 0) & (plain.ctx.item_pop > 0)
        assert masked.any()
        assert not masked[stage.hist.items].any()
        assert np.array_equal(stage.targets.items, plain.targets.items)  # targets stay
        # In the sequence model too, a simulated item scores from its text alone, as a new item.
        changed = (stage.ctx.seq.vectors != seq.vectors).any(axis=1)
        assert changed[masked & (np.abs(delta).sum(axis=1) > 0)].all()
        assert (stage.ctx.item_pop[changed] == 0).all()
        np.testing.assert_allclose(stage.ctx.seq.vectors[changed], (seq.vectors - delta)[changed])


def test_new_item_benchmark_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setattr(benchmark, "cached_embeddings", lambda items, cfg: topic_embeddings(items))
    out = tmp_path / "bench.json"
    result = run_benchmark(
        "sample",
        protocol="new-items",
        seeds=1,
        out=out,
        ranker_cfg=RCFG,
        sasrec_cfg=SasrecConfig(enabled=False),
        newitems_cfg=NewItemsConfig(fraction=0.1, simulated_fraction=0.1),
        n_boot=20,
    )
    info, models = result["new_items"], result["models"]
    assert info["items"] == round(0.1 * result["dataset"]["items"]) and info["test_targets"] > 0
    ranker = models[RANKER]
    new, warm = ranker["slices"][NEW_ITEMS], ranker["slices"][WARM_ITEMS]
    assert new["users"] == info["test_targets"] and new["users"] + warm["users"] == ranker["users"]
    # The all-warm ranker never lists a new item; on the warm targets it is the ranker or below.
    assert models[ALL_WARM]["slices"][NEW_ITEMS]["recall@50"] == 0.0
    assert models["popularity"]["slices"][NEW_ITEMS]["recall@50"] == 0.0
    # Only the text sources can retrieve a new item; they do on the topic data.
    recall = info["candidate_recall"]
    assert recall["faiss_profile"] > 0 and recall["all"] > 0
    assert recall["next"] == recall["cooc"] == recall["ease"] == recall["pop"] == 0.0
    assert recall["faiss_new"] >= recall["faiss_profile"]
    assert new["recall@50"] > 0  # with the simulated cold start, the ranker lists new items
    assert info["ranker_new_vs_warm"] == pytest.approx(new["ndcg@10"] / warm["ndcg@10"])
    assert "new N@10" in format_table(result)
    assert json.loads(out.read_text())["new_items"]["items"] == info["items"]
    assert "New items" in out.with_suffix(".html").read_text()
