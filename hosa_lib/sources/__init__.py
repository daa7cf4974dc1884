"""Converters from upstream data layouts into the HDF5 store (see `hosa_lib.store`)."""
from __future__ import annotations

SPLIT_ALIASES = {"train": "train", "val": "val", "dev": "val", "test": "test", "testall": "test",
                 "restval": "restval", "all": "all"}


def canonical_split(name: str, where: str) -> str:
    from ..store import StoreError

    if name not in SPLIT_ALIASES:
        raise StoreError(f"{where}: unknown split name '{name}' (expected one of {', '.join(SPLIT_ALIASES)})")
    return SPLIT_ALIASES[name]
