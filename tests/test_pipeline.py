import json
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


def test_all_notebooks_found():
    assert [p.stem for p in NOTEBOOKS] == ["00_prepare_data", "10_train", "20_evaluate", "30_ablations", "40_explore"]


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_conventions(nb):
    """Lints what git stores: the notebook as the nbstripout filter (and the save hook) clean it, so a
    notebook someone just ran in JupyterLab is judged by its committed form."""
    from hosa_lib.notebook_hooks import strip_on_save
    model = {"type": "notebook", "content": nbformat.read(nb, as_version=4)}
    strip_on_save(model, f"notebooks/{nb.name}")
    cells = model["content"].cells
    code = [c for c in cells if c.cell_type == "code"]
    assert "parameters" in code[0].metadata.get("tags", []), "first code cell must be tagged 'parameters'"
    src = "\n".join(c.source for c in code)
    assert not re.search(r"^\s*(def|class)\s", src, re.M), "notebooks hold no def/class"
    assert sum(len(c.source.splitlines()) for c in code) < 120
    assert "write_metrics" in code[-1].source, "last cell writes the stage's metrics json"
    # no data wrangling in cells: pandas reshaping, regexes, loops and path arithmetic live in hosa_lib
    for pattern in (r"\.melt\(", r"\.str\.", r"\.groupby\(", r"^\s*for\s", r"^\s*import (re|pandas|numpy)",
                    r"from pathlib", r"np\.", r"pd\."):
        assert not re.search(pattern, src, re.M), f"notebook logic: {pattern}"


def test_committed_notebooks_have_no_outputs_and_git_strips_them():
    """The blobs git holds carry no outputs or run metadata, and .gitattributes routes notebooks through
    nbstripout (configured by `make setup`)."""
    import json
    assert "*.ipynb filter=nbstripout" in (REPO / ".gitattributes").read_text()
    ls = subprocess.run(["git", "ls-files", "-s", "notebooks"], capture_output=True, text=True, cwd=REPO)
    if ls.returncode != 0 or not ls.stdout.strip():
        pytest.skip("not a git checkout")
    for line in ls.stdout.splitlines():
        sha, path = line.split()[1], line.split("\t")[1]
        blob = json.loads(subprocess.run(["git", "cat-file", "-p", sha], capture_output=True, text=True,
                                         cwd=REPO).stdout)
        code = [c for c in blob["cells"] if c["cell_type"] == "code"]
        assert all(not c["outputs"] and c["execution_count"] is None for c in code), path
        assert set(blob["metadata"]) == {"kernelspec"}, path


def test_save_hook_strips_outputs_of_project_notebooks_only():
    from hosa_lib.notebook_hooks import strip_on_save
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("1", execution_count=3, outputs=[
        nbformat.v4.new_output("stream", text="x")])], metadata={"language_info": {"name": "python", "version": "3"}})
    elsewhere = {"type": "notebook", "content": nbformat.from_dict(nb)}
    strip_on_save(elsewhere, "scratch/mine.ipynb")
    assert elsewhere["content"].cells[0].outputs  # a user's own notebook keeps its outputs
    model = {"type": "notebook", "content": nbformat.from_dict(nb)}
    strip_on_save(model, "notebooks/00_prepare_data.ipynb")
    cell = model["content"].cells[0]
    assert cell.outputs == [] and cell.execution_count is None and "language_info" not in model["content"].metadata


def test_pipeline_rejects_unknown_parameter(tmp_path):
    from hosa_lib.pipeline import PipelineError, check_parameters
    with pytest.raises(PipelineError, match="unknown parameter 'epochz'"):
        check_parameters(REPO / "notebooks" / "10_train.ipynb", {"params": "x", "epochz": 3})


@pytest.mark.slow
def test_smoke_pipeline_end_to_end(smoke_project):
    """The whole notebook pipeline through papermill on tiny synthetic data, run from another folder;
    relative paths land in the project; a second run skips every stage."""
    root, proc = smoke_project
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "IPKernelApp" not in proc.stderr and "epoch 2/2" in proc.stdout and "ablation cell 2/2" in proc.stdout
    index = Path(proc.stdout.strip().splitlines()[-1].split("report: ")[1])
    run = index.parent
    assert run.parent == root / "outputs" and (root / "outputs" / "data" / "synthetic_smoke.h5").is_file()
    page = index.read_text()
    for stem in ("00_prepare_data", "10_train", "20_evaluate", "30_ablations"):
        assert f'href="{stem}.html"' in page and (run / f"{stem}.html").stat().st_size > 10_000
    # the index says what the run is and puts the ridge baseline beside its metrics
    assert "<h1>HOSA run demo</h1>" in page and "80 synthetic scenes (train / val / test " in page and "trained 2 epochs" in page
    assert "<th>ridge baseline (lambda" in page and "run − baseline" in page
    m = json.loads((run / "evaluate_metrics.json").read_text())
    assert m["rsum"] == pytest.approx(sum(m[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10)))
    assert 0 <= m["swap_acc"] <= 100 and 0 < m["t2i_ndcg_rougeL"] <= 1
    # the report's numbers are the library's: evaluating the run's checkpoint directly gives the same
    from hosa_lib.config import load
    from hosa_lib.evaluate import evaluate_checkpoint
    direct = evaluate_checkpoint(load(root / "params" / "demo.yaml"), run / "checkpoints" / "best.pt",
                                 progress=False)["metrics"]
    assert {k: direct[k] for k in m if "seconds" not in k} == {k: v for k, v in m.items() if "seconds" not in k}
    import pandas as pd
    df = pd.read_csv(run / "ablations.csv")
    assert list(df.variant) == ["hosa", "global_only"] and list(df.seed) == [0, 0]
    hosa = df[df.variant == "hosa"].iloc[0]
    assert hosa.rsum == pytest.approx(m["rsum"])  # the grid's `hosa` cell is the run's own configuration
    assert "<img" in (run / "20_evaluate.html").read_text()  # seaborn figures embedded
    for stem in ("00_prepare_data", "10_train", "20_evaluate", "30_ablations"):  # shared reports: no local paths
        assert str(root) not in (run / f"{stem}.html").read_text(), stem
    again = subprocess.run([sys.executable, "-m", "hosa_lib.pipeline", str(root / "params" / "demo.yaml")],
                           capture_output=True, text=True)
    assert again.returncode == 0 and again.stdout.count("up to date, skipped") == 4
    assert again.stdout.count("[pipeline]   ") == 0  # nothing ran
    assert "up to date, skipped in the latest run" in index.read_text() and " s</td>" in index.read_text()


