"""TERAN/HOSA import: configs, checkpoints (exact TERAN key names and shapes), seed-compatible evaluation."""
import json
import os
from pathlib import Path
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import yaml
from transformers import BertConfig, BertModel, BertTokenizer

from hosa_lib.config import ConfigError, RunConfig, build, deep_merge
from hosa_lib.teran import import_config, map_state_dict

# TERAN's published COCO config (configs/teran_coco_MrSw.yaml keys), and its shared-transformer variant
TERAN_COCO = """
dataset: {name: coco, images-path: data/coco/images, data: data, restval: true, pre-extracted-features: false}
text-model: {name: bert, pretrain: bert-base-uncased, word-dim: 768, extraction-hidden-layer: 6, fine-tune: true,
             pre-extracted: false, layers: 0, dropout: 0.1}
image-model: {name: bottomup, pre-extracted-features-root: data/coco/features_36, transformer-layers: 4,
              dropout: 0.1, pos-encoding: concat-and-process, crop-size: 224, fine-tune: false, feat-dim: 2048,
              norm: true}
model: {name: teran, embed-size: 1024, text-aggregation: first, image-aggregation: first, layers: 2,
        exclude-stopwords: false, shared-transformer: false, dropout: 0.1}
training: {lr: 0.00001, grad-clip: 2.0, max-violation: true, loss-type: alignment, alignment-mode: MrSw,
           measure: dot, margin: 0.2, bs: 40, scheduler: steplr, gamma: 0.1, step-size: 20, warmup: null,
           warmup-period: 1000}
"""


def te(width, n):  # TERAN's transformer stacks: nhead 4, FF 2048, sequence-first
    return nn.TransformerEncoder(nn.TransformerEncoderLayer(width, 4, 2048, 0.1), n, enable_nested_tensor=False)


def teran_state_dict(bert_cfg, feat=2048, embed=1024, img_layers=4, layers=2, word_layers=0, shared=False):
    """A checkpoint['model'] with TERAN's exact key names (JointTextImageTransformerEncoder), random values."""
    torch.manual_seed(0)
    word = bert_cfg.hidden_size
    parts = {"img_txt_enc.txt_enc.bert_model.": BertModel(bert_cfg),
             "img_txt_enc.txt_enc.map.": nn.Linear(word, embed),
             "img_txt_enc.img_enc.transformer_encoder.": te(feat, img_layers),
             "img_txt_enc.img_enc.pos_encoding_image.map.": nn.Sequential(nn.Linear(feat + 5, feat), nn.ReLU(),
                                                                          nn.Linear(feat, feat)),
             "img_txt_enc.img_enc.fc.": nn.Linear(feat, embed),
             "img_txt_enc.img_proj.": nn.Linear(feat, embed),
             "img_txt_enc.cap_proj.": nn.Linear(word, embed),
             "img_txt_enc.transformer_encoder_1.": te(embed, layers)}
    if word_layers:
        parts["img_txt_enc.txt_enc.transformer_encoder."] = te(word, word_layers)
    if not shared:
        parts["img_txt_enc.transformer_encoder_2."] = te(embed, layers)
    sd = {p + k: v for p, m in parts.items() for k, v in m.state_dict().items()}
    sd["img_txt_enc.txt_enc.bert_model.embeddings.position_ids"] = torch.arange(bert_cfg.max_position_embeddings)[None]
    # TERAN's text encoder keeps BERT's input embedding a second time (same storage)
    sd["img_txt_enc.txt_enc.word_embeddings.weight"] = sd["img_txt_enc.txt_enc.bert_model.embeddings.word_embeddings.weight"]
    return sd


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    """A local 'pretrain' folder: bert-base-uncased's config (transformers defaults) and a small vocab."""
    d = tmp_path_factory.mktemp("bert")
    words = "a an the small large red green blue yellow purple white square circle triangle diamond left right " \
            "of above below and there is picture with shapes including it on . ,".split()
    (d / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words) + "\n")
    BertTokenizer(str(d / "vocab.txt")).save_pretrained(d)
    BertConfig().save_pretrained(d)
    return d


TINY_BERT = BertConfig(hidden_size=32, num_hidden_layers=6, num_attention_heads=2, intermediate_size=64,
                       vocab_size=64)  # six layers as TERAN's extraction layer needs; 0.1 M parameters, not 110 M


