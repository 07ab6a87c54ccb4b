"""Leave-one-out split rules, the embedding cache and the printed table."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from llmrec_tasks.core import constants as C
from llmrec_tasks.core.config import EncoderConfig
from llmrec_tasks.core.errors import ConfigError, DataContractError
from llmrec_tasks.data.contract import Dataset
from llmrec_tasks.ranking import benchmark
from llmrec_tasks.ranking.benchmark import cached_embeddings, format_table, k_core, loo_split, run_benchmark


def _frame(rows: list[tuple[str, str, int]]) -> pd.DataFrame:
    users, items, ts = zip(*rows, strict=True)
    return pd.DataFrame(
        {
            C.USER_ID: users,
            C.ITEM_ID: items,
            C.TIMESTAMP: pd.to_datetime(ts, unit="s", utc=True),
            C.WEIGHT: 1.0,
        }
    )


def test_k_core_is_iterative():
    # Item "z" has 1 user; dropping it leaves user "c" with 1 interaction, so "c" goes too.
    frame = _frame([("a", "x", 1), ("a", "y", 2), ("b", "x", 1), ("b", "y", 2), ("c", "y", 3), ("c", "z", 4)])
    kept = k_core(frame, 2)
    assert sorted(kept[C.USER_ID].unique()) == ["a", "b"]
    assert sorted(kept[C.ITEM_ID].unique()) == ["x", "y"]
    kept = k_core(frame, 3)
    assert kept.empty


def test_loo_split_orders_by_time_then_item_id_and_drops_untitled_items():
    items = pd.DataFrame(
        {C.ITEM_ID: [str(i) for i in range(1, 13)], C.TITLE: ["t"] * 11 + [""], C.TEXT: "", C.CATEGORIES: ""}
    )
    rows = []
    for u in range(6):
        # Same timestamp for items 10 and 9: item 9 comes first (numeric order), so 10 is the test item.
        rows += [(f"u{u}", str(i), i) for i in range(1, 9)] + [(f"u{u}", "10", 100), (f"u{u}", "9", 100)]
        rows.append((f"u{u}", "12", 1))  # untitled item: dropped
    data = Dataset(items=items, interactions=_frame(rows))
    loo = loo_split(data, min_count=5)
    assert loo.n_users == 6 and "12" not in set(loo.item_index)
    test_items = loo.item_index[loo.events.item[loo.pos == 0]]
    valid_items = loo.item_index[loo.events.item[loo.pos == 1]]
    assert set(test_items) == {"10"} and set(valid_items) == {"9"}
    assert (np.bincount(loo.events.user) == 10).all()


def test_loo_split_refuses_tiny_data():
    items = pd.DataFrame({C.ITEM_ID: ["1"], C.TITLE: ["t"], C.TEXT: "", C.CATEGORIES: ""})
    with pytest.raises(DataContractError, match="too small"):
        loo_split(Dataset(items=items, interactions=_frame([("u", "1", 1)])))


def test_embeddings_are_cached_by_text_model_and_backend(tmp_path, monkeypatch):
    calls = []

    def fake_encode(texts, cfg):
        calls.append(len(texts))
        return np.ones((len(texts), 4), dtype=np.float32)

    monkeypatch.setattr("llmrec_tasks.text.embed.encode_texts", fake_encode)
    monkeypatch.setattr("llmrec_tasks.text.embed.encoder_identity", lambda model: f"fake:{model}")
    items = pd.DataFrame({C.ITEM_ID: ["1", "2"], C.TITLE: ["A", "B"], C.TEXT: "", C.CATEGORIES: ""})
    first = cached_embeddings(items, EncoderConfig(), tmp_path)
    again = cached_embeddings(items, EncoderConfig(), tmp_path)
    assert calls == [2] and np.array_equal(first, again)
    cached_embeddings(items.assign(**{C.TITLE: ["A", "C"]}), EncoderConfig(), tmp_path)
    cached_embeddings(items, EncoderConfig(model="other"), tmp_path)
    cached_embeddings(items, EncoderConfig(backend="onnx-int8"), tmp_path)
    assert calls == [2, 2, 2, 2]


def test_unknown_protocol_is_refused():
    with pytest.raises(ConfigError, match="protocol"):
        run_benchmark("sample", protocol="kfold")
    assert benchmark.PROTOCOLS == ("loo", "time", "new-items")


def test_format_table_lists_models_best_first():
    def model(ndcg: float) -> dict:
        return {
            "ndcg@10": ndcg,
            "recall@10": ndcg,
            "recall@50": ndcg,
            "mrr": ndcg,
            "coverage@10": 0.1,
            "ndcg@10_std": 0.0,
            "ndcg@10_ci95": [0, 1],
            "recall@10_ci95": [0, 1],
            "runs": 5,
            "slices": {"cold_items": {"ndcg@10": 0.01}},
        }

    table = format_table(
        {
            "protocol": "loo",
            "models": {"popularity": model(0.02), "ranker": model(0.1)},
            "candidate_recall": {"test": {"next": 0.3, "all": 0.5}},
            "baselines_tuned": {
                "popularity": {
                    "params": {"window_days": 30},
                    "valid_ndcg@10": 0.03,
                    "grid": [{}] * 4,
                    "seconds": 0.5,
                }
            },
        }
    )
    lines = table.splitlines()
    assert lines[2].startswith("ranker") and lines[3].startswith("popularity")
    assert "mean over 5 seed(s)" in table and "all 0.500" in table
    assert (
        "popularity tuned on validation: popularity last 30 days (valid_ndcg@10 0.0300, 4 grid points"
        in table
    )


def test_format_table_names_sasrecs_chosen_params_and_time():
    from tests.unit.test_report import SASREC_INFO, _model

    result = {
        "protocol": "loo",
        "models": {"sasrec": _model(0.08), "ranker": _model(0.1)},
        "sasrec": SASREC_INFO,
    }
    line = format_table(result).splitlines()[-1]
    assert line == (
        "sasrec: hidden 64, layers 2, max_len 200, dropout 0.2; best epoch 12 of 16, valid NDCG@10 0.0810; "
        "grid of 4 tuned in 140s (2 thread(s), cpu, seed 42)"
    )


def test_benchmark_settings_from_the_command_line():
    from llmrec_tasks.cli import _benchmark_configs

    default = _benchmark_configs([])
    assert default["sasrec_cfg"].enabled and default["ranker_cfg"] == benchmark.RankerConfig()
    configs = _benchmark_configs(["sasrec_enabled=false", "sasrec-device=cuda", "ranker_num_leaves=7"])
    assert not configs["sasrec_cfg"].enabled and configs["sasrec_cfg"].device == "cuda"
    assert configs["ranker_cfg"].num_leaves == 7
    assert default["newitems_cfg"] == benchmark.NewItemsConfig()
    newitems = _benchmark_configs(["newitems_fraction=0.2", "newitems-simulated-fraction=0"])["newitems_cfg"]
    assert newitems.fraction == 0.2 and newitems.simulated_fraction == 0.0
    with pytest.raises(ConfigError, match="newitems_fraction must be in"):
        _benchmark_configs(["newitems_fraction=0.9"])
    with pytest.raises(
        ConfigError, match="the benchmark takes encoder, ranker, sasrec, seq and newitems settings only"
    ):
        _benchmark_configs(["promote=false"])
    with pytest.raises(ConfigError, match="sasrec_device must be one of cpu, cuda"):
        _benchmark_configs(["sasrec_device=tpu"])
