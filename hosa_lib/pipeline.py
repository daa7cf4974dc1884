"""Headless notebook pipeline: `python -m hosa_lib.pipeline PARAMS [--stages ...] [--force]`.

Executes 00_prepare_data -> 10_train -> 20_evaluate -> 30_ablations with papermill, each kernel
started in notebooks/ exactly as JupyterLab starts it, after checking every parameter against
the notebook's declared ones. Writes executed notebooks, self-contained HTML (inputs hidden) and
an index page into the run folder, and prints one line per stage, per epoch and per ablation cell.

A stage is up to date when it finished after its inputs last changed, as make/DVC decide: its
marker `.<stage>.done` is removed when it starts and written last, and holds a digest of what
the stage reads — the params it depends on (`stage_params`), the source files of the data (prepare:
the captions file and image folder, as `prepare` itself sees them), the store (and for evaluation the
checkpoint) —, the digest of the code it runs (its notebook's cells and every `hosa_lib` module the
notebook imports, transitively, committed or not: `provenance.code_digest`), and the fingerprints of
the files it wrote (a deleted best.pt makes training run again). Re-preparing the store therefore
re-runs training and evaluation downstream; an edit of `scoring.py` re-runs the stages whose code
imports it. `--keep-stale` skips stages whose only change is their code, marked in the index.
"""
from __future__ import annotations

if __name__ == "__main__":  # answer --help and usage errors before torch loads
    from hosa_lib.cli import early
    early("pipeline")

import datetime as _dt
import html
import json
import sys
import threading
import time
from pathlib import Path

from . import code_version
from .cli import STAGES
from .provenance import (KEEP_STALE_ENV, STALE_NOTE, closure, current_code, fingerprint, is_current, notebook_digest,
                         notebook_modules)
from .config import find_params, load, project_root
from .metrics import report_keys
from .runs import PROGRESS_LOG, digest as _digest, portable_config, run_dir_for

# papermill and nbconvert read notebooks through nbformat, which validates them with jsonschema; its format
# checkers import `rfc3987_syntax` when installed (Jupyter's jsonschema[format-nongpl] extra installs it),
# and that module compiles ~40 Lark grammars on import: 2 s of every pipeline command on 2 cores
# (python-jsonschema/jsonschema#1428). No notebook schema uses the `iri` formats it checks, so this process
# goes without it: None in sys.modules makes its import an ImportError, which jsonschema skips.
sys.modules.setdefault("rfc3987_syntax", None)

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = REPO / "notebooks"


class PipelineError(RuntimeError):
    pass


def check_parameters(notebook: Path, parameters: dict) -> None:
    import papermill as pm

    declared = pm.inspect_notebook(str(notebook))
    unknown = sorted(set(parameters) - set(declared))
    if unknown:
        raise PipelineError(f"{notebook.name}: unknown parameter '{unknown[0]}' "
                            f"(declared: {', '.join(sorted(declared))})")


def to_html(executed: Path, out: Path, hide_input: bool = True) -> None:
    import nbformat
    from nbconvert import HTMLExporter

    exporter = HTMLExporter(exclude_input=hide_input, exclude_input_prompt=hide_input,
                            exclude_output_prompt=hide_input)
    body, _ = exporter.from_notebook_node(nbformat.read(executed, as_version=4))
    out.write_text(body)


def stage_params(name: str, cfg) -> dict:
    """The params a stage's outputs depend on: prepare the data section (not `force`), train what
    changes the weights, evaluate those plus `eval.*`; the ablations stage everything. Changing
    e.g. `train.workers` or `eval.ties` therefore re-runs only the stages it affects."""
    from .runs import weights_config
    full = portable_config(cfg)
    if name == "prepare":
        return {k: v for k, v in full["data"].items() if k != "force"}
    if name == "train":
        return weights_config(cfg)
    if name == "evaluate":
        return {"weights": weights_config(cfg), "eval": full["eval"]}
    return full


def stage_digest(name: str, cfg, run_dir: Path) -> str:
    """Digest of the data and params a stage reads (its code apart: `stage_code`)."""
    inputs = {"params": stage_params(name, cfg)}
    if name == "prepare":  # what prepare sees: the source files (an edited captions CSV or image folder)
        from .prepare import source_digest
        inputs["source"] = source_digest(cfg.data) if cfg.data.source != "store" else fingerprint(Path(cfg.data.store))
    else:
        inputs["store"] = fingerprint(Path(cfg.data.store))
    if name == "evaluate":
        inputs["checkpoint"] = fingerprint(run_dir / "checkpoints" / "best.pt")
    return _digest(inputs)


