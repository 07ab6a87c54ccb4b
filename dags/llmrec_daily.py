"""
### llmrec daily refresh

Builds a new recommender **bundle** from the interactions up to the run's data interval end and
publishes it to the object store; promotes it when it passes the quality gate.

`config` → `validate` → `plan_shards` → `embed_shard` (one mapped task per shard) → `merge_shards`
→ `index` → `train` → `publish`

| task | does | writes (under `<namespace>/runs/<version>/`, then `<namespace>/bundles/<version>/`) |
| --- | --- | --- |
| `config` | params + run dates → the run's `RunConfig` (store resolved at run time) | nothing |
| `validate` | reads `data_uri`, cuts at the data interval end, Great Expectations suites | snapshot, `validation.json` |
| `embed_shard` | encodes one shard of the item texts with the encoder | shard embeddings |
| `merge_shards` | merges the shards in item order | `embeddings.npy`, `item_ids.json` |
| `index` | FAISS index over the embeddings | `index.faiss`, `index.json` |
| `train` | candidates + LightGBM LambdaRank, metrics against baselines, HTML report | `ranker.txt`, `metrics.json`, `report.html` |
| `publish` | immutable bundle + `manifest.json`; promotes (`current.json`) when the gate passes | bundle |

Tasks pass URIs and small result dicts through XCom; data stays in the store.

**Snapshot and version.** The cutoff is the run's data interval end (manual runs: the logical
date, or the trigger time when there is none). The same date, data and params give the same
version id, so reruns and cleared tasks rebuild the same version and overwrite nothing published.

**Asset.** A promoted bundle emits an event on `llmrec://bundles/<namespace>` (metadata: version,
bundle and manifest URIs, metrics). `llmrec_serving_refresh` is scheduled on the production one.
A bundle that fails the gate (or `promote=false`) emits nothing; a rerun whose bundle is already
current emits again (at least once: consumers are idempotent).

**Store.** Empty `store_uri` = Variable `llmrec_store_uri`, else env `LLMREC_STORE_URI`, else
`file://$AIRFLOW_HOME/llmrec-store`. `s3://` stores use the `aws_default` connection.

**Experiments.** Backfills must name an experiment namespace (they never write to production):

```
airflow backfill create --dag-id llmrec_daily --from-date 2026-10-01 --to-date 2026-10-03 \\
  --dag-run-conf '{"namespace": "exp-small-lr", "ranker_learning_rate": 0.02}'
```

Dates that already have a run are skipped unless you add `--reprocess-behavior completed` (Airflow
keeps one run per logical date: that run then becomes the experiment's run; the bundles it
published stay in the store).
"""

from __future__ import annotations

from dataclasses import fields
from datetime import UTC, datetime, timedelta

from airflow.sdk import AssetAlias, ExceptionRetryPolicy, Param, RetryAction, RetryRule, dag, task

from llmrec_tasks.airflow_glue import BUNDLE_ALIAS, DAG_ID, NON_RETRYABLE_ERRORS
from llmrec_tasks.core.config import (
    ENCODER_BACKENDS,
    EncoderConfig,
    IndexConfig,
    RankerConfig,
    RunConfig,
    ValidationConfig,
)

_RUN = RunConfig.__dataclass_fields__
_ENC, _IDX, _RNK = EncoderConfig(), IndexConfig(), RankerConfig()


def _validation_schema(name: str, default: object) -> dict:
    if isinstance(default, bool):
        return {"type": "boolean"}
    if name.endswith("_mostly"):
        return {"type": "number", "minimum": 0, "maximum": 1}
    return {"type": "number"}


DATA = "Data source"
ENCODER = "Encoder model"
INDEX = "Index"
RANKER = "Ranker hyper-parameters"
NAMESPACE = "Namespace"
GATE = "Quality gate"
ADVANCED = "Advanced: data validation thresholds"

