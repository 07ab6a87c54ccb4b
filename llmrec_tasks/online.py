"""Stage ``online-metrics``: what served recommendations did, per day x bundle version x arm.

Reads the flushed impressions and events (:mod:`llmrec_tasks.data.feedback` layout) of a day
range and measures, for each (day of the impression, bundle version, experiment arm):

- ``impressions``: responses (distinct request ids), and ``users`` among them;
- ``ctr@k``: share of impressions with an engagement event (:data:`ENGAGEMENT_TYPES`) on one of
  its first ``k`` items within the attribution window after the response;
- ``conversion``: share of impressions with a conversion event (:data:`CONVERSION_TYPES`) the same way;
- ``coverage``: distinct items shown in the first ``k`` / the version's catalogue (its ``item_ids.json``).

An event is attributed to an impression by its ``request_id`` when it has one (the client echoed
the response's id; then only "not after the window" is checked, as client clocks may lag the
server's), else by user + item at or after the impression and within the window. Events are read
up to the window past the last day, so a click just after midnight counts for the day before.

Written to ``<ns>/online_metrics/<start>_<end>/``: ``online_metrics.json`` (rows and totals per
version x arm), ``online_metrics.parquet`` (the rows) and ``online_report.html`` (tables and plots
over days).
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
from dataclasses import asdict, dataclass, field
from datetime import date, timedelta
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from llmrec_tasks.core import constants as C
from llmrec_tasks.core.config import validate_name
from llmrec_tasks.core.errors import BundleError, ConfigError
from llmrec_tasks.data.feedback import EVENT_SCHEMA, IMPRESSION_SCHEMA, read_parquet_frames
from llmrec_tasks.storage import registry
from llmrec_tasks.storage.store import ObjectNotFound, ObjectStore, open_store

log = logging.getLogger(__name__)

ENGAGEMENT_TYPES = ("click", "add_to_cart", "purchase", "rating")  # "view" may be logged passively
CONVERSION_TYPES = ("add_to_cart", "purchase")
GROUP = ("day", C.VERSION, C.ARM)
_ENGAGED, _CONVERTED = "_engaged", "_converted"
# The columns of compute() after the group keys, ctr@k between items_shown and conversion.
_METRIC_COLUMNS = (
    "impressions",
    "users",
    "engaged",
    "converted",
    "items_shown",
    "conversion",
    "catalogue",
    "coverage",
)


@dataclass
class OnlineMetrics:
    """Where the metrics of a day range were written, and their rows."""

    namespace: str
    start: str
    end: str
    k: int
    window_hours: float
    rows: list[dict[str, Any]] = field(default_factory=list)  # per day x version x arm
    totals: list[dict[str, Any]] = field(default_factory=list)  # per version x arm over the range
    uris: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def online_prefix(namespace: str, start: str, end: str) -> str:
    return f"{validate_name('namespace', namespace)}/{C.ONLINE_METRICS_DIR}/{start}_{end}"


def _days(start: date, end: date) -> list[str]:
    return [(start + timedelta(days=i)).isoformat() for i in range((end - start).days + 1)]


def _read_days(
    store: ObjectStore, namespace: str, kind: str, days: list[str], schema: pa.Schema
) -> pd.DataFrame:
    """The flushed rows of one kind for the given day partitions (empty frame of ``schema`` if none)."""
    keys = []
    for day in days:
        prefix = f"{namespace}/{C.FEEDBACK_DIR}/{kind}/{C.DAY_PARTITION.format(day=day)}/"
        keys += sorted(k for k in store.list(prefix) if k.endswith(".parquet"))
    return read_parquet_frames(store, keys, schema)


def _attributed(shown: pd.DataFrame, events: pd.DataFrame, window: pd.Timedelta) -> pd.DataFrame:
    """Request ids with an engagement / conversion event attributed (columns ``_engaged``, ``_converted``)."""
    events = events[events[C.EVENT_TYPE].isin(ENGAGEMENT_TYPES)]
    cols = [C.REQUEST_ID, C.USER_ID, C.ITEM_ID, C.TIMESTAMP]
    imp = shown[cols].rename(columns={C.TIMESTAMP: "_shown_at"})
    ev = events[[C.REQUEST_ID, C.USER_ID, C.ITEM_ID, C.TIMESTAMP, C.EVENT_TYPE]]
    by_request = ev[ev[C.REQUEST_ID].notna()].merge(
        imp.drop(columns=[C.USER_ID]), on=[C.REQUEST_ID, C.ITEM_ID], how="inner"
    )
    by_request = by_request[by_request[C.TIMESTAMP] <= by_request["_shown_at"] + window]
    by_user = (
        ev[ev[C.REQUEST_ID].isna() & ev[C.USER_ID].notna()]
        .drop(columns=[C.REQUEST_ID])
        .merge(imp[imp[C.USER_ID].notna()], on=[C.USER_ID, C.ITEM_ID], how="inner")
    )
    after = by_user[C.TIMESTAMP] - by_user["_shown_at"]
    by_user = by_user[(after >= pd.Timedelta(0)) & (after <= window)]
    matched = pd.concat([by_request[[C.REQUEST_ID, C.EVENT_TYPE]], by_user[[C.REQUEST_ID, C.EVENT_TYPE]]])
    matched = matched.assign(**{_ENGAGED: True, _CONVERTED: matched[C.EVENT_TYPE].isin(CONVERSION_TYPES)})
    return matched.groupby(C.REQUEST_ID)[[_ENGAGED, _CONVERTED]].any()


def _catalogue_size(store: ObjectStore, namespace: str, version: str) -> int | None:
    """Items of a version's catalogue (None when its bundle is gone, e.g. deleted by gc)."""
    try:
        manifest = registry.read_manifest(store, namespace, version)
        path = registry.bundle_file(store, namespace, version, C.ITEM_IDS, manifest)
    except (BundleError, KeyError, ObjectNotFound) as exc:
        log.warning("no catalogue for %s (coverage left out): %s", version, exc)
        return None
    return len(json.loads(path.read_bytes()))


