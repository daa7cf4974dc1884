"""Command lines of the workbench: their arguments, and one error path for all of them.

Each CLI module (`prepare`, `train`, `evaluate`, `pipeline`) asks this module for its parser
before importing torch, so `--help` and argument errors answer at once. Expected failures —
a bad params file, store or checkpoint — print one line naming the file (and key) at fault and
exit 2; `--debug` shows the traceback instead. argparse is imported inside functions only:
the library itself never parses arguments.
"""
from __future__ import annotations

import sys

# pipeline stage -> its notebook (here, not in pipeline.py, so `--help` needs no torch)
STAGES = {"prepare": "00_prepare_data", "train": "10_train", "evaluate": "20_evaluate", "ablations": "30_ablations"}


def parser(name: str):
    import argparse

    from .config import CHOICES

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    ap = argparse.ArgumentParser(prog=f"python -m hosa_lib.{name}", parents=[common],
                                 description=DESCRIPTIONS[name], formatter_class=argparse.RawDescriptionHelpFormatter)
    params_help = "params file (YAML with an optional base: chain; relative paths resolve against the project root)"
    if name == "prepare":
        ap.add_argument("params", help=params_help)
        ap.add_argument("--force", action="store_true", help="rebuild the store even if it exists")
    elif name == "train":
        ap.add_argument("params", help=params_help)
        ap.add_argument("--run-dir", default=None, help="run folder (default: outputs/<name>-<weights key>)")
        ap.add_argument("--fresh", action="store_true",
                        help="train anew even if the run folder has checkpoints (they move to checkpoints.replaced/)")
    elif name == "evaluate":
        ap.add_argument("params", nargs="?", help=params_help + "; omit for a TERAN checkpoint with --size")
        ap.add_argument("--checkpoint", required=True, help="checkpoint to evaluate (ours, or TERAN's with --size)")
        ap.add_argument("--protocol", default=None, choices=CHOICES["eval.protocol"], help="protocol (default: eval.protocol)")
        ap.add_argument("--split", default=None, help="store split to evaluate (default: eval.split)")
        ap.add_argument("--device", default=None,
                        help="cpu | cuda | cuda:N (default: the params' train.device, auto = the GPU when there is one)")
        ap.add_argument("--out", default=None, help="folder for metrics.json (default: the checkpoint's folder)")
        teran = ap.add_argument_group("TERAN/HOSA checkpoints (seed-compatible test.py)")
        teran.add_argument("--size", choices=["1k", "5k"], help="COCO 1K (5 folds) or 5K; Flickr30K: 1k")
        teran.add_argument("--config", help="TERAN YAML config whose data paths and batch size replace the "
                           "checkpoint's (as TERAN's test.py; the whole file if the checkpoint has no config)")
        teran.add_argument("--data-root", help="TERAN data/ folder (default: the config's dataset.data)")
        teran.add_argument("--text-model", help="local dir or HF name of the BERT tokenizer/config (default: the config's)")
        teran.add_argument("--store", help="evaluate on an existing HDF5 store instead of converting data/")
        teran.add_argument("--max-words", type=int, default=512,
                           help="word-piece limit per caption (default 512, BERT's limit: TERAN never truncates)")
        teran.add_argument("--float16", action="store_true",
                           help="float16 features and embeddings: half the memory, scores move by ~1e-4")
    elif name == "pipeline":
        ap.add_argument("params", help=params_help)
        ap.add_argument("--stages", nargs="+", default=None, choices=list(STAGES), help="stages to run (default: all)")
        ap.add_argument("--force", action="store_true",
                        help="re-run every stage from scratch: train anew (old checkpoints moved to checkpoints.replaced/), "
                             "recompute embeddings and ablation cells (the store is rebuilt only when its source changed)")
        ap.add_argument("--keep-stale", action="store_true",
                        help="reuse stages, checkpoints and ablation cells computed by other code (the package's or "
                             "notebooks' source changed since) instead of recomputing; reports mark them "
                             "'computed by other code'. Data changes always rerun")
    return ap


DESCRIPTIONS = {
    "prepare": "Build the HDF5 store of a params file: convert its source, add the text cache and relevance.",
    "train": "Train (or resume) the run of a params file; under torchrun, distributed (DDP).",
    "evaluate": "Evaluate a checkpoint: ours with PARAMS, or TERAN's with --size 1k|5k (seed-compatible test.py).",
    "pipeline": "Run the notebooks 00 -> 30 headlessly (papermill) and render their HTML reports.",
}


def early(name: str) -> None:
    """Parse sys.argv now (before heavy imports): --help and usage errors exit here."""
    parser(name).parse_args(sys.argv[1:])


def run(name: str, fn, argv=None) -> int:
    """Parse arguments, call fn(args); expected errors become one line on stderr and exit 2."""
    import pickle

    args = parser(name).parse_args(argv)
    from .config import ConfigError
    from .runs import CheckpointError
    from .store import StoreError
    try:
        return fn(args) or 0
    except (ConfigError, StoreError, CheckpointError, OSError,  # OSError: missing, read-only, full, not a folder
            pickle.UnpicklingError, EOFError) as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        if args.debug:
            raise
        print(str(e) or "interrupted", file=sys.stderr)
        return 130
