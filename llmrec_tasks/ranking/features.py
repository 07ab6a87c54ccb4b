"""Ranker features for (user, candidate) pairs: the same function in training, benchmark and serving.

Serving (per request), from a published bundle::

    ctx = context.context_from_artifacts(item_ids, embeddings, serving_stats, item_neighbors,
                                         spec["context"], spec["stats_end"])
    hist = events.Histories.from_lists([history_item_indices], [history_unix_seconds], [now])
    cands = sources.generate_candidates(ctx, hist, sources.CandidateParams(**spec["candidates"]))
    X = features.build_features(ctx, hist, cands, spec["features"])
    scores = booster.predict(X)                             # LightGBM from ranker.txt

``build_features(ctx, hist, cands, names=None) -> np.ndarray`` returns a float32 matrix with one
row per candidate (in ``cands`` order) and the columns ``names`` (default :data:`FEATURE_NAMES`);
NaN marks "not available" (LightGBM's missing value). It is pure and vectorised over users.

Feature groups: candidate-source scores and ranks (FAISS semantic neighbours, co-visitation,
item-kNN, EASE, popularity); LLM features (similarity of the item to the recency-weighted and
long-term profile of the user's history, to each of the last k items, to the user's favourite
categories, text-side item attributes, the text-aware sequence model's score, rank and
log-probability :data:`SEQ_FEATURES`); collaborative item features (popularity in recent windows,
trend, age, mean weight) and user features (activity, recency). :data:`LLM_FEATURES` lists the
columns the "no LLM features" ablation drops.
"""

from __future__ import annotations

import numpy as np

from llmrec_tasks.core.errors import ConfigError
from llmrec_tasks.ranking.context import RankContext, user_profile, weighted_sums
from llmrec_tasks.ranking.events import DAY, Histories
from llmrec_tasks.ranking.keys import lookup, row_entries, weighted_row_sums
from llmrec_tasks.ranking.sources import SOURCES, CandidateSet, rowwise_dot

LAST_K = 5  # similarity to each of the last k items (one column each: part of the feature names)

SOURCE_FEATURES = [f"{s}_score" for s in SOURCES] + [f"{s}_rank" for s in SOURCES]
# The text-aware sequence model's score (logit) and rank of the candidate, and its log-probability
# over the catalog (the score normalised per user).
SEQ_FEATURES = ["seq_score", "seq_rank", "seq_logprob"]
LLM_FEATURES = [
    "faiss_profile_score",
    "faiss_last_score",
    "faiss_profile_rank",
    "faiss_last_rank",
    "faiss_new_score",
    "faiss_new_rank",
    "sem_longterm",
    *[f"sem_last_{k + 1}" for k in range(LAST_K)],
    "sem_recent_max",
    "sem_recent_mean",
    "sem_category",
    "item_centrality",
    "item_text_len",
    *SEQ_FEATURES,  # item vectors are projected text vectors
]
OTHER_FEATURES = [
    "next_last1",
    "prev_last1",
    "cooc_last1",
    "next_support",
    "cooc_recent",
    "cat_affinity",
    "cat_affinity_recent",
    "item_n_categories",
    "item_pop_log",
    "item_pop_before",
    *["item_pop_w0", "item_pop_w1"],
    "item_trend",
    "item_age_days",
    "item_idle_days",
    "item_weight_mean",
    "user_hist_len",
    "user_span_days",
    "user_idle_days",
    "user_last_gap_days",
    "user_burst",
    "user_pop_log_mean",
    "pop_vs_user",
]
FEATURE_NAMES = list(dict.fromkeys(SOURCE_FEATURES + LLM_FEATURES + OTHER_FEATURES))
# The ranker's ablations: each is refit without these columns and compared with the full ranker.
ABLATIONS: dict[str, list[str]] = {"ranker_no_llm": LLM_FEATURES, "ranker_no_seq": SEQ_FEATURES}


