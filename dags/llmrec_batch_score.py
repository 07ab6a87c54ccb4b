"""
### llmrec batch scoring

Scores every user of a bundle (or a list of users) through the serving code and writes the top
`k` items of each to Parquet in the store, for teams that precompute recommendations.

`plan` → `score_shard` (one mapped task per shard of `batch_users_per_shard` users) → `finalize`

| task | does | writes (under `<namespace>/scores/<version>/`) |
| --- | --- | --- |
| `plan` | pins the bundle version, the reference time and the user list; reports unknown users | `_plan.json`, `_users.parquet` |
| `score_shard` | loads the pinned bundle (checksums verified), scores its users like `recommend` | `part-<i>.parquet` (atomic; a retry replaces it) |
| `finalize` | checks that every shard wrote its part | `_manifest.json`: counts and sha256 per part (the done marker) |

Columns: `user_id`, `rank` (1 = best), `item_id`, `score`, `version`, `cold` (the user has no
published history and got the most popular items, as the serving API answers them).

**When.** On every promoted bundle (the asset alias `llmrec_promoted_bundles`): the run scores the
event's version when it is the `namespace` param's bundle of the store (param, else the deployment
default) and skips otherwise, as `llmrec_serving_refresh` does. Or trigger it by hand: empty
`version` scores the current bundle, read once by `plan` (a promotion during the run changes
nothing). The DAG starts paused: unpause it to precompute after each promotion.

**Users.** Empty `users_uri`: every user with a published history. Otherwise a file or URI with one
user id per line (or Parquet with a `user_id` column); duplicates are scored once, users the bundle
does not know are scored cold and counted in the plan's log and the manifest.

**Scale.** The shards are mapped tasks: the Celery or Kubernetes executor spreads them over
workers. The same from the command line: `llmrec score-batch --store S --namespace N [--shard i/n]`.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from airflow.sdk import Param, dag, task

from llmrec_tasks.airflow_glue import BATCH_DAG_ID, bundle_alias, domain_error_retry_policy
from llmrec_tasks.alerts import on_failure_callback
from llmrec_tasks.core.settings import batch_form_params

PARAMS = {key: Param(**kwargs) for key, kwargs in batch_form_params().items()}

DEFAULT_ARGS = {
    "owner": "llmrec",
    "retries": 2,
    "retry_delay": timedelta(minutes=1),
    "retry_exponential_backoff": True,
    "max_retry_delay": timedelta(minutes=10),
    "execution_timeout": timedelta(hours=2),
    "on_failure_callback": on_failure_callback,  # one LLMREC_ALERT line (+ webhook) per failed task
    "retry_policy": domain_error_retry_policy(),
}


@dag(
    dag_id=BATCH_DAG_ID,
    dag_display_name="llmrec batch scoring",
    description="score all (or listed) users with a bundle into Parquet parts in the store",
    doc_md=__doc__,
    schedule=[bundle_alias()],
    start_date=datetime(2026, 1, 1, tzinfo=UTC),
    catchup=False,
    max_active_runs=1,
    is_paused_upon_creation=True,
    default_args=DEFAULT_ARGS,
    params=PARAMS,
    tags=["llmrec"],
)
def llmrec_batch_score():
    @task
    def plan(*, params=None, triggering_asset_events=None) -> list[dict]:
        from llmrec_tasks.airflow_glue import batch_plan_task

        return batch_plan_task(params or {}, triggering_asset_events)

    @task(multiple_outputs=False, max_active_tis_per_dagrun=4)
    def score_shard(shard: dict) -> dict:
        from llmrec_tasks.airflow_glue import batch_shard_task

        return batch_shard_task(shard)

    @task(multiple_outputs=False)
    def finalize(results: list[dict]) -> dict:
        from llmrec_tasks.airflow_glue import batch_finalize_task

        return batch_finalize_task(list(results[:]))

    finalize(score_shard.expand(shard=plan()))


llmrec_batch_score()
