"""The small functions the Airflow tasks call around the stages: no stage logic lives here.

- building the run's :class:`RunConfig` from the DAG ``params``, the run's data interval and its
  ids (the cutoff comes from the run, never from the wall clock);
- resolving the deployment's default store (Airflow Variable, then ``LLMREC_STORE_URI``, then a
  folder under ``$AIRFLOW_HOME``) and data source (Airflow Variable, then ``LLMREC_DATA_URI``, no
  default) at run time, never at parse time;
- a stage's task body: XCom JSON in, typed results (``llmrec_tasks.core.results``) to the stage,
  JSON out;
- the bundle Asset (one per store and namespace, ``llmrec://bundles/<store key>/<namespace>``),
  the metadata of its events and the serving refresh's choice among them.

Importing this module is cheap (standard library and ``llmrec_tasks.core`` only): DAG files import
it at parse time. Airflow itself is imported inside the functions that need it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import posixpath
import re
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from llmrec_tasks.core.config import RunConfig
from llmrec_tasks.core.constants import DEFAULT_NAMESPACE
from llmrec_tasks.core.errors import ConfigError
from llmrec_tasks.core.results import (
    Embedded,
    EmbedShard,
    EncodedShard,
    Indexed,
    Published,
    StageResult,
    Trained,
    Validated,
)
from llmrec_tasks.core.settings import DATA_ENV, DATA_VARIABLE

log = logging.getLogger(__name__)

DAG_ID = "llmrec_daily"
SERVING_DAG_ID = "llmrec_serving_refresh"
BATCH_DAG_ID = "llmrec_batch_score"
ONLINE_DAG_ID = "llmrec_online_metrics"
AWS_CONN_ID = "aws_default"
STORE_VARIABLE = "llmrec_store_uri"
STORE_ENV = "LLMREC_STORE_URI"
STORE_FOLDER = "llmrec-store"
SERVING_URL_VARIABLE = "llmrec_serving_url"
SERVING_URL_ENV = "LLMREC_SERVING_URL"
# The asset alias the publish task emits through; the concrete asset is chosen at run time
# (one per store and namespace) and only when the bundle was promoted.
BUNDLE_ALIAS = "llmrec_promoted_bundles"
BUNDLE_ASSET_SCHEME = "llmrec"
# store_key(): a slug of at most this many characters, then this many hex digits of a SHA-256.
STORE_SLUG_CHARS = 24
STORE_HASH_CHARS = 8
# The UI plugin lists these stores too: a JSON list of store URIs or comma-separated URIs.
STORES_VARIABLE = "llmrec_stores"
# Params that are not RunConfig fields (none today; kept for forward compatibility).
NON_CONFIG_PARAMS: frozenset[str] = frozenset()
# Retrying cannot fix these: the run fails at once with the stage's message.
NON_RETRYABLE_ERRORS = (
    "llmrec_tasks.core.errors.ConfigError",
    "llmrec_tasks.core.errors.DataContractError",
    "llmrec_tasks.core.errors.ValidationFailedError",
    "llmrec_tasks.core.errors.ModelLoadError",
    "llmrec_tasks.core.errors.IndexRecallError",
    "llmrec_tasks.core.errors.QualityGateError",
)
# A stage function's upstream parameters (by name) -> the result type XCom carries as JSON.
TASK_INPUTS: dict[str, type[StageResult]] = {
    "validated": Validated,
    "shard": EmbedShard,
    "shard_results": EncodedShard,
    "embedded": Embedded,
    "indexed": Indexed,
    "trained": Trained,
}
LIST_INPUTS = frozenset({"shard_results"})  # the mapped embed_shard tasks' results


def domain_error_retry_policy() -> Any:
    """The DAGs' retry policy: llmrec domain errors (bad params, bad data, a failed gate) fail at
    once with their message; anything else is retried per the task's ``retries``."""
    from airflow.sdk import ExceptionRetryPolicy, RetryAction, RetryRule

    return ExceptionRetryPolicy(
        rules=[
            RetryRule(
                exception=list(NON_RETRYABLE_ERRORS),
                action=RetryAction.FAIL,
                reason="llmrec domain error: fix the input or the params, then rerun",
            )
        ]
    )


