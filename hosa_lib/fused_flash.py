"""Flash-style CPU kernels (numba) for the high-order term: the band shares are computed per tile and
never written to memory for the whole pair set. Contract in `hosa_lib.fused` (`reconstruct_flash`).

Why hand-written: the fused kernels of `fused_numba` start from the band shares rho (G, A, L, Q),
which the band-share GEMM writes to memory: G times MrSw's alignment matrix, read back by the kernel.
Here each task takes one anchor a and one tile of QB query positions, and per band g computes
rho_g = ab[g, a] @ qbt[g, t] (nv x QB, a small BLAS GEMM into an L1/L2-resident buffer), the softmax
over the anchor's positions, the Gram contraction and the two sums, so rho only ever exists one tile
at a time (as attention's scores do in FlashAttention). The backward recomputes each tile's rho and
softmax from the inputs (nothing of size rho is saved) and produces the gradients of both band-feature
sides and of the Gram matrices tile by tile. No library fuses this on CPU.

Layout: ab (G, A, L, P2) anchor band features with each anchor's valid positions first (nvalid[a] of
them; `fused` reorders them); gram (G, A, L, L) in the same order; qbt (G, T, P2, QB) the query side's
band features in tiles of QB positions (zero past Q), qb (G, T, QB, P2) the same untransposed;
num, n2 (A, T * QB). The small GEMMs are numba's np.dot (BLAS through SciPy).
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange


@njit(inline="always", fastmath=True)
def _softmax_rows(rt, nv, n, scale, out, bits, mx, s, fast):
    """out[k, :n] = softmax over k < nv of scale * rt[k, :n]. fast (float32): exp as 2^k p(r), the
    vectorising form of `fused_numba._softmax_tile` (same polynomial, same accuracy)."""
    for q in range(n):
        mx[q] = -np.inf
    for k in range(nv):
        row = rt[k]
        for q in range(n):
            if row[q] > mx[q]:
                mx[q] = row[q]
    for q in range(n):
        s[q] = 0
    two_k = bits[:n].view(np.float32)
    for k in range(nv):
        row = rt[k]
        o = out[k]
        if fast:
            for q in range(n):
                t = max(scale * (row[q] - mx[q]), np.float32(-87.0))
                kf = np.floor(t * np.float32(1.4426950408889634) + np.float32(0.5))
                r = t - kf * np.float32(0.6931471805599453)
                p = np.float32(1.0) + r * (np.float32(1.0) + r * (np.float32(0.5) + r * (
                    np.float32(1 / 6) + r * (np.float32(1 / 24) + r * (np.float32(1 / 120) + r * np.float32(1 / 720))))))
                bits[q] = (np.int32(kf) + np.int32(127)) << np.int32(23)
                o[q] = p
            for q in range(n):
                e = o[q] * two_k[q]
                o[q] = e
                s[q] += e
        else:
            for q in range(n):
                e = np.exp(scale * (row[q] - mx[q]))
                o[q] = e
                s[q] += e
    for q in range(n):
        s[q] = 1.0 / s[q]
    for k in range(nv):
        o = out[k]
        for q in range(n):
            o[q] *= s[q]


@njit(parallel=True, fastmath=True, cache=True)
def forward(ab, qbt, gram, nvalid, scale, num, n2, fast, qvalid, n_item, local, arg):
    """num[a, q] = sum_g sum_k alpha_k rho_k and n2[a, q] = sum_g alpha^T Gamma alpha, one
    (anchor, query tile) per task, rho_g of the tile computed in a private buffer.

    local (A, L, B) (empty: not wanted): TERAN's local score folded in, for anchors that are captions:
    sum_g rho_g is the region-word cosine (the band shares add up to it), so local[a, k, b] = the
    largest over item b's positions (n_item per item, tiles hold whole items) of word k's cosine,
    over the valid positions (qvalid != 0) or, where qvalid is all ones, TERAN's padding rule (a
    padded position's cosine is 0); arg[a, k, b] = the query position of that largest (for the
    backward)."""
    G, A, L, P2 = ab.shape
    T, QB = qbt.shape[1], qbt.shape[3]
    want_local = local.shape[0] > 0
    per_tile = QB // n_item
    for task in prange(A * T):
        a, t = task // T, task % T
        nv = nvalid[a]
        q0 = t * QB
        rt = np.empty((L, QB), dtype=ab.dtype)
        al = np.empty((L, QB), dtype=ab.dtype)
        cs = np.zeros((L if want_local else 0, QB), dtype=ab.dtype)
        bits = np.empty(QB, dtype=np.int32)
        mx = np.empty(QB, dtype=ab.dtype)
        s = np.empty(QB, dtype=ab.dtype)
        nu = np.zeros(QB, dtype=ab.dtype)
        nn = np.zeros(QB, dtype=ab.dtype)
        for g in range(G):
            np.dot(ab[g, a, :nv], qbt[g, t], rt[:nv])
            if want_local:
                for k in range(nv):
                    r, c = rt[k], cs[k]
                    for q in range(QB):
                        c[q] += r[q]
            _softmax_rows(rt, nv, QB, scale, al, bits, mx, s, fast)
            for k in range(nv):
                r, x = rt[k], al[k]
                gkk = gram[g, a, k, k]
                for q in range(QB):
                    nu[q] += x[q] * r[q]
                    nn[q] += gkk * x[q] * x[q]
                for j in range(k):  # each off-diagonal pair once: (Gamma_kj + Gamma_jk) alpha_k alpha_j
                    gkj = gram[g, a, k, j] + gram[g, a, j, k]
                    y = al[j]
                    for q in range(QB):
                        nn[q] += gkj * x[q] * y[q]
        for q in range(QB):
            num[a, q0 + q] = nu[q]
            n2[a, q0 + q] = nn[q]
        if want_local:
            for b in range(per_tile):
                item = t * per_tile + b
                if item >= local.shape[2]:
                    break
                for k in range(L):
                    best, at = -np.inf, -1
                    if k < nv:
                        for j in range(n_item):
                            q = b * n_item + j
                            if qvalid[q0 + q] != 0 and cs[k, q] > best:
                                best, at = cs[k, q], q0 + q
                    local[a, k, item] = best if k < nv else 0.0
                    arg[a, k, item] = at


@njit(parallel=True, fastmath=True, cache=True)
def backward(ab, qbt, qb, gram, nvalid, scale, u, w, d_ab, d_qb, d_gram, fast, glocal, arg, n_item):
    """Given u = dL/dnum and w = dL/dn2 per (a, q): d_ab (G, A, L, P2), d_gram (G, A, L, L) and
    d_qb (C, G, T, QB, P2), one partial sum per chunk of anchors (the caller adds the C chunks; chunk c
    runs anchors c, c + C, ... so that no two threads write the same d_qb). Per tile, rho and the
    softmax are recomputed; with beta = Gamma alpha and c_k = u rho_k + 2 w beta_k:
    d_rho_k = alpha_k (u + scale (c_k - sum_j alpha_j c_j)), d_gram = sum_q w alpha alpha^T,
    d_ab = d_rho @ qb, d_qb = d_rho^T @ ab. Positions past nvalid get zero gradients.
    glocal (A, L, B) (empty: none): the gradient of `forward`'s local maxima; each band's share adds
    up to the cosine, so it reaches every band's d_rho at the position arg[a, k, b] of the maximum."""
    G, A, L, P2 = ab.shape
    T, QB = qbt.shape[1], qbt.shape[3]
    C = d_qb.shape[0]
    want_local = glocal.shape[0] > 0
    per_tile = QB // n_item
    for c in prange(C):
        rt = np.empty((L, QB), dtype=ab.dtype)
        al = np.empty((L, QB), dtype=ab.dtype)
        cc = np.empty((L, QB), dtype=ab.dtype)
        wal = np.empty((L, QB), dtype=ab.dtype)
        drt = np.empty((L, QB), dtype=ab.dtype)
        tab = np.empty((L, P2), dtype=ab.dtype)
        tqb = np.empty((QB, P2), dtype=ab.dtype)
        uq = np.empty(QB, dtype=ab.dtype)
        w2 = np.empty(QB, dtype=ab.dtype)
        bits = np.empty(QB, dtype=np.int32)
        mx = np.empty(QB, dtype=ab.dtype)
        s = np.empty(QB, dtype=ab.dtype)
        tot = np.empty(QB, dtype=ab.dtype)
        d_qb[c] = 0.0
        for a in range(c, A, C):
            nv = nvalid[a]
            d_ab[:, a] = 0.0
            d_gram[:, a] = 0.0
            gm = np.empty((G, nv, nv), dtype=ab.dtype)  # contiguous valid block of each band's Gram matrix
            for g in range(G):
                gm[g] = gram[g, a, :nv, :nv]
            tg = np.empty((nv, nv), dtype=ab.dtype)
            for t in range(T):
                q0 = t * QB
                for q in range(QB):
                    uq[q] = u[a, q0 + q]
                    w2[q] = w[a, q0 + q] + w[a, q0 + q]
                for g in range(G):
                    np.dot(ab[g, a, :nv], qbt[g, t], rt[:nv])
                    _softmax_rows(rt, nv, QB, scale, al, bits, mx, s, fast)
                    np.dot(gm[g], al[:nv], cc[:nv])  # beta = Gamma alpha
                    for q in range(QB):
                        tot[q] = 0.0
                    for k in range(nv):
                        ck, x, r, wk = cc[k], al[k], rt[k], wal[k]
                        for q in range(QB):
                            v = uq[q] * r[q] + w2[q] * ck[q]  # c_k
                            ck[q] = v
                            tot[q] += x[q] * v
                            wk[q] = w[a, q0 + q] * x[q]
                    for k in range(nv):
                        ck, x, dk = cc[k], al[k], drt[k]
                        for q in range(QB):
                            dk[q] = x[q] * (uq[q] + scale * (ck[q] - tot[q]))
                        if want_local:
                            for b in range(per_tile):
                                item = t * per_tile + b
                                if item < glocal.shape[2] and arg[a, k, item] >= 0:
                                    dk[arg[a, k, item] - q0] += glocal[a, k, item]
                    np.dot(wal[:nv], al[:nv].T, tg)  # d_gram = sum_q w alpha alpha^T
                    np.dot(drt[:nv], qb[g, t], tab[:nv])  # d_ab = d_rho @ qb
                    np.dot(drt[:nv].T, ab[g, a, :nv], tqb)  # d_qb = d_rho^T @ ab
                    for k in range(nv):
                        for j in range(nv):
                            d_gram[g, a, k, j] += tg[k, j]
                        for p in range(P2):
                            d_ab[g, a, k, p] += tab[k, p]
                    for q in range(QB):
                        for p in range(P2):
                            d_qb[c, g, t, q, p] += tqb[q, p]
