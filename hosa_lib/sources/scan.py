"""SCAN-style precomputed arrays -> store.

    <root>/{split}_ims.npy    (N, K, D) region features (SCAN: 36 x 2048)
    <root>/{split}_caps.txt   5 lines per image, image i owns lines 5i..5i+4
    <root>/{split}_boxes.npy  optional (N, K, 4) normalised boxes
    <root>/{split}_ids.txt    optional image ids, one per line
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..store import StoreError, StoreWriter
from . import canonical_split
from ..progress import bar as progress_bar

CAPS_PER_IMAGE = 5


def _load(root: Path, split: str):
    ims_path = root / f"{split}_ims.npy"
    caps_path = root / f"{split}_caps.txt"
    for p in (ims_path, caps_path):
        if not p.is_file():
            raise StoreError(f"missing SCAN file {p}")
    try:
        ims = np.load(ims_path, mmap_mode="r")
    except ValueError as e:
        raise StoreError(f"{ims_path}: unreadable or truncated ({e})") from None
    if ims.ndim != 3 or not np.issubdtype(ims.dtype, np.floating):
        raise StoreError(f"{ims_path}: expected a float (N, K, D) array, got {ims.dtype} {ims.shape}")
    caps = caps_path.read_text().splitlines()
    if len(caps) != CAPS_PER_IMAGE * len(ims):
        raise StoreError(f"{caps_path}: {len(caps)} lines, expected {CAPS_PER_IMAGE} x {len(ims)} images "
                         f"= {CAPS_PER_IMAGE * len(ims)}")
    empty = [i + 1 for i, c in enumerate(caps) if not c.strip()]
    if empty:
        raise StoreError(f"{caps_path}: empty caption on line {empty[0]}")
    boxes = None
    if (root / f"{split}_boxes.npy").is_file():
        boxes = np.load(root / f"{split}_boxes.npy")
        if boxes.shape != ims.shape[:2] + (4,) or not np.isfinite(boxes).all() or boxes.max() > 1.0 + 1e-6 \
                or boxes.min() < -1e-6:
            raise StoreError(f"{root / f'{split}_boxes.npy'}: expected normalised boxes of shape "
                             f"{ims.shape[:2] + (4,)} in [0, 1], got {boxes.shape} range "
                             f"{np.nanmin(boxes):.3g}..{np.nanmax(boxes):.3g}" + ("" if np.isfinite(boxes).all() else " with NaN/Inf"))
    ids_path = root / f"{split}_ids.txt"
    ids = ids_path.read_text().split() if ids_path.is_file() else [f"{split}_{i}" for i in range(len(ims))]
    if len(ids) != len(ims):
        raise StoreError(f"{ids_path}: {len(ids)} ids for {len(ims)} images")
    return ims, caps, boxes, ids


def convert_scan(root, store_path, splits=("train", "val", "test"), progress: bool = True) -> dict:
    root = Path(root)
    parts = [(canonical_split(s, str(root)), *_load(root, s)) for s in splits]
    k, dim = parts[0][1].shape[1:]
    for split, ims, *_ in parts:
        if ims.shape[1:] != (k, dim):
            raise StoreError(f"{root / (split + '_ims.npy')}: shape {ims.shape}, expected (N, {k}, {dim}) like the first split")
    n = sum(len(p[1]) for p in parts)
    texts, owner, all_ids, split_idx = [], [], [], {}
    with StoreWriter(store_path, n, k, dim, source="scan-precomp", feature_extractor="precomputed (SCAN arrays)") as w:
        base = 0
        for split, ims, caps, boxes, ids in parts:
            for s in progress_bar(range(0, len(ims), 256), progress, desc=f"convert {split}"):
                block = np.asarray(ims[s:s + 256], dtype=np.float32)
                if not np.isfinite(block).all():
                    bad = s + int(np.argwhere(~np.isfinite(block))[0][0])
                    raise StoreError(f"{root / (split + '_ims.npy')}: NaN/Inf in features of image {bad}")
                bx = boxes[s:s + 256] if boxes is not None else np.zeros(block.shape[:2] + (4,), np.float32)
                w.write_images(base + s, block, bx, np.full(len(block), k))
            texts += caps
            owner += [base + i // CAPS_PER_IMAGE for i in range(len(caps))]
            all_ids += ids
            split_idx.setdefault(split, []).extend(range(base, base + len(ims)))
            base += len(ims)
        w.set_images(all_ids)
        w.set_captions(texts, owner)
        w.set_splits(split_idx)
    return {"images": n, "captions": len(texts)}
