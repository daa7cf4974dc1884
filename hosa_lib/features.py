"""Text backbone hidden states, cached per caption for frozen-backbone training.

The cache of a backbone layer is a sidecar of the store (`store.SidecarWriter`, key `text-<key>`):
hidden (C, T, H) float16, mask (C, T) attention mask, words (C, T) the local word tokens
(attention mask minus special tokens such as [CLS] and [SEP]); T is the longest caption in tokens.

Built in blocks of `block` captions, so memory does not grow with the number of captions (COCO's
616K captions included): a first pass tokenises every caption for the width T and rejects captions
without words before anything is encoded; then each block is encoded in length-sorted batches
(little padding) on `device`, written and flushed. A run stopped anywhere resumes at its last block.
"""
from __future__ import annotations

import numpy as np
import torch
from .progress import bar as progress_bar

from .store import SidecarWriter, Store, StoreError
from .text import cache_key, load_backbone, tokenize


def caption_lengths(store: Store, tokenizer, max_words: int, block: int = 1 << 14,
                    progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, words) per caption of the store, counted in blocks."""
    n = store.n_captions
    tokens, words = np.zeros(n, np.int32), np.zeros(n, np.int32)
    for s in progress_bar(range(0, n, block), progress, desc="tokenise captions"):
        enc = tokenize(tokenizer, store.caption_range(s, min(n, s + block)), max_words)
        tokens[s:s + block] = enc["attention_mask"].sum(1).numpy()
        words[s:s + block] = enc["words"].sum(1).numpy()
    return tokens, words


@torch.no_grad()
def encode_block(texts: list[str], lengths: np.ndarray, tokenizer, model, layer: int, max_words: int, width: int, batch_size: int,
                 device) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """hidden (n, width, H) float16, mask, words of `texts` in their order, encoded in length-sorted
    batches (each padded to its own longest caption only)."""
    hid = model.config.hidden_size
    hidden = np.zeros((len(texts), width, hid), np.float16)
    mask = np.zeros((len(texts), width), bool)
    words = np.zeros((len(texts), width), bool)
    order = np.argsort(lengths, kind="stable")
    for s in range(0, len(texts), batch_size):
        rows = order[s:s + batch_size]
        enc = tokenize(tokenizer, [texts[i] for i in rows], max_words)
        w = enc.pop("words")
        out = model(**{k: v.to(device) for k, v in enc.items()}, output_hidden_states=True)
        t = enc["input_ids"].shape[1]
        hidden[rows, :t] = out.hidden_states[layer].half().cpu().numpy()
        mask[rows, :t] = enc["attention_mask"].bool().numpy()
        words[rows, :t] = w.numpy()
    return hidden, mask, words


def encode_texts(texts: list[str], name: str, layer: int = -1, max_words: int = 32, batch_size: int = 128,
                 device: str = "cpu", progress: bool = True):
    """hidden, mask, words of a list of captions (padded to the longest), in memory: for small lists."""
    tokenizer, model = load_backbone(name)
    model.to(device).eval()
    lengths = tokenize(tokenizer, texts, max_words)["attention_mask"].sum(1).numpy()
    return encode_block(texts, lengths, tokenizer, model, layer, max_words, int(lengths.max()), batch_size, device)


def add_text_cache(store_path, name: str = "minilm", layer: int = -1, max_words: int = 32,
                   progress: bool = True, device: str = "cpu", block: int = 4096, batch_size: int = 128,
                   sidecars=None) -> str:
    """Compute and store the backbone states of every caption, in blocks (resumable); returns the
    cache key. `sidecars`: the sidecar folder when the store is built under a temporary name."""
    key = cache_key(name, layer)
    with Store(store_path, check_values=False, sidecars=sidecars) as s:
        if key in s.text_keys():
            return key
        # layer k > 0 needs the first k layers only (hidden_states[k] is then the last): BERT layer 6 of 12 halves the work
        tokenizer, model = load_backbone(name, layers=layer if layer > 0 else None)
        model.to(device).eval()
        tokens, n_words = caption_lengths(s, tokenizer, max_words, progress=progress)
        empty = np.nonzero(n_words == 0)[0]
        if len(empty):
            first = int(empty[0])
            raise StoreError(f"{store_path}: caption(s) with no words after tokenisation, e.g. #{first} "
                             f"{s.caption_range(first, first + 1)[0]!r} ({len(empty)} in all): remove or fix them "
                             "in the source")
        n, width, hid = len(tokens), int(tokens.max(initial=1)), model.config.hidden_size
        spec = {"hidden": ((n, width, hid), "float16"), "mask": ((n, width), "bool"), "words": ((n, width), "bool")}
        meta = {"model": name, "layer": layer, "max_words": max_words, "block": block}
        with SidecarWriter(store_path, f"text-{key}", spec, meta, home=s.home,
                           chunk_rows={"hidden": 1}) as w:
            w.set_attrs({"model": name, "layer": layer, "max_words": max_words, "min_words": int(n_words.min())})
            bar = progress_bar(total=n, initial=w.rows_done, desc=f"text features ({device})", unit="cap",
                       progress=progress)
            for start in range(w.rows_done, n, block):
                texts = s.caption_range(start, min(n, start + block))
                h, m, wd = encode_block(texts, tokens[start:start + block], tokenizer, model, layer, max_words, width, batch_size, device)
                w.write(start, {"hidden": h, "mask": m, "words": wd})
                bar.update(len(texts))
            bar.close()
    return key