def compute(
    impressions: pd.DataFrame,
    events: pd.DataFrame,
    catalogue: dict[str, int | None],
    *,
    k: int,
    window_hours: float,
    by: tuple[str, ...] = GROUP,
) -> pd.DataFrame:
    """The metrics of impression rows (one per item shown) and events, one row per ``by`` group."""
    shown = impressions[impressions[C.POSITION] <= k]
    if shown.empty:
        return pd.DataFrame(columns=[*by, *_METRIC_COLUMNS[:-3], f"ctr@{k}", *_METRIC_COLUMNS[-3:]])
    shown = shown.assign(day=shown[C.TIMESTAMP].dt.strftime("%Y-%m-%d"))
    requests = shown.drop_duplicates(C.REQUEST_ID)[[C.REQUEST_ID, C.USER_ID, *GROUP]]
    hits = _attributed(shown, events, pd.Timedelta(hours=window_hours))
    requests = requests.join(hits, on=C.REQUEST_ID)
    requests[[_ENGAGED, _CONVERTED]] = requests[[_ENGAGED, _CONVERTED]].fillna(False).astype(bool)
    per = requests.groupby(list(by)).agg(
        impressions=(C.REQUEST_ID, "size"),
        users=(C.USER_ID, "nunique"),
        engaged=(_ENGAGED, "sum"),
        converted=(_CONVERTED, "sum"),
    )
    per["items_shown"] = shown.groupby(list(by))[C.ITEM_ID].nunique()
    per = per.reset_index()
    per[f"ctr@{k}"] = per["engaged"] / per["impressions"]
    per["conversion"] = per["converted"] / per["impressions"]
    sizes = per[C.VERSION].map(catalogue).astype("float64")
    per["catalogue"] = sizes
    per["coverage"] = per["items_shown"] / sizes
    return per.sort_values(list(by), kind="stable").reset_index(drop=True)


def _records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """Rows as JSON-safe dicts (NaN -> None, numpy scalars -> Python)."""
    return json.loads(frame.replace({np.nan: None}).to_json(orient="records"))


