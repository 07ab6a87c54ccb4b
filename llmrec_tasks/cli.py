"""The `llmrec` command: every stage and the whole pipeline without Airflow, plus bundle operations."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shlex
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TextIO

from llmrec_tasks.airflow_glue import STORE_ENV
from llmrec_tasks.core.constants import DEFAULT_NAMESPACE, REPORT_HTML
from llmrec_tasks.core.errors import LlmrecError
from llmrec_tasks.core.settings import DATA_ENV, REDIS_URL_ENV, SAMPLE_DATA, feedback_env

WORKERS_ENV = "LLMREC_SERVING_WORKERS"  # `llmrec serve --workers` default
_FEEDBACK_DIR_HELP = f"default ${feedback_env('feedback_log_dir')} or ./llmrec-feedback"
DEFAULT_STORE = os.environ.get(STORE_ENV, Path("llmrec-store").resolve().as_uri())


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data",
        default=os.environ.get(DATA_ENV),
        help=f"input folder/URI or MovieLens folder; required unless ${DATA_ENV} is set. "
        f"'{SAMPLE_DATA}' (generated demo data) only with a --namespace other than {DEFAULT_NAMESPACE}",
    )
    parser.add_argument("--store", default=DEFAULT_STORE, help="file:///path or s3://bucket/prefix")
    parser.add_argument("--namespace", default=DEFAULT_NAMESPACE)
    parser.add_argument("--cutoff", default=None, help="ISO datetime: ignore interactions after it")
    parser.add_argument("--no-promote", action="store_true", help="publish without moving current")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any setting by its flat name (llmrec_tasks/core/settings.py), e.g. encoder_model=/models/e5, "
        "ranker_learning_rate=0.1 or validation_duplicates_mostly=0.95; checked like the DAG's params",
    )


def _config(args: argparse.Namespace) -> Any:
    from llmrec_tasks.core.config import RunConfig
    from llmrec_tasks.core.errors import ConfigError
    from llmrec_tasks.core.settings import parse_text

    values: dict[str, Any] = {
        "data_uri": args.data,
        "store_uri": args.store,
        "namespace": args.namespace,
        "cutoff": args.cutoff,
        "promote": not args.no_promote,
    }
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
        key = key.strip().replace("-", "_")
        values[key] = parse_text(key, value)
    return RunConfig.from_dict(values)


BENCHMARK_SECTIONS = ("encoder", "ranker", "sasrec", "seq")


def _benchmark_configs(sets: list[str]) -> dict[str, Any]:
    """``run_benchmark``'s ``encoder_cfg``, ``ranker_cfg``, ``sasrec_cfg``, ``seq_cfg`` and
    ``newitems_cfg`` from ``--set`` items; SASRec enabled unless set otherwise."""
    from llmrec_tasks.core.config import EncoderConfig, NewItemsConfig, RankerConfig, SasrecConfig, SeqConfig
    from llmrec_tasks.core.errors import ConfigError
    from llmrec_tasks.core.settings import NEWITEMS_PREFIX, NEWITEMS_SETTINGS, parse_text, setting

    values: dict[str, dict[str, Any]] = {name: {} for name in BENCHMARK_SECTIONS}
    values["sasrec"]["enabled"] = True
    newitems: dict[str, Any] = {}
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
        key = key.strip().replace("-", "_")
        if key in NEWITEMS_SETTINGS:
            newitems[key.removeprefix(NEWITEMS_PREFIX)] = NEWITEMS_SETTINGS[key].parse_text(value)
            continue
        s = setting(key)
        if s.section not in values:
            raise ConfigError(
                f"--set {key}: the benchmark takes {', '.join(BENCHMARK_SECTIONS)} and newitems settings only"
            )
        values[s.section][s.name] = parse_text(key, value)
    return {
        "encoder_cfg": EncoderConfig(**values["encoder"]),
        "ranker_cfg": RankerConfig(**values["ranker"]),
        "sasrec_cfg": SasrecConfig(**values["sasrec"]),
        "seq_cfg": SeqConfig(**values["seq"]),
        "newitems_cfg": NewItemsConfig(**newitems),
    }


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _shard(text: str) -> tuple[int, int]:
    """``i/n``: this machine scores shard i of every n (0 <= i < n)."""
    index, sep, count = text.partition("/")
    try:
        i, n = int(index), int(count)
    except ValueError:
        i, n = -1, 0
    if not sep or n < 1 or not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"expected i/n with 0 <= i < n (e.g. 0/4), got {text!r}")
    return i, n


def _setting_arg(key: str) -> Callable[[str], Any]:
    """An argparse type that checks a value like the batch DAG's param ``key``."""
    from llmrec_tasks.core.errors import ConfigError
    from llmrec_tasks.core.settings import BATCH_SETTINGS

    def parse(text: str) -> Any:
        try:
            return BATCH_SETTINGS[key].parse_text(text)
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from exc

    return parse


