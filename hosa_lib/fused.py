"""The high-order reconstruction term after the band-share GEMM, with a choice of kernel.

One contract for every implementation. An *anchor* a (a caption for t2i, an image for i2t) has
L softmax positions (its words for t2i) with a per-band Gram matrix gram (G, A, L, L); the *query*
side has Q = B * n positions (the regions of B images for t2i). rho (G, A, L, Q) are the band
shares. Per band g and query position q, alpha = softmax over the anchor's valid positions of
scale * rho, and
    num[a, q] = sum_g sum_k alpha_k rho_k,   n2[a, q] = sum_g alpha^T Gamma alpha,
    out[a, b] = sum_j weight[b, j] * num[a, (b, j)] / sqrt(n2[a, (b, j)])
(weight: the mean over the query item's valid positions). `torch` is the eager definition in
`hosa_lib.scoring`; `numba` (CPU) and `triton` (CUDA, or its CPU interpreter) fuse everything
after the GEMM. docs/scoring.md has the derivation of the backward.
"""
from __future__ import annotations

import importlib
import os
import sys

import torch

from .config import KERNELS

TRITON_MAX_L = 128  # = max(fused_triton.LAUNCH) (tested): longer anchors exceed one GPU block's shared memory
_told: set[str] = set()


def _notice(why: str) -> None:
    if why not in _told:
        _told.add(why)
        print(f"hosa: {why}", file=sys.stderr)


def fits(kernel: str, anchor_len: int) -> str:
    """`kernel`, or eager torch (with a one-line notice) when the Triton kernel has no launch
    setting for anchors of anchor_len positions (> TRITON_MAX_L)."""
    if kernel == "triton" and anchor_len > TRITON_MAX_L:
        _notice(f"scoring.kernel=triton: anchors of more than {TRITON_MAX_L} positions (here {anchor_len}) do not "
                "fit one GPU block's shared memory; those scores run in eager torch")
        return "torch"
    return kernel


def _unavailable(name: str, device: torch.device) -> str | None:
    """Why kernel `name` cannot run on `device`, or None when it can."""
    if name == "numba" and device.type != "cpu":
        return f"numba runs on CPU tensors, these are on {device}; use triton or torch"
    if name == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return f"triton needs CUDA tensors (these are on {device}) or TRITON_INTERPRET=1 for its CPU interpreter"
    try:
        importlib.import_module(name)
    except ImportError:
        return f"{name} is not installed (pip install {name})"
    return None


def resolve(kernel: str, device: torch.device, eager_only: str | None = None) -> str:
    """The implementation `scoring.kernel` names for tensors on `device`. `auto` takes the fused
    kernel of the device and falls back to eager torch with a one-line notice (once per process).
    eager_only names a scoring option the fused kernels do not implement (e.g. scoring.condition):
    then `auto` means torch (with the notice) and a fused kernel asked for by name is an error."""
    KERNELS.impl(kernel)  # a ConfigError naming the choices for an unknown name
    if kernel == "torch":
        return "torch"
    if eager_only and kernel != "auto":
        raise ValueError(f"scoring.kernel={kernel}: {eager_only} runs in the eager kernel only; use auto or torch")
    if kernel == "auto":
        want = {"cpu": "numba", "cuda": "triton"}.get(device.type)
        if eager_only:
            why = f"{eager_only} runs in the eager kernel only"
        else:
            why = _unavailable(want, device) if want else f"no fused kernel for {device.type}"
        if why is None:
            return want
        _notice(f"scoring.kernel=auto uses eager torch: {why}")
        return "torch"
    why = _unavailable(kernel, device)
    if why is not None:
        raise ValueError(f"scoring.kernel={kernel}: {why}")
    return kernel


