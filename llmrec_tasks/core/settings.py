"""Every setting of a run, declared once: type, default, bounds, texts and trigger-form place.

The table below is the single source of :mod:`llmrec_tasks.core.config` (dataclass fields,
defaults, value checks), of the DAG's Airflow ``Param``\\ s (:func:`form_params`) and of the CLI's
``--set KEY=VALUE`` (:func:`parse_text`). A setting's flat key is ``<section>_<name>``
(``ranker_learning_rate`` is ``RunConfig.ranker.learning_rate``); run-level keys have no prefix.

Adding a setting is one :class:`Setting` entry in ``TABLE`` (in the order the form shows it).

Pure standard library: the DAG file imports this module at parse time.
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass
from typing import Any

from llmrec_tasks.core.constants import DEFAULT_NAMESPACE
from llmrec_tasks.core.errors import ConfigError

RUN = "run"
# Config sections (RunConfig attributes); a flat key starting with "<section>_" belongs to it.
SECTIONS = ("encoder", "index", "ranker", "sasrec", "seq", "validation")

# Trigger-form sections.
DATA = "Data source"
ENCODER = "Encoder model"
INDEX = "Index"
RANKER = "Ranker hyper-parameters"
SASREC = "Sequential baseline (SASRec)"
SEQ = "Text-aware sequence model"
NAMESPACE = "Namespace"
GATE = "Quality gate"
ADVANCED = "Advanced: data validation thresholds"
FORM_SECTIONS = {
    "encoder": ENCODER,
    "index": INDEX,
    "ranker": RANKER,
    "sasrec": SASREC,
    "seq": SEQ,
    "validation": ADVANCED,
}

# The deployment's data source when a run's `data_uri` is empty (resolved at run time, like the
# store): Airflow Variable, else environment variable. There is no default: demo data is opt-in.
DATA_VARIABLE = "llmrec_data_uri"
DATA_ENV = "LLMREC_DATA_URI"
# The generated demo dataset (`sample` or `sample:SEED`) and the namespace `make demo` runs it in.
SAMPLE_DATA = "sample"
DEMO_NAMESPACE = "demo"

DEFAULT_ENCODER = "default"
ENCODER_BACKENDS = ("onnx", "onnx-int8", "torch")
# `$(?!\n)`: the end of the text, also under Python's `re`, whose `$` accepts a trailing newline.
NAME_PATTERN = r"^(?!.*\.\.)[A-Za-z0-9][A-Za-z0-9._-]{0,62}$(?!\n)"
NAME_HELP = "use 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit, and no '..'"

_JSON_TYPES = {int: "integer", float: "number", bool: "boolean", str: "string"}
_TYPE_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
_TRUE_TEXTS = ("1", "true", "yes", "on")
_FALSE_TEXTS = ("0", "false", "no", "off")


@dataclass(frozen=True)
class Setting:
    """One setting: what values it takes (JSON-schema semantics), its default and its texts.

    ``form_section`` defaults to the section's (``FORM_SECTIONS``); run-level settings name theirs.
    ``nullable`` settings also take ``None`` (the form sends it for an empty field).
    """

    key: str
    type: type
    default: Any
    title: str
    help: str
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: float | None = None
    enum: tuple[str, ...] | None = None
    pattern: str | None = None
    pattern_help: str | None = None
    min_length: int | None = None
    nullable: bool = False
    form_section: str | None = None

    def __post_init__(self) -> None:
        if self.type not in _JSON_TYPES:
            raise ConfigError(f"setting {self.key}: type must be one of int, float, bool, str")
        if self.section == RUN and self.form_section is None:
            raise ConfigError(f"run-level setting {self.key} must name its form_section")

    @property
    def section(self) -> str:
        """The RunConfig section the key's prefix names, else ``run``."""
        prefix = self.key.partition("_")[0]
        return prefix if prefix in SECTIONS else RUN

    @property
    def name(self) -> str:
        """The dataclass field name: the key without its section prefix."""
        return self.key if self.section == RUN else self.key[len(self.section) + 1 :]

    @property
    def python_type(self) -> Any:
        return self.type | None if self.nullable else self.type

    def schema(self) -> dict[str, Any]:
        """JSON-schema keywords of the value (what Airflow's ``Param`` validates with)."""
        json_type = _JSON_TYPES[self.type]
        out: dict[str, Any] = {"type": ["null", json_type] if self.nullable else json_type}
        for keyword, value in (
            ("minimum", self.minimum),
            ("maximum", self.maximum),
            ("exclusiveMinimum", self.exclusive_minimum),
            ("enum", list(self.enum) if self.enum is not None else None),
            ("pattern", self.pattern),
            ("minLength", self.min_length),
        ):
            if value is not None:
                out[keyword] = value
        return out

    def check(self, value: Any) -> Any:
        """The value in its Python type (ints for integer-valued floats, floats for ints), or a
        ConfigError saying what is allowed. Accepts exactly what :meth:`schema` accepts, except that
        numbers must be finite (JSON has no NaN or infinity)."""
        if value is None and self.nullable:
            return None
        if self.type is bool:
            if not isinstance(value, bool):
                raise self._type_error(value)
            return value
        if self.type is str:
            if not isinstance(value, str):
                raise self._type_error(value)
            return self._check_text(value)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self._type_error(value)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{self.key} must be a finite number, got {value!r}")
        if self.type is int:
            if isinstance(value, float) and not value.is_integer():
                raise self._type_error(value)
            value = int(value)
        else:
            value = float(value)
        too_low = (self.minimum is not None and value < self.minimum) or (
            self.exclusive_minimum is not None and value <= self.exclusive_minimum
        )
        if too_low or (self.maximum is not None and value > self.maximum):
            raise ConfigError(f"{self.key} must be {self.range_text()}, got {value!r}")
        return value

    def _check_text(self, value: str) -> str:
        if self.min_length is not None and len(value) < self.min_length:
            raise ConfigError(f"{self.key} must have at least {self.min_length} character(s), got {value!r}")
        if self.enum is not None and value not in self.enum:
            raise ConfigError(f"{self.key} must be one of {', '.join(self.enum)}, got {value!r}")
        if self.pattern is not None and not re.search(self.pattern, value):
            raise ConfigError(
                f"invalid {self.key} {value!r}: {self.pattern_help or 'must match ' + self.pattern}"
            )
        return value

    def _type_error(self, value: Any) -> ConfigError:
        word = _TYPE_WORDS[self.type] + (" or null" if self.nullable else "")
        return ConfigError(f"{self.key} must be {word}, got {value!r}")

    def range_text(self) -> str:
        """The bounds in words: ``in [8, 512]``, ``in (0, 1]``, ``at least 16``, ``greater than 0``."""
        if self.minimum is not None:
            low, low_words = f"[{self.minimum:g}", f"at least {self.minimum:g}"
        elif self.exclusive_minimum is not None:
            low, low_words = f"({self.exclusive_minimum:g}", f"greater than {self.exclusive_minimum:g}"
        else:
            return f"at most {self.maximum:g}"
        return f"in {low}, {self.maximum:g}]" if self.maximum is not None else low_words

    def parse_text(self, text: str) -> Any:
        """A command-line value (always text) in the setting's type, then :meth:`check`\\ ed."""
        if self.type is str:
            return self.check(text)
        if self.type is bool:
            lowered = text.strip().lower()
            if lowered not in _TRUE_TEXTS + _FALSE_TEXTS:
                raise self._type_error(text)
            return lowered in _TRUE_TEXTS
        try:
            number: int | float = int(text)
        except ValueError:
            try:
                number = float(text)
            except ValueError:
                raise self._type_error(text) from None
        return self.check(number)


