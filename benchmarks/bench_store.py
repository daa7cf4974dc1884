"""Store and image-encoding throughput (issue: foundation).

    python benchmarks/bench_store.py [--store outputs/data/synthetic_demo.h5] [--workers 0 2]

Reports DataLoader samples/s over the store's train split (lazy h5py reads per worker) against a
baseline of the same reads from one in-memory numpy array, and EfficientNet-Lite0 encoding images/s.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from PIL import Image

from hosa_lib.cnn import grid_regions, load_pretrained, preprocess
from hosa_lib.data import collate
from hosa_lib.data import CaptionDataset, TextInput
from hosa_lib.store import Store


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--store", default="outputs/data/synthetic_demo.h5")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--size", type=int, default=160)
    args = ap.parse_args()
    with Store(args.store, check_values=False) as s:
        key = s.text_keys()[0]
        feats = s.features()  # baseline: whole array in memory
    ds = CaptionDataset(args.store, "train", TextInput(cache_key=key))
    t0 = time.perf_counter()
    for i in range(len(ds)):
        _ = feats[ds.caption_image[ds.captions[i]]].astype(np.float32)
    base = len(ds) / (time.perf_counter() - t0)
    print(f"store {args.store}: {len(ds)} train captions, regions {feats.shape[1:]}")
    print(f"{'in-memory numpy baseline':34s} {base:10.0f} samples/s")
    for w in args.workers:
        loader = torch.utils.data.DataLoader(ds, batch_size=64, shuffle=True, collate_fn=collate, num_workers=w)
        t0 = time.perf_counter()
        n = sum(b["captions"]["text"].shape[0] for b in loader)
        rate = n / (time.perf_counter() - t0)
        print(f"{f'DataLoader workers={w}':34s} {rate:10.0f} samples/s  ({rate / base:.2f}x baseline)")
    model = load_pretrained()
    rng = np.random.default_rng(0)
    imgs = [Image.fromarray((rng.random((args.size, args.size, 3)) * 255).astype(np.uint8)) for _ in range(args.images)]
    grid_regions(model, preprocess(imgs[:8], args.size))
    t0 = time.perf_counter()
    for s0 in range(0, len(imgs), 32):
        grid_regions(model, preprocess(imgs[s0:s0 + 32], args.size))
    print(f"{f'EfficientNet-Lite0 @ {args.size}px':34s} {len(imgs) / (time.perf_counter() - t0):10.1f} images/s "
          f"(threads={torch.get_num_threads()})")


if __name__ == "__main__":
    main()
