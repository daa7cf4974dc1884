"""TERAN-shaped encoders: regions and words -> projection -> transformer layers -> d.

The first output token is global (a learned [CLS]-like token for images, the backbone's [CLS]
for text); the rest are local. Padding (and, for text, special tokens) is excluded from the
local set through the returned mask.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .config import ModelConfig


def transformer(cfg: ModelConfig, layers: int, width: int | None = None) -> nn.TransformerEncoder | None:
    """`layers` post-ReLU transformer layers of `width` (default: the joint embedding size), or None."""
    if layers == 0:
        return None
    layer = nn.TransformerEncoderLayer(width or cfg.embed, cfg.heads, cfg.ff, cfg.dropout, activation="relu",
                                       batch_first=True)
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)


def run_layers(stack: nn.TransformerEncoder | None, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
    """x (B, T, w) through a stack (identity when None); pad (B, T) True at padding."""
    return x if stack is None else stack(x, src_key_padding_mask=pad)


class Anchor(nn.Module):
    """Global vector anchored on the frozen pretrained space: map(masked mean of the inputs) +
    gate * the transformer's global token. `factory.init_anchors` sets both maps from a closed-form
    fit (the ridge baseline's map or regularised CCA) before training, so training starts where that
    fit is; the gate starts at 0."""

    def __init__(self, in_dim: int, embed: int):
        super().__init__()
        self.map = nn.Linear(in_dim, embed)
        self.gate = nn.Parameter(torch.zeros(()))

    def forward(self, inputs, mask, token):
        m = mask.to(inputs.dtype).unsqueeze(-1)
        mean = (inputs * m).sum(1) / m.sum(1).clamp_min(1)
        return self.map(mean) + self.gate * token


class ImageEncoder(nn.Module):
    """regions (B, K, D) + boxes (B, K, 4) + n_regions -> glob (B, d), local (B, K, d), mask (B, K)."""

    def __init__(self, cfg: ModelConfig, feat_dim: int):
        super().__init__()
        self.box_geometry = cfg.box_geometry
        self.region_norm = cfg.region_norm
        self.box_mlp = None  # box_embed "mlp": the geometry gets its own MLP, added to the projected features
        if cfg.box_geometry and cfg.box_embed == "mlp":
            self.box_mlp = nn.Sequential(nn.Linear(5, cfg.embed), nn.ReLU(), nn.Linear(cfg.embed, cfg.embed))
        concat = cfg.box_geometry and self.box_mlp is None
        self.proj = nn.Linear(feat_dim + (5 if concat else 0), cfg.embed)
        self.cls = nn.Parameter(torch.zeros(1, 1, cfg.embed))
        self.layers = transformer(cfg, cfg.image_layers)
        self.anchor = Anchor(feat_dim, cfg.embed) if cfg.anchor else None

    def forward(self, regions, boxes, mask, shared=None):
        raw = regions
        if self.region_norm:  # features at unit scale, as the box coordinates are
            regions = nn.functional.layer_norm(regions, regions.shape[-1:])
        if self.box_geometry:  # (x1, y1, x2, y2, area)
            area = ((boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])).unsqueeze(-1)
            geom = torch.cat([boxes, area], dim=-1)  # (B, K, 5)
        if self.box_geometry and self.box_mlp is None:  # TERAN's concat-and-process
            regions = torch.cat([regions, geom], dim=-1)
        local = self.proj(regions) if self.box_mlp is None else self.proj(regions) + self.box_mlp(geom)
        x = torch.cat([self.cls.expand(len(regions), -1, -1), local], dim=1)  # (B, 1+K, d)
        pad = torch.cat([mask.new_zeros(len(mask), 1), ~mask], dim=1)
        x = run_layers(shared, run_layers(self.layers, x, pad), pad)
        glob = x[:, 0] if self.anchor is None else self.anchor(raw, mask, x[:, 0])
        return glob, x[:, 1:], mask


class BackboneTop(nn.Module):
    """The top layers of a pretrained text backbone, run on its cached states of a lower layer and
    fine-tuned (`model.text_tune_layers`): fine-tuning where it binds words to their context, at a
    fraction of running the whole backbone. `layers` are the backbone's own layer modules (Hugging Face
    BERT-style: layer(hidden, additive mask (B, 1, 1, T)) -> hidden, or a tuple starting with it)."""

    def __init__(self, layers: nn.ModuleList):
        super().__init__()
        self.layers = layers

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        add = torch.zeros(mask.shape, dtype=hidden.dtype, device=hidden.device)
        add = add.masked_fill(~mask, torch.finfo(hidden.dtype).min)[:, None, None, :]  # (B, 1, 1, T)
        for layer in self.layers:
            out = layer(hidden, add)
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden


def freeze_pooler(backbone: nn.Module | None) -> None:
    """A Hugging Face encoder's pooler (BERT/MiniLM: `pooler.dense`) is not used here (the last hidden
    states are): no gradient ever reaches it, and DistributedDataParallel, which waits for every
    trainable parameter's gradient, would fail at step 2. It stays in the state dict, frozen."""
    pooler = getattr(backbone, "pooler", None)
    if pooler is not None:
        pooler.requires_grad_(False)


class TextEncoder(nn.Module):
    """Cached backbone states (B, T, H) or token ids -> glob (B, d), local (B, T, d), word mask (B, T)."""

    def __init__(self, cfg: ModelConfig, hidden_dim: int, backbone: nn.Module | None = None,
                 top: BackboneTop | None = None):
        super().__init__()
        self.backbone = backbone  # truncated at the extraction layer: its last hidden state is used
        freeze_pooler(backbone)
        self.top = top  # or: the backbone's top layers on cached lower-layer states (model.text_tune_layers)
        self.proj = nn.Linear(hidden_dim, cfg.embed)
        self.layers = transformer(cfg, cfg.text_layers)
        self.anchor = Anchor(hidden_dim, cfg.embed) if cfg.anchor else None

    def forward(self, text_mask, word_mask, hidden=None, input_ids=None, shared=None):
        if self.backbone is not None:
            out = self.backbone(input_ids=input_ids, attention_mask=text_mask.long(), output_hidden_states=True)
            hidden = out.hidden_states[-1]
        pooled_in = hidden  # the anchor's input: the states its closed-form start was fit on
        if self.top is not None:
            hidden = self.top(hidden, text_mask)
        x = self.proj(hidden)
        pad = ~text_mask
        x = run_layers(shared, run_layers(self.layers, x, pad), pad)
        glob = x[:, 0] if self.anchor is None else self.anchor(pooled_in, text_mask, x[:, 0])
        return glob, x, word_mask