# --- store ---------------------------------------------------------------------------------------


def airflow_home(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    return Path(env.get("AIRFLOW_HOME") or Path.home() / "airflow")


def default_store_uri(env: Mapping[str, str] | None = None) -> str:
    """The zero-setup store: ``file://$AIRFLOW_HOME/llmrec-store``."""
    return (airflow_home(env) / STORE_FOLDER).resolve().as_uri()


def _deployment_value(
    explicit: str | None,
    variable: str,
    env_name: str,
    variable_get: Callable[[str], str | None] | None,
    env: Mapping[str, str],
) -> str | None:
    """The first non-blank of: the param, Airflow Variable ``variable``, ``$env_name``; else None."""
    candidates = (
        lambda: explicit,
        lambda: variable_get(variable) if variable_get is not None else None,
        lambda: env.get(env_name),
    )
    for candidate in candidates:  # lazily: the Variable is read only when the param is empty
        value = candidate()
        if value and value.strip():
            return value.strip()
    return None


def resolve_store_uri(
    explicit: str | None,
    *,
    variable_get: Callable[[str], str | None] | None = None,
    env: Mapping[str, str] | None = None,
) -> str:
    """The run's store: the ``store_uri`` param, else Variable ``llmrec_store_uri``, else
    ``$LLMREC_STORE_URI``, else ``file://$AIRFLOW_HOME/llmrec-store``. Called at run time."""
    env = os.environ if env is None else env
    return _deployment_value(explicit, STORE_VARIABLE, STORE_ENV, variable_get, env) or default_store_uri(env)


def resolve_data_uri(
    explicit: str | None,
    *,
    variable_get: Callable[[str], str | None] | None = None,
    env: Mapping[str, str] | None = None,
) -> str | None:
    """The run's data source: the ``data_uri`` param, else Variable ``llmrec_data_uri``, else
    ``$LLMREC_DATA_URI``; None when none is set (``RunConfig`` refuses the run then: there is no
    default, so a schedule never trains on demo data). Called at run time."""
    env = os.environ if env is None else env
    return _deployment_value(explicit, DATA_VARIABLE, DATA_ENV, variable_get, env)


def airflow_variable(key: str) -> str | None:
    """An Airflow Variable inside a task, None when it is not set.

    Errors (metadata DB or secrets backend unreachable) propagate: silently falling back to
    another store would write the run somewhere else.
    """
    from airflow.sdk import Variable

    return Variable.get(key, default=None)


def plugin_store_uri() -> str:
    """The store the UI plugin reads (api-server side: same resolution, no param)."""

    def core_variable(key: str) -> str | None:
        from airflow.models.variable import Variable

        return Variable.get(key, default_var=None)

    return resolve_store_uri(None, variable_get=core_variable)


def parse_store_list(value: str | None) -> list[str]:
    """The store URIs of Variable ``llmrec_stores``: a JSON list (``["s3://a/x", "file:///b"]``)
    or comma-separated URIs (``s3://a/x, file:///b``); blanks are dropped. A value starting
    with ``[`` that is not a JSON list of strings is a ``ConfigError`` saying so."""
    import json

    text = (value or "").strip()
    if not text.startswith("["):
        return [part.strip() for part in text.split(",") if part.strip()]
    try:
        items = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"Variable {STORES_VARIABLE} is not valid JSON ({exc}): {text[:200]!r}") from exc
    if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
        raise ConfigError(f"Variable {STORES_VARIABLE} must be a JSON list of store URIs: {text[:200]!r}")
    return [item.strip() for item in items if item.strip()]


def s3_client_from_connection(store_uri: str, conn_id: str = AWS_CONN_ID) -> Any:
    """A boto3 S3 client from the Airflow connection for ``s3://`` stores, else None.

    Tasks do not need it (``llmrec_tasks.storage.aws`` uses ``aws_default`` inside tasks on its own); the
    UI plugin runs in the api-server and passes this client to ``open_store``.
    """
    if not store_uri.startswith("s3://"):
        return None
    from airflow.providers.amazon.aws.hooks.s3 import S3Hook

    from llmrec_tasks.storage.aws import botocore_config

    return S3Hook(aws_conn_id=conn_id).get_client_type(config=botocore_config())