@pytest.fixture(scope="module")
def tiny_bert_dir(bert_dir, tmp_path_factory):
    """bert_dir's vocabulary with a tiny BERT config: for tests of key mapping, not of sizes."""
    import shutil
    d = tmp_path_factory.mktemp("tiny_bert")
    for f in bert_dir.iterdir():
        shutil.copy(f, d / f.name)
    TINY_BERT.save_pretrained(d)
    return d


def test_config_import_maps_every_published_key():
    teran = yaml.safe_load(TERAN_COCO)
    over, report = import_config(teran)
    assert {k for k, _ in report} == {f"{s}.{k}" for s, v in teran.items() for k in v}
    cfg = build(RunConfig, over, "import")
    m = cfg.model
    assert (m.arch, m.embed, m.feat_layers, m.image_layers, m.text_layers, m.shared_layers) == ("teran", 1024, 4, 2, 2, 0)
    assert (m.heads, m.ff, m.dropout, m.word_layers, m.text_lr_scale) == (4, 2048, 0.1, 0, 1.0)
    assert (cfg.data.text_model, cfg.data.text_layer, cfg.data.dataset, cfg.data.restval) == ("bert-base-uncased", 6, "coco", True)
    assert (cfg.loss.margin, cfg.loss.max_violation, cfg.train.batch_size, cfg.train.lr_decay_epochs) == (0.2, True, 40, ())
    assert cfg.train.lr_decay_every == 20  # StepLR: every 20 epochs, not once
    assert (cfg.scoring.local_pool, cfg.scoring.w_high, cfg.scoring.w_global) == ("sum", 0.0, 0.0)
    shared = deep_merge(teran, {"model": {"shared-transformer": True}})
    m2 = build(RunConfig, import_config(shared)[0], "import").model
    assert (m2.shared_layers, m2.image_layers, m2.text_layers) == (2, 0, 0)
    with pytest.raises(ConfigError, match="'model.exclude-stopwords' = True is not supported"):
        import_config(deep_merge(teran, {"model": {"exclude-stopwords": True}}))
    with pytest.raises(ConfigError, match="'training.new-key' has no equivalent"):
        import_config(deep_merge(teran, {"training": {"new-key": 1}}))


def teran_model(bert_dir, store, **model):
    from hosa_lib.factory import build_model
    over, _ = import_config(yaml.safe_load(TERAN_COCO))
    over = deep_merge(over, {"data": {"source": "store", "store": str(store), "text_model": str(bert_dir)},
                             "model": model})
    cfg = build(RunConfig, over, "test")
    return build_model(cfg, torch.device("cpu"), pretrained=False)


@pytest.fixture(scope="module")
def teran_data(tmp_path_factory):
    from hosa_lib.sources.teran import convert_teran
    from tests.test_store_sources import write_teran
    root = tmp_path_factory.mktemp("teran")
    write_teran(root, "coco", n=6)
    convert_teran(root, "coco", root / "store.h5", progress=False)
    return root


def test_coco_shaped_checkpoint_loads_strictly_and_embeds(bert_dir, teran_data):
    from hosa_lib.data import CaptionDataset, ImageDataset, collate_captions, collate_images
    model, text = teran_model(bert_dir, teran_data / "store.h5")
    sd = teran_state_dict(BertConfig(num_hidden_layers=6))
    model.load_state_dict(map_state_dict(sd, model, shared=False), strict=True)
    ours = model.state_dict()
    assert torch.equal(ours["image.proj.weight"], sd["img_txt_enc.img_proj.weight"])
    assert torch.equal(ours["text.backbone.encoder.layer.5.output.dense.weight"],
                       sd["img_txt_enc.txt_enc.bert_model.encoder.layer.5.output.dense.weight"])
    model.eval()
    with torch.no_grad():
        img = model.encode_images(collate_images(ImageDataset(teran_data / "store.h5", "test").__getitems__([0])))
        cap = model.encode_captions(collate_captions(CaptionDataset(teran_data / "store.h5", "test", text,
                                                                    with_image=False).__getitems__([0, 1])))
    assert img["glob"].shape == (1, 1024) and img["local"].shape == (1, 36, 1024)
    assert cap["glob"].shape == (2, 1024) and cap["local"].shape[0] == 2 and cap["local"].shape[2] == 1024
    assert all(torch.isfinite(t).all() for t in (*img.values(), *cap.values()) if t.is_floating_point())
    lengths = collate_captions(CaptionDataset(teran_data / "store.h5", "test", text, with_image=False)
                               .__getitems__([0]))["text_mask"].sum()
    assert cap["mask"][0].sum() == lengths - 3  # TERAN's alignment words: drop [CLS], last piece, [SEP]