@pytest.mark.slow
def test_notebooks_run_as_jupyterlab_opens_them(smoke_project):
    """Each notebook executed cell by cell as JupyterLab runs it: kernel started in notebooks/,
    default parameters only (no injection), after the pipeline has produced the run."""
    import nbformat
    from nbclient import NotebookClient
    root, proc = smoke_project
    assert proc.returncode == 0, proc.stderr
    runs_before = sorted(p.name for p in (root / "outputs").iterdir())
    for path in sorted((root / "notebooks").glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        client = NotebookClient(nb, kernel_name="python3", timeout=300,
                                resources={"metadata": {"path": str(root / "notebooks")}})
        client.execute()  # raises CellExecutionError naming the cell on any error
        kept = root / "executed_as_jupyterlab"  # each cell's start and end times in its metadata (nbclient's)
        kept.mkdir(exist_ok=True)
        nbformat.write(nb, kept / path.name)
        errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
        assert not errors, f"{path.name}: {errors}"
        last = "".join(o.get("text", "") for o in nb.cells[-1].outputs)
        assert "metrics written to" in last, f"{path.name}: {last}"
    # the notebooks found the pipeline's run (same run folders: nothing retrained elsewhere)
    assert sorted(p.name for p in (root / "outputs").iterdir()) == runs_before


@pytest.mark.slow
def test_pipeline_failure_names_notebook_and_cell(tmp_path):
    params = tmp_path / "bad.yaml"
    params.write_text(yaml.safe_dump({"base": str(Path("params/smoke.yaml").resolve()), "output_root": str(tmp_path),
                                      "data": {"source": "store", "store": str(tmp_path / "missing.h5")}}))
    proc = subprocess.run([sys.executable, "-m", "hosa_lib.pipeline", str(params), "--stages", "prepare"],
                          capture_output=True, text=True)
    assert proc.returncode == 1
    assert "00_prepare_data.ipynb failed in cell" in proc.stderr and "missing.h5" in proc.stderr
    assert list(tmp_path.glob("*/00_prepare_data.ipynb"))  # executed notebook kept for inspection


@pytest.mark.slow
def test_a_deleted_checkpoint_behind_its_marker_is_made_again(smoke_project, tmp_path):
    """The train stage's marker stands for best.pt: deleted, the stage runs again (training restores it:
    copied back from last.pt when the last epoch was the best, else trained again from the start) and
    evaluation works, instead of 'up to date, skipped' then failing."""
    import shutil
    root, proc = smoke_project
    assert proc.returncode == 0
    copy = tmp_path / "project"
    shutil.copytree(root, copy, symlinks=True)
    run = Path(proc.stdout.strip().splitlines()[-1].split("report: ")[1]).parent
    best = copy / "outputs" / run.name / "checkpoints" / "best.pt"
    best.unlink()
    again = subprocess.run([sys.executable, "-m", "hosa_lib.pipeline", str(copy / "params" / "demo.yaml"),
                            "--stages", "train", "evaluate"], capture_output=True, text=True, cwd=tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "up to date, skipped" not in again.stdout and best.is_file()


@pytest.mark.slow
def test_a_change_outside_the_weights_reruns_only_the_stages_it_affects(smoke_project, tmp_path):
    """Changing `eval.ties` (evaluation only) used to re-execute every stage, overwriting the training
    report with a 0-second 'resumed' run; now prepare and train stay up to date."""
    import shutil
    root, proc = smoke_project
    assert proc.returncode == 0
    copy = tmp_path / "project"
    shutil.copytree(root, copy, symlinks=True)
    params = copy / "params" / "demo.yaml"
    raw = yaml.safe_load(params.read_text())
    raw.setdefault("eval", {})["ties"] = "optimistic"
    params.write_text(yaml.safe_dump(raw))
    again = subprocess.run([sys.executable, "-m", "hosa_lib.pipeline", str(params), "--stages", "prepare", "train",
                            "evaluate"], capture_output=True, text=True, cwd=tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "00_prepare_data: up to date, skipped" in again.stdout and "10_train: up to date, skipped" in again.stdout
    assert "20_evaluate: up to date" not in again.stdout  # its outputs depend on eval.ties: it ran
