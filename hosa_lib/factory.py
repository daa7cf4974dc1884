"""Build a model from a config and its store, or load one from a checkpoint (ours or TERAN's).

The only place that knows how a config becomes modules: the store gives the region feature width
and the cached text width; a fine-tuned (or TERAN) text backbone is loaded here, truncated at
`data.text_layer`. Building does not touch the global RNG seed: callers that need a seeded
initialisation (training) seed it themselves first.
"""
from __future__ import annotations

import numpy as np
import torch

from .config import ConfigError, RunConfig, from_dict, override
from .data import TextInput
from .loss import make_loss
from .model import HOSA
from .perf import resolve_device  # noqa: F401  (re-exported: the device of train.device)
from .runs import load_checkpoint
from .store import Store
from .text import cache_key, load_backbone


def build_model(cfg: RunConfig, device="cpu", pretrained: bool = True,
                seed: int | None = None) -> tuple[HOSA, TextInput]:
    """The model and how its captions are fed: cached backbone states, or tokens when fine-tuning.
    pretrained=False skips loading backbone weights (a checkpoint will provide them).
    seed: seed the global torch RNG right before the modules are initialised (training does;
    loading a checkpoint does not need to)."""
    dc = cfg.data
    backbone = None
    with Store(dc.store, check_values=False) as s:
        feat_dim = s.feature_dim
        if not cfg.model.text_finetune:
            text = TextInput(cache_key=cache_key(dc.text_model, dc.text_layer))
            text_dim = s.text_dim(text.cache_key)
    if cfg.model.text_finetune:  # the backbone runs inside the model, truncated at the extraction layer
        _, backbone = load_backbone(dc.text_model, dc.text_layer if dc.text_layer > 0 else None, pretrained)
        text_dim = backbone.config.hidden_size
        text = TextInput(tokenizer=dc.text_model, max_words=dc.max_words)
    top = None
    if cfg.model.text_tune_layers:  # the backbone's layers above the cached one, pretrained and fine-tuned
        from .encoders import BackboneTop
        k, n = dc.text_layer, cfg.model.text_tune_layers
        _, full = load_backbone(dc.text_model, None, pretrained)
        if k + n > full.config.num_hidden_layers:
            raise ConfigError(f"model.text_tune_layers = {n} above data.text_layer = {k}: {dc.text_model} has only "
                              f"{full.config.num_hidden_layers} layers")
        top = BackboneTop(full.encoder.layer[k:k + n])
    if seed is not None:
        torch.manual_seed(seed)
    model = HOSA(cfg.model, cfg.scoring, feat_dim, text_dim, backbone, loss=make_loss(cfg.loss), top=top)
    if cfg.model.anchor and seed is not None:  # training starts at a closed-form fit; checkpoints bring their own
        init_anchors(model, dc.store, cache_key(dc.text_model, dc.text_layer), cfg.model.anchor_init)
    return model.to(device), text


@torch.no_grad()
def init_anchors(model: HOSA, store_path, text_key: str, kind: str = "ridge") -> dict:
    """Set the anchored global maps (model.anchor) from a closed-form fit (`baseline.closed_form_start`:
    the ridge baseline's map, regularised CCA, or the better of the two on val), so that the untrained
    model's global score is that fit's; output dimensions the fit does not fill start at 0. Returns
    the fit's {"kind", "val_rsum", "params"}."""
    from .baseline import closed_form_start
    if model.image.anchor is None or model.text.anchor is None:
        raise ValueError("model.anchor: this architecture has no anchored global vectors")
    embed = model.text.anchor.map.weight.shape[0]
    fit = closed_form_start(store_path, text_key, kind, embed)
    for anchor, m, mean in ((model.text.anchor, fit["text"], fit["mean_y"]),
                            (model.image.anchor, fit["image"], fit["mean_x"])):
        weight = torch.zeros(anchor.map.weight.shape, dtype=torch.float64)
        weight[:m.shape[1]] = torch.from_numpy(np.asarray(m, np.float64)).T
        anchor.map.weight.copy_(weight)
        anchor.map.bias.copy_(-(weight @ torch.from_numpy(np.asarray(mean, np.float64))))
    if "cv" in fit:
        cv = fit["cv"]
        print(f"hosa: anchored start = {fit['kind']} map ({cv['decision']}; {len(cv['ridge_rsum'])}-fold rsum ridge "
              f"{np.mean(cv['ridge_rsum']):.1f}, CCA {np.mean(cv['cca_rsum']):.1f}, CCA better in {cv['folds_won']})")
    return {k: fit[k] for k in ("kind", "val_rsum", "params", "cv") if k in fit}


def is_teran_checkpoint(ck: dict) -> bool:
    """TERAN/HOSA-seed checkpoints carry TERAN's YAML config (sections such as 'text-model')."""
    return isinstance(ck.get("config"), dict) and "text-model" in ck["config"]


def load_model(checkpoint, store: str | None = None, device="cpu") -> tuple[HOSA, RunConfig, dict, TextInput]:
    """Rebuild a model from a checkpoint of ours with its own config (strict load), optionally
    against another store. Returns model (eval mode), the checkpoint's config, the checkpoint, text input."""
    ck = load_checkpoint(checkpoint)
    if is_teran_checkpoint(ck):
        raise ConfigError(f"{checkpoint}: a TERAN checkpoint; evaluate it with --size (hosa_lib.teran adapter)")
    cfg = from_dict(ck["config"], f"{checkpoint}:config")
    if store is not None:
        cfg = override(cfg, {"data": {"store": str(store)}}, f"{checkpoint}:config")
    model, text = build_model(cfg, device, pretrained=False)
    model.load_state_dict(ck["model"], strict=True)
    return model.eval(), cfg, ck, text


def load_teran_model(ck: dict, cfg: RunConfig, device="cpu") -> tuple[HOSA, TextInput]:
    """A loaded TERAN checkpoint's weights (mapped by `hosa_lib.teran`) in TERAN-shaped encoders, strictly."""
    from .teran import map_state_dict

    model, text = build_model(cfg, device, pretrained=False)
    model.load_state_dict(map_state_dict(ck["model"], model, cfg.model.shared_layers > 0), strict=True)
    return model.eval(), text
