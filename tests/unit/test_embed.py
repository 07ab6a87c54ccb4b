"""Encoder correctness, incremental refresh and shard-count independence of the embed stage."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks.bench_embed import publish_embeddings
from llmrec_tasks.core import constants as C
from llmrec_tasks.core.config import EncoderConfig, RunConfig
from llmrec_tasks.core.errors import ModelLoadError, StoreError
from llmrec_tasks.core.results import Embedded, Validated
from llmrec_tasks.data.contract import Dataset, write_snapshot
from llmrec_tasks.storage import registry
from llmrec_tasks.storage.store import open_store
from llmrec_tasks.text import embed, onnx_encoder
from tests.stage_results import DATA_URI, validated_for

TEXTS = [
    "Distant Nebula I. A story about astronauts exploring a distant planet. Categories: Space",
    "Pasta",
    "Smoky Saxophone II. Legendary jazz clubs of New York, and improvisation in small jazz combos.",
    "x",
    "Backyard Garden. Growing vegetables in small spaces. Categories: Gardening, Cooking",
    "Ancient Empire IV. The rise and fall of the Roman empire, and letters from soldiers of the great war, "
    "and the dynasties of ancient China, told through the daily life of a medieval village. " * 3,
    "Pasta",
]


def test_plan_batches_sorts_by_length_and_respects_budgets():
    lengths = np.array([5, 50, 3, 50, 7, 100, 4])
    batches = embed.plan_batches(lengths, batch_size=3, token_budget=120)
    assert sorted(np.concatenate(batches).tolist()) == list(range(len(lengths)))
    for rows in batches:
        assert len(rows) <= 3
        assert len(rows) == 1 or len(rows) * lengths[rows].max() <= 120
    flat = np.concatenate(batches)
    assert (np.diff(lengths[flat]) >= 0).all()


def test_cache_keys_change_with_text_and_encoder_identity():
    a = embed.cache_keys(["one", "two", "one"], "enc-a")
    b = embed.cache_keys(["one"], "enc-b")
    assert a[0] == a[2] != a[1]
    assert a[0] != b[0]
    assert len(a[0]) == 64


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["onnx", "torch"])
def test_length_sorted_batches_equal_one_by_one_encoding(backend):
    cfg = EncoderConfig(backend=backend, precision="fp32", batch_size=4)
    together = embed.encode_texts(TEXTS, cfg)
    alone = np.vstack([embed.encode_texts([t], cfg) for t in TEXTS])
    np.testing.assert_allclose(together, alone, atol=2e-5)
    np.testing.assert_allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize(("backend", "precision"), [("onnx", "auto"), ("torch", "fp32"), ("torch", "bf16")])
def test_embeddings_match_sentence_transformers(backend, precision):
    from sentence_transformers import SentenceTransformer

    cfg = EncoderConfig(backend=backend, precision=precision, max_length=128)
    ours = embed.encode_texts(TEXTS, cfg)
    st = SentenceTransformer(str(embed.resolve_model_path("default")), device="cpu")
    st.max_seq_length = cfg.max_length
    reference = st.encode(TEXTS, normalize_embeddings=True, convert_to_numpy=True)
    assert (ours * reference).sum(1).min() >= 0.999


@pytest.mark.slow
def test_onnx_backends_agree_with_torch_fp32(tmp_path, monkeypatch):
    monkeypatch.setenv(onnx_encoder.ONNX_CACHE_ENV, str(tmp_path / "onnx"))
    torch_fp32 = embed.encode_texts(TEXTS, EncoderConfig(backend="torch", precision="fp32"))
    onnx_fp32 = embed.encode_texts(TEXTS, EncoderConfig(backend="onnx"))
    int8 = embed.encode_texts(TEXTS, EncoderConfig(backend="onnx-int8"))
    assert (torch_fp32 * onnx_fp32).sum(1).min() >= 0.99999
    assert (torch_fp32 * int8).sum(1).min() >= 0.98
    folder = onnx_encoder.cache_dir(embed.encoder_identity("default"))
    assert {p.name for p in folder.iterdir()} == {onnx_encoder.FP32_FILE, onnx_encoder.QUANTIZED_FILE}

    # A cached export is used as it is: the model is not loaded again.
    def no_load() -> tuple:
        raise AssertionError("the model was loaded although the export is cached")

    for export in (onnx_encoder.export_fp32, onnx_encoder.export_int8):
        assert export(no_load, embed.encoder_identity("default")).parent == folder


@pytest.fixture(scope="module")
def other_architecture(tmp_path_factory) -> str:
    """A small random DistilBERT (no token type ids, ``dim`` for the hidden size) in a local folder."""
    import torch
    from transformers import DistilBertConfig, DistilBertModel

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("distilbert")
    config = DistilBertConfig(dim=32, n_layers=2, n_heads=2, hidden_dim=64, max_position_embeddings=128)
    DistilBertModel(config).save_pretrained(folder)
    embed.load_tokenizer("default").save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("backend", ["onnx", "onnx-int8", "torch"])
def test_a_local_model_of_another_architecture_encodes(other_architecture, backend):
    vectors = embed.encode_texts(TEXTS, EncoderConfig(model=other_architecture, backend=backend))
    assert vectors.shape == (len(TEXTS), 32)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    reference = embed.encode_texts(TEXTS, EncoderConfig(model=other_architecture, backend="torch"))
    assert (vectors * reference).sum(1).min() >= (0.98 if backend == "onnx-int8" else 0.99999)


def test_the_stage_runs_a_model_of_another_architecture(other_architecture, store_uri):
    _, _, result = _run(store_uri, "v1", _items(12), model=other_architecture, shards=2)
    ids, vectors = embed.read_embeddings(result)
    assert len(ids) == 12 and vectors.shape == (12, 32)
    assert result.encoder["model"] == other_architecture


def test_a_model_that_does_not_export_names_the_torch_backend(tmp_path, monkeypatch):
    import torch

    monkeypatch.setenv(onnx_encoder.ONNX_CACHE_ENV, str(tmp_path / "onnx"))

    class Unexportable(torch.nn.Module):
        def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("operator not supported")

    tokenizer = embed.load_tokenizer("default")
    with pytest.raises(ModelLoadError, match="encoder_backend=torch"):
        onnx_encoder.export_fp32(lambda: (tokenizer, Unexportable()), "unexportable")
    assert not any((tmp_path / "onnx").rglob("*.onnx"))  # nothing half-written is left to be reused


# --- stage: incremental refresh and shards -----------------------------------------------------


def _items(
    n: int, changed: dict[int, str] | None = None, drop: tuple[int, ...] = (), copies: tuple[int, ...] = ()
) -> Dataset:
    """First ``n`` sample items; ``changed`` texts, ``drop``ped rows, rows made ``copies`` of row 0."""
    import pandas as pd

    from llmrec_tasks.data.sample import generate_sample

    items = generate_sample().items.head(n).copy()
    for i, text in (changed or {}).items():
        items.loc[i, C.TEXT] = text
    for i in copies:
        items.loc[i, [C.TITLE, C.TEXT, C.CATEGORIES]] = items.loc[
            0, [C.TITLE, C.TEXT, C.CATEGORIES]
        ].to_numpy()
    items = items.drop(index=list(drop)).reset_index(drop=True)
    inter = pd.DataFrame(
        {C.USER_ID: ["u1"], C.ITEM_ID: [items[C.ITEM_ID].iloc[0]], C.TIMESTAMP: [0], C.WEIGHT: [1.0]}
    )
    return Dataset(items=items, interactions=inter)


def _run(
    store_uri: str, version: str, data: Dataset, **encoder: object
) -> tuple[RunConfig, Validated, Embedded]:
    cfg = RunConfig.from_dict({"data_uri": DATA_URI, "store_uri": store_uri, "encoder": encoder})
    store = open_store(store_uri)
    prefix = registry.run_prefix(cfg.namespace, version)
    write_snapshot(data, store, prefix)
    validated = validated_for(store.uri_for(prefix), version)
    return cfg, validated, embed.run_embed(cfg, validated)


@pytest.mark.slow
def test_incremental_refresh_encodes_only_changed_items(store_uri):
    _, _, first = _run(store_uri, "v1", _items(30))
    assert (first.reused, first.encoded, first.n_items) == (0, 30, 30)
    assert first.encoder["backend"] == "onnx" and first.encoder["precision"] == "fp32"
    assert first.encoder["quantized"] is False
    publish_embeddings(store_uri, "v1", first)

    # Two texts change, one item is removed, one is added (item 30 is new).
    changed = {3: "A brand new description about deep sea diving.", 7: "Another rewrite about chess."}
    new = _items(31, changed=changed, drop=(5,))
    _, _, second = _run(store_uri, "v2", new)
    assert second.reused == 27 and second.encoded == 3 and second.n_items == 30
    assert second.reused_from == "v1"

    ids, vectors = embed.read_embeddings(second)
    assert ids == new.items[C.ITEM_ID].tolist()
    assert "i00005" not in ids
    # Same as a full refresh of the same snapshot.
    full_store = (Path(store_uri.removeprefix("file://")).parent / "full").as_uri()
    _, _, full = _run(full_store, "v2", new)
    assert full.reused == 0
    full_ids, full_vectors = embed.read_embeddings(full)
    assert full_ids == ids
    np.testing.assert_allclose(vectors, full_vectors, atol=2e-5)
    keys = json.loads(open_store(store_uri).get_bytes(f"production/runs/v2/{C.EMBEDDING_KEYS}"))["keys"]
    assert len(keys) == len(ids)


@pytest.mark.slow
def test_shard_count_does_not_change_the_bytes(tmp_path):
    data = _items(40, copies=(1, 2))  # identical texts are encoded once
    one_uri = (tmp_path / "one").as_uri()
    three_uri = (tmp_path / "three").as_uri()
    _, _, one = _run(one_uri, "v1", data, batch_size=4, shards=1)
    cfg, validated, _ = _run(three_uri, "v1", data, batch_size=4, shards=3)

    # The mapped-task path: plan, shards in any order, merge.
    shards = embed.plan_shards(cfg, validated)
    assert [s.shard for s in shards] == [0, 1, 2] and all(s.count > 0 for s in shards)
    results = [embed.run_embed_shard(cfg, validated, s) for s in reversed(shards)]
    three = embed.merge_shards(cfg, validated, results)
    assert three.texts_encoded == 38 and three.encoded == 40

    def raw(result: Embedded) -> bytes:
        store = open_store(result.embeddings_uri.rsplit("/", 1)[0])
        return store.get_bytes(C.EMBEDDINGS)

    assert raw(one) == raw(three)
    with pytest.raises(StoreError, match=r"expected 0\.\.2"):
        embed.merge_shards(cfg, validated, results[:2])
