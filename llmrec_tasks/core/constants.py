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
# Longest id (user_id, item_id) validation accepts, in characters: ids are copied into bundles, caches
# and logs, so a runaway value (a misaligned column, a pasted document) must not reach them.
MAX_ID_CHARS = 256

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
EMBEDDING_KEYS = "embedding_keys.json"  # cache key of each embeddings row (incremental refresh)
FAISS_INDEX = "index.faiss"
INDEX_INFO = "index.json"
RANKER_MODEL = "ranker.txt"
FEATURE_SPEC = "feature_spec.json"
METRICS = "metrics.json"
REPORT_HTML = "report.html"
VALIDATION_SUMMARY = "validation.json"
# Statistics the next run's volume/drift checks compare with (publish copies it into the bundle).
VALIDATION_STATS = "validation_stats.json"
VALIDATION_DOCS_DIR = "validation"  # Great Expectations Data Docs (HTML), index.html inside
SERVING_STATS = "serving_stats.parquet"
ITEM_NEIGHBORS = "item_neighbors.parquet"  # candidates.serving_frames() relations, read by serving
SEQ_MODEL = "seq_model.npz"  # the text-aware sequence model's NumPy weights (ranking.seqstate), when trained
# Work folder only (not published): the train stage's test features, to score another ranker on them.
RANKER_EVAL = "ranker_eval.npz"
MANIFEST = "manifest.json"
# Work-folder scratch of the sharded embed stage (plan, shard inputs and outputs).
EMBED_SHARDS_DIR = "embed_shards"
# Derived by `publish` from the snapshot for serving: item titles/popularity, recent user histories.
BUNDLE_ITEMS = "items.parquet"
USER_HISTORIES = "histories.parquet"
POPULARITY = "popularity"
CURRENT_POINTER = "current.json"

# Batch scoring output (`llmrec score-batch`, DAG llmrec_batch_score), under
# `<namespace>/scores/<version>/` unless another output is named: one Parquet part per shard, the
# plan (pinned version, reference time, shards) and its user list, then the manifest written after
# every part (the done marker).
SCORES_DIR = "scores"
SCORE_PART = "part-{shard:05d}.parquet"
SCORE_PART_PREFIX = "part-"
SCORES_PLAN = "_plan.json"
SCORES_USERS = "_users.parquet"
SCORES_MANIFEST = "_manifest.json"
SCORE_RECORDS_DIR = "_parts"  # one small JSON per written part: what finalize reads
# Columns of a score part (USER_ID and ITEM_ID too); `cold`: the user has no published history
# and got the most popular items, as `recommend` answers them.
RANK = "rank"
SCORE = "score"
VERSION = "version"
COLD = "cold"
SCORE_COLUMNS = (USER_ID, RANK, ITEM_ID, SCORE, VERSION, COLD)

DEFAULT_NAMESPACE = "production"

# The metric the gate and every comparison rank by, and the metric columns people read first.
PRIMARY_METRIC = "ndcg@10"
METRIC_COLUMNS = ("ndcg@10", "recall@10", "mrr", "ndcg@50", "recall@50", "coverage@10")

# Feedback (POST /events, impressions; `llmrec flush-events`): columns beyond the interaction
# contract's, the event types, and the object-store layout
# `<namespace>/feedback/{events,impressions}/day=YYYY-MM-DD/<segment>.parquet`.
EVENT_ID = "event_id"
EVENT_TYPE = "event_type"
REQUEST_ID = "request_id"
RECEIVED_AT = "received_at"
POSITION = "position"
ARM = "arm"
EVENT_TYPES = ("view", "click", "add_to_cart", "purchase", "rating")
EVENT_COLUMNS = (EVENT_ID, USER_ID, ITEM_ID, TIMESTAMP, WEIGHT, EVENT_TYPE, REQUEST_ID, RECEIVED_AT)
IMPRESSION_COLUMNS = (REQUEST_ID, USER_ID, TIMESTAMP, VERSION, ARM, POSITION, ITEM_ID)
CURRENT_ARM = "current"  # the arm of the current bundle (every user when no experiment runs)
CHALLENGER_ARM = "challenger"  # the arm of an A/B experiment's challenger bundle
ARMS = (CURRENT_ARM, CHALLENGER_ARM)
FEEDBACK_DIR = "feedback"
FEEDBACK_EVENTS = "events"
FEEDBACK_IMPRESSIONS = "impressions"
DAY_PARTITION = "day={day}"
# Online metrics (`llmrec online-metrics`): `<namespace>/online_metrics/<start>_<end>/<file>`.
ONLINE_METRICS_DIR = "online_metrics"
ONLINE_METRICS_JSON = "online_metrics.json"
ONLINE_METRICS_PARQUET = "online_metrics.parquet"
ONLINE_REPORT_HTML = "online_report.html"
