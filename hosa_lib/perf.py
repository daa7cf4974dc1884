"""Where work runs: the device a params file names, and process-level CPU performance settings."""
from __future__ import annotations

import ctypes
import sys

_DONE = False


def tune_cpu_allocator() -> bool:
    """Keep large tensor buffers on glibc's heap instead of fresh mmaps.

    The scoring allocates (G, Nc, L, Ni, M) temporaries of tens of MB per step; by default glibc
    serves each from a new mmap and returns it on free, so every step page-faults its buffers in
    again (measured here: a 30 % slower HOSA training step). Raising the mmap threshold to its
    maximum (32 MiB) and the trim threshold keeps freed buffers for reuse; it is what jemalloc or
    tcmalloc would do. No-op off glibc Linux. Returns whether it was applied.
    """
    global _DONE
    if _DONE or not sys.platform.startswith("linux"):
        return _DONE
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        ok = libc.mallopt(M_MMAP_THRESHOLD, 32 << 20) == 1 and libc.mallopt(M_TRIM_THRESHOLD, 1 << 30) == 1
    except (OSError, AttributeError):
        ok = False
    _DONE = ok
    return ok


def resolve_device(name: str):
    """torch device of `train.device`: auto = the first CUDA GPU when there is one, else the CPU."""
    import torch

    from .config import ConfigError
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name!r} but CUDA is not available")
    return torch.device(name)
