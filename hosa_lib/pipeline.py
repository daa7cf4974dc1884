"""Headless notebook pipeline: `python -m hosa_lib.pipeline PARAMS [--stages ...] [--force]`.

Executes 00_prepare_data -> 10_train -> 20_evaluate -> 30_ablations with papermill (explicit
kernel, working directory and parameters), after checking every parameter against the
notebook's declared ones. Writes executed notebooks, self-contained HTML (inputs hidden) and an
index page into outputs/<run_id>/. A stage whose outputs exist for the same params hash is
skipped unless forced; a failure exits non-zero naming the notebook and cell, and keeps the
executed notebook with the error.
"""
from __future__ import annotations

import html
import json
import sys
import time
from pathlib import Path

from .config import load, params_hash
from .train import run_dir_for

REPO = Path(__file__).resolve().parent.parent
STAGES = {"prepare": "00_prepare_data", "train": "10_train", "evaluate": "20_evaluate", "ablations": "30_ablations"}


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


def run_stage(name: str, params_path: Path, run_dir: Path, digest: str, force: bool, extra: dict | None = None) -> dict:
    import papermill as pm

    nb = REPO / "notebooks" / f"{STAGES[name]}.ipynb"
    executed = run_dir / f"{STAGES[name]}.ipynb"
    stamp = run_dir / f".{STAGES[name]}.done"
    if not force and stamp.is_file() and stamp.read_text().strip() == digest and executed.is_file():
        return {"stage": name, "skipped": True, "seconds": 0.0}
    parameters = {"params": str(params_path), "run_dir": str(run_dir), **(extra or {})}
    check_parameters(nb, parameters)
    t0 = time.perf_counter()
    try:
        pm.execute_notebook(str(nb), str(executed), parameters=parameters, kernel_name="python3",
                            cwd=str(REPO), progress_bar=False, log_output=False)
    except pm.PapermillExecutionError as e:
        raise PipelineError(f"{nb.name} failed in cell In [{e.exec_count}] ({e.ename}: {e.evalue}); "
                            f"executed notebook kept at {executed}") from None
    to_html(executed, run_dir / f"{STAGES[name]}.html")
    stamp.write_text(digest)
    return {"stage": name, "skipped": False, "seconds": time.perf_counter() - t0}


def write_index(run_dir: Path, cfg_name: str, params_path: Path, results: list[dict]) -> Path:
    rows = []
    for stem in STAGES.values():
        page = run_dir / f"{stem}.html"
        if page.is_file():
            rows.append(f'<li><a href="{stem}.html">{stem}</a></li>')
    metrics = run_dir / "evaluate_metrics.json"
    table = ""
    if metrics.is_file():
        m = json.loads(metrics.read_text())
        keep = [k for k in m if k.endswith(("_r1", "_r5", "_r10")) or k in ("rsum", "swap_acc")]
        table = "<table>" + "".join(f"<tr><td>{html.escape(k)}</td><td>{m[k]:.2f}</td></tr>" for k in keep) + "</table>"
    timing = "".join("<li>{}: {}</li>".format(r["stage"], "skipped (up to date)" if r["skipped"]
                                              else "{:.0f} s".format(r["seconds"])) for r in results)
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>HOSA run {html.escape(cfg_name)}</title>"
            "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}td{padding:0 1em}</style></head><body>"
            f"<h1>HOSA workbench run <code>{html.escape(run_dir.name)}</code></h1>"
            f"<p>params: <code>{html.escape(str(params_path))}</code></p><h2>Reports</h2><ul>{''.join(rows)}</ul>"
            f"<h2>Test metrics</h2>{table or '<p>(no evaluation yet)</p>'}<h2>Stages</h2><ul>{timing}</ul></body></html>")
    out = run_dir / "index.html"
    out.write_text(page)
    return out


def run(params: str, stages=None, force: bool = False) -> Path:
    params_path = Path(params).resolve()
    cfg = load(params_path)
    run_dir = run_dir_for(cfg).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    digest = params_hash(cfg)
    results = []
    for name in stages or list(STAGES):
        if name not in STAGES:
            raise PipelineError(f"unknown stage '{name}' (stages: {', '.join(STAGES)})")
        print(f"[pipeline] {STAGES[name]} ...", flush=True)
        res = run_stage(name, params_path, run_dir, digest, force)
        results.append(res)
        print(f"[pipeline] {STAGES[name]}: " + ("up to date, skipped" if res["skipped"] else f"{res['seconds']:.0f} s"),
              flush=True)
        write_index(run_dir, cfg.name, params_path, results)
    return run_dir / "index.html"


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("params")
    ap.add_argument("--stages", nargs="+", default=None, choices=list(STAGES))
    ap.add_argument("--force", action="store_true", help="re-run stages even if their outputs exist")
    args = ap.parse_args(argv)
    try:
        index = run(args.params, args.stages, args.force)
    except PipelineError as e:
        print(f"pipeline error: {e}", file=sys.stderr)
        return 1
    print(f"[pipeline] report: {index}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
