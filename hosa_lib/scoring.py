"""HOSA scoring: global, TERAN local (MrSw) and high-order (t-product reconstruction) scores.

Notation (docs/scoring.md states the score completely): an image has regions V (m, d), a caption has words T (l, d),
rows L2-normalised, padding masked. F = d//2 + 1 real-FFT bins, split into G contiguous
bands b(f) = floor(f*G/F). The band share of a region-word affinity is
    rho_rk(b) = (1/d) sum_{f in b} w_f Re(V_r(f) conj T_k(f)),   sum_b rho_rk(b) = <v_r, t_k>.
H_rk(f) = softmax_k(lambda * G * rho_rk(b(f))) and V~ = H * T (t-product). The fast form never
builds V~: with alpha_rk(b) the softmax and Gamma(b) the caption's per-band Gram matrix,
    <v_r, v~_r> = sum_b sum_k alpha_rk(b) rho_rk(b),
    |v~_r|^2    = sum_b alpha_r(b)^T Gamma(b) alpha_r(b).
The band shares of all pairs are one batched real matrix product over bands of
[Re, Im] * sqrt(w_f/d) features ("band features"), the FLOPs of TERAN's alignment matrix.

Score matrices are (images, captions), as TERAN's.
"""
from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as nnf

from . import fused
from .config import TERMS, ScoringConfig


@dataclass
class Side:
    """One side (images or captions) ready for scoring.

    glob: (N, d) normalised global vectors; local: (N, n, d) normalised, zero at padding;
    mask: (N, n) bool; bands: (G, N, n, 2P) band features or None; gram: (G, N, n, n) or None;
    cache: what a kernel derives from this side and may reuse while the side lives (the flash kernel's
    anchor layout when scoring without gradients; a slice starts empty).
    """
    glob: torch.Tensor
    local: torch.Tensor
    mask: torch.Tensor
    bands: torch.Tensor | None = None
    gram: torch.Tensor | None = None
    cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __len__(self) -> int:
        return self.local.shape[0]

    def slice(self, start: int, stop: int) -> "Side":
        return Side(self.glob[start:stop], self.local[start:stop], self.mask[start:stop],
                    None if self.bands is None else self.bands[:, start:stop],
                    None if self.gram is None else self.gram[:, start:stop])


CHECKS_ENV = "HOSA_CHECKS"  # =1: value checks on GPU tensors too (each one waits for the GPU)


def value_checks(x: torch.Tensor) -> bool:
    """Checks of tensor *values* (non-finite inputs, items without a valid position) and shortcuts that
    branch on them (an all-valid mask) run for CPU tensors. On a GPU each would stop the host until
    the GPU catches up (a sync per check, several per training step), so there they run only with
    HOSA_CHECKS=1; shapes are always checked, and masked_fill replaces the all-valid shortcut."""
    return x.device.type == "cpu" or os.environ.get(CHECKS_ENV) == "1"


def all_valid(mask: torch.Tensor) -> bool:
    """mask.all(), decided without a GPU sync: on a GPU assume padding (masking is then a no-op)."""
    return mask.device.type == "cpu" and bool(mask.all())


def check_tensor(name: str, x: torch.Tensor, dims: int) -> None:
    """Raise a clear error for a wrong rank or non-finite values in a scoring input."""
    if x.dim() != dims:
        raise ValueError(f"{name}: expected a {dims}-d tensor, got shape {tuple(x.shape)}")
    # the sum is finite unless a value is NaN/Inf (or the sum overflows): one read of x, where isfinite(x).all()
    # wrote a mask and read it again (~30x slower, ~3 % of a 100 x 500 scoring); then the exact test finds the index
    if x.is_floating_point() and value_checks(x) and not torch.isfinite(x.sum()) and not torch.isfinite(x).all():
        bad = (~torch.isfinite(x)).nonzero()[0].tolist()
        raise ValueError(f"{name}: non-finite value (NaN/Inf) at index {bad} of shape {tuple(x.shape)}")


@functools.lru_cache(maxsize=64)
def band_index_on(d: int, bands: int, device: torch.device) -> torch.Tensor:
    """band_index on a device, built once per (d, bands, device): no upload per training step."""
    return band_index(d, bands).to(device)