PARAMS = {
    # Data source
    "data_uri": Param(
        _RUN["data_uri"].default,
        type="string",
        minLength=1,
        title="Input data",
        description="Folder or s3:// prefix with items + interactions (CSV or Parquet), a MovieLens "
        "folder, or `sample` / `sample:SEED` for the generated demo data.",
        section=DATA,
    ),
    "store_uri": Param(
        None,
        type=["null", "string"],
        pattern=r"^$|^(file://|s3://|/).+",
        title="Object store",
        description="Where runs and bundles are written (file:///path or s3://bucket/prefix). Empty: the "
        "deployment default (Variable llmrec_store_uri, env LLMREC_STORE_URI, else "
        "$AIRFLOW_HOME/llmrec-store).",
        section=DATA,
    ),
    # Encoder model
    "encoder_model": Param(
        _ENC.model,
        type="string",
        minLength=1,
        title="Encoder model",
        description="`default` (packaged all-MiniLM-L6-v2) or a local Hugging Face model folder.",
        section=ENCODER,
    ),
    "encoder_max_length": Param(
        _ENC.max_length,
        type="integer",
        minimum=8,
        maximum=512,
        title="Max tokens per item",
        description="Item texts are truncated to this many tokens.",
        section=ENCODER,
    ),
    "encoder_batch_size": Param(
        _ENC.batch_size,
        type="integer",
        minimum=1,
        maximum=4096,
        title="Batch size",
        description="Texts encoded per forward pass.",
        section=ENCODER,
    ),
    "encoder_backend": Param(
        _ENC.backend,
        type="string",
        enum=list(ENCODER_BACKENDS),
        title="Backend",
        description=(
            "`onnx`: the model's float32 graph in ONNX Runtime (torch's vectors, ~2x faster on CPU); "
            "`onnx-int8`: dynamically quantised (faster again, cosine ~0.99 to float32); "
            "`torch`: PyTorch, for models that do not export to ONNX."
        ),
        section=ENCODER,
    ),
    "encoder_precision": Param(
        _ENC.precision,
        type="string",
        enum=["auto", "fp32", "bf16"],
        title="Precision (torch)",
        description="`auto`: bf16 where the CPU supports it natively (same vectors to 1e-4 cosine), else fp32.",
        section=ENCODER,
    ),
    "encoder_shards": Param(
        _ENC.shards,
        type="integer",
        minimum=1,
        maximum=256,
        title="Shards",
        description="The catalog is encoded in this many parallel tasks; results do not depend on it.",
        section=ENCODER,
    ),
    # Index
    "index_kind": Param(
        _IDX.kind,
        type="string",
        enum=["auto", "flat", "hnsw", "ivf", "ivfpq"],
        title="Index kind",
        description="`auto` picks exact (flat) for small catalogs and an approximate index that meets "
        "the recall floor and memory budget for large ones.",
        section=INDEX,
    ),
    "index_memory_budget_mb": Param(
        _IDX.memory_budget_mb,
        type="integer",
        minimum=16,
        title="Memory budget (MB)",
        description="Largest index size `auto` may choose.",
        section=INDEX,
    ),
    "index_recall_floor": Param(
        _IDX.recall_floor,
        type="number",
        exclusiveMinimum=0,
        maximum=1,
        title="Recall floor",
        description="An approximate index must reach this recall@k against exact search, or the run fails.",
        section=INDEX,
    ),
    # Ranker
    "ranker_num_candidates": Param(
        _RNK.num_candidates,
        type="integer",
        minimum=10,
        maximum=5000,
        title="Candidates per user",
        description="Retrieved candidates the ranker re-orders.",
        section=RANKER,
    ),
    "ranker_learning_rate": Param(
        _RNK.learning_rate,
        type="number",
        exclusiveMinimum=0,
        maximum=1,
        title="Learning rate",
        description="LightGBM shrinkage per boosting round.",
        section=RANKER,
    ),
    "ranker_num_leaves": Param(
        _RNK.num_leaves,
        type="integer",
        minimum=2,
        maximum=4096,
        title="Leaves per tree",
        description="Maximum leaves of each LambdaRank tree.",
        section=RANKER,
    ),
    "ranker_n_estimators": Param(
        _RNK.n_estimators,
        type="integer",
        minimum=1,
        maximum=20000,
        title="Boosting rounds",
        description="Upper bound; early stopping usually ends sooner.",
        section=RANKER,
    ),
    "ranker_min_data_in_leaf": Param(
        _RNK.min_data_in_leaf,
        type="integer",
        minimum=1,
        title="Min rows per leaf",
        description="Smallest number of training rows in a leaf (regularisation).",
        section=RANKER,
    ),
    "ranker_early_stopping_rounds": Param(
        _RNK.early_stopping_rounds,
        type="integer",
        minimum=0,
        title="Early stopping rounds",
        description="0 disables early stopping.",
        section=RANKER,
    ),
    "ranker_eval_days": Param(
        _RNK.eval_days,
        type="number",
        minimum=0,
        title="Evaluation window (days)",
        description="Hold out the last N days for evaluation; 0 = the latest 10% of the time span.",
        section=RANKER,
    ),
    "ranker_per_source": Param(
        _RNK.per_source,
        type="integer",
        minimum=1,
        maximum=5000,
        title="Candidates per source",
        description="Candidates each retrieval source (FAISS, co-visitation, EASE, ...) contributes; at "
        "most the candidates per user.",
        section=RANKER,
    ),
    "ranker_train_windows": Param(
        _RNK.train_windows,
        type="integer",
        minimum=1,
        maximum=100,
        title="Training windows",
        description="Earlier time windows used as training groups.",
        section=RANKER,
    ),
    "ranker_max_users_per_window": Param(
        _RNK.max_users_per_window,
        type="integer",
        minimum=100,
        maximum=10_000_000,
        title="Users per window",
        description="Users sampled (seeded) from each training and evaluation window; bounds training "
        "time on large catalogs and user bases.",
        section=RANKER,
    ),
    "ranker_truncation_level": Param(
        _RNK.truncation_level,
        type="integer",
        minimum=1,
        maximum=1000,
        title="LambdaRank truncation level",
        description="Positions LambdaRank optimises; a little above the NDCG cutoff (10).",
        section=RANKER,
    ),
    "ranker_feature_fraction": Param(
        _RNK.feature_fraction,
        type="number",
        exclusiveMinimum=0,
        maximum=1,
        title="Feature fraction",
        description="Share of the features each tree sees.",
        section=RANKER,
    ),
    "ranker_bagging_fraction": Param(
        _RNK.bagging_fraction,
        type="number",
        exclusiveMinimum=0,
        maximum=1,
        title="Bagging fraction",
        description="Share of the training rows each boosting round sees.",
        section=RANKER,
    ),
    "ranker_negative_fraction": Param(
        _RNK.negative_fraction,
        type="number",
        exclusiveMinimum=0,
        maximum=1,
        title="Negative sampling fraction",
        description="Share of non-target candidates kept in each training group (lower trains faster).",
        section=RANKER,
    ),
    "ranker_num_threads": Param(
        _RNK.num_threads,
        type="integer",
        minimum=1,
        maximum=256,
        title="Threads",
        description="LightGBM threads per training task.",
        section=RANKER,
    ),
    "ranker_seed": Param(
        _RNK.seed,
        type="integer",
        minimum=0,
        title="Random seed",
        description="Seeds sampling and training: the same seed and data give the same ranker.",
        section=RANKER,
    ),
    # Namespace
    "namespace": Param(
        _RUN["namespace"].default,
        type="string",
        pattern=r"^(?!.*\.\.)[A-Za-z0-9][A-Za-z0-9._-]{0,62}$",
        title="Namespace",
        description="`production`, or an experiment namespace (e.g. `exp-small-lr`): everything the run "
        "writes stays under it. Backfills must use an experiment namespace.",
        section=NAMESPACE,
    ),
    # Gate
    "gate_tolerance": Param(
        _RUN["gate_tolerance"].default,
        type="number",
        minimum=0,
        maximum=1,
        title="Gate tolerance",
        description="The new ranker may be at most this much (relative) worse than the current "
        "production bundle and must beat the baselines, or it is not promoted.",
        section=GATE,
    ),
    "promote": Param(
        _RUN["promote"].default,
        type="boolean",
        title="Promote when the gate passes",
        description="Off: publish the bundle without making it current.",
        section=GATE,
    ),
    # Advanced
    "validation": Param(
        {},
        type="object",
        title="Validation thresholds",
        description='Overrides of the Great Expectations thresholds, e.g. {"duplicates_mostly": 0.95}. '
        "Keys: " + ", ".join(ValidationConfig.__dataclass_fields__) + ".",
        additionalProperties=False,
        properties={
            name: _validation_schema(name, f.default)
            for name, f in ValidationConfig.__dataclass_fields__.items()
        },
        section=ADVANCED,
        section_collapsed=True,
    ),
}

