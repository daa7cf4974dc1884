"""Synthetic scenes: the embedded default dataset.

Each scene holds 2-5 objects (shape, colour, size) on a 3x3 layout with jitter, rendered with
PIL; five captions per image come from varied templates naming attributes and spatial
relations. The test split is built from *twins*. Attribute-swapped twins (swap_pairs): the same
objects at the same places with the colours of two objects exchanged; a global bag of features
sees nearly the same scene in both, telling them apart requires binding each colour to its object.
Relation-swapped twins (relation_pairs): two distinct objects whose positions are exchanged, every
caption naming their spatial relation; telling them apart requires binding words to places.

`generate` writes the image-folder source format (PNG files + Karpathy-style dataset.json) plus
swap_pairs.json and relation_pairs.json; the store is then built by the same converter as user images.
"""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

from PIL import Image, ImageDraw
from ..progress import bar as progress_bar

SHAPES = ("square", "circle", "triangle", "diamond")
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (50, 80, 220),
           "yellow": (235, 210, 40), "purple": (150, 60, 190), "white": (245, 245, 245)}
SIZES = {"small": 0.11, "large": 0.2}  # radius as a fraction of the image side
MARGIN = 0.03  # free border between an object and the image edge (fraction of the side)


def _scene(rng: random.Random) -> list[dict]:
    cells = rng.sample(range(9), rng.randint(2, 5))
    objs = []
    for cell in cells:
        row, col = divmod(cell, 3)
        o = {"shape": rng.choice(SHAPES), "colour": rng.choice(list(COLOURS)), "size": rng.choice(list(SIZES)),
             "x": (col + 0.5 + rng.uniform(-0.12, 0.12)) / 3, "y": (row + 0.5 + rng.uniform(-0.12, 0.12)) / 3}
        r = SIZES[o["size"]] + MARGIN  # keep the whole object inside the canvas, clear of the edge
        o["x"], o["y"] = min(max(o["x"], r), 1 - r), min(max(o["y"], r), 1 - r)
        objs.append(o)
    return objs


def _swapped(objs: list[dict], rng: random.Random) -> list[dict] | None:
    pairs = [(i, j) for i in range(len(objs)) for j in range(i + 1, len(objs)) if objs[i]["colour"] != objs[j]["colour"]]
    if not pairs:
        return None
    i, j = rng.choice(pairs)
    twin = [dict(o) for o in objs]
    twin[i]["colour"], twin[j]["colour"] = objs[j]["colour"], objs[i]["colour"]
    return twin


def _clamped(o: dict) -> dict:
    """The object moved (if need be) so that all of it lies inside the canvas, clear of the edge."""
    r = SIZES[o["size"]] + MARGIN
    return {**o, "x": min(max(o["x"], r), 1 - r), "y": min(max(o["y"], r), 1 - r)}


def _relation_twins(rng: random.Random) -> tuple[list[dict], list[dict]]:
    """Two distinguishable objects in different cells, and the same two with their positions
    exchanged (the relation between them flips). A large object moved to a small one's place is
    kept inside the canvas; a pair whose relation would then not flip is drawn again."""
    while True:
        objs = _scene(rng)[:2]
        if _np(objs[0]) == _np(objs[1]):
            continue
        twin = [_clamped({**objs[0], "x": objs[1]["x"], "y": objs[1]["y"]}),
                _clamped({**objs[1], "x": objs[0]["x"], "y": objs[0]["y"]})]
        if _relation(twin[0], twin[1]) == _relation(objs[1], objs[0]) and \
                _relation(twin[1], twin[0]) == _relation(objs[0], objs[1]):
            return objs, twin


def render(objs: list[dict], size: int, rng: random.Random) -> Image.Image:
    shade = rng.randint(90, 130)
    img = Image.new("RGB", (size, size), (shade, shade, shade))
    draw = ImageDraw.Draw(img)
    for o in objs:
        r = SIZES[o["size"]] * size
        cx, cy = o["x"] * size, o["y"] * size
        fill = COLOURS[o["colour"]]
        if o["shape"] == "square":
            draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif o["shape"] == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif o["shape"] == "triangle":
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
        else:
            draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    return img


