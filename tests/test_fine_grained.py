"""What the demo needs to measure fine-grained alignment: the backbone's top layers fine-tuned on cached
lower-layer states (equal to the backbone itself), twin scenes in the train split, and batches that keep
each twin pair together (hard negatives)."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from hosa_lib.config import ConfigError, load
from hosa_lib.data import EpochSampler, twin_groups

REPO = Path(__file__).resolve().parent.parent


def test_top_layers_on_cached_states_equal_the_whole_backbone():
    """BackboneTop(layers 5-6) on layer-4 states == MiniLM's own layer-6 output (every valid token), also
    with padding in the batch; and its parameters are the pretrained ones, trainable."""
    from hosa_lib.encoders import BackboneTop
    from hosa_lib.text import load_backbone, tokenize
    tok, bb = load_backbone("minilm")
    bb.eval()
    enc = tokenize(tok, ["a small red square left of a large blue circle", "a dog", "two green triangles"], 32)
    with torch.no_grad():
        out = bb(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], output_hidden_states=True)
        top = BackboneTop(bb.encoder.layer[4:6]).eval()
        got = top(out.hidden_states[4], enc["attention_mask"].bool())
    valid = enc["attention_mask"].bool()
    torch.testing.assert_close(got[valid], out.hidden_states[6][valid], rtol=1e-5, atol=1e-5)
    assert all(p.requires_grad for p in top.parameters())


def test_text_tune_layers_needs_an_explicit_cached_layer(tmp_path):
    p = tmp_path / "p.yaml"
    p.write_text(yaml.safe_dump({"base": str(REPO / "params" / "smoke.yaml"), "model": {"text_tune_layers": 2}}))
    with pytest.raises(ConfigError, match=r"model.text_tune_layers = 2 .*data.text_layer >= 1"):
        load(p)


def test_twin_groups_keep_each_pair_in_one_batch():
    caption_image = np.repeat(np.arange(20), 2)  # 20 images, 2 captions each
    captions = np.arange(40)
    pairs = np.array([[0, 1], [4, 9], [10, 11]])
    groups = twin_groups(captions, caption_image, pairs)
    assert sorted(p for g in groups for p in g) == list(range(40))  # every caption once
    assert [0, 2] in groups and [8, 18] in groups and [9, 19] in groups
    sampler = EpochSampler(40, 8, seed=3, groups=groups)
    for epoch in range(5):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        seen = [i for b in batches for i in b]
        assert len(seen) == len(set(seen)) == 40
        for g in (g for g in groups if len(g) == 2):  # twins side by side: one batch unless at a batch's edge
            assert abs(seen.index(g[0]) - seen.index(g[1])) == 1
    assert twin_groups(captions, caption_image, np.zeros((0, 2))) is None


def test_without_pairs_the_sampler_order_is_unchanged():
    """Stores without train twins train exactly as before (bit-exact resumes stay bit-exact)."""
    a, b = EpochSampler(30, 4, seed=1), EpochSampler(30, 4, seed=1, groups=None)
    a.set_epoch(2), b.set_epoch(2)
    g = torch.Generator().manual_seed(1 * 100003 + 2)
    perm = torch.randperm(30, generator=g)
    assert list(a) == list(b) == [perm[i * 4:(i + 1) * 4].tolist() for i in range(7)]


def test_train_twins_are_generated_and_stored(tmp_path):
    from hosa_lib.sources.synthetic import generate
    ds = json.loads(generate(tmp_path, 80, seed=2, size=64, progress=False, train_twins=0.5).read_text())
    pairs = json.loads((tmp_path / "train_pairs.json").read_text())
    by_name = {im["filename"]: im for im in ds["images"]}
    n_train = sum(im["split"] == "train" for im in ds["images"])
    assert len(pairs) == int(n_train * 0.5) // 2
    kinds = set()
    for a, b in pairs:
        oa, ob = by_name[a]["objects"], by_name[b]["objects"]
        assert by_name[a]["split"] == by_name[b]["split"] == "train"
        same_places = [(o["x"], o["y"]) for o in oa] == [(o["x"], o["y"]) for o in ob]
        kinds.add("attribute" if same_places else "relation")
        assert oa != ob
    assert kinds == {"attribute", "relation"}
    no = tmp_path / "none"
    generate(no, 80, seed=2, size=64, progress=False)
    assert json.loads((no / "train_pairs.json").read_text()) == []


def test_box_geometry_as_its_own_mlp_reaches_the_region_embedding():
    """model.box_embed: mlp adds an MLP of (x1, y1, x2, y2, area) to the projected features: two regions
    with equal features and different boxes embed differently; concat (TERAN's) keeps the old layout."""
    from hosa_lib.config import ModelConfig
    from hosa_lib.encoders import ImageEncoder
    torch.manual_seed(0)
    feats = torch.ones(1, 2, 8)
    boxes = torch.tensor([[[0.0, 0.0, 0.3, 0.3], [0.6, 0.6, 0.9, 0.9]]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    for kind, proj_in in (("mlp", 8), ("concat", 13)):
        enc = ImageEncoder(ModelConfig(embed=16, heads=2, ff=32, image_layers=0, box_embed=kind), 8).eval()
        assert enc.proj.in_features == proj_in and (enc.box_mlp is not None) == (kind == "mlp")
        _, local, _ = enc(feats, boxes, mask)
        assert not torch.allclose(local[0, 0], local[0, 1])


def test_region_norm_standardises_the_features_before_the_box_geometry_joins_them():
    """model.region_norm: the region embedding no longer depends on the features' scale (layer norm per region),
    so the [0, 1] box coordinates weigh as much as a feature does; without it, scaled features change the
    embedding. TERAN's exact layout has no such step and refuses it."""
    from hosa_lib.config import ModelConfig
    from hosa_lib.encoders import ImageEncoder
    from hosa_lib.model import ARCHS
    feats = torch.randn(2, 3, 8) * 5 + 3
    boxes = torch.rand(2, 3, 4).sort(-1).values[..., [0, 2, 1, 3]]
    mask = torch.ones(2, 3, dtype=torch.bool)
    for norm in (True, False):
        torch.manual_seed(0)
        enc = ImageEncoder(ModelConfig(embed=16, heads=2, ff=32, image_layers=1, region_norm=norm), 8).eval()
        with torch.no_grad():
            g1, l1, _ = enc(feats, boxes, mask)
            g2, l2, _ = enc(3 * feats + 7, boxes, mask)
            std = (feats - feats.mean(-1, keepdim=True)) / feats.var(-1, unbiased=False, keepdim=True).add(1e-5).sqrt()
            area = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
            ref = enc.proj(torch.cat([std, boxes, area[..., None]], -1))
            enc.layers = None
            _, projected, _ = enc(feats, boxes, mask)
        assert torch.allclose(l1, l2, atol=1e-4) == norm and torch.allclose(g1, g2, atol=1e-4) == norm
        assert torch.allclose(projected, ref, atol=1e-5) == norm
    with pytest.raises(ValueError, match="model.region_norm"):
        ARCHS.impl("teran")(ModelConfig(arch="teran", region_norm=True), 8, 8, torch.nn.Identity(), None)


def test_the_former_demo_is_frozen_apart_from_the_demo():
    """params/demo_s8.yaml (the demo before relations were learned; demo_head/demo_grid start from it) spells
    its keys out from base.yaml: a change to demo.yaml cannot leak into the runs docs/results.md reports."""
    chain, p = [], REPO / "params" / "demo_s8.yaml"
    while p is not None:
        chain.append(p.name)
        base = yaml.safe_load(p.read_text()).get("base")
        p = p.parent / base if base else None
    assert chain == ["demo_s8.yaml", "base.yaml"]
    cfg = load(REPO / "params" / "demo_s8.yaml")
    assert (cfg.data.regions, cfg.data.map_stride, cfg.data.text_layer, cfg.data.train_twins) == ("objects", 8, 3, 0.0)
    assert (cfg.model.region_norm, cfg.train.epochs, cfg.train.batch_size) == (False, 8, 32)
    for name in ("demo_head.yaml", "demo_grid.yaml"):
        assert yaml.safe_load((REPO / "params" / name).read_text())["base"] == "demo_s8.yaml"


def test_every_generated_caption_is_read_back_and_holds_in_its_own_scene():
    """`named` parses every template `captions` writes (each names >= 1 object) and a caption's own scene
    satisfies all it names (each object, each relation): the perfect scorer's maximum."""
    import random

    from hosa_lib.sources import synthetic as sy
    rng = random.Random(3)
    for _ in range(300):
        objs = sy._scene(rng)
        for relational in (False, True):
            for cap in sy.captions(objs, rng, relational=relational):
                names, rels = sy.named(cap)
                assert names, cap
                assert sy.perfect_score(objs, cap) == len(names) + len(rels), cap
                assert bool(rels) == any(r in cap for r in ("left of", "right of", "above", "below")), cap


def test_twin_ceiling_counts_undecidable_captions_as_ties():
    from hosa_lib.sources import synthetic as sy
    sq = {"shape": "square", "colour": "red", "size": "small", "x": 0.2, "y": 0.5}
    ci = {"shape": "circle", "colour": "blue", "size": "large", "x": 0.8, "y": 0.5}
    tr = {"shape": "triangle", "colour": "green", "size": "small", "x": 0.5, "y": 0.2}
    twin = [dict(sq, colour="blue"), dict(ci, colour="red"), tr]  # colours of square and circle swapped

    def scene(objs, caps):
        return {"objects": objs, "sentences": [{"raw": c} for c in caps]}
    images = [scene([sq, ci, tr], ["there is a small red square and a small green triangle",  # decides
                                   "a picture with a green triangle"]),  # names no swapped object: a tie
              scene(twin, ["there is a small blue square and a large red circle"])]  # decides
    assert sy.twin_ceiling(images, [(0, 1)]) == {"accuracy": 100.0 * 2.5 / 3, "ties": 100.0 / 3}
    moved = [dict(sq, x=0.8), dict(ci, x=0.2)]  # relation twins: the same objects, places exchanged
    rel = [scene([sq, ci], ["a small red square left of a large blue circle"]), scene(moved, [])]
    assert sy.twin_ceiling(rel, [(0, 1)]) == {"accuracy": 100.0, "ties": 0.0}
    assert sy.twin_ceiling(rel, [(0, 1)], relations=False) == {"accuracy": 50.0, "ties": 100.0}
