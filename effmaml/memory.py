"""Counting bytes: what tensors, states and autograd's saved tensors cost.

* ``nbytes`` (what a copy of some tensors costs) and ``saved_bytes`` (what autograd keeps
  for backward, counted by distinct storage);
* ``parse_bytes`` / ``format_bytes``.

The cost model built on these counts (P, A, the peak and time formulas) is
``effmaml.costs``; measuring (peaks, free memory, the host link) is ``effmaml.measure``.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["SavedBytes", "format_bytes", "nbytes", "parse_bytes", "saved_bytes"]


# -- counting bytes ----------------------------------------------------------------------------
def nbytes(tensors: Iterable[Tensor]) -> int:
    """Bytes of the tensors' elements (what copying them costs, e.g. one inner state P)."""
    return sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class SavedBytes:
    """Result of ``saved_bytes``: ``bytes`` saved for backward inside the block, and
    the distinct storages they are in (``(device, data_ptr) -> bytes``)."""

    bytes: int = 0
    storages: dict[tuple[str, int], int] = field(default_factory=dict)

    def without(self, tensors: Iterable[Tensor]) -> int:
        """``bytes`` less the storages of ``tensors`` that were saved (counted elsewhere)."""
        keys = {(str(t.device), t.untyped_storage().data_ptr()) for t in tensors}
        return self.bytes - sum(n for k, n in self.storages.items() if k in keys)


@contextlib.contextmanager
def saved_bytes() -> Iterator[SavedBytes]:
    """Count the bytes autograd saves for backward inside the block (deduplicated by storage).

    For measuring only: a graph recorded inside the block keeps detached aliases of what it
    saved, so do not backpropagate through it.

    Example:
        >>> with saved_bytes() as c:
        ...     y = (x * x).sum()
        >>> c.bytes  # the storage of x, saved once even though it is used twice

    Yields:
        A ``SavedBytes`` whose ``bytes`` is final when the block exits.
    """
    result = SavedBytes()

    def pack(t: Tensor) -> Tensor:
        st = t.untyped_storage()
        key = (str(t.device), st.data_ptr())
        if key not in result.storages and st.data_ptr() != 0:
            result.storages[key] = st.nbytes()
            result.bytes += st.nbytes()
        # Note [Saved-tensor hooks and reference cycles]
        # Returning ``t`` itself would store a saved output inside its own grad_fn, a cycle
        # through C++ that Python's gc cannot see: the whole probe graph would leak. A
        # detached alias shares the storage (so the count is right) without the cycle.
        return t.detach()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield result


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "K": 2**10})
_UNITS.update({"M": 2**20, "G": 2**30, "T": 2**40})


def parse_bytes(value: int | float | str) -> int:
    """``"6GiB"``, ``"512 MiB"``, ``"1.5GB"`` or a number of bytes -> bytes.

    Args:
        value: a size with an SI or IEC unit (case-insensitive), or a number of bytes.

    Returns:
        Bytes.

    Raises:
        ValueError: not a size, or not positive.
    """
    if isinstance(value, bool):
        raise ValueError(f"not a memory size: {value!r}")
    if isinstance(value, (int, float)):
        n = float(value)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(value))
        if not m or m.group(2).upper() not in _UNITS:
            raise ValueError(
                f"not a memory size: {value!r}; write it like '6GiB', '512MiB', '1.5GB' or give "
                f"a number of bytes"
            )
        n = float(m.group(1)) * _UNITS[m.group(2).upper()]
    if not n > 0 or not math.isfinite(n):
        raise ValueError(f"a memory size must be a positive number of bytes (got {value!r})")
    return int(n)


def format_bytes(n: float) -> str:
    """Bytes as a short human string (``1.50 GiB``).

    Args:
        n: bytes.
    """
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"
