import csv
import json
import os
import signal
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest
import yaml
from PIL import Image

from hosa_lib.config import ConfigError, load
from hosa_lib.sources.imagefolder import convert_image_folder
from hosa_lib.sources.scan import convert_scan
from hosa_lib.sources.teran import convert_teran
from hosa_lib.data import CaptionDataset, TextInput
from hosa_lib.store import Store, StoreError, StoreWriter

RNG = np.random.default_rng(0)


def write_teran(root, dataset="f30k", n=4, k=36, dim=2048, layout="karpathy"):
    """TERAN layout: annotations + features_36/bu_att/<id>.npz (feat) + bu_box/<id>.npy (pixels)."""
    ann = root / dataset / "annotations"
    ann.mkdir(parents=True)
    feats = root / dataset / "features_36"
    (feats / "bu_att").mkdir(parents=True)
    (feats / "bu_box").mkdir(parents=True)
    splits = ["train", "restval", "val", "test"][:n] + ["test"] * max(0, n - 4)
    images, ids = [], []
    for i in range(n):
        fid = 1000 + i if dataset == "coco" else i
        ids.append(fid)
        images.append({"filename": f"im{i}.jpg", "imgid": i, "split": splits[i], "cocoid": fid,
                       "sentences": [{"raw": f"caption {j} of image {i}", "tokens": []} for j in range(5)]})
        np.savez(feats / "bu_att" / f"{fid}.npz", feat=RNG.random((k, dim), dtype=np.float32))
        np.save(feats / "bu_box" / f"{fid}.npy", np.tile([10.0, 20.0, 300.0, 200.0], (k, 1)))
    if layout == "karpathy":
        name = "dataset_coco.json" if dataset == "coco" else "dataset_flickr30k.json"
        (ann / name).write_text(json.dumps({"images": images, "dataset": dataset}))
    if dataset == "coco":  # caption JSONs give sizes (and captions for the ids variant)
        for part, members in (("train", [0]), ("val", list(range(1, n)))):
            js = {"images": [{"id": ids[i], "width": 640, "height": 400} for i in members],
                  "annotations": [{"id": ids[i] * 10 + j, "image_id": ids[i], "caption": f"cap {j} img {i}"}
                                  for i in members for j in range(5)]}
            (ann / f"captions_{part}2014.json").write_text(json.dumps(js))
        if layout == "ids":
            for split, members in (("train", [0]), ("restval", [1]), ("dev", [2]), ("test", list(range(3, n)))):
                np.save(ann / f"coco_{split}_ids.npy", np.array([ids[i] * 10 + j for i in members for j in range(5)]))
    return root, ids


@pytest.mark.parametrize("dataset,layout", [("f30k", "karpathy"), ("coco", "karpathy"), ("coco", "ids")])
def test_teran_layout(tmp_path, dataset, layout):
    root, ids = write_teran(tmp_path, dataset, layout=layout)
    sizes = ""
    if dataset == "f30k":  # TERAN's sizes.pkl: (w, h) per Karpathy index
        import pickle
        (tmp_path / "sizes.pkl").write_bytes(pickle.dumps([(640, 400)] * 4))
        sizes = str(tmp_path / "sizes.pkl")
    out = tmp_path / "s.h5"
    convert_teran(root, dataset, out, image_sizes=sizes, progress=False)
    with Store(out) as s:
        assert s.n_images == 4 and len(s.caption_image) == 20
        got = s.image_ids()
        assert sorted(got) == sorted(str(i) for i in ids)
        np.testing.assert_allclose(s.f["images/boxes"][0, 0], [10 / 640, 20 / 400, 300 / 640, 200 / 400], rtol=1e-6)
        assert s.f["images/features"].dtype == np.float16 and s.f["images/features"].shape == (4, 36, 2048)
        by_split = lambda name: sorted(got[i] for i in s.split_images(name))
        assert by_split("train") == [str(ids[0]), str(ids[1])]  # restval joins train
        assert by_split("test") == [str(ids[3])]
        feat_file = root / dataset / "features_36" / "bu_att" / f"{got[2]}.npz"
        np.testing.assert_allclose(s.f["images/features"][2], np.load(feat_file)["feat"], rtol=1e-3, atol=1e-3)
        assert np.bincount(s.caption_image).tolist() == [5, 5, 5, 5]


