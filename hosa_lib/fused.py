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
after the GEMM; `flash` (CPU, `reconstruct_flash`) and Triton's flash path
(`reconstruct_triton_flash`) take the band features instead and compute rho one tile at a time,
never whole. docs/scoring.md has the derivation of the backward.
"""
from __future__ import annotations

import functools
import importlib
import math
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
    if name in ("numba", "flash") and device.type != "cpu":
        return f"{name} runs on CPU tensors, these are on {device}; use triton or torch"
    if name == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return f"triton needs CUDA tensors (these are on {device}) or TRITON_INTERPRET=1 for its CPU interpreter"
    for package in {"flash": ("numba", "scipy")}.get(name, (name,)):  # flash: numba's np.dot calls SciPy's BLAS
        try:
            importlib.import_module(package)
        except ImportError:
            return f"{package} is not installed (pip install {package})"
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
        want = {"cpu": "flash", "cuda": "triton"}.get(device.type)
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


@functools.cache
def _blas_controller():
    import scipy.linalg.cython_blas  # noqa: F401  (the BLAS numba's np.dot calls: loaded before the scan)
    from threadpoolctl import ThreadpoolController
    return ThreadpoolController()  # scanning the loaded libraries takes ~1 ms: once


def _one_blas_thread():
    """numba's np.dot runs SciPy's OpenBLAS, which goes multi-threaded on products above ~260K multiply-adds
    (the flash kernels' block products are); inside numba's parallel loop that oversubscribes the cores
    many times over. One BLAS thread while a flash kernel runs (threadpoolctl restores it after)."""
    return _blas_controller().limit(limits=1, user_api="blas")


def _triton():
    from . import fused_triton  # imports triton: loaded only when used
    return fused_triton


# scoring.kernel's choices: the fused kernels' loaders (forward/backward of `_Reconstruct`); auto and
# torch have no fused implementation (auto is resolved per device, torch is the eager path in scoring)
KERNELS.register("auto")(None)
KERNELS.register("torch")(None)
KERNELS.register("numba")(lambda: _NumbaImpl)
KERNELS.register("triton")(_triton)
KERNELS.register("flash")(None)  # CPU, from the band features: reconstruct_flash (not through _Reconstruct)


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


# ------------------------------------------------------------------------------- flash (CPU, numba)
FLASH_QB = 144  # query positions per tile (rounded down to whole query items): four items of 36 regions, no
                # padding; an (L, 144) float32 tile of rho is 7 KiB at L = 12
FLASH_LANES = 16  # tiles padded to a multiple of this many positions: one AVX-512 vector of float32 (two AVX2)
FLASH_AB = 16  # training's anchors per block (forward and backward): their valid rows make one band-share GEMM (up to 192 x 144
               # floats at L = 12, 108 KiB, in L2). 144 / 16 against 128 / 8 (3 items of 36 padded to 112): scoring
               # 14 % and a training step 9 % faster on Zen 3 (medians of 11 and 7 alternating runs), the GEMMs at
               # 77-78 GFLOP/s a core where 96 x 66 x 112 ran at 57-68
FLASH_ROWS = 384  # the forward's stacked anchor rows per block, at most (`_anchor_blocks`)


def _flash_anchors(abands, gram, amask):
    """The anchor side with each anchor's valid positions first (the kernels then work on row prefixes):
    (ab, gram, idx, nvalid), ab and gram the inputs themselves when that order is theirs already."""
    G, A, L, P2 = abands.shape
    order, nvalid = _valid_index(amask)
    idx = order.long()
    if bool((order == torch.arange(L, dtype=order.dtype)).all()):  # valid positions first already: no copies
        return abands.contiguous(), gram.contiguous(), idx, nvalid
    ab = abands.gather(2, idx[None, :, :, None].expand(G, A, L, P2)).contiguous()
    gr = gram.gather(2, idx[None, :, :, None].expand(G, A, L, L))
    return ab, gr.gather(3, idx[None, :, None, :].expand(G, A, L, L)).contiguous(), idx, nvalid


def _flash_queries(qbands, n_item: int, untransposed: bool = True):
    """The query side in tiles of per_tile whole items (n_item positions each), each tile zero-padded to QB
    positions (a multiple of FLASH_LANES): (qb (G, T, QB, P2) or None when not `untransposed` (only the
    backward reads it), qbt (G, T, P2, QB), pos (Q,): each query position's place in the tiles, per_tile,
    qnorm (G, T): the largest squared norm of a tile's positions per band, the kernels' bound on rho)."""
    G, Q, P2 = qbands.shape
    per_tile = max(1, FLASH_QB // n_item)
    items = per_tile * n_item  # positions of items per tile
    QB = -(-items // FLASH_LANES) * FLASH_LANES
    T = -(-Q // items)
    q = torch.arange(Q)
    pos = (q // items) * QB + q % items
    from . import fused_flash as k
    _threads()
    qbt, qnorm = qbands.new_empty(G, T, P2, QB), qbands.new_empty(G, T)
    k.query_tiles(qbands.detach().numpy(), items, qbt.numpy(), qnorm.numpy())
    if not untransposed:
        return None, qbt, pos, per_tile, qnorm
    if T * QB == Q:  # no padding anywhere (e.g. four 36-region images per tile): the tiles are qbands itself
        return qbands.detach().contiguous().view(G, T, QB, P2), qbt, pos, per_tile, qnorm
    qb = qbands.new_zeros(G, T * QB, P2)
    qb[:, pos] = qbands
    return qb.view(G, T, QB, P2), qbt, pos, per_tile, qnorm


def _at(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """x[:, pos]: the query positions' columns of x (., T * QB, ...) laid out in tiles, x itself where the tiles
    hold no padding (pos is then 0, 1, ..., Q - 1; a gather of the whole array saved)."""
    return x if x.shape[1] == len(pos) else x[:, pos]


def _flash_layout(abands, qbands, gram, amask, n_item: int):
    """Both sides as the kernels read them (`_flash_anchors`, `_flash_queries`): (ab, gram, qb, qbt, idx,
    nvalid, pos, per_tile, qnorm)."""
    ab, gr, idx, nvalid = _flash_anchors(abands, gram, amask)
    qb, qbt, pos, per_tile, qnorm = _flash_queries(qbands, n_item)
    return ab, gr, qb, qbt, idx, nvalid, pos, per_tile, qnorm


def _unorder(x: torch.Tensor, idx: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """Undo the valid-first order of `_flash_layout` along `dims` of x (G, A, L, ...)."""
    G, A, L = x.shape[:3]
    if bool((idx == torch.arange(L)).all()):  # the order was the identity
        return x
    for dim in dims:
        shape = [1] * x.dim()
        shape[1], shape[dim] = A, L
        x = torch.zeros_like(x).scatter_(dim, idx.view(shape).expand_as(x), x)
    return x


def _packed(ab: torch.Tensor, nvalid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The anchors' valid rows of ab (G, A, L, P2) stacked: (G, sum of nvalid, P2), the i-th anchor's rows
    at offs[i]:offs[i + 1] (the flash kernels' block GEMMs read a block of anchors as one matrix), offs, and
    each stacked row's squared norm (G, sum of nvalid) (the kernels' bound on rho)."""
    offs = torch.zeros(ab.shape[1] + 1, dtype=torch.int64)
    offs[1:] = nvalid.long().cumsum(0)
    packed = ab[:, _valid_rows(ab, nvalid)].contiguous()
    return packed, offs, torch.linalg.vector_norm(packed, dim=-1).square_()


def _valid_rows(ab: torch.Tensor, nvalid: torch.Tensor) -> torch.Tensor:
    return torch.arange(ab.shape[2])[None] < nvalid[:, None].long()  # (A, L)


def _flash_check(abands, qbands, gram):
    if abands.dtype not in (torch.float32, torch.float64) or {qbands.dtype, gram.dtype} != {abands.dtype}:
        raise ValueError(f"scoring.kernel=flash: float32 or float64 inputs of one dtype, got {abands.dtype}, "
                         f"{qbands.dtype} and {gram.dtype}; use kernel torch for other dtypes")


def _anchor_blocks(offs: torch.Tensor, tiles: int, threads: int) -> torch.Tensor:
    """The forward's blocks of anchors, as boundaries (nb + 1 anchor indices; offs: the stacked rows' offsets):
    nb blocks of about the same number of rows, at most FLASH_ROWS where whole anchors allow, nb raised (up to
    the number of anchors) until the nb x tiles tasks split evenly over the threads. numba's prange hands each
    thread one contiguous range of tasks, so uneven work is waited for: with fixed blocks of 16 anchors, a
    98-caption scoring chunk made 6 full blocks and one of 2, and one thread did 21 tasks' work while the
    other did 15 (13 % of the kernel's time). Fewer, larger blocks also run the GEMM faster (384 x 66 x 144
    against 192 x 66 x 144: ~5 % of the kernel at 2P = 66)."""
    A, R = len(offs) - 1, int(offs[-1])
    nb = min(max(1, A), max(1, -(-R // FLASH_ROWS)))
    while (nb * tiles) % threads and nb < A:
        nb += 1
    return _row_split(offs, nb)


def _row_split(offs: torch.Tensor, parts: int) -> torch.Tensor:
    """Boundaries (parts + 1 anchor indices) of `parts` runs of consecutive anchors with about the same number
    of stacked rows each (offs: the rows' offsets, one more than the anchors)."""
    bounds = torch.searchsorted(offs, offs[-1] * torch.arange(parts + 1) // parts)
    bounds[0], bounds[-1] = 0, len(offs) - 1
    return bounds


def _flash_call(k, packed, offs, qbt, gr, nvalid, scale, num, n2, valid, n, per_tile, local, arg, weight, out,
                anorm, qnorm, even: bool = False):
    """The forward kernel, in `_anchor_blocks` where `even` (scoring without gradients), else in blocks of
    FLASH_AB anchors (training): a block's composition decides which rows OpenBLAS computes with its tail
    micro-kernel, so other blocks change the float32 rounding of the band shares and, over an epoch, a trained
    model's bits. Training batches split evenly already (B = 128: 8 blocks x 32 tiles), and the even blocks gave
    them nothing (paired ratio 0.999); scoring gains ~12 % and a score moves by float32 rounding at most."""
    import numba

    _threads()
    if even:
        blocks = _anchor_blocks(offs, qbt.shape[1], numba.get_num_threads())
    else:
        A = len(offs) - 1
        blocks = torch.arange(0, A + FLASH_AB, FLASH_AB).clamp_max_(A).unique_consecutive()
    with _one_blas_thread():
        k.forward(packed.numpy(), offs.numpy(), qbt.numpy(), gr.numpy(), nvalid.numpy(), _scalar(scale, packed),
                  num.numpy(), n2.numpy(), packed.dtype == torch.float32, valid.numpy(), n, per_tile, local.numpy(),
                  arg.numpy(), blocks.numpy(), weight.numpy(), out.numpy(), anorm.numpy(), qnorm.numpy())


def _local_buffers(qvalid, pos, qbt, A: int, L: int, with_arg: bool):
    """The kernel's query mask in tile order (qvalid (B, n) scattered to the tiles' positions; zeros without it)
    and its local-score outputs: the maxima (A, L, B) and, `with_arg`, where they are; empty without qvalid."""
    valid = torch.zeros(qbt.shape[1] * qbt.shape[3], dtype=torch.int8)
    if qvalid is None:
        return valid, qbt.new_empty(0, L, 0), torch.empty(0, L, 0, dtype=torch.int32)
    valid[pos] = qvalid.flatten().to(torch.int8)
    B = qvalid.shape[0]
    return valid, qbt.new_empty(A, L, B), torch.empty(A if with_arg else 0, L, B, dtype=torch.int32)


def _flash_forward(abands, qbands, gram, amask, weight, scale, qvalid=None):
    """(out (A, B), what the backward reads (`_flash_layout`'s tensors, then the stacked anchors, their offsets
    and squared norms), per_tile, cos and norm (A, Q), and with qvalid (B, n): the local score's
    per-word maxima (A, L, B) (valid words first, 0 past them) and where they are (A, L, B))."""
    from . import fused_flash as k
    _flash_check(abands, qbands, gram)
    (A, L, Q), (B, n) = (abands.shape[1], abands.shape[2], qbands.shape[1]), weight.shape
    ab, gr, qb, qbt, idx, nvalid, pos, per_tile, qnorm = _flash_layout(abands, qbands, gram, amask, n)
    T, QB = qb.shape[1], qb.shape[2]
    num, n2 = ab.new_empty(A, T * QB), ab.new_empty(A, T * QB)
    valid, local, arg = _local_buffers(qvalid, pos, qbt, A, L, with_arg=True)
    packed, offs, anorm = _packed(ab, nvalid)
    _flash_call(k, packed, offs, qbt, gr, nvalid, scale, num, n2, valid, n, per_tile, local, arg,
                ab.new_empty(0, 0), ab.new_empty(0, 0), anorm, qnorm)
    norm = _at(n2, pos).clamp_min(1e-12).sqrt()
    cos = _at(num, pos) / norm
    saved = (ab, gr, qb, qbt, idx, nvalid, pos, packed, offs, anorm, qnorm)
    return (cos.view(A, B, n) * weight).sum(-1), saved, per_tile, cos, norm, local, arg


def _flash_scores(abands, qbands, gram, amask, weight, scale, qvalid=None, cache: dict | None = None):
    """`_flash_forward`'s scores without what a backward needs: the kernel writes out (A, B) itself (no
    (A, Q) arrays, no gathers), the query tiles are built transposed only, and the anchors' layout is
    taken from / kept in `cache` (a dict owned by the anchor side: all-pairs scoring reuses one caption
    chunk for every image chunk). -> (out, the local maxima (A, L, B) or None)."""
    from . import fused_flash as k
    _flash_check(abands, qbands, gram)
    (A, L), (B, n) = abands.shape[1:3], weight.shape
    anchors = cache.get("flash_anchors") if cache is not None else None
    if anchors is None:
        ab, gr, _, nvalid = _flash_anchors(abands, gram, amask)
        anchors = (*_packed(ab, nvalid), gr, nvalid)
        if cache is not None:
            cache["flash_anchors"] = anchors
    packed, offs, anorm, gr, nvalid = anchors
    _, qbt, pos, per_tile, qnorm = _flash_queries(qbands, n, untransposed=False)
    valid, local, arg = _local_buffers(qvalid, pos, qbt, A, L, with_arg=False)
    out, empty = packed.new_empty(A, B), packed.new_empty(0, 0)
    _flash_call(k, packed, offs, qbt, gr, nvalid, scale, empty, empty, valid, n, per_tile, local, arg,
                weight.to(packed.dtype).contiguous(), out, anorm, qnorm, even=True)
    return out, (local if qvalid is not None else None)


class _BandFeatures(torch.autograd.Function):
    """`scoring.band_features` with gradients on CPU: the forward as `band_gather`, the backward as
    `fused_flash.band_scatter` then the unnormalised inverse FFT that torch's rfft backward runs (on the
    same zero-padded full-length spectrum), so values and gradients are bit for bit those of the torch
    path, in about two thirds of its time (a B = 128 training step at d 1024, G 16 takes ~8 % less). Why by
    hand: torch's backward of the padding, weighting and complex gather is five passes over the spectrum."""

    @staticmethod
    def forward(ctx, x, idx, weight):
        from . import fused_flash as k
        n = math.prod(x.shape[:-1])  # rows (views by n, not -1: a tensor may have no rows)
        spec = torch.view_as_real(torch.fft.rfft(x, dim=-1))
        out = x.new_empty(len(idx), *x.shape[:-1], 2 * idx.shape[1])
        k.band_gather(spec.reshape(n, spec.shape[-2], 2).numpy(), idx.numpy(), weight.numpy(),
                      out.view(len(idx), n, out.shape[-1]).numpy())
        ctx.save_for_backward(idx, weight)
        ctx.shape = x.shape
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        from . import fused_flash as k
        idx, weight = ctx.saved_tensors
        n, d = math.prod(ctx.shape[:-1]), ctx.shape[-1]
        full = torch.empty(*ctx.shape, dtype=torch.complex64 if grad.dtype == torch.float32 else torch.complex128)
        _threads()
        k.band_scatter(grad.contiguous().view(len(idx), n, grad.shape[-1]).numpy(), idx.numpy(), weight.numpy(),
                       torch.view_as_real(full).view(n, d, 2).numpy())
        return torch.fft.ifft(full, dim=-1, norm="forward").real, None, None


def band_features(x: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
    """`scoring.band_features` of a CPU tensor x (float32/64) in numba, differentiable (`_BandFeatures`),
    or None where numba or SciPy is not installed (the caller takes the torch path)."""
    if _unavailable("flash", x.device) is not None:
        return None
    _threads()
    return _BandFeatures.apply(x, idx, weight)


def _needs_grad(*xs: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(x.requires_grad for x in xs)


class _Flash(torch.autograd.Function):
    @staticmethod
    def forward(ctx, abands, qbands, gram, amask, weight, scale, qvalid):
        out, saved, per_tile, cos, norm, local, arg = _flash_forward(abands, qbands, gram, amask, weight, scale, qvalid)
        if any(ctx.needs_input_grad[:3]):
            ctx.save_for_backward(*saved, cos, norm, weight, arg)
            ctx.scale, ctx.per_tile = scale, per_tile
        ctx.mark_non_differentiable(arg)
        return out, local

    @staticmethod
    def backward(ctx, grad, grad_local):
        import numba

        from . import fused_flash as k
        ab, gr, qb, qbt, idx, nvalid, pos, packed, offs, anorm, qnorm, cos, norm, weight, arg = ctx.saved_tensors
        G, A, L, P2 = ab.shape
        T, QB = qb.shape[1], qb.shape[2]
        g = (grad[..., None] * weight).flatten(1)  # dL/dcos per (a, q)
        u, w = g / norm, -g * cos / (2 * norm * norm)  # dL/dnum, dL/dn2 per (a, q)
        if T * QB != len(pos):  # padded tiles: zero at the padding
            u, w = (ab.new_zeros(A, T * QB).index_copy_(1, pos, x) for x in (u, w))
        glocal = ab.new_zeros(0, L, 0) if grad_local is None or arg.numel() == 0 else grad_local.contiguous()
        _threads()
        chunks = max(1, min(A, numba.get_num_threads()))
        cstart = _row_split(offs, chunks)  # chunk c owns the anchors cstart[c]:cstart[c + 1]
        d_packed, d_gram = torch.empty_like(packed), torch.empty_like(gr)
        d_qb = ab.new_empty(chunks, G, T, QB, P2)
        with _one_blas_thread():
            k.backward(packed.numpy(), offs.numpy(), cstart.numpy(), qbt.numpy(), qb.numpy(),
                       gr.numpy(), nvalid.long().numpy(), _scalar(ctx.scale, ab), u.numpy(), w.numpy(), d_packed.numpy(),
                       d_qb.numpy(), d_gram.numpy(), ab.dtype == torch.float32, glocal.numpy(), arg.numpy(),
                       weight.shape[1], ctx.per_tile, FLASH_AB, anorm.numpy(), qnorm.numpy())
        if packed.shape[1] == A * L:  # every position valid: the stacked rows are ab's own
            d_ab = d_packed.view(G, A, L, P2)
        else:
            d_ab = torch.zeros_like(ab)
            d_ab[:, _valid_rows(ab, nvalid)] = d_packed
        d_qbands = _at(d_qb.sum(0).view(G, T * QB, P2), pos)
        return _unorder(d_ab, idx, (2,)), d_qbands, _unorder(d_gram, idx, (2, 3)), None, None, None, None


def reconstruct_flash(abands: torch.Tensor, qbands: torch.Tensor, gram: torch.Tensor, amask: torch.Tensor,
                      weight: torch.Tensor, scale: float, cache: dict | None = None) -> torch.Tensor:
    """out (A, B) of the module docstring from the band features instead of rho: abands (G, A, L, P2)
    of the anchors, qbands (G, Q, P2) of the query positions, rho = abands @ qbands^T computed one
    tile at a time inside the kernel (`fused_flash`), never whole. Differentiable in abands, qbands
    and gram (the backward recomputes each tile). Without gradients the kernel writes the scores
    itself (`_flash_scores`; cache: the anchor side's, see there)."""
    return _flash(abands, qbands, gram, amask.bool().contiguous(), weight, scale, None, cache)[0]


def _flash(abands, qbands, gram, amask, weight, scale, qvalid, cache):
    """(out, local maxima or None): `_flash_scores` without gradients, else the autograd function."""
    if not _needs_grad(abands, qbands, gram):
        return _flash_scores(abands, qbands, gram, amask, weight, float(scale), qvalid, cache)
    return _Flash.apply(abands, qbands, gram, amask, weight, float(scale), qvalid)


def flash_with_local(abands, qbands, gram, amask, weight, scale, qvalid, pool: str, cache: dict | None = None):
    """`reconstruct_flash` for caption anchors (t2i), plus TERAN's local score from the same tiles (the
    band shares of a pair add up to its region-word cosines): (high (A, B), local (A, B)). qvalid (B, n):
    the positions the max runs over (the query mask; all True for TERAN's padding rule); pool: sum or
    mean over the caption's valid words. Both differentiable (the local score's gradient reaches every
    band's share at each word's best region)."""
    amask = amask.bool().contiguous()
    out, best = _flash(abands, qbands, gram, amask, weight, scale, qvalid.bool(), cache)
    local = best.sum(1)
    return out, local / amask.sum(1).clamp_min(1).to(local.dtype)[:, None] if pool == "mean" else local


class _TritonFlash(torch.autograd.Function):
    @staticmethod
    def forward(ctx, abands, qbands, gram, amask, weight, scale):
        from . import fused_triton
        num, n2 = fused_triton.flash_forward(abands, qbands, gram, amask, scale)
        norm = n2.clamp_min_(1e-12).sqrt_()
        cos = num.div_(norm)
        if any(ctx.needs_input_grad[:3]):
            ctx.save_for_backward(abands, qbands, gram, amask, cos, norm, weight)
            ctx.scale = scale
        A, (B, n) = abands.shape[1], weight.shape
        return (cos.view(A, B, n) * weight).sum(-1)

    @staticmethod
    def backward(ctx, grad):
        from . import fused_triton
        abands, qbands, gram, amask, cos, norm, weight = ctx.saved_tensors
        g = (grad[..., None] * weight).flatten(1)  # dL/dcos per (a, q)
        u, w = g / norm, -g * cos / (2 * norm * norm)  # dL/dnum, dL/dn2
        d_ab, d_qb, d_gram = fused_triton.flash_backward(abands, qbands, gram, amask, u, w, ctx.scale)
        return d_ab, d_qb, d_gram, None, None, None


def reconstruct_triton_flash(abands, qbands, gram, amask, weight, scale) -> torch.Tensor:
    """`reconstruct` through the Triton kernels that compute the band shares per tile in registers, same
    arguments as reconstruct_flash: the forward (`fused_triton.flash_forward`) and, when gradients are
    needed, the backward (`fused_triton.flash_backward`: one pass per anchor for d_abands and d_gram, one
    per query block for d_qbands, each tile recomputed). Bands too wide for the backward's register tiles
    (`fused_triton.flash_backward_launch`, e.g. G = 1 or 8 at d 1,024) train on the materialised band
    shares instead (the fused Triton kernel after one GEMM), with a one-line notice."""
    from . import fused_triton
    amask = amask.bool().contiguous()
    wide = fused_triton.flash_backward_launch(abands.shape[2], abands.shape[3]) is None
    if wide and _needs_grad(abands, qbands, gram):
        _notice(f"scoring.kernel=triton: band width {abands.shape[3]} at anchors of {abands.shape[2]} positions "
                "exceeds the flash backward's register tiles; training reads the materialised band shares")
        rho = torch.matmul(abands.flatten(1, 2), qbands.transpose(1, 2)).view(*abands.shape[:3], -1)
        return reconstruct(rho, gram, amask, weight, scale, "triton")
    return _TritonFlash.apply(abands, qbands, gram, amask, weight, float(scale))