def run_online_metrics(
    store_uri: str, namespace: str, start: str, end: str, *, k: int = 10, window_hours: float = 24.0
) -> OnlineMetrics:
    """Online metrics of the impressions shown on days ``start``..``end`` (ISO dates, inclusive)."""
    validate_name("namespace", namespace)
    try:
        first, last = date.fromisoformat(start), date.fromisoformat(end)
    except ValueError as exc:
        raise ConfigError(f"online metrics: days must be ISO dates (YYYY-MM-DD): {exc}") from exc
    if last < first:
        raise ConfigError(f"online metrics: end {end} is before start {start}")
    if k < 1 or window_hours <= 0:
        raise ConfigError(
            f"online metrics: k must be >= 1 and the window > 0 hours, got k={k}, {window_hours}h"
        )
    store = open_store(store_uri)
    days = _days(first, last)
    event_days = _days(first, last + timedelta(hours=window_hours) + timedelta(days=1))
    impressions = _read_days(store, namespace, C.FEEDBACK_IMPRESSIONS, days, IMPRESSION_SCHEMA)
    events = _read_days(store, namespace, C.FEEDBACK_EVENTS, event_days, EVENT_SCHEMA)
    events = events.drop_duplicates(C.EVENT_ID)
    versions = sorted(impressions[C.VERSION].dropna().unique())
    catalogue = {v: _catalogue_size(store, namespace, v) for v in versions}
    rows = compute(impressions, events, catalogue, k=k, window_hours=window_hours)
    totals = compute(impressions, events, catalogue, k=k, window_hours=window_hours, by=(C.VERSION, C.ARM))
    result = OnlineMetrics(
        namespace, start, end, k, window_hours, rows=_records(rows), totals=_records(totals)
    )
    prefix = online_prefix(namespace, start, end)
    buf = io.BytesIO()
    rows.to_parquet(buf, index=False)
    outputs = {
        C.ONLINE_METRICS_PARQUET: buf.getvalue(),
        C.ONLINE_REPORT_HTML: report_html(result).encode(),
    }
    for name, data in outputs.items():
        store.put_bytes(f"{prefix}/{name}", data)
        result.uris[name] = store.uri_for(f"{prefix}/{name}")
    result.uris[C.ONLINE_METRICS_JSON] = store.uri_for(f"{prefix}/{C.ONLINE_METRICS_JSON}")
    store.put_bytes(f"{prefix}/{C.ONLINE_METRICS_JSON}", json.dumps(result.to_json(), indent=2).encode())
    log.info(
        "online metrics of %s %s..%s: %d impressions, %d events -> %s",
        namespace, start, end, int(rows["impressions"].sum()) if len(rows) else 0, len(events),
        result.uris[C.ONLINE_METRICS_JSON],
    )  # fmt: skip
    return result


# --- the report ----------------------------------------------------------------------------------


def _plot_over_days(rows: pd.DataFrame, metrics: list[str]) -> str:
    """One panel per metric: a line per version x arm over the days."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.4), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        for (version, arm), part in rows.groupby([C.VERSION, C.ARM]):
            ax.plot(part["day"], part[metric], marker="o", label=f"{str(version)[-15:]} ({arm})")
        ax.set_title(metric)
        ax.tick_params(axis="x", rotation=35)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _html_table(records: list[dict[str, Any]], columns: list[str]) -> str:
    def cell(value: Any) -> str:
        if value is None:
            return "–"
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(cell(r.get(c)))}</td>" for c in columns) + "</tr>"
        for r in records
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def report_html(result: OnlineMetrics) -> str:
    """A self-contained page: totals per version x arm, plots over days, the daily rows."""
    ctr = f"ctr@{result.k}"
    columns = ["impressions", "users", ctr, "conversion", "items_shown", "coverage"]
    title = f"llmrec online metrics — {result.namespace} {result.start}..{result.end}"
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p>CTR@{result.k}: share of impressions with a {', '.join(ENGAGEMENT_TYPES)} event on one of "
        f"the first {result.k} items within {result.window_hours:g} h; conversion: the same with "
        f"{', '.join(CONVERSION_TYPES)}; coverage: distinct items shown / the version's catalogue.</p>",
    ]
    if not result.rows:
        parts.append("<p>No impressions in this range.</p></body></html>")
        return "".join(parts)
    parts += ["<h2>Per version and arm</h2>", _html_table(result.totals, [C.VERSION, C.ARM, *columns])]
    rows = pd.DataFrame(result.rows)
    parts += [
        "<h2>Over days</h2>",
        f"<img alt='online metrics over days' src='{_plot_over_days(rows, ['impressions', ctr, 'conversion', 'coverage'])}'>",
        "<h2>Per day</h2>",
        _html_table(result.rows, ["day", C.VERSION, C.ARM, *columns]),
        "</body></html>",
    ]
    return "".join(parts)
