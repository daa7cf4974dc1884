"""The t-product of third-order tensors (Kilmer & Martin, 2011).

A tensor A of shape (n1, n2, d) is a matrix of *tubes* along the last axis. The t-product
C = A * B of A (n1, n2, d) and B (n2, n3, d) is C[i, k] = sum_j A[i, j] (circular conv) B[j, k].
The circular convolution diagonalises under the DFT along the tube axis, so the fast form is
a batch of d complex matrix products in the Fourier domain (only d//2+1 are needed for real
tensors). `t_product_reference` builds the block-circulant matrix explicitly; it is O(d^2)
in memory and exists to test the fast form.

All functions accept leading batch dimensions: A (..., n1, n2, d), B (..., n2, n3, d).
"""
from __future__ import annotations

import torch


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.dim() < 3 or b.dim() < 3:
        raise ValueError(f"t-product needs third-order tensors, got A{tuple(a.shape)} and B{tuple(b.shape)}")
    if a.shape[-2] != b.shape[-3] or a.shape[-1] != b.shape[-1]:
        raise ValueError(
            f"t-product shape mismatch: A{tuple(a.shape)} * B{tuple(b.shape)} needs "
            "A (..., n1, n2, d) and B (..., n2, n3, d)")


def t_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Fast t-product via the real FFT along the tube axis. Differentiable."""
    _check_pair(a, b)
    d = a.shape[-1]
    ah = torch.fft.rfft(a, dim=-1)  # (..., n1, n2, F)
    bh = torch.fft.rfft(b, dim=-1)  # (..., n2, n3, F)
    # one complex matrix product per frequency: move F to a batch axis
    ch = torch.matmul(ah.movedim(-1, -3), bh.movedim(-1, -3))  # (..., F, n1, n3)
    return torch.fft.irfft(ch.movedim(-3, -1), n=d, dim=-1)  # (..., n1, n3, d)


def t_transpose(a: torch.Tensor) -> torch.Tensor:
    """A^T: transpose every frontal slice and reverse the order of slices 1..d-1."""
    at = a.transpose(-3, -2)
    return torch.cat([at[..., :1], at[..., 1:].flip(-1)], dim=-1)


def t_identity(n: int, d: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """Identity tensor (n, n, d): first frontal slice is I, the others are zero."""
    eye = torch.zeros(n, n, d, dtype=dtype, device=device)
    eye[..., 0] = torch.eye(n, dtype=dtype, device=device)
    return eye


def bcirc(a: torch.Tensor) -> torch.Tensor:
    """Block-circulant matrix (n1*d, n2*d) of A (n1, n2, d): block (i, j) = A[:, :, (i - j) mod d]."""
    n1, n2, d = a.shape[-3:]
    idx = (torch.arange(d).view(d, 1) - torch.arange(d).view(1, d)) % d  # (d, d) slice index per block
    blocks = a[..., idx]  # (..., n1, n2, d, d) = [row i, col j] -> A_{(i-j)}
    # (..., d_i, n1, d_j, n2) -> (..., d*n1, d*n2)
    return blocks.permute(*range(a.dim() - 3), -2, -4, -1, -3).reshape(*a.shape[:-3], d * n1, d * n2)


def unfold(b: torch.Tensor) -> torch.Tensor:
    """Stack the frontal slices of B (n2, n3, d) vertically: (d*n2, n3)."""
    return b.movedim(-1, -3).reshape(*b.shape[:-3], b.shape[-1] * b.shape[-3], b.shape[-2])


def fold(m: torch.Tensor, d: int) -> torch.Tensor:
    """Inverse of `unfold`: (d*n1, n3) -> (n1, n3, d)."""
    n1 = m.shape[-2] // d
    return m.reshape(*m.shape[:-2], d, n1, m.shape[-1]).movedim(-3, -1)


def t_product_reference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Slow explicit t-product fold(bcirc(A) @ unfold(B)); for tests only."""
    _check_pair(a, b)
    return fold(bcirc(a) @ unfold(b), a.shape[-1])