def _mostly(name: str, title: str, help_text: str, default: float = 1.0) -> Setting:
    """A Great Expectations `mostly`: the share of rows that must pass one expectation."""
    return Setting(
        f"validation_{name}_mostly",
        float,
        default,
        title,
        f"Share of rows that must pass: {help_text}.",
        minimum=0,
        maximum=1,
    )


TABLE: tuple[Setting, ...] = (
    # Data source
    Setting(
        "data_uri",
        str,
        None,
        "Input data",
        "Folder or s3:// prefix with items + interactions (CSV or Parquet), or a MovieLens "
        f"folder. Empty: the deployment's source (Variable {DATA_VARIABLE}, else env {DATA_ENV}); "
        "with none set the run is refused. `sample` / `sample:SEED` (generated demo data) is "
        f"refused in `{DEFAULT_NAMESPACE}`: `make demo` runs it in namespace `{DEMO_NAMESPACE}`.",
        nullable=True,
        form_section=DATA,
    ),
    Setting(
        "store_uri",
        str,
        None,
        "Object store",
        "Where runs and bundles are written (file:///path or s3://bucket/prefix). Empty: the "
        "deployment default (Variable llmrec_store_uri, env LLMREC_STORE_URI, else "
        "$AIRFLOW_HOME/llmrec-store).",
        pattern=r"^$|^(file://|s3://|/).+",
        pattern_help="give file:///path, s3://bucket/prefix or an absolute path",
        nullable=True,
        form_section=DATA,
    ),
    Setting(
        "feedback_ingest",
        bool,
        True,
        "Ingest served feedback",
        "Add the events the service recorded (POST /events, moved to <namespace>/feedback/events/ by "
        "`llmrec flush-events`) to the interactions before validation, each event id once; events "
        "on items the catalog lacks are dropped and counted.",
        form_section=DATA,
    ),
    # Encoder model
    Setting(
        "encoder_model",
        str,
        DEFAULT_ENCODER,
        "Encoder model",
        "`default` (packaged all-MiniLM-L6-v2) or a local Hugging Face model folder.",
        min_length=1,
    ),
    Setting(
        "encoder_max_length",
        int,
        128,
        "Max tokens per item",
        "Item texts are truncated to this many tokens.",
        minimum=8,
        maximum=512,
    ),
    Setting(
        "encoder_batch_size",
        int,
        64,
        "Batch size",
        "Texts encoded per forward pass.",
        minimum=1,
        maximum=4096,
    ),
    Setting(
        "encoder_backend",
        str,
        "onnx",
        "Backend",
        "`onnx`: the model's float32 graph in ONNX Runtime (torch's vectors, ~2x faster on CPU); "
        "`onnx-int8`: dynamically quantised (faster again, cosine ~0.99 to float32); "
        "`torch`: PyTorch, for models that do not export to ONNX.",
        enum=ENCODER_BACKENDS,
    ),
    Setting(
        "encoder_precision",
        str,
        "auto",
        "Precision (torch)",
        "`auto`: bf16 where the CPU supports it natively (same vectors to 1e-4 cosine), else fp32.",
        enum=("auto", "fp32", "bf16"),
    ),
    Setting(
        "encoder_shards",
        int,
        1,
        "Shards",
        "The catalog is encoded in this many parallel tasks; results do not depend on it.",
        minimum=1,
        maximum=256,
    ),
    # Index
    Setting(
        "index_kind",
        str,
        "auto",
        "Index kind",
        "`auto` picks exact (flat) for small catalogs and an approximate index that meets "
        "the recall floor and memory budget for large ones.",
        enum=("auto", "flat", "hnsw", "ivf", "ivfsq8", "ivfpq"),
    ),
    Setting(
        "index_memory_budget_mb",
        int,
        2048,
        "Memory budget (MB)",
        "Largest index size `auto` may choose.",
        minimum=16,
    ),
    Setting(
        "index_recall_floor",
        float,
        0.95,
        "Recall floor",
        "An approximate index must reach this recall@k against exact search, or the run fails.",
        exclusive_minimum=0,
        maximum=1,
    ),
    # Ranker
    Setting(
        "ranker_num_candidates",
        int,
        200,
        "Candidates per user",
        "Retrieved candidates the ranker re-orders.",
        minimum=10,
        maximum=5000,
    ),
    Setting(
        "ranker_learning_rate",
        float,
        0.05,
        "Learning rate",
        "LightGBM shrinkage per boosting round.",
        exclusive_minimum=0,
        maximum=1,
    ),
    Setting(
        "ranker_num_leaves",
        int,
        15,
        "Leaves per tree",
        "Maximum leaves of each LambdaRank tree.",
        minimum=2,
        maximum=4096,
    ),
    Setting(
        "ranker_n_estimators",
        int,
        500,
        "Boosting rounds",
        "Upper bound; early stopping usually ends sooner.",
        minimum=1,
        maximum=20000,
    ),
    Setting(
        "ranker_min_data_in_leaf",
        int,
        100,
        "Min rows per leaf",
        "Smallest number of training rows in a leaf (regularisation).",
        minimum=1,
    ),
    Setting(
        "ranker_early_stopping_rounds",
        int,
        50,
        "Early stopping rounds",
        "0 disables early stopping.",
        minimum=0,
    ),
    Setting(
        "ranker_eval_days",
        float,
        0.0,
        "Evaluation window (days)",
        "Hold out the last N days for evaluation; 0 = the latest 10% of the time span.",
        minimum=0,
    ),
    Setting(
        "ranker_per_source",
        int,
        60,
        "Candidates per source",
        "Candidates each retrieval source (FAISS, co-visitation, EASE, ...) contributes; at "
        "most the candidates per user.",
        minimum=1,
        maximum=5000,
    ),
    Setting(
        "ranker_train_windows",
        int,
        8,
        "Training windows",
        "Earlier time windows used as training groups.",
        minimum=1,
        maximum=100,
    ),
    Setting(
        "ranker_max_users_per_window",
        int,
        5000,
        "Users per window",
        "Users sampled (seeded) from each training and evaluation window; bounds training "
        "time on large catalogs and user bases.",
        minimum=1,
        maximum=10_000_000,
    ),
    Setting(
        "ranker_truncation_level",
        int,
        12,
        "LambdaRank truncation level",
        "Positions LambdaRank optimises; a little above the NDCG cutoff (10).",
        minimum=1,
        maximum=1000,
    ),
    Setting(
        "ranker_feature_fraction",
        float,
        0.8,
        "Feature fraction",
        "Share of the features each tree sees.",
        exclusive_minimum=0,
        maximum=1,
    ),
    Setting(
        "ranker_bagging_fraction",
        float,
        0.8,
        "Bagging fraction",
        "Share of the training rows each boosting round sees.",
        exclusive_minimum=0,
        maximum=1,
    ),
    Setting(
        "ranker_negative_fraction",
        float,
        0.3,
        "Negative sampling fraction",
        "Share of non-target candidates kept in each training group (lower trains faster).",
        exclusive_minimum=0,
        maximum=1,
    ),
    # Fixed for reproducibility; 1 is fastest on a shared 2-core machine.
    Setting(
        "ranker_num_threads",
        int,
        1,
        "Threads",
        "LightGBM threads per training task.",
        minimum=1,
        maximum=256,
    ),
    Setting(
        "ranker_seed",
        int,
        42,
        "Random seed",
        "Seeds sampling and training: the same seed and data give the same ranker.",
        minimum=0,
    ),
    # How relations, profiles and candidate lists are built: they change results (params hash).
    Setting(
        "ranker_covis_window",
        int,
        10,
        "Co-visitation window",
        "Co-visitation links items within this many steps of a user's sequence.",
        minimum=1,
        maximum=1000,
    ),
    Setting(
        "ranker_covis_distance_power",
        float,
        0.5,
        "Co-visitation distance power",
        "Co-visitation weight = distance ** -power (0: every step in the window counts the same).",
        minimum=0,
        maximum=10,
    ),
    Setting(
        "ranker_covis_norm_power",
        float,
        0.5,
        "Co-visitation normalisation power",
        "Each item's row is divided by (outgoing mass + 1) ** power; 1 = conditional probability.",
        minimum=0,
        maximum=1,
    ),
    Setting(
        "ranker_neighbors_k",
        int,
        100,
        "Neighbours per item",
        "Relation neighbours kept per item (next, previous, co-occurrence, EASE).",
        minimum=1,
        maximum=10_000,
    ),
    Setting(
        "ranker_ease_lambda",
        float,
        100.0,
        "EASE lambda",
        "L2 regularisation of the EASE item-item model.",
        exclusive_minimum=0,
    ),
    Setting(
        "ranker_ease_max_items",
        int,
        4000,
        "EASE items",
        "EASE runs on this many most popular items (its cost is cubic in it).",
        minimum=2,
        maximum=50_000,
    ),
    Setting(
        "ranker_recent_items",
        int,
        5,
        "Recent items",
        "Most recent items whose neighbours feed the next/previous/FAISS-last sources and features.",
        minimum=1,
        maximum=100,
    ),
    Setting(
        "ranker_recent_decay",
        float,
        0.6,
        "Recency decay",
        "Weight of the p-th most recent item: decay ** p.",
        exclusive_minimum=0,
        maximum=1,
    ),
    Setting(
        "ranker_profile_half_life",
        float,
        10.0,
        "Profile half-life",
        "Recency half-life, in history positions, of the user's semantic profile.",
        exclusive_minimum=0,
    ),
    Setting(
        "ranker_pop_window_short",
        int,
        1000,
        "Short popularity window",
        "Popularity over the last N events before the reference time (short horizon).",
        minimum=1,
    ),
    Setting(
        "ranker_pop_window_long",
        int,
        10000,
        "Long popularity window",
        "Popularity over the last N events before the reference time (long horizon).",
        minimum=1,
    ),
    Setting(
        "ranker_cooc_half_life_factor",
        float,
        4.0,
        "Co-occurrence half-life factor",
        "Co-occurrence history weights use a half-life of this times the profile half-life.",
        exclusive_minimum=0,
    ),
    Setting(
        "ranker_recent_similarity_items",
        int,
        20,
        "Items for recent similarity",
        "sem_recent_max / sem_recent_mean compare a candidate with this many latest items.",
        minimum=5,
        maximum=1000,
    ),
    Setting(
        "ranker_burst_seconds",
        float,
        60.0,
        "Burst window (s)",
        "user_burst counts the user's items within this many seconds of the last one.",
        minimum=0,
    ),
    Setting(
        "ranker_faiss_last_items",
        int,
        3,
        "FAISS-last items",
        "The faiss_last source takes FAISS neighbours of this many most recent items.",
        minimum=1,
        maximum=100,
    ),
    Setting(
        "ranker_seq_candidates",
        int,
        60,
        "Sequence-model candidates",
        "The seq source contributes the sequence model's top this many unseen items.",
        minimum=1,
        maximum=1000,
    ),
    Setting(
        "ranker_smoothing_window",
        int,
        10,
        "Early-stopping smoothing",
        "Validation rounds averaged by the smoothed early stopping.",
        minimum=1,
        maximum=1000,
    ),
    Setting(
        "ranker_list_depth",
        int,
        50,
        "Evaluated list depth",
        "Ranked list length scored in evaluation (Recall@50, MRR).",
        minimum=50,
        maximum=1000,
    ),
    Setting(
        "ranker_cold_max_interactions",
        int,
        10,
        "Cold-item threshold",
        "Evaluation's cold-start slice: target items with fewer known interactions.",
        minimum=1,
    ),
    Setting(
        "ranker_eval_fraction",
        float,
        0.1,
        "Evaluation share",
        "With eval_days 0, the evaluation window is this share of the time span.",
        exclusive_minimum=0,
        maximum=0.5,
    ),
    # Sequential baseline (SASRec): a comparison only, it never changes the published ranker.
    Setting(
        "sasrec_enabled",
        bool,
        False,
        "Score SASRec in the train stage",
        "Also train the SASRec sequential baseline (full softmax over the catalog, a small grid "
        "tuned on the validation window) and report it beside the ranker. Off by default in the "
        "daily run: it adds minutes on a 10k-item catalog and grows with catalog x users. "
        "`llmrec benchmark` scores it unless given --set sasrec_enabled=false.",
    ),
    Setting(
        "sasrec_device",
        str,
        "cpu",
        "Device",
        "`cpu`, or `cuda` on a GPU worker (refused when torch sees no CUDA device).",
        enum=("cpu", "cuda"),
    ),
    Setting(
        "sasrec_max_epochs",
        int,
        20,
        "Max epochs",
        "Upper bound per grid point; early stopping on validation NDCG@10 usually ends sooner.",
        minimum=1,
        maximum=1000,
    ),
    Setting(
        "sasrec_patience",
        int,
        5,
        "Early stopping patience",
        "Stop after this many epochs without a better validation NDCG@10 (the best epoch is kept).",
        minimum=1,
        maximum=1000,
    ),
    Setting(
        "sasrec_batch_size",
        int,
        32,
        "Batch size",
        "User sequences per Adam step.",
        minimum=1,
        maximum=4096,
    ),
    Setting(
        "sasrec_learning_rate",
        float,
        0.005,
        "Learning rate",
        "Adam learning rate.",
        exclusive_minimum=0,
        maximum=1,
    ),
    Setting(
        "sasrec_threads",
        int,
        2,
        "Threads",
        "torch intra-op threads while SASRec trains (the process's setting is restored after).",
        minimum=1,
        maximum=256,
    ),
    # Text-aware sequence model: a candidate source and features of the ranker (trained in `train`).
    Setting(
        "seq_enabled",
        bool,
        True,
        "Train the sequence model",
        "Train the text-aware sequential user model (projected text vectors plus a bounded per-item "
        "delta, next-item prediction) for the seq candidate source and the seq_* features. Off: "
        "those features are missing (NaN) and the source is empty.",
    ),
    Setting(
        "seq_hidden",
        int,
        64,
        "Hidden size",
        "Width of the item vectors and of the transformer.",
        minimum=8,
        maximum=1024,
    ),
    Setting("seq_layers", int, 2, "Layers", "Causal self-attention blocks.", minimum=1, maximum=8),
    Setting(
        "seq_max_len",
        int,
        200,
        "Max history length",
        "Latest events read per user, in training windows and for the user state at serving time.",
        minimum=2,
        maximum=2000,
    ),
    Setting(
        "seq_dropout",
        float,
        0.2,
        "Dropout",
        "Dropout in training (none at inference).",
        minimum=0,
        maximum=0.9,
    ),
    Setting(
        "seq_delta_bound",
        float,
        1.0,
        "Per-item delta bound",
        "Largest norm of an item's learned delta on top of its projected text vector (0: text only).",
        minimum=0,
        maximum=100,
    ),
    Setting(
        "seq_delta_dropout",
        float,
        0.0,
        "Delta dropout",
        "In training, the share of items whose delta is zeroed at each step (a fresh random draw): "
        "they score with their text-only vector, as a new item does, so text-only vectors learn to "
        "compete with the warm items' (0: off).",
        minimum=0,
        maximum=1,
    ),
    Setting(
        "seq_mask_unseen",
        bool,
        False,
        "Leave unseen items out of training",
        "In training, items without any training interaction are left out of the softmax (they "
        "did not exist yet) instead of being negatives at every step, which teaches their text "
        "to score low.",
    ),
    Setting(
        "seq_max_epochs",
        int,
        30,
        "Max epochs",
        "Upper bound; early stopping on validation NDCG@10 or the time budget usually ends sooner.",
        minimum=1,
        maximum=1000,
    ),
    Setting(
        "seq_patience",
        int,
        5,
        "Early stopping patience",
        "Stop after this many epochs without a better validation NDCG@10 (the best epoch is kept).",
        minimum=1,
        maximum=1000,
    ),
    Setting(
        "seq_time_budget",
        float,
        300.0,
        "Time budget (s)",
        "Training stops after the first epoch that ends past this many seconds (best epoch kept).",
        exclusive_minimum=0,
        maximum=86400,
    ),
    Setting(
        "seq_batch_size", int, 32, "Batch size", "User sequences per Adam step.", minimum=1, maximum=4096
    ),
    Setting(
        "seq_learning_rate",
        float,
        0.005,
        "Learning rate",
        "Adam learning rate.",
        exclusive_minimum=0,
        maximum=1,
    ),
    Setting(
        "seq_device",
        str,
        "cpu",
        "Device",
        "`cpu`, or `cuda` on a GPU worker (refused when torch sees no CUDA device).",
        enum=("cpu", "cuda"),
    ),
    Setting(
        "seq_threads",
        int,
        2,
        "Threads",
        "torch intra-op threads while the sequence model trains (the process's setting is restored after).",
        minimum=1,
        maximum=256,
    ),
    # Namespace
    Setting(
        "namespace",
        str,
        DEFAULT_NAMESPACE,
        "Namespace",
        "`production`, or an experiment namespace (e.g. `exp-small-lr`): everything the run "
        "writes stays under it. Backfills must use an experiment namespace.",
        pattern=NAME_PATTERN,
        pattern_help=NAME_HELP,
        form_section=NAMESPACE,
    ),
    # Quality gate
    Setting(
        "gate_tolerance",
        float,
        0.02,
        "Gate tolerance",
        "The new ranker may be at most this much (relative) worse than the current "
        "production bundle and must beat the baselines, or it is not promoted.",
        minimum=0,
        maximum=1,
        form_section=GATE,
    ),
    Setting(
        "promote",
        bool,
        True,
        "Promote when the gate passes",
        "Off: publish the bundle without making it current.",
        form_section=GATE,
    ),
    # Advanced: Great Expectations thresholds (one `validation` object in the form)
    _mostly("ids", "IDs present", "ids present (not null, not blank)"),
    _mostly("unique", "Unique IDs", "item ids (and user ids of `users`) unique"),
    _mostly("duplicates", "No duplicate events", "(user_id, item_id, timestamp) unique", 0.99),
    _mostly(
        "timestamps",
        "Valid timestamps",
        "timestamps parse, not before min_year, not after now + future_slack_hours",
    ),
    _mostly("weights", "Valid weights", "weights numeric and in [min_weight, max_weight]"),
    _mostly("orphans", "Known items", "interactions whose item is in the catalog", 0.99),
    _mostly("text", "Valid texts", "title present; title and text not oversized"),
    Setting(
        "validation_min_year",
        int,
        1990,
        "Earliest year",
        "Timestamps before Jan 1 of it are invalid.",
        minimum=1,
        maximum=9999,
    ),
    Setting(
        "validation_future_slack_hours",
        float,
        24.0,
        "Future slack (hours)",
        "Timestamps later than now plus this are invalid.",
        minimum=0,
    ),
    Setting("validation_min_weight", float, 0.0, "Min weight", "Smallest valid weight/rating."),
    Setting("validation_max_weight", float, 5.0, "Max weight", "Largest valid weight/rating."),
    Setting(
        "validation_max_title_chars",
        int,
        500,
        "Max title characters",
        "Longer titles are invalid.",
        minimum=1,
    ),
    Setting(
        "validation_max_text_chars",
        int,
        20_000,
        "Max text characters",
        "Longer texts are invalid.",
        minimum=1,
    ),
    Setting(
        "validation_volume_min_ratio",
        float,
        0.5,
        "Min volume ratio",
        "Row counts at least this share of the previous published run's.",
        minimum=0,
    ),
    Setting(
        "validation_volume_max_ratio",
        float,
        3.0,
        "Max volume ratio",
        "Row counts at most this multiple of the previous published run's.",
        minimum=0,
    ),
    Setting(
        "validation_top_items_fraction",
        float,
        0.01,
        "Top items fraction",
        '"Top items" = this share of the catalog, most interacted first.',
        exclusive_minimum=0,
        maximum=1,
    ),
    Setting(
        "validation_top_share_max_delta",
        float,
        0.15,
        "Top share max change",
        "Largest absolute change of the share of interactions on the top items.",
        minimum=0,
        maximum=1,
    ),
    Setting(
        "validation_category_max_kl",
        float,
        0.25,
        "Category max KL",
        "Largest KL divergence of the catalog's category distribution from the previous run's.",
        minimum=0,
    ),
    Setting(
        "validation_data_docs",
        bool,
        True,
        "Data Docs",
        "Render Great Expectations Data Docs HTML next to validation.json.",
    ),
)

