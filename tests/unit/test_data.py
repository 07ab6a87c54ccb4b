import re
from datetime import UTC, datetime

import pandas as pd
import pytest

from llmrec_tasks.core import constants as C
from llmrec_tasks.core.errors import DataContractError
from llmrec_tasks.data.contract import (
    apply_cutoff,
    item_texts,
    normalize,
    parse_timestamps,
    read_raw,
    read_snapshot,
    write_snapshot,
)
from llmrec_tasks.data.sample import write_sample
from llmrec_tasks.storage.store import open_store


def test_parse_timestamps_accepts_unix_and_iso_and_flags_garbage():
    parsed = parse_timestamps(pd.Series(["0", "2026-01-02T03:04:05Z", "soon", None]))
    assert parsed[0] == pd.Timestamp("1970-01-01", tz="UTC")
    assert parsed[1] == pd.Timestamp("2026-01-02 03:04:05", tz="UTC")
    assert parsed[2:].isna().all()


def test_contract_folder_csv_round_trip(tmp_path, sample_data):
    write_sample(tmp_path / "in")
    data = normalize(read_raw((tmp_path / "in").as_uri()))
    assert len(data.items) == len(sample_data.items)
    assert data.fingerprint() == sample_data.fingerprint()
    assert data.interactions[C.TIMESTAMP].dt.tz is not None


def test_parquet_and_rating_alias(tmp_path):
    (tmp_path / "in").mkdir()
    pd.DataFrame({"item_id": [1, 2], "title": ["A", "B"]}).to_parquet(tmp_path / "in/items.parquet")
    pd.DataFrame({"user_id": [1], "item_id": [2], "timestamp": [10], "rating": [4.5]}).to_parquet(
        tmp_path / "in/interactions.parquet"
    )
    data = normalize(read_raw(str(tmp_path / "in")))
    assert data.interactions[C.WEIGHT].tolist() == [4.5]
    assert data.items[C.ITEM_ID].tolist() == ["1", "2"]


def test_missing_table_and_missing_column_are_clear(tmp_path):
    (tmp_path / "in").mkdir()
    with pytest.raises(DataContractError, match=r"no items\.csv or items\.parquet"):
        read_raw(str(tmp_path / "in"))
    (tmp_path / "in/items.csv").write_text("id,title\n1,A\n")
    (tmp_path / "in/interactions.csv").write_text("user_id,item_id,timestamp\n1,1,5\n")
    with pytest.raises(DataContractError, match=r"missing column\(s\) \['item_id'\]"):
        read_raw(str(tmp_path / "in"))


def test_cutoff_keeps_only_the_past(sample_data):
    cutoff = datetime(2026, 7, 1, tzinfo=UTC)
    cut = apply_cutoff(sample_data, cutoff)
    assert 0 < len(cut.interactions) < len(sample_data.interactions)
    assert (cut.interactions[C.TIMESTAMP] <= pd.Timestamp(cutoff)).all()


def test_snapshot_round_trip(sample_data, store_uri):
    store = open_store(store_uri)
    uris = write_snapshot(sample_data, store, "ns/runs/v1")
    back = read_snapshot(uris[C.ITEMS].rsplit("/", 1)[0])
    assert back.fingerprint() == sample_data.fingerprint()


def test_item_texts_join_title_text_and_categories():
    items = pd.DataFrame({C.TITLE: ["Dune."], C.TEXT: ["Spice"], C.CATEGORIES: ["Sci-Fi|Drama"]})
    assert item_texts(items) == ["Dune. Spice. Categories: Sci-Fi, Drama"]


def test_movielens_adapter(movielens_dir):
    data = normalize(read_raw(str(movielens_dir)))
    assert len(data.items) == 9742
    assert len(data.interactions) == 100836
    toy = data.items.set_index(C.ITEM_ID).loc["1"]
    assert "Animation" in toy[C.CATEGORIES] and toy[C.TEXT]


def test_a_nul_byte_anywhere_in_a_csv_is_refused_with_its_line(tmp_path):
    folder = write_sample(tmp_path / "in")
    path = folder / "interactions.csv"
    lines = path.read_bytes().splitlines(keepends=True)
    lines[9000] = lines[9000].replace(b",", b"\x00,", 1)  # far past the first 64 kB
    path.write_bytes(b"".join(lines))
    first = sum(map(len, lines[:9000])) + lines[9000].index(b"\x00")
    with pytest.raises(DataContractError, match=rf"NUL bytes \(1, the first at byte {first}, line 9001\)"):
        read_raw(str(folder))


def test_a_nul_byte_in_a_movielens_file_is_refused(tmp_path):
    (tmp_path / "movies.csv").write_text("movieId,title,genres\n1,Toy Story (1995),Animation\n")
    (tmp_path / "ratings.csv").write_bytes(b"userId,movieId,rating,timestamp\n1,1,4.0,9\x0064982703\n")
    with pytest.raises(DataContractError, match=r"ratings\.csv contains NUL bytes \(1, .* line 2\)"):
        read_raw(str(tmp_path))


def test_parquet_nul_in_a_string_is_refused_but_binary_columns_may_hold_nul(tmp_path):
    (tmp_path / "in").mkdir()
    items = pd.DataFrame({"item_id": ["1", "2"], "title": ["A", "B"], "blob": [b"\x00\x01", b"\x00"]})
    items.to_parquet(tmp_path / "in/items.parquet")
    inter = pd.DataFrame({"user_id": ["u1", "u2"], "item_id": ["2", "1"], "timestamp": [10, 11]})
    inter.to_parquet(tmp_path / "in/interactions.parquet")
    assert read_raw(str(tmp_path / "in")).items["blob"].tolist() == [b"\x00\x01", b"\x00"]

    inter.assign(item_id=["2", "1\x00"]).to_parquet(tmp_path / "in/interactions.parquet")
    with pytest.raises(
        DataContractError, match=r"column 'item_id' has NUL characters in 1 value\(s\), the first in row 1"
    ):
        read_raw(str(tmp_path / "in"))


def test_a_symlink_loop_as_data_folder_is_a_contract_error_naming_it(tmp_path):
    loop = tmp_path / "loop"
    loop.symlink_to("loop")
    with pytest.raises(
        DataContractError, match=rf"{re.escape(str(loop))} cannot be opened as a data folder: Symlink loop"
    ):
        read_raw(str(loop))


def test_a_whitespace_only_file_is_empty(tmp_path):
    folder = write_sample(tmp_path / "in")
    (folder / "items.csv").write_bytes(b"\n  \r\n")
    with pytest.raises(DataContractError, match=r"items\.csv is empty"):
        read_raw(str(folder))
