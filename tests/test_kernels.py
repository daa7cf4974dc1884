"""Fused high-order kernels (hosa_lib.fused): numba (after the band-share GEMM) and flash (band shares per
tile, never whole) on CPU, Triton (through its CPU interpreter when no GPU is present) and the eager
definition, each against the float64 explicit reference."""
import os

import pytest
import torch

# Without a GPU, conftest.py sets TRITON_INTERPRET=1 before anything imports triton (@triton.jit reads it then)
from hosa_lib import fused
from hosa_lib.config import ScoringConfig, override
from hosa_lib.reference import pair_scores_reference
from hosa_lib.scoring import chunk_sizes, make_side, pair_scores, score_all_pairs
from test_scoring import random_side

KERNELS = ["torch", "numba", "flash", pytest.param("triton", marks=pytest.mark.skipif(
    fused._unavailable("triton", torch.device("cuda" if torch.cuda.is_available() else "cpu")) is not None,
    reason="triton not installed"))]


def device_for(kernel):
    return "cuda" if kernel == "triton" and torch.cuda.is_available() else "cpu"


def scores(img, cap, cfg, device="cpu"):
    to = lambda s: {k: v.to(device) for k, v in s.items()}
    return pair_scores(make_side(**to(img), cfg=cfg), make_side(**to(cap), cfg=cfg), cfg)


@pytest.mark.parametrize("kernel", KERNELS[1:])  # eager: tests/test_scoring.py
@pytest.mark.parametrize("d", [32, 33])
@pytest.mark.parametrize("bands", [1, 3, 16, 17])  # 17 = F, one band per frequency (d // 2 + 1)
@pytest.mark.parametrize("direction", ["t2i", "i2t", "both"])
def test_kernel_equals_float64_reference(kernel, d, bands, direction):
    cfg = ScoringConfig(bands=bands, direction=direction, temperature=2.0, w_local=0.5, w_high=2.0,
                        w_global=0.5, kernel=kernel)
    img, cap = random_side(3, 5, d, seed=d * bands), random_side(4, 6, d, seed=d + bands)  # padded both sides
    got, ref = scores(img, cap, cfg, device_for(kernel)), pair_scores_reference(img, cap, cfg)
    for k in ("high", "local", "total"):  # flash: t2i and both fold the local score into the kernel
        torch.testing.assert_close(got[k].cpu(), ref[k], rtol=1e-9, atol=1e-9, msg=k)


@pytest.mark.parametrize("kernel", KERNELS[1:])
@pytest.mark.parametrize("bands,direction", [(1, "t2i"), (3, "i2t"), (16, "both"), (16, "t2i")])
def test_kernel_gradients_equal_eager(kernel, bands, direction):
    """Gradients with respect to both sides' local features (through the GEMM, Gram and the fused
    backward) equal eager autograd's, float64, with padding on both sides."""
    def grads(k):
        cfg = ScoringConfig(bands=bands, direction=direction, temperature=3.0, w_local=0, w_global=0, kernel=k)
        img, cap = random_side(4, 5, 33, seed=bands), random_side(3, 7, 33, seed=bands + 1)
        dev = device_for(k)
        li, lc = (s["local"].to(dev).requires_grad_(True) for s in (img, cap))
        s = pair_scores(make_side(img["glob"].to(dev), li, img["mask"].to(dev), cfg),
                        make_side(cap["glob"].to(dev), lc, cap["mask"].to(dev), cfg), cfg)["high"]
        up = torch.randn(s.shape, generator=torch.Generator().manual_seed(9), dtype=s.dtype).to(dev)
        return [g.cpu() for g in torch.autograd.grad((s * up).sum(), (li, lc))]

    ref = grads("torch")
    for a, b in zip(grads(kernel), ref):
        assert b.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("kernel", [k for k in KERNELS[1:] if k != "flash"])  # flash: test_flash_gradcheck
def test_kernel_gradcheck(kernel):
    g = torch.Generator().manual_seed(0)
    G, A, L, B, n = 3, 3, 5, 2, 4
    dev = device_for(kernel)
    feats = torch.randn(G, A, L, 6, generator=g, dtype=torch.float64)
    amask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 1, 1, 0]], dtype=torch.bool)
    feats = feats * amask[None, :, :, None]
    rho = torch.randn(G, A, L, B * n, generator=g, dtype=torch.float64).to(dev).requires_grad_(True)
    gram = (feats @ feats.transpose(-1, -2)).to(dev).requires_grad_(True)
    weight = torch.tensor([[0.5, 0.5, 0, 0], [0.25] * 4], dtype=torch.float64, device=dev)
    f = lambda r, gm: fused.reconstruct(r, gm, amask.to(dev), weight, 2.5, kernel)
    # Under TRITON_INTERPRET every kernel launch is interpreted in Python (~50 ms): the full numerical
    # Jacobian (2 calls per input element) took ~1 min; fast mode compares one random projection of it
    # (J·u against the backward's uᵀJ), which any wrong gradient entry fails with probability ~1.
    assert torch.autograd.gradcheck(f, (rho, gram), fast_mode=kernel == "triton")


