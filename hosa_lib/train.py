"""Training: `python -m hosa_lib.train PARAMS [--run-dir DIR]`, or under torchrun for DDP.

The run folder holds params.yaml, code_version.txt, metrics.jsonl (loss terms per step,
validation metrics per epoch) and checkpoints/{last,best}.pt, written atomically. A run whose
folder has checkpoints/last.pt resumes from it (model, optimizer, scheduler, RNG states, epoch
and batch position), reaching the same weights as an uninterrupted run — unless the checkpoints
cannot be continued (another build of the store, other code, unreadable, best.pt lost: `recover`),
in which case it trains from the start and says why.
"""
from __future__ import annotations

if __name__ == "__main__":  # answer --help and usage errors before torch loads
    from hosa_lib.cli import early
    early("train")

import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml
from tqdm import tqdm  # plain tqdm: widget bars render blank in offline HTML

from . import code_version
from .config import ConfigError, RunConfig, load, override, to_dict
from .data import CaptionDataset, EpochSampler, collate, positives, to_device, twin_groups
from .evaluate import encode_split, evaluate_embeddings
from .factory import build_model, resolve_device
from .model import HOSA
from .scoring import SCORING_TERMS
from .perf import tune_cpu_allocator
from .provenance import KEEP_STALE_ENV, STALE_NOTE, changed_modules, is_current, keep_stale, running_code
from .store import Store
from .runs import (CheckpointError, ProgressLog, checkpoint_intact, format_seconds, load_checkpoint, log_progress, rng_state, run_dir_for, save_checkpoint,
                   set_rng_state)


