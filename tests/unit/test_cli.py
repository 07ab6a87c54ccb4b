import io
import itertools
import json
import sys
from pathlib import Path

import pytest

from llmrec_tasks import cli, publish
from llmrec_tasks.cli import build_parser, main
from tests.bundle_factory import make_run

# `airflow dags test llmrec_daily` output captured from `make demo` (trimmed): a run that succeeded
# and one refused at `config` (no data source).
LOGS = Path(__file__).with_name("demo_logs")
TASKS = ["config", "validate", "plan_shards", "embed_shard[0]", "merge_shards", "index", "train", "publish"]


def ticking_clock():
    """One second per call: the filter reads the clock once at start and once per line."""
    ticks = itertools.count()
    return lambda: float(next(ticks))


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
        "score-batch",
        "experiment",
        "online-metrics",
    ):
        assert name in commands


def test_experiment_commands_and_their_errors(tmp_path, capsys):
    store = tmp_path.as_uri()
    assert main(["experiment", "show", "--store", store]) == 0
    assert '"experiment": null' in capsys.readouterr().out
    code = main(
        [
            "experiment",
            "start",
            "exp1",
            "20240101T000000Z-abcdef12-123456",
            "--share",
            "0.2",
            "--store",
            store,
        ]
    )
    assert code == 2 and "is not published" in capsys.readouterr().err
    assert main(["experiment", "stop", "--store", store]) == 0
    assert "no experiment running" in capsys.readouterr().out


def test_online_metrics_command_on_an_empty_store(tmp_path, capsys):
    args = ["online-metrics", "--store", tmp_path.as_uri(), "--start", "2024-01-01", "--end", "2024-01-02"]
    assert main(args) == 0
    assert '"rows": []' in capsys.readouterr().out


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


def test_run_exits_non_zero_when_the_bundle_failed_the_quality_gate(tmp_path, capsys, monkeypatch):
    """`llmrec run` is red like the DAG's gate task: published, not promoted, exit 2 with the way out."""
    from llmrec_tasks import pipeline
    from llmrec_tasks.core.results import Published
    from tests.stage_results import validated_for

    gate = {
        "passed": False,
        "reason": "ranker ndcg@10 0.1000 does not beat popularity 0.2000",
        "tolerance": 0.02,
        "ranker": {"ndcg@10": 0.1, "recall@10": 0.2},
        "popularity": {"ndcg@10": 0.2},
        "current_version": None,
        "current": {},
    }
    failed = Published(
        version="20261002T000000Z-abcdef12-123456",
        namespace="demo",
        bundle_uri="file:///s/demo/bundles/v",
        manifest_uri="file:///s/demo/bundles/v/manifest.json",
        status="published",
        check={"queries": 3},
        promoted=False,
        reason=f"quality gate: {gate['reason']}",
        metrics={"ranker": {"ndcg@10": 0.1}, "popularity": {"ndcg@10": 0.2}},
        gate=gate,
    )
    stages = []

    def run_stage(stage, cfg, work_uri=None):
        stages.append(stage)
        return failed if stage == "publish" else validated_for((tmp_path / "work").as_uri())

    monkeypatch.setattr(pipeline, "run_stage", run_stage)
    assert main(["run", "--data", "sample", "--namespace", "demo", "--store", tmp_path.as_uri()]) == 2
    assert stages == list(pipeline.STAGES)
    err = capsys.readouterr().err
    assert "QualityGateError" in err and "NOT promoted" in err and gate["reason"] in err
    assert f"llmrec promote --store {tmp_path.as_uri()}" in err


def test_unknown_command_is_a_usage_error():
    with pytest.raises(SystemExit):
        main(["frobnicate"])