def test_teran_restval_off(tmp_path):
    root, _ = write_teran(tmp_path, "coco")
    convert_teran(root, "coco", tmp_path / "s.h5", restval=False, progress=False)
    with Store(tmp_path / "s.h5") as s:
        assert s.split_images("train").tolist() == [0]
        assert s.split_images("restval").tolist() == [1]


@pytest.mark.parametrize("damage,match", [
    ("missing", "missing feature file"), ("shape", "expected"), ("truncated", "truncated"),
    ("nan", "NaN"), ("dtype", "float"), ("split", "unknown split name")])
def test_teran_bad_input(tmp_path, damage, match):
    root, ids = write_teran(tmp_path, "coco")
    att = root / "coco" / "features_36" / "bu_att" / f"{ids[2]}.npz"
    if damage == "missing":
        att.unlink()
    elif damage == "shape":
        np.savez(att, feat=np.zeros((36, 1024), np.float32))
    elif damage == "truncated":
        att.write_bytes(att.read_bytes()[:200])
    elif damage == "nan":
        bad = np.zeros((36, 2048), np.float32)
        bad[3, 3] = np.nan
        np.savez(att, feat=bad)
    elif damage == "dtype":
        np.savez(att, feat=np.zeros((36, 2048), np.int64))
    else:
        p = root / "coco" / "annotations" / "dataset_coco.json"
        js = json.loads(p.read_text())
        js["images"][1]["split"] = "holdout"
        p.write_text(json.dumps(js))
    out = tmp_path / "s.h5"
    with pytest.raises(StoreError, match=match):
        convert_teran(root, "coco", out, progress=False)
    assert not out.exists() and not list(tmp_path.glob(".s.h5*"))


def write_scan(root, split="test", n=3, k=36, dim=64, lines=None):
    np.save(root / f"{split}_ims.npy", RNG.random((n, k, dim), dtype=np.float32))
    caps = [f"a caption {i}" for i in range(lines if lines is not None else 5 * n)]
    (root / f"{split}_caps.txt").write_text("\n".join(caps) + "\n")


def test_scan_arrays(tmp_path):
    write_scan(tmp_path, "test", 3)
    write_scan(tmp_path, "dev", 2)
    convert_scan(tmp_path, tmp_path / "s.h5", splits=("dev", "test"), progress=False)
    with Store(tmp_path / "s.h5") as s:
        assert s.n_images == 5 and s.split_images("val").tolist() == [0, 1]
        assert s.caption_image.tolist() == [0] * 5 + [1] * 5 + [2] * 5 + [3] * 5 + [4] * 5
        assert s.captions([12, 7]) == ["a caption 2", "a caption 7"]  # test line 2, dev line 7


def test_scan_wrong_line_count(tmp_path):
    write_scan(tmp_path, "test", 3, lines=14)
    with pytest.raises(StoreError, match=r"test_caps.txt: 14 lines, expected 5 x 3"):
        convert_scan(tmp_path, tmp_path / "s.h5", splits=("test",), progress=False)
    assert not (tmp_path / "s.h5").exists()


def test_scan_unknown_split(tmp_path):
    write_scan(tmp_path, "test", 1)
    with pytest.raises(StoreError, match="unknown split name 'holdout'"):
        convert_scan(tmp_path, tmp_path / "s.h5", splits=("holdout",), progress=False)


