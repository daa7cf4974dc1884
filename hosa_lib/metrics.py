"""Retrieval metrics: pure functions of a score matrix (images x captions) and the explicit
caption -> image index (any number of captions per image). TERAN's definitions:
R@K in percent, median/mean rank 1-based, rsum = sum of the six recalls, NDCG@25 with gains
2^rel - 1 and log2(rank + 1) discounts against the ideal ordering of the relevance row.

Ties (`eval.ties`), i.e. items scoring within TIE_ULPS float32 ulps of the correct one (identical
captions or duplicate images encoded in different batches differ by an ulp or two):
- fair (default): the expected metric when tied items are put in a uniformly random order — the
  correct item neither wins nor loses a tie it cannot be told apart in. R@K is the probability that
  the first correct item lands in the top K; ranks are expected ranks. Deterministic (no sampling).
- teran: TERAN's evaluation.py: exact float comparisons, items ordered by numpy's default
  `argsort(scores)[::-1]` per query (exact ties as that sort leaves them: not index order in general);
  i2t NDCG averaged over queries whose NDCG is not 0. For TERAN imports and reproductions (TERAN's padding makes exact-zero scores common).
- optimistic: every tie in the correct item's favour (this workbench's rule before `eval.ties`).
Untied scores give the same numbers under all three.
"""
from __future__ import annotations

import numpy as np

from .config import TIES

RSUM_KS = (1, 5, 10)  # rsum = R@1 + R@5 + R@10 in both directions (TERAN's definition); model selection,
                      # early stopping and every comparison use it. Not a place to add a recall.
REPORTED_KS = (1, 5, 10)  # the recalls reports show (evaluation table, training plot, summaries, index):
                          # add 20 here and R@20 appears everywhere while rsum stays the same


def recall_ks() -> tuple[int, ...]:
    """Every K a metric dict carries a recall for (the reported ones and rsum's)."""
    return tuple(sorted(set(RSUM_KS) | set(REPORTED_KS)))


def reported_recalls() -> tuple[str, ...]:
    """The reported recall keys, i2t then t2i ("i2t_r1", ...), read when called (so a K added to
    REPORTED_KS counts everywhere)."""
    return tuple(f"{d}_r{k}" for d in DIRECTIONS for k in REPORTED_KS)


TIE_ULPS = 4  # scores closer than this many float32 ulps (of the largest |score|) are ties
BLOCK = 1 << 22  # score entries compared per step (32 MiB as float64): a COCO 5K matrix is never copied whole


def _tolerance(scores: np.ndarray) -> float:
    top = max(float(np.max(scores, initial=0.0)), -float(np.min(scores, initial=0.0)))
    return TIE_ULPS * float(np.finfo(np.float32).eps) * max(1.0, top)


def _check(scores: np.ndarray, cap_img: np.ndarray) -> None:
    n_img, n_cap = scores.shape
    if cap_img.shape != (n_cap,) or cap_img.min() < 0 or cap_img.max() >= n_img:
        raise ValueError(f"cap_img must index {n_img} images for {n_cap} captions")
    if len(np.unique(cap_img)) != n_img:
        raise ValueError(f"{n_img - len(np.unique(cap_img))} image(s) have no caption")


