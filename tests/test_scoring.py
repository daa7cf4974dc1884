import pytest
import torch
import torch.nn.functional as nnf

from hosa_lib.config import ScoringConfig, override
from hosa_lib.reference import pair_scores_reference
from hosa_lib.scoring import band_features, make_side, pair_scores, score_all_pairs


def random_side(n, length, d, seed, min_len=1):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(min_len, length + 1, (n,), generator=g)
    mask = torch.arange(length)[None] < lens[:, None]
    local = torch.randn(n, length, d, generator=g, dtype=torch.float64)
    local = local * mask[..., None] + 7.0 * ~mask[..., None]  # garbage in padding must not matter
    return {"glob": torch.randn(n, d, generator=g, dtype=torch.float64), "local": local, "mask": mask}


def fast(img, cap, cfg):
    """The eager torch path (scoring.kernel `torch`) unless cfg names a kernel: `auto` would take the
    numba kernel on a CPU, which tests/test_kernels.py checks against the same reference."""
    if cfg.kernel == "auto":
        cfg = override(cfg, {"kernel": "torch"})
    return pair_scores(make_side(**img, cfg=cfg), make_side(**cap, cfg=cfg), cfg)


@pytest.mark.parametrize("d,bands,direction,pool", [
    (d, *case) for d in (16, 17) for case in ((1, "t2i", "sum"), (4, "t2i", "sum"), (3, "i2t", "mean"), (9, "both", "sum"))
] + [(33, 16, "both", "mean"), (32, 16, "t2i", "sum")])
def test_fast_equals_explicit_reference(d, bands, direction, pool):
    """Every registered term (SCORING_TERMS, not a hand-kept list), each with a non-zero weight, so a
    term added later is compared with its reference too."""
    from hosa_lib.scoring import SCORING_TERMS
    weights = {t.weight: 0.5 + i for i, t in enumerate(SCORING_TERMS)}
    cfg = ScoringConfig(bands=bands, direction=direction, local_pool=pool, temperature=3.0, **weights)
    img, cap = random_side(3, 5, d, seed=d + bands), random_side(4, 6, d, seed=2 * d + bands)
    got, ref = fast(img, cap, cfg), pair_scores_reference(img, cap, cfg)
    for k in (*(t.name for t in SCORING_TERMS), "total"):
        assert k in got and k in ref, k
        torch.testing.assert_close(got[k], ref[k], rtol=1e-9, atol=1e-9, msg=k)


def test_band_shares_sum_to_cosine():
    x = nnf.normalize(torch.randn(5, 32, dtype=torch.float64), dim=-1)
    y = nnf.normalize(torch.randn(6, 32, dtype=torch.float64), dim=-1)
    rho = band_features(x, 7) @ band_features(y, 7).transpose(-1, -2)  # (G, 5, 6)
    torch.testing.assert_close(rho.sum(0), x @ y.T)


def test_g1_is_scalar_cross_attention():
    cfg = ScoringConfig(bands=1, temperature=5.0, w_local=0, w_global=0, w_high=1)
    img, cap = random_side(2, 4, 12, seed=3), random_side(3, 5, 12, seed=4)
    got = fast(img, cap, cfg)["high"]
    for i in range(2):
        v = nnf.normalize(img["local"][i][img["mask"][i]], dim=-1)
        for c in range(3):
            t = nnf.normalize(cap["local"][c][cap["mask"][c]], dim=-1)
            attn = torch.softmax(5.0 * (v @ t.T), dim=1)  # each region attends over words
            expect = nnf.cosine_similarity(v, attn @ t, dim=-1).mean()
            torch.testing.assert_close(got[i, c], expect)


def test_permutation_and_padding_invariance():
    cfg = ScoringConfig(bands=4, direction="both")
    img, cap = random_side(3, 5, 16, seed=5, min_len=5), random_side(3, 4, 16, seed=6, min_len=4)
    base = fast(img, cap, cfg)["total"]
    perm = torch.randperm(5)
    img_p = dict(img, local=img["local"][:, perm], mask=img["mask"][:, perm])
    torch.testing.assert_close(fast(img_p, cap, cfg)["total"], base)
    pad = lambda s, k: dict(s, local=torch.cat([s["local"], torch.randn(len(s["mask"]), k, 16, dtype=torch.float64)], 1),
                             mask=torch.cat([s["mask"], torch.zeros(len(s["mask"]), k, dtype=torch.bool)], 1))
    torch.testing.assert_close(fast(pad(img, 3), pad(cap, 2), cfg)["total"], base)


