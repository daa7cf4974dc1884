"""A folder of images + a captions file -> store, images encoded by a pretrained CNN into regions.

Regions (`data.regions`): `grid`, the CNN map's cells (or, with `data.grid`, the map ROI-pooled over
n x n grids, e.g. multi-scale 1 + 2x2 + 3x3 + 5x5); or `objects`, as bottom-up features are for
COCO: one region per object box, the map ROI-pooled inside it, then context regions (`data.context`,
default the whole image). Object boxes come with a Karpathy JSON (`images[].boxes`: normalised
[x1, y1, x2, y2] per object; the synthetic scenes write them).

Captions file: Karpathy JSON ({"images": [{"filename", "split", "sentences": [{"raw"}], "boxes"?}]}) or a
CSV with a header `filename,caption[,split]` (one row per caption). A file without splits gets a
deterministic hash split (`data.split_fractions`, default 80/10/10 train/val/test).
Encoding is batched, shows progress, holds one batch in memory, and is resumable: the partial
store `.<name>.partial` survives a Ctrl-C and the next run with the same inputs continues there.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import posixpath
import unicodedata
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..store import StoreError, StoreWriter, partial_attr
from . import canonical_split, repeated
from ..progress import bar as progress_bar


def normalise(name: str) -> str:
    """A file name as the folder means it: `./x.png`, `a//x.png` and `a/../x.png` name one file each way."""
    norm = posixpath.normpath(name.strip())
    return norm if norm != "." else name


def _text(path: Path) -> str:
    """A captions file's text (UTF-8, a BOM allowed); other encodings are one error naming the file."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise StoreError(f"{path}: not UTF-8 text (byte 0x{raw[e.start]:02x} on line {line}); save it as UTF-8, "
                         f"e.g. iconv -f cp1252 -t utf-8 {path.name} > utf8.csv (cp1252 is Excel's usual encoding)") from None


def read_captions(path, split_fractions=(0.8, 0.1, 0.1)) -> list[dict]:
    """-> [{"filename", "split", "captions": [str]}] in file order, validated. A file without splits
    (no CSV split column, no Karpathy `split`) gets a deterministic hash split by `split_fractions`.
    File names are normalised (`./x.png` is `x.png`); in a CSV, rows repeating an earlier row's file and
    caption exactly are dropped and reported."""
    path = Path(path)
    if not path.is_file():
        raise StoreError(f"captions file not found: {path}")
    text = _text(path)
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
            items = [{"filename": normalise(im.get("filepath", "") and f"{im['filepath']}/{im['filename']}"
                                            or im["filename"]),
                      "split": canonical_split(im.get("split", "all"), f"{path} image '{im['filename']}'"),
                      "captions": [s["raw"] for s in im["sentences"]],
                      **({"boxes": im["boxes"]} if "boxes" in im else {})} for im in data["images"]]
        except (KeyError, TypeError, json.JSONDecodeError) as e:
            raise StoreError(f"{path}: not a Karpathy-format JSON (need images[].filename and "
                             f"images[].sentences[].raw): {e!r}") from None
        dupes = repeated(it["filename"] for it in items)
        if dupes:
            raise StoreError(f"{path}: image(s) listed more than once (file names compared normalised, "
                             f"./x.png = x.png): {dupes[:5]}")
    else:
        items = _read_csv(path, text)
    for it in items:
        if not it["captions"]:
            raise StoreError(f"{path}: image '{it['filename']}' has no captions")
        for k, c in enumerate(it["captions"]):
            if not c or not c.strip():
                raise StoreError(f"{path}: empty caption #{k} for image '{it['filename']}'")
            if not any(unicodedata.category(ch)[0] in "LNS" for ch in c):
                raise StoreError(f"{path}: caption #{k} {c!r} for image '{it['filename']}' has no letter, digit or "
                                 "symbol (punctuation and spaces only); a text model reads no words in it")
    for it in items:
        if "boxes" in it:
            it["boxes"] = check_boxes(it["boxes"], f"{path}: image '{it['filename']}'")
    if items and all(it["split"] == "all" for it in items):
        hash_split(items, split_fractions)
    return items


