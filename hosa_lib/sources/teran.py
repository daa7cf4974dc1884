"""TERAN/HOSA data layout -> store.

    <root>/<coco|f30k>/annotations/dataset_coco.json | dataset_flickr30k.json   (Karpathy splits), or
    <root>/coco/annotations/coco_{train,dev,test,restval}_ids.npy + captions_{train,val}2014.json
    <features>/bu_att/<id>.npz  (key 'feat', K x 2048 bottom-up region features)
    <features>/bu_box/<id>.npy  (K x 4 boxes in pixels, normalised here by the image size)

Feature ids: the COCO image id for COCO, the Karpathy image index for Flickr30K (as TERAN).
Image sizes: COCO caption JSONs ('images'[].width/height) when present; otherwise a TERAN
`sizes.pkl` (list of (w, h) in Karpathy order) or an image folder (`image_sizes`).
"""
from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path

import numpy as np
from ..progress import bar as progress_bar

from ..store import StoreError, StoreWriter
from . import canonical_split, repeated

KARPATHY = {"coco": "dataset_coco.json", "f30k": "dataset_flickr30k.json"}


CAPTIONS_PER_IMAGE = 5  # an image's sentences[:5] are kept (5 per image, as TERAN's relevance files): some COCO images have 6 or 7


def _karpathy(ann: Path, dataset: str) -> list[dict]:
    """Images of a Karpathy JSON with their first five sentences (as TERAN and VSE++ read them, so
    that TERAN's relevance files, 5 captions per image, match in size)."""
    path = ann / KARPATHY[dataset]
    data = json.loads(path.read_text())
    out, cut = [], 0
    for i, im in enumerate(data["images"]):
        fid = im.get("cocoid", i) if dataset == "coco" else i
        if not im.get("sentences"):
            raise StoreError(f"{path}: image {i} ('{im.get('filename')}', id {fid}) has no sentences")
        cut += len(im["sentences"]) > CAPTIONS_PER_IMAGE
        out.append({"id": str(fid), "key": i, "split": canonical_split(im["split"], f"{path} image {i}"),
                    "captions": [s["raw"] for s in im["sentences"][:CAPTIONS_PER_IMAGE]], "filename": im["filename"]})
    if cut:
        print(f"{path}: {cut} image(s) have more than {CAPTIONS_PER_IMAGE} sentences; kept the first "
              f"{CAPTIONS_PER_IMAGE} of each, as TERAN and VSE++ do")
    dupes = repeated(it["id"] for it in out)
    if dupes:
        raise StoreError(f"{path}: image id(s) listed more than once (an image in two splits?): {dupes[:5]}")
    return out


def _coco_ids(ann: Path) -> list[dict]:
    """COCO annotation-id variant: ids index captions in captions_{train,val}2014.json."""
    jsons = {}
    for part in ("train", "val"):
        p = ann / f"captions_{part}2014.json"
        if not p.is_file():
            raise StoreError(f"{ann}: missing {p.name} (needed with coco_*_ids.npy)")
        jsons[part] = json.loads(p.read_text())
    anns = {part: {a["id"]: a for a in j["annotations"]} for part, j in jsons.items()}
    by_image: dict[int, dict] = {}
    for split, part in (("train", "train"), ("dev", "val"), ("test", "val"), ("restval", "val")):
        f = ann / f"coco_{split}_ids.npy"
        if not f.is_file():
            continue
        ids = np.load(f)
        if split == "dev":
            ids = ids[:5000]  # TERAN/VSE++ validate on the first 5000 dev captions
        for aid in ids:
            a = anns[part].get(int(aid))
            if a is None:
                raise StoreError(f"{f}: annotation id {int(aid)} not in captions_{part}2014.json")
            item = by_image.setdefault(a["image_id"], {"id": str(a["image_id"]), "key": a["image_id"],
                                                       "split": canonical_split(split, str(f)), "captions": []})
            if item["split"] != canonical_split(split, str(f)):
                raise StoreError(f"{f}: image {a['image_id']} is also in split '{item['split']}' (an image in two "
                                 "splits would share its features between them)")
            item["captions"].append(a["caption"])
    if not by_image:
        raise StoreError(f"{ann}: no coco_*_ids.npy files found")
    return list(by_image.values())


def _coco_sizes(ann: Path) -> dict[str, tuple[int, int]]:
    sizes = {}
    for part in ("train", "val"):
        p = ann / f"captions_{part}2014.json"
        if p.is_file():
            for im in json.loads(p.read_text())["images"]:
                sizes[str(im["id"])] = (im["width"], im["height"])
    return sizes


def _other_sizes(items, image_sizes: str) -> dict[str, tuple[int, int]]:
    src = Path(image_sizes)
    if src.suffix == ".pkl":
        with src.open("rb") as fh:
            seq = pickle.load(fh)
        return {it["id"]: tuple(seq[it["key"]]) for it in items}
    from PIL import Image
    out = {}
    for it in items:
        with Image.open(src / it["filename"]) as im:
            out[it["id"]] = im.size
    return out