def box(o: dict) -> list[float]:
    """The object's normalised bounding box (x1, y1, x2, y2): what a detector would give for it."""
    r = SIZES[o["size"]]
    return [round(o["x"] - r, 6), round(o["y"] - r, 6), round(o["x"] + r, 6), round(o["y"] + r, 6)]


def _np(o: dict, article: str = "a") -> str:
    return f"{article} {o['size']} {o['colour']} {o['shape']}"


def _relation(a: dict, b: dict) -> str:
    dx, dy = b["x"] - a["x"], b["y"] - a["y"]
    if abs(dx) >= abs(dy):
        return "left of" if dx > 0 else "right of"
    return "above" if dy > 0 else "below"


def captions(objs: list[dict], rng: random.Random, n: int = 5, relational: bool = False) -> list[str]:
    """n distinct-ish captions from varied templates (relational: only templates naming a relation)."""
    out = []
    templates = ["relation", "colour_of", "count"] if relational else ["relation", "pair", "list", "colour_of", "count"]
    for k in range(n):
        kind = templates[k % len(templates)] if k < len(templates) else rng.choice(templates)
        a, b = rng.sample(objs, 2)
        if kind == "relation":
            text = f"{_np(a)} {_relation(a, b)} {_np(b)}"
        elif kind == "pair":
            text = f"there is {_np(a)} and {_np(b)}"
        elif kind == "list":
            parts = [f"a {o['colour']} {o['shape']}" for o in rng.sample(objs, len(objs))]
            text = "a picture with " + (", ".join(parts[:-1]) + " and " + parts[-1])
        elif kind == "colour_of":
            text = f"the {a['size']} {a['shape']} is {a['colour']} and the {b['shape']} {_relation(b, a)} it is {b['colour']}"
        else:
            text = f"{len(objs)} shapes including {_np(a)} {_relation(a, b)} {_np(b)}"
        out.append(text)
    return out


