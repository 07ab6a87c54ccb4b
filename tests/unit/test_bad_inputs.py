"""The bad-input corpus: every kind of broken input fails at validation (or at load, clearly).

Each case starts from the generated sample written as contract files, breaks it one way, and runs
`validate` into a store that already holds a published production bundle. The run must fail with
the expected error, keep its validation report (GX failures), and leave every other byte of the
store, `current.json` included, unchanged.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from llmrec_tasks.core import constants as C
from llmrec_tasks.core.config import RunConfig
from llmrec_tasks.core.errors import DataContractError, LlmrecError, ValidationFailedError
from llmrec_tasks.data.sample import write_sample
from llmrec_tasks.data.validate import run_validate
from llmrec_tasks.storage.registry import bundle_prefix, current_key
from llmrec_tasks.storage.store import open_store

PUBLISHED = "20261027T000000Z-0123abcd-456789"
Breaker = Callable[[Path], None]


def edit_csv(folder: Path, table: str, change: Callable[[pd.DataFrame], pd.DataFrame]) -> None:
    """Rewrite ``<table>.csv`` as ``change`` of its rows."""
    path = folder / f"{table}.csv"
    change(pd.read_csv(path, dtype=str, keep_default_na=False)).to_csv(path, index=False)


def replace(table: str, column: str, value: str, where: Callable[[pd.DataFrame], Any]) -> Breaker:
    """A breaker that sets ``column`` to ``value`` on the rows ``where`` selects."""
    return lambda folder: edit_csv(
        folder, table, lambda f: f.assign(**{column: f[column].mask(where(f), value)})
    )


def rows(start: int, stop: int) -> Callable[[pd.DataFrame], Any]:
    return lambda f: (f.index >= start) & (f.index < stop)


def every(n: int, offset: int = 0) -> Callable[[pd.DataFrame], Any]:
    return lambda f: f.index % n == offset


def drop_column(folder: Path) -> None:
    edit_csv(folder, C.INTERACTIONS, lambda f: f.drop(columns=[C.TIMESTAMP]))


def duplicate_interactions(folder: Path) -> None:
    edit_csv(folder, C.INTERACTIONS, lambda f: pd.concat([f, f.sample(frac=0.1, random_state=1)]))


def volume_drop(folder: Path) -> None:
    edit_csv(folder, C.INTERACTIONS, lambda f: f.sample(frac=0.1, random_state=2))


def empty_file(folder: Path) -> None:
    (folder / "items.csv").write_bytes(b"")


def header_only(folder: Path) -> None:
    (folder / "interactions.csv").write_text("user_id,item_id,timestamp,weight\n")


def semicolons(folder: Path) -> None:
    path = folder / "interactions.csv"
    pd.read_csv(path, dtype=str).to_csv(path, sep=";", index=False)


def latin1(folder: Path) -> None:
    path = folder / "items.csv"
    path.write_bytes(path.read_text().replace("Savory", "Savoury café").encode("latin-1"))


def utf16(folder: Path) -> None:
    path = folder / "items.csv"
    path.write_bytes(path.read_text().encode("utf-16"))


def truncated_parquet(folder: Path) -> None:
    frame = pd.read_csv(folder / "interactions.csv", dtype=str)
    (folder / "interactions.csv").unlink()
    buf = io.BytesIO()
    frame.to_parquet(buf, index=False)
    (folder / "interactions.parquet").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])


def boolean_timestamps_parquet(folder: Path) -> None:
    """Wrong column type in a typed file: timestamps stored as booleans."""
    frame = pd.read_csv(folder / "interactions.csv", dtype=str)
    (folder / "interactions.csv").unlink()
    frame[C.TIMESTAMP] = True
    frame.to_parquet(folder / "interactions.parquet", index=False)


def nul_after_head(folder: Path) -> None:
    """One NUL byte well past the first 64 kB: the start of some line of interactions.csv."""
    path = folder / "interactions.csv"
    raw = path.read_bytes()
    at = raw.index(b"\n", 100_000) + 1
    path.write_bytes(raw[:at] + b"\x00" + raw[at:])


def nul_in_parquet_value(folder: Path) -> None:
    frame = pd.read_csv(folder / "interactions.csv", dtype=str)
    (folder / "interactions.csv").unlink()
    frame.loc[3000, C.USER_ID] = "u0001\x00"
    frame.to_parquet(folder / "interactions.parquet", index=False)


def symlink_loop(folder: Path) -> None:
    """The data folder becomes ``ln -s in in``: a link to itself."""
    shutil.rmtree(folder)
    folder.symlink_to(folder.name)


def missing_items_table(folder: Path) -> None:
    (folder / "items.csv").unlink()


def duplicate_users(folder: Path) -> None:
    (folder / "users.csv").write_text(
        "user_id,country\n" + "".join(f"u{n % 300:04d},NL\n" for n in range(400))
    )


# id, how to break the input, expected error type, pattern its message must match.
CASES = [
    ("missing_column", drop_column, DataContractError,
     r"interactions is missing column\(s\) \['timestamp'\]"),
    ("missing_table", missing_items_table, DataContractError, r"no items\.csv or items\.parquet found"),
    ("wrong_type_rating", replace(C.INTERACTIONS, C.WEIGHT, "five", rows(0, 40)), ValidationFailedError,
     r"weight/rating is a number.*'five'"),
    ("wrong_type_parquet", boolean_timestamps_parquet, ValidationFailedError,
     r"timestamp parses \(unix seconds or ISO 8601\).*'True'"),
    ("null_user_ids", replace(C.INTERACTIONS, C.USER_ID, "", rows(10, 30)), ValidationFailedError,
     r"interactions\.user_id 'user_id present \(not blank\)': 20 of \d+ rows.*row 10"),
    ("null_item_ids", replace(C.ITEMS, C.ITEM_ID, " ", rows(0, 2)), ValidationFailedError,
     r"items\.item_id 'item_id present \(not blank\)'"),
    ("duplicate_item_ids", replace(C.ITEMS, C.ITEM_ID, "i00000", every(50, 1)), ValidationFailedError,
     r"'item_id unique'.*'i00000'"),
    ("duplicate_interactions", duplicate_interactions, ValidationFailedError,
     r"no duplicate \(user_id, item_id, timestamp\)"),
    ("unknown_items", replace(C.INTERACTIONS, C.ITEM_ID, "ghost-item", rows(0, 800)), ValidationFailedError,
     r"item_id exists in the catalog \(at most 1\.0% orphans\)': 800 of .*'ghost-item'"),
    ("future_timestamps", replace(C.INTERACTIONS, C.TIMESTAMP, "2035-01-01T00:00:00Z", rows(0, 5)),
     ValidationFailedError, r"timestamp not in the future.*2035-01-01"),
    ("ancient_timestamps", replace(C.INTERACTIONS, C.TIMESTAMP, "86400", rows(0, 5)), ValidationFailedError,
     r"timestamp not before 1990-01-01 \(ancient\).*1970-01-02"),
    ("unparseable_timestamps", replace(C.INTERACTIONS, C.TIMESTAMP, "yesterday", rows(0, 5)),
     ValidationFailedError, r"timestamp parses.*'yesterday'"),
    ("out_of_range_ratings", replace(C.INTERACTIONS, C.WEIGHT, "11", rows(0, 5)), ValidationFailedError,
     r"weight/rating within \[0, 5\]': 5 of .*11"),
    ("empty_file", empty_file, DataContractError, r"items\.csv is empty"),
    ("header_only", header_only, ValidationFailedError,
     r"interactions\.\(table\) 'there are interactions': 0"),
    ("wrong_delimiter", semicolons, DataContractError, r"interactions looks semicolon-separated"),
    ("non_utf8", latin1, DataContractError, r"items\.csv is not UTF-8 text"),
    ("utf16", utf16, DataContractError, r"items\.csv contains NUL bytes"),
    ("truncated_parquet", truncated_parquet, DataContractError,
     r"interactions\.parquet is not a readable Parquet file \(truncated"),
    ("absurdly_long_text", replace(C.ITEMS, C.TEXT, "lorem ipsum " * 100_000, rows(3, 4)),
     ValidationFailedError,
     r"text at most 20000 characters': 1 of 720 rows.*1200000"),
    ("empty_title", replace(C.ITEMS, C.TITLE, "  ", rows(5, 8)), ValidationFailedError,
     r"title present \(item text not empty\)': 3 of 720"),
    ("volume_drop_90pct", volume_drop, ValidationFailedError,
     r"interactions\.\(table\) 'row count within \[\d+, \d+\] \(previous run: \d+\)'"),
    ("category_drift", replace(C.ITEMS, C.CATEGORIES, "Space", lambda f: f.index % 4 != 0),
     ValidationFailedError,
     r"item_categories\.category 'category distribution close to the previous run's \(KL <= 0\.25\)': \d"),
    ("popularity_drift", replace(C.INTERACTIONS, C.ITEM_ID, "i00000", every(2, 1)), ValidationFailedError,
     r"on_top_item +share of interactions on the top 1% items within"),
    ("duplicate_users", duplicate_users, ValidationFailedError, r"users\.user_id 'user_id unique'"),
    ("nul_after_64k", nul_after_head, DataContractError,
     r"interactions\.csv contains NUL bytes \(1, the first at byte 1\d{5}, line \d+\)"),
    ("nul_in_parquet_value", nul_in_parquet_value, DataContractError,
     r"interactions\.parquet: column 'user_id' has NUL characters in 1 value\(s\), the first in row 3000"),
    ("symlink_loop", symlink_loop, DataContractError,
     r"/in cannot be opened as a data folder: Symlink loop from '[^']*/in'"),
    ("millisecond_timestamps", replace(C.INTERACTIONS, C.TIMESTAMP, "1780000000000", rows(0, 5)),
     ValidationFailedError,
     r"'timestamp in unix seconds \(these look like milliseconds: divide by 1,000\)': 5 of .*'1780000000000'"),
    ("microsecond_timestamps", replace(C.INTERACTIONS, C.TIMESTAMP, "1780000000000000", rows(0, 5)),
     ValidationFailedError,
     r"'timestamp in unix seconds \(these look like microseconds: divide by 1,000,000\)': 5 of "),
    ("overlong_user_id", replace(C.INTERACTIONS, C.USER_ID, "u" * 10_000, rows(0, 1)), ValidationFailedError,
     r"interactions\.user_id 'user_id at most 256 characters': 1 of \d+ rows.*'uuuu"),
]  # fmt: skip


def tree(root: Path) -> dict[str, str]:
    """Every file under ``root`` (hidden ones too) -> its sha256."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def production(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(good input folder, store with a published bundle whose stats come from the good input)."""
    base = tmp_path_factory.mktemp("corpus")
    good = write_sample(base / "good")
    scratch = run_validate(RunConfig(data_uri=str(good), store_uri=(base / "scratch").as_uri()))
    store_root = base / "store"
    store = open_store(store_root.as_uri())
    bundle = bundle_prefix(C.DEFAULT_NAMESPACE, PUBLISHED)
    store.put_bytes(f"{bundle}/{C.VALIDATION_STATS}", Path(scratch.validation_stats_uri[7:]).read_bytes())
    for name in (C.RANKER_MODEL, C.EMBEDDINGS, C.MANIFEST):
        store.put_bytes(f"{bundle}/{name}", hashlib.sha256(name.encode()).digest() * 64)
    store.put_bytes(current_key(C.DEFAULT_NAMESPACE), json.dumps({"version": PUBLISHED}).encode())
    return good, store_root


