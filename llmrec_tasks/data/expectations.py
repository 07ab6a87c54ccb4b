"""Great Expectations suites as code for items, interactions, users and item categories.

GX checks columns, so every rule that needs parsing or a lookup gets a helper column first
(:func:`prepare_frames`): e.g. ``timestamp_unparseable`` holds the raw value where parsing failed and
is expected to be null, so a failure shows the offending values themselves. Thresholds come from
:class:`~llmrec_tasks.core.config.ValidationConfig`; volume and drift expectations compare with the
statistics of the previous published run (:func:`compute_stats`) and are skipped without them.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from llmrec_tasks.core import constants as C
from llmrec_tasks.core.config import ValidationConfig
from llmrec_tasks.data.contract import Dataset, parse_timestamps

log = logging.getLogger(__name__)
# Importing GX logs ~150 INFO lines about its docs registry: keep its logger to warnings.
logging.getLogger("great_expectations").setLevel(logging.WARNING)

import great_expectations as gx  # noqa: E402
import great_expectations.expectations as gxe  # noqa: E402
from great_expectations.core import ExpectationSuiteValidationResult  # noqa: E402
from great_expectations.core.run_identifier import RunIdentifier  # noqa: E402
from great_expectations.data_context.types.base import (  # noqa: E402
    DataContextConfig,
    InMemoryStoreBackendDefaults,
    ProgressBarsConfig,
)

# Helper columns added to the frames GX validates.
TIMESTAMP_UTC = "timestamp_utc"
TIMESTAMP_UNPARSEABLE = "timestamp_unparseable"
WEIGHT_VALUE = "weight_value"
WEIGHT_NOT_NUMERIC = "weight_not_numeric"
ORPHAN_ITEM_ID = "orphan_item_id"
ON_TOP_ITEM = "on_top_item"
TITLE_CHARS = "title_chars"
TEXT_CHARS = "text_chars"
UPDATED_AT_UNPARSEABLE = "updated_at_unparseable"
CATEGORY = "category"
# Unix timestamps written in a finer unit than seconds (unit -> units per second): they parse as the
# far future or not at all; a helper column per unit holds such values so the failure names the unit.
FINER_UNITS = {"milliseconds": 10**3, "microseconds": 10**6, "nanoseconds": 10**9}

# Suite names (also the GX asset names and the Data Docs page names): the tables' plus this one.
ITEM_CATEGORIES = "item_categories"
DOCS_SITE = "llmrec"
RESULT_FORMAT = {"result_format": "SUMMARY", "partial_unexpected_count": 5}
MAX_CATEGORIES = 200  # rarer categories are pooled so drift statistics stay small
OTHER_CATEGORY = "(other)"
KL_TAIL_HOLDOUT = 0.01  # weight given to categories the previous run did not have


@dataclass
class Frames:
    """The tables as GX sees them: contract columns cleaned of blanks, plus helper columns."""

    items: pd.DataFrame
    interactions: pd.DataFrame
    users: pd.DataFrame | None
    item_categories: pd.DataFrame

    def by_suite(self) -> dict[str, pd.DataFrame]:
        frames = {
            C.ITEMS: self.items,
            C.INTERACTIONS: self.interactions,
            ITEM_CATEGORIES: self.item_categories,
        }
        if self.users is not None:
            frames[C.USERS] = self.users
        return frames


def _ids(values: pd.Series) -> pd.Series:
    """Ids as stripped strings; blank -> missing (a blank id is as bad as no id)."""
    text = values.astype("string").str.strip()
    return text.mask(text == "")


def _unparseable(raw: pd.Series, parsed: pd.Series) -> pd.Series:
    """The raw value where it is present but did not parse, else missing."""
    text = raw.astype("string")
    return text.where(text.notna() & parsed.isna())


def timestamp_in(unit: str) -> str:
    """Helper column: the raw timestamp where it reads as a plausible time in ``unit``, not seconds."""
    return f"timestamp_in_{unit}"


def _finer_units(raw: pd.Series, floor: datetime, ceiling: datetime) -> dict[str, pd.Series]:
    """Per finer unit, the raw values too late as seconds but within [floor, ceiling] in that unit."""
    text = raw.astype("string")
    numeric = pd.to_numeric(text, errors="coerce").astype(float)
    low, high = floor.timestamp(), ceiling.timestamp()
    columns = {}
    for unit, per_second in FINER_UNITS.items():
        seconds = numeric / per_second
        columns[timestamp_in(unit)] = text.where((numeric > high) & (seconds >= low) & (seconds <= high))
    return columns


def prepare_frames(raw: Dataset, cfg: ValidationConfig, now: datetime) -> Frames:
    """Build the frames the suites run on from the raw (unparsed) dataset (``now``: the run's clock)."""
    items = pd.DataFrame({C.ITEM_ID: _ids(raw.items[C.ITEM_ID]), C.TITLE: _ids(raw.items[C.TITLE])})
    items[TITLE_CHARS] = items[C.TITLE].str.len().fillna(0).astype(int)
    text = raw.items[C.TEXT].astype("string") if C.TEXT in raw.items.columns else None
    items[TEXT_CHARS] = 0 if text is None else text.str.len().fillna(0).astype(int)
    if C.UPDATED_AT in raw.items.columns:
        updated = raw.items[C.UPDATED_AT]
        items[UPDATED_AT_UNPARSEABLE] = _unparseable(updated, parse_timestamps(updated))

    inter = raw.interactions
    frame = pd.DataFrame({C.USER_ID: _ids(inter[C.USER_ID]), C.ITEM_ID: _ids(inter[C.ITEM_ID])})
    frame[C.TIMESTAMP] = inter[C.TIMESTAMP].astype("string")
    frame[TIMESTAMP_UTC] = parse_timestamps(inter[C.TIMESTAMP])
    frame[TIMESTAMP_UNPARSEABLE] = _unparseable(inter[C.TIMESTAMP], frame[TIMESTAMP_UTC])
    for column, values in _finer_units(inter[C.TIMESTAMP], _floor(cfg), _ceiling(cfg, now)).items():
        frame[column] = values
    if C.WEIGHT in inter.columns:
        weights = pd.to_numeric(inter[C.WEIGHT].astype("string"), errors="coerce").astype(float)
        frame[WEIGHT_VALUE] = weights
        frame[WEIGHT_NOT_NUMERIC] = _unparseable(inter[C.WEIGHT], weights)
    catalog = items[C.ITEM_ID].dropna()
    frame[ORPHAN_ITEM_ID] = frame[C.ITEM_ID].where(~frame[C.ITEM_ID].isin(catalog))
    top = _top_items(frame[C.ITEM_ID].dropna(), catalog.nunique(), cfg.top_items_fraction)
    frame[ON_TOP_ITEM] = frame[C.ITEM_ID].isin(top).astype(float)

    users = None
    if raw.users is not None:
        users = pd.DataFrame({C.USER_ID: _ids(raw.users[C.USER_ID])})
    return Frames(items, frame, users, _item_categories(raw.items))


def _top_items(item_ids: pd.Series, n_catalog: int, fraction: float) -> list[str]:
    """The most interacted items, ``fraction`` of the catalog (at least one); ties by id."""
    k = max(1, round(fraction * n_catalog))
    counts = item_ids.value_counts().rename_axis("id").reset_index(name="n")
    return counts.sort_values(["n", "id"], ascending=[False, True])["id"].head(k).tolist()


def _item_categories(items: pd.DataFrame) -> pd.DataFrame:
    """One row per (item, category); categories beyond the MAX_CATEGORIES most frequent are pooled."""
    if C.CATEGORIES not in items.columns:
        return pd.DataFrame({CATEGORY: pd.Series([], dtype="string")})
    cats = items[C.CATEGORIES].astype("string").str.split(C.CATEGORY_SEPARATOR).explode().str.strip()
    cats = cats[cats.notna() & (cats != "")].reset_index(drop=True)
    common = cats.value_counts().head(MAX_CATEGORIES).index
    return pd.DataFrame({CATEGORY: cats.where(cats.isin(common), OTHER_CATEGORY)})


def bad_rows(frames: Frames, cfg: ValidationConfig, now: datetime) -> tuple[np.ndarray, np.ndarray]:
    """Row masks (items, interactions) of rows breaking a row rule: a passing run drops them.

    They are rows a ``mostly`` below 1 tolerated; duplicates keep their last occurrence.
    """
    items = frames.items
    bad_items = (
        items[C.ITEM_ID].isna()
        | _too_long(items[C.ITEM_ID])
        | items[C.TITLE].isna()
        | (items[TITLE_CHARS] > cfg.max_title_chars)
        | (items[TEXT_CHARS] > cfg.max_text_chars)
    )
    inter = frames.interactions
    ts = inter[TIMESTAMP_UTC]
    bad_inter = (
        inter[C.USER_ID].isna()
        | inter[C.ITEM_ID].isna()
        | _too_long(inter[C.USER_ID])
        | _too_long(inter[C.ITEM_ID])
        | ts.isna()
        | (ts < _floor(cfg))
        | (ts > _ceiling(cfg, now))
        | inter[ORPHAN_ITEM_ID].notna()
        | inter.duplicated([C.USER_ID, C.ITEM_ID, TIMESTAMP_UTC], keep="last")
    )
    if WEIGHT_VALUE in inter.columns:
        weight = inter[WEIGHT_VALUE]
        bad_inter |= inter[WEIGHT_NOT_NUMERIC].notna() | (weight < cfg.min_weight) | (weight > cfg.max_weight)
    return bad_items.to_numpy(dtype=bool), bad_inter.to_numpy(dtype=bool)


def _too_long(ids: pd.Series) -> pd.Series:
    """Rows whose id is longer than ``MAX_ID_CHARS`` (missing ids are another rule's)."""
    return (ids.str.len() > C.MAX_ID_CHARS).fillna(False).astype(bool)


def _id_length(column: str, cfg: ValidationConfig) -> gxe.Expectation:
    """Ids are bounded so a runaway value cannot bloat bundles, caches and logs."""
    return gxe.ExpectColumnValueLengthsToBeBetween(
        column=column,
        max_value=C.MAX_ID_CHARS,
        mostly=cfg.ids_mostly,
        description=f"{column} at most {C.MAX_ID_CHARS} characters",
    )


def _floor(cfg: ValidationConfig) -> datetime:
    return datetime(cfg.min_year, 1, 1, tzinfo=UTC)


def _ceiling(cfg: ValidationConfig, now: datetime) -> datetime:
    return now + timedelta(hours=cfg.future_slack_hours)


def compute_stats(frames: Frames, cfg: ValidationConfig) -> dict[str, Any]:
    """Statistics the next run compares with: row counts, top-item share, category distribution."""
    shares = frames.item_categories[CATEGORY].value_counts(normalize=True).sort_index()
    ts = frames.interactions[TIMESTAMP_UTC].dropna()
    return {
        "rows": {
            C.ITEMS: len(frames.items),
            C.INTERACTIONS: len(frames.interactions),
            C.USERS: None if frames.users is None else len(frames.users),
        },
        "top_items_fraction": cfg.top_items_fraction,
        "top_items_share": float(frames.interactions[ON_TOP_ITEM].mean()) if len(ts) else None,
        "categories": {str(k): float(v) for k, v in shares.items()},
        "timestamp_min": ts.min().isoformat() if len(ts) else None,
        "timestamp_max": ts.max().isoformat() if len(ts) else None,
    }


def build_suites(
    cfg: ValidationConfig, frames: Frames, previous: dict[str, Any] | None, now: datetime
) -> list[gx.ExpectationSuite]:
    """All suites for this run; `previous` is the last published run's :func:`compute_stats`."""
    previous = previous or {}
    rows = previous.get("rows") or {}
    items = _items_expectations(cfg, frames) + _volume(cfg, rows.get(C.ITEMS))
    interactions = (
        _interaction_expectations(cfg, frames, now)
        + _volume(cfg, rows.get(C.INTERACTIONS))
        + _top_share(cfg, previous.get("top_items_share"))
    )
    suites = {C.ITEMS: items, C.INTERACTIONS: interactions, ITEM_CATEGORIES: _category_drift(cfg, previous)}
    if frames.users is not None:
        suites[C.USERS] = _user_expectations(cfg) + _volume(cfg, rows.get(C.USERS))
    for expectation in (e for group in suites.values() for e in group):
        # A broken expectation (e.g. values GX cannot compare) becomes a failed result carrying
        # its error message instead of aborting the whole validation.
        expectation.catch_exceptions = True
    return [gx.ExpectationSuite(name=name, expectations=group) for name, group in suites.items() if group]


def _items_expectations(cfg: ValidationConfig, frames: Frames) -> list[gxe.Expectation]:
    expectations = [
        gxe.ExpectTableRowCountToBeBetween(min_value=1, description="the catalog has items"),
        gxe.ExpectColumnValuesToNotBeNull(
            column=C.ITEM_ID, mostly=cfg.ids_mostly, description="item_id present (not blank)"
        ),
        _id_length(C.ITEM_ID, cfg),
        gxe.ExpectColumnValuesToBeUnique(
            column=C.ITEM_ID, mostly=cfg.unique_mostly, description="item_id unique"
        ),
        gxe.ExpectColumnValuesToNotBeNull(
            column=C.TITLE, mostly=cfg.text_mostly, description="title present (item text not empty)"
        ),
        gxe.ExpectColumnValuesToBeBetween(
            column=TITLE_CHARS,
            max_value=cfg.max_title_chars,
            mostly=cfg.text_mostly,
            description=f"title at most {cfg.max_title_chars} characters",
        ),
        gxe.ExpectColumnValuesToBeBetween(
            column=TEXT_CHARS,
            max_value=cfg.max_text_chars,
            mostly=cfg.text_mostly,
            description=f"text at most {cfg.max_text_chars} characters",
        ),
    ]
    if UPDATED_AT_UNPARSEABLE in frames.items.columns:
        expectations.append(
            gxe.ExpectColumnValuesToBeNull(
                column=UPDATED_AT_UNPARSEABLE,
                mostly=cfg.timestamps_mostly,
                description="updated_at parses (unix seconds or ISO 8601)",
            )
        )
    return expectations


def _interaction_expectations(cfg: ValidationConfig, frames: Frames, now: datetime) -> list[gxe.Expectation]:
    floor, ceiling = _floor(cfg), _ceiling(cfg, now)
    expectations = [
        gxe.ExpectTableRowCountToBeBetween(min_value=1, description="there are interactions"),
        *(
            gxe.ExpectColumnValuesToNotBeNull(
                column=column, mostly=cfg.ids_mostly, description=f"{column} present (not blank)"
            )
            for column in (C.USER_ID, C.ITEM_ID)
        ),
        *(_id_length(column, cfg) for column in (C.USER_ID, C.ITEM_ID)),
        gxe.ExpectColumnValuesToNotBeNull(
            column=C.TIMESTAMP, mostly=cfg.timestamps_mostly, description="timestamp present"
        ),
        *(
            gxe.ExpectColumnValuesToBeNull(
                column=timestamp_in(unit),
                mostly=cfg.timestamps_mostly,
                description=f"timestamp in unix seconds (these look like {unit}: divide by {per_second:,})",
            )
            for unit, per_second in FINER_UNITS.items()
        ),
        gxe.ExpectColumnValuesToBeNull(
            column=TIMESTAMP_UNPARSEABLE,
            mostly=cfg.timestamps_mostly,
            description="timestamp parses (unix seconds or ISO 8601)",
        ),
        gxe.ExpectColumnValuesToBeBetween(
            column=TIMESTAMP_UTC,
            min_value=floor,
            mostly=cfg.timestamps_mostly,
            description=f"timestamp not before {floor:%Y-%m-%d} (ancient)",
        ),
        gxe.ExpectColumnValuesToBeBetween(
            column=TIMESTAMP_UTC,
            max_value=ceiling,
            mostly=cfg.timestamps_mostly,
            description=f"timestamp not in the future (after {ceiling:%Y-%m-%d %H:%M} UTC)",
        ),
        gxe.ExpectCompoundColumnsToBeUnique(
            column_list=[C.USER_ID, C.ITEM_ID, TIMESTAMP_UTC],
            mostly=cfg.duplicates_mostly,
            description="no duplicate (user_id, item_id, timestamp)",
        ),
        gxe.ExpectColumnValuesToBeNull(
            column=ORPHAN_ITEM_ID,
            mostly=cfg.orphans_mostly,
            description=f"item_id exists in the catalog (at most {1 - cfg.orphans_mostly:.1%} orphans)",
        ),
    ]
    if WEIGHT_VALUE in frames.interactions.columns:
        expectations += [
            gxe.ExpectColumnValuesToBeNull(
                column=WEIGHT_NOT_NUMERIC, mostly=cfg.weights_mostly, description="weight/rating is a number"
            ),
            gxe.ExpectColumnValuesToBeBetween(
                column=WEIGHT_VALUE,
                min_value=cfg.min_weight,
                max_value=cfg.max_weight,
                mostly=cfg.weights_mostly,
                description=f"weight/rating within [{cfg.min_weight:g}, {cfg.max_weight:g}]",
            ),
        ]
    return expectations


def _user_expectations(cfg: ValidationConfig) -> list[gxe.Expectation]:
    return [
        gxe.ExpectColumnValuesToNotBeNull(
            column=C.USER_ID, mostly=cfg.ids_mostly, description="user_id present (not blank)"
        ),
        _id_length(C.USER_ID, cfg),
        gxe.ExpectColumnValuesToBeUnique(
            column=C.USER_ID, mostly=cfg.unique_mostly, description="user_id unique"
        ),
    ]


def _category_drift(cfg: ValidationConfig, previous: dict[str, Any]) -> list[gxe.Expectation]:
    """The catalog's category distribution against the previous run's (nothing without one)."""
    expected = previous.get("categories") or {}
    if not expected:
        return []
    return [
        gxe.ExpectTableRowCountToBeBetween(
            min_value=1, description=f"items still have categories (the previous run had {len(expected)})"
        ),
        gxe.ExpectColumnKLDivergenceToBeLessThan(
            column=CATEGORY,
            partition_object={"values": list(expected), "weights": list(expected.values())},
            threshold=cfg.category_max_kl,
            tail_weight_holdout=KL_TAIL_HOLDOUT,
            description=f"category distribution close to the previous run's (KL <= {cfg.category_max_kl:g})",
        ),
    ]


def _volume(cfg: ValidationConfig, previous_rows: int | None) -> list[gxe.Expectation]:
    if not previous_rows:
        return []
    low, high = (
        math.ceil(previous_rows * cfg.volume_min_ratio),
        math.floor(previous_rows * cfg.volume_max_ratio),
    )
    return [
        gxe.ExpectTableRowCountToBeBetween(
            min_value=low,
            max_value=high,
            description=f"row count within [{low}, {high}] (previous run: {previous_rows})",
        )
    ]


def _top_share(cfg: ValidationConfig, previous_share: float | None) -> list[gxe.Expectation]:
    if previous_share is None:
        return []
    low = max(0.0, previous_share - cfg.top_share_max_delta)
    high = min(1.0, previous_share + cfg.top_share_max_delta)
    return [
        gxe.ExpectColumnMeanToBeBetween(
            column=ON_TOP_ITEM,
            min_value=low,
            max_value=high,
            description=(
                f"share of interactions on the top {cfg.top_items_fraction:.0%} items within "
                f"[{low:.2f}, {high:.2f}] (previous run: {previous_share:.2f})"
            ),
        )
    ]


def run_suites(
    frames: dict[str, pd.DataFrame], suites: list[gx.ExpectationSuite], docs_dir: Path | None, run_name: str
) -> list[ExpectationSuiteValidationResult]:
    """Run each suite on the frame of the same name in an ephemeral GX context.

    With ``docs_dir``, the Data Docs site (HTML) is built there (nothing is, if rendering fails).
    """
    context = gx.get_context(mode="ephemeral", project_config=_context_config(docs_dir))
    source = context.data_sources.add_pandas("llmrec")
    run_id = RunIdentifier(run_name=run_name, run_time=datetime.now(UTC))
    results = []
    for suite in suites:
        batch = source.add_dataframe_asset(suite.name).add_batch_definition_whole_dataframe(suite.name)
        definition = context.validation_definitions.add(
            gx.ValidationDefinition(name=suite.name, data=batch, suite=context.suites.add(suite))
        )
        results.append(
            definition.run(
                batch_parameters={"dataframe": frames[suite.name]}, result_format=RESULT_FORMAT, run_id=run_id
            )
        )
    if docs_dir is not None:
        try:
            context.build_data_docs(site_names=[DOCS_SITE])
        except Exception as exc:  # GX renderers raise arbitrary types on odd values; the verdict stands
            log.warning(
                "Great Expectations Data Docs could not be rendered (%s): only validation.json is kept", exc
            )
    return results


def _context_config(docs_dir: Path | None) -> DataContextConfig:
    """In-memory stores, no progress bars, no analytics; one local Data Docs site when asked."""
    sites = {}
    if docs_dir is not None:
        sites[DOCS_SITE] = {
            "class_name": "SiteBuilder",
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir)},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        }
    return DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(),
        data_docs_sites=sites,
        progress_bars=ProgressBarsConfig(globally=False),
        analytics_enabled=False,
    )
