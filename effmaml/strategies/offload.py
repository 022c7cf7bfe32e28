"""Offload: uniform checkpointing with the stored states in pinned host memory (CUDA)."""

from __future__ import annotations

import torch

from ..costs import Prediction, Probe, predict_seconds, schedule_peak
from ..engine import Schedule, Store
from ..offload import make_store, pinned_high_water
from ..problem import InnerProblem
from ..schedules import UniformSchedule
from .base import Strategy, register_strategy
from .checkpoint import Checkpoint

__all__ = ["Offload"]


@register_strategy
class Offload(Checkpoint):
    """The ``checkpoint`` schedule with its stored states kept in pinned host memory.

    On CUDA every stored state (segment starts, and with ``pullback="step"`` the states
    re-advanced inside a segment) is copied to pinned host memory on a side stream as soon
    as it is made, and copied back one state ahead of its pullback, overlapping compute.
    Device memory ≈ P + A with ``pullback="step"`` and P + k·A with ``"segment"`` (+ the
    working set), flat in N: the state being prefetched and the graph(s) of the pullback,
    which hold the state it started from; host memory the stored states, (ceil(N/k) − 1 +
    k)·P with ``"step"`` and (ceil(N/k) − 1)·P with ``"segment"``, reported in
    ``Adapted.info["predicted_host_bytes"]`` and checked against
    ``MAML(host_memory_budget=...)`` (default: half the host's available memory) before
    unrolling. Same step evaluations and the same meta-gradient as ``checkpoint``; slower by
    the host traffic (every stored state down and up at the pinned bandwidth) and the
    page-locking of new pinned memory. On a CPU it is ``checkpoint``.

    Args:
        segment: as for ``checkpoint`` (default: ceil(sqrt(N)) for ``"step"``).
        pullback: ``"step"`` (default: one step's graph on the device) or ``"segment"``.
    """

    name = "offload"

    def __init__(self, segment: int | None = None, pullback: str = "step") -> None:
        super().__init__(segment, pullback)

    @classmethod
    def auto_candidates(cls, device: torch.device) -> list[Strategy]:
        # on a CPU offload is checkpoint, which auto weighs already
        if device.type != "cuda":
            return []
        return [cls(pullback="step"), cls(pullback="segment")]

    def store(self, problem: InnerProblem) -> Store:
        return make_store(problem.device)

    def predict(self, schedule: Schedule, problem: InnerProblem, probe: Probe) -> Prediction:
        assert isinstance(schedule, UniformSchedule)
        if not schedule.store.off_device:  # CPU: exactly checkpoint
            return super().predict(schedule, problem, probe)
        n, p = problem.steps, probe.state_bytes
        host = schedule.stored_states(n) * p
        seconds = predict_seconds(
            probe,
            schedule.advances(n),
            n,
            moved_bytes=2 * schedule.moved_states(n) * p,
            pinned_bytes=max(0, host - pinned_high_water()),
            graph_advances=bool(problem.settings.exact_states),
        )
        # on the device: the working state, the one being prefetched, the graph(s)
        peak = schedule_peak(1, schedule.graph_steps(n), probe)
        return Prediction(peak, schedule.step_evals(n) + probe.evals, host, seconds)
