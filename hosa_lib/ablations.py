"""Ablation grid: declared variants x seeds, each trained and evaluated through the library.

A grid file (params/ablations/*.yaml) lists `variants: [{name, overrides}]` and optionally
`seeds`. Every cell is an ordinary run folder keyed by its params hash, so re-running trains and
evaluates only the cells that are missing; results are collected into one tidy CSV.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd
import yaml

from .config import ConfigError, RunConfig, replace
from .evaluate import evaluate_checkpoint
from .train import run_dir_for, train


def read_grid(path) -> tuple[list[dict], list[int] | None]:
    raw = yaml.safe_load(Path(path).read_text()) or {}
    unknown = set(raw) - {"variants", "seeds", "common"}
    if unknown:
        raise ConfigError(f"{path}: unknown key '{sorted(unknown)[0]}' (expected variants, seeds, common)")
    from .config import deep_merge
    variants = [{**v, "overrides": deep_merge(raw.get("common") or {}, v.get("overrides") or {})}
                for v in raw.get("variants") or []]
    for v in variants:
        if set(v) - {"name", "overrides"} or "name" not in v:
            raise ConfigError(f"{path}: each variant needs 'name' and optional 'overrides', got {v}")
    return variants, raw.get("seeds")


def run_cell(cfg: RunConfig, progress: bool = False) -> dict:
    """Train (or reuse) and evaluate one configuration; results cached in its run folder."""
    run_dir = run_dir_for(cfg)
    cached = run_dir / "ablation_result.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    t0 = time.perf_counter()
    res = train(cfg, run_dir, progress=progress)
    t_train = time.perf_counter() - t0
    m, _, _ = evaluate_checkpoint(cfg, run_dir / "checkpoints" / "best.pt", progress=False)
    out = {**m, "train_seconds": t_train, "steps": res["steps"], "run_dir": str(run_dir)}
    cached.write_text(json.dumps(out, indent=2))
    return out


def run_grid(cfg: RunConfig, grid_path=None, seeds=None, out_csv=None, progress: bool = True) -> pd.DataFrame:
    from tqdm import tqdm

    variants, grid_seeds = read_grid(grid_path or cfg.ablation.grid)
    seeds = list(seeds or grid_seeds or cfg.ablation.seeds)
    cells = [(v, s) for v in variants for s in seeds]
    rows = []
    for v, seed in tqdm(cells, desc="ablation grid", disable=not progress):
        over = dict(v.get("overrides") or {})
        over["train"] = {**over.get("train", {}), "seed": seed}
        over["name"] = f"{cfg.name}-abl-{v['name']}"
        rows.append({"variant": v["name"], "seed": seed, **run_cell(replace(cfg, over))})
    df = pd.DataFrame(rows)
    if out_csv:
        Path(out_csv).parent.mkdir(parents=True, exist_ok=True)
        df.to_csv(out_csv, index=False)
    return df


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    cols = [c for c in ("rsum", "i2t_r1", "t2i_r1", "swap_acc", "train_seconds") if c in df]
    agg = df.groupby("variant", sort=False)[cols].agg(["mean", "std"])
    agg.columns = [f"{a} {b}" for a, b in agg.columns]
    return agg.round(2)
