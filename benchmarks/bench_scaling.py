"""Scaling benchmark: the pipeline's stages on generated catalogs of growing size, with the time and
peak memory of each stage, so that what grows faster than the catalog is visible.

Each stage runs through :func:`llmrec_tasks.pipeline.run_stage` (what the CLI and the DAG's tasks
call) in a fresh process of its own (an Airflow task is one), so its peak RSS is its own; module
imports happen before the clock starts (a constant, not growth).

Encoding is the one part not run for real above ``--encode-real-max`` items: the real encoder's
items/s is measured on texts of the same catalog in this run, the encode time is extrapolated
from it (marked ``extrapolated``), and the stage runs with a stand-in encoder that returns
clustered unit vectors instantly, so everything else in it (tokenising, cache keys, planning,
merging, writing) and every later stage are measured for real. Usage::

    python -m benchmarks.bench_scaling [--sizes 10000 100000 1000000] [--stage-timeout 600]
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.catalog import generate_catalog
from llmrec_tasks.core import constants as C

STAGES = ("validate", "embed", "index", "train", "publish")
INTERACTIONS_PER_ITEM = 5.0
ENCODER_SAMPLE = 1000


def fake_encode_batches(tokens: Any, batches: list[np.ndarray], spec: Any, **_: Any) -> np.ndarray:
    """Stand-in encoder: clustered unit vectors keyed by each text's tokens (instant); like the
    real one it fills one preallocated matrix batch by batch, so its memory is the output only."""
    starts = tokens.offsets[:-1]
    weights = (np.arange(len(tokens.flat)) - np.repeat(starts, tokens.lengths) + 1) % 997
    hashed = np.add.reduceat(tokens.flat.astype(np.int64) * weights, starts) if len(starts) else starts
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((1000, 384), dtype=np.float32)
    out = np.empty((sum(len(b) for b in batches), 384), dtype=np.float32)
    done = 0
    for rows in batches:
        x = centres[hashed[rows] % 1000] + 0.9 * rng.standard_normal((len(rows), 384), dtype=np.float32)
        out[done : done + len(rows)] = x / np.linalg.norm(x, axis=1, keepdims=True)
        done += len(rows)
    return out


class PeakRss:
    """Samples this process's RSS every 20 ms in a thread: the peak of one stage only
    (``ru_maxrss`` would include the parent's peak, which Linux carries across fork/exec)."""

    def __init__(self) -> None:
        import psutil

        self.process = psutil.Process()
        self.peak = self.process.memory_info().rss
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(0.02):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __enter__(self) -> PeakRss:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


def _child(stage: str, cfg_dict: dict[str, Any], work_uri: str | None, fake: bool, out: Any) -> None:
    """Run one stage in this (fresh) process; report seconds, peak RSS and a summary."""
    import psutil

    from llmrec_tasks import publish  # noqa: F401
    from llmrec_tasks.core.config import RunConfig
    from llmrec_tasks.data import validate  # noqa: F401
    from llmrec_tasks.pipeline import run_stage
    from llmrec_tasks.ranking import train  # noqa: F401
    from llmrec_tasks.retrieval import index  # noqa: F401

    # Every stage module up front: import time is constant, not growth, and stays out of the figures.
    from llmrec_tasks.text import embed

    logging.basicConfig(level=logging.WARNING)
    fake_seconds = 0.0
    if fake:

        def timed_fake(*args: Any, **kwargs: Any) -> np.ndarray:
            nonlocal fake_seconds
            started = time.perf_counter()
            vectors = fake_encode_batches(*args, **kwargs)
            fake_seconds += time.perf_counter() - started
            return vectors

        embed.encode_batches = timed_fake
    baseline = psutil.Process().memory_info().rss / 2**20
    started = time.perf_counter()
    with PeakRss() as rss:
        result = run_stage(stage, RunConfig.from_dict(cfg_dict), work_uri)
    seconds = time.perf_counter() - started - fake_seconds
    peak = rss.peak / 2**20
    keep = (
        "work_uri",
        "kind",
        "recall_at_10",
        "search_param",
        "memory_mb",
        "reused",
        "encoded",
        "texts_encoded",
    )
    out.put(
        {
            "seconds": seconds,
            "peak_mb": peak,
            "baseline_mb": baseline,
            **{k: v for k, v in result.to_json().items() if k in keep},
        }
    )


def run_stage_process(
    stage: str, cfg_dict: dict[str, Any], work_uri: str | None, fake: bool, timeout: float
) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(stage, cfg_dict, work_uri, fake, queue))
    started = time.perf_counter()
    proc.start()
    proc.join(timeout)
    if proc.is_alive():
        proc.terminate()
        proc.join()
        return {"error": f"timeout > {timeout:.0f}s", "seconds": time.perf_counter() - started}
    if proc.exitcode != 0 or queue.empty():
        return {
            "error": f"failed (exit {proc.exitcode}), see log above",
            "seconds": time.perf_counter() - started,
        }
    return queue.get()