# --- the run's configuration ---------------------------------------------------------------------


def run_cutoff(
    data_interval_end: datetime | None,
    logical_date: datetime | None = None,
    run_after: datetime | None = None,
) -> datetime:
    """The snapshot cutoff of a run, in UTC: the data interval's end, else the logical date
    (manual runs), else the run's ``run_after`` (manual runs without a logical date). It is a
    property of the run, so a rerun or a cleared task reads the same data."""
    for value in (data_interval_end, logical_date, run_after):
        if value is not None:
            if value.tzinfo is None:
                raise ConfigError(f"run date {value!r} has no time zone")
            # A plain datetime (pendulum's is a subclass) keeps XCom and hashing simple.
            return datetime.fromtimestamp(value.timestamp(), tz=UTC)
    raise ConfigError("the run has no data interval, logical date or run_after: cannot pick a cutoff")


def build_run_config(
    params: Mapping[str, Any],
    *,
    cutoff: datetime,
    dag_id: str | None,
    run_id: str | None,
    run_type: str | None = None,
    variable_get: Callable[[str], str | None] | None = None,
    env: Mapping[str, str] | None = None,
) -> RunConfig:
    """``RunConfig`` of one run: the flat params, the resolved store and data source, the run's
    cutoff and ids.

    Backfills must name an experiment namespace: they never write to production.
    """
    values = {k: v for k, v in dict(params).items() if k not in NON_CONFIG_PARAMS}
    values["store_uri"] = resolve_store_uri(values.get("store_uri"), variable_get=variable_get, env=env)
    values["data_uri"] = resolve_data_uri(values.get("data_uri"), variable_get=variable_get, env=env)
    values.setdefault("namespace", DEFAULT_NAMESPACE)
    if run_type and str(run_type).lower().endswith("backfill") and values["namespace"] == DEFAULT_NAMESPACE:
        raise ConfigError(
            "backfills never write to the production namespace: pass an experiment namespace, e.g. "
            """--dag-run-conf '{"namespace": "exp-my-test"}'"""
        )
    values["cutoff"] = cutoff
    values["dag_id"] = dag_id
    values["run_id"] = run_id
    return RunConfig.from_dict(values)


def config_from_context(context: Mapping[str, Any]) -> dict[str, Any]:
    """Task side: the run's config as a JSON-able dict (it travels through XCom)."""
    dag_run = context.get("dag_run")
    cutoff = run_cutoff(
        context.get("data_interval_end"),
        context.get("logical_date"),
        getattr(dag_run, "run_after", None),
    )
    run_type = getattr(dag_run, "run_type", None)
    cfg = build_run_config(
        context.get("params") or {},
        cutoff=cutoff,
        dag_id=getattr(dag_run, "dag_id", None) or DAG_ID,
        run_id=context.get("run_id") or getattr(dag_run, "run_id", None),
        run_type=getattr(run_type, "value", run_type),
        variable_get=airflow_variable,
    )
    log.info(
        "run config: namespace=%s store=%s data=%s cutoff=%s params_hash=%s",
        cfg.namespace,
        cfg.store_uri,
        cfg.data_uri,
        cfg.cutoff.isoformat() if cfg.cutoff else None,
        cfg.params_hash(),
    )
    return cfg.to_dict()


def task_config(config: Mapping[str, Any]) -> RunConfig:
    """The ``RunConfig`` a downstream task receives as the dict the config task returned."""
    return RunConfig.from_dict(dict(config))


# --- stage tasks ---------------------------------------------------------------------------------


def task_inputs(upstream: Mapping[str, Any]) -> dict[str, Any]:
    """Upstream results from XCom JSON to their types, keyed by the stage function's parameter names."""
    inputs: dict[str, Any] = {}
    for name, value in upstream.items():
        if name not in TASK_INPUTS:
            raise ConfigError(
                f"stage input {name!r} has no result type; known inputs: {', '.join(TASK_INPUTS)}"
            )
        result_type = TASK_INPUTS[name]
        inputs[name] = (
            [result_type.from_json(v) for v in value] if name in LIST_INPUTS else result_type.from_json(value)
        )
    return inputs


