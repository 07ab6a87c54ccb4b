"""Embed-stage benchmark: encoder throughput (our default ONNX Runtime float32 backend, torch
fp32/bf16 and ONNX int8) against sentence-transformers, and an incremental refresh (1% of texts
changed) against a full refresh.

Everything compared is measured in the same process, interleaved round by round (the machine is
shared, so absolute numbers move; the ratios are what to read). Usage::

    python -m benchmarks.bench_embed [--texts 2000] [--rounds 3] [--items 20000]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.catalog import change_texts, generate_catalog
from llmrec_tasks.core import constants as C
from llmrec_tasks.core.config import EncoderConfig, RunConfig
from llmrec_tasks.core.results import Embedded, Validated
from llmrec_tasks.data.contract import item_texts, normalize, read_raw, write_snapshot
from llmrec_tasks.data.validate import EMPTY_CUTOFF
from llmrec_tasks.storage import registry
from llmrec_tasks.storage.store import open_store, split_uri
from llmrec_tasks.text import embed, onnx_encoder

MOVIELENS = Path(__file__).resolve().parents[2] / "shared/data/ml-latest-small"


def bench_texts(n: int) -> tuple[list[str], str]:
    """MovieLens item texts (title, tags, genres) when present, else generated ones."""
    if (MOVIELENS / "movies.csv").is_file():
        items = normalize(read_raw(MOVIELENS.as_uri())).items
        return item_texts(items)[:n], f"MovieLens ml-latest-small items ({n})"
    return item_texts(normalize(generate_catalog(n)).items), f"generated items ({n})"


def clear_caches() -> None:
    """Forget loaded models: each Airflow task is a fresh process that pays the load."""
    for fn in (embed._runner, embed.load_encoder, embed.load_tokenizer, embed.encoder_identity):
        fn.cache_clear()


def export_seconds() -> dict[str, float]:
    """One-off cost of each ONNX backend on a worker with an empty export cache."""
    out = {}
    for backend in ("onnx", "onnx-int8"):
        clear_caches()
        started = time.perf_counter()
        embed.encode_texts(["warm-up"], EncoderConfig(backend=backend))
        out[backend] = time.perf_counter() - started
    return out


def throughput(n_texts: int, rounds: int) -> None:
    from sentence_transformers import SentenceTransformer

    texts, source = bench_texts(n_texts)
    exports = export_seconds()
    cfg = EncoderConfig()
    st = SentenceTransformer(str(embed.resolve_model_path(cfg.model)), device="cpu")
    st.max_seq_length = cfg.max_length  # same truncation as ours
    default = f"ours {cfg.backend} (default)"
    torch_fp32 = "ours torch fp32"
    methods = {
        "sentence-transformers encode (fp32, batch 32)": lambda t: st.encode(
            t, batch_size=32, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
        ),
        default: lambda t: embed.encode_texts(t, cfg),
        torch_fp32: lambda t: embed.encode_texts(t, EncoderConfig(backend="torch", precision="fp32")),
        "ours torch bf16": lambda t: embed.encode_texts(t, EncoderConfig(backend="torch", precision="bf16")),
        "ours onnx-int8": lambda t: embed.encode_texts(t, EncoderConfig(backend="onnx-int8")),
    }
    for fn in methods.values():  # warm-up: first calls allocate
        fn(texts[:64])
    seconds = dict.fromkeys(methods, 0.0)
    vectors: dict[str, np.ndarray] = {}
    for r in range(rounds):
        for name, fn in methods.items():
            start = time.perf_counter()
            vectors[name] = fn(texts)
            seconds[name] += time.perf_counter() - start
        logging.info("round %d/%d done", r + 1, rounds)
    st_name = next(iter(methods))
    torch_auto = embed.EncoderSpec.resolve(EncoderConfig(backend="torch")).precision
    print(f"\n## Encoder throughput: {source}, {rounds} interleaved rounds, all-MiniLM-L6-v2, max_length 128")
    print(f"native bf16 on this CPU: {embed.native_bf16()} (torch backend's precision=auto: {torch_auto})")
    print(
        "| method | items/s | vs sentence-transformers | vs ours torch fp32 | min cosine to ST "
        "| mean cosine to ST |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name in methods:
        cos = (vectors[name] * vectors[st_name]).sum(1)
        print(
            f"| {name} | {rounds * len(texts) / seconds[name]:.0f} | {seconds[st_name] / seconds[name]:.2f}x "
            f"| {seconds[torch_fp32] / seconds[name]:.2f}x | {cos.min():.5f} | {cos.mean():.5f} |"
        )
    print()
    for name in (default, "ours onnx-int8"):
        cos = (vectors[name] * vectors[torch_fp32]).sum(1)
        print(
            f"{name} vs ours torch fp32: {seconds[torch_fp32] / seconds[name]:.2f}x faster, cosine min "
            f"{cos.min():.5f} / mean {cos.mean():.5f} / p1 {np.percentile(cos, 1):.5f}"
        )
    print(
        "one-off ONNX export on a worker with an empty cache (model load included): "
        + ", ".join(f"{backend} {s:.1f}s" for backend, s in exports.items())
    )


def publish_embeddings(store_uri: str, version: str, result: Embedded) -> None:
    """The publish stage's part that matters here: copy the artifacts, move current."""
    root = open_store(store_uri)
    for name, uri in result.artifacts().items():
        src, key = split_uri(uri)
        root.put_bytes(f"{registry.bundle_prefix('production', version)}/{name}", src.get_bytes(key))
    root.put_bytes(registry.current_key("production"), json.dumps({"version": version}).encode())