def test_wrong_or_missing_keys_are_named(tiny_bert_dir, teran_data):
    model, _ = teran_model(tiny_bert_dir, teran_data / "store.h5", feat_layers=1, embed=64, image_layers=1, text_layers=1)
    sd = teran_state_dict(TINY_BERT, embed=64, img_layers=1, layers=1)
    sd["img_txt_enc.img_enc.extra.weight"] = torch.zeros(1)
    del sd["img_txt_enc.cap_proj.bias"]
    sd["img_txt_enc.img_proj.weight"] = torch.zeros(3, 3)
    with pytest.raises(ConfigError) as e:
        map_state_dict(sd, model, shared=False)
    msg = str(e.value)
    assert "unmapped checkpoint key 'img_txt_enc.img_enc.extra.weight'" in msg
    assert "model key 'text.proj.bias' missing" in msg
    assert "shape mismatch image.proj.weight: checkpoint (3, 3) vs model (64, 2048)" in msg


KEYS = json.loads((Path(__file__).parent / "data" / "teran_checkpoint_keys.json").read_text())


@pytest.mark.parametrize("name,shared", [("teran_coco_MrSw", False), ("teran_coco_MrSw_sharedTE", True)])
def test_published_configs_full_key_set_imports_strictly(bert_dir, teran_data, name, shared):
    """TERAN's complete key set (alias and legacy buffer included), as data, at full size on the meta device."""
    from hosa_lib.config import override
    from hosa_lib.model import HOSA
    from hosa_lib.text import load_backbone
    over, _ = import_config(deep_merge(yaml.safe_load(TERAN_COCO), {"model": {"shared-transformer": shared}}))
    cfg = override(RunConfig(), over)
    with torch.device("meta"):
        _, backbone = load_backbone(str(bert_dir), 6, pretrained=False)
        model = HOSA(cfg.model, cfg.scoring, 2048, 768, backbone)
        sd = {k: torch.empty(v, device="meta") for k, v in KEYS[name].items()}
    alias = "img_txt_enc.txt_enc.word_embeddings.weight"
    assert alias in sd and len(sd) == (213 if not shared else 189)
    mapped = map_state_dict(sd, model, shared=shared)
    model.load_state_dict(mapped, strict=True, assign=True)
    assert alias not in mapped and "text.backbone.embeddings.word_embeddings.weight" in mapped


def test_alias_must_equal_the_bert_embedding(tiny_bert_dir, teran_data):
    model, _ = teran_model(tiny_bert_dir, teran_data / "store.h5", feat_layers=1, embed=64, image_layers=1, text_layers=1)
    sd = teran_state_dict(TINY_BERT, embed=64, img_layers=1, layers=1)
    sd["img_txt_enc.txt_enc.word_embeddings.weight"] = sd["img_txt_enc.txt_enc.word_embeddings.weight"] + 1
    with pytest.raises(ConfigError, match="should be the same tensor"):
        map_state_dict(sd, model, shared=False)


def teran_layout_with_hard_cases(root, teran_data):
    """The generated COCO layout, with a 57-word caption, a one-word-piece caption and a test image
    of 20 regions (padded to 36)."""
    import shutil

    import numpy as np
    shutil.copytree(teran_data / "coco", root / "coco")
    ann = root / "coco" / "annotations" / "dataset_coco.json"
    data = json.loads(ann.read_text())
    test = [im for im in data["images"] if im["split"] == "test"]
    long = " ".join(["a small red square left of a large blue circle and"] * 5) + " a triangle"
    test[0]["sentences"][0]["raw"] = long
    test[1]["sentences"][1]["raw"] = "Snow"
    ann.write_text(json.dumps(data))
    fid = test[2]["cocoid"]
    feats = root / "coco" / "features_36"
    np.savez(feats / "bu_att" / f"{fid}.npz", feat=np.random.default_rng(0).random((20, 2048), dtype=np.float32))
    np.save(feats / "bu_box" / f"{fid}.npy", np.tile([10.0, 20.0, 300.0, 200.0], (20, 1)))
    return long


