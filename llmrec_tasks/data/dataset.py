"""The dataset container every reader returns (its own module so that readers and the sample
generator can share it without importing each other)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pandas as pd


@dataclass
class Dataset:
    """Typed frames: ids are strings, timestamps tz-aware UTC, weight float."""

    items: pd.DataFrame
    interactions: pd.DataFrame
    users: pd.DataFrame | None = None

    def fingerprint(self) -> str:
        """Content hash of the snapshot: same data, same fingerprint (row order ignored)."""
        digest = hashlib.sha256()
        for frame in (self.items, self.interactions):
            hashed = pd.util.hash_pandas_object(frame.reset_index(drop=True), index=False).to_numpy()
            digest.update(np.sort(hashed).tobytes())
            digest.update(",".join(frame.columns).encode())
        return digest.hexdigest()[:16]