def lr_lambda(cfg: RunConfig, steps_per_epoch: int):
    """The learning-rate factor of each step: linear warm-up (TERAN's style one step ahead), then
    x lr_decay at each epoch of lr_decay_epochs and, with lr_decay_every = N, at every N-th epoch
    (StepLR, which TERAN steps once per epoch)."""
    tc = cfg.train
    ahead = 2 if tc.lr_warmup_style == "teran" else 1

    def f(step: int) -> float:
        warm = min(1.0, (step + ahead) / tc.lr_warmup_steps) if tc.lr_warmup_steps else 1.0
        epoch = step // max(1, steps_per_epoch)
        decays = sum(epoch >= e for e in tc.lr_decay_epochs) + (epoch // tc.lr_decay_every if tc.lr_decay_every else 0)
        return warm * tc.lr_decay ** decays
    return f


def _gather(img: dict, cap: dict, img_idx: torch.Tensor, cap_img_idx: torch.Tensor) -> tuple[dict, dict, torch.Tensor]:
    """DDP: gather encoded images/captions of all ranks (autograd-aware), dedupe images globally.
    img_idx: store index of each local image; cap_img_idx: store index of each local caption's image."""
    import warnings

    from torch.distributed.nn.functional import all_gather as _all_gather

    def all_gather(x):  # autograd-aware; its deprecation points at a private API, so keep it quiet
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return _all_gather(x)

    world = dist.get_world_size()
    sizes = torch.tensor([len(img_idx), cap["local"].shape[1]], device=img_idx.device)
    all_sizes = [torch.zeros_like(sizes) for _ in range(world)]
    dist.all_gather(all_sizes, sizes)
    n_max, t_max = max(int(s[0]) for s in all_sizes), max(int(s[1]) for s in all_sizes)

    def pad_rows(x, n):
        return torch.nn.functional.pad(x, (0, 0) * (x.dim() - 1) + (0, n - x.shape[0]))

    def pad_t(x):
        return torch.nn.functional.pad(x, (0, 0, 0, t_max - x.shape[1]) if x.dim() == 3 else (0, t_max - x.shape[1]))

    g_img = {k: torch.cat([t[:int(s[0])] for t, s in zip(all_gather(pad_rows(v.float() if v.dtype == torch.bool else v, n_max)), all_sizes)])
             for k, v in img.items()}
    g_img["mask"] = g_img["mask"].bool()
    g_img_idx = torch.cat([t[:int(s[0])] for t, s in zip(all_gather(pad_rows(img_idx, n_max)), all_sizes)])
    g_cap = {k: torch.cat(all_gather(v if k == "glob" else pad_t(v.float() if v.dtype == torch.bool else v)))
             for k, v in cap.items()}
    g_cap["mask"] = g_cap["mask"].bool()
    g_cap_img = torch.cat(all_gather(cap_img_idx))
    first = {}  # store image index -> first gathered row holding it
    for row, x in enumerate(g_img_idx.tolist()):
        first.setdefault(x, row)
    keep = torch.tensor(sorted(first.values()), device=g_img_idx.device)
    g_img = {k: v[keep] for k, v in g_img.items()}
    return g_img, g_cap, positives(g_img_idx[keep], g_cap_img)


def train_step(model, batch, cfg: RunConfig, step: int, device, amp: bool) -> dict:
    """Forward + loss (+ gather across ranks under DDP). Returns the loss dict (not yet backpropagated)."""
    batch = to_device(batch, device)
    core = model.module.core if hasattr(model, "module") else model
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        img = model(batch["images"], mode="images") if hasattr(model, "module") else core.encode_images(batch["images"])
        cap = model(batch["captions"], mode="captions") if hasattr(model, "module") else core.encode_captions(batch["captions"])
    img = {k: v.float() if v.is_floating_point() else v for k, v in img.items()}
    cap = {k: v.float() if v.is_floating_point() else v for k, v in cap.items()}
    if dist.is_initialized() and dist.get_world_size() > 1:
        img, cap, pos = _gather(img, cap, batch["images"]["index"], batch["captions"]["image"])
    else:
        pos = positives(batch["images"]["index"], batch["captions"]["image"])
    scores = core.score(img, cap)
    out = core.loss(scores["total"], pos, step)
    return {**out, "n_pairs": torch.tensor(float(scores["total"].numel()))}


class _DDPWrapper(torch.nn.Module):
    """Routes forward(mode=...) to the encoders so DistributedDataParallel sees forward calls."""

    def __init__(self, core: HOSA):
        super().__init__()
        self.core = core

    def forward(self, batch, mode: str):
        return self.core.encode_images(batch) if mode == "images" else self.core.encode_captions(batch)


def validate(core: HOSA, cfg: RunConfig, text, device) -> dict:
    """Retrieval metrics on the val split (its first train.val_images images when set)."""
    img, cap, cap_img = encode_split(core, cfg.data.store, "val", text, device)
    if cfg.train.val_images and cfg.train.val_images < len(img["glob"]):
        keep_img = np.arange(cfg.train.val_images)
        keep_cap = np.nonzero(cap_img < cfg.train.val_images)[0]
        img = {k: v[keep_img] for k, v in img.items()}
        cap = {k: v[keep_cap] for k, v in cap.items()}
        cap_img = cap_img[keep_cap]
    ecfg = override(cfg.eval, {"protocol": "all", "shortlist": 0})
    m, _ = evaluate_embeddings(img, cap, cap_img, core.scoring_config(), ecfg, device=device)
    core.train()
    return {**m, "n_images": len(img["glob"])}


def stale_for(epoch: int, best_epoch: int, patience: int, distributed: bool) -> bool:
    """Early stopping: `patience` epochs have ended since the best val rsum (epoch -1 = the untrained
    model). Rank 0 alone validates, so under DDP its decision is broadcast to every rank."""
    stop = bool(patience) and epoch - 1 - best_epoch >= patience
    if distributed:
        flag = torch.tensor([float(stop)], device="cuda" if dist.get_backend() == "nccl" else "cpu")
        dist.broadcast(flag, 0)
        stop = bool(flag.item())
    return stop


class _StopRequest:
    """SIGINT/SIGTERM during training ask for a stop between steps (a checkpoint is saved first);
    previous handlers come back when training ends. Only the main thread can install handlers."""

    def __init__(self):
        import signal
        import threading
        self.requested, self.previous = False, {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._ask)

    def _ask(self, signum, frame):
        if self.requested:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.requested = True

    def restore(self):
        import signal
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}


def open_log(path: Path, step: int):
    """metrics.jsonl for appending, first cut back to the rows up to `step` (the resumed position), so
    a restarted run never logs a step twice."""
    if path.is_file():
        keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, path)
    return path.open("a")


