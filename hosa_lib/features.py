"""Text backbone hidden states, cached per caption in the store for frozen-backbone training.

Cached under text/<key>: hidden (C, T, H) float16, mask (C, T) attention mask, words (C, T) the
local word tokens (attention mask minus special tokens such as [CLS] and [SEP]).
"""
from __future__ import annotations

import numpy as np
import torch
from tqdm import tqdm  # plain tqdm: widget bars render blank in offline HTML

from .store import Store, StoreError, write_text_cache
from .text import cache_key, load_backbone, tokenize


@torch.no_grad()
def encode_texts(texts: list[str], name: str, layer: int = -1, max_words: int = 32, batch_size: int = 256,
                 device: str = "cpu", progress: bool = True):
    tokenizer, model = load_backbone(name)
    model.to(device).eval()
    hidden, masks, words = [], [], []
    for s in tqdm(range(0, len(texts), batch_size), desc="text features", disable=not progress, mininterval=2):
        enc = tokenize(tokenizer, texts[s:s + batch_size], max_words)
        w = enc.pop("words")
        out = model(**{k: v.to(device) for k, v in enc.items()}, output_hidden_states=True)
        hidden.append(out.hidden_states[layer].half().cpu().numpy())
        masks.append(enc["attention_mask"].bool().numpy())
        words.append(w.numpy())
    # batches are padded to their own longest caption: pad all to the longest overall
    width = max(h.shape[1] for h in hidden)
    pad = lambda x: np.pad(x, [(0, 0), (0, width - x.shape[1])] + [(0, 0)] * (x.ndim - 2))
    return tuple(np.concatenate([pad(x) for x in part]) for part in (hidden, masks, words))


def add_text_cache(store_path, name: str = "minilm", layer: int = -1, max_words: int = 32,
                   progress: bool = True) -> str:
    """Compute and store the backbone states for every caption; returns the cache key."""
    key = cache_key(name, layer)
    with Store(store_path, check_values=False) as s:
        if key in s.text_keys():
            return key
        texts = s.captions()
    hidden, mask, words = encode_texts(texts, name, layer, max_words, progress=progress)
    empty = np.nonzero(~words.any(axis=1))[0]
    if len(empty):
        raise StoreError(f"{store_path}: caption(s) with no words after tokenisation, e.g. #{int(empty[0])} "
                         f"{texts[int(empty[0])]!r} ({len(empty)} in all): remove or fix them in the source")
    write_text_cache(store_path, key, hidden, mask, words, {"model": name, "layer": layer, "max_words": max_words})
    return key
