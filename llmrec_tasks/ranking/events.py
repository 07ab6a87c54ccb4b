"""Interactions as arrays: encoded events, per-user histories and per-item interaction times.

:class:`Events` (every interaction, sorted by user, time and natural item order) is the input of
every statistic; :class:`Histories` is what a ranking is made from (each user's items, oldest
first, and the time the ranking is made); :class:`ItemTimes` answers popularity questions at any
reference time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp

from llmrec_tasks.core import constants as C

DAY = 86400.0


@dataclass(frozen=True)
class Events:
    """Encoded interactions sorted by (user, time, item order): the input of every statistic."""

    user: np.ndarray  # int64 user index
    item: np.ndarray  # int64 item index
    ts: np.ndarray  # float64 unix seconds
    weight: np.ndarray  # float32

    def __len__(self) -> int:
        return len(self.user)

    def take(self, mask: np.ndarray) -> Events:
        return Events(self.user[mask], self.item[mask], self.ts[mask], self.weight[mask])


def item_order(item_ids: list[str] | np.ndarray) -> np.ndarray:
    """Rank of each id in natural order (numeric when every id is an integer): the tie-breaker
    for interactions with the same timestamp."""
    ids = pd.Series(np.asarray(item_ids, dtype=str))
    numeric = pd.to_numeric(ids, errors="coerce")
    keys = numeric.to_numpy() if numeric.notna().all() else ids.to_numpy()
    order = np.argsort(keys, kind="stable")
    rank = np.empty(len(ids), dtype=np.int64)
    rank[order] = np.arange(len(ids))
    return rank


def encode_events(
    interactions: pd.DataFrame, item_index: pd.Index, user_index: pd.Index | None = None
) -> tuple[Events, pd.Index]:
    """Map a typed interaction frame to :class:`Events` (unknown items dropped); returns the user index."""
    frame = interactions[interactions[C.ITEM_ID].isin(item_index)]
    if user_index is None:
        user_index = pd.Index(np.sort(frame[C.USER_ID].unique()))
    frame = frame[frame[C.USER_ID].isin(user_index)]
    user = user_index.get_indexer(frame[C.USER_ID]).astype(np.int64)
    item = item_index.get_indexer(frame[C.ITEM_ID]).astype(np.int64)
    ts = frame[C.TIMESTAMP].to_numpy(dtype="datetime64[ns]").astype(np.int64) / 1e9
    weight = (
        frame[C.WEIGHT].to_numpy(dtype=np.float32) if C.WEIGHT in frame else np.ones(len(frame), np.float32)
    )
    tie = item_order(item_index.to_numpy())[item]
    order = np.lexsort((tie, ts, user))
    return Events(user[order], item[order], ts[order], weight[order]), user_index


@dataclass(frozen=True)
class Histories:
    """Each user's items (oldest first) with timestamps, and the time the ranking is made."""

    indptr: np.ndarray  # int64, n_users + 1
    items: np.ndarray  # int64
    ts: np.ndarray  # float64
    ref_ts: np.ndarray  # float64 per user

    @property
    def n_users(self) -> int:
        return len(self.indptr) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.indptr)

    @classmethod
    def from_events(cls, events: Events, n_users: int, ref_ts: np.ndarray | None = None) -> Histories:
        """Histories of users 0..n_users-1 from sorted events; ref time defaults to the last event."""
        counts = np.bincount(events.user, minlength=n_users)
        indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        if ref_ts is None:
            last = np.where(counts > 0, events.ts[np.maximum(indptr[1:] - 1, 0)], np.nan)
            ref_ts = last
        return cls(
            indptr, events.item.astype(np.int64), events.ts.astype(np.float64), np.asarray(ref_ts, float)
        )

    @classmethod
    def from_lists(
        cls, items: list[np.ndarray], timestamps: list[np.ndarray], ref_ts: np.ndarray
    ) -> Histories:
        """Build from per-user arrays (serving: one request = one user), each oldest first."""
        counts = np.array([len(x) for x in items], dtype=np.int64)
        indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        flat_items = (
            np.concatenate([np.asarray(x, np.int64) for x in items]) if items else np.zeros(0, np.int64)
        )
        flat_ts = np.concatenate([np.asarray(x, float) for x in timestamps]) if items else np.zeros(0)
        return cls(indptr, flat_items, flat_ts, np.asarray(ref_ts, float))

    def subset(self, rows: np.ndarray) -> Histories:
        starts, ends = self.indptr[rows], self.indptr[rows + 1]
        take = np.concatenate([np.arange(s, e) for s, e in zip(starts, ends, strict=True)] or [[]]).astype(
            int
        )
        indptr = np.concatenate([[0], np.cumsum(ends - starts)]).astype(np.int64)
        return Histories(indptr, self.items[take], self.ts[take], self.ref_ts[rows])

    def last(self, k: int) -> np.ndarray:
        """``(n_users, k)`` most recent items first, ``-1`` padded."""
        out = np.full((self.n_users, k), -1, dtype=np.int64)
        lengths = self.lengths
        for p in range(k):
            has = lengths > p
            out[has, p] = self.items[self.indptr[1:][has] - 1 - p]
        return out

    def position_from_end(self) -> np.ndarray:
        """For every history entry: 0 for the user's most recent item, 1 for the one before, ..."""
        user_of = np.repeat(np.arange(self.n_users), self.lengths)
        return (self.indptr[1:][user_of] - 1 - np.arange(len(self.items))).astype(np.int64)

    def entries(self, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(user, item, weight)`` per distinct item of each user's history, by user then item,
        repeated items' weights summed (float32), zero weights dropped: the stored entries of
        :meth:`weight_matrix`, in the order a product with it adds them up."""
        user_of = np.repeat(np.arange(self.n_users, dtype=np.int64), self.lengths)
        keys = user_of * (int(self.items.max(initial=0)) + 1) + self.items
        order = np.argsort(keys, kind="stable")
        keys, first = np.unique(keys[order], return_index=True)
        weight = weights.astype(np.float32)[order]
        if len(first) == len(order):  # no repeated items: nothing to sum
            summed = weight
        else:
            summed = np.zeros(len(first), dtype=np.float32)
            np.add.at(summed, np.repeat(np.arange(len(first)), np.diff(np.append(first, len(order)))), weight)
        keep = summed != 0
        return user_of[order][first][keep], self.items[order][first][keep], summed[keep]

    def weight_matrix(self, n_items: int, weights: np.ndarray) -> sp.csr_matrix:
        """Sparse ``(n_users, n_items)`` with the given weight per history entry (duplicates summed)."""
        user_of = np.repeat(np.arange(self.n_users), self.lengths)
        return sp.csr_matrix(
            (weights.astype(np.float32), (user_of, self.items)), shape=(self.n_users, n_items)
        )


@dataclass
class ItemTimes:
    """Per-item sorted interaction times: popularity in any window before any reference time."""

    keys: np.ndarray  # item * span + (ts - t0), sorted
    span: float
    t0: float
    all_ts: np.ndarray  # every event time, sorted
    items_by_time: np.ndarray  # the item of each event, in the order of ``all_ts``

    @classmethod
    def build(cls, item: np.ndarray, ts: np.ndarray) -> ItemTimes:
        t0 = float(ts.min()) if len(ts) else 0.0
        span = float(ts.max() - t0 + 2 * DAY) if len(ts) else 1.0
        order = np.argsort(ts, kind="stable")
        return cls(np.sort(item * span + (ts - t0)), span, t0, ts[order], item[order])

    def count(self, items: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray:
        """Interactions of ``items`` with ``start < ts <= end`` (arrays broadcast together)."""
        base = items * self.span - self.t0
        lo = np.searchsorted(
            self.keys, base + np.clip(start, self.t0 - DAY, self.t0 + self.span - DAY), "right"
        )
        hi = np.searchsorted(
            self.keys, base + np.clip(end, self.t0 - DAY, self.t0 + self.span - DAY), "right"
        )
        return (hi - lo).astype(np.float32)

    def window_start(self, ref: np.ndarray, n_events: int) -> np.ndarray:
        """Exclusive start of the window ``(start, ref]`` holding the last ``n_events`` events up to
        ``ref`` (scale-free popularity windows); -inf when there are fewer events."""
        pos = np.searchsorted(self.all_ts, ref, "right") - n_events - 1
        return np.where(pos >= 0, self.all_ts[np.clip(pos, 0, len(self.all_ts) - 1)], -np.inf)

    def window_items(self, ref: float, n_events: int) -> np.ndarray:
        """Distinct items of the window ``(window_start, ref]`` (sorted)."""
        start = self.window_start(np.array([ref]), n_events)[0]
        lo, hi = np.searchsorted(self.all_ts, [start, ref], "right")
        return np.unique(self.items_by_time[lo:hi])

    def first_before(self, items: np.ndarray, ref: np.ndarray) -> np.ndarray:
        """Earliest interaction time of each item, if it is at or before ``ref`` (else NaN)."""
        block = items * self.span  # keys of an item lie in [block, block + span - 2 days]
        first = np.minimum(np.searchsorted(self.keys, block, "left"), len(self.keys) - 1)
        found = self.keys[first] - block + self.t0
        ok = (self.keys[first] >= block) & (self.keys[first] < block + self.span) & (found <= ref)
        return np.where(ok, found, np.nan)

    def last_before(self, items: np.ndarray, ref: np.ndarray) -> np.ndarray:
        """Latest interaction time of each item at or before ``ref`` (NaN if none)."""
        block = items * self.span
        end = block + np.clip(ref - self.t0, -DAY, self.span - DAY)
        idx = np.maximum(np.searchsorted(self.keys, end, "right") - 1, 0)
        ok = (self.keys[idx] >= block) & (self.keys[idx] <= end)
        return np.where(ok, self.keys[idx] - block + self.t0, np.nan)