def preflight(cfg: RunConfig, text, ck_dir: Path, n_params: int) -> None:
    """Everything that would otherwise fail after an epoch, checked before the first step: the splits
    a run needs (train, val), their features, boxes and caption words, a writable checkpoint folder and
    room for a checkpoint (model + optimizer state)."""
    import shutil

    from .store import Store, StoreError
    with Store(cfg.data.store) as s:  # validates features (NaN/Inf) and boxes
        missing = [sp for sp in ("train", "val") if sp not in s.split_names]
        if missing:
            raise StoreError(f"{cfg.data.store}: training needs splits train and val, missing {missing} (splits: "
                             f"{', '.join(s.split_names)}); image folders without a split column are split by "
                             "data.split_fractions when the store is built")
        for sp in ("train", "val"):
            if text.cache_key is not None:
                empty = s.captions_without_words(text.cache_key, s.split_captions(sp))
                if len(empty):
                    raise StoreError(f"{cfg.data.store}: {sp} caption #{int(empty[0])} "
                                     f"{s.captions([int(empty[0])])[0]!r} has no words after tokenisation")
    probe = ck_dir / f".write-test-{os.getpid()}"
    try:
        probe.write_bytes(b"x")
        probe.unlink()
    except OSError as e:
        raise CheckpointError(f"checkpoint folder {ck_dir} is not writable ({e})") from None
    need, free = 3 * 4 * n_params * 2, shutil.disk_usage(ck_dir).free  # last.pt + best.pt (+ temp)
    if free < need:
        raise CheckpointError(f"not enough disk space on {ck_dir}: a checkpoint needs about {need >> 20} MiB, "
                              f"{free >> 20} MiB free")


def warn_schedule(cfg: RunConfig, steps_per_epoch: int, run_dir: Path, progress: bool) -> list[str]:
    """Warm-ups longer than the whole run (small folders: 18 steps against 100 of warm-up) are said
    before training, in the terminal and the run's progress log."""
    total = steps_per_epoch * cfg.train.epochs
    notes = []
    if cfg.train.lr_warmup_steps > total:
        notes.append(f"warning: train.lr_warmup_steps = {cfg.train.lr_warmup_steps} is longer than the whole run "
                     f"({total} steps): the learning rate never reaches train.lr = {cfg.train.lr:g}; "
                     f"set it to about {max(1, total // 10)}")
    if cfg.loss.max_violation and cfg.loss.kind == "hinge" and cfg.loss.warmup_steps > total:
        notes.append(f"warning: loss.warmup_steps = {cfg.loss.warmup_steps} is longer than the whole run ({total} "
                     "steps): hardest negatives never start; lower it or set loss.max_violation: false")
    for line in notes:
        log_progress(run_dir, line)
        if progress:
            print(line)
    return notes


def check_resumable(cfg: RunConfig, run_dir: Path) -> None:
    """A run folder holding a run of other params (what changes the weights; the number of epochs and
    the patience may change) is refused before anything in it is touched, naming what differs."""
    from .config import from_dict
    from .runs import weights_config

    saved = run_dir / "params.yaml"
    if not (run_dir / "checkpoints" / "last.pt").is_file() or not saved.is_file():
        return
    try:
        before = weights_config(from_dict(yaml.safe_load(saved.read_text()), str(saved)))
    except (ConfigError, yaml.YAMLError, TypeError):
        return  # written by another version: the strict checkpoint load decides
    now = weights_config(cfg)
    flat = lambda d: {f"{s}.{k}": v for s, sec in d.items() for k, v in (sec.items() if isinstance(sec, dict) else
                                                                          [("", sec)])}
    a, b = flat(before), flat(now)
    diff = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k) and k not in ("train.epochs", "train.patience")]
    if diff:
        show = lambda d, k: repr(d[k]) if k in d else "the default"
        raise CheckpointError(f"run folder {run_dir} holds a run with other params: " + ", ".join(
            f"{k.rstrip('.')} = {show(a, k)} there vs {show(b, k)} now" for k in diff[:6])
            + f"; train into another folder (the params' own is {run_dir_for(cfg)}) or delete {run_dir / 'checkpoints'}")


def train(cfg: RunConfig, run_dir: str | Path | None = None, progress: bool = True,
          stop_after_steps: int | None = None, fresh: bool = False, echo: tuple[Path, str] | None = None) -> dict:
    """Train (or resume) a run. Returns {"run_dir", "best_rsum", "steps", "seconds", "train_seconds" (all
    training of the run, resumes included), "epochs_run", "best_epoch", "last_val"}. Progress: with
    progress=True bars and lines in the terminal; otherwise lines in <run_dir>/progress.log (within-epoch
    every 30 s), and also in echo = (folder, prefix)'s progress log (ablation cells: the pipeline's run).
    One process at a time trains into a run folder (a second fails at once, naming the first).
    A run folder whose checkpoints cannot be continued as they are — made from another build of the
    store, by other code (`provenance`; kept with HOSA_KEEP_STALE=1), unreadable, or whose best.pt is
    lost — trains again from the start, its old checkpoints moved to checkpoints.replaced/; so does
    fresh=True (the pipeline's --force)."""
    from .store import writing_lock
    run_dir = Path(run_dir) if run_dir else run_dir_for(cfg)
    if int(os.environ.get("RANK", "0")) != 0:  # the same decision from the same files, read only: rank 0 acts
        reason, last = start_over_reason(cfg, run_dir / "checkpoints", fresh, act=False)
        return _train(cfg, run_dir, progress, stop_after_steps, None if reason else last, echo)
    with writing_lock(run_dir / "train", subject=f"run folder {run_dir}"):
        check_resumable(cfg, run_dir)
        return _train(cfg, run_dir, progress, stop_after_steps, recover(cfg, run_dir, fresh), echo)