_JSON_TYPES = {"int": "integer", "float": "number", "bool": "boolean", "str": "string"}
# A setting added to the config without a Param above still gets a (plain) one, so the trigger
# form and run confs can always set every setting; the integrity tests list such params.
for _prefix, _section, _defaults in (
    ("encoder", ENCODER, _ENC),
    ("index", INDEX, _IDX),
    ("ranker", RANKER, _RNK),
):
    for _field in fields(_defaults):
        PARAMS.setdefault(
            f"{_prefix}_{_field.name}",
            Param(
                getattr(_defaults, _field.name),
                type=_JSON_TYPES.get(str(_field.type), "string"),
                title=f"{_prefix} {_field.name}".replace("_", " "),
                description=f"{type(_defaults).__name__}.{_field.name} (llmrec_tasks/config.py).",
                section=_section,
            ),
        )

BUNDLES = AssetAlias(name=BUNDLE_ALIAS, group="llmrec")

DEFAULT_ARGS = {
    "owner": "llmrec",
    "retries": 2,
    "retry_delay": timedelta(minutes=2),
    "retry_exponential_backoff": True,
    "max_retry_delay": timedelta(minutes=20),
    "execution_timeout": timedelta(hours=3),
    # Bad params, bad data, a failed gate: retrying cannot help, fail at once with the message.
    "retry_policy": ExceptionRetryPolicy(
        rules=[
            RetryRule(
                exception=list(NON_RETRYABLE_ERRORS),
                action=RetryAction.FAIL,
                reason="llmrec domain error: fix the input or the params, then rerun",
            )
        ]
    ),
}


