"""`make gpu-check`: one script (<= 10 minutes on one GPU) that checks and times the CUDA paths.

    python benchmarks/gpu_check.py [--out gpu_check.json] [--dry-run]

1. Triton kernels: compiled on CUDA, compared with eager torch (values and gradients, float32) for
   captions of 16, 32, 64 and 128 words (each a different launch setting), and timed (fwd + bwd).
2. Training: a generated TERAN-layout COCO store (2,000 images, 36 x 2048 features, MiniLM text cache
   encoded on the GPU), then bf16-autocast training steps of params/coco.yaml (HOSA G = 16, embed
   1024) timed after a warm-up, and one validation pass on the GPU.
3. DDP: 2 processes (NCCL) training with the text backbone fine-tuned, when two GPUs exist.
4. COCO-5K-shaped evaluation: 5,000 images x 25,000 length-bucketed captions of generated embeddings
   (d 1024, 36 regions, 8-20 words), every pair scored with HOSA G = 16 on the GPU, then the metrics.
Prints timings and peak GPU memory per part, and writes them as JSON. Without a CUDA device it prints one
line and exits 0. --dry-run runs the same code at toy sizes on the CPU (Triton's interpreter), which is
how the test suite keeps this script working on machines without a GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    ap.add_argument("--dry-run", action="store_true", help="toy sizes on the CPU (Triton interpreter)")
    args = ap.parse_args()
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    import torch
    if not torch.cuda.is_available() and not args.dry_run:
        print(f"gpu_check: skipped, no CUDA device (torch {torch.__version__}, CUDA build {torch.version.cuda})")
        return 0
    sys.path.insert(0, str(REPO))
    dev = torch.device("cpu" if args.dry_run else "cuda")
    if dev.type == "cuda":
        print(f"gpu_check: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    toy = args.dry_run
    res = {"device": "cpu (dry run)" if toy else torch.cuda.get_device_name(0)}
    with tempfile.TemporaryDirectory() as tmp:
        res["kernels"] = check_kernels(dev, toy)
        res["train"] = check_training(Path(tmp), dev, toy)
        res["ddp"] = check_ddp(Path(tmp), dev, toy)
        res["evaluate"] = check_evaluation(dev, toy)
    args.out.write_text(json.dumps(res, indent=1))
    print(f"gpu_check: done, figures in {args.out}")
    return 0


def sync(dev):
    import torch
    if dev.type == "cuda":
        torch.cuda.synchronize()


def peak_gib(dev, reset=False) -> float:
    import torch
    if dev.type != "cuda":
        return 0.0
    v = torch.cuda.max_memory_allocated() / 2**30
    if reset:
        torch.cuda.reset_peak_memory_stats()
    return v


def side(n, length, d, dev, seed, lengths=None):
    import torch
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(n, length, dtype=torch.bool)
    if lengths is not None:
        mask = torch.arange(length)[None] < lengths[:, None]
    return {"glob": torch.randn(n, d, generator=g).to(dev), "local": torch.randn(n, length, d, generator=g).to(dev),
            "mask": mask.to(dev)}


def check_kernels(dev, toy) -> list[dict]:
    """Triton vs eager torch: values and gradients of the high-order term, and their times, for
    captions of L = 16, 32, 64, 128 words (the anchor length that picks Triton's launch setting)."""
    import torch

    from hosa_lib.config import ScoringConfig
    from hosa_lib.scoring import make_side, pair_scores
    shapes = [(4, 6, 32, 16, "t2i"), (3, 40, 33, 3, "both"), (2, 100, 16, 4, "t2i")] if toy else \
        [(128, 16, 1024, 16, "t2i"), (128, 32, 1024, 16, "t2i"), (96, 64, 1024, 16, "t2i"),
         (48, 128, 1024, 16, "t2i"), (128, 32, 1024, 16, "both"), (128, 32, 1024, 1, "t2i")]
    out = []
    for n, L, d, bands, direction in shapes:
        row = {"batch": n, "words": L, "d": d, "bands": bands, "direction": direction}
        got = {}
        for kernel in ("torch", "triton"):
            cfg = ScoringConfig(bands=bands, direction=direction, kernel=kernel)
            img, cap = side(n, 36 if not toy else 5, d, dev, 1), side(n, L, d, dev, 2)
            li, lc = img["local"].requires_grad_(True), cap["local"].requires_grad_(True)
            best = float("inf")
            for _ in range(1 if toy else 5):  # first run compiles; keep the best of the rest
                sync(dev)
                t0 = time.perf_counter()
                s = pair_scores(make_side(img["glob"], li, img["mask"], cfg),
                                make_side(cap["glob"], lc, cap["mask"], cfg), cfg)["high"]
                grads = torch.autograd.grad(s.sum(), (li, lc))
                sync(dev)
                best = min(best, time.perf_counter() - t0)
            got[kernel] = (s.detach(), grads)
            row[f"{kernel}_ms"] = 1000 * best
        (s0, g0), (s1, g1) = got["torch"], got["triton"]
        row["max_abs_diff"] = float((s0 - s1).abs().max())
        row["max_grad_rel_diff"] = max(float((a - b).abs().max() / a.abs().max()) for a, b in zip(g0, g1))
        row["speedup"] = row["torch_ms"] / row["triton_ms"]
        ok = row["max_abs_diff"] < 1e-3 and row["max_grad_rel_diff"] < 1e-3
        row["ok"] = ok
        print(f"kernel   B {n:>4} L {L:>4} d {d:>5} G {bands:>2} {direction:>4}: eager {row['torch_ms']:8.2f} ms, "
              f"triton {row['triton_ms']:8.2f} ms (x{row['speedup']:.1f}); max |diff| {row['max_abs_diff']:.2e}, "
              f"grads {row['max_grad_rel_diff']:.2e} {'ok' if ok else 'MISMATCH'}")
        out.append(row)
    return out


def coco_config(tmp: Path, dev, toy, n: int):
    """params/coco.yaml on a generated TERAN-layout store of n images (toy sizes for --dry-run)."""
    from benchmarks.teran_layout import write_coco_layout
    from hosa_lib.config import load
    write_coco_layout(tmp / "layout", n, k=36, dim=64 if toy else 2048)
    over = {"output_root": str(tmp / "out"),
            "data": {"root": str(tmp / "layout"), "store": str(tmp / "coco.h5"), "text_model": "minilm"},
            "train": {"device": str(dev), "workers": 0 if toy else -1}}
    if toy:
        over["model"] = {"embed": 32, "ff": 64, "image_layers": 1, "text_layers": 1}
        over["train"]["batch_size"] = 8
    return load(REPO / "params" / "coco.yaml", over)


def check_training(tmp: Path, dev, toy) -> dict:
    """Prepare a generated COCO-layout store (text cache on the device), then bf16-autocast training
    steps of params/coco.yaml timed after a warm-up, and one validation pass."""
    import torch

    from hosa_lib.prepare import prepare
    from hosa_lib.train import epoch_batches, setup, train_step, validate
    n, warm, steps = (40, 1, 3) if toy else (2000, 5, 40)
    cfg = coco_config(tmp, dev, toy, n)
    t0 = time.perf_counter()
    rep = prepare(cfg.data, progress=False, device=dev.type)
    t_prep = time.perf_counter() - t0
    peak_gib(dev, reset=True)
    run = setup(cfg, tmp / "run", progress=False)
    run.sampler.set_epoch(0, 0)
    batches = epoch_batches(run)  # training's own loader: persistent workers and pinned memory on CUDA
    run.core.train()
    t_steps = 0.0
    for i in range(warm + steps):
        batch = next(batches)
        sync(dev)
        t0 = time.perf_counter()
        out = train_step(run.model, batch, cfg, i, run.device, run.amp)
        run.opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        run.opt.step()
        sync(dev)
        if i >= warm:
            t_steps += time.perf_counter() - t0
    loss = float(out["loss"].detach())
    t0 = time.perf_counter()
    val = validate(run.core, cfg, run.text, run.device)
    sync(dev)
    t_val = time.perf_counter() - t0
    out = {"images": n, "prepare_s": t_prep, "text_cache_s": rep["seconds"]["text_cache"],
           "captions_per_s": 5 * n / rep["seconds"]["text_cache"], "steps": steps, "warm_up_steps": warm,
           "steps_per_s": steps / t_steps, "batch": cfg.train.batch_size, "amp_bf16": run.amp, "loss": loss,
           "validation_s": t_val, "val_rsum_untrained": val["rsum"], "peak_gib": peak_gib(dev)}
    ok = bool(torch.isfinite(torch.tensor(loss)))
    print(f"train    {n} images: prepare {t_prep:.1f} s (text cache {out['captions_per_s']:.0f} captions/s); "
          f"{steps} steps of batch {cfg.train.batch_size} after {warm} warm-up: {out['steps_per_s']:.2f} steps/s "
          f"(bf16 autocast {run.amp}), loss {loss:.3f} {'ok' if ok else 'NOT FINITE'}; validation "
          f"({cfg.train.val_images or 'all'} val images) {t_val:.1f} s; peak {out['peak_gib']:.2f} GiB")
    return out


def _ddp_worker(rank, world, raw, run_dir, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    sys.path.insert(0, str(REPO))
    import torch.distributed as dist

    from hosa_lib.config import from_dict
    from hosa_lib.train import train
    try:
        train(from_dict(raw), Path(run_dir), progress=False, stop_after_steps=20)
    finally:
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def check_ddp(tmp: Path, dev, toy) -> dict:
    """2-process DDP training (NCCL, one GPU per rank, the text backbone fine-tuned) when two GPUs exist."""
    import torch
    import torch.multiprocessing as mp

    from hosa_lib.config import override, to_dict
    if dev.type != "cuda" or torch.cuda.device_count() < 2:
        print("ddp      skipped: fewer than 2 GPUs")
        return {"skipped": "fewer than 2 GPUs"}
    cfg = override(coco_config(tmp / "ddp", dev, toy, 400),
                   {"model": {"text_finetune": True}, "train": {"device": "cuda", "checkpoint_every": 10}})
    t0 = time.perf_counter()
    mp.spawn(_ddp_worker, args=(2, to_dict(cfg), str(tmp / "ddp_run"), 29400), nprocs=2, join=True)
    ck = torch.load(tmp / "ddp_run" / "checkpoints" / "last.pt", weights_only=False, map_location="cpu")
    out = {"seconds": time.perf_counter() - t0, "step": ck["step"], "ranks_rng": len(ck.get("rng_ranks", []))}
    print(f"ddp      2 ranks, fine-tuned backbone: checkpoint at step {ck['step']} with {out['ranks_rng']} ranks' "
          f"RNG states, {out['seconds']:.1f} s")
    return out


def check_evaluation(dev, toy) -> dict:
    """COCO-5K-shaped scoring of generated embeddings, captions bucketed by length, then metrics."""
    import numpy as np
    import torch

    from hosa_lib.config import EvalConfig, ScoringConfig
    from hosa_lib.evaluate import evaluate_embeddings
    n_img, per, d = (50, 5, 32) if toy else (5000, 5, 1024)
    rng = np.random.default_rng(0)
    lengths = torch.as_tensor(rng.integers(8, 21, n_img * per))
    img = side(n_img, 36, d, "cpu", 3)
    img = {k: v.half() if v.is_floating_point() else v for k, v in img.items()}  # as encode_split keeps them
    order = torch.argsort(lengths, stable=True)
    blocks = []
    for s in range(0, len(order), 128 if toy else 4096):
        idx = order[s:s + (128 if toy else 4096)]
        width = int(lengths[idx].max())
        b = side(len(idx), width, d, "cpu", 4 + s, lengths[idx])
        blocks.append({**{k: v.half() if v.is_floating_point() else v for k, v in b.items()}, "index": idx})
    cap_img = np.repeat(np.arange(n_img), per)
    scfg = ScoringConfig()  # base scoring: HOSA G = 16, t2i
    peak_gib(dev, reset=True)
    t0 = time.perf_counter()
    m, scores = evaluate_embeddings(img, blocks, cap_img, scfg, EvalConfig(protocol="all", max_elems=1 << 26),
                                    device=dev)
    total = time.perf_counter() - t0
    pairs = n_img * n_img * per
    out = {"images": n_img, "captions": n_img * per, "pairs": pairs, "score_s": m["score_seconds"],
           "pairs_per_s": pairs / m["score_seconds"], "metrics_s": total - m["score_seconds"],
           "peak_gib": peak_gib(dev), "rsum_random": m["rsum"]}
    print(f"evaluate {n_img} x {n_img * per} pairs (HOSA G 16, d {d}): scoring {m['score_seconds']:.1f} s "
          f"({out['pairs_per_s']:,.0f} pairs/s), metrics {out['metrics_s']:.1f} s; peak {out['peak_gib']:.2f} GiB")
    return out


if __name__ == "__main__":
    sys.exit(main())
