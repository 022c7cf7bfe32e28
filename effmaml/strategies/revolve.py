"""Revolve: binomial checkpointing, the least recomputation for a given number of states."""

from __future__ import annotations

from typing import Any

import torch

from ..costs import Prediction, Probe, predict_seconds, schedule_peak
from ..engine import Schedule
from ..problem import InnerProblem
from ..schedules import RevolveSchedule
from .base import Strategy, check_count, register_strategy
from .scheduled import Scheduled

__all__ = ["Revolve"]

DEFAULT_SLOTS = 8


@register_strategy
class Revolve(Scheduled):
    """Binomial checkpointing (Griewank & Walther, Algorithm 799 "revolve"), exact.

    With ``slots = s`` stored states the reversal needs the provably least number of step
    recomputations: a chain of N ≤ C(s + r, s) steps recomputes each step at most r times.
    Every pullback is a single step. Memory ≈ (s + 1)·P + A (+ the working set) for any N:
    the s − 1 stored states besides the input, the working state and the output φ_N;
    step evaluations N + t(N, s) + 1 (t from ``effmaml.schedules.revolve_recomputations``),
    plus the probe's ``PROBE_EVALS`` = 4 on the first call, in
    ``Adapted.info["step_evals_predicted"]``.

    Args:
        slots: stored states, the initial one included (≥ 1). ``None``: under a
            ``memory_budget``, the fastest (most slots) that fit; otherwise 8.
    """

    name = "revolve"

    def __init__(self, slots: int | None = None) -> None:
        check_count("slots", slots, "; one slot holds the initial state")
        self.slots = slots

    def options(self) -> dict[str, Any]:
        return {"slots": self.slots}

    @classmethod
    def auto_candidates(cls, device: torch.device) -> list[Strategy]:
        return [cls()]

    def candidates(self, problem: InnerProblem, probe: Probe) -> list[Schedule]:
        n = problem.steps
        if self.slots is not None:
            return [RevolveSchedule(min(self.slots, n))]
        if problem.settings.memory_budget is None:
            return [RevolveSchedule(min(DEFAULT_SLOTS, n))]
        return [RevolveSchedule(s) for s in range(1, n + 1)]

    def predict(self, schedule: Schedule, problem: InnerProblem, probe: Probe) -> Prediction:
        assert isinstance(schedule, RevolveSchedule)
        n = problem.steps
        # + 1 state: the output φ_N, alive while backward walks the plan
        peak = schedule_peak(schedule.stored_states(n) + 1, 1, probe)
        seconds = predict_seconds(
            probe, schedule.advances(n), n, graph_advances=bool(problem.settings.exact_states)
        )
        return Prediction(peak, schedule.step_evals(n) + probe.evals, seconds=seconds)

    def resolved(self, schedule: Schedule) -> dict[str, Any]:
        assert isinstance(schedule, RevolveSchedule)
        return {"slots": schedule.slots}
