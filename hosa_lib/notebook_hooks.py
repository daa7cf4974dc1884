"""Jupyter server hook: the project's notebooks are saved without outputs or run metadata.

Installed by `make setup` into the virtual environment's Jupyter config
(`.venv/etc/jupyter/jupyter_server_config.json`), so any `jupyter lab` started from this
environment uses it. Opening, running and autosaving `notebooks/*.ipynb` then rewrites the file
with exactly what git holds: `git status` stays clean (git's nbstripout filter in
.gitattributes alone cannot do that: a file whose size changed is listed as modified until it is
staged). Executed copies with outputs live in the run folders (the pipeline's reports); to keep
outputs of an interactive session, save a copy outside `notebooks/`.
"""
from __future__ import annotations

from pathlib import PurePosixPath

EXTRA_KEYS = ["metadata.language_info"]


def strip_on_save(model: dict, path: str, contents_manager=None, **kwargs) -> None:
    """pre_save_hook: strip outputs, execution counts and run metadata of notebooks/<name>.ipynb."""
    if model.get("type") != "notebook" or PurePosixPath(path).parent.name != "notebooks":
        return
    import nbformat
    from nbstripout import strip_output

    nb = nbformat.from_dict(model["content"])
    strip_output(nb, keep_output=False, keep_count=False, keep_id=True, extra_keys=EXTRA_KEYS)
    model["content"] = nb
