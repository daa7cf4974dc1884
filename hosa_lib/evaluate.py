"""Evaluation — one path for our checkpoints and TERAN's: encode each image and caption of a split
once, score all pairs chunked, compute metrics, print one table, write metrics.json.

    python -m hosa_lib.evaluate PARAMS --checkpoint PATH [--protocol NAME] [--split test]
    python -m hosa_lib.evaluate --checkpoint TERAN_MODEL.pth --size 1k|5k [--data-root data] ...

Our checkpoints carry their config: the model and its scoring settings come from the checkpoint,
the store and evaluation settings from PARAMS. Their embeddings are cached beside the checkpoint.
TERAN checkpoints go through the adapter in `hosa_lib.teran` (config and weight mapping only) and
are encoded with captions bucketed by length in float16, so COCO 5K fits in a few GiB.
"""
from __future__ import annotations

if __name__ == "__main__":  # answer --help and usage errors before torch loads
    from hosa_lib.cli import early
    early("evaluate")

import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm  # plain tqdm: widget bars render blank in offline HTML

from .config import ConfigError, EvalConfig, RunConfig, ScoringConfig, override, to_dict
from .data import CaptionDataset, ImageDataset, TextInput, collate_captions, collate_images, to_device
from .factory import load_model
from . import metrics
from .metrics import DIRECTIONS, TWINS, evaluate_scores, twin_accuracies
from .perf import resolve_device
from .provenance import fingerprint, static_code
from .scoring import score_all_pairs
from .store import Store, load_embeddings, save_embeddings