def _store_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", default=DEFAULT_STORE, help="file:///path or s3://bucket/prefix")
    parser.add_argument("--namespace", default=DEFAULT_NAMESPACE)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmrec", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    _config_args(sub.add_parser("run", help="run every stage: validate, embed, index, train, publish"))
    _config_args(sub.add_parser("validate", help="validate the input and write the run's snapshot"))
    for stage in ("embed", "index", "train", "publish"):
        p = sub.add_parser(stage, help=f"run the {stage} stage of a validated run")
        p.add_argument("--work", required=True, help="the run's work folder URI (printed by validate)")

    bench = sub.add_parser("benchmark", help="ranking quality benchmark (models and baselines)")
    bench.add_argument("--data", required=True, help="input folder/URI, MovieLens folder, or 'sample'")
    bench.add_argument(
        "--protocol",
        choices=["loo", "time", "new-items"],
        default="loo",
        help="loo (leave-one-out), time (the daily run's windows) or new-items (loo without the newest "
        "items' events: they are recommended from their text; newitems_* settings)",
    )
    bench.add_argument("--seeds", type=int, default=5)
    bench.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    bench.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an encoder_*, ranker_*, sasrec_*, seq_* or newitems_* setting, e.g. sasrec_device=cuda, "
        "sasrec_enabled=false or newitems_fraction=0.2 "
        "(SASRec is on by default here)",
    )

    _store_args(sub.add_parser("versions", help="list published versions (current marked)"))
    show = sub.add_parser("show", help="print a version's manifest")
    _store_args(show)
    show.add_argument("version")
    promote = sub.add_parser("promote", help="move current to VERSION (after the serving check)")
    _store_args(promote)
    promote.add_argument("version")
    _store_args(sub.add_parser("rollback", help="move current back to the previous current"))
    experiment = sub.add_parser("experiment", help="A/B: serve a challenger version to a share of users")
    actions = experiment.add_subparsers(dest="action", required=True)
    start = actions.add_parser("start", help="start (or replace) the namespace's experiment")
    _store_args(start)
    start.add_argument("name", help="the experiment's name (the default salt)")
    start.add_argument("challenger", help="a published version other than current")
    start.add_argument(
        "--share", type=float, required=True, help="fraction of users in [0, 1] on the challenger"
    )
    start.add_argument("--salt", default=None, help="hash salt of the assignment (default: the name)")
    _store_args(actions.add_parser("stop", help="end the experiment: every user back on current"))
    _store_args(actions.add_parser("show", help="print the running experiment (null when none)"))
    gc = sub.add_parser("gc", help="delete old bundles, keeping the newest N and every referenced one")
    _store_args(gc)
    gc.add_argument("--keep", type=int, required=True)
    _store_args(sub.add_parser("summary", help="the newest bundle: manifest URI, promotion, metrics table"))
    serve = sub.add_parser("serve", help="HTTP recommendation service over the current bundle")
    _store_args(serve)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument(
        "--workers",
        type=_positive_int,
        default=os.environ.get(WORKERS_ENV, "1"),
        help=f"uvicorn worker processes, each loading the bundle (default ${WORKERS_ENV} or 1)",
    )
    serve.add_argument(
        "--poll-seconds", type=float, default=5.0, help="how often each worker reads current.json"
    )
    serve.add_argument(
        "--redis-url",
        default=None,
        help=f"real-time feedback state (default ${REDIS_URL_ENV}; none: embedded, per worker)",
    )
    serve.add_argument(
        "--feedback-dir", default=None, help=f"feedback write-ahead log folder ({_FEEDBACK_DIR_HELP})"
    )
    flush = sub.add_parser(
        "flush-events", help="move the service's closed feedback log segments into the store as Parquet"
    )
    _store_args(flush)
    flush.add_argument(
        "--feedback-dir", default=None, help=f"the service's feedback log folder ({_FEEDBACK_DIR_HELP})"
    )
    online = sub.add_parser(
        "online-metrics", help="CTR@k, conversion, coverage per day x version x arm from flushed feedback"
    )
    _store_args(online)
    online.add_argument("--start", required=True, help="first day of impressions (YYYY-MM-DD, UTC)")
    online.add_argument("--end", required=True, help="last day of impressions (YYYY-MM-DD, inclusive)")
    online.add_argument("--k", type=_positive_int, default=10, help="positions counted for CTR@k")
    online.add_argument(
        "--window-hours", type=float, default=24.0, help="attribution window after an impression"
    )
    score = sub.add_parser(
        "score-batch", help="score all (or listed) users with a bundle into Parquet parts in the store"
    )
    _store_args(score)
    score.add_argument("--version", default=None, help="bundle version (default: current, read once)")
    score.add_argument(
        "--users",
        default="all",
        help="'all' (every user with a published history) or a file/URI: one user id per line, or "
        "Parquet with a user_id column",
    )
    score.add_argument("--k", type=_setting_arg("k"), default=100, help="items per user")
    score.add_argument(
        "--out",
        default=None,
        help="output folder: a key prefix in --store or a URI (default <namespace>/scores/<version>)",
    )
    score.add_argument(
        "--users-per-shard", type=_setting_arg("batch_users_per_shard"), default=50_000, help="users per part"
    )
    score.add_argument(
        "--shard",
        type=_shard,
        default=None,
        metavar="I/N",
        help="score only shards i, i+n, ... (one of n machines); the last machine to finish finalizes",
    )
    sample = sub.add_parser("sample", help="write the generated demo dataset as contract CSVs")
    sample.add_argument("folder", type=Path)
    sample.add_argument("--seed", type=int, default=7)
    progress = sub.add_parser(
        "demo-progress",
        help="filter `airflow dags test` output (stdin): one line per task, the full log to --log",
    )
    progress.add_argument("--log", type=Path, required=True, help="where the full output is written")
    _store_args(
        sub.add_parser("next-steps", help="after `make demo`: open the report, see it in Airflow, serve")
    )
    return parser


