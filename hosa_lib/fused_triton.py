"""Fused GPU kernels (Triton) for the high-order term; contract in `hosa_lib.fused`.

Forward: one program per (anchor a, block of BQ query positions) loops over the G bands with the (LP, BQ) tile
of band shares in registers (`flash_forward`, in scoring and in training, computes that tile itself from
the band features, so the band shares are never written): softmax over the anchor's positions, sum alpha*rho,
Gamma alpha as a small tl.dot, alpha^T Gamma alpha. Backward: one program per (band, anchor) walks the query
blocks, writes d_rho and accumulates d_gram = sum_q w alpha alpha^T without atomics, so results are
deterministic. The flash backward (`flash_backward`) recomputes the tiles from the band features instead: one
program per (band, anchor) accumulates the anchor side's gradient and d_gram, one per (band, query block) the
query side's, each in registers (no atomics). Inputs float32, bfloat16 or float64; accumulation in float32
(float64 for float64 inputs). Under TRITON_INTERPRET=1 the same kernels run on CPU tensors through numpy,
which is how CI tests them.

Launch settings follow the anchor length (`launch`): the (LP, BLOCK) tile must fit the registers of num_warps
warps and tl.dot's operands the shared memory of one block (sm_90: 232,448 B; sm_80: 166,912 B).
`benchmarks/triton_aot.py` (`make triton-aot`, no GPU needed) compiles every row of LAUNCH for sm_80 and sm_90
with the installed Triton and prints shared memory, registers and spills; its table is in README "GPU".
Anchors longer than MAX_L positions run in eager torch (`hosa_lib.fused`).
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

# LP (anchor positions, a power of two) -> (BLOCK query positions per tile, num_warps, num_stages).
# Chosen from the ahead-of-time table: no spills up to LP = 64, < 100 B at 128, shared memory well under
# sm_80's limit. The defaults (BLOCK 64, 4 warps, 3 stages) needed 233,472 B at LP = 128 (> sm_90's
# 232,448 B) and spilled 6.8 KB per thread at LP = 64.
LAUNCH = {16: (64, 4, 1), 32: (64, 8, 1), 64: (32, 8, 1), 128: (16, 16, 1)}
MAX_L = max(LAUNCH)


@triton.jit
def _softmax(x, kvalid, scale):
    """Softmax over the anchor's valid positions (axis 0) of scale * x, an (LP, BLOCK) tile."""
    logits = tl.where(kvalid[:, None], x * scale, float("-inf"))
    e = tl.exp(logits - tl.max(logits, 0)[None, :])
    return e / tl.sum(e, 0)[None, :]


@triton.jit
def _anchor_valid(amask_ptr, a, ks, L):
    """Which of positions ks (a power-of-two range) are valid positions of anchor a."""
    return (ks < L) & (tl.load(amask_ptr + a * L + ks, mask=ks < L, other=0) != 0)


@triton.jit
def _gram_tile(gram_ptr, ga, ks, kvalid, L, ACC: tl.constexpr):
    """Anchor ga's (LP, LP) Gram matrix of one band, zero outside its valid positions."""
    return tl.load(gram_ptr + ga * L * L + ks[:, None] * L + ks[None, :],
                   mask=kvalid[:, None] & kvalid[None, :], other=0.0).to(ACC)


@triton.jit
def _tile(amask_ptr, L, Q, LP: tl.constexpr, BLOCK: tl.constexpr):
    """This program's anchor a, its positions ks (valid: kvalid) and its block of queries qs (qvalid)."""
    a = tl.program_id(0).to(tl.int64)
    ks = tl.arange(0, LP)
    qs = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    kvalid = _anchor_valid(amask_ptr, a, ks, L)
    return a, ks, qs, kvalid, qs < Q


@triton.jit
def _softmax_tile(rho_ptr, base, ks, qs, kvalid, qvalid, Q, scale, ACC: tl.constexpr):
    x = tl.load(rho_ptr + base + ks[:, None] * Q + qs[None, :], mask=kvalid[:, None] & qvalid[None, :],
                other=0.0).to(ACC)
    return x, _softmax(x, kvalid, scale)


