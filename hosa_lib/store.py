"""The HDF5 data store: one file per dataset, the only format training and evaluation read.

Layout (schema version 1):
    attrs: schema_version, name, source, feature_extractor, created, code_version[, image_root]
    images/features   (N, K, D) float16   region features, zero beyond n_regions (float32 for TERAN reproduction)
    images/boxes      (N, K, 4) float32   normalised (x1, y1, x2, y2) in [0, 1]
    images/n_regions  (N,) int32
    images/ids        (N,) str
    images/pooled     (N, D) float16      optional pooled (global) CNN vector
    images/files      (N,) str            optional file names relative to attrs image_root
    captions/text     (C,) str
    captions/image    (C,) int64          explicit caption -> image index (never "5 per image")
    splits/<name>     (n,) int64          image indices of a split
    relevance/<split>/<method> (C_split, N_split) float32   NDCG relevance (rougeL, spice)
    text/<key>/hidden (C, T, H) float16, text/<key>/mask (C, T) bool, text/<key>/words (C, T) bool
    extra/<name>      any array (e.g. swap_pairs for synthetic scenes)

This is the only module that touches HDF5 (the import-graph test enforces it): other modules read
through `Store` / `RowReader` and write through `StoreWriter`, `write_text_cache`,
`write_relevance` and the embedding cache (`save_embeddings` / `load_embeddings`).

Writes are atomic: everything goes to a temporary file in the same folder that is renamed over
the final name only after it validated, so a crash or Ctrl-C leaves the previous store intact.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import os
import shutil
from pathlib import Path

import h5py
import numpy as np

from . import code_version

SCHEMA_VERSION = 1
STR = h5py.string_dtype("utf-8")


class StoreError(ValueError):
    """A store (or a source being converted into one) is malformed; the message names file and key."""


# ----------------------------------------------------------------------------- writing
class StoreWriter:
    """Create a store atomically. Use as a context manager; the final file appears on success only.

    >>> with StoreWriter(path, n_images, max_regions, dim, source="scan", feature_extractor="bottom-up") as w:
    ...     w.write_images(0, feats, boxes, n_regions)
    ...     w.set_images(ids); w.set_captions(texts, image_index); w.set_splits({"test": idx})
    """

    def __init__(self, path, n_images: int, max_regions: int, dim: int, *, source: str,
                 feature_extractor: str, name: str | None = None, pooled: bool = False,
                 tmp_path: Path | None = None, resume: bool = False, dtype: str = "float16"):
        self.path = Path(path)
        self.tmp = Path(tmp_path) if tmp_path else self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume and self.tmp.exists():
            self.f = h5py.File(self.tmp, "r+")
            return
        self.f = h5py.File(self.tmp, "w")
        a = self.f.attrs
        a["schema_version"] = SCHEMA_VERSION
        a["name"] = name or self.path.stem
        a["source"] = source
        a["feature_extractor"] = feature_extractor
        a["created"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        a["code_version"] = code_version()
        g = self.f.create_group("images")
        if dtype not in ("float16", "float32"):
            raise StoreError(f"{self.path}: feature dtype {dtype!r}, expected float16 or float32")
        g.create_dataset("features", (n_images, max_regions, dim), dtype=dtype,
                         chunks=(1, max_regions, dim))
        g.create_dataset("boxes", (n_images, max_regions, 4), dtype="float32")
        g.create_dataset("n_regions", (n_images,), dtype="int32")
        if pooled:
            g.create_dataset("pooled", (n_images, dim), dtype="float16")
        self.f.attrs["images_written"] = 0

    # -- content
    def write_images(self, start: int, feats: np.ndarray, boxes: np.ndarray, n_regions: np.ndarray,
                     pooled: np.ndarray | None = None) -> None:
        g = self.f["images"]
        stop = start + len(feats)
        k = feats.shape[1]
        g["features"][start:stop, :k] = feats.astype(g["features"].dtype)
        g["boxes"][start:stop, :k] = boxes.astype(np.float32)
        g["n_regions"][start:stop] = n_regions
        if pooled is not None:
            g["pooled"][start:stop] = pooled.astype(np.float16)
        self.f.attrs["images_written"] = max(int(self.f.attrs["images_written"]), stop)

    def set_images(self, ids, files=None, image_root: str | None = None) -> None:
        self._put("images/ids", np.asarray([str(i) for i in ids], dtype=object), STR)
        if files is not None:
            self._put("images/files", np.asarray([str(f) for f in files], dtype=object), STR)
        if image_root:
            self.f.attrs["image_root"] = str(image_root)

    def set_captions(self, texts, image_index) -> None:
        self._put("captions/text", np.asarray(list(texts), dtype=object), STR)
        self._put("captions/image", np.asarray(image_index, dtype=np.int64))

    def set_splits(self, splits: dict[str, np.ndarray]) -> None:
        for name, idx in splits.items():
            self._put(f"splits/{name}", np.asarray(idx, dtype=np.int64))

    def set_extra(self, name: str, value: np.ndarray) -> None:
        self._put(f"extra/{name}", np.asarray(value))

    def _put(self, key: str, value, dtype=None) -> None:
        if key in self.f:
            del self.f[key]
        self.f.create_dataset(key, data=value, dtype=dtype)

    # -- commit
    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.f.close()
            try:
                validate(self.tmp, label=str(self.path))
            except Exception:
                self.tmp.unlink(missing_ok=True)
                raise
            os.replace(self.tmp, self.path)
        else:
            self.f.close()
            if not getattr(self, "keep_partial", False) or not issubclass(exc_type, KeyboardInterrupt):
                self.tmp.unlink(missing_ok=True)
        return False


@contextlib.contextmanager
def updating(path):
    """Modify an existing store atomically: work on a copy, validate it, rename it over the original."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.copyfile(path, tmp)
    try:
        with h5py.File(tmp, "r+") as f:
            yield f
        validate(tmp, label=str(path))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- validation