@pytest.mark.parametrize("command", ["run", "validate"])
def test_run_and_validate_need_a_data_source(command, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("LLMREC_DATA_URI", raising=False)
    assert main([command, "--store", tmp_path.as_uri()]) == 2
    err = capsys.readouterr().err
    assert "no data source configured" in err and "--data" in err and "`make demo`" in err
    assert not (tmp_path / "production").exists()  # refused before anything is written


def test_data_source_from_the_environment_and_the_flag_wins(monkeypatch):
    monkeypatch.setenv("LLMREC_DATA_URI", "/data/env")
    assert build_parser().parse_args(["validate"]).data == "/data/env"
    assert build_parser().parse_args(["run", "--data", "/data/flag"]).data == "/data/flag"


def test_the_sample_is_refused_in_production_from_the_cli_too(tmp_path, capsys):
    assert main(["validate", "--data", "sample", "--store", tmp_path.as_uri()]) == 2
    err = capsys.readouterr().err
    assert "data `sample` is the generated demo data" in err and "namespace, e.g. `demo`" in err
    assert not (tmp_path / "production").exists()


def test_demo_progress_prints_each_task_as_it_starts_and_ends_and_keeps_the_full_log():
    text = (LOGS / "dags-test-success.log").read_text()
    log, out = io.StringIO(), io.StringIO()
    assert cli.demo_progress(text.splitlines(keepends=True), log, out, clock=ticking_clock()) is True
    assert log.getvalue() == text
    lines = out.getvalue().splitlines()
    assert [line.split()[2] for line in lines if line.endswith(" started")] == TASKS
    assert [line.split()[2] for line in lines if " success in " in line] == TASKS
    # Line 2 of the log starts `config` (clock 2 s), line 8 ends it.
    assert lines[:2] == [
        "  [ 0:02] config             started",
        "  [ 0:08] config             success in 6.0s",
    ]
    assert len(text.splitlines()) == 60 and lines[-1] == "  [ 1:01] DAG run succeeded"
    assert "Done. Returned value" not in out.getvalue()  # the log's noise stays in the log


def test_demo_progress_on_failure_shows_the_failed_task_the_tail_and_where_the_log_is(tmp_path):
    text = (LOGS / "dags-test-failed.log").read_text()
    out = io.StringIO()
    with (tmp_path / "dags-test.log").open("w") as log:
        assert cli.demo_progress(text.splitlines(keepends=True), log, out, clock=ticking_clock()) is False
    printed = out.getvalue()
    assert (tmp_path / "dags-test.log").read_text() == text
    assert "] config             failed in " in printed
    assert f"the DAG run failed; the last {cli.TAIL_LINES} lines of its log:" in printed
    assert "ConfigError: no data source configured" in printed  # the cause, from the tail
    assert printed.rstrip().endswith(f"full log: {tmp_path / 'dags-test.log'}")


def test_demo_progress_without_a_finished_run_is_a_failure():
    """Airflow died before the run ended (import error, killed): not a success."""
    lines = (LOGS / "dags-test-success.log").read_text().splitlines(keepends=True)[:10]
    out = io.StringIO()
    assert cli.demo_progress(lines, io.StringIO(), out, clock=ticking_clock()) is False
    assert "the DAG run did not finish; the last 10 lines" in out.getvalue()


def test_demo_progress_command_exits_non_zero_on_a_failed_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO((LOGS / "dags-test-failed.log").read_text()))
    assert main(["demo-progress", "--log", str(tmp_path / "dags-test.log")]) == 2
    captured = capsys.readouterr()
    assert "config             failed" in captured.out
    assert f"the demo's DAG run failed: see {tmp_path / 'dags-test.log'}" in captured.err


@pytest.mark.usefixtures("toy_ranker_features")
def test_next_steps_name_the_report_airflow_and_serving(store_uri, tmp_path, capsys):
    published = publish.run_publish(*make_run(store_uri, namespace="demo"))
    env = {"AIRFLOW_HOME": str(tmp_path / "airflow home"), "AIRFLOW__CORE__DAGS_FOLDER": "/src/dags"}
    text = cli.next_steps_text(store_uri, "demo", env=env)
    report = next(line.split(": ", 1)[1] for line in text.splitlines() if "open the report" in line)
    assert report.startswith("file://") and report.endswith(f"/demo/bundles/{published.version}/report.html")
    assert Path(report.removeprefix("file://")).is_file()
    assert f"AIRFLOW_HOME='{tmp_path / 'airflow home'}' AIRFLOW__CORE__DAGS_FOLDER=/src/dags" in text
    assert f"LLMREC_STORE_URI={store_uri} " in text and text.count("airflow standalone") == 1
    assert text.splitlines()[-1].endswith(f"llmrec serve --store {store_uri} --namespace demo")
    assert "promote" not in text  # the first bundle is current

    assert main(["next-steps", "--store", store_uri, "--namespace", "exp-none"]) == 2
    assert "no complete bundle" in capsys.readouterr().err


@pytest.mark.usefixtures("toy_ranker_features")
def test_next_steps_say_to_promote_a_bundle_that_is_not_current(store_uri):
    published = publish.run_publish(*make_run(store_uri, namespace="demo", promote=False))
    text = cli.next_steps_text(store_uri, "demo", env={})
    assert f"{published.version} is not current" in text
    assert f"llmrec promote {published.version} --store {store_uri} --namespace demo" in text