def start_over_reason(cfg: RunConfig, ck_dir: Path, fresh: bool, act: bool = True) -> tuple[str | None, dict | None]:
    """(why the checkpoints in ck_dir cannot be continued, or None; last.pt as loaded, which `resume`
    then uses instead of reading it again). A lost best.pt whose weights last.pt holds (its epoch was
    the best) is copied back instead (when `act`)."""
    last, best = ck_dir / "last.pt", ck_dir / "best.pt"
    if not last.is_file() and not best.is_file():
        return None, None
    if fresh:
        return "asked to train anew (--force / fresh=True)", None
    if not last.is_file():
        return f"{last.name} is missing (a run cannot continue from best.pt)", None
    try:
        ck = load_checkpoint(last)
    except CheckpointError as e:
        return f"{last.name} is unreadable ({e})", None
    with Store(cfg.data.store, check_values=False) as st:
        now = st.identity()
    was = ck.get("store") or {}
    if was and (was.get("source"), was.get("source_digest")) != (now["source"], now["source_digest"]):
        return (f"it was trained on {cfg.data.store} when the store held other data (digest "
                f"{was.get('source_digest') or '-'}, now {now['source_digest'] or '-'}; rebuilt since)"), ck
    if "train_code" in ck and not is_current(ck["train_code"]):  # the source of a module it ran changed since
        changed = changed_modules(ck["train_code"])
        if not keep_stale():
            return f"it was trained by other code (changed since: {', '.join(changed) or '?'}; {KEEP_STALE_ENV}=1 keeps it)", ck
        if act:
            print(f"{last}: {STALE_NOTE} (changed since: {', '.join(changed)}); kept ({KEEP_STALE_ENV})")
    if ck.get("best_rsum", -1.0) < 0 or checkpoint_intact(best):  # nothing validated yet, or best.pt is whole
        return None, ck
    if ck["batch_in_epoch"] == 0 and ck.get("best_epoch", -2) == ck["epoch"] - 1:  # last.pt holds the best weights
        if not act:
            return None, ck
        shutil.copyfile(last, best.with_name(".best.pt.restore"))
        os.replace(best.with_name(".best.pt.restore"), best)
        print(f"{best} was missing or unreadable: restored from {last.name}, which holds the same weights")
        return None, ck
    return (f"{best.name} is missing or unreadable and its weights (the model after epoch "
            f"{ck.get('best_epoch', -1) + 1}) are not in {last.name}"), ck


def recover(cfg: RunConfig, run_dir: Path, fresh: bool) -> dict | None:
    """Move checkpoints that cannot be continued aside (checkpoints.replaced/, one generation kept) so
    the run trains from the start; one line says why. Returns last.pt to resume from (None: start)."""
    ck_dir = run_dir / "checkpoints"
    reason, last = start_over_reason(cfg, ck_dir, fresh)
    if reason is None:
        return last
    old = run_dir / "checkpoints.replaced"
    shutil.rmtree(old, ignore_errors=True)
    os.replace(ck_dir, old)
    line = f"training {run_dir.name} from the start: {reason}; the old checkpoints are in {old.name}/"
    log_progress(run_dir, line)
    print(line)
    return None


