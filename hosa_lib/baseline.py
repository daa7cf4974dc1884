"""The reference every report shows: a closed-form ridge map between two frozen pretrained spaces.

Image side: the store's pooled CNN vector (`images/pooled`; stores without one — bottom-up features —
use the mean of the valid region features). Text side: the mean over each caption's tokens of the
cached backbone states (for all-MiniLM-L6-v2, its sentence embedding). Both are centred on the train
split; W = argmin ||X W - Y||^2 + lambda ||W||^2 over the train (image, caption) pairs, in closed form,
with lambda chosen on val by rsum. Captions are ranked by cosine between X W and Y. Seconds on CPU.
Written here (not scikit-learn) because it is three matrix products and a solve, and it must read
the store's rows directly.
"""
from __future__ import annotations

import time

import numpy as np

from .metrics import TWINS, evaluate_scores, twin_accuracies
from .store import Store

LAMBDAS = (1.0, 10.0, 100.0, 1000.0, 10000.0)


def fit_ridge(x: np.ndarray, y: np.ndarray, lam: float) -> np.ndarray:
    """(D, H) W minimising ||x W - y||^2 + lam ||W||^2 (x: (n, D), y: (n, H)), in float64."""
    x, y = x.astype(np.float64), y.astype(np.float64)
    return np.linalg.solve(x.T @ x + lam * np.eye(x.shape[1]), x.T @ y)


def cosine_scores(img: np.ndarray, cap: np.ndarray) -> np.ndarray:
    """(N_img, N_cap) cosine similarities."""
    a = img / np.maximum(np.linalg.norm(img, axis=1, keepdims=True), 1e-12)
    b = cap / np.maximum(np.linalg.norm(cap, axis=1, keepdims=True), 1e-12)
    return a @ b.T


def split_vectors(s: Store, split: str, text_key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Image vectors of a split, caption vectors of its captions, and each caption's image position."""
    imgs, caps = s.split_images(split), s.split_captions(split)
    pos = np.full(s.n_images, -1)
    pos[imgs] = np.arange(len(imgs))
    return s.pooled(imgs), s.text_means(text_key, caps), pos[s.caption_image[caps]]


def choose_ridge(x_tr, y_tr, ci_tr, x_va, y_va, ci_va, lambdas=LAMBDAS):
    """Centre on train, fit for each lambda, keep the best val rsum: (W, mean_x, mean_y, lambda, {lambda: rsum})."""
    mx, my = x_tr.mean(0), y_tr.mean(0)
    pairs_x = x_tr[ci_tr] - mx  # one row per train caption: its image's vector
    by_lambda = {}
    for lam in lambdas:
        w = fit_ridge(pairs_x, y_tr - my, lam)
        by_lambda[lam] = evaluate_scores(cosine_scores((x_va - mx) @ w, y_va - my), ci_va)["rsum"]
    lam = max(by_lambda, key=by_lambda.get)
    return fit_ridge(pairs_x, y_tr - my, lam), mx, my, lam, by_lambda


def ridge_map(store_path, text_key: str, lambdas=LAMBDAS) -> dict:
    """The baseline's map fitted on train (lambda chosen on val), for initialising anchored models:
    {"w" (D, H), "mean_x" (D,), "mean_y" (H,), "lambda", "y_train" (n, H) caption vectors}."""
    with Store(store_path, check_values=False) as s:
        x_tr, y_tr, ci_tr = split_vectors(s, "train", text_key)
        x_va, y_va, ci_va = split_vectors(s, "val", text_key)
    w, mx, my, lam, _ = choose_ridge(x_tr, y_tr, ci_tr, x_va, y_va, ci_va, lambdas)
    return {"w": w, "mean_x": mx, "mean_y": my, "lambda": lam, "y_train": y_tr}


def ridge_baseline(store_path, text_key: str, split: str = "test", lambdas=LAMBDAS, ndcg_k: int = 25) -> dict:
    """Fit on train, choose lambda on val (rsum), evaluate on `split` (protocol all)."""
    t0 = time.perf_counter()
    with Store(store_path, check_values=False) as s:
        x_tr, y_tr, ci_tr = split_vectors(s, "train", text_key)
        x_va, y_va, ci_va = split_vectors(s, "val", text_key)
        x_te, y_te, ci_te = split_vectors(s, split, text_key)
        relevance = s.relevance(split)
        twins = {n: p for n in TWINS if (p := s.split_pairs(n, split)) is not None}
    w, mx, my, lam, by_lambda = choose_ridge(x_tr, y_tr, ci_tr, x_va, y_va, ci_va, lambdas)
    scores = cosine_scores((x_te - mx) @ w, y_te - my)
    m = evaluate_scores(scores, ci_te, "all", relevance, ndcg_k)
    m.update(twin_accuracies(scores, ci_te, twins))
    return {"metrics": m, "lambda": lam, "val_rsum_by_lambda": by_lambda, "seconds": time.perf_counter() - t0}
