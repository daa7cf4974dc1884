"""Tables and seaborn figures for the notebooks (notebooks hold no logic of their own)."""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from .store import Store

sns.set_theme(style="whitegrid", context="notebook")


def write_metrics(run_dir: str, stage: str, metrics: dict) -> None:
    """The last cell of every notebook: writes <run_dir>/<stage>_metrics.json and says where."""
    if not run_dir:
        print("no run_dir: metrics not written")
        return
    out = Path(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{stage}_metrics.json"
    path.write_text(json.dumps(metrics, indent=2, default=str))
    print(f"metrics written to {path}")


def summary_frame(summary: dict) -> pd.DataFrame:
    return pd.DataFrame({"value": [str(v) for v in summary.values()]}, index=list(summary))


def sample_grid(store_path, n: int = 6, split: str = "test", seed: int = 0):
    """Sample images with their region boxes and first two captions (image-folder stores only)."""
    with Store(store_path, check_values=False) as s:
        imgs = s.split_images(split)
        pick = np.random.default_rng(seed).choice(imgs, size=min(n, len(imgs)), replace=False)
        if s.image_file(int(pick[0])) is None:
            print("this store has no image files (precomputed features); nothing to show")
            return None
        fig, axes = plt.subplots(1, len(pick), figsize=(3.2 * len(pick), 4.2))
        for ax, i in zip(np.atleast_1d(axes), pick):
            from PIL import Image
            im = Image.open(s.image_file(int(i)))
            ax.imshow(im)
            w, h = im.size
            for x1, y1, x2, y2 in s.f["images/boxes"][int(i)][: int(s.n_regions[i])]:
                ax.add_patch(plt.Rectangle((x1 * w, y1 * h), (x2 - x1) * w, (y2 - y1) * h, fill=False, lw=0.5,
                                           color="white", alpha=0.6))
            caps = s.captions(np.nonzero(s.caption_image == i)[0][:2])
            ax.set_title("\n".join(_wrap(c) for c in caps), fontsize=7)
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


def plot_training(run_dir):
    steps, val = read_log(run_dir)
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
    long = steps.melt(id_vars=["step"], value_vars=["loss", "i2t", "t2i"], var_name="term")
    sns.lineplot(data=long, x="step", y="value", hue="term", ax=axes[0])
    axes[0].set_title("loss terms per step")
    if len(val):
        rec = val.melt(id_vars=["epoch"], value_vars=[c for c in val if c.endswith(("_r1", "_r5", "_r10"))],
                       var_name="recall")
        sns.lineplot(data=rec, x="epoch", y="value", hue="recall", marker="o", ax=axes[1])
        axes[1].set_title("validation recall per epoch")
    fig.tight_layout()
    return fig


def recall_frame(m: dict) -> pd.DataFrame:
    rows = {}
    for d in ("i2t", "t2i"):
        rows[d] = {k[len(d) + 1:]: v for k, v in m.items() if k.startswith(d + "_")}
    df = pd.DataFrame(rows).T
    df["rsum"] = m["rsum"]
    return df.round(3)


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
    sns.histplot(data=hist, x="rank", hue="direction", bins=30, log_scale=(True, False), ax=axes[1])
    axes[1].set_title("rank of the first correct item")
    fig.tight_layout()
    return fig


def top_images(store_path, split: str, scores, cap_img, n_queries: int = 3, k: int = 4, seed: int = 0):
    """Text->image: for sample caption queries, the top-k images (green frame = correct)."""
    scores = np.asarray(scores)
    with Store(store_path, check_values=False) as s:
        imgs, caps = s.split_images(split), s.split_captions(split)
        qs = np.random.default_rng(seed).choice(len(caps), size=min(n_queries, len(caps)), replace=False)
        if s.image_file(int(imgs[0])) is None:
            return None
        fig, axes = plt.subplots(len(qs), k, figsize=(2.6 * k, 2.9 * len(qs)), squeeze=False)
        from PIL import Image
        for row, q in zip(axes, qs):
            order = np.argsort(-scores[:, q])[:k]
            row[0].set_ylabel(_wrap(s.captions([caps[q]])[0], 28), fontsize=7, rotation=0, ha="right", va="center")
            for ax, j in zip(row, order):
                ax.imshow(Image.open(s.image_file(int(imgs[j]))))
                ax.set_xticks([]); ax.set_yticks([])
                for sp in ax.spines.values():
                    sp.set_edgecolor("green" if j == cap_img[q] else "lightgray"); sp.set_linewidth(3)
                ax.set_title(f"{scores[j, q]:.2f}", fontsize=8)
    fig.tight_layout()
    return fig


def alignment_heatmap(model, store_path, image: int, caption: int, text, text_model: str = "minilm"):
    """Region-word cosine matrix of one pair and its per-band high-order attention (up to 4 bands)."""
    import h5py
    import torch
    import torch.nn.functional as nnf
    from transformers import AutoTokenizer

    from .data import collate_captions, collate_images
    from .features import resolve_text_model
    from .scoring import band_features
    from .store import CaptionDataset, image_item

    with h5py.File(store_path, "r") as f:
        ib = collate_images([image_item(f, image)])
        caption_text = f["captions/text"].asstr()[caption]
    ds = CaptionDataset(store_path, "test", text, with_image=False)
    cb = collate_captions([ds[int(np.nonzero(ds.captions == caption)[0][0])]])
    with torch.no_grad():
        vi, ci = model.encode_images(ib), model.encode_captions(cb)
    words = cb["word_mask"][0]
    v = nnf.normalize(vi["local"][0][vi["mask"][0]], dim=-1)
    t = nnf.normalize(ci["local"][0][words], dim=-1)
    tok = AutoTokenizer.from_pretrained(resolve_text_model(text_model))
    ids = tok(caption_text, truncation=True, max_length=len(words))["input_ids"]
    labels = [tok.convert_ids_to_tokens(ids[k]) for k in np.nonzero(words.numpy())[0] if k < len(ids)]
    G = model.scfg.bands
    rho = band_features(v, G) @ band_features(t, G).transpose(-1, -2)  # (G, m, l)
    attn = torch.softmax(model.scfg.temperature * G * rho, dim=-1)  # each region over words, per band
    shown = np.unique(np.linspace(0, G - 1, min(G, 4)).astype(int))
    fig, axes = plt.subplots(1, 1 + len(shown), figsize=(4.5 + 3 * len(shown), 4.5))
    sns.heatmap((v @ t.T).numpy(), ax=axes[0], cmap="viridis", xticklabels=labels)
    axes[0].set_title("region-word cosine")
    axes[0].set_ylabel("region")
    for b, ax in zip(shown, axes[1:]):
        sns.heatmap(attn[b].numpy(), ax=ax, cmap="magma", vmin=0, vmax=1, xticklabels=labels, yticklabels=False)
        ax.set_title(f"band {b}: attention over words")
    fig.suptitle(_wrap(caption_text, 100), fontsize=9)
    fig.tight_layout()
    return fig


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
