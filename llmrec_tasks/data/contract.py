"""Input contract: load items/interactions/users from a folder or ``s3://`` prefix (CSV or Parquet).

Contract (see README "Input contract"):
- ``items``: item_id, title, optional text, optional categories (``|``-separated), optional updated_at
- ``interactions``: user_id, item_id, timestamp (unix seconds or ISO 8601), optional weight
  (aliases: rating, event_weight, value)
- ``users`` (optional): user_id plus any attributes
The MovieLens ``ml-latest-small`` layout (movies.csv, ratings.csv, tags.csv) is adapted on the fly;
``sample`` (or ``sample:SEED``) is the generated demo dataset.
"""

from __future__ import annotations

import io
import logging
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd

from llmrec_tasks.core import constants as C
from llmrec_tasks.core.config import is_sample_data
from llmrec_tasks.core.errors import DataContractError, StoreError
from llmrec_tasks.data.dataset import Dataset
from llmrec_tasks.data.sample import generate_sample
from llmrec_tasks.storage.store import ObjectStore, open_store

log = logging.getLogger(__name__)

# Delimiters a mis-exported CSV commonly uses instead of ','.
DELIMITERS = {";": "semicolon", "\t": "tab", "|": "pipe"}
NUL = b"\x00"


def _read_table(store: ObjectStore, name: str, *, required: bool) -> pd.DataFrame | None:
    for suffix in (".parquet", ".csv"):
        key = f"{name}{suffix}"
        if not store.exists(key):
            continue
        raw = store.get_bytes(key)
        if not raw or raw.isspace():  # not raw.strip(): that would copy a file of any size
            raise DataContractError(f"{store.uri_for(key)} is empty: expected a header and rows")
        if suffix == ".csv":
            _refuse_nul_bytes(raw, store.uri_for(key))
        try:
            if suffix == ".parquet":
                frame = pd.read_parquet(io.BytesIO(raw))
            else:
                frame = pd.read_csv(io.BytesIO(raw), dtype=str, keep_default_na=False, na_values=[""])
        except UnicodeDecodeError as exc:
            raise DataContractError(f"{store.uri_for(key)} is not UTF-8 text: re-export it as UTF-8") from exc
        except Exception as exc:  # pyarrow/pandas raise many parser types; all mean "unreadable"
            if suffix == ".parquet":
                raise DataContractError(
                    f"{store.uri_for(key)} is not a readable Parquet file (truncated or corrupt upload?): "
                    f"{str(exc).strip().rstrip('.')}. Re-export or re-upload it."
                ) from exc
            raise DataContractError(
                f"{store.uri_for(key)} cannot be parsed as csv: {str(exc).strip()}"
            ) from exc
        if suffix == ".parquet":
            _refuse_nul_values(frame, store.uri_for(key))
        return frame
    if required:
        raise DataContractError(
            f"{store.uri}: no {name}.csv or {name}.parquet found (see README 'Input contract')"
        )
    return None


def _refuse_nul_bytes(raw: bytes, uri: str) -> None:
    """Refuse CSV bytes with a NUL anywhere in them: text never has one; binary, UTF-16 or a damaged copy does.

    Scans the bytes already read in place (no copy), so the check costs no memory whatever the size.
    """
    first = raw.find(NUL)
    if first < 0:
        return
    line = raw.count(b"\n", 0, first) + 1
    raise DataContractError(
        f"{uri} contains NUL bytes ({raw.count(NUL)}, the first at byte {first}, line {line}): "
        "not UTF-8 CSV text (binary, UTF-16, or a damaged copy?); re-export it as UTF-8 CSV"
    )


def _refuse_nul_values(frame: pd.DataFrame, uri: str) -> None:
    """Refuse Parquet string values holding a NUL character.

    Parquet is binary, so its bytes are not scanned, but a NUL inside an id or text is the same damage a
    NUL byte is in a CSV (a broken writer or padded fixed-width field): it never belongs in the contract.
    """
    for column in frame.columns:
        values = frame[column]
        if not isinstance(values.dtype, pd.StringDtype):
            continue
        hits = np.flatnonzero(values.str.contains(NUL.decode(), regex=False, na=False).to_numpy(dtype=bool))
        if hits.size:
            raise DataContractError(
                f"{uri}: column {column!r} has NUL characters in {hits.size} value(s), the first in row "
                f"{hits[0]}: a damaged or mis-encoded export; fix the writer and re-export it"
            )


def _csv_bytes(store: ObjectStore, key: str) -> bytes:
    """A CSV object's bytes, refused if they hold a NUL byte."""
    raw = store.get_bytes(key)
    _refuse_nul_bytes(raw, store.uri_for(key))
    return raw