def test_chunked_all_pairs_equals_unchunked():
    cfg = ScoringConfig(bands=4, direction="both")
    img, cap = random_side(13, 5, 16, seed=7), random_side(17, 6, 16, seed=8)
    full = fast(img, cap, cfg)
    chunked = score_all_pairs(img, cap, cfg, max_elems=4 * 5 * 6 * 7, terms=("total", "high", "local"))
    for k in ("total", "high", "local"):
        torch.testing.assert_close(chunked[k].double(), full[k], rtol=1e-5, atol=1e-5)


def test_zero_weight_terms_are_skipped_and_local_path_matches():
    cfg = ScoringConfig(bands=4)
    img, cap = random_side(3, 5, 16, seed=9), random_side(4, 6, 16, seed=10)
    with_high = fast(img, cap, cfg)["local"]
    no_high = fast(img, cap, override(cfg, {"w_high": 0.0}))
    assert "high" not in no_high
    torch.testing.assert_close(no_high["local"], with_high)


def test_gradients_flow_and_are_finite():
    cfg = ScoringConfig(bands=4, direction="both")
    img, cap = random_side(3, 5, 16, seed=11), random_side(3, 6, 16, seed=12)
    img["local"].requires_grad_(True)
    fast(img, cap, cfg)["total"].sum().backward()
    assert torch.isfinite(img["local"].grad).all() and img["local"].grad.abs().sum() > 0


def test_bad_inputs_have_clear_errors():
    cfg = ScoringConfig(bands=4)
    img, cap = random_side(2, 5, 16, seed=1), random_side(2, 5, 16, seed=2)
    with pytest.raises(ValueError, match="feature dims differ"):
        fast(img, random_side(2, 5, 12, seed=3), cfg)
    nan = dict(img, local=img["local"].clone())
    nan["local"][1, 0, 3] = float("nan")
    with pytest.raises(ValueError, match=r"(images|side)\.local: non-finite value \(NaN/Inf\) at index \[1, 0, 3\]"):
        fast(nan, cap, cfg)
    inf = dict(cap, glob=cap["glob"].clone())
    inf["glob"][0, 1] = float("-inf")
    with pytest.raises(ValueError, match=r"(captions|side)\.glob: non-finite value \(NaN/Inf\) at index \[0, 1\]"):
        fast(img, inf, cfg)
    big = torch.finfo(img["glob"].dtype).max
    huge = dict(img, glob=torch.full_like(img["glob"], big))  # finite, though its sum overflows
    assert torch.isfinite(fast(huge, cap, cfg)["total"]).all()
    empty = dict(cap, mask=cap["mask"].clone())
    empty["mask"][1] = False
    with pytest.raises(ValueError, match="no valid"):
        fast(img, empty, cfg)
    with pytest.raises(ValueError, match="bands"):
        fast(img, cap, ScoringConfig(bands=100))


def test_high_order_backward_matches_autograd_and_gradcheck():
    """The hand-written backward of the t2i term against float64 gradcheck (padding included)."""
    from hosa_lib.scoring import _HighOrderT2I
    g = torch.Generator().manual_seed(0)
    G, Nc, L, Ni, M = 3, 2, 4, 3, 5
    rho = torch.randn(G, Nc, L, Ni, M, generator=g, dtype=torch.float64, requires_grad=True)
    u = torch.randn(G, Nc, L, 6, generator=g, dtype=torch.float64)
    gram = (u @ u.transpose(-1, -2)).requires_grad_(True)  # a PSD Gram matrix, like the real one
    cmask = torch.tensor([[True, True, True, False], [True, True, True, True]])
    vmask = torch.tensor([[True] * 5, [True, True, False, False, False], [True] * 4 + [False]])
    f = lambda r, gm: _HighOrderT2I.apply(r, gm, cmask, vmask, 2.0)
    assert torch.autograd.gradcheck(f, (rho, gram))

    def plain(r, gm):  # the same forward written with autograd-tracked torch ops only
        logits = (r * 2.0).masked_fill(~cmask[None, :, :, None, None], float("-inf"))
        alpha = torch.softmax(logits, dim=2)
        num = (alpha * r).sum(dim=(0, 2))
        beta = torch.einsum("gckl,gclim->gckim", gm, alpha)
        norm = (beta * alpha).sum(dim=(0, 2)).sqrt()
        weight = vmask.double() / vmask.sum(-1, keepdim=True)
        return (num / norm * weight).sum(-1)

    up = torch.randn(Nc, Ni, generator=g, dtype=torch.float64)
    torch.testing.assert_close(f(rho, gram), plain(rho, gram))
    ours = torch.autograd.grad((f(rho, gram) * up).sum(), (rho, gram))
    ref = torch.autograd.grad((plain(rho, gram) * up).sum(), (rho, gram))
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b)