def test_the_corpus_is_large_enough():
    assert len({case[0] for case in CASES}) == len(CASES) >= 15


@pytest.mark.parametrize("name, breaker, error, pattern", CASES, ids=[c[0] for c in CASES])
def test_bad_input_fails_and_publishes_nothing(production, tmp_path, name, breaker, error, pattern):
    good, published_store = production
    folder = shutil.copytree(good, tmp_path / "in")
    store_root = shutil.copytree(published_store, tmp_path / "store")
    before = tree(store_root)
    breaker(folder)

    with pytest.raises(LlmrecError) as caught:
        run_validate(RunConfig(data_uri=str(folder), store_uri=store_root.as_uri()))

    assert type(caught.value) is error, str(caught.value)
    message = str(caught.value)
    assert re.search(pattern, message, re.DOTALL), message
    after = tree(store_root)
    assert after[current_key(C.DEFAULT_NAMESPACE)] == before[current_key(C.DEFAULT_NAMESPACE)]
    if error is DataContractError:
        assert after == before
        return
    # The failed run keeps its report where a user can open it, and writes nothing else.
    report = caught.value.report_uri
    assert report and report in message.splitlines()[0]
    version = re.search(r"/runs/([^/]+)/", report).group(1)
    own = f"{C.DEFAULT_NAMESPACE}/runs/{version}/validation"
    assert {k: v for k, v in after.items() if not k.startswith(own)} == before
    assert Path(report.removeprefix("file://")).is_file()
    summary = json.loads((store_root / own).with_suffix(".json").read_text())
    assert summary["success"] is False and summary["previous"]["version"] == PUBLISHED


def test_pipeline_run_stops_at_validation(production, tmp_path):
    """End to end: the whole pipeline on a bad input fails in `validate`, before any other stage."""
    from llmrec_tasks.pipeline import run_pipeline

    good, published_store = production
    folder = shutil.copytree(good, tmp_path / "in")
    store_root = shutil.copytree(published_store, tmp_path / "store")
    before = tree(store_root)
    replace(C.INTERACTIONS, C.WEIGHT, "-3", rows(0, 10))(folder)

    with pytest.raises(ValidationFailedError, match=r"weight/rating within \[0, 5\]': 10 of") as caught:
        run_pipeline(RunConfig(data_uri=str(folder), store_uri=store_root.as_uri()))
    own = re.search(r"(production/runs/[^/]+/validation)", caught.value.report_uri).group(1)
    assert {k: v for k, v in tree(store_root).items() if not k.startswith(own)} == before
