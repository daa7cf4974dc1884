"""HOSA model: image and text encoders tied to the scoring of `hosa_lib.scoring`.

Build or load one through `hosa_lib.factory` (from a config and a store, or from a checkpoint).
"""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn as nn

from .config import ARCHS, ModelConfig, ScoringConfig, check_gates
from .encoders import ImageEncoder, TextEncoder, transformer
from .scoring import SCORING_TERMS, gated_terms, gated_weights, make_side, pair_scores


# The gate order of checkpoints saved before gates were named (term_gates[0] = local, [1] = high).
LEGACY_GATES = ("local", "high")
GATE_NAMES = "term_gate_names"  # state-dict entry beside term_gates: the term of each gate, in order


def _save_gate_names(module, state_dict, prefix, local_metadata) -> None:
    """Gated models save which term each entry of term_gates belongs to, so their checkpoints load by
    term name when a gated term is added (or the gates are reordered) later."""
    state_dict[prefix + GATE_NAMES] = [t.name for t in gated_terms()]


@ARCHS.register("hosa")
def _hosa_encoders(mcfg: ModelConfig, feat_dim: int, text_dim: int, backbone, top):
    """This workbench's encoders (hosa_lib.encoders)."""
    return ImageEncoder(mcfg, feat_dim), TextEncoder(mcfg, text_dim, backbone if mcfg.text_finetune else None, top)


@ARCHS.register("teran")
def _teran_encoders(mcfg: ModelConfig, feat_dim: int, text_dim: int, backbone, top):
    """TERAN's exact module layout (checkpoint import); its text backbone runs inside the model."""
    from .teran import TeranImageEncoder, TeranTextEncoder
    if backbone is None:
        raise ValueError("model.arch 'teran' runs its text backbone inside the model (text_finetune: true)")
    if mcfg.region_norm:
        raise ValueError("model.region_norm is not part of TERAN's layout (model.arch 'teran'); set it false")
    return TeranImageEncoder(mcfg, feat_dim), TeranTextEncoder(mcfg, text_dim, backbone)


class HOSA(nn.Module):
    def __init__(self, mcfg: ModelConfig, scfg: ScoringConfig, feat_dim: int, text_dim: int,
                 backbone: nn.Module | None = None, loss: nn.Module | None = None, top: nn.Module | None = None):
        super().__init__()
        self.mcfg, self.scfg = mcfg, scfg
        # the training loss (`loss.make_loss`): its parameters (InfoNCE's temperature) are trained and
        # saved with the weights; registered first, where they always were (parameter order is kept)
        self.loss = loss
        self.image, self.text = ARCHS.impl(mcfg.arch)(mcfg, feat_dim, text_dim, backbone, top)
        self.shared = transformer(mcfg, mcfg.shared_layers)
        if scfg.gates:  # one per gated term (scoring.SCORING_TERMS): untrained, the global term alone scores
            check_gates(scfg)
            self.term_gates = nn.Parameter(torch.zeros(len(gated_terms())))
            self.register_state_dict_post_hook(_save_gate_names)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        old = prefix + "log_scale"  # checkpoints from before make_loss held InfoNCE's temperature here
        if old in state_dict:
            state_dict[prefix + "loss.log_scale"] = state_dict.pop(old)
        key = prefix + "term_gates"
        names = state_dict.pop(prefix + GATE_NAMES, None)
        if key in state_dict and self.scfg.gates:  # by name; checkpoints before names: LEGACY_GATES' order
            names = names or LEGACY_GATES[:len(state_dict[key])]
            values = dict(zip(names, state_dict[key].tolist()))
            state_dict[key] = torch.tensor([values.get(t.name, 0.0) for t in gated_terms()],
                                           dtype=state_dict[key].dtype)  # a term added since starts off (0)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def param_groups(self, tc) -> list[dict]:
        """AdamW parameter groups: the fine-tuned text backbone (or its top layers) at `lr * model.text_lr_scale`, the term
        gates at `train.gate_lr` without weight decay (scalars that must move by O(1) within a run),
        everything else at `train.lr`."""
        backbone = [p for m in (self.text.backbone, getattr(self.text, "top", None)) if m is not None
                    for p in m.parameters()]
        gates = [self.term_gates] if self.scfg.gates else []
        ids = {id(p) for p in backbone + gates}
        groups = [{"params": [p for p in self.parameters() if id(p) not in ids]}]
        if backbone:
            groups.append({"params": backbone, "lr": tc.lr * self.mcfg.text_lr_scale})
        if gates:
            groups.append({"params": gates, "lr": tc.gate_lr, "weight_decay": 0.0})
        return groups

    def clip_parameters(self) -> list[nn.Parameter]:
        """Every parameter in the order gradient clipping sums their norms: the loss's first (where its
        temperature was registered before `make_loss`), then the rest; the order of a float sum decides
        its last bit, so clipped runs reproduce checkpoints trained before the change bit for bit."""
        own = list(self.loss.parameters()) if self.loss is not None else []
        ids = {id(p) for p in own}
        return own + [p for p in self.parameters() if id(p) not in ids]

    def encode_images(self, batch: dict) -> dict[str, torch.Tensor]:
        """-> glob (B, d), local (B, K, d), mask (B, K): what evaluation caches."""
        glob, local, mask = self.image(batch["regions"], batch["boxes"], batch["region_mask"], self.shared)
        return {"glob": glob, "local": local, "mask": mask}

    def encode_captions(self, batch: dict) -> dict[str, torch.Tensor]:
        """-> glob (B, d), local (B, T, d), mask (B, T) of the local words."""
        glob, local, mask = self.text(batch["text_mask"], batch["word_mask"], hidden=batch.get("text"),
                                      input_ids=batch.get("input_ids"), shared=self.shared)
        return {"glob": glob, "local": local, "mask": mask}

    def score(self, img: dict, cap: dict, cfg: ScoringConfig | None = None) -> dict[str, torch.Tensor]:
        """All pairs of the two encoded sets: dict of (N_img, N_cap) score terms and 'total' (with the
        term gates, differentiably, when the model has them and no other scoring is given)."""
        weights = None
        if cfg is None and self.scfg.gates:
            weights = gated_weights(self.scfg, self.term_gates)
        cfg = cfg or self.scfg
        return pair_scores(make_side(**img, cfg=cfg, name="images"), make_side(**cap, cfg=cfg, name="captions"), cfg,
                           weights)

    def scoring_config(self) -> ScoringConfig:
        """The scoring this model's scores are evaluated with: its config, the gates folded into the
        gated terms' weights (plain floats) when it has them."""
        if not self.scfg.gates:
            return self.scfg
        folded = gated_weights(self.scfg, self.term_gates.detach().cpu().tolist())
        return replace(self.scfg, **{t.weight: folded[t.name] for t in SCORING_TERMS}, gates=False)