def _require_columns(frame: pd.DataFrame, required: tuple[str, ...], table: str, where: str) -> None:
    missing = [c for c in required if c not in frame.columns]
    header = [str(c) for c in frame.columns]
    delimiter = next((name for d, name in DELIMITERS.items() if len(header) == 1 and d in header[0]), None)
    if missing and delimiter:
        raise DataContractError(
            f"{where}: {table} looks {delimiter}-separated (header {header[0][:80]!r}); "
            "re-export it comma-separated"
        )
    if missing:
        raise DataContractError(
            f"{where}: {table} is missing column(s) {missing}; found {list(frame.columns)}. "
            f"If the file uses another delimiter than ',', re-export it as comma-separated."
        )


def read_raw(uri: str) -> Dataset:
    """Read the tables as they are (strings for CSV), contract columns renamed, nothing coerced."""
    if is_sample_data(uri):
        seed = int(uri.split(":", 1)[1]) if ":" in uri else 7
        return generate_sample(seed=seed)
    try:
        store = open_store(uri)
    except StoreError as exc:
        raise DataContractError(str(exc)) from exc
    except RuntimeError as exc:  # what pathlib's resolve() raises on a symlink loop (Python < 3.13)
        raise DataContractError(
            f"{uri} cannot be opened as a data folder: {exc}. Point the data URI at a real folder."
        ) from exc
    if store.exists("movies.csv") and store.exists("ratings.csv"):
        return _read_movielens(store)
    items = _read_table(store, C.ITEMS, required=True)
    interactions = _read_table(store, C.INTERACTIONS, required=True)
    users = _read_table(store, C.USERS, required=False)
    assert items is not None and interactions is not None
    for alias in C.WEIGHT_ALIASES:
        if alias in interactions.columns and C.WEIGHT not in interactions.columns:
            interactions = interactions.rename(columns={alias: C.WEIGHT})
    _require_columns(items, C.ITEM_REQUIRED, C.ITEMS, store.uri)
    _require_columns(interactions, C.INTERACTION_REQUIRED, C.INTERACTIONS, store.uri)
    if users is not None:
        _require_columns(users, (C.USER_ID,), C.USERS, store.uri)
    return Dataset(items=items, interactions=interactions, users=users)


def _read_movielens(store: ObjectStore) -> Dataset:
    """Adapt MovieLens: movies -> items (genres as categories, user tags as text), ratings -> interactions."""
    movies = pd.read_csv(io.BytesIO(_csv_bytes(store, "movies.csv")), dtype=str, keep_default_na=False)
    ratings = pd.read_csv(io.BytesIO(_csv_bytes(store, "ratings.csv")), dtype=str, keep_default_na=False)
    items = pd.DataFrame(
        {
            C.ITEM_ID: movies["movieId"],
            C.TITLE: movies["title"],
            C.CATEGORIES: movies["genres"].replace("(no genres listed)", ""),
        }
    )
    if store.exists("tags.csv"):
        tags = pd.read_csv(io.BytesIO(_csv_bytes(store, "tags.csv")), dtype=str, keep_default_na=False)
        # Distinct tags per movie, most used first: item text, not a per-user signal.
        counts = tags.assign(tag=tags["tag"].str.strip().str.lower()).groupby(["movieId", "tag"]).size()
        counts = counts.reset_index(name="n").sort_values(
            ["movieId", "n", "tag"], ascending=[True, False, True]
        )
        text = counts.groupby("movieId")["tag"].apply(lambda s: ", ".join(s.head(20)))
        items[C.TEXT] = items[C.ITEM_ID].map(text).fillna("")
    interactions = pd.DataFrame(
        {
            C.USER_ID: ratings["userId"],
            C.ITEM_ID: ratings["movieId"],
            C.TIMESTAMP: ratings["timestamp"],
            C.WEIGHT: ratings["rating"],
        }
    )
    return Dataset(items=items, interactions=interactions)


def parse_timestamps(values: pd.Series) -> pd.Series:
    """Unix seconds (int-like strings) or ISO 8601 -> tz-aware UTC; unparseable -> NaT."""
    as_str = values.astype("string")
    numeric = pd.to_numeric(as_str, errors="coerce")
    from_unix = pd.to_datetime(numeric, unit="s", utc=True, errors="coerce")
    iso_mask = numeric.isna() & as_str.notna()
    if iso_mask.any():
        from_iso = pd.to_datetime(as_str[iso_mask], utc=True, errors="coerce", format="ISO8601")
        from_unix = from_unix.copy()
        from_unix[iso_mask] = from_iso
    return from_unix


