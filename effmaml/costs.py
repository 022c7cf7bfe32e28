"""The cost model: a schedule's peak memory and time, predicted from what the probe measured.

Everything effmaml predicts comes from here, from a few measured quantities (``Probe``:
P one inner state, A one step's second-order graph, t₁ and t₂ two step times) and each
schedule's counts (states stored, graphs alive, steps advanced):

* peak memory: ``working_bytes``, ``schedule_peak``, ``naive_peak``,
  ``first_order_peak``, ``implicit_peak``, with their calibration notes;
* time: ``predict_seconds`` (Note [The time model]).

Counting bytes is ``effmaml.memory``; measuring is ``effmaml.measure``; a whole
prediction for a model and a batch is ``effmaml.MAML.estimate``.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "Prediction",
    "Probe",
    "first_order_peak",
    "implicit_peak",
    "naive_peak",
    "predict_seconds",
    "schedule_peak",
    "working_bytes",
]


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
    graphs = 1; truncated: states = 1 (the state at the window's start), graphs = K.
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
    # here: Probe.seconds, 0 when the probe's result came from the cache.
    step = probe.graph_step_seconds if graph_advances and probe.graph_step_seconds else 0.0
    t = probe.advance_seconds + advances * (step or probe.advance_seconds)
    t += pullbacks * probe.pullback_seconds
    if moved_bytes and probe.host_bandwidth:
        t += moved_bytes / probe.host_bandwidth
    if pinned_bytes and probe.pin_bandwidth:
        t += pinned_bytes / probe.pin_bandwidth
    return t + probe.seconds
