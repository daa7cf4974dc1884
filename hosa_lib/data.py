"""Batching for training and encoding: collate captions with their (deduplicated) images."""
from __future__ import annotations

import numpy as np
import torch

from .store import CaptionDataset


def collate(items: list[dict]) -> dict:
    """Caption items -> {"images": unique images, "captions": captions, "positives": (B_img, B_cap)}."""
    img_ids = [it["image"] for it in items]
    uniq, inverse = np.unique(img_ids, return_inverse=True)
    images = collate_images([items[img_ids.index(u)] for u in uniq])
    captions = collate_captions(items)  # padding trimmed to the longest caption of the batch
    positives = torch.zeros(len(uniq), len(items), dtype=torch.bool)
    positives[torch.as_tensor(inverse), torch.arange(len(items))] = True
    return {"images": images, "captions": captions, "positives": positives}


def to_device(batch, device):
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch.to(device) if isinstance(batch, torch.Tensor) else batch


class EpochSampler(torch.utils.data.Sampler):
    """Deterministic shuffle per (seed, epoch), optionally starting mid-epoch (resume) and sharded (DDP)."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        self.n, self.batch_size, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self.epoch, self.start_batch = 0, 0

    def batches_per_epoch(self) -> int:
        return self.n // (self.batch_size * self.world)  # drop the last partial batch

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        perm = torch.randperm(self.n, generator=g)
        gb = self.batch_size * self.world
        for b in range(self.start_batch, self.batches_per_epoch()):
            chunk = perm[b * gb:(b + 1) * gb]
            yield chunk[self.rank * self.batch_size:(self.rank + 1) * self.batch_size].tolist()

    def __len__(self) -> int:
        return self.batches_per_epoch() - self.start_batch


def dataset(store_path, split: str, text) -> CaptionDataset:
    return CaptionDataset(store_path, split, text)


def collate_images(items: list[dict]) -> dict:
    k = items[0]["regions"].shape[0]
    return {"regions": torch.stack([it["regions"] for it in items]),
            "boxes": torch.stack([it["boxes"] for it in items]),
            "region_mask": torch.arange(k)[None] < torch.tensor([it["n_regions"] for it in items])[:, None],
            "index": torch.tensor([it["image"] for it in items])}


def collate_captions(items: list[dict]) -> dict:
    t = max(int(it["text_mask"].sum()) for it in items)  # padding trimmed to the longest caption
    src = "text" if "text" in items[0] else "input_ids"
    return {src: torch.stack([it[src][:t] for it in items]),
            "text_mask": torch.stack([it["text_mask"][:t] for it in items]),
            "word_mask": torch.stack([it["word_mask"][:t] for it in items]),
            "index": torch.tensor([it["caption"] for it in items])}
