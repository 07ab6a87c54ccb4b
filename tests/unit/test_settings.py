"""The settings table is the one declaration: the DAG's params (JSON schema, as Airflow validates
them) and ``RunConfig`` accept and refuse exactly the same values, and the CLI's ``--set`` says
what the config says."""

from __future__ import annotations

import dataclasses
import math

import pytest
from airflow.sdk import Param
from airflow.sdk.exceptions import ParamValidationError

from llmrec_tasks import cli
from llmrec_tasks.core import settings
from llmrec_tasks.core.config import (
    EncoderConfig,
    IndexConfig,
    RankerConfig,
    RunConfig,
    SasrecConfig,
    ValidationConfig,
)
from llmrec_tasks.core.errors import ConfigError

STORE = "file:///tmp/llmrec-settings"
DATA = "/data/llmrec-settings"  # configured data: the config never reads it
SECTION_CLASSES = {
    "encoder": EncoderConfig,
    "index": IndexConfig,
    "ranker": RankerConfig,
    "sasrec": SasrecConfig,
    "validation": ValidationConfig,
}
# Cross-field checks (RunConfig's own, not the form's): partners set so they never trigger.
PARTNERS = {
    "ranker_num_candidates": {"ranker_per_source": 1},
    "ranker_per_source": {"ranker_num_candidates": 5000},
    "validation_min_weight": {"validation_max_weight": 1e300},
    "validation_max_weight": {"validation_min_weight": -1e300},
    "data_uri": {"namespace": "demo"},  # the sample is refused in production only
}
TEXTS = [
    "",
    " ",
    "x",
    "sample",
    "a" * 63,
    "a" * 64,
    "../prod",
    "a..b",
    "a/b",
    "prod\n",
    "-x",
    "file:///tmp/s",
    "s3://bucket/prefix",
    "/abs/path",
    "ftp://host/x",
    "relative/path",
]


def candidates(s: settings.Setting) -> list:
    """Values at and beyond the setting's bounds, outside its enum and of wrong types."""
    values: list = [s.default, None, [], {}, "text", True, False, 0, 1, -1, 1.5, 10**9]
    if s.type in (int, float):
        values.append(str(s.default))
        for bound in (s.minimum, s.maximum, s.exclusive_minimum):
            if bound is None:
                continue
            if s.type is int:
                values += [bound - 1, bound, bound + 1, float(bound), bound + 0.5]
            else:
                values += [math.nextafter(bound, -math.inf), bound, math.nextafter(bound, math.inf)]
                values += [int(bound)] if float(bound).is_integer() else []
        values += [float(s.default)] if s.type is int else [int(s.default)]
    if s.enum:
        values += [*s.enum, *(e.upper() for e in s.enum), "not-a-member"]
    if s.type is str:
        values += TEXTS
    if s.type is bool:
        values += ["true", "false"]
    return values


def form_accepts(s: settings.Setting, value) -> bool:
    """The DAG param's check (Airflow's ``Param.resolve``: jsonschema on the schema it builds)."""
    if s.section in settings.OBJECT_PARAMS:
        kwargs, value = settings.form_params()[s.section], {s.name: value}
    else:
        kwargs = settings.form_params()[s.key]
    try:
        Param(**kwargs).resolve(value)
    except ParamValidationError:
        return False
    return True


def config_accepts(s: settings.Setting, value, nested: bool = True) -> bool:
    """``RunConfig.from_dict`` on the value as the DAG passes it (the validation object nested) or,
    with ``nested=False``, as the CLI does (flat ``validation_*`` keys)."""
    if s.key == "store_uri" and value in (None, ""):
        value = STORE  # empty: the deployment default, which airflow_glue resolves at run time
    if s.key == "data_uri" and (value is None or (isinstance(value, str) and not value.strip())):
        value = DATA  # empty: the deployment's source (Variable, env), which airflow_glue resolves
    conf: dict = {"store_uri": STORE, "data_uri": DATA, **PARTNERS.get(s.key, {})}
    if s.section in settings.OBJECT_PARAMS and nested:
        conf[s.section] = {s.name: value}
    else:
        conf[s.key] = value
    try:
        RunConfig.from_dict(conf)
    except ConfigError:
        return False
    return True


@pytest.mark.parametrize("key", list(settings.SETTINGS))
def test_form_and_config_accept_and_refuse_the_same_values(key):
    s = settings.SETTINGS[key]
    values = candidates(s)
    verdicts = {repr(v): (form_accepts(s, v), config_accepts(s, v)) for v in values}
    disagree = {v: f"form {f}, config {c}" for v, (f, c) in verdicts.items() if f != c}
    assert disagree == {}
    if s.section in settings.OBJECT_PARAMS:
        assert {repr(v): config_accepts(s, v, nested=False) for v in values} == {
            v: c for v, (_, c) in verdicts.items()
        }
    # The candidates really probe both sides: the default passes, something is refused.
    assert verdicts[repr(s.default)] == (True, True)
    assert (False, False) in verdicts.values()