def stage_task(stage: Callable[..., Any], config: Mapping[str, Any], **upstream: Any) -> Any:
    """Body of a stage task: ``stage(cfg, **typed upstream results)``, its result back as JSON
    (a list of them for the embed plan) for XCom."""
    result = stage(task_config(config), **task_inputs(upstream))
    return [r.to_json() for r in result] if isinstance(result, list) else result.to_json()


def publish_task(
    run_publish: Callable[..., Published], outlet_events: Any, config: Mapping[str, Any], **upstream: Any
) -> dict[str, Any]:
    """Body of the publish task: publish, record the result in the work folder, emit the asset
    event when promoted; the result back as JSON."""
    cfg = task_config(config)
    inputs = task_inputs(upstream)
    published = run_publish(cfg, **inputs)
    after_publish(outlet_events, cfg, inputs["validated"], published)
    return published.to_json()


def gate_task(config: Mapping[str, Any], published: Mapping[str, Any]) -> dict[str, Any]:
    """Body of the gate task, after publish: fail the run when the bundle failed the quality gate
    (:class:`QualityGateError`, not retried), skip when it was not promoted on purpose
    (``promote=false``, rolled back, older than current), else the promoted version."""
    from airflow.sdk.exceptions import AirflowSkipException

    from llmrec_tasks.publish import enforce_gate

    result = Published.from_json(published)
    enforce_gate(task_config(config), result)
    if not result.promoted:
        raise AirflowSkipException(f"{result.version} not promoted, gate not evaluated: {result.reason}")
    log.info("bundle %s is current: %s", result.version, result.reason)
    return {"version": result.version, "promoted": True, "reason": result.reason}


# --- the bundle asset ----------------------------------------------------------------------------


def normalize_store_uri(uri: str) -> str:
    """One spelling per store: scheme in lower case, no trailing ``/``, ``file://`` paths
    normalized (``.``, ``..``, ``//``) and plain absolute paths as ``file://`` URIs (``open_store``
    reads them the same way). S3 keys are case-sensitive and ``a//b`` is another prefix: only
    the trailing ``/`` goes."""
    value = uri.strip()
    if value.startswith("/"):
        value = Path(posixpath.normpath(value)).as_uri()
    parsed = urlsplit(value)
    scheme = parsed.scheme.lower()
    path = parsed.path
    if scheme == "file":
        path = posixpath.normpath(path) if path else "/"
    path = path.rstrip("/")
    if not scheme:
        return path or value
    return f"{scheme}://{parsed.netloc}{path}"


def store_key(store_uri: str) -> str:
    """Short, stable, URI-safe id of a store: ``<scheme>-<last path segment or bucket>-<hash>``,
    e.g. ``file-llmrec-store-1a2b3c4d`` or ``s3-models-9f8e7d6c``.

    The readable part is a slug (lower-case ``[a-z0-9-]``, at most 24 characters); the hash is the
    first 8 hex digits of the SHA-256 of :func:`normalize_store_uri`, so two spellings of one store
    share a key and two stores with the same folder name do not. Asset URIs and names and the UI
    plugin's ``?store=`` use it.
    """
    normalized = normalize_store_uri(store_uri)
    parsed = urlsplit(normalized)
    last = parsed.path.rstrip("/").rpartition("/")[2] or parsed.netloc
    slug = re.sub(r"[^a-z0-9]+", "-", f"{parsed.scheme or 'path'}-{last}".lower()).strip("-")
    slug = slug[:STORE_SLUG_CHARS].rstrip("-")
    digest = hashlib.sha256(normalized.encode()).hexdigest()[:STORE_HASH_CHARS]
    return f"{slug}-{digest}"


def bundle_asset_uri(store_uri: str, namespace: str = DEFAULT_NAMESPACE) -> str:
    """``llmrec://bundles/<store key>/<namespace>``: one asset per store and namespace."""
    return f"{BUNDLE_ASSET_SCHEME}://bundles/{store_key(store_uri)}/{namespace}"


