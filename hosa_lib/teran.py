"""TERAN/HOSA interoperability: their YAML configs, their checkpoints, their encoder layout.

TERAN (Messina et al., TOMM 2021; the HOSA authors' released code) runs region features through
a box-geometry MLP and transformer layers at the feature width (2048) before projecting, and BERT
(truncated at the extraction layer) through optional transformer layers before projecting; each
side then has its own transformer (or one shared), and the first token is the global vector.
`TeranImageEncoder` / `TeranTextEncoder` reproduce that layout with this project's module names;
`CHECKPOINT_MAP` states how every TERAN checkpoint key maps onto them, and loading is strict.
Learned from reading TERAN's public code (models/teran.py, visual.py, text.py, utils.py, loss.py).
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn as nn

from .config import ConfigError, ModelConfig, RunConfig, deep_merge, override
from .encoders import freeze_pooler, run_layers, transformer
from .scoring import teran_only


class TeranImageEncoder(nn.Module):
    """Slot 0 is an all-zero region (TERAN's reserved [CLS] slot, zero box); its output is global."""

    def __init__(self, cfg: ModelConfig, feat_dim: int):
        super().__init__()
        self.geometry = nn.Sequential(nn.Linear(feat_dim + 5, feat_dim), nn.ReLU(), nn.Linear(feat_dim, feat_dim))
        self.feat_layers = transformer(cfg, cfg.feat_layers, feat_dim)
        self.unused_fc = nn.Linear(feat_dim, cfg.embed)  # TERAN computes a pooled vector here and discards it
        self.unused_fc.requires_grad_(False)  # never in the graph: DDP would wait for its gradient at step 2
        self.proj = nn.Linear(feat_dim, cfg.embed)
        self.layers = transformer(cfg, cfg.image_layers)

    def forward(self, regions, boxes, mask, shared=None):
        b = len(regions)
        regions = torch.cat([regions.new_zeros(b, 1, regions.shape[-1]), regions], dim=1)
        boxes = torch.cat([boxes.new_zeros(b, 1, 4), boxes], dim=1)
        area = ((boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])).unsqueeze(-1)
        pad = torch.cat([mask.new_zeros(b, 1), ~mask], dim=1)
        x = run_layers(self.feat_layers, self.geometry(torch.cat([regions, boxes, area], dim=-1)), pad)
        x = self.proj(x)
        x = run_layers(shared if shared is not None else self.layers, x, pad)
        return x[:, 0], x[:, 1:], mask