def band_index(d: int, bands: int) -> torch.Tensor:
    """(G, P) indices of the rFFT bins in each band; the pad value F points at an all-zero bin."""
    n_bins = d // 2 + 1
    if not 1 <= bands <= n_bins:
        raise ValueError(f"scoring.bands={bands}: must be between 1 and d//2+1={n_bins} for d={d}")
    owner = torch.arange(n_bins) * bands // n_bins  # b(f)
    size = int(torch.bincount(owner, minlength=bands).max())
    idx = torch.full((bands, size), n_bins, dtype=torch.long)
    for b in range(bands):  # G small, runs once per call
        members = (owner == b).nonzero().flatten()
        idx[b, : len(members)] = members
    return idx


def parseval_weights(d: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """w_f / d with w_f = 1 at DC (and Nyquist for even d), 2 elsewhere."""
    w = torch.full((d // 2 + 1,), 2.0, device=device, dtype=dtype)
    w[0] = 1.0
    if d % 2 == 0:
        w[-1] = 1.0
    return w / d


def band_features(x: torch.Tensor, bands: int) -> torch.Tensor:
    """x (..., n, d) real -> (G, ..., n, 2P) real, so that band dot products are rho(b). On CPU (float32/64)
    the gather after the FFT and its backward run in numba (`fused.band_features`, the same bits as
    `band_features_torch`, which runs elsewhere)."""
    d = x.shape[-1]
    idx = band_index_on(d, bands, x.device)
    weight = parseval_weights(d, x.device, x.dtype).sqrt()
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64):
        out = fused.band_features(x, idx, weight)
        if out is not None:
            return out
    return band_features_torch(x, idx, weight)


def band_features_torch(x: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """band_features in torch operations (the GPU's path, and the reference of the numba one): idx and
    weight from band_index and parseval_weights(...).sqrt()."""
    spec = torch.fft.rfft(x, dim=-1) * weight  # (..., n, F)
    spec = torch.cat([spec, torch.zeros_like(spec[..., :1])], dim=-1)  # pad bin
    gathered = spec[..., idx]  # (..., n, G, P) complex
    feats = torch.view_as_real(gathered).flatten(-2)  # (..., n, G, 2P)
    return feats.movedim(-2, 0).contiguous()


def make_side(glob: torch.Tensor, local: torch.Tensor, mask: torch.Tensor, cfg: ScoringConfig,
              name: str = "side", need_gram: bool = True) -> Side:
    """Normalise, validate and precompute band features (and Gram matrices) for one side.
    Every item needs a valid position, except under TERAN's padding rule (a caption of one word
    piece has no alignment words there and scores 0)."""
    check_tensor(f"{name}.glob", glob, 2)
    check_tensor(f"{name}.local", local, 3)
    if mask.shape != local.shape[:2]:
        raise ValueError(f"{name}.mask: shape {tuple(mask.shape)} does not match local {tuple(local.shape[:2])}")
    if glob.shape[0] != local.shape[0] or glob.shape[1] != local.shape[2]:
        raise ValueError(f"{name}: glob {tuple(glob.shape)} and local {tuple(local.shape)} disagree on N or d")
    mask = mask.bool()
    empty = (~mask.any(dim=1)).nonzero().flatten() if value_checks(mask) else ()
    if len(empty) and not (cfg.padding == "teran" and all(t.teran_empty for t in active_terms(cfg))):
        raise ValueError(f"{name}.mask: item(s) {empty[:5].tolist()} have no valid (unpadded) position")
    local = nnf.normalize(local, dim=-1) * mask.unsqueeze(-1)
    side = Side(nnf.normalize(glob, dim=-1), local, mask)
    if uses_bands(cfg):
        side.bands = band_features(local, cfg.bands)  # (G, N, n, 2P)
        if need_gram:
            side.gram = side.bands @ side.bands.transpose(-1, -2)  # (G, N, n, n)
    return side


def _check_pair(img: Side, cap: Side) -> None:
    if img.local.shape[-1] != cap.local.shape[-1]:
        raise ValueError(f"feature dims differ: images d={img.local.shape[-1]}, captions d={cap.local.shape[-1]}")


def mrsw(align: torch.Tensor, vmask: torch.Tensor, tmask: torch.Tensor, pool: str,
         padding: str = "ours") -> torch.Tensor:
    """TERAN local score. align (Nc, L, Ni, M) -> (Nc, Ni): max over regions, sum/mean over words.
    Padded regions: excluded from the max (ours) or alignments of 0 (TERAN's code)."""
    if not all_valid(vmask):
        align = align.masked_fill(~vmask[None, None], float("-inf") if padding == "ours" else 0.0)
    best = align.amax(dim=-1)  # (Nc, L, Ni)
    tm = tmask.to(best.dtype).unsqueeze(-1)
    s = (best * tm).sum(dim=1)  # (Nc, Ni)
    return s / tm.sum(dim=1).clamp_min(1) if pool == "mean" else s


class _HighOrderT2I(torch.autograd.Function):
    """s[c, i] = mean over valid regions r of <v_r, v~_r> / |v~_r| from the band shares rho.

    Hand-written backward because autograd's version of this chain keeps ~8 full-size
    intermediates and makes ~25 passes over (G, Nc, L, Ni, M); this one makes ~10, in place.
    With alpha = softmax_k(lambda G rho), num = sum alpha rho, N2 = sum alpha^T Gamma alpha,
    cos = num / sqrt(N2) and g = dL/dcos:
        u = g / |v~|, w = -g num / (2 |v~|^3), a_k = u rho_k + 2 w (Gamma alpha)_k
        dL/drho_k = u alpha_k + lambda G alpha_k (a_k - sum_j alpha_j a_j)
        dL/dGamma  = sum_{i,r} w alpha alpha^T.
    """

    @staticmethod
    def forward(ctx, rho, gram, cmask, vmask, scale, bias=None):
        # Big (G, Nc, L, Ni, M) buffers are few and reused: fresh large allocations page-fault on CPU.
        G, Nc, L, Ni, M = rho.shape
        alpha = rho * scale
        if bias is not None:  # scoring.condition: (Nc, L, Ni) logit offsets shared by bands and regions
            alpha.add_(bias[None, :, :, :, None])
        if not all_valid(cmask):
            alpha.masked_fill_(~cmask[None, :, :, None, None], float("-inf"))
        alpha.sub_(alpha.amax(dim=2, keepdim=True)).exp_()
        alpha.div_(alpha.sum(dim=2, keepdim=True))  # softmax over words
        tmp = torch.mul(alpha, rho)
        num = tmp.sum(dim=(0, 2))  # (Nc, Ni, M)
        beta = torch.bmm(gram.reshape(G * Nc, L, L), alpha.view(G * Nc, L, Ni * M)).view_as(alpha)
        norm = torch.mul(beta, alpha, out=tmp).sum(dim=(0, 2)).clamp_min(1e-12).sqrt()  # |v~_r|
        del tmp
        weight = vmask.to(rho.dtype) / vmask.sum(-1, keepdim=True)  # (Ni, M): mean over valid regions
        if any(ctx.needs_input_grad[:2]) or (bias is not None and ctx.needs_input_grad[5]):
            ctx.save_for_backward(rho, alpha, gram, num, norm, weight)
            ctx.scale, ctx.has_bias = scale, bias is not None
        return (num / norm * weight).sum(-1)

    @staticmethod
    def backward(ctx, grad):
        rho, alpha, gram, num, norm, weight = ctx.saved_tensors
        G, Nc, L, Ni, M = rho.shape
        g = grad[..., None] * weight  # dL/dcos_r, (Nc, Ni, M)
        u = (g / norm)[None, :, None]
        w = (-g * num / (2 * norm ** 3))[None, :, None]
        # beta = Gamma alpha is recomputed (one small bmm) into the buffer that becomes dL/dalpha
        a = torch.bmm(gram.reshape(G * Nc, L, L), alpha.view(G * Nc, L, Ni * M)).view_as(alpha)
        a.mul_(2 * w).addcmul_(rho, u)  # dL/dalpha
        tmp = torch.mul(alpha, a)
        a.sub_(tmp.sum(dim=2, keepdim=True)).mul_(alpha)  # softmax backward: dL/dlogits
        d_bias = a.sum(dim=(0, 4)) if ctx.has_bias else None
        d_rho = a.mul_(ctx.scale).addcmul_(alpha, u)
        aw = torch.mul(alpha, w, out=tmp).view(G * Nc, L, Ni * M)
        d_gram = torch.bmm(aw, alpha.view(G * Nc, L, Ni * M).transpose(1, 2)).view(G, Nc, L, L)
        return d_rho, d_gram, None, None, None, d_bias


def _reconstruct_t2i(rho, img: Side, cap: Side, scale: float, bias=None) -> torch.Tensor:
    """Image from caption. rho (G, Nc, L, Ni, M) -> mean_r cos(v_r, v~_r), (Nc, Ni).
    bias (Nc, L, Ni): logit offsets per word and image (scoring.condition)."""
    return _HighOrderT2I.apply(rho, cap.gram, cap.mask, img.mask, scale, bias)


def _reconstruct_i2t(rho, img: Side, cap: Side, scale: float, bias=None) -> torch.Tensor:
    """Caption from image. rho (G, Nc, L, Ni, M) -> mean_k cos(t_k, t~_k), (Nc, Ni).
    bias (Ni, M, Nc): logit offsets per region and caption (scoring.condition)."""
    logits = rho * scale
    if bias is not None:
        logits = logits + bias.permute(2, 0, 1)[None, :, None]  # (1, Nc, 1, Ni, M)
    if not all_valid(img.mask):
        logits = logits.masked_fill(~img.mask[None, None, None], float("-inf"))
    alpha = torch.softmax(logits, dim=4)  # over regions
    num = (alpha * rho).sum(dim=(0, 4))  # (Nc, L, Ni)
    beta = torch.einsum("gclir,girs->gclis", alpha, img.gram)
    norm = (beta * alpha).sum(dim=(0, 4)).clamp_min(1e-12).sqrt()
    tm = cap.mask.to(rho.dtype).unsqueeze(-1)
    return ((num / norm) * tm).sum(1) / tm.sum(1)


def _high_fused(img: Side, cap: Side, cfg: ScoringConfig, kernel: str,
                fold_local: bool = False) -> torch.Tensor | dict[str, torch.Tensor]:
    """The high-order term through a fused kernel (hosa_lib.fused): the band-share GEMM laid out
    per anchor (caption for t2i, image for i2t), everything after it in one kernel; with `flash`, the
    GEMM inside the kernel one tile at a time. (Ni, Nc). fold_local (flash, t2i or both): also TERAN's
    local score from the same band shares -> {"high", "local"}."""
    G, (Ni, M), (Nc, L) = img.bands.shape[0], img.mask.shape, cap.mask.shape
    scale = cfg.temperature * G
    mean_over = lambda m: m.to(img.bands.dtype) / m.sum(-1, keepdim=True)
    ib, cb = img.bands.reshape(G, Ni * M, -1), cap.bands.reshape(G, Nc * L, -1)  # query sides (G, Q, 2P)
    opts = lambda anchors: {}
    if kernel == "flash":  # the band shares are computed tile by tile inside the kernel, never whole
        from_bands = fused.reconstruct_flash
        opts = lambda anchors: {"cache": anchors.cache}  # the anchors' layout, reused by later chunks
    elif kernel == "triton":  # tiles in registers, forward and backward (too wide bands: rho materialised)
        from_bands = fused.reconstruct_triton_flash
    else:  # the band shares of the chunk materialised by one GEMM, then the fused kernel
        def from_bands(abands, qbands, gram, amask, weight, scale):
            rho = torch.matmul(abands.flatten(1, 2), qbands.transpose(1, 2)).view(*abands.shape[:3], -1)
            return fused.reconstruct(rho, gram, amask, weight, scale, kernel)
    parts, local = [], None
    if cfg.direction in ("t2i", "both"):
        if fold_local:  # TERAN's local score from the same tiles
            qvalid = torch.ones_like(img.mask) if cfg.padding == "teran" else img.mask
            high, local = fused.flash_with_local(cap.bands, ib, cap.gram, cap.mask, mean_over(img.mask), scale,
                                                 qvalid, cfg.local_pool, cache=cap.cache)
            parts.append(high.T)
        else:
            parts.append(from_bands(cap.bands, ib, cap.gram, cap.mask, mean_over(img.mask), scale, **opts(cap)).T)
    if cfg.direction in ("i2t", "both"):
        parts.append(from_bands(img.bands, cb, img.gram, img.mask, mean_over(cap.mask), scale, **opts(img)))
    high = sum(parts) / len(parts)
    return high if local is None else {"high": high, "local": local.T}


# ----------------------------------------------------------------------------- the scoring terms
def _global_term(img: Side, cap: Side, cfg: ScoringConfig) -> torch.Tensor:
    return img.glob @ cap.glob.T


def _local_term(img: Side, cap: Side, cfg: ScoringConfig) -> torch.Tensor:
    # one more d-wide matmul is cheaper than summing the G band shares
    (Ni, M), (Nc, L), d = img.mask.shape, cap.mask.shape, img.local.shape[-1]
    align = (cap.local.reshape(Nc * L, d) @ img.local.reshape(Ni * M, d).T).view(Nc, L, Ni, M)
    return mrsw(align, img.mask, cap.mask, cfg.local_pool, cfg.padding).T


def _high_term(img: Side, cap: Side, cfg: ScoringConfig) -> torch.Tensor:
    kernel = fused.resolve(cfg.kernel, img.local.device, eager_only="scoring.condition" if cfg.condition else None)
    anchors = {"t2i": cap.mask.shape[1], "i2t": img.mask.shape[1], "both": max(img.mask.shape[1], cap.mask.shape[1])}
    kernel = fused.fits(kernel, anchors[cfg.direction])
    if kernel != "torch":
        fold = kernel == "flash" and cfg.w_local != 0 and cfg.direction != "i2t"
        return _high_fused(img, cap, cfg, kernel, fold)
    G, (Ni, M), (Nc, L) = img.bands.shape[0], img.mask.shape, cap.mask.shape
    rho = torch.matmul(cap.bands.reshape(G, Nc * L, -1),
                       img.bands.reshape(G, Ni * M, -1).transpose(1, 2)).view(G, Nc, L, Ni, M)
    scale = cfg.temperature * G  # lambda * G
    parts = []
    if cfg.direction in ("t2i", "both"):  # condition: each word's cosine with the image's global vector
        bias = cfg.temperature * torch.einsum("cld,id->cli", cap.local, img.glob) if cfg.condition else None
        parts.append(_reconstruct_t2i(rho, img, cap, scale, bias))
    if cfg.direction in ("i2t", "both"):  # condition: each region's cosine with the caption's global vector
        bias = cfg.temperature * torch.einsum("imd,cd->imc", img.local, cap.glob) if cfg.condition else None
        parts.append(_reconstruct_i2t(rho, img, cap, scale, bias))
    return (sum(parts) / len(parts)).T


@dataclass(frozen=True)
class Term:
    """One term of the pair score. Everything else reads SCORING_TERMS: `pair_scores` and its total,
    the model's learned gates, the explorer's weight sliders, the TERAN import (which keeps only
    TERAN's terms) and the ablation summary. A new term is one entry here, its weight field in
    `ScoringConfig`, and its explicit per-pair form in `hosa_lib.reference` (a test fails without it)."""
    name: str                 # key in score dicts
    weight: str               # its weight field in ScoringConfig (0 = not computed)
    label: str                # what it is, for sliders and reports
    gate: int | None          # index of its learned gate under scoring.gates; None = never gated (under gates
                              # an ungated term is the anchor the gated ones are added to: check_gates)
    teran: bool               # part of TERAN's own score
    compute: Callable[[Side, Side, ScoringConfig], torch.Tensor]  # all pairs of two sides: (Ni, Nc), or a
                              # dict of it and terms later in SCORING_TERMS computed on the way (not computed again)
    bands: bool = False       # needs both sides' band features (and Gram matrices): make_side, side_bytes
    per_pair: Callable[[ScoringConfig, torch.device], int] = lambda cfg, device: 1  # elements of its largest
                              # chunk tensor per (region, word) pair on `device`: chunk_sizes keeps (pairs x the
                              # largest active one) bounded
    teran_empty: bool = True  # scores an item without valid positions under TERAN's padding rule (as 0)


# Chunk elements per region-word pair under the flash kernel, which holds no chunk tensor of G values per
# pair: chunks 4x larger than numba's at G = 16. Measured at 100 x 500 (bench_scoring's sizes): factor 1
# (the largest chunks) scored ~10 % faster but peaked 281-334 MiB, above numba's 220-227; 4 peaks 213-218.
FLASH_PER_PAIR = 4


def _tiles_band_shares(cfg: ScoringConfig, device) -> bool:
    """Whether the high-order term runs in the flash kernel on `device`, which never holds the band shares
    of a whole chunk (G per region-word pair) but one tile of them."""
    eager_only = "scoring.condition" if cfg.condition else None
    return fused.resolve(cfg.kernel, torch.device(device), eager_only) == "flash"


# The order is the order `total` adds the terms in (floating-point addition is not associative, so a
# reordering would change totals, and trained weights, in the last bit).
SCORING_TERMS = (
    Term("global", "w_global", "global: image vector · caption vector", None, False, _global_term),
    Term("high", "w_high", "high-order: t-product reconstruction of the regions", 1, False, _high_term,
         bands=True, per_pair=lambda cfg, device: min(cfg.bands, FLASH_PER_PAIR) if _tiles_band_shares(cfg, device)
         else cfg.bands,
         teran_empty=False),
    Term("local", "w_local", "local: TERAN's region-word MrSw", 0, True, _local_term),
)
for _t in SCORING_TERMS:  # config.TERMS: what config (check_gates) and ablation grids (`only:`) check names against
    TERMS.register(_t.name)(_t)
N_GATES = 1 + max(t.gate for t in SCORING_TERMS if t.gate is not None)


def active_terms(cfg: ScoringConfig) -> list[Term]:
    """The terms `cfg` computes (non-zero weight), in SCORING_TERMS order."""
    return [t for t in SCORING_TERMS if getattr(cfg, t.weight) != 0]


def uses_bands(cfg: ScoringConfig) -> bool:
    """Whether some term `cfg` computes needs the band features."""
    return any(t.bands for t in active_terms(cfg))


def term_weights(cfg: ScoringConfig) -> dict[str, float]:
    """{term name: its weight in cfg}."""
    return {t.name: getattr(cfg, t.weight) for t in SCORING_TERMS}


def gated_weights(cfg: ScoringConfig, gates) -> dict[str, object]:
    """The weights with each gated term's weight times its gate (`gates` indexable: a tensor keeps the
    result differentiable, a list of floats folds learned gates into plain weights)."""
    return {t.name: getattr(cfg, t.weight) if t.gate is None else getattr(cfg, t.weight) * gates[t.gate]
            for t in SCORING_TERMS}


def gated_terms() -> list[Term]:
    """The gated terms in gate order (the learned gate vector's layout)."""
    return sorted((t for t in SCORING_TERMS if t.gate is not None), key=lambda t: t.gate)


def teran_only() -> dict[str, float]:
    """Scoring overrides that switch off every term TERAN does not have (the TERAN import)."""
    return {t.weight: 0.0 for t in SCORING_TERMS if not t.teran}


def pair_scores(img: Side, cap: Side, cfg: ScoringConfig,
                weights: dict[str, float | torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """All (image, caption) pair scores of two sides: dict of (Ni, Nc) tensors, terms and 'total'.

    Terms whose weight in cfg is 0 are not computed. `weights` ({term name: weight}) replaces
    cfg's weights in 'total' only; tensors are allowed (the model's learnable term gates).
    Differentiable; used for the B x B training matrix and, through `score_all_pairs`, for chunked
    evaluation.
    """
    _check_pair(img, cap)
    own = term_weights(cfg)
    out = {}
    for t in SCORING_TERMS:
        if own[t.name] != 0 and t.name not in out:
            got = t.compute(img, cap, cfg)  # a dict: the term and others from the same work (flash: local)
            out.update(got if isinstance(got, dict) else {t.name: got})
    weights = weights or own
    out["total"] = sum(weights[k] * v for k, v in out.items())
    return out


@torch.no_grad()
def attention_maps(v: torch.Tensor, t: torch.Tensor, cfg: ScoringConfig) -> dict[str, torch.Tensor]:
    """One pair, for display: v (m, d) regions, t (l, d) words (unpadded). Returns 'cosine' (m, l)
    and the high-order coefficients of each direction the config scores: 't2i' (G, m, l), each
    region's softmax over words, and/or 'i2t' (G, m, l), each word's softmax over regions."""
    v, t = nnf.normalize(v.float(), dim=-1), nnf.normalize(t.float(), dim=-1)
    out = {"cosine": v @ t.T}
    rho = band_features(v, cfg.bands) @ band_features(t, cfg.bands).transpose(-1, -2)  # (G, m, l)
    scale = cfg.temperature * cfg.bands
    if cfg.direction in ("t2i", "both"):
        out["t2i"] = torch.softmax(scale * rho, dim=-1)
    if cfg.direction in ("i2t", "both"):
        out["i2t"] = torch.softmax(scale * rho, dim=-2)
    return out


def chunk_sizes(n_img: int, n_cap: int, m: int, l: int, cfg: ScoringConfig, max_elems: int,
                device="cpu") -> tuple[int, int]:
    """Image and caption chunk sizes so that the largest chunk tensor (e.g. the band shares, (G, Cc, L, Ci, M),
    of the fused kernels after the GEMM) stays under max_elems."""
    per_pair = m * l * max([1] + [t.per_pair(cfg, device) for t in active_terms(cfg)])
    pairs = max(1, max_elems // per_pair)
    cc = max(1, min(n_cap, int(math.sqrt(pairs) * 2)))
    ci = max(1, min(n_img, pairs // cc))
    return ci, cc


def side_bytes(n: int, m: int, d: int, cfg: ScoringConfig, need_gram: bool) -> int:
    """float32 bytes of a prepared side of n items x m positions (make_side: vectors, band features, Gram)."""
    per = m * d + d + m
    if uses_bands(cfg):
        per += m * (d + 2 * cfg.bands + 2) + (cfg.bands * m * m if need_gram else 0)
    return 4 * n * per


def memory_budget(device: torch.device) -> tuple[int, int]:
    """(bytes for the image side kept whole, elements per scoring chunk) on `device`: on a GPU from
    its free memory now (a quarter for the image side; chunk tensors sized so that ~8 of them use
    another half), on the CPU 1 GiB and 0 (the caller's eval.max_elems stands)."""
    if device.type != "cuda":
        return 1 << 30, 0
    free, _ = torch.cuda.mem_get_info(device)
    return free // 4, free // 2 // (8 * 4)


@torch.no_grad()
def score_all_pairs(img: dict, cap: dict, cfg: ScoringConfig, max_elems: int = 1 << 22,
                    terms: tuple[str, ...] = ("total",), device: str | torch.device = "cpu",
                    progress: bool = False) -> dict[str, torch.Tensor]:
    """Score every image against every caption, chunked so peak memory is bounded.

    img / cap: dicts with 'glob' (N, d), 'local' (N, n, d), 'mask' (N, n) on any device and dtype
    (float16 in CPU memory is fine; chunks move to `device` as float32). `cap` may also be a list
    of such dicts with an 'index' entry (their columns), e.g. captions bucketed by length so that
    short captions are not padded to the longest. Returns (N_img, N_cap) float32 CPU tensors.

    The image side is uploaded and transformed (band features, Gram matrices) once when it fits
    `memory_budget`, else once per caption chunk; on a GPU chunks grow to its free memory
    (max_elems is then a lower bound).
    """
    from tqdm import tqdm  # plain tqdm: widget bars render blank in offline HTML

    device = torch.device(device)
    blocks = cap if isinstance(cap, list) else [dict(cap, index=torch.arange(len(cap["mask"])))]
    n_img, m = img["mask"].shape
    n_cap = sum(len(b["index"]) for b in blocks)
    out = {t: torch.empty(n_img, n_cap) for t in terms}
    take = lambda side, k, a, b: side[k][a:b].to(device, torch.float32 if k != "mask" else torch.bool)
    side_budget, gpu_elems = memory_budget(device)
    max_elems = max(max_elems, gpu_elems)
    whole = None  # the image side prepared once
    if side_bytes(n_img, m, img["local"].shape[-1], cfg, cfg.direction != "t2i") <= side_budget:
        whole = make_side(*(take(img, k, 0, n_img) for k in ("glob", "local", "mask")), cfg, name="images",
                          need_gram=cfg.direction != "t2i")
    steps = []
    for blk in blocks:
        ci, cc = chunk_sizes(n_img, len(blk["index"]), m, blk["mask"].shape[1], cfg, max_elems, device)
        steps += [(blk, c0, cc, i0, ci) for c0 in range(0, len(blk["index"]), cc) for i0 in range(0, n_img, ci)]
    cap_side = None
    for blk, c0, cc, i0, ci in tqdm(steps, desc="scoring", disable=not progress, mininterval=2):
        if i0 == 0:  # new caption chunk: band features and Gram once per chunk
            cap_side = make_side(*(take(blk, k, c0, c0 + cc) for k in ("glob", "local", "mask")),
                                 cfg, name="captions", need_gram=cfg.direction != "i2t")
        img_side = whole.slice(i0, i0 + ci) if whole is not None else make_side(
            *(take(img, k, i0, i0 + ci) for k in ("glob", "local", "mask")), cfg, name="images",
            need_gram=cfg.direction != "t2i")
        res = pair_scores(img_side, cap_side, cfg)
        cols = blk["index"][c0:c0 + cc]
        for t in terms:
            out[t][i0:i0 + ci, cols] = res[t].float().cpu()
    return out