def build_features(
    ctx: RankContext, hist: Histories, cands: CandidateSet, names: list[str] | None = None
) -> np.ndarray:
    """Feature matrix ``(len(cands.items), len(names))`` float32, one row per candidate.

    ``names`` (default :data:`FEATURE_NAMES`) selects and orders the columns, e.g. the
    ``features`` list of a published ``feature_spec.json``.
    """
    names = FEATURE_NAMES if names is None else names
    unknown = [name for name in names if name not in FEATURE_NAMES]
    if unknown:
        raise ConfigError(f"unknown feature(s) {unknown}: the ranker was trained by another llmrec version")
    n_rows = len(cands.items)
    cols: dict[str, np.ndarray] = {}
    for j, source in enumerate(SOURCES):
        cols[f"{source}_score"] = cands.scores[:, j]
        cols[f"{source}_rank"] = cands.ranks[:, j]
    user_of = cands.user_of
    items = cands.items
    ref = hist.ref_ts[user_of]
    cols["seq_logprob"] = cands.scores[:, SOURCES.index("seq")] - cands.seq_lse[user_of]
    cols.update(_semantic(ctx, hist, cands))
    cols.update(_categories(ctx, hist, cands))

    cols.update(_item_links(ctx, hist, cands))
    cols["item_n_categories"] = _n_categories(ctx, items)
    cols["item_text_len"] = ctx.item_text_len[items]
    cols["item_pop_log"] = np.log1p(ctx.item_pop[items])
    cols["item_pop_before"] = np.log1p(ctx.pop_before(items, ref))
    w0, w1 = ctx.params.pop_windows[0], ctx.params.pop_windows[-1]
    pop_w0 = ctx.window_counts(items, ref, w0)
    pop_w1 = ctx.window_counts(items, ref, w1)
    cols["item_pop_w0"] = pop_w0
    cols["item_pop_w1"] = pop_w1
    cols["item_trend"] = (pop_w0 + 1.0) / (pop_w1 * (w0 / w1) + 1.0)
    cols["item_age_days"] = (ref - ctx.first_before(items, ref)) / DAY
    cols["item_idle_days"] = (ref - ctx.last_before(items, ref)) / DAY
    cols["item_weight_mean"] = ctx.item_weight[items]

    lengths = hist.lengths
    ts = np.append(hist.ts, np.nan)  # index len(hist.ts) reads NaN: users with too short a history
    first_ts = ts[np.where(lengths > 0, hist.indptr[:-1], len(hist.ts))]
    last_ts = ts[np.where(lengths > 0, hist.indptr[1:] - 1, len(hist.ts))]
    prev_ts = ts[np.where(lengths > 1, hist.indptr[1:] - 2, len(hist.ts))]
    user_of_hist = np.repeat(np.arange(hist.n_users), lengths)
    burst = np.bincount(
        user_of_hist,
        weights=(hist.ts >= last_ts[user_of_hist] - ctx.params.burst_seconds),
        minlength=hist.n_users,
    )
    pop_log = np.log1p(ctx.item_pop[hist.items])
    user_pop = np.bincount(user_of_hist, weights=pop_log, minlength=hist.n_users) / np.maximum(lengths, 1)
    cols["user_hist_len"] = lengths[user_of]
    cols["user_span_days"] = ((last_ts - first_ts) / DAY)[user_of]
    cols["user_idle_days"] = ((hist.ref_ts - last_ts) / DAY)[user_of]
    cols["user_last_gap_days"] = ((last_ts - prev_ts) / DAY)[user_of]
    cols["user_burst"] = burst[user_of]
    cols["user_pop_log_mean"] = user_pop[user_of]
    cols["pop_vs_user"] = cols["item_pop_log"] - user_pop[user_of]

    out = np.empty((n_rows, len(names)), dtype=np.float32)
    for j, name in enumerate(names):
        out[:, j] = cols[name]
    return out


def _item_links(ctx: RankContext, hist: Histories, cands: CandidateSet) -> dict[str, np.ndarray]:
    """Relation values between each candidate and the user's most recent items."""
    recent = hist.last(ctx.params.recent_items)
    last = recent[cands.user_of]
    n_items = ctx.n_items
    out = {}
    for name in ("next", "prev", "cooc"):
        keys, data = relation_rows(ctx, name, recent)
        pairs = np.maximum(last, 0) * n_items + cands.items[:, None]
        values = np.where(last >= 0, lookup(keys, data, pairs, 0.0), 0.0).astype(np.float32)
        out[f"{name}_last1"] = values[:, 0]
        if name == "next":
            out["next_support"] = (values > 0).sum(axis=1).astype(np.float32)
        if name == "cooc":
            out["cooc_recent"] = values.mean(axis=1)
    return out


