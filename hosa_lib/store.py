"""The HDF5 data store: one file per dataset, the only format training and evaluation read.

Layout (schema version 1):
    attrs: schema_version, name, source, feature_extractor, created, code_version, uid, content_checked[, image_root]
    images/features   (N, K, D) float16   region features, zero beyond n_regions (float32 for TERAN reproduction)
    images/boxes      (N, K, 4) float32   normalised (x1, y1, x2, y2) in [0, 1]
    images/n_regions  (N,) int32
    images/ids        (N,) str
    images/pooled     (N, D) float16      optional pooled (global) CNN vector
    images/files      (N,) str            optional file names relative to attrs image_root
    captions/text     (C,) str
    captions/image    (C,) int64          explicit caption -> image index (never "5 per image")
    splits/<name>     (n,) int64          image indices of a split
    extra/<name>      any array (e.g. swap_pairs for synthetic scenes)

Sidecars, added after the store is built without rewriting it (`<store>.d/<uid>.<what>.h5`):
    text-<key>:  hidden (C, T, H) float16, mask (C, T) bool, words (C, T) bool; attrs model, layer,
                 max_words, min_words (text-state cache of a frozen backbone)
    relevance-<split>-<method>:  relevance (C_split, N_split) float32   NDCG relevance (rougeL, spice)
Stores written by earlier versions hold the same groups inside the file (text/<key>/..., relevance/<split>/<method>);
they are read as before.

Opening a store is O(1) in N: the O(N) content checks (index ranges, empty captions, NaN/Inf) run once
when a file is written and are recorded in `content_checked`; rows read for training are checked again
as they are read (a file damaged later still fails with the image named).

This is the only module that touches HDF5 (the import-graph test enforces it): other modules read
through `Store` / `RowReader` and write through `StoreWriter`, `SidecarWriter`, `write_relevance`
and the embedding cache (`save_embeddings` / `load_embeddings`).

Writes are atomic: everything goes to a temporary file in the same folder that is renamed over
the final name only after it validated, so a crash or Ctrl-C leaves the previous store intact.
Sidecars are written as resumable partial files, renamed when complete.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import functools
import json
import os
import shutil
import uuid
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
                 tmp_path: Path | None = None, resume: bool = False, dtype: str = "float16",
                 keep_partial: bool = False):
        self.path = Path(path)
        self.keep_partial = keep_partial  # a Ctrl-C keeps the partial file (resume=True continues it)
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
        a["uid"] = uuid.uuid4().hex  # names this build's sidecar files (text caches, relevance)
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

    @property
    def images_written(self) -> int:
        """Rows [0, images_written) hold encoded images (a resumed build continues from there)."""
        return int(self.f.attrs["images_written"])

    def get_attr(self, name: str, default=None):
        return self.f.attrs.get(name, default)

    def set_attr(self, name: str, value) -> None:
        self.f.attrs[name] = value

    def flush(self) -> None:
        """Everything written so far on disk: a kill -9 afterwards leaves a readable partial file."""
        self.f.flush()

    def keep_images(self, rows) -> None:
        """Drop every image row not in `rows` (e.g. undecodable files skipped while encoding)."""
        rows = list(rows)
        for key in ("features", "boxes", "n_regions", "pooled"):
            if f"images/{key}" not in self.f:
                continue
            old = self.f[f"images/{key}"]
            data, chunks = old[rows], old.chunks if key == "features" and rows else None
            del self.f[f"images/{key}"]
            self.f.create_dataset(f"images/{key}", data=data, chunks=chunks)
        self.f.attrs["images_written"] = len(rows)

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
                mark_checked(self.tmp)
            except Exception:
                self.tmp.unlink(missing_ok=True)
                raise
            os.replace(self.tmp, self.path)
        else:
            self.f.close()
            if not self.keep_partial or not issubclass(exc_type, KeyboardInterrupt):
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
        mark_checked(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- validation
REQUIRED = ("images/features", "images/boxes", "images/n_regions", "images/ids", "captions/text", "captions/image")
CHECKED = "content_checked"  # attribute: the O(N) content checks passed when the file was written


def validate(path, label: str | None = None, check_values: bool = True) -> None:
    """Raise StoreError naming the file and key for any schema violation (every check, whatever the
    file records: this is the build-time check)."""
    label = label or str(path)
    with _open_h5(path, label) as f:
        check_schema(f, label)
        check_content(f, label, check_values)


def mark_checked(path) -> None:
    """Record in a file that `validate` passed on it, so readers skip the O(N) content checks."""
    with h5py.File(path, "r+") as f:
        f.attrs[CHECKED] = True


def _open_h5(path, label: str):
    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise StoreError(f"{label}: not a readable HDF5 store ({e})") from None


def check_schema(f, label: str) -> None:
    """What every open checks: version, datasets and shapes. Reads attributes and metadata only (O(1) in N)."""
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
    if f["captions/text"].shape != f["captions/image"].shape:
        raise StoreError(f"{label}: 'captions/text' and 'captions/image' lengths differ")


def check_content(f, label: str, check_values: bool = True) -> None:
    """The O(N) checks: index ranges, empty captions and (check_values) NaN/Inf features and boxes.
    Run when a store is written; a reader runs them only on files that do not record them."""
    n, k, _ = f["images/features"].shape
    nreg = f["images/n_regions"][:]
    if n and (nreg.min() < 1 or nreg.max() > k):
        raise StoreError(f"{label}: 'images/n_regions' must be in [1, {k}], got [{nreg.min()}, {nreg.max()}]")
    cap_img = f["captions/image"][:]
    if len(cap_img) and (cap_img.min() < 0 or cap_img.max() >= n):
        raise StoreError(f"{label}: 'captions/image' index out of range [0, {n}): {cap_img.min()}..{cap_img.max()}")
    texts = f["captions/text"]
    for s in range(0, len(cap_img), 1 << 16):  # in blocks: 616K COCO captions need not be decoded at once
        empty = [s + i for i, t in enumerate(texts.asstr()[s:s + (1 << 16)]) if not t.strip()]
        if empty:
            raise StoreError(f"{label}: 'captions/text' has empty caption(s) at index {empty[:5]}")
    for name, ds in f.get("splits", {}).items():
        idx = ds[:]
        if len(idx) and (idx.min() < 0 or idx.max() >= n):
            raise StoreError(f"{label}: 'splits/{name}' index out of range [0, {n})")
    if check_values:
        for s in range(0, n, 512):
            check_rows(label, f["images/ids"], s, f["images/features"][s:s + 512], f["images/boxes"][s:s + 512])


def check_rows(label: str, ids, start: int, feats: np.ndarray, boxes: np.ndarray, rows=None) -> None:
    """Features finite and boxes finite within [0, 1] for images start.. (or store rows `rows`)."""
    bad_box = ~np.isfinite(boxes).all(axis=(1, 2)) | (boxes < -1e-4).any(axis=(1, 2)) | (boxes > 1 + 1e-4).any(axis=(1, 2))
    if bad_box.any():
        j = int(np.nonzero(bad_box)[0][0])
        i = int(rows[j]) if rows is not None else start + j
        raise StoreError(f"{label}: 'images/boxes' of image {i} (id {ids.asstr()[i]}) are NaN or "
                         f"outside [0, 1]; rebuild the store")
    bad_feat = ~np.isfinite(feats).all(axis=tuple(range(1, feats.ndim)))
    if bad_feat.any():
        j = int(np.nonzero(bad_feat)[0][0])
        i = int(rows[j]) if rows is not None else start + j
        raise StoreError(f"{label}: 'images/features' has NaN/Inf for image {i} (id {ids.asstr()[i]})")


# ----------------------------------------------------------------------------- sidecars
# Text caches and relevance matrices are added to a published store without copying or rewriting it:
# each lives in its own file `<store>.d/<uid>.<what>.h5`, where <uid> is the store build's attribute
# `uid`. A sidecar is written as `.<uid>.<what>.h5.partial` (flushed and checkpointed as it goes, so
# it resumes after a crash) and renamed when complete. A rebuilt store has a new uid, so sidecars of
# the store it replaced are never read; `remove_stale_sidecars` deletes them.
def sidecar_dir(store_path) -> Path:
    p = Path(store_path)
    return p.with_name(p.name + ".d")


def store_uid(attrs) -> str:
    """A store build's identity (stores written before uids: from their creation time and name)."""
    if "uid" in attrs:
        return str(attrs["uid"])
    import hashlib
    return "legacy-" + hashlib.sha1(f"{attrs.get('created')}|{attrs.get('name')}".encode()).hexdigest()[:12]