@dag(
    dag_id=DAG_ID,
    dag_display_name="llmrec daily refresh",
    description="validate → embed → index → train → publish a recommender bundle",
    doc_md=__doc__,
    schedule="@daily",
    start_date=datetime(2026, 1, 1, tzinfo=UTC),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    params=PARAMS,
    tags=["llmrec"],
)
def llmrec_daily():
    @task(multiple_outputs=False)
    def config(**context) -> dict:
        from llmrec_tasks.airflow_glue import config_from_context

        return config_from_context(context)

    @task(multiple_outputs=False)
    def validate(config: dict) -> dict:
        from llmrec_tasks.airflow_glue import stage_task
        from llmrec_tasks.data import validate

        return stage_task(validate.run_validate, config)

    @task
    def plan_shards(config: dict, validated: dict) -> list[dict]:
        from llmrec_tasks.airflow_glue import stage_task
        from llmrec_tasks.text import embed

        return stage_task(embed.plan_shards, config, validated=validated)

    @task(multiple_outputs=False, max_active_tis_per_dagrun=4)
    def embed_shard(config: dict, validated: dict, shard: dict) -> dict:
        from llmrec_tasks.airflow_glue import stage_task
        from llmrec_tasks.text import embed

        return stage_task(embed.run_embed_shard, config, validated=validated, shard=shard)

    @task(multiple_outputs=False)
    def merge_shards(config: dict, validated: dict, shard_results: list[dict]) -> dict:
        from llmrec_tasks.airflow_glue import stage_task
        from llmrec_tasks.text import embed

        return stage_task(
            embed.merge_shards, config, validated=validated, shard_results=list(shard_results[:])
        )

    @task(multiple_outputs=False)
    def index(config: dict, validated: dict, embedded: dict) -> dict:
        from llmrec_tasks.airflow_glue import stage_task
        from llmrec_tasks.retrieval import index

        return stage_task(index.run_index, config, validated=validated, embedded=embedded)

    @task(multiple_outputs=False)
    def train(config: dict, validated: dict, embedded: dict) -> dict:
        from llmrec_tasks.airflow_glue import stage_task
        from llmrec_tasks.ranking import train

        return stage_task(train.run_train, config, validated=validated, embedded=embedded)

    @task(multiple_outputs=False, outlets=[BUNDLES])
    def publish(
        config: dict, validated: dict, embedded: dict, indexed: dict, trained: dict, *, outlet_events=None
    ) -> dict:
        from llmrec_tasks import publish
        from llmrec_tasks.airflow_glue import publish_task

        return publish_task(
            publish.run_publish,
            outlet_events,
            config,
            validated=validated,
            embedded=embedded,
            indexed=indexed,
            trained=trained,
        )

    cfg = config()
    validated = validate(cfg)
    shards = plan_shards(cfg, validated)
    shard_results = embed_shard.partial(config=cfg, validated=validated).expand(shard=shards)
    embedded = merge_shards(cfg, validated, shard_results)
    indexed = index(cfg, validated, embedded)
    trained = train(cfg, validated, embedded)
    publish(cfg, validated, embedded, indexed, trained)


llmrec_daily()
