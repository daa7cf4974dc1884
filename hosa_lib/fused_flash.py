"""Flash-style CPU kernels (numba) for the high-order term: the band shares are computed per tile and
never written to memory for the whole pair set. Contract in `hosa_lib.fused` (`reconstruct_flash`).

Why hand-written: the fused kernels of `fused_numba` start from the band shares rho (G, A, L, Q),
which the band-share GEMM writes to memory: G times MrSw's alignment matrix, read back by the kernel.
Here each task takes a block of anchors and one tile of query positions, and per band g computes
rho_g = (the block's valid rows of ab[g]) @ qbt[g, t] (a BLAS GEMM into an L1/L2-resident buffer), the
softmax over each anchor's positions, the Gram contraction and the two sums, so rho only ever exists one
tile at a time (as attention's scores do in FlashAttention). The backward recomputes each tile's rho and
softmax from the inputs (nothing of size rho is saved) and produces the gradients of both band-feature
sides and of the Gram matrices tile by tile. No library fuses this on CPU.

Layout: the anchors' band features with each anchor's valid positions first (nvalid[a] of them; `fused`
reorders them) and stacked (`packed`); gram (G, A, L, L) in the same order; qbt (G, T, P2, QB) the query
side's band features in tiles of per_tile whole items (n_item positions each), each tile zero-padded to
QB positions, a whole number of SIMD vectors (`fused.FLASH_LANES`): the loops over a tile's positions
then vectorise without a scalar remainder (which cost ~20 % at 108 positions); qb (G, T, QB, P2) the
same untransposed; num, n2 (A, T * QB). The GEMMs are numba's np.dot (BLAS through SciPy).

Compile time: the helpers that hold loops over a tile (`_exp_rows`, `_quadratic`, `_matvec_rows`,
`_outer_sym`) are functions of their own (`HELPER`), not numba's inline="always", which copies a callee's IR
into every caller before typing: `_quadratic` inlined made the forward compile in 24 s instead of 12 on the
Zen 3 machine (a user's first run, and every cold CI run, compiles each kernel once). LLVM still inlines
or calls them; on captured scoring and training calls the results are bit for bit the same and the times
within +-1.5 % (medians of 21 alternating runs, twice). Single-use `_band_terms` and the tiny ones stay inlined.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic


@intrinsic
def _f32_from_bits(typingctx, x):
    """The float32 whose bits are the low 32 of the integer x (LLVM's bitcast; numba has no scalar view)."""
    if not isinstance(x, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        bits = builder.trunc(args[0], ir.IntType(32)) if x.bitwidth > 32 else args[0]
        return builder.bitcast(bits, ir.FloatType())
    return types.float32(x), codegen


@intrinsic
def _fmax(typingctx, a, b):
    """max(a, b) of two floats of one type as LLVM's maxnum. Python's max, and `if x > m: m = x`, reach LLVM
    as a store of one of two values; its vectoriser then makes that a masked store, which AMD's Zen 2/3
    run as microcode (a loop of running maxima took 7x longer than with maxnum on Zen 3)."""
    if not (isinstance(a, types.Float) and a == b):
        return None

    def codegen(context, builder, signature, args):
        ty = args[0].type
        fn = builder.module.declare_intrinsic("llvm.maxnum", [ty], ir.FunctionType(ty, [ty, ty]))
        return builder.call(fn, args)
    return a(a, b), codegen


# error_model="numpy": a float division by zero gives inf, as it does inside the parallel kernels that call them
HELPER = njit(fastmath=True, error_model="numpy")

LOG2E = np.float32(1.4426950408889634)
# 2^f on [-1/2, 1/2]: a degree-6 polynomial fitted to relative error 1.9e-9 (1e-7 evaluated in float32)
_P = tuple(np.float32(c) for c in (1.0000000005923158, 0.693147205611257, 0.24022646607372544,
                                   0.055503289740008226, 0.00961851959091412, 0.0013399869912317725,
                                   0.00015337585106557384))
_P0, _P1, _P2, _P3, _P4, _P5, _P6 = _P


@njit(inline="always", fastmath=True)
def _exp2_32(y):
    """2^y of a float32 y <= 0 as p(f) 2^k: k = y rounded to the nearest integer, f = y - k in [-1/2, 1/2], p the
    polynomial above, 2^k made from its bits; y is clamped at -126 (2^k stays normal). Loops calling it
    vectorise (np.exp's call to libm does not). The callers fold the softmax's scale and log2(e) into one
    multiply-add, y = rho c - max c: with the rounding to nearest that is 14 vector operations per
    exponential where exp(scale (rho - max)) through e^r, r in [-ln 2 / 2, ln 2 / 2], took 17 (20 % faster)."""
    y = max(y, np.float32(-126.0))
    k = np.rint(y)
    f = y - k
    p = _P0 + f * (_P1 + f * (_P2 + f * (_P3 + f * (_P4 + f * (_P5 + f * _P6)))))
    return p * _f32_from_bits((np.int32(k) + np.int32(127)) << np.int32(23))


@HELPER
def _exp_rows(rt, nv, n, scale, out, mx, s, fast, free, one):
    """The softmax over k < nv of scale * rt[k, :n], left unnormalised: out[k] = exp(scale (rt[k] - m)) and
    s = 1 / sum_k out[k], m the largest over k, or 0 where `free` (float32 only; see `forward`). fast (float32):
    exp as `_exp2_32`, as the forward (`_band_terms`) takes it."""
    c = scale * LOG2E
    for q in range(n):
        s[q] = 0
    if not free:
        for q in range(n):
            mx[q] = -np.inf
        for k in range(nv):
            row = rt[k]
            for q in range(n):
                mx[q] = _fmax(mx[q], row[q])
        if fast:
            for q in range(n):
                mx[q] *= c
    for k in range(nv):
        row = rt[k]
        o = out[k]
        if free:
            for q in range(n):
                e = _exp2_32(row[q] * c)
                o[q] = e
                s[q] += e
        elif fast:
            for q in range(n):
                e = _exp2_32(row[q] * c - mx[q])
                o[q] = e
                s[q] += e
        else:
            for q in range(n):
                e = np.exp(scale * (row[q] - mx[q]))
                o[q] = e
                s[q] += e
    for q in range(n):
        s[q] = one / s[q]


@njit(inline="always", fastmath=True)
def _sym(gm, k, j):
    return gm[k, j] + gm[j, k]


@HELPER
def _quadratic(gm, e, nv, n, dd):
    """dd[q] = sum over j, k < nv of gm_kj e_k[q] e_j[q] (= e^T gm e), each pair j < k once as (gm_kj + gm_jk). The
    rows go in blocks of four and each pair of blocks in one pass over q: 8 loads and 20 multiply-adds per 16
    pairs, one load and store of dd per pass (row by row, 4 j at a time, it was 3x slower at 12 rows)."""
    for q in range(n):
        dd[q] = 0
    nb = nv // 4
    for kb in range(nb):
        k = 4 * kb
        x0, x1, x2, x3 = e[k], e[k + 1], e[k + 2], e[k + 3]
        h00, h11, h22, h33 = gm[k, k], gm[k + 1, k + 1], gm[k + 2, k + 2], gm[k + 3, k + 3]
        h10, h20, h21 = _sym(gm, k + 1, k), _sym(gm, k + 2, k), _sym(gm, k + 2, k + 1)
        h30, h31, h32 = _sym(gm, k + 3, k), _sym(gm, k + 3, k + 1), _sym(gm, k + 3, k + 2)
        for q in range(n):  # the ten pairs inside the block
            z0, z1, z2, z3 = x0[q], x1[q], x2[q], x3[q]
            dd[q] += (z0 * (h00 * z0) + z1 * (h10 * z0 + h11 * z1) + z2 * (h20 * z0 + h21 * z1 + h22 * z2)
                      + z3 * (h30 * z0 + h31 * z1 + h32 * z2 + h33 * z3))
        for j in range(0, k, 4):  # the 16 pairs with each earlier block
            y0, y1, y2, y3 = e[j], e[j + 1], e[j + 2], e[j + 3]
            a0, a1, a2, a3 = _sym(gm, k, j), _sym(gm, k, j + 1), _sym(gm, k, j + 2), _sym(gm, k, j + 3)
            b0, b1, b2, b3 = _sym(gm, k + 1, j), _sym(gm, k + 1, j + 1), _sym(gm, k + 1, j + 2), _sym(gm, k + 1, j + 3)
            c0, c1, c2, c3 = _sym(gm, k + 2, j), _sym(gm, k + 2, j + 1), _sym(gm, k + 2, j + 2), _sym(gm, k + 2, j + 3)
            d0, d1, d2, d3 = _sym(gm, k + 3, j), _sym(gm, k + 3, j + 1), _sym(gm, k + 3, j + 2), _sym(gm, k + 3, j + 3)
            for q in range(n):
                z0, z1, z2, z3 = y0[q], y1[q], y2[q], y3[q]
                dd[q] += (x0[q] * (a0 * z0 + a1 * z1 + a2 * z2 + a3 * z3)
                          + x1[q] * (b0 * z0 + b1 * z1 + b2 * z2 + b3 * z3)
                          + x2[q] * (c0 * z0 + c1 * z1 + c2 * z2 + c3 * z3)
                          + x3[q] * (d0 * z0 + d1 * z1 + d2 * z2 + d3 * z3))
    for k in range(4 * nb, nv):  # the rows past the last block of four: with every earlier row, four at a time
        x = e[k]
        j = 0
        while j + 4 <= k:
            g0, g1, g2, g3 = _sym(gm, k, j), _sym(gm, k, j + 1), _sym(gm, k, j + 2), _sym(gm, k, j + 3)
            y0, y1, y2, y3 = e[j], e[j + 1], e[j + 2], e[j + 3]
            for q in range(n):
                dd[q] += x[q] * (g0 * y0[q] + g1 * y1[q] + g2 * y2[q] + g3 * y3[q])
            j += 4
        while j < k:
            g0, y0 = _sym(gm, k, j), e[j]
            for q in range(n):
                dd[q] += g0 * x[q] * y0[q]
            j += 1
        g0 = gm[k, k]
        for q in range(n):
            dd[q] += g0 * x[q] * x[q]


@njit(inline="always", fastmath=True)
def _band_terms(rt, base, nv, n, scale, gm, e, mx, s, ne, dd, u, v, fast, cs, free, one):
    """One anchor's rows rt[base:base + nv] (its band shares rho, nv x n) of one band: u += sum_k alpha_k rho_k
    and v += alpha^T gm alpha for alpha = softmax over k of scale * rho. The softmax stays unnormalised
    (e = exp, s = sum e) until the end, u += (e . rho) / s and v += (e^T gm e) / s^2, which saves a pass over
    the tile; e^T gm e as `_quadratic`. fast (float32): exp as `_exp2_32`. cs (rows like rt, or empty): the
    running sum over bands of rho (the local score's cosines). free (float32 only; see `forward`): exp(scale
    rho) needs no shift by the largest rho, and the pass that finds it is skipped (cs is then added in the exponential's
    pass; otherwise in the maximum's: one read of the tile for both either way). one: 1 in rt's dtype (a
    literal 1 would make the division float64)."""
    want = cs.shape[0] > 0
    c = scale * LOG2E
    if not free:
        for q in range(n):
            mx[q] = -np.inf
        for k in range(nv):
            r = rt[base + k]
            if want:
                cc = cs[base + k]
                for q in range(n):
                    mx[q] = _fmax(mx[q], r[q])
                    cc[q] += r[q]
            else:
                for q in range(n):
                    mx[q] = _fmax(mx[q], r[q])
        if fast:
            for q in range(n):
                mx[q] *= c
    for q in range(n):
        s[q] = 0
        ne[q] = 0
    for k in range(nv):
        r, o = rt[base + k], e[k]
        if free and want:
            cc = cs[base + k]
            for q in range(n):
                x = _exp2_32(r[q] * c)
                o[q] = x
                s[q] += x
                ne[q] += x * r[q]
                cc[q] += r[q]
        elif free:
            for q in range(n):
                x = _exp2_32(r[q] * c)
                o[q] = x
                s[q] += x
                ne[q] += x * r[q]
        elif fast:
            for q in range(n):
                x = _exp2_32(r[q] * c - mx[q])
                o[q] = x
                s[q] += x
                ne[q] += x * r[q]
        else:
            for q in range(n):
                x = np.exp(scale * (r[q] - mx[q]))
                o[q] = x
                s[q] += x
                ne[q] += x * r[q]
    _quadratic(gm, e, nv, n, dd)
    for q in range(n):
        i = one / s[q]
        u[q] += ne[q] * i
        v[q] += dd[q] * i * i


# |scale rho| <= FREE_EXP: exp(scale rho) and its square stay normal float32 numbers (e^60 * L^2 < 3.4e38 for
# L < 10^6 words; e^-60 > 1.2e-38) without the softmax's shift by its largest argument
FREE_EXP = 30.0


@njit(inline="always")
def _consts(dtype):
    """1, 0, 1e-12 and -inf in `dtype`: a Python literal would make float32 arithmetic float64 (numba types
    float32 op float64 as float64), e.g. 1 / x in float64 with a scalar division."""
    c = np.empty(4, dtype=dtype)
    c[0], c[1], c[2], c[3] = 1.0, 0.0, 1e-12, -np.inf
    return c[0], c[1], c[2], c[3]


@njit(inline="always")
def _bounded(anorm, qn, limit):
    """Whether the largest of anorm (squared norms of a block's rows) times qn is at most limit."""
    m = qn - qn
    for i in range(anorm.shape[0]):
        m = max(m, anorm[i])
    return m * qn <= limit


@njit(parallel=True, fastmath=True, cache=True)
def forward(packed, offs, qbt, gram, nvalid, scale, num, n2, fast, qvalid, n_item, per_tile, local, arg, blocks, wts,
            out, anorm, qnorm):
    """num[a, q] = sum_g sum_k alpha_k rho_k and n2[a, q] = sum_g alpha^T Gamma alpha, one (block of
    anchors blocks[i]:blocks[i + 1], query tile) per task, rho_g of the tile computed in a private buffer. With out (A, B)
    not empty (scoring, nothing saved for a backward) the kernel writes the scores instead, out[a, b] =
    sum_j wts[b, j] num / sqrt(max(n2, 1e-12)) over item b's positions j, and num and n2 may be empty.

    packed (G, R, P2): the anchors' valid band features stacked (anchor a's rows offs[a]:offs[a + 1],
    nvalid[a] of them), so that one GEMM computes rho_g for the whole block: one anchor's small product
    (nvalid x P2 by P2 x QB) runs below BLAS's rate, and each row of a product is computed alike
    whatever rows surround it.

    local (A, L, B) (empty: not wanted): TERAN's local score folded in, for anchors that are captions:
    sum_g rho_g is the region-word cosine (the band shares add up to it), so local[a, k, b] = the
    largest over item b's positions (n_item per item, tiles hold whole items) of word k's cosine,
    over the valid positions (qvalid != 0) or, where qvalid is all ones, TERAN's padding rule (a
    padded position's cosine is 0); arg[a, k, b] (empty: not wanted) = the first query position holding
    that largest (for the backward).

    anorm (G, R): the squared norm of each stacked anchor row in each band; qnorm (G, T): the largest squared
    norm of a tile's query positions in each band (`query_tiles`). By Cauchy-Schwarz |rho| <= the product of
    the norms, so where scale * sqrt(max anorm of the block * qnorm) <= FREE_EXP the softmax's exponentials
    exp(scale rho) lie in [e^-FREE_EXP, e^FREE_EXP], their squares (in e^T Gamma e) too in float32's normal
    range, and the softmax needs no shift by the largest rho: the pass that finds it is skipped for that
    (block, tile, band). The result is the same softmax (up to rounding). float32 only (`fast`): float64 inputs
    (the tests' reference road) keep the shift, so the loops need no float64 copy."""
    G, P2 = packed.shape[0], packed.shape[2]
    A, L = gram.shape[1], gram.shape[2]
    T, QB = qbt.shape[1], qbt.shape[3]
    want_local, want_arg, want_out = local.shape[0] > 0, arg.shape[0] > 0, out.shape[0] > 0
    NB = blocks.shape[0] - 1
    one, zero, tiny, ninf = _consts(packed.dtype)
    limit = (FREE_EXP / scale) ** 2  # bound^2 below which a band's softmax needs no shift
    for task in prange(NB * T):
        blk, t = task // T, task % T
        a0, a1 = blocks[blk], blocks[blk + 1]
        r0, r1 = offs[a0], offs[a1]
        q0 = t * QB
        rt = np.empty((max(r1 - r0, 1), QB), dtype=packed.dtype)
        e = np.empty((L, QB), dtype=packed.dtype)
        cs = np.zeros((r1 - r0 if want_local else 0, QB), dtype=packed.dtype)
        mx = np.empty(QB, dtype=packed.dtype)
        s = np.empty(QB, dtype=packed.dtype)
        ne = np.empty(QB, dtype=packed.dtype)
        dd = np.empty(QB, dtype=packed.dtype)
        nu = np.zeros((a1 - a0, QB), dtype=packed.dtype)
        nn = np.zeros((a1 - a0, QB), dtype=packed.dtype)
        for g in range(G):
            if r1 > r0:
                np.dot(packed[g, r0:r1], qbt[g, t], rt[:r1 - r0])
            free = fast and _bounded(anorm[g, r0:r1], qnorm[g, t], limit)
            for a in range(a0, a1):
                nv, base = nvalid[a], offs[a] - r0
                if nv > 0:
                    _band_terms(rt, base, nv, QB, scale, gram[g, a], e, mx, s, ne, dd, nu[a - a0], nn[a - a0],
                                fast, cs, free, one)
        for a in range(a0, a1):
            nv, base = nvalid[a], offs[a] - r0
            if want_out:
                x, y = nu[a - a0], nn[a - a0]
                for b in range(per_tile):
                    item = t * per_tile + b
                    if item >= out.shape[1]:
                        break
                    acc = zero
                    for j in range(n_item):
                        q = b * n_item + j
                        acc += wts[item, j] * (x[q] / np.sqrt(max(y[q], tiny)))
                    out[a, item] = acc
            else:
                for q in range(QB):
                    num[a, q0 + q] = nu[a - a0, q]
                    n2[a, q0 + q] = nn[a - a0, q]
            if want_local:
                for b in range(per_tile):
                    item = t * per_tile + b
                    if item >= local.shape[2]:
                        break
                    for k in range(L):
                        best, at = ninf, -1
                        if k < nv:
                            c, qv = cs[base + k, b * n_item:(b + 1) * n_item], qvalid[q0 + b * n_item:]
                            for j in range(n_item):  # a max reduction without a branch: vectorises
                                best = max(best, c[j] if qv[j] != 0 else ninf)
                            if want_arg:  # the first valid position holding it
                                for j in range(n_item):
                                    if qv[j] != 0 and c[j] == best:
                                        at = q0 + b * n_item + j
                                        break
                        local[a, k, item] = best if k < nv else 0.0
                        if want_arg:
                            arg[a, k, item] = at


@HELPER
def _matvec_rows(gm, al, nv, n, out):
    """out[k, q] = sum over j < nv of gm[k, j] al[j, q] for k < nv, four j per pass over q. A BLAS call per
    (anchor, band, tile) for this 12 x 12 by 12 x 144 product cost more in overhead than it computed."""
    for k in range(nv):
        o = out[k]
        for q in range(n):
            o[q] = 0
        j = 0
        while j + 4 <= nv:
            g0, g1, g2, g3 = gm[k, j], gm[k, j + 1], gm[k, j + 2], gm[k, j + 3]
            y0, y1, y2, y3 = al[j], al[j + 1], al[j + 2], al[j + 3]
            for q in range(n):
                o[q] += g0 * y0[q] + g1 * y1[q] + g2 * y2[q] + g3 * y3[q]
            j += 4
        while j < nv:
            g0, y0 = gm[k, j], al[j]
            for q in range(n):
                o[q] += g0 * y0[q]
            j += 1


@HELPER
def _outer_sym(x, y, nv, n, d, zero):
    """d[k, j] += sum over q of x[k, q] y[j, q] for j <= k < nv, mirrored to d[j, k] (x is y scaled per position,
    so the sums are symmetric): two rows of each side per pass over q, four float32 sums (an accumulator
    started at Python's 0.0 summed in float64: 3.5x slower for these 12 x 12 x 144)."""
    for k in range(0, nv, 2):
        k2 = k + 1 < nv
        xa, xb = x[k], x[k + 1 if k2 else k]
        for j in range(0, k + 1, 2):
            ya, yb = y[j], y[j + 1 if j + 1 < nv else j]
            s00, s01, s10, s11 = zero, zero, zero, zero
            for q in range(n):
                a0, a1, b0, b1 = xa[q], xb[q], ya[q], yb[q]
                s00 += a0 * b0
                s01 += a0 * b1
                s10 += a1 * b0
                s11 += a1 * b1
            if j < k:  # a block below the diagonal (j + 1 < k)
                d[k, j] += s00
                d[j, k] += s00
                d[k, j + 1] += s01
                d[j + 1, k] += s01
                if k2:
                    d[k + 1, j] += s10
                    d[j, k + 1] += s10
                    d[k + 1, j + 1] += s11
                    d[j + 1, k + 1] += s11
            else:  # the diagonal block: (k, k), (k + 1, k) mirrored, (k + 1, k + 1)
                d[k, k] += s00
                if k2:
                    d[k + 1, k] += s10
                    d[k, k + 1] += s10
                    d[k + 1, k + 1] += s11


@njit(parallel=True, fastmath=True, cache=True)
def backward(packed, offs, cstart, qbt, qb, gram, nvalid, scale, u, w, d_packed, d_qb, d_gram, fast, glocal,
             arg, n_item, per_tile, ablock, anorm, qnorm):
    """Given u = dL/dnum and w = dL/dn2 per (a, q): d_packed (G, R, P2) (the gradient of packed, row for
    row), d_gram (G, A, L, L) and d_qb (C, G, T, QB, P2), one partial sum per chunk of anchors (the caller
    adds the C chunks). packed holds the anchors' valid rows (anchor a's rows offs[a]:offs[a + 1]); chunk c
    runs the consecutive anchors cstart[c]:cstart[c + 1] (one thread each, into its own partial d_qb, so that no
    two threads write the same memory), in blocks of `ablock` anchors. Per tile, rho
    and the softmax are recomputed, rho and d_ab for a whole block in one GEMM each (as in `forward`);
    with beta = Gamma alpha and c_k = u rho_k + 2 w beta_k: d_rho_k = alpha_k (u + scale (c_k - sum_j
    alpha_j c_j)), d_gram = sum_q w alpha alpha^T, d_ab = d_rho @ qb, d_qb = d_rho^T @ ab (one GEMM per block
    too, summing over its anchors). Positions past nvalid get zero gradients. glocal (A, L, B) (empty: none): the
    gradient of `forward`'s local maxima; each band's share adds up to the cosine, so it reaches every
    band's d_rho at the position arg[a, k, b] of the maximum. The softmax stays unnormalised as in `forward`
    (e and 1 / sum e = i per position; beta' = Gamma e): c_k = u rho_k + 2 w i beta'_k, d_rho_k = e_k i (u +
    scale (c_k - i sum_j e_j c_j)) and d_gram = sum_q w i^2 e e^T; anorm, qnorm: as in `forward`."""
    G, P2 = packed.shape[0], packed.shape[2]
    L = gram.shape[2]
    T, QB = qbt.shape[1], qbt.shape[3]
    C = d_qb.shape[0]
    want_local = glocal.shape[0] > 0
    one, zero = _consts(packed.dtype)[:2]
    limit = (FREE_EXP / scale) ** 2
    for c in prange(C):
        rt = np.empty((ablock * L, QB), dtype=packed.dtype)
        drt = np.empty((ablock * L, QB), dtype=packed.dtype)
        tab = np.empty((ablock * L, P2), dtype=packed.dtype)
        al = np.empty((L, QB), dtype=packed.dtype)
        cc = np.empty((L, QB), dtype=packed.dtype)
        wal = np.empty((L, QB), dtype=packed.dtype)
        tqb = np.empty((QB, P2), dtype=packed.dtype)
        gm = np.empty(ablock * G * L * L, dtype=packed.dtype)  # each anchor's valid Gram blocks, contiguous
        uq = np.empty(QB, dtype=packed.dtype)
        w2 = np.empty(QB, dtype=packed.dtype)
        mx = np.empty(QB, dtype=packed.dtype)
        s = np.empty(QB, dtype=packed.dtype)
        tot = np.empty(QB, dtype=packed.dtype)
        wi = np.empty(QB, dtype=packed.dtype)
        d_qb[c] = 0.0
        for p0 in range(cstart[c], cstart[c + 1], ablock):
            p1 = min(p0 + ablock, cstart[c + 1])
            r0, r1 = offs[p0], offs[p1]
            d_packed[:, r0:r1] = 0.0
            for i in range(p0, p1):
                a, nv = i, nvalid[i]
                d_gram[:, a] = 0.0
                for g in range(G):
                    o = ((i - p0) * G + g) * L * L
                    gm[o:o + nv * nv].reshape((nv, nv))[:, :] = gram[g, a, :nv, :nv]
            for t in range(T):
                q0 = t * QB
                for g in range(G):
                    if r1 > r0:
                        np.dot(packed[g, r0:r1], qbt[g, t], rt[:r1 - r0])
                    free = fast and _bounded(anorm[g, r0:r1], qnorm[g, t], limit)
                    for i in range(p0, p1):
                        a, base = i, offs[i] - r0
                        nv = nvalid[a]
                        rows = rt[base:base + nv]
                        _exp_rows(rows, nv, QB, scale, al, mx, s, fast, free, one)  # al = e, s = 1 / sum e
                        o = ((i - p0) * G + g) * L * L
                        _matvec_rows(gm[o:o + nv * nv].reshape((nv, nv)), al, nv, QB, cc)  # beta' = Gamma e
                        for q in range(QB):
                            iq, wq = s[q], w[a, q0 + q]
                            uq[q] = u[a, q0 + q]
                            w2[q] = (wq + wq) * iq
                            wi[q] = wq * iq * iq
                            tot[q] = 0
                        for k in range(nv):
                            ck, x, r, wk = cc[k], al[k], rows[k], wal[k]
                            for q in range(QB):
                                v = uq[q] * r[q] + w2[q] * ck[q]  # c_k
                                ck[q] = v
                                tot[q] += x[q] * v
                                wk[q] = wi[q] * x[q]
                        for q in range(QB):  # d_rho_k = e_k (tot + w2 c_k)
                            iq = s[q]
                            tot[q] = iq * (uq[q] - scale * iq * tot[q])
                            w2[q] = scale * iq
                        for k in range(nv):
                            ck, x, dk = cc[k], al[k], drt[base + k]
                            for q in range(QB):
                                dk[q] = x[q] * (tot[q] + w2[q] * ck[q])
                            if want_local:
                                for b in range(per_tile):
                                    item = t * per_tile + b
                                    if item < glocal.shape[2] and arg[a, k, item] >= 0:
                                        dk[arg[a, k, item] - q0] += glocal[a, k, item]
                        _outer_sym(wal, al, nv, QB, d_gram[g, a], zero)  # d_gram = sum_q w i^2 e e^T
                    if r1 > r0:
                        np.dot(drt[:r1 - r0].T, packed[g, r0:r1], tqb)  # d_qb = d_rho^T @ ab, the block at once
                        for q in range(QB):
                            for p in range(P2):
                                d_qb[c, g, t, q, p] += tqb[q, p]
                        np.dot(drt[:r1 - r0], qb[g, t], tab[:r1 - r0])  # d_ab = d_rho @ qb, the block at once
                        for r in range(r1 - r0):
                            for p in range(P2):
                                d_packed[g, r0 + r, p] += tab[r, p]


@njit(parallel=True, cache=True)
def query_tiles(qbands, items, qbt, qnorm):
    """qbt (G, T, P2, QB)[g, t, :, :n] = the transpose of tile t's n <= items positions of qbands (G, Q, P2),
    zero past them: the GEMMs' right-hand operands; qnorm (G, T) = the largest squared norm of tile t's positions
    in band g (`forward`'s bound). A loop of its own because torch's strided copy with
    the transpose ran at ~3 GB/s, a tenth of the kernel's time in all-pairs scoring; each (band, tile)
    here fits L1."""
    G, Q, P2 = qbands.shape
    T, QB = qbt.shape[1], qbt.shape[3]
    zero = _consts(qbands.dtype)[1]
    for task in prange(G * T):
        g, t = task // T, task % T
        q0 = t * items
        n = min(items, Q - q0)
        dst, src = qbt[g, t], qbands[g]
        for j in range(n):  # contiguous reads, strided writes: 1.6x faster than the other way round
            row = src[q0 + j]
            for p in range(P2):
                dst[p, j] = row[p]
        sq = np.zeros(n, dtype=qbt.dtype)  # the squared norms, summed across the copy's rows: vectorises
        for p in range(P2):
            for j in range(n):
                sq[j] += dst[p, j] * dst[p, j]
        big = zero
        for j in range(n):
            big = max(big, sq[j])
        qnorm[g, t] = big
        for p in range(P2):
            for j in range(n, QB):
                dst[p, j] = 0


@njit(parallel=True, cache=True)
def band_gather(spec, idx, w, out):
    """out (G, N, 2P)[g, i, 2p : 2p + 2] = the real and imaginary parts of spec[i, f] * w[f] for f = idx[g, p], zero
    where idx[g, p] is the padding value F: `scoring.band_features` after its FFT (`fused.band_features`). spec
    (N, F, 2) is the FFT's output viewed as real pairs. One pass where torch's weighting, padding, complex
    gather and band-major copy took four (three quarters of band_features' time); the same products, so
    the same bits."""
    N, F = spec.shape[0], spec.shape[1]
    G, P = idx.shape
    for i in prange(N):
        row = spec[i]
        for g in range(G):
            o = out[g, i]
            for p in range(P):
                f = idx[g, p]
                if f < F:
                    o[2 * p] = row[f, 0] * w[f]
                    o[2 * p + 1] = row[f, 1] * w[f]
                else:
                    o[2 * p] = 0
                    o[2 * p + 1] = 0


@njit(parallel=True, cache=True)
def band_scatter(g, idx, w, full):
    """The adjoint of `band_gather` into the full-length spectrum: full (N, D, 2)[i, f] = g (G, N, 2P)[band of f, i,
    its place 2p : 2p + 2] * w[f] for the F = w.shape[0] bins, zero for f >= F, all of them written (the bands
    partition the bins). Then an inverse FFT of full gives the gradient of band_features' input, as torch's rfft
    backward computes it (`fused.band_features`). The same products as torch's chain of backwards (view, gather,
    pad, weight), so the same bits, in one pass where those took five."""
    D, F = full.shape[1], w.shape[0]
    G, P = idx.shape
    for i in prange(full.shape[0]):
        o = full[i]
        for f in range(F, D):
            o[f, 0] = 0
            o[f, 1] = 0
        for b in range(G):
            row = g[b, i]
            for p in range(P):
                f = idx[b, p]
                if f < F:
                    o[f, 0] = row[2 * p] * w[f]
                    o[f, 1] = row[2 * p + 1] * w[f]
