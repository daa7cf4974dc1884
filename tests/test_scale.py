"""COCO-scale paths against slow references: the compiled ROUGE-L, the streamed text cache and relevance
(resumable sidecars), O(1) store opens, block-wise metrics, length-bucketed evaluation and its cache,
the generated TERAN layout, and the GPU check's clean skip on CPU."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hosa_lib import metrics
from hosa_lib.store import Store, StoreError

REPO = Path(__file__).resolve().parent.parent


def rouge_reference(captions, image_refs):
    from rouge_score import rouge_scorer

    from hosa_lib.relevance import UnicodeTokenizer
    sc = rouge_scorer.RougeScorer(["rougeL"], tokenizer=UnicodeTokenizer())
    return np.array([[sc.score_multi(refs, c)["rougeL"].fmeasure for refs in image_refs] for c in captions],
                    np.float32)


def test_rouge_l_equals_rouge_score_on_random_and_real_looking_captions():
    from benchmarks.teran_layout import caption
    from hosa_lib.relevance import rouge_l_matrix
    rng = np.random.default_rng(0)
    words = "a the red cat dog on sits 一 只 猫 café é ? ! 🐱 sur le".split()
    random_caps = [" ".join(rng.choice(words, rng.integers(1, 18))) for _ in range(40)]
    real_caps = [caption(rng) for _ in range(40)] + ["A man riding a wave on top of a surfboard.",
                                                     "A man riding a wave on a surfboard.", "?!...", "一只红色的猫"]
    caps = random_caps + real_caps
    refs = [[caps[int(i)] for i in rng.integers(0, len(caps), rng.integers(1, 7))] for _ in range(30)]
    got = rouge_l_matrix(caps, refs, progress=False, block=7)
    np.testing.assert_array_equal(got, rouge_reference(caps, refs))  # identical, not close
    assert 0 < got.mean() < 1


def small_store(tmp_path, n=30):
    from benchmarks.teran_layout import write_coco_layout
    from hosa_lib.sources.teran import convert_teran
    write_coco_layout(tmp_path / "coco_layout", n, k=4, dim=8)
    convert_teran(tmp_path / "coco_layout", "coco", tmp_path / "s.h5", progress=False)
    return tmp_path / "s.h5"


def test_generated_teran_layout_converts_with_karpathy_splits(tmp_path):
    from benchmarks.teran_layout import split_sizes
    with Store(small_store(tmp_path, 50)) as s:
        assert s.n_images == 50 and s.n_captions == 250 and s.attrs["source"] == "teran-coco"
        sizes = split_sizes(50)
        assert len(s.split_images("test")) == sizes["test"] == 10
        assert len(s.split_images("train")) == sizes["train"] + sizes["restval"]  # restval joins train


class Stop(Exception):
    pass


def test_relevance_sidecar_streams_resumes_and_equals_the_reference(tmp_path, monkeypatch):
    from hosa_lib import relevance
    store = small_store(tmp_path, 50)
    calls, crash = [], [True]
    real = relevance.RougeL.rows

    def crash_on_third(self, a, b):
        calls.append(a)
        if len(calls) == 3 and crash and crash.pop():
            raise Stop
        return real(self, a, b)
    monkeypatch.setattr(relevance.RougeL, "rows", crash_on_third)
    with pytest.raises(Stop):
        relevance.add_relevance(store, "test", block=12, progress=False)
    with Store(store) as s:
        assert s.relevance("test") == {}  # a partial sidecar is never read
    calls.clear()
    relevance.add_relevance(store, "test", block=12, progress=False)
    assert calls == [24, 36, 48]  # resumed after the two blocks written before the crash
    with Store(store) as s:
        caps, imgs = s.split_captions("test"), s.split_images("test")
        text = s.captions(caps)
        refs = [[text[c] for c in range(len(caps)) if s.caption_image[caps[c]] == i] for i in imgs]
        got = s.relevance("test")["rougeL"]
    np.testing.assert_array_equal(got, rouge_reference(text, refs))


def test_text_cache_streams_in_blocks_resumes_and_leaves_the_store_file_untouched(tmp_path, monkeypatch):
    import hashlib

    from hosa_lib import features
    store = small_store(tmp_path, 12)  # 60 captions
    digest = hashlib.sha256(store.read_bytes()).hexdigest()
    calls, crash = [], [True]
    real = features.encode_block

    def crash_on_second(*a, **k):
        calls.append(len(a[0]))
        if len(calls) == 2 and crash and crash.pop():
            raise Stop
        return real(*a, **k)
    monkeypatch.setattr(features, "encode_block", crash_on_second)
    with pytest.raises(Stop):
        features.add_text_cache(store, "minilm", max_words=16, block=16, progress=False)
    calls.clear()
    key = features.add_text_cache(store, "minilm", max_words=16, block=16, progress=False)
    assert calls == [16, 16, 12]  # blocks 2-4 only: block 1 was kept
    assert hashlib.sha256(store.read_bytes()).hexdigest() == digest  # the cache is a sidecar, not a rewrite
    with Store(store) as s:
        g = s.text_group(key)
        hidden, mask, words = g["hidden"][:], g["mask"][:], g["words"][:]
        texts = s.captions()
        assert g.attrs["min_words"] >= 1
    h, m, w = features.encode_texts(texts, "minilm", max_words=16, batch_size=60, progress=False)
    assert hidden.shape == h.shape and (mask == m).all() and (words == w).all()
    np.testing.assert_allclose(hidden[mask].astype(np.float32), h[m].astype(np.float32), atol=2e-2)


def test_store_open_reads_no_caption_or_feature_once_checked(tmp_path, monkeypatch):
    import h5py

    from hosa_lib import store as store_mod
    path = small_store(tmp_path, 12)
    with h5py.File(path, "r") as f:
        assert f.attrs[store_mod.CHECKED]  # recorded by the writer
    seen = []
    monkeypatch.setattr(store_mod, "check_content", lambda *a, **k: seen.append(a[1]))
    with Store(path) as s:
        assert s.n_images == 12 and seen == []
    with h5py.File(path, "r+") as f:  # a file from before the record: checked in full on open
        del f.attrs[store_mod.CHECKED]
    with Store(path):
        assert seen == [str(path)]


def test_sidecars_of_a_replaced_build_are_ignored_and_removed(tmp_path):
    from hosa_lib.store import copy_store, remove_stale_sidecars, sidecar_dir, write_relevance
    path = small_store(tmp_path, 20)
    with Store(path) as s:
        shape = (len(s.split_captions("test")), len(s.split_images("test")))
    write_relevance(path, "test", {"spice": np.ones(shape, np.float32)})
    copy_store(path, tmp_path / "copy.h5")
    with Store(tmp_path / "copy.h5") as s:
        assert s.relevance_methods("test") == ["spice"]
    small_store(tmp_path / "again", 20)
    import shutil
    shutil.copyfile(tmp_path / "again" / "s.h5", path)  # rebuilt: new uid
    with Store(path) as s:
        assert s.relevance_methods("test") == []
    assert [p.name.split(".")[1] for p in remove_stale_sidecars(path)] == ["relevance-test-spice"]
    assert list(sidecar_dir(path).iterdir()) == []


@pytest.mark.parametrize("shape", [(7, 23), (40, 9)])
def test_block_wise_ranks_and_ndcg_equal_one_block(monkeypatch, shape):
    rng = np.random.default_rng(3)
    n_img, n_cap = shape
    cap_img = np.concatenate([np.arange(n_img), rng.integers(0, n_img, n_cap - n_img)]) if n_cap >= n_img else None
    if cap_img is None:
        cap_img = np.arange(n_cap) % n_img
        n_img = cap_img.max() + 1
    scores = rng.standard_normal((n_img, n_cap)).astype(np.float32)
    scores[0, :3] = scores[cap_img[:3], np.arange(3)]  # exact ties
    rel = rng.random((n_cap, n_img)).astype(np.float32)
    whole = metrics.evaluate_scores(scores, cap_img, "all", {"r": rel}, k=5)
    monkeypatch.setattr(metrics, "BLOCK", 5)  # one row or column per block
    small = metrics.evaluate_scores(scores, cap_img, "all", {"r": rel}, k=5)
    assert whole.keys() == small.keys()
    for k in whole:
        assert small[k] == pytest.approx(whole[k], rel=1e-12), k


def test_evaluation_buckets_our_captions_and_caches_the_blocks(tmp_path, smoke_store):
    from hosa_lib.config import RunConfig, override
    from hosa_lib.evaluate import encode_split, evaluate_checkpoint
    from hosa_lib.train import train
    cfg = override(RunConfig(), {"data": {"store": smoke_store.store},
                                 "train": {"epochs": 1, "batch_size": 16, "workers": 0},
                                 "model": {"embed": 32, "ff": 64, "image_layers": 1, "text_layers": 1}})
    run = tmp_path / "run"
    train(cfg, run, progress=False)
    ck = run / "checkpoints" / "best.pt"
    first = evaluate_checkpoint(cfg, ck, progress=False)
    assert isinstance(first["cap"], list) and len(first["cap"]) >= 1
    widths = [b["mask"].shape[1] for b in first["cap"]]
    assert widths == sorted(widths)  # length-sorted blocks, each padded to its own longest caption
    again = evaluate_checkpoint(cfg, ck, progress=False)  # from the embedding cache
    assert [b["index"].tolist() for b in again["cap"]] == [b["index"].tolist() for b in first["cap"]]
    torch.testing.assert_close(again["scores"], first["scores"])
    dense_img, dense_cap, cap_img = encode_split(first["model"], smoke_store.store, cfg.eval.split, first["text"])
    from hosa_lib.scoring import score_all_pairs
    dense = score_all_pairs(dense_img, dense_cap, first["cfg"].scoring)["total"]
    torch.testing.assert_close(first["scores"], dense, rtol=1e-5, atol=1e-5)
    assert metrics.recall_metrics(dense.numpy(), cap_img)["rsum"] == first["metrics"]["rsum"]


def test_gpu_check_skips_cleanly_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the check runs for real (make gpu-check)")
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py")], capture_output=True,
                          text=True, cwd=REPO.parent)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().startswith("gpu_check: skipped, no CUDA device") and not proc.stderr.strip()


@pytest.mark.slow
def test_gpu_check_runs_its_code_at_toy_sizes_on_the_cpu(tmp_path):
    """--dry-run: every part of the GPU script (Triton through its interpreter, prepare, bf16 steps,
    bucketed evaluation) runs here, so the script is known to work before a GPU is lent."""
    out = tmp_path / "g.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--dry-run", "--out", str(out)],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    import json
    res = json.loads(out.read_text())
    assert all(r["ok"] for r in res["kernels"]) and res["train"]["steps"] == 3
    assert res["evaluate"]["pairs"] == 50 * 250 and 0 <= res["evaluate"]["rsum_random"] <= 600
