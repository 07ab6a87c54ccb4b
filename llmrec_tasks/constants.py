"""Column and artifact names shared by every stage (one place, no string literals elsewhere)."""

from __future__ import annotations

# Input contract: columns of `items` and `interactions`.
ITEM_ID = "item_id"
USER_ID = "user_id"
TITLE = "title"
TEXT = "text"
CATEGORIES = "categories"
UPDATED_AT = "updated_at"
TIMESTAMP = "timestamp"
WEIGHT = "weight"

ITEM_REQUIRED = (ITEM_ID, TITLE)
ITEM_OPTIONAL = (TEXT, CATEGORIES, UPDATED_AT)
INTERACTION_REQUIRED = (USER_ID, ITEM_ID, TIMESTAMP)
INTERACTION_OPTIONAL = (WEIGHT,)
# Accepted aliases for the optional weight column.
WEIGHT_ALIASES = ("rating", "event_weight", "value")
CATEGORY_SEPARATOR = "|"

# Dataset table names (file stem in the input folder: items.csv / items.parquet, ...).
ITEMS = "items"
INTERACTIONS = "interactions"
USERS = "users"

# Snapshot written by `validate` and read by every later stage.
SNAPSHOT_DIR = "snapshot"
SNAPSHOT_ITEMS = "snapshot/items.parquet"
SNAPSHOT_INTERACTIONS = "snapshot/interactions.parquet"

# Bundle artifacts (relative to a bundle version folder).
EMBEDDINGS = "embeddings.npy"
ITEM_IDS = "item_ids.json"
FAISS_INDEX = "index.faiss"
INDEX_INFO = "index.json"
RANKER_MODEL = "ranker.txt"
FEATURE_SPEC = "feature_spec.json"
METRICS = "metrics.json"
REPORT_HTML = "report.html"
VALIDATION_SUMMARY = "validation.json"
SERVING_STATS = "serving_stats.parquet"
MANIFEST = "manifest.json"
CURRENT_POINTER = "current.json"

DEFAULT_NAMESPACE = "production"
