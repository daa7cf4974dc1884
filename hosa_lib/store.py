"""The HDF5 data store: one file per dataset, the only format training and evaluation read.

Layout (schema version 1):
    attrs: schema_version, name, source, feature_extractor, created, code_version[, image_root]
    images/features   (N, K, D) float16   region features, zero beyond n_regions
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

Writes are atomic: everything goes to a temporary file in the same folder that is renamed over
the final name only after it validated, so a crash or Ctrl-C leaves the previous store intact.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

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
                 tmp_path: Path | None = None, resume: bool = False):
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
        g.create_dataset("features", (n_images, max_regions, dim), dtype="float16",
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
        g["features"][start:stop, :k] = feats.astype(np.float16)
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

    def relevance(self, split: str) -> dict[str, np.ndarray]:
        g = self.f.get(f"relevance/{split}")
        return {} if g is None else {k: g[k][:] for k in g}

    def text_keys(self) -> list[str]:
        return sorted(self.f.get("text", {}).keys())

    def extra(self, name: str):
        return self.f[f"extra/{name}"][:] if f"extra/{name}" in self.f else None

    def summary(self) -> dict:
        caps_per = np.bincount(self.caption_image, minlength=self.n_images)
        out = {"store": str(self.path), "source": self.attrs.get("source"),
               "feature_extractor": self.attrs.get("feature_extractor"),
               "images": self.n_images, "captions": len(self.caption_image),
               "captions/image (min-max)": f"{caps_per.min()}-{caps_per.max()}" if len(caps_per) else "-",
               "regions (max / mean)": f"{self.max_regions} / {self.n_regions.mean():.1f}" if self.n_images else "-",
               "feature dim": self.feature_dim}
        for s in self.split_names:
            out[f"split {s}"] = f"{len(self.split_images(s))} img / {len(self.split_captions(s))} cap"
        out["text caches"] = ", ".join(self.text_keys()) or "-"
        return out


# ----------------------------------------------------------------------------- torch Dataset
@dataclass(frozen=True)
class TextInput:
    """How captions reach the text encoder: cached backbone states, or tokens for a backbone that runs."""
    cache_key: str | None = None   # text/<cache_key> in the store (frozen backbone)
    tokenizer: str | None = None   # tokenizer name/dir: tokenise on the fly (fine-tuned backbone)
    max_words: int = 32


class CaptionDataset(torch.utils.data.Dataset):
    """One item per caption of a split: the caption's image regions and its text input.

    h5py handles (and tokenizers) are opened lazily in each DataLoader worker.
    Item: dict(regions (K, D) f32, boxes (K, 4), n_regions, image, caption (store indices), and either
    text (T, H) f32 cached states or input_ids (T,), plus text_mask (T,) and word_mask (T,)).
    `text` may be a TextInput, a cache key string, or None (images only).
    """

    def __init__(self, path, split: str, text: "TextInput | str | None", with_image: bool = True):
        self.with_image = with_image
        self.text = TextInput(cache_key=text) if isinstance(text, str) else text
        with Store(path, check_values=False) as s:
            self.captions = s.split_captions(split)
            self.caption_image = s.caption_image
            key = self.text.cache_key if self.text else None
            if key is not None and key not in s.text_keys():
                raise StoreError(f"{path}: no text cache '{key}' (have: {', '.join(s.text_keys()) or 'none'})")
        self.path, self.split = str(path), split
        self._f, self._tok = None, None

    def __len__(self) -> int:
        return len(self.captions)

    def _file(self):
        if self._f is None:  # per worker: open the file and keep the dataset handles
            self._f = h5py.File(self.path, "r")
            self._ds = {k: self._f[k] for k in ("images/features", "images/boxes", "images/n_regions",
                                                "captions/text")}
            if self.text is not None and self.text.cache_key is not None:
                g = self._f[f"text/{self.text.cache_key}"]
                self._ds.update({"hidden": g["hidden"], "mask": g["mask"], "words": g["words"]})
        return self._f

    def __getstate__(self):
        return {**self.__dict__, "_f": None, "_tok": None, "_ds": None}

    def __getitem__(self, i: int) -> dict:
        return self.__getitems__([i])[0]

    def __getitems__(self, indices) -> list[dict]:
        """Batched fetch (DataLoader calls this with a whole batch): one sorted read per dataset."""
        self._file()
        caps = self.captions[np.asarray(indices, dtype=np.int64)]
        imgs = self.caption_image[caps]
        items = [{"image": int(im), "caption": int(c)} for im, c in zip(imgs, caps)]
        if self.with_image:
            for it, im in zip(items, read_images(self._ds, imgs)):
                it.update(im)
        if self.text is not None and self.text.cache_key is not None:
            hidden, mask, words = (_read_rows(self._ds[k], caps) for k in ("hidden", "mask", "words"))
            for j, it in enumerate(items):
                it.update(text=torch.from_numpy(hidden[j].astype(np.float32)), text_mask=torch.from_numpy(mask[j]),
                          word_mask=torch.from_numpy(words[j]))
        elif self.text is not None and self.text.tokenizer is not None:
            from .features import load_tokenizer, tokenize
            if self._tok is None:
                self._tok = load_tokenizer(self.text.tokenizer)
            texts = [t.decode() if isinstance(t, bytes) else t for t in _read_rows(self._ds["captions/text"], caps)]
            enc = tokenize(self._tok, texts, self.text.max_words)
            for j, it in enumerate(items):
                it.update(input_ids=enc["input_ids"][j], text_mask=enc["attention_mask"][j].bool(),
                          word_mask=enc["words"][j])
        return items


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


def read_images(ds: dict, imgs: np.ndarray) -> list[dict]:
    feats, boxes, nreg = (_read_rows(ds[k], imgs) for k in ("images/features", "images/boxes", "images/n_regions"))
    return [{"regions": torch.from_numpy(feats[j].astype(np.float32)), "boxes": torch.from_numpy(boxes[j]),
             "n_regions": int(nreg[j]), "image": int(imgs[j])} for j in range(len(imgs))]


def image_item(f: h5py.File, img: int) -> dict:
    ds = {k: f[k] for k in ("images/features", "images/boxes", "images/n_regions")}
    return read_images(ds, np.array([img]))[0]


class ImageDataset(CaptionDataset):
    """One item per image of a split (for encoding galleries)."""

    def __init__(self, path, split: str):
        with Store(path, check_values=False) as s:
            self.images = s.split_images(split)
        self.path, self._f, self.text, self.with_image = str(path), None, None, True

    def __len__(self) -> int:
        return len(self.images)

    def __getitems__(self, indices) -> list[dict]:
        self._file()
        return read_images(self._ds, self.images[np.asarray(indices, dtype=np.int64)])


def region_mask(n_regions: torch.Tensor, k: int) -> torch.Tensor:
    return torch.arange(k)[None] < torch.as_tensor(n_regions)[:, None]
