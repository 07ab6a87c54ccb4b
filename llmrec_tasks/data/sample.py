"""A generated demo dataset (deterministic): items with meaningful text, users who choose by topic.

Users prefer one or two topics and tend to stay on the topic of their previous item, so
semantic similarity between item texts carries real signal for the ranker.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd

from llmrec_tasks.core import constants as C
from llmrec_tasks.data.dataset import Dataset

TOPICS: dict[str, tuple[list[str], list[str], list[str]]] = {
    # topic: (title nouns, title adjectives, description phrases)
    "Space": (
        ["Nebula", "Orbit", "Starship", "Comet", "Galaxy", "Moonbase", "Rocket", "Eclipse"],
        ["Distant", "Silent", "Cosmic", "Lunar", "Stellar"],
        [
            "astronauts exploring a distant planet",
            "a mission to the outer moons",
            "life aboard a space station",
            "the physics of black holes",
            "a crew stranded beyond Mars",
        ],
    ),
    "Cooking": (
        ["Kitchen", "Recipe", "Bread", "Feast", "Spice", "Pasta", "Harvest", "Oven"],
        ["Rustic", "Simple", "Savory", "Homemade", "Seasonal"],
        [
            "weeknight recipes for the family",
            "baking sourdough bread at home",
            "street food from around the world",
            "cooking with seasonal vegetables",
            "the secrets of Italian pasta",
        ],
    ),
    "Jazz": (
        ["Saxophone", "Blue Note", "Swing", "Bebop", "Trumpet", "Club", "Groove", "Ballad"],
        ["Smoky", "Late-Night", "Cool", "Improvised", "Golden"],
        [
            "a history of bebop musicians",
            "improvisation in small jazz combos",
            "legendary jazz clubs of New York",
            "the saxophone masters of the fifties",
            "learning to swing on the piano",
        ],
    ),
    "Gardening": (
        ["Garden", "Roses", "Seedling", "Orchard", "Greenhouse", "Soil", "Compost", "Herbs"],
        ["Green", "Blooming", "Wild", "Backyard", "Organic"],
        [
            "growing vegetables in small spaces",
            "pruning fruit trees in winter",
            "building healthy compost soil",
            "a year in a cottage flower garden",
            "attracting bees and butterflies",
        ],
    ),
    "History": (
        ["Empire", "Kingdom", "Revolution", "Dynasty", "Chronicle", "Crown", "Siege", "Republic"],
        ["Ancient", "Forgotten", "Medieval", "Imperial", "Lost"],
        [
            "the rise and fall of the Roman empire",
            "daily life in a medieval village",
            "revolutions that shaped Europe",
            "the dynasties of ancient China",
            "letters from soldiers of the great war",
        ],
    ),
    "Fitness": (
        ["Workout", "Marathon", "Strength", "Cardio", "Yoga", "Sprint", "Stretch", "Core"],
        ["Daily", "Intense", "Mindful", "Functional", "Endurance"],
        [
            "training plans for your first marathon",
            "strength routines with free weights",
            "yoga for flexibility and calm",
            "high intensity interval training",
            "recovery and stretching for runners",
        ],
    ),
    "Detective": (
        ["Murder", "Alibi", "Detective", "Clue", "Witness", "Suspect", "Case", "Verdict"],
        ["Dark", "Twisted", "Hidden", "Cold", "Perfect"],
        [
            "a detective hunting a clever killer",
            "an unsolved murder in a small town",
            "a courtroom drama with a twist",
            "a private investigator in rainy London",
            "a kidnapping case gone wrong",
        ],
    ),
    "Finance": (
        ["Portfolio", "Market", "Dividend", "Budget", "Investor", "Wealth", "Capital", "Savings"],
        ["Smart", "Frugal", "Long-Term", "Passive", "Modern"],
        [
            "investing in index funds for retirement",
            "budgeting and paying off debt",
            "how stock markets really work",
            "building wealth with dividends",
            "personal finance for young professionals",
        ],
    ),
    "Ocean": (
        ["Reef", "Tide", "Whale", "Voyage", "Coral", "Harbor", "Lighthouse", "Current"],
        ["Deep", "Blue", "Stormy", "Tropical", "Salty"],
        [
            "diving among coral reefs",
            "the migration of humpback whales",
            "sailing across the Atlantic",
            "life in a fishing harbor town",
            "the mysteries of the deep sea",
        ],
    ),
    "Programming": (
        ["Algorithm", "Compiler", "Python", "Database", "Kernel", "Cloud", "Debugger", "Framework"],
        ["Practical", "Clean", "Concurrent", "Functional", "Scalable"],
        [
            "writing clean and testable code",
            "designing scalable distributed systems",
            "an introduction to Python",
            "how databases store and index data",
            "debugging concurrent programs",
        ],
    ),
    "Fantasy": (
        ["Dragon", "Sorcerer", "Quest", "Castle", "Sword", "Realm", "Prophecy", "Elves"],
        ["Enchanted", "Dark", "Legendary", "Mystic", "Ancient"],
        [
            "a young wizard on a perilous quest",
            "dragons awakening in the northern realm",
            "a prophecy that divides two kingdoms",
            "an enchanted forest full of elves",
            "a cursed sword and its heir",
        ],
    ),
    "Travel": (
        ["Journey", "Passport", "Road Trip", "Island", "Backpack", "Mountains", "Train", "Village"],
        ["Grand", "Hidden", "Budget", "Scenic", "Slow"],
        [
            "backpacking through South East Asia",
            "a scenic train journey across Europe",
            "hidden villages in the Alps",
            "island hopping in Greece",
            "travel on a shoestring budget",
        ],
    ),
}

START = datetime(2026, 5, 1, tzinfo=UTC)
DAYS = 180


def generate_sample(seed: int = 7, n_items: int = 720, n_users: int = 400, mean_events: int = 40) -> Dataset:
    """Generate the demo dataset in memory (raw string columns, like a CSV read)."""
    rng = np.random.default_rng(seed)
    topics = list(TOPICS)
    rows = []
    item_topic = []
    for i in range(n_items):
        t = i % len(topics)
        nouns, adjectives, phrases = TOPICS[topics[t]]
        second = (
            topics[(t + int(rng.integers(1, len(topics)))) % len(topics)] if rng.random() < 0.25 else None
        )
        title = (
            f"{rng.choice(adjectives)} {rng.choice(nouns)} {['I', 'II', 'III', 'IV'][i // len(topics) % 4]}"
        )
        first, second_phrase = rng.choice(phrases, size=2, replace=False)
        text = f"A story about {first}, and {second_phrase}."
        cats = topics[t] + (f"{C.CATEGORY_SEPARATOR}{second}" if second else "")
        rows.append((f"i{i:05d}", title, text, cats))
        item_topic.append(t)
    items = pd.DataFrame(rows, columns=[C.ITEM_ID, C.TITLE, C.TEXT, C.CATEGORIES])
    item_topic_arr = np.array(item_topic)
    popularity = rng.zipf(1.6, n_items).clip(max=200).astype(float)

    events = []
    for u in range(n_users):
        favourites = rng.choice(len(topics), size=int(rng.integers(1, 3)), replace=False)
        n = max(6, int(rng.poisson(mean_events)))
        start = rng.uniform(0, DAYS * 0.6)
        times = np.sort(start + rng.exponential((DAYS - start) / n, n).cumsum().clip(max=DAYS - start))
        seen: set[int] = set()
        topic = int(rng.choice(favourites))
        for ts in times:
            r = rng.random()
            if r < 0.15:
                topic = int(rng.integers(len(topics)))
            elif r < 0.45:
                topic = int(rng.choice(favourites))
            pool = np.flatnonzero(item_topic_arr == topic)
            pool = pool[~np.isin(pool, list(seen))]
            if pool.size == 0:
                continue
            p = popularity[pool] / popularity[pool].sum()
            item = int(rng.choice(pool, p=p))
            seen.add(item)
            rating = float(
                np.clip(np.round(rng.normal(4.2 if topic in favourites else 3.0, 0.8) * 2) / 2, 0.5, 5)
            )
            stamp = int((START + timedelta(days=float(ts))).timestamp())
            events.append((f"u{u:04d}", f"i{item:05d}", str(stamp), str(rating)))
    interactions = pd.DataFrame(events, columns=[C.USER_ID, C.ITEM_ID, C.TIMESTAMP, C.WEIGHT])
    return Dataset(items=items, interactions=interactions)


def write_sample(folder: Path, seed: int = 7) -> Path:
    """Write the sample as contract CSVs, e.g. to try the file-based loader."""
    data = generate_sample(seed=seed)
    folder.mkdir(parents=True, exist_ok=True)
    data.items.to_csv(folder / f"{C.ITEMS}.csv", index=False)
    data.interactions.to_csv(folder / f"{C.INTERACTIONS}.csv", index=False)
    return folder
