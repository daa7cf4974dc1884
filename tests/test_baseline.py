"""The ridge-map baseline: recovers a known linear map, picks lambda on val, runs on a real store."""
import numpy as np
import pytest

from hosa_lib.baseline import cosine_scores, fit_ridge, ridge_baseline
from hosa_lib.metrics import recall_metrics


def test_ridge_recovers_a_known_linear_map_and_retrieves():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(20, 8))
    x = rng.normal(size=(500, 20))
    y = x @ a + 0.01 * rng.normal(size=(500, 8))
    w = fit_ridge(x, y, 1e-3)
    assert np.abs(w - a).max() < 0.01
    x_test = rng.normal(size=(50, 20))
    m = recall_metrics(cosine_scores(x_test @ w, x_test @ a), np.arange(50))
    assert m["i2t_r1"] == 100 and m["t2i_r1"] == 100
    heavy = fit_ridge(x, y, 1e6)  # a large lambda shrinks the map towards 0
    assert np.abs(heavy).max() < 0.1 * np.abs(w).max()


def test_ridge_baseline_on_a_store(smoke_store):
    from hosa_lib.text import cache_key
    res = ridge_baseline(smoke_store.store, cache_key("minilm", -1))
    m = res["metrics"]
    assert res["lambda"] in res["val_rsum_by_lambda"]
    assert res["val_rsum_by_lambda"][res["lambda"]] == max(res["val_rsum_by_lambda"].values())
    assert m["rsum"] == pytest.approx(sum(m[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10)))
    assert 0 < m["t2i_ndcg_rougeL"] <= 1 and "swap_acc" in m
