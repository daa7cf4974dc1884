"""COCO-scale check: prepare, train and evaluate on generated files in TERAN's exact layout at two sizes.

    python benchmarks/bench_scale.py --sizes 1000 5000 [--work /tmp/bench_scale] [--steps 20]

For each N (images; 5 captions each) it writes the TERAN layout (benchmarks/teran_layout.py), then runs
each stage in its own process with `params/coco.yaml` (only the text model changed to the offline MiniLM,
protocol `all`: the generated test split is N/5 images, not 5,000):
    convert     the TERAN layout -> store (what `prepare` does first)
    open        opening the store as training and evaluation do (Store + split indices + preflight)
    text_cache  frozen-backbone states of every caption (sidecar, blocks)
    relevance   ROUGE-L of the test split's captions x images (sidecar, blocks)
    train       `--steps` optimisation steps (model build, DataLoader, steps)
    evaluate    encode the test split (captions bucketed by length) and score every pair with HOSA G = 16
and prints seconds, throughput, peak RSS (the stage's process, from wait4) and the store's bytes on disk.
The last table gives each figure's growth exponent between the two sizes (log ratio / log N ratio:
0 = flat, 1 = linear) and the projection to real COCO (123,287 images, 616,767 captions; coco_5k =
25,000 x 5,000 pairs, coco_1k = 5 folds of 5,000 x 1,000).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
COCO_IMAGES, COCO_CAPTIONS = 123_287, 616_767
PAIRS = {"coco_5k": 25_000 * 5_000, "coco_1k": 5 * 5_000 * 1_000}


def config(work: Path, n: int, kernel: str | None = None):
    from hosa_lib.config import load
    root = work / f"n{n}"
    return load(REPO / "params" / "coco.yaml", {
        "output_root": str(root / "outputs"),
        "data": {"root": str(root), "store": str(root / "coco.h5"), "text_model": "minilm"},
        "eval": {"protocol": "all"}, **({"scoring": {"kernel": kernel}} if kernel else {})})


def stage(name: str, work: Path, n: int, steps: int, kernel: str | None = None) -> dict:
    """One stage, in this (fresh) process; returns its figures."""
    import numpy as np
    import torch

    from hosa_lib.store import Store
    cfg = config(work, n, kernel)
    dc, t0 = cfg.data, time.perf_counter()
    out: dict = {}
    if name == "convert":
        from hosa_lib.prepare import build_store
        Path(dc.store).unlink(missing_ok=True)
        out["images"] = build_store(dc, Path(dc.store), progress=False)["images"]
    elif name == "open":
        from hosa_lib.data import CaptionDataset, TextInput
        from hosa_lib.text import cache_key
        with Store(dc.store) as s:
            out["train_captions"] = len(s.split_captions("train"))
        ds = CaptionDataset(dc.store, "train", TextInput(cache_key=cache_key(dc.text_model, dc.text_layer)))
        ds[0]
    elif name == "text_cache":
        from hosa_lib.features import add_text_cache
        with Store(dc.store) as s:
            out["captions"] = s.n_captions
        add_text_cache(dc.store, dc.text_model, dc.text_layer, dc.max_words, progress=False)
    elif name == "relevance":
        from hosa_lib.relevance import add_relevance
        with Store(dc.store) as s:
            out["pairs"] = len(s.split_images("test")) * len(s.split_captions("test"))
        add_relevance(dc.store, "test", ("rougeL",), progress=False)
    elif name == "train":
        from hosa_lib.train import train
        run = Path(cfg.output_root) / "bench-train"
        import shutil
        shutil.rmtree(run, ignore_errors=True)
        out["steps"] = train(cfg, run, progress=False, stop_after_steps=steps)["steps"]
    elif name == "evaluate":
        from hosa_lib.evaluate import encode_split, evaluate_embeddings
        from hosa_lib.factory import build_model
        from hosa_lib.perf import tune_cpu_allocator
        from hosa_lib.relevance import load_teran_relevance  # noqa: F401  (imports as evaluation does)
        tune_cpu_allocator()
        torch.manual_seed(0)
        model, text = build_model(cfg, "cpu")
        img, cap, cap_img = encode_split(model, dc.store, "test", text, bucketed=True)
        t1 = time.perf_counter()
        with Store(dc.store) as s:
            rel = s.relevance("test")
        m, scores = evaluate_embeddings(img, cap, cap_img, cfg.scoring, cfg.eval, rel)
        out.update(encode_s=t1 - t0, pairs=int(scores.numel()), score_s=m["score_seconds"],
                   rsum=round(m["rsum"], 2), pad=float(np.mean([b["mask"].float().mean() for b in cap])))
    out["seconds"] = time.perf_counter() - t0
    return out


def run_stage(name: str, work: Path, n: int, steps: int, kernel: str | None = None) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.Popen([sys.executable, __file__, "--stage", name, "--work", str(work), "--sizes", str(n),
                          "--steps", str(steps)] + (["--kernel", kernel] if kernel else []),
                         stdout=subprocess.PIPE, env=env, text=True)
    text = p.stdout.read()
    _, status, usage = os.wait4(p.pid, 0)
    if status != 0:
        raise SystemExit(f"stage {name} at N = {n} failed (status {status})")
    res = json.loads(text.strip().splitlines()[-1])
    res["rss_gb"] = usage.ru_maxrss / 2**20  # KiB -> GiB
    return res


def store_bytes(store: Path) -> int:
    side = store.with_name(store.name + ".d")
    return store.stat().st_size + sum(p.stat().st_size for p in side.glob("*.h5")) if store.exists() else 0


def rate(name: str, r: dict) -> tuple[str, float]:
    """The stage's throughput figure."""
    if name == "convert":
        return "images/s", r["images"] / r["seconds"]
    if name == "text_cache":
        return "captions/s", r["captions"] / r["seconds"]
    if name == "relevance":
        return "pairs/s", r["pairs"] / r["seconds"]
    if name == "train":
        return "steps/s", r["steps"] / r["seconds"]
    if name == "evaluate":
        return "pairs/s", r["pairs"] / r["score_s"]
    return "-", float("nan")


