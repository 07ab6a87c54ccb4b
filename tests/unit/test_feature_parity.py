"""Training and serving compute the same feature rows: same user, same time, same events -> the
same candidates and bit-identical features.

The training side is the ranking stage's batched path over every user at once, on the context
:func:`~llmrec_tasks.ranking.context.build_context` learns from the events; the serving side is
the published bundle's scorer (context rebuilt from the published artifacts), one request each.
"""

from __future__ import annotations

import numpy as np
import pytest

from llmrec_tasks import publish
from llmrec_tasks.core import constants as C
from llmrec_tasks.ranking import events, features, sources
from llmrec_tasks.serving import recommender as serving
from tests.bundle_factory import REAL_CANDIDATES, make_run, real_context, toy_dataset

DAY = 86400.0


@pytest.fixture
def published_real(store_uri: str, monkeypatch: pytest.MonkeyPatch) -> serving.Recommender:
    monkeypatch.undo()  # the ranking stage's scorer, not the toy one
    publish.run_publish(*make_run(store_uri, real_features=True))
    return serving.Recommender(serving.load_bundle(store_uri, C.DEFAULT_NAMESPACE))


def training_rows(histories: list[serving.History], now: float) -> tuple[sources.CandidateSet, np.ndarray]:
    """Candidates and features of every history in one batch, on the training context."""
    items, inter, vectors = toy_dataset(0)
    ctx, _, _ = real_context(items, inter, vectors)
    hist = events.Histories.from_lists(
        [h.items for h in histories], [h.timestamps for h in histories], np.full(len(histories), now)
    )
    cands = sources.generate_candidates(ctx, hist, sources.CandidateParams(**REAL_CANDIDATES))
    return cands, features.build_features(ctx, hist, cands)


def test_serving_loads_the_sequence_model_the_ranker_was_trained_with(
    published_real: serving.Recommender,
) -> None:
    ctx = published_real.scorer.context
    assert ctx.seq is not None and C.SEQ_MODEL in published_real.bundle.manifest["files"]
    assert ctx.seq.weights.max_len == published_real.bundle.feature_spec["seq"]["max_len"]


def test_training_and_serving_build_bit_identical_feature_rows(published_real: serving.Recommender) -> None:
    rec = published_real
    bundle = rec.bundle
    now = float(bundle.feature_spec["stats_end"]) + 2 * DAY
    requests = [(user, ()) for user in bundle.user_row]  # 20 users: FAISS batches them as a matrix product
    # Real-time events: items the user has not seen, one with a weight, one without a timestamp.
    requests.append(("u4", [serving.Event("i7", 2.0, now - 60), "i13"]))
    requests.append((None, ["i2", "i5", "i8"]))
    histories = [rec._merge(user, recent)[0] for user, recent in requests]
    assert all(len(h) for h in histories)

    cands, train_x = training_rows(histories, now)
    for u, history in enumerate(histories):
        serve_items, serve_x = rec.scorer(history, now)
        lo, hi = cands.indptr[u], cands.indptr[u + 1]
        assert serve_items.tolist() == cands.items[lo:hi].tolist(), requests[u]
        assert serve_x.dtype == train_x.dtype == np.float32
        assert np.array_equal(serve_x, train_x[lo:hi], equal_nan=True), (
            requests[u],
            [bundle.feature_names[j] for j in np.flatnonzero((serve_x != train_x[lo:hi]).any(axis=0))],
        )
    # The sequence model's features are there (not NaN) and its source adds candidates.
    seq_cols = [bundle.feature_names.index(name) for name in features.SEQ_FEATURES]
    assert not np.isnan(train_x[:, seq_cols]).any()
    seq_rank = train_x[:, bundle.feature_names.index("seq_rank")]
    assert (seq_rank <= REAL_CANDIDATES["seq_candidates"]).sum() >= len(histories) * 5