def generate(out_dir, n_images: int, seed: int = 0, size: int = 224, val_frac: float = 0.1,
             test_frac: float = 0.1, progress: bool = True, train_twins: float = 0.0) -> Path:
    """Write n_images scenes as PNGs + dataset.json (Karpathy format) + swap_pairs.json +
    relation_pairs.json + train_pairs.json. The test split holds int(n_images * test_frac) attribute
    twins and half as many relation twins. A fraction `train_twins` of the train scenes comes as twin
    pairs too (alternately attribute- and relation-swapped; train_pairs.json), which training batches
    together so that each twin is the other's hard negative. Returns dataset.json."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    n_test = max(2, int(n_images * test_frac)) // 2 * 2
    n_val = max(1, int(n_images * val_frac))
    scenes, pairs = [], []
    while len(scenes) < n_test:  # test split: attribute-swapped twins
        objs = _scene(rng)
        twin = _swapped(objs, rng)
        if twin is None:
            continue
        pairs.append((len(scenes), len(scenes) + 1))
        scenes += [(objs, "test"), (twin, "test")]
    rel_pairs = []
    for _ in range(max(1, n_test // 4)):  # test split: relation-swapped twins
        rel_pairs.append((len(scenes), len(scenes) + 1))
        scenes += [(o, "test_relation") for o in _relation_twins(rng)]
    scenes += [(_scene(rng), "val") for _ in range(n_val)]
    train_pairs = []
    for k in range(int((n_images - len(scenes)) * train_twins) // 2):  # hard negatives for training
        if k % 2 == 0:
            objs = _scene(rng)
            while (twin := _swapped(objs, rng)) is None:
                objs = _scene(rng)
            kind, pair = "train", [objs, twin]
        else:
            kind, pair = "train_relation", list(_relation_twins(rng))
        train_pairs.append((len(scenes), len(scenes) + 1))
        scenes += [(o, kind) for o in pair]
    scenes += [(_scene(rng), "train") for _ in range(n_images - len(scenes))]
    images = []
    for i, (objs, split) in enumerate(progress_bar(scenes, progress, desc="render scenes")):
        name = f"scene_{i:06d}.png"
        render(objs, size, rng).save(out / "images" / name)
        caps = captions(objs, rng, relational=split.endswith("_relation"))
        images.append({"filename": name, "imgid": i, "split": split.removesuffix("_relation"), "objects": objs,
                       "boxes": [box(o) for o in objs],
                       "sentences": [{"raw": c, "tokens": c.split()} for c in caps]})
    (out / "dataset.json").write_text(json.dumps({"dataset": "synthetic", "images": images}))
    for name, twins in (("swap_pairs", pairs), ("relation_pairs", rel_pairs), ("train_pairs", train_pairs)):
        (out / f"{name}.json").write_text(json.dumps([[images[a]["filename"], images[b]["filename"]] for a, b in twins]))
    return out / "dataset.json"


# What a caption names, read back from the templates above: what a perfect scorer would check. It gives the
# most any model can reach on the twins (`twin_ceiling`): a caption that names no object whose colour
# changed scores its two twins alike, whatever the model.
_SIZE, _COLOUR, _SHAPE = "|".join(SIZES), "|".join(COLOURS), "|".join(SHAPES)
_REL = "left of|right of|above|below"
_NP = rf"(?:({_SIZE}) )?({_COLOUR}) ({_SHAPE})"
_COLOUR_OF = re.compile(rf"the ({_SIZE}) ({_SHAPE}) is ({_COLOUR}) and the ({_SHAPE}) ({_REL}) it is ({_COLOUR})")


def named(caption: str) -> tuple[list[tuple], list[tuple]]:
    """(objects, relations) a caption of `captions` names: objects as (size or None, colour, shape),
    relations as (object, relation, object) with `_relation`'s words."""
    if m := _COLOUR_OF.fullmatch(caption):
        a, b = (m[1], m[3], m[2]), (None, m[6], m[4])
        return [a, b], [(b, m[5], a)]
    objs = [(m[1], m[2], m[3]) for m in re.finditer(_NP, caption)]
    rels = [((m[1], m[2], m[3]), m[4], (m[5], m[6], m[7])) for m in re.finditer(rf"{_NP} ({_REL}) a {_NP}", caption)]
    return objs, rels


def perfect_score(objs: list[dict], caption: str, relations: bool = True) -> int:
    """How many of the things a caption names hold in a scene: each named object present with every
    attribute named, and (relations) each named relation between two such objects."""
    def matches(o, np):
        return (np[0] is None or o["size"] == np[0]) and o["colour"] == np[1] and o["shape"] == np[2]

    names, rels = named(caption)
    score = sum(any(matches(o, np) for o in objs) for np in names)
    if relations:
        score += sum(any(matches(a, x) and matches(b, y) and a is not b and _relation(a, b) == r
                         for a in objs for b in objs) for x, r, y in rels)
    return score


def twin_ceiling(images: list[dict], pairs, relations: bool = True) -> dict:
    """The twin accuracy of a perfect scorer (`perfect_score`) over twin pairs of dataset.json images
    (indices), as `metrics.swap_accuracy` counts it: every caption of both twins, its own twin against
    the other. ties: the share of comparisons the caption cannot decide; accuracy counts them as half
    (a model's scores for them differ by noise only)."""
    wins, ties = [], 0
    for a, b in pairs:
        for own, other in ((a, b), (b, a)):
            for s in images[own]["sentences"]:
                x = perfect_score(images[own]["objects"], s["raw"], relations)
                y = perfect_score(images[other]["objects"], s["raw"], relations)
                wins.append(1.0 if x > y else 0.5 if x == y else 0.0)
                ties += x == y
    return {"accuracy": 100.0 * sum(wins) / max(len(wins), 1), "ties": 100.0 * ties / max(len(wins), 1)}
