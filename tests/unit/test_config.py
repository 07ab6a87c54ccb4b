from datetime import UTC, datetime

import pytest

from llmrec_tasks.core.config import EncoderConfig, RankerConfig, RunConfig, validate_name
from llmrec_tasks.core.errors import ConfigError

# Configured data (a folder): the config never reads it.
DATA = "/data/llmrec-input"


def test_from_dict_maps_flat_keys_and_json_types():
    cfg = RunConfig.from_dict(
        {
            "data_uri": DATA,
            "store_uri": "file:///tmp/s",
            "encoder_max_length": 64.0,
            "ranker_learning_rate": 0.1,
            "gate_tolerance": 0,
            "promote": False,
            "validation_duplicates_mostly": 0.9,
            "cutoff": "2026-01-02T00:00:00Z",
        }
    )
    assert cfg.encoder.max_length == 64 and isinstance(cfg.encoder.max_length, int)
    assert cfg.ranker.learning_rate == pytest.approx(0.1)
    assert cfg.gate_tolerance == 0.0 and isinstance(cfg.gate_tolerance, float)
    assert cfg.promote is False
    assert cfg.validation.duplicates_mostly == pytest.approx(0.9)
    assert cfg.cutoff == datetime(2026, 1, 2, tzinfo=UTC)