REQUIRED = ("images/features", "images/boxes", "images/n_regions", "images/ids", "captions/text", "captions/image")


def validate(path, label: str | None = None, check_values: bool = True) -> None:
    """Raise StoreError naming the file and key for any schema violation."""
    label = label or str(path)
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise StoreError(f"{label}: not a readable HDF5 store ({e})") from None
    with f:
        ver = f.attrs.get("schema_version")
        if ver != SCHEMA_VERSION:
            raise StoreError(f"{label}: schema_version {ver if ver is None else int(ver)}, expected {SCHEMA_VERSION}")
        for key in REQUIRED:
            if key not in f:
                raise StoreError(f"{label}: missing dataset '{key}'")
        n, k, _ = f["images/features"].shape
        for key, shape in (("images/boxes", (n, k, 4)), ("images/n_regions", (n,)), ("images/ids", (n,))):
            if f[key].shape != shape:
                raise StoreError(f"{label}: '{key}' has shape {f[key].shape}, expected {shape}")
        nreg = f["images/n_regions"][:]
        if n and (nreg.min() < 1 or nreg.max() > k):
            raise StoreError(f"{label}: 'images/n_regions' must be in [1, {k}], got [{nreg.min()}, {nreg.max()}]")
        cap_img = f["captions/image"][:]
        if f["captions/text"].shape != cap_img.shape:
            raise StoreError(f"{label}: 'captions/text' and 'captions/image' lengths differ")
        if len(cap_img) and (cap_img.min() < 0 or cap_img.max() >= n):
            raise StoreError(f"{label}: 'captions/image' index out of range [0, {n}): {cap_img.min()}..{cap_img.max()}")
        texts = f["captions/text"].asstr()[:]
        empty = [i for i, t in enumerate(texts) if not t.strip()]
        if empty:
            raise StoreError(f"{label}: 'captions/text' has empty caption(s) at index {empty[:5]}")
        for name, ds in f.get("splits", {}).items():
            idx = ds[:]
            if len(idx) and (idx.min() < 0 or idx.max() >= n):
                raise StoreError(f"{label}: 'splits/{name}' index out of range [0, {n})")
        if check_values:
            boxes = f["images/boxes"][:]
            bad = ~np.isfinite(boxes).all(axis=(1, 2)) | (boxes < -1e-4).any(axis=(1, 2)) | (boxes > 1 + 1e-4).any(axis=(1, 2))
            if bad.any():
                i = int(np.nonzero(bad)[0][0])
                raise StoreError(f"{label}: 'images/boxes' of image {i} (id {f['images/ids'].asstr()[i]}) are NaN or "
                                 f"outside [0, 1] ({int(bad.sum())} image(s) in all); rebuild the store")
            feats = f["images/features"]
            for s in range(0, n, 512):
                block = feats[s:s + 512]
                if not np.isfinite(block).all():
                    bad = s + int(np.argwhere(~np.isfinite(block))[0][0])
                    raise StoreError(f"{label}: 'images/features' has NaN/Inf for image {bad} "
                                     f"(id {f['images/ids'].asstr()[bad]})")


