"""Fused CPU kernels (numba) for the high-order reconstruction term; contract in `hosa_lib.fused`.

Why hand-written: after the band-share GEMM, eager PyTorch streams ~10 full (G, A, L, Q) tensors
through memory per step (softmax, products, Gram contraction, their backward). These loops keep
one (L, QB) tile of a (band, anchor) pair in L1 and read the band shares once (forward) or twice
(backward: once to recompute alpha, once more from cache). No library offers this fusion on CPU.

Layout: rho (G, A, L, Q) band shares of anchor a's L softmax positions against Q query positions;
gram (G, A, L, L); valid (A, L) int32 indices of each anchor's valid positions, first nvalid[a].
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

QB = 128  # query positions per tile: an (L, QB) float32 tile is 6 KiB at L = 12


@njit(inline="always", fastmath=True)
def _softmax_tile(rho, g, a, q0, n, valid, nv, scale, out, bits, fast):
    """out[kk, :n] = softmax over the valid positions kk of scale * rho[g, a, valid[kk], q0:q0+n].

    fast (float32 inputs): exp as 2^k * p(r) with k = round(t log2 e), |r| <= ln2/2 and p the
    degree-6 Taylor polynomial (relative error < 2e-7, about float32's rounding), 2^k built in
    the exponent bits of an int32 buffer viewed as float32. Why: numba's np.exp is a scalar libm
    call per element (PyPI's llvmlite has no vector math library), which made the kernel slower
    than eager torch; this form vectorises. float64 inputs (tests, gradcheck) use np.exp."""
    mx = np.full(n, -np.inf, dtype=out.dtype)
    for kk in range(nv):
        k = valid[a, kk]
        for q in range(n):
            x = rho[g, a, k, q0 + q]
            if x > mx[q]:
                mx[q] = x
    s = np.zeros(n, dtype=out.dtype)
    two_k = bits[:n].view(np.float32)
    for kk in range(nv):
        k = valid[a, kk]
        if fast:
            for q in range(n):
                t = max(scale * (rho[g, a, k, q0 + q] - mx[q]), np.float32(-87.0))
                kf = np.floor(t * np.float32(1.4426950408889634) + np.float32(0.5))
                r = t - kf * np.float32(0.6931471805599453)
                p = np.float32(1.0) + r * (np.float32(1.0) + r * (np.float32(0.5) + r * (
                    np.float32(1 / 6) + r * (np.float32(1 / 24) + r * (np.float32(1 / 120) + r * np.float32(1 / 720))))))
                bits[q] = (np.int32(kf) + np.int32(127)) << np.int32(23)
                out[kk, q] = p
            for q in range(n):
                e = out[kk, q] * two_k[q]
                out[kk, q] = e
                s[q] += e
        else:
            for q in range(n):
                e = np.exp(scale * (rho[g, a, k, q0 + q] - mx[q]))
                out[kk, q] = e
                s[q] += e
    for q in range(n):
        s[q] = 1.0 / s[q]
    for kk in range(nv):
        for q in range(n):
            out[kk, q] *= s[q]


@njit(parallel=True, fastmath=True, cache=True)
def forward(rho, gram, valid, nvalid, scale, num, n2, fast):
    """num[a, q] = sum_g sum_k alpha_k rho_k and n2[a, q] = sum_g alpha^T Gamma alpha."""
    G, A, L, Q = rho.shape
    nqb = (Q + QB - 1) // QB
    for task in prange(A * nqb):
        a, qb = task // nqb, task % nqb
        q0 = qb * QB
        n = min(QB, Q - q0)
        nv = nvalid[a]
        al = np.empty((nv, n), dtype=rho.dtype)
        bits = np.empty(QB, dtype=np.int32)
        nu = np.zeros(n, dtype=rho.dtype)
        nn = np.zeros(n, dtype=rho.dtype)
        for g in range(G):
            _softmax_tile(rho, g, a, q0, n, valid, nv, scale, al, bits, fast)
            for kk in range(nv):
                k = valid[a, kk]
                gkk = gram[g, a, k, k]
                for q in range(n):
                    nu[q] += al[kk, q] * rho[g, a, k, q0 + q]
                    nn[q] += gkk * al[kk, q] * al[kk, q]
                for jj in range(kk):  # each off-diagonal pair once: (Gamma_kj + Gamma_jk) alpha_k alpha_j
                    j = valid[a, jj]
                    gkj = gram[g, a, k, j] + gram[g, a, j, k]
                    for q in range(n):
                        nn[q] += gkj * al[kk, q] * al[jj, q]
        for q in range(n):
            num[a, q0 + q] = nu[q]
            n2[a, q0 + q] = nn[q]


@njit(parallel=True, fastmath=True, cache=True)
def backward(rho, gram, valid, nvalid, scale, u, w, d_rho, d_gram, fast):
    """Given u = dL/dnum and w = dL/dn2 per (a, q) (the same for every band), write
    d_rho (G, A, L, Q) and d_gram (G, A, L, L). With alpha the softmax, beta = Gamma alpha and
    c_k = u rho_k + 2 w beta_k:  d_rho_k = alpha_k (u + scale (c_k - sum_j alpha_j c_j)),
    d_gram = sum_q w alpha alpha^T. Invalid positions get zero gradients."""
    G, A, L, Q = rho.shape
    for ga in prange(G * A):
        g, a = ga // A, ga % A
        nv = nvalid[a]
        dg = np.zeros((nv, nv), dtype=rho.dtype)
        al = np.empty((nv, QB), dtype=rho.dtype)
        cc = np.empty((nv, QB), dtype=rho.dtype)
        tot = np.empty(QB, dtype=rho.dtype)
        uq = np.empty(QB, dtype=rho.dtype)
        w2 = np.empty(QB, dtype=rho.dtype)
        wal = np.empty(QB, dtype=rho.dtype)
        bits = np.empty(QB, dtype=np.int32)
        zero = np.zeros(1, dtype=rho.dtype)[0]  # typed accumulator start: a 0.0 literal would be float64
        used = np.zeros(L, dtype=np.bool_)
        for kk in range(nv):
            used[valid[a, kk]] = True
        for k in range(L):
            if not used[k]:
                d_rho[g, a, k, :] = 0.0
                d_gram[g, a, k, :] = 0.0
                d_gram[g, a, :, k] = 0.0
        for q0 in range(0, Q, QB):
            n = min(QB, Q - q0)
            _softmax_tile(rho, g, a, q0, n, valid, nv, scale, al, bits, fast)
            for q in range(n):
                tot[q] = zero
                uq[q] = u[a, q0 + q]
                w2[q] = w[a, q0 + q] + w[a, q0 + q]
            for kk in range(nv):
                k = valid[a, kk]
                for q in range(n):
                    cc[kk, q] = zero
                for jj in range(nv):  # beta_k = (Gamma alpha)_k
                    gkj = gram[g, a, k, valid[a, jj]]
                    for q in range(n):
                        cc[kk, q] += gkj * al[jj, q]
                for q in range(n):
                    c = uq[q] * rho[g, a, k, q0 + q] + w2[q] * cc[kk, q]
                    cc[kk, q] = c
                    tot[q] += al[kk, q] * c
                    wal[q] = w2[q] * al[kk, q]
                for jj in range(kk + 1):  # d_gram (symmetric): 2 w alpha_k alpha_j, halved at the end
                    acc = zero
                    for q in range(n):
                        acc += wal[q] * al[jj, q]
                    dg[kk, jj] += acc
            for kk in range(nv):
                k = valid[a, kk]
                for q in range(n):
                    d_rho[g, a, k, q0 + q] = al[kk, q] * (uq[q] + scale * (cc[kk, q] - tot[q]))
        for kk in range(nv):
            for jj in range(kk + 1):
                d_gram[g, a, valid[a, kk], valid[a, jj]] = 0.5 * dg[kk, jj]
                d_gram[g, a, valid[a, jj], valid[a, kk]] = 0.5 * dg[kk, jj]
