"""Tables and seaborn figures for the notebooks (notebooks hold no logic of their own).

Importing this module changes no global state: each figure function applies the workbench's
seaborn theme only while it draws (`themed`).
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from .metrics import CHANCE, DIRECTIONS, LABELS, PANELS, TWINS, reported_recalls
from .store import Store


def themed(fn):
    """Draw inside the workbench's seaborn style and context, leaving the global rcParams alone."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with sns.axes_style("whitegrid"), sns.plotting_context("notebook"):
            return fn(*args, **kwargs)
    return wrapper


def summary_frame(summary: dict) -> pd.DataFrame:
    return pd.DataFrame({"value": [str(v) for v in summary.values()]}, index=list(summary))


def seconds_frame(seconds: dict) -> pd.DataFrame:
    return pd.DataFrame({"seconds": [round(v, 1) for v in seconds.values()]}, index=list(seconds))


def train_summary(res: dict) -> pd.DataFrame:
    """The result of `train.train` as a small table (rounded; the last validation's metrics aside)."""
    rows = {k: (round(v, 2) if isinstance(v, float) else v) for k, v in res.items() if k != "last_val"}
    if "run_dir" in rows:  # reports are shared: the run folder's name, not this machine's path
        rows["run_dir"] = Path(rows["run_dir"]).name
    return pd.DataFrame({"value": [str(v) for v in rows.values()]}, index=list(rows))


@themed
def sample_grid(store_path, n: int = 6, split: str = "test", seed: int = 0):
    """Sample images with their region boxes and first two captions (image-folder stores only)."""
    with Store(store_path, check_values=False) as s:
        imgs = s.split_images(split)
        pick = np.random.default_rng(seed).choice(imgs, size=min(n, len(imgs)), replace=False)
        if s.image_file(int(pick[0])) is None:
            print("this store has no image files (precomputed features); nothing to show")
            return None
        cols = min(3, len(pick))  # three per row: captions stay readable in a report's width
        rows = -(-len(pick) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 5.0 * rows), squeeze=False)
        for ax in axes.flat[len(pick):]:
            ax.axis("off")
        for ax, i in zip(axes.flat, pick):
            from PIL import Image
            im = Image.open(s.image_file(int(i)))
            ax.imshow(im)
            w, h = im.size
            for x1, y1, x2, y2 in s.boxes(int(i)):
                ax.add_patch(plt.Rectangle((x1 * w, y1 * h), (x2 - x1) * w, (y2 - y1) * h, fill=False, lw=0.5,
                                           color="white", alpha=0.6))
            caps = s.captions(np.nonzero(s.caption_image == i)[0][:2])
            ax.set_title("\n".join(_wrap(c, 34) for c in caps), fontsize=10)
            ax.axis("off")
    fig.tight_layout()
    return fig


def _wrap(text: str, width: int = 40) -> str:
    import textwrap
    return "\n".join(textwrap.wrap(text, width))


def read_log(run_dir) -> tuple[pd.DataFrame, pd.DataFrame]:
    rows = [json.loads(l) for l in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if l.strip()]
    steps = pd.DataFrame([r for r in rows if "loss" in r and r.get("split") != "val"])
    val = pd.DataFrame([r for r in rows if r.get("split") == "val"])
    return steps, val


@themed
def plot_training(run_dir, smooth: int = 5):
    """Loss terms per step on a log axis (thin: logged values, thick: rolling mean of `smooth`
    points) and validation recalls per epoch, legends outside the curves."""
    steps, val = read_log(run_dir)
    fig, axes = plt.subplots(1, 2, figsize=(13, 4))
    for term, color, dash in zip(("loss", "i2t", "t2i"), sns.color_palette(n_colors=3), ("-", "--", ":")):
        axes[0].plot(steps["step"], steps[term], color=color, alpha=0.25, lw=0.8, ls=dash)
        axes[0].plot(steps["step"], steps[term].rolling(smooth, min_periods=1).mean(), color=color, lw=2, ls=dash,
                     label=term)  # dashes: i2t and t2i stay visible where they overlap
    axes[0].set_yscale("log")
    axes[0].set(title="loss terms per step (log scale)", xlabel="step", ylabel="loss")
    axes[0].legend(loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)  # outside: never over the curves
    if len(val):
        rec = val.melt(id_vars=["epoch"], value_vars=[c for c in reported_recalls() if c in val], var_name="recall")
        rec["epoch"] = rec["epoch"] + 1  # as the terminal counts: 0 = the untrained model, then epochs 1..N
        rec["direction"] = rec["recall"].str.split("_").str[0]
        rec["K"] = "R@" + rec["recall"].str.split("_r").str[-1]
        sns.lineplot(data=rec, x="epoch", y="value", hue="K", style="direction", marker="o", ax=axes[1])
        axes[1].set(title="validation recall per epoch", xlabel="epoch (0 = untrained)", ylabel="recall (%)")
        axes[1].xaxis.get_major_locator().set_params(integer=True)
        sns.move_legend(axes[1], "upper left", bbox_to_anchor=(1.01, 1), frameon=False)
    fig.tight_layout()
    return fig


