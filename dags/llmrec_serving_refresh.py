"""
### llmrec serving refresh

Runs whenever `llmrec_daily` promotes a new **production** bundle (asset
`llmrec://bundles/production`, emitted only when the quality gate passed and the bundle became
current). It loads that bundle the way the serving API does (every file checked against the
manifest's sha256) and answers sample queries. When `LLMREC_SERVING_URL` or the Variable
`llmrec_serving_url` names the serving API, it then waits until the API's `GET /version` serves the
new version (the API follows `current.json` by itself) and fails if it does not within 5 minutes.

The bundle version, its URIs and metrics come from the asset event's metadata.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from airflow.sdk import Asset, dag, task

from llmrec_tasks.airflow_glue import SERVING_DAG_ID, bundle_asset_name, bundle_asset_uri

PRODUCTION_BUNDLE = Asset(
    name=bundle_asset_name("production"), uri=bundle_asset_uri("production"), group="llmrec"
)


@dag(
    dag_id=SERVING_DAG_ID,
    dag_display_name="llmrec serving refresh",
    description="check and load each newly promoted production bundle",
    doc_md=__doc__,
    schedule=[PRODUCTION_BUNDLE],
    start_date=datetime(2026, 1, 1, tzinfo=UTC),
    catchup=False,
    max_active_runs=1,
    default_args={"owner": "llmrec", "retries": 2, "retry_delay": timedelta(minutes=1)},
    tags=["llmrec"],
)
def llmrec_serving_refresh():
    @task(multiple_outputs=False, inlets=[PRODUCTION_BUNDLE])
    def refresh(*, triggering_asset_events=None) -> dict:
        from llmrec_tasks.airflow_glue import refresh_serving, triggering_bundle_event

        return refresh_serving(triggering_bundle_event(triggering_asset_events, "production"))

    refresh()


llmrec_serving_refresh()
