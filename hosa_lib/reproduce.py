"""Evaluate published TERAN/HOSA checkpoints, like the seed's `python3 test.py MODEL.pth --size 1k|5k`.

    python -m hosa_lib.evaluate --checkpoint MODEL.pth --size 1k|5k [--config CONFIG.yaml]
                                [--data-root data] [--text-model DIR] [--store STORE.h5]

The checkpoint's own `config` (or --config) is imported key by key (`hosa_lib.teran`), the test split
of the TERAN `data/` layout is converted once into `<data-root>/<dataset>/hosa_test.h5` (with
TERAN's ROUGE-L and SPICE relevance files when present), the weights load strictly into the
TERAN-shaped encoders, and the test split is scored with TERAN's MrSw. Embeddings are kept in
float16 with captions bucketed by length, and scoring is chunked, so host memory stays bounded.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from tqdm import tqdm

from .config import RunConfig, build, deep_merge, to_dict
from .data import collate_captions, collate_images, to_device
from .metrics import evaluate_scores
from .scoring import score_all_pairs
from .store import CaptionDataset, ImageDataset, Store, TextInput
from .teran import import_config, map_state_dict

PROTOCOLS = {("coco", "1k"): "coco_1k", ("coco", "5k"): "coco_5k", ("f30k", "1k"): "f30k_1k", ("f30k", "5k"): "f30k_1k"}


def load_teran_checkpoint(path) -> dict:
    # TERAN checkpoints pickle their config dict (and optimizer state), so weights_only loading cannot
    # read them; only open checkpoints from a source you trust.
    ck = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(ck, dict) or "model" not in ck:
        raise ValueError(f"{path}: not a TERAN/HOSA checkpoint (expected a dict with 'model')")
    return ck


def config_from_teran(teran_cfg: dict, data_root: str | None, text_model: str | None, store: str | None,
                      size: str) -> tuple[RunConfig, list]:
    overrides, report = import_config(teran_cfg)
    data = overrides.get("data", {})
    dataset = data.get("dataset", "coco")
    root = data_root or data.get("root", "data")
    # --data-root relocates everything; otherwise the config's own features root is used
    features = str(Path(root) / dataset / "features_36") if data_root else data.get("features_dir", "")
    extra = {"name": f"teran-{dataset}-{size}",
             "data": {"source": "store" if store else "teran", "root": root, "features_dir": features,
                      "store": store or str(Path(root) / dataset / "hosa_test.h5"), "relevance": []},
             "eval": {"protocol": PROTOCOLS[(dataset, size)], "split": "test"}}
    if text_model:
        extra["data"]["text_model"] = text_model
    if dataset == "f30k":
        extra["data"]["image_sizes"] = str(Path(root) / "f30k" / "images" / "sizes.pkl")
    return build(RunConfig, deep_merge(overrides, extra), "TERAN config"), report


def prepare_test_store(cfg: RunConfig) -> None:
    """Convert only the test split of the TERAN layout, once, and import TERAN's relevance files."""
    dc = cfg.data
    if dc.source == "teran" and not Path(dc.store).is_file():
        from .sources.teran import convert_teran
        convert_teran(dc.root, dc.dataset, dc.store, features_dir=dc.features_dir, restval=False,
                      image_sizes=dc.image_sizes, only_splits=("test",))
    rel_dir = Path(dc.root) / dc.dataset / "relevances"
    with Store(dc.store, check_values=False) as s:
        have = s.relevance("test")
        n_cap, n_img = len(s.split_captions("test")), len(s.split_images("test"))
    todo = {m: rel_dir / f"{dc.dataset}-test-{m}.npy" for m in ("rougeL", "spice")}
    todo = {m: p for m, p in todo.items() if p.is_file() and m not in have}
    if todo:
        from .relevance import load_teran_relevance
        from .store import updating
        with updating(dc.store) as f:
            for m, p in todo.items():
                f.create_dataset(f"relevance/test/{m}", data=load_teran_relevance(p, n_cap, n_img))