STAGES = ("convert", "text_cache", "relevance", "open", "train", "evaluate")


def split_sizes(n):
    from benchmarks.teran_layout import split_sizes as sizes
    return sizes(n)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000])
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench_scale"))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    ap.add_argument("--kernel", help="scoring.kernel for train and evaluate (default: params/coco.yaml's, auto)")
    ap.add_argument("--stage", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.stage:  # child process: one stage
        print(json.dumps(stage(args.stage, args.work, args.sizes[0], args.steps, args.kernel)))
        return
    sys.path.insert(0, str(REPO))
    from benchmarks.teran_layout import write_coco_layout
    results: dict[int, dict] = {}
    for n in args.sizes:
        root = args.work / f"n{n}"
        if not (root / "coco" / "annotations" / "dataset_coco.json").is_file():
            t = time.perf_counter()
            write_coco_layout(root, n)
            print(f"N = {n}: generated the TERAN layout in {time.perf_counter() - t:.0f} s", flush=True)
        results[n] = {}
        for name in args.stages:
            r = run_stage(name, args.work, n, args.steps, args.kernel)
            r["store_gb"] = store_bytes(root / "coco.h5") / 2**30
            results[n][name] = r
            unit, v = rate(name, r)
            print(f"N = {n:>6} {name:>10}: {r['seconds']:8.2f} s {v:10.1f} {unit:<10} peak RSS {r['rss_gb']:5.2f} GiB"
                  f"  store {r['store_gb']:6.2f} GiB  {json.dumps({k: v for k, v in r.items() if k not in ('seconds', 'rss_gb', 'store_gb')})}",
                  flush=True)
    (args.work / "bench_scale.json").write_text(json.dumps({str(k): v for k, v in results.items()}, indent=1))
    if len(args.sizes) < 2:
        return
    a, b = args.sizes[0], args.sizes[-1]
    expo = lambda x, y: math.log(y / x) / math.log(b / a) if x > 0 and y > 0 else float("nan")
    print(f"\ngrowth exponents between N = {a} and N = {b} (0 = flat, 1 = linear in N)")
    print(f"{'stage':>10} {'seconds':>8} {'rate':>8} {'peak RSS':>9}   projection to COCO ({COCO_IMAGES:,} images; "
          "evaluation and relevance: its 5,000-image test split)")
    for name in args.stages:
        ra, rb = results[a][name], results[b][name]
        unit, va = rate(name, ra)
        _, vb = rate(name, rb)
        e_rss = expo(ra["rss_gb"], rb["rss_gb"])
        # evaluation and relevance grow with the test split, which COCO caps at 5,000 images
        scale = 5000 / split_sizes(b)["test"] if name in ("relevance", "evaluate") else COCO_IMAGES / b
        proj_rss = rb["rss_gb"] * scale ** max(e_rss, 0)
        if name == "text_cache":
            proj = f"{COCO_CAPTIONS / vb / 3600:.2f} h at {vb:.0f} captions/s"
        elif name == "convert":
            proj = f"{COCO_IMAGES / vb / 3600:.2f} h at {vb:.0f} images/s"
        elif name in ("relevance", "evaluate"):
            proj = ", ".join(f"{k} {p / vb / 3600:.2f} h" for k, p in PAIRS.items()) + f" at {vb:,.0f} pairs/s"
        elif name == "open":
            proj = f"{rb['seconds'] * (COCO_IMAGES / b) ** max(expo(ra['seconds'], rb['seconds']), 0):.1f} s"
        else:
            proj = f"{vb:.2f} steps/s"
        print(f"{name:>10} {expo(ra['seconds'], rb['seconds']):8.2f} {expo(va, vb):8.2f} {e_rss:9.2f}   "
              f"{proj}; peak RSS {proj_rss:.2f} GiB")
    last = args.stages[-1]  # the store as the last stage run left it
    print(f"store bytes exponent {expo(results[a][last]['store_gb'], results[b][last]['store_gb']):.2f}; "
          f"COCO store ≈ {results[b][last]['store_gb'] * COCO_IMAGES / b:.0f} GiB (what the stages run had written)")


if __name__ == "__main__":
    main()
