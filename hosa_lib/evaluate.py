"""Evaluation: encode each image and caption of a split once, cache the embeddings beside the
checkpoint, score all pairs chunked, compute metrics.

`python -m hosa_lib.evaluate PARAMS --checkpoint PATH [--protocol NAME] [--split test]`
prints a table and writes metrics.json next to the checkpoint's run (or --out).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import torch
from tqdm import tqdm  # plain tqdm: widget bars render blank in offline HTML

from .config import EvalConfig, ScoringConfig, load
from .data import collate_captions, collate_images, to_device
from .metrics import evaluate_scores, swap_accuracy
from .scoring import score_all_pairs
from .store import CaptionDataset, ImageDataset, Store


@torch.no_grad()
def encode_split(model, store_path, split: str, text: str, device="cpu", batch_size: int = 128,
                 progress: bool = False) -> tuple[dict, dict, np.ndarray]:
    """-> images {glob, local, mask}, captions {glob, local, mask} (CPU float32), cap_img (split positions)."""
    model.eval()
    out = []
    for ds, coll, fn in ((ImageDataset(store_path, split), collate_images, model.encode_images),
                         (CaptionDataset(store_path, split, text, with_image=False), collate_captions,
                          model.encode_captions)):
        loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, collate_fn=coll)
        parts = [{k: v.float().cpu() for k, v in fn(to_device(b, device)).items()}
                 for b in tqdm(loader, desc=f"encode {split}", disable=not progress, mininterval=2)]
        width = max(p["local"].shape[1] for p in parts)
        pad = lambda x: torch.nn.functional.pad(x, (0, 0, 0, width - x.shape[1])) if x.dim() == 3 else \
            torch.nn.functional.pad(x, (0, width - x.shape[1]))
        out.append({"glob": torch.cat([p["glob"] for p in parts]),
                    "local": torch.cat([pad(p["local"]) for p in parts]),
                    "mask": torch.cat([pad(p["mask"]) for p in parts])})
    with Store(store_path, check_values=False) as s:
        imgs, caps = s.split_images(split), s.split_captions(split)
        pos = np.full(s.n_images, -1)
        pos[imgs] = np.arange(len(imgs))
        cap_img = pos[s.caption_image[caps]]
    return out[0], out[1], cap_img


def save_embeddings(path, img: dict, cap: dict, cap_img: np.ndarray, tag: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with h5py.File(tmp, "w") as f:
        f.attrs["tag"] = tag
        for side, d in (("images", img), ("captions", cap)):
            for k, v in d.items():
                f.create_dataset(f"{side}/{k}", data=v.numpy())
        f.create_dataset("cap_img", data=cap_img)
    tmp.replace(path)


def load_embeddings(path, tag: str):
    path = Path(path)
    if not path.is_file():
        return None
    with h5py.File(path, "r") as f:
        if f.attrs.get("tag") != tag:
            return None
        side = lambda s: {k: torch.from_numpy(f[f"{s}/{k}"][:]) for k in ("glob", "local", "mask")}
        return side("images"), side("captions"), f["cap_img"][:]


def shortlist_scores(img, cap, scfg: ScoringConfig, k: int, max_elems: int) -> torch.Tensor:
    """Two-stage: global score for all pairs, full HOSA only for each caption's top-k images
    (and each image's top-k captions); the rest keep the global score shifted below all re-ranked ones."""
    glob = torch.nn.functional.normalize(img["glob"], dim=-1) @ torch.nn.functional.normalize(cap["glob"], dim=-1).T
    out = glob - 1e6
    top_img = glob.topk(min(k, glob.shape[0]), dim=0).indices  # (k, n_cap)
    pairs = torch.zeros_like(glob, dtype=torch.bool)
    pairs[top_img, torch.arange(glob.shape[1])[None]] = True
    pairs[torch.arange(glob.shape[0])[:, None], glob.topk(min(k, glob.shape[1]), dim=1).indices] = True
    for c in range(glob.shape[1]):  # per caption: score its candidate images (small: k..2k)
        rows = pairs[:, c].nonzero().flatten()
        sub = score_all_pairs({kk: v[rows] for kk, v in img.items()}, {kk: v[c:c + 1] for kk, v in cap.items()},
                              scfg, max_elems)["total"]
        out[rows, c] = sub[:, 0]
    return out


def evaluate_embeddings(img, cap, cap_img, scfg: ScoringConfig, ecfg: EvalConfig, relevance=None,
                        swap_pairs=None, device="cpu", progress=False) -> tuple[dict, torch.Tensor]:
    t0 = time.perf_counter()
    if ecfg.shortlist > 0:
        scores = shortlist_scores(img, cap, scfg, ecfg.shortlist, ecfg.max_elems)
    else:
        scores = score_all_pairs(img, cap, scfg, ecfg.max_elems, device=device, progress=progress)["total"]
    t_score = time.perf_counter() - t0
    m = evaluate_scores(scores.numpy(), cap_img, ecfg.protocol, relevance, ecfg.ndcg_k)
    if swap_pairs is not None and len(swap_pairs):
        m["swap_acc"] = swap_accuracy(scores.numpy(), cap_img, swap_pairs)
    m["score_seconds"] = t_score
    return m, scores


def evaluate_checkpoint(cfg, checkpoint, split: str | None = None, protocol: str | None = None,
                        device="cpu", progress=True, cache: bool = True) -> tuple[dict, torch.Tensor, dict]:
    """Load a checkpoint, encode (or load cached embeddings), score, compute metrics."""
    from .perf import tune_cpu_allocator
    from .train import load_model

    tune_cpu_allocator()
    split = split or cfg.eval.split
    ecfg = EvalConfig(**{**cfg.eval.__dict__, "protocol": protocol or cfg.eval.protocol})
    checkpoint = Path(checkpoint)
    model, ck, text = load_model(checkpoint, cfg, device)
    tag = f"{checkpoint.resolve()}|{ck['step']}|{split}"
    emb_path = checkpoint.with_name(f"embeddings_{checkpoint.stem}_{split}.h5")
    t0 = time.perf_counter()
    cached = load_embeddings(emb_path, tag) if cache else None
    if cached is None:
        cached = encode_split(model, cfg.data.store, split, text, device, progress=progress)
        if cache:
            save_embeddings(emb_path, *cached, tag)
    img, cap, cap_img = cached
    t_enc = time.perf_counter() - t0
    with Store(cfg.data.store, check_values=False) as s:
        relevance = s.relevance(split)
        swaps = s.extra("swap_pairs")
        if swaps is not None:  # store indices -> split positions
            pos = {int(i): p for p, i in enumerate(s.split_images(split))}
            swaps = np.array([[pos[a], pos[b]] for a, b in swaps if a in pos and b in pos])
    m, scores = evaluate_embeddings(img, cap, cap_img, cfg.scoring, ecfg, relevance, swaps, device, progress)
    m["encode_seconds"] = t_enc
    return m, scores, {"img": img, "cap": cap, "cap_img": cap_img}


def format_table(m: dict) -> str:
    rows = []
    for d, label in (("i2t", "image->text"), ("t2i", "text->image")):
        vals = [f"R@{k} {m[f'{d}_r{k}']:6.2f}" for k in (1, 5, 10)] + \
               [f"medr {m[f'{d}_medr']:.0f}", f"meanr {m[f'{d}_meanr']:.1f}"] + \
               [f"{k[len(d) + 1:]} {v:.4f}" for k, v in m.items() if k.startswith(f"{d}_ndcg")]
        rows.append(f"{label:>12}: " + "  ".join(vals))
    rows.append(f"{'rsum':>12}: {m['rsum']:.2f}" + (f"   swap acc: {m['swap_acc']:.1f}%" if "swap_acc" in m else ""))
    return "\n".join(rows)


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("params", nargs="?", help="params file (omit for a TERAN/HOSA checkpoint with --size)")
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--protocol", default=None, choices=["all", "coco_1k", "coco_5k", "f30k_1k"])
    ap.add_argument("--split", default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None, help="folder for metrics.json (default: the checkpoint's folder)")
    teran = ap.add_argument_group("TERAN/HOSA checkpoints (seed-compatible test.py)")
    teran.add_argument("--size", choices=["1k", "5k"], help="COCO 1K (5 folds) or 5K; Flickr30K: 1k")
    teran.add_argument("--config", help="TERAN YAML config (default: the checkpoint's own)")
    teran.add_argument("--data-root", help="TERAN data/ folder (default: the config's dataset.data)")
    teran.add_argument("--text-model", help="local dir or HF name of the BERT tokenizer/config (default: the config's)")
    teran.add_argument("--store", help="evaluate on an existing HDF5 store instead of converting data/")
    args = ap.parse_args(argv)
    if args.size or not args.params:
        from .reproduce import evaluate_teran
        evaluate_teran(args.checkpoint, args.size or "1k", args.config, args.data_root, args.text_model,
                       args.store, args.device, args.out, protocol=args.protocol)
        return 0
    cfg = load(args.params)
    m, _, _ = evaluate_checkpoint(cfg, args.checkpoint, args.split, args.protocol, args.device)
    print(format_table(m))
    out = Path(args.out) if args.out else Path(args.checkpoint).parent
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(m, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