SETTINGS: dict[str, Setting] = {s.key: s for s in TABLE}

# Sections the form shows as one JSON object param instead of one param per setting.
OBJECT_PARAMS = {
    "validation": {
        "title": "Validation thresholds",
        "description": 'Overrides of the Great Expectations thresholds, e.g. {"duplicates_mostly": 0.95}. '
        "Keys: " + ", ".join(s.name for s in TABLE if s.section == "validation") + ".",
        "section": ADVANCED,
        "section_collapsed": True,
    }
}


def section_settings(section: str) -> list[Setting]:
    """The settings of one RunConfig section (``run`` for the top-level ones), in table order."""
    return [s for s in TABLE if s.section == section]


def setting(key: str) -> Setting:
    """The setting of a flat key; an unknown key is a ConfigError naming the closest known keys."""
    if key in SETTINGS:
        return SETTINGS[key]
    raise unknown_settings_error([key])


def unknown_settings_error(keys: list[str], known: list[str] | None = None) -> ConfigError:
    """ConfigError for unknown keys, each with the closest known ones (typos are the usual cause)."""
    known = list(SETTINGS) if known is None else known
    hints = []
    for key in sorted(keys):
        close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
        hints.append(f"{key!r} (did you mean {', '.join(close)}?)" if close else repr(key))
    return ConfigError(
        f"unknown settings: {', '.join(hints)}; every setting is listed in llmrec_tasks/core/settings.py"
    )