def _bundle_command(args: argparse.Namespace) -> Any:
    from llmrec_tasks import publish
    from llmrec_tasks.storage import registry

    if args.command == "versions":
        return registry.list_versions(args.store, args.namespace)
    if args.command == "show":
        return registry.show(args.store, args.namespace, args.version)
    if args.command == "promote":
        return publish.promote(args.store, args.namespace, args.version)
    if args.command == "rollback":
        return publish.rollback(args.store, args.namespace)
    if args.command == "experiment":
        if args.action == "start":
            return registry.start_experiment(
                args.store, args.namespace, args.name, args.challenger, args.share, args.salt
            )
        if args.action == "stop":
            return registry.stop_experiment(args.store, args.namespace)
        return {
            "namespace": args.namespace,
            "experiment": registry.read_experiment(args.store, args.namespace),
        }
    return registry.gc(args.store, args.namespace, args.keep)


def _newest_bundle(store_uri: str, namespace: str) -> dict[str, Any]:
    """The newest complete published version (``registry.list_versions`` row); BundleError if none."""
    from llmrec_tasks.core.errors import BundleError
    from llmrec_tasks.storage import registry

    versions = [v for v in registry.list_versions(store_uri, namespace) if v["complete"]]
    if not versions:
        raise BundleError(f"no complete bundle in {store_uri} namespace {namespace!r}")
    return max(versions, key=lambda v: (v["logical_date"], v["created_at"]))


def summary_text(store_uri: str, namespace: str) -> str:
    """Human summary of the newest published version: where it is, whether it is current, metrics."""
    from llmrec_tasks.storage import registry
    from llmrec_tasks.storage.store import open_store

    newest = _newest_bundle(store_uri, namespace)
    store = open_store(store_uri)
    version = newest["version"]
    manifest = registry.read_manifest(store, namespace, version)
    lines = [
        f"bundle:   {store.uri_for(registry.bundle_prefix(namespace, version))}",
        f"manifest: {store.uri_for(registry.manifest_key(namespace, version))}",
        f"report:   {store.uri_for(registry.bundle_key(namespace, version, REPORT_HTML))}",
        f"current:  {'yes' if newest['current'] else 'no'} (namespace {namespace})",
        "",
        f"{'model':<24}{'NDCG@10':>10}{'Recall@10':>11}",
    ]
    for model, values in manifest.get("metrics", {}).items():
        if isinstance(values, dict) and "ndcg@10" in values:
            lines.append(f"{model:<24}{values['ndcg@10']:>10.4f}{values['recall@10']:>11.4f}")
    return "\n".join(lines)


