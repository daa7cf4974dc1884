"""HOSA workbench library: model, t-product, scoring, loss, metrics, HDF5 store, sources,
training, evaluation and the notebook pipeline driver. `docs/architecture.md` maps the modules."""
from functools import cache

from . import provenance as _provenance  # noqa: F401  the package's source as this process imported it

__version__ = "0.1.0"


@cache
def code_version() -> str:
    """Package version plus the git commit when run from a checkout (for run folders and checkpoints).
    Asked of git once per process."""
    import subprocess
    from pathlib import Path

    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
            capture_output=True, text=True, timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{__version__}+{sha}" if sha else __version__
