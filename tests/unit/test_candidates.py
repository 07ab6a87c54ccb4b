"""Candidate generation: relations, histories, popularity windows, serving round trip."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from llmrec_tasks.core import constants as C
from llmrec_tasks.ranking.context import context_from_artifacts, serving_frames
from llmrec_tasks.ranking.evaluate import Targets
from llmrec_tasks.ranking.events import Histories, ItemTimes, encode_events, item_order
from llmrec_tasks.ranking.features import build_features
from llmrec_tasks.ranking.sources import SOURCES, CandidateParams, generate_candidates
from tests.unit.ranking_data import N_ITEMS, N_USERS, embeddings, items_frame

PARAMS = CandidateParams(num_candidates=12, per_source=5, rank_depth=20)


def test_next_item_is_a_top_candidate(chain):
    events, users, ctx = chain
    hist = Histories.from_events(events, len(users))
    last = hist.last(1)[:, 0]
    expected = (last + 1) % N_ITEMS
    cands = generate_candidates(ctx, hist, PARAMS, targets=Targets.single(expected))
    next_col = SOURCES.index("next")
    for u in range(hist.n_users):
        lo, hi = cands.indptr[u], cands.indptr[u + 1]
        row = np.flatnonzero(cands.items[lo:hi] == expected[u])
        assert row.size == 1, f"user {u}: next item {expected[u]} missing from candidates"
        assert cands.ranks[lo + row[0], next_col] == 1
    assert cands.source_recall["next"] == 1.0
    assert cands.source_recall["all"] == 1.0


def test_candidates_exclude_history_and_respect_cap(chain):
    events, users, ctx = chain
    hist = Histories.from_events(events, len(users))
    cands = generate_candidates(ctx, hist, PARAMS)
    sizes = np.diff(cands.indptr)
    assert sizes.max() <= PARAMS.num_candidates
    for u in range(hist.n_users):
        seen = set(hist.items[hist.indptr[u] : hist.indptr[u + 1]].tolist())
        assert not seen & set(cands.items[cands.indptr[u] : cands.indptr[u + 1]].tolist())
    assert cands.scores.shape == cands.ranks.shape == (len(cands.items), len(SOURCES))
    assert cands.ranks.min() >= 1 and cands.ranks.max() <= PARAMS.rank_depth + 1


def test_user_without_history_gets_popular_items(chain):
    _, _, ctx = chain
    hist = Histories.from_lists([np.zeros(0, np.int64)], [np.zeros(0)], np.array([ctx.stats_end]))
    cands = generate_candidates(ctx, hist, PARAMS)
    assert 0 < len(cands.items) <= PARAMS.per_source
    assert np.all(cands.ranks[:, SOURCES.index("pop")] <= PARAMS.per_source)


def test_histories_last_and_positions():
    hist = Histories.from_lists(
        [np.array([4, 5, 6]), np.array([], dtype=np.int64), np.array([9])],
        [np.array([1.0, 2.0, 3.0]), np.array([]), np.array([5.0])],
        np.array([3.0, 0.0, 5.0]),
    )
    assert hist.last(2).tolist() == [[6, 5], [-1, -1], [9, -1]]
    assert hist.position_from_end().tolist() == [2, 1, 0, 0]
    assert hist.subset(np.array([2, 0])).items.tolist() == [9, 4, 5, 6]


def test_item_times_windows():
    times = ItemTimes.build(np.array([0, 0, 1, 1, 1]), np.array([10.0, 20.0, 15.0, 30.0, 40.0]))
    items = np.array([0, 1, 1])
    assert times.count(items, np.array([0.0, 0.0, 20.0]), np.array([20.0, 20.0, 40.0])).tolist() == [2, 1, 2]
    # The last 2 events up to t=30 are at 20 and 30: the window is (15, 30].
    assert times.window_start(np.array([30.0]), 2).tolist() == [15.0]
    assert times.first_before(np.array([0, 1, 1]), np.array([5.0, 20.0, 40.0]))[1:].tolist() == [15.0, 15.0]
    assert np.isnan(times.first_before(np.array([0]), np.array([5.0]))[0])
    assert times.last_before(np.array([1]), np.array([35.0])).tolist() == [30.0]


def test_ties_are_broken_by_natural_item_order():
    frame = pd.DataFrame(
        {
            C.USER_ID: ["u", "u", "u"],
            C.ITEM_ID: ["10", "9", "2"],
            C.TIMESTAMP: pd.to_datetime([5, 5, 1], unit="s", utc=True),
            C.WEIGHT: 1.0,
        }
    )
    index = pd.Index(["10", "9", "2"])
    events, _ = encode_events(frame, index)
    assert index[events.item].tolist() == ["2", "9", "10"]  # numeric order, not "10" < "9"
    assert item_order(["b", "a", "c"]).tolist() == [1, 0, 2]


def test_serving_context_reproduces_training_features(chain):
    """Candidates and features from published artifacts equal those of the training context."""
    events, _, ctx = chain
    item_ids = items_frame()[C.ITEM_ID].tolist()
    stats, neighbours = serving_frames(ctx, item_ids)
    served = context_from_artifacts(
        item_ids, embeddings(), stats, neighbours, ctx.params.to_dict(), ctx.stats_end
    )
    hist = Histories.from_events(events, N_USERS, ref_ts=np.full(N_USERS, ctx.stats_end))
    a = generate_candidates(ctx, hist, PARAMS)
    b = generate_candidates(served, hist, PARAMS)
    np.testing.assert_array_equal(a.items, b.items)
    np.testing.assert_allclose(a.scores, b.scores, rtol=1e-6)
    np.testing.assert_allclose(build_features(ctx, hist, a), build_features(served, hist, b), rtol=1e-5)


def test_serving_context_rejects_mismatched_items(chain):
    from llmrec_tasks.core.errors import DataContractError

    _, _, ctx = chain
    item_ids = items_frame()[C.ITEM_ID].tolist()
    stats, neighbours = serving_frames(ctx, item_ids)
    with pytest.raises(DataContractError, match="inconsistent"):
        context_from_artifacts(item_ids[::-1], embeddings(), stats, neighbours, ctx.params.to_dict(), 0.0)


def test_item_times_with_epoch_timestamps():
    """Real timestamps are ~1.7e9 s: per-item lookups must not spill into neighbouring items."""
    t = 1.7e9
    times = ItemTimes.build(np.array([0, 1, 1, 2]), np.array([t, t + 50, t + 100, t + 10]))
    items = np.array([0, 1, 1, 2, 2])
    ref = np.array([t + 1000, t + 75, t + 1000, t + 5, t + 10])
    first = times.first_before(items, ref)
    assert first[:3].tolist() == [t, t + 50, t + 50] and np.isnan(first[3]) and first[4] == t + 10
    last = times.last_before(items, ref)
    assert last[:3].tolist() == [t, t + 50, t + 100] and np.isnan(last[3]) and last[4] == t + 10


def test_blockwise_sparse_item_knn_matches_dense_cosine():
    import scipy.sparse as sp

    from llmrec_tasks.ranking.relations import cooc_cosine

    rng = np.random.default_rng(5)
    x = sp.csr_matrix((rng.random((40, 25)) < 0.2).astype(np.float32))
    dense = x.T.toarray() @ x.toarray()
    norms = np.sqrt(np.maximum(np.diag(dense), 1.0))
    cosine = dense / np.outer(norms, norms)
    np.fill_diagonal(cosine, 0.0)
    knn = cooc_cosine(x, k=3, block_items=2).toarray()
    for row in range(25):
        kept = np.flatnonzero(knn[row])
        assert len(kept) <= 3
        np.testing.assert_allclose(knn[row, kept], cosine[row, kept], rtol=1e-5)
        if len(kept):
            assert knn[row, kept].min() >= np.sort(cosine[row])[-3] - 1e-6


def _dense_top(scores: np.ndarray, seen: np.ndarray, depth: int) -> list[list[int]]:
    """Reference: best positive unseen columns per row, ties by lower column."""
    out = []
    for u, row in enumerate(scores):
        cols = [c for c in np.flatnonzero(row > 0) if not seen[u, c]]
        out.append(sorted(cols, key=lambda c: (-row[c], c))[:depth])
    return out


def test_sparse_source_lists_match_a_dense_brute_force(chain):
    from llmrec_tasks.ranking.sources import _batch_scores, _pop_score, collaborative_scores

    events, users, ctx = chain
    hist = Histories.from_events(events, len(users))
    seen = np.zeros((hist.n_users, N_ITEMS), dtype=bool)
    seen[np.repeat(np.arange(hist.n_users), hist.lengths), hist.items] = True
    batch = _batch_scores(ctx, hist, PARAMS)
    dense = {}
    for name, (keys, values) in collaborative_scores(ctx, hist).items():
        dense[name] = np.zeros((hist.n_users, N_ITEMS), dtype=np.float32)
        dense[name].flat[keys] = values
    all_items = np.arange(N_ITEMS)
    dense["pop"] = np.stack([_pop_score(ctx, all_items, np.full(N_ITEMS, ref)) for ref in hist.ref_ts])
    for name, scores in dense.items():
        got = [[c for c in row if c >= 0] for row in batch.lists[name].tolist()]
        assert got == _dense_top(scores, seen, PARAMS.rank_depth), name


def test_context_params_round_trip_and_older_specs_get_the_defaults():
    from llmrec_tasks.ranking.context import ContextParams

    params = ContextParams(cooc_half_life_factor=2.0, recent_similarity_items=8, burst_seconds=5.0)
    assert ContextParams.from_dict(params.to_dict()) == params
    older = {k: v for k, v in ContextParams().to_dict().items() if k not in ("burst_seconds",)}
    assert ContextParams.from_dict(older) == ContextParams()


def test_faiss_last_items_sets_how_many_recent_items_feed_faiss_last(chain):
    import dataclasses

    from llmrec_tasks.ranking.sources import _batch_scores

    events, users, ctx = chain
    hist = Histories.from_events(events, len(users))
    only_last = _batch_scores(ctx, hist, dataclasses.replace(PARAMS, faiss_last_items=1)).lists["faiss_last"]
    last = hist.last(1)[:, 0]
    for u in range(hist.n_users):
        sims = ctx.embeddings @ ctx.embeddings[last[u]]
        sims[hist.items[hist.indptr[u] : hist.indptr[u + 1]]] = -np.inf
        assert only_last[u, 0] == np.argmax(sims)
    assert PARAMS.faiss_last_items == 3
    assert not np.array_equal(only_last, _batch_scores(ctx, hist, PARAMS).lists["faiss_last"])


def test_relation_scores_equal_the_sparse_products_bit_for_bit(chain):
    """Gathering relation rows adds up exactly what the weight matrix @ relation product adds."""
    from llmrec_tasks.ranking.context import recent_weights
    from llmrec_tasks.ranking.keys import weighted_row_sums

    events, users, ctx = chain
    hist = Histories.from_events(events, len(users))
    for weights in (recent_weights(ctx, hist), np.power(0.5, hist.position_from_end() / 7.0)):
        product = (hist.weight_matrix(N_ITEMS, weights) @ ctx.relations["cooc"]).toarray()
        keys, values = weighted_row_sums(ctx.relations["cooc"], *hist.entries(weights), hist.n_users)
        got = np.zeros_like(product)
        got.flat[keys] = values
        assert np.array_equal(got, product)
        assert (product.flat[keys] != 0).any() and np.all(
            product.flat[np.setdiff1d(np.arange(product.size), keys)] == 0
        )


def test_profiles_equal_the_sparse_products_bit_for_bit_with_repeated_items(chain):
    from llmrec_tasks.ranking.context import weighted_sums

    events, users, ctx = chain
    base = Histories.from_events(events, len(users))
    # A user who came back to an item: its weights are summed first, as the sparse matrix sums them.
    items = [base.items[base.indptr[u] : base.indptr[u + 1]] for u in range(base.n_users)]
    items[0] = np.concatenate([items[0], items[0][:2]])
    hist = Histories.from_lists(items, [np.arange(len(x), dtype=float) for x in items], base.ref_ts)
    weights = np.power(0.5, hist.position_from_end() / 3.0)
    product = np.asarray(hist.weight_matrix(N_ITEMS, weights) @ ctx.embeddings, dtype=np.float32)
    assert np.array_equal(weighted_sums(ctx.embeddings, *hist.entries(weights), hist.n_users), product)


@pytest.mark.parametrize("history_room", [0, 100, None])
def test_faiss_last_from_the_neighbour_table_equals_a_live_search(chain, monkeypatch, history_room):
    """The table's rows give the lists a search gives; a row the history empties falls back to one,
    and so does every item when the table would be too large (None: no table)."""
    from llmrec_tasks.ranking import sources

    events, users, ctx = chain
    hist = Histories.from_events(events, len(users))
    depth = 5  # rows of depth + RESCORE_MARGIN + history_room hits: shorter than the catalog at 0
    monkeypatch.setattr(sources, "NEIGHBOUR_HISTORY", history_room or 0)
    if history_room is None:
        monkeypatch.setattr(sources, "NEIGHBOUR_TABLE_MAX_BYTES", 0)
    ctx.cache.pop(("item_neighbours", depth), None)
    seen = np.unique(np.repeat(np.arange(hist.n_users), hist.lengths) * N_ITEMS + hist.items)
    owner, p = np.nonzero(hist.last(3) >= 0)
    items = hist.last(3)[owner, p]
    table = sources.item_neighbours(ctx, depth)
    if history_room is None:
        assert table is None
    else:
        assert table.shape == (N_ITEMS, min(N_ITEMS, depth + sources.RESCORE_MARGIN + history_room))
        ran_out = sources._unseen_hits(ctx, table[items].astype(np.int64), owner, seen, depth)[:, -1] < 0
        assert ran_out.any() == (table.shape[1] < N_ITEMS)  # at 0 the live search is exercised
    live = sources._faiss_lists(ctx, ctx.embeddings[items], owner, hist, seen, depth)
    from_table = sources._neighbour_lists(ctx, items, owner, hist, seen, depth)
    assert np.array_equal(from_table[0], live[0]) and np.array_equal(from_table[1], live[1])
    ctx.cache.pop(("item_neighbours", depth), None)


def test_relation_rows_look_up_what_the_relation_holds(chain):
    from llmrec_tasks.ranking.features import relation_rows
    from llmrec_tasks.ranking.keys import lookup

    _, _, ctx = chain
    rows = np.array([[3, -1, 7], [7, 0, -1]])
    for name, rel in ctx.relations.items():
        keys, data = relation_rows(ctx, name, rows)
        dense = rel.toarray().astype(np.float32)
        for row in (0, 3, 7):
            got = lookup(keys, data, row * N_ITEMS + np.arange(N_ITEMS), 0.0)
            assert np.array_equal(got, dense[row]), (name, row)
        assert set((keys // N_ITEMS).tolist()) <= {0, 3, 7}
