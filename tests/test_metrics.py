"""hosa_lib.metrics: recalls, ranks, NDCG, folds, tie rules (TERAN's included) and the report columns."""
import numpy as np
import pytest
import torch

from hosa_lib.metrics import evaluate_scores, folds, ndcg_at_k, recall_metrics, swap_accuracy, teran_ranks


def brute_ranks(scores, cap_img):
    i2t, t2i = [], []
    for i in range(scores.shape[0]):
        order = sorted(range(scores.shape[1]), key=lambda c: -scores[i, c])
        i2t.append(min(order.index(c) for c in range(scores.shape[1]) if cap_img[c] == i))
    for c in range(scores.shape[1]):
        order = sorted(range(scores.shape[0]), key=lambda i: -scores[i, c])
        t2i.append(order.index(cap_img[c]))
    return np.array(i2t), np.array(t2i)


def test_recalls_match_brute_force_ranker():
    rng = np.random.default_rng(0)
    cap_img = np.array([0, 0, 1, 2, 2, 2, 3, 4, 4])  # uneven captions per image
    scores = rng.random((5, 9))
    i2t, t2i = brute_ranks(scores, cap_img)
    m = recall_metrics(scores, cap_img)
    for k in (1, 5, 10):
        assert m[f"i2t_r{k}"] == pytest.approx(100 * (i2t < k).mean())
        assert m[f"t2i_r{k}"] == pytest.approx(100 * (t2i < k).mean())
    assert m["t2i_meanr"] == pytest.approx(t2i.mean() + 1)
    assert m["i2t_medr"] == np.floor(np.median(i2t)) + 1


def test_hand_made_recalls():
    cap_img = np.array([0, 0, 1, 1])
    perfect = np.array([[1.0, 0.9, 0.1, 0.0], [0.0, 0.2, 0.8, 0.7]])
    assert recall_metrics(perfect, cap_img)["rsum"] == 600
    swapped = perfect[::-1].copy()  # every query ranks the wrong item first
    m = recall_metrics(swapped, cap_img)
    assert m["i2t_r1"] == 0 and m["t2i_r1"] == 0 and m["t2i_medr"] == 2 and m["i2t_medr"] == 3
    # i2t ranks of the first correct caption: both images see both wrong captions first -> rank 3 of 4
    assert m["i2t_meanr"] == 3 and m["t2i_meanr"] == 2
    many = 2 * np.eye(12)  # 12 images x 12 captions, one caption each, perfect except caption 0:
    many[:, 0] = [0.5, 0.9, 0.8, 0.7, 0.6, 0.55, 0.51, 0.1, 0.1, 0.1, 0.1, 0.1]  # 6 images above its own
    m2 = recall_metrics(many, np.arange(12))
    assert m2["t2i_r1"] == pytest.approx(100 * 11 / 12) and m2["t2i_r5"] == pytest.approx(100 * 11 / 12)
    assert m2["t2i_r10"] == 100 and m2["i2t_r1"] == 100 and m2["t2i_meanr"] == pytest.approx((11 + 7) / 12)


def test_float32_noise_does_not_break_a_tie_against_the_correct_item():
    """Two captions with the same text, scored an ulp apart (encoded in different batches): the image
    whose own caption lost the ulp still finds it at rank 0, as with an exact tie; a real gap of
    1e-4 still ranks the other caption first."""
    from hosa_lib.metrics import ranks
    one = np.float32(1.0)
    above = float(np.nextafter(one, np.float32(2)))  # one ulp above
    scores = np.array([[0.5, 1.0, above], [0.2, 0.9, 0.1], [0.1, 0.3, 0.95]])
    cap_img = np.array([1, 0, 2])  # image 0's own caption (column 1) is an ulp below column 2
    i2t, _ = ranks(scores, cap_img)
    assert i2t[0] == 0
    scores[0, 2] = 1.0 + 1e-4
    i2t, _ = ranks(scores, cap_img)
    assert i2t[0] == 1
    # large scores (weighted sums up to ~10) scale the tolerance with them
    i2t, _ = ranks(np.array([[9.0, 9.0 + 2e-6], [0.0, 1.0]]), np.array([0, 1]))
    assert i2t[0] == 0


