"""Per-request cost of the text-aware sequence model: one user's state, catalog scores and top list.

A random (untrained) model of the default size over random text vectors: the cost does not depend
on the weights. One native thread, as serving's compute thread runs. Usage::

    python benchmarks/bench_seq_state.py --items 9742 --history 200
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from threadpoolctl import threadpool_limits

from llmrec_tasks.ranking.events import Histories
from llmrec_tasks.ranking.seqmodel import SeqParams, TextSeqModel
from llmrec_tasks.ranking.seqstate import SeqScorer, score_histories


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=9742)
    parser.add_argument("--history", type=int, default=200)
    parser.add_argument("--dim", type=int, default=384, help="text vector size")
    parser.add_argument("--calls", type=int, default=300)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    text = rng.normal(size=(args.items, args.dim)).astype(np.float32)
    params = SeqParams()
    model = TextSeqModel(text, np.ones(args.items, dtype=bool), params)
    scorer = SeqScorer.build(model.export(params), text)
    items = rng.integers(0, args.items, args.history)
    hist = Histories.from_lists([items], [np.arange(args.history, dtype=float)], np.zeros(1))
    wall, cpu = [], []
    with threadpool_limits(limits=1):
        for _ in range(args.calls):
            w, c = time.perf_counter(), time.thread_time()
            score_histories(scorer, hist, 200)
            wall.append(time.perf_counter() - w)
            cpu.append(time.thread_time() - c)
    w_ms, c_ms = np.array(wall) * 1e3, np.array(cpu) * 1e3
    print(
        f"items {args.items}, history {args.history}: wall p50 {np.percentile(w_ms, 50):.2f} / p99 "
        f"{np.percentile(w_ms, 99):.2f} ms; CPU p50 {np.percentile(c_ms, 50):.2f} / p99 {np.percentile(c_ms, 99):.2f} ms"
    )


if __name__ == "__main__":
    main()