def normalize(raw: Dataset) -> Dataset:
    """Coerce a raw dataset to the typed contract (run after validation passed)."""
    items = raw.items.copy()
    items[C.ITEM_ID] = items[C.ITEM_ID].astype(str).str.strip()
    items[C.TITLE] = items[C.TITLE].fillna("").astype(str).str.strip()
    for col in (C.TEXT, C.CATEGORIES):
        items[col] = items[col].fillna("").astype(str).str.strip() if col in items.columns else ""
    if C.UPDATED_AT in items.columns:
        items[C.UPDATED_AT] = parse_timestamps(items[C.UPDATED_AT])
    items = items.drop_duplicates(C.ITEM_ID, keep="last").reset_index(drop=True)

    inter = raw.interactions.copy()
    inter[C.USER_ID] = inter[C.USER_ID].astype(str).str.strip()
    inter[C.ITEM_ID] = inter[C.ITEM_ID].astype(str).str.strip()
    inter[C.TIMESTAMP] = parse_timestamps(inter[C.TIMESTAMP])
    if C.WEIGHT in inter.columns:
        inter[C.WEIGHT] = pd.to_numeric(inter[C.WEIGHT], errors="coerce").fillna(1.0).astype(float)
    else:
        inter[C.WEIGHT] = 1.0
    inter = inter.dropna(subset=[C.TIMESTAMP])
    inter = inter[inter[C.ITEM_ID].isin(items[C.ITEM_ID])]
    cols = [C.USER_ID, C.ITEM_ID, C.TIMESTAMP, C.WEIGHT]
    inter = inter[cols].sort_values([C.TIMESTAMP, C.USER_ID, C.ITEM_ID], kind="stable").reset_index(drop=True)
    users = None
    if raw.users is not None:
        users = raw.users.copy()
        users[C.USER_ID] = users[C.USER_ID].astype(str).str.strip()
    return Dataset(items=items, interactions=inter, users=users)


def apply_cutoff(data: Dataset, cutoff: datetime | None) -> Dataset:
    """Keep interactions at or before ``cutoff`` (the run's data interval end)."""
    if cutoff is None:
        return data
    ts = pd.Timestamp(cutoff)
    ts = ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")
    inter = data.interactions[data.interactions[C.TIMESTAMP] <= ts].reset_index(drop=True)
    return Dataset(items=data.items, interactions=inter, users=data.users)


def write_snapshot(data: Dataset, store: ObjectStore, prefix: str) -> dict[str, str]:
    """Write the typed snapshot as Parquet; returns the URIs later stages read."""
    uris = {}
    for name, frame in ((C.ITEMS, data.items), (C.INTERACTIONS, data.interactions), (C.USERS, data.users)):
        if frame is None:
            continue
        buf = io.BytesIO()
        frame.to_parquet(buf, index=False)
        key = f"{prefix}/{C.SNAPSHOT_DIR}/{name}.parquet"
        store.put_bytes(key, buf.getvalue())
        uris[name] = store.uri_for(key)
    return uris


def read_snapshot(snapshot_uri: str) -> Dataset:
    """Read a snapshot folder written by :func:`write_snapshot`."""
    store = open_store(snapshot_uri)
    frames = {}
    for name in (C.ITEMS, C.INTERACTIONS, C.USERS):
        key = f"{name}.parquet"
        if store.exists(key):
            frames[name] = pd.read_parquet(io.BytesIO(store.get_bytes(key)))
    if C.ITEMS not in frames or C.INTERACTIONS not in frames:
        raise DataContractError(f"{snapshot_uri} is not a complete snapshot (items/interactions missing)")
    return Dataset(frames[C.ITEMS], frames[C.INTERACTIONS], frames.get(C.USERS))


def item_texts(items: pd.DataFrame) -> list[str]:
    """The text each item is encoded from: title, then text fields, then categories."""
    cats = items[C.CATEGORIES].str.replace(C.CATEGORY_SEPARATOR, ", ", regex=False)
    text = items[C.TEXT].str.rstrip(". ")
    parts = items[C.TITLE].str.rstrip(". ") + np.where(text != "", ". " + text, "")
    parts = parts + np.where(cats != "", ". Categories: " + cats, "")
    return parts.tolist()


def load_local_folder(path: Path) -> Dataset:
    """Convenience for notebooks and tests: read + normalize a local folder."""
    return normalize(read_raw(path.resolve().as_uri()))
