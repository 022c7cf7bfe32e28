"""The cost model: counting bytes, and predicting a schedule's memory and time.

Everything effmaml predicts comes from here, from a few measured quantities
(``Probe``: P one inner state, A one step's second-order graph, t₁ and t₂ two step
times) and each schedule's counts (states stored, graphs alive, steps advanced):

* byte counting: ``nbytes`` (what a copy of some tensors costs), ``storage_bytes``
  and ``saved_bytes`` (distinct storages; what autograd keeps for backward);
* ``parse_bytes`` / ``format_bytes``;
* peak memory: ``working_bytes``, ``schedule_peak``, ``naive_peak``,
  ``first_order_peak``, ``implicit_peak``, with their calibration notes;
* time: ``predict_seconds`` (Note [The time model]).

Measuring (peaks, free memory, the host link) is ``effmaml.measure``; a whole prediction
for a model and a batch is ``effmaml.MAML.estimate``.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .measure import (
    PeakMemory,
    available_bytes,
    available_host_bytes,
    current_rss_bytes,
    peak_rss_bytes,
    reset_peak_rss,
)

__all__ = [
    "PeakMemory",
    "Prediction",
    "Probe",
    "SavedBytes",
    "available_bytes",
    "available_host_bytes",
    "current_rss_bytes",
    "first_order_peak",
    "format_bytes",
    "implicit_peak",
    "naive_peak",
    "nbytes",
    "parse_bytes",
    "peak_rss_bytes",
    "predict_seconds",
    "reset_peak_rss",
    "saved_bytes",
    "schedule_peak",
    "storage_bytes",
    "working_bytes",
]


# -- counting bytes ----------------------------------------------------------------------------
def nbytes(tensors: Iterable[Tensor]) -> int:
    """Bytes of the tensors' elements (what copying them costs, e.g. one inner state P)."""
    return sum(t.numel() * t.element_size() for t in tensors)


def storage_bytes(tensors: Iterable[Any]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views and repeats counted once)."""
    seen: dict[tuple[str, int], int] = {}
    for t in tensors:
        if isinstance(t, Tensor):
            st = t.untyped_storage()
            seen[(str(t.device), st.data_ptr())] = st.nbytes()
    return sum(seen.values())


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


@dataclass(frozen=True)
class Probe:
    """What the probe steps measure (``effmaml.probe.probe``).

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
        graph_step_seconds: one step with its second-order graph, without the pullback
            (the cost of an advance under ``exact_states``); 0 if not measured.
        first_order_exact: whether a first-order step gives bitwise the state a step with
            graph gives (Note [States bitwise naive's]).
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
    graph_step_seconds: float = 0.0
    first_order_exact: bool = True

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


# -- peak memory -------------------------------------------------------------------------------
# Every formula predicts the peak above what was in use when adapt started, for one
# meta-gradient (adapt + the query's backward). Calibrated against measured peaks on the
# bench presets: ResNet18 at 8x3x64x64 on a 2-core CPU (results/cpu-small) and at
# 16x3x224x224 on an H200 (results/resnet18-224): within ±8% for the exact schedules, see
# the "predicted vs measured" columns there.


def working_bytes(probe: Probe) -> int:
    """What every exact backward needs besides stored states and graphs."""
    # Note [The working set of a pullback]
    # While one step's graph is pulled back, autograd holds its gradient buffers and
    # temporaries (about one more A at the widest op), plus the cotangent arriving at the
    # adapted parameters and the meta-gradient accumulating for them (two copies of the
    # parameters). Calibrated on ResNet18 with SGD, where the parameters are the state;
    # GPT-2 with Adam (whose state is three times its parameters) showed that it is the
    # parameters, not the whole state: A + 2P over-predicted its schedules by 12-25%,
    # A + 2 x parameters is within 11% (results/gpt2-cpu).
    return probe.step_graph_bytes + 2 * probe.param_bytes


def schedule_peak(states: int, graphs: int, probe: Probe) -> int:
    """A schedule's peak: ``states`` inner states and ``graphs`` steps' second-order graphs
    alive at once on the device, plus the working set of a pullback.

    Uniform checkpointing: states = the stored ones (segment starts, and with
    ``pullback="step"`` a segment's k states), graphs = k or 1; offload: states = 1 (the
    one being prefetched; the rest are on the host); revolve: the slots + the output φ_N,
    graphs = 1.
    """
    return states * probe.state_bytes + graphs * probe.step_graph_bytes + working_bytes(probe)


def naive_peak(steps: int, probe: Probe) -> int:
    """Naive: every step's graph (N·A; its states are inside the graphs) + the working set."""
    return steps * probe.step_graph_bytes + working_bytes(probe)


def first_order_peak(probe: Probe) -> int:
    """First order: the working state, its successor and the output; one first-order graph."""
    return 3 * probe.state_bytes + probe.first_order_bytes()


def implicit_peak(probe: Probe) -> int:
    """iMAML's conjugate-gradient solve at φ_N.

    φ_N and the output (2P), CG's 4 vectors and the product's operands and results (7 copies
    of the adapted parameters), one Hessian-vector product's graph and its working set,
    and the second backward's temporaries: A/2, calibrated between the CPU preset (where it
    overestimates by 9%) and the H200 (where cuDNN's double-backward workspaces make it
    underestimate by 6%). Never below the first-order unroll that precedes the solve.
    """
    solve = 2 * probe.state_bytes + 7 * probe.param_bytes + working_bytes(probe)
    solve += probe.step_graph_bytes // 2
    return max(solve, first_order_peak(probe))


# -- time ----------------------------------------------------------------------------------------
def predict_seconds(
    probe: Probe,
    advances: int,
    pullbacks: int,
    moved_bytes: int = 0,
    pinned_bytes: int = 0,
    graph_advances: bool = False,
) -> float:
    """Wall time of one meta-gradient from the probe's timings and a schedule's counts.


    Args:
        probe: the probe (t₁, t₂, bandwidths).
        advances: steps run without graph.
        pullbacks: steps pulled back (recomputed with graph and differentiated).
        moved_bytes: bytes copied between host and device, both directions together.
        pinned_bytes: new pinned host memory to allocate.
        graph_advances: the advances keep each step's graph (``exact_states``): each
            costs a step with graph, not a first-order step.

    Returns:
        Seconds (0 when the probe measured no times).
    """
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
    step = probe.graph_step_seconds if graph_advances and probe.graph_step_seconds else 0.0
    t = probe.advance_seconds + advances * (step or probe.advance_seconds)
    t += pullbacks * probe.pullback_seconds
    if moved_bytes and probe.host_bandwidth:
        t += moved_bytes / probe.host_bandwidth
    if pinned_bytes and probe.pin_bandwidth:
        t += pinned_bytes / probe.pin_bandwidth
    return t + probe.seconds