@torch.no_grad()
def encode_split(model, store_path, split: str, text: TextInput, device="cpu", batch_size: int = 128,
                 bucketed: bool = False, dtype=torch.float32, progress: bool = False):
    """-> images {glob, local, mask}, captions, cap_img (each caption's image position in the split).

    captions: one dict {glob, local, mask} padded to the split's longest caption, or with
    bucketed=True a list of length-sorted blocks, each with 'index' (its caption positions), so
    short captions are not padded to the longest. Tensors on the CPU in `dtype` (masks bool).
    """
    model.eval()
    keep = lambda out: {k: v.to("cpu", dtype) if v.is_floating_point() else v.cpu() for k, v in out.items()}
    loader = torch.utils.data.DataLoader(ImageDataset(store_path, split), batch_size=batch_size,
                                         collate_fn=collate_images)
    parts = [keep(model.encode_images(to_device(b, device)))
             for b in tqdm(loader, desc=f"encode {split} images", disable=not progress, mininterval=2)]
    img = {k: torch.cat([p[k] for p in parts]) for k in ("glob", "local", "mask")}
    ds = CaptionDataset(store_path, split, text, with_image=False)
    if bucketed:  # batches of captions sorted by length (lengths from the cached masks or the tokenizer)
        order = np.argsort(ds.lengths(), kind="stable")
        groups = [order[s:s + batch_size].tolist() for s in range(0, len(order), batch_size)]
        loader = torch.utils.data.DataLoader(ds, batch_sampler=groups, collate_fn=collate_captions)
        batches = zip((np.asarray(g) for g in groups), loader)
    else:  # in caption order, batch by batch
        loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, collate_fn=collate_captions)
        batches = ((np.arange(s * batch_size, s * batch_size + len(b["index"])), b) for s, b in enumerate(loader))
    blocks = []
    for idx, batch in tqdm(batches, desc=f"encode {split} captions", total=-(-len(ds) // batch_size),
                           disable=not progress, mininterval=2):
        blocks.append({**keep(model.encode_captions(to_device(batch, device))), "index": torch.as_tensor(idx)})
    with Store(store_path, check_values=False) as st:
        imgs, caps = st.split_images(split), st.split_captions(split)
        pos = np.full(st.n_images, -1)
        pos[imgs] = np.arange(len(imgs))
        cap_img = pos[st.caption_image[caps]]
    return img, (blocks if bucketed else dense(blocks)), cap_img


def dense(blocks: list[dict]) -> dict:
    """Caption blocks in caption order -> one {glob, local, mask} padded to the longest caption."""
    width = max(b["local"].shape[1] for b in blocks)
    pad = lambda x: torch.nn.functional.pad(x, (0, 0, 0, width - x.shape[1]) if x.dim() == 3 else (0, width - x.shape[1]))
    return {"glob": torch.cat([b["glob"] for b in blocks]), "local": torch.cat([pad(b["local"]) for b in blocks]),
            "mask": torch.cat([pad(b["mask"]) for b in blocks])}


def shortlist_scores(img, cap, scfg: ScoringConfig, k: int, max_elems: int, device="cpu") -> torch.Tensor:
    """Two-stage: global score for all pairs, full HOSA only for each caption's top-k images
    (and each image's top-k captions); the rest keep the global score shifted below all re-ranked ones.
    `cap` is a dense caption set or length-bucketed blocks."""
    blocks = cap if isinstance(cap, list) else [dict(cap, index=torch.arange(len(cap["mask"])))]
    n_cap = sum(len(b["index"]) for b in blocks)
    cap_glob = torch.empty(n_cap, blocks[0]["glob"].shape[1], dtype=blocks[0]["glob"].dtype)
    for b in blocks:
        cap_glob[b["index"]] = b["glob"]
    glob = torch.nn.functional.normalize(img["glob"].float(), dim=-1) @ \
        torch.nn.functional.normalize(cap_glob.float(), dim=-1).T
    out = glob - 1e6
    top_img = glob.topk(min(k, glob.shape[0]), dim=0).indices  # (k, n_cap)
    pairs = torch.zeros_like(glob, dtype=torch.bool)
    pairs[top_img, torch.arange(glob.shape[1])[None]] = True
    pairs[torch.arange(glob.shape[0])[:, None], glob.topk(min(k, glob.shape[1]), dim=1).indices] = True
    for b in blocks:
        for j, c in enumerate(b["index"].tolist()):  # per caption: score its candidate images (small: k..2k)
            rows = pairs[:, c].nonzero().flatten()
            sub = score_all_pairs({kk: v[rows] for kk, v in img.items()},
                                  {kk: b[kk][j:j + 1] for kk in ("glob", "local", "mask")}, scfg, max_elems,
                                  device=device)["total"]
            out[rows, c] = sub[:, 0]
    return out


def select_captions(cap, keep: np.ndarray):
    """The captions at positions `keep` (sorted) of a dense caption set or of length-bucketed blocks;
    blocks keep their own padding and get 'index' renumbered to positions within `keep`."""
    if isinstance(cap, dict):
        return {k: v[torch.as_tensor(keep)] for k, v in cap.items()}
    new_pos = np.full(int(max(int(b["index"].max()) for b in cap)) + 1, -1)
    new_pos[keep] = np.arange(len(keep))
    out = []
    for b in cap:
        rows = np.nonzero(new_pos[b["index"].numpy()] >= 0)[0]
        if len(rows):
            out.append({**{k: b[k][torch.as_tensor(rows)] for k in ("glob", "local", "mask")},
                        "index": torch.as_tensor(new_pos[b["index"].numpy()[rows]])})
    return out


def protocol_scores(img, cap, cap_img, scfg: ScoringConfig, ecfg: EvalConfig, device="cpu",
                    progress=False) -> torch.Tensor:
    """(N_img, N_cap) scores of the pairs a protocol uses: every pair for one-fold protocols; for
    coco_1k only the five 1,000-image blocks (a fifth of the pairs), the rest left at -inf."""
    from .metrics import folds
    n_img = len(img["glob"])
    parts = folds(n_img, ecfg.protocol)
    if len(parts) == 1:
        return score_all_pairs(img, cap, scfg, ecfg.max_elems, device=device, progress=progress)["total"]
    scores = torch.full((n_img, len(cap_img)), float("-inf"))
    for imgs in parts:
        caps = np.nonzero(np.isin(cap_img, imgs))[0]
        sub = score_all_pairs({k: v[torch.as_tensor(imgs)] for k, v in img.items()}, select_captions(cap, caps), scfg,
                              ecfg.max_elems, device=device, progress=progress)["total"]
        scores[np.ix_(imgs, caps)] = sub
    return scores


def evaluate_embeddings(img, cap, cap_img, scfg: ScoringConfig, ecfg: EvalConfig, relevance=None,
                        twins=None, device="cpu", progress=False) -> tuple[dict, torch.Tensor]:
    """Score (the protocol's pairs, or two-stage with eval.shortlist) and compute its metrics."""
    t0 = time.perf_counter()
    if ecfg.shortlist > 0:
        scores = shortlist_scores(img, cap, scfg, ecfg.shortlist, ecfg.max_elems, device)
    else:
        scores = protocol_scores(img, cap, cap_img, scfg, ecfg, device, progress)
    t_score = time.perf_counter() - t0
    m = evaluate_scores(scores.numpy(), cap_img, ecfg.protocol, relevance, ecfg.ndcg_k, ecfg.ties)
    m.update(twin_accuracies(scores.numpy(), cap_img, twins))
    m["score_seconds"] = t_score
    return m, scores


def split_extras(store_path, split: str) -> tuple[dict, dict]:
    """Relevance matrices and twin pairs ({store extra name: pairs as split positions}) of a split."""
    with Store(store_path, check_values=False) as s:
        twins = {n: p for n in TWINS if (p := s.split_pairs(n, split)) is not None}
        return s.relevance(split), twins


def check_protocol(store_path, split: str, protocol: str) -> None:
    """Fail before encoding anything when the split cannot be evaluated under `protocol` (e.g. coco_5k
    on a test split that is not 5,000 images), naming the store, the split and the sizes."""
    from .metrics import folds
    with Store(store_path, check_values=False) as s:
        n = len(s.split_images(split))
    try:
        folds(n, protocol)
    except ValueError as e:
        raise ConfigError(f"{store_path}: split '{split}': {e}") from None


def check_store(ck: dict, store_path, checkpoint) -> None:
    """A checkpoint evaluated on the very store file it was trained on, which has since been rebuilt
    from another source (e.g. by another params file sharing the path), is refused: its numbers would
    silently score other data. Another store path (evaluation on other data) is allowed."""
    trained = ck.get("store")
    if not trained:
        return
    with Store(store_path, check_values=False) as s:
        now = s.identity()
    if now["path"] != trained["path"]:
        return
    if (now["source"], now["source_digest"]) != (trained["source"], trained["source_digest"]):
        raise ConfigError(f"{checkpoint} was trained on {store_path} when it held '{trained['source']}' (digest "
                          f"{trained['source_digest'] or '-'}); the store now holds '{now['source']}' (digest "
                          f"{now['source_digest'] or '-'}): it was rebuilt since, from other data. Rebuild it with the "
                          "run's own params (python -m hosa_lib.prepare PARAMS) before evaluating")


def check_scoring(params: ScoringConfig, trained: ScoringConfig, checkpoint) -> None:
    """The scoring a checkpoint was trained with travels with it; a params file that says otherwise is an error."""
    diff = {k: (v, getattr(trained, k)) for k, v in to_dict(params).items() if getattr(trained, k) != v}
    if diff:
        raise ConfigError(f"{checkpoint} was trained with other scoring settings than the params: " + ", ".join(
            f"scoring.{k} = {a!r} in the params vs {b!r} in the checkpoint" for k, (a, b) in diff.items())
            + " (evaluate with the run's own params)")


def evaluate_checkpoint(cfg: RunConfig, checkpoint, split: str | None = None, protocol: str | None = None,
                        device=None, progress=True, cache: bool = True) -> dict:
    """Load one of our checkpoints, encode (or load cached embeddings), score, compute metrics, on
    `device` (default: cfg.train.device, so the GPU when there is one under `auto`).

    Returns {"metrics", "scores" (N_img, N_cap), "img", "cap", "cap_img", "model", "text", "cfg"}
    where cfg is the checkpoint's config evaluated on `cfg.data.store` with `cfg.eval`."""
    from .perf import tune_cpu_allocator

    tune_cpu_allocator()
    device = resolve_device(cfg.train.device) if device is None else torch.device(device)
    split = split or cfg.eval.split
    ecfg = override(cfg.eval, {"protocol": protocol}) if protocol else cfg.eval
    checkpoint = Path(checkpoint)
    model, run_cfg, ck, text = load_model(checkpoint, cfg.data.store, device)
    check_store(ck, cfg.data.store, checkpoint)
    check_protocol(cfg.data.store, split, ecfg.protocol)  # before encoding anything
    check_scoring(cfg.scoring, run_cfg.scoring, checkpoint)
    run_cfg = replace(run_cfg, scoring=model.scoring_config())  # learned term gates folded into the weights
    with Store(cfg.data.store, check_values=False) as st:
        store_uid = st.uid
    # the cache serves only what this checkpoint file, this store build and this code encoded
    tag = (f"{checkpoint.resolve()}|{fingerprint(checkpoint)}|{ck['step']}|{split}|bucketed|store {store_uid}|"
           f"code {static_code(('evaluate',))}")
    emb_path = checkpoint.with_name(f"embeddings_{checkpoint.stem}_{split}.h5")
    t0 = time.perf_counter()
    cached = load_embeddings(emb_path, tag) if cache else None
    if cached is not None:
        img, cap, cap_img = cached
    else:  # captions in length buckets: none padded to the split's longest
        img, cap, cap_img = encode_split(model, cfg.data.store, split, text, device, bucketed=True, progress=progress)
        if cache:
            save_embeddings(emb_path, img, cap, cap_img, tag)
    t_enc = time.perf_counter() - t0
    relevance, swaps = split_extras(cfg.data.store, split)
    m, scores = evaluate_embeddings(img, cap, cap_img, run_cfg.scoring, ecfg, relevance, swaps, device, progress)
    m["encode_seconds"] = t_enc
    return {"metrics": m, "scores": scores, "img": img, "cap": cap, "cap_img": cap_img, "model": model,
            "text": text, "cfg": run_cfg}


def evaluate_teran(checkpoint, size: str = "1k", config: str | None = None, data_root: str | None = None,
                   text_model: str | None = None, store: str | None = None, device: str | None = None,
                   progress: bool = True, protocol: str | None = None, max_words: int = 512,
                   float16: bool = False) -> dict:
    """A TERAN/HOSA-seed checkpoint on TERAN's test split, like the seed's `test.py MODEL --size 1k|5k`:
    float32 end to end unless float16 (half the memory; scores move by ~1e-4, ranks rarely)."""
    from .factory import load_teran_model
    from .perf import tune_cpu_allocator
    from .prepare import prepare_teran_test
    from .runs import load_checkpoint
    from .teran import config_from_teran

    tune_cpu_allocator()
    device = resolve_device("auto") if device is None else torch.device(device)
    t0 = time.perf_counter()
    ck = load_checkpoint(checkpoint)
    cfg, report = config_from_teran(ck, checkpoint, config, data_root, text_model, store, size, protocol,
                                    max_words, float16)
    prepare_teran_test(cfg, float16)
    check_protocol(cfg.data.store, "test", cfg.eval.protocol)
    model, text = load_teran_model(ck, cfg, device)
    img, blocks, cap_img = encode_split(model.to(device), cfg.data.store, "test", text, device, bucketed=True,
                                        dtype=torch.float16 if float16 else torch.float32, progress=progress)
    del model
    t1 = time.perf_counter()
    relevance, _ = split_extras(cfg.data.store, "test")
    m, _ = evaluate_embeddings(img, blocks, cap_img, cfg.scoring, cfg.eval, relevance, None, device, progress)
    m.update(encode_seconds=t1 - t0, protocol=cfg.eval.protocol, checkpoint_epoch=ck.get("epoch"),
             precision="float16" if float16 else "float32", max_words=max_words, config_import=report)
    return m


def format_table(m: dict) -> str:
    """R@K (metrics.REPORTED_KS), medr, meanr and NDCG per direction, then rsum (R@1+5+10 both ways)
    and swap accuracy when present."""
    ndcg = sorted({k.split("_ndcg_")[1] for k in m if "_ndcg_" in k})
    names = {"rougeL": "ROUGE-L", "spice": "SPICE"}
    ks = metrics.REPORTED_KS
    head = f"{'':14s}" + "".join(f"{f'R@{k}':>8s}" for k in ks) + f"{'medr':>7s}{'meanr':>8s}" + \
        "".join(f"{'NDCG-' + names.get(n, n):>14s}" for n in ndcg)
    rows = [head]
    labels = {"i2t": "Image to text", "t2i": "Text to image"}  # TERAN's evaluation prints these
    for d in DIRECTIONS:
        rows.append(f"{labels[d]:14s}" + "".join(f"{m[f'{d}_r{k}']:8.1f}" for k in ks) + f"{m[f'{d}_medr']:7.0f}"
                    f"{m[f'{d}_meanr']:8.1f}" + "".join(f"{m[f'{d}_ndcg_{n}']:14.4f}" for n in ndcg))
    rows.append(f"rsum: {m['rsum']:.2f}" + "".join(f"   {k.replace('_', ' ')}: {m[k]:.1f}%"
                                                    for k in TWINS.values() if k in m))
    return "\n".join(rows)


def main(argv=None) -> int:
    from .cli import run

    def go(args):
        if args.size or not args.params:
            m = evaluate_teran(args.checkpoint, args.size or "1k", args.config, args.data_root, args.text_model,
                               args.store, args.device, protocol=args.protocol, max_words=args.max_words,
                               float16=args.float16)
        else:
            from .config import load
            m = evaluate_checkpoint(load(args.params), args.checkpoint, args.split, args.protocol,
                                    args.device)["metrics"]
        print(format_table(m))
        out = Path(args.out) if args.out else Path(args.checkpoint).parent
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(m, indent=2, default=str))
    return run("evaluate", go, argv)


if __name__ == "__main__":
    sys.exit(main())
