"""Checkpointed MAML: store every k-th inner state, recompute the rest in backward."""

from __future__ import annotations

import math
from typing import Any

import torch

from ..costs import Prediction, Probe, predict_seconds, schedule_peak
from ..engine import Schedule, Store
from ..problem import InnerProblem
from ..schedules import UniformSchedule
from .base import Strategy, check_count, register_strategy
from .scheduled import Scheduled

__all__ = ["Checkpoint", "best_segment"]

PULLBACKS = ("segment", "step")


def best_segment(steps: int, pullback: str, state_bytes: int, step_graph_bytes: int) -> int:
    """The segment length ``k`` that minimises the predicted peak of a uniform schedule.

    * ``pullback="step"``: memory ≈ (ceil(N/k) + k)·P + A, minimised near k = sqrt(N);
      returns ``ceil(sqrt(N))``.
    * ``pullback="segment"``: memory ≈ ceil(N/k)·P + k·A; returns the k in 1..N that
      minimises it (the smallest such k on ties).

    Args:
        steps: N.
        pullback: ``"segment"`` or ``"step"``.
        state_bytes: P, bytes of one inner state.
        step_graph_bytes: A, bytes autograd saves for one second-order step.
    """
    if pullback == "step":
        return max(1, min(steps, math.ceil(math.sqrt(steps))))
    costs = [
        (math.ceil(steps / k) * state_bytes + k * step_graph_bytes, k) for k in range(1, steps + 1)
    ]
    return min(costs)[1]


@register_strategy
class Checkpoint(Scheduled):
    """Uniform checkpointing: trades recomputation for memory, exactly.

    The forward pass runs the inner loop first-order and stores the state (parameters,
    optimizer state, buffers, RNG) at every ``segment``-th step. The backward pass walks
    the segments in reverse:

    * ``pullback="segment"``: recompute the segment with its second-order graph and pull
      the gradient back through it whole. Memory ≈ ceil(N/k)·P + k·A; compute 2N steps.
    * ``pullback="step"``: re-advance the segment without graph, keeping its k states,
      then pull back one step at a time. Memory ≈ (ceil(N/k) + k)·P + A; compute about 3N
      steps (``3N - ceil(N/k)``).

    The meta-gradient equals naive's: parameters, buffers and losses bitwise in float64;
    gradients of quantities read at every step up to summation order.

    A batch sequence is indexed again during the recomputation, so a lazy sequence must
    return the same batch for the same index.

    The first ``adapt`` for a batch signature probes first (``PROBE_EVALS`` = 4 step
    evaluations, see Note [Why checkpoint probes one step]): step evaluations are then
    2N + 4 (``"segment"``) or 3N - ceil(N/k) + 4 (``"step"``), and 2N or 3N - ceil(N/k) on
    later calls.

    Args:
        segment: steps per segment ``k`` (≥ 1; values above N mean one segment), or
            ``None`` to choose it: under a ``memory_budget``, the k with the least
            predicted time (then the least memory) whose predicted peak fits; otherwise
            ``ceil(sqrt(N))`` for ``pullback="step"`` and for ``"segment"`` the k
            minimising ceil(N/k)·P + k·A, with P counted from the state's tensors and A
            measured by the probe step. The resolved k is in ``Adapted.info["segment"]``.
        pullback: ``"segment"`` (default) or ``"step"``.
    """

    name = "checkpoint"

    def __init__(self, segment: int | None = None, pullback: str = "segment") -> None:
        check_count("segment", segment, "; pass segment=None to choose it automatically")
        if pullback not in PULLBACKS:
            raise ValueError(f"pullback must be one of {PULLBACKS} (got {pullback!r})")
        self.segment = segment
        self.pullback = pullback

    def options(self) -> dict[str, Any]:
        return {"segment": self.segment, "pullback": self.pullback}

    @classmethod
    def auto_candidates(cls, device: torch.device) -> list[Strategy]:
        return [cls(pullback="segment"), cls(pullback="step")]

    def store(self, problem: InnerProblem) -> Store:
        return Store()

    def candidates(self, problem: InnerProblem, probe: Probe) -> list[Schedule]:
        n = problem.steps
        store = self.store(problem)
        if self.segment is not None:
            return [UniformSchedule(min(self.segment, n), self.pullback, store)]
        k0 = best_segment(n, self.pullback, probe.state_bytes, probe.step_graph_bytes)
        ks = [k0] + (
            [k for k in range(1, n + 1) if k != k0] if problem.settings.memory_budget else []
        )
        return [UniformSchedule(k, self.pullback, store) for k in ks]

    def predict(self, schedule: Schedule, problem: InnerProblem, probe: Probe) -> Prediction:
        assert isinstance(schedule, UniformSchedule)
        n = problem.steps
        return Prediction(
            schedule_peak(schedule.stored_states(n), schedule.graph_steps(n), probe),
            schedule.step_evals(n) + probe.evals,
            seconds=predict_seconds(
                probe, schedule.advances(n), n, graph_advances=bool(problem.settings.exact_states)
            ),
        )

    def resolved(self, schedule: Schedule) -> dict[str, Any]:
        assert isinstance(schedule, UniformSchedule)
        return {"segment": schedule.segment, "pullback": schedule.pullback}