def encoder_rate(texts: list[str]) -> float:
    """Real items/s of the default encoder on these texts, model loaded."""
    from llmrec_tasks.core.config import EncoderConfig
    from llmrec_tasks.text import embed

    cfg = EncoderConfig()
    embed.encode_texts(texts[:64], cfg)
    started = time.perf_counter()
    embed.encode_texts(texts, cfg)
    return len(texts) / (time.perf_counter() - started)


def bench_size(n: int, args: argparse.Namespace, root: Path) -> list[dict[str, Any]]:
    from llmrec_tasks.data.contract import item_texts, normalize

    started = time.perf_counter()
    raw = generate_catalog(n, INTERACTIONS_PER_ITEM)
    data_dir = root / f"data-{n}"
    data_dir.mkdir()
    raw.items.to_parquet(data_dir / f"{C.ITEMS}.parquet", index=False)
    raw.interactions.to_parquet(data_dir / f"{C.INTERACTIONS}.parquet", index=False)
    logging.info(
        "n=%d: generated %d interactions in %.0fs", n, len(raw.interactions), time.perf_counter() - started
    )
    fake = n > args.encode_real_max
    rate = None
    if fake:
        texts = item_texts(normalize(raw).items.sample(ENCODER_SAMPLE, random_state=0))
        rate = encoder_rate(texts)
        logging.info("n=%d: encoder %.0f items/s (measured on %d texts)", n, rate, len(texts))
    cfg = {"data_uri": data_dir.as_uri(), "store_uri": (root / f"store-{n}").as_uri(), "namespace": "bench"}
    rows, work_uri = [], None
    for stage in args.stages:
        logging.info("n=%d: stage %s", n, stage)
        res = run_stage_process(stage, cfg, work_uri, fake and stage == "embed", args.stage_timeout)
        work_uri = work_uri or res.get("work_uri")
        res.update(n=n, stage=stage, interactions=len(raw.interactions))
        if fake and stage == "embed" and "error" not in res:
            res["encode_extrapolated_s"] = res.get("texts_encoded", n) / rate
            res["seconds"] += res["encode_extrapolated_s"]
        rows.append(res)
        logging.info("n=%d: %s", n, res)
        if "error" in res:
            break  # later stages need this one's outputs
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    parser.add_argument("--encode-real-max", type=int, default=10_000, help="encode for real up to this size")
    parser.add_argument("--stage-timeout", type=float, default=600)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            rows += bench_size(n, args, Path(tmp))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2, default=str))
    print(f"\n## Pipeline stages by catalog size ({INTERACTIONS_PER_ITEM:g} interactions per item)")
    print("| items | interactions | stage | seconds | peak RSS MB | RSS before stage MB | notes |")
    print("| ---: | ---: | --- | ---: | ---: | ---: | --- |")
    for r in rows:
        notes = []
        if "error" in r:
            notes.append(r["error"])
        if "encode_extrapolated_s" in r:
            notes.append(
                f"includes {r['encode_extrapolated_s']:.0f}s encode EXTRAPOLATED from measured items/s"
            )
        if "kind" in r:
            notes.append(f"{r['kind']}, recall@10 {r['recall_at_10']}, {r['memory_mb']} MB")
        if "reused" in r:
            notes.append(f"encoded {r['encoded']}, reused {r['reused']}")
        peak = f"{r['peak_mb']:.0f}" if "peak_mb" in r else "-"
        base = f"{r['baseline_mb']:.0f}" if "baseline_mb" in r else "-"
        print(
            f"| {r['n']:,} | {r['interactions']:,} | {r['stage']} | {r['seconds']:.1f} | {peak} | {base} "
            f"| {'; '.join(notes)} |"
        )


if __name__ == "__main__":
    main()
