"""Relevance matrices for NDCG (TERAN's definition): rel[c, j] = relevance of caption c to image j.

ROUGE-L: a caption's relevance to an image is its ROUGE-L F-measure against that image's own
captions, taking the best reference — the value of rouge-score's `score_multi(refs, caption)`
with the Unicode tokenizer below, computed by a compiled LCS over token ids (`rouge_l_rows`; the
tests hold it equal to rouge-score). TERAN computed ROUGE-L with pycocoevalcap (beta = 1.2); values
differ slightly, so NDCG-ROUGE-L is comparable across runs of this workbench, not digit-for-digit
with published numbers unless TERAN's file is imported.
SPICE cannot run offline (Stanford CoreNLP); TERAN's precomputed files are imported instead.
Both TERAN files are raw float32 memmaps of shape (captions, images) despite the .npy suffix.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from numba import njit, prange
from .progress import bar as progress_bar

from .store import SidecarWriter, Store, StoreError, write_relevance

# Words of any script (\w is Unicode-aware), each CJK ideograph / kana / hangul syllable on its own;
# a caption with no such tokens (emoji, punctuation only) falls back to its non-space characters.
# rouge-score's default tokenizer keeps [a-z0-9] only, which makes ROUGE-L 0 for Chinese, Arabic or
# emoji captions even against their own image.
_WORD = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af]|\w+")


def unicode_tokens(text: str) -> list[str]:
    text = text.lower()
    return _WORD.findall(text) or re.findall(r"\S", text)


class UnicodeTokenizer:
    """`unicode_tokens` in rouge-score's tokenizer interface (the tests' reference scorer uses it)."""

    def tokenize(self, text):
        return unicode_tokens(text)


# Why hand-written: rouge-score is pure Python (330-690 us a pair), and COCO 5K needs 125M pairs.
# No library computes an all-pairs LCS matrix; these loops keep one DP row per thread.
@njit(inline="always")
def _lcs(a, a0, a1, b, b0, b1, row):
    """Length of the longest common subsequence of a[a0:a1] and b[b0:b1] (row: >= b1 - b0 + 1 ints)."""
    m = b1 - b0
    for j in range(m + 1):
        row[j] = 0
    for i in range(a0, a1):
        ai, diag = a[i], 0
        for j in range(1, m + 1):
            up = row[j]
            if ai == b[b0 + j - 1]:
                row[j] = diag + 1
            elif row[j - 1] > up:
                row[j] = row[j - 1]
            diag = up
    return row[m]


@njit(parallel=True, cache=True)
def _rouge_rows(tok, off, rows, refs, ref_off, max_len, out):
    """out[r, j] = max over references q of image j of ROUGE-L F(caption rows[r], caption q), with
    rouge-score's arithmetic (precision = lcs / caption length, recall = lcs / reference length,
    F = 2 P R / (P + R)) in float64. tok/off: token ids of every caption, flat with offsets;
    refs[ref_off[j]:ref_off[j + 1]]: the captions of image j."""
    for r in prange(len(rows)):
        c = rows[r]
        c0, c1 = off[c], off[c + 1]
        work = np.zeros(max_len + 1, np.int64)
        for j in range(len(ref_off) - 1):
            best = 0.0
            for q in refs[ref_off[j]:ref_off[j + 1]]:
                q0, q1 = off[q], off[q + 1]
                if c1 == c0 or q1 == q0:
                    continue
                lcs = _lcs(tok, c0, c1, tok, q0, q1, work)
                p = lcs / (c1 - c0)
                rc = lcs / (q1 - q0)
                f = 2 * p * rc / (p + rc) if p + rc > 0 else 0.0
                if f > best:
                    best = f
            out[r, j] = best


class RougeL:
    """ROUGE-L relevance of `captions` against images given by their reference captions.

    texts: every caption involved (queries and references); queries: indices into texts of the
    matrix rows; image_refs[j]: indices into texts of image j's captions."""

    def __init__(self, texts: list[str], queries, image_refs: list[list[int]]):
        vocab: dict[str, int] = {}
        ids = [[vocab.setdefault(t, len(vocab)) for t in unicode_tokens(x)] for x in texts]
        self.off = np.zeros(len(ids) + 1, np.int64)
        self.off[1:] = np.cumsum([len(i) for i in ids])
        self.tok = np.fromiter((t for i in ids for t in i), np.int64, count=int(self.off[-1]))
        self.max_len = max((len(i) for i in ids), default=0)
        self.queries = np.asarray(queries, np.int64)
        self.ref_off = np.zeros(len(image_refs) + 1, np.int64)
        self.ref_off[1:] = np.cumsum([len(r) for r in image_refs])
        self.refs = np.fromiter((q for r in image_refs for q in r), np.int64, count=int(self.ref_off[-1]))

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.queries), len(self.ref_off) - 1

    def rows(self, start: int, stop: int) -> np.ndarray:
        """(stop - start, n_images) float32: matrix rows start..stop-1."""
        out = np.zeros((stop - start, self.shape[1]), np.float64)
        _rouge_rows(self.tok, self.off, self.queries[start:stop], self.refs, self.ref_off, self.max_len, out)
        return out.astype(np.float32)


