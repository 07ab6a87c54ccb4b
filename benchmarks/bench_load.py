"""Bundle load benchmark: peak memory and time of loading a large bundle, old way beside new way.

Builds a generated bundle in a local store (``--items`` items, ``--dim`` float32 vectors, an exact
FAISS ``IndexFlatIP`` over them, a small LightGBM ranker, the items and user-history tables),
once; then loads it in a fresh subprocess per way and reports its peak RSS (``VmHWM``, which
counts every page the process touched, mapped file pages included; ``baseline`` is the peak
after the imports, before the load) and wall time:

- ``bytes`` (the alternative, what serving did before): every file fetched into memory
  (``get_bytes``), size and sha256 checked on the bytes, then parsed from them
  (``np.load(BytesIO)``, ``faiss.deserialize_index``, ``Booster(model_str=...)``,
  ``read_parquet(BytesIO)``);
- ``mmap`` (``serving.load_bundle``): size by stat, streamed sha256, embeddings and index
  memory-mapped, the ranker and tables read from their files.

Both ways end in the same ``serving.assemble_bundle`` (rows, popularity, histories), so the
difference is the file handling alone. Each child also answers a few fixed FAISS queries after its
peak was taken: the answers must be identical. Usage::

    python benchmarks/bench_load.py                 # 1,000,000 items x 384 (~3.1 GB bundle)
    python benchmarks/bench_load.py --items 100000  # quicker
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llmrec_tasks.core import constants as C  # noqa: E402
from llmrec_tasks.serving import recommender as serving  # noqa: E402
from llmrec_tasks.storage import registry  # noqa: E402
from llmrec_tasks.storage.store import LocalStore, file_sha256, open_store  # noqa: E402

NAMESPACE = "benchload"
VERSION = "20260101T000000Z-benchld0-000000"
FEATURES = ["profile_sim", "log_popularity", "last_item_sim"]
CHUNK = 100_000
QUERIES = 5
WAYS = ("bytes", "mmap")


# --- the bundle ----------------------------------------------------------------------------------


def build_bundle(
    root: Path, n: int, d: int, users: int, history: int, seed: int = 0
) -> tuple[dict[str, Any], bool]:
    """Write a complete bundle (manifest last) into a local store at ``root``; reused when its
    manifest says it was built with the same sizes. Returns ``(manifest, built)``."""
    import faiss
    import lightgbm

    store = LocalStore(root)
    shape = {"items": n, "dim": d, "users": users, "history": history}
    if store.exists(registry.manifest_key(NAMESPACE, VERSION)):
        manifest = registry.read_manifest(store, NAMESPACE, VERSION)
        if manifest["lineage"].get("bench") == shape:
            return manifest, False
        raise SystemExit(
            f"{root} holds a bundle of another size {manifest['lineage'].get('bench')}: use --dir"
        )

    def path(name: str) -> Path:
        out = root / registry.bundle_key(NAMESPACE, VERSION, name)
        out.parent.mkdir(parents=True, exist_ok=True)
        return out

    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((1000, d), dtype=np.float32)
    vectors = np.lib.format.open_memmap(path(C.EMBEDDINGS), mode="w+", dtype=np.float32, shape=(n, d))
    index = faiss.IndexFlatIP(d)
    for start in range(0, n, CHUNK):
        m = min(CHUNK, n - start)
        x = centres[rng.integers(len(centres), size=m)] + 0.9 * rng.standard_normal((m, d), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        vectors[start : start + m] = x
        index.add(x)
    vectors.flush()
    del vectors
    faiss.write_index(index, str(path(C.FAISS_INDEX)))
    del index

    item_ids = [f"i{i:07d}" for i in range(n)]
    path(C.ITEM_IDS).write_text(json.dumps(item_ids))
    path(C.INDEX_INFO).write_text(json.dumps({"kind": "flat"}))
    x = rng.normal(size=(400, len(FEATURES)))
    y = (x[:, 0] + 0.5 * x[:, 2] + 0.2 * rng.normal(size=400) > 0).astype(int)
    params = {"objective": "binary", "num_leaves": 7, "verbose": -1, "seed": seed, "num_threads": 1}
    booster = lightgbm.train(params, lightgbm.Dataset(x, y, feature_name=FEATURES), num_boost_round=15)
    path(C.RANKER_MODEL).write_text(booster.model_to_string())
    path(C.FEATURE_SPEC).write_text(json.dumps({"features": FEATURES}))
    path(C.METRICS).write_text(json.dumps({"ranker": {"ndcg@10": 0.3}}))
    path(C.VALIDATION_SUMMARY).write_text(json.dumps({"success": True}))
    popularity = np.minimum(rng.zipf(1.3, n), 10_000)
    pd.DataFrame(
        {
            C.ITEM_ID: item_ids,
            C.TITLE: [f"Item {i}" for i in range(n)],
            C.CATEGORIES: [f"topic{i % 12}" for i in range(n)],
            C.POPULARITY: popularity,
        }
    ).to_parquet(path(C.BUNDLE_ITEMS), index=False)
    rows = users * history
    pd.DataFrame(
        {
            C.USER_ID: np.char.add("u", np.repeat(np.arange(users), history).astype(str)),
            C.ITEM_ID: np.asarray(item_ids, dtype=object)[rng.integers(n, size=rows)],
            C.TIMESTAMP: pd.to_datetime(
                1_767_225_600 + rng.integers(0, 180 * 86_400, rows), unit="s", utc=True
            ),
            C.WEIGHT: np.ones(rows, dtype=np.float32),
        }
    ).to_parquet(path(C.USER_HISTORIES), index=False)

    names = [C.EMBEDDINGS, C.FAISS_INDEX, C.ITEM_IDS, C.INDEX_INFO, C.RANKER_MODEL, C.FEATURE_SPEC]
    names += [C.METRICS, C.VALIDATION_SUMMARY, C.BUNDLE_ITEMS, C.USER_HISTORIES]
    files = {name: {"sha256": file_sha256(path(name)), "size": path(name).stat().st_size} for name in names}
    manifest = {
        "format": registry.MANIFEST_FORMAT,
        "namespace": NAMESPACE,
        "version": VERSION,
        "created_at": "2026-01-01T00:00:00+00:00",
        "files": files,
        "metrics": {},
        "lineage": {"logical_date": "2026-01-01T00:00:00+00:00", "bench": shape},
    }
    registry.write_manifest(store, manifest)
    return manifest, True


# --- the two ways of loading it (each run in its own process) ------------------------------------


def load_bytes(store_uri: str) -> serving.Bundle:
    """The alternative: every file into memory, checked there, parsed from the bytes."""
    import faiss
    import lightgbm

    store = open_store(store_uri)
    manifest = registry.read_manifest(store, NAMESPACE, VERSION)
    where = store.uri_for(registry.bundle_prefix(NAMESPACE, VERSION))

    def fetch(name: str) -> tuple[str, bytes]:
        return name, store.get_bytes(registry.bundle_key(NAMESPACE, VERSION, name))

    with ThreadPoolExecutor(max_workers=serving.DOWNLOAD_WORKERS) as pool:
        blobs = dict(pool.map(fetch, sorted(manifest["files"])))
    for name, data in blobs.items():
        meta = manifest["files"][name]
        if len(data) != meta["size"] or hashlib.sha256(data).hexdigest() != meta["sha256"]:
            raise SystemExit(f"{name} does not match the manifest")
    embeddings = np.load(io.BytesIO(blobs[C.EMBEDDINGS]), allow_pickle=False)
    artifacts = serving.Artifacts(
        embeddings=np.ascontiguousarray(embeddings, dtype=np.float32),
        item_ids=[str(i) for i in json.loads(blobs[C.ITEM_IDS])],
        index=faiss.deserialize_index(np.frombuffer(blobs[C.FAISS_INDEX], dtype=np.uint8)),
        booster=lightgbm.Booster(model_str=blobs[C.RANKER_MODEL].decode("utf-8")),
        spec=json.loads(blobs[C.FEATURE_SPEC]),
        tables={
            name: pd.read_parquet(io.BytesIO(data))
            for name, data in blobs.items()
            if name.endswith(".parquet")
        },
    )
    return serving.assemble_bundle(NAMESPACE, VERSION, where, manifest, artifacts)


def peak_rss_bytes() -> int:
    """This process's peak RSS: ``VmHWM`` (Linux). Not ``ru_maxrss``: Linux carries that over
    ``fork`` + ``exec``, so a child would report its parent's peak when that one is larger."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024  # kB
    raise SystemExit("no VmHWM in /proc/self/status: this benchmark measures memory on Linux")