def _sidecars(home: Path, uid: str, kind: str) -> dict[str, Path]:
    """{name: path} of the complete sidecars `<uid>.<kind>-<name>.h5` in `home`."""
    pre = f"{uid}.{kind}-"
    return {p.name[len(pre):-3]: p for p in sorted(home.glob(f"{pre}*.h5"))} if home.is_dir() else {}


def copy_store(src, dst) -> None:
    """Copy a store with the sidecars of its current build (its text caches and relevance)."""
    src, dst = Path(src), Path(dst)
    with h5py.File(src, "r") as f:
        uid = store_uid(f.attrs)
    shutil.copyfile(src, dst)
    home = sidecar_dir(src)
    for p in sorted(home.glob(f"{uid}.*.h5")) if home.is_dir() else []:
        sidecar_dir(dst).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(p, sidecar_dir(dst) / p.name)


def remove_stale_sidecars(store_path) -> list[Path]:
    """Delete sidecars (complete or partial) of builds other than the store's current one."""
    with h5py.File(store_path, "r") as f:
        uid = store_uid(f.attrs)
    home = sidecar_dir(store_path)
    gone = [p for p in home.glob("*.h5*") if not p.name.lstrip(".").startswith(uid + ".")] if home.is_dir() else []
    for p in gone:
        p.unlink(missing_ok=True)
    return gone