def _valid_index(amask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, L) bool -> (A, L) int32 indices of the valid positions first, and their count (A,)."""
    order = torch.argsort((~amask).to(torch.int8), dim=1, stable=True).to(torch.int32)
    return order.contiguous(), amask.sum(1).to(torch.int32).contiguous()


class _NumbaImpl:
    @staticmethod
    def forward(rho, gram, amask, scale):
        from . import fused_numba as k
        if rho.dtype not in (torch.float32, torch.float64) or gram.dtype != rho.dtype:
            raise ValueError(f"scoring.kernel=numba: float32 or float64 inputs of one dtype, got {rho.dtype} and "
                             f"{gram.dtype}; use kernel torch for other dtypes")
        _threads()
        G, A, L, Q = rho.shape
        valid, nvalid = _valid_index(amask)
        num, n2 = rho.new_empty(A, Q), rho.new_empty(A, Q)
        k.forward(rho.numpy(), gram.numpy(), valid.numpy(), nvalid.numpy(), _scalar(scale, rho), num.numpy(), n2.numpy(),
                  rho.dtype == torch.float32)
        return num, n2

    @staticmethod
    def backward(rho, gram, amask, u, w, scale):
        from . import fused_numba as k
        _threads()
        valid, nvalid = _valid_index(amask)
        d_rho, d_gram = torch.empty_like(rho), torch.empty_like(gram)
        k.backward(rho.numpy(), gram.numpy(), valid.numpy(), nvalid.numpy(), _scalar(scale, rho),
                   u.contiguous().numpy(), w.contiguous().numpy(), d_rho.numpy(), d_gram.numpy(), rho.dtype == torch.float32)
        return d_rho, d_gram


def _scalar(x: float, like: torch.Tensor):
    """A numpy scalar of the tensor's dtype, so numba compiles float32 arithmetic for float32 inputs."""
    import numpy as np
    return np.float32(x) if like.dtype == torch.float32 else np.float64(x)


def _threads() -> None:
    """numba's pool follows torch's thread count (train.threads / OMP_NUM_THREADS)."""
    import numba
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))


def _triton():
    from . import fused_triton  # imports triton: loaded only when used
    return fused_triton


# scoring.kernel's choices: the fused kernels' loaders (forward/backward of `_Reconstruct`); auto and
# torch have no fused implementation (auto is resolved per device, torch is the eager path in scoring)
KERNELS.register("auto")(None)
KERNELS.register("torch")(None)
KERNELS.register("numba")(lambda: _NumbaImpl)
KERNELS.register("triton")(_triton)


def _impl(name: str):
    return KERNELS.impl(name)()


class _Reconstruct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rho, gram, amask, weight, scale, name):
        impl = _impl(name)
        rho, gram = rho.contiguous(), gram.contiguous()
        num, n2 = impl.forward(rho, gram, amask, scale)
        norm = n2.clamp_min_(1e-12).sqrt_()
        cos = num.div_(norm)
        A, (B, n) = rho.shape[1], weight.shape
        if any(ctx.needs_input_grad[:2]):
            ctx.save_for_backward(rho, gram, amask, cos, norm, weight)
            ctx.scale, ctx.name = scale, name
        return (cos.view(A, B, n) * weight).sum(-1)

    @staticmethod
    def backward(ctx, grad):
        rho, gram, amask, cos, norm, weight = ctx.saved_tensors
        g = (grad[..., None] * weight).flatten(1)  # dL/dcos per (a, q)
        u = g / norm  # dL/dnum
        w = -g * cos / (2 * norm * norm)  # dL/dn2 = -g num / (2 |v~|^3)
        d_rho, d_gram = _impl(ctx.name).backward(rho, gram, amask, u, w, ctx.scale)
        return d_rho, d_gram, None, None, None, None


def reconstruct(rho: torch.Tensor, gram: torch.Tensor, amask: torch.Tensor, weight: torch.Tensor,
                scale: float, name: str) -> torch.Tensor:
    """out (A, B) of the module docstring with a fused kernel (`numba` or `triton`)."""
    return _Reconstruct.apply(rho, gram, amask.bool().contiguous(), weight, float(scale), name)