@triton.jit
def _contract(x, al, gram_ptr, ga, ks, kvalid, L, ACC: tl.constexpr):
    """(sum_k alpha_k rho_k, alpha^T Gamma alpha) per query position of one band's tile."""
    gm = _gram_tile(gram_ptr, ga, ks, kvalid, L, ACC)
    return tl.sum(al * x, 0), tl.sum(al * tl.dot(gm, al, input_precision="ieee"), 0)


@triton.jit
def _d_rho(x, al, gm, uu, ww, scale):
    """d_rho of one band's (LP, BLOCK) tile given u = dL/dnum and w = dL/dn2 per query position: with
    c_k = u rho_k + 2 w (Gamma alpha)_k, d_rho_k = alpha_k (u + scale (c_k - sum_j alpha_j c_j)); zero on
    invalid anchor positions (alpha = 0 there)."""
    c = uu[None, :] * x + 2.0 * ww[None, :] * tl.dot(gm, al, input_precision="ieee")
    tot = tl.sum(al * c, 0)
    return al * (uu[None, :] + scale * (c - tot[None, :]))


@triton.jit
def _forward_kernel(rho_ptr, gram_ptr, amask_ptr, num_ptr, n2_ptr, G, A, L, Q, scale,
                    LP: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr):
    a, ks, qs, kvalid, qvalid = _tile(amask_ptr, L, Q, LP, BLOCK)
    nu = tl.zeros([BLOCK], ACC)
    nn = tl.zeros([BLOCK], ACC)
    for g in range(G):
        ga = g * A + a
        x, al = _softmax_tile(rho_ptr, ga * L * Q, ks, qs, kvalid, qvalid, Q, scale, ACC)
        su, sn = _contract(x, al, gram_ptr, ga, ks, kvalid, L, ACC)
        nu += su
        nn += sn
    tl.store(num_ptr + a * Q + qs, nu, mask=qvalid)
    tl.store(n2_ptr + a * Q + qs, nn, mask=qvalid)


@triton.jit
def _backward_kernel(rho_ptr, gram_ptr, amask_ptr, u_ptr, w_ptr, drho_ptr, dgram_ptr, G, A, L, Q, scale,
                     LP: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr):
    ga = tl.program_id(0).to(tl.int64)
    a = ga % A
    ks = tl.arange(0, LP)
    kvalid = _anchor_valid(amask_ptr, a, ks, L)
    gm = _gram_tile(gram_ptr, ga, ks, kvalid, L, ACC)
    dg = tl.zeros([LP, LP], ACC)
    for q0 in range(0, Q, BLOCK):
        qs = q0 + tl.arange(0, BLOCK)
        qvalid = qs < Q
        x, al = _softmax_tile(rho_ptr, ga * L * Q, ks, qs, kvalid, qvalid, Q, scale, ACC)
        uu = tl.load(u_ptr + a * Q + qs, mask=qvalid, other=0.0).to(ACC)
        ww = tl.load(w_ptr + a * Q + qs, mask=qvalid, other=0.0).to(ACC)
        dr = _d_rho(x, al, gm, uu, ww, scale)
        tl.store(drho_ptr + ga * L * Q + ks[:, None] * Q + qs[None, :], dr.to(drho_ptr.dtype.element_ty),
                 mask=(ks < L)[:, None] & qvalid[None, :])
        dg += tl.dot(al * ww[None, :], tl.trans(al), input_precision="ieee")
    tl.store(dgram_ptr + ga * L * L + ks[:, None] * L + ks[None, :], dg.to(dgram_ptr.dtype.element_ty),
             mask=(ks < L)[:, None] & (ks < L)[None, :])