def test_ndcg_matches_definition():
    rng = np.random.default_rng(1)
    scores, rel = rng.random((4, 6)), rng.random((6, 4))
    got = ndcg_at_k(scores, rel, k=3)
    def ndcg(rel_row, order):
        gain = lambda r: (2 ** r - 1) / np.log2(np.arange(len(r)) + 2)
        return gain(rel_row[order[:3]]).sum() / gain(np.sort(rel_row)[::-1][:3]).sum()
    expect_t2i = np.mean([ndcg(rel[c], np.argsort(-scores[:, c])) for c in range(6)])
    expect_i2t = np.mean([ndcg(rel[:, i], np.argsort(-scores[i])) for i in range(4)])
    assert got["t2i"] == pytest.approx(expect_t2i) and got["i2t"] == pytest.approx(expect_i2t)
    perfect = ndcg_at_k(rel.T.copy(), rel, k=3)
    assert perfect["i2t"] == pytest.approx(1.0) and perfect["t2i"] == pytest.approx(1.0)


def test_coco_1k_folds_use_their_own_images_and_captions():
    n = 5000  # one caption per image, float32: 100 MB (five captions in float64 allocated 1 GB)
    cap_img = np.arange(n)
    scores = np.full((n, n), -1.0, dtype=np.float32)
    scores[cap_img, np.arange(n)] = 1.0  # perfect within the whole set ...
    scores[0, 1000] = 5.0  # ... except image 0 beats image 1000 on its caption (another fold)
    assert evaluate_scores(scores, cap_img, "coco_5k")["t2i_r1"] < 100
    m = evaluate_scores(scores, cap_img, "coco_1k")  # folds never mix: fold 1 is unaffected
    assert m["t2i_r1"] == 100 and m["rsum"] == 600
    assert [f[0] for f in folds(n, "coco_1k")] == [0, 1000, 2000, 3000, 4000]
    with pytest.raises(ValueError, match="coco_5k needs 5000"):
        evaluate_scores(scores[:10, :50], cap_img[:50], "coco_5k")


def test_swap_accuracy():
    cap_img = np.array([0, 0, 1, 1])
    scores = np.array([[1.0, 1.0, 0.0, 0.5], [0.0, 0.0, 1.0, 0.9]])
    assert swap_accuracy(scores, cap_img, np.array([[0, 1]])) == 100.0
    assert swap_accuracy(scores[::-1], cap_img, np.array([[0, 1]])) == 0.0


def test_shortlist_with_full_k_equals_exhaustive_and_small_k_keeps_top():
    from hosa_lib.config import ScoringConfig
    from hosa_lib.evaluate import shortlist_scores
    from hosa_lib.scoring import score_all_pairs
    g = torch.Generator().manual_seed(0)
    side = lambda n, l: {"glob": torch.randn(n, 16, generator=g), "local": torch.randn(n, l, 16, generator=g),
                         "mask": torch.ones(n, l, dtype=torch.bool)}
    img, cap = side(6, 4), side(10, 5)
    cfg = ScoringConfig(bands=4)
    full = score_all_pairs(img, cap, cfg)["total"]
    torch.testing.assert_close(shortlist_scores(img, cap, cfg, k=6, max_elems=1 << 16), full)
    short = shortlist_scores(img, cap, cfg, k=2, max_elems=1 << 16)
    rescored = short > -1e5
    assert rescored.sum(0).min() >= 2  # every caption re-ranks at least its top-2 images by global score
    torch.testing.assert_close(short[rescored], full[rescored])


