"""Seed-compatible evaluation of a randomly initialised TERAN-shaped checkpoint on a store.

    python benchmarks/bench_teran_eval.py [--store outputs/data/synthetic_demo.h5] [--embed 1024]

Builds a checkpoint with TERAN's exact key layout (BERT-architecture text model = the offline
all-MiniLM-L6-v2 config, region width = the store's), runs `python -m hosa_lib.evaluate --checkpoint
... --store ...` in a subprocess and reports its wall time and peak resident memory (ru_maxrss).
"""
from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import BertConfig

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from hosa_lib.text import resolve_text_model  # noqa: E402
from hosa_lib.store import Store  # noqa: E402
from tests.test_teran import teran_state_dict  # noqa: E402  (TERAN's key layout, built from torch modules)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--store", default="outputs/data/synthetic_demo.h5")
    ap.add_argument("--embed", type=int, default=1024)
    args = ap.parse_args()
    with Store(args.store, check_values=False) as s:
        feat = s.feature_dim
    text_dir = resolve_text_model("minilm")
    bert = BertConfig.from_pretrained(text_dir)
    config = {"dataset": {"name": "coco", "data": "data", "restval": True},
              "text-model": {"name": "bert", "pretrain": text_dir, "word-dim": bert.hidden_size,
                             "extraction-hidden-layer": bert.num_hidden_layers, "fine-tune": True, "layers": 0},
              "image-model": {"name": "bottomup", "transformer-layers": 4, "pos-encoding": "concat-and-process",
                              "feat-dim": feat, "dropout": 0.1},
              "model": {"name": "teran", "embed-size": args.embed, "text-aggregation": "first",
                        "image-aggregation": "first", "layers": 2, "shared-transformer": False, "dropout": 0.1},
              "training": {"margin": 0.2, "max-violation": True, "alignment-mode": "MrSw", "measure": "dot",
                           "loss-type": "alignment"}}
    with tempfile.TemporaryDirectory() as tmp:
        ck = Path(tmp) / "teran_random.pth"
        torch.save({"model": teran_state_dict(bert, feat=feat, embed=args.embed), "config": config, "epoch": 0}, ck)
        print(f"checkpoint: {ck.stat().st_size / 2**20:.0f} MiB, feat {feat}, embed {args.embed}, text {text_dir}")
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "hosa_lib.evaluate", "--checkpoint", str(ck), "--store",
                               args.store, "--protocol", "all", "--out", tmp], text=True)
        wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    print(f"evaluate: exit {proc.returncode}, {wall:.1f} s wall, peak RSS {peak:.2f} GiB")


if __name__ == "__main__":
    main()