def stage_code(name: str, run_dir: Path, notebook: str) -> str:
    """The marker's code line: the notebook's digest (taken when the stage started) and the hosa_lib
    modules the stage's kernel loaded with the digest of their source as it ran (`.<stage>.code.json`,
    written by `runs.write_metrics`; without it, the static import closure of the notebook's imports)."""
    rec_file = run_dir / f".{name}.code.json"
    if rec_file.is_file():
        rec = json.loads(rec_file.read_text())
    else:
        rec = {"modules": current_code(closure(notebook_modules(NOTEBOOKS / f"{STAGES[name]}.ipynb")))}
    return "code " + json.dumps({"notebook": notebook, "modules": rec["modules"]}, sort_keys=True)


def code_is_current(line: str, name: str) -> bool:
    """The marker's code line still describes the code: same notebook cells, same module sources."""
    try:
        rec = json.loads(line.removeprefix("code "))
    except json.JSONDecodeError:
        return False
    return rec.get("notebook") == notebook_digest(NOTEBOOKS / f"{STAGES[name]}.ipynb") and is_current(rec)


def stage_outputs(name: str, cfg, run_dir: Path) -> list[Path]:
    """The files a stage's marker stands for: its metrics file, and the store (prepare) or best.pt (train)."""
    out = [run_dir / f"{name}_metrics.json", run_dir / f"{STAGES[name]}.ipynb"]
    if name == "prepare":
        out.append(Path(cfg.data.store))
    if name == "train":
        out.append(run_dir / "checkpoints" / "best.pt")
    return out


def marker_text(name: str, cfg, run_dir: Path, digest: str, code: str) -> str:
    """What a finished stage's marker holds: the digest of its inputs, its code line (`stage_code`) and
    the fingerprints of its outputs, so a marker whose store or best.pt was deleted or replaced since is
    not up to date. The metrics file and executed notebook count by presence only: opening the notebook
    in JupyterLab and running it with the same params rewrites them (new timings), which is no reason to
    redo the stage."""
    def mark(p: Path) -> str:
        if p.suffix in (".json", ".ipynb"):
            return f"{p.name}:{'present' if p.exists() else 'missing'}"
        return fingerprint(p)
    return "\n".join([digest, code] + [mark(p) for p in stage_outputs(name, cfg, run_dir)])


def up_to_date(name: str, stamp: Path, cfg, run_dir: Path, digest: str, keep_stale: bool) -> str | None:
    """'current' when the stage's marker says it ran on these inputs and this code, 'other code' when
    only its code changed and keep_stale allows that, else None (the stage runs)."""
    if not stamp.is_file():
        return None
    have = stamp.read_text().strip().splitlines()
    if len(have) < 2:
        return None
    want = marker_text(name, cfg, run_dir, digest, have[1]).splitlines()
    if have != want:
        return None
    if code_is_current(have[1], name):
        return "current"
    return "other code" if keep_stale else None


class _Tail(threading.Thread):
    """Prints lines appended to the run's progress log while a stage runs (the HTML stays clean)."""

    def __init__(self, path: Path, prefix: str):
        super().__init__(daemon=True)
        self.path, self.prefix, self.stop = path, prefix, threading.Event()
        self.pos = path.stat().st_size if path.exists() else 0

    def poll(self) -> None:
        if self.path.exists():
            with self.path.open() as fh:
                fh.seek(self.pos)
                for line in fh:
                    print(f"{self.prefix}{line.rstrip()}", flush=True)
                self.pos = fh.tell()

    def run(self):
        while not self.stop.wait(2.0):
            self.poll()