def child(way: str, store_uri: str) -> dict[str, Any]:
    """Load once; peak RSS and time of the load, then the answers to fixed queries."""
    import faiss  # noqa: F401  (imported before the baseline, as a serving process has it)
    import lightgbm  # noqa: F401

    baseline = peak_rss_bytes()
    started = time.perf_counter()
    bundle = load_bytes(store_uri) if way == "bytes" else serving.load_bundle(store_uri, NAMESPACE, VERSION)
    seconds = time.perf_counter() - started
    peak = peak_rss_bytes()
    n = len(bundle.item_ids)
    rows = np.linspace(0, n - 1, QUERIES).astype(np.int64)
    _, ids = bundle.index.search(np.ascontiguousarray(bundle.embeddings[rows]), 10)
    return {
        "seconds": round(seconds, 2),
        "peak_rss_bytes": peak,
        "baseline_rss_bytes": baseline,
        "embeddings": type(bundle.embeddings).__name__,
        "answers": ids.tolist(),
        "users": len(bundle.user_row),
    }


def run_child(way: str, store_uri: str) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, __file__, "--child", way, "--store", store_uri],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--users", type=int, default=None, help="users with a history (default items/20)")
    parser.add_argument("--history", type=int, default=20, help="history rows per user")
    parser.add_argument("--dir", type=Path, default=None, help="where the bundle is built (and kept)")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    parser.add_argument("--child", choices=WAYS, help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        result = child(args.child, args.store)
        print(json.dumps(result))
        return result

    users = args.users if args.users is not None else max(10, args.items // 20)
    root = args.dir or Path(os.environ.get("TMPDIR", "/tmp")) / f"llmrec-bench-load-{args.items}x{args.dim}"
    started = time.perf_counter()
    manifest, built = build_bundle(root, args.items, args.dim, users, args.history)
    build_s = time.perf_counter() - started
    bundle_bytes = sum(int(f["size"]) for f in manifest["files"].values())
    store_uri = root.resolve().as_uri()
    measured = {way: run_child(way, store_uri) for way in WAYS}
    if measured["bytes"]["answers"] != measured["mmap"]["answers"]:
        raise SystemExit("the two ways answered the fixed queries differently")

    def mb(value: int) -> float:
        return round(value / 2**20, 1)

    results: dict[str, Any] = {
        "bundle": {
            "items": args.items,
            "dim": args.dim,
            "users": users,
            "history_rows": users * args.history,
            "bytes": bundle_bytes,
            "mb": mb(bundle_bytes),
            "largest_mb": {n: mb(int(f["size"])) for n, f in manifest["files"].items() if f["size"] > 2**20},
            "build_s": round(build_s, 1) if built else "reused",
        },
        "cpus": os.cpu_count(),
    }
    for way, m in measured.items():
        results[way] = {
            "seconds": m["seconds"],
            "peak_rss_mb": mb(m["peak_rss_bytes"]),
            "baseline_rss_mb": mb(m["baseline_rss_bytes"]),
            "added_by_load_mb": mb(m["peak_rss_bytes"] - m["baseline_rss_bytes"]),
            "peak_vs_bundle": round(m["peak_rss_bytes"] / bundle_bytes, 3),
            "added_vs_bundle": round((m["peak_rss_bytes"] - m["baseline_rss_bytes"]) / bundle_bytes, 3),
            "embeddings": m["embeddings"],
        }
    results["mmap_vs_bytes"] = {
        "peak_rss": round(measured["mmap"]["peak_rss_bytes"] / measured["bytes"]["peak_rss_bytes"], 3),
        "seconds": round(measured["mmap"]["seconds"] / measured["bytes"]["seconds"], 3),
    }
    results["same_answers"] = True
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return results


if __name__ == "__main__":
    main()
