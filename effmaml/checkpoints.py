"""Checkpoint files of ``effmaml.MetaTrainer``: written atomically, one generation
kept, the newest loadable one read back.

* ``write``: ``checkpoint.pt`` through a temporary file, fsync and rename; the file it
  replaces becomes ``checkpoint.prev.pt``. A crash while writing leaves the previous
  checkpoint intact; one damaged later (a full disk, a copy cut short) leaves the one before.
* ``read_latest``: ``checkpoint.pt``, else ``checkpoint.prev.pt`` with a warning that
  says why the newest could not be read; None where neither exists; an error where both
  are damaged.
* ``check_model_state``: a saved model state against the live model's names and shapes,
  before anything is loaded.

Cost: one ``torch.save`` / ``torch.load`` of the state (on the CPU for loading).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .notices import warn

__all__ = [
    "CHECKPOINT_NAME",
    "FORMAT",
    "PREVIOUS_NAME",
    "check_model_state",
    "read_latest",
    "write",
]

CHECKPOINT_NAME = "checkpoint.pt"
PREVIOUS_NAME = "checkpoint.prev.pt"  # the one before, kept in case the newest is damaged
FORMAT = 1  # the layout of MetaTrainer.state_dict(); a checkpoint of another is refused


def write(directory: Path, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``directory/checkpoint.pt`` atomically, keeping the previous file
    as ``checkpoint.prev.pt``.

    Args:
        directory: the run's checkpoint folder (created if missing).
        state: what ``torch.save`` writes.

    Returns:
        The checkpoint's path.
    """
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / CHECKPOINT_NAME
    tmp = directory / f".{CHECKPOINT_NAME}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        if path.exists():
            # the previous checkpoint stays one generation, in case this one is damaged
            # later; a crash between the two renames leaves it alone, and read_latest falls
            # back to it
            os.replace(path, directory / PREVIOUS_NAME)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def read_latest(directory: Path, speak: bool = True) -> tuple[dict[str, Any], Path] | None:
    """The newest loadable checkpoint in ``directory`` and its path, or None if there is
    none (with a warning that the run starts afresh).

    Args:
        directory: the run's checkpoint folder.
        speak: whether to warn (rank 0 of a distributed run; the others stay quiet).

    Raises:
        RuntimeError: checkpoint files exist but none can be loaded (says what to do).
    """
    newest, previous = directory / CHECKPOINT_NAME, directory / PREVIOUS_NAME
    if not newest.exists() and not previous.exists():
        if speak:
            warn(f"no checkpoint at {newest}; starting from iteration 0")
        return None
    failures: list[str] = []
    for path in (newest, previous):
        if not path.exists():
            failures.append(f"{path} (missing: a crash while saving?)")
            continue
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(state, dict) or state.get("format") != FORMAT:
                raise ValueError("not an effmaml MetaTrainer checkpoint")
        except Exception as err:  # a damaged file fails in many ways inside torch.load
            failures.append(f"{path} ({type(err).__name__}: {str(err)[:200]})")
            continue
        if failures and speak:
            warn(
                f"could not load {failures[0]}; resuming from the previous checkpoint "
                f"{path} (iteration {state.get('iteration')}) instead"
            )
        return state, path
    raise RuntimeError(
        f"no checkpoint in {directory} can be loaded: {'; '.join(failures)}. The files are "
        f"damaged; move them away (or use another checkpoint_dir) to start afresh, or "
        f"call train(..., resume=False)"
    )


def check_model_state(own: Mapping[str, Tensor], saved: Mapping[str, Tensor], source: str) -> None:
    """Raise unless ``saved`` has exactly the names and shapes of ``own``.

    Raises:
        ValueError: names missing or extra, or shapes that differ (the first few of each).
    """
    missing = sorted(set(own) - set(saved))
    extra = sorted(set(saved) - set(own))
    shapes = [
        f"{k}: {tuple(saved[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in saved and saved[k].shape != own[k].shape
    ]
    if missing or extra or shapes:
        parts = []
        if missing:
            parts.append(f"missing from it: {missing[:5]}")
        if extra:
            parts.append(f"not in the model: {extra[:5]}")
        if shapes:
            parts.append(f"shapes differ (checkpoint vs model): {shapes[:5]}")
        raise ValueError(
            f"{source} does not match the model ({'; '.join(parts)}); build the same "
            f"model as the run that wrote it"
        )
