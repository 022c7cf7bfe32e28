"""Auto: the fastest exact strategy whose predicted peak fits a memory budget."""

from __future__ import annotations

import dataclasses
from typing import Any

from ..engine import run_schedule
from ..memory import Prediction, Probe, available_bytes, format_bytes
from ..step import Consts, InnerProblem, InnerState
from .base import Outcome, Strategy, register_strategy
from .checkpoint import Checkpoint
from .naive import Naive
from .offload import Offload
from .revolve import Revolve
from .scheduled import Scheduled, probe

__all__ = ["Auto"]


@register_strategy
class Auto(Strategy):
    """Pick the exact strategy with the fewest step evaluations that fits the budget.

    Considered, from one probe step (P and A): ``naive`` (N steps),
    ``checkpoint`` with ``pullback="segment"`` (2N) and ``"step"`` (≈3N) over every
    segment length, ``offload`` on CUDA (≈3N, device memory flat in N) and ``revolve`` over
    every slot count (fewest recomputations that fit). Ties go to the smaller predicted
    peak. The choice is in ``Adapted.info["chosen"]``; the meta-gradient is exact whatever
    is chosen.

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
            opts.append(Offload())
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
                    label = st.plan(problem, pr)[0]
                else:
                    schedule, (label, pred) = None, st.plan(problem, pr)
            except MemoryError:
                continue
            considered.append((label, pred))
            if pred.peak_bytes > budget:
                continue
            key = (pred.step_evals, pred.peak_bytes)
            if best is None or key < best[0]:
                best = (key, st, schedule, pred, label)
        if best is None:
            floor = min(
                Revolve(1)
                .predict(Revolve(1).candidates(problem, pr)[0], problem.steps, pr)
                .peak_bytes,
                *(p.peak_bytes for _, p in considered),
            )
            raise MemoryError(
                f"no exact strategy fits memory_budget={format_bytes(budget)} for N="
                f"{problem.steps} steps (state P={format_bytes(pr.state_bytes)}, one step's "
                f"graph A={format_bytes(pr.step_graph_bytes)}); the smallest feasible budget "
                f"is about {format_bytes(floor)}: raise the budget, shrink the batch, or use "
                f"strategy='first_order'"
            )
        _, st, schedule, pred, label = best
        return st, schedule, pred, label, budget, considered

    def plan(self, problem: InnerProblem, probe: Probe) -> tuple[str, Prediction]:
        _, _, pred, label, _, _ = self.decide(problem, probe)
        return f"auto -> {label}", pred

    def run(self, problem: InnerProblem, state0: InnerState, consts: Consts) -> Outcome:
        pr = probe(problem, state0, consts)
        st, schedule, pred, label, budget, considered = self.decide(problem, pr)
        info: dict[str, Any] = {
            "chosen": label,
            "memory_budget": budget,
            "considered": considered,
            "state_bytes": pr.state_bytes,
            "step_graph_bytes": pr.step_graph_bytes,
            "probe_evals": 1,
            "step_evals_predicted": pred.step_evals + (1 if schedule is None else 0),
            "predicted_peak_bytes": pred.peak_bytes,
            "predicted_host_bytes": pred.host_bytes,
        }
        if schedule is None:
            out = st.run(problem, state0, consts)
            return Outcome(out.state, out.losses, {**out.info, **info})
        assert isinstance(st, Scheduled)
        state, losses = run_schedule(problem, state0, consts, schedule)
        info.update(st.resolved(schedule))
        return Outcome(state, list(losses.unbind(0)), info)
