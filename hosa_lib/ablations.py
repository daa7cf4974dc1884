"""Ablation grid: declared variants x seeds, each trained and evaluated through the library.

A grid file (params/ablations/*.yaml) lists `variants: [{name, overrides, only}]` and optionally
`seeds` and `common` (overrides of every variant). `only: [global]` keeps the named scoring terms and
switches every other registered term off, so a term added later is off in that variant too. Every cell is an ordinary run folder keyed by its params hash, so re-running trains and
evaluates only the cells that are missing; a cell with the run's own weights key is the run's own
folder (not trained twice); results are collected into one tidy CSV.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pandas as pd

from .config import TERMS, ConfigError, RunConfig, check_gates, deep_merge, override, read_yaml
from .evaluate import evaluate_checkpoint
from .metrics import HEADLINE
from .provenance import STALE_NOTE, fingerprint, is_current, keep_stale, running_code
from .store import Store
from .runs import format_seconds, log_progress, run_dir_for, weights_key
from .scoring import gated_terms
from .train import train


def read_grid(path) -> tuple[list[dict], list[int] | None]:
    """A grid file's variants (each {name, overrides}, `common` merged into every variant's overrides,
    `only` turned into weights) and its seeds (None: the run's own ablation.seeds)."""
    raw = read_yaml(Path(path)) or {}
    unknown = set(raw) - {"variants", "seeds", "common"}
    if unknown:
        raise ConfigError(f"{path}: unknown key '{sorted(unknown)[0]}' (expected variants, seeds, common)")
    common = dict(raw.get("common") or {})
    common_only = common.pop("only", None)
    variants = []
    for v in raw.get("variants") or []:
        if not isinstance(v, dict) or set(v) - {"name", "overrides", "only"} or "name" not in v:
            raise ConfigError(f"{path}: each variant needs 'name' and optional 'overrides' and 'only', got {v}")
        over = deep_merge(common, v.get("overrides") or {})
        only = v.get("only", common_only)
        if only is not None:
            over = deep_merge(over, {"scoring": only_weights(only, over.get("scoring") or {},
                                                             f"{path}: variant {v['name']}")})
        variants.append({"name": v["name"], "overrides": over})
    return variants, raw.get("seeds")


def only_weights(only, scoring: dict, where: str) -> dict:
    """`only: [global]` -> {w_high: 0.0, w_local: 0.0}: every registered term not named is switched off
    (terms added later included); the named terms keep their weights. Names are checked against the
    term registry (config.TERMS)."""
    names = tuple(TERMS.loaded())
    if not isinstance(only, list) or not only or not all(isinstance(n, str) for n in only):
        raise ConfigError(f"{where}: 'only' = {only!r}: expected a non-empty list of scoring terms from {names}")
    if bad := [n for n in only if n not in names]:
        raise ConfigError(f"{where}: 'only' names '{bad[0]}': expected scoring terms from {names}")
    off = {TERMS[n].weight: 0.0 for n in names if n not in only}
    if clash := [w for w in off if scoring.get(w, 0.0) != 0.0]:
        raise ConfigError(f"{where}: 'only' = {only} switches off {clash[0]}, which its overrides set to "
                          f"{scoring[clash[0]]}")
    return off


def cell_inputs(cfg: RunConfig) -> dict:
    """What a cell's cached result was computed from besides its params (the folder's key) and its
    code: the store build it read."""
    with Store(cfg.data.store, check_values=False) as s:
        ident = s.identity()
    return {"store": {k: ident[k] for k in ("source_digest", "uid")}}


def cached_cell(path: Path, inputs: dict) -> dict | None:
    """A cell's cached result when it was computed from `inputs`, by the code there is now, from the
    best.pt there is now; with only its code changed and HOSA_KEEP_STALE set, marked 'computed by other
    code'. None: compute it."""
    if not path.is_file():
        return None
    res = json.loads(path.read_text())
    if res.get("inputs") != inputs or res.get("checkpoint") != fingerprint(path.parent / "checkpoints" / "best.pt"):
        return None  # another store build, or trained again since (or best.pt gone)
    if is_current(res.get("code")):
        return {**res, "cached": True}
    return {**res, "cached": True, "stale": STALE_NOTE} if keep_stale() else None


def run_cell(cfg: RunConfig, progress: bool = False, fresh: bool = False, echo=None) -> dict:
    """Train (or reuse) and evaluate one configuration; results cached in its run folder together with
    what they were computed from (`cell_inputs`): other code or another store build computes the cell
    again (its training starts over, `train.recover`); fresh=True always does. steps_per_s is the
    run's own training speed (all its epochs, resumes included; NaN without a step), also for a cell
    that reuses a finished run. echo: (folder, prefix) where training's progress lines also go."""
    run_dir = run_dir_for(cfg)
    cached, inputs = run_dir / "ablation_result.json", cell_inputs(cfg)
    hit = None if fresh else cached_cell(cached, inputs)
    if hit is not None:
        return hit
    load0 = os.getloadavg()[0]
    res = train(cfg, run_dir, progress=progress, fresh=fresh, echo=echo)
    t_train = res["train_seconds"]
    if echo:
        log_progress(echo[0], f"{echo[1]}evaluating {cfg.eval.split}")
    ev = evaluate_checkpoint(cfg, run_dir / "checkpoints" / "best.pt", progress=False, cache=not fresh)
    m = dict(ev["metrics"])
    if cfg.scoring.gates:  # the weights training gave the local terms (gates folded in)
        m.update({f"{t.weight}_learned": getattr(ev["cfg"].scoring, t.weight) for t in gated_terms()})
    # machine load while the cell trained: timings of cells run under different load do not compare
    out = {**m, "train_seconds": t_train, "steps": res["steps"],
           "steps_per_s": res["steps"] / t_train if res["steps"] and t_train > 0 else float("nan"),
           "load_avg": (load0 + os.getloadavg()[0]) / 2, "run_dir": str(run_dir)}
    tmp = cached.with_name(f".{cached.name}.tmp")
    ck = fingerprint(run_dir / "checkpoints" / "best.pt")
    tmp.write_text(json.dumps({**out, "inputs": inputs, "checkpoint": ck, "code": running_code()}, indent=2))
    os.replace(tmp, cached)
    return out


def cell_config(cfg: RunConfig, variant: dict, seed: int, grid_path) -> RunConfig:
    """The config of one grid cell: the run's own with the variant's overrides and the seed; a variant
    that does not fit the config (e.g. one the recipe's term gates reject) fails here, naming it."""
    over = dict(variant.get("overrides") or {})
    over["train"] = {**over.get("train", {}), "seed": seed}
    over["name"] = f"{cfg.name}-abl-{variant['name']}"
    where = f"{grid_path}: variant {variant['name']}"
    cell = override(cfg, over, where)
    try:
        check_gates(cell.scoring)  # the term registry's rule, checked for every cell before any cell trains
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    return cell


def run_grid(cfg: RunConfig, grid_path=None, seeds=None, out_csv=None, progress: bool = True,
             fresh: bool = False) -> pd.DataFrame:
    from tqdm import tqdm

    variants, grid_seeds = read_grid(grid_path or cfg.ablation.grid)
    seeds = list(seeds or grid_seeds or cfg.ablation.seeds)
    cells = [(v, s, cell_config(cfg, v, s, grid_path or cfg.ablation.grid)) for v in variants for s in seeds]
    rows = []  # every cell's config was built (and checked) above, before any cell trains
    for n, (v, seed, cell_cfg) in enumerate(tqdm(cells, desc="ablation grid", disable=not progress), start=1):
        t0 = time.perf_counter()
        # a cell that trains exactly the run's own weights (e.g. `hosa` with no overrides) is the run itself:
        # its folder is reused, not trained again under another name
        own = weights_key(cell_cfg) == weights_key(cfg)
        echo = (Path(out_csv).parent, f"cell {n}/{len(cells)} {v['name']} seed {seed}: ") if out_csv else None
        res = run_cell(cfg if own else cell_cfg, fresh=fresh and not own, echo=echo)  # --force retrains the run in train
        for k in ("inputs", "checkpoint", "code"):
            res.pop(k, None)
        cached = res.pop("cached", False)
        rows.append({"variant": v["name"], "seed": seed, **res})
        if out_csv:  # one progress line per cell into the run folder holding the table
            log_progress(Path(out_csv).parent, f"ablation cell {n}/{len(cells)} {v['name']} seed {seed}: rsum "
                         f"{res['rsum']:.1f}, {format_seconds(time.perf_counter() - t0)}"
                         + (f" (cached, {res['stale']})" if res.get("stale") else " (cached)" if cached else ""))
    df = pd.DataFrame(rows)
    if out_csv:
        Path(out_csv).parent.mkdir(parents=True, exist_ok=True)
        df.to_csv(out_csv, index=False)
    return df


def baseline(cfg: RunConfig) -> dict:
    """The ridge-map reference row (`hosa_lib.baseline`) on the config's store and eval split."""
    from .baseline import ridge_baseline
    from .text import cache_key

    res = ridge_baseline(cfg.data.store, cache_key(cfg.data.text_model, cfg.data.text_layer), cfg.eval.split,
                         ndcg_k=cfg.eval.ndcg_k, ties=cfg.eval.ties)
    return {"variant": f"ridge baseline (lambda {res['lambda']:g})", **res["metrics"], "train_seconds": res["seconds"]}


def summarize(df: pd.DataFrame, base: dict | None = None) -> pd.DataFrame:
    """Mean (and, with several seeds, sd) per variant of the headline metrics and training speed.
    `speed not comparable (busier machine)` flags variants whose cells trained under a machine load 1
    or more above the grid's lowest: their steps/s do not compare. Values print without a sign on 0."""
    cols = [c for c in (*HEADLINE, *(f"{t.weight}_learned" for t in gated_terms()), "steps_per_s") if c in df]
    several = df.groupby("variant", sort=False).size().max() > 1
    agg = df.groupby("variant", sort=False)[cols].agg(["mean", "std"] if several else ["mean"])
    agg.columns = [f"{a} {b}" if several else a for a, b in agg.columns]
    if "stale" in df and df["stale"].notna().any():  # kept by HOSA_KEEP_STALE: said beside the variant
        agg[STALE_NOTE] = df.groupby("variant", sort=False)["stale"].apply(lambda s: s.notna().any())
    if "load_avg" in df:
        agg["speed not comparable (busier machine)"] = \
            df.groupby("variant", sort=False)["load_avg"].max() >= df["load_avg"].min() + 1
    if base is not None:  # the reference row: no seeds, no training
        row = {c: base.get(c.removesuffix(" mean")) for c in agg.columns if not c.endswith(" std")}
        agg.loc[base["variant"]] = pd.Series(row)
    num = agg.select_dtypes("number").columns
    agg[num] = agg[num].round(2) + 0.0  # + 0.0 turns -0.0 (a learned weight rounded to 0) into 0.0
    return agg


def summary_table(df: pd.DataFrame, base: dict | None = None):
    """`summarize` for a report: "—" where a value does not apply (a variant without learned gates, a
    0-epoch variant's speed, the baseline's training columns), explained in the caption."""
    agg = summarize(df, base)
    several = df.groupby("variant").size().max() > 1
    caption = ("mean ± sd over seeds" if several else "one seed per variant") + \
        "; — : does not apply (no learned gate, no training step, or the closed-form baseline)"
    return agg.style.format(precision=2, na_rep="—").set_caption(caption)
