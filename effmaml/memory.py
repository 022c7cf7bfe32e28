"""Counting and measuring memory.

* :func:`saved_bytes`: exact and device-independent, the bytes autograd saves for backward
  inside a block (deduplicated by storage), via
  :func:`torch.autograd.graph.saved_tensors_hooks`. This is how ``A``, one step's
  second-order graph, is measured.
* :class:`PeakMemory`: the peak of a block on a device. CUDA: allocator statistics. CPU:
  the process's resident-set high-water mark (``VmHWM``) after resetting it through
  ``/proc/self/clear_refs``, minus the resident set at the start. On CPU the numbers are
  only meaningful in a fresh process (one run per subprocess) started with
  ``MALLOC_MMAP_THRESHOLD_=65536``, so that glibc returns freed blocks to the system.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "PeakMemory",
    "SavedBytes",
    "current_rss_bytes",
    "peak_rss_bytes",
    "reset_peak_rss",
    "saved_bytes",
    "tensor_bytes",
]


def tensor_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors``."""
    seen: dict[tuple[str, int], int] = {}
    for t in tensors:
        if isinstance(t, Tensor):
            st = t.untyped_storage()
            seen[(str(t.device), st.data_ptr())] = st.nbytes()
    return sum(seen.values())


@dataclass
class SavedBytes:
    """Result of :func:`saved_bytes`: ``bytes`` saved for backward inside the block."""

    bytes: int = 0


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
        A :class:`SavedBytes` whose ``bytes`` is final when the block exits.
    """
    result = SavedBytes()
    seen: set[tuple[str, int]] = set()

    def pack(t: Tensor) -> Tensor:
        st = t.untyped_storage()
        key = (str(t.device), st.data_ptr())
        if key not in seen and st.data_ptr() != 0:
            seen.add(key)
            result.bytes += st.nbytes()
        # Note [Saved-tensor hooks and reference cycles]
        # Returning ``t`` itself would store a saved output inside its own grad_fn, a cycle
        # through C++ that Python's gc cannot see: the whole probe graph would leak. A
        # detached alias shares the storage (so the count is right) without the cycle.
        return t.detach()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield result


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status (Linux only)")


def current_rss_bytes() -> int:
    """Resident set size of this process now (Linux)."""
    return _status_kib("VmRSS") * 1024


def peak_rss_bytes() -> int:
    """Resident-set high-water mark since start or the last :func:`reset_peak_rss` (Linux)."""
    return _status_kib("VmHWM") * 1024


def reset_peak_rss() -> bool:
    """Reset the high-water mark to the current RSS (writes 5 to /proc/self/clear_refs).

    Returns:
        Whether the kernel accepted the reset (False in some sandboxes).
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


class PeakMemory:
    """Peak memory of a block, above what was in use when it started.

    Args:
        device: where the work runs. CUDA: ``max_memory_allocated`` and
            ``max_memory_reserved`` after ``reset_peak_memory_stats``. CPU: VmHWM after
            resetting it, minus the RSS at the start.

    Attributes (after the block):
        peak: bytes above the start (allocated on CUDA, resident on CPU).
        reserved: CUDA bytes reserved by the caching allocator at the peak (CPU: = peak).
        kind: ``"cuda_allocated"`` or ``"cpu_rss_hwm"``; ``"cpu_rss_hwm_noreset"`` when
            the kernel refused the reset (the peak then includes earlier history).
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.peak = 0
        self.reserved = 0
        self.kind = ""

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            self._base_res = torch.cuda.memory_reserved(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.kind = "cuda_allocated"
        else:
            ok = reset_peak_rss()
            self._base = current_rss_bytes()
            self.kind = "cpu_rss_hwm" if ok else "cpu_rss_hwm_noreset"
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._base
            self.reserved = torch.cuda.max_memory_reserved(self.device) - self._base_res
        else:
            self.peak = peak_rss_bytes() - self._base
            self.reserved = self.peak