def bundle_asset_name(store_uri: str, namespace: str = DEFAULT_NAMESPACE) -> str:
    """``llmrec_bundle_<store key>_<namespace>`` (the URI's parts, in its order)."""
    return f"llmrec_bundle_{store_key(store_uri)}_{namespace}"


def bundle_asset(store_uri: str, namespace: str = DEFAULT_NAMESPACE) -> Any:
    """The Asset a store's namespace's promoted bundles update (see :func:`bundle_asset_uri`)."""
    from airflow.sdk import Asset

    return Asset(
        name=bundle_asset_name(store_uri, namespace),
        uri=bundle_asset_uri(store_uri, namespace),
        group="llmrec",
    )


def bundle_alias() -> Any:
    """The alias every bundle event goes through; ``llmrec_serving_refresh`` is scheduled on it."""
    from airflow.sdk import AssetAlias

    return AssetAlias(name=BUNDLE_ALIAS, group="llmrec")


def bundle_event_extra(cfg: RunConfig, published: Published) -> dict[str, Any] | None:
    """Metadata of the asset event for a promoted bundle; None when the bundle was not promoted
    (failed gate, ``promote=false``): no event is emitted then."""
    if not published.promoted:
        return None
    extra = {
        "version": published.version,
        "namespace": published.namespace,
        "bundle_uri": published.bundle_uri,
        "manifest_uri": published.manifest_uri,
        "store_uri": cfg.store_uri,
        "promoted": True,
        "reason": published.reason,
        "metrics": metric_summary(published.metrics),
        "cutoff": cfg.cutoff.isoformat() if cfg.cutoff else None,
        "dag_id": cfg.dag_id,
        "run_id": cfg.run_id,
    }
    return extra


def emit_bundle_event(outlet_events: Any, cfg: RunConfig, published: Published) -> dict[str, Any] | None:
    """Add the asset event for a promoted bundle through the task's alias outlet."""
    extra = bundle_event_extra(cfg, published)
    if extra is None:
        log.info("bundle %s not promoted (%s): no asset event", published.version, published.reason)
        return None
    asset = bundle_asset(cfg.store_uri, extra["namespace"])
    outlet_events[bundle_alias()].add(asset, extra=extra)
    log.info("asset event %s (store %s): version %s", asset.uri, cfg.store_uri, extra["version"])
    return extra


def after_publish(
    outlet_events: Any, cfg: RunConfig, validated: Validated, published: Published
) -> dict[str, Any] | None:
    """Record the publish result in the run's work folder (``stages/publish.json``, as the CLI
    pipeline does: the UI plugin reads the gate outcome there), then emit the asset event when
    the bundle was promoted."""
    from llmrec_tasks.pipeline import load_stage, save_stage, stage_key
    from llmrec_tasks.storage.store import open_store

    work_uri = validated.work_uri
    recorded = open_store(work_uri).exists(stage_key(Published))
    previous = load_stage(work_uri, Published) if recorded else None
    unchanged = (
        previous is not None
        and published.status == "already published"
        and previous.promoted == published.promoted
    )
    if unchanged:
        # A rerun of an already published version: keep the record of the decision that was made
        # (its gate reason), not "already current".
        log.info("publish record of %s kept: this rerun changed nothing", published.version)
    else:
        save_stage(work_uri, published)
    return emit_bundle_event(outlet_events, cfg, published)


def bundle_events(triggering_asset_events: Any) -> list[Any]:
    """The bundle events (through the alias) that triggered this run; empty for a manual run."""
    return list(triggering_asset_events.get(bundle_alias(), ())) if triggering_asset_events else []