class TeranTextEncoder(nn.Module):
    """BERT truncated at the extraction layer -> [transformer at word width] -> projection -> transformer.

    Local words follow TERAN's alignment loss: positions 1 .. len-3 (drops [CLS], the last word
    piece before [SEP] and [SEP]), not the HOSA default of all non-special tokens.
    """

    def __init__(self, cfg: ModelConfig, word_dim: int, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.word_layers = transformer(cfg, cfg.word_layers, word_dim)
        self.unused_map = nn.Linear(word_dim, cfg.embed)  # TERAN maps a mean-pooled vector and discards it
        self.unused_map.requires_grad_(False)
        freeze_pooler(backbone)
        self.proj = nn.Linear(word_dim, cfg.embed)
        self.layers = transformer(cfg, cfg.text_layers)

    def forward(self, text_mask, word_mask, hidden=None, input_ids=None, shared=None):
        out = self.backbone(input_ids=input_ids, attention_mask=text_mask.long(), output_hidden_states=True)
        pad = ~text_mask
        x = run_layers(self.word_layers, out.hidden_states[-1], pad)
        x = run_layers(shared if shared is not None else self.layers, self.proj(x), pad)
        lengths = text_mask.sum(1, keepdim=True)
        pos = torch.arange(text_mask.shape[1], device=text_mask.device)[None]
        words = (pos >= 1) & (pos < lengths - 2)
        return x[:, 0], x, words


# TERAN state-dict prefix -> ours (order matters: first match wins). Shared transformer variant:
# TERAN's transformer_encoder_1 serves both sides and maps to our `shared`.
CHECKPOINT_MAP = [
    ("img_txt_enc.txt_enc.bert_model.", "text.backbone."),
    ("img_txt_enc.txt_enc.transformer_encoder.", "text.word_layers."),
    ("img_txt_enc.txt_enc.map.", "text.unused_map."),
    ("img_txt_enc.cap_proj.", "text.proj."),
    ("img_txt_enc.img_enc.pos_encoding_image.map.", "image.geometry."),
    ("img_txt_enc.img_enc.transformer_encoder.", "image.feat_layers."),
    ("img_txt_enc.img_enc.fc.", "image.unused_fc."),
    ("img_txt_enc.img_proj.", "image.proj."),
    ("img_txt_enc.transformer_encoder_2.", "image.layers."),
    ("img_txt_enc.transformer_encoder_1.", "text.layers."),  # or `shared.` when shared-transformer
]
# Present in checkpoints written by older transformers, derived (not learned) in current ones.
DERIVED = [re.compile(r".*embeddings\.position_ids$")]
# TERAN's text encoder registers BERT's input embedding a second time (`self.word_embeddings =
# bert_model.get_input_embeddings()`): every real checkpoint holds this alias of the same tensor.
ALIASES = {"img_txt_enc.txt_enc.word_embeddings.weight": "img_txt_enc.txt_enc.bert_model.embeddings.word_embeddings.weight"}


def map_state_dict(teran: dict, model: nn.Module, shared: bool) -> dict:
    """TERAN state dict -> our keys; raises naming every unmapped, missing or mis-shaped key."""
    ours = model.state_dict()
    out, unmapped = {}, []
    for alias, original in ALIASES.items():
        if alias in teran:
            a, b = teran[alias], teran.get(original)
            if b is None or a.shape != b.shape or (a.device.type != "meta" and not torch.equal(a, b)):
                raise ConfigError(f"TERAN checkpoint: '{alias}' should be the same tensor as '{original}'")
    for key, value in teran.items():
        if key in ALIASES or any(p.match(key) for p in DERIVED) and key not in ours:
            continue
        for src, dst in CHECKPOINT_MAP:
            if key.startswith(src):
                if shared and src == "img_txt_enc.transformer_encoder_1.":
                    dst = "shared."
                out[dst + key[len(src):]] = value
                break
        else:
            unmapped.append(key)
    missing = [k for k in ours if k not in out]
    wrong = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(ours[k].shape)}"
             for k, v in out.items() if k in ours and v.shape != ours[k].shape]
    extra = [k for k in out if k not in ours]
    problems = ([f"unmapped checkpoint key '{k}'" for k in unmapped] + [f"mapped key '{k}' has no place in the model"
                for k in extra] + [f"model key '{k}' missing from the checkpoint" for k in missing]
                + [f"shape mismatch {w}" for w in wrong])
    if problems:
        raise ConfigError("TERAN checkpoint does not match the configured architecture:\n  " + "\n  ".join(problems[:20])
                          + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""))
    return out


# ----------------------------------------------------------------------------- config import
def _const(expected):
    def check(v, key):
        if v != expected and not (isinstance(expected, tuple) and v in expected):
            raise ConfigError(f"TERAN config key '{key}' = {v!r} is not supported here (expected {expected!r})")
        return {}
    return check


def _to(path: str, fn=lambda v: v):
    def put(v, key):
        out: dict = {}
        cur = out
        parts = path.split(".")
        for p in parts[:-1]:
            cur = cur.setdefault(p, {})
        cur[parts[-1]] = fn(v)
        return out
    return put


def _ignored(reason: str):
    def f(v, key):
        return {}
    f.reason = reason
    return f


def _alignment(v, key):
    pools = {"MrSw": "sum", "MrAVGw": "mean"}
    if v not in pools:
        raise ConfigError(f"TERAN config key '{key}' = {v!r}: only MrSw and MrAVGw pooling exist here")
    return {"scoring": {"local_pool": pools[v], **teran_only()}}  # TERAN's own terms only


def _step_size(v, key):
    """training.step-size: TERAN's StepLR, stepped once per epoch, decays x gamma every step-size epochs."""
    return {"train": {"lr_decay_every": int(v), "lr_decay_epochs": []}}


def _warmup(v, key, cfg):
    """training.warmup as TERAN's train.py uses it: 'linear' = LinearWarmup of the learning rate over
    training.warmup-period steps; null = none. (Hardest negatives start at step 1 either way.)"""
    if v is None:
        return {"train": {"lr_warmup_steps": 0}}
    if v != "linear":
        raise ConfigError(f"TERAN config key '{key}' = {v!r}: TERAN knows 'linear' and null only")
    period = cfg.get("training", {}).get("warmup-period")
    if not isinstance(period, int) or period < 1:
        raise ConfigError(f"TERAN config key 'training.warmup-period' = {period!r}: 'warmup: linear' needs a positive "
                          "number of steps")
    return {"train": {"lr_warmup_steps": period, "lr_warmup_style": "teran"}}


