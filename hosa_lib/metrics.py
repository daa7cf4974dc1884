"""Retrieval metrics: pure functions of a score matrix (images x captions) and the explicit
caption -> image index (any number of captions per image). TERAN's definitions:
R@K in percent, median/mean rank 1-based, rsum = sum of the six recalls, NDCG@25 with gains
2^rel - 1 and log2(rank + 1) discounts against the ideal ordering of the relevance row.
"""
from __future__ import annotations

import numpy as np

KS = (1, 5, 10)


TIE_ULPS = 4  # scores closer than this many float32 ulps (of the largest |score|) are ties


BLOCK = 1 << 22  # score entries compared per step (32 MiB as float64): a COCO 5K matrix is never copied whole


def ranks(scores: np.ndarray, cap_img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """0-based rank of the first correct item. i2t: per image, best-ranked own caption; t2i: per caption, its image.

    An item counts as ranked above the correct one only if it scores higher by more than float32
    noise (TIE_ULPS ulps): identical captions (titles repeat in real folders) or duplicate images
    encoded in different batches differ by an ulp or two, and exact ties are not broken against the
    correct item — so whether a tie survives the arithmetic does not change the recalls.
    Compared in float64 in blocks of rows / columns, without a float64 copy of the matrix."""
    scores = np.asarray(scores)
    n_img, n_cap = scores.shape
    if cap_img.shape != (n_cap,) or cap_img.min() < 0 or cap_img.max() >= n_img:
        raise ValueError(f"cap_img must index {n_img} images for {n_cap} captions")
    top = max(float(np.max(scores, initial=0.0)), -float(np.min(scores, initial=0.0)))
    tol = TIE_ULPS * float(np.finfo(np.float32).eps) * max(1.0, top)
    own = scores[cap_img, np.arange(n_cap)].astype(np.float64)  # (n_cap,) score of each caption with its image
    t2i = np.empty(n_cap, np.int64)
    step = max(1, BLOCK // max(n_img, 1))
    for c in range(0, n_cap, step):  # images better than the true one
        t2i[c:c + step] = (scores[:, c:c + step] > own[None, c:c + step] + tol).sum(0)
    best_own = np.full(n_img, -np.inf)
    np.maximum.at(best_own, cap_img, own)
    has = np.isfinite(best_own)
    if not has.all():
        raise ValueError(f"{(~has).sum()} image(s) have no caption")
    i2t = np.empty(n_img, np.int64)
    step = max(1, BLOCK // max(n_cap, 1))
    for i in range(0, n_img, step):
        i2t[i:i + step] = (scores[i:i + step] > best_own[i:i + step, None] + tol).sum(1)
    return i2t, t2i


def recall_metrics(scores: np.ndarray, cap_img: np.ndarray) -> dict[str, float]:
    i2t, t2i = ranks(scores, cap_img)
    out = {}
    for name, r in (("i2t", i2t), ("t2i", t2i)):
        for k in KS:
            out[f"{name}_r{k}"] = 100.0 * float((r < k).mean())
        out[f"{name}_medr"] = float(np.floor(np.median(r)) + 1)
        out[f"{name}_meanr"] = float(r.mean() + 1)
    out["rsum"] = sum(out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in KS)
    return out


def ndcg_at_k(scores: np.ndarray, relevance: np.ndarray, k: int = 25) -> dict[str, float]:
    """relevance (captions, images). i2t: image queries rank captions; t2i: caption queries rank images."""
    if relevance.shape != scores.T.shape:
        raise ValueError(f"relevance shape {relevance.shape}, expected (captions, images) = {scores.T.shape}")
    return {"i2t": _ndcg_rows(scores, relevance.T, k), "t2i": _ndcg_rows(scores.T, relevance, k)}


def _ndcg_rows(scores: np.ndarray, rel: np.ndarray, k: int) -> float:
    """Mean NDCG@k of the rows of `scores` (queries) against `rel`, in blocks of rows: each block is
    ranked in float64 (stable: ties keep their order) like the whole matrix would be."""
    k = min(k, scores.shape[1])
    disc = 1.0 / np.log2(np.arange(k) + 2)
    total, step = 0.0, max(1, BLOCK // max(scores.shape[1], 1))
    for r in range(0, scores.shape[0], step):
        s, g = np.asarray(scores[r:r + step], np.float64), np.asarray(rel[r:r + step], np.float64)
        top = np.argsort(-s, axis=1, kind="stable")[:, :k]
        dcg = ((2.0 ** np.take_along_axis(g, top, 1) - 1) * disc).sum(1)
        ideal = ((2.0 ** np.sort(g, axis=1)[:, ::-1][:, :k] - 1) * disc).sum(1)
        total += float(np.where(ideal > 0, dcg / np.where(ideal > 0, ideal, 1), 0.0).sum())
    return total / scores.shape[0]


def folds(n_images: int, protocol: str) -> list[np.ndarray]:
    """Image index sets of a protocol over a test split in store order."""
    if protocol == "coco_1k":
        if n_images < 5000:
            raise ValueError(f"coco_1k needs 5000 test images, the split has {n_images} "
                             "(--protocol all evaluates a split of any size)")
        return [np.arange(f * 1000, (f + 1) * 1000) for f in range(5)]
    if protocol == "coco_5k" and n_images != 5000:
        raise ValueError(f"coco_5k needs 5000 test images, the split has {n_images} "
                         "(--protocol all evaluates a split of any size)")
    if protocol == "f30k_1k" and n_images != 1000:
        raise ValueError(f"f30k_1k needs 1000 test images, the split has {n_images} "
                         "(--protocol all evaluates a split of any size)")
    return [np.arange(n_images)]


def evaluate_scores(scores: np.ndarray, cap_img: np.ndarray, protocol: str = "all",
                    relevance: dict[str, np.ndarray] | None = None, k: int = 25) -> dict[str, float]:
    """Metrics of a protocol, averaged over its folds. scores/cap_img/relevance cover the whole split."""
    per_fold = []
    for imgs in folds(scores.shape[0], protocol):
        caps = np.nonzero(np.isin(cap_img, imgs))[0]
        remap = np.full(scores.shape[0], -1)
        remap[imgs] = np.arange(len(imgs))
        whole = len(imgs) == scores.shape[0] and len(caps) == scores.shape[1]  # one fold: no copy
        sub = scores if whole else scores[np.ix_(imgs, caps)]
        m = recall_metrics(sub, remap[cap_img[caps]])
        for name, rel in (relevance or {}).items():
            nd = ndcg_at_k(sub, rel if whole else rel[np.ix_(caps, imgs)], k)
            m[f"i2t_ndcg_{name}"], m[f"t2i_ndcg_{name}"] = nd["i2t"], nd["t2i"]
        per_fold.append(m)
    return {key: float(np.mean([m[key] for m in per_fold])) for key in per_fold[0]}


TWINS = {"swap_pairs": "swap_acc", "relation_pairs": "relation_acc"}  # store extra -> metric


def twin_accuracies(scores: np.ndarray, cap_img: np.ndarray, twins: dict | None) -> dict[str, float]:
    """{metric: accuracy} for each kind of twin pairs given (split positions), e.g. swap_acc."""
    return {TWINS[k]: swap_accuracy(scores, cap_img, p) for k, p in (twins or {}).items() if len(p)}


def swap_accuracy(scores: np.ndarray, cap_img: np.ndarray, pairs: np.ndarray) -> float:
    """Twins (a, b) (attribute- or relation-swapped): fraction of comparisons where a caption scores
    its own twin above the other (all captions of both twins). 50% = cannot tell them apart."""
    wins = []
    for a, b in np.asarray(pairs):
        for own, other in ((a, b), (b, a)):
            caps = np.nonzero(cap_img == own)[0]
            wins.extend((scores[own, caps] > scores[other, caps]).tolist())
    return 100.0 * float(np.mean(wins)) if wins else float("nan")
