"""Measuring memory and the machine: a block's peak, what is free, the host link.

* ``PeakMemory``: the peak of a block on a device. CUDA: allocator statistics. CPU:
  the process's resident-set high-water mark (``VmHWM``) after resetting it through
  ``/proc/self/clear_refs``, minus the resident set at the start. Before the block it
  hands glibc's freed pages back to the system (``malloc_trim``): memory freed earlier in
  the process but kept by the allocator would otherwise be reused inside the block without
  growing the resident set, and the peak would read low (60 MiB of new tensors measured as
  7 MiB here, ``release_freed``). The most faithful CPU numbers come from a fresh
  process (one run per subprocess) started with ``MALLOC_FOR_MEASURING``, so that freed
  blocks also go back to the system inside the block. Never time under that setting: it
  made ResNet18 runs about 2x slower here.
* ``available_bytes``, ``available_host_bytes``: memory free for new work now.
* ``host_link``: pinned host↔device bandwidth and pinned-allocation rate (CUDA).
* ``clock``: a wall clock that first waits for the device's queued work.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import time

import torch

__all__ = [
    "MALLOC_FOR_MEASURING",
    "PeakMemory",
    "available_bytes",
    "available_host_bytes",
    "clock",
    "current_rss_bytes",
    "host_link",
    "peak_rss_bytes",
    "release_freed",
    "reset_peak_rss",
]


def clock(device: torch.device | str) -> float:
    """``time.perf_counter()`` after the work queued on ``device`` has finished (a CUDA
    synchronize; nothing to wait for on a CPU), so that differences time the device's work
    and not only its launch."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


# the environment of a child process whose peak resident memory is measured: glibc hands
# blocks above 64 KiB back to the system when they are freed
MALLOC_FOR_MEASURING = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def _proc_kib(path: str, field: str) -> int:
    """A ``Field: <n> kB`` line of a /proc file (Linux only)."""
    with open(path) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in {path} (Linux only)")


def _status_kib(field: str) -> int:
    return _proc_kib("/proc/self/status", field)


def current_rss_bytes() -> int:
    """Resident set size of this process now (Linux)."""
    return _status_kib("VmRSS") * 1024


def peak_rss_bytes() -> int:
    """Resident-set high-water mark since start or the last ``reset_peak_rss`` (Linux)."""
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


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        lib = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return lib if lib is not None and hasattr(lib, "malloc_trim") else None


def release_freed() -> bool:
    """Return the pages of freed heap blocks to the system (glibc's ``malloc_trim(0)``).

    A no-op returning False where the C library has no ``malloc_trim`` (musl, macOS).
    Costs a walk over the allocator's free lists: milliseconds.
    """
    lib = _libc()
    if lib is None:
        return False
    lib.malloc_trim(0)
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
            release_freed()  # freed-but-kept heap would be reused unseen (module docstring)
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


def available_bytes(device: torch.device) -> int:
    """Memory free for new work now: ``cuda.mem_get_info`` on CUDA, else MemAvailable.

    Args:
        device: the device whose memory is asked about."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return available_host_bytes()


def available_host_bytes() -> int:
    """Host memory available for new work (MemAvailable; 8 GiB where /proc is missing)."""
    try:
        return _proc_kib("/proc/meminfo", "MemAvailable") * 1024
    except (OSError, RuntimeError):
        return 8 * 2**30


_LINK_BYTES = 64 * 2**20


@functools.cache
def host_link(device: torch.device) -> tuple[float, float]:
    """Pinned host↔device copy bandwidth and pinned-allocation rate, once per process.

    Copies 64 MiB down and up (after one warm-up copy) and times a fresh pinned allocation
    of the same size. Cost: about 100 ms, once.

    Returns:
        ``(copy bytes/s, averaged over both directions; pinned allocation bytes/s)``.
    """
    t0 = clock(device)
    host = torch.empty(_LINK_BYTES, dtype=torch.uint8, pin_memory=True)
    host.fill_(1)
    t_pin = time.perf_counter() - t0
    dev = torch.empty(_LINK_BYTES, dtype=torch.uint8, device=device)
    dev.copy_(host, non_blocking=True)
    t0 = clock(device)
    host.copy_(dev, non_blocking=True)
    dev.copy_(host, non_blocking=True)
    t_copy = clock(device) - t0
    return 2 * _LINK_BYTES / max(t_copy, 1e-9), _LINK_BYTES / max(t_pin, 1e-9)