@triton.jit
def _flash_forward_kernel(ab_ptr, qb_ptr, gram_ptr, amask_ptr, num_ptr, n2_ptr, G, A, L, Q, P2, scale,
                          LP: tl.constexpr, BLOCK: tl.constexpr, KB: tl.constexpr, ACC: tl.constexpr):
    """`_forward_kernel` from the band features: the (LP, BLOCK) tile of band shares is computed in
    registers as (anchor bands) @ (query bands)^T over KB-wide slices of the 2P band coordinates, so
    rho is never written to memory (scoring without gradients)."""
    a, ks, qs, kvalid, qvalid = _tile(amask_ptr, L, Q, LP, BLOCK)
    ps = tl.arange(0, KB)
    nu = tl.zeros([BLOCK], ACC)
    nn = tl.zeros([BLOCK], ACC)
    for g in range(G):
        ga = g * A + a
        x = tl.zeros([LP, BLOCK], ACC)
        for p0 in range(0, P2, KB):
            pm = (p0 + ps) < P2
            at = tl.load(ab_ptr + (ga * L + ks[:, None]) * P2 + p0 + ps[None, :],
                         mask=kvalid[:, None] & pm[None, :], other=0.0).to(ACC)
            bt = tl.load(qb_ptr + (g * Q + qs[None, :]) * P2 + p0 + ps[:, None],
                         mask=pm[:, None] & qvalid[None, :], other=0.0).to(ACC)
            x += tl.dot(at, bt, input_precision="ieee")
        su, sn = _contract(x, _softmax(x, kvalid, scale), gram_ptr, ga, ks, kvalid, L, ACC)
        nu += su
        nn += sn
    tl.store(num_ptr + a * Q + qs, nu, mask=qvalid)
    tl.store(n2_ptr + a * Q + qs, nn, mask=qvalid)


@triton.jit
def _band_rows(ptr, base, rows, valid, P2, PP: tl.constexpr, ACC: tl.constexpr):
    """Rows `rows` (valid: `valid`) of a (., P2) band-feature matrix at ptr + base, zero-padded to PP columns."""
    ps = tl.arange(0, PP)
    return tl.load(ptr + (base + rows[:, None]) * P2 + ps[None, :], mask=valid[:, None] & (ps < P2)[None, :],
                   other=0.0).to(ACC)


@triton.jit
def _flash_tile_grad(at, bt, kvalid, gm, u_ptr, w_ptr, a, Q, qs, qvalid, scale, ACC: tl.constexpr):
    """Both flash backward passes' tile: the band shares of anchor rows `at` (LP, PP) against query rows `bt`
    (BLOCK, PP) recomputed as one tl.dot, their softmax alpha, w of the query positions and d_rho."""
    x = tl.dot(at, tl.trans(bt), input_precision="ieee")
    al = _softmax(x, kvalid, scale)
    uu = tl.load(u_ptr + a * Q + qs, mask=qvalid, other=0.0).to(ACC)
    ww = tl.load(w_ptr + a * Q + qs, mask=qvalid, other=0.0).to(ACC)
    return al, ww, _d_rho(x, al, gm, uu, ww, scale)


@triton.jit
def _flash_backward_anchor_kernel(ab_ptr, qb_ptr, gram_ptr, amask_ptr, u_ptr, w_ptr, dab_ptr, dgram_ptr, G, A, L, Q, P2,
                                  scale, LP: tl.constexpr, BLOCK: tl.constexpr, PP: tl.constexpr, ACC: tl.constexpr):
    """One program per (band g, anchor a): walks the query blocks, recomputing each (LP, BLOCK) tile of band
    shares from the band features (one tl.dot over the PP >= 2P padded band coordinates) and its softmax,
    and accumulates in registers d_ab[g, a] = sum d_rho @ qb (LP, PP) and d_gram[g, a] = sum_q w alpha
    alpha^T. Nothing of the size of rho is read or written; each output has one writer (no atomics)."""
    ga = tl.program_id(0).to(tl.int64)
    g, a = ga // A, ga % A
    ks = tl.arange(0, LP)
    kvalid = _anchor_valid(amask_ptr, a, ks, L)
    gm = _gram_tile(gram_ptr, ga, ks, kvalid, L, ACC)
    at = _band_rows(ab_ptr, ga * L, ks, kvalid, P2, PP, ACC)  # (LP, PP)
    dab = tl.zeros([LP, PP], ACC)
    dg = tl.zeros([LP, LP], ACC)
    for q0 in range(0, Q, BLOCK):
        qs = q0 + tl.arange(0, BLOCK)
        qvalid = qs < Q
        bt = _band_rows(qb_ptr, g * Q, qs, qvalid, P2, PP, ACC)  # (BLOCK, PP)
        al, ww, dr = _flash_tile_grad(at, bt, kvalid, gm, u_ptr, w_ptr, a, Q, qs, qvalid, scale, ACC)
        dab += tl.dot(dr, bt, input_precision="ieee")
        dg += tl.dot(al * ww[None, :], tl.trans(al), input_precision="ieee")
    ps = tl.arange(0, PP)
    tl.store(dab_ptr + (ga * L + ks[:, None]) * P2 + ps[None, :], dab.to(dab_ptr.dtype.element_ty),
             mask=(ks < L)[:, None] & (ps < P2)[None, :])
    tl.store(dgram_ptr + ga * L * L + ks[:, None] * L + ks[None, :], dg.to(dgram_ptr.dtype.element_ty),
             mask=(ks < L)[:, None] & (ks < L)[None, :])