def _read_csv(path: Path, text: str) -> list[dict]:
    by_file: dict[str, dict] = {}
    seen: dict[tuple[str, str], int] = {}
    dropped: list[tuple[int, int]] = []
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if not reader.fieldnames or not {"filename", "caption"} <= set(reader.fieldnames):
        raise StoreError(f"{path}: CSV header must have 'filename,caption[,split]', got {reader.fieldnames}")
    width = len(reader.fieldnames)
    for row_no, row in enumerate(reader, start=2):
        cells = width - sum(v is None for v in row.values()) + len(row.get(None) or [])
        if cells != width:
            raise StoreError(f"{path} line {row_no}: {cells} cell(s), expected {width} "
                             f"({','.join(reader.fieldnames)}); quote a caption that contains commas")
        split = canonical_split(row.get("split") or "all", f"{path} line {row_no}")
        name = normalise(row["filename"])
        item = by_file.setdefault(name, {"filename": name, "captions": [], "split": split})
        if item["split"] != split:
            raise StoreError(f"{path} line {row_no}: image '{name}' is in two splits "
                             f"('{item['split']}' and '{split}')")
        caption = row["caption"] or ""
        if (name, caption) in seen:  # the same file and caption again: kept once (stated in the README)
            dropped.append((row_no, seen[(name, caption)]))
            continue
        seen[(name, caption)] = row_no
        item["captions"].append(caption)
    if dropped:
        print(f"{path}: {len(dropped)} row(s) repeat an earlier row's file and caption exactly and were dropped "
              f"(first: line {dropped[0][0]} repeats line {dropped[0][1]})")
    return list(by_file.values())


def check_boxes(boxes, where: str) -> np.ndarray:
    """Object boxes as an (n, 4) float array of normalised (x1, y1, x2, y2) with 0 <= x1 < x2 <= 1 and
    0 <= y1 < y2 <= 1; anything else (outside [0, 1], empty or inverted, not 4 numbers) names the box."""
    try:
        arr = np.asarray(boxes, dtype=np.float64).reshape(-1, 4) if len(boxes) else np.zeros((0, 4))
    except (TypeError, ValueError):
        raise StoreError(f"{where}: boxes must be a list of [x1, y1, x2, y2] (normalised), got {boxes!r:.80}") from None
    for j, (x1, y1, x2, y2) in enumerate(arr.tolist()):
        if not np.isfinite([x1, y1, x2, y2]).all() or min(x1, y1) < 0 or max(x2, y2) > 1:
            raise StoreError(f"{where}: box #{j} {[x1, y1, x2, y2]} is outside [0, 1] (boxes are normalised "
                             "x1, y1, x2, y2)")
        if x2 <= x1 or y2 <= y1:
            raise StoreError(f"{where}: box #{j} {[x1, y1, x2, y2]} is empty or inverted (need x1 < x2, y1 < y2)")
    return arr.astype(np.float32)


def hash_split(items: list[dict], fractions) -> None:
    """train/val/test by a hash of each file name: stable when files are added or removed."""
    if len(fractions) != 3 or abs(sum(fractions) - 1) > 1e-6 or min(fractions) < 0:
        raise StoreError(f"data.split_fractions = {list(fractions)}: expected three fractions summing to 1")
    for it in items:
        u = int(hashlib.sha256(it["filename"].encode()).hexdigest()[:8], 16) / 2 ** 32
        it["split"] = "train" if u < fractions[0] else "val" if u < fractions[0] + fractions[1] else "test"