def run_stage(name: str, params_path: Path, cfg, run_dir: Path, force: bool, keep_stale: bool = False) -> dict:
    import papermill as pm

    nb = NOTEBOOKS / f"{STAGES[name]}.ipynb"
    executed = run_dir / f"{STAGES[name]}.ipynb"
    stamp = run_dir / f".{STAGES[name]}.done"
    digest, notebook = stage_digest(name, cfg, run_dir), notebook_digest(nb)
    state = None if force else up_to_date(name, stamp, cfg, run_dir, digest, keep_stale)
    if state:
        return {"stage": name, "skipped": True, **({"stale": STALE_NOTE} if state == "other code" else {})}
    parameters = {"params": str(params_path), "run_dir": str(run_dir)}
    if name != "prepare":  # --force: train anew, recompute embeddings and ablation cells
        parameters["fresh"] = force
    check_parameters(nb, parameters)
    stamp.unlink(missing_ok=True)  # a stage killed from here on is not up to date
    (run_dir / f".{name}.code.json").unlink(missing_ok=True)  # written anew by the stage's kernel
    t0 = time.perf_counter()
    tail = _Tail(run_dir / PROGRESS_LOG, f"[pipeline]   {STAGES[name]}: ")
    tail.start()
    try:
        pm.execute_notebook(str(nb), str(executed), parameters=parameters, kernel_name="python3",
                            cwd=str(NOTEBOOKS), progress_bar=False, log_output=False,
                            extra_arguments=["--IPKernelApp.log_level=CRITICAL"])  # quiet kernel: no TCP notice, no shutdown noise
    except pm.PapermillExecutionError as e:
        raise PipelineError(f"{nb.name} failed in cell In [{e.exec_count}] ({e.ename}: {e.evalue}); "
                            f"executed notebook kept at {executed}") from None
    except KeyboardInterrupt:  # the hint the notebook holds, said in the terminal
        raise KeyboardInterrupt(
            f"interrupted in {nb.name}; run the same command again to resume: finished stages are skipped, "
            f"training resumes from {run_dir / 'checkpoints' / 'last.pt'}, a store build and its text cache from "
            "their partial files, an ablation grid at its first unfinished cell") from None
    finally:
        tail.stop.set()
        tail.join()
        tail.poll()
    to_html(executed, run_dir / f"{STAGES[name]}.html")
    seconds = time.perf_counter() - t0
    code = stage_code(name, run_dir, notebook)
    stamp.write_text(marker_text(name, cfg, run_dir, digest, code))  # last: the stage is complete
    record = {"seconds": round(seconds, 1), "code_version": code_version(),
              "finished": _dt.datetime.now().isoformat(timespec="seconds")}
    history = run_dir / "stages.json"
    stages = json.loads(history.read_text()) if history.is_file() else {}
    history.write_text(json.dumps({**stages, name: record}, indent=2))
    return {"stage": name, "skipped": False, **record}


def describe_run(cfg, run_dir: Path | None = None) -> str:
    """One line saying what a run is: data (with its split sizes once the store exists), model and
    scoring, training (as it went, once trained: early stops said), evaluation protocol."""
    from .scoring import active_terms, uses_bands  # lazily: torch is not needed to drive the notebooks
    d, m, sc = cfg.data, cfg.model, cfg.scoring
    data = {"synthetic": "synthetic scenes", "images": f"images of the folder {'/'.join(Path(d.root).parts[-2:]) or '(data.root unset)'}",
            "teran": f"{d.dataset.upper()} in TERAN's layout", "scan": "SCAN precomputed features",
            "store": f"store {Path(d.store).name}"}[d.source]
    try:
        from .store import Store
        with Store(d.store, check_values=False) as st:
            sizes = [len(st.split_images(x)) for x in ("train", "val", "test")]
            data = f"{st.n_images:,} {data} (train / val / test {' / '.join(f'{n:,}' for n in sizes)})"
            if fe := st.attrs.get("feature_extractor"):  # what a region is: map, boxes or grid, image size
                data += f", regions: {fe}"
    except Exception:  # no store yet (the index before prepare has run)
        data = f"{data} ({d.n_images} images)" if d.source == "synthetic" else data
    terms = "+".join(t.name for t in active_terms(sc))
    model = f"{m.arch.upper()} embed {m.embed}, scoring {terms or 'none'}" + (f" (G={sc.bands})" if uses_bands(sc) else "")
    trained = f"{cfg.train.epochs} epochs"
    res = run_dir / "train_metrics.json" if run_dir else None
    if res and res.is_file():
        r = json.loads(res.read_text())
        if "epochs_run" in r:
            best = "the untrained start" if r.get("best_epoch", 0) < 0 else f"epoch {r['best_epoch'] + 1}"
            trained = (f"trained {r['epochs_run']} of {r['epochs']} epochs (stopped early; best on val: {best})"
                       if r["epochs_run"] < r["epochs"] else f"trained {r['epochs']} epochs (best on val: {best})")
    return (f"{data}; {model}; text {d.text_model} layer {d.text_layer}; {trained}; "
            f"evaluated on {cfg.eval.split}, ties {cfg.eval.ties}")