def test_coco_1k_scores_only_the_fold_blocks():
    """5,000 images: coco_1k scores the five 1,000-image blocks (a fifth of the pairs) exactly as the
    exhaustive matrix has them, leaves the rest unscored, and its metrics equal the exhaustive ones."""
    from hosa_lib.config import EvalConfig, ScoringConfig
    from hosa_lib.evaluate import evaluate_embeddings, protocol_scores
    g = torch.Generator().manual_seed(0)
    n = 5000
    side = lambda m: {"glob": torch.randn(n, 4, generator=g), "local": torch.randn(n, m, 4, generator=g),
                      "mask": torch.ones(n, m, dtype=torch.bool)}
    img, cap = side(2), side(2)
    cap_img = np.arange(n)
    scfg, ecfg = ScoringConfig(w_high=0.0), EvalConfig(protocol="coco_1k")
    folded = protocol_scores(img, cap, cap_img, scfg, ecfg)
    full = protocol_scores(img, cap, cap_img, scfg, EvalConfig(protocol="all"))
    blocks = torch.zeros(n, n, dtype=torch.bool)
    for f in range(5):
        blocks[f * 1000:(f + 1) * 1000, f * 1000:(f + 1) * 1000] = True
    torch.testing.assert_close(folded[blocks], full[blocks])
    assert torch.isinf(folded[~blocks]).all() and blocks.float().mean() == 0.2
    m_fold, _ = evaluate_embeddings(img, cap, cap_img, scfg, ecfg)
    m_full = evaluate_scores(full.numpy(), cap_img, "coco_1k")
    assert {k: m_fold[k] for k in m_full} == pytest.approx(m_full)


# ----------------------------------------------------------------------------- tie rules (eval.ties)
def teran_reference(scores, cap_img):
    """TERAN's evaluation.py semantics, one query at a time: d = the query's row, inds =
    numpy.argsort(d)[::-1] with numpy's default sort, rank = numpy.where(inds == target)[0][0];
    i2t = the best position of the image's own captions."""
    n_img, n_cap = scores.shape
    i2t, t2i = [], []
    for i in range(n_img):
        d = scores[i]
        inds = np.argsort(d)[::-1]
        i2t.append(min(int(np.where(inds == c)[0][0]) for c in np.where(cap_img == i)[0]))
    sims_t = scores.T.copy()  # TERAN transposes the matrix for text-to-image
    for c in range(n_cap):
        inds = np.argsort(sims_t[c])[::-1]
        t2i.append(int(np.where(inds == cap_img[c])[0][0]))
    return np.array(i2t), np.array(t2i)


def fair_reference(scores, cap_img, k):
    """Expected R@k and expected rank with every order of the tied items enumerated (ties: within the
    workbench's tolerance of the best correct item)."""
    import itertools

    from hosa_lib.metrics import _tolerance
    tol = _tolerance(scores)
    out = {}
    for name, mat, correct in (("i2t", scores, lambda q: cap_img == q), ("t2i", scores.T, lambda q: np.arange(
            scores.shape[0]) == cap_img[q])):
        hits, exp_rank = [], []
        for q in range(mat.shape[0]):
            row, ok = mat[q].astype(np.float64), correct(q)
            best = row[ok].max()
            above = int((row > best + tol).sum())
            group = [bool(o) for x, o in zip(row, ok) if abs(x - best) <= tol]
            ranks = [above + perm.index(True) for perm in itertools.permutations(group)]
            hits.append(np.mean([r < k for r in ranks]))
            exp_rank.append(np.mean(ranks))
        out[name] = (np.mean(hits), np.array(exp_rank))
    return out


def tied_matrix(seed, n_img=6, n_cap=13, levels=4):
    rng = np.random.default_rng(seed)
    cap_img = np.concatenate([np.arange(n_img), rng.integers(0, n_img, n_cap - n_img)])
    scores = rng.integers(0, levels, (n_img, n_cap)).astype(np.float32) / levels
    scores[0, :2] += np.float32(1e-7)  # float32 noise: a tie for the fair rule, not for TERAN's
    return scores, cap_img