def recall_frame(m: dict, base: dict | None = None):
    """R@K, medr, meanr, NDCG per direction (one row each), and the ridge baseline's rows; rsum and
    swap accuracy in a column of their own (once per model)."""
    rows, index = [], []
    for label, met in (("model", m), (base["variant"] if base else "", base)):
        if met is None:
            continue
        for d, arrow in DIRECTIONS.items():
            row = {k[len(d) + 1:]: v for k, v in met.items() if k.startswith(d + "_")}
            row["rsum"] = met["rsum"] if d == "i2t" else None
            for key in TWINS.values():
                if key in met:
                    row[LABELS[key]] = met[key] if d == "i2t" else None
            rows.append(row)
            index.append(f"{label}: {arrow}")
    return pd.DataFrame(rows, index=index).style.format(precision=3, na_rep="")


@themed
def recall_curves(scores, cap_img, kmax: int = 50):
    from .metrics import ranks
    i2t, t2i = ranks(np.asarray(scores), cap_img)
    ks = np.arange(1, kmax + 1)
    df = pd.concat([pd.DataFrame({"K": ks, "recall": [100 * (r < k).mean() for k in ks], "direction": name})
                    for name, r in (("image->text", i2t), ("text->image", t2i))])
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
    sns.lineplot(data=df, x="K", y="recall", hue="direction", ax=axes[0])
    axes[0].set_title("recall@K")
    hist = pd.concat([pd.DataFrame({"rank": r + 1, "direction": name}) for name, r in
                      (("image->text", i2t), ("text->image", t2i))])
    sns.histplot(data=hist, x="rank", hue="direction", bins=30, log_scale=(True, False), ax=axes[1],
                 stat="percent", common_norm=False, element="step", fill=False)  # each direction sums to 100 %
    axes[1].set(title="rank of the first correct item", ylabel="% of queries")
    fig.tight_layout()
    return fig


@themed
def sample_queries(n_captions: int, n: int = 3, seed: int = 0) -> list[int]:
    """n caption positions drawn without replacement (the qualitative examples of a report)."""
    return [int(q) for q in np.random.default_rng(seed).choice(n_captions, size=min(n, n_captions), replace=False)]


def top_images(store_path, split: str, scores, cap_img, queries: list[int], k: int = 4):
    """Text->image: for caption queries (split positions), the top-k images (green frame = correct)."""
    scores = np.asarray(scores)
    with Store(store_path, check_values=False) as s:
        imgs, caps = s.split_images(split), s.split_captions(split)
        qs = queries
        if s.image_file(int(imgs[0])) is None:
            return None
        fig, axes = plt.subplots(len(qs), k, figsize=(2.6 * k, 2.9 * len(qs)), squeeze=False)
        from PIL import Image
        for row, q in zip(axes, qs):
            order = np.argsort(-scores[:, q])[:k]
            row[0].set_ylabel(_wrap(s.captions([caps[q]])[0], 28), fontsize=10, rotation=0, ha="right", va="center")
            for ax, j in zip(row, order):
                ax.imshow(Image.open(s.image_file(int(imgs[j]))))
                ax.set_xticks([]); ax.set_yticks([])
                for sp in ax.spines.values():
                    sp.set_edgecolor("green" if j == cap_img[q] else "lightgray"); sp.set_linewidth(3)
                ax.set_title(f"{scores[j, q]:.2f}", fontsize=8)
    fig.tight_layout()
    return fig