def parse_text(key: str, text: str) -> Any:
    """A ``--set KEY=VALUE`` value, checked against the table like the config checks it."""
    return setting(key).parse_text(text)


def form_params() -> dict[str, dict[str, Any]]:
    """Keyword arguments of ``airflow.sdk.Param`` per DAG param, in form order.

    Settings of ``OBJECT_PARAMS`` sections become one object param, with one property each.
    """
    out: dict[str, dict[str, Any]] = {}
    for s in TABLE:
        if s.section in OBJECT_PARAMS:
            if s.section not in out:
                out[s.section] = {
                    "default": {},
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {},
                    **OBJECT_PARAMS[s.section],
                }
            out[s.section]["properties"][s.name] = {**s.schema(), "description": s.help}
            continue
        out[s.key] = {
            "default": s.default,
            **s.schema(),
            "title": s.title,
            "description": s.help,
            "section": s.form_section or FORM_SECTIONS[s.section],
        }
    return out


# --- batch scoring (`llmrec score-batch`, DAG llmrec_batch_score) -------------------------------

BATCH = "Batch scoring"
BATCH_TABLE: tuple[Setting, ...] = (
    Setting(
        "namespace",
        str,
        DEFAULT_NAMESPACE,
        "Namespace",
        "The namespace whose bundle scores the users. A run triggered by a promoted bundle scores "
        "that bundle when it is this namespace's of the default store.",
        pattern=NAME_PATTERN,
        pattern_help=NAME_HELP,
        form_section=BATCH,
    ),
    Setting(
        "version",
        str,
        None,
        "Bundle version",
        "Empty: the namespace's current bundle, read once when the run is planned (every shard "
        "scores that version, even if current moves during the run).",
        pattern=r"^$|" + NAME_PATTERN,
        pattern_help=NAME_HELP,
        nullable=True,
        form_section=BATCH,
    ),
    Setting(
        "users_uri",
        str,
        None,
        "Users",
        "File or URI of the users to score: one user id per line, or Parquet with a user_id "
        "column. Empty: every user with a published history in the bundle.",
        nullable=True,
        form_section=BATCH,
    ),
    Setting(
        "k",
        int,
        100,
        "Items per user",
        "Top items written per user.",
        minimum=1,
        maximum=10_000,
        form_section=BATCH,
    ),
    Setting(
        "batch_users_per_shard",
        int,
        50_000,
        "Users per shard",
        "Users scored by one (mapped) task and written to one Parquet part.",
        minimum=1,
        maximum=10_000_000,
        form_section=BATCH,
    ),
    Setting(
        "store_uri",
        str,
        None,
        "Object store",
        "Where the bundle is read and the scores are written (file:///path or s3://bucket/prefix). "
        "Empty: the deployment default (Variable llmrec_store_uri, env LLMREC_STORE_URI, else "
        "$AIRFLOW_HOME/llmrec-store).",
        pattern=r"^$|^(file://|s3://|/).+",
        pattern_help="give file:///path, s3://bucket/prefix or an absolute path",
        nullable=True,
        form_section=BATCH,
    ),
)
BATCH_SETTINGS: dict[str, Setting] = {s.key: s for s in BATCH_TABLE}


