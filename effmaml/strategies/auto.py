"""Auto: the fastest exact strategy predicted to fit a memory budget."""

from __future__ import annotations

import dataclasses

from ..costs import Probe
from ..measure import available_bytes
from ..memory import format_bytes
from ..problem import InnerProblem
from .base import STRATEGIES, Plan, Strategy, fastest, register_strategy

__all__ = ["Auto"]


@register_strategy
class Auto(Strategy):
    """Pick the exact schedule with the least predicted time that fits the budget.

    Considered, from the probe (P, A, the step times t₁ and t₂, on CUDA the pinned
    bandwidth; Note [The time model]): what every registered exact strategy offers
    (``Strategy.auto_candidates``): ``naive``, ``checkpoint`` with ``pullback="segment"``
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

    @staticmethod
    def candidates(problem: InnerProblem) -> list[Strategy]:
        """Every registered exact strategy's candidates on the problem's device."""
        return [
            st
            for cls in STRATEGIES.values()
            if cls.exact and cls is not Auto
            for st in cls.auto_candidates(problem.device)
        ]

    def wants_probe(self, problem: InnerProblem) -> bool:
        return True

    def plans(self, problem: InnerProblem, probe: Probe | None) -> list[Plan]:
        """Every candidate's plans under the budget (``auto``'s default where none is
        given): each candidate strategy's own ``plans``."""
        assert probe is not None, "auto plans from the probe"
        problem = _with_budget(problem)
        return [p for st in self.candidates(problem) for p in st.plans(problem, probe)]

    def plan_or_default(self, problem: InnerProblem, probe: Probe | None) -> Plan:
        """``plan``: ``auto`` has no default to fall back on (that nothing fits is its
        error, with the smallest budget that would do)."""
        return self.plan(problem, probe)

    def plan(self, problem: InnerProblem, probe: Probe | None) -> Plan:
        """The fastest candidate plan that fits (``fastest``; see the class docstring):
        the chosen strategy's plan, labelled ``"auto -> ..."``, with the budget and every
        candidate's own plan under it, or its default where none fits (``considered``).

        Raises:
            MemoryError: nothing fits (names the smallest budget that would).
        """
        assert probe is not None, "auto plans from the probe"
        problem = _with_budget(problem)
        budget = problem.settings.memory_budget
        assert budget is not None
        fit: list[Plan] = []  # each candidate's plan under the budget (and the host's)
        best: list[Plan] = []  # and, where it has none, its default plan, over the budget
        for st in self.candidates(problem):
            try:
                fit.append(st.plan(problem, probe))
                best.append(fit[-1])
            except MemoryError:
                best.append(st.plans(problem, probe)[0])
        chosen = fastest(fit, budget)
        if chosen is None:
            floor = min(
                p.prediction.peak_bytes
                for p in self.plans(problem, probe)
                if p.prediction is not None
            )
            raise MemoryError(
                f"no exact strategy fits memory_budget={format_bytes(budget)} for N="
                f"{problem.steps} steps (state P={format_bytes(probe.state_bytes)}, one step's "
                f"graph A={format_bytes(probe.step_graph_bytes)}); the smallest feasible budget "
                f"is about {format_bytes(floor)}: raise the budget, shrink the "
                f"batch, or use strategy='first_order'"
            )
        considered = tuple((p.label, p.prediction) for p in best if p.prediction is not None)
        return dataclasses.replace(
            chosen,
            label=f"auto -> {chosen.label}",
            chosen=chosen.label,
            memory_budget=budget,
            considered=considered,
        )


def _with_budget(problem: InnerProblem) -> InnerProblem:
    """The problem with ``auto``'s budget: the user's, or 90% of what is free now."""
    if problem.settings.memory_budget is not None:
        return problem
    return problem.with_settings(memory_budget=int(0.9 * available_bytes(problem.device)))
