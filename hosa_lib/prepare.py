"""Build the HDF5 store of a params file: `python -m hosa_lib.prepare PARAMS [--force]`.

Converts the configured source, then adds the text-feature cache and the test split's
relevance matrices. A store that exists is reused (missing caches are added) unless forced.
"""
from __future__ import annotations

if __name__ == "__main__":  # answer --help and usage errors before torch loads
    from hosa_lib.cli import early
    early("prepare")

import json
import sys
import time
from pathlib import Path

from .config import DataConfig, load
from .store import Store, StoreError


def build_store(dc: DataConfig, progress: bool = True) -> dict:
    """Convert the source named by `dc.source` into `dc.store`; returns a report."""
    store = Path(dc.store)
    if dc.source == "store":
        if not store.is_file():
            raise StoreError(f"data.source is 'store' but {store} does not exist")
        return {"reused": True}
    if store.is_file() and not dc.force:
        return {"reused": True}
    if dc.source == "synthetic":
        from .sources.imagefolder import convert_image_folder
        from .sources.synthetic import generate

        raw = store.with_suffix("")  # outputs/data/<name>/ : images + dataset.json
        ds_json = generate(raw, dc.n_images, seed=dc.seed, size=dc.image_size, progress=progress)
        pairs = json.loads((raw / "swap_pairs.json").read_text())

        def swap_pairs(kept):
            pos = {f: i for i, f in enumerate(kept)}
            return [[pos[a], pos[b]] for a, b in pairs if a in pos and b in pos]

        return convert_image_folder(raw / "images", ds_json, store, image_size=dc.image_size,
                                    batch_size=dc.batch_size, on_bad_image=dc.on_bad_image,
                                    extras={"swap_pairs": swap_pairs}, source=f"synthetic(seed={dc.seed})",
                                    progress=progress)
    if dc.source == "images":
        from .sources.imagefolder import convert_image_folder

        return convert_image_folder(dc.root, dc.captions, store, image_size=dc.image_size,
                                    batch_size=dc.batch_size, on_bad_image=dc.on_bad_image, progress=progress)
    if dc.source == "teran":
        from .sources.teran import convert_teran

        return convert_teran(dc.root, dc.dataset, store, features_dir=dc.features_dir, restval=dc.restval,
                             image_sizes=dc.image_sizes, progress=progress)
    if dc.source == "scan":
        from .sources.scan import convert_scan

        return convert_scan(dc.root, store, dc.splits, progress=progress)
    raise StoreError(f"data.source: unknown source '{dc.source}'")


def prepare(dc: DataConfig, progress: bool = True) -> dict:
    """Store + text cache + relevance. Returns timings and the store summary."""
    from .features import add_text_cache
    from .relevance import add_relevance

    t0 = time.perf_counter()
    report = build_store(dc, progress)
    t1 = time.perf_counter()
    key = add_text_cache(dc.store, dc.text_model, dc.text_layer, dc.max_words, progress=progress)
    t2 = time.perf_counter()
    with Store(dc.store, check_values=False) as s:
        has_test = "test" in s.split_names
    if has_test and (dc.relevance or dc.spice):
        add_relevance(dc.store, "test", dc.relevance, dc.spice, progress=progress)
    t3 = time.perf_counter()
    with Store(dc.store) as s:
        summary = s.summary()
    return {"report": report, "text_key": key, "summary": summary,
            "seconds": {"store": t1 - t0, "text_cache": t2 - t1, "relevance": t3 - t2, "total": t3 - t0}}


def prepare_teran_test(cfg, float16: bool = False) -> None:
    """TERAN reproduction: convert only the test split of the TERAN layout, once (split files as
    TERAN's loader reads them: coco_*_ids.npy for COCO when present; float32 features unless
    float16), and import TERAN's ROUGE-L and SPICE relevance files
    (`<root>/<dataset>/relevances/<dataset>-test-*.npy`)."""
    from .relevance import load_teran_relevance
    from .store import write_relevance

    dc = cfg.data
    if dc.source == "teran" and not Path(dc.store).is_file():
        from .sources.teran import convert_teran
        convert_teran(dc.root, dc.dataset, dc.store, features_dir=dc.features_dir, restval=False,
                      image_sizes=dc.image_sizes, only_splits=("test",), prefer="ids",
                      dtype="float16" if float16 else "float32")
    rel_dir = Path(dc.root) / dc.dataset / "relevances"
    with Store(dc.store, check_values=False) as s:
        have = s.relevance("test")
        n_cap, n_img = len(s.split_captions("test")), len(s.split_images("test"))
    todo = {m: rel_dir / f"{dc.dataset}-test-{m}.npy" for m in ("rougeL", "spice")}
    todo = {m: load_teran_relevance(p, n_cap, n_img) for m, p in todo.items() if p.is_file() and m not in have}
    if todo:
        write_relevance(dc.store, "test", todo)


def main(argv=None) -> int:
    from .cli import run

    def go(args):
        cfg = load(args.params, {"data": {"force": True}} if args.force else None)
        out = prepare(cfg.data)
        for k, v in out["summary"].items():
            print(f"{k:>26}: {v}")
        print(f"{'time (s)':>26}: " + ", ".join(f"{k} {v:.1f}" for k, v in out["seconds"].items()))
    return run("prepare", go, argv)


if __name__ == "__main__":
    sys.exit(main())