@pytest.mark.parametrize("kernel", KERNELS[1:])
def test_float32_kernel_close_to_float64(kernel):
    cfg64 = ScoringConfig(bands=16, direction="both", kernel="torch")
    cfg = ScoringConfig(bands=16, direction="both", kernel=kernel)
    img, cap = random_side(5, 9, 64, seed=1), random_side(6, 12, 64, seed=2)
    ref = scores(img, cap, cfg64)["total"]
    f32 = lambda s: {k: v.float() if v.is_floating_point() else v for k, v in s.items()}
    got = scores(f32(img), f32(cap), cfg, device_for(kernel))["total"].cpu().double()
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kernel", KERNELS[1:])
def test_chunked_all_pairs_with_kernel_equals_unchunked_eager(kernel):
    cfg = ScoringConfig(bands=4, direction="both", kernel=kernel)
    img, cap = random_side(13, 5, 16, seed=7), random_side(17, 6, 16, seed=8)
    full = scores(img, cap, ScoringConfig(bands=4, direction="both", kernel="torch"))
    chunked = score_all_pairs(img, cap, cfg, max_elems=4 * 5 * 6 * 7, terms=("total", "high"),
                              device=device_for(kernel))
    for k in ("total", "high"):
        torch.testing.assert_close(chunked[k].double(), full[k], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel", KERNELS[1:])
def test_g1_kernel_is_scalar_cross_attention(kernel):
    cfg = ScoringConfig(bands=1, temperature=5.0, w_local=0, w_global=0, w_high=1, kernel=kernel)
    img, cap = random_side(2, 4, 12, seed=3), random_side(3, 5, 12, seed=4)
    got = scores(img, cap, cfg, device_for(kernel))["high"].cpu()
    for i in range(2):
        v = torch.nn.functional.normalize(img["local"][i][img["mask"][i]], dim=-1)
        for c in range(3):
            t = torch.nn.functional.normalize(cap["local"][c][cap["mask"][c]], dim=-1)
            attn = torch.softmax(5.0 * (v @ t.T), dim=1)
            expect = torch.nn.functional.cosine_similarity(v, attn @ t, dim=-1).mean()
            torch.testing.assert_close(got[i, c], expect)


def test_dispatch_rules_and_messages(monkeypatch, capsys):
    cpu, meta = torch.device("cpu"), torch.device("meta")
    assert fused.resolve("auto", cpu) == "flash"
    assert fused.resolve("numba", cpu) == "numba"
    assert fused.resolve("torch", cpu) == "torch"
    with pytest.raises(ValueError, match=r"key 'scoring.kernel' = 'cuda': expected one of \('auto', 'torch', 'numba', 'triton', 'flash'\)"):
        fused.resolve("cuda", cpu)
    with pytest.raises(ValueError, match="numba runs on CPU tensors"):
        fused.resolve("numba", torch.device("cuda"))
    with pytest.raises(ValueError, match="flash runs on CPU tensors"):
        fused.resolve("flash", torch.device("cuda"))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="triton needs CUDA tensors .* or TRITON_INTERPRET=1"):
        fused.resolve("triton", cpu)
    assert fused.resolve("auto", meta) == "torch"
    # numba missing: auto falls back to eager with one notice; asking for numba by name is an error
    real = fused.importlib.import_module
    monkeypatch.setattr(fused.importlib, "import_module",
                        lambda n: (_ for _ in ()).throw(ImportError(n)) if n == "numba" else real(n))
    monkeypatch.setattr(fused, "_told", set())
    assert fused.resolve("auto", cpu) == "torch" and fused.resolve("auto", cpu) == "torch"
    err = capsys.readouterr().err
    assert err.count("scoring.kernel=auto uses eager torch: numba is not installed") == 1
    with pytest.raises(ValueError, match="numba is not installed"):
        fused.resolve("numba", cpu)


def test_kernel_choice_does_not_change_the_run_folder():
    from hosa_lib.config import RunConfig, override
    from hosa_lib.runs import weights_key
    cfg = RunConfig()
    assert weights_key(cfg) == weights_key(override(cfg, {"scoring": {"kernel": "torch"}}))


@pytest.mark.parametrize("kernel", KERNELS[3:])
def test_triton_bfloat16_inputs_accumulate_in_float32(kernel):
    """bf16 band shares and Gram matrices (autocast on GPU): float32 output, bf16 gradients, close to
    the float32 kernel (only the inputs' rounding differs)."""
    dev = device_for("triton")
    g = torch.Generator().manual_seed(0)
    fa, fq = torch.randn(3, 4, 5, 6, generator=g), torch.randn(3, 12, 6, generator=g)
    rho, gram = torch.einsum("galp,gqp->galq", fa, fq) * 0.1, fa @ fa.transpose(-1, -2)
    amask = torch.ones(4, 5, dtype=torch.bool)
    amask[1, 3:] = False
    weight = torch.full((3, 4), 0.25)
    outs, grads = [], []
    for dt in (torch.float32, torch.bfloat16):
        r = rho.to(dev, dt, copy=True).requires_grad_(True)
        out = fused.reconstruct(r, gram.to(dev, dt), amask.to(dev), weight.to(dev), 7.0, "triton")
        out.sum().backward()
        outs.append(out.float().cpu())
        grads.append(r.grad)
    assert outs[1].dtype == torch.float32 and grads[1].dtype == torch.bfloat16
    torch.testing.assert_close(outs[1], outs[0], rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(grads[1].float().cpu(), grads[0].cpu(), rtol=5e-2, atol=2e-2)


def test_numba_kernel_names_unsupported_dtypes():
    rho = torch.zeros(1, 1, 2, 3, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="kernel=numba: float32 or float64 inputs"):
        fused.reconstruct(rho, torch.zeros(1, 1, 2, 2, dtype=torch.bfloat16), torch.ones(1, 2, dtype=torch.bool),
                          torch.ones(1, 3), 1.0, "numba")


@pytest.mark.parametrize("L", [17, 40, 70, 100])
def test_triton_launch_settings_by_length_equal_eager(L):
    """Every launch row of fused_triton.LAUNCH (LP 32, 64, 128 with their own BLOCK and warps),
    forward and backward, against eager torch on anchors of L positions (captions for t2i)."""
    pytest.importorskip("triton")
    from hosa_lib import fused_triton
    assert fused_triton.launch(L)["LP"] == max(16, 1 << (L - 1).bit_length())

    def run(k):
        cfg = ScoringConfig(bands=4, direction="t2i", temperature=2.0, w_local=0, w_global=0, kernel=k)
        img, cap = random_side(3, 5, 16, seed=L), random_side(2, L, 16, seed=L + 1)
        dev = device_for(k)
        lc = cap["local"].to(dev).requires_grad_(True)
        s = pair_scores(make_side(**{k2: v.to(dev) for k2, v in img.items()}, cfg=cfg),
                        make_side(cap["glob"].to(dev), lc, cap["mask"].to(dev), cfg), cfg)["high"]
        return s.detach().cpu(), torch.autograd.grad(s.sum(), lc)[0].cpu()

    for a, b in zip(run("triton"), run("torch")):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_triton_max_length_and_eager_fallback(capsys, monkeypatch):
    """Anchors longer than the launch table's largest tile run in eager torch with one notice;
    fused.TRITON_MAX_L is the table's limit, and launch() refuses what the table lacks."""
    pytest.importorskip("triton")
    from hosa_lib import fused_triton
    assert fused.TRITON_MAX_L == fused_triton.MAX_L == max(fused_triton.LAUNCH)
    with pytest.raises(ValueError, match="exceed MAX_L"):
        fused_triton.launch(fused_triton.MAX_L + 1)
    monkeypatch.setattr(fused, "_told", set())
    assert fused.fits("triton", 128) == "triton" and fused.fits("numba", 500) == "numba"
    assert fused.fits("triton", 129) == "torch" and fused.fits("triton", 300) == "torch"
    err = capsys.readouterr().err
    assert err.count("do not fit one GPU block's shared memory") == 2  # one line per length, not per call
    cfg = ScoringConfig(bands=2, direction="t2i", w_local=0, w_global=0, kernel="triton")
    img, cap = random_side(2, 3, 8, seed=0), random_side(2, 130, 8, seed=1)
    dev = device_for("triton")
    got = scores(img, cap, cfg, dev)["high"].cpu()
    ref = pair_scores_reference(img, cap, cfg)["high"]
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9)


