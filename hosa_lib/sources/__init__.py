"""Converters from upstream data layouts into the HDF5 store (see `hosa_lib.store`)."""
from __future__ import annotations

SPLIT_ALIASES = {"train": "train", "val": "val", "dev": "val", "test": "test", "testall": "test",
                 "restval": "restval", "all": "all"}


def canonical_split(name: str, where: str) -> str:
    from ..store import StoreError

    if name not in SPLIT_ALIASES:
        raise StoreError(f"{where}: unknown split name '{name}' (expected one of {', '.join(SPLIT_ALIASES)})")
    return SPLIT_ALIASES[name]


def repeated(values) -> list:
    """The values that occur more than once, sorted (one pass: sources hold up to ~10^5 images)."""
    from collections import Counter

    return sorted(v for v, n in Counter(values).items() if n > 1)