@torch.no_grad()
def encode_bucketed(model, store: str, split: str, text: TextInput, device, batch_size: int = 128,
                    progress: bool = True) -> tuple[dict, list[dict], np.ndarray]:
    """Images dense in float16; captions as length-sorted float16 blocks (no padding to the longest)."""
    model.eval()
    ds_img = ImageDataset(store, split)
    parts = []
    for b in tqdm(torch.utils.data.DataLoader(ds_img, batch_size=batch_size, collate_fn=collate_images),
                  desc="encode images", disable=not progress, mininterval=5):
        parts.append({k: v.half().cpu() if v.is_floating_point() else v.cpu()
                      for k, v in model.encode_images(to_device(b, device)).items()})
    img = {k: torch.cat([p[k] for p in parts]) for k in ("glob", "local", "mask")}
    ds_cap = CaptionDataset(store, split, text, with_image=False)
    items = ds_cap.__getitems__(np.arange(len(ds_cap)))  # tokenised once (small: token ids)
    order = np.argsort([int(it["text_mask"].sum()) for it in items], kind="stable")
    blocks = []
    for s in tqdm(range(0, len(order), batch_size), desc="encode captions", disable=not progress, mininterval=5):
        idx = order[s:s + batch_size]
        out = model.encode_captions(to_device(collate_captions([items[i] for i in idx]), device))
        blocks.append({"glob": out["glob"].half().cpu(), "local": out["local"].half().cpu(),
                       "mask": out["mask"].cpu(), "index": torch.as_tensor(idx)})
    with Store(store, check_values=False) as st:
        imgs, caps = st.split_images(split), st.split_captions(split)
        pos = np.full(st.n_images, -1)
        pos[imgs] = np.arange(len(imgs))
        cap_img = pos[st.caption_image[caps]]
    return img, blocks, cap_img


def format_teran_table(m: dict) -> str:
    head = f"{'':14s}{'R@1':>8s}{'R@5':>8s}{'R@10':>8s}{'medr':>7s}{'meanr':>8s}{'NDCG-ROUGE-L':>14s}{'NDCG-SPICE':>12s}"
    rows = [head]
    for d, label in (("i2t", "Image to text"), ("t2i", "Text to image")):
        nd = lambda k: f"{m[k]:14.4f}" if k in m else f"{'-':>14s}"
        rows.append(f"{label:14s}{m[f'{d}_r1']:8.1f}{m[f'{d}_r5']:8.1f}{m[f'{d}_r10']:8.1f}{m[f'{d}_medr']:7.0f}"
                    f"{m[f'{d}_meanr']:8.1f}{nd(f'{d}_ndcg_rougeL')}{nd(f'{d}_ndcg_spice')[2:]:>12s}")
    rows.append(f"rsum: {m['rsum']:.1f}")
    return "\n".join(rows)


def evaluate_teran(checkpoint, size: str = "1k", config: str | None = None, data_root: str | None = None,
                   text_model: str | None = None, store: str | None = None, device: str = "cpu",
                   out: str | None = None, progress: bool = True, protocol: str | None = None) -> dict:
    from .perf import tune_cpu_allocator
    from .train import build_model

    tune_cpu_allocator()
    t0 = time.perf_counter()
    ck = load_teran_checkpoint(checkpoint)
    teran_cfg = yaml.safe_load(Path(config).read_text()) if config else ck.get("config")
    if not isinstance(teran_cfg, dict):
        raise ValueError(f"{checkpoint}: holds no 'config'; pass --config CONFIG.yaml")
    cfg, report = config_from_teran(teran_cfg, data_root, text_model, store, size)
    if protocol:
        cfg = build(RunConfig, deep_merge(to_dict(cfg), {"eval": {"protocol": protocol}}), "--protocol")
    prepare_test_store(cfg)
    model, text = build_model(cfg, torch.device(device), pretrained=False)
    model.load_state_dict(map_state_dict(ck["model"], model, cfg.model.shared_layers > 0), strict=True)
    img, blocks, cap_img = encode_bucketed(model.to(device), cfg.data.store, "test", text, device, progress=progress)
    del model
    t1 = time.perf_counter()
    scores = score_all_pairs(img, blocks, cfg.scoring, cfg.eval.max_elems, device=device, progress=progress)["total"]
    with Store(cfg.data.store, check_values=False) as s:
        relevance = s.relevance("test")
    m = evaluate_scores(scores.numpy(), cap_img, cfg.eval.protocol, relevance, cfg.eval.ndcg_k)
    m.update(encode_seconds=t1 - t0, score_seconds=time.perf_counter() - t1, protocol=cfg.eval.protocol,
             checkpoint_epoch=ck.get("epoch"))
    print(format_teran_table(m))
    out_dir = Path(out) if out else Path(checkpoint).parent
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps({**m, "config_import": report}, indent=2, default=str))
    return m