@pytest.mark.slow
def test_triton_kernels_compile_ahead_of_time_within_h100_and_a100_limits(tmp_path):
    """benchmarks/triton_aot.py: every launch row compiles for sm_80 and sm_90 with the installed
    Triton (no GPU) within the target's shared memory per block and 255 registers; up to LP = 64
    nothing spills (the flash backward's register tiles: at most 40 B per thread). The defaults this
    replaced (BLOCK 64, 4 warps, 3 stages) needed 233,472 B at
    LP = 128, over sm_90's 232,448 B."""
    pytest.importorskip("triton")
    import json
    import subprocess
    import sys
    from pathlib import Path
    repo = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # conftest set it for the tests
    out = subprocess.run([sys.executable, str(repo / "benchmarks" / "triton_aot.py"), "--dtypes", "float32", "--json",
                          str(tmp_path / "aot.json")], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    rows = json.loads((tmp_path / "aot.json").read_text())
    bwd = ("flash_bwd_anchor", "flash_bwd_query")  # the flash backward up to LP = 64 (FLASH_BWD_LAUNCH)
    assert {(r["L"], r["target"], r["kernel"]) for r in rows} == {
        (L, t, k) for L in (16, 32, 64, 128) for t in ("sm_80", "sm_90")
        for k in ("forward", "backward", "flash") + (bwd if L <= 64 else ())}
    for r in rows:
        assert r["fits"] and r["shared"] <= r["shared_limit"], r
        if r["registers"] is not None and r["LP"] <= 64:  # the flash backward: a few spilled words at most
            assert r["stack"] <= (40 if r["kernel"] in bwd else 0), r


def _contract(rho, gram, amask, scale):
    """hosa_lib.fused's contract, written out per band and anchor (float64 torch, differentiable)."""
    G, A, L, Q = rho.shape
    num, n2 = rho.new_zeros(A, Q), rho.new_zeros(A, Q)
    rows = []
    for a in range(A):
        v = amask[a]
        nu, nn_ = rho.new_zeros(Q), rho.new_zeros(Q)
        for g in range(G):
            alpha = torch.softmax(scale * rho[g, a][v], dim=0)  # (Lv, Q)
            nu = nu + (alpha * rho[g, a][v]).sum(0)
            nn_ = nn_ + (alpha * (gram[g, a][v][:, v] @ alpha)).sum(0)
        rows.append((nu, nn_))
    return torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])


def _contract_scores(ab, qb, gram, amask, scale, weight):
    """out (A, B) of the contract on rho = ab @ qb^T (eager, differentiable): the explicit reference the
    flash kernels are held to."""
    num, n2 = _contract(torch.einsum("galp,gqp->galq", ab, qb), gram, amask, scale)
    return (num / n2.clamp_min(1e-12).sqrt()).view(len(amask), *weight.shape).mul(weight).sum(-1)


