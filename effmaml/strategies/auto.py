"""Auto: the fastest exact strategy predicted to fit a memory budget."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..costs import Prediction, Probe
from ..engine import Schedule
from ..measure import available_bytes
from ..memory import format_bytes
from ..probe import probe
from ..step import Consts, InnerProblem, InnerState, Runtime
from .base import STRATEGIES, Outcome, Strategy, register_strategy
from .scheduled import Scheduled

__all__ = ["Auto", "Decision"]


@dataclass(frozen=True)
class Decision:
    """What ``auto`` chose.

    Attributes:
        strategy: the exact strategy to run.
        schedule: its schedule (None for ``naive``).
        prediction: its predicted cost.
        label: the strategy with its resolved options.
        budget: the memory budget the choice fits (bytes).
        considered: every candidate's label and prediction (the best of each strategy).
    """

    strategy: Strategy
    schedule: Schedule | None
    prediction: Prediction
    label: str
    budget: int
    considered: tuple[tuple[str, Prediction], ...]


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

    def decide(self, problem: InnerProblem, pr: Probe) -> Decision:
        """The fastest candidate that fits (see the class docstring).

        Raises:
            MemoryError: nothing fits.
        """
        budget = problem.settings.memory_budget
        if budget is None:
            budget = int(0.9 * available_bytes(problem.device))
        problem = problem.with_settings(memory_budget=budget)
        considered: list[tuple[str, Prediction]] = []
        best: tuple[tuple, Decision] | None = None
        for st in self.candidates(problem):
            try:
                if isinstance(st, Scheduled):
                    schedule, pred = st.choose(problem, pr)
                    label = st.label(schedule)
                else:
                    schedule, (label, pred) = None, st.plan(problem, pr)
            except MemoryError:
                continue
            considered.append((label, pred))
            key = (pred.seconds, pred.step_evals, pred.peak_bytes)
            if pred.peak_bytes <= budget and (best is None or key < best[0]):
                best = (key, Decision(st, schedule, pred, label, budget, ()))
        if best is None:
            floor = min(
                p.peak_bytes
                for st in self.candidates(problem)
                for p in (
                    [p for _, p in st.predictions(problem, pr)]
                    if isinstance(st, Scheduled)
                    else [st.plan(problem, pr)[1]]
                )
            )
            raise MemoryError(
                f"no exact strategy fits memory_budget={format_bytes(budget)} for N="
                f"{problem.steps} steps (state P={format_bytes(pr.state_bytes)}, one step's "
                f"graph A={format_bytes(pr.step_graph_bytes)}); the smallest feasible budget "
                f"is about {format_bytes(floor)}: raise the budget, shrink the "
                f"batch, or use strategy='first_order'"
            )
        return dataclasses.replace(best[1], considered=tuple(considered))

    def plan(self, problem: InnerProblem, probe: Probe) -> tuple[str, Prediction]:
        d = self.decide(problem, probe)
        return f"auto -> {d.label}", d.prediction

    def check_budget(
        self, problem: InnerProblem, rt: Runtime, state0: InnerState, consts: Consts
    ) -> None:
        """Nothing: ``decide`` holds the budget as it chooses (in ``run``)."""

    def run(
        self, problem: InnerProblem, rt: Runtime, state0: InnerState, consts: Consts
    ) -> Outcome:
        pr = probe(problem, rt, state0, consts)
        d = self.decide(problem, pr)
        if isinstance(d.strategy, Scheduled):
            assert d.schedule is not None
            out = d.strategy.execute(problem, rt, state0, consts, d.schedule, d.prediction, pr)
        else:
            out = d.strategy.run(problem, rt, state0, consts)
        facts = dataclasses.replace(
            out.facts,
            strategy=f"auto -> {d.label}",
            probe=pr,
            prediction=d.prediction,
            chosen=d.label,
            memory_budget=d.budget,
            considered=d.considered,
        )
        return Outcome(out.state, out.losses, facts, out.queries, out.query_loss)