def tie_counts(scores: np.ndarray, cap_img: np.ndarray):
    """Per query, with float32-noise ties: (above, tied, own) for i2t (image queries) and for t2i.
    above: items scoring more than the tolerance above the best correct item; tied: other (wrong) items
    within the tolerance of it; own: correct items within the tolerance (>= 1; several for an image
    whose captions tie). Compared in float64 in blocks, without a float64 copy of the matrix."""
    scores = np.asarray(scores)
    _check(scores, cap_img)
    n_img, n_cap = scores.shape
    tol = _tolerance(scores)
    own = scores[cap_img, np.arange(n_cap)].astype(np.float64)  # (n_cap,) score of each caption with its image
    t_above, t_near = np.empty(n_cap, np.int64), np.empty(n_cap, np.int64)
    step = max(1, BLOCK // max(n_img, 1))
    for c in range(0, n_cap, step):
        blk, ref = scores[:, c:c + step], own[None, c:c + step]
        t_above[c:c + step] = (blk > ref + tol).sum(0)
        t_near[c:c + step] = (blk >= ref - tol).sum(0) - t_above[c:c + step]  # includes the own image
    best = np.full(n_img, -np.inf)
    np.maximum.at(best, cap_img, own)
    i_own = np.bincount(cap_img, weights=own >= best[cap_img] - tol, minlength=n_img).astype(np.int64)
    i_above, i_near = np.empty(n_img, np.int64), np.empty(n_img, np.int64)
    step = max(1, BLOCK // max(n_cap, 1))
    for i in range(0, n_img, step):
        blk, ref = scores[i:i + step], best[i:i + step, None]
        i_above[i:i + step] = (blk > ref + tol).sum(1)
        i_near[i:i + step] = (blk >= ref - tol).sum(1) - i_above[i:i + step]
    return (i_above, i_near - i_own, i_own), (t_above, t_near - 1, np.ones(n_cap, np.int64))


def teran_ranks(scores: np.ndarray, cap_img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """0-based ranks as TERAN's evaluation.py computes them: each query's items ordered by
    `numpy.argsort(row)[::-1]` (numpy's default sort, as TERAN calls it), the rank the position of the
    correct item; i2t takes the best-placed own caption. Exact ties are ordered as that sort leaves
    them, which depends on numpy's version and CPU (TERAN pins numpy 1.17.4); this calls the installed
    numpy's argsort on the same rows, float32 as TERAN's matrices are, so it matches TERAN run here."""
    scores = np.asarray(scores)
    _check(scores, cap_img)
    n_img, n_cap = scores.shape
    t2i = np.empty(n_cap, np.int64)
    step = max(1, BLOCK // max(n_img, 1))
    for c in range(0, n_cap, step):  # a block of caption queries: their rows of scores.T
        order = np.argsort(np.ascontiguousarray(scores[:, c:c + step].T), axis=1)[:, ::-1]
        t2i[c:c + step] = np.argmax(order == cap_img[c:c + step, None], axis=1)
    cap_rank = np.empty(n_cap, np.int64)  # each caption's position in its own image's caption ranking
    step = max(1, BLOCK // max(n_cap, 1))
    for i in range(0, n_img, step):
        order = np.argsort(scores[i:i + step], axis=1)[:, ::-1]
        pos = np.empty_like(order)
        np.put_along_axis(pos, order, np.arange(n_cap)[None].repeat(len(order), 0), axis=1)
        mine = np.nonzero((cap_img >= i) & (cap_img < i + step))[0]
        cap_rank[mine] = pos[cap_img[mine] - i, mine]
    i2t = np.full(n_img, np.iinfo(np.int64).max)
    np.minimum.at(i2t, cap_img, cap_rank)
    return i2t, t2i


def ranks(scores: np.ndarray, cap_img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """0-based rank of the first correct item with every float32-noise tie in its favour (the
    optimistic rule). i2t: per image, best-ranked own caption; t2i: per caption, its image."""
    (i_above, _, _), (t_above, _, _) = tie_counts(scores, cap_img)
    return i_above, t_above


def _fair_recall(above: np.ndarray, tied: np.ndarray, own: np.ndarray, k: int) -> np.ndarray:
    """P(first correct item within the top k) when the `tied` wrong and `own` correct items that tie
    are shuffled uniformly: 1 - C(tied, j) / C(tied + own, j) with j = k - above places left."""
    j = k - above
    p_all_wrong = np.ones(len(above))
    for i in range(k):  # product over the j first places of P(place i holds a wrong item)
        take = (i < j) & (i <= tied)  # at i = tied the factor is 0: the product is settled
        p_all_wrong[take] *= (tied[take] - i) / (tied[take] + own[take] - i)
    return np.where(j <= 0, 0.0, 1.0 - p_all_wrong)


@TIES.register("fair")
def _fair_hits(scores: np.ndarray, cap_img: np.ndarray, ks) -> list:
    """Per direction (expected rank, [P(hit in the top K) for K in ks]): wrong tied items ahead of the
    first correct one average tied / (own + 1)."""
    return [(above + tied / (own + 1), [_fair_recall(above, tied, own, k) for k in ks])
            for above, tied, own in tie_counts(scores, cap_img)]


@TIES.register("optimistic")
def _optimistic_hits(scores: np.ndarray, cap_img: np.ndarray, ks) -> list:
    return [(above, [(above < k).astype(float) for k in ks]) for above, _, _ in tie_counts(scores, cap_img)]


@TIES.register("teran")
def _teran_hits(scores: np.ndarray, cap_img: np.ndarray, ks) -> list:
    return [(r, [(r < k).astype(float) for k in ks]) for r in teran_ranks(scores, cap_img)]


def recall_metrics(scores: np.ndarray, cap_img: np.ndarray, ties: str = "fair") -> dict[str, float]:
    """R@K for every K of `recall_ks()`, median and mean rank in both directions, and rsum, under the
    tie rule `ties` (a name in config.TIES)."""
    out, ks = {}, recall_ks()
    per_dir = TIES.impl(ties)(scores, cap_img, ks)
    for name, (r, hits) in zip(("i2t", "t2i"), per_dir):
        for k, h in zip(ks, hits):
            out[f"{name}_r{k}"] = 100.0 * float(h.mean())
        out[f"{name}_medr"] = float(np.floor(np.median(r)) + 1)
        out[f"{name}_meanr"] = float(r.mean() + 1)
    out["rsum"] = sum(out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in RSUM_KS)
    return out


def ndcg_at_k(scores: np.ndarray, relevance: np.ndarray, k: int = 25, ties: str = "fair") -> dict[str, float]:
    """relevance (captions, images). i2t: image queries rank captions; t2i: caption queries rank images.
    Also 'i2t_nonzero': the i2t mean over queries with NDCG > 0 (TERAN's i2t average, its i2t value
    under ties='teran', where items are ordered as TERAN orders them)."""
    TIES.impl(ties)  # a ConfigError naming the choices for an unknown rule
    if relevance.shape != scores.T.shape:
        raise ValueError(f"relevance shape {relevance.shape}, expected (captions, images) = {scores.T.shape}")
    i2t = _ndcg_rows(scores, relevance.T, k, ties == "teran")
    t2i = _ndcg_rows(scores.T, relevance, k, ties == "teran")
    nz = float(i2t[i2t != 0].mean()) if (i2t != 0).any() else 0.0
    return {"i2t": nz if ties == "teran" else float(i2t.mean()), "t2i": float(t2i.mean()), "i2t_nonzero": nz}


def _ndcg_rows(scores: np.ndarray, rel: np.ndarray, k: int, teran_order: bool = False) -> np.ndarray:
    """NDCG@k of each row of `scores` (queries) against `rel`, in blocks of rows. Items are ranked by
    score, exact ties in index order (with teran_order: as numpy's default argsort leaves them, TERAN's call)."""
    k = min(k, scores.shape[1])
    disc = 1.0 / np.log2(np.arange(k) + 2)
    out, step = np.empty(scores.shape[0]), max(1, BLOCK // max(scores.shape[1], 1))
    for r in range(0, scores.shape[0], step):
        s, g = np.asarray(scores[r:r + step], np.float64), np.asarray(rel[r:r + step], np.float64)
        top = (np.argsort(np.asarray(scores[r:r + step]), axis=1)[:, ::-1] if teran_order  # TERAN's call
               else np.argsort(-s, axis=1, kind="stable"))[:, :k]
        dcg = ((2.0 ** np.take_along_axis(g, top, 1) - 1) * disc).sum(1)
        ideal = ((2.0 ** np.sort(g, axis=1)[:, ::-1][:, :k] - 1) * disc).sum(1)
        out[r:r + step] = np.where(ideal > 0, dcg / np.where(ideal > 0, ideal, 1), 0.0)
    return out


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
                    relevance: dict[str, np.ndarray] | None = None, k: int = 25, ties: str = "fair") -> dict[str, float]:
    """Metrics of a protocol, averaged over its folds (the 5-fold mean for coco_1k, as TERAN's
    `--size 1k`). scores/cap_img/relevance cover the whole split. `ties`: see the module docstring."""
    per_fold = []
    for imgs in folds(scores.shape[0], protocol):
        caps = np.nonzero(np.isin(cap_img, imgs))[0]
        remap = np.full(scores.shape[0], -1)
        remap[imgs] = np.arange(len(imgs))
        whole = len(imgs) == scores.shape[0] and len(caps) == scores.shape[1]  # one fold: no copy
        sub = scores if whole else scores[np.ix_(imgs, caps)]
        m = recall_metrics(sub, remap[cap_img[caps]], ties)
        for name, rel in (relevance or {}).items():
            nd = ndcg_at_k(sub, rel if whole else rel[np.ix_(caps, imgs)], k, ties)
            m[f"i2t_ndcg_{name}"], m[f"t2i_ndcg_{name}"] = nd["i2t"], nd["t2i"]
            m[f"i2t_nonzero_ndcg_{name}"] = nd["i2t_nonzero"]
        per_fold.append(m)
    return {key: float(np.mean([m[key] for m in per_fold])) for key in per_fold[0]}


TWINS = {"swap_pairs": "swap_acc", "relation_pairs": "relation_acc"}  # store extra -> metric

# ----------------------------------------------------------------------------- report columns
# The one list of what reports show; evaluate, the ridge baseline, viz, ablations and the run index
# read it. A new metric in every report = its key in the metric dict + one entry here.
DIRECTIONS = {"i2t": "image → text", "t2i": "text → image"}
LABELS = {"rsum": "test rsum", "swap_acc": "attribute-swap accuracy (%)", "relation_acc": "relation-swap accuracy (%)",
          "steps_per_s": "training steps per second"}
CHANCE = {"swap_acc": 50.0, "relation_acc": 50.0}  # what guessing scores
HEADLINE = ("rsum", "i2t_r1", "t2i_r1", *TWINS.values())  # one number each per variant in summaries
PANELS = ("rsum", *TWINS.values(), "steps_per_s")  # the ablation figure's per-variant panels


def report_keys(m: dict) -> list[str]:
    """The keys of a metric dict a summary table shows, in order: recall@K both ways, rsum, NDCG
    (each relevance, both ways), twin accuracies; timings and per-protocol extras left out."""
    ndcg = [k for k in m if k.startswith(tuple(f"{d}_ndcg_" for d in DIRECTIONS))]
    return [k for k in (*reported_recalls(), "rsum", *ndcg, *TWINS.values()) if k in m]


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