def make_image_folder(root, n=3, bad=None):
    (root / "img").mkdir()
    rows = []
    for i in range(n):
        Image.fromarray((RNG.random((40, 50, 3)) * 255).astype(np.uint8)).save(root / "img" / f"{i}.png")
        rows += [(f"{i}.png", f"photo number {i} version {j}", "test" if i else "train") for j in range(2)]
    if bad is not None:
        (root / "img" / f"{bad}.png").write_bytes(b"not an image")
    with (root / "caps.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["filename", "caption", "split"])
        w.writerows(rows)
    return root / "img", root / "caps.csv"


def test_image_folder_csv(tmp_path):
    img, caps = make_image_folder(tmp_path)
    rep = convert_image_folder(img, caps, tmp_path / "s.h5", image_size=64, progress=False)
    assert rep == {"images": 3, "captions": 6, "skipped": [], "far_from_square": 0}
    with Store(tmp_path / "s.h5") as s:
        assert s.f["images/features"].shape == (3, 4, 1280) and s.f["images/pooled"].shape == (3, 1280)
        assert s.split_images("test").tolist() == [1, 2]
        assert s.f["images/boxes"][0, -1].tolist() == [0.5, 0.5, 1.0, 1.0]
        assert s.image_file(1).name == "1.png"


def test_image_folder_bad_image_fail_or_skip(tmp_path):
    img, caps = make_image_folder(tmp_path, bad=1)
    with pytest.raises(StoreError, match=r"1.png: cannot decode"):
        convert_image_folder(img, caps, tmp_path / "s.h5", image_size=64, progress=False)
    assert not (tmp_path / "s.h5").exists() and not list(tmp_path.glob(".s.h5*"))
    rep = convert_image_folder(img, caps, tmp_path / "s.h5", image_size=64, on_bad_image="skip", progress=False)
    assert rep["skipped"] == ["1.png"] and rep["images"] == 2
    with Store(tmp_path / "s.h5") as s:
        assert s.image_ids() == ["0", "2"] and s.caption_image.tolist() == [0, 0, 1, 1]


def test_image_folder_empty_caption(tmp_path):
    img, caps = make_image_folder(tmp_path)
    caps.write_text("filename,caption\n0.png,a cat\n1.png,  \n")
    with pytest.raises(StoreError, match="empty caption #0 for image '1.png'"):
        convert_image_folder(img, caps, tmp_path / "s.h5", image_size=64, progress=False)


def test_pretrained_cnn_classifies_chelsea():
    import skimage.data
    import torch

    from hosa_lib.cnn import load_pretrained, preprocess

    logits = load_pretrained()(preprocess([Image.fromarray(skimage.data.chelsea())], 224))
    top = logits.softmax(-1)[0].topk(3)
    assert top.indices[0].item() in (281, 282, 285)  # tabby / tiger cat / Egyptian cat
    assert top.values[0] > 0.5


def test_kill_mid_write_leaves_previous_store(tmp_path):
    path = tmp_path / "s.h5"
    with StoreWriter(path, 1, 2, 3, source="t", feature_extractor="x") as w:
        w.write_images(0, np.ones((1, 2, 3)), np.zeros((1, 2, 4)), np.array([2]))
        w.set_images(["old"]); w.set_captions(["old caption"], [0])
    before = path.read_bytes()
    script = textwrap.dedent(f"""
        import numpy as np, os, signal, sys
        from hosa_lib.store import StoreWriter
        with StoreWriter({str(path)!r}, 400, 36, 2048, source="t", feature_extractor="x") as w:
            for i in range(400):
                w.write_images(i, np.ones((1, 36, 2048)), np.zeros((1, 36, 4)), np.array([36]))
                if i == 50:
                    print("writing", flush=True)
                    os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL and "writing" in proc.stdout
    assert path.read_bytes() == before  # final name untouched
    with Store(path) as s:
        assert s.image_ids() == ["old"]


def test_ctrl_c_mid_write_removes_temp(tmp_path):
    path = tmp_path / "s.h5"
    with pytest.raises(KeyboardInterrupt):
        with StoreWriter(path, 2, 2, 3, source="t", feature_extractor="x"):
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_validation_errors(tmp_path):
    path = tmp_path / "s.h5"
    with pytest.raises(StoreError, match="captions/image' index out of range"):
        with StoreWriter(path, 1, 2, 3, source="t", feature_extractor="x") as w:
            w.write_images(0, np.ones((1, 2, 3)), np.zeros((1, 2, 4)), np.array([2]))
            w.set_images(["a"]); w.set_captions(["c"], [3])
    with pytest.raises(StoreError, match=r"NaN/Inf for image 0 \(id a\)"):
        with StoreWriter(path, 1, 2, 3, source="t", feature_extractor="x") as w:
            w.write_images(0, np.full((1, 2, 3), np.nan), np.zeros((1, 2, 4)), np.array([2]))
            w.set_images(["a"]); w.set_captions(["c"], [0])
    assert not path.exists()
    with StoreWriter(path, 1, 2, 3, source="t", feature_extractor="x") as w:
        w.write_images(0, np.ones((1, 2, 3)), np.zeros((1, 2, 4)), np.array([2]))
        w.set_images(["a"]); w.set_captions(["c"], [0])
    with h5py.File(path, "r+") as f:
        f.attrs["schema_version"] = 99
    with pytest.raises(StoreError, match="schema_version 99, expected 1"):
        Store(path)


def test_synthetic_store_and_dataloader_workers(smoke_store):
    import torch

    from hosa_lib.data import collate
    with Store(smoke_store.store) as s:
        summ = s.summary()
        assert summ["images"] == 40 and summ["captions"] == 200
        pairs = s.extra("swap_pairs")
        assert len(pairs) >= 2 and set(pairs.flatten()) <= set(s.split_images("test").tolist())
        a, b = pairs[0]
        assert not np.array_equal(s.features([a]), s.features([b]))
        rel_pairs = s.split_pairs("relation_pairs", "test")
        assert len(rel_pairs) >= 1 and s.split_pairs("relation_pairs", "train").shape == (0, 2)
        rel = s.relevance("test")["rougeL"]
        assert rel.shape == (len(s.split_captions("test")), len(s.split_images("test")))
        key = s.text_keys()[0]
    ds = CaptionDataset(smoke_store.store, "train", TextInput(cache_key=key))
    loader = torch.utils.data.DataLoader(ds, batch_size=8, collate_fn=collate, num_workers=2)
    batches = list(loader)
    assert sum(b["captions"]["text"].shape[0] for b in batches) == len(ds)
    for b in batches:  # every caption's image is in its batch, once
        assert (b["images"]["index"][:, None] == b["captions"]["image"][None]).sum(0).eq(1).all()


def test_params_errors(tmp_path):
    p = tmp_path / "p.yaml"
    p.write_text("data:\n  n_imagez: 3\n")
    with pytest.raises(ConfigError, match="unknown key 'data.n_imagez'"):
        load(p)
    p.write_text("train:\n  epochs: ten\n")
    with pytest.raises(ConfigError, match="'train.epochs' = 'ten': expected int"):
        load(p)
    p.write_text("scoring:\n  direction: sideways\n")
    with pytest.raises(ConfigError, match="expected one of"):
        load(p)
    (tmp_path / "child.yaml").write_text("base: p.yaml\nscoring:\n  bands: 4\n")
    p.write_text("scoring:\n  bands: 8\n  temperature: 2\n")
    cfg = load(tmp_path / "child.yaml")
    assert cfg.scoring.bands == 4 and cfg.scoring.temperature == 2.0


def test_every_params_file_loads():
    """Every params file builds a config whose values are what its file says; every ablation grid's
    variants apply cleanly to the params that name it."""
    from pathlib import Path

    from hosa_lib.ablations import read_grid
    from hosa_lib.ablations import cell_config
    from hosa_lib.config import PATH_KEYS, RunConfig, own_names, override, read_params
    root = Path(__file__).resolve().parent.parent
    files = sorted((root / "params").glob("*.yaml"))
    assert {"base.yaml", "demo.yaml", "smoke.yaml", "coco.yaml", "f30k.yaml"} <= {p.name for p in files}
    grids, named_by = set(), {}
    for p in files:
        cfg = load(p)
        raw = own_names(p, read_params(p))  # name and store: the file's own, or derived from its name
        assert cfg.name == raw["name"] and (raw["name"] == p.stem or "name" in yaml.safe_load(p.read_text()))
        for section, values in raw.items():  # each value in the file (after the base chain) is in the config
            if isinstance(values, dict):
                for k, v in values.items():
                    got = getattr(getattr(cfg, section), k)
                    if f"{section}.{k}" in PATH_KEYS and v:  # relative paths resolve against the project root
                        v = str(root / v)
                    assert got == (tuple(v) if isinstance(v, list) else v), f"{p.name}: {section}.{k}"
        grids.add(cfg.ablation.grid)
        named_by.setdefault(Path(cfg.ablation.grid).name, p.name)
        assert cfg != RunConfig() or p.name == "base.yaml"
        for v in read_grid(cfg.ablation.grid)[0]:  # the grid a params file names fits it, cell by cell
            cell_config(cfg, v, 0, cfg.ablation.grid)
    gfiles = sorted((root / "params" / "ablations").glob("*.yaml"))
    assert len(gfiles) >= 3
    # grids no params file names, and the params they are run with (README / their own comments)
    run_with = {"full.yaml": "demo.yaml", "seeds3.yaml": "demo.yaml", "finetuned3.yaml": "demo_s8.yaml",
                "recipe.yaml": "images.yaml", **named_by}
    for g in gfiles:
        variants, seeds = read_grid(g)
        assert variants and all(isinstance(s, int) for s in seeds or [0]), g.name
        assert g.name in run_with, f"{g.name}: no params file names it"
        base = load(root / "params" / run_with[g.name])
        for v in variants:  # strictly typed: a misspelt override key fails here
            cell = override(base, v["overrides"], f"{g.name}: {v['name']}")
            assert cell != base or not v["overrides"] or v["overrides"] == {"train": {}} or v["name"] == "hosa"


def test_image_encoding_resumes_after_ctrl_c(tmp_path, monkeypatch):
    """Ctrl-C mid-encoding keeps .<store>.partial; the next run encodes only the rest, same result."""
    import hosa_lib.cnn as cnn
    img, caps = make_image_folder(tmp_path, n=5)
    clean = tmp_path / "clean.h5"
    convert_image_folder(img, caps, clean, image_size=64, batch_size=2, progress=False)
    real, calls = cnn.grid_regions, []

    def interrupted(model, x, levels=(), stride=32):
        calls.append(len(x))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(model, x, levels, stride)
    monkeypatch.setattr(cnn, "grid_regions", interrupted)
    out = tmp_path / "s.h5"
    with pytest.raises(KeyboardInterrupt):
        convert_image_folder(img, caps, out, image_size=64, batch_size=2, progress=False)
    assert not out.exists() and (tmp_path / ".s.h5.partial").exists()
    calls.clear()
    monkeypatch.setattr(cnn, "grid_regions", lambda m, x, levels=(), stride=32: calls.append(len(x)) or real(m, x, levels, stride))
    convert_image_folder(img, caps, out, image_size=64, batch_size=2, progress=False)
    assert calls == [2, 1]  # images 0-1 were kept; only 2-3 and 4 were encoded again
    assert not (tmp_path / ".s.h5.partial").exists()
    with Store(out) as a, Store(clean) as b:
        np.testing.assert_array_equal(a.f["images/features"][:], b.f["images/features"][:])


def test_rouge_l_relevance_values():
    from hosa_lib.relevance import load_teran_relevance, rouge_l_matrix
    rel = rouge_l_matrix(["a red cube", "green dog runs"], [["a red cube", "a blue ball"], ["the cat sleeps"]],
                         progress=False)
    assert rel[0, 0] == pytest.approx(1.0)  # best reference is identical
    assert rel[1, 1] == 0.0 and rel[1, 0] == 0.0
    assert rel[0, 1] == 0.0


def test_teran_relevance_file_formats(tmp_path):
    from hosa_lib.relevance import load_teran_relevance
    m = np.arange(6, dtype=np.float32).reshape(3, 2)
    m.tofile(tmp_path / "raw.npy")  # TERAN writes raw memmaps with a .npy suffix
    np.save(tmp_path / "real.npy", m)
    np.testing.assert_array_equal(load_teran_relevance(tmp_path / "raw.npy", 3, 2), m)
    np.testing.assert_array_equal(load_teran_relevance(tmp_path / "real.npy", 3, 2), m)
    with pytest.raises(StoreError, match=r"raw.npy: 6 values, expected 4 captions x 2 images"):
        load_teran_relevance(tmp_path / "raw.npy", 4, 2)


def test_prepare_cli_reports_bad_params(tmp_path):
    p = tmp_path / "p.yaml"
    p.write_text("data:\n  sourse: synthetic\n")
    proc = subprocess.run([sys.executable, "-m", "hosa_lib.prepare", str(p)], capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown key 'data.sourse'" in proc.stderr and "Traceback" not in proc.stderr


def test_synthetic_objects_stay_inside_the_canvas():
    import random

    from hosa_lib.sources.synthetic import SIZES, _relation, _relation_twins, _scene, box
    rng = random.Random(0)
    flips = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
    for _ in range(500):
        objs, twin = _relation_twins(rng)  # a large object moved to a small one's place stays inside too
        assert flips[_relation(objs[0], objs[1])] == _relation(twin[0], twin[1])
        for o in _scene(rng) + objs + twin:
            r = SIZES[o["size"]] + 0.02
            assert r <= o["x"] <= 1 - r and r <= o["y"] <= 1 - r, o
            x1, y1, x2, y2 = box(o)
            assert 0 < x1 < x2 < 1 and 0 < y1 < y2 < 1


def test_text_cache_pads_batches_of_different_lengths():
    """Captions are tokenised per batch, padded to that batch's longest: batches of different widths
    must be padded to one width, with the same states as one batch (openclipart has such captions)."""
    from hosa_lib.features import encode_texts
    texts = ["a dog", "a small red house with a garden and a long fence by the road", "cat", "two birds"]
    h1, m1, w1 = encode_texts(texts, "minilm", batch_size=2, progress=False)
    h4, m4, w4 = encode_texts(texts, "minilm", batch_size=4, progress=False)
    assert h1.shape == h4.shape and (m1 == m4).all() and (w1 == w4).all()
    np.testing.assert_allclose(h1[m1].astype(np.float32), h4[m4].astype(np.float32), atol=2e-2)


def test_relation_twins_swap_positions_and_name_the_flipped_relation(tmp_path):
    """Relation twins: the same two objects with their positions exchanged; every caption names a
    relation, and each twin's captions name the opposite of the other's."""
    import json

    from hosa_lib.sources.synthetic import generate
    ds = json.loads(generate(tmp_path, 60, seed=4, size=64, progress=False).read_text())
    by_name = {im["filename"]: im for im in ds["images"]}
    pairs = json.loads((tmp_path / "relation_pairs.json").read_text())
    assert len(pairs) == max(1, 6 // 4)  # n_test = 6 attribute-twin images -> 1 relation pair
    flips = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
    for a, b in pairs:
        oa, ob = by_name[a]["objects"], by_name[b]["objects"]
        assert by_name[a]["split"] == by_name[b]["split"] == "test" and len(oa) == len(ob) == 2
        assert [(o["shape"], o["colour"], o["size"]) for o in oa] == [(o["shape"], o["colour"], o["size"]) for o in ob]
        for i in (0, 1):  # each at the other's place, moved at most by what keeps a larger object on the canvas
            assert abs(ob[i]["x"] - oa[1 - i]["x"]) <= 0.1 and abs(ob[i]["y"] - oa[1 - i]["y"]) <= 0.1
        for s in by_name[a]["sentences"] + by_name[b]["sentences"]:
            assert any(r in s["raw"] for r in flips), s["raw"]
    # the relation itself flips between twins
    from hosa_lib.sources.synthetic import _relation
    a, b = pairs[0]
    oa, ob = by_name[a]["objects"], by_name[b]["objects"]
    assert flips[_relation(oa[0], oa[1])] == _relation(ob[0], ob[1])