def metrics_table(run_dir: Path) -> str:
    """The run's test metrics beside the ridge baseline of the same store and split (from the ablations
    stage, which computes it) and their difference."""
    metrics = run_dir / "evaluate_metrics.json"
    if not metrics.is_file():
        return ""
    m = json.loads(metrics.read_text())
    abl = run_dir / "ablations_metrics.json"
    base = json.loads(abl.read_text()).get("baseline") if abl.is_file() else None
    keep = report_keys(m)
    head = "<tr><th>metric</th><th>this run</th>"
    if base:
        head += f"<th>{html.escape(base['variant'])}</th><th>run − baseline</th>"
    rows = []
    for k in keep:
        row = f"<tr><td>{html.escape(k)}</td><td>{m[k]:.2f}</td>"
        if base:
            b = base.get(k)
            row += (f"<td>{b:.2f}</td><td>{m[k] - b + 0.0:+.2f}</td>" if isinstance(b, (int, float))
                    else "<td></td><td></td>")
        rows.append(row + "</tr>")
    note = "" if base else "<p>(the ridge baseline appears here once the ablations stage has run)</p>"
    return f"<table>{head}</tr>{''.join(rows)}</table>{note}"


def write_index(run_dir: Path, cfg, params_path: Path, results: list[dict]) -> Path:
    rows = [f'<li><a href="{stem}.html">{stem}</a></li>' for stem in STAGES.values()
            if (run_dir / f"{stem}.html").is_file()]
    table = metrics_table(run_dir)
    history = json.loads((run_dir / "stages.json").read_text()) if (run_dir / "stages.json").is_file() else {}
    now = {r["stage"]: r for r in results}
    timing = []
    for name, stem in STAGES.items():
        if name not in history:
            continue
        h = history[name]
        note = " — up to date, skipped in the latest run" if now.get(name, {}).get("skipped") else ""
        if now.get(name, {}).get("stale"):
            note = f" — {STALE_NOTE}: its code changed since, kept by --keep-stale"
        timing.append(f"<tr><td>{stem}</td><td>{h['seconds']:.0f} s</td><td>{html.escape(h['finished'])}</td>"
                      f"<td><code>{html.escape(h['code_version'])}</code></td><td>{note}</td></tr>")
    try:
        shown = params_path.relative_to(project_root())
    except ValueError:
        shown = params_path.name
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>HOSA run {html.escape(cfg.name)}</title>"
            "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}td,th{padding:0 1em}</style></head><body>"
            f"<h1>HOSA run {html.escape(cfg.name)}</h1><p>{html.escape(describe_run(cfg, run_dir))}</p>"
            f"<p>params: <code>{html.escape(str(shown))}</code>; run folder <code>{html.escape(run_dir.name)}</code> "
            f"(named by the params that change the weights)</p><h2>Reports</h2><ul>{''.join(rows)}</ul>"
            f"<h2>Test metrics</h2>{table or '<p>(no evaluation yet)</p>'}"
            "<h2>Stages (last real run of each)</h2><table><tr><th>stage</th><th>time</th><th>finished</th>"
            f"<th>code version</th><th></th></tr>{''.join(timing)}</table></body></html>")
    out = run_dir / "index.html"
    out.write_text(page)
    return out


def run(params: str, stages=None, force: bool = False, keep_stale: bool = False) -> Path:
    import os

    params_path = find_params(params).resolve()
    cfg = load(params_path)
    if keep_stale:  # the notebooks' kernels inherit it: checkpoints and ablation cells of other code are kept too
        os.environ[KEEP_STALE_ENV] = "1"
    run_dir = run_dir_for(cfg).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for name in stages or list(STAGES):
        if name not in STAGES:
            raise PipelineError(f"unknown stage '{name}' (stages: {', '.join(STAGES)})")
        print(f"[pipeline] {STAGES[name]} ...", flush=True)
        res = run_stage(name, params_path, cfg, run_dir, force, keep_stale)
        results.append(res)
        done = f"{res['seconds']:.0f} s" if not res["skipped"] else \
            f"{STALE_NOTE}, kept (--keep-stale)" if res.get("stale") else "up to date, skipped"
        print(f"[pipeline] {STAGES[name]}: {done}", flush=True)
        write_index(run_dir, cfg, params_path, results)
    return run_dir / "index.html"


def main(argv=None) -> int:
    from .cli import run as run_cli

    def go(args):
        try:
            index = run(args.params, args.stages, args.force, args.keep_stale)
        except PipelineError as e:
            print(f"pipeline error: {e}", file=sys.stderr)
            return 1
        print(f"[pipeline] report: {index}")
    return run_cli("pipeline", go, argv)


if __name__ == "__main__":
    sys.exit(main())