def incremental(n_items: int, fraction: float) -> None:
    data = normalize(generate_catalog(n_items))
    changed_items, n_changed = change_texts(data.items, fraction)
    with tempfile.TemporaryDirectory() as tmp:
        store_uri = Path(tmp).as_uri()
        # The catalog is written as the run's snapshot below: data_uri is lineage only.
        cfg = RunConfig.from_dict({"data_uri": "generated-catalog", "store_uri": store_uri})
        embed.encode_texts(["warm-up"], cfg.encoder)  # steady state: the worker's export cache is filled
        rows = []
        for version, items in (("full", data.items), ("incremental", changed_items)):
            store = open_store(store_uri)
            prefix = registry.run_prefix(cfg.namespace, version)
            write_snapshot(type(data)(items=items, interactions=data.interactions), store, prefix)
            # The embed stage reads the work folder only: no validation report is written here.
            validated = Validated(
                version=version,
                work_uri=store.uri_for(prefix),
                snapshot_uri=store.uri_for(f"{prefix}/{C.SNAPSHOT_DIR}"),
                fingerprint=version,
                validation_uri=store.uri_for(f"{prefix}/{C.VALIDATION_SUMMARY}"),
                validation_stats_uri=store.uri_for(f"{prefix}/{C.VALIDATION_STATS}"),
                data_docs_uri=None,
                counts={C.ITEMS: len(items), C.INTERACTIONS: len(data.interactions)},
                cutoff=EMPTY_CUTOFF.isoformat(),
            )
            clear_caches()
            started = time.perf_counter()
            result = embed.run_embed(cfg, validated)
            rows.append((version, time.perf_counter() - started, result))
            publish_embeddings(store_uri, version, result)
    full_s = rows[0][1]
    print(f"\n## Incremental refresh: {n_items} generated items, {n_changed} texts changed ({fraction:.0%})")
    print("(each run pays the model load, as a fresh Airflow task does)")
    print("| run | seconds | reused | encoded | share of full refresh |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, seconds, result in rows:
        print(f"| {name} | {seconds:.1f} | {result.reused} | {result.encoded} | {seconds / full_s:.1%} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=2000, help="texts for the throughput comparison")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--items", type=int, default=20_000, help="catalog size for the incremental run")
    parser.add_argument("--changed", type=float, default=0.01)
    parser.add_argument("--skip", choices=["throughput", "incremental"], action="append", default=[])
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    with tempfile.TemporaryDirectory() as onnx_cache:
        os.environ[onnx_encoder.ONNX_CACHE_ENV] = onnx_cache  # the export is measured, never a stale one
        if "throughput" not in args.skip:
            throughput(args.texts, args.rounds)
        if "incremental" not in args.skip:
            incremental(args.items, args.changed)


if __name__ == "__main__":
    main()