# --- the benchmark's new-item protocol (`llmrec benchmark --protocol new-items`) ----------------

NEWITEMS = "New-item protocol (benchmark)"
NEWITEMS_PREFIX = "newitems_"
NEWITEMS_TABLE: tuple[Setting, ...] = (
    Setting(
        "newitems_fraction",
        float,
        0.1,
        "New-item share",
        "The newest share of items by first interaction: every event on them is removed from the "
        "training data, and test events on them must be recommended from their text.",
        exclusive_minimum=0,
        maximum=0.5,
        form_section=NEWITEMS,
    ),
    Setting(
        "newitems_simulated_fraction",
        float,
        0.0,
        "Simulated cold share",
        "In each ranker training stage of the new-item protocol, this seeded random share of the "
        "warm items loses its interactions from the stage's statistics and histories (its targets "
        "stay) and its sequence-model delta, so the ranker learns to rank items without collaborative "
        "signal. Off (0) by default: on MovieLens (1 seed) 0.1 lowered the total NDCG@10 and put no "
        "new item in a top 10; 0.3 with seq_delta_dropout=0.2 and seq_mask_unseen put a few there.",
        minimum=0,
        maximum=0.5,
        form_section=NEWITEMS,
    ),
)
NEWITEMS_SETTINGS: dict[str, Setting] = {s.key: s for s in NEWITEMS_TABLE}


