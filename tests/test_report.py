"""What the reports say, checked on the figures and pages themselves (issue #28's report defects):
legends never over curves, identical curves named as such, one seed never shown as a spread, "—"
instead of NaN, words instead of word pieces, the index saying how training went and what the data is,
a reused finished run neither "resumed" nor timed as a no-op, ablation cells' progress in the
pipeline's log."""
import json
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import pytest

matplotlib.use("Agg")

from hosa_lib import viz  # noqa: E402


def _overlap(a, b) -> bool:
    return not (a.x1 <= b.x0 or b.x1 <= a.x0 or a.y1 <= b.y0 or b.y1 <= a.y0)


def test_training_plot_legend_does_not_cover_the_loss_curves(tmp_path):
    rows = [{"step": s, "epoch": s // 10, "loss": 5.0 / (1 + s), "i2t": 2.0 / (1 + s), "t2i": 3.0 / (1 + s)}
            for s in range(1, 60)]
    rows += [{"step": 10 * e, "epoch": e, "split": "val", "i2t_r1": 10.0 + e, "i2t_r5": 30.0, "i2t_r10": 40.0,
              "t2i_r1": 12.0, "t2i_r5": 31.0, "t2i_r10": 45.0} for e in range(-1, 5)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    fig = viz.plot_training(tmp_path)
    fig.canvas.draw()
    ax = fig.axes[0]
    legend = ax.get_legend().get_window_extent()
    assert not _overlap(legend, ax.get_window_extent()), "the loss legend lies over the plot area"


def _ablation_rows(variants, seeds=(0,)):
    rows = []
    for v, base in variants.items():
        for s in seeds:
            rows.append({"variant": v, "seed": s, "rsum": base + s, "i2t_r1": base / 10, "i2t_r5": 50.0, "i2t_r10": 60.0,
                         "t2i_r1": base / 12, "t2i_r5": 40.0, "t2i_r10": 70.0, "steps_per_s": np.nan if v == "start" else 2.0,
                         "w_local_learned": np.nan if v == "global_only" else 0.3})
    return pd.DataFrame(rows)


def test_identical_recall_curves_share_one_labelled_curve():
    df = _ablation_rows({"hosa": 300.0, "global_only": 300.0, "start": 250.0})  # hosa and global_only identical
    fig = viz.plot_ablations(df)
    labels = [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]
    assert "hosa = global_only" in labels and "start" in labels
    assert "hosa" not in labels and "global_only" not in labels


def test_one_seed_is_not_shown_as_mean_and_sd():
    from hosa_lib.ablations import summary_table
    fig = viz.plot_ablations(_ablation_rows({"hosa": 300.0, "start": 250.0}))
    title = fig._suptitle.get_text()
    assert "one seed" in title and "sd" not in title.replace("one seed", "")
    three = viz.plot_ablations(_ablation_rows({"hosa": 300.0, "start": 250.0}, seeds=(0, 1, 2)))
    assert "mean ± sd over 3 seeds" in three._suptitle.get_text()
    # the table: no NaN cells, "—" with its meaning in the caption
    html = summary_table(_ablation_rows({"hosa": 300.0, "global_only": 290.0, "start": 250.0}),
                         {"variant": "ridge baseline", "rsum": 240.0}).to_html()
    assert "nan" not in html.lower() and "—" in html and "one seed per variant" in html


def test_heatmap_words_not_word_pieces():
    words, groups = viz.merge_word_pieces(["a", "cat", "##oj", "##i", ",", "on", "a", "sofa", "."])
    assert words == ["a", "catoji,", "on", "a", "sofa."]
    assert groups == [[0], [1, 2, 3, 4], [5], [6], [7, 8]]
    x = np.arange(18, dtype=float).reshape(2, 9)
    np.testing.assert_allclose(viz.merge_columns(x, groups, "sum")[0], [0, 1 + 2 + 3 + 4, 5, 6, 7 + 8])
    np.testing.assert_allclose(viz.merge_columns(x, groups, "mean")[1], [9, 11.5, 14, 15, 16.5])


def test_index_line_says_how_training_went_and_what_the_data_is(tmp_path, smoke_store):
    from hosa_lib.config import RunConfig, override
    from hosa_lib.pipeline import describe_run
    from hosa_lib.store import Store
    cfg = override(RunConfig(), {"data": {"store": smoke_store.store}, "train": {"epochs": 10}})
    (tmp_path / "train_metrics.json").write_text(json.dumps({"epochs_run": 4, "epochs": 10, "best_epoch": 0}))
    line = describe_run(cfg, tmp_path)
    assert "trained 4 of 10 epochs (stopped early; best on val: epoch 1)" in line and "10 epochs;" not in line
    with Store(smoke_store.store, check_values=False) as s:
        n, tr, fe = s.n_images, len(s.split_images("train")), s.attrs["feature_extractor"]
    assert f"{n:,} synthetic scenes (train / val / test {tr:,} / " in line
    assert f"regions: {fe};" in line and "object boxes" in line  # what a region is


@pytest.mark.slow
def test_reused_finished_run_is_not_resumed_and_keeps_its_speed(tmp_path, smoke_store):
    """An ablation cell that is the run itself: "already trained" (no "resuming", no "early stop"),
    steps/s of its real training; every cell's epoch lines reach the grid's own progress log."""
    import yaml

    from hosa_lib.ablations import run_grid
    from hosa_lib.config import override
    from hosa_lib.runs import run_dir_for
    from hosa_lib.train import train
    from test_train import smoke_cfg
    cfg = override(smoke_cfg(smoke_store.store, epochs=1), {"output_root": str(tmp_path / "out")})
    first = train(cfg, progress=False)
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({"seeds": [0], "variants": [{"name": "same", "overrides": {}}]}))
    report = tmp_path / "report"
    df = run_grid(cfg, grid, out_csv=report / "ablations.csv", progress=False)
    assert df.loc[0, "steps_per_s"] == pytest.approx(first["steps"] / first["train_seconds"])
    own = (run_dir_for(cfg) / "progress.log").read_text()
    assert "already trained: 1 of 1 epochs" in own and "resuming" not in own and "early stop" not in own
    echoed = (report / "progress.log").read_text()
    assert "cell 1/1 same seed 0: run " in echoed and "cell 1/1 same seed 0: evaluating" in echoed
    # a cell that trains: its epoch lines (and within-epoch bar lines) reach the grid's log
    grid.write_text(yaml.safe_dump({"seeds": [0], "variants": [{"name": "other", "overrides": {"train": {"lr": 1e-3}}}]}))
    run_grid(cfg, grid, out_csv=report / "ablations.csv", progress=False)
    echoed = (report / "progress.log").read_text()
    assert "cell 1/1 other seed 0: epoch 1/1: loss" in echoed
    assert "cell 1/1 other seed 0: epoch 1/1:" in echoed.replace("epoch 1/1: loss", "")  # the bar's own line


def test_index_names_an_image_folder_by_its_last_two_path_parts(tmp_path):
    """A folder laid out as the README says (data/mine/images) is named "mine/images", not "images"."""
    from hosa_lib.config import RunConfig, override
    from hosa_lib.pipeline import describe_run
    cfg = override(RunConfig(), {"data": {"source": "images", "root": "data/mine/images",
                                          "captions": "data/mine/captions.csv", "store": str(tmp_path / "none.h5")}})
    assert "images of the folder mine/images" in describe_run(cfg)