@dataclass
class Run:
    """One training run: what `setup` builds, the position and best result so far (what a checkpoint
    holds), and the writes every rank-0 part shares (checkpoints, the metrics log)."""
    cfg: RunConfig
    run_dir: Path
    progress: bool
    rank: int
    world: int
    device: torch.device
    amp: bool
    core: HOSA
    model: torch.nn.Module  # core, or core wrapped by DistributedDataParallel
    text: object
    data: CaptionDataset
    sampler: EpochSampler
    steps_per_epoch: int
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    store_identity: dict
    step: int = 0
    epoch: int = 0
    start_batch: int = 0  # the batch the current epoch starts at (> 0 after a mid-epoch resume)
    best: float = -1.0
    best_epoch: int = -1  # -1: the untrained model
    resume_rng: dict | None = None  # RNG state of a mid-epoch checkpoint, restored once its epoch's loader exists
    last_val: dict = field(default_factory=dict)
    stopped: bool = False  # stop_after_steps reached
    log: object = None
    loader: object = None  # the DataLoader when its workers persist across epochs
    tb: object = None  # rank 0's TensorBoard SummaryWriter (train.tensorboard)
    echo: tuple | None = None  # (folder, prefix): progress lines also go to that folder's progress log
    train_seconds: float = 0.0  # time spent in training epochs, over every resume (checkpointed)

    def scalars(self, prefix: str, values: dict, step: int) -> None:
        """Numbers of `values` to TensorBoard as prefix/name at `step` (when it is on)."""
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    self.tb.add_scalar(f"{prefix}/{k}", v, step)

    @property
    def ck_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def checkpoint(self, names: tuple[str, ...], batch_in_epoch: int, epoch: int,
                   ranks: list[dict] | None = None) -> None:
        """Rank 0 saves; `ranks` (gather_rng) adds every rank's RNG state, rank 0's taken now."""
        if self.rank == 0:
            state = {"model": self.core.state_dict(), "optimizer": self.opt.state_dict(),
                     "scheduler": self.sched.state_dict(), "step": self.step, "epoch": epoch,
                     "batch_in_epoch": batch_in_epoch, "best_rsum": self.best, "best_epoch": self.best_epoch,
                     "rng": rng_state(self.device), "config": to_dict(self.cfg), "code_version": code_version(),
                     "train_code": running_code(), "store": self.store_identity, "train_seconds": self.train_seconds}
            if ranks is not None:
                state["rng_ranks"] = [state["rng"], *ranks[1:]]
            for name in names:  # best.pt is for evaluation: weights once, no optimizer moments (2x the weights)
                save_checkpoint(self.ck_dir / name, state if name != "best.pt" else
                                {k: v for k, v in state.items() if k not in RESUME_ONLY})

    def validate_and_save(self, val_epoch: int, ranks: list[dict] | None = None) -> dict:
        """Rank 0: validate, log, save last.pt (and best.pt when val rsum improved). val_epoch -1 is
        the untrained model; ranks: every rank's RNG state (gather_rng) under DDP."""
        val = validate(self.core, self.cfg, self.text, self.device)
        margin = self.cfg.train.min_delta_images * 100.0 / max(1, val["n_images"]) if self.best >= 0 else 0.0
        improved = val["rsum"] > self.best + margin
        if improved:
            self.best, self.best_epoch = val["rsum"], val_epoch
        self.log.write(json.dumps({"step": self.step, "epoch": val_epoch, "split": "val", **val}) + "\n")
        self.log.flush()
        self.scalars("val", {k: v for k, v in val.items() if k == "rsum" or k.startswith(("i2t_r", "t2i_r"))
                             or k.endswith("_acc")}, self.step)  # the step the epoch ended at (0: untrained)
        if self.tb is not None:
            self.tb.flush()
        self.checkpoint(("last.pt", "best.pt") if improved else ("last.pt",), 0, val_epoch + 1, ranks)
        self.last_val = val
        return val

    def say(self, line: str) -> None:
        log_progress(self.run_dir, line)
        if self.echo:
            log_progress(self.echo[0], self.echo[1] + line)
        if self.progress:
            print(line)


RESUME_ONLY = ("optimizer", "scheduler")  # what last.pt needs to continue and best.pt leaves out


def ddp_backend(device: torch.device) -> str:
    """NCCL for CUDA tensors, gloo for CPU ones: chosen by the device training runs on, not by whether
    the host has a GPU (train.device: cpu on a GPU host under torchrun needs gloo)."""
    return "nccl" if device.type == "cuda" else "gloo"


def gather_rng(run: "Run") -> list[dict] | None:
    """Every rank's RNG state, on rank 0 (a collective: every rank calls it at the same step). None
    without DDP."""
    if not run.distributed:
        return None
    states = [None] * run.world
    dist.all_gather_object(states, rng_state(run.device))
    return states


