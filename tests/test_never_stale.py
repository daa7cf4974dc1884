"""Never a stale or stuck result: code and data edits rerun what they affect (and only that), caches know
their store, every run folder recovers with the README's command, and five inputs that used to break
are named. Run through the CLIs as a user runs them, on copies of the project."""
import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parent.parent


def cli(*args, cwd=None, env=None):
    return subprocess.run([sys.executable, "-m", *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, **(env or {})})


def project_copy(smoke_project, tmp_path) -> tuple[Path, Path, dict]:
    """A copy of the smoke project (its outputs included) with its own copy of hosa_lib, which
    PYTHONPATH makes the one that runs: its source can be edited as a user edits theirs."""
    root, proc = smoke_project
    assert proc.returncode == 0, proc.stdout + proc.stderr
    copy = tmp_path / "project"
    shutil.copytree(root, copy, symlinks=True)
    # __pycache__ comes along: numba's cache there is keyed by each source file's digest, so the copy's
    # unedited kernels load compiled (a minute of compiling saved) and an edited file compiles anew
    shutil.copytree(REPO / "hosa_lib", copy / "hosa_lib")
    shutil.rmtree(copy / "notebooks")
    shutil.copytree(REPO / "notebooks", copy / "notebooks")
    run_dir = copy / "outputs" / Path(proc.stdout.strip().splitlines()[-1].split("report: ")[1]).parent.name
    return copy, run_dir, {"PYTHONPATH": str(copy)}


def stage_lines(out: str) -> dict[str, str]:
    """'[pipeline] 10_train: up to date, skipped' -> {'10_train': 'up to date, skipped'}."""
    found = {}
    for line in out.splitlines():
        if line.startswith("[pipeline] ") and ": " in line and not line.startswith("[pipeline]   "):
            name, _, what = line.removeprefix("[pipeline] ").partition(": ")
            if name != "report":
                found[name] = what
    return found


