"""Sorted integer keys ``row * n_cols + col``: membership, lookup and top lists per row.

Candidate generation works on (user, item) pairs of a batch encoded as one int64 key each, so
set operations are sorts and binary searches, with no dense ``(users, catalog)`` matrix.
"""

from __future__ import annotations

import itertools

import numpy as np
import scipy.sparse as sp


def in_sorted(sorted_keys: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """``keys`` membership in a sorted unique array."""
    if sorted_keys.size == 0:
        return np.zeros(np.shape(keys), dtype=bool)
    pos = np.searchsorted(sorted_keys, keys).clip(max=len(sorted_keys) - 1)
    return sorted_keys[pos] == keys


def lookup(sorted_keys: np.ndarray, values: np.ndarray, keys: np.ndarray, default: float) -> np.ndarray:
    """``values`` at ``keys`` in a sorted unique key array, ``default`` where absent."""
    if sorted_keys.size == 0:
        return np.full(np.shape(keys), default, dtype=values.dtype)
    pos = np.searchsorted(sorted_keys, keys).clip(max=len(sorted_keys) - 1)
    return np.where(sorted_keys[pos] == keys, values[pos], default).astype(values.dtype)


def rank_lists(rows: np.ndarray, cols: np.ndarray, vals: np.ndarray, n_rows: int, depth: int) -> np.ndarray:
    """``(n_rows, depth)`` columns of the best positive ``vals`` per row, best first (ties: lower
    column), ``-1`` padded; from (row, col, value) triples with unique (row, col)."""
    keep = vals > 0
    rows, cols, vals = rows[keep], cols[keep], vals[keep]
    order = np.lexsort((cols, -vals, rows))
    rows, cols = rows[order], cols[order]
    pos = np.arange(len(rows)) - np.searchsorted(rows, rows)
    take = pos < depth
    out = np.full((n_rows, depth), -1, dtype=np.int64)
    out[rows[take], pos[take]] = cols[take]
    return out


def row_entries(indptr: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions in a CSR matrix's ``indices``/``data`` of the entries of ``rows`` (in that order,
    each row's entries in storage order) and each row's entry count: O(entries read), not O(rows of
    the matrix)."""
    starts = indptr[rows]
    counts = indptr[rows + 1] - starts
    offsets = np.cumsum(counts) - counts
    return np.repeat(starts - offsets, counts) + np.arange(int(counts.sum())), counts


ACCUMULATOR_CELLS = 1 << 22  # dense (users x columns) float32 cells summed at once (16 MiB)


def weighted_row_sums(
    matrix: sp.csr_matrix, user: np.ndarray, row: np.ndarray, weight: np.ndarray, n_users: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per user, ``sum(weight * matrix[row])`` over its entries: sorted keys ``user * n_cols + col``
    of the columns reached and their values, without building a sparse product.

    The rows are gathered from the CSR arrays and added up one by one in entry order (then column
    order within a row), in the matrix's dtype, exactly as the sparse product of the users' weight
    matrix with ``matrix`` adds them (``(user, row)`` unique, sorted: :meth:`Histories.entries`).
    Each user's sums depend only on its own entries: one user or a batch, the same values.
    """
    n_cols = matrix.shape[1]
    dtype = np.result_type(weight.dtype, matrix.dtype)
    pos, counts = row_entries(matrix.indptr, row)
    entry_user = np.repeat(user, counts)
    cols = matrix.indices[pos].astype(np.int64)
    values = np.repeat(weight.astype(dtype), counts) * matrix.data[pos].astype(dtype)
    chunk = max(1, ACCUMULATOR_CELLS // max(n_cols, 1))
    keys_out, values_out = [], []
    bounds = np.searchsorted(entry_user, np.arange(0, n_users + chunk, chunk))
    for c, (lo, hi) in enumerate(itertools.pairwise(bounds)):
        if hi == lo:
            continue
        base = c * chunk
        local = (entry_user[lo:hi] - base) * n_cols + cols[lo:hi]
        size = min(chunk, n_users - base) * n_cols
        acc = np.zeros(size, dtype=dtype)
        np.add.at(acc, local, values[lo:hi])
        reached = np.zeros(size, dtype=bool)
        reached[local] = True
        found = np.flatnonzero(reached)
        keys_out.append(found + base * n_cols)
        values_out.append(acc[found])
    if not keys_out:
        return np.zeros(0, np.int64), np.zeros(0, dtype)
    return np.concatenate(keys_out).astype(np.int64), np.concatenate(values_out)