@pytest.mark.slow
def test_seed_compatible_command_on_teran_layout(tmp_path, bert_dir, teran_data):
    """python -m hosa_lib.evaluate --checkpoint MODEL.pth --size 1k on a generated TERAN data/ folder with
    long captions, padded images and a one-token caption; float32 end to end; TERAN's scoring rules."""
    root = tmp_path / "data"
    long = teran_layout_with_hard_cases(root, teran_data)
    n_cap, n_img = 5 * 3, 3  # write_teran(n=6) puts images 3..5 in test
    rel = root / "coco" / "relevances"
    rel.mkdir()
    torch.rand(n_cap, n_img).numpy().astype("float32").tofile(rel / "coco-test-rougeL.npy")  # raw memmap, as TERAN
    torch.rand(n_cap, n_img).numpy().astype("float32").tofile(rel / "coco-test-spice.npy")
    teran = deep_merge(yaml.safe_load(TERAN_COCO), {"model": {"embed-size": 64, "layers": 1},
                                                    "image-model": {"transformer-layers": 1},
                                                    "text-model": {"extraction-hidden-layer": 2}})
    ck = tmp_path / "MODEL.pth"
    torch.save({"model": teran_state_dict(BertConfig(num_hidden_layers=2), embed=64, img_layers=1, layers=1),
                "config": teran, "epoch": 7}, ck)
    cmd = [sys.executable, "-m", "hosa_lib.evaluate", "--checkpoint", str(ck), "--size", "1k", "--data-root",
           str(root), "--text-model", str(bert_dir), "--out", str(tmp_path / "ev")]
    refused = subprocess.run(cmd, capture_output=True, text=True)
    assert refused.returncode != 0 and "coco_1k needs 5000 test images" in refused.stderr
    assert "--protocol all evaluates a split of any size" in refused.stderr
    proc = subprocess.run(cmd + ["--protocol", "all"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Image to text" in proc.stdout and "NDCG-SPICE" in proc.stdout and "rsum" in proc.stdout
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert {"i2t_ndcg_rougeL", "t2i_ndcg_spice", "rsum"} <= set(m) and m["checkpoint_epoch"] == 7
    assert m["precision"] == "float32" and m["max_words"] == 512
    from hosa_lib.store import Store
    with Store(root / "coco" / "hosa_test.h5") as s:
        assert s.features().dtype == "float32" and s.n_regions.min() == 20
        caps = s.captions(s.split_captions("test"))
    # the same path from Python: no truncation, TERAN's padding rule, the one-word-piece caption scores 0
    from hosa_lib.evaluate import encode_split, protocol_scores
    from hosa_lib.factory import load_teran_model
    from hosa_lib.runs import load_checkpoint
    from hosa_lib.teran import config_from_teran
    loaded = load_checkpoint(ck)
    cfg, _ = config_from_teran(loaded, ck, None, str(root), str(bert_dir), None, "1k", "all")
    assert cfg.scoring.padding == "teran" and cfg.data.max_words == 512
    model, text = load_teran_model(loaded, cfg)
    img, cap, cap_img = encode_split(model, cfg.data.store, "test", text)
    assert int(cap["mask"][caps.index(long)].sum()) > 32  # not cut at 32 word pieces
    scores = protocol_scores(img, cap, cap_img, cfg.scoring, cfg.eval)
    assert torch.all(scores[:, caps.index("Snow")] == 0)


def test_coco_split_files_choice_is_explicit_and_agrees(tmp_path, capsys):
    """A COCO layout with both dataset_coco.json and coco_*_ids.npy: TERAN reproduction reads the ids
    files (as TERAN's loader), says so, and both give the same test images."""
    from hosa_lib.sources.teran import convert_teran
    from hosa_lib.store import Store
    from tests.test_store_sources import write_teran
    root, _ = write_teran(tmp_path, "coco", n=6, layout="ids")
    write_teran(tmp_path / "k", "coco", n=6)
    (root / "coco" / "annotations" / "dataset_coco.json").write_text(
        (tmp_path / "k" / "coco" / "annotations" / "dataset_coco.json").read_text())
    tests = {}
    for prefer in ("ids", "karpathy"):
        out = convert_teran(root, "coco", tmp_path / f"{prefer}.h5", only_splits=("test",), prefer=prefer)
        assert out["split_source"] == prefer
        with Store(tmp_path / f"{prefer}.h5") as s:
            tests[prefer] = [s.image_ids()[i] for i in s.split_images("test")]
    printed = capsys.readouterr().out
    assert "reading splits from coco_*_ids.npy" in printed and "reading splits from dataset_coco.json" in printed
    assert tests["ids"] == tests["karpathy"] and len(tests["ids"]) == 3


# ----------------------------------------------------------------------------- reproduction details
def test_training_keys_map_as_teran_train_uses_them():
    """warm-up: TERAN's LinearWarmup of the learning rate ('warmup: linear' over warmup-period steps;
    null = none), hardest negatives from the first step; its per-width dropouts are refused when they
    differ from model.dropout instead of being dropped silently."""
    teran = yaml.safe_load(TERAN_COCO)
    over, report = import_config(teran)
    cfg = build(RunConfig, over, "import")
    assert (cfg.train.lr_warmup_steps, cfg.loss.warmup_steps, cfg.loss.max_violation) == (0, 0, True)
    assert dict(report)["training.warmup-period"] == "unused: training.warmup is null (no warm-up)"
    linear = build(RunConfig, import_config(deep_merge(teran, {"training": {"warmup": "linear"}}))[0], "import")
    assert (linear.train.lr_warmup_steps, linear.loss.warmup_steps, linear.train.lr_warmup_style) == (1000, 0, "teran")
    with pytest.raises(ConfigError, match=r"'training.warmup' = 'cosine'"):
        import_config(deep_merge(teran, {"training": {"warmup": "cosine"}}))
    with pytest.raises(ConfigError, match=r"'image-model.dropout' = 0.2 differs from model.dropout = 0.1"):
        import_config(deep_merge(teran, {"image-model": {"dropout": 0.2}}))


def test_karpathy_json_keeps_the_first_five_sentences(tmp_path, capsys):
    from hosa_lib.sources.teran import convert_teran
    from hosa_lib.store import Store
    from tests.test_store_sources import write_teran
    root, _ = write_teran(tmp_path, "coco", n=6)
    ann = root / "coco" / "annotations" / "dataset_coco.json"
    data = json.loads(ann.read_text())
    data["images"][2]["sentences"] += [{"raw": f"extra sentence {j}", "tokens": []} for j in range(2)]  # 7 in all
    ann.write_text(json.dumps(data))
    convert_teran(root, "coco", tmp_path / "s.h5")
    assert "1 image(s) have more than 5 sentences; kept the first 5" in capsys.readouterr().out
    with Store(tmp_path / "s.h5") as s:
        assert np.bincount(s.caption_image).tolist() == [5] * 6
        assert not any("extra sentence" in c for c in s.captions())


def test_teran_test_store_follows_its_feature_files(tmp_path, teran_data):
    """data/<dataset>/hosa_test.h5 is rebuilt when TERAN's files change, e.g. feature files swapped by
    name (same names, sizes and dates), instead of being reused stale."""
    import shutil

    from hosa_lib.prepare import prepare_teran_test
    from hosa_lib.store import Store
    from hosa_lib.teran import config_from_teran
    root = tmp_path / "data"
    shutil.copytree(teran_data / "coco", root / "coco")
    cfg, _ = config_from_teran({"config": yaml.safe_load(TERAN_COCO)}, "MODEL.pth", None, str(root), None, None,
                               "1k", "all")
    prepare_teran_test(cfg)
    with Store(cfg.data.store) as s:
        ids, before = s.image_ids(), s.features()
    att = root / "coco" / "features_36" / "bu_att"
    a, b = att / f"{ids[0]}.npz", att / f"{ids[1]}.npz"
    os.rename(a, tmp_path / "x.npz")
    os.rename(b, a)
    os.rename(tmp_path / "x.npz", b)
    prepare_teran_test(cfg)
    with Store(cfg.data.store) as s:
        after = s.features()
    np.testing.assert_array_equal(after[0], before[1])
    np.testing.assert_array_equal(after[1], before[0])
    prepare_teran_test(cfg)  # unchanged files: reused as it is
    with Store(cfg.data.store) as s:
        np.testing.assert_array_equal(s.features(), after)


def test_size_5k_on_a_smaller_split_is_refused_before_encoding(tmp_path, teran_data, monkeypatch):
    import shutil

    import hosa_lib.evaluate as ev
    root = tmp_path / "data"
    shutil.copytree(teran_data / "coco", root / "coco")
    ck = tmp_path / "MODEL.pth"
    torch.save({"model": {}, "config": yaml.safe_load(TERAN_COCO), "epoch": 1}, ck)
    monkeypatch.setattr(ev, "encode_split", lambda *a, **k: pytest.fail("encoded before checking the split"))
    monkeypatch.setattr("hosa_lib.factory.load_teran_model", lambda *a, **k: pytest.fail("model built first"))
    with pytest.raises(ConfigError, match=r"hosa_test.h5: split 'test': coco_5k needs 5000 test images, the split "
                                          r"has 3"):
        ev.evaluate_teran(ck, "5k", data_root=str(root), progress=False)


def test_learning_rate_schedule_is_terans():
    """TERAN's train.py: StepLR(step_size, gamma) stepped once per epoch, and pytorch-warmup 0.0.4's
    LinearWarmup, which takes one step when it is built (so step i trains at min(1, (i + 2) / period)).
    Written from those semantics with torch's own StepLR; equal factor for factor."""
    from hosa_lib.train import lr_lambda
    teran = yaml.safe_load(TERAN_COCO)
    teran = deep_merge(teran, {"training": {"warmup": "linear", "warmup-period": 50, "step-size": 3, "gamma": 0.5}})
    cfg = build(RunConfig, import_config(teran)[0], "import")
    spe, epochs = 40, 8
    f = lr_lambda(cfg, spe)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    step_lr = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    i = 0
    for epoch in range(epochs):
        for _ in range(spe):
            warm = min(1.0, (i + 2) / 50)  # LinearWarmup built (step 0 consumed), then one dampen per step
            assert f(i) == pytest.approx(step_lr.get_last_lr()[0] * warm), (epoch, i)
            i += 1
        opt.step()  # TERAN's order (an optimizer step before the scheduler's; torch warns otherwise)
        step_lr.step()
    assert f(7 * spe) == pytest.approx(0.5 ** 2)  # decayed at epochs 3 and 6, not only once


def test_config_option_replaces_only_what_terans_test_py_replaces(tmp_path):
    """--config as TERAN's test.py: the checkpoint's own config stays (its model, e.g. embed size), and
    only the data paths (images-path, data, pre-extracted-features-root) and training.bs come from the
    file; a checkpoint without a config takes the file whole."""
    from hosa_lib.teran import config_from_teran
    saved = yaml.safe_load(TERAN_COCO)
    given = deep_merge(saved, {"model": {"embed-size": 512}, "dataset": {"data": str(tmp_path / "elsewhere")},
                               "image-model": {"pre-extracted-features-root": str(tmp_path / "feats")},
                               "training": {"bs": 16}})
    path = tmp_path / "other.yaml"
    path.write_text(yaml.safe_dump(given))
    cfg, _ = config_from_teran({"config": saved}, "MODEL.pth", str(path), None, None, None, "1k", "all")
    assert cfg.model.embed == 1024  # the checkpoint's, not the file's 512
    assert cfg.data.root == str(tmp_path / "elsewhere") and cfg.data.features_dir == str(tmp_path / "feats")
    assert cfg.train.batch_size == 16
    whole, _ = config_from_teran({}, "MODEL.pth", str(path), None, None, None, "1k", "all")
    assert whole.model.embed == 512
    partial = tmp_path / "partial.yaml"
    partial.write_text(yaml.safe_dump({"dataset": {"data": "x"}}))
    with pytest.raises(ConfigError, match="takes 'dataset.images-path' from --config"):
        config_from_teran({"config": saved}, "MODEL.pth", str(partial), None, None, None, "1k", "all")