# The environment `airflow standalone` needs to show the demo's run and store (the Makefile's).
AIRFLOW_DEMO_ENV = (
    "AIRFLOW_HOME",
    "AIRFLOW__CORE__DAGS_FOLDER",
    "AIRFLOW__CORE__PLUGINS_FOLDER",
    "AIRFLOW__CORE__LOAD_EXAMPLES",
    "HF_HUB_OFFLINE",
)


def next_steps_text(store_uri: str, namespace: str, env: Mapping[str, str] | None = None) -> str:
    """What to do after ``make demo``: open the new bundle's HTML report, see the run in Airflow's
    UI (same home, metadata DB and store as the demo), serve the bundle."""
    from llmrec_tasks.core.errors import BundleError
    from llmrec_tasks.storage import registry
    from llmrec_tasks.storage.store import open_store

    env = os.environ if env is None else env
    newest = _newest_bundle(store_uri, namespace)
    store = open_store(store_uri)
    report_key = registry.bundle_key(namespace, newest["version"], REPORT_HTML)
    if not store.exists(report_key):
        raise BundleError(f"bundle {newest['version']} has no {REPORT_HTML} in {store_uri}")
    bin_dir = Path(sys.executable).parent
    airflow_env = [f"{key}={shlex.quote(env[key])}" for key in AIRFLOW_DEMO_ENV if key in env]
    airflow = [*airflow_env, f"{STORE_ENV}={shlex.quote(store_uri)}", str(bin_dir / "airflow"), "standalone"]
    where = f"--store {shlex.quote(store_uri)} --namespace {namespace}"
    lines = [
        "next steps",
        f"  1. open the report: {store.uri_for(report_key)}",
        "  2. see the run in Airflow: start it with the demo's settings, open http://localhost:8080",
        "     (Browse > llmrec runs; `standalone` prints the admin password):",
        f"       {' '.join(airflow)}",
    ]
    if not newest["current"]:
        lines += [
            f"  3. {newest['version']} is not current: promote it, then serve it:",
            f"       {bin_dir / 'llmrec'} promote {newest['version']} {where}",
        ]
    else:
        lines.append("  3. serve it (GET /recommendations/{user_id}?k=10, POST /recommendations):")
    lines.append(f"       {bin_dir / 'llmrec'} serve {where}")
    return "\n".join(lines)


# `airflow dags test` (dag.test) logs these around every task instance it runs.
_TASK_START = re.compile(r"\[DAG TEST\] starting task_id=(?P<task>\S+) map_index=(?P<index>-?\d+)")
_TASK_END = re.compile(r"\[DAG TEST\] end task task_id=(?P<task>\S+) map_index=(?P<index>-?\d+)")
_TASK_STATE = re.compile(r"Task instance state updated.* new_state=(?P<state>\w+)")
_RUN_STATE = re.compile(r"Marking run <DagRun .*> (?P<state>successful|failed)")
TAIL_LINES = 60


def _clock_text(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes:2d}:{secs:02d}"


def demo_progress(
    lines: Iterable[str], log: TextIO, out: TextIO, clock: Callable[[], float] = time.monotonic
) -> bool:
    """Copy ``airflow dags test`` output to ``log`` and print one line per task as it starts and
    ends, with the elapsed time; on failure print the log's tail. True when the DAG run succeeded."""
    started = clock()
    task_started: dict[str, float] = {}
    state: str | None = None
    run_state: str | None = None
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    for line in lines:
        log.write(line)
        tail.append(line)
        now = clock()
        if match := _TASK_START.search(line):
            name = _task_name(match)
            task_started[name], state = now, None
            print(f"  [{_clock_text(now - started)}] {name:<18} started", file=out, flush=True)
        elif match := _TASK_END.search(line):
            name = _task_name(match)
            took = now - task_started.pop(name, now)
            print(
                f"  [{_clock_text(now - started)}] {name:<18} {state or 'ended'} in {took:.1f}s",
                file=out,
                flush=True,
            )
        elif match := _TASK_STATE.search(line):
            state = match["state"]
        elif match := _RUN_STATE.search(line):
            run_state = match["state"]
    log.flush()
    if run_state == "successful":
        print(f"  [{_clock_text(clock() - started)}] DAG run succeeded", file=out)
        return True
    print(f"the DAG run {run_state or 'did not finish'}; the last {len(tail)} lines of its log:", file=out)
    out.writelines(tail)
    print(f"full log: {getattr(log, 'name', log)}", file=out, flush=True)
    return False


