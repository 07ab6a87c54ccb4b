"""Sparse item-to-item relations learned from interactions, and the item x category matrix.

- ``next``: sequential co-visitation (:func:`sequential_covis`), item -> items that followed it
  within a window of a user's sequence, row-normalised (:func:`row_normalise`);
- ``prev``: the same, backwards (items that usually come *before* the item);
- ``cooc``: item-kNN cosine of the user-item co-occurrence matrix (:func:`cooc_cosine`);
- ``ease``: EASE item-item weights (:func:`ease_weights`, closed form on the most popular items).

Each keeps the top ``k`` entries per item (:func:`topk_rows`); :func:`llmrec_tasks.ranking.context.build_context`
chooses the parameters.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp

from llmrec_tasks.core import constants as C
from llmrec_tasks.ranking.events import Events

RELATIONS = ("next", "prev", "cooc", "ease")


def category_matrix(categories: pd.Series) -> tuple[sp.csr_matrix, list[str]]:
    """Binary item x category matrix from ``|``-separated strings (empty -> no category)."""
    split = categories.fillna("").astype(str).str.split(C.CATEGORY_SEPARATOR, regex=False)
    exploded = split.explode().str.strip()
    exploded = exploded[exploded != ""]
    names = sorted(exploded.unique().tolist())
    col = pd.Index(names).get_indexer(exploded.to_numpy())
    rows = exploded.index.to_numpy()
    matrix = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, col)), shape=(len(categories), len(names)))
    matrix.data[:] = 1.0
    return matrix, names


def topk_rows(matrix: sp.csr_matrix | np.ndarray, k: int) -> sp.csr_matrix:
    """Keep the ``k`` largest positive entries of each row (sparse result)."""
    if isinstance(matrix, np.ndarray):
        n = matrix.shape[0]
        k = min(k, matrix.shape[1])
        part = np.argpartition(-matrix, k - 1, axis=1)[:, :k]
        vals = np.take_along_axis(matrix, part, axis=1)
        rows = np.repeat(np.arange(n), k)
        keep = vals.ravel() > 0
        return sp.csr_matrix((vals.ravel()[keep], (rows[keep], part.ravel()[keep])), shape=matrix.shape)
    coo = matrix.tocoo()
    keep = coo.data > 0
    row, col, val = coo.row[keep], coo.col[keep], coo.data[keep]
    order = np.lexsort((col, -val, row))  # ties: lower column first
    row, col, val = row[order], col[order], val[order]
    starts = np.searchsorted(row, row, "left")
    within = np.arange(len(row)) - starts
    keep = within < k
    return sp.csr_matrix((val[keep], (row[keep], col[keep])), shape=matrix.shape)


def sequential_covis(events: Events, n_items: int, window: int, power: float) -> sp.csr_matrix:
    """Item i followed by item j within ``window`` steps of a user's sequence, weight distance**-power."""
    rows, cols, vals = [], [], []
    for d in range(1, window + 1):
        same = events.user[d:] == events.user[:-d]
        rows.append(events.item[:-d][same])
        cols.append(events.item[d:][same])
        vals.append(np.full(int(same.sum()), d**-power, dtype=np.float32))
    matrix = sp.csr_matrix(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n_items, n_items)
    )
    matrix.setdiag(0)
    matrix.eliminate_zeros()
    return matrix


def row_normalise(matrix: sp.csr_matrix, power: float) -> sp.csr_matrix:
    """Divide each row by (its mass + 1) ** power: 1 = conditional probability, 0 = raw counts."""
    totals = np.asarray(matrix.sum(axis=1)).ravel()
    return sp.csr_matrix(sp.diags(1.0 / (totals + 1.0) ** power) @ matrix)


def user_item_matrix(events: Events, n_users: int, n_items: int) -> sp.csr_matrix:
    """Binary ``(n_users, n_items)`` interaction matrix (the input of item-kNN and EASE)."""
    matrix = sp.csr_matrix(
        (np.ones(len(events), np.float32), (events.user, events.item)), shape=(n_users, n_items)
    )
    matrix.data[:] = 1.0  # repeated consumption counts once
    return matrix


def cooc_cosine(x: sp.csr_matrix, k: int, block_items: int = 4096, shrink: float = 0.0) -> sp.csr_matrix:
    """Item-kNN: cosine of item columns of ``x``, top ``k`` per item. Sparse products in blocks of
    items: work and memory follow the co-occurrences, not the square of the catalog.

    ``shrink`` > 0 gives the shrunk cosine ``c_ij / (sqrt(n_i n_j) + shrink)``: pairs seen together
    by few users count less (0: the plain cosine)."""
    n_items = x.shape[1]
    xt = sp.csr_matrix(x.T, dtype=np.float32)
    inv_norm = 1.0 / np.sqrt(np.maximum(np.asarray(x.sum(axis=0)).ravel(), 1.0)).astype(np.float32)
    parts = []
    for start in range(0, n_items, block_items):
        stop = min(start + block_items, n_items)
        block = (xt[start:stop] @ x).tocoo()
        off_diagonal = block.row + start != block.col
        row, col = block.row[off_diagonal], block.col[off_diagonal]
        inv = inv_norm[start + row] * inv_norm[col]
        val = block.data[off_diagonal] * inv / (1.0 + np.float32(shrink) * inv)
        parts.append(topk_rows(sp.csr_matrix((val, (row, col)), shape=(stop - start, n_items)), k))
    return sp.csr_matrix(sp.vstack(parts)) if parts else sp.csr_matrix((0, n_items), dtype=np.float32)


def ease_gram(x: sp.csr_matrix, pop: np.ndarray, max_items: int) -> tuple[np.ndarray, np.ndarray]:
    """The items EASE runs on (the ``max_items`` most popular, sorted) and their Gram matrix
    (float64): computed once, shared by every ``lambda`` (:func:`ease_dense`)."""
    keep = np.flatnonzero(pop > 0)
    if keep.size > max_items:
        keep = np.sort(keep[np.argsort(-pop[keep], kind="stable")[:max_items]])
    sub = x[:, keep]
    return keep, (sub.T @ sub).toarray().astype(np.float64)


def ease_dense(gram: np.ndarray, lam: float) -> np.ndarray:
    """Dense EASE weights (Steck 2019) from a Gram matrix: ``B = -P / diag(P)`` with
    ``P = (G + lam I)^-1``, zero diagonal."""
    reg = gram.copy()
    reg[np.diag_indices_from(reg)] += lam
    inv = np.linalg.inv(reg)
    weights = -inv / np.diag(inv)
    weights[np.diag_indices_from(weights)] = 0.0
    return weights


def ease_weights(x: sp.csr_matrix, pop: np.ndarray, lam: float, max_items: int, k: int) -> sp.csr_matrix:
    """EASE (Steck 2019) on the most popular items; top-k weights per item, zero elsewhere."""
    n_items = x.shape[1]
    keep, gram = ease_gram(x, pop, max_items)
    if keep.size < 2:
        return sp.csr_matrix((n_items, n_items), dtype=np.float32)
    top = topk_rows(ease_dense(gram, lam).astype(np.float32), k).tocoo()
    return sp.csr_matrix((top.data, (keep[top.row], keep[top.col])), shape=(n_items, n_items))
