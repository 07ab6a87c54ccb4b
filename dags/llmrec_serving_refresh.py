"""
### llmrec serving refresh

Runs whenever `llmrec_daily` promotes a bundle and serves the new **production** bundle of the
deployment's default store (Variable `llmrec_store_uri`, else `LLMREC_STORE_URI`, else
`$AIRFLOW_HOME/llmrec-store`). It loads that bundle the way the serving API does (every file
checked against the manifest's sha256) and answers sample queries. When `LLMREC_SERVING_URL` or the
Variable `llmrec_serving_url` names the serving API, it then waits until the API's `GET /version`
serves the new version (the API follows `current.json` by itself) and fails if it does not within
5 minutes.

Each store and namespace has its own asset, `llmrec://bundles/<store key>/<namespace>` (the store
key is a slug of the store URI plus a short hash, e.g. `file-llmrec-store-1a2b3c4d`), and every
bundle event goes through the asset alias `llmrec_promoted_bundles`. This DAG is scheduled on that
alias: parsing cannot read the Variable that names the default store, so the task resolves it at run
time and **skips** a run whose events are all another store's or namespace's (an experiment, or a
production run into another store), logging each ignored event.

The bundle version, its URIs and metrics come from the asset event's metadata.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from airflow.sdk import dag, task

from llmrec_tasks.airflow_glue import SERVING_DAG_ID, bundle_alias


@dag(
    dag_id=SERVING_DAG_ID,
    dag_display_name="llmrec serving refresh",
    description="check and load each newly promoted production bundle of the default store",
    doc_md=__doc__,
    schedule=[bundle_alias()],
    start_date=datetime(2026, 1, 1, tzinfo=UTC),
    catchup=False,
    max_active_runs=1,
    default_args={"owner": "llmrec", "retries": 2, "retry_delay": timedelta(minutes=1)},
    tags=["llmrec"],
)
def llmrec_serving_refresh():
    @task(multiple_outputs=False)
    def refresh(*, triggering_asset_events=None) -> dict:
        from llmrec_tasks.airflow_glue import serving_refresh_task

        return serving_refresh_task(triggering_asset_events)

    refresh()


llmrec_serving_refresh()
