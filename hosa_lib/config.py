"""Typed, frozen run configuration loaded from `params/*.yaml`.

A params file may name a `base:` file (relative to itself); keys are deep-merged over it.
Every key must exist in the dataclasses below and have the declared type: a mistyped or
unknown key raises `ConfigError` naming the key, the file and what was expected.
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import importlib
import importlib.util
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """A params file or override has an unknown key or a value of the wrong type."""


class Registry(dict):
    """The one list of a params key's choices: name -> implementation, filled by the module that
    implements them (its `home`) with `@REGISTRY.register("name")` (`var` is the registry's name there).
    Config validates the key through it and the home builds from it, so a choice exists exactly when
    its implementation does.

    Config sits below every home in the import graph (docs/architecture.md) and must not import them
    to check a params file: a stage that never runs a home (prepare never runs the loss) must neither
    pay for importing it (torch) nor depend on its source (provenance records what a stage imported).
    So `names()` reads the home's registrations from its source without importing it (the literal
    names of `var.register("...")` calls, as packaging tools read entry-point metadata), together with
    whatever is registered already (a home that has been imported, a user's module that registered
    more); `impl()` imports the home, as building from it needs it anyway."""

    def __init__(self, key: str, home: str, var: str, what: str):
        super().__init__()
        self.key, self.home, self.var, self.what = key, home, var, what

    def register(self, name: str):
        """Decorator: `@LOSSES.register("hinge") class TripletLoss: ...` (returns the object unchanged)."""
        def add(obj):
            if name in self and self[name] is not obj:
                raise ValueError(f"{self.key}: '{name}' is registered twice ({self[name]!r} and {obj!r})")
            self[name] = obj
            return obj
        return add

    def names(self) -> tuple[str, ...]:
        if self.home in sys.modules:
            return tuple(self)
        return tuple(dict.fromkeys([*_registered_in_source(self.home, self.var), *self]))

    def loaded(self) -> dict:
        """The registry with its home imported: every registered name and implementation."""
        importlib.import_module(self.home)
        return dict(self)

    def impl(self, name: str):
        """The implementation of `name`; a ConfigError naming the key and the choices otherwise."""
        importlib.import_module(self.home)  # fills the registry (a no-op once imported)
        if name not in self:
            raise ConfigError(f"key '{self.key}' = {name!r}: expected one of {self.names()}")
        return self[name]


@functools.cache
def _source_registrations(path: str, mtime: float, var: str) -> tuple[str, ...]:
    tree = ast.parse(Path(path).read_text())
    return tuple(node.args[0].value for node in ast.walk(tree)
                 if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "register"
                 and isinstance(node.func.value, ast.Name) and node.func.value.id == var
                 and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str))


def _registered_in_source(module: str, var: str) -> tuple[str, ...]:
    """The literal names `module` registers with `var.register("name")`, read from its source file."""
    path = importlib.util.find_spec(module).origin
    return _source_registrations(path, os.stat(path).st_mtime, var)


# The registries (filled by their homes; README "Extending" says how to add to each):
LOSSES = Registry("loss.kind", "hosa_lib.loss", "LOSSES",
                  "training loss: a module called as loss(scores, positives, step)")
KERNELS = Registry("scoring.kernel", "hosa_lib.fused", "KERNELS", "high-order kernel: a loader of its implementation "
                   "(None: resolved per device, eager torch, or called directly)")
TIES = Registry("eval.ties", "hosa_lib.metrics", "TIES",
                "tie rule: (scores, cap_img, ks) -> per direction (ranks, hits per K)")
ARCHS = Registry("model.arch", "hosa_lib.model", "ARCHS", "architecture: (mcfg, feat_dim, text_dim, backbone, top) -> "
                 "(image encoder, text encoder)")
TERMS = Registry("scoring term", "hosa_lib.scoring", "TERMS",
                 "pair-score term: a scoring.Term (weight key, gate, compute)")
REGISTRIES = {r.key: r for r in (LOSSES, KERNELS, TIES, ARCHS)}  # params keys validated through a registry


@dataclass(frozen=True)
class DataConfig:
    source: str = "synthetic"      # synthetic | teran | scan | images | store (use an existing store)
    store: str = "outputs/data/synthetic_demo.h5"  # HDF5 store written by prepare, read by train/eval
    root: str = ""                 # source folder (teran: data root; scan: precomp dir; images: image folder)
    dataset: str = "coco"          # teran layout: coco | f30k
    captions: str = ""             # images source: Karpathy JSON or CSV `filename,caption`
    features_dir: str = ""         # teran layout: folder holding bu_att/ and bu_box/ (default root/features_36)
    restval: bool = True           # COCO: add Karpathy `restval` images to train
    image_sizes: str = ""          # teran layout without COCO caption JSONs: TERAN sizes.pkl or the image folder
    splits: tuple[str, ...] = ("train", "val", "test")  # scan: which {split}_ims.npy to convert
    n_images: int = 1200           # synthetic: number of scenes
    seed: int = 0                  # synthetic: generator seed
    train_twins: float = 0.0       # synthetic: fraction of the train scenes made as twin pairs (attribute- or
                                   # relation-swapped, as the test twins), batched together so each is the other's
                                   # hard negative (composition-aware negatives, as NegCLIP's); 0 = none
    image_size: int = 224          # images/synthetic: CNN input side (224 -> a 7x7 feature map)
    regions: str = "auto"          # images/synthetic: objects (one region per object box, the CNN map ROI-pooled
                                   # inside it, as bottom-up features are; needs boxes) | grid (the map's cells) |
                                   # auto (objects for the synthetic scenes, grid for image folders)
    grid: tuple[int, ...] = ()     # grid regions: () = the map's own cells; else the map ROI-pooled over an n x n grid
                                   # for each n, e.g. [1, 2, 3, 5] (multi-scale, 39 regions)
    context: tuple[int, ...] = (1,)  # objects: context regions after the objects, an n x n grid for each n
                                   # ([1] = the whole image; [1, 2] adds the quadrants)
    map_stride: int = 32           # images/synthetic: the CNN map the regions pool: 32 = the head (1280 channels) |
                                   # 16 / 8 = the last block at that stride (112 / 40 channels: colour and shape
                                   # that the head's map, each cell seeing several objects, blurs; docs/results.md)
    batch_size: int = 32           # images: CNN batch size
    on_bad_image: str = "fail"     # images: fail | skip (skipped files are reported)
    image_fit: str = "letterbox"   # images: letterbox (pad to square) | crop (centre square) before resizing
    background: tuple[int, ...] = (255, 255, 255)  # images: RGB behind transparent pixels and letterbox bars
    split_fractions: tuple[float, ...] = (0.8, 0.1, 0.1)  # images without a split column: train/val/test
                                   # fractions of a deterministic hash of each file name
    text_model: str = "minilm"     # "minilm" (offline all-MiniLM-L6-v2 from PyPI), a HF name or a local dir
    text_layer: int = -1           # hidden layer whose states are cached (-1 = last)
    max_words: int = 32            # token budget per caption (incl. special tokens); TERAN reproduction: 512
    relevance: tuple[str, ...] = ("rougeL",)  # relevance matrices to compute for the test split
    spice: str = ""                # optional TERAN SPICE relevance .npy to import (test captions x images)
    force: bool = False            # rebuild the store even if it exists


@dataclass(frozen=True)
class ScoringConfig:
    local_pool: str = "sum"        # MrSw pooling over words: sum (TERAN) | mean
    bands: int = 16                # G spectral bands; 1 = first-order (scalar cross-attention)
    temperature: float = 10.0      # lambda in softmax(lambda * G * rho)
    direction: str = "t2i"         # t2i (image from caption) | i2t | both
    w_local: float = 1.0           # weight of the TERAN local score s_l
    w_high: float = 4.0            # alpha_h, weight of the high-order score s_h (in [-1, 1])
    w_global: float = 4.0          # alpha_g, weight of the global score s_g (in [-1, 1])
    padding: str = "ours"          # ours: padded regions take no part in the max | teran: TERAN's rule, padded
                                   # region-word alignments count as 0 and a caption without words scores 0
    condition: bool = False        # local-global H: the softmax of H also sees lambda * cos(position, other side's
                                   # global vector) (t2i: each word's cosine with the image's global vector)
    kernel: str = "auto"           # high-order term: auto (flash on CPU, triton on CUDA) | torch (eager) | flash (CPU,
                                   # band shares per tile, never whole) | numba (CPU, after the band-share GEMM) | triton
    gates: bool = False            # learnable gates g on the local terms, starting at 0: the score is
                                   # w_global s_g + g_l w_local s_l + g_h w_high s_h, so an anchored model starts at
                                   # its global score (the baseline) and training sets how much the local terms count


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "hosa"             # hosa | teran (TERAN's exact module layout, for importing its checkpoints)
    embed: int = 256               # d, joint embedding size (TERAN: 1024)
    heads: int = 4                 # attention heads
    ff: int = 512                  # feed-forward size (TERAN: 2048)
    dropout: float = 0.1
    image_layers: int = 1          # image-only transformer layers (TERAN: 4)
    text_layers: int = 1           # text-only transformer layers (TERAN: 4)
    shared_layers: int = 0         # layers shared by both modalities after the private ones (TERAN sharedTE: 2)
    box_geometry: bool = True      # region geometry (x1, y1, x2, y2, area) enters the region embedding
    box_embed: str = "concat"      # concat: appended to the features before their projection (TERAN's) | mlp: its own
                                   # MLP, added to the projected features
    region_norm: bool = False      # standardise each region's features (layer norm, no learned scale) before the box
                                   # geometry joins them: raw CNN features (|x| ~ 4.6 on the demo's map) otherwise
                                   # swamp the [0, 1] coordinates and positions barely move the embedding
    text_finetune: bool = False    # False: train on cached backbone states; True: run and tune the backbone
    text_lr_scale: float = 0.1     # backbone learning rate = lr * this (fine-tune only)
    text_tune_layers: int = 0      # N > 0: run the backbone's N layers above the cached data.text_layer (set it, e.g.
                                   # 4 of MiniLM's 6) on the cached states and fine-tune them: the binding of words to
                                   # their context that fine-tuning brings, at a fraction of its cost (frozen text: 0)
    feat_layers: int = 0           # teran arch: transformer layers on region features before projection (TERAN: 4)
    word_layers: int = 0           # teran arch: transformer layers on backbone states before projection (TERAN: 0)
    anchor: bool = False           # global vectors = a linear map of the pretrained pooled inputs (mean region feature;
                                   # mean token state = the sentence embedding), initialised from a closed-form fit,
                                   # plus a gated residual from the transformer's global token (gate starts at 0)
    anchor_init: str = "ridge"     # the anchored maps' closed-form start: ridge (the baseline's map) | cca (regularised
                                   # CCA, hyperparameters chosen on val) | auto (the ridge map unless CCA wins a 5-fold
                                   # cross-validation on train + val by 2 % in most folds and is not worse on val)


@dataclass(frozen=True)
class LossConfig:
    margin: float = 0.2
    max_violation: bool = True     # hardest negatives after warm-up
    warmup_steps: int = 200        # steps summing over all negatives before hardest negatives
    kind: str = "hinge"            # hinge: VSE++ triplet (TERAN) | infonce: symmetric InfoNCE, learnable temperature
    temperature: float = 0.05      # infonce: initial temperature (logits = scores / temperature)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    batch_size: int = 64
    lr: float = 2e-4
    lr_warmup_steps: int = 100     # linear warm-up of the learning rate: factor min(1, (step + 1) / N)
    lr_warmup_style: str = "ours"  # ours | teran: pytorch-warmup 0.0.4 as TERAN's train.py drives it, which
                                   # consumes a step when built: factor min(1, (step + 2) / N)
    lr_decay_epochs: tuple[int, ...] = (8,)  # step decay x lr_decay at these epochs
    lr_decay_every: int = 0        # > 0: also decay x lr_decay every this many epochs (StepLR; TERAN's step-size)
    lr_decay: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 2.0
    seed: int = 0
    workers: int = -1              # DataLoader workers; -1 = auto: 0 on CPU (the cores compute), on CUDA
                                   # min(4, CPU cores per local rank), persistent, with pinned memory
    threads: int = 0               # torch CPU threads; 0 = torch's default (one per core given to this process).
                                   # On a machine shared with other jobs, 1-2 threads can be several times faster
    device: str = "auto"           # auto | cpu | cuda | cuda:N
    amp: bool = True               # bf16 autocast on CUDA where supported (never on CPU)
    val_images: int = 0            # 0 = whole val split
    patience: int = 0              # stop after this many epochs without a better val rsum (0 = run all epochs)
    min_delta_images: float = 0.0  # "better" = val rsum above the best by more than this many val images' worth
                                   # (each image query is 100 / n_val of an i2t recall): on a val split of a few
                                   # dozen images one query's rank decides "better"; 0 = any gain
    gate_lr: float = 1e-3          # Adam learning rate of the term gates (scoring.gates): at the model's lr a
                                   # scalar gate would move ~0.03 in an epoch of 600 steps
    validate_at_start: bool = False  # also validate the untrained model (logged as epoch -1); best.pt then
                                   # never falls below the initialisation (an anchored model starts at the baseline)
    log_every: int = 10
    checkpoint_every: int = 0      # also save last.pt every N steps mid-epoch (0 = end of epoch only)
    tensorboard: bool = True       # TensorBoard event files in <run>/tensorboard: losses, lr and term weights per
                                   # logged step, val metrics per epoch (`make tensorboard`)
    dist_timeout_min: int = 120    # DDP: how long a rank waits in a collective; rank 0 validates alone while
                                   # the others wait, so this must exceed one validation (COCO val included)


@dataclass(frozen=True)
class EvalConfig:
    protocol: str = "all"          # all | coco_1k | coco_5k | f30k_1k
    split: str = "test"
    max_elems: int = 1 << 22       # elements per scoring chunk tensor (bounds peak memory)
    shortlist: int = 0             # >0: re-rank the top-K by global score with full HOSA
    ndcg_k: int = 25
    ties: str = "fair"             # fair (expected metric over random orders of tied items) | teran | optimistic;
                                   # see hosa_lib/metrics.py. TERAN imports use teran


@dataclass(frozen=True)
class AblationConfig:
    grid: str = "params/ablations/demo.yaml"  # file declaring variants and seeds
    seeds: tuple[int, ...] = (0,)


@dataclass(frozen=True)
class RunConfig:
    name: str = "run"              # run id prefix; outputs go to outputs/<run_id>/
    output_root: str = "outputs"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    ablation: AblationConfig = field(default_factory=AblationConfig)


# Keys with a fixed set of values that no module implements by name (those are REGISTRIES).
CHOICES = {
    "data.source": ("synthetic", "teran", "scan", "images", "store"),
    "model.anchor_init": ("ridge", "cca", "auto"),
    "train.lr_warmup_style": ("ours", "teran"),
    "model.box_embed": ("concat", "mlp"),
    "data.dataset": ("coco", "f30k"),
    "data.on_bad_image": ("fail", "skip"),
    "data.image_fit": ("letterbox", "crop"),
    "data.regions": ("auto", "objects", "grid"),
    "data.map_stride": (32, 16, 8),
    "scoring.local_pool": ("sum", "mean"),
    "scoring.direction": ("t2i", "i2t", "both"),
    "scoring.padding": ("ours", "teran"),
    "eval.protocol": ("all", "coco_1k", "coco_5k", "f30k_1k"),
}


def _at_least(lo):
    return f"a number >= {lo}", lambda v: v >= lo


_POSITIVE = "a number > 0", lambda v: v > 0
_FRACTION = "a number in [0, 1)", lambda v: 0 <= v < 1
# Numeric keys and the values they accept (floats must also be finite). A value outside fails at load
# with the key's name, never later as a traceback from deep inside torch or numpy.
RANGES = {
    "data.n_images": _at_least(1), "data.image_size": _at_least(32), "data.batch_size": _at_least(1),
    "data.max_words": _at_least(3), "data.text_layer": _at_least(-1), "data.split_fractions": _at_least(0),
    "data.grid": _at_least(1), "data.context": _at_least(1),
    "data.train_twins": ("a number in [0, 1]", lambda v: 0 <= v <= 1),
    "scoring.bands": _at_least(1), "scoring.temperature": _POSITIVE,
    "model.embed": _at_least(1), "model.heads": _at_least(1), "model.ff": _at_least(1), "model.dropout": _FRACTION,
    "model.image_layers": _at_least(0), "model.text_layers": _at_least(0), "model.shared_layers": _at_least(0),
    "model.text_lr_scale": _at_least(0), "model.text_tune_layers": _at_least(0), "model.feat_layers": _at_least(0), "model.word_layers": _at_least(0),
    "loss.margin": _at_least(0), "loss.warmup_steps": _at_least(0), "loss.temperature": _POSITIVE,
    "train.epochs": _at_least(0), "train.batch_size": _at_least(1), "train.lr": _POSITIVE,
    "train.lr_warmup_steps": _at_least(0), "train.lr_decay_every": _at_least(0), "train.min_delta_images": _at_least(0), "train.lr_decay_epochs": _at_least(1), "train.lr_decay": _at_least(0),
    "train.weight_decay": _at_least(0), "train.grad_clip": _at_least(0), "train.seed": _at_least(0),
    "train.workers": _at_least(-1), "train.dist_timeout_min": _at_least(1), "train.threads": _at_least(0), "train.val_images": _at_least(0),
    "train.patience": _at_least(0), "train.gate_lr": _POSITIVE, "train.log_every": _at_least(1),
    "train.checkpoint_every": _at_least(0),
    "eval.max_elems": _at_least(1), "eval.shortlist": _at_least(0), "eval.ndcg_k": _at_least(1),
}


def _check_range(value, key: str, where: str) -> None:
    items = value if isinstance(value, tuple) else (value,)
    for v in items:
        if isinstance(v, float) and v != v or v in (float("inf"), float("-inf")):
            raise ConfigError(f"{where}: key '{key}' = {value!r}: expected a finite number")
        if key in RANGES and isinstance(v, (int, float)) and not isinstance(v, bool) and not RANGES[key][1](v):
            raise ConfigError(f"{where}: key '{key}' = {value!r}: expected {RANGES[key][0]}")


def _coerce(value, tp, key: str, where: str):
    """Check `value` against the annotation `tp`; ints are accepted for floats, lists for tuples."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            if arg is type(None) and value is None:
                return None
            try:
                return _coerce(value, arg, key, where)
            except ConfigError:
                pass
        raise ConfigError(f"{where}: key '{key}' = {value!r}: expected {tp}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: key '{key}' = {value!r}: expected a list")
        (item_tp, _ellipsis) = typing.get_args(tp)
        return tuple(_coerce(v, item_tp, f"{key}[{i}]", where) for i, v in enumerate(value))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # PyYAML reads `1e-3` (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp is int and isinstance(value, bool) or not isinstance(value, tp):
        raise ConfigError(f"{where}: key '{key}' = {value!r}: expected {tp.__name__}, got {type(value).__name__}")
    return value


