"""Counting, measuring and predicting memory.

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
import dataclasses
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "PeakMemory",
    "Prediction",
    "Probe",
    "SavedBytes",
    "available_bytes",
    "available_host_bytes",
    "current_rss_bytes",
    "estimate",
    "format_bytes",
    "parse_bytes",
    "peak_rss_bytes",
    "predict_seconds",
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


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "K": 2**10})
_UNITS.update({"M": 2**20, "G": 2**30, "T": 2**40})


def parse_bytes(value: int | float | str) -> int:
    """``"6GiB"``, ``"512 MiB"``, ``"1.5GB"`` or a number of bytes -> bytes.

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


def available_bytes(device: torch.device) -> int:
    """Memory free for new work now: ``cuda.mem_get_info`` on CUDA, else MemAvailable."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return available_host_bytes()


def available_host_bytes() -> int:
    """Host memory available for new work (MemAvailable; 8 GiB where /proc is missing)."""
    try:
        return _proc_kib("/proc/meminfo", "MemAvailable") * 1024
    except (OSError, RuntimeError):
        return 8 * 2**30


def format_bytes(n: float) -> str:
    """Bytes as a short human string (``1.50 GiB``)."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


@dataclass(frozen=True)
class Probe:
    """What the probe steps measure (:func:`effmaml.probe.probe`).

    Attributes:
        state_bytes: P, the inner state (adapted parameters, optimizer state, buffers).
        param_bytes: the adapted parameters alone.
        step_graph_bytes: A, the bytes autograd saves for one step with its second-order
            graph (deduplicated by storage).
        first_order_graph_bytes: the same for a first-order step; 0 if not measured.
        advance_seconds: t₁, one first-order step (an ``advance``); 0 if not measured.
        pullback_seconds: t₂, one step with its graph plus its pullback; 0 if not measured.
        host_bandwidth: bytes/s of a pinned host↔device copy (CUDA; 0 elsewhere).
        pin_bandwidth: bytes/s at which new pinned host memory is allocated (CUDA).
        seconds: what the probe itself took (0 when it came from the cache).
        evals: step evaluations the probe ran (0 when it came from the cache).
    """

    state_bytes: int
    param_bytes: int
    step_graph_bytes: int
    first_order_graph_bytes: int = 0
    advance_seconds: float = 0.0
    pullback_seconds: float = 0.0
    host_bandwidth: float = 0.0
    pin_bandwidth: float = 0.0
    seconds: float = 0.0
    evals: int = 0

    def first_order_bytes(self) -> int:
        """The first-order graph, or A as its upper bound when it was not measured."""
        return self.first_order_graph_bytes or self.step_graph_bytes


@dataclass(frozen=True)
class Prediction:
    """A schedule's predicted cost for one meta-gradient (adapt + query backward).

    Attributes:
        peak_bytes: device memory above what was in use before ``adapt`` (CPU: resident).
        step_evals: inner-step evaluations, the probe steps included.
        host_bytes: pinned host memory (``offload`` on CUDA), else 0.
        seconds: predicted wall time of adapt + the query's backward, the probe included.
    """

    peak_bytes: int
    step_evals: int
    host_bytes: int = 0
    seconds: float = 0.0


def predict_seconds(
    probe: Probe,
    advances: int,
    pullbacks: int,
    moved_bytes: int = 0,
    pinned_bytes: int = 0,
) -> float:
    """Wall time of one meta-gradient from the probe's timings and a schedule's counts.

    # Note [The time model]
    # Every exact schedule pulls each step back exactly once (a step recomputed with its
    # graph and differentiated: t₂ each, naive's forward + backward included) and differs in
    # how many steps it runs without graph (advances: t₁ each): checkpoint(segment) N,
    # checkpoint(step) 2N − ceil(N/k), revolve the binomial count, first_order N. Offload
    # adds its host traffic (each stored state down and up again) at the measured pinned
    # bandwidth, and the pinned memory it must newly allocate (page-locking is slow: on an
    # H200 it made offload with segment=1 2.4x slower than checkpoint). The query loss's
    # forward and backward cost about one first-order step. The probe's own time is added
    # by the caller when the probe ran in this call.

    Args:
        probe: the probe (t₁, t₂, bandwidths).
        advances: steps run without graph.
        pullbacks: steps pulled back (recomputed with graph and differentiated).
        moved_bytes: bytes copied between host and device, both directions together.
        pinned_bytes: new pinned host memory to allocate.

    Returns:
        Seconds (0 when the probe measured no times).
    """
    t = (advances + 1) * probe.advance_seconds + pullbacks * probe.pullback_seconds
    if moved_bytes and probe.host_bandwidth:
        t += moved_bytes / probe.host_bandwidth
    if pinned_bytes and probe.pin_bandwidth:
        t += pinned_bytes / probe.pin_bandwidth
    return t + probe.seconds


def estimate(
    maml: Any, batch: Any, steps: int, strategy: Any = None, **options: Any
) -> dict[str, Prediction]:
    """Predict peak memory, step evaluations and seconds of every schedule, from the probe.

    The probe (:func:`effmaml.probe.probe`) runs on ``batch``: P (the state's bytes), A
    (the bytes autograd saves for a second-order step), t₁ and t₂ (a first-order step, a
    step with graph and its pullback); each strategy's formulas turn them into a
    prediction. Nothing else runs; the model is not changed. The probe's result is cached
    on ``maml``, so a following ``adapt`` with batches like ``batch`` does not probe again:
    the predictions are for that ``adapt`` (without the probe's evaluations and time).

    Args:
        maml: an :class:`effmaml.MAML` (its model, loss, inner optimizer, options).
        batch: one batch like those ``adapt`` will get.
        steps: N.
        strategy: a name or instance to predict for alone (with ``options``); default all:
            ``naive``, ``checkpoint`` (both pullbacks, segment chosen), ``revolve`` with
            2, 4 and 8 slots, ``offload`` on CUDA, and the automatic choice.

    Returns:
        label -> :class:`Prediction` (labels like ``"checkpoint(segment=7, pullback='step')"``).
    """
    from .probe import probe
    from .strategies import make_strategy

    problem, state0, consts = maml.problem(batch, steps)
    pr = probe(problem, state0, consts, problem.probe_cache)
    pr = dataclasses.replace(pr, evals=0, seconds=0.0)  # the next adapt will not probe
    if strategy is not None:
        chosen = [make_strategy(strategy, **options)]
    else:
        chosen = [make_strategy("naive"), make_strategy("checkpoint", pullback="segment")]
        chosen += [make_strategy("checkpoint", pullback="step")]
        chosen += [make_strategy("revolve", slots=s) for s in (2, 4, 8)]
        if problem.device.type == "cuda":
            chosen.append(make_strategy("offload"))
    out: dict[str, Prediction] = {}
    for st in chosen:
        label, pred = st.plan(problem, pr)
        out[label] = pred
    return out
