"""Warnings that point at the user's line, not at effmaml's internals."""

from __future__ import annotations

import os
import sys
import warnings
from types import FrameType

import torch

__all__ = ["warn"]

_INTERNAL = (os.path.dirname(os.path.abspath(__file__)), os.path.dirname(torch.__file__))


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` pointing at the user's line: the first frame outside effmaml (and
    outside torch, for warnings raised during a backward the user started)."""
    frame: FrameType | None = sys._getframe(1)
    level = 2
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_INTERNAL):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
