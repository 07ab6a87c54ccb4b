"""Embed-stage benchmark: encoder throughput against sentence-transformers, the ONNX int8 path,
and an incremental refresh (1% of texts changed) against a full refresh.

Everything compared is measured in the same process, interleaved round by round (the machine is
shared, so absolute numbers move; the ratios are what to read). Usage::

    python -m benchmarks.bench_embed [--texts 2000] [--rounds 3] [--items 20000]
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.catalog import change_texts, generate_catalog
from llmrec_tasks import embed, paths
from llmrec_tasks.config import EncoderConfig, RunConfig
from llmrec_tasks.data import item_texts, normalize, read_raw, write_snapshot
from llmrec_tasks.store import open_store, split_uri

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


def throughput(n_texts: int, rounds: int) -> None:
    from sentence_transformers import SentenceTransformer

    texts, source = bench_texts(n_texts)
    cfg = EncoderConfig()
    st = SentenceTransformer(str(embed.resolve_model_path(cfg.model)), device="cpu")
    st.max_seq_length = cfg.max_length  # same truncation as ours
    started = time.monotonic()
    embed.encode_texts(texts[:4], EncoderConfig(backend="onnx-int8"))
    onnx_setup = time.monotonic() - started
    methods = {
        "sentence-transformers encode (fp32, batch 32)": lambda t: st.encode(
            t, batch_size=32, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
        ),
        "ours torch fp32": lambda t: embed.encode_texts(t, EncoderConfig(precision="fp32")),
        "ours torch bf16": lambda t: embed.encode_texts(t, EncoderConfig(precision="bf16")),
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
    st_name, fp32_name = next(iter(methods)), "ours torch fp32"
    print(f"\n## Encoder throughput: {source}, {rounds} interleaved rounds, all-MiniLM-L6-v2, max_length 128")
    print(f"auto precision on this CPU: {embed.EncoderSpec.resolve(EncoderConfig()).precision}")
    print(
        "| method | items/s | vs sentence-transformers | vs ours fp32 | min cosine to ST | mean cosine to ST |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name in methods:
        cos = (vectors[name] * vectors[st_name]).sum(1)
        print(
            f"| {name} | {rounds * len(texts) / seconds[name]:.0f} | {seconds[st_name] / seconds[name]:.2f}x "
            f"| {seconds[fp32_name] / seconds[name]:.2f}x | {cos.min():.5f} | {cos.mean():.5f} |"
        )
    cos = (vectors["ours onnx-int8"] * vectors[fp32_name]).sum(1)
    print(
        f"\nONNX int8 vs ours fp32: {seconds[fp32_name] / seconds['ours onnx-int8']:.2f}x faster, cosine min "
        f"{cos.min():.4f} / mean {cos.mean():.4f} / p1 {np.percentile(cos, 1):.4f}; "
        f"one-off export+quantise (or cache hit) {onnx_setup:.1f}s"
    )


def publish_embeddings(store_uri: str, version: str, result: dict) -> None:
    """The publish stage's part that matters here: copy the *_uri artifacts, move current."""
    root = open_store(store_uri)
    for key, uri in result.items():
        if key.endswith("_uri"):
            src, name = split_uri(uri)
            root.put_bytes(f"{paths.bundle_prefix('production', version)}/{name}", src.get_bytes(name))
    root.put_bytes(paths.current_key("production"), json.dumps({"version": version}).encode())


def incremental(n_items: int, fraction: float) -> None:
    data = normalize(generate_catalog(n_items))
    changed_items, n_changed = change_texts(data.items, fraction)
    with tempfile.TemporaryDirectory() as tmp:
        store_uri = Path(tmp).as_uri()
        cfg = RunConfig.from_dict({"store_uri": store_uri})
        rows = []
        for version, items in (("full", data.items), ("incremental", changed_items)):
            store = open_store(store_uri)
            prefix = paths.run_prefix(cfg.namespace, version)
            write_snapshot(type(data)(items=items, interactions=data.interactions), store, prefix)
            validated = {"version": version, "work_uri": store.uri_for(prefix)}
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
        print(
            f"| {name} | {seconds:.1f} | {result['reused']} | {result['encoded']} | {seconds / full_s:.1%} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=2000, help="texts for the throughput comparison")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--items", type=int, default=20_000, help="catalog size for the incremental run")
    parser.add_argument("--changed", type=float, default=0.01)
    parser.add_argument("--skip", choices=["throughput", "incremental"], action="append", default=[])
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if "throughput" not in args.skip:
        throughput(args.texts, args.rounds)
    if "incremental" not in args.skip:
        incremental(args.items, args.changed)


if __name__ == "__main__":
    main()
