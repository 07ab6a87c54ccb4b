"""Stage `validate`: a good input passes and yields a snapshot; reports, stats and drift checks."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd
import pytest

from llmrec_tasks.core import constants as C
from llmrec_tasks.core.config import RunConfig
from llmrec_tasks.core.errors import ConfigError, ValidationFailedError
from llmrec_tasks.data.contract import read_snapshot
from llmrec_tasks.data.sample import write_sample
from llmrec_tasks.data.validate import format_failures, run_validate
from llmrec_tasks.storage.registry import bundle_prefix, current_key
from llmrec_tasks.storage.store import open_store
from tests.stage_results import DATA_URI


def read_json(uri: str) -> dict:
    return json.loads(Path(uri.removeprefix("file://")).read_text())


def publish_stats(store_uri: str, stats_uri: str, version: str = "20260101T000000Z-feedbeef-abcdef") -> None:
    """A fake published bundle holding a previous run's validation statistics."""
    store = open_store(store_uri)
    stats = Path(stats_uri.removeprefix("file://")).read_bytes()
    store.put_bytes(f"{bundle_prefix(C.DEFAULT_NAMESPACE, version)}/{C.VALIDATION_STATS}", stats)
    store.put_bytes(current_key(C.DEFAULT_NAMESPACE), json.dumps({"version": version}).encode())


def test_sample_passes_and_writes_snapshot_report_and_stats(store_uri, sample_data):
    result = run_validate(RunConfig(data_uri="sample", namespace="demo", store_uri=store_uri))

    assert result.version.startswith("20261028T000000Z-")
    assert result.counts == {"items": 720, "interactions": len(sample_data.interactions), "users": 400}
    snapshot = read_snapshot(result.snapshot_uri)
    assert snapshot.fingerprint() == result.fingerprint == sample_data.fingerprint()
    summary = read_json(result.validation_uri)
    assert summary["success"] is True and summary["failed"] == []
    assert set(summary["suites"]) == {"items", "interactions"}
    assert "volume and drift checks skipped" in summary["notes"][0]
    stats = read_json(result.validation_stats_uri)
    assert stats["rows"]["interactions"] == len(sample_data.interactions)
    assert 0 < stats["top_items_share"] < 1
    assert sum(stats["categories"].values()) == pytest.approx(1)
    docs = Path(result.data_docs_uri.removeprefix("file://")) / "index.html"
    assert "interactions" in docs.read_text()
    assert list(docs.parent.glob("validations/interactions/**/*.html"))
    assert result.work_uri.endswith(f"/demo/runs/{result.version}")


def test_same_input_and_params_give_the_same_version(store_uri):
    cfg = RunConfig(data_uri="sample", namespace="demo", store_uri=store_uri)
    first, second = run_validate(cfg), run_validate(cfg)
    assert first.version == second.version
    # A rerun replaces the earlier attempt's Data Docs instead of piling them up.
    docs = Path(second.data_docs_uri.removeprefix("file://"))
    assert len(list(docs.glob("validations/interactions/**/*.html"))) == 1


def test_previous_stats_enable_volume_and_drift_checks(tmp_path, store_uri):
    folder = write_sample(tmp_path / "in")
    cfg = RunConfig(data_uri=str(folder), store_uri=store_uri)
    first = read_json(run_validate(cfg).validation_uri)
    publish_stats(store_uri, run_validate(cfg).validation_stats_uri)

    second = read_json(run_validate(cfg).validation_uri)
    assert second["success"] and second["notes"] == []
    assert second["previous"]["version"].startswith("20260101")
    assert "item_categories" in second["suites"]
    evaluated = {s: v["evaluated_expectations"] for s, v in second["suites"].items()}
    before = {s: v["evaluated_expectations"] for s, v in first["suites"].items()}
    # Row-count bounds on both tables, the top-item share, and categories (presence + KL).
    assert evaluated == {
        "items": before["items"] + 1,
        "interactions": before["interactions"] + 2,
        "item_categories": 2,
    }