def load_rgb(path: Path, fit: str = "letterbox", background=(255, 255, 255)) -> Image.Image:
    """An image file as 8-bit RGB on a square canvas. 16-bit greyscale is scaled (not clipped);
    transparency (RGBA, LA, palette + transparency) is composited onto `background`; non-square
    images are letterboxed with `background` or centre-cropped (`fit`)."""
    with Image.open(path) as im:
        im.load()
        if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
            arr = np.asarray(im, dtype=np.float64)
            scale = 257.0 if arr.max(initial=0) > 255 or im.mode.startswith("I;16") else 1.0
            im = Image.fromarray(np.clip(arr / scale, 0, 255).astype(np.uint8), "L")
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            rgba = im.convert("RGBA")
            im = Image.alpha_composite(Image.new("RGBA", rgba.size, tuple(background) + (255,)), rgba)
        im = im.convert("RGB")
    w, h = im.size
    if w == h:
        return im
    side = max(w, h) if fit == "letterbox" else min(w, h)
    if fit == "letterbox":
        canvas = Image.new("RGB", (side, side), tuple(background))
        canvas.paste(im, ((side - w) // 2, (side - h) // 2))
        return canvas
    return im.crop(((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side))


def _inputs_hash(items, image_root: Path, size) -> str:
    h = hashlib.sha256(f"{image_root.resolve()}|{size}".encode())
    for it in items:
        h.update(it["filename"].encode())
    return h.hexdigest()[:16]


def convert_image_folder(image_root, captions_file, store_path, *, image_size: int = 224, batch_size: int = 32,
                         on_bad_image: str = "fail", extras: dict | None = None, source: str = "images",
                         device: str = "cpu", progress: bool = True, fit: str = "letterbox",
                         background=(255, 255, 255), split_fractions=(0.8, 0.1, 0.1), regions: str = "grid",
                         grid: tuple[int, ...] = (), context: tuple[int, ...] = (1,), map_stride: int = 32) -> dict:
    """Encode every image with EfficientNet-Lite0 into regions (module docstring); write the store.

    extras: optional {name: callable(kept_filenames) -> array} evaluated after skipping bad images.
    Returns a report dict (images, captions, skipped files).
    """
    from ..cnn import MAPS, grid_regions, load_pretrained, object_regions, preprocess

    image_root, store_path = Path(image_root), Path(store_path)
    items = read_captions(captions_file, split_fractions)
    missing = [it["filename"] for it in items if not (image_root / it["filename"]).is_file()]
    if missing:
        raise StoreError(f"{image_root}: {len(missing)} image file(s) named in {captions_file} are missing, "
                         f"first: '{missing[0]}'")
    if regions == "objects" and not all("boxes" in it for it in items):
        first = next(it["filename"] for it in items if "boxes" not in it)
        raise StoreError(f"data.regions: objects needs object boxes for every image (Karpathy JSON "
                         f"images[].boxes), but {captions_file} has none for '{first}'; use data.regions: grid")
    model = load_pretrained().to(device)
    cells = (image_size + 31) // 32
    if regions == "objects":
        k = max(len(it["boxes"]) for it in items) + sum(n * n for n in context)
        layout = f"object boxes + context {'+'.join(f'{n}x{n}' for n in context) or 'none'}"
    else:
        k = sum(n * n for n in grid) if grid else cells * cells
        layout = "grid " + ("+".join(f"{n}x{n}" for n in grid) if grid else f"{cells}x{cells}")
    if map_stride != 32:  # the head's map keeps the layout string (and the resume digest) it always had
        layout += f" of the stride-{map_stride} map"
    dim = MAPS[map_stride][1]
    partial = store_path.with_name(f".{store_path.name}.partial")
    digest = _inputs_hash(items, image_root, f"{image_size}|{fit}|{tuple(background)}|{layout}")
    resume = partial.exists() and partial_attr(partial, "inputs_hash") == digest
    if partial.exists() and not resume:
        print(f"discarding {partial}: unreadable (cut by a crash) or made from other inputs; encoding from the start")
        partial.unlink()
    writer = StoreWriter(store_path, len(items), k, dim, source=source, pooled=True,
                         feature_extractor=f"efficientnet-lite0 imagenet {layout} @ {image_size}px",
                         tmp_path=partial, resume=resume, keep_partial=True)  # Ctrl-C: resumed next run
    with writer as w:
        w.set_attr("inputs_hash", digest)
        start = w.images_written
        if start:
            print(f"resuming {partial}: {start} of {len(items)} images were encoded before it stopped")
        bad = json.loads(w.get_attr("bad_images", "[]"))
        bar = progress_bar(total=len(items), initial=start, desc="encode images", unit="img", progress=progress)
        for s in range(start, len(items), batch_size):
            batch, ok = [], []
            for j, it in enumerate(items[s:s + batch_size]):
                try:
                    im = load_rgb(image_root / it["filename"], fit, background)
                    batch.append(im)
                    ok.append(j)
                except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
                    if on_bad_image == "fail":
                        raise StoreError(f"{image_root / it['filename']}: cannot decode image ({e}); "
                                         "set data.on_bad_image: skip to leave it out") from None
                    bad.append(it["filename"])
            n = len(items[s:s + batch_size])
            feats = np.zeros((n, k, dim), np.float32)
            boxes = np.zeros((n, k, 4), np.float32)
            n_regions = np.full(n, k)
            pooled = np.zeros((n, dim), np.float32)
            if batch:
                x = preprocess(batch, image_size).to(device)
                if regions == "objects":
                    obj = [items[s + j]["boxes"] for j in ok]
                    f, bx, nr, p = object_regions(model, x, obj, context, map_stride)
                    kk = f.shape[1]
                    feats[ok, :kk], boxes[ok, :kk], n_regions[ok] = f.cpu().numpy(), bx.numpy(), nr.numpy()
                else:
                    f, bx, p = grid_regions(model, x, grid, map_stride)
                    feats[ok], boxes[ok] = f.cpu().numpy(), bx.numpy()
                pooled[ok] = p.cpu().numpy()
            w.write_images(s, feats, boxes, n_regions, pooled)
            w.set_attr("bad_images", json.dumps(bad))
            w.flush()  # each batch on disk: a kill -9 loses at most the batch being encoded
            bar.update(n)
        bar.close()
        if bad:  # drop skipped images: rewrite the kept ones (rare path)
            print(f"skipped {len(bad)} undecodable image(s): {bad[:10]}")
            keep = [i for i, it in enumerate(items) if it["filename"] not in set(bad)]
            w.keep_images(keep)
            items = [items[i] for i in keep]
        _finish(w, items, image_root, extras)
    far = far_from_square(image_root, items)
    if far:
        print(f"{far} of {len(items)} images are far from square (aspect ratio above 2 or below 0.5); "
              f"they were {'letterboxed' if fit == 'letterbox' else 'centre-cropped'} (data.image_fit)")
    return {"images": len(items), "captions": sum(len(it["captions"]) for it in items), "skipped": bad,
            "far_from_square": far}


def far_from_square(image_root: Path, items) -> int:
    n = 0
    for it in items:
        try:
            with Image.open(image_root / it["filename"]) as im:  # reads the header only
                w, h = im.size
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError):
            continue
        n += not 0.5 <= w / h <= 2
    return n


def _finish(w: StoreWriter, items, image_root: Path, extras) -> None:
    texts, owner, splits = [], [], {}
    for i, it in enumerate(items):
        texts += it["captions"]
        owner += [i] * len(it["captions"])
        splits.setdefault(it["split"], []).append(i)
    stems = [Path(it["filename"]).stem for it in items]
    clash = set(repeated(stems))  # a/x.png and b/x.png: ids from the path, so ids stay one per image
    w.set_images([str(Path(it["filename"]).with_suffix("")) if st in clash else st for it, st in zip(items, stems)],
                 [it["filename"] for it in items],
                 image_root=str(image_root.resolve()))
    w.set_captions(texts, owner)
    w.set_splits(splits)
    for name, fn in (extras or {}).items():
        w.set_extra(name, fn([it["filename"] for it in items]))
