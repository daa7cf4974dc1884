"""Run folders, their keys, and checkpoint I/O.

A run folder is `<output_root>/<name>-<weights key>`. The key hashes exactly what changes the
trained weights — the data (where it comes from and how it is featurised), model, scoring, loss,
training schedule and seed — and nothing else: `train.device`, `train.workers`, logging and
checkpoint cadence, every `eval.*`/`ablation.*` key and `data.force` map to the same folder, so
changing them reuses (or resumes) the run instead of retraining.

Checkpoints hold model, optimizer, scheduler, step, epoch, batch position, RNG states, best rsum,
config and code version; they are written atomically (temporary file, then rename) and loaded
strictly.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import random
from pathlib import Path

import numpy as np
import torch

from .config import PATH_KEYS, RunConfig, marked_root, to_dict
from .provenance import running_code
from .progress import PROGRESS_LOG, ProgressLog, log_progress  # noqa: F401  (re-exported)

# Keys that never change the trained weights (section -> keys; "*" = the whole section).
NOT_WEIGHTS = {"name": "*", "output_root": "*", "eval": "*", "ablation": "*",
               "data": ("force", "relevance", "spice"), "scoring": ("kernel",),
               "train": ("device", "workers", "threads", "log_every", "checkpoint_every", "dist_timeout_min", "tensorboard")}


def portable_config(cfg: RunConfig) -> dict:
    """The config as a dict with paths inside a project root relative to it: two clones (or a moved
    copy) of a project describe the same run alike."""
    raw = to_dict(cfg)
    for key in PATH_KEYS:
        section, _, name = key.rpartition(".")
        holder = raw[section] if section else raw
        root = marked_root(holder[name], resolve=False) if holder[name] and Path(holder[name]).is_absolute() else None
        if root is not None:
            holder[name] = str(Path(holder[name]).relative_to(root))
    return raw


def weights_config(cfg: RunConfig) -> dict:
    """The part of the (portable) config that determines the trained weights. Keys at their default
    value are left out, so adding an option whose default keeps today's behaviour leaves the keys
    (and the cached run folders) of existing runs as they are."""
    out, default = {}, to_dict(RunConfig())
    for section, value in portable_config(cfg).items():
        drop = NOT_WEIGHTS.get(section, ())
        if drop == "*":
            continue
        if isinstance(value, dict):
            out[section] = {k: v for k, v in value.items() if k not in drop and v != default[section].get(k)}
        elif value != default[section]:
            out[section] = value
    return out


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


def weights_key(cfg: RunConfig) -> str:
    return digest(weights_config(cfg))


def run_dir_for(cfg: RunConfig) -> Path:
    """<output_root>/<name>-<weights key>: configs that train the same weights share a folder."""
    return Path(cfg.output_root) / f"{cfg.name}-{weights_key(cfg)}"


def resolve_run_dir(cfg: RunConfig, run_dir: str | Path = "") -> Path:
    """An explicit run folder, or the config's own (`run_dir_for`)."""
    return Path(run_dir) if run_dir else run_dir_for(cfg)


def checkpoint_path(run_dir, checkpoint: str | Path = "") -> Path:
    """An explicit checkpoint, or the run's best."""
    return Path(checkpoint) if checkpoint else Path(run_dir) / "checkpoints" / "best.pt"


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated or not a checkpoint; the message names it."""


def save_checkpoint(path: Path, state: dict) -> None:
    """Atomic: write a temporary file in the same folder, then rename over the target. On failure
    (a full disk, say) the temporary file is removed and the previous checkpoint stays."""
    import errno
    import shutil

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch reports ENOSPC as "basic_ios::clear: iostream error"
        full = getattr(e, "errno", None) == errno.ENOSPC or shutil.disk_usage(path.parent).free < (64 << 20)
        raise CheckpointError(f"{'no space left on' if full else 'cannot write'} {path.parent} while saving "
                              f"{path.name} ({e}); the previous {path.name} is kept") from None
    finally:
        tmp.unlink(missing_ok=True)


def load_checkpoint(path) -> dict:
    """A checkpoint dict (trusted pickles: they hold configs and optimizer state)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises RuntimeError/EOFError/UnpicklingError for damaged files
        others = [p.name for p in path.parent.glob("*.pt") if p != path]
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__}: {str(e)[:120]})"
                              + (f"; try {' or '.join(sorted(others))} in the same folder" if others else "")) from None
    if not isinstance(ck, dict) or "model" not in ck:
        raise CheckpointError(f"{path}: not a checkpoint (expected a dict with 'model')")
    return ck


def checkpoint_intact(path) -> bool:
    """A checkpoint file that exists and is whole, read cheaply: torch.save writes a zip archive whose
    directory sits at its end, so a cut or damaged file has none (the weights are not loaded)."""
    import zipfile
    try:
        with zipfile.ZipFile(path):
            return True
    except (OSError, zipfile.BadZipFile):
        return False


def rng_state(device=None) -> dict:
    """This process's RNG streams: CPU torch, numpy, Python and the CUDA generator of `device` only
    (a rank's own GPU; not every GPU of the host, whose count may differ when the run resumes)."""
    device = torch.device(device) if device is not None else None
    cuda = torch.cuda.get_rng_state(device) if device is not None and device.type == "cuda" else None
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(), "cuda": cuda}


def set_rng_state(s: dict, device=None) -> None:
    """Restore `rng_state`'s streams; the CUDA one onto `device` (this rank's GPU) when both exist.
    Checkpoints before per-device states kept a list over the saving host's GPUs: the entry of this
    device's index is used when there is one."""
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])
    device = torch.device(device) if device is not None else None
    cuda = s.get("cuda")
    if isinstance(cuda, (list, tuple)):
        idx = device.index or 0 if device is not None else 0
        cuda = cuda[idx] if idx < len(cuda) else None
    if cuda is not None and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(cuda, device)


def format_seconds(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def write_metrics(run_dir, stage: str, metrics: dict) -> None:
    """<run_dir>/<stage>_metrics.json (the last cell of every notebook). Says where without this
    machine's absolute paths, since reports are shared; NaN becomes null (strict JSON)."""
    if not run_dir:
        print("no run_dir: metrics not written")
        return
    out = Path(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{stage}_metrics.json"
    path.write_text(json.dumps(_nan_to_none(metrics), indent=2, default=str))
    # the code this stage ran (the pipeline's marker records it: an edit of a module it loaded reruns it)
    (out / f".{stage}.code.json").write_text(json.dumps(running_code()))
    print(f"metrics written to {path.name} in run folder {out.name}")


def _nan_to_none(x):
    """Strict JSON has no NaN: write null instead."""
    if isinstance(x, dict):
        return {k: _nan_to_none(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_nan_to_none(v) for v in x]
    return None if isinstance(x, float) and x != x else x
