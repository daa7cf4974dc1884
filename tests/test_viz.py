"""Report figures stay legible: panels wrap at three a row, legends are readable, tick labels never overlap."""
import matplotlib

matplotlib.use("Agg")
import numpy as np
import pandas as pd
import pytest

from hosa_lib import viz


def overlaps(labels) -> bool:
    boxes = [t.get_window_extent() for t in labels if t.get_visible() and t.get_text()]
    return any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])


def test_ablation_figure_wraps_panels_and_keeps_legends_readable():
    rng = np.random.default_rng(0)
    variants = ["hosa", "teran_local", "global_only", "hosa_G1", "shared_transformer"]
    rows = [{"variant": v, "seed": s, "rsum": rng.uniform(300, 400), "swap_acc": rng.uniform(40, 60),
             "relation_acc": rng.uniform(40, 60), "steps_per_s": rng.uniform(1, 3),
             **{f"{d}_r{k}": rng.uniform(10, 90) for d in ("i2t", "t2i") for k in (1, 5, 10)}}
            for v in variants for s in (0, 1)]
    base = {"variant": "ridge baseline (lambda 10)", "rsum": 350.0, "swap_acc": 50.0, "relation_acc": 50.0}
    fig = viz.plot_ablations(pd.DataFrame(rows), base)
    shown = [ax for ax in fig.axes if ax.get_visible()]
    assert len(shown) == 6
    assert max(sum(1 for ax in shown if abs(ax.get_position().y0 - a.get_position().y0) < 1e-6)
               for a in shown) <= 3  # at most three panels a row (it was six in one row)
    fig.canvas.draw()
    legends = [ax.get_legend() for ax in shown if ax.get_legend()]
    assert legends and min(t.get_fontsize() for lg in legends for t in lg.get_texts()) >= 10
    for ax in shown:
        assert not overlaps(ax.get_xticklabels()) and not overlaps(ax.get_yticklabels()), ax.get_title()


@pytest.mark.parametrize("regions", [16, 49])
def test_heatmap_region_labels_do_not_overlap(smoke_store, regions, monkeypatch):
    from hosa_lib.config import RunConfig, override
    from hosa_lib.factory import build_model
    from hosa_lib.store import Store
    cfg = override(RunConfig(), {"data": {"store": smoke_store.store}, "model": {"embed": 32, "ff": 64}})
    model, text = build_model(cfg, seed=0)
    model.eval()
    with Store(smoke_store.store) as s:
        image, caption = int(s.split_images("test")[0]), int(s.split_captions("test")[0])
    import hosa_lib.scoring as scoring
    original = scoring.attention_maps

    def many_regions(v, c, sc):  # as many regions as the store would give at a larger image size
        return original(v.repeat(-(-regions // len(v)), 1)[:regions], c, sc)
    monkeypatch.setattr(scoring, "attention_maps", many_regions)
    fig = viz.alignment_heatmap(model, cfg, "test", image, caption, text)
    fig.canvas.draw()
    first = fig.axes[0]
    assert first.get_ylabel() == "region"
    assert not overlaps(first.get_yticklabels()) and not overlaps(first.get_xticklabels())
    assert len([t for t in first.get_yticklabels() if t.get_text()]) <= 13