@pytest.mark.parametrize("seed", range(4))
def test_teran_tie_rule_equals_teran_ranking(seed):
    scores, cap_img = tied_matrix(seed)
    i2t, t2i = teran_reference(scores, cap_img)
    m = recall_metrics(scores, cap_img, ties="teran")
    for k in (1, 5, 10):
        assert m[f"i2t_r{k}"] == pytest.approx(100 * (i2t < k).mean())
        assert m[f"t2i_r{k}"] == pytest.approx(100 * (t2i < k).mean())
    assert m["i2t_meanr"] == pytest.approx(i2t.mean() + 1) and m["t2i_medr"] == np.floor(np.median(t2i)) + 1


@pytest.mark.parametrize("seed", range(4))
def test_fair_tie_rule_is_the_expectation_over_every_order_of_the_ties(seed):
    scores, cap_img = tied_matrix(seed)
    m = recall_metrics(scores, cap_img, ties="fair")
    for k in (1, 5, 10):
        ref = fair_reference(scores, cap_img, k)
        for d in ("i2t", "t2i"):
            assert m[f"{d}_r{k}"] == pytest.approx(100 * ref[d][0])
    for d in ("i2t", "t2i"):
        assert m[f"{d}_meanr"] == pytest.approx(ref[d][1].mean() + 1)
        assert m[f"{d}_medr"] == np.floor(np.median(ref[d][1])) + 1


def test_an_all_zero_column_ranks_by_rule():
    """TERAN's padding gives exact-zero columns: TERAN ranks such a caption of image 1 (of 60) at 58
    (every later image first), the fair rule at the middle of the tie, the optimistic rule at 0."""
    rng = np.random.default_rng(0)
    scores = rng.random((60, 300)).astype(np.float32)
    cap_img = np.arange(300) % 60
    scores[:, 1] = 0.0
    assert cap_img[1] == 1
    got = {t: recall_metrics(scores, cap_img, ties=t)["t2i_meanr"] for t in ("teran", "fair", "optimistic")}
    base = {t: recall_metrics(np.delete(scores, 1, 1), np.delete(cap_img, 1), ties=t)["t2i_meanr"]
            for t in ("teran", "fair", "optimistic")}
    own = {t: got[t] * 300 - base[t] * 299 - 1 for t in got}  # the 0-based rank of caption 1
    teran = int(np.where(np.argsort(scores[:, 1])[::-1] == 1)[0][0])  # where numpy's sort leaves image 1
    assert own["teran"] == pytest.approx(teran) and own["fair"] == pytest.approx(29.5) and own["optimistic"] == pytest.approx(0)


def test_teran_ndcg_orders_like_teran_and_averages_i2t_over_nonzero_queries():
    from hosa_lib.metrics import ndcg_at_k
    rng = np.random.default_rng(2)
    scores = rng.integers(0, 3, (8, 20)).astype(np.float32)  # many exact ties
    rel = np.where(rng.random((20, 8)) < 0.15, rng.random((20, 8)), 0.0)  # sparse: some queries have NDCG 0

    def teran_ndcg(rel_row, d, k=5):  # evaluate_utils/dcg.py semantics: ranking = argsort(d)[::-1][:k]
        ranking = np.argsort(d)[::-1][:k]
        dcg = lambda idx: ((2 ** rel_row[idx] - 1) / np.log2(np.arange(len(idx)) + 2)).sum()
        best = dcg(np.argsort(rel_row, kind="stable")[::-1][:k])
        return 0.0 if best == 0 else dcg(ranking) / best
    i2t = np.array([teran_ndcg(rel[:, i], scores[i]) for i in range(8)])
    t2i = np.array([teran_ndcg(rel[c], scores[:, c]) for c in range(20)])
    assert (i2t == 0).any() and (i2t != 0).any()
    got = ndcg_at_k(scores, rel, k=5, ties="teran")
    assert got["i2t"] == pytest.approx(i2t[i2t != 0].mean()) and got["t2i"] == pytest.approx(t2i.mean())
    fair = ndcg_at_k(scores, rel, k=5, ties="fair")
    assert fair["i2t_nonzero"] > fair["i2t"]  # both averages reported: all queries, and TERAN's
    m = evaluate_scores(scores, np.arange(20) % 8, "all", {"rougeL": rel}, k=5, ties="teran")
    assert m["i2t_ndcg_rougeL"] == pytest.approx(i2t[i2t != 0].mean())


