"""The run's log: one CSV row per outer step (``log.csv``) and a line per event
(``events.log``), written by rank 0 alone, and cut back to the checkpoint on resume.

Cost: one appended line per outer step.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

__all__ = ["EVENTS_NAME", "LOG_COLUMNS", "LOG_NAME", "RunLog"]

LOG_COLUMNS = ["iteration", "meta_loss", "seconds", "tasks_per_s", "order", "outer_lr"]
LOG_NAME = "log.csv"
EVENTS_NAME = "events.log"  # pre-emption and other notes, one line each


class RunLog:
    """The CSV log and the events file of a run in ``directory``.

    Args:
        directory: where ``log.csv`` and ``events.log`` go; None: nowhere.
        writer: whether this process writes (rank 0 under torchrun).
    """

    def __init__(self, directory: Path | None, writer: bool = True) -> None:
        self.directory = directory
        self.writer = writer and directory is not None

    @property
    def path(self) -> Path | None:
        """``log.csv``'s path, or None."""
        return None if self.directory is None else self.directory / LOG_NAME

    def open(self, resume: bool, iteration: int) -> None:
        """Start the log: afresh, or on resume the rows up to ``iteration`` (those after
        the checkpoint, written before a crash, are dropped)."""
        path = self.path
        if path is None or not self.writer:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = []
        if resume and path.exists():
            with open(path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["iteration"]) <= iteration]
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=LOG_COLUMNS)
            w.writeheader()
            w.writerows(rows)

    def write(self, row: dict[str, Any]) -> None:
        """Append one outer step's row (its keys: ``LOG_COLUMNS``)."""
        if self.path is None or not self.writer:
            return
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=LOG_COLUMNS).writerow(row)

    def event(self, line: str) -> None:
        """Append a line to ``events.log``."""
        if self.directory is None or not self.writer:
            return
        with open(self.directory / EVENTS_NAME, "a") as f:
            f.write(line + "\n")