def batch_form_params() -> dict[str, dict[str, Any]]:
    """Keyword arguments of ``airflow.sdk.Param`` per param of the batch scoring DAG, in form order."""
    return {
        s.key: {
            "default": s.default,
            **s.schema(),
            "title": s.title,
            "description": s.help,
            "section": BATCH,
        }
        for s in BATCH_TABLE
    }


# --- feedback (POST /events, impressions, `llmrec flush-events`) ---------------------------------
# Service settings, not run settings: read from the environment (`LLMREC_<KEY>`, except the Redis
# URL's `LLMREC_REDIS_URL`) or the `serve` / `flush-events` flags.

FEEDBACK = "Feedback"
REDIS_URL_ENV = "LLMREC_REDIS_URL"
FEEDBACK_TABLE: tuple[Setting, ...] = (
    Setting(
        "feedback_redis_url",
        str,
        None,
        "Redis URL",
        "Real-time state (each user's latest events, event-id dedup keys), e.g. redis://127.0.0.1:6379/0. "
        "Empty: an embedded in-process state, one per worker process (use Redis with --workers > 1).",
        pattern=r"^$|^(redis|rediss|unix)://.+",
        pattern_help="give redis://host:port/db, rediss://... or unix:///path",
        nullable=True,
        form_section=FEEDBACK,
    ),
    Setting(
        "feedback_log_dir",
        str,
        "llmrec-feedback",
        "Feedback log folder",
        "Local folder of the write-ahead log segments (one set per worker process); "
        "`llmrec flush-events` reads it on the same host.",
        min_length=1,
        form_section=FEEDBACK,
    ),
    Setting(
        "feedback_key_prefix",
        str,
        "llmrec",
        "Redis key prefix",
        "Prefix of every Redis key (several deployments or tests can share one Redis).",
        pattern=NAME_PATTERN,
        pattern_help=NAME_HELP,
        form_section=FEEDBACK,
    ),
    Setting(
        "feedback_recent_events",
        int,
        50,
        "Recent events per user",
        "Latest events kept per user in the real-time state and merged into their recommendations.",
        minimum=1,
        maximum=1000,
        form_section=FEEDBACK,
    ),
    Setting(
        "feedback_dedup_hours",
        float,
        72.0,
        "Dedup window (hours)",
        "How long an event id is remembered: a batch replayed within it is acknowledged, not stored "
        "again (the daily ingestion drops any later duplicate by event id too).",
        exclusive_minimum=0,
        maximum=24 * 365,
        form_section=FEEDBACK,
    ),
    Setting(
        "feedback_segment_bytes",
        int,
        16 * 1024 * 1024,
        "Segment size",
        "A log segment is closed (and becomes flushable) once it holds this many bytes.",
        minimum=1024,
        maximum=1 << 34,
        form_section=FEEDBACK,
    ),
    Setting(
        "feedback_segment_seconds",
        float,
        60.0,
        "Segment age",
        "A log segment is closed (and becomes flushable) this long after it was opened.",
        exclusive_minimum=0,
        maximum=86_400,
        form_section=FEEDBACK,
    ),
)
FEEDBACK_SETTINGS: dict[str, Setting] = {s.key: s for s in FEEDBACK_TABLE}


def feedback_env(key: str) -> str:
    """The environment variable of a feedback setting."""
    return REDIS_URL_ENV if key == "feedback_redis_url" else f"LLMREC_{key.upper()}"
