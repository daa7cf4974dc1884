import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from hosa_lib.config import from_dict, load, to_dict
from hosa_lib.scoring import SCORING_TERMS


def smoke_cfg(store, **train):
    raw = to_dict(load("params/smoke.yaml"))
    raw["data"]["store"] = store
    raw["model"].update(dropout=0.0)
    raw["train"].update({"epochs": 2, "batch_size": 8, "log_every": 1, "device": "cpu", **train})  # bit-exact: CPU
    return from_dict(raw)


def write_params(tmp_path, cfg):
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump(to_dict(cfg)))
    return p


def run_train(params, run_dir):
    return subprocess.Popen([sys.executable, "-m", "hosa_lib.train", str(params), "--run-dir", str(run_dir)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_resume_after_kill_matches_uninterrupted(tmp_path, smoke_store):
    """Killed mid-epoch and resumed, training ends with the uninterrupted run's weights, with dropout on
    (the RNG stream after a mid-epoch resume must be the one the uninterrupted run had there)."""
    cfg = smoke_cfg(smoke_store.store, checkpoint_every=2)
    raw = to_dict(cfg)
    raw["model"]["dropout"] = 0.1
    cfg = from_dict(raw)
    params = write_params(tmp_path, cfg)
    full = run_train(params, tmp_path / "full")
    assert full.wait(300) == 0, full.stdout.read()
    killed = run_train(params, tmp_path / "killed")
    ck = tmp_path / "killed" / "checkpoints" / "last.pt"
    deadline = time.time() + 120
    while not ck.exists() and killed.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    step_at_kill = torch.load(ck, weights_only=False)["step"]
    assert 0 < step_at_kill < 160 // 8  # killed mid-way through the first epoch (20 batches)
    resumed = run_train(params, tmp_path / "killed")
    out = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, out
    assert "resuming" in out
    a = torch.load(tmp_path / "full" / "checkpoints" / "last.pt", weights_only=False)
    b = torch.load(ck, weights_only=False)
    assert a["step"] == b["step"]
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=0, msg=k)  # bit for bit
    assert b["best_rsum"] == a["best_rsum"]
    log = [json.loads(l) for l in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("split") == "val" for r in log) and any("loss" in r for r in log)


def _ddp_worker(rank, world, store, port, result_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    import torch.distributed as dist

    from hosa_lib.data import CaptionDataset, collate
    from hosa_lib.factory import build_model
    from hosa_lib.train import _DDPWrapper, train_step

    dist.init_process_group("gloo", rank=rank, world_size=world)
    cfg = smoke_cfg(store, amp=False)
    core, key = build_model(cfg, torch.device("cpu"), seed=cfg.train.seed)
    model = torch.nn.parallel.DistributedDataParallel(_DDPWrapper(core))
    ds = CaptionDataset(store, "train", key)
    items = [ds[i] for i in range(12)]  # global batch; items 0-3 and 4-5 share images across ranks
    local = items[rank * 6:(rank + 1) * 6]
    out = train_step(model, collate(local), cfg, step=1000, device=torch.device("cpu"), amp=False)
    out["loss"].backward()
    if rank == 0:
        torch.save({"loss": out["loss"].detach(), "grads": {n: p.grad for n, p in core.named_parameters()
                                                             if p.grad is not None}}, result_path)
    dist.barrier()  # neither rank tears gloo down while the other still talks to it (a rank aborted once)
    dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_two_processes_equal_single_process(tmp_path, smoke_store):
    import torch.multiprocessing as mp

    from hosa_lib.data import CaptionDataset, collate
    from hosa_lib.factory import build_model
    from hosa_lib.train import train_step

    port = 29500 + os.getpid() % 1000
    mp.spawn(_ddp_worker, args=(2, smoke_store.store, port, str(tmp_path / "ddp.pt")), nprocs=2, join=True)
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=False)
    cfg = smoke_cfg(smoke_store.store, amp=False)
    core, key = build_model(cfg, torch.device("cpu"), seed=cfg.train.seed)
    ds = CaptionDataset(smoke_store.store, "train", key)
    out = train_step(core, collate([ds[i] for i in range(12)]), cfg, step=1000, device=torch.device("cpu"), amp=False)
    out["loss"].backward()
    # every rank computes the loss of the whole gathered batch; DDP averages identical gradients
    torch.testing.assert_close(ddp["loss"], out["loss"].detach(), rtol=1e-5, atol=1e-6)
    for n, p in core.named_parameters():
        # float32 sums in another order (each rank encodes its half of the batch, the gathered gradients are
        # summed across ranks, the flash kernel's blocks of anchors): error at float32's level of the largest entry
        scale = max(1.0, float(p.grad.abs().max()))
        torch.testing.assert_close(ddp["grads"][n], p.grad, rtol=1e-4, atol=1e-6 * scale, msg=n)


def _ddp_train_worker(rank, world, raw, run_dir, port):
    """One rank of `train` under a 2-process gloo group, as torchrun starts it (env:// rendezvous)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    import torch.distributed as dist

    from hosa_lib.config import from_dict
    from hosa_lib.train import train
    torch.set_num_threads(1)
    try:
        train(from_dict(raw), Path(run_dir), progress=False, stop_after_steps=3)
    finally:
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


DDP_VARIANTS = {
    # the Hugging Face backbone fine-tuned: its pooler never gets a gradient
    "finetuned_backbone": {"model": {"text_finetune": True}, "data": {"text_layer": 2}},
    # TERAN's layout: unused_fc / unused_map are computed by TERAN and discarded
    "teran_arch": {"model": {"arch": "teran", "text_finetune": True, "feat_layers": 1, "image_layers": 1,
                             "text_layers": 1, "anchor": False},
                   "data": {"text_layer": 2}},
}


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(DDP_VARIANTS))
def test_ddp_train_runs_past_step_two_and_keeps_each_ranks_rng(tmp_path, smoke_store, variant):
    """`train` under 2 gloo processes (torchrun's environment) with parameters that receive no
    gradient in the landed code (DDP without find_unused_parameters stops at step 2 with 'Expected
    to have finished reduction'); the mid-epoch checkpoint keeps both ranks' RNG states."""
    import torch.multiprocessing as mp

    from hosa_lib.config import override
    cfg = override(smoke_cfg(smoke_store.store, epochs=1, checkpoint_every=2, batch_size=4, device="cpu"),
                   DDP_VARIANTS[variant])
    port = 29000 + (os.getpid() * 7 + len(variant)) % 900
    mp.spawn(_ddp_train_worker, args=(2, to_dict(cfg), str(tmp_path / "run"), port), nprocs=2, join=True)
    ck = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=False)
    assert ck["step"] == 2 and ck["batch_in_epoch"] == 2  # saved at step 2, then step 3 ran
    assert len(ck["rng_ranks"]) == 2 and ck["rng"] is not None


def test_rng_state_per_device_and_rank_restores_on_any_device_count():
    """A rank resumes with its own saved RNG state; a checkpoint of another world size, or one saved
    by a stop signal (rank 0's state only), gives rank 0's state with a notice; old checkpoints'
    CUDA lists (one entry per GPU of the saving host) load on a host without that GPU."""
    from hosa_lib.runs import rng_state, set_rng_state
    from hosa_lib.train import ddp_backend, rank_rng
    assert ddp_backend(torch.device("cpu")) == "gloo" and ddp_backend(torch.device("cuda", 1)) == "nccl"
    torch.manual_seed(1)
    s0 = rng_state("cpu")
    assert s0["cuda"] is None
    torch.rand(3)
    s1 = rng_state("cpu")
    ck = {"rng": s0, "rng_ranks": [s0, s1]}
    assert rank_rng(ck, 1, 2) == (s1, None)
    state, notice = rank_rng(ck, 1, 3)
    assert state is s0 and "rank 1 resumes with rank 0's RNG state" in notice
    state, notice = rank_rng({"rng": s0}, 1, 2)
    assert state is s0 and "no per-rank states" in notice
    assert rank_rng({"rng": s0}, 0, 1) == (s0, None)
    old = dict(s1, cuda=[torch.zeros(16, dtype=torch.uint8)] * 2)  # saved on a 2-GPU host
    set_rng_state(old, "cpu")  # no IndexError, no CUDA call on a CPU-only host
    assert torch.equal(torch.get_rng_state(), s1["torch"])


@pytest.mark.slow
def test_evaluate_cli_writes_metrics(tmp_path, smoke_store):
    from hosa_lib.train import train
    cfg = smoke_cfg(smoke_store.store, epochs=1)
    res = train(cfg, tmp_path / "run", progress=False)
    params = write_params(tmp_path, cfg)
    ck = Path(res["run_dir"]) / "checkpoints" / "best.pt"
    proc = subprocess.run([sys.executable, "-m", "hosa_lib.evaluate", str(params), "--checkpoint", str(ck),
                           "--protocol", "all", "--out", str(tmp_path / "ev")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert {"rsum", "i2t_r1", "t2i_ndcg_rougeL", "swap_acc"} <= set(m)
    assert "rsum" in proc.stdout
    assert list((Path(res["run_dir"]) / "checkpoints").glob("embeddings_best_test.h5"))
    # best.pt holds the weights for evaluation once, without last.pt's optimizer state
    ck_dir = Path(res["run_dir"]) / "checkpoints"
    best_ck = torch.load(ck_dir / "best.pt", weights_only=False)
    assert "optimizer" not in best_ck and "model" in best_ck
    assert (ck_dir / "best.pt").stat().st_size < 0.5 * (ck_dir / "last.pt").stat().st_size
    # TensorBoard event files in the run folder, read back: per-step losses, lr and term weights, val per epoch
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(Path(res["run_dir"]) / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/pairs_per_s", "val/rsum", "val/i2t_r1"} <= tags, tags
    assert {f"weights/{t.name}" for t in SCORING_TERMS} <= tags
    log = [json.loads(l) for l in (Path(res["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert [e.value for e in acc.Scalars("train/loss")] == pytest.approx(losses)
    assert acc.Scalars("val/rsum")[-1].value == pytest.approx(res["last_val"]["rsum"])
    # evaluation runs where training does: the params' train.device unless --device says otherwise
    from hosa_lib import evaluate
    from hosa_lib.cli import parser
    assert parser("evaluate").parse_args([str(params), "--checkpoint", str(ck)]).device is None
    seen = []
    real = evaluate.resolve_device
    evaluate.resolve_device = lambda name: seen.append(name) or real(name)
    try:
        ev = evaluate.evaluate_checkpoint(cfg, ck, progress=False)
    finally:
        evaluate.resolve_device = real
    assert seen == [cfg.train.device] and next(ev["model"].parameters()).device.type == "cpu"


def test_tensorboard_off_writes_no_event_files(tmp_path, smoke_store):
    from hosa_lib.train import train
    train(smoke_cfg(smoke_store.store, epochs=1, tensorboard=False), tmp_path / "run", progress=False,
          stop_after_steps=2)
    assert (tmp_path / "run" / "metrics.jsonl").exists() and not (tmp_path / "run" / "tensorboard").exists()


def test_finetune_backbone_trains_with_its_own_lr(tmp_path, smoke_store):
    """text_finetune: the (truncated) MiniLM runs inside the model on tokens and receives gradients."""
    from hosa_lib.config import override
    from hosa_lib.train import train
    cfg = override(smoke_cfg(smoke_store.store, epochs=1, lr=1e-3, checkpoint_every=1),
                  {"model": {"text_finetune": True, "text_lr_scale": 0.5}, "data": {"text_layer": 2}})
    res = train(cfg, tmp_path / "ft", progress=False, stop_after_steps=2)
    ck = torch.load(tmp_path / "ft" / "checkpoints" / "last.pt", weights_only=False)
    assert len(ck["optimizer"]["param_groups"]) == 2
    assert ck["optimizer"]["param_groups"][1]["lr"] == pytest.approx(0.5 * ck["optimizer"]["param_groups"][0]["lr"])
    layers = {k.split(".")[4] for k in ck["model"] if k.startswith("text.backbone.encoder.layer.")}
    assert layers == {"0", "1"}  # truncated at data.text_layer, like TERAN's extraction layer
    from hosa_lib.text import load_backbone
    _, fresh = load_backbone("minilm", 2)
    moved = (ck["model"]["text.backbone.encoder.layer.1.output.dense.weight"]
             - fresh.state_dict()["encoder.layer.1.output.dense.weight"]).abs().max()
    assert moved > 0  # the backbone was updated
    assert res["steps"] == 2 and ck["step"] == 2


@pytest.mark.slow
def test_one_trainer_per_run_folder_and_no_resume_with_other_params(tmp_path, smoke_store):
    """A second `train` into a folder being trained fails at once naming the first; resuming a folder
    with params that change the weights (embed 32 -> 16) names what differs instead of a size-mismatch
    traceback; a best.pt deleted after the last epoch is made again from the last model."""
    import os
    import subprocess
    import sys

    from hosa_lib.config import RunConfig, override
    from hosa_lib.runs import CheckpointError
    from hosa_lib.store import writing_lock
    from hosa_lib.train import train
    cfg = override(RunConfig(), {"data": {"store": smoke_store.store}, "train": {"epochs": 1, "batch_size": 16},
                                 "model": {"embed": 32, "ff": 64}})
    run = tmp_path / "run"
    with writing_lock(run / "train", subject=f"run folder {run}"):
        code = ("from hosa_lib.config import RunConfig, override\nfrom hosa_lib.train import train\n"
                f"train(override(RunConfig(), {{'data': {{'store': {smoke_store.store!r}}}}}), {str(run)!r})")
        other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert other.returncode != 0 and f"run folder {run} is being written by pid {os.getpid()}" in other.stderr
    train(cfg, run, progress=False)
    with pytest.raises(CheckpointError, match=r"holds a run with other params: model.embed = 32 there vs 16 now"):
        train(override(cfg, {"model": {"embed": 16}}), run, progress=False)
    (run / "checkpoints" / "best.pt").unlink()
    train(cfg, run, progress=False)
    assert (run / "checkpoints" / "best.pt").is_file()
    with writing_lock(run / "train"):  # released when each run ended (this would raise StoreError)
        pass


def test_stop_asked_in_an_epochs_last_step_resumes_to_the_same_weights(tmp_path, smoke_store, monkeypatch):
    """Ctrl-C during the last step of an epoch saves a checkpoint positioned after every batch of that
    epoch; the resumed run has no batch left there, validates it and goes on (this used to fail on the
    epoch's loss, which no step of the resumed process had computed), ending with the uninterrupted weights."""
    import hosa_lib.train as tr
    cfg = smoke_cfg(smoke_store.store)
    full = tr.train(cfg, tmp_path / "full", progress=False)
    spe = full["steps"] // cfg.train.epochs
    real = tr.train_step

    def sigint_in_last_step(model, batch, cfg, step, *a):
        if step == spe - 1:
            os.kill(os.getpid(), signal.SIGINT)
        return real(model, batch, cfg, step, *a)
    monkeypatch.setattr(tr, "train_step", sigint_in_last_step)
    with pytest.raises(KeyboardInterrupt, match=f"interrupted at step {spe}"):
        tr.train(cfg, tmp_path / "cut", progress=False)
    ck = torch.load(tmp_path / "cut" / "checkpoints" / "last.pt", weights_only=False)
    assert (ck["epoch"], ck["batch_in_epoch"]) == (0, spe)
    monkeypatch.setattr(tr, "train_step", real)
    done = tr.train(cfg, tmp_path / "cut", progress=False)
    assert done["steps"] == full["steps"] and done["best_rsum"] == full["best_rsum"]
    a, b = (torch.load(p / "checkpoints" / "last.pt", weights_only=False)["model"] for p in (tmp_path / "full", tmp_path / "cut"))
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_min_delta_images_keeps_the_start_unless_val_gains_beyond_it(tmp_path, smoke_store):
    """train.min_delta_images: an epoch replaces the best only when its val rsum is higher by more than
    that many val images' worth of recall (100 / n_val each); far above any possible gain, the untrained
    start stays best.pt, and every epoch is logged with the val size the margin used."""
    from hosa_lib.train import train
    cfg = smoke_cfg(smoke_store.store, epochs=2, validate_at_start=True, min_delta_images=1e6, lr=1e-3)
    res = train(cfg, tmp_path / "run", progress=False)
    assert res["best_epoch"] == -1 and res["epochs_run"] == 2
    log = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    vals = [r for r in log if r.get("split") == "val"]
    assert len(vals) == 3 and all(r["n_images"] > 0 for r in vals)
    assert res["best_rsum"] == vals[0]["rsum"]  # the untrained model's
