"""Datasets and batching: store rows -> tensors, captions with their (deduplicated) images.

The caption -> image index is the currency from the store to the loss: a training batch carries
the store index of each of its images (`images["index"]`) and of each caption's image
(`captions["image"]`); positives are `images["index"][:, None] == captions["image"][None]`, built
once where the loss needs them (after gathering across ranks under DDP).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .store import RowReader, Store, StoreError


@dataclass(frozen=True)
class TextInput:
    """How captions reach the text encoder: cached backbone states, or tokens for a backbone that runs."""
    cache_key: str | None = None   # text/<cache_key> in the store (frozen backbone)
    tokenizer: str | None = None   # tokenizer name/dir: tokenise on the fly (fine-tuned backbone)
    max_words: int = 32


class CaptionDataset(torch.utils.data.Dataset):
    """One item per caption of a split: the caption's image regions and its text input.

    Item: dict(regions (K, D) f32, boxes (K, 4), n_regions, image, caption (store indices), and either
    text (T, H) f32 cached states or input_ids (T,), plus text_mask (T,) and word_mask (T,)).
    `text` may be a TextInput or None (images only). Rows are read lazily in each DataLoader worker.
    """

    def __init__(self, path, split: str, text: TextInput | None, with_image: bool = True):
        self.with_image, self.text = with_image, text
        with Store(path, check_values=False) as s:
            self.captions = s.split_captions(split)
            self.caption_image = s.caption_image
            key = text.cache_key if text else None
            if key is not None and key not in s.text_keys():
                raise StoreError(f"{path}: no text cache '{key}' (have: {', '.join(s.text_keys()) or 'none'})")
        self.rows = RowReader(path, text.cache_key if text else None)
        self._tok = None

    def __len__(self) -> int:
        return len(self.captions)

    def __getstate__(self):
        return {**self.__dict__, "_tok": None}

    def __getitem__(self, i: int) -> dict:
        return self.__getitems__([i])[0]

    def lengths(self, block: int = 1 << 14) -> np.ndarray:
        """Tokens per caption of the split (attention mask), for batches bucketed by length."""
        if self.text is not None and self.text.cache_key is not None:
            return self.rows.text_lengths(self.captions)
        from .text import load_tokenizer, tokenize
        tok = self._tok = self._tok or load_tokenizer(self.text.tokenizer)
        return np.concatenate([tokenize(tok, self.rows.captions(self.captions[s:s + block]), self.text.max_words)
                               ["attention_mask"].sum(1).numpy() for s in range(0, len(self.captions), block)])

    def __getitems__(self, indices) -> list[dict]:
        """Batched fetch (DataLoader calls this with a whole batch)."""
        caps = self.captions[np.asarray(indices, dtype=np.int64)]
        imgs = self.caption_image[caps]
        items = [{"image": int(im), "caption": int(c)} for im, c in zip(imgs, caps)]
        if self.with_image:
            for it, im in zip(items, image_items(self.rows, imgs)):
                it.update(im)
        if self.text is not None and self.text.cache_key is not None:
            hidden, mask, words = self.rows.text_states(caps)
            for j, it in enumerate(items):
                it.update(text=torch.from_numpy(hidden[j].astype(np.float32)), text_mask=torch.from_numpy(mask[j]),
                          word_mask=torch.from_numpy(words[j]))
        elif self.text is not None and self.text.tokenizer is not None:
            from .text import load_tokenizer, tokenize
            if self._tok is None:
                self._tok = load_tokenizer(self.text.tokenizer)
            enc = tokenize(self._tok, self.rows.captions(caps), self.text.max_words)
            for j, it in enumerate(items):
                it.update(input_ids=enc["input_ids"][j], text_mask=enc["attention_mask"][j].bool(),
                          word_mask=enc["words"][j])
        return items


class ImageDataset(torch.utils.data.Dataset):
    """One item per image of a split (for encoding galleries)."""

    def __init__(self, path, split: str):
        with Store(path, check_values=False) as s:
            self.images = s.split_images(split)
        self.rows = RowReader(path)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return self.__getitems__([i])[0]

    def __getitems__(self, indices) -> list[dict]:
        return image_items(self.rows, self.images[np.asarray(indices, dtype=np.int64)])


def image_items(rows: RowReader, imgs: np.ndarray) -> list[dict]:
    feats, boxes, nreg = rows.images(imgs)
    return [{"regions": torch.from_numpy(feats[j].astype(np.float32)), "boxes": torch.from_numpy(boxes[j]),
             "n_regions": int(nreg[j]), "image": int(imgs[j])} for j in range(len(imgs))]


def collate(items: list[dict]) -> dict:
    """Caption items -> {"images": the batch's unique images, "captions": captions with their image's
    store index in captions["image"]}."""
    img_ids = [it["image"] for it in items]
    uniq = np.unique(img_ids)
    images = collate_images([items[img_ids.index(u)] for u in uniq])
    captions = collate_captions(items)  # padding trimmed to the longest caption of the batch
    captions["image"] = torch.tensor(img_ids)
    return {"images": images, "captions": captions}


def positives(image_index: torch.Tensor, caption_image: torch.Tensor) -> torch.Tensor:
    """(B_img, B_cap) bool: caption c describes image i."""
    return image_index[:, None] == caption_image[None, :]


def to_device(batch, device):
    """Tensors of a (nested) batch onto `device`; pinned CPU tensors are copied without blocking."""
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=batch.is_pinned()) if batch.device != torch.device(device) else batch
    return batch


class EpochSampler(torch.utils.data.Sampler):
    """Deterministic shuffle per (seed, epoch), optionally starting mid-epoch (resume) and sharded (DDP).
    groups: dataset positions that stay next to each other in the shuffled order (twin captions, so
    that a twin pair lands in one batch: `twin_groups`); the groups are shuffled, not their members."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1,
                 groups: list[list[int]] | None = None):
        self.n, self.batch_size, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self.epoch, self.start_batch = 0, 0
        self.groups = groups

    def batches_per_epoch(self) -> int:
        return self.n // (self.batch_size * self.world)  # drop the last partial batch

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        if self.groups:
            order = torch.randperm(len(self.groups), generator=g).tolist()
            perm = torch.tensor([i for k in order for i in self.groups[k]])
        else:
            perm = torch.randperm(self.n, generator=g)
        gb = self.batch_size * self.world
        for b in range(self.start_batch, self.batches_per_epoch()):
            chunk = perm[b * gb:(b + 1) * gb]
            yield chunk[self.rank * self.batch_size:(self.rank + 1) * self.batch_size].tolist()

    def __len__(self) -> int:
        return self.batches_per_epoch() - self.start_batch


