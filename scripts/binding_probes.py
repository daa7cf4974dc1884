"""What limits binding on the synthetic scenes (docs/results.md, "What limits binding"): how much of it the
inputs hold, measured without training the model.

- twin ceilings: the attribute- and relation-twin accuracy of a perfect scorer that checks what each
  caption names (`synthetic.twin_ceiling`): the most any model can reach on the store's test twins.
- text probe: a linear probe (multinomial logistic regression) on MiniLM's frozen state of the shape word
  in "<colour> <shape>" predicts the colour, at every layer: do cached states know which colour a noun has?
- role probe: the same probe on the shape word of a relation ("<shape> left of <shape>", "... above ...")
  predicts where its object lies from the other (left / right / above / below): do cached states know
  which side of the relation a noun is on, what binding a relation word to places needs?
- image probe: the same probe on each object region, ROI-pooled from the CNN map at each stride
  (cnn.MAPS), predicting the object's colour and its shape: which map keeps them?

Probes train on the train split's scenes and are scored on the others. Run from the project folder:
    .venv/bin/python scripts/binding_probes.py params/demo.yaml   (~2 min on 2 CPU cores)
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch


def probe(x: np.ndarray, y: np.ndarray, train: np.ndarray, classes: int) -> float:
    """Accuracy on ~train of an L2-regularised logistic regression fitted on train (standardised inputs).
    By hand because scikit-learn is not a dependency; LBFGS on this convex loss is what it would run."""
    x = torch.tensor(x, dtype=torch.float64)
    x = (x - x[train].mean(0)) / (x[train].std(0) + 1e-6)
    y = torch.tensor(y)
    w = torch.zeros(x.shape[1], classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=300)

    def loss():
        opt.zero_grad()
        v = torch.nn.functional.cross_entropy(x[train] @ w + b, y[train]) + 1e-2 * (w ** 2).sum()
        v.backward()
        return v
    opt.step(loss)
    with torch.no_grad():
        return float(((x[~train] @ w + b).argmax(1) == y[~train]).double().mean())


def main(params: str) -> None:
    from hosa_lib.cnn import MAPS, load_pretrained, preprocess, roi_pool
    from hosa_lib.config import load
    from hosa_lib.sources import synthetic as sy
    from hosa_lib.sources.imagefolder import load_rgb
    from hosa_lib.store import Store, StoreError
    from hosa_lib.text import load_backbone

    torch.set_num_threads(2)
    cfg = load(params)
    try:
        with Store(cfg.data.store) as s:
            root = Path(s.attrs["image_root"])
    except StoreError as e:
        sys.exit(str(e))
    images = json.loads((root.parent / "dataset.json").read_text())["images"]
    index = {im["filename"]: i for i, im in enumerate(images)}
    for name in ("swap_pairs", "relation_pairs"):
        pairs = [(index[a], index[b]) for a, b in json.loads((root.parent / f"{name}.json").read_text())]
        both, names_only = sy.twin_ceiling(images, pairs), sy.twin_ceiling(images, pairs, relations=False)
        print(f"{name}: perfect scorer {both['accuracy']:.1f} % ({both['ties']:.1f} % ties); reading objects "
              f"only {names_only['accuracy']:.1f} % ({names_only['ties']:.1f} % ties)")
    colours, shapes = list(sy.COLOURS), list(sy.SHAPES)

    tok, bb = load_backbone(cfg.data.text_model)
    bb.eval()
    sides = ["left", "right", "above", "below"]  # a relation's first word; its object lies on the other side
    other = {"left": "right", "right": "left", "above": "below", "below": "above"}
    probes = {"colour": ([], [], []), "role": ([], [], [])}  # states, labels, in train
    for im in images:
        for sent in im["sentences"]:
            enc = tok(sent["raw"], return_tensors="pt")
            with torch.no_grad():
                hidden = bb(**enc, output_hidden_states=True).hidden_states
            words = tok.convert_ids_to_tokens(enc["input_ids"][0])
            found = [(i, "colour", colours.index(words[i - 1])) for i in range(1, len(words))
                     if words[i] in shapes and words[i - 1] in colours]
            for r, w in enumerate(words):  # "<np> left of <np>": the shape before is left, the one after right
                if w not in sides:
                    continue
                before = [i for i in range(r) if words[i] in shapes]
                after = [i for i in range(r + 1, len(words)) if words[i] in shapes]
                if before and after:
                    found += [(before[-1], "role", sides.index(w)), (after[0], "role", sides.index(other[w]))]
            for i, kind, label in found:
                probes[kind][0].append([h[0, i].numpy() for h in hidden])
                probes[kind][1].append(label)
                probes[kind][2].append(im["split"] == "train")
    for kind, what, n in (("colour", "colour of the shape word", len(colours)),
                          ("role", "side of the relation of the shape word", len(sides))):
        states, labels, train = probes[kind][0], np.array(probes[kind][1]), np.array(probes[kind][2])
        for layer in range(len(states[0])):
            acc = probe(np.stack([s[layer] for s in states]), labels, train, n)
            print(f"text probe, {what}, layer {layer}: {100 * acc:.1f} % ({len(labels)} words, chance {100 / n:.1f} %)")

    cnn = load_pretrained()
    feats = {k: [] for k in MAPS}
    colour, shape, train = [], [], []
    for s in range(0, len(images), 32):
        batch = images[s:s + 32]
        x = preprocess([load_rgb(root / im["filename"], "letterbox", (255, 255, 255)) for im in batch], cfg.data.image_size)
        boxes = torch.zeros(len(batch), max(len(im["boxes"]) for im in batch), 4)
        for j, im in enumerate(batch):
            boxes[j, :len(im["boxes"])] = torch.tensor(im["boxes"])
        with torch.no_grad():
            for k in MAPS:
                pooled = roi_pool(cnn.features(x, k), boxes)
                feats[k] += [pooled[j, r].numpy() for j, im in enumerate(batch) for r in range(len(im["boxes"]))]
        for im in batch:
            for o in im["objects"]:
                colour.append(colours.index(o["colour"]))
                shape.append(shapes.index(o["shape"]))
                train.append(im["split"] == "train")
    colour, shape, train = np.array(colour), np.array(shape), np.array(train)
    for k in MAPS:
        x = np.stack(feats[k])
        print(f"image probe, object regions of the stride-{k} map ({MAPS[k][1]} channels) at {cfg.data.image_size} px: "
              f"colour {100 * probe(x, colour, train, len(colours)):.1f} %, shape {100 * probe(x, shape, train, len(shapes)):.1f} %")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python scripts/binding_probes.py PARAMS.yaml (a params file of the synthetic source)")
    main(sys.argv[1])