class SidecarWriter:
    """Write one sidecar in row blocks, resumably. `spec` fixes the datasets {name: (shape, dtype)}
    and `meta` what the content depends on; a partial file with other meta or shapes starts over.

    >>> with SidecarWriter(store_path, "text-minilm-L-1", spec, meta) as w:
    ...     for start in range(w.rows_done, n, block):
    ...         w.write(start, {"hidden": h, ...})      # flushed; rows_done = start + len(h)
    """

    def __init__(self, store_path, what: str, spec: dict, meta: dict, home=None, chunk_rows: dict | None = None):
        with _open_h5(store_path, str(store_path)) as f:
            self.uid = store_uid(f.attrs)
        home = Path(home) if home else sidecar_dir(store_path)
        home.mkdir(parents=True, exist_ok=True)
        self.path = home / f"{self.uid}.{what}.h5"
        self.partial = home / f".{self.uid}.{what}.h5.partial"
        self.meta = json.dumps(meta, sort_keys=True, default=str)
        self.f = None
        if self.partial.exists():
            try:
                f = h5py.File(self.partial, "r+")
                same = f.attrs.get("meta") == self.meta and all(
                    k in f and f[k].shape == tuple(sh) and f[k].dtype == np.dtype(dt) for k, (sh, dt) in spec.items())
                self.f = f if same else f.close()
            except (OSError, KeyError, ValueError):  # cut mid-write (kill -9): start over
                self.f = None
        if self.f is None:
            self.f = h5py.File(self.partial, "w")
            self.f.attrs["meta"], self.f.attrs["rows_done"], self.f.attrs["store_uid"] = self.meta, 0, self.uid
            for k, (sh, dt) in spec.items():
                rows = (chunk_rows or {}).get(k)
                self.f.create_dataset(k, sh, dtype=dt, chunks=(rows,) + tuple(sh[1:]) if rows else None)
        self.rows_done = int(self.f.attrs["rows_done"])

    def write(self, start: int, arrays: dict) -> None:
        n = 0
        for k, v in arrays.items():
            self.f[k][start:start + len(v)] = v
            n = len(v)
        self.rows_done = start + n
        self.f.attrs["rows_done"] = self.rows_done
        self.f.flush()  # a kill after this keeps every block written so far

    def set_attrs(self, attrs: dict) -> None:
        """Describe the content (e.g. the text model and layer of a cache); readers see them as attrs."""
        self.f.attrs.update(attrs)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.f.attrs["complete"] = True
            self.f.close()
            os.replace(self.partial, self.path)
        else:
            self.f.close()  # the partial file stays: the next run resumes from rows_done
        return False


