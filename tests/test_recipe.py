"""Training-recipe options (issue: models that learn on real images): InfoNCE with a learnable
temperature, global vectors anchored on the frozen pretrained spaces (starting at the ridge
baseline), and a training step with both on the smoke store."""
import numpy as np
import pytest
import torch

from hosa_lib.config import from_dict, load, override, to_dict


def anchored_cfg(store, **model):
    raw = to_dict(load("params/smoke.yaml"))
    raw["data"]["store"] = store
    raw["model"].update(anchor=True, dropout=0.0, **model)
    raw["loss"].update(kind="infonce")
    return from_dict(raw)


@pytest.mark.slow
def test_anchored_model_starts_at_the_ridge_baseline(smoke_store):
    """With embed = the text width (P = identity) the untrained model's global cosine scores are the
    baseline's: training starts where the least-squares fit is."""
    from hosa_lib.baseline import choose_ridge, cosine_scores, split_vectors
    from hosa_lib.evaluate import encode_split
    from hosa_lib.factory import build_model
    from hosa_lib.store import Store
    from hosa_lib.text import cache_key
    key = cache_key("minilm", -1)
    with Store(smoke_store.store, check_values=False) as s:
        tr, va, te = (split_vectors(s, split, key) for split in ("train", "val", "test"))
    w, mx, my, _, _ = choose_ridge(*tr, *va)
    expect = cosine_scores((te[0] - mx) @ w, te[1] - my)
    h = Store(smoke_store.store, check_values=False).text_dim(key)
    model, text = build_model(anchored_cfg(smoke_store.store, embed=h, heads=4), seed=0)
    img, cap, _ = encode_split(model, smoke_store.store, "test", text)
    got = torch.nn.functional.normalize(img["glob"], dim=-1) @ torch.nn.functional.normalize(cap["glob"], dim=-1).T
    np.testing.assert_allclose(got.numpy(), expect, atol=2e-3)  # region features are stored in float16
    # a narrower model projects on the top principal directions of the captions: close, not equal
    small, text = build_model(anchored_cfg(smoke_store.store), seed=0)
    img, cap, _ = encode_split(small, smoke_store.store, "test", text)
    got = torch.nn.functional.normalize(img["glob"], dim=-1) @ torch.nn.functional.normalize(cap["glob"], dim=-1).T
    assert np.corrcoef(got.numpy().ravel(), expect.ravel())[0, 1] > 0.8


def test_anchor_and_infonce_train_step_shapes_and_gradients(smoke_store):
    """One training step with the recipe options: finite loss, and gradients reach the anchor maps,
    the residual gates, the learnable temperature and the local encoders."""
    from hosa_lib.data import CaptionDataset, collate
    from hosa_lib.factory import build_model
    from hosa_lib.train import train_step
    cfg = anchored_cfg(smoke_store.store)
    model, text = build_model(cfg, seed=0)
    ds = CaptionDataset(smoke_store.store, "train", text)
    batch = collate(ds.__getitems__(np.arange(8)))
    out = train_step(model, batch, cfg, step=0, device=torch.device("cpu"), amp=False)
    assert torch.isfinite(out["loss"]) and out["scale"] == pytest.approx(1 / cfg.loss.temperature)
    out["loss"].backward()
    for name in ("image.anchor.map.weight", "text.anchor.map.weight", "image.anchor.gate", "text.anchor.gate",
                 "loss.log_scale", "image.proj.weight", "text.proj.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name
    # a checkpoint of the recipe reloads strictly (log_scale and anchors are part of the weights)
    from hosa_lib.factory import build_model as rebuild
    again, _ = rebuild(cfg)
    again.load_state_dict(model.state_dict(), strict=True)
    # checkpoints written before make_loss held the temperature as `log_scale`: they load into loss.log_scale
    old = {("log_scale" if k == "loss.log_scale" else k): v.clone() + (1.0 if k == "loss.log_scale" else 0.0)
           for k, v in model.state_dict().items()}
    again.load_state_dict(old, strict=True)
    assert again.loss.log_scale.item() == pytest.approx(model.loss.log_scale.item() + 1.0)
    # the loss is the config's: a hinge model has no temperature among its weights
    hinge, _ = rebuild(override(cfg, {"loss": {"kind": "hinge"}}))
    assert not any("log_scale" in k for k in hinge.state_dict())


@pytest.mark.slow
def test_validate_at_start_keeps_the_initialisation_when_training_makes_val_worse(tmp_path, smoke_store):
    """train.validate_at_start: the untrained (anchored = baseline) model is validated and logged as
    epoch -1 and competes for best.pt; a learning rate that wrecks the model leaves best.pt at the
    initial weights. Without the option best.pt is the wrecked model's."""
    import json

    from hosa_lib.factory import build_model
    from hosa_lib.runs import load_checkpoint
    from hosa_lib.train import train, validate
    cfg = override(anchored_cfg(smoke_store.store),
                   {"train": {"epochs": 1, "batch_size": 8, "lr": 1.0, "lr_warmup_steps": 0, "grad_clip": 0.0,
                              "validate_at_start": True}})
    init, text = build_model(cfg, seed=cfg.train.seed)
    init_rsum = validate(init, cfg, text, "cpu")["rsum"]
    res = train(cfg, tmp_path / "run", progress=False)
    vals = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
            if '"split": "val"' in line]
    assert [v["epoch"] for v in vals] == [-1, 0]
    assert vals[0]["rsum"] == pytest.approx(init_rsum)
    assert vals[1]["rsum"] < init_rsum  # the step size really did wreck it
    assert res["best_rsum"] == pytest.approx(init_rsum)
    best = load_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt")["model"]
    for k, v in init.state_dict().items():
        torch.testing.assert_close(best[k], v, msg=k)
    plain = train(override(cfg, {"train": {"validate_at_start": False}}), tmp_path / "plain", progress=False)
    assert plain["best_rsum"] == pytest.approx(vals[1]["rsum"])


