"""The README's "Extending" recipes, each followed on a toy addition: a scoring term, a loss and a model
architecture (the metric recipe, R@20, is in tests/test_metrics.py). Each registry is the one list of its
choices: config validates params through it and the code builds from it."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as nnf

from hosa_lib import config as config_mod
from hosa_lib import reference, scoring
from hosa_lib.config import ARCHS, CHOICES, LOSSES, REGISTRIES, TERMS, ConfigError, ScoringConfig, load, override


def random_side(n, k, d, seed):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(n, k, generator=g) > 0.3
    mask[:, 0] = True
    return {"glob": torch.randn(n, d, generator=g, dtype=torch.float64),
            "local": torch.randn(n, k, d, generator=g, dtype=torch.float64), "mask": mask}


# --- a scoring term: the largest region-word cosine of a pair ---------------------------------------

@dataclasses.dataclass(frozen=True)
class PeakScoring(ScoringConfig):  # recipe step 1: the term's weight field (in config.ScoringConfig)
    w_peak: float = 0.0


def _peak(img: scoring.Side, cap: scoring.Side, cfg) -> torch.Tensor:  # step 2: all pairs, fast
    a = torch.einsum("imd,cld->icml", img.local, cap.local)
    valid = img.mask[:, None, :, None] & cap.mask[None, :, None, :]
    return a.masked_fill(~valid, float("-inf")).amax(dim=(2, 3))


def _peak_wrong(img, cap, cfg) -> torch.Tensor:  # the same with the bug the issue names (amin for amax)
    a = torch.einsum("imd,cld->icml", img.local, cap.local)
    valid = img.mask[:, None, :, None] & cap.mask[None, :, None, :]
    return a.masked_fill(~valid, float("inf")).amin(dim=(2, 3))


def _peak_reference(v, t, gi, gc, cfg) -> torch.Tensor:  # step 3: one pair, explicitly
    return (nnf.normalize(v, dim=-1) @ nnf.normalize(t, dim=-1).T).max()


@pytest.fixture
def peak_term(monkeypatch):
    """Registers the toy term as the recipe says (SCORING_TERMS entry, config.TERMS, REFERENCES)."""
    shipped = scoring.SCORING_TERMS

    def add(compute, gate=None):
        term = scoring.Term("peak", "w_peak", "peak: the best region-word cosine", gate, False, compute)
        terms = shipped + (term,)
        monkeypatch.setattr(scoring, "SCORING_TERMS", terms)
        monkeypatch.setattr(reference, "SCORING_TERMS", terms)
        monkeypatch.setitem(TERMS, "peak", term)
        monkeypatch.setitem(reference.REFERENCES, "peak", _peak_reference)
        return term
    return add


def _all_terms_on(bands=4, direction="both"):
    weights = {t.weight: 0.5 + i for i, t in enumerate(scoring.SCORING_TERMS)}
    return PeakScoring(bands=bands, direction=direction, temperature=3.0, **weights)


def _compare(cfg):
    img, cap = random_side(3, 5, 16, seed=1), random_side(4, 6, 16, seed=2)
    got = scoring.pair_scores(scoring.make_side(**img, cfg=cfg), scoring.make_side(**cap, cfg=cfg), cfg)
    ref = reference.pair_scores_reference(img, cap, cfg)
    for k in (*(t.name for t in scoring.SCORING_TERMS), "total"):
        torch.testing.assert_close(got[k], ref[k], rtol=1e-9, atol=1e-9, msg=k)


def test_a_new_scoring_term_is_compared_with_its_reference(peak_term):
    """The registry-driven equality test (tests/test_scoring.py) turns every term on; a correct toy term
    passes it and the issue's wrong one (amin for amax) fails it."""
    peak_term(_peak)
    assert getattr(_all_terms_on(), "w_peak") != 0
    _compare(_all_terms_on())
    peak_term(_peak_wrong)
    with pytest.raises(AssertionError, match="peak"):
        _compare(_all_terms_on())


def test_a_new_term_without_a_reference_fails(peak_term, monkeypatch):
    peak_term(_peak)
    monkeypatch.delitem(reference.REFERENCES, "peak")
    with pytest.raises(NotImplementedError, match=r"\['peak'\] have no explicit reference"):
        _compare(_all_terms_on())


