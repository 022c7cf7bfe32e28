"""Auto: the fastest exact strategy predicted to fit a memory budget."""

from __future__ import annotations

import dataclasses
from typing import Any

from ..engine import run_schedule
from ..memory import Prediction, Probe, available_bytes, format_bytes
from ..probe import probe
from ..step import Consts, InnerProblem, InnerState
from .base import Outcome, Strategy, register_strategy
from .checkpoint import Checkpoint
from .naive import Naive
from .offload import Offload
from .revolve import Revolve
from .scheduled import Scheduled

__all__ = ["Auto"]


@register_strategy
class Auto(Strategy):
    """Pick the exact schedule with the least predicted time that fits the budget.

    Considered, from the probe (P, A, the step times t₁ and t₂, on CUDA the pinned
    bandwidth; Note [The time model]): ``naive``, ``checkpoint`` with ``pullback="segment"``
    and ``"step"`` over every segment length, ``revolve`` over every slot count, and on CUDA
    ``offload`` with both pullbacks (its pinned host memory within
    ``host_memory_budget``). Ties go to fewer step evaluations, then the smaller peak. The
    choice is in ``Adapted.info["chosen"]`` with its ``predicted_seconds``; the
    meta-gradient is exact whatever is chosen.

    The budget is ``MAML(..., memory_budget=...)``: device memory on CUDA, resident memory
    on a CPU, above what is in use when ``adapt`` starts. Without one, ``auto`` uses 90% of
    what is free now (``torch.cuda.mem_get_info``, or MemAvailable on Linux).

    Raises:
        MemoryError: nothing fits (names the smallest budget that would), before any
            unrolling.
    """

    name = "auto"
    exact = True

    def options(self) -> dict[str, Any]:
        return {}

    def _options(self, problem: InnerProblem) -> list[Strategy]:
        opts: list[Strategy] = [
            Naive(),
            Checkpoint(pullback="segment"),
            Checkpoint(pullback="step"),
            Revolve(),
        ]
        if problem.device.type == "cuda":
            opts += [Offload(pullback="step"), Offload(pullback="segment")]
        return opts

    def decide(
        self, problem: InnerProblem, pr: Probe
    ) -> tuple[Strategy, Any, Prediction, str, int, list[tuple[str, Prediction]]]:
        """The strategy (and schedule, for scheduled ones) to run, its prediction and label,
        the budget used and what was considered."""
        budget = problem.memory_budget
        if budget is None:
            budget = int(0.9 * available_bytes(problem.device))
        problem = dataclasses.replace(problem, memory_budget=budget)
        considered: list[tuple[str, Prediction]] = []
        best = None
        for st in self._options(problem):
            try:
                if isinstance(st, Scheduled):
                    schedule, pred = st.choose(problem, pr)
                    label = st.label(schedule)
                else:
                    schedule, (label, pred) = None, st.plan(problem, pr)
            except MemoryError:
                continue
            considered.append((label, pred))
            if pred.peak_bytes > budget:
                continue
            key = (pred.seconds, pred.step_evals, pred.peak_bytes)
            if best is None or key < best[0]:
                best = (key, st, schedule, pred, label)
        if best is None:
            one_slot = Revolve(1)
            floor = one_slot.predict(one_slot.candidates(problem, pr)[0], problem, pr)
            raise MemoryError(
                f"no exact strategy fits memory_budget={format_bytes(budget)} for N="
                f"{problem.steps} steps (state P={format_bytes(pr.state_bytes)}, one step's "
                f"graph A={format_bytes(pr.step_graph_bytes)}); the smallest feasible budget "
                f"is about {format_bytes(floor.peak_bytes)}: raise the budget, shrink the "
                f"batch, or use strategy='first_order'"
            )
        _, st, schedule, pred, label = best
        return st, schedule, pred, label, budget, considered

    def plan(self, problem: InnerProblem, probe: Probe) -> tuple[str, Prediction]:
        _, _, pred, label, _, _ = self.decide(problem, probe)
        return f"auto -> {label}", pred

    def run(self, problem: InnerProblem, state0: InnerState, consts: Consts) -> Outcome:
        pr = probe(problem, state0, consts, problem.probe_cache)
        st, schedule, pred, label, budget, considered = self.decide(problem, pr)
        info: dict[str, Any] = {
            "chosen": label,
            "memory_budget": budget,
            "considered": considered,
            "state_bytes": pr.state_bytes,
            "step_graph_bytes": pr.step_graph_bytes,
            "probe_evals": pr.evals,
            "probe_seconds": pr.seconds,
            "step_evals_predicted": pred.step_evals,
            "predicted_peak_bytes": pred.peak_bytes,
            "predicted_host_bytes": pred.host_bytes,
            "predicted_seconds": pred.seconds,
        }
        if schedule is None:
            out = st.run(problem, state0, consts)
            return Outcome(out.state, out.losses, {**out.info, **info})
        assert isinstance(st, Scheduled)
        state, losses = run_schedule(problem, state0, consts, schedule)
        info.update(st.resolved(schedule))
        info["schedule"] = schedule
        return Outcome(state, list(losses.unbind(0)), info)