def twin_groups(captions: np.ndarray, caption_image: np.ndarray, pairs) -> list[list[int]] | None:
    """Groups of dataset positions (captions: the split's caption indices) for `EpochSampler`: for each
    twin pair (store image indices a, b), the k-th caption of a with the k-th caption of b; every other
    caption alone. None without pairs."""
    if pairs is None or not len(pairs):
        return None
    by_image: dict[int, list[int]] = {}
    for pos, c in enumerate(captions):
        by_image.setdefault(int(caption_image[c]), []).append(pos)
    groups, paired = [], set()
    for a, b in np.asarray(pairs).reshape(-1, 2):
        ca, cb = by_image.get(int(a), []), by_image.get(int(b), [])
        for k in range(max(len(ca), len(cb))):
            groups.append([p for p in (ca[k:k + 1] + cb[k:k + 1])])
        paired.update(ca + cb)
    groups += [[p] for p in range(len(captions)) if p not in paired]
    return groups


def collate_images(items: list[dict]) -> dict:
    k = items[0]["regions"].shape[0]
    return {"regions": torch.stack([it["regions"] for it in items]),
            "boxes": torch.stack([it["boxes"] for it in items]),
            "region_mask": torch.arange(k)[None] < torch.tensor([it["n_regions"] for it in items])[:, None],
            "index": torch.tensor([it["image"] for it in items])}


def collate_captions(items: list[dict]) -> dict:
    """Captions padded (or trimmed) to the longest caption of the batch."""
    t = max(int(it["text_mask"].sum()) for it in items)
    src = "text" if "text" in items[0] else "input_ids"

    def fit(x):  # (T, ...) -> (t, ...): items tokenised apart may be shorter than t
        return x[:t] if len(x) >= t else torch.nn.functional.pad(x, (0, 0) * (x.dim() - 1) + (0, t - len(x)))
    return {src: torch.stack([fit(it[src]) for it in items]),
            "text_mask": torch.stack([fit(it["text_mask"]) for it in items]),
            "word_mask": torch.stack([fit(it["word_mask"]) for it in items]),
            "index": torch.tensor([it["caption"] for it in items])}