@triton.jit
def _flash_backward_query_kernel(ab_ptr, qb_ptr, gram_ptr, amask_ptr, u_ptr, w_ptr, dqb_ptr, G, A, L, Q, P2, scale,
                                 LP: tl.constexpr, BLOCK: tl.constexpr, PP: tl.constexpr, ACC: tl.constexpr):
    """One program per (band g, block of BLOCK query positions): walks the anchors, recomputing each tile
    (as `_flash_backward_anchor_kernel` does) and accumulates d_qb[g, block] = sum_a d_rho^T @ ab[g, a]
    (BLOCK, PP) in registers: the query side's gradient without atomics, in a fixed order."""
    g = tl.program_id(0).to(tl.int64)
    qs = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    qvalid = qs < Q
    ks = tl.arange(0, LP)
    bt = _band_rows(qb_ptr, g * Q, qs, qvalid, P2, PP, ACC)  # (BLOCK, PP)
    dqb = tl.zeros([BLOCK, PP], ACC)
    for a in range(A):
        ga = g * A + a
        kvalid = _anchor_valid(amask_ptr, a, ks, L)
        gm = _gram_tile(gram_ptr, ga, ks, kvalid, L, ACC)
        at = _band_rows(ab_ptr, ga * L, ks, kvalid, P2, PP, ACC)  # (LP, PP)
        _, _, dr = _flash_tile_grad(at, bt, kvalid, gm, u_ptr, w_ptr, a, Q, qs, qvalid, scale, ACC)
        dqb += tl.dot(tl.trans(dr), at, input_precision="ieee")
    ps = tl.arange(0, PP)
    tl.store(dqb_ptr + (g * Q + qs[:, None]) * P2 + ps[None, :], dqb.to(dqb_ptr.dtype.element_ty),
             mask=qvalid[:, None] & (ps < P2)[None, :])


FLASH_KB = 16  # band coordinates per slice of the in-register product (tl.dot needs >= 16); 32 spilled
               # registers at LP 32 (sm_80, 8 B) and LP 128 (sm_90, 1,008 B) in `make triton-aot`, 16 spills nothing up to 64


def launch(L: int) -> dict:
    """Compile-time constants and launch options for anchors of L positions (L <= MAX_L)."""
    lp = max(16, triton.next_power_of_2(L))
    if lp not in LAUNCH:
        raise ValueError(f"fused_triton: anchors of {L} positions exceed MAX_L = {MAX_L}; use the eager kernel")
    block, warps, stages = LAUNCH[lp]
    return {"LP": lp, "BLOCK": block, "num_warps": warps, "num_stages": stages}


def _meta(rho: torch.Tensor) -> dict:
    return {**launch(rho.shape[2]), "ACC": tl.float64 if rho.dtype == torch.float64 else tl.float32}


