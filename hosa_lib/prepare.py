"""Build the HDF5 store of a params file: `python -m hosa_lib.prepare PARAMS [--force]`.

Converts the configured source, then adds the text-feature cache and the test split's
relevance matrices. A store that exists is reused (missing caches are added) unless forced.
"""
from __future__ import annotations

if __name__ == "__main__":  # answer --help and usage errors before torch loads
    from hosa_lib.cli import early
    early("prepare")

import json
import os
import sys
import time
from pathlib import Path

from .config import DataConfig, load, to_dict
from .store import Store, StoreError


def build_store(dc: DataConfig, store: Path, progress: bool = True) -> dict:
    """Convert the source named by `dc.source` into the store file `store`; returns a report."""
    if dc.source == "synthetic":
        from .sources.imagefolder import convert_image_folder
        from .sources.synthetic import generate

        raw = Path(dc.store).with_suffix("")  # outputs/data/<name>/ : images + dataset.json
        ds_json = generate(raw, dc.n_images, seed=dc.seed, size=dc.image_size, progress=progress,
                           train_twins=dc.train_twins)
        def twins(name):  # file-name pairs -> store indices of the images kept
            pairs = json.loads((raw / f"{name}.json").read_text())

            def to_indices(kept):
                pos = {f: i for i, f in enumerate(kept)}
                return [[pos[a], pos[b]] for a, b in pairs if a in pos and b in pos]
            return to_indices

        return convert_image_folder(raw / "images", ds_json, store, image_size=dc.image_size,
                                    batch_size=dc.batch_size, on_bad_image=dc.on_bad_image,
                                    extras={n: twins(n) for n in ("swap_pairs", "relation_pairs", "train_pairs")}, source=f"synthetic(seed={dc.seed})",
                                    progress=progress, **image_options(dc))
    if dc.source == "images":
        from .sources.imagefolder import convert_image_folder

        return convert_image_folder(dc.root, dc.captions, store, image_size=dc.image_size,
                                    batch_size=dc.batch_size, on_bad_image=dc.on_bad_image, progress=progress,
                                    **image_options(dc))
    if dc.source == "teran":
        from .sources.teran import convert_teran

        return convert_teran(dc.root, dc.dataset, store, features_dir=dc.features_dir, restval=dc.restval,
                             image_sizes=dc.image_sizes, progress=progress)
    if dc.source == "scan":
        from .sources.scan import convert_scan

        return convert_scan(dc.root, store, dc.splits, progress=progress)
    raise StoreError(f"data.source: unknown source '{dc.source}'")


def region_layout(dc: DataConfig) -> str:
    """data.regions resolved: auto means objects for the synthetic scenes (they know every object's box)
    and grid for image folders (which have none)."""
    if dc.regions == "auto":
        return "objects" if dc.source == "synthetic" else "grid"
    return dc.regions


def image_options(dc: DataConfig) -> dict:
    return {"fit": dc.image_fit, "background": dc.background, "split_fractions": dc.split_fractions,
            "regions": region_layout(dc), "grid": dc.grid, "context": dc.context, "map_stride": dc.map_stride}


# DataConfig keys that change the store's content
SOURCE_KEYS = ("source", "root", "dataset", "captions", "features_dir", "restval", "image_sizes", "splits",
               "n_images", "seed", "image_size", "on_bad_image", "image_fit", "background", "split_fractions",
               "regions", "grid", "context", "train_twins", "map_stride")


def source_digest(dc: DataConfig) -> str:
    """What the store is made from: the source settings and the source files' names, sizes and
    modification times (a changed captions file or image folder means a different store)."""
    import hashlib

    h = hashlib.sha256(json.dumps({k: v for k, v in to_dict(dc).items() if k in SOURCE_KEYS}, sort_keys=True).encode())
    files: list[Path] = []
    if dc.source == "images":
        files = [Path(dc.captions)] + sorted(p for p in Path(dc.root).rglob("*") if p.is_file())
    elif dc.source == "teran":
        files = sorted((Path(dc.root) / dc.dataset / "annotations").glob("*"))
        feats = Path(dc.features_dir) if dc.features_dir else Path(dc.root) / dc.dataset / "features_36"
        for sub in ("bu_att", "bu_box"):  # every feature file, inode included: files swapped by name change it
            if (feats / sub).is_dir():
                for e in sorted(os.scandir(feats / sub), key=lambda e: e.name):
                    st = e.stat()
                    h.update(f"{sub}/{e.name}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}".encode())
    elif dc.source == "scan":
        files = sorted(Path(dc.root).glob("*"))
    for f in files:
        st = f.stat() if f.exists() else None
        h.update(f"{f}|{st.st_size if st else -1}|{st.st_mtime_ns if st else -1}".encode())
    return h.hexdigest()[:16]