def build(cls, raw: dict, where: str, prefix: str = ""):
    """Build dataclass `cls` from a nested dict, strictly."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: section '{prefix.rstrip('.') or '<top>'}' must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key '{prefix}{unknown[0]}' (known keys: {', '.join(sorted(names))})")
    kwargs = {}
    for name, value in raw.items():
        tp = hints[name]
        key = prefix + name
        if dataclasses.is_dataclass(tp):
            kwargs[name] = build(tp, value, where, key + ".")
        else:
            kwargs[name] = _coerce(value, tp, key, where)
            _check_range(kwargs[name], key, where)
            if key in CHOICES and kwargs[name] not in CHOICES[key]:
                raise ConfigError(f"{where}: key '{key}' = {value!r}: expected one of {CHOICES[key]}")
            if key in REGISTRIES and kwargs[name] not in REGISTRIES[key].names():
                raise ConfigError(f"{where}: key '{key}' = {value!r}: expected one of {REGISTRIES[key].names()}")
    out = cls(**kwargs)
    if cls is RunConfig:
        check_run(out, where)
    return out


def check_gates(scoring: "ScoringConfig") -> None:
    """Learned gates need an ungated term to start from (the anchor: global) and a gated one to open;
    which terms are which is the term registry's (`gate` of each scoring.Term). Checked where the
    terms are used (the model, every ablation cell before any trains), not at load: reading the
    registry imports hosa_lib.scoring, which a stage that does not score (prepare) must not depend on."""
    if not scoring.gates:
        return
    terms = list(TERMS.loaded().values())
    weights = {t.weight: getattr(scoring, t.weight) for t in terms}
    anchors = [t.weight for t in terms if t.gate is None]
    gated = [t.weight for t in terms if t.gate is not None]
    if not any(weights[w] for w in anchors) or not any(weights[w] for w in gated):
        got = ", ".join(f"{w}={v}" for w, v in weights.items())
        raise ConfigError(f"scoring.gates: needs an ungated term ({' or '.join(anchors)}) and a gated term "
                          f"({' or '.join(gated)}) with non-zero weights, got {got}; set scoring.gates: false for "
                          "this variant")


def check_run(cfg: "RunConfig", where: str) -> None:
    """Rules between keys, checked when a run config is built (so every ablation cell is checked
    before any cell trains)."""
    if cfg.train.epochs == 0 and not cfg.train.validate_at_start:
        raise ConfigError(f"{where}: train.epochs = 0: expected at least 1, or 0 with train.validate_at_start: true "
                          "(evaluates the untrained model)")
    if cfg.model.text_tune_layers and (cfg.model.text_finetune or cfg.data.text_layer < 1):
        raise ConfigError(f"{where}: model.text_tune_layers = {cfg.model.text_tune_layers} runs the layers above the "
                          f"cached data.text_layer: needs data.text_layer >= 1 (got {cfg.data.text_layer}) and "
                          f"model.text_finetune: false (got {cfg.model.text_finetune})")
    if cfg.model.embed % cfg.model.heads:
        raise ConfigError(f"{where}: model.embed = {cfg.model.embed} is not a multiple of model.heads = "
                          f"{cfg.model.heads}")


def deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


ROOT_ENV = "HOSA_ROOT"
MARKER = Path("params") / "base.yaml"
# Params keys holding file or folder paths: relative values resolve against the project root.
PATH_KEYS = ("output_root", "data.store", "data.root", "data.captions", "data.features_dir", "data.image_sizes",
             "data.spice", "ablation.grid")


def marked_root(start: str | Path, resolve: bool = True) -> Path | None:
    """The nearest folder at or above `start` holding params/base.yaml, or None. resolve=False walks
    the path as written (a symlinked outputs/ or data/ folder still belongs to its project)."""
    origin = Path(start).resolve() if resolve else Path(os.path.abspath(start))
    return next((d for d in [origin, *origin.parents] if (d / MARKER).is_file()), None)


def project_root(start: str | Path | None = None) -> Path:
    """The folder that relative params paths mean: $HOSA_ROOT if set, else the nearest folder at or
    above `start` (a params file or folder; default: the working directory) that holds
    params/base.yaml, else the working directory. JupyterLab kernels run in notebooks/, the CLIs
    anywhere: both find the same root."""
    if os.environ.get(ROOT_ENV):
        return Path(os.environ[ROOT_ENV]).resolve()
    for origin in ([Path(start)] if start else []) + [Path.cwd()]:
        if (root := marked_root(origin)) is not None:
            return root
    return Path.cwd().resolve()


def find_params(path: str | Path) -> Path:
    """A params file as given, or relative to the project root (so `params/demo.yaml` works from notebooks/)."""
    path = Path(path)
    if path.is_file() or path.is_absolute():
        return path
    return project_root() / path


def _repeated_key(node, prefix: str = ""):
    """(dotted key, first line, second line) of the first key that a YAML mapping repeats, or None."""
    if isinstance(node, yaml.MappingNode):
        lines: dict = {}
        for k, v in node.value:
            key = getattr(k, "value", None)
            if isinstance(key, str) and key in lines:
                return f"{prefix}{key}", lines[key], k.start_mark.line + 1
            lines[key] = k.start_mark.line + 1
            if (found := _repeated_key(v, f"{prefix}{key}.")) is not None:
                return found
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            if (found := _repeated_key(v, f"{prefix.rstrip('.')}[{i}].")) is not None:
                return found
    return None


def read_yaml(path: Path):
    """A YAML file (params or ablation grid) as Python data. A key repeated in one mapping is an error
    naming the key and both lines (PyYAML would keep the last silently)."""
    text = Path(path).read_text(encoding="utf-8-sig")
    try:
        found = _repeated_key(yaml.compose(text, Loader=yaml.SafeLoader))
        if found:
            key, first, second = found
            raise ConfigError(f"{path}: key '{key}' appears twice (line {first} and line {second}); keep one")
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None


def read_params(path: str | Path, _seen: tuple = (), _referrer: str = "") -> dict:
    """The merged raw dict of a params file and its `base:` chain (bases relative to the file)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"params file not found: {path}" + (f" (named by base: in {_referrer})" if _referrer else ""))
    if path.resolve() in _seen:
        chain = " -> ".join(str(p) for p in (*_seen, path.resolve()))
        raise ConfigError(f"{path}: base: chain loops ({chain})")
    raw = read_yaml(path)
    if raw is None:
        raise ConfigError(f"{path}: empty params file (name at least a base: file, e.g. `base: base.yaml`)")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    base = raw.pop("base", None)
    if base:
        raw = deep_merge(read_params(path.parent / base, (*_seen, path.resolve()), str(path)), raw)
    return raw


