"""Batch scoring benchmark: users/s of a loop of per-user ``Recommender.recommend`` against batch
scoring, side by side with the ratio, on a published bundle.

- ``per-user loop``: ``recommend(user_id=u, k=K)`` one user after another (``--loop-users`` users
  spread over the bundle's users), with reasons, as the service answers;
- ``recommend_many``: the same users' top ``K`` from :func:`llmrec_tasks.serving.batch.recommend_many`
  (the ranking stage's batched candidates and features, no reasons), every user of the bundle in
  chunks of ``CHUNK_USERS``; the top lists of the loop's users are compared with the loop's;
- ``score-batch``: the whole command as a team runs it: plan, load, score, Parquet parts,
  manifest (``--users-per-shard`` users per part, shards one after the other in one process).

``--batch-users N`` scores only the first N users (sorted ids) in both batch rows.

Everything runs with the native thread pools at one thread (one core), as a shard task does: two
shards in parallel use both cores of a 2-core host. Besides users per wall-clock second, users per
CPU second of the process are printed (what one idle core does; the ratio column compares these),
with the host's load average: on a shared host the wall-clock figures fall with other work. Usage::

    python benchmarks/bench_batch.py --store file:///tmp/batch/ml --namespace exp-batch
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llmrec_tasks.serving import batch  # noqa: E402
from llmrec_tasks.serving import recommender as serving  # noqa: E402


def rates(users: int, started: float, cpu: float) -> tuple[float, float]:
    """Users per wall-clock second and per CPU second of this process since (started, cpu)."""
    return users / (time.perf_counter() - started), users / max(time.process_time() - cpu, 1e-9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", required=True)
    parser.add_argument("--namespace", required=True)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--loop-users", type=int, default=200)
    parser.add_argument("--users-per-shard", type=int, default=50_000)
    parser.add_argument(
        "--batch-users", type=int, default=0, help="batch-score only this many users (0: all)"
    )
    args = parser.parse_args()

    bundle = serving.load_bundle(args.store, args.namespace)
    recommender = serving.Recommender(bundle)
    users = every = sorted(bundle.user_row)
    if args.batch_users:
        users = users[: args.batch_users]
    loop_users = users[:: max(1, len(users) // args.loop_users)][: args.loop_users]
    lengths = np.diff(bundle.hist_indptr)
    print(
        f"bundle {args.namespace}/{bundle.version}: {len(bundle.item_ids)} items, {len(every)} users "
        f"(history median {np.median(lengths):.0f}, max {lengths.max()}), k={args.k}, {len(users)} batch-scored"
    )
    now = time.time()
    with serving.single_threaded_native_code():
        recommender.recommend(user_id=loop_users[0], k=args.k)  # warm the context's caches
        started, cpu = time.perf_counter(), time.process_time()
        answers = [recommender.recommend(user_id=u, k=args.k) for u in loop_users]
        loop = rates(len(loop_users), started, cpu)
        started, cpu = time.perf_counter(), time.process_time()
        same = 0
        for lo in range(0, len(users), batch.CHUNK_USERS):
            chunk = users[lo : lo + batch.CHUNK_USERS]
            scored = batch.recommend_many(recommender, chunk, args.k, now)
            position = {u: i for i, u in enumerate(chunk)}
            for user, answer in zip(loop_users, answers, strict=True):
                if user in position:
                    i = position[user]
                    top = scored.items[scored.indptr[i] : scored.indptr[i + 1]]
                    same += [bundle.item_ids[r] for r in top] == [item.item_id for item in answer.items]
        many = rates(len(users), started, cpu)
    with tempfile.TemporaryDirectory() as out:
        listed = Path(out) / "users.txt"
        listed.write_text("\n".join(users))
        started, cpu = time.perf_counter(), time.process_time()
        summary = batch.score_batch(
            args.store,
            args.namespace,
            users_uri=str(listed) if args.batch_users else None,
            k=args.k,
            users_per_shard=args.users_per_shard,
            out=(Path(out) / "scores").as_uri(),
        )
        cli = rates(summary["users"], started, cpu)
    print(f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())} (2 cores)")
    print(f"{'method':<44} {'users':>6} {'users/s':>8} {'users/cpu-s':>12} {'vs loop':>8}")
    for name, n, (wall, per_cpu) in (
        ("per-user recommend loop", len(loop_users), loop),
        ("recommend_many, in memory", len(users), many),
        (f"score-batch end to end, {summary['parts']} part(s)", summary["users"], cli),
    ):
        print(f"{name:<44} {n:>6} {wall:>8.1f} {per_cpu:>12.1f} {per_cpu / loop[1]:>7.1f}x")
    print(
        f"identical top-{args.k} lists for {same}/{len(loop_users)} loop users (recommend's time is the wall clock)"
    )


if __name__ == "__main__":
    main()