def relation_rows(ctx: RankContext, name: str, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A relation's entries in ``rows`` (item rows, -1 ignored) as sorted keys ``row * n_items + col``
    and float32 values: all a lookup of pairs from those rows reads, gathered from the CSR arrays
    in O(rows x neighbours) per call instead of searching the whole relation."""
    rel = ctx.relations[name]
    rows = np.unique(rows[rows >= 0]).astype(np.int64)
    pos, counts = row_entries(rel.indptr, rows)
    keys = np.repeat(rows, counts) * rel.shape[1] + rel.indices[pos]
    order = np.argsort(keys, kind="stable")  # rows sorted: only unsorted columns within a row move
    return keys[order], rel.data[pos][order].astype(np.float32)


def _semantic(ctx: RankContext, hist: Histories, cands: CandidateSet) -> dict[str, np.ndarray]:
    """Similarities of each candidate to the user's long-term profile and recent items."""
    emb = ctx.embeddings
    longterm = user_profile(ctx, hist, recency=False)
    user_of = cands.user_of
    out = {"sem_longterm": rowwise_dot(emb, cands.items, longterm, user_of)}
    n_recent = ctx.params.recent_similarity_items
    if n_recent < LAST_K:
        raise ConfigError(
            f"recent_similarity_items ({n_recent}) must be at least {LAST_K}: the sem_last_k features read them"
        )
    recent = hist.last(n_recent)
    sims = np.full((len(cands.items), n_recent), np.nan, dtype=np.float32)
    for u in range(cands.n_users):
        lo, hi = cands.indptr[u], cands.indptr[u + 1]
        valid = recent[u][recent[u] >= 0]
        if hi > lo and valid.size:
            sims[lo:hi, : valid.size] = emb[cands.items[lo:hi]] @ emb[valid].T
    for k in range(LAST_K):
        out[f"sem_last_{k + 1}"] = sims[:, k]
    any_recent = ~np.isnan(sims).all(axis=1)
    filled = np.where(np.isnan(sims), -np.inf, sims)
    out["sem_recent_max"] = np.where(any_recent, filled.max(axis=1), np.nan)
    counts = (~np.isnan(sims)).sum(axis=1)
    out["sem_recent_mean"] = np.where(any_recent, np.nansum(sims, axis=1) / np.maximum(counts, 1), np.nan)
    out["item_centrality"] = ctx.cached("item_centrality", lambda: _centrality(emb))[cands.items]
    return out


def precompute(ctx: RankContext) -> None:
    """Build now the per-context arrays the features read (serving: once per bundle, at load)."""
    ctx.cached("item_centrality", lambda: _centrality(ctx.embeddings))
    ctx.cached("category_embeddings", lambda: _category_embeddings(ctx))


def _centrality(emb: np.ndarray) -> np.ndarray:
    """Cosine of each item to the catalog's mean embedding."""
    centroid = emb.mean(axis=0)
    centroid /= max(float(np.linalg.norm(centroid)), 1e-9)
    return emb @ centroid


def _category_embeddings(ctx: RankContext) -> np.ndarray:
    """Normalised mean embedding of each category's items."""
    cat_emb = np.asarray(ctx.categories.T @ ctx.embeddings)
    return cat_emb / np.maximum(np.linalg.norm(cat_emb, axis=1, keepdims=True), 1e-9)


def _n_categories(ctx: RankContext, items: np.ndarray) -> np.ndarray:
    """Categories of each of ``items``: read from the CSR row bounds, O(items) not O(catalog)."""
    indptr = ctx.categories.indptr
    return indptr[items + 1] - indptr[items]


def _categories(ctx: RankContext, hist: Histories, cands: CandidateSet) -> dict[str, np.ndarray]:
    """Category affinity (share of the user's recency-weighted history in the item's categories)
    and semantic similarity of the item to the centroid of the user's favourite categories."""
    user_of = cands.user_of
    n_rows = len(cands.items)
    cats = ctx.categories
    n_cats = cats.shape[1]
    if n_cats == 0:
        zeros = np.zeros(n_rows, dtype=np.float32)
        return {"cat_affinity": zeros, "cat_affinity_recent": zeros, "sem_category": zeros}
    pos = hist.position_from_end()
    # The candidates' categories as (candidate row, category) pairs, in category order per row.
    at, counts = row_entries(cats.indptr, cands.items)
    row_of = np.repeat(np.arange(n_rows), counts)
    pair_keys = user_of[row_of] * n_cats + cats.indices[at]
    out = {}
    for name, weights in (
        ("cat_affinity", np.power(0.5, pos / ctx.params.profile_half_life)),
        ("cat_affinity_recent", (pos < ctx.params.recent_items).astype(float)),
    ):
        keys, share = weighted_row_sums(cats, *hist.entries(weights), hist.n_users)
        user = keys // n_cats
        totals = np.zeros(hist.n_users, dtype=np.float32)
        np.add.at(totals, user, share)  # in category order: the same sum alone or in a batch
        share = share * (1.0 / np.maximum(totals, 1e-9))[user]
        affinity = np.zeros(n_rows, dtype=np.float32)
        np.add.at(affinity, row_of, lookup(keys, share, pair_keys, 0.0))
        out[name] = affinity
        if name == "cat_affinity":
            cat_emb = ctx.cached("category_embeddings", lambda: _category_embeddings(ctx))
            user_vec = weighted_sums(cat_emb, user, keys % n_cats, share, hist.n_users)
            user_vec /= np.maximum(np.linalg.norm(user_vec, axis=1, keepdims=True), 1e-9)
            out["sem_category"] = rowwise_dot(ctx.embeddings, cands.items, user_vec, user_of)
    return out
