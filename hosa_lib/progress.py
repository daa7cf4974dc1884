"""Progress of long work: tqdm bars, and the run's progress log that the pipeline prints live.

`bar(...)` is tqdm with this project's settings. Its `progress` argument is True/False (a bar on
stderr, or none), or a `ProgressLog`: then the bar's state goes, every `every` seconds and when it
ends, as a line into `<run_dir>/progress.log`, which `python -m hosa_lib.pipeline` prints in the
terminal while a notebook runs (a notebook's own output stays clean for its HTML report).
"""
from __future__ import annotations

import datetime as _dt
import time
from pathlib import Path

from tqdm import tqdm  # plain tqdm: widget bars render blank in offline HTML

PROGRESS_LOG = "progress.log"


def log_progress(run_dir, message: str) -> None:
    """One line of progress (an epoch, an ablation cell) appended to <run_dir>/progress.log;
    the pipeline prints these lines to the terminal while notebooks run, keeping the HTML clean."""
    path = Path(run_dir) / PROGRESS_LOG
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fh.write(f"{_dt.datetime.now():%H:%M:%S} {message}\n")


class ProgressLog:
    """A file for tqdm that forwards a bar's latest state to the run's progress log, at most every
    `every` seconds (and its last state)."""

    def __init__(self, run_dir, every: float = 30.0):
        self.run_dir, self.every, self.last, self.pending, self.done = run_dir, every, 0.0, "", ""

    def write(self, text: str) -> None:
        text = text.replace("\r", "\n").strip().splitlines()
        if not text:
            return
        self.pending = text[-1].strip()
        if ":   0%" in self.pending:  # a new bar (it may have an earlier bar's name)
            self.done = ""
        if "100%" in self.pending:  # a bar's end, once (tqdm repeats it when the bar closes)
            name = self.pending.split(":")[0]
            if name != self.done:
                self.done = name
                self.flush_line()
        elif time.monotonic() - self.last >= self.every:
            self.flush_line()

    def flush_line(self) -> None:
        if self.pending:
            log_progress(self.run_dir, self.pending)
            self.pending, self.last = "", time.monotonic()

    def flush(self) -> None:
        pass


def bar(iterable=None, progress=True, **kwargs):
    """tqdm over `iterable` (or a manual bar with total=...), shown per `progress` (see the module)."""
    to_log = isinstance(progress, ProgressLog)
    return tqdm(iterable, disable=not progress, file=progress if to_log else None,
                mininterval=kwargs.pop("mininterval", 2), **kwargs)
