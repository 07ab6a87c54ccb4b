"""Parse each DAG file the way the dag-processor does, in a fresh process, and report per file:
seconds taken, heavy modules it imported, and any connection/Variable/network access attempted.

Run by tests/dags/test_dag_integrity.py: ``python parse_probe.py FILE...`` prints one JSON object.
Airflow itself is imported (and warmed) before the clock starts: the dag-processor has it loaded.
"""

from __future__ import annotations

import json
import socket
import sys
import time

HEAVY = (
    "pandas",
    "numpy",
    "pyarrow",
    "torch",
    "transformers",
    "sentence_transformers",
    "faiss",
    "lightgbm",
    "sklearn",
    "great_expectations",
    "boto3",
    "botocore",
    "onnxruntime",
    "matplotlib",
)

from airflow.dag_processing.dagbag import DagBag  # noqa: E402  (warm Airflow first)
from airflow.sdk import Asset, Param, dag, task  # noqa: E402, F401

# Airflow's providers manager loads every provider's asset URI handlers on the first Asset (the
# amazon one imports boto3): the dag-processor has done that long before parsing our files.
Asset(name="warm-up", uri="warm-up://asset/probe")

attempts: list[str] = []


def _refuse(what: str):
    def refuse(*args, **kwargs):
        attempts.append(what)
        raise RuntimeError(f"{what} at DAG parse time")

    return refuse


def block_side_effects() -> None:
    import airflow.sdk
    from airflow.sdk import BaseHook, Variable

    socket.socket.connect = _refuse("network connect")  # type: ignore[method-assign]
    socket.create_connection = _refuse("network connect")  # type: ignore[assignment]
    BaseHook.get_connection = classmethod(_refuse("connection lookup"))  # type: ignore[method-assign]
    Variable.get = staticmethod(_refuse("Variable.get"))  # type: ignore[method-assign]
    airflow.sdk.Variable.get = Variable.get
    try:
        from airflow.models import variable as core_variable

        core_variable.Variable.get = classmethod(_refuse("Variable.get"))  # type: ignore[method-assign]
    except ImportError:
        pass


def main(files: list[str]) -> None:
    block_side_effects()
    report = {}
    for path in files:
        before = set(sys.modules)
        attempts.clear()
        started = time.perf_counter()
        bag = DagBag(dag_folder=path)
        seconds = time.perf_counter() - started
        new = set(sys.modules) - before
        report[path] = {
            "seconds": seconds,
            "dag_ids": sorted(bag.dag_ids),
            "import_errors": {k: str(v) for k, v in bag.import_errors.items()},
            "heavy_modules": sorted(m for m in new if m.split(".")[0] in HEAVY),
            "side_effects": sorted(set(attempts)),
        }
    print(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1:])