@pytest.mark.slow
def test_patience_stops_early_and_a_rerun_does_not_train_on(tmp_path, smoke_store):
    """train.patience: after `patience` epochs without a better val rsum training stops (here the
    wrecked model never beats its untrained start); running the same command again resumes from
    last.pt, sees the same state and trains no further step."""
    import json

    from hosa_lib.train import train
    cfg = override(anchored_cfg(smoke_store.store),
                   {"train": {"epochs": 4, "batch_size": 8, "lr": 1.0, "lr_warmup_steps": 0, "grad_clip": 0.0,
                              "validate_at_start": True, "patience": 1}})
    first = train(cfg, tmp_path / "run", progress=False)
    vals = [json.loads(line)["epoch"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
            if '"split": "val"' in line]
    assert vals == [-1, 0]
    assert "early stop after epoch 1/4" in (tmp_path / "run" / "progress.log").read_text()
    again = train(cfg, tmp_path / "run", progress=False)
    assert again["steps"] == first["steps"] > 0
    full = train(override(cfg, {"train": {"patience": 0}}), tmp_path / "full", progress=False)
    assert full["steps"] == 4 * first["steps"]


def test_image_folder_recipe_starts_at_the_anchored_baseline_with_a_finetuned_backbone(smoke_store):
    """params/images.yaml on the smoke store: the text backbone runs inside the model (tokens in),
    yet the untrained model's global vectors equal those of the anchored model on cached states
    (the backbone's output is the cache), and one InfoNCE step sends gradients into the backbone,
    the anchor maps and the term gates (and into the local encoders once the gates are open)."""
    from hosa_lib.data import CaptionDataset, collate
    from hosa_lib.evaluate import encode_split
    from hosa_lib.factory import build_model
    from hosa_lib.train import train_step
    raw = to_dict(load("params/images.yaml"))
    assert not raw["model"]["text_finetune"]  # the recipe's text is frozen; fine-tuning is its option
    raw["data"].update(store=smoke_store.store)
    raw["model"].update(embed=64, ff=128, dropout=0.0, text_finetune=True)
    cfg = from_dict(raw)
    assert cfg.model.anchor and cfg.model.text_finetune and cfg.loss.kind == "infonce"
    assert cfg.train.validate_at_start and cfg.train.patience > 0 and cfg.train.min_delta_images > 0
    ft, ft_text = build_model(cfg, seed=0)
    cached, cached_text = build_model(override(cfg, {"model": {"text_finetune": False}}), seed=0)
    assert ft_text.tokenizer and not cached_text.tokenizer
    _, cap_ft, _ = encode_split(ft, smoke_store.store, "test", ft_text)
    _, cap_cached, _ = encode_split(cached, smoke_store.store, "test", cached_text)
    torch.testing.assert_close(cap_ft["glob"], cap_cached["glob"], atol=2e-3, rtol=1e-3)
    ds = CaptionDataset(smoke_store.store, "train", ft_text)
    batch = collate(ds.__getitems__(np.arange(8)))
    out = train_step(ft, batch, cfg, step=0, device=torch.device("cpu"), amp=False)
    out["loss"].backward()
    params = dict(ft.named_parameters())
    for name in ("text.backbone.encoder.layer.5.output.dense.weight", "text.anchor.map.weight",
                 "image.anchor.map.weight", "term_gates"):
        grad = params[name].grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name
    # closed gates: the local encoders wait (zero gradient) until training opens them
    assert not params["image.proj.weight"].grad.any()
    ft.zero_grad()
    with torch.no_grad():
        ft.term_gates.fill_(0.5)
    train_step(ft, batch, cfg, step=0, device=torch.device("cpu"), amp=False)["loss"].backward()
    for name in ("image.proj.weight", "text.proj.weight"):
        assert params[name].grad.abs().sum() > 0, name


@pytest.mark.slow
def test_term_gates_start_at_the_global_score_and_evaluation_scores_what_training_scores(smoke_store):
    """scoring.gates: untrained, the total is w_global * s_g exactly; with any gate values the
    differentiable training score equals the chunked evaluation score under model.scoring_config()
    (gates folded into w_local / w_high); the gates receive gradients."""
    from hosa_lib.config import ConfigError
    from hosa_lib.evaluate import encode_split
    from hosa_lib.factory import build_model
    from hosa_lib.scoring import score_all_pairs
    cfg = override(anchored_cfg(smoke_store.store), {"scoring": {"gates": True, "kernel": "torch"}})
    model, text = build_model(cfg, seed=0)
    img, cap, _ = encode_split(model, smoke_store.store, "test", text)
    first = model.score(img, cap)
    torch.testing.assert_close(first["total"], cfg.scoring.w_global * first["global"])
    assert {"local", "high"} <= set(first)  # computed (they carry the gates' gradients), weighted 0
    first["total"].sum().backward()
    assert model.term_gates.grad is not None and (model.term_gates.grad != 0).all()
    with torch.no_grad():
        model.term_gates.copy_(torch.tensor([0.3, -0.2]))
    folded = model.scoring_config()
    assert not folded.gates and folded.w_local == pytest.approx(0.3 * cfg.scoring.w_local)
    assert folded.w_high == pytest.approx(-0.2 * cfg.scoring.w_high)
    train_total = model.score(img, cap)["total"].detach()
    eval_total = score_all_pairs(img, cap, folded, max_elems=1 << 12)["total"]
    torch.testing.assert_close(eval_total, train_total, atol=1e-5, rtol=1e-5)
    with pytest.raises(ConfigError, match=r"scoring.gates: needs an ungated term \(w_global\)"):
        build_model(override(cfg, {"scoring": {"w_global": 0.0}}), seed=0)


@pytest.mark.slow
def test_term_gates_train_at_their_own_rate_and_the_checkpoint_evaluates_with_them(tmp_path, smoke_store):
    from hosa_lib.evaluate import evaluate_checkpoint
    from hosa_lib.runs import load_checkpoint
    from hosa_lib.train import train
    cfg = override(anchored_cfg(smoke_store.store),
                   {"scoring": {"gates": True}, "train": {"epochs": 1, "batch_size": 8, "gate_lr": 0.05}})
    train(cfg, tmp_path / "run", progress=False)
    ck = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    groups = ck["optimizer"]["param_groups"]
    assert len(groups) == 2 and groups[1]["weight_decay"] == 0.0
    assert groups[1]["lr"] / groups[0]["lr"] == pytest.approx(0.05 / cfg.train.lr)
    gates = ck["model"]["term_gates"]
    assert gates.abs().max() > 0.02, gates  # beyond what the model lr allows: 2e-4 x ~20 steps = 0.004
    ev = evaluate_checkpoint(cfg, tmp_path / "run" / "checkpoints" / "last.pt", progress=False, cache=False)
    assert ev["cfg"].scoring.w_local == pytest.approx(float(gates[0]) * cfg.scoring.w_local)


def test_ablation_summary_reports_the_learned_gate_weights():
    import pandas as pd

    from hosa_lib.ablations import summarize
    df = pd.DataFrame({"variant": ["gated", "gated", "plain", "plain"], "seed": [0, 1, 0, 1],
                       "rsum": [300.0, 302.0, 290.0, 296.0], "w_local_learned": [0.5, 0.7, None, None],
                       "w_high_learned": [-0.1, 0.1, None, None]})
    out = summarize(df)
    assert out.loc["gated", "w_local_learned mean"] == pytest.approx(0.6)
    assert out.loc["plain", "rsum std"] == pytest.approx(4.24, abs=0.01)


@pytest.mark.slow
def test_explorer_scores_a_gated_fine_tuned_checkpoint_with_its_learned_weights(tmp_path, smoke_store):
    """The explorer on a checkpoint of the image-folder recipe (gates, backbone inside the model):
    its weights are the learned ones, its widget sliders keep them (a negative weight too), and a
    caption query ranks with the same total as the evaluation."""
    from hosa_lib.explore import Explorer
    from hosa_lib.train import train
    raw = to_dict(load("params/images.yaml"))
    raw["data"].update(store=smoke_store.store)
    raw["model"].update(embed=64, ff=128)
    raw["train"].update(epochs=1, batch_size=8, gate_lr=0.05)
    cfg = from_dict(raw)
    train(cfg, tmp_path / "run", progress=False)
    ck = tmp_path / "run" / "checkpoints" / "last.pt"
    state = torch.load(ck, weights_only=False)
    state["model"]["term_gates"] = torch.tensor([0.4, -0.3])
    torch.save(state, ck)
    ex = Explorer(cfg, ck)
    assert ex.scoring.w_local == pytest.approx(0.4 * cfg.scoring.w_local)
    assert ex.scoring.w_high == pytest.approx(-0.3 * cfg.scoring.w_high)
    ex.widget("a red square", k=3)
    assert ex.scoring.w_high == pytest.approx(-0.3 * cfg.scoring.w_high, abs=0.03)  # the slider kept it
    top = ex.text_query("a red square", k=3, show=False)
    assert len(top) == 3 and top["score"].is_monotonic_decreasing


@pytest.mark.parametrize("kind", ["cca", "auto"])
@pytest.mark.slow
def test_anchored_model_starts_at_its_closed_form_fit(smoke_store, kind):
    """anchor_init cca/auto: the untrained model's global cosine scores are the chosen fit's
    (zero-padded to the embedding width), and auto's choice has the higher val rsum."""
    from hosa_lib.baseline import closed_form_start, cosine_scores, split_vectors
    from hosa_lib.evaluate import encode_split
    from hosa_lib.factory import build_model
    from hosa_lib.store import Store
    from hosa_lib.text import cache_key
    key = cache_key("minilm", -1)
    fit = closed_form_start(smoke_store.store, key, kind, 64)
    if kind == "auto":
        others = [closed_form_start(smoke_store.store, key, k, 64)["val_rsum"] for k in ("ridge", "cca")]
        assert fit["val_rsum"] == max(others)
    with Store(smoke_store.store, check_values=False) as s:
        te = split_vectors(s, "test", key)
    expect = cosine_scores((te[0] - fit["mean_x"]) @ fit["image"], (te[1] - fit["mean_y"]) @ fit["text"])
    model, text = build_model(anchored_cfg(smoke_store.store, embed=64, heads=4, anchor_init=kind), seed=0)
    img, cap, _ = encode_split(model, smoke_store.store, "test", text)
    got = torch.nn.functional.normalize(img["glob"], dim=-1) @ torch.nn.functional.normalize(cap["glob"], dim=-1).T
    np.testing.assert_allclose(got.numpy(), expect, atol=3e-3)  # region features are stored in float16


def test_zero_epochs_keep_the_closed_form_start_as_best_and_need_validate_at_start(tmp_path, smoke_store):
    """train.epochs 0 with validate_at_start: no step, best.pt holds the untrained (closed-form) model
    so a grid can report the start itself; without validate_at_start it is a config error up front."""
    from hosa_lib.config import ConfigError
    from hosa_lib.factory import build_model
    from hosa_lib.runs import load_checkpoint
    from hosa_lib.train import train
    cfg = override(anchored_cfg(smoke_store.store, anchor_init="cca"),
                   {"train": {"epochs": 0, "validate_at_start": True}})
    res = train(cfg, tmp_path / "run", progress=False)
    assert res["steps"] == 0 and res["best_rsum"] > 0
    init, _ = build_model(cfg, seed=cfg.train.seed)
    best = load_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt")["model"]
    for k, v in init.state_dict().items():
        torch.testing.assert_close(best[k], v, msg=k)
    with pytest.raises(ConfigError, match="train.epochs = 0"):
        train(override(cfg, {"train": {"validate_at_start": False}}), tmp_path / "plain", progress=False)


def test_term_gates_load_by_name_when_gated_terms_change(smoke_store):
    """Gates are saved with their term names: a checkpoint from before a gated term existed (here one
    that knows only 'high', plus a term since removed) loads, the new term's gate off (0) and the others
    by name; a checkpoint from before names were saved loads in the order gates had then."""
    from hosa_lib.factory import build_model
    from hosa_lib.scoring import gated_terms
    cfg = override(anchored_cfg(smoke_store.store), {"scoring": {"gates": True}})
    model, _ = build_model(cfg, seed=0)
    sd = model.state_dict()
    assert sd["term_gate_names"] == [t.name for t in gated_terms()]
    order = [t.name for t in gated_terms()]
    old = dict(sd, term_gates=torch.tensor([0.7, 0.3]), term_gate_names=["high", "gone"])
    model.load_state_dict(old, strict=True)
    assert model.term_gates.tolist() == pytest.approx([0.7 if n == "high" else 0.0 for n in order])
    legacy = {k: v for k, v in sd.items() if k != "term_gate_names"}
    legacy["term_gates"] = torch.tensor([0.25, 0.5])  # before names: [local, high]
    model.load_state_dict(legacy, strict=True)
    assert model.term_gates.tolist() == [{"local": 0.25, "high": 0.5}[n] for n in order]