@themed
def alignment_heatmap(model, cfg, split: str, image: int, caption: int, text, scoring=None):
    """Region-word cosine matrix of one pair (store image and caption indices, both in `split`) and
    its per-band high-order coefficients (up to 4 bands) in the direction(s) the scoring uses."""
    import torch

    from .data import CaptionDataset, ImageDataset, collate_captions, collate_images, to_device
    from .scoring import attention_maps
    from .text import load_tokenizer

    scoring = scoring or cfg.scoring
    ds_img, ds_cap = ImageDataset(cfg.data.store, split), CaptionDataset(cfg.data.store, split, text, with_image=False)
    ib = collate_images([ds_img[int(np.nonzero(ds_img.images == image)[0][0])]])
    cb = collate_captions([ds_cap[int(np.nonzero(ds_cap.captions == caption)[0][0])]])
    dev = next(model.parameters()).device  # the model may be on the GPU; figures are drawn from CPU arrays
    with torch.no_grad():
        vi, ci = model.encode_images(to_device(ib, dev)), model.encode_captions(to_device(cb, dev))
    vi, ci = ({k: v.cpu() for k, v in x.items()} for x in (vi, ci))
    words = ci["mask"][0]
    maps = attention_maps(vi["local"][0][vi["mask"][0]], ci["local"][0][words], scoring)
    with Store(cfg.data.store, check_values=False) as s:
        caption_text = s.captions([caption])[0]
    tok = load_tokenizer(cfg.data.text_model)
    ids = tok(caption_text, truncation=True, max_length=len(words))["input_ids"]
    pieces = [tok.convert_ids_to_tokens(ids[k]) for k in np.nonzero(words.numpy())[0] if k < len(ids)]
    labels, groups = merge_word_pieces(pieces)
    n = len(pieces)  # a caption cut by the tokenizer's limit: the columns it has labels for
    how = {"cosine": "mean", "t2i": "sum", "i2t": "mean"}  # t2i: a region's weight on a word = on its pieces
    maps = {k: merge_columns(v[..., :n], groups, how[k]) for k, v in maps.items()}
    G = scoring.bands
    shown = np.unique(np.linspace(0, G - 1, min(G, 4)).astype(int))
    panels = [(d, b) for d in ("t2i", "i2t") if d in maps for b in shown]
    fig, axes = plt.subplots(1, 1 + len(panels), figsize=(4.5 + 3 * len(panels), 4.5), squeeze=False)
    axes = axes[0]
    # every k-th region labelled (at most ~12 per axis) so tick labels never overlap; words all shown, upright
    every = max(1, -(-maps["cosine"].shape[0] // 12))
    sns.heatmap(maps["cosine"].numpy(), ax=axes[0], cmap="viridis", xticklabels=labels, yticklabels=every)
    axes[0].set_title("region-word cosine")
    axes[0].set_ylabel("region")
    for (d, b), ax in zip(panels, axes[1:]):
        sns.heatmap(maps[d][b].numpy(), ax=ax, cmap="magma", vmin=0, vmax=1, xticklabels=labels, yticklabels=False)
        ax.set_title(f"band {b}: " + ("each region over words" if d == "t2i" else "each word over regions"))
    for ax in axes:
        ax.tick_params(axis="both", labelsize=8)
        plt.setp(ax.get_xticklabels(), rotation=90)
        plt.setp(ax.get_yticklabels(), rotation=0)
    fig.suptitle(_wrap(caption_text, 100), fontsize=9)
    fig.tight_layout()
    return fig


def merge_word_pieces(pieces: list[str]) -> tuple[list[str], list[list[int]]]:
    """Word pieces -> words for display: a WordPiece continuation (`##…`) joins the word before it, and
    so does punctuation that follows a word ("sofa" "," -> "sofa,"). Returns the words and, per word,
    the positions of its pieces."""
    import unicodedata
    words, groups = [], []
    for i, p in enumerate(pieces):
        punct = bool(p) and all(unicodedata.category(c).startswith("P") for c in p)
        if words and (p.startswith("##") or punct):
            words[-1] += p[2:] if p.startswith("##") else p
            groups[-1].append(i)
        else:
            words.append(p[2:] if p.startswith("##") else p)
            groups.append([i])
    return words, groups


def merge_columns(x, groups: list[list[int]], how: str):
    """The last axis of x (a tensor or array) reduced per group of columns: "mean" or "sum"."""
    import torch
    parts = [x[..., g].mean(-1) if how == "mean" else x[..., g].sum(-1) for g in groups]
    return torch.stack(parts, -1) if isinstance(x, torch.Tensor) else np.stack(parts, -1)


def query_heatmap(ev: dict, store_path, split: str, query: int):
    """Alignment heatmap of caption `query` (split position) with its best-scoring image."""
    with Store(store_path, check_values=False) as s:
        imgs, caps = s.split_images(split), s.split_captions(split)
    best = int(np.argmax(ev["scores"][:, query]))
    return alignment_heatmap(ev["model"], ev["cfg"], split, int(imgs[best]), int(caps[query]), ev["text"])


@themed
def show_images(store_path, indices, labels, title: str = ""):
    """A row of store images (by store index) with labels."""
    from PIL import Image
    with Store(store_path, check_values=False) as s:
        if not indices or s.image_file(int(indices[0])) is None:
            return None
        fig, axes = plt.subplots(1, len(indices), figsize=(2.6 * len(indices), 3), squeeze=False)
        for ax, i, lab in zip(axes[0], indices, labels):
            ax.imshow(Image.open(s.image_file(int(i))))
            ax.set_title(lab, fontsize=8)
            ax.axis("off")
    fig.suptitle(_wrap(title, 90), fontsize=9)
    fig.tight_layout()
    plt.show()
    return fig


def recall_at_k_frame(df: pd.DataFrame) -> pd.DataFrame:
    """Tidy recall@K rows (variant, seed, direction, K, value) from an ablation table."""
    cols = [c for c in reported_recalls() if c in df]
    rec = df.melt(id_vars=["variant", "seed"], value_vars=cols, var_name="metric")
    rec["direction"] = rec.metric.str[:3]
    rec["K"] = rec.metric.str[5:].astype(int)
    return rec


@themed
def plot_ablations(df: pd.DataFrame, base: dict | None = None):
    """rsum, swap accuracy and training speed per variant (each seed a point, mean and sd; the ridge
    baseline as a dashed line), and recall@K per direction."""
    panels = [(c, LABELS[c]) for c in PANELS if c in df]
    n = len(panels) + 2  # + recall@K per direction; at most 3 panels a row, so labels stay readable
    cols = min(3, n)
    rows = -(-n // cols)
    height = max(4.0, 1.5 + 0.35 * df["variant"].nunique())  # variant names on the y axis, one line each
    fig, grid = plt.subplots(rows, cols, figsize=(5.5 * cols, height * rows), squeeze=False)
    axes = list(grid.flat)
    for ax in axes[n:]:
        ax.set_visible(False)
    for ax, (col, title) in zip(axes, panels):
        sns.pointplot(data=df, y="variant", x=col, errorbar="sd", linestyle="none", ax=ax, color="black",
                      orient="h")
        sns.stripplot(data=df, y="variant", x=col, ax=ax, alpha=0.6, orient="h")
        ax.set_title(title)
        ax.set_ylabel("")
        if col in CHANCE:
            ax.axvline(CHANCE[col], ls=":", c="gray", label="chance")
        if base is not None and col in base:
            ax.axvline(base[col], ls="--", c="firebrick", label=base["variant"])
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="best", fontsize=10)
    rec = same_curves(recall_at_k_frame(df))
    for i, (ax, d) in enumerate(zip(axes[len(panels):n], ("i2t", "t2i"))):
        sns.lineplot(data=rec[rec.direction == d], x="K", y="value", hue="variant", style="variant", marker="o",
                     ax=ax, legend=i == 0)
        ax.set_title(f"{d} recall@K")
        ax.set_ylabel("recall (%)")
        if i == 0:  # one legend for both directions (same colours)
            ax.legend(title="variant (= : identical curves)", fontsize=10, title_fontsize=10)
    seeds = df.groupby("variant")["seed"].nunique().max() if "seed" in df else 1
    fig.suptitle(f"each point one seed; black: the mean ± sd over {seeds} seeds" if seeds > 1 else
                 "one seed per variant: no spread to show (black: the value)", fontsize=11)
    fig.tight_layout()
    return fig


def same_curves(rec: pd.DataFrame) -> pd.DataFrame:
    """Variants whose recall@K values are all identical share one curve, labelled "a = b", so that a
    legend never lists lines that lie exactly on top of each other."""
    key = rec.sort_values(["direction", "K", "seed"]).groupby("variant", sort=False)["value"].apply(
        lambda v: tuple(np.round(v.to_numpy(), 6)))
    names = {}
    for variant, k in key.items():
        names.setdefault(k, []).append(variant)
    label = {v: " = ".join(group) for group in names.values() for v in group}
    keep = {group[0] for group in names.values()}
    out = rec[rec["variant"].isin(keep)].copy()
    out["variant"] = out["variant"].map(label)
    return out