def test_bucketed_caption_blocks_equal_dense():
    """Captions given as length-bucketed blocks (their own padding, float16) score like the dense set."""
    cfg = ScoringConfig(bands=4)
    img, cap = random_side(7, 5, 16, seed=13), random_side(9, 6, 16, seed=14)
    dense = score_all_pairs(img, cap, cfg)["total"]
    order = torch.argsort(cap["mask"].sum(1))
    blocks = []
    for idx in (order[:4], order[4:]):
        width = int(cap["mask"][idx].sum(1).max())
        blocks.append({"glob": cap["glob"][idx], "local": cap["local"][idx, :width], "mask": cap["mask"][idx, :width],
                       "index": idx})
    torch.testing.assert_close(score_all_pairs(img, blocks, cfg)["total"], dense, rtol=1e-5, atol=1e-5)


def test_teran_padding_rule_against_explicit_loops():
    """scoring.padding 'teran': padded region alignments count as 0 in the max (TERAN's loss and
    evaluation code); a caption without alignment words scores 0. 'ours' excludes padded regions."""
    g = torch.Generator().manual_seed(5)
    img = {"glob": torch.randn(3, 8, generator=g), "local": -torch.rand(3, 4, 8, generator=g),  # all-negative
           "mask": torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)}
    cap = {"glob": torch.randn(2, 8, generator=g), "local": torch.rand(2, 3, 8, generator=g),
           "mask": torch.tensor([[1, 1, 1], [0, 0, 0]], dtype=torch.bool)}  # caption 1: one word piece only
    cfg = ScoringConfig(w_high=0.0, w_global=0.0, padding="teran")
    got = score_all_pairs(img, cap, cfg)["total"]
    for i in range(3):
        v = nnf.normalize(img["local"][i], dim=-1)
        t = nnf.normalize(cap["local"][0], dim=-1)
        a = (v @ t.T).masked_fill(~img["mask"][i][:, None], 0.0)  # TERAN: masked_fill(mask, 0) before max
        assert torch.allclose(got[i, 0], a.max(0).values.sum(), atol=1e-6)
        assert got[i, 1] == 0
    assert got[0, 0] == 0 and got[1, 0] < 0  # padded image: the zero alignment wins over negative cosines
    with pytest.raises(ValueError, match="no valid"):
        score_all_pairs(img, cap, override(cfg, {"padding": "ours"}))


@pytest.mark.parametrize("direction", ["t2i", "i2t", "both"])
def test_local_global_conditioned_h_equals_explicit_reference(direction):
    """scoring.condition: H's softmax also sees lambda * cos(position, the other side's global vector);
    the fast form equals the explicit t-product reference, and the global vectors get gradients."""
    cfg = ScoringConfig(bands=3, direction=direction, temperature=4.0, condition=True, w_local=0.5, w_high=2.0,
                        w_global=0.5)
    img, cap = random_side(3, 5, 17, seed=21), random_side(4, 6, 17, seed=22)
    got, ref = fast(img, cap, cfg), pair_scores_reference(img, cap, cfg)
    for k in ("high", "total"):
        torch.testing.assert_close(got[k], ref[k], rtol=1e-9, atol=1e-9, msg=k)
    plain = pair_scores_reference(img, cap, override(cfg, {"condition": False}))["high"]
    assert (got["high"] - plain).abs().max() > 1e-3  # the conditioning changes the score
    img["glob"].requires_grad_(True)
    cap["glob"].requires_grad_(True)
    fast(img, cap, override(cfg, {"w_global": 0.0}))["total"].sum().backward()
    if direction != "i2t":  # t2i conditions on the image's global vector, i2t on the caption's
        assert img["glob"].grad.abs().sum() > 0
    if direction != "t2i":
        assert cap["glob"].grad.abs().sum() > 0