def test_unusable_current_pointer_only_skips_drift_checks(store_uri, sample_folder):
    store = open_store(store_uri)
    store.put_bytes(current_key(C.DEFAULT_NAMESPACE), b"{not json")
    result = run_validate(RunConfig(data_uri=str(sample_folder), store_uri=store_uri))
    summary = read_json(result.validation_uri)
    assert summary["success"] and "no usable statistics" in summary["notes"][0]


def test_tolerated_bad_rows_are_dropped_from_the_snapshot(tmp_path, store_uri):
    folder = write_sample(tmp_path / "in")
    inter = pd.read_csv(folder / "interactions.csv", dtype=str)
    dupes = inter.head(40)  # 0.25% duplicates: under the default 1% tolerance
    pd.concat([inter, dupes]).to_csv(folder / "interactions.csv", index=False)

    result = run_validate(RunConfig(data_uri=str(folder), store_uri=store_uri))
    summary = read_json(result.validation_uri)
    assert summary["bad_rows"] == {"items": 0, "interactions": 40}
    assert result.counts["interactions"] == len(inter)


def test_thresholds_come_from_config(tmp_path, store_uri):
    folder = write_sample(tmp_path / "in")
    inter = pd.read_csv(folder / "interactions.csv", dtype=str)
    inter.loc[:9, "weight"] = "7"
    inter.to_csv(folder / "interactions.csv", index=False)
    with pytest.raises(ValidationFailedError, match=r"weight/rating within \[0, 5\]"):
        run_validate(RunConfig(data_uri=str(folder), store_uri=store_uri))

    cfg = RunConfig.from_dict({"data_uri": str(folder), "store_uri": store_uri, "validation_max_weight": 10})
    assert run_validate(cfg).counts["interactions"] == len(inter)


def test_validation_config_is_checked_and_not_part_of_the_version():
    with pytest.raises(ConfigError, match="orphans_mostly"):
        RunConfig.from_dict(
            {"data_uri": DATA_URI, "store_uri": "file:///x", "validation": {"orphans_mostly": 2}}
        )
    strict = RunConfig(data_uri=DATA_URI, store_uri="file:///x")
    relaxed = RunConfig.from_dict(
        {"data_uri": DATA_URI, "store_uri": "file:///x", "validation_orphans_mostly": 0.5}
    )
    assert relaxed.validation.orphans_mostly == 0.5
    assert strict.params_hash() == relaxed.params_hash()


def test_failure_table_names_check_column_and_bad_values():
    table = format_failures(
        [
            {
                "suite": "interactions",
                "column": "weight_value",
                "check": "weight/rating within [0, 5]",
                "expectation": "expect_column_values_to_be_between",
                "observed": "3 of 100 rows (3.00%)",
                "samples": ["7.0", "'x' * 500"],
            }
        ]
    )
    header, rule, row = table.splitlines()
    assert header.split() == [
        "suite",
        "column",
        "check",
        "expectation",
        "observed",
        "sample",
        "bad",
        "values",
    ]
    assert set(rule.replace(" ", "")) == {"-"}
    assert "weight_value" in row and "7.0; 'x' * 500" in row


@pytest.mark.movielens
def test_movielens_validates_quickly(movielens_dir, store_uri):
    started = time.monotonic()
    result = run_validate(RunConfig(data_uri=str(movielens_dir), store_uri=store_uri))
    elapsed = time.monotonic() - started
    assert result.counts["items"] == 9742 and result.counts["interactions"] == 100836
    assert elapsed < 30, f"validation of MovieLens took {elapsed:.1f}s"