def _on(t: torch.Tensor):
    """Launch on the tensors' GPU, not the current one (train.device: cuda:1 in one process)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def forward(rho, gram, amask, scale):
    G, A, L, Q = rho.shape
    acc = torch.float64 if rho.dtype == torch.float64 else torch.float32
    num = torch.empty(A, Q, device=rho.device, dtype=acc)
    n2 = torch.empty_like(num)
    meta = _meta(rho)
    with _on(rho):
        _forward_kernel[(A, triton.cdiv(Q, meta["BLOCK"]))](rho, gram, amask.to(torch.int8), num, n2, G, A, L, Q,
                                                            float(scale), **meta)
    return num, n2


def backward(rho, gram, amask, u, w, scale):
    G, A, L, Q = rho.shape
    d_rho, d_gram = torch.empty_like(rho), torch.empty_like(gram)
    with _on(rho):
        _backward_kernel[(G * A,)](rho, gram, amask.to(torch.int8), u.contiguous(), w.contiguous(), d_rho, d_gram,
                                   G, A, L, Q, float(scale), **_meta(rho))
    return d_rho, d_gram


def flash_forward(abands, qbands, gram, amask, scale):
    """num, n2 (A, Q) of the contract from abands (G, A, L, P2) and qbands (G, Q, P2), rho computed per
    tile in registers (`_flash_forward_kernel`); same launch settings as `forward`."""
    G, A, L, P2 = abands.shape
    Q = qbands.shape[1]
    acc = torch.float64 if abands.dtype == torch.float64 else torch.float32
    num = torch.empty(A, Q, device=abands.device, dtype=acc)
    n2 = torch.empty_like(num)
    meta = {**launch(L), "ACC": tl.float64 if abands.dtype == torch.float64 else tl.float32, "KB": FLASH_KB}
    with _on(abands):
        _flash_forward_kernel[(A, triton.cdiv(Q, meta["BLOCK"]))](
            abands.contiguous(), qbands.contiguous(), gram.contiguous(), amask.to(torch.int8), num, n2,
            G, A, L, Q, P2, float(scale), **meta)
    return num, n2


# LP -> (BLOCK query positions per tile, num_warps) of the flash backward, for band widths up to
# FLASH_BWD_MAX_PP[LP] padded coordinates: the (LP, PP) and (BLOCK, PP) operands and accumulators live in
# registers. Chosen from `make triton-aot` (no GPU): at most 40 B of spills per thread on sm_80 / sm_90;
# PP 128 at LP 64 spilled ~600 B and LP 128 several KB, so anchors of more than 64 positions, or of 33-64
# with bands wider than 64 (G = 16 at d 1,024 has 2P = 66), and G = 1 or 8 at d 1,024 anywhere, run the
# backward on the materialised band shares (`hosa_lib.fused.reconstruct_triton_flash`).
FLASH_BWD_LAUNCH = {16: (16, 4), 32: (16, 8), 64: (16, 8)}
FLASH_BWD_MAX_PP = {16: 128, 32: 128, 64: 64}


def flash_backward_launch(L: int, P2: int) -> dict | None:
    """Compile-time constants and launch options of the flash backward for anchors of L positions and
    band width P2, or None when the tiles would not fit registers (then the caller materialises rho)."""
    lp = max(16, triton.next_power_of_2(L))
    pp = max(16, triton.next_power_of_2(P2))
    if lp not in FLASH_BWD_LAUNCH or pp > FLASH_BWD_MAX_PP[lp]:
        return None
    block, warps = FLASH_BWD_LAUNCH[lp]
    return {"LP": lp, "BLOCK": block, "PP": pp, "num_warps": warps, "num_stages": 1}


def flash_backward(abands, qbands, gram, amask, u, w, scale):
    """d_abands (G, A, L, P2), d_qbands (G, Q, P2), d_gram (G, A, L, L) of the contract's num and n2 given
    u = dL/dnum and w = dL/dn2 (A, Q), the band shares recomputed per tile (`_flash_backward_*_kernel`).
    Positions past an anchor's valid ones get zero gradients."""
    G, A, L, P2 = abands.shape
    Q = qbands.shape[1]
    meta = flash_backward_launch(L, P2)
    if meta is None:
        raise ValueError(f"fused_triton.flash_backward: anchors of {L} positions with band width {P2} do not fit; "
                         "use the materialised backward")
    meta["ACC"] = tl.float64 if abands.dtype == torch.float64 else tl.float32
    ab, qb, gr, am = abands.contiguous(), qbands.contiguous(), gram.contiguous(), amask.to(torch.int8).contiguous()
    u, w = u.contiguous(), w.contiguous()
    d_ab, d_qb, d_gram = torch.empty_like(ab), torch.empty_like(qb), torch.empty_like(gr)
    with _on(abands):
        _flash_backward_anchor_kernel[(G * A,)](ab, qb, gr, am, u, w, d_ab, d_gram, G, A, L, Q, P2, float(scale),
                                                **meta)
        _flash_backward_query_kernel[(G, triton.cdiv(Q, meta["BLOCK"]))](ab, qb, gr, am, u, w, d_qb, G, A, L, Q, P2,
                                                                          float(scale), **meta)
    return d_ab, d_qb, d_gram
