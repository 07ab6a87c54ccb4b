"""Sorted integer keys ``row * n_cols + col``: membership, lookup and top lists per row.

Candidate generation works on (user, item) pairs of a batch encoded as one int64 key each, so
set operations are sorts and binary searches, with no dense ``(users, catalog)`` matrix.
"""

from __future__ import annotations

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


def csr_keys(matrix: sp.csr_matrix) -> np.ndarray:
    """Sorted keys ``row * n_cols + col`` of a canonical CSR matrix's stored entries."""
    rows = np.repeat(np.arange(matrix.shape[0], dtype=np.int64), np.diff(matrix.indptr))
    return rows * matrix.shape[1] + matrix.indices


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