# ----------------------------------------------------------------------------- reading
class Store:
    """Read-only view of a store, validated on open. Arrays are read lazily from h5py."""

    def __init__(self, path, check_values: bool = True):
        self.path = Path(path)
        if not self.path.is_file():
            raise StoreError(f"store not found: {self.path} (run 00_prepare_data / `python -m hosa_lib.prepare`)")
        validate(self.path, check_values=check_values)
        self.f = h5py.File(self.path, "r")
        self.attrs = dict(self.f.attrs)
        self.caption_image = self.f["captions/image"][:]
        self.n_regions = self.f["images/n_regions"][:]

    def close(self) -> None:
        self.f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def n_images(self) -> int:
        return self.f["images/features"].shape[0]

    @property
    def feature_dim(self) -> int:
        return self.f["images/features"].shape[2]

    @property
    def max_regions(self) -> int:
        return self.f["images/features"].shape[1]

    @property
    def split_names(self) -> list[str]:
        return sorted(self.f.get("splits", {}).keys())

    def split_images(self, split: str) -> np.ndarray:
        if f"splits/{split}" not in self.f:
            raise StoreError(f"{self.path}: unknown split '{split}' (splits: {', '.join(self.split_names)})")
        return self.f[f"splits/{split}"][:]

    def split_captions(self, split: str) -> np.ndarray:
        """Caption indices of a split, ordered by image position in the split, then store order."""
        imgs = self.split_images(split)
        pos = np.full(self.n_images, -1)
        pos[imgs] = np.arange(len(imgs))
        caps = np.nonzero(pos[self.caption_image] >= 0)[0]
        return caps[np.argsort(pos[self.caption_image[caps]], kind="stable")]

    def captions(self, idx=None) -> list[str]:
        ds = self.f["captions/text"].asstr()
        return list(ds[:] if idx is None else ds[np.sort(idx)][np.argsort(np.argsort(idx))])

    def image_ids(self) -> list[str]:
        return list(self.f["images/ids"].asstr()[:])

    def image_file(self, i: int) -> Path | None:
        if "images/files" not in self.f or "image_root" not in self.attrs:
            return None
        return Path(self.attrs["image_root"]) / self.f["images/files"].asstr()[i]

    def features(self, idx=None) -> np.ndarray:
        """Region features (as stored) of all images, or of the sorted store indices `idx`."""
        ds = self.f["images/features"]
        return ds[:] if idx is None else ds[np.asarray(idx)]

    def boxes(self, i: int) -> np.ndarray:
        """(n_regions, 4) normalised boxes of image i."""
        return self.f["images/boxes"][int(i)][: int(self.n_regions[i])]

    def text_dim(self, key: str) -> int:
        if key not in self.text_keys():
            raise StoreError(f"{self.path}: no text cache '{key}' (have: {', '.join(self.text_keys()) or 'none'}); "
                             "run prepare first")
        return int(self.f[f"text/{key}/hidden"].shape[-1])

    def pooled(self, rows: np.ndarray) -> np.ndarray:
        """(n, D) float32 global image vectors: images/pooled, else the mean of the valid regions."""
        rows = np.asarray(rows)
        order = np.argsort(rows)
        out = np.empty((len(rows), self.feature_dim), np.float32)
        if "images/pooled" in self.f:
            out[order] = self.f["images/pooled"][rows[order]]
            return out
        feats = self.f["images/features"]
        for j, r in enumerate(rows):
            n = int(self.n_regions[r])
            out[j] = feats[int(r), :n].astype(np.float32).mean(0)
        return out

    def text_means(self, key: str, rows: np.ndarray) -> np.ndarray:
        """(n, H) float32 mean over each caption's tokens (attention mask) of the cached states."""
        g = self.f[f"text/{key}"]
        out = np.empty((len(rows), g["hidden"].shape[-1]), np.float32)
        for j, r in enumerate(rows):
            h, m = g["hidden"][int(r)].astype(np.float32), g["mask"][int(r)]
            out[j] = h[m].mean(0)
        return out

    def captions_without_words(self, key: str, rows: np.ndarray) -> np.ndarray:
        """Store caption indices among `rows` whose cached word mask is empty."""
        rows = np.asarray(rows, dtype=np.int64)
        words = self.f[f"text/{key}/words"][:]  # (C, T) bool, small: one read, not one per caption
        return rows[~words[rows].any(axis=1)]

    def relevance(self, split: str) -> dict[str, np.ndarray]:
        g = self.f.get(f"relevance/{split}")
        return {} if g is None else {k: g[k][:] for k in g}

    def text_keys(self) -> list[str]:
        return sorted(self.f.get("text", {}).keys())

    def extra(self, name: str):
        return self.f[f"extra/{name}"][:] if f"extra/{name}" in self.f else None

    def split_pairs(self, name: str, split: str) -> np.ndarray | None:
        """Image pairs stored as extra/<name> (store indices, e.g. swap_pairs) whose two images are
        both in `split`, as positions within the split; None when the store has no such pairs."""
        pairs = self.extra(name)
        if pairs is None:
            return None
        pos = {int(i): p for p, i in enumerate(self.split_images(split))}
        return np.array([[pos[a], pos[b]] for a, b in pairs if a in pos and b in pos], dtype=np.int64).reshape(-1, 2)

    def summary(self) -> dict:
        caps_per = np.bincount(self.caption_image, minlength=self.n_images)
        out = {"store": self.path.name, "source": self.attrs.get("source"),
               "feature_extractor": self.attrs.get("feature_extractor"),
               "images": self.n_images, "captions": len(self.caption_image),
               "captions/image (min-max)": f"{caps_per.min()}-{caps_per.max()}" if len(caps_per) else "-",
               "regions (max / mean)": f"{self.max_regions} / {self.n_regions.mean():.1f}" if self.n_images else "-",
               "feature dim": self.feature_dim}
        for s in self.split_names:
            out[f"split {s}"] = f"{len(self.split_images(s))} img / {len(self.split_captions(s))} cap"
        out["text caches"] = ", ".join(self.text_keys()) or "-"
        return out




