"""Relevance matrices for NDCG (TERAN's definition): rel[c, j] = relevance of caption c to image j.

ROUGE-L: a caption's relevance to an image is its ROUGE-L F-measure against that image's own
captions, taking the best reference (rouge-score's `score_multi`). TERAN computed ROUGE-L with
pycocoevalcap (beta = 1.2); values differ slightly, so NDCG-ROUGE-L is comparable across runs of
this workbench, not digit-for-digit with published numbers unless TERAN's file is imported.
SPICE cannot run offline (Stanford CoreNLP); TERAN's precomputed files are imported instead.
Both TERAN files are raw float32 memmaps of shape (captions, images) despite the .npy suffix.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from tqdm import tqdm  # plain tqdm: widget bars render blank in offline HTML

from .store import Store, StoreError, write_relevance


# Words of any script (\w is Unicode-aware), each CJK ideograph / kana / hangul syllable on its own;
# a caption with no such tokens (emoji, punctuation only) falls back to its non-space characters.
# rouge-score's default tokenizer keeps [a-z0-9] only, which makes ROUGE-L 0 for Chinese, Arabic or
# emoji captions even against their own image.
_WORD = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af]|\w+")


def unicode_tokens(text: str) -> list[str]:
    text = text.lower()
    return _WORD.findall(text) or re.findall(r"\S", text)


class _CachedTokenizer:
    """A Unicode-aware tokenizer for rouge-score, memoised: each caption is tokenised once, not once per pair."""

    def __init__(self):
        self._cache = {}

    def tokenize(self, text):
        if text not in self._cache:
            self._cache[text] = unicode_tokens(text)
        return self._cache[text]


def rouge_l_matrix(captions: list[str], image_refs: list[list[str]], progress: bool = True) -> np.ndarray:
    """(len(captions), len(image_refs)) ROUGE-L F relevance."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_CachedTokenizer())
    out = np.zeros((len(captions), len(image_refs)), np.float32)
    memo: dict[tuple[str, int], float] = {}
    for c, cap in enumerate(tqdm(captions, desc="ROUGE-L relevance", disable=not progress, mininterval=2)):
        for j, refs in enumerate(image_refs):
            key = (cap, j)
            if key not in memo:
                memo[key] = scorer.score_multi(refs, cap)["rougeL"].fmeasure
            out[c, j] = memo[key]
    return out


def load_teran_relevance(path, n_captions: int, n_images: int) -> np.ndarray:
    """Read a TERAN relevance file (raw float32 memmap, or a real .npy), checking its size."""
    path = Path(path)
    if not path.is_file():
        raise StoreError(f"relevance file not found: {path}")
    with path.open("rb") as fh:
        is_npy = fh.read(6) == b"\x93NUMPY"
    arr = np.load(path) if is_npy else np.memmap(path, dtype=np.float32, mode="r")
    if arr.size != n_captions * n_images:
        raise StoreError(f"{path}: {arr.size} values, expected {n_captions} captions x {n_images} images "
                         f"= {n_captions * n_images}")
    return np.asarray(arr, dtype=np.float32).reshape(n_captions, n_images)


def add_relevance(store_path, split: str, methods=("rougeL",), spice_file: str = "", progress: bool = True) -> None:
    """Compute/import relevance matrices for a split and store them (atomic update)."""
    with Store(store_path, check_values=False) as s:
        imgs = s.split_images(split)
        caps = s.split_captions(split)
        cap_text = s.captions(caps)
        all_text = s.captions()
        refs = [[] for _ in imgs]
        pos = {int(i): p for p, i in enumerate(imgs)}
        for c, img in enumerate(s.caption_image):
            if int(img) in pos:
                refs[pos[int(img)]].append(all_text[c])
        have = s.relevance(split)
    todo = {}
    if "rougeL" in methods and "rougeL" not in have:
        todo["rougeL"] = rouge_l_matrix(cap_text, refs, progress)
    if spice_file:
        todo["spice"] = load_teran_relevance(spice_file, len(caps), len(imgs))
    unknown = set(methods) - {"rougeL", "spice"}
    if unknown:
        raise StoreError(f"data.relevance: unknown method(s) {sorted(unknown)}; rougeL is computed, spice imported")
    if todo:
        write_relevance(store_path, split, todo)
