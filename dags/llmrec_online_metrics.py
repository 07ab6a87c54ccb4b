"""
### llmrec online metrics

Every day, measures what the served recommendations did over the last `days` complete days (the
days before the run's logical date): per day x bundle version x experiment arm, the impressions,
CTR@k (an engagement event on one of the first `k` items shown, within `window_hours`),
conversion (add-to-cart / purchase) and coverage (distinct items shown / catalogue). It reads the
impressions and events `llmrec flush-events` moved into the store and writes
`<namespace>/online_metrics/<start>_<end>/` (JSON, Parquet, HTML report with plots over days).

The store is the `store_uri` param, else the Variable `llmrec_store_uri`, else `LLMREC_STORE_URI`,
else `$AIRFLOW_HOME/llmrec-store`. The same from the command line:
`llmrec online-metrics --store S --namespace N --start YYYY-MM-DD --end YYYY-MM-DD`.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from airflow.sdk import Param, dag, task

from llmrec_tasks.airflow_glue import ONLINE_DAG_ID
from llmrec_tasks.alerts import on_failure_callback

PARAMS = {
    "store_uri": Param(
        "", type="string", title="Store URI", description="file:///path or s3://bucket/prefix (empty: default)"
    ),
    "namespace": Param("default", type="string", title="Namespace", description="the namespace served"),
    "days": Param(7, type="integer", minimum=1, maximum=366, title="Days", description="complete days measured"),
    "k": Param(10, type="integer", minimum=1, maximum=100, title="k", description="positions counted for CTR@k"),
    "window_hours": Param(
        24.0, type="number", exclusiveMinimum=0, title="Attribution window (hours)",
        description="an event counts for an impression shown at most this long before it",
    ),
}  # fmt: skip


@dag(
    dag_id=ONLINE_DAG_ID,
    dag_display_name="llmrec online metrics",
    description="CTR@k, conversion and coverage of served recommendations per version and arm",
    doc_md=__doc__,
    schedule="@daily",
    start_date=datetime(2026, 1, 1, tzinfo=UTC),
    catchup=False,
    max_active_runs=1,
    params=PARAMS,
    default_args={
        "owner": "llmrec",
        "retries": 2,
        "retry_delay": timedelta(minutes=1),
        "on_failure_callback": on_failure_callback,
    },
    tags=["llmrec"],
)
def llmrec_online_metrics():
    @task(multiple_outputs=False)
    def online_metrics(*, params=None, logical_date=None) -> dict:
        from llmrec_tasks.airflow_glue import online_metrics_task

        return online_metrics_task(params, logical_date)

    online_metrics()


llmrec_online_metrics()