@pytest.mark.integration
def test_validate_against_s3_reads_previous_stats_and_writes_the_report(s3_store_uri, sample_folder):
    cfg = RunConfig(data_uri=str(sample_folder), store_uri=s3_store_uri)
    first = run_validate(cfg)
    store = open_store(s3_store_uri)
    version = "20260101T000000Z-feedbeef-abcdef"
    stats_key = first.validation_stats_uri.removeprefix(store.uri + "/")
    store.put_bytes(
        f"{bundle_prefix(C.DEFAULT_NAMESPACE, version)}/{C.VALIDATION_STATS}", store.get_bytes(stats_key)
    )
    store.put_bytes(current_key(C.DEFAULT_NAMESPACE), json.dumps({"version": version}).encode())

    second = run_validate(cfg)
    work = second.work_uri.removeprefix(store.uri + "/")
    summary = json.loads(store.get_bytes(f"{work}/{C.VALIDATION_SUMMARY}"))
    assert summary["success"] and summary["previous"]["version"] == version
    assert store.exists(f"{work}/{C.VALIDATION_DOCS_DIR}/index.html")
    assert read_snapshot(second.snapshot_uri).fingerprint() == second.fingerprint


def test_report_survives_a_data_docs_rendering_failure(tmp_path, store_uri, monkeypatch):
    from great_expectations.data_context import AbstractDataContext

    def broken(*args, **kwargs):
        raise RuntimeError("renderer exploded")

    monkeypatch.setattr(AbstractDataContext, "build_data_docs", broken)
    folder = write_sample(tmp_path / "in")
    inter = pd.read_csv(folder / "interactions.csv", dtype=str)
    inter.loc[:4, "user_id"] = ""
    inter.to_csv(folder / "interactions.csv", index=False)

    with pytest.raises(ValidationFailedError, match="user_id present") as caught:
        run_validate(RunConfig(data_uri=str(folder), store_uri=store_uri))
    assert caught.value.report_uri.endswith(f"/{C.VALIDATION_SUMMARY}")
    assert read_json(caught.value.report_uri)["failed"][0]["samples"] == [f"row {i}" for i in range(5)]


def test_ids_up_to_the_bound_pass_and_longer_ones_are_bad_rows(tmp_path, store_uri):
    folder = write_sample(tmp_path / "in")
    inter = pd.read_csv(folder / "interactions.csv", dtype=str)
    inter.loc[0, C.USER_ID] = "u" * C.MAX_ID_CHARS
    inter.loc[1, C.USER_ID] = "u" * (C.MAX_ID_CHARS + 1)
    inter.to_csv(folder / "interactions.csv", index=False)
    with pytest.raises(ValidationFailedError, match=rf"'user_id at most {C.MAX_ID_CHARS} characters': 1 of"):
        run_validate(RunConfig(data_uri=str(folder), store_uri=store_uri))

    tolerant = {"data_uri": str(folder), "store_uri": store_uri, "validation_ids_mostly": 0.99}
    result = run_validate(RunConfig.from_dict(tolerant))
    assert read_json(result.validation_uri)["bad_rows"] == {"items": 0, "interactions": 1}
    users = read_snapshot(result.snapshot_uri).interactions[C.USER_ID]
    assert users.str.len().max() == C.MAX_ID_CHARS


@pytest.mark.parametrize(
    "stamp, unit",
    [
        ("1780000000000", "milliseconds"),
        ("1780000000000000", "microseconds"),
        ("1780000000000000000", "nanoseconds"),
    ],
)
def test_timestamps_in_a_finer_unit_are_named_in_the_headline(tmp_path, store_uri, stamp, unit):
    folder = write_sample(tmp_path / "in")
    inter = pd.read_csv(folder / "interactions.csv", dtype=str)
    inter.loc[:2, C.TIMESTAMP] = stamp
    inter.loc[3, C.TIMESTAMP] = "1780000"  # a valid unix-seconds value (ancient), not a finer unit
    inter.to_csv(folder / "interactions.csv", index=False)
    with pytest.raises(ValidationFailedError) as caught:
        run_validate(RunConfig(data_uri=str(folder), store_uri=store_uri))
    headline = str(caught.value).splitlines()[0]
    assert f"interactions.timestamp_in_{unit} 'timestamp in unix seconds (these look like {unit}" in headline
    assert f"3 of {len(inter)} rows" in headline and repr(stamp) in headline
    failed = read_json(caught.value.report_uri.replace("validation/index.html", "validation.json"))["failed"]
    assert [f["column"] for f in failed if f["column"].startswith("timestamp_in_")] == [
        f"timestamp_in_{unit}"
    ]