def test_values_at_the_bounds_pass_and_beyond_them_fail():
    rate = settings.SETTINGS["ranker_learning_rate"]
    assert rate.check(1) == 1.0 and isinstance(rate.check(1), float)
    for bad in (0, 0.0, math.nextafter(1, 2)):
        with pytest.raises(ConfigError, match=r"ranker_learning_rate must be in \(0, 1\]"):
            rate.check(bad)
    length = settings.SETTINGS["encoder_max_length"]
    assert length.check(8) == 8 and length.check(512.0) == 512 and isinstance(length.check(512.0), int)
    with pytest.raises(ConfigError, match=r"encoder_max_length must be in \[8, 512\], got 7"):
        length.check(7)
    with pytest.raises(ConfigError, match=r"encoder_max_length must be an integer, got 64\.5"):
        length.check(64.5)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_config_refuses_numbers_json_cannot_carry(value):
    """NaN and infinities are not JSON: the form never sends them, the config refuses them."""
    with pytest.raises(ConfigError, match="finite number"):
        RunConfig.from_dict({"store_uri": STORE, "data_uri": DATA, "ranker_eval_days": value})


def test_default_config_params_hash_is_pinned():
    """Version ids of published bundles depend on it: the defaults must not drift.

    Changed on purpose four times: when the ranking core's fixed numbers became ``ranker_*`` settings,
    when ``data_uri`` lost its default (``sample``): a run names its data, here a folder; when the
    text-aware sequence model (``seq_*``, ``ranker_seq_candidates``) joined the ranker; and when it
    got ``seq_delta_dropout`` and ``seq_mask_unseen`` (off by default)."""
    assert RunConfig(data_uri=DATA, store_uri=STORE).params_hash() == "b73dfbbb95"
    cfg = RunConfig.from_dict({"data_uri": DATA, "store_uri": STORE, "cutoff": "2026-01-02T00:00:00Z"})
    assert cfg.params_hash() == "618c439e8c"


def test_dataclass_fields_and_defaults_are_the_table():
    for section, cls in SECTION_CLASSES.items():
        table = settings.section_settings(section)
        assert [(f.name, f.default) for f in dataclasses.fields(cls)] == [(s.name, s.default) for s in table]
    run = {f.name: f.default for f in dataclasses.fields(RunConfig)}
    assert {s.name: s.default for s in settings.section_settings("run")}.items() <= run.items()


def test_every_setting_is_one_form_param_or_one_object_property():
    params = settings.form_params()
    flat = [k for k in params if k not in settings.OBJECT_PARAMS]
    props = [f"{k}_{p}" for k in settings.OBJECT_PARAMS for p in params[k]["properties"]]
    assert sorted(flat + props) == sorted(settings.SETTINGS)
    assert params["index_kind"]["enum"] == ["auto", "flat", "hnsw", "ivf", "ivfsq8", "ivfpq"]
    assert params["ranker_max_users_per_window"]["minimum"] == 1
    assert params["store_uri"]["type"] == ["null", "string"] and params["store_uri"]["default"] is None


def test_run_level_settings_need_a_form_section():
    with pytest.raises(ConfigError, match="must name its form_section"):
        settings.Setting("new_run_level", int, 1, "New", "A run-level setting.")


# --- CLI --set ------------------------------------------------------------------------------------


def cli_config(*sets: str) -> RunConfig:
    args = cli.build_parser().parse_args(
        ["validate", "--data", DATA, "--store", STORE, *(a for s in sets for a in ("--set", s))]
    )
    return cli._config(args)


def test_set_parses_text_to_the_settings_types():
    cfg = cli_config(
        "encoder_max_length=64",
        "ranker_learning_rate=0.1",
        "promote=false",
        "validation_duplicates_mostly=0.9",
        "validation-data-docs=no",
    )
    assert cfg.encoder.max_length == 64 and cfg.ranker.learning_rate == pytest.approx(0.1)
    assert cfg.promote is False
    assert cfg.validation.duplicates_mostly == pytest.approx(0.9) and cfg.validation.data_docs is False


@pytest.mark.parametrize(
    "text, value",
    [
        ("ranker_learning_rate=2", 2),
        ("ranker_learning_rate=fast", "fast"),
        ("encoder_max_length=4", 4),
        ("encoder_max_length=64.5", 64.5),
        ("index_kind=annoy", "annoy"),
        ("namespace=../prod", "../prod"),
        ("validation_ids_mostly=1.5", 1.5),
    ],
)
def test_set_refuses_bad_values_with_the_configs_message(text, value):
    key = text.partition("=")[0]
    with pytest.raises(ConfigError) as from_config:
        RunConfig.from_dict({"store_uri": STORE, "data_uri": DATA, key: value})
    with pytest.raises(ConfigError) as from_cli:
        cli_config(text)
    assert str(from_cli.value) == str(from_config.value)


def test_set_refuses_non_boolean_text_for_a_boolean():
    with pytest.raises(ConfigError, match="promote must be true or false, got 'maybe'"):
        cli_config("promote=maybe")


def test_set_unknown_key_names_the_closest_known_keys():
    with pytest.raises(ConfigError, match=r"'ranker_learnig_rate' \(did you mean ranker_learning_rate"):
        cli_config("ranker_learnig_rate=0.1")