def serving_bundle_event(
    triggering_asset_events: Any, store_uri: str, namespace: str = DEFAULT_NAMESPACE
) -> dict[str, Any] | None:
    """Metadata of the latest event of ``store_uri``'s ``namespace`` bundle among the bundle
    events that triggered this run; None when every one of them is another store's or
    namespace's (each is logged).

    The serving refresh is scheduled on the alias every bundle event goes through (its parse
    cannot read the Variable naming the store), so it is triggered by all of them and picks its
    own by asset URI here. Raises ``ConfigError`` when the run has no bundle event at all (a
    manual trigger).
    """
    wanted = bundle_asset_uri(store_uri, namespace)
    events = bundle_events(triggering_asset_events)
    if not events:
        raise ConfigError(
            f"this run was not triggered by a bundle event: {SERVING_DAG_ID} runs when {DAG_ID} "
            f"promotes a bundle (asset {wanted}); trigger it through that asset"
        )
    ours = []
    for event in events:
        if event.asset.uri == wanted:
            ours.append(event)
        else:
            extra = event.extra or {}
            log.info(
                "ignoring asset event %s (store %s, namespace %s, version %s): this refresh follows %s",
                event.asset.uri,
                extra.get("store_uri"),
                extra.get("namespace"),
                extra.get("version"),
                wanted,
            )
    if not ours:
        return None
    latest = max(ours, key=lambda e: e.timestamp)
    return dict(latest.extra or {})


def serving_refresh_task(triggering_asset_events: Any) -> dict[str, Any]:
    """Body of the serving refresh: the deployment's default store (resolved now: Variable
    ``llmrec_store_uri``, ``$LLMREC_STORE_URI``, the ``$AIRFLOW_HOME`` folder) and its production
    bundle's latest event, then :func:`refresh_serving`. Skips (``AirflowSkipException``) a run
    that only other stores or namespaces triggered."""
    from airflow.sdk.exceptions import AirflowSkipException

    store_uri = resolve_store_uri(None, variable_get=airflow_variable)
    event = serving_bundle_event(triggering_asset_events, store_uri)
    if event is None:
        raise AirflowSkipException(
            f"no {bundle_asset_uri(store_uri)} event among the triggering bundle events (only other "
            f"stores or namespaces, see above): serving follows the production bundle of the default "
            f"store {store_uri}"
        )
    return refresh_serving(event)