def _count_calls(monkeypatch, owner, name):
    """A list that grows by one at each call of owner.name (which still runs)."""
    calls, real = [], getattr(owner, name)
    monkeypatch.setattr(owner, name, lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def _contract_inputs(seed, G=3, A=4, L=7, Q=10):
    g = torch.Generator().manual_seed(seed)
    rho = torch.randn(G, A, L, Q, generator=g, dtype=torch.float64)
    u = torch.randn(G, A, L, 5, generator=g, dtype=torch.float64)
    gram = u @ u.transpose(-1, -2)
    amask = torch.rand(A, L, generator=g) < 0.7
    amask[:, 0] = True
    return rho, gram, amask


@pytest.mark.parametrize("module", ["fused_numba", pytest.param("fused_triton", marks=KERNELS[3].marks)])
def test_kernel_module_forward_and_backward_equal_the_contract(module):
    """The kernel modules themselves (not through scoring): num and n2 of the contract, and the
    gradients of any linear function of them, against the contract written out in torch."""
    import importlib
    rho, gram, amask = _contract_inputs(3)
    scale = 2.5
    r, gm = rho.clone().requires_grad_(True), gram.clone().requires_grad_(True)
    ref_num, ref_n2 = _contract(r, gm, amask, scale)
    u = torch.randn(ref_num.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    w = torch.randn(ref_num.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    d_rho, d_gram = torch.autograd.grad((u * ref_num + w * ref_n2).sum(), (r, gm))
    if module == "fused_numba":
        impl = fused._NumbaImpl
    else:
        impl = importlib.import_module("hosa_lib.fused_triton")
    num, n2 = impl.forward(rho, gram, amask, scale)
    torch.testing.assert_close(num, ref_num.detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(n2, ref_n2.detach(), rtol=1e-10, atol=1e-10)
    got_rho, got_gram = impl.backward(rho, gram, amask, u, w, scale)
    torch.testing.assert_close(got_rho, d_rho, rtol=1e-9, atol=1e-10)
    # d_gram: only the valid block of each anchor is defined by the contract
    valid = (amask[:, :, None] & amask[:, None, :])[None].expand_as(d_gram)
    torch.testing.assert_close(got_gram[valid], d_gram[valid], rtol=1e-9, atol=1e-10)


def _flash_inputs(seed, G=3, A=4, L=5, B=3, n=4, P2=6, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    amask = torch.rand(A, L, generator=g) < 0.7
    amask[:, 1] = True
    amask[0] = torch.arange(L) % 2 == 1  # valid positions not first
    ab = torch.randn(G, A, L, P2, generator=g, dtype=dtype) * amask[None, :, :, None] * 0.5
    qmask = torch.rand(B, n, generator=g) < 0.8
    qmask[:, 0] = True
    qb = torch.randn(G, B * n, P2, generator=g, dtype=dtype) * qmask.flatten()[None, :, None] * 0.5
    weight = qmask.to(dtype) / qmask.sum(-1, keepdim=True)
    return ab, qb, amask, weight


# one query tile, and several (Q = 200 > FLASH_QB); 2 FLASH_AB + 3 anchors: three blocks of FLASH_AB in the backward,
# the last short, and forward blocks of at most 12 rows
@pytest.mark.parametrize("B,n,A", [(3, 4, 4), (5, 40, 4), (3, 4, 2 * fused.FLASH_AB + 3)])
def test_flash_equals_the_fused_contract_on_rho(B, n, A, monkeypatch):
    """The flash kernel from the band features equals the contract evaluated on rho = ab @ qb^T by
    the eager definition, values and the gradients of all three inputs (float64, masked anchors with
    valid positions not first, padded query items; with more anchors than a block, blocks of uneven row
    counts split between threads, and an anchor without valid positions)."""
    monkeypatch.setattr(fused, "FLASH_ROWS", 12)
    ab, qb, amask, weight = _flash_inputs(B * n, A=A, B=B, n=n)
    if A > fused.FLASH_AB:
        amask[A // 2] = False
        ab[:, A // 2] = 0
    xs = [t.clone().requires_grad_(True) for t in (ab, qb)]
    gram = (xs[0] @ xs[0].transpose(-1, -2)).detach().requires_grad_(True)
    got = fused.reconstruct_flash(xs[0], xs[1], gram, amask, weight, 2.5)
    rho_ab, rho_qb = (t.clone().requires_grad_(True) for t in (ab, qb))
    gram_ref = gram.detach().clone().requires_grad_(True)
    ref = _contract_scores(rho_ab, rho_qb, gram_ref, amask, 2.5, weight)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
    with torch.no_grad():  # the scoring road: the forward's own blocks (`_anchor_blocks`, here of at most 12 rows)
        torch.testing.assert_close(fused.reconstruct_flash(ab, qb, gram.detach(), amask, weight, 2.5), ref.detach(),
                                   rtol=1e-10, atol=1e-10)
    up = torch.randn(got.shape, dtype=got.dtype, generator=torch.Generator().manual_seed(5))
    g_got = torch.autograd.grad((got * up).sum(), (*xs, gram))
    g_ref = torch.autograd.grad((ref * up).sum(), (rho_ab, rho_qb, gram_ref))
    valid = (amask[:, :, None] & amask[:, None, :])[None].expand_as(gram)
    for name, a, b in zip(("abands", "qbands"), g_got[:2], g_ref[:2]):
        assert b.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=name)
    torch.testing.assert_close(g_got[2][valid], g_ref[2][valid], rtol=1e-9, atol=1e-10)
    assert (g_got[2][~valid] == 0).all() and (g_got[0][:, ~amask] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_flash_softmax_skips_its_shift_only_where_rho_is_bounded(dtype):
    """The kernels leave out the softmax's shift by its largest argument for a (block, tile, band) whose
    Cauchy-Schwarz bound scale |ab| |qb| is at most FREE_EXP. Three bands on both sides of that bound (one far
    past it, where exp(scale rho) overflows float32 without the shift) give the contract's values and
    gradients, float32 within float32 tolerance (float64 keeps the shift everywhere: the same contract)."""
    from hosa_lib import fused_flash
    ab, qb, amask, weight = _flash_inputs(11, G=3, A=2 * fused.FLASH_AB + 3, L=7, B=5, n=40, P2=6)
    size = torch.tensor([0.1, 1.0, 6.0], dtype=ab.dtype)  # per band
    ab, qb, scale = ab * size[:, None, None, None], qb * size[:, None, None], 8.0
    bound = scale * ab.norm(dim=-1).flatten(1).amax(1) * qb.norm(dim=-1).amax(1)
    assert bound[0] < fused_flash.FREE_EXP < bound[1] and bound[2] > 88  # e^88 > float32's largest
    gram = ab @ ab.transpose(-1, -2)
    xs = [t.to(dtype).requires_grad_(True) for t in (ab, qb, gram)]
    got = fused.reconstruct_flash(*xs, amask, weight.to(dtype), scale)
    refs = [t.clone().requires_grad_(True) for t in (ab, qb, gram)]
    ref = _contract_scores(*refs, amask, scale, weight)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(got.double(), ref, rtol=tol, atol=tol)
    up = torch.randn(got.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    g_got = torch.autograd.grad((got * up.to(dtype)).sum(), xs)
    g_ref = torch.autograd.grad((ref * up).sum(), refs)
    valid = (amask[:, :, None] & amask[:, None, :])[None].expand_as(gram)
    for name, a, b in zip(("abands", "qbands", "gram"), g_got, g_ref):
        if name == "gram":
            a, b = a[valid], b[valid]
        assert b.abs().sum() > 0 and torch.isfinite(a).all()
        torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol * b.abs().max().item(), msg=name)


def test_flash_without_any_padding_takes_the_arrays_as_they_are(monkeypatch):
    """Whole tiles (8 items of 36 positions: two tiles of 144, FLASH_QB) and every anchor position valid: the
    backward reads qbands itself as its tiles and the stacked gradient rows as d_abands (no gathers or
    scatters); values and gradients still equal the contract (float64)."""
    monkeypatch.setattr(fused, "FLASH_QB", 144)
    ab, qb, _, weight = _flash_inputs(8, G=2, A=5, L=6, B=8, n=36, P2=4)
    amask = torch.ones(5, 6, dtype=torch.bool)
    ab = torch.randn(ab.shape, dtype=ab.dtype, generator=torch.Generator().manual_seed(2))
    qtiles, pos = fused._flash_queries(qb, 36)[0], fused._flash_queries(qb, 36)[2]
    assert qtiles.data_ptr() == qb.data_ptr() and torch.equal(pos, torch.arange(8 * 36))
    gram = ab @ ab.transpose(-1, -2)
    xs = [t.clone().requires_grad_(True) for t in (ab, qb, gram)]
    ref_xs = [t.clone().requires_grad_(True) for t in (ab, qb, gram)]
    got, ref = fused.reconstruct_flash(*xs, amask, weight, 2.0), _contract_scores(*ref_xs, amask, 2.0, weight)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
    up = torch.randn(got.shape, dtype=got.dtype, generator=torch.Generator().manual_seed(3))
    for name, a, b in zip(("abands", "qbands", "gram"), torch.autograd.grad((got * up).sum(), xs),
                          torch.autograd.grad((ref * up).sum(), ref_xs)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=name)


def test_flash_exponential_is_float32_accurate_over_its_range():
    """`fused_flash._exp2_32`, the float32 exponential the flash kernels vectorise, is within 2.5e-7 relative
    error of 2^y over [-126, 0] (whole and half-way exponents included), and clamps below -126."""
    import numba
    import numpy as np

    from hosa_lib import fused_flash

    @numba.njit(fastmath=True)
    def run(y, out):
        for i in range(len(y)):
            out[i] = fused_flash._exp2_32(y[i])

    y = np.concatenate([np.linspace(-126, 0, 400_001), np.arange(-126, 1) - 0.5, np.arange(-126, 1)])
    y = y[y >= -126].astype(np.float32)
    out = np.empty_like(y)
    run(y, out)
    assert np.abs(out / np.exp2(y.astype(np.float64)) - 1).max() < 2.5e-7
    run(np.array([-200.0, -126.0], dtype=np.float32), out[:2])
    assert out[0] == out[1] == np.float32(2.0 ** -126)


def test_flash_every_valid_count_up_to_three_blocks_of_words():
    """Anchors of 13 positions with 0 to 13 of them valid: the kernel's quadratic form (`fused_flash._quadratic`:
    rows in blocks of four, then the rows left over) and its backward equal the contract for every count,
    values and gradients (float64). The forward's values hold for any matrix; the backward takes gram as a Gram
    matrix is, symmetric."""
    G, A, L, B, n, P2 = 2, 14, 13, 3, 5, 4
    g = torch.Generator().manual_seed(13)
    amask = torch.arange(L)[None] < torch.arange(A)[:, None]  # anchor a: its first a positions
    ab = torch.randn(G, A, L, P2, generator=g, dtype=torch.float64) * amask[None, :, :, None]
    qb = torch.randn(G, B * n, P2, generator=g, dtype=torch.float64)
    skew = torch.randn(G, A, L, L, generator=g, dtype=torch.float64)
    weight = torch.full((B, n), 1.0 / n, dtype=torch.float64)
    general = skew.abs() + 0.1  # not symmetric
    torch.testing.assert_close(fused.reconstruct_flash(ab, qb, general, amask, weight, 1.5),
                               _contract_scores(ab, qb, general, amask, 1.5, weight), rtol=1e-10, atol=1e-10)
    gram = ab @ ab.transpose(-1, -2) + 0.1
    xs = [t.clone().requires_grad_(True) for t in (ab, qb, gram)]
    ref_xs = [t.clone().requires_grad_(True) for t in (ab, qb, gram)]
    got, ref = fused.reconstruct_flash(*xs, amask, weight, 1.5), _contract_scores(*ref_xs, amask, 1.5, weight)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(fused.reconstruct_flash(ab, qb, gram, amask, weight, 1.5), ref.detach(),
                               rtol=1e-10, atol=1e-10)  # the scoring road, without gradients
    up = torch.randn(A, B, generator=g, dtype=torch.float64)
    g_got = torch.autograd.grad((got * up).sum(), xs)
    g_ref = torch.autograd.grad((ref * up).sum(), ref_xs)
    valid = (amask[:, :, None] & amask[:, None, :])[None].expand_as(gram)
    for name, a, b, keep in zip(("abands", "qbands", "gram"), g_got, g_ref, (None, None, valid)):
        a, b = (a, b) if keep is None else (a[keep], b[keep])
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=name)


def _flash_local_and_grads(ab, qb, gram, amask, weight, scale, up):
    """flash_with_local's high-order and local scores and the gradients of ab, qb and gram of
    (high * up).sum() + local.sum()."""
    xs = [t.clone().requires_grad_(True) for t in (ab, qb, gram)]
    hi, lo = fused.flash_with_local(*xs, amask, weight, scale, weight > 0, "sum")
    return (hi, lo, *torch.autograd.grad((hi * up).sum() + lo.sum(), xs))


def _flash_scoring(ab, qb, gram, amask, weight, scale):
    """flash_with_local's high-order and local scores without gradients (the scoring road's blocks)."""
    with torch.no_grad():
        return fused.flash_with_local(ab, qb, gram, amask, weight, scale, weight > 0, "sum")


def test_flash_blocks_of_anchors_compute_what_one_anchor_at_a_time_does(monkeypatch):
    """The forward and backward GEMMs run over blocks of anchors' stacked rows (training: FLASH_AB anchors;
    scoring without gradients: `_anchor_blocks` of at most FLASH_ROWS rows): values and all three gradients
    equal those of one anchor per block (float32, the demo's shapes: G 16, L 12, 2P 64).
    Values, local maxima and the anchors' gradients to float32 rounding (OpenBLAS computes a row alike
    whatever rows surround it); the query side's gradient sums the block's anchors inside one GEMM, in
    another order than anchor by anchor: to float32 summation error relative to its largest entry."""
    ab, qb, amask, weight = _flash_inputs(7, G=16, A=21, L=12, B=6, n=36, P2=64, dtype=torch.float32)
    gram = ab @ ab.transpose(-1, -2)
    up = torch.randn(21, 6, generator=torch.Generator().manual_seed(1))
    run = lambda: (*_flash_local_and_grads(ab, qb, gram, amask, weight, 10.0, up),
                   *_flash_scoring(ab, qb, gram, amask, weight, 10.0))
    blocked = run()
    monkeypatch.setattr(fused, "FLASH_AB", 1)  # training's blocks
    monkeypatch.setattr(fused, "FLASH_ROWS", 1)  # scoring's blocks
    names = ("high", "local", "d_abands", "d_qbands", "d_gram", "scoring high", "scoring local")
    for name, a, b in zip(names, blocked, run(), strict=True):
        tol = 1e-5 * float(b.abs().max()) if name == "d_qbands" else 1e-6
        torch.testing.assert_close(a, b, rtol=1e-6, atol=tol, msg=name)


@pytest.mark.parametrize("threads", [1, 2, 3, 4])
def test_flash_forward_blocks_split_rows_evenly_over_whole_tasks(threads, monkeypatch):
    """The forward's blocks of anchors (`_anchor_blocks`) cover every anchor once, in order, hold at most
    FLASH_ROWS rows where whole anchors allow and about the same number each, and make a number of tasks
    (blocks x tiles) that the threads split evenly wherever there are anchors enough: a 98-caption scoring
    chunk in blocks of 16 anchors had left one thread 21 tasks' work and the other 15."""
    monkeypatch.setattr(fused, "FLASH_ROWS", 40)
    g = torch.Generator().manual_seed(threads)
    for A, tiles in [(98, 6), (98, 1), (7, 1), (3, 5), (1, 1), (40, 3)]:
        rows = torch.randint(0, 13, (A,), generator=g)
        offs = torch.cat([torch.zeros(1, dtype=torch.int64), rows.cumsum(0)])
        bounds = fused._anchor_blocks(offs, tiles, threads)
        nb = len(bounds) - 1
        assert bounds[0] == 0 and bounds[-1] == A and bool((bounds[1:] >= bounds[:-1]).all())
        sizes = offs[bounds[1:]] - offs[bounds[:-1]]
        assert int(sizes.sum()) == int(offs[-1])
        if nb < A:  # otherwise one anchor per block already
            assert (nb * tiles) % threads == 0, (A, tiles, threads, nb)
            assert int(sizes.max()) <= max(40, int(offs[-1]) // nb) + 12  # a whole anchor past the even share at most
        if A >= threads and nb == -(-int(offs[-1]) // 40) and nb > 1:  # not raised for the threads: <= FLASH_ROWS
            assert int(sizes.max()) <= 40 + 12
    assert fused._anchor_blocks(torch.zeros(1, dtype=torch.int64), 1, threads).tolist() == [0, 0]  # no anchors


@pytest.mark.parametrize("valid_first", [False, True])
def test_flash_tiles_are_whole_items_padded_to_whole_vectors(valid_first, monkeypatch):
    """The query side's tiles hold whole items and are zero-padded to a multiple of FLASH_LANES positions
    (36-position items in tiles of at most 128 positions: 3 per tile, 108 -> 112); the padding changes no value
    or gradient (against tiles without padding, float64), with the anchors' valid positions first (no reorder)
    or not."""
    monkeypatch.setattr(fused, "FLASH_QB", 128)
    ab, qb, amask, weight = _flash_inputs(11, G=4, A=5, L=6, B=7, n=36, P2=8)
    if valid_first:
        amask = torch.arange(6)[None] < torch.tensor([6, 3, 1, 5, 2])[:, None]
        ab = ab * amask[None, :, :, None]
    gram = ab @ ab.transpose(-1, -2)
    layout = fused._flash_layout(ab, qb, gram, amask, 36)
    qtiles, pos, per_tile = layout[2], layout[6], layout[7]
    assert per_tile == fused.FLASH_QB // 36 and qtiles.shape[1:3] == (3, 112)  # 7 items: tiles of 3, 3, 1
    assert torch.equal(pos[:4], torch.tensor([0, 1, 2, 3])) and pos[108] == 112 and pos[-1] == 2 * 112 + 35
    torch.testing.assert_close(qtiles.reshape(4, -1, 8)[:, pos], qb, rtol=0, atol=0)
    if valid_first:
        assert layout[0] is ab  # no copy of the anchors when their valid positions come first already
    up = torch.randn(5, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    run = lambda: _flash_local_and_grads(ab, qb, gram, amask, weight, 4.0, up)
    padded = run()
    monkeypatch.setattr(fused, "FLASH_LANES", 1)
    assert fused._flash_layout(ab, qb, gram, amask, 36)[2].shape[2] == 108
    for a, b in zip(padded, run()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("B,n", [(5, 40), (7, 36)])  # 2 and 3 query tiles, the last one not full
def test_flash_scores_without_gradients_equal_the_training_path(B, n, monkeypatch):
    """Without gradients the kernel writes the scores itself (no (A, Q) arrays), builds only the transposed
    query tiles and keeps the anchors' layout in the caller's cache: the high-order and local scores equal
    the training path's (float64, masked anchors with valid positions not first, padded query items,
    anchors in uneven blocks), and a second query side scored with the cached anchors is right too."""
    ab, qb, amask, weight = _flash_inputs(B + n, A=fused.FLASH_AB + 3, B=B, n=n)
    gram = ab @ ab.transpose(-1, -2)
    qvalid = weight > 0
    train = fused.flash_with_local(ab.requires_grad_(True), qb, gram, amask, weight, 2.5, qvalid, "mean")
    calls = _count_calls(monkeypatch, fused, "_flash_anchors")
    cache = {}
    with torch.no_grad():
        got = fused.flash_with_local(ab, qb, gram, amask, weight, 2.5, qvalid, "mean", cache=cache)
        assert not got[0].requires_grad and "flash_anchors" in cache
        for a, b in zip(got, train):
            torch.testing.assert_close(a, b.detach(), rtol=1e-12, atol=1e-12)
        qb2 = torch.randn(qb.shape, dtype=qb.dtype, generator=torch.Generator().manual_seed(1))
        qb2 = qb2 * qvalid.flatten()[None, :, None]
        again = fused.reconstruct_flash(ab, qb2, gram, amask, weight, 2.5, cache=cache)
    assert len(calls) == 1  # the second call took the anchors from the cache
    torch.testing.assert_close(again, fused.reconstruct_flash(ab.detach(), qb2, gram, amask, weight, 2.5),
                               rtol=0, atol=0)
    ref = _contract_scores(ab.detach(), qb2, gram, amask, 2.5, weight)
    torch.testing.assert_close(again, ref, rtol=1e-10, atol=1e-10)


def test_flash_all_pairs_lays_out_each_caption_chunk_once(monkeypatch):
    """score_all_pairs with flash: the anchors' (captions') layout is built once per caption chunk, not
    once per (caption chunk, image chunk), and the chunked scores equal the unchunked ones."""
    cfg = ScoringConfig(bands=4, kernel="flash")
    img, cap = random_side(13, 5, 16, seed=7), random_side(17, 6, 16, seed=8)
    full = score_all_pairs(img, cap, cfg, max_elems=1 << 22)
    calls = _count_calls(monkeypatch, fused, "_flash_anchors")
    per_pair = 5 * 6 * 4
    chunked = score_all_pairs(img, cap, cfg, max_elems=per_pair * 20)
    ci, cc = chunk_sizes(13, 17, 5, 6, cfg, per_pair * 20)
    assert ci < 13 and len(calls) == -(-17 // cc)
    torch.testing.assert_close(chunked["total"], full["total"], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("d,bands", [(1024, 16), (33, 3), (32, 17), (64, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_band_features_and_their_gradients_are_the_torch_paths_bits(d, bands, dtype, monkeypatch):
    """On CPU band_features gathers the FFT's bins in one numba pass and scatters the gradient back in one
    (`fused._BandFeatures`): bit for bit the torch path's features and input gradients (the GPU's path),
    for odd and even d, G = 1 and G = F, with and without gradients, and for a strided input."""
    from hosa_lib import fused_flash, scoring
    g = torch.Generator().manual_seed(d)
    x = torch.nn.functional.normalize(torch.randn(5, 7, d, dtype=dtype, generator=g), dim=-1)
    idx, w = scoring.band_index(d, bands), scoring.parseval_weights(d, dtype=dtype).sqrt()
    gathers = _count_calls(monkeypatch, fused_flash, "band_gather")
    scatters = _count_calls(monkeypatch, fused_flash, "band_scatter")
    fast = scoring.band_features(x, bands)
    assert len(gathers) == 1 and not scatters  # the numba pass ran
    ref = scoring.band_features_torch(x, idx, w)
    assert fast.shape == ref.shape and fast.is_contiguous() and torch.equal(fast, ref)
    up = torch.randn(ref.shape, dtype=dtype, generator=g)  # the gradient arriving from above
    for inp in (x, x.transpose(0, 1)):  # contiguous and strided
        a, b = inp.detach().clone().requires_grad_(True), inp.detach().clone().requires_grad_(True)
        got = scoring.band_features(a, bands)
        want = scoring.band_features_torch(b, idx, w)
        assert torch.equal(got.detach(), want.detach())
        u = up if inp is x else up.transpose(1, 2)
        got.backward(u)
        want.backward(u)
        assert torch.equal(a.grad, b.grad), (a.grad - b.grad).abs().max()
    assert len(scatters) == 2
    with torch.enable_grad():  # and with nothing to differentiate, no graph
        assert not scoring.band_features(x, bands).requires_grad


def test_band_features_without_numba_take_the_torch_path(monkeypatch):
    from hosa_lib import fused_flash, scoring
    x = torch.randn(3, 4, 20, generator=torch.Generator().manual_seed(1))
    want = scoring.band_features(x, 3)
    real = fused.importlib.import_module
    monkeypatch.setattr(fused.importlib, "import_module",
                        lambda n: (_ for _ in ()).throw(ImportError(n)) if n == "numba" else real(n))
    gathers = _count_calls(monkeypatch, fused_flash, "band_gather")
    got = scoring.band_features(x.clone().requires_grad_(True), 3)
    assert not gathers and got.grad_fn is not None and "BandFeatures" not in type(got.grad_fn).__name__
    assert torch.equal(got.detach(), want)


def test_band_features_gradcheck():
    from hosa_lib import scoring
    x = torch.randn(2, 3, 10, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: scoring.band_features(v, 4), (x,))


def test_flash_gradcheck():
    ab, qb, amask, weight = _flash_inputs(0, G=2, A=3, L=4, B=2, n=3, P2=4)
    gram = (ab @ ab.transpose(-1, -2)).requires_grad_(True)
    f = lambda a, q, gm: fused.reconstruct_flash(a, q, gm, amask, weight, 1.5)
    assert torch.autograd.gradcheck(f, (ab.requires_grad_(True), qb.requires_grad_(True), gram))


def test_flash_float32_close_to_float64_and_names_unsupported_dtypes():
    ab, qb, amask, weight = _flash_inputs(3, G=16, A=6, L=12, B=7, n=36, P2=8)
    gram = ab @ ab.transpose(-1, -2)
    ref = fused.reconstruct_flash(ab, qb, gram, amask, weight, 160.0)
    got = fused.reconstruct_flash(ab.float(), qb.float(), gram.float(), amask, weight.float(), 160.0)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="kernel=flash: float32 or float64 inputs"):
        fused.reconstruct_flash(ab.bfloat16(), qb.bfloat16(), gram.bfloat16(), amask, weight, 1.0)


@pytest.mark.parametrize("padding", ["ours", "teran"])
@pytest.mark.parametrize("pool", ["sum", "mean"])
@pytest.mark.parametrize("direction", ["t2i", "both", "i2t"])
def test_flash_folds_the_local_score_into_the_kernel(padding, pool, direction, monkeypatch):
    """For t2i and both, the flash kernel also yields TERAN's local score from the band shares (no MrSw
    product): equal to the eager MrSw under both padding rules and poolings, in values and in the
    gradients of both sides' local features (float64); for i2t the local term is computed on its own."""
    from hosa_lib import scoring
    cfg = ScoringConfig(bands=4, direction=direction, temperature=3.0, padding=padding, local_pool=pool,
                        kernel="flash", w_global=0.5)
    img, cap = random_side(5, 7, 24, seed=3), random_side(6, 5, 24, seed=4)

    def run(c):
        li, lc = (x["local"].clone().requires_grad_(True) for x in (img, cap))
        out = pair_scores(make_side(img["glob"], li, img["mask"], c), make_side(cap["glob"], lc, cap["mask"], c), c)
        up = torch.randn(out["total"].shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
        return out, torch.autograd.grad((out["total"] * up).sum() + out["local"].sum(), (li, lc))

    ref, ref_grads = run(override(cfg, {"kernel": "torch"}))
    calls = _count_calls(monkeypatch, scoring, "mrsw")
    got, got_grads = run(cfg)
    assert len(calls) == (1 if direction == "i2t" else 0)
    for k in ("local", "high", "total"):
        torch.testing.assert_close(got[k], ref[k], rtol=1e-9, atol=1e-9, msg=k)
    for side, a, b in zip(("images", "captions"), got_grads, ref_grads):
        assert b.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-9, msg=side)


@pytest.mark.skipif(fused._unavailable("triton", torch.device("cuda" if torch.cuda.is_available() else "cpu"))
                    is not None, reason="triton not installed")
@pytest.mark.parametrize("L,P2", [(5, 6), (40, 40)])  # LP 16 and 64; band widths below and across a KB slice
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_triton_flash_forward_equals_the_kernel_on_rho(L, P2, dtype):
    """The Triton kernel that computes the band shares per tile in registers gives the num and n2 of
    the Triton kernel that reads them from memory (masked anchors, valid positions not first)."""
    from hosa_lib import fused_triton
    ab, qb, amask, _ = _flash_inputs(L + P2, G=2, A=3, L=L, B=4, n=5, P2=P2, dtype=dtype)
    dev = device_for("triton")
    ab, qb, amask = ab.to(dev), qb.to(dev), amask.to(dev)
    gram = ab @ ab.transpose(-1, -2)
    rho = torch.einsum("galp,gqp->galq", ab, qb)
    want = fused_triton.forward(rho, gram, amask, 2.5)
    got = fused_triton.flash_forward(ab, qb, gram, amask, 2.5)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    for g, w in zip(got, want):
        torch.testing.assert_close(g.cpu(), w.cpu(), rtol=tol, atol=tol)


@pytest.mark.skipif(fused._unavailable("triton", torch.device("cuda" if torch.cuda.is_available() else "cpu"))
                    is not None, reason="triton not installed")
@pytest.mark.parametrize("L,P2", [(5, 6), (40, 40), (5, 200)])  # LP 16 and 64; 200: too wide, rho materialised
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_triton_flash_training_equals_the_contract(L, P2, dtype, capsys, monkeypatch):
    """Training through Triton from the band features (`reconstruct_triton_flash` with gradients: the flash
    forward, then one backward pass per anchor and one per query block, tiles recomputed in registers)
    equals the eager contract on rho = ab @ qb^T in values and in the gradients of all three inputs
    (masked anchors with valid positions not first, padded query items, uneven query blocks). Bands wider
    than the backward's register tiles train on the materialised band shares, and say so."""
    from hosa_lib import fused_triton
    monkeypatch.setattr(fused, "_told", set())  # the notice is printed once per process
    ab, qb, amask, weight = _flash_inputs(L * P2, G=2, A=3, L=L, B=5, n=7, P2=P2, dtype=dtype)
    dev = device_for("triton")
    ab, qb, amask, weight = ab.to(dev), qb.to(dev), amask.to(dev), weight.to(dev)
    gram = ab @ ab.transpose(-1, -2)
    xs = [t.clone().requires_grad_(True) for t in (ab, qb, gram)]
    got = fused.reconstruct_triton_flash(*xs, amask, weight, 2.5)
    refs = [t.clone().double().requires_grad_(True) for t in (ab, qb, gram)]
    ref = _contract_scores(*refs, amask, 2.5, weight.double())
    tol = 1e-9 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(got.double(), ref, rtol=tol, atol=tol)
    up = torch.randn(got.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5)).to(dev)
    g_got = torch.autograd.grad((got.double() * up).sum(), xs)
    g_ref = torch.autograd.grad((ref * up).sum(), refs)
    valid = (amask[:, :, None] & amask[:, None, :])[None].expand_as(gram)
    for name, a, b in zip(("abands", "qbands"), g_got[:2], g_ref[:2]):
        assert b.abs().sum() > 0
        torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol, msg=name)
    torch.testing.assert_close(g_got[2][valid].double(), g_ref[2][valid], rtol=tol, atol=tol)
    assert (g_got[0][:, ~amask] == 0).all()
    wide = fused_triton.flash_backward_launch(L, P2) is None
    assert wide == (P2 == 200) and ("exceeds the flash backward's register tiles" in capsys.readouterr().err) == wide
