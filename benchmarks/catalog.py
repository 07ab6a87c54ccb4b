"""Generated catalogs at any size for the benchmarks (vectorised: 1M items in seconds).

Items have topic-coherent texts of varied length (1-6 description phrases, so length-grouped
batching has something to group); users interact mostly within one or two favourite topics,
with Zipf-like popularity, ``interactions_per_item`` events per item on average.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from llmrec_tasks.core import constants as C
from llmrec_tasks.data.contract import Dataset
from llmrec_tasks.data.sample import TOPICS

START = 1_767_225_600  # 2026-01-01 UTC
SPAN = 180 * 86_400


def generate_catalog(n_items: int, interactions_per_item: float = 5.0, seed: int = 0) -> Dataset:
    """Raw dataset (contract columns) with ``n_items`` items and proportional interactions."""
    rng = np.random.default_rng(seed)
    topics = list(TOPICS)
    topic = np.arange(n_items) % len(topics)
    n_phrases = rng.integers(1, 7, n_items)
    titles, texts = [], []
    for i in range(n_items):
        nouns, adjectives, phrases = TOPICS[topics[topic[i]]]
        titles.append(f"{adjectives[i % len(adjectives)]} {nouns[(i // 7) % len(nouns)]} {i}")
        picked = [phrases[(i + j * 3) % len(phrases)] for j in range(n_phrases[i])]
        texts.append("A story about " + ", and ".join(picked) + ".")
    items = pd.DataFrame(
        {
            C.ITEM_ID: [f"i{i:07d}" for i in range(n_items)],
            C.TITLE: titles,
            C.TEXT: texts,
            C.CATEGORIES: [topics[t] for t in topic],
        }
    )
    n_events = int(n_items * interactions_per_item)
    n_users = max(10, n_events // 25)
    favourite = rng.integers(len(topics), size=n_users)
    users = rng.integers(n_users, size=n_events)
    on_topic = rng.random(n_events) < 0.8
    event_topic = np.where(on_topic, favourite[users], rng.integers(len(topics), size=n_events))
    per_topic = -(-n_items // len(topics))
    rank = np.minimum(rng.zipf(1.3, n_events) - 1, per_topic - 1)
    item = np.minimum(event_topic + len(topics) * rank, n_items - 1)
    interactions = pd.DataFrame(
        {
            C.USER_ID: np.char.add("u", users.astype(str)),
            C.ITEM_ID: items[C.ITEM_ID].to_numpy()[item],
            C.TIMESTAMP: START + np.sort(rng.integers(0, SPAN, n_events)),
            C.WEIGHT: np.round(rng.uniform(1, 5, n_events) * 2) / 2,
        }
    ).drop_duplicates([C.USER_ID, C.ITEM_ID])
    return Dataset(items=items, interactions=interactions.reset_index(drop=True))


def change_texts(items: pd.DataFrame, fraction: float, seed: int = 1) -> tuple[pd.DataFrame, int]:
    """A copy with ``fraction`` of the item texts rewritten (the 'daily catalog edits')."""
    rng = np.random.default_rng(seed)
    changed = rng.choice(len(items), size=max(1, int(len(items) * fraction)), replace=False)
    out = items.copy()
    out.loc[changed, C.TEXT] = out.loc[changed, C.TEXT] + " Now with a revised edition."
    return out, len(changed)


def clustered_vectors(n: int, d: int = 384, clusters: int = 1000, seed: int = 0) -> np.ndarray:
    """Unit vectors around random centres (the structure text embeddings have), in float32."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d), dtype=np.float32)
    out = np.empty((n, d), dtype=np.float32)
    for start in range(0, n, 100_000):
        m = min(100_000, n - start)
        x = centres[rng.integers(clusters, size=m)] + 0.9 * rng.standard_normal((m, d), dtype=np.float32)
        out[start : start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def profile_like_queries(vectors: np.ndarray, n: int, items_per_user: int = 8, seed: int = 1) -> np.ndarray:
    """User-profile-like queries: normalised means of a few items near each other."""
    rng = np.random.default_rng(seed)
    anchors = rng.integers(len(vectors), size=n)
    q = vectors[anchors].astype(np.float64)
    for _ in range(items_per_user - 1):
        q += vectors[rng.integers(len(vectors), size=n)] * 0.3
    return (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)