def _warmup_period(v, key, cfg):  # read by _warmup; only reported here
    return {}


def _same_dropout(v, key, cfg):
    """TERAN's feature- and word-width layers take their own dropout; here one model.dropout serves
    every layer, so a different value is refused rather than silently replaced."""
    main = cfg.get("model", {}).get("dropout", 0.1)
    if v != main:
        raise ConfigError(f"TERAN config key '{key}' = {v!r} differs from model.dropout = {main!r}: this workbench "
                          "uses one dropout (model.dropout) for every transformer layer")
    return {}


def _layers(v, key, cfg):  # model.layers: per-side transformers, or the shared one
    return {"model": {"shared_layers": v, "image_layers": 0, "text_layers": 0}} if cfg["model"].get(
        "shared-transformer") else {"model": {"image_layers": v, "text_layers": v}}


CONFIG_MAP = {
    "dataset.name": _to("data.dataset"),
    "dataset.data": _to("data.root"),
    "dataset.restval": _to("data.restval"),
    "dataset.images-path": _ignored("raw images are not needed with bottom-up features"),
    "dataset.pre-extracted-features": _const(False),
    "text-model.name": _const("bert"),
    "text-model.pretrain": _to("data.text_model"),
    "text-model.word-dim": _ignored("checked against the backbone's hidden size"),
    "text-model.extraction-hidden-layer": _to("data.text_layer"),
    "text-model.fine-tune": _to("model.text_lr_scale", lambda v: 1.0 if v else 0.0),  # TERAN's lr multiplier
    "text-model.pre-extracted": _const(False),
    "text-model.layers": _to("model.word_layers"),
    "text-model.dropout": _same_dropout,
    "image-model.name": _const("bottomup"),
    "image-model.pre-extracted-features-root": _to("data.features_dir"),
    "image-model.transformer-layers": _to("model.feat_layers"),
    "image-model.dropout": _same_dropout,
    "image-model.pos-encoding": _const("concat-and-process"),
    "image-model.crop-size": _ignored("unused by TERAN with bottom-up features"),
    "image-model.fine-tune": _ignored("bottom-up features are fixed"),
    "image-model.feat-dim": _ignored("taken from the store's feature width"),
    "image-model.norm": _ignored("unused by TERAN's bottom-up encoder"),
    "model.name": _const("teran"),
    "model.embed-size": _to("model.embed"),
    "model.text-aggregation": _const("first"),
    "model.image-aggregation": _const("first"),
    "model.layers": _layers,
    "model.exclude-stopwords": _const(False),
    "model.shared-transformer": _ignored("folded into model.layers -> shared_layers"),
    "model.dropout": _to("model.dropout"),
    "training.lr": _to("train.lr"),
    "training.grad-clip": _to("train.grad_clip"),
    "training.max-violation": _to("loss.max_violation"),
    "training.loss-type": _const(("alignment",)),
    "training.alignment-mode": _alignment,
    "training.measure": _const("dot"),
    "training.margin": _to("loss.margin"),
    "training.bs": _to("train.batch_size"),
    "training.scheduler": _const("steplr"),
    "training.gamma": _to("train.lr_decay"),
    "training.step-size": _step_size,
    "training.warmup": _warmup,
    "training.warmup-period": _warmup_period,
}


CROSS_KEY = {_layers, _warmup, _warmup_period, _same_dropout}  # rules that read other keys of the config


def import_config(teran: dict) -> tuple[dict, list[tuple[str, str]]]:
    """TERAN YAML (nested dict) -> (our params overrides, [(key, what happened)]). Unknown keys raise."""
    overrides: dict = {"model": {"arch": "teran", "heads": 4, "ff": 2048, "box_geometry": True,
                                 "text_finetune": True},  # BERT runs inside TERAN's model
                       # TERAN's loss takes the hardest negatives from the first step; no LR warm-up
                       # unless training.warmup says 'linear'
                       "loss": {"warmup_steps": 0}, "train": {"lr_warmup_steps": 0}}
    report = []
    for section, values in teran.items():
        if section == "image-retrieval":  # TERAN's single-query demo settings
            report += [(f"image-retrieval.{k}", "ignored: TERAN's interactive demo settings") for k in values]
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"TERAN config: section '{section}' must be a mapping")
        for k, v in values.items():
            key = f"{section}.{k}"
            rule = CONFIG_MAP.get(key)
            if rule is None:
                raise ConfigError(f"TERAN config key '{key}' has no equivalent here")
            got = rule(v, key, teran) if rule in CROSS_KEY else rule(v, key)
            overrides = deep_merge(overrides, got)
            note = "checked"
            if rule is _warmup_period:
                note = "used by training.warmup: linear" if values.get("warmup") == "linear" else \
                    "unused: training.warmup is null (no warm-up)"
            report.append((key, getattr(rule, "reason", None) and f"ignored: {rule.reason}" or
                           (f"-> {_flat(got)}" if got else note)))
    return overrides, report


