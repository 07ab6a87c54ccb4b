"""The `llmrec` command: every stage and the whole pipeline without Airflow, plus bundle operations."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from llmrec_tasks.core.constants import DEFAULT_NAMESPACE, REPORT_HTML
from llmrec_tasks.core.errors import LlmrecError

DEFAULT_STORE = os.environ.get("LLMREC_STORE_URI", Path("llmrec-store").resolve().as_uri())


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default="sample", help="input folder/URI, MovieLens folder, or 'sample'")
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
    bench.add_argument("--protocol", choices=["loo", "time"], default="loo")
    bench.add_argument("--seeds", type=int, default=5)
    bench.add_argument("--out", type=Path, default=None, help="write the results as JSON here")

    _store_args(sub.add_parser("versions", help="list published versions (current marked)"))
    show = sub.add_parser("show", help="print a version's manifest")
    _store_args(show)
    show.add_argument("version")
    promote = sub.add_parser("promote", help="move current to VERSION (after the serving check)")
    _store_args(promote)
    promote.add_argument("version")
    _store_args(sub.add_parser("rollback", help="move current back to the previous current"))
    gc = sub.add_parser("gc", help="delete old bundles, keeping the newest N and every referenced one")
    _store_args(gc)
    gc.add_argument("--keep", type=int, required=True)
    _store_args(sub.add_parser("summary", help="the newest bundle: manifest URI, promotion, metrics table"))
    serve = sub.add_parser("serve", help="HTTP recommendation service over the current bundle")
    _store_args(serve)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    sample = sub.add_parser("sample", help="write the generated demo dataset as contract CSVs")
    sample.add_argument("folder", type=Path)
    sample.add_argument("--seed", type=int, default=7)
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
    return registry.gc(args.store, args.namespace, args.keep)


def summary_text(store_uri: str, namespace: str) -> str:
    """Human summary of the newest published version: where it is, whether it is current, metrics."""
    from llmrec_tasks.core.errors import BundleError
    from llmrec_tasks.storage import registry
    from llmrec_tasks.storage.store import open_store

    versions = [v for v in registry.list_versions(store_uri, namespace) if v["complete"]]
    if not versions:
        raise BundleError(f"no complete bundle in {store_uri} namespace {namespace!r}")
    newest = max(versions, key=lambda v: (v["logical_date"], v["created_at"]))
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

        result = run_benchmark(args.data, protocol=args.protocol, seeds=args.seeds, out=args.out)
        print_table(result)
        return None
    if args.command in ("versions", "show", "promote", "rollback", "gc"):
        return _bundle_command(args)
    if args.command == "summary":
        print(summary_text(args.store, args.namespace))
        return None
    if args.command == "serve":
        from llmrec_tasks.serving.api import serve

        serve(args.store, args.namespace, args.host, args.port)
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
