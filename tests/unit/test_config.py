from datetime import UTC, datetime

import pytest

from llmrec_tasks.core.config import RunConfig, validate_name
from llmrec_tasks.core.errors import ConfigError


def test_from_dict_maps_flat_keys_and_coerces_strings():
    cfg = RunConfig.from_dict(
        {
            "store_uri": "file:///tmp/s",
            "encoder_max_length": "64",
            "ranker_learning_rate": "0.1",
            "promote": "false",
            "cutoff": "2026-01-02T00:00:00Z",
        }
    )
    assert cfg.encoder.max_length == 64
    assert cfg.ranker.learning_rate == pytest.approx(0.1)
    assert cfg.promote is False
    assert cfg.cutoff == datetime(2026, 1, 2, tzinfo=UTC)


@pytest.mark.parametrize(
    "values, message",
    [
        ({"store_uri": "file:///x", "namespace": "../prod"}, "invalid namespace"),
        ({"store_uri": "file:///x", "namespace": ""}, "invalid namespace"),
        ({"store_uri": "file:///x", "namespace": "a/b"}, "invalid namespace"),
        ({"store_uri": ""}, "store_uri is empty"),
        ({"store_uri": "file:///x", "encoder_backend": "tpu"}, "backend"),
        ({"store_uri": "file:///x", "index_kind": "lsh"}, "index kind"),
        ({"store_uri": "file:///x", "gate_tolerance": 3}, "gate_tolerance"),
        ({"store_uri": "file:///x", "encoder_max_length": "many"}, "must be int"),
        ({"store_uri": "file:///x", "bogus": 1}, "unknown settings"),
        ({"store_uri": "file:///x", "cutoff": "yesterday"}, "not an ISO datetime"),
    ],
)
def test_invalid_values_are_refused_with_a_message(values, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_dict(values)


def test_params_hash_ignores_lineage_and_shards_but_not_results():
    base = RunConfig.from_dict({"store_uri": "file:///a"})
    same = RunConfig.from_dict({"store_uri": "s3://b/c", "run_id": "x", "encoder_shards": 4})
    other = RunConfig.from_dict({"store_uri": "file:///a", "ranker_num_leaves": 31})
    assert base.params_hash() == same.params_hash()
    assert base.params_hash() != other.params_hash()


def test_round_trip_through_dict():
    cfg = RunConfig.from_dict({"store_uri": "file:///a", "cutoff": "2026-03-01T00:00:00+00:00"})
    assert RunConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("name", ["production", "exp-2026.01_a", "v1"])
def test_valid_names(name):
    assert validate_name("namespace", name) == name
