"""Stage `index`: build a FAISS inner-product index over the L2-normalised item embeddings."""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from llmrec_tasks import constants as C
from llmrec_tasks.config import RunConfig
from llmrec_tasks.embed import read_embeddings
from llmrec_tasks.store import open_store

log = logging.getLogger(__name__)


def build_index(vectors: np.ndarray) -> Any:
    """Exact inner-product index (cosine on normalised vectors)."""
    import faiss

    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    return index


def serialize(index: Any) -> bytes:
    import faiss

    return faiss.serialize_index(index).tobytes()


def deserialize(data: bytes) -> Any:
    import faiss

    return faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))


def run_index(cfg: RunConfig, validated: dict[str, Any], embedded: dict[str, Any]) -> dict[str, Any]:
    """Build the index and write it (FAISS native format) into the run's work folder."""
    _, vectors = read_embeddings(embedded)
    started = time.monotonic()
    index = build_index(vectors)
    seconds = time.monotonic() - started
    store = open_store(validated["work_uri"])
    with tempfile.TemporaryDirectory() as tmp:
        import faiss

        path = Path(tmp) / C.FAISS_INDEX
        faiss.write_index(index, str(path))
        store.put_file(C.FAISS_INDEX, path)
    info = {"kind": "flat", "n_items": int(index.ntotal), "dim": int(vectors.shape[1]), "build_seconds": seconds}
    store.put_bytes(C.INDEX_INFO, json.dumps(info, indent=2).encode())
    log.info("built %s index over %d items in %.2fs", info["kind"], index.ntotal, seconds)
    return {"index_uri": store.uri_for(C.FAISS_INDEX), "index_info_uri": store.uri_for(C.INDEX_INFO), **info}
