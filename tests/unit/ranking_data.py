"""Small synthetic data for the ranking tests: users walk through items in order (i -> i+1).

Also a pytest plugin (registered in tests/conftest.py): the session fixtures ``chain`` and
``chain_loo`` share that data between the ranking test modules.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from llmrec_tasks.core import constants as C
from llmrec_tasks.data.contract import Dataset
from llmrec_tasks.ranking.context import ContextParams, build_context
from llmrec_tasks.ranking.events import Events, encode_events

N_ITEMS = 30
N_USERS = 24
STEPS = 9
HOUR = 3600.0


def items_frame(n_items: int = N_ITEMS) -> pd.DataFrame:
    return pd.DataFrame(
        {
            C.ITEM_ID: [str(i) for i in range(n_items)],
            C.TITLE: [f"Item {i}" for i in range(n_items)],
            C.TEXT: ["" if i % 5 == 0 else f"about topic {i % 3}" for i in range(n_items)],
            C.CATEGORIES: ["" if i % 7 == 0 else f"c{i % 3}|all" for i in range(n_items)],
        }
    )


def embeddings(n_items: int = N_ITEMS, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(n_items, 8)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def chain_interactions(n_users: int = N_USERS, steps: int = STEPS, seed: int = 0) -> pd.DataFrame:
    """User u starts at a random item and then consumes the following items, one per hour."""
    rng = np.random.default_rng(seed)
    rows = []
    base = pd.Timestamp("2026-01-01", tz="UTC")
    for u in range(n_users):
        start = int(rng.integers(0, N_ITEMS))
        t0 = base + pd.Timedelta(hours=int(rng.integers(0, 200)))
        for step in range(steps):
            rows.append((f"u{u:02d}", str((start + step) % N_ITEMS), t0 + pd.Timedelta(hours=step), 1.0))
    return pd.DataFrame(rows, columns=[C.USER_ID, C.ITEM_ID, C.TIMESTAMP, C.WEIGHT])


def chain_events(**kwargs: int) -> tuple[Events, pd.Index]:
    return encode_events(chain_interactions(**kwargs), pd.Index(items_frame()[C.ITEM_ID]))


def chain_context(events: Events, n_users: int) -> object:
    return build_context(events, n_users, embeddings(), items_frame(), ContextParams(neighbors_k=20))


@pytest.fixture(scope="session")
def chain() -> tuple[Events, pd.Index, object]:
    """Events, user index and context of the chain data."""
    events, users = chain_events()
    return events, users, chain_context(events, len(users))


@pytest.fixture(scope="session")
def chain_loo() -> object:
    """The leave-one-out split of the chain data with 60 users."""
    from llmrec_tasks.ranking.benchmark import loo_split

    return loo_split(Dataset(items=items_frame(), interactions=chain_interactions(n_users=60)))
