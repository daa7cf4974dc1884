"""Generated data in TERAN's exact COCO layout, for scale benchmarks and tests of the converters.

    <root>/coco/annotations/dataset_coco.json       Karpathy splits: images[] with cocoid, filename, split, sentences[].raw
    <root>/coco/annotations/captions_{train,val}2014.json   image sizes (images[].id/width/height)
    <root>/coco/features_36/bu_att/<cocoid>.npz     'feat' (36, 2048) float32 bottom-up region features
    <root>/coco/features_36/bu_box/<cocoid>.npy     (36, 4) float32 boxes in pixels

Features are random; captions are COCO-like sentences (7-14 words from a 1,200-word vocabulary, 5 per
image, 10.5 words on average as in COCO) so that tokenised lengths and ROUGE-L overlaps resemble real captions.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

NOUNS = [f"{w}" for w in ("man woman person child dog cat horse bus train car truck bicycle plane boat bird table "
                          "chair bed couch pizza sandwich cake kitchen street field beach room giraffe elephant "
                          "zebra sheep cow umbrella kite skateboard surfboard laptop phone clock vase toilet sink "
                          "bench sign window door tree grass water snow building road plate bowl cup").split()]
ADJ = "a the two three some several small large red blue white black green yellow old young wooden tall".split()
VERB = "sitting standing riding holding eating walking looking playing flying parked lying carrying".split()
PREP = "on in near next to with behind under beside across along over".split()
FILL = [f"w{i}" for i in range(1200 - len(NOUNS) - len(ADJ) - len(VERB) - len(PREP))]


def caption(rng: np.random.Generator) -> str:
    words = [rng.choice(ADJ), rng.choice(NOUNS), rng.choice(VERB), rng.choice(PREP), rng.choice(ADJ),
             rng.choice(NOUNS)]
    for _ in range(rng.integers(1, 9)):  # 7-14 words, 10.5 on average like COCO
        words.insert(int(rng.integers(1, len(words))), rng.choice(FILL if rng.random() < 0.4 else NOUNS + ADJ + PREP))
    return " ".join(words).capitalize() + "."


def split_sizes(n: int) -> dict[str, int]:
    """COCO's Karpathy proportions, scaled: 5,000 test and val at full size, restval 30,504."""
    test = min(5000, max(1, n // 5))
    val = min(5000, max(1, n // 10))
    restval = int(0.27 * (n - test - val))
    return {"test": test, "val": val, "restval": restval, "train": n - test - val - restval}


def write_coco_layout(root, n: int, seed: int = 0, k: int = 36, dim: int = 2048, captions_per_image: int = 5) -> Path:
    """Write n images in TERAN's COCO layout under root; returns root."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    ann, feats = root / "coco" / "annotations", root / "coco" / "features_36"
    for d in (ann, feats / "bu_att", feats / "bu_box"):
        d.mkdir(parents=True, exist_ok=True)
    splits = [s for s, m in split_sizes(n).items() for _ in range(m)]
    images, sizes = [], []
    for i in range(n):
        cid = 100000 + i
        w, h = int(rng.integers(320, 641)), int(rng.integers(240, 481))
        xy = rng.random((k, 2)) * [w * 0.7, h * 0.7]
        box = np.concatenate([xy, xy + rng.random((k, 2)) * [w * 0.3, h * 0.3]], axis=1).astype(np.float32)
        np.savez(feats / "bu_att" / f"{cid}.npz", feat=rng.random((k, dim), dtype=np.float32))
        np.save(feats / "bu_box" / f"{cid}.npy", box)
        images.append({"filepath": "val2014", "filename": f"COCO_val2014_{cid:012d}.jpg", "imgid": i,
                       "split": splits[i], "cocoid": cid, "sentids": list(range(5 * i, 5 * i + captions_per_image)),
                       "sentences": [{"raw": caption(rng), "tokens": [], "imgid": i, "sentid": 5 * i + j}
                                     for j in range(captions_per_image)]})
        sizes.append({"id": cid, "width": w, "height": h})
    (ann / "dataset_coco.json").write_text(json.dumps({"images": images, "dataset": "coco"}))
    (ann / "captions_val2014.json").write_text(json.dumps({"images": sizes, "annotations": []}))
    (ann / "captions_train2014.json").write_text(json.dumps({"images": [], "annotations": []}))
    return root