def rank_rng(ck: dict, rank: int, world: int) -> tuple[dict, str | None]:
    """The RNG state rank `rank` resumes with, and a notice when it is not its own: checkpoints saved
    at a step every rank reached keep each rank's state ("rng_ranks"); one saved on a stop signal, or
    by a run with another number of ranks, has rank 0's only."""
    ranks = ck.get("rng_ranks")
    if ranks is not None and len(ranks) == world:
        return ranks[rank], None
    if world == 1 or rank == 0:
        return ck["rng"], None
    return ck["rng"], (f"rank {rank} resumes with rank 0's RNG state (the checkpoint holds "
                       f"{'no per-rank states' if ranks is None else f'{len(ranks)} ranks'}): its dropout and "
                       "loader streams differ from an uninterrupted run's")


def setup(cfg: RunConfig, run_dir: Path, progress: bool) -> Run:
    """Process group, device, run folder files, model (seeded), data, optimizer and schedule."""
    tune_cpu_allocator()
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    device = resolve_device(cfg.train.device)
    if distributed and device.type == "cuda":  # torchrun: one GPU per local rank
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if device.type == "cuda":
        torch.cuda.set_device(device)  # collectives, kernels and RNG of this rank on its own GPU
    if distributed and not dist.is_initialized():
        dist.init_process_group(ddp_backend(device), timeout=timedelta(minutes=cfg.train.dist_timeout_min))
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    amp = cfg.train.amp and device.type == "cuda" and torch.cuda.is_bf16_supported()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    ck_dir = run_dir / "checkpoints"
    if rank == 0:
        ck_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "params.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        (run_dir / "code_version.txt").write_text(code_version() + "\n")

    if rank == 0 and cfg.model.anchor and cfg.model.anchor_init == "auto":  # silent for up to a minute otherwise
        log_progress(run_dir, "choosing the closed-form start: ridge map or CCA by 5-fold cross-validation "
                     "(computed once per store, then cached)")
    core, text = build_model(cfg, device, seed=cfg.train.seed)
    with Store(cfg.data.store, check_values=False) as st:  # recorded in checkpoints (evaluation compares)
        store_identity = st.identity()
        train_pairs = st.extra("train_pairs")  # twin scenes batched together (hard negatives), if any
    if rank == 0:
        preflight(cfg, text, ck_dir, sum(p.numel() for p in core.parameters()))
    data = CaptionDataset(cfg.data.store, "train", text)
    sampler = EpochSampler(len(data), cfg.train.batch_size, cfg.train.seed, rank, world,
                           groups=twin_groups(data.captions, data.caption_image, train_pairs))
    spe = sampler.batches_per_epoch()
    if spe == 0:
        raise ConfigError(f"{cfg.data.store}: the train split has {len(data)} captions, fewer than one batch of "
                          f"{cfg.train.batch_size * world}; lower train.batch_size")
    if rank == 0:
        warn_schedule(cfg, spe, run_dir, progress)
    opt = torch.optim.AdamW(core.param_groups(cfg.train), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, spe))
    return Run(cfg, run_dir, progress, rank, world, device, amp, core, core, text, data, sampler, spe, opt, sched,
               store_identity)


def resume(run: Run, ck: dict | None) -> None:
    """Continue from last.pt as `start_over_reason` loaded it (None: train from the start): weights,
    optimizer, schedule, position, best result and RNG state (a mid-epoch state once the epoch's loader
    has drawn its seed, in fit_epoch)."""
    if ck is None:
        return
    run.core.load_state_dict(ck["model"], strict=True)
    run.opt.load_state_dict(ck["optimizer"])
    run.sched.load_state_dict(ck["scheduler"])
    run.step, run.epoch, run.start_batch, run.best = ck["step"], ck["epoch"], ck["batch_in_epoch"], ck["best_rsum"]
    run.best_epoch = ck.get("best_epoch", run.epoch - 1)
    run.train_seconds = ck.get("train_seconds", 0.0)
    rng, notice = rank_rng(ck, run.rank, run.world)
    if notice:
        print(notice)
    if run.start_batch == 0:  # saved at an epoch's end: the next epoch starts from this state
        set_rng_state(rng, run.device)
    else:
        run.resume_rng = rng


class EchoLog(ProgressLog):
    """A training bar's state every 30 s as a line of the run's progress log (and of its echo's)."""

    def __init__(self, run: "Run"):
        super().__init__(run.run_dir, every=30.0)
        self.run = run

    def flush_line(self) -> None:
        if self.pending and self.run.echo:
            log_progress(self.run.echo[0], self.run.echo[1] + self.pending)
        super().flush_line()


def term_weights_now(core: HOSA) -> dict[str, float]:
    """The weight each scoring term has in the total now (learned gates folded in)."""
    cfg = core.scoring_config()
    return {t.name: float(getattr(cfg, t.weight)) for t in SCORING_TERMS}