def test_only_switches_off_every_term_not_named_including_new_ones(peak_term, tmp_path):
    from hosa_lib.ablations import only_weights, read_grid
    peak_term(_peak)
    assert only_weights(["global"], {}, "grid") == {"w_high": 0.0, "w_local": 0.0, "w_peak": 0.0}
    grid = tmp_path / "grid.yaml"
    grid.write_text("common: {only: [local]}\nvariants:\n  - {name: a}\n  - {name: b, only: [global, peak]}\n"
                    "  - {name: c, only: [high], overrides: {scoring: {bands: 2}}}\n")
    (a, b, c), _ = read_grid(grid)
    assert a["overrides"] == {"scoring": {"w_global": 0.0, "w_high": 0.0, "w_peak": 0.0}}
    assert b["overrides"] == {"scoring": {"w_high": 0.0, "w_local": 0.0}}
    assert c["overrides"] == {"scoring": {"bands": 2, "w_global": 0.0, "w_local": 0.0, "w_peak": 0.0}}


@pytest.mark.parametrize("text,message", [
    ("variants:\n  - {name: a, only: [globl]}\n", r"grid.yaml: variant a: 'only' names 'globl': expected scoring terms"),
    ("variants:\n  - {name: a, only: []}\n", r"variant a: 'only' = \[\]: expected a non-empty list"),
    ("variants:\n  - {name: a, only: global}\n", r"variant a: 'only' = 'global': expected a non-empty list"),
    ("variants:\n  - {name: a, only: [global], overrides: {scoring: {w_local: 2.0}}}\n",
     r"variant a: 'only' = \['global'\] switches off w_local, which its overrides set to 2.0"),
    ("variants:\n  - {name: a, keep: [global]}\n", r"each variant needs 'name' and optional 'overrides' and 'only'"),
])
def test_only_rejects_what_it_cannot_do(tmp_path, text, message):
    from hosa_lib.ablations import read_grid
    grid = tmp_path / "grid.yaml"
    grid.write_text(text)
    with pytest.raises(ConfigError, match=message):
        read_grid(grid)


def test_gates_follow_the_term_registry(peak_term):
    """check_gates reads which terms are gated from the registry: a gated new term counts as a local
    term the gates can open; a config with only ungated terms is refused naming them."""
    peak_term(_peak, gate=2)
    config_mod.check_gates(PeakScoring(gates=True, w_local=0.0, w_high=0.0, w_peak=1.0))
    with pytest.raises(ConfigError, match=r"needs an ungated term \(w_global\) and a gated term "
                                          r"\(w_high or w_local or w_peak\)"):
        config_mod.check_gates(PeakScoring(gates=True, w_local=0.0, w_high=0.0))


def test_term_fields_replace_the_per_weight_special_cases(peak_term):
    """Band features, chunk sizes and the empty-caption rule follow the terms' fields, not named weights."""
    peak_term(_peak)
    only_peak = PeakScoring(w_global=0.0, w_local=0.0, w_high=0.0, w_peak=1.0, bands=8)
    assert not scoring.uses_bands(only_peak)
    assert scoring.chunk_sizes(100, 100, 4, 5, only_peak, 4 * 5 * 10) == scoring.chunk_sizes(
        100, 100, 4, 5, override(only_peak, {"bands": 1}), 4 * 5 * 10)
    with_high = dataclasses.replace(only_peak, w_high=1.0, kernel="numba")  # numba holds a chunk's band shares
    assert scoring.uses_bands(with_high)
    ci, cc = scoring.chunk_sizes(100, 100, 4, 5, with_high, 4 * 5 * 80)  # room for 10 pairs of 8 bands each
    assert ci * cc <= 10
    ci, cc = scoring.chunk_sizes(100, 100, 4, 5, only_peak, 4 * 5 * 80)  # 80 pairs without bands
    assert 10 < ci * cc <= 80
    empty = random_side(2, 3, 8, seed=3)
    empty["mask"][1] = False
    scoring.make_side(**empty, cfg=dataclasses.replace(only_peak, padding="teran"))
    with pytest.raises(ValueError, match=r"item\(s\) \[1\] have no valid"):
        scoring.make_side(**empty, cfg=dataclasses.replace(with_high, padding="teran"))


# --- registries: a loss and a model architecture ----------------------------------------------------

