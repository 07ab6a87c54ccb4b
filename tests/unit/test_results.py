"""Typed stage results: JSON round trip, refused keys, and the artifact listing publish copies."""

from __future__ import annotations

import dataclasses
import json

import pytest

from llmrec_tasks.core import constants as C
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
from tests.bundle_factory import make_run


@pytest.fixture
def results(store_uri: str) -> list[StageResult]:
    _, validated, embedded, indexed, trained = make_run(store_uri)
    return [
        validated,
        EmbedShard(shard=0, shards=2, work_uri=validated.work_uri, count=5, precision="fp32"),
        EncodedShard(shard=0, count=5, seconds=0.25),
        embedded,
        indexed,
        trained,
        Published(
            version=validated.version,
            namespace="production",
            bundle_uri="file:///store/production/bundles/v1",
            manifest_uri="file:///store/production/bundles/v1/manifest.json",
            status="published",
            metrics=trained.metrics,
            check={"queries": 3},
            promoted=False,
            reason="promote=False: published without moving current",
        ),
    ]


def test_every_result_survives_a_json_round_trip(results: list[StageResult]) -> None:
    for result in results:
        data = json.loads(json.dumps(result.to_json()))
        assert type(result).from_json(data) == result
        assert list(data) == [f.name for f in dataclasses.fields(result)]


def test_results_are_frozen_and_their_json_is_a_copy(results: list[StageResult]) -> None:
    validated = results[0]
    with pytest.raises(dataclasses.FrozenInstanceError):
        validated.version = "v2"  # type: ignore[attr-defined, misc]
    data = validated.to_json()
    data["counts"]["items"] = -1
    assert validated.to_json()["counts"]["items"] > 0


def test_a_missing_key_is_refused_naming_the_stage_and_the_key(results: list[StageResult]) -> None:
    data = results[0].to_json()
    del data["work_uri"]
    with pytest.raises(ConfigError, match=r"validate result \(Validated\) has missing key\(s\) 'work_uri'"):
        Validated.from_json(data)


def test_an_unknown_key_is_refused_naming_the_stage_and_the_key(results: list[StageResult]) -> None:
    indexed = next(r for r in results if isinstance(r, Indexed))
    with pytest.raises(ConfigError, match=r"index result \(Indexed\) has unknown key\(s\) 'nprobe'"):
        Indexed.from_json({**indexed.to_json(), "nprobe": 8})


def test_both_problems_are_named_at_once() -> None:
    with pytest.raises(ConfigError, match=r"missing key\(s\) 'shard', .* and unknown key\(s\) 'index'"):
        EncodedShard.from_json({"index": 0, "count": 1})


def test_a_non_object_is_refused() -> None:
    with pytest.raises(ConfigError, match="publish result must be a JSON object, got list"):
        Published.from_json([])  # type: ignore[arg-type]


def test_artifacts_list_the_bundle_files_of_each_result(results: list[StageResult]) -> None:
    validated, embedded, indexed, trained = (
        next(r for r in results if isinstance(r, kind)) for kind in (Validated, Embedded, Indexed, Trained)
    )
    assert validated.artifacts() == {
        C.VALIDATION_SUMMARY: validated.validation_uri,
        C.VALIDATION_STATS: validated.validation_stats_uri,
        C.VALIDATION_DOCS_DIR: validated.data_docs_uri,
    }
    assert embedded.artifacts() == {
        C.EMBEDDINGS: embedded.embeddings_uri,
        C.ITEM_IDS: embedded.item_ids_uri,
        C.EMBEDDING_KEYS: embedded.embedding_keys_uri,
    }
    assert indexed.artifacts() == {C.FAISS_INDEX: indexed.index_uri, C.INDEX_INFO: indexed.index_info_uri}
    assert set(trained.artifacts()) == {
        C.RANKER_MODEL,
        C.FEATURE_SPEC,
        C.METRICS,
        C.REPORT_HTML,
        C.SERVING_STATS,
        C.ITEM_NEIGHBORS,
    }
    # The run's folders and work-only scratch never go into a bundle.
    assert C.RANKER_EVAL not in trained.artifacts()
    everything = [uri for r in results for uri in r.artifacts().values()]
    assert validated.work_uri not in everything and validated.snapshot_uri not in everything
    assert [r.artifacts() for r in results if isinstance(r, EmbedShard | EncodedShard | Published)] == [
        {}
    ] * 3


def test_an_unset_optional_artifact_is_left_out(results: list[StageResult]) -> None:
    validated = dataclasses.replace(results[0], data_docs_uri=None)
    assert C.VALIDATION_DOCS_DIR not in validated.artifacts()
    assert set(validated.artifacts()) == {C.VALIDATION_SUMMARY, C.VALIDATION_STATS}


def test_artifact_fields_are_fields_of_their_result() -> None:
    for kind in (Validated, EmbedShard, EncodedShard, Embedded, Indexed, Trained, Published):
        names = {f.name for f in dataclasses.fields(kind)}
        assert set(kind.ARTIFACTS) <= names, kind
        assert len(set(kind.ARTIFACTS.values())) == len(kind.ARTIFACTS), kind


def test_the_pipeline_saves_and_loads_typed_results(results: list[StageResult]) -> None:
    from llmrec_tasks.pipeline import load_stage, save_stage
    from llmrec_tasks.storage.store import open_store

    validated = results[0]
    assert isinstance(validated, Validated)
    save_stage(validated.work_uri, validated)
    assert load_stage(validated.work_uri, Validated) == validated
    with pytest.raises(ConfigError, match=r"stages/embed\.json not found: run `llmrec embed`"):
        load_stage(validated.work_uri, Embedded)
    stale = {k: v for k, v in validated.to_json().items() if k != "validation_stats_uri"}
    open_store(validated.work_uri).put_bytes("stages/validate.json", json.dumps(stale).encode())
    with pytest.raises(ConfigError, match=r"missing key.*'validation_stats_uri'.*rerun the validate stage"):
        load_stage(validated.work_uri, Validated)