def stale(store: Path, digest: str, unrecorded_is_stale: bool = False) -> bool:
    """The store was made from other source files or settings than the params name now (a store that
    records no digest counts as current, or as stale with unrecorded_is_stale)."""
    with Store(store, check_values=False) as s:
        recorded = s.attrs.get("source_digest")
    if recorded == digest or (recorded is None and not unrecorded_is_stale):
        return False
    print(f"{store}: its source changed (captions, images or source settings) since it was built; rebuilding")
    return True


def prepare(dc: DataConfig, progress=True, device: str = "auto") -> dict:
    """Store + text cache + relevance, published together: the store is built under a temporary name,
    its caches go into sidecars named by that build (`store.SidecarWriter`, resumable), and one rename
    publishes them all (readers never see a store without its caches); one writer at a time. An
    existing store is reused (missing caches added as sidecars, the store file untouched) unless
    forced or its source changed. The text cache is encoded on `device` (auto: a GPU when there is
    one; pass `train.device`). progress: True/False, or a `progress.ProgressLog` (lines into the run's
    progress log, which the pipeline prints). Returns timings and the store summary."""
    from .features import add_text_cache
    from .perf import resolve_device
    from .relevance import add_relevance
    from .store import remove_stale_sidecars, set_attrs, sidecar_dir, writing_lock

    from .progress import ProgressLog, log_progress
    say = (lambda m: log_progress(progress.run_dir, m)) if isinstance(progress, ProgressLog) else (lambda m: None)
    store = Path(dc.store)
    t0 = time.perf_counter()
    with writing_lock(store):
        report: dict = {"reused": True}
        target = store
        if dc.source == "store":
            if not store.is_file():
                raise StoreError(f"data.source is 'store' but {store} does not exist")
        else:
            digest = source_digest(dc)
            if dc.force or not store.is_file() or stale(store, digest):
                target = store.with_name(f".{store.name}.building.h5")
                if dc.force:  # start clean: no resumed partial work
                    for leftover in (target, target.with_name(f".{target.name}.partial")):
                        leftover.unlink(missing_ok=True)
                say(f"building {store.name} from {dc.source} {dc.root or ''}".rstrip())
                report = build_store(dc, target, progress)
                set_attrs(target, {"source_digest": digest})
        t1 = time.perf_counter()
        home = sidecar_dir(store)
        say(f"text states of every caption ({dc.text_model}, layer {dc.text_layer}): added if missing")
        key = add_text_cache(target, dc.text_model, dc.text_layer, dc.max_words, progress=progress,
                             device=resolve_device(device), sidecars=home)
        t2 = time.perf_counter()
        with Store(target, check_values=False) as s:
            has_test = "test" in s.split_names
        if has_test and (dc.relevance or dc.spice):
            add_relevance(target, "test", dc.relevance, dc.spice, progress=progress, sidecars=home)
        if target != store:
            os.replace(target, store)
        remove_stale_sidecars(store)
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
    import hashlib

    from .relevance import load_teran_relevance
    from .store import remove_stale_sidecars, set_attrs, writing_lock, write_relevance

    dc = cfg.data
    rel_dir = Path(dc.root) / dc.dataset / "relevances"
    if dc.source == "teran":  # rebuilt whenever TERAN's files (annotations, features, relevance) change
        store = Path(dc.store)
        h = hashlib.sha256(f"{source_digest(dc)}|test|ids|{float16}".encode())
        for f in sorted(rel_dir.glob("*")) if rel_dir.is_dir() else []:
            st = f.stat()
            h.update(f"{f.name}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}".encode())
        digest = h.hexdigest()[:16]
        with writing_lock(store):
            if not store.is_file() or stale(store, digest, unrecorded_is_stale=True):
                from .sources.teran import convert_teran
                tmp = store.with_name(f".{store.name}.building.h5")
                convert_teran(dc.root, dc.dataset, tmp, features_dir=dc.features_dir, restval=False,
                              image_sizes=dc.image_sizes, only_splits=("test",), prefer="ids",
                              dtype="float16" if float16 else "float32")
                set_attrs(tmp, {"source_digest": digest})
                os.replace(tmp, store)
                remove_stale_sidecars(store)
    with Store(dc.store, check_values=False) as s:
        have = s.relevance_methods("test")
        n_cap, n_img = len(s.split_captions("test")), len(s.split_images("test"))
    todo = {m: rel_dir / f"{dc.dataset}-test-{m}.npy" for m in ("rougeL", "spice")}
    todo = {m: load_teran_relevance(p, n_cap, n_img) for m, p in todo.items() if p.is_file() and m not in have}
    if todo:
        write_relevance(dc.store, "test", todo)


def main(argv=None) -> int:
    from .cli import run

    def go(args):
        cfg = load(args.params, {"data": {"force": True}} if args.force else None)
        out = prepare(cfg.data, device=cfg.train.device)
        for k, v in out["summary"].items():
            print(f"{k:>26}: {v}")
        print(f"{'time (s)':>26}: " + ", ".join(f"{k} {v:.1f}" for k, v in out["seconds"].items()))
    return run("prepare", go, argv)


if __name__ == "__main__":
    sys.exit(main())