def test_registry_keys_have_no_second_list():
    """A params key validated through a registry is not also in config.CHOICES, and each registry's
    home fills it (the names config accepts are the implementations that exist)."""
    assert not set(REGISTRIES) & set(CHOICES)
    assert set(LOSSES.names()) == {"hinge", "infonce"}
    assert set(ARCHS.names()) == {"hosa", "teran"}
    assert set(REGISTRIES["scoring.kernel"].names()) == {"auto", "torch", "numba", "triton", "flash"}
    assert set(REGISTRIES["eval.ties"].names()) == {"fair", "teran", "optimistic"}
    assert set(TERMS.names()) == {t.name for t in scoring.SCORING_TERMS}


def test_loading_params_imports_no_registry_home():
    """Config validates registry keys from the homes' source (their `register("...")` calls) without
    importing them: loading params imports neither torch nor the loss, kernels, metrics, model or
    scoring, so a stage that never runs them (prepare) does not depend on their code. The names read
    from source equal the registries once the homes are imported."""
    import subprocess
    import sys
    from pathlib import Path
    code = ("import sys; from hosa_lib.config import REGISTRIES, load; load('params/demo.yaml'); "
            "before = {k: r.names() for k, r in REGISTRIES.items()}; "
            "print(sorted(m for m in sys.modules if m.startswith(('hosa_lib.', 'torch')) and m != 'hosa_lib.provenance')); "
            "import importlib; [importlib.import_module(r.home) for r in REGISTRIES.values()]; "
            "print(all(set(before[k]) == set(r) for k, r in REGISTRIES.items()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parent.parent).stdout.split("\n")
    assert out[0] == "['hosa_lib.config']" and out[1] == "True", out


def _params(tmp_path, text: str):
    p = tmp_path / "p.yaml"
    p.write_text(text)
    return p


class SquaredHinge(nn.Module):
    """Toy loss: the hinge of every negative against its positive, squared (mean over pairs)."""

    def __init__(self, cfg):
        super().__init__()
        self.margin = cfg.margin

    def forward(self, scores, positives, step):
        pos = (scores * positives).sum(1, keepdim=True) / positives.sum(1, keepdim=True)
        loss = (nnf.relu(self.margin + scores - pos) * ~positives).pow(2).mean()
        return {"loss": loss, "i2t": loss.detach(), "t2i": loss.detach()}


def test_a_new_loss_is_one_registration(monkeypatch, tmp_path):
    from hosa_lib.loss import make_loss
    bad = _params(tmp_path, "loss: {kind: squared_hinge}\n")
    with pytest.raises(ConfigError, match=r"p.yaml: key 'loss.kind' = 'squared_hinge': expected one of "
                                          r"\('hinge', 'infonce'\)"):
        load(bad)
    monkeypatch.setitem(LOSSES, "squared_hinge", SquaredHinge)  # = @LOSSES.register("squared_hinge")
    cfg = load(bad)
    loss = make_loss(cfg.loss)
    assert isinstance(loss, SquaredHinge)
    scores = torch.randn(4, 4, requires_grad=True)
    out = loss(scores, torch.eye(4, dtype=torch.bool), step=0)
    out["loss"].backward()
    assert out["loss"] > 0 and scores.grad.abs().sum() > 0


def test_a_name_registered_twice_is_refused():
    with pytest.raises(ValueError, match="loss.kind: 'hinge' is registered twice"):
        LOSSES.register("hinge")(SquaredHinge)


def test_a_new_architecture_is_one_registration(monkeypatch, tmp_path, smoke_store):
    """A toy architecture (this workbench's encoders with the image side's box geometry dropped) is
    accepted by config once registered and built by the factory."""
    from hosa_lib.encoders import ImageEncoder, TextEncoder
    from hosa_lib.factory import build_model

    def no_boxes(mcfg, feat_dim, text_dim, backbone, top):
        return ImageEncoder(override(mcfg, {"box_geometry": False}), feat_dim), TextEncoder(mcfg, text_dim, None, top)

    bad = _params(tmp_path, f"data: {{source: store, store: {smoke_store.store}}}\nmodel: {{arch: no_boxes}}\n")
    with pytest.raises(ConfigError, match=r"key 'model.arch' = 'no_boxes': expected one of \('hosa', 'teran'\)"):
        load(bad)
    monkeypatch.setitem(ARCHS, "no_boxes", no_boxes)
    model, _ = build_model(load(bad), seed=0)
    reference_model, _ = build_model(override(load(bad), {"model": {"arch": "hosa"}}), seed=0)
    n_toy, n_ref = (sum(p.numel() for p in m.image.parameters()) for m in (model, reference_model))
    assert n_toy < n_ref  # the box geometry's input columns are gone