def test_serve_workers_default_from_the_environment_and_must_be_positive(monkeypatch, capsys):
    assert build_parser().parse_args(["serve"]).workers == 1
    monkeypatch.setenv(cli.WORKERS_ENV, "3")
    assert build_parser().parse_args(["serve"]).workers == 3
    assert build_parser().parse_args(["serve", "--workers", "2"]).workers == 2
    for bad in ("0", "two"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["serve", "--workers", bad])
        assert "expected a positive integer" in capsys.readouterr().err


def test_serve_command_passes_workers_and_polling(monkeypatch):
    from llmrec_tasks.serving import api

    calls = []
    monkeypatch.setattr(api, "serve", lambda *args, **kwargs: calls.append((args, kwargs)))
    assert (
        main(["serve", "--store", "file:///s", "--namespace", "exp", "--workers", "2", "--poll-seconds", "1"])
        == 0
    )
    defaults = {"redis_url": None, "feedback_dir": None}
    assert calls == [
        (("file:///s", "exp", "127.0.0.1", 8000), {"workers": 2, "poll_seconds": 1.0, **defaults})
    ]
    argv = [
        "serve",
        "--store",
        "file:///s",
        "--redis-url",
        "redis://127.0.0.1:6379/2",
        "--feedback-dir",
        "/tmp/f",
    ]
    assert main(argv) == 0
    assert calls[-1][1] == {
        "workers": 1,
        "poll_seconds": 5.0,
        "redis_url": "redis://127.0.0.1:6379/2",
        "feedback_dir": "/tmp/f",
    }


def test_score_batch_command_scores_a_user_list_and_prints_one_summary_line(store_uri, tmp_path, capsys):
    published = publish.run_publish(*make_run(store_uri, real_features=True))
    users = tmp_path / "users.txt"
    users.write_text("u1\nu2\nghost\n")
    argv = ["score-batch", "--store", store_uri, "--namespace", "production", "--users", str(users)]
    assert main([*argv, "--k", "4", "--out", "exports/today", "--users-per-shard", "2"]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    out_uri = f"{store_uri.rstrip('/')}/exports/today"
    assert line.startswith(
        f"scored 3 users, 1 unknown (cold) of production/{published.version} into 2 part(s) at "
    )
    assert line.endswith(f"users/s -> {out_uri} (done)")
    manifest = json.loads(Path(out_uri.removeprefix("file://"), "_manifest.json").read_text())
    assert (manifest["users"], manifest["rows"], manifest["k"]) == (3, 12, 4)


def test_score_batch_with_a_shard_waits_for_the_other_machines(store_uri, capsys):
    publish.run_publish(*make_run(store_uri, real_features=True))
    argv = ["score-batch", "--store", store_uri, "--users-per-shard", "5", "--k", "2"]
    assert main([*argv, "--shard", "1/2"]) == 0
    assert capsys.readouterr().out.strip().endswith("(waiting for shard(s) 0, 2 before the manifest)")
    assert main([*argv, "--shard", "0/2"]) == 0
    assert capsys.readouterr().out.strip().endswith("(done)")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--shard", "2/2"], "expected i/n with 0 <= i < n"),
        (["--shard", "x"], "expected i/n with 0 <= i < n"),
        (["--k", "0"], "k must be in [1, 10000]"),
        (["--users-per-shard", "-1"], "batch_users_per_shard must be"),
    ],
)
def test_score_batch_refuses_bad_flags(flags, message, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["score-batch", *flags])
    assert message in capsys.readouterr().err


def test_score_batch_without_a_bundle_exits_2_saying_what_to_do(store_uri, capsys):
    assert main(["score-batch", "--store", store_uri, "--namespace", "exp-none"]) == 2
    assert "has no current bundle: publish and promote one first" in capsys.readouterr().err


def test_flush_events_command_moves_the_log_into_the_store(store_uri, tmp_path, capsys):
    from llmrec_tasks.serving.feedback_log import EVENTS_KIND, FeedbackLog, encode_record
    from llmrec_tasks.serving.realtime import FeedbackEvent

    log = FeedbackLog(tmp_path / "log", segment_bytes=1 << 20, segment_seconds=3600)
    row = FeedbackEvent("e1", "u1", "i1", 1.7e9, 1.0, "click", None).row(1.7e9)
    log.append(encode_record(EVENTS_KIND, [row])).result(timeout=10)
    log.close()
    assert main(["flush-events", "--store", store_uri, "--feedback-dir", str(tmp_path / "log")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["segments"] == 1 and printed["events"] == 1
    assert (
        printed["objects"][0].endswith(".parquet")
        and "/feedback/events/day=2023-11-14/" in printed["objects"][0]
    )