def _flat(d: dict, prefix: str = "") -> str:
    parts = []
    for k, v in d.items():
        parts.append(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else f"{prefix}{k}={v!r}")
    return ", ".join(parts)


# ----------------------------------------------------------------------------- evaluation config
PROTOCOLS = {("coco", "1k"): "coco_1k", ("coco", "5k"): "coco_5k", ("f30k", "1k"): "f30k_1k", ("f30k", "5k"): "f30k_1k"}


# What TERAN's test.py takes from --config: the checkpoint's own config stays, these keys (its data
# paths and the batch size) come from the given file.
TERAN_OVERRIDDEN = (("dataset", "images-path"), ("dataset", "data"),
                    ("image-model", "pre-extracted-features-root"), ("training", "bs"))


def with_teran_paths(loaded: dict, given: dict, where) -> dict:
    """The checkpoint's config with TERAN_OVERRIDDEN replaced from `given`, as TERAN's test.py does."""
    out = {section: dict(values) if isinstance(values, dict) else values for section, values in loaded.items()}
    for section, key in TERAN_OVERRIDDEN:
        if key not in (given.get(section) or {}):
            raise ConfigError(f"{where}: TERAN's test.py takes '{section}.{key}' from --config; it is missing")
        out.setdefault(section, {})[key] = given[section][key]
    return out


def config_from_teran(ck: dict, checkpoint, config: str | None, data_root: str | None, text_model: str | None,
                      store: str | None, size: str, protocol: str | None = None, max_words: int = 512,
                      float16: bool = False) -> tuple[RunConfig, list]:
    """Our RunConfig for evaluating a TERAN checkpoint as TERAN does: its config imported key by key
    (with --config: the checkpoint's config with only TERAN_OVERRIDDEN taken from the file, as TERAN's
    test.py; the file whole when the checkpoint holds no config), the test split of its data/ layout as the store (`<root>/<dataset>/hosa_test.h5`, float32
    features; `hosa_test_fp16.h5` with float16), captions up to `max_words` word pieces (TERAN never
    truncates; BERT's limit is 512) and TERAN's padding rule in MrSw."""
    import yaml

    teran_cfg = ck.get("config")
    if config:
        given = yaml.safe_load(Path(config).read_text())
        if not isinstance(given, dict):
            raise ConfigError(f"{config}: expected a TERAN YAML config (a mapping of sections)")
        teran_cfg = with_teran_paths(teran_cfg, given, config) if isinstance(teran_cfg, dict) else given
    if not isinstance(teran_cfg, dict):
        raise ConfigError(f"{checkpoint}: holds no 'config'; pass --config CONFIG.yaml")
    overrides, report = import_config(teran_cfg)
    data = overrides.get("data", {})
    dataset = data.get("dataset", "coco")
    root = data_root or data.get("root", "data")
    # --data-root relocates everything; otherwise the config's own features root is used
    features = str(Path(root) / dataset / "features_36") if data_root else data.get("features_dir", "")
    extra = {"name": f"teran-{dataset}-{size}",
             "data": {"source": "store" if store else "teran", "root": root, "features_dir": features,
                      "store": store or str(Path(root) / dataset / ("hosa_test_fp16.h5" if float16 else "hosa_test.h5")),
                      "relevance": [], "max_words": max_words},
             "scoring": {"padding": "teran"},
             "eval": {"protocol": protocol or PROTOCOLS[(dataset, size)], "split": "test", "ties": "teran"}}
    if text_model:
        extra["data"]["text_model"] = text_model
    if dataset == "f30k":
        extra["data"]["image_sizes"] = str(Path(root) / "f30k" / "images" / "sizes.pkl")
    return override(RunConfig(), deep_merge(overrides, extra), f"{checkpoint}: TERAN config"), report