def own_names(path: Path, raw: dict) -> dict:
    """Each params file has its own run name and store unless it names them itself: `name` and
    `data.store` are not inherited from a base file but derived from the file's name
    (`mine.yaml` -> name `mine`, store `outputs/data/mine.h5`), so following a base such as
    images.yaml never writes into another params file's store (e.g. the demo's)."""
    own = read_yaml(path) or {}
    raw = dict(raw)
    if "name" not in own:
        raw["name"] = path.stem
    data = dict(raw.get("data") or {})
    if "store" not in (own.get("data") or {}) and data.get("source") != "store":
        data["store"] = f"outputs/data/{path.stem}.h5"
        raw["data"] = data
    return raw


def resolve_paths(cfg: RunConfig, root: Path) -> RunConfig:
    """Relative path keys made absolute against `root`; empty values stay empty."""
    over: dict = {}
    for key in PATH_KEYS:
        *sections, name = key.split(".")
        value = getattr(getattr(cfg, sections[0]) if sections else cfg, name)
        if value and not Path(value).is_absolute():
            target = over.setdefault(sections[0], {}) if sections else over
            target[name] = str(root / value)
    return override(cfg, over, "<paths>") if over else cfg


def load(path: str | Path, overrides: dict | None = None) -> RunConfig:
    """Load a params file (with its base chain) plus optional nested overrides, strictly typed.
    Relative paths inside resolve against the project root (`project_root`), wherever this runs."""
    path = find_params(path)
    raw = own_names(path, read_params(path))
    if overrides:
        raw = deep_merge(raw, overrides)
    return resolve_paths(build(RunConfig, raw, str(path)), project_root(path.parent))


def from_dict(raw: dict, where: str = "<dict>") -> RunConfig:
    return build(RunConfig, raw, where)


def to_dict(cfg) -> dict:
    """Plain nested dict (tuples as lists) for YAML/JSON and checkpoints."""
    def conv(x):
        if isinstance(x, tuple):
            return [conv(v) for v in x]
        if isinstance(x, dict):
            return {k: conv(v) for k, v in x.items()}
        return x
    return conv(dataclasses.asdict(cfg))


def override(cfg, overrides: dict, where: str = "<overrides>"):
    """The one way to derive a config: `cfg` (any config dataclass) with nested `overrides`
    deep-merged over it, checked as strictly as a params file."""
    return build(type(cfg), deep_merge(to_dict(cfg), overrides), where)