@pytest.mark.parametrize(
    "values, message",
    [
        ({"store_uri": "file:///x", "namespace": "../prod"}, "invalid namespace"),
        ({"store_uri": "file:///x", "namespace": ""}, "invalid namespace"),
        ({"store_uri": "file:///x", "namespace": "a/b"}, "invalid namespace"),
        ({"store_uri": "file:///x", "namespace": "prod\n"}, "invalid namespace"),
        ({"store_uri": ""}, "store_uri is empty"),
        ({"store_uri": "ftp://host/x"}, "invalid store_uri"),
        ({"store_uri": "file:///x", "data_uri": ""}, "no data source configured"),
        ({"store_uri": "file:///x", "data_uri": "  "}, "no data source configured"),
        ({"store_uri": "file:///x", "data_uri": None}, "no data source configured"),
        ({"store_uri": "file:///x", "data_uri": "sample"}, "never goes to the `production` namespace"),
        ({"store_uri": "file:///x", "data_uri": "sample:3"}, "never goes to the `production` namespace"),
        ({"store_uri": "file:///x", "encoder_model": ""}, "encoder_model must have at least 1 character"),
        ({"store_uri": "file:///x", "encoder_backend": "tpu"}, "encoder_backend must be one of"),
        ({"store_uri": "file:///x", "index_kind": "lsh"}, "index_kind must be one of"),
        ({"store_uri": "file:///x", "gate_tolerance": 3}, r"gate_tolerance must be in \[0, 1\], got 3"),
        ({"store_uri": "file:///x", "encoder_max_length": "64"}, "encoder_max_length must be an integer"),
        ({"store_uri": "file:///x", "encoder_max_length": 64.5}, "encoder_max_length must be an integer"),
        ({"store_uri": "file:///x", "encoder_batch_size": 0}, "encoder_batch_size must be in"),
        ({"store_uri": "file:///x", "ranker_learning_rate": "0.1"}, "ranker_learning_rate must be a number"),
        ({"store_uri": "file:///x", "ranker_num_leaves": True}, "ranker_num_leaves must be an integer"),
        ({"store_uri": "file:///x", "ranker_seed": -1}, "ranker_seed must be at least 0"),
        ({"store_uri": "file:///x", "promote": "maybe"}, "promote must be true or false"),
        ({"store_uri": "file:///x", "promote": "false"}, "promote must be true or false"),
        (
            {"store_uri": "file:///x", "validation": {"min_year": 1990.5}},
            "validation_min_year must be an integer",
        ),
        ({"store_uri": "file:///x", "ranker_per_source": 300}, "must not exceed ranker_num_candidates"),
        ({"store_uri": "file:///x", "validation_min_weight": 6}, "must not exceed validation_max_weight"),
        ({"store_uri": "file:///x", "bogus": 1}, "unknown settings"),
        ({"store_uri": "file:///x", "ranker_learnig_rate": 1}, "did you mean ranker_learning_rate"),
        ({"store_uri": "file:///x", "validation": {"orphan_mostly": 1}}, "did you mean orphans_mostly"),
        ({"store_uri": "file:///x", "cutoff": "yesterday"}, "not an ISO datetime"),
    ],
)
def test_invalid_values_are_refused_with_a_message(values, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_dict({"data_uri": DATA, **values})


def test_a_run_without_data_says_how_to_configure_it_and_how_to_try_the_demo():
    with pytest.raises(ConfigError) as caught:
        RunConfig(store_uri="file:///x")
    message = str(caught.value)
    for part in ("`data_uri` param", "Variable `llmrec_data_uri`", "`LLMREC_DATA_URI`", "--data"):
        assert part in message
    assert "`make demo` (data `sample`, namespace `demo`)" in message


def test_the_sample_runs_outside_production_only():
    for data in ("sample", "sample:11"):
        assert RunConfig(data_uri=data, namespace="demo", store_uri="file:///x").data_uri == data
        with pytest.raises(ConfigError) as caught:
            RunConfig(data_uri=data, store_uri="file:///x")
        message = str(caught.value)
        assert f"data `{data}` is the generated demo data" in message
        assert "Variable `llmrec_data_uri`" in message and "namespace, e.g. `demo`" in message
    # Only the sample's own names: a folder called "samples" is real data.
    assert RunConfig(data_uri="samples", store_uri="file:///x").namespace == "production"


def test_one_user_per_window_is_a_valid_bound():
    """The form's minimum was 100 while the config allowed 1: one bound now, 1."""
    cfg = RunConfig.from_dict({"data_uri": DATA, "store_uri": "file:///x", "ranker_max_users_per_window": 1})
    assert cfg.ranker.max_users_per_window == 1
    with pytest.raises(ConfigError, match="ranker_max_users_per_window must be in"):
        RunConfig.from_dict({"data_uri": DATA, "store_uri": "file:///x", "ranker_max_users_per_window": 0})


def test_section_dataclasses_check_their_values():
    assert RankerConfig(num_candidates=12, per_source=5).per_source == 5
    with pytest.raises(ConfigError, match="encoder_max_length must be in"):
        EncoderConfig(max_length=4)
    with pytest.raises(ConfigError, match="ranker_per_source"):
        RankerConfig(num_candidates=12)


def test_params_hash_ignores_lineage_and_shards_but_not_results():
    base = RunConfig.from_dict({"data_uri": DATA, "store_uri": "file:///a"})
    same = RunConfig.from_dict(
        {"data_uri": DATA, "store_uri": "s3://b/c", "run_id": "x", "encoder_shards": 4}
    )
    other = RunConfig.from_dict({"data_uri": DATA, "store_uri": "file:///a", "ranker_num_leaves": 31})
    assert base.params_hash() == same.params_hash()
    assert base.params_hash() != other.params_hash()


def test_sasrec_settings_count_in_the_params_hash_only_when_it_runs():
    """SASRec is a comparison in the report: off, its settings change nothing a run produces."""
    base = RunConfig.from_dict({"data_uri": DATA, "store_uri": "file:///a"})
    off = RunConfig.from_dict({"data_uri": DATA, "store_uri": "file:///a", "sasrec_max_epochs": 3})
    on = RunConfig.from_dict({"data_uri": DATA, "store_uri": "file:///a", "sasrec_enabled": True})
    on_other = RunConfig.from_dict(
        {"data_uri": DATA, "store_uri": "file:///a", "sasrec_enabled": True, "sasrec_max_epochs": 3}
    )
    assert base.params_hash() == off.params_hash()
    assert len({base.params_hash(), on.params_hash(), on_other.params_hash()}) == 3
    assert on.sasrec.enabled and on.sasrec.device == "cpu"


def test_round_trip_through_dict():
    cfg = RunConfig.from_dict(
        {"data_uri": DATA, "store_uri": "file:///a", "cutoff": "2026-03-01T00:00:00+00:00"}
    )
    assert RunConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("name", ["production", "exp-2026.01_a", "v1", "a" * 63])
def test_valid_names(name):
    assert validate_name("namespace", name) == name


@pytest.mark.parametrize("name", ["", "a" * 64, "../x", "a..b", "a/b", "-x", "prod\n", None])
def test_invalid_names(name):
    with pytest.raises(ConfigError, match="invalid namespace"):
        validate_name("namespace", name)
