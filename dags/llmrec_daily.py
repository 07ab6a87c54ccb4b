"""
### llmrec daily refresh

Builds a new recommender **bundle** from the interactions up to the run's data interval end and
publishes it to the object store; promotes it when it passes the quality gate.

`config` → `validate` → `plan_shards` → `embed_shard` (one mapped task per shard) → `merge_shards`
→ `index` → `train` → `publish` → `gate`

| task | does | writes (under `<namespace>/runs/<version>/`, then `<namespace>/bundles/<version>/`) |
| --- | --- | --- |
| `config` | params + run dates → the run's `RunConfig` (store resolved at run time) | nothing |
| `validate` | reads `data_uri`, cuts at the data interval end, Great Expectations suites | snapshot, `validation.json` |
| `embed_shard` | encodes one shard of the item texts with the encoder | shard embeddings |
| `merge_shards` | merges the shards in item order | `embeddings.npy`, `item_ids.json` |
| `index` | FAISS index over the embeddings | `index.faiss`, `index.json` |
| `train` | candidates + LightGBM LambdaRank, metrics against baselines, HTML report | `ranker.txt`, `metrics.json`, `report.html` |
| `publish` | immutable bundle + `manifest.json`; promotes (`current.json`) when the gate passes | bundle |
| `gate` | **fails the run** when the bundle failed the quality gate (why, metrics vs current, how to promote anyway); skipped when not promoted on purpose (`promote=false`, rolled back, older than current) | nothing |

Tasks pass URIs and small result dicts through XCom; data stays in the store.

**Snapshot and version.** The cutoff is the run's data interval end (manual runs: the logical
date, or the trigger time when there is none). The same date, data and params give the same
version id, so reruns and cleared tasks rebuild the same version and overwrite nothing published.

**Gate.** A bundle that fails the quality gate is still published (immutable, listed by `llmrec
versions`), but `current` does not move and the `gate` task fails, so the run is red. Its log says
why, the ranker's metrics vs popularity and vs the current bundle (scored on this run's data), and
how to promote it anyway: `llmrec promote --store S --namespace N VERSION`, or a run with a larger
`gate_tolerance`.

**Alerts.** A task that fails for good logs one `LLMREC_ALERT {json}` line (dag, run, task, try,
exception, log URL); a run not finished `LLMREC_RUN_DEADLINE_HOURS` (default 6, `0` = off) after
it was queued logs one too (a DAG deadline). With Variable `llmrec_alert_webhook` (else env
`LLMREC_ALERT_WEBHOOK`) set, the JSON is also POSTed there.

**Asset.** A promoted bundle emits an event on its store's and namespace's asset,
`llmrec://bundles/<store key>/<namespace>` (the store key: a slug of the store URI and a short hash),
through the alias `llmrec_promoted_bundles` (metadata: version, store, bundle and manifest URIs,
metrics). `llmrec_serving_refresh` runs on the alias and serves the default store's production one.
A bundle that fails the gate (or `promote=false`) emits nothing; a rerun whose bundle is already
current emits again (at least once: consumers are idempotent).

**Data.** Empty `data_uri` = Variable `llmrec_data_uri`, else env `LLMREC_DATA_URI`; with none
set the run fails at `config` with how to set one: there is no default data, so the schedule never
trains on demo data. `sample` / `sample:SEED` (generated demo data) is refused in `production`:
`make demo` runs it in namespace `demo`.

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
Each day is gated against the namespace's current bundle (the day before): a day more than
`gate_tolerance` worse fails its run at `gate`; a larger `gate_tolerance` or `promote=false` in the
conf keeps every day's run green.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from airflow.sdk import AssetAlias, Param, dag, task

from llmrec_tasks.airflow_glue import BUNDLE_ALIAS, DAG_ID, domain_error_retry_policy
from llmrec_tasks.alerts import deadline_alert, on_failure_callback
from llmrec_tasks.core.settings import form_params

# One param per setting of llmrec_tasks/core/settings.py (types, bounds, texts, form sections).
PARAMS = {key: Param(**kwargs) for key, kwargs in form_params().items()}

BUNDLES = AssetAlias(name=BUNDLE_ALIAS, group="llmrec")

DEFAULT_ARGS = {
    "owner": "llmrec",
    "retries": 2,
    "retry_delay": timedelta(minutes=2),
    "retry_exponential_backoff": True,
    "max_retry_delay": timedelta(minutes=20),
    "execution_timeout": timedelta(hours=3),
    "on_failure_callback": on_failure_callback,  # one LLMREC_ALERT line (+ webhook) per failed task
    "retry_policy": domain_error_retry_policy(),
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
    deadline=deadline_alert(),  # LLMREC_RUN_DEADLINE_HOURS after queued (0: none)
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

    @task(multiple_outputs=False)
    def gate(config: dict, published: dict) -> dict:
        from llmrec_tasks.airflow_glue import gate_task

        return gate_task(config, published)

    cfg = config()
    validated = validate(cfg)
    shards = plan_shards(cfg, validated)
    shard_results = embed_shard.partial(config=cfg, validated=validated).expand(shard=shards)
    embedded = merge_shards(cfg, validated, shard_results)
    indexed = index(cfg, validated, embedded)
    trained = train(cfg, validated, embedded)
    published = publish(cfg, validated, embedded, indexed, trained)
    gate(cfg, published)


llmrec_daily()
