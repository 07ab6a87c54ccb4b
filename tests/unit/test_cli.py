import json

import pytest

from llmrec_tasks.cli import build_parser, main


def test_every_stage_and_operation_has_a_command():
    commands = build_parser()._subparsers._group_actions[0].choices
    for name in (
        "run",
        "validate",
        "embed",
        "index",
        "train",
        "publish",
        "benchmark",
        "versions",
        "show",
        "promote",
        "rollback",
        "gc",
        "serve",
        "sample",
    ):
        assert name in commands


def test_sample_command_writes_contract_csvs(tmp_path, capsys):
    assert main(["sample", str(tmp_path / "data")]) == 0
    assert json.loads(capsys.readouterr().out)["folder"].endswith("data")
    assert (tmp_path / "data/items.csv").read_text().startswith("item_id,title,text,categories")


def test_domain_errors_exit_2_with_a_message(tmp_path, capsys):
    code = main(["validate", "--data", "sample", "--store", tmp_path.as_uri(), "--namespace", "../x"])
    assert code == 2
    assert "invalid namespace" in capsys.readouterr().err


def test_bad_set_syntax_is_refused(tmp_path, capsys):
    assert main(["run", "--store", tmp_path.as_uri(), "--set", "encoder_model"]) == 2
    assert "expected KEY=VALUE" in capsys.readouterr().err


def test_stage_without_validated_run_says_what_to_do(tmp_path, capsys):
    assert main(["train", "--work", (tmp_path / "nowhere").as_uri()]) == 2
    assert "is it a run's work folder" in capsys.readouterr().err


def test_unknown_command_is_a_usage_error():
    with pytest.raises(SystemExit):
        main(["frobnicate"])