def test_report_keys_are_one_ordered_list_without_timings():
    from hosa_lib.metrics import report_keys, reported_recalls
    RECALL = reported_recalls()
    m = {"score_seconds": 1.0, "relation_acc": 50.0, "t2i_ndcg_rougeL": 0.5, "rsum": 300.0, "i2t_medr": 2.0,
         **{k: 10.0 for k in reversed(RECALL)}, "i2t_ndcg_rougeL": 0.4, "swap_acc": 60.0}
    assert report_keys(m) == [*RECALL, "rsum", "t2i_ndcg_rougeL", "i2t_ndcg_rougeL", "swap_acc", "relation_acc"]


@pytest.mark.parametrize("shape,levels", [((1000, 5000), 8), ((200, 1000), 2), ((60, 300), 1000)])
def test_teran_rule_equals_teran_loop_on_tie_heavy_matrices(shape, levels):
    """Matrices with many exact ties (scores rounded to a few levels): every rank equals TERAN's
    one-query-at-a-time loop, so rsum matches to the last digit. The rule before this (exact ties in
    descending index order) differed in 75 of 1,000 i2t and 767 of 5,000 t2i ranks on such a matrix."""
    rng = np.random.default_rng(shape[0])
    n_img, n_cap = shape
    scores = (np.round(rng.random((n_img, n_cap)) * levels) / levels).astype(np.float32)
    cap_img = np.arange(n_cap) % n_img
    i2t, t2i = teran_reference(scores, cap_img)
    got_i2t, got_t2i = teran_ranks(scores, cap_img)
    np.testing.assert_array_equal(got_i2t, i2t)
    np.testing.assert_array_equal(got_t2i, t2i)
    m = recall_metrics(scores, cap_img, ties="teran")
    rsum = sum(100 * (r < k).mean() for r in (i2t, t2i) for k in (1, 5, 10))
    assert m["rsum"] == rsum  # to the last digit


def test_a_reported_recall_shows_in_table_summary_and_plot_while_rsum_stays(monkeypatch, tmp_path):
    """README "Extending", a metric: R@20 added to metrics.REPORTED_KS appears in the evaluation table,
    the summary columns and the training plot; rsum (TERAN's R@1+5+10 sum, what selects models) and
    every other number stay as they were."""
    import json

    import matplotlib
    matplotlib.use("Agg")
    from hosa_lib import metrics, viz
    from hosa_lib.evaluate import format_table
    rng = np.random.default_rng(0)
    scores, cap_img = rng.random((30, 150)).astype(np.float32), np.arange(150) % 30
    before = evaluate_scores(scores, cap_img, "all")
    monkeypatch.setattr(metrics, "REPORTED_KS", (1, 5, 10, 20))
    after = evaluate_scores(scores, cap_img, "all")
    assert after["rsum"] == before["rsum"] and {k: after[k] for k in before} == before
    assert after["i2t_r20"] >= after["i2t_r10"] and "t2i_r20" in after
    assert "R@20" in format_table(after).splitlines()[0]
    assert metrics.report_keys(after)[:8] == ["i2t_r1", "i2t_r5", "i2t_r10", "i2t_r20", "t2i_r1", "t2i_r5", "t2i_r10", "t2i_r20"]
    rows = [{"step": s, "epoch": 0, "loss": 1.0, "i2t": 0.5, "t2i": 0.5} for s in range(1, 5)]
    rows.append({"step": 4, "epoch": 0, "split": "val", **{k: after[k] for k in metrics.reported_recalls()}})
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    fig = viz.plot_training(tmp_path)
    assert "R@20" in [t.get_text() for t in fig.axes[1].get_legend().get_texts()]