def score_batch_text(args: argparse.Namespace) -> str:
    """Run ``score-batch``; its one-line summary."""
    from llmrec_tasks.serving.batch import score_batch

    summary = score_batch(
        args.store,
        args.namespace,
        version=args.version,
        users_uri=None if args.users == "all" else args.users,
        k=args.k,
        users_per_shard=args.users_per_shard,
        out=args.out,
        shard_filter=args.shard,
    )
    done = (
        "done"
        if summary["finalized"]
        else f"waiting for shard(s) {', '.join(map(str, summary['waiting_for_shards']))} before the manifest"
    )
    unknown = f", {summary['unknown_users']} unknown (cold)" if summary["unknown_users"] else ""
    return (
        f"scored {summary['users']} users{unknown} of {args.namespace}/{summary['version']} into "
        f"{summary['parts']} part(s) at {summary['users_per_second']:.0f} users/s -> {summary['out_uri']} ({done})"
    )


def _task_name(match: re.Match[str]) -> str:
    """``task`` or ``task[i]`` for a mapped task instance."""
    return match["task"] if match["index"] == "-1" else f"{match['task']}[{match['index']}]"


def dispatch(args: argparse.Namespace) -> Any:
    """Run one command; returns what is printed as JSON (None prints nothing)."""
    from llmrec_tasks import pipeline

    if args.command == "run":
        results = pipeline.run_pipeline(_config(args))
        return {"publish": results["publish"].to_json(), "metrics": results["train"].metrics}
    if args.command == "validate":
        return pipeline.run_stage("validate", _config(args)).to_json()
    if args.command in ("embed", "index", "train", "publish"):
        return pipeline.run_stage(args.command, pipeline.load_run_config(args.work), args.work).to_json()
    if args.command == "benchmark":
        from llmrec_tasks.ranking.benchmark import print_table, run_benchmark

        configs = _benchmark_configs(args.set)
        result = run_benchmark(args.data, protocol=args.protocol, seeds=args.seeds, out=args.out, **configs)
        print_table(result)
        return None
    if args.command in ("versions", "show", "promote", "rollback", "experiment", "gc"):
        return _bundle_command(args)
    if args.command == "summary":
        print(summary_text(args.store, args.namespace))
        return None
    if args.command == "serve":
        from llmrec_tasks.serving.api import serve

        serve(
            args.store,
            args.namespace,
            args.host,
            args.port,
            workers=args.workers,
            poll_seconds=args.poll_seconds,
            redis_url=args.redis_url,
            feedback_dir=args.feedback_dir,
        )
        return None
    if args.command == "flush-events":
        from llmrec_tasks.core.config import FeedbackConfig
        from llmrec_tasks.feedback import flush_events

        log_dir = FeedbackConfig.from_env(log_dir=args.feedback_dir).log_dir
        return flush_events(args.store, args.namespace, log_dir).to_json()
    if args.command == "online-metrics":
        from llmrec_tasks.online import run_online_metrics

        return run_online_metrics(
            args.store, args.namespace, args.start, args.end, k=args.k, window_hours=args.window_hours
        ).to_json()
    if args.command == "demo-progress":
        with args.log.open("w") as log:
            if not demo_progress(sys.stdin, log, sys.stdout):
                raise LlmrecError(f"the demo's DAG run failed: see {args.log}")
        return None
    if args.command == "next-steps":
        print(next_steps_text(args.store, args.namespace))
        return None
    if args.command == "score-batch":
        print(score_batch_text(args))
        return None
    if args.command == "sample":
        from llmrec_tasks.data.sample import write_sample

        return {"folder": str(write_sample(args.folder, seed=args.seed))}
    raise AssertionError(f"unhandled command {args.command}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        result = dispatch(args)
    except LlmrecError as exc:
        print(f"llmrec {args.command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    if result is not None:
        print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