# ----------------------------------------------------------------------------- one writer at a time
@contextlib.contextmanager
def writing_lock(path):
    """Exclusive lock for building or changing the store at `path` (`.<name>.lock` beside it). A second
    writer fails at once naming the process that holds it; the lock goes with its process."""
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = path.with_name(f".{path.name}.lock")
    fh = lock.open("a+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        holder = fh.read().strip() or "?"
        fh.close()
        raise StoreError(f"store {path} is being written by pid {holder}; wait for it or stop it") from None
    try:
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        yield
    finally:
        fcntl.flock(fh, fcntl.LOCK_UN)
        fh.close()


def set_attrs(path, attrs: dict) -> None:
    """Provenance attributes on a store that is not published yet (a build under its temporary name)."""
    with h5py.File(path, "r+") as f:
        f.attrs.update(attrs)


# ----------------------------------------------------------------------------- in-place additions
def write_text_cache(path, key: str, hidden: np.ndarray, mask: np.ndarray, words: np.ndarray, attrs: dict) -> None:
    """Add text/<key> (hidden states, attention mask, word mask) to a store, atomically."""
    with updating(path) as f:
        g = f.create_group(f"text/{key}")
        g.create_dataset("hidden", data=hidden, chunks=(1,) + hidden.shape[1:])
        g.create_dataset("mask", data=mask)
        g.create_dataset("words", data=words)
        g.attrs.update(attrs)


def write_relevance(path, split: str, matrices: dict[str, np.ndarray]) -> None:
    """Add (or replace) relevance/<split>/<name> matrices, atomically."""
    with updating(path) as f:
        for name, mat in matrices.items():
            key = f"relevance/{split}/{name}"
            if key in f:
                del f[key]
            f.create_dataset(key, data=np.asarray(mat, dtype=np.float32))


def partial_attr(path, name: str):
    """An attribute of a partial (resumable) store, or None when it is missing or unreadable —
    including its last written image row, so a file cut anywhere reads as unusable."""
    try:
        with h5py.File(path, "r") as f:
            written = int(f.attrs.get("images_written", 0))
            if written:
                f["images/features"][written - 1]
                f["images/n_regions"][written - 1]
            return f.attrs.get(name)
    except (OSError, KeyError, ValueError):
        return None


# ----------------------------------------------------------------------------- row access
class RowReader:
    """Per-row reads for DataLoader workers. The HDF5 file is opened lazily (once per worker
    process, so it survives pickling into workers) and its dataset handles are kept."""

    def __init__(self, path, text_key: str | None = None):
        self.path, self.text_key = str(path), text_key
        self._ds = None

    def __getstate__(self):
        return {"path": self.path, "text_key": self.text_key, "_ds": None}

    def _open(self) -> dict:
        if self._ds is None:
            f = h5py.File(self.path, "r")
            self._ds = {k: f[k] for k in ("images/features", "images/boxes", "images/n_regions", "captions/text")}
            if self.text_key is not None:
                g = f[f"text/{self.text_key}"]
                self._ds.update({"hidden": g["hidden"], "mask": g["mask"], "words": g["words"]})
        return self._ds

    def images(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """features (n, K, D) float16, boxes (n, K, 4), n_regions (n,) of store images `rows`."""
        ds = self._open()
        return tuple(_read_rows(ds[k], rows) for k in ("images/features", "images/boxes", "images/n_regions"))

    def text_states(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """hidden (n, T, H) float16, attention mask (n, T), word mask (n, T) of store captions `rows`."""
        ds = self._open()
        return tuple(_read_rows(ds[k], rows) for k in ("hidden", "mask", "words"))

    def captions(self, rows: np.ndarray) -> list[str]:
        return [t.decode() if isinstance(t, bytes) else t for t in _read_rows(self._open()["captions/text"], rows)]


def _read_rows(ds, rows: np.ndarray) -> np.ndarray:
    """ds[rows] for any row order. One plain read per row: h5py's fancy (point) selection is
    ~100x slower per row than a slice on these per-row-chunked datasets."""
    out = np.empty((len(rows),) + ds.shape[1:], dtype=ds.dtype)
    for j, r in enumerate(rows):
        if ds.dtype == object:  # variable-length strings
            out[j] = ds[int(r)]
        else:
            ds.read_direct(out, np.s_[int(r)], np.s_[j])
    return out


# ----------------------------------------------------------------------------- embedding cache
def save_embeddings(path, img: dict, cap: dict, cap_img: np.ndarray, tag: str) -> None:
    """Encoded split (numpy arrays) beside a checkpoint, atomically; `tag` identifies what made it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs["tag"] = tag
            for side, d in (("images", img), ("captions", cap)):
                for k, v in d.items():
                    f.create_dataset(f"{side}/{k}", data=v)
            f.create_dataset("cap_img", data=cap_img)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_embeddings(path, tag: str):
    """-> (images, captions, cap_img) numpy dicts, or None when missing, unreadable or made by something else."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("tag") != tag:
                return None
            side = lambda s: {k: f[f"{s}/{k}"][:] for k in f[s]}
            return side("images"), side("captions"), f["cap_img"][:]
    except OSError:
        return None