def write_sidecar(store_path, what: str, arrays: dict[str, np.ndarray], attrs: dict | None = None, home=None) -> Path:
    """A small sidecar written whole (e.g. an imported relevance matrix), atomically."""
    spec = {k: (v.shape, v.dtype) for k, v in arrays.items()}
    with SidecarWriter(store_path, what, spec, {"whole": True}, home) as w:
        w.write(0, arrays)
        w.set_attrs(attrs or {})
    return w.path


# ----------------------------------------------------------------------------- reading
class Store:
    """Read-only view of a store. Opening costs O(1) in the number of images and captions: the schema
    is checked, the content checks are those recorded at build time (older files without that record
    are checked in full), and every array is read lazily.

    sidecars: the folder of its text caches and relevance files (default `<path>.d`; a build under a
    temporary name passes its final store's)."""

    def __init__(self, path, check_values: bool = True, sidecars=None):
        self.path = Path(path)
        if not self.path.is_file():
            raise StoreError(f"store not found: {self.path} (run 00_prepare_data / `python -m hosa_lib.prepare`)")
        self.f = _open_h5(self.path, str(self.path))
        try:
            check_schema(self.f, str(self.path))
            if not self.f.attrs.get(CHECKED):
                check_content(self.f, str(self.path), check_values)
        except BaseException:
            self.f.close()
            raise
        self.attrs = dict(self.f.attrs)
        self.uid = store_uid(self.attrs)
        self.home = Path(sidecars) if sidecars else sidecar_dir(self.path)
        self._side: dict[Path, h5py.File] = {}

    def identity(self) -> dict:
        """What a checkpoint records of the store it was trained on: path, source and source digest."""
        return {"path": str(self.path.resolve()), "source": str(self.attrs.get("source")),
                "source_digest": str(self.attrs.get("source_digest", "")), "uid": self.uid}

    @functools.cached_property
    def caption_image(self) -> np.ndarray:
        return self.f["captions/image"][:]

    @functools.cached_property
    def n_regions(self) -> np.ndarray:
        return self.f["images/n_regions"][:]

    def _sidecar(self, path: Path):
        if path not in self._side:
            self._side[path] = h5py.File(path, "r")
        return self._side[path]

    def text_group(self, key: str):
        """The text/<key> cache (hidden, mask, words and its attrs), embedded or in a sidecar."""
        if f"text/{key}" in self.f:
            return self.f[f"text/{key}"]
        side = _sidecars(self.home, self.uid, "text").get(key)
        if side is None:
            raise StoreError(f"{self.path}: no text cache '{key}' (have: {', '.join(self.text_keys()) or 'none'}); "
                             "run prepare first")
        return self._sidecar(side)

    def close(self) -> None:
        for f in self._side.values():
            f.close()
        self._side.clear()
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

    @property
    def n_captions(self) -> int:
        return self.f["captions/text"].shape[0]

    def caption_range(self, start: int, stop: int) -> list[str]:
        """Caption texts start..stop-1 (one contiguous read)."""
        return list(self.f["captions/text"].asstr()[start:stop])

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
        return int(self.text_group(key)["hidden"].shape[-1])

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
        g = self.text_group(key)
        out = np.empty((len(rows), g["hidden"].shape[-1]), np.float32)
        for j, r in enumerate(rows):
            h, m = g["hidden"][int(r)].astype(np.float32), g["mask"][int(r)]
            out[j] = h[m].mean(0)
        return out

    def captions_without_words(self, key: str, rows: np.ndarray) -> np.ndarray:
        """Store caption indices among `rows` whose cached word mask is empty."""
        rows = np.asarray(rows, dtype=np.int64)
        g = self.text_group(key)
        if g.attrs.get("min_words", 0) >= 1:  # checked when the cache was built
            return rows[:0]
        words = g["words"][:]  # (C, T) bool, small: one read, not one per caption
        return rows[~words[rows].any(axis=1)]

    def relevance_methods(self, split: str) -> list[str]:
        return sorted(set(self.f.get(f"relevance/{split}", {}).keys())
                      | set(_sidecars(self.home, self.uid, f"relevance-{split}")))

    def relevance(self, split: str) -> dict[str, np.ndarray]:
        """{method: (captions, images) float32} of a split, embedded or in sidecars."""
        g = self.f.get(f"relevance/{split}")
        out = {} if g is None else {k: g[k][:] for k in g}
        for method, path in _sidecars(self.home, self.uid, f"relevance-{split}").items():
            out.setdefault(method, self._sidecar(path)["relevance"][:])
        return out

    def text_keys(self) -> list[str]:
        return sorted(set(self.f.get("text", {}).keys()) | set(_sidecars(self.home, self.uid, "text")))

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
def writing_lock(path, subject: str | None = None):
    """Exclusive lock for building or changing the store at `path` (`.<name>.lock` beside it). A second
    writer fails at once naming the process that holds it (and `subject`, default 'store <path>');
    the lock goes with its process."""
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
        raise StoreError(f"{subject or f'store {path}'} is being written by pid {holder}; wait for it or stop it") from None
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
def write_relevance(path, split: str, matrices: dict[str, np.ndarray], home=None) -> None:
    """Add (or replace) the relevance matrices {method: (captions, images)} of a split, each as its own
    sidecar written whole (the store file itself is not rewritten)."""
    for name, mat in matrices.items():
        write_sidecar(path, f"relevance-{split}-{name}", {"relevance": np.asarray(mat, dtype=np.float32)}, home=home)


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
            self._ds = {k: f[k] for k in ("images/features", "images/boxes", "images/n_regions", "captions/text",
                                          "images/ids")}
            if self.text_key is not None:
                if f"text/{self.text_key}" in f:
                    g = f[f"text/{self.text_key}"]
                else:
                    side = _sidecars(sidecar_dir(self.path), store_uid(f.attrs), "text").get(self.text_key)
                    if side is None:
                        raise StoreError(f"{self.path}: no text cache '{self.text_key}'; run prepare first")
                    g = h5py.File(side, "r")
                self._ds.update({"hidden": g["hidden"], "mask": g["mask"], "words": g["words"]})
        return self._ds

    def images(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """features (n, K, D) float16, boxes (n, K, 4), n_regions (n,) of store images `rows`; a NaN/Inf
        feature or a box outside [0, 1] (a file damaged after it was built) raises naming the image."""
        ds = self._open()
        out = tuple(_read_rows(ds[k], rows) for k in ("images/features", "images/boxes", "images/n_regions"))
        check_rows(self.path, ds["images/ids"], 0, out[0], out[1], rows=rows)
        return out

    def text_states(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """hidden (n, T, H) float16, attention mask (n, T), word mask (n, T) of store captions `rows`."""
        ds = self._open()
        return tuple(_read_rows(ds[k], rows) for k in ("hidden", "mask", "words"))

    def text_lengths(self, rows: np.ndarray) -> np.ndarray:
        """Tokens (attention mask) of store captions `rows` in the text cache; one read of the mask."""
        return self._open()["mask"][:][np.asarray(rows)].sum(1)

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
def save_embeddings(path, img: dict, cap, cap_img: np.ndarray, tag: str) -> None:
    """Encoded split beside a checkpoint, atomically; `tag` identifies what made it. img: dict of
    tensors; cap: one such dict, or a list of length-bucketed blocks (each with 'index')."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    blocks = cap if isinstance(cap, list) else [cap]
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs["tag"], f.attrs["bucketed"] = tag, isinstance(cap, list)
            for k, v in img.items():
                f.create_dataset(f"images/{k}", data=v.numpy())
            for b, blk in enumerate(blocks):
                for k, v in blk.items():
                    f.create_dataset(f"captions/{b}/{k}", data=v.numpy())
            f.create_dataset("cap_img", data=cap_img)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_embeddings(path, tag: str):
    """-> (images, captions, cap_img) as saved (tensors), or None when missing, unreadable or made by something else."""
    import torch

    path = Path(path)
    if not path.is_file():
        return None
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("tag") != tag or "bucketed" not in f.attrs:
                return None
            img = {k: torch.from_numpy(f[f"images/{k}"][:]) for k in f["images"]}
            blocks = [{k: torch.from_numpy(g[k][:]) for k in g} for _, g in
                      sorted(f["captions"].items(), key=lambda kv: int(kv[0]))]
            return img, (blocks if f.attrs["bucketed"] else blocks[0]), f["cap_img"][:]
    except OSError:
        return None