# ----------------------------------------------------------------------------- code edits
def test_code_records_follow_the_source_each_module_ran_with(tmp_path, monkeypatch):
    from hosa_lib import provenance as pv
    rec = pv.running_code(["hosa_lib.scoring", "hosa_lib.metrics"])
    assert pv.is_current(rec) and pv.changed_modules(rec) == []
    copy = tmp_path / "hosa_lib"
    shutil.copytree(REPO / "hosa_lib", copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(pv, "PKG", copy)
    assert pv.is_current(rec)  # same content elsewhere: same code
    (copy / "scoring.py").write_text((copy / "scoring.py").read_text() + "\n# an edit\n")
    assert not pv.is_current(rec) and pv.changed_modules(rec) == ["scoring"]
    assert pv.is_current(pv.running_code(["hosa_lib.metrics"]))  # a record without scoring is untouched
    assert "hosa_lib.scoring" in pv.closure(["train"]) and "hosa_lib.scoring" not in pv.closure(["prepare"])


def test_notebook_digest_counts_cells_not_outputs(tmp_path):
    from hosa_lib.provenance import notebook_digest
    nb = json.loads((REPO / "notebooks" / "10_train.ipynb").read_text())
    p = tmp_path / "a.ipynb"
    p.write_text(json.dumps(nb))
    before = notebook_digest(p)
    nb["cells"][-1]["outputs"] = [{"output_type": "stream", "name": "stdout", "text": "ran"}]
    nb["metadata"]["x"] = 1
    p.write_text(json.dumps(nb))
    assert notebook_digest(p) == before
    nb["cells"][-1]["source"] = ["# edited\n"] + list(nb["cells"][-1]["source"])
    p.write_text(json.dumps(nb))
    assert notebook_digest(p) != before


@pytest.mark.slow
def test_a_scoring_edit_reruns_what_runs_scoring_and_keep_stale_opts_out(smoke_project, tmp_path):
    """Edit scoring.py (uncommitted) and rerun the pipeline: prepare (which never loads scoring) is
    skipped; training starts over, saying why; evaluation and every ablation cell run again. With
    --keep-stale the old results are kept and marked 'computed by other code' in the index."""
    copy, run_dir, env = project_copy(smoke_project, tmp_path)
    params = copy / "params" / "demo.yaml"
    same = cli("hosa_lib.pipeline", params, cwd=tmp_path, env=env)
    assert same.returncode == 0, same.stdout + same.stderr
    assert set(stage_lines(same.stdout).values()) == {"up to date, skipped"}, same.stdout
    scoring = copy / "hosa_lib" / "scoring.py"
    scoring.write_text(scoring.read_text() + "\n# a researcher's edit\n")
    kept = cli("hosa_lib.pipeline", params, "--keep-stale", cwd=tmp_path, env=env)
    assert kept.returncode == 0, kept.stdout + kept.stderr
    lines = stage_lines(kept.stdout)
    assert lines["00_prepare_data"] == "up to date, skipped"
    assert all("computed by other code" in lines[s] for s in ("10_train", "20_evaluate", "30_ablations")), lines
    assert "computed by other code" in (run_dir / "index.html").read_text()
    best_before = (run_dir / "checkpoints" / "best.pt").stat().st_mtime_ns
    again = cli("hosa_lib.pipeline", params, cwd=tmp_path, env=env)
    assert again.returncode == 0, again.stdout + again.stderr
    print("after editing scoring.py:", again.stdout, sep="\n")  # shown with pytest -s
    lines = stage_lines(again.stdout)
    assert lines["00_prepare_data"] == "up to date, skipped", lines
    assert all(lines[s].endswith(" s") for s in ("10_train", "20_evaluate", "30_ablations")), lines
    log = (run_dir / "progress.log").read_text()
    assert "from the start: it was trained by other code (changed since: scoring" in log
    assert (run_dir / "checkpoints" / "best.pt").stat().st_mtime_ns != best_before
    cells = [json.loads(p.read_text()) for p in (copy / "outputs").glob("demo-abl-*/ablation_result.json")]
    import hashlib
    edited = hashlib.sha256(scoring.read_bytes()).hexdigest()[:16]
    assert cells and all(c["code"]["modules"]["hosa_lib.scoring"] == edited for c in cells)  # computed anew
    after = cli("hosa_lib.pipeline", params, cwd=tmp_path, env=env)  # and then it is up to date again
    assert set(stage_lines(after.stdout).values()) == {"up to date, skipped"}, after.stdout


# ----------------------------------------------------------------------------- data edits
def image_project(tmp_path, n=12) -> Path:
    """A small image folder (CSV without a split column) and its params, as the README's quickstart."""
    img = tmp_path / "mine" / "images"
    img.mkdir(parents=True)
    rng = np.random.default_rng(5)
    rows = []
    for i in range(n):
        Image.fromarray((rng.random((40, 40, 3)) * 255).astype(np.uint8)).save(img / f"{i}.png")
        rows += [(f"{i}.png", f"picture {i} of a thing"), (f"{i}.png", f"another view number {i}")]
    with (tmp_path / "mine" / "captions.csv").open("w", newline="") as fh:
        csv.writer(fh).writerows([("filename", "caption"), *rows])
    params = tmp_path / "mine.yaml"
    params.write_text(yaml.safe_dump({
        "base": str(REPO / "params" / "smoke.yaml"), "output_root": str(tmp_path / "out"),
        "data": {"source": "images", "root": str(img), "captions": str(tmp_path / "mine" / "captions.csv"),
                 "store": str(tmp_path / "out" / "mine.h5"), "image_size": 64, "split_fractions": [0.5, 0.25, 0.25]},
        "train": {"batch_size": 4, "epochs": 1}}))
    return params


@pytest.mark.slow
def test_a_captions_edit_reruns_prepare_train_and_evaluate(tmp_path):
    params = image_project(tmp_path)
    first = cli("hosa_lib.pipeline", params, "--stages", "prepare", "train", "evaluate", cwd=tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr
    caps = tmp_path / "mine" / "captions.csv"
    caps.write_text(caps.read_text().replace("another view number 3", "another view of the third one"))
    again = cli("hosa_lib.pipeline", params, "--stages", "prepare", "train", "evaluate", cwd=tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    print("after editing captions.csv:", again.stdout, sep="\n")  # shown with pytest -s
    lines = stage_lines(again.stdout)
    assert all(lines[s].endswith(" s") for s in ("00_prepare_data", "10_train", "20_evaluate")), lines
    run_dir = next((tmp_path / "out").glob("mine-*"))
    assert "when the store held other data" in (run_dir / "progress.log").read_text()


@pytest.mark.slow
def test_embeddings_cache_knows_its_store(tmp_path, smoke_store):
    """A checkpoint evaluated on a second store of the same sizes gives that store's metrics (the cache
    beside the checkpoint is keyed by store build, checkpoint file and code), equal to an uncached run."""
    from hosa_lib.config import load
    from hosa_lib.evaluate import evaluate_checkpoint
    from hosa_lib.train import train
    raw = yaml.safe_load((REPO / "params" / "smoke.yaml").read_text())
    raw.update({"base": str(REPO / "params" / "base.yaml"), "output_root": str(tmp_path)})
    raw["data"] = {**raw["data"], "store": smoke_store.store, "n_images": smoke_store.n_images,
                   "image_size": smoke_store.image_size, "seed": smoke_store.seed}
    raw["train"] = {**raw["train"], "epochs": 1}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(raw))
    cfg = load(tmp_path / "p.yaml")
    res = train(cfg, tmp_path / "run", progress=False)
    ck = Path(res["run_dir"]) / "checkpoints" / "best.pt"
    a = evaluate_checkpoint(cfg, ck, progress=False)["metrics"]
    from dataclasses import replace

    from hosa_lib.prepare import prepare
    other = replace(smoke_store, store=str(tmp_path / "other.h5"), seed=smoke_store.seed + 1)  # same split sizes
    prepare(other, progress=False)
    cfg2 = replace(cfg, data=replace(cfg.data, store=other.store))
    b = evaluate_checkpoint(cfg2, ck, progress=False)["metrics"]
    fresh = evaluate_checkpoint(cfg2, ck, progress=False, cache=False)["metrics"]
    print(f"store 1 rsum {a['rsum']:.2f}; store 2 (cache beside the checkpoint) {b['rsum']:.2f}, uncached {fresh['rsum']:.2f}")
    assert b["rsum"] == fresh["rsum"] and b != a


# ----------------------------------------------------------------------------- recovery
def early_stop_params(tmp_path, smoke_store) -> Path:
    raw = {"base": str(REPO / "params" / "smoke.yaml"), "output_root": str(tmp_path / "out"),
           "data": {"store": smoke_store.store, "n_images": smoke_store.n_images, "image_size": smoke_store.image_size,
                    "seed": smoke_store.seed},
           "train": {"epochs": 4, "patience": 1, "validate_at_start": True, "lr": 1e-6}}
    p = tmp_path / "es.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


@pytest.mark.parametrize("damage", ["delete best", "truncate best", "truncate last", "delete last"])
@pytest.mark.slow
def test_a_run_folder_recovers_with_the_same_command(tmp_path, smoke_store, damage):
    """An early-stopped run (lr so small that val never improves: the untrained start is kept) whose
    best.pt or last.pt is deleted or cut: the same train command trains again and ends with a readable
    best.pt equal to the original's weights; nothing is left stuck."""
    import torch
    params = early_stop_params(tmp_path, smoke_store)
    first = cli("hosa_lib.train", params, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    ck = next((tmp_path / "out").glob("*/checkpoints"))
    before = torch.load(ck / "best.pt", weights_only=False)
    what, name = damage.split()
    target = ck / f"{name}.pt"
    if what == "delete":
        target.unlink()
    else:
        target.write_bytes(target.read_bytes()[:1000])
    again = cli("hosa_lib.train", params, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    after = torch.load(ck / "best.pt", weights_only=False)
    assert after["best_epoch"] == before["best_epoch"]
    for k, v in before["model"].items():
        assert torch.equal(v, after["model"][k]), k
    assert "from the start" in again.stdout or "restored" in again.stdout


@pytest.mark.slow
def test_force_trains_a_finished_run_anew(tmp_path, smoke_store):
    params = early_stop_params(tmp_path, smoke_store)
    assert cli("hosa_lib.train", params, cwd=tmp_path).returncode == 0
    again = cli("hosa_lib.train", params, "--fresh", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "from the start: asked to train anew" in again.stdout
    assert next((tmp_path / "out").glob("*/checkpoints.replaced/best.pt")).is_file()


# ----------------------------------------------------------------------------- five inputs
def folder(tmp_path, rows, encoding="utf-8"):
    img = tmp_path / "img"
    img.mkdir(exist_ok=True)
    for name in {r[0].removeprefix("./") for r in rows[1:]}:
        Image.new("RGB", (20, 20), (200, 10, 10)).save(img / name)
    text = "\n".join(",".join(r) for r in rows) + "\n"
    (tmp_path / "caps.csv").write_bytes(text.encode(encoding))
    return img, tmp_path / "caps.csv"


def test_one_image_under_two_spellings_is_one_image(tmp_path):
    from hosa_lib.sources.imagefolder import convert_image_folder
    from hosa_lib.store import Store
    img, caps = folder(tmp_path, [("filename", "caption"), ("./x.png", "a red thing"), ("x.png", "red again"),
                                  ("y.png", "another one")])
    convert_image_folder(img, caps, tmp_path / "s.h5", image_size=32, progress=False)
    with Store(tmp_path / "s.h5") as s:
        assert s.n_images == 2 and s.image_ids() == ["x", "y"] and s.captions().count("red again") == 1


def test_a_json_listing_one_image_twice_under_two_spellings_names_it(tmp_path):
    from hosa_lib.sources.imagefolder import read_captions
    from hosa_lib.store import StoreError
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"images": [{"filename": "./a.png", "sentences": [{"raw": "x"}]},
                                        {"filename": "a.png", "sentences": [{"raw": "y"}]}]}))
    with pytest.raises(StoreError, match=r"listed more than once.*'a.png'"):
        read_captions(p)


@pytest.mark.slow
def test_a_cp1252_csv_is_one_line_naming_the_file_and_the_encoding(tmp_path):
    img, caps = folder(tmp_path, [("filename", "caption"), ("x.png", "a café in Zürich – at night")], "cp1252")
    params = tmp_path / "p.yaml"
    params.write_text(yaml.safe_dump({"base": str(REPO / "params" / "base.yaml"),
                                      "data": {"source": "images", "root": str(img), "captions": str(caps),
                                               "store": str(tmp_path / "s.h5")}}))
    proc = cli("hosa_lib.prepare", params, cwd=tmp_path)
    err = proc.stderr.strip()
    assert proc.returncode == 2 and "\n" not in err and "Traceback" not in err, err
    assert "caps.csv" in err and "not UTF-8" in err and "UTF-8" in err and "line 2" in err


@pytest.mark.parametrize("on_bad", ["fail", "skip"])
def test_an_image_over_pils_pixel_limit_is_a_bad_image(tmp_path, on_bad, monkeypatch):
    from PIL import Image as PILImage

    from hosa_lib.sources.imagefolder import convert_image_folder
    from hosa_lib.store import Store, StoreError
    img, caps = folder(tmp_path, [("filename", "caption"), ("x.png", "small one"), ("big.png", "huge one")])
    PILImage.new("RGB", (300, 300)).save(img / "big.png")
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 20_000)  # 300 x 300 is over twice the limit: a "bomb"
    if on_bad == "fail":
        with pytest.raises(StoreError, match=r"big.png: cannot decode image.*on_bad_image"):
            convert_image_folder(img, caps, tmp_path / "s.h5", image_size=32, progress=False)
    else:
        rep = convert_image_folder(img, caps, tmp_path / "s.h5", image_size=32, progress=False, on_bad_image="skip")
        assert rep["skipped"] == ["big.png"]
        with Store(tmp_path / "s.h5") as s:
            assert s.n_images == 1


@pytest.mark.slow
def test_a_repeated_params_key_names_the_key_and_both_lines(tmp_path):
    p = tmp_path / "p.yaml"
    p.write_text(f"base: {REPO / 'params' / 'smoke.yaml'}\ntrain:\n  epochs: 3\n  lr: 0.001\n  epochs: 5\n")
    proc = cli("hosa_lib.train", p, cwd=tmp_path)
    err = proc.stderr.strip()
    assert proc.returncode == 2 and "\n" not in err, err
    assert "'train.epochs' appears twice (line 3 and line 5)" in err


def test_exact_duplicate_caption_rows_are_dropped_and_reported(tmp_path, capsys):
    from hosa_lib.sources.imagefolder import read_captions
    _, caps = folder(tmp_path, [("filename", "caption"), ("x.png", "same words"), ("y.png", "other"),
                                ("./x.png", "same words"), ("x.png", "new words")])
    items = read_captions(caps)
    assert [it["captions"] for it in items] == [["same words", "new words"], ["other"]]
    assert "1 row(s) repeat an earlier row's file and caption exactly and were dropped (first: line 4 repeats " \
           "line 2)" in capsys.readouterr().out