def rouge_l_matrix(captions: list[str], image_refs: list[list[str]], progress: bool = True,
                   block: int = 256) -> np.ndarray:
    """(len(captions), len(image_refs)) ROUGE-L F relevance, in memory (small inputs)."""
    texts = list(captions) + [t for refs in image_refs for t in refs]
    ref_idx, k = [], len(captions)
    for refs in image_refs:
        ref_idx.append(list(range(k, k + len(refs))))
        k += len(refs)
    rl = RougeL(texts, np.arange(len(captions)), ref_idx)
    out = np.zeros(rl.shape, np.float32)
    for s in progress_bar(range(0, len(captions), block), progress, desc="ROUGE-L relevance"):
        out[s:s + block] = rl.rows(s, min(len(captions), s + block))
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


def add_relevance(store_path, split: str, methods=("rougeL",), spice_file: str = "", progress: bool = True,
                  sidecars=None, block: int = 512) -> None:
    """Compute (ROUGE-L, in resumable row blocks) or import (SPICE) the relevance of a split's
    captions to its images, each into its own sidecar of the store."""
    unknown = set(methods) - {"rougeL", "spice"}
    if unknown:
        raise StoreError(f"data.relevance: unknown method(s) {sorted(unknown)}; rougeL is computed, spice imported")
    with Store(store_path, check_values=False, sidecars=sidecars) as s:
        have = s.relevance_methods(split)
        imgs, caps = s.split_images(split), s.split_captions(split)
        if spice_file and "spice" not in have:
            write_relevance(store_path, split, {"spice": load_teran_relevance(spice_file, len(caps), len(imgs))},
                            home=s.home)
        if "rougeL" not in methods or "rougeL" in have:
            return
        pos = np.full(s.n_images, -1)
        pos[imgs] = np.arange(len(imgs))
        owner = pos[s.caption_image[caps]]  # each split caption's image position
        image_refs = [[] for _ in imgs]
        for c, j in enumerate(owner):
            image_refs[j].append(c)
        rl = RougeL(s.captions(caps), np.arange(len(caps)), image_refs)
        spec = {"relevance": (rl.shape, "float32")}
        with SidecarWriter(store_path, f"relevance-{split}-rougeL", spec, {"method": "rougeL", "block": block},
                           home=s.home, chunk_rows={"relevance": min(64, max(1, len(caps)))}) as w:
            bar = progress_bar(total=len(caps), initial=w.rows_done, desc="ROUGE-L relevance", unit="cap",
                       progress=progress)
            for start in range(w.rows_done, len(caps), block):
                stop = min(len(caps), start + block)
                w.write(start, {"relevance": rl.rows(start, stop)})
                bar.update(stop - start)
            bar.close()