def metric_summary(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Small, JSON-able metrics for event metadata: ``{model: {metric: number}}`` (ranker and
    baselines), numbers only (no intervals, no slices)."""

    def is_number(v: Any) -> bool:
        if isinstance(v, bool):
            return False
        return isinstance(v, int | float) or (hasattr(v, "item") and getattr(v, "ndim", None) == 0)

    def numbers(block: Mapping[str, Any]) -> dict[str, float]:
        return {str(k): float(v) for k, v in block.items() if is_number(v)}

    out: dict[str, Any] = {str(k): numbers(v) for k, v in metrics.items() if isinstance(v, Mapping)}
    out.update(numbers({k: v for k, v in metrics.items() if not isinstance(v, Mapping)}))
    return out


def refresh_serving(
    event: Mapping[str, Any], *, wait_s: float = 300.0, poll_s: float = 5.0
) -> dict[str, Any]:
    """Serving side of a promoted bundle: load it (every checksum against its manifest) and answer
    sample queries; then, when ``LLMREC_SERVING_URL`` (or Variable ``llmrec_serving_url``) names
    the serving API, wait until its ``GET /version`` serves this version (the API follows
    ``current.json`` by itself)."""
    from llmrec_tasks.publish import serving_check

    for key in ("store_uri", "namespace", "version"):
        if not event.get(key):
            raise ConfigError(f"bundle event metadata lacks {key!r}: {dict(event)}")
    version = str(event["version"])
    check = serving_check(str(event["store_uri"]), str(event["namespace"]), version)
    result: dict[str, Any] = {"version": version, "namespace": event["namespace"], "check": check}
    url = (airflow_variable(SERVING_URL_VARIABLE) or os.environ.get(SERVING_URL_ENV, "")).strip()
    if not url:
        log.info("no %s / Variable %s: not waiting for a serving API", SERVING_URL_ENV, SERVING_URL_VARIABLE)
        result["serving"] = None
        return result
    result["serving"] = wait_for_serving(url, version, wait_s=wait_s, poll_s=poll_s)
    return result


def wait_for_serving(base_url: str, version: str, *, wait_s: float, poll_s: float) -> dict[str, Any]:
    """Poll ``GET <base_url>/version`` until it serves ``version`` (or ``current`` moved past it)."""
    import json
    import time
    import urllib.error
    import urllib.request

    url = base_url.rstrip("/") + "/version"
    deadline = time.monotonic() + wait_s
    last: Any = None
    while True:
        try:
            with urllib.request.urlopen(url, timeout=10) as response:  # an operator-set URL
                last = json.loads(response.read().decode() or "{}")
        except (urllib.error.URLError, OSError, ValueError) as exc:
            last = {"error": str(exc)}
        if last.get("version") == version:
            log.info("serving at %s serves %s", base_url, version)
            return {"url": url, "state": "serving", "answer": last}
        if last.get("current") not in (None, version):
            log.warning("current moved on to %s before %s was served", last.get("current"), version)
            return {"url": url, "state": "superseded", "answer": last}
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{url} did not serve {version} within {wait_s:.0f}s; last answer: {last}")
        time.sleep(poll_s)


# --- batch scoring -------------------------------------------------------------------------------


def batch_plan_task(params: Mapping[str, Any], triggering_asset_events: Any) -> list[dict[str, Any]]:
    """Body of the batch scoring DAG's plan: the store (param, else the deployment default) and
    the version to score, pinned now: a triggering bundle event's version (the one of this
    store's ``namespace``, chosen like the serving refresh chooses; a run that only other stores or
    namespaces triggered is skipped), else the ``version`` param, else current. The shards as JSON."""
    from airflow.sdk.exceptions import AirflowSkipException

    from llmrec_tasks.serving import batch

    store_uri = resolve_store_uri(params.get("store_uri"), variable_get=airflow_variable)
    namespace = str(params.get("namespace") or DEFAULT_NAMESPACE)
    version = params.get("version") or None
    if bundle_events(triggering_asset_events):
        event = serving_bundle_event(triggering_asset_events, store_uri, namespace)
        if event is None:
            raise AirflowSkipException(
                f"no {bundle_asset_uri(store_uri, namespace)} event among the triggering bundle events "
                f"(only other stores or namespaces, see above): this run scores {namespace} of {store_uri}"
            )
        version = str(event["version"])
    plan = batch.plan_scoring(
        store_uri,
        namespace,
        version=version,
        users_uri=params.get("users_uri") or None,
        k=int(params.get("k") or 100),
        users_per_shard=int(params.get("batch_users_per_shard") or 50_000),
    )
    return [shard.to_json() for shard in plan.shards]


def batch_shard_task(shard: Mapping[str, Any]) -> dict[str, Any]:
    """Body of one mapped scoring task: score the shard, its part's record as JSON."""
    from llmrec_tasks.serving import batch

    return batch.score_shard(batch.ScoreShard.from_json(shard)).to_json()


def batch_finalize_task(results: list[Mapping[str, Any]]) -> dict[str, Any]:
    """Body of the finalize task: the manifest of the output every shard wrote to (its summary)."""
    from llmrec_tasks.serving import batch

    outputs = {str(r["out_uri"]) for r in results}
    if len(outputs) != 1:
        raise ConfigError(
            f"the shards of one run wrote to {len(outputs)} outputs {sorted(outputs)}: plan again"
        )
    manifest = batch.finalize(outputs.pop())
    return {key: value for key, value in manifest.items() if key != "parts"} | {
        "parts": len(manifest["parts"])
    }


def online_metrics_task(params: Mapping[str, Any], logical_date: datetime) -> dict[str, Any]:
    """Body of the online metrics DAG's task: the ``days`` complete days before the run's logical
    date, of the store (param, else the deployment default) and namespace; the result as JSON."""
    from llmrec_tasks.online import run_online_metrics

    store_uri = resolve_store_uri(params.get("store_uri"), variable_get=airflow_variable)
    end = logical_date.date() - timedelta(days=1)
    start = end - timedelta(days=int(params.get("days") or 7) - 1)
    return run_online_metrics(
        store_uri,
        str(params.get("namespace") or DEFAULT_NAMESPACE),
        start.isoformat(),
        end.isoformat(),
        k=int(params.get("k") or 10),
        window_hours=float(params.get("window_hours") or 24),
    ).to_json()