def loader_workers(workers: int, device: torch.device) -> int:
    """train.workers, or for -1 (auto): none on CPU (its cores compute the step), on CUDA up to 4 per
    local rank, as many as its share of the host's cores."""
    if workers >= 0:
        return workers
    if device.type != "cuda":
        return 0
    return min(4, max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def epoch_batches(run: Run):
    """An iterator over this epoch's batches (the sampler set to the epoch). Each epoch draws one seed
    from the global RNG, as a fresh DataLoader iterator does, so runs with and without persistent
    workers (and resumed runs) keep one RNG stream. Worker processes persist across epochs; on CUDA
    batches come in pinned memory (non-blocking uploads in train_step)."""
    workers = loader_workers(run.cfg.train.workers, run.device)
    if workers and run.loader is not None:
        torch.empty((), dtype=torch.int64).random_()  # the draw a fresh iterator would make
        return iter(run.loader)
    loader = torch.utils.data.DataLoader(run.data, batch_sampler=run.sampler, collate_fn=collate, num_workers=workers,
                                         pin_memory=run.device.type == "cuda", persistent_workers=workers > 0)
    if workers:
        run.loader = loader
    return iter(loader)  # draws the loader's seed from the global RNG


def fit_epoch(run: Run, stop: "_StopRequest", stop_after_steps: int | None) -> dict | None:
    """Train one epoch from run.start_batch (checkpointing every train.checkpoint_every steps and when a
    stop is asked). Returns the last step's losses (None when a resume found the epoch's batches all
    done); sets run.stopped and returns at once when stop_after_steps is reached."""
    cfg = run.cfg
    run.sampler.set_epoch(run.epoch, run.start_batch)
    batches = epoch_batches(run)
    if run.resume_rng is not None:  # saved mid-epoch, i.e. after that draw: restored only now, so dropout
        set_rng_state(run.resume_rng, run.device)  # continues with the stream an uninterrupted run has here
        run.resume_rng = None
    spe, every = run.steps_per_epoch, cfg.train.checkpoint_every
    to = None if run.progress else EchoLog(run)  # not interactive: the bar every 30 s as a progress-log line
    bar = tqdm(batches, desc=f"epoch {run.epoch + 1}/{cfg.train.epochs}", disable=run.rank != 0, mininterval=2,
               initial=run.start_batch, total=spe, file=to)
    t0, out = time.perf_counter(), None
    t_mark = t0  # train_seconds counts time in this loop, up to each checkpoint
    for b, batch in enumerate(bar, start=run.start_batch):
        out = train_step(run.model, batch, cfg, run.step, run.device, run.amp)
        run.opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        if cfg.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(run.core.clip_parameters(), cfg.train.grad_clip)
        run.opt.step()
        run.sched.step()
        run.step += 1
        if run.log and (run.step % cfg.train.log_every == 0 or b == spe - 1):
            rate = (b + 1 - run.start_batch) * cfg.train.batch_size * run.world / (time.perf_counter() - t0)
            rec = {"step": run.step, "epoch": run.epoch, **{k: v.item() for k, v in out.items()},
                   "lr": run.sched.get_last_lr()[0], "pairs_per_s": rate}
            run.log.write(json.dumps(rec) + "\n")
            run.log.flush()
            run.scalars("train", {k: v for k, v in rec.items() if k not in ("step", "epoch")}, run.step)
            run.scalars("weights", term_weights_now(run.core), run.step)
            bar.set_postfix(loss=f"{rec['loss']:.3f}", pairs_s=f"{rate:.0f}")
        now = time.perf_counter()
        run.train_seconds, t_mark = run.train_seconds + now - t_mark, now
        if every and run.step % every == 0 and b + 1 < spe:  # every rank is here at this step
            run.checkpoint(("last.pt",), b + 1, run.epoch, gather_rng(run))
        if stop.requested:  # between steps the state is consistent: save it and stop
            run.checkpoint(("last.pt",), b + 1, run.epoch)
            raise KeyboardInterrupt(f"interrupted at step {run.step}: saved {run.ck_dir / 'last.pt'}; the same "
                                    "command resumes from there")
        if stop_after_steps is not None and run.step >= stop_after_steps:
            run.stopped = True
            return out
    run.start_batch = 0
    run.epoch += 1
    return out


def _train(cfg: RunConfig, run_dir: Path, progress: bool, stop_after_steps: int | None,
           last: dict | None = None, echo: tuple[Path, str] | None = None) -> dict:
    run = setup(cfg, run_dir, progress)
    run.echo = echo
    resume(run, last)
    finished = last is not None and (run.epoch >= cfg.train.epochs or (
        run.start_batch == 0 and bool(cfg.train.patience) and run.epoch - 1 - run.best_epoch >= cfg.train.patience))
    if last is not None and run.rank == 0:
        run.say(f"run {run_dir.name} already trained: {run.epoch} of {cfg.train.epochs} epochs, best val rsum "
                f"{run.best:.1f} ({'the untrained model' if run.best_epoch < 0 else f'after epoch {run.best_epoch + 1}'})"
                if finished else f"resuming run {run_dir.name} at epoch {run.epoch + 1}, batch {run.start_batch}, "
                f"step {run.step}, best val rsum {run.best:.1f}")
    if run.distributed:
        run.model = torch.nn.parallel.DistributedDataParallel(
            _DDPWrapper(run.core), device_ids=[run.device] if run.device.type == "cuda" else None)
    run.log = open_log(run_dir / "metrics.jsonl", run.step) if run.rank == 0 else None
    if run.rank == 0 and cfg.train.tensorboard:
        from torch.utils.tensorboard import SummaryWriter
        # purge_step: a resumed run drops the events an interrupted run wrote after its checkpoint
        run.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=run.step if run.step else None)
    stop = _StopRequest()
    try:
        t_start, first_epoch = time.perf_counter(), run.epoch
        at_start = cfg.train.validate_at_start and last is None  # a checkpoint at step 0 is that validation's
        ranks = gather_rng(run) if at_start else None
        if at_start and run.rank == 0:  # the initialisation competes for best.pt
            run.validate_and_save(-1, ranks)
            run.say(f"epoch 0/{cfg.train.epochs} (untrained): val rsum {run.best:.1f}")
        if at_start and run.distributed:
            dist.barrier()
        run.core.train()
        while run.epoch < cfg.train.epochs and not finished:
            if stale_for(run.epoch, run.best_epoch, cfg.train.patience, run.distributed):
                if run.rank == 0:
                    run.say(f"early stop after epoch {run.epoch}/{cfg.train.epochs}: no better val rsum for "
                            f"{cfg.train.patience} epochs (best {run.best:.1f}, "
                            + ("the untrained model)" if run.best_epoch < 0 else f"after epoch {run.best_epoch + 1})"))
                break
            out = fit_epoch(run, stop, stop_after_steps)
            if run.stopped:
                return {"run_dir": str(run_dir), "steps": run.step, "stopped": True}
            ranks = gather_rng(run)
            if run.rank == 0:
                run.validate_and_save(run.epoch - 1, ranks)
                if stop.requested:  # asked during validation: the epoch is saved, stop here (even after the last)
                    raise KeyboardInterrupt(f"interrupted after epoch {run.epoch}: saved {run.ck_dir / 'last.pt'}; "
                                            "the same command resumes from there")
                elapsed = time.perf_counter() - t_start
                eta = elapsed / max(1, run.epoch - first_epoch) * (cfg.train.epochs - run.epoch)
                loss = f"{out['loss'].item():.3f}" if out else "(saved at the epoch's end)"
                run.say(f"epoch {run.epoch}/{cfg.train.epochs}: loss {loss}, val rsum "
                        f"{run.last_val['rsum']:.1f} (best {run.best:.1f}), elapsed {format_seconds(elapsed)}, "
                        f"ETA {format_seconds(eta)}")
            if run.distributed:
                dist.barrier()
    finally:  # handlers back and the log closed however training ends
        stop.restore()
        if run.log:
            run.log.close()
        if run.tb is not None:
            run.tb.close()
    return {"run_dir": str(run_dir), "best_rsum": run.best, "steps": run.step,
            "seconds": time.perf_counter() - t_start, "train_seconds": run.train_seconds, "epochs_run": run.epoch,
            "epochs": cfg.train.epochs, "best_epoch": run.best_epoch, "last_val": run.last_val}


def main(argv=None) -> int:
    from .cli import run

    def go(args):
        out = train(load(args.params), args.run_dir, fresh=args.fresh)
        if int(os.environ.get("RANK", "0")) == 0:
            print(json.dumps({k: v for k, v in out.items() if k != "last_val"}))
        if dist.is_initialized():
            dist.destroy_process_group()
    return run("train", go, argv)


if __name__ == "__main__":
    sys.exit(main())
