"""Faults a user meets: kills, concurrent writers, bad images and data, full disks, Ctrl-C.
Each test reproduces the failure on generated inputs in the upstream formats."""
import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from hosa_lib.store import Store, StoreError

REPO = Path(__file__).resolve().parent.parent


def smoke_params(tmp_path, **data):
    raw = {"base": str(REPO / "params" / "smoke.yaml"), "output_root": str(tmp_path / "out"),
           "data": {"store": str(tmp_path / "out" / "smoke.h5"), **data}}
    p = tmp_path / "p.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


def run(*args, cwd=None, **kw):
    return subprocess.run([sys.executable, "-m", *map(str, args)], capture_output=True, text=True, cwd=cwd, **kw)


# ---------------------------------------------------------------------------- stuck or stale state
@pytest.mark.slow
def test_kill_9_during_encoding_resumes_and_a_cut_partial_is_discarded(tmp_path):
    """kill -9 while prepare encodes. Every encoded batch is flushed, so the rerun continues from the
    images already encoded (not from the start) and its store equals an uninterrupted build's. The same
    partial cut in the middle (as a crash mid-write can leave it) is said to be unreadable, discarded,
    and the store built whole: that build is the uninterrupted one compared with."""
    import shutil
    params = smoke_params(tmp_path, n_images=240, batch_size=8)
    proc = subprocess.Popen([sys.executable, "-m", "hosa_lib.prepare", str(params)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    partial = tmp_path / "out" / "..smoke.h5.building.h5.partial"  # the build's own resumable file
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and (not partial.exists() or partial.stat().st_size < 400_000):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert partial.exists(), proc.stdout.read()
    (tmp_path / "whole" / "out").mkdir(parents=True)
    cut = tmp_path / "whole" / "out" / partial.name
    shutil.copyfile(partial, cut)
    with cut.open("r+b") as fh:
        fh.truncate(cut.stat().st_size // 2)

    again = run("hosa_lib.prepare", params)
    assert again.returncode == 0, again.stderr[-2000:]
    done = re.search(r"resuming .*: (\d+) of 240 images were encoded", again.stdout)
    assert done and int(done.group(1)) > 0, again.stdout[-2000:]
    whole = smoke_params(tmp_path / "whole", n_images=240, batch_size=8)
    rebuilt = run("hosa_lib.prepare", whole)
    assert rebuilt.returncode == 0, rebuilt.stderr[-2000:]
    assert "discarding" in rebuilt.stdout and "unreadable" in rebuilt.stdout and "resuming" not in rebuilt.stdout
    with Store(tmp_path / "out" / "smoke.h5") as a, Store(tmp_path / "whole" / "out" / "smoke.h5") as b:
        assert a.n_images == 240 and a.text_keys() and a.relevance("test")
        np.testing.assert_array_equal(a.features(), b.features())
    assert not partial.exists() and not cut.exists()
    forced = run("hosa_lib.prepare", whole, "--force")  # a forced rebuild of a whole store leaves no partial
    assert forced.returncode == 0 and not cut.exists() and Store(tmp_path / "whole" / "out" / "smoke.h5").n_images == 240


def test_stale_partial_from_other_inputs_is_discarded(tmp_path):
    from hosa_lib.sources.imagefolder import convert_image_folder
    from tests.test_store_sources import make_image_folder
    img, caps = make_image_folder(tmp_path)
    partial = tmp_path / ".s.h5.partial"
    partial.write_bytes(b"\x89HDF\r\n\x1a\n" + os.urandom(2000))  # an HDF5 signature, then garbage
    convert_image_folder(img, caps, tmp_path / "s.h5", image_size=64, progress=False)
    assert not partial.exists() and Store(tmp_path / "s.h5").n_images == 3


@pytest.mark.slow
def test_killed_forced_stage_reruns_and_new_store_reruns_downstream(smoke_project, tmp_path):
    """pipeline --force killed inside 20_evaluate: the next plain run runs evaluate again; a store rebuilt
    afterwards makes training and evaluation run again (their markers depend on it)."""
    import shutil
    shared, proc = smoke_project
    assert proc.returncode == 0, proc.stderr
    root = tmp_path / "project"  # a copy: the shared project stays as the pipeline left it
    shutil.copytree(shared, root)
    params = root / "params" / "demo.yaml"
    run_dir = root / "outputs" / Path(proc.stdout.strip().splitlines()[-1].split("report: ")[1]).parent.name
    p = subprocess.Popen([sys.executable, "-m", "hosa_lib.pipeline", str(params), "--stages", "evaluate", "--force"],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while (run_dir / ".20_evaluate.done").exists() and time.time() < deadline and p.poll() is None:
        time.sleep(0.05)
    p.kill()
    p.wait()
    again = run("hosa_lib.pipeline", params, "--stages", "train", "evaluate")
    assert again.returncode == 0, again.stderr
    assert "10_train: up to date, skipped" in again.stdout and "20_evaluate: up to date" not in again.stdout
    # a re-prepared store is a new file: both markers stop being up to date (checked on the markers
    # themselves; running the stages again is what test_a_deleted_checkpoint… does)
    from hosa_lib.config import load
    from hosa_lib.pipeline import STAGES, stage_digest, up_to_date as marker_state
    cfg = load(params)
    assert Path(cfg.data.store) == root / "outputs" / "data" / "synthetic_smoke.h5"

    def up_to_date(stage):
        mark = run_dir / f".{STAGES[stage]}.done"
        return marker_state(stage, mark, cfg, run_dir, stage_digest(stage, cfg, run_dir), False) == "current"
    assert up_to_date("train") and up_to_date("evaluate")
    os.utime(cfg.data.store, ns=(time.time_ns(), time.time_ns()))
    assert not up_to_date("train") and not up_to_date("evaluate")


def test_second_writer_is_refused_naming_the_holder(tmp_path):
    from hosa_lib.store import writing_lock
    store = tmp_path / "s.h5"
    with writing_lock(store):
        code = ("from hosa_lib.store import writing_lock\n"
                f"with writing_lock({str(store)!r}): pass")
        other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert other.returncode != 0 and f"store {store} is being written by pid {os.getpid()}" in other.stderr
    with writing_lock(store):  # released: the next writer proceeds
        pass


@pytest.mark.slow
def test_store_appears_whole_with_its_caches(tmp_path, monkeypatch):
    """prepare builds under a temporary name: while the text cache is computed, the final path holds
    nothing (first build) — never a store without its text cache or relevance."""
    import hosa_lib.features as features
    from hosa_lib.config import DataConfig
    from hosa_lib.prepare import prepare
    seen = []
    real = features.encode_block
    monkeypatch.setattr(features, "encode_block", lambda *a, **k: (seen.append((tmp_path / "s.h5").exists()),
                                                                   real(*a, **k))[1])
    prepare(DataConfig(store=str(tmp_path / "s.h5"), n_images=20, image_size=64, seed=1), progress=False)
    assert seen == [False]
    with Store(tmp_path / "s.h5") as s:
        assert s.text_keys() and s.relevance("test") and s.attrs["source_digest"]


# ---------------------------------------------------------------------------- silently wrong data
@pytest.mark.parametrize("mode", ["I;16", "RGBA", "LA", "P"])
def test_image_modes_convert_faithfully(tmp_path, mode):
    from hosa_lib.sources.imagefolder import load_rgb
    p = tmp_path / "x.png"
    if mode == "I;16":
        arr = np.full((8, 8), 32768, dtype=np.uint16)  # mid grey in 16 bits
        Image.fromarray(arr).save(p)
        assert np.asarray(load_rgb(p)).mean() == pytest.approx(127.5, abs=1)
        return
    base = Image.new("RGBA", (8, 8), (0, 0, 0, 0))  # fully transparent black
    base.putpixel((0, 0), (200, 10, 10, 255))
    im = {"RGBA": base, "LA": base.convert("LA"), "P": base.convert("P", palette=Image.ADAPTIVE)}[mode]
    if mode == "P":
        im.info["transparency"] = im.getpixel((1, 1))
    im.save(p, **({"transparency": im.info["transparency"]} if mode == "P" else {}))
    out = np.asarray(load_rgb(p, background=(0, 255, 0)))
    assert out[5, 5].tolist() == [0, 255, 0]  # transparent pixels show the background, not hidden colour
    assert out[0, 0].tolist() != [0, 255, 0]


def test_non_square_images_are_letterboxed_or_cropped_and_counted(tmp_path, capsys):
    from hosa_lib.sources.imagefolder import convert_image_folder, load_rgb
    Image.new("RGB", (90, 10), (255, 0, 0)).save(tmp_path / "wide.png")
    box = load_rgb(tmp_path / "wide.png", "letterbox", (0, 0, 255))
    crop = load_rgb(tmp_path / "wide.png", "crop")
    assert box.size == (90, 90) and box.getpixel((45, 2)) == (0, 0, 255) and box.getpixel((45, 45)) == (255, 0, 0)
    assert crop.size == (10, 10) and crop.getpixel((5, 5)) == (255, 0, 0)
    (tmp_path / "c.csv").write_text("filename,caption,split\nwide.png,a red bar,test\n")
    rep = convert_image_folder(tmp_path, tmp_path / "c.csv", tmp_path / "s.h5", image_size=64, progress=False)
    assert rep["far_from_square"] == 1 and "1 of 1 images are far from square" in capsys.readouterr().out


def write_coco(tmp_path, mutate):
    from tests.test_store_sources import write_teran
    root, ids = write_teran(tmp_path, "coco", n=6)
    mutate(root, ids)
    return root


def test_teran_boxes_nan_fail_and_out_of_range_are_clipped(tmp_path, capsys):
    from hosa_lib.sources.teran import convert_teran

    def bad_boxes(root, ids):
        box = root / "coco" / "features_36" / "bu_box"
        b = np.load(box / f"{ids[3]}.npy")
        b[0] = [-50, 20, 800, 10]  # negative, beyond the 640x400 image, y2 < y1
        np.save(box / f"{ids[3]}.npy", b)
    root = write_coco(tmp_path / "a", bad_boxes)
    rep = convert_teran(root, "coco", tmp_path / "a.h5")
    assert rep["boxes_fixed"] == 1 and "1 box(es) had reversed corners" in capsys.readouterr().out
    with Store(tmp_path / "a.h5") as s:
        b = s.boxes(3)[0]
        assert b.min() >= 0 and b.max() <= 1 and b[0] <= b[2] and b[1] <= b[3]

    def nan_box(root, ids):
        box = root / "coco" / "features_36" / "bu_box" / f"{ids[2]}.npy"
        b = np.load(box)
        b[1, 2] = np.nan
        np.save(box, b)
    root = write_coco(tmp_path / "b", nan_box)
    with pytest.raises(StoreError, match=r"bu_box.*boxes contain NaN"):
        convert_teran(root, "coco", tmp_path / "b.h5", progress=False)


def test_duplicate_ids_image_in_two_splits_and_images_without_sentences(tmp_path):
    from hosa_lib.sources.teran import convert_teran

    def dup(root, ids):
        ann = root / "coco" / "annotations" / "dataset_coco.json"
        d = json.loads(ann.read_text())
        d["images"].append({**d["images"][0], "split": "test"})  # image 0 again, in test
        ann.write_text(json.dumps(d))
    with pytest.raises(StoreError, match=r"listed more than once \(an image in two splits\?\): \['1000'\]"):
        convert_teran(write_coco(tmp_path / "a", dup), "coco", tmp_path / "a.h5", progress=False)

    def no_sentences(root, ids):
        ann = root / "coco" / "annotations" / "dataset_coco.json"
        d = json.loads(ann.read_text())
        d["images"][4]["sentences"] = []
        ann.write_text(json.dumps(d))
    with pytest.raises(StoreError, match=r"image 4 \('im4.jpg', id 1004\) has no sentences"):
        convert_teran(write_coco(tmp_path / "b", no_sentences), "coco", tmp_path / "b.h5", progress=False)
    from hosa_lib.sources.imagefolder import read_captions
    (tmp_path / "c.csv").write_text("filename,caption,split\na.png,one,train\na.png,two,test\n")
    with pytest.raises(StoreError, match=r"line 3: image 'a.png' is in two splits"):
        read_captions(tmp_path / "c.csv")


def test_captions_without_words_are_rejected_naming_them(tmp_path):
    from hosa_lib.features import add_text_cache
    from hosa_lib.sources.imagefolder import convert_image_folder
    from tests.test_store_sources import make_image_folder
    img, caps = make_image_folder(tmp_path)
    convert_image_folder(img, caps, tmp_path / "s.h5", image_size=64, progress=False)
    rows = caps.read_text().splitlines()
    for bad in ("\u200b\u200b", "?!..."):
        caps.write_text("\n".join(rows[:3] + [rows[3].replace("photo number 1 version 0", bad)] + rows[4:]) + "\n")
        with pytest.raises(StoreError, match=re.escape(f"caption #0 {bad!r} for image '1.png' has no letter, digit")):
            convert_image_folder(img, caps, tmp_path / "t.h5", image_size=64, progress=False)
    from hosa_lib.store import updating  # a store from elsewhere: the text cache still names such a caption
    with updating(tmp_path / "s.h5") as f:
        f["captions/text"][2] = "\u200b\u200b"
    with pytest.raises(StoreError, match=r"no words after tokenisation, e.g. #2 '\\u200b\\u200b'"):
        add_text_cache(tmp_path / "s.h5", progress=False)


def test_rouge_l_sees_every_script():
    from hosa_lib.relevance import rouge_l_matrix
    caps = ["一只红色的猫", "قطة حمراء", "🐱🐶", "?!", "a red cat"]
    rel = rouge_l_matrix(caps, [[c] for c in caps], progress=False)
    assert np.allclose(np.diag(rel), 1.0)  # each caption is fully relevant to its own image
    assert rel[0, 1] == 0 and 0 < rouge_l_matrix(["一只猫"], [["一只红色的猫"]], progress=False)[0, 0] < 1


def test_csv_with_a_bom_and_without_split_column(tmp_path):
    from hosa_lib.sources.imagefolder import read_captions
    names = [f"{i}.png" for i in range(200)]
    with (tmp_path / "c.csv").open("w", encoding="utf-8-sig", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["filename", "caption"])
        w.writerows([(n, f"picture {n}") for n in names])
    items = read_captions(tmp_path / "c.csv")
    splits = [it["split"] for it in items]
    assert set(splits) == {"train", "val", "test"} and 0.7 < splits.count("train") / 200 < 0.9
    assert [it["split"] for it in read_captions(tmp_path / "c.csv")] == splits  # deterministic


def test_checkpoint_scoring_travels_and_conflicts_are_named(tmp_path):
    from hosa_lib.config import ConfigError, ScoringConfig
    from hosa_lib.evaluate import check_scoring
    with pytest.raises(ConfigError, match=r"scoring.bands = 4 in the params vs 8 in the checkpoint"):
        check_scoring(ScoringConfig(bands=4), ScoringConfig(bands=8), "best.pt")
    check_scoring(ScoringConfig(bands=8), ScoringConfig(bands=8), "best.pt")


# ---------------------------------------------------------------------------- errors found early
def test_preflight_catches_missing_val_split_unwritable_folder_and_nan_boxes(tmp_path, smoke_store):
    import shutil

    from hosa_lib.config import RunConfig, override
    from hosa_lib.runs import CheckpointError
    from hosa_lib.store import copy_store, updating
    from hosa_lib.train import train
    store = tmp_path / "s.h5"
    copy_store(smoke_store.store, store)
    cfg = override(RunConfig(), {"data": {"store": str(store)}, "train": {"epochs": 1, "batch_size": 8}})
    ro = tmp_path / "ro"
    (ro / "checkpoints").mkdir(parents=True)
    os.chmod(ro / "checkpoints", 0o500)
    if os.geteuid() != 0:  # root writes anywhere: this check needs an ordinary user
        with pytest.raises(CheckpointError, match="not writable"):
            train(cfg, ro, progress=False)
    with updating(store) as f:
        del f["splits/val"]
    with pytest.raises(StoreError, match=r"needs splits train and val, missing \['val'\]"):
        train(cfg, tmp_path / "run", progress=False)
    copy_store(smoke_store.store, store)
    import h5py  # a store damaged outside the workbench (the library's own writers refuse NaN boxes):
    with Store(store) as s:  # found when its rows are read (opening a checked store reads no rows)
        bad = int(s.split_images("train")[5])
    with h5py.File(store, "r+") as f:
        f["images/boxes"][bad, 0, 0] = np.nan
    with pytest.raises(StoreError, match=rf"'images/boxes' of image {bad} .* NaN or outside"):
        train(cfg, tmp_path / "run2", progress=False)


@pytest.fixture()
def tiny_disk(tmp_path):
    """A real 1 MiB file system (tmpfs; needs root, as in CI), unmounted afterwards."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a 1 MiB tmpfs needs root (CI runs as root)")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)


def test_disk_full_for_real_keeps_the_previous_checkpoint(tiny_disk):
    """On an actually full file system (no mocks): the save fails with a one-line error naming the
    folder, the previous checkpoint loads, and no temporary file is left behind."""
    from hosa_lib import runs
    path = tiny_disk / "last.pt"
    runs.save_checkpoint(path, {"model": {"w": torch.zeros(2)}, "step": 1})
    with pytest.raises(runs.CheckpointError, match=rf"no space left on {tiny_disk} while saving last.pt"):
        runs.save_checkpoint(path, {"model": {"w": torch.randn(512, 1024)}, "step": 2})  # 2 MiB > the disk
    assert runs.load_checkpoint(path)["step"] == 1 and not list(tiny_disk.glob(".last.pt.tmp-*"))


def test_torchs_disk_full_message_is_recognised(tmp_path, monkeypatch):
    """torch.save reports a full disk as an iostream RuntimeError without errno (what it raised on a full
    disk): with little space left that is said as 'no space left' too."""
    from hosa_lib import runs
    path = tmp_path / "last.pt"
    runs.save_checkpoint(path, {"model": {"w": torch.zeros(2)}, "step": 1})

    def full(obj, f, *a, **k):
        Path(f).write_bytes(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc] . PytorchStreamWriter failed writing file: "
                           "basic_ios::clear: iostream error")
    monkeypatch.setattr(runs.torch, "save", full)
    monkeypatch.setattr(runs.shutil if hasattr(runs, "shutil") else __import__("shutil"), "disk_usage",
                        lambda p: type("u", (), {"free": 0})())
    with pytest.raises(runs.CheckpointError, match=rf"no space left on {tmp_path} while saving last.pt"):
        runs.save_checkpoint(path, {"model": {}, "step": 2})
    assert runs.load_checkpoint(path)["step"] == 1 and not list(tmp_path.glob(".last.pt.tmp-*"))


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_says_how_to_resume_and_logs_each_step_once(tmp_path, smoke_store):
    raw = {"base": str(REPO / "params" / "smoke.yaml"), "data": {"store": smoke_store.store},
           "train": {"epochs": 3, "batch_size": 8, "log_every": 1}}
    params = tmp_path / "p.yaml"
    params.write_text(yaml.safe_dump(raw))
    run_dir = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "-m", "hosa_lib.train", str(params), "--run-dir", str(run_dir)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = run_dir / "metrics.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 3):
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "saved" in err and "resumes from there" in err
    saved = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)["step"]
    done = run("hosa_lib.train", params, "--run-dir", run_dir)
    assert done.returncode == 0, done.stderr[-2000:]
    steps = [json.loads(line)["step"] for line in log.read_text().splitlines() if "loss" in line]
    assert steps == sorted(set(steps)) and saved in steps  # each step logged once, across the interruption


@pytest.mark.slow
def test_sigterm_during_the_last_validation_stops_instead_of_being_swallowed(tmp_path, smoke_store, monkeypatch):
    """A stop asked while the final epoch validates used to be forgotten (training returned normally and
    an ablation grid went on to evaluate and to its next cell); now the epoch's checkpoint is saved and
    training raises KeyboardInterrupt, and a rerun has nothing left to train."""
    import hosa_lib.train as tr
    from hosa_lib.config import from_dict, load, to_dict
    raw = to_dict(load(REPO / "params" / "smoke.yaml"))
    raw["data"]["store"] = smoke_store.store
    raw["train"].update(epochs=1, batch_size=8)
    cfg = from_dict(raw)
    real = tr.validate

    def validate_then_sigterm(*a, **k):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **k)

    monkeypatch.setattr(tr, "validate", validate_then_sigterm)
    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt, match="interrupted after epoch 1"):
        tr.train(cfg, tmp_path / "run", progress=False)
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == handlers  # restored
    ck = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=False)
    assert ck["epoch"] == 1 and (tmp_path / "run" / "checkpoints" / "best.pt").is_file()
    monkeypatch.setattr(tr, "validate", real)
    assert tr.train(cfg, tmp_path / "run", progress=False)["steps"] == ck["step"]


def test_changed_captions_rebuild_the_store(tmp_path, capsys):
    from hosa_lib.config import DataConfig
    from hosa_lib.prepare import prepare
    from tests.test_store_sources import make_image_folder
    img, caps = make_image_folder(tmp_path)
    dc = DataConfig(source="images", root=str(img), captions=str(caps), store=str(tmp_path / "s.h5"), image_size=64)
    prepare(dc, progress=False)
    assert prepare(dc, progress=False)["report"] == {"reused": True}  # unchanged: reused
    caps.write_text(caps.read_text() + "0.png,one more caption of photo zero,train\n")
    out = prepare(dc, progress=False)
    assert "its source changed" in capsys.readouterr().out and out["summary"]["captions"] == 7


@pytest.mark.parametrize("yaml_text,message", [
    ("train: {batch_size: 0}", "'train.batch_size' = 0: expected a number >= 1"),
    ("train: {batch_size: -4}", "'train.batch_size' = -4: expected a number >= 1"),
    ("scoring: {bands: 0}", "'scoring.bands' = 0: expected a number >= 1"),
    ("train: {lr: .nan}", "'train.lr' = nan: expected a finite number"),
    ("train: {lr: -1.0e-4}", "'train.lr' = -0.0001: expected a number > 0"),
    ("model: {dropout: 1.5}", "'model.dropout' = 1.5: expected a number in [0, 1)"),
    ("eval: {ndcg_k: 0}", "'eval.ndcg_k' = 0: expected a number >= 1"),
])
def test_numeric_options_out_of_range_fail_at_load_with_one_line(tmp_path, yaml_text, message):
    """Each of these used to pass the loader and fail later as a traceback (ZeroDivisionError,
    UnboundLocalError, torch errors)."""
    from hosa_lib.config import ConfigError, load
    params = tmp_path / "p.yaml"
    params.write_text(f"base: {REPO / 'params' / 'smoke.yaml'}\n{yaml_text}\n")
    with pytest.raises(ConfigError, match=re.escape(message)):
        load(params)


def test_csv_row_with_missing_cells_names_its_line(tmp_path):
    """A row of one cell used to read as an image in split 'all' and fail as 'in two splits'."""
    from hosa_lib.sources.imagefolder import read_captions
    (tmp_path / "c.csv").write_text("filename,caption,split\n0.png,a cat,train\n1.png\n")
    with pytest.raises(StoreError, match=r"c.csv line 3: 1 cell\(s\), expected 3 \(filename,caption,split\)"):
        read_captions(tmp_path / "c.csv")
    (tmp_path / "d.csv").write_text("filename,caption\n0.png,a cat,sitting\n")
    with pytest.raises(StoreError, match=r"d.csv line 2: 3 cell\(s\), expected 2 .*quote a caption"):
        read_captions(tmp_path / "d.csv")


@pytest.mark.parametrize("command", ["prepare", "train"])
@pytest.mark.slow
def test_unwritable_output_folder_is_one_line_from_the_cli(tmp_path, command):
    """Root writes anywhere, so the folder is made unwritable by putting it under a regular file
    (ENOTDIR, an OSError like a read-only mount's EROFS): one line naming the path, exit 2."""
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    params = tmp_path / "p.yaml"
    params.write_text(yaml.safe_dump({"base": str(REPO / "params" / "smoke.yaml"), "output_root": str(blocker / "out"),
                                      "data": {"store": str(blocker / "out" / "s.h5")}}))
    proc = subprocess.run([sys.executable, "-m", f"hosa_lib.{command}", str(params)], capture_output=True, text=True,
                          cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(blocker) in lines[0], proc.stderr[-2000:]


def test_prepare_reports_progress_into_the_run_log(tmp_path):
    """Inside the pipeline the prepare notebook's progress goes to the run's progress log (printed in the
    terminal by the pipeline): the build, image encoding, text states and relevance each say how far."""
    from hosa_lib.config import DataConfig
    from hosa_lib.prepare import prepare
    from hosa_lib.progress import PROGRESS_LOG, ProgressLog
    prepare(DataConfig(store=str(tmp_path / "s.h5"), n_images=20, image_size=64, seed=1),
            progress=ProgressLog(tmp_path / "run", every=0))
    log = (tmp_path / "run" / PROGRESS_LOG).read_text()
    for what in ("building s.h5 from synthetic", "render scenes", "encode images", "text features", "ROUGE-L relevance"):
        assert what in log, what
    assert "100%" in log


def test_own_params_file_gets_its_own_store_and_run_name(tmp_path):
    """Following the README for your own images (`base: images.yaml` + data.root/captions) used to
    inherit the demo's store path and the run name 'run': a new params file now gets both from its name."""
    from hosa_lib.config import load
    mine = tmp_path / "params" / "mine.yaml"
    mine.parent.mkdir()
    (tmp_path / "params" / "base.yaml").write_text((REPO / "params" / "base.yaml").read_text())
    (tmp_path / "params" / "images.yaml").write_text((REPO / "params" / "images.yaml").read_text())
    mine.write_text("base: images.yaml\ndata:\n  root: data/mine\n  captions: data/mine/captions.csv\n")
    cfg = load(mine)
    assert cfg.name == "mine" and cfg.data.store == str(tmp_path / "outputs" / "data" / "mine.h5")
    assert load(REPO / "params" / "demo.yaml").data.store.endswith("outputs/data/synthetic_demo.h5")  # named: kept


@pytest.mark.slow
def test_checkpoint_is_not_evaluated_on_its_store_rebuilt_from_other_data(tmp_path, smoke_store):
    import h5py

    from hosa_lib.config import ConfigError, RunConfig, override
    from hosa_lib.evaluate import evaluate_checkpoint
    from hosa_lib.store import copy_store
    from hosa_lib.train import train
    store = tmp_path / "s.h5"
    copy_store(smoke_store.store, store)
    cfg = override(RunConfig(), {"data": {"store": str(store)}, "train": {"epochs": 1, "batch_size": 16},
                                 "model": {"embed": 32, "ff": 64}})
    train(cfg, tmp_path / "run", progress=False)
    ck = tmp_path / "run" / "checkpoints" / "best.pt"
    evaluate_checkpoint(cfg, ck, progress=False, cache=False)  # same store: fine
    with h5py.File(store, "r+") as f:  # what a rebuild from another params file's source leaves behind
        f.attrs["source"], f.attrs["source_digest"] = "images", "0123456789abcdef"
    with pytest.raises(ConfigError, match=r"when it held 'synthetic\(seed=3\)'.*now holds 'images'.*rebuilt since"):
        evaluate_checkpoint(cfg, ck, progress=False, cache=False)


def test_a_grid_cell_that_does_not_fit_is_refused_before_any_cell_trains(monkeypatch):
    """images.yaml inherited the demo grid, whose teran_local / global_only cells the recipe's term gates
    reject: that used to fail after the first cells had trained. Now every cell is built first."""
    import hosa_lib.ablations as ab
    from hosa_lib.config import ConfigError, load
    monkeypatch.setattr(ab, "run_cell", lambda *a, **k: pytest.fail("a cell trained before the grid was checked"))
    cfg = load(REPO / "params" / "images.yaml")
    assert cfg.ablation.grid.endswith("params/ablations/images.yaml")  # its own grid, which fits
    with pytest.raises(ConfigError, match=r"demo.yaml: variant teran_local: scoring.gates: needs an ungated term"):
        ab.run_grid(cfg, REPO / "params" / "ablations" / "demo.yaml", progress=False)


def test_warm_ups_longer_than_the_run_are_said_before_training(tmp_path, capsys):
    from hosa_lib.config import RunConfig, override
    from hosa_lib.progress import PROGRESS_LOG
    from hosa_lib.train import warn_schedule
    cfg = override(RunConfig(), {"train": {"epochs": 2, "lr_warmup_steps": 100}, "loss": {"warmup_steps": 200}})
    notes = warn_schedule(cfg, 9, tmp_path, progress=True)  # 18 steps in all
    assert len(notes) == 2 and "train.lr_warmup_steps = 100 is longer than the whole run (18 steps)" in notes[0]
    assert "hardest negatives never start" in notes[1]
    assert notes[0] in capsys.readouterr().out and notes[0] in (tmp_path / PROGRESS_LOG).read_text()
    assert warn_schedule(override(cfg, {"train": {"epochs": 20}, "loss": {"warmup_steps": 10}}), 9, tmp_path, False) == []


def test_ablation_summary_prints_no_negative_zero_and_names_the_load_flag():
    import pandas as pd

    from hosa_lib.ablations import summarize
    df = pd.DataFrame({"variant": ["a", "b"], "seed": [0, 0], "rsum": [1.0, 2.0], "w_local_learned": [-0.001, 0.3],
                       "steps_per_s": [1.0, 2.0], "load_avg": [0.5, 2.0]})
    out = summarize(df)
    assert str(out["w_local_learned"].iloc[0]) == "0.0"  # was -0.0
    assert out["speed not comparable (busier machine)"].tolist() == [False, True]


def test_a_cell_with_the_runs_own_weights_reuses_the_run_folder(monkeypatch):
    """The `hosa` cell of images.yaml's grid (no overrides) trained the run's exact weights a second time
    in another folder; it now is the run's own folder. Cells that change the weights keep their own."""
    import hosa_lib.ablations as ab
    from hosa_lib.config import load
    from hosa_lib.runs import run_dir_for
    cfg = load(REPO / "params" / "images.yaml")
    seen = []
    monkeypatch.setattr(ab, "run_cell", lambda c, progress=False, fresh=False, echo=None: seen.append(run_dir_for(c)) or {"rsum": 1.0})
    ab.run_grid(cfg, progress=False)
    assert seen[0] == run_dir_for(cfg) and len(set(seen)) == 3
    assert all(p.name.startswith("images-abl-") for p in seen[1:])


@pytest.mark.slow
def test_ctrl_c_in_an_ablation_cell_then_rerun_equals_an_uninterrupted_grid(smoke_project, tmp_path):
    """Ctrl-C (SIGINT to the terminal's process group) while an ablation cell trains mid-epoch, then the
    same command again: the cell resumes and its CSV row and best.pt equal those of a grid run without
    interruption (dropout on, so the RNG stream must be restored where the cell stopped)."""
    import shutil

    import pandas as pd
    shared, proc = smoke_project
    assert proc.returncode == 0, proc.stderr

    def project(name):
        root = tmp_path / name
        shutil.copytree(shared, root)
        (root / "params" / "cell.yaml").write_text(yaml.safe_dump({"seeds": [5], "variants": [  # seed 5: a cell the shared run has not trained
            {"name": "global_only", "overrides": {"scoring": {"w_local": 0.0, "w_high": 0.0},
                                                  "train": {"checkpoint_every": 2, "log_every": 1}}}]}))
        params = root / "params" / "demo.yaml"
        raw = yaml.safe_load(params.read_text())
        raw["ablation"] = {**raw.get("ablation", {}), "grid": "params/cell.yaml"}
        params.write_text(yaml.safe_dump(raw))
        return root, [sys.executable, "-m", "hosa_lib.pipeline", str(params), "--stages", "ablations"]

    before = {p.name for p in (shared / "outputs").iterdir()}

    def cell(root):  # the folder of the grid's one cell (not one the shared run left)
        return next(p for p in (root / "outputs").glob("demo-abl-global_only-*") if p.name not in before)

    full_root, cmd = project("full")
    full = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert full.returncode == 0, full.stdout + full.stderr

    root, cmd = project("interrupted")
    # as a terminal's foreground job: SIGINT at its default, even when this test runs in a background job
    # (a non-interactive shell starts those with SIGINT ignored, which the child would inherit)
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
                         start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 240
    while time.time() < deadline and p.poll() is None:
        logs = [p for p in (root / "outputs").glob("demo-abl-global_only-*/metrics.jsonl")
                if p.parent.name not in before]
        if logs and sum('"loss"' in line for line in logs[0].read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    assert p.poll() is None, "the grid ended before its cell had logged 3 steps"
    os.killpg(p.pid, signal.SIGINT)  # what Ctrl-C in the terminal sends
    out = p.communicate(timeout=120)[0]
    assert p.returncode != 0, out
    ck = torch.load(cell(root) / "checkpoints" / "last.pt", weights_only=False)
    assert ck["batch_in_epoch"] > 0, f"not interrupted mid-epoch: {ck['step'], ck['epoch']} {out[-3000:]}"
    assert not (cell(root) / "ablation_result.json").exists()
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr

    rows = [pd.read_csv(next((r / "outputs").glob("demo-*/ablations.csv"))) for r in (full_root, root)]
    rows = [r.drop(columns=[c for c in r if c.endswith(("seconds", "per_s")) or c in ("load_avg", "run_dir")])
            for r in rows]  # the clocks and the folder differ; every metric must not
    assert {"rsum", "i2t_r1", "t2i_r1", "steps"} <= set(rows[0])
    pd.testing.assert_frame_equal(rows[0], rows[1], check_exact=True)
    a, b = (torch.load(cell(r) / "checkpoints" / "best.pt", weights_only=False) for r in (full_root, root))
    assert a["step"] == b["step"] and a["model"].keys() == b["model"].keys()
    for k in a["model"]:  # tensors bit for bit; the model's extra state (gate names) equal
        x, y = a["model"][k], b["model"][k]
        assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y, k