def test_conditioned_t2i_backward_gradcheck():
    from hosa_lib.scoring import _HighOrderT2I
    g = torch.Generator().manual_seed(1)
    G, Nc, L, Ni, M = 2, 2, 4, 3, 3
    rho = torch.randn(G, Nc, L, Ni, M, generator=g, dtype=torch.float64, requires_grad=True)
    u = torch.randn(G, Nc, L, 5, generator=g, dtype=torch.float64)
    gram = (u @ u.transpose(-1, -2)).requires_grad_(True)
    bias = torch.randn(Nc, L, Ni, generator=g, dtype=torch.float64, requires_grad=True)
    cmask = torch.tensor([[True, True, True, False], [True] * 4])
    vmask = torch.tensor([[True] * 3, [True, False, False], [True, True, False]])
    assert torch.autograd.gradcheck(lambda r, gm, b: _HighOrderT2I.apply(r, gm, cmask, vmask, 2.0, b), (rho, gram, bias))


def test_conditioned_h_uses_the_eager_kernel(capsys):
    from hosa_lib import fused
    img, cap = random_side(2, 4, 16, seed=1), random_side(2, 4, 16, seed=2)
    fused._told.clear()
    auto = ScoringConfig(bands=4, condition=True)
    assert auto.kernel == "auto"
    pair_scores(make_side(**img, cfg=auto), make_side(**cap, cfg=auto), auto)
    assert "scoring.condition runs in the eager kernel only" in capsys.readouterr().err
    with pytest.raises(ValueError, match="condition runs in the eager kernel only; use auto or torch"):
        fast(img, cap, ScoringConfig(bands=4, condition=True, kernel="numba"))


def test_every_registered_term_has_a_weight_a_reference_and_a_distinct_gate():
    """The term registry is the one place a term is declared: its weight key exists in ScoringConfig,
    the explicit reference covers it, gates index 0..N_GATES-1 once each, and the TERAN import keeps
    exactly TERAN's terms."""
    import dataclasses

    from hosa_lib.reference import REFERENCES
    from hosa_lib.scoring import N_GATES, SCORING_TERMS, gated_terms, teran_only
    fields = {f.name for f in dataclasses.fields(ScoringConfig)}
    assert {t.weight for t in SCORING_TERMS} <= fields
    assert set(REFERENCES) == {t.name for t in SCORING_TERMS}
    assert [t.gate for t in gated_terms()] == list(range(N_GATES))
    kept = override(ScoringConfig(), teran_only())
    assert [t.name for t in SCORING_TERMS if getattr(kept, t.weight) != 0] == ["local"]


@pytest.mark.parametrize("direction", ["t2i", "i2t", "both"])
def test_chunked_scoring_prepares_the_image_side_once(monkeypatch, direction):
    """score_all_pairs uploads and transforms the image side once (band features, Gram) when it fits
    the memory budget, else once per caption chunk; both equal the float64 reference."""
    from hosa_lib import scoring
    from hosa_lib.reference import pair_scores_reference
    cfg = ScoringConfig(bands=4, direction=direction, w_global=0.5, w_local=0.5, w_high=1.0, kernel="torch")
    img, cap = random_side(9, 5, 16, seed=1), random_side(11, 6, 16, seed=2)
    calls = []
    real = scoring.make_side
    monkeypatch.setattr(scoring, "make_side", lambda *a, **k: calls.append(k.get("name")) or real(*a, **k))
    ref = pair_scores_reference(img, cap, cfg)["total"].float()
    small = 4 * 5 * 6 * 3  # a few pairs per chunk: many caption and image chunks
    once = score_all_pairs(img, cap, cfg, max_elems=small)["total"]
    assert calls.count("images") == 1 and calls.count("captions") > 2
    calls.clear()
    monkeypatch.setattr(scoring, "memory_budget", lambda device: (0, 0))  # the image side does not fit
    per_chunk = score_all_pairs(img, cap, cfg, max_elems=small)["total"]
    assert calls.count("images") > calls.count("captions") > 2
    for got in (once, per_chunk):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
