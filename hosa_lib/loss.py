"""Losses on a score matrix (images x captions), both directions: VSE++ hinge triplet (TERAN's)
and symmetric InfoNCE with a learnable temperature (`loss.kind`). `make_loss(cfg)` builds the one
the config names, as a module owning its parameters (InfoNCE's temperature); the model holds it so
that they are trained, checkpointed and gathered under DDP with the weights. A new loss is one
function, one module here and its name in `loss.kind`."""
from __future__ import annotations

import math
import os

import torch
import torch.nn as nn

from .config import LOSSES, LossConfig


def _checked(x: torch.Tensor) -> bool:
    """Value checks on CPU tensors; on a GPU only with HOSA_CHECKS=1 (each is a sync; hosa_lib.scoring.value_checks)."""
    return x.device.type == "cpu" or os.environ.get("HOSA_CHECKS") == "1"


def triplet_loss(scores: torch.Tensor, positives: torch.Tensor, cfg: LossConfig, step: int) -> dict[str, torch.Tensor]:
    """scores (B_img, B_cap); positives (B_img, B_cap) bool, True where the caption describes the image.

    Every column (caption) needs at least one positive row (several when one image appears twice,
    e.g. gathered from two ranks; the weakest positive is used). Negatives exclude every positive,
    so a batch holding two captions of one image has no false negatives. Hardest negatives
    (`max_violation`) start after `cfg.warmup_steps`; before, the sum over all negatives.
    Returns {"loss", "i2t", "t2i", "hardest": 0/1}.
    """
    if scores.shape != positives.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and positives {tuple(positives.shape)} differ")
    if _checked(positives) and not positives.any(0).all():
        raise ValueError("positives: every caption (column) needs a positive image")
    inf = torch.full_like(scores, float("inf"))
    pos = torch.where(positives, scores, inf).amin(0)  # (B_cap,) score of each caption with its image
    cost_t2i = (cfg.margin + scores - pos[None, :]).clamp(min=0).masked_fill(positives, 0)  # caption query, neg images
    img_pos = torch.where(positives, scores, inf).amin(1)  # hardest positive per image
    has_pos = positives.any(1)
    cost_i2t = (cfg.margin + scores - img_pos[:, None]).clamp(min=0).masked_fill(positives, 0)
    cost_i2t = cost_i2t.masked_fill(~has_pos[:, None], 0)
    hardest = cfg.max_violation and step >= cfg.warmup_steps
    if hardest:
        i2t, t2i = cost_i2t.amax(1).sum(), cost_t2i.amax(0).sum()
    else:
        i2t, t2i = cost_i2t.sum(), cost_t2i.sum()
    return {"loss": i2t + t2i, "i2t": i2t.detach(), "t2i": t2i.detach(),
            "hardest": torch.tensor(float(hardest))}


def infonce_loss(scores: torch.Tensor, positives: torch.Tensor, log_scale: torch.Tensor) -> dict[str, torch.Tensor]:
    """Symmetric InfoNCE: cross-entropy of each caption over the batch's images and of each image
    over the batch's captions, logits = scores * exp(log_scale) (log_scale learnable, CLIP-style,
    clamped at a scale of 100). A row with several positives (an image twice in the batch, two
    captions of one image) counts all of them: -log(sum over positives / sum over all).
    Returns {"loss", "i2t", "t2i", "scale"}."""
    if scores.shape != positives.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and positives {tuple(positives.shape)} differ")
    if _checked(positives) and not positives.any(0).all():
        raise ValueError("positives: every caption (column) needs a positive image")
    scale = log_scale.clamp(max=4.6052).exp()
    logits = scores * scale
    neg_inf = torch.finfo(logits.dtype).min
    pos_logits = logits.masked_fill(~positives, neg_inf)
    t2i = (logits.logsumexp(0) - pos_logits.logsumexp(0)).mean()  # caption query over images
    has = positives.any(1)
    i2t = (logits.logsumexp(1) - pos_logits.logsumexp(1))[has].mean()
    return {"loss": i2t + t2i, "i2t": i2t.detach(), "t2i": t2i.detach(), "scale": scale.detach()}


@LOSSES.register("hinge")
class TripletLoss(nn.Module):
    """VSE++ hinge triplet (`triplet_loss`); hardest negatives after `loss.warmup_steps`. No parameters."""

    def __init__(self, cfg: LossConfig):
        super().__init__()
        self.cfg = cfg

    def forward(self, scores: torch.Tensor, positives: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        return triplet_loss(scores, positives, self.cfg, step)


@LOSSES.register("infonce")
class InfoNCELoss(nn.Module):
    """Symmetric InfoNCE (`infonce_loss`) with its learnable inverse temperature, stored as its log and
    started at 1 / `loss.temperature`."""

    def __init__(self, cfg: LossConfig):
        super().__init__()
        self.log_scale = nn.Parameter(torch.tensor(float(math.log(1 / cfg.temperature))))

    def forward(self, scores: torch.Tensor, positives: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        return infonce_loss(scores, positives, self.log_scale)


def make_loss(cfg: LossConfig) -> nn.Module:
    """The loss `cfg.kind` names: called as loss(scores, positives, step) -> {"loss", "i2t", "t2i", ...}."""
    return LOSSES.impl(cfg.kind)(cfg)