def load_region_file(feat_path: Path, box_path: Path, max_regions: int | None, dim: int | None):
    """Read and check one image's features and boxes; errors name the file and the problem."""
    if not feat_path.is_file():
        raise StoreError(f"missing feature file {feat_path}")
    if not box_path.is_file():
        raise StoreError(f"missing box file {box_path}")
    try:
        with np.load(feat_path) as z:
            if "feat" not in z.files:
                raise StoreError(f"{feat_path}: no key 'feat' (keys: {z.files})")
            feat = z["feat"]
        boxes = np.load(box_path)
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
        raise StoreError(f"{feat_path}: unreadable or truncated ({e})") from None
    if feat.ndim != 2 or not np.issubdtype(feat.dtype, np.floating):
        raise StoreError(f"{feat_path}: 'feat' must be a float (K, D) array, got {feat.dtype} {feat.shape}")
    if (max_regions and feat.shape[0] > max_regions) or (dim and feat.shape[1] != dim):
        raise StoreError(f"{feat_path}: 'feat' shape {feat.shape}, expected (<={max_regions}, {dim})")
    if boxes.shape != (feat.shape[0], 4):
        raise StoreError(f"{box_path}: boxes shape {boxes.shape}, expected ({feat.shape[0]}, 4)")
    if not np.isfinite(feat).all():
        raise StoreError(f"{feat_path}: 'feat' contains NaN/Inf")
    if not np.isfinite(boxes).all():
        raise StoreError(f"{box_path}: boxes contain NaN/Inf")
    return feat, boxes


def normalise_boxes(boxes: np.ndarray, wh: np.ndarray) -> tuple[np.ndarray, int]:
    """Pixel boxes -> (x1, y1, x2, y2) in [0, 1] with x1 <= x2, y1 <= y2; returns how many boxes
    had to be fixed (reversed corners, negative or beyond the image)."""
    b = boxes / wh
    fixed = np.concatenate([np.minimum(b[:, :2], b[:, 2:]), np.maximum(b[:, :2], b[:, 2:])], axis=1).clip(0, 1)
    return fixed.astype(np.float32), int((np.abs(fixed - b) > 1e-6).any(axis=1).sum())


def split_source(ann: Path, dataset: str, prefer: str = "karpathy") -> str:
    """Which split files to read: 'karpathy' (dataset_*.json) or 'ids' (COCO coco_*_ids.npy, what
    TERAN's own COCO loader reads). `prefer` decides when a layout has both."""
    has_json = (ann / KARPATHY[dataset]).is_file()
    has_ids = dataset == "coco" and (ann / "coco_test_ids.npy").is_file()
    if has_json and has_ids:
        return prefer
    if has_json or has_ids:
        return "karpathy" if has_json else "ids"
    raise StoreError(f"{ann}: expected {KARPATHY[dataset]}" + (" or coco_*_ids.npy" if dataset == "coco" else ""))


def convert_teran(root, dataset: str, store_path, *, features_dir: str = "", restval: bool = True,
                  image_sizes: str = "", only_splits: tuple[str, ...] | None = None, progress: bool = True,
                  prefer: str = "karpathy", dtype: str = "float16") -> dict:
    """Convert the TERAN layout; only_splits=("test",) converts just those splits (evaluation).
    prefer: split files when both exist ('ids' follows TERAN's COCO loader); dtype of the stored features."""
    root = Path(root)
    ann = root / dataset / "annotations"
    source = split_source(ann, dataset, prefer)
    if progress:
        print(f"{ann}: reading splits from " + (KARPATHY[dataset] if source == "karpathy" else "coco_*_ids.npy"))
    items = _karpathy(ann, dataset) if source == "karpathy" else _coco_ids(ann)
    if only_splits:
        items = [it for it in items if it["split"] in only_splits]
        if not items:
            raise StoreError(f"{ann}: no images in split(s) {only_splits}")
    feats_dir = Path(features_dir) if features_dir else root / dataset / "features_36"
    sizes = _coco_sizes(ann) if dataset == "coco" else {}
    if any(it["id"] not in sizes for it in items):
        if not image_sizes:
            raise StoreError(f"{ann}: image sizes unknown (box normalisation needs them): give data.image_sizes "
                             "(TERAN sizes.pkl or the image folder), or COCO captions_*2014.json")
        sizes = _other_sizes(items, image_sizes)
    first, _ = load_region_file(feats_dir / "bu_att" / f"{items[0]['id']}.npz",
                                feats_dir / "bu_box" / f"{items[0]['id']}.npy", None, None)
    k, dim = 36 if first.shape[0] <= 36 else first.shape[0], first.shape[1]
    n_fixed = 0
    with StoreWriter(store_path, len(items), k, dim, source=f"teran-{dataset}", dtype=dtype,
                     feature_extractor="bottom-up-attention faster r-cnn (features_36)") as w:
        for i, it in enumerate(progress_bar(items, progress, desc=f"convert {dataset}")):
            feat, boxes = load_region_file(feats_dir / "bu_att" / f"{it['id']}.npz",
                                           feats_dir / "bu_box" / f"{it['id']}.npy", k, dim)
            boxes, fixed = normalise_boxes(boxes, np.tile(np.asarray(sizes[it["id"]], np.float32), 2))
            n_fixed += fixed
            w.write_images(i, feat[None], boxes[None], np.array([len(feat)]))
        texts, owner, splits = [], [], {}
        for i, it in enumerate(items):
            texts += it["captions"]
            owner += [i] * len(it["captions"])
            splits.setdefault(it["split"], []).append(i)
        if restval and "restval" in splits:
            splits["train"] = sorted(splits.get("train", []) + splits["restval"])
        w.set_images([it["id"] for it in items])
        w.set_captions(texts, owner)
        w.set_splits(splits)
    if n_fixed:
        print(f"{feats_dir / 'bu_box'}: {n_fixed} box(es) had reversed corners or lay outside their image; "
              "clipped to the image")
    return {"images": len(items), "captions": len(texts), "split_source": source, "boxes_fixed": n_fixed}
