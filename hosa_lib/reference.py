"""Slow explicit references of the scoring terms, for tests: one pair at a time, float64, loops over
pairs, regions and words, the t-product built as a block-circulant matrix. Every term registered in
`hosa_lib.scoring.SCORING_TERMS` needs its entry in REFERENCES (tests/test_scoring.py checks it), and
every fast path (eager, numba, Triton, chunked) is tested against `pair_scores_reference`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as nnf

from .config import ScoringConfig
from .scoring import SCORING_TERMS, parseval_weights
from .tproduct import t_product_reference


def high_order_reference(v: torch.Tensor, t: torch.Tensor, bands: int, temperature: float,
                         direction: str = "t2i", glob: tuple | None = None) -> torch.Tensor:
    """One pair, explicit: builds H in the Fourier domain, goes back to tubes, and reconstructs
    with the block-circulant t-product. v (m, d), t (l, d) unpadded, any norm. Returns s_h.
    glob (image global, caption global) conditions H (scoring.condition): the softmax logits add
    lambda * cos(softmax-side position, global vector of the side being reconstructed)."""
    v = nnf.normalize(v.double(), dim=-1)
    t = nnf.normalize(t.double(), dim=-1)
    if direction == "both":
        return (high_order_reference(v, t, bands, temperature, "t2i", glob)
                + high_order_reference(v, t, bands, temperature, "i2t", glob)) / 2
    g = None if glob is None else nnf.normalize(glob[0 if direction == "t2i" else 1].double(), dim=-1)
    if direction == "i2t":
        v, t = t, v  # reconstruct the words from the regions
    d = v.shape[-1]
    n_bins = d // 2 + 1
    owner = torch.arange(n_bins) * bands // n_bins
    w = parseval_weights(d, dtype=torch.float64)
    cross = (torch.fft.rfft(v)[:, None, :] * torch.fft.rfft(t)[None, :, :].conj()).real * w  # (m, l, F)
    rho = torch.stack([cross[..., owner == b].sum(-1) for b in range(bands)], dim=-1)  # (m, l, G)
    logits = temperature * bands * rho
    if g is not None:
        logits = logits + temperature * (t @ g)[None, :, None]
    h_hat = torch.softmax(logits, dim=1)[..., owner]  # (m, l, F), softmax over words
    h = torch.fft.irfft(h_hat.to(torch.complex128), n=d)  # (m, l, d) real tubes
    v_rec = t_product_reference(h, t.unsqueeze(1))[:, 0, :]  # (m, d) = H * T
    return nnf.cosine_similarity(v, v_rec, dim=-1).mean()


def _global(v, t, gi, gc, cfg: ScoringConfig) -> torch.Tensor:
    return nnf.cosine_similarity(gi.double(), gc.double(), dim=0)


def _local(v, t, gi, gc, cfg: ScoringConfig) -> torch.Tensor:
    a = nnf.normalize(v, dim=-1) @ nnf.normalize(t, dim=-1).T  # (m, l)
    best = a.max(dim=0).values  # each word's best region
    return best.mean() if cfg.local_pool == "mean" else best.sum()


def _high(v, t, gi, gc, cfg: ScoringConfig) -> torch.Tensor:
    glob = (gi, gc) if cfg.condition else None
    return high_order_reference(v, t, cfg.bands, cfg.temperature, cfg.direction, glob)


# term name -> one pair's score from its unpadded regions v (m, d), words t (l, d) and global vectors
REFERENCES = {"global": _global, "local": _local, "high": _high}


def pair_scores_reference(img: dict, cap: dict, cfg: ScoringConfig) -> dict[str, torch.Tensor]:
    """Every registered term and 'total' by explicit loops over pairs (float64)."""
    missing = [t.name for t in SCORING_TERMS if t.name not in REFERENCES]
    if missing:
        raise NotImplementedError(f"scoring term(s) {missing} have no explicit reference in hosa_lib.reference")
    n_img, n_cap = img["mask"].shape[0], cap["mask"].shape[0]
    out = {k: torch.zeros(n_img, n_cap, dtype=torch.float64) for k in (*(t.name for t in SCORING_TERMS), "total")}
    for i in range(n_img):
        v = img["local"][i][img["mask"][i].bool()].double()
        for c in range(n_cap):
            t = cap["local"][c][cap["mask"][c].bool()].double()
            for term in SCORING_TERMS:
                out[term.name][i, c] = REFERENCES[term.name](v, t, img["glob"][i], cap["glob"][c], cfg)
    out["total"] = sum(getattr(cfg, t.weight) * out[t.name] for t in SCORING_TERMS)
    return out
