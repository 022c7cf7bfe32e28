"""The base of every checkpointing strategy: probe, plan a schedule, execute it."""

from __future__ import annotations

import dataclasses
from typing import Any

from ..costs import Prediction, Probe
from ..engine import Schedule, run_schedule
from ..measure import available_host_bytes
from ..memory import format_bytes
from ..problem import InnerProblem, Runtime
from ..sources import outer_bytes
from ..state import Consts, InnerState
from .base import Outcome, Plan, Strategy, fastest, fits, multi_step_loss

__all__ = ["HOST_BUDGET_FRACTION", "Scheduled", "host_budget", "resolve_states", "with_outer"]

# the share of the host's available memory that offload may pin when no
# host_memory_budget is given: page-locked memory cannot be swapped, and pinning most of
# the RAM can take the machine down
HOST_BUDGET_FRACTION = 0.5


def resolve_states(problem: InnerProblem, probe: Probe) -> InnerProblem:
    """The problem with ``exact_states`` decided: the user's choice, or what the probe
    found (Note [States bitwise naive's]): keep each advance's graph only where a
    first-order step does not reproduce a step with graph."""
    if problem.settings.exact_states is not None:
        return problem
    return problem.with_settings(exact_states=not probe.first_order_exact)


def host_budget(problem: InnerProblem) -> int:
    """The pinned host memory offload may use: the user's budget, or a safe default."""
    if problem.settings.host_memory_budget is not None:
        return problem.settings.host_memory_budget
    return int(HOST_BUDGET_FRACTION * available_host_bytes())


def with_outer(prediction: Prediction, extra: int) -> Prediction:
    """``prediction`` with the outer tensors' gradient buffers added to its peak."""
    # Note [Outer gradient buffers]
    # The backward returns one gradient per outer tensor (learned data in the batches),
    # held until it ends, and autograd accumulates them for their leaf: views of one leaf
    # read by N steps add up to one leaf-sized buffer, N separate leaves to N. Counted from
    # an in-memory source's batches before the run; a lazy source's and loss_fn's closure's
    # are found only as the forward pass reads them (Adapted.info["outer_bytes"]).
    if not extra:
        return prediction
    return dataclasses.replace(prediction, peak_bytes=prediction.peak_bytes + extra)


class Scheduled(Strategy):
    """An exact strategy that runs a ``effmaml.engine.Schedule`` on the engine.

    Subclasses say which schedules they can run (``candidates``, one per value of their
    free option) and how much each costs (``predict``). Every ``adapt`` probes first
    (``effmaml.probe.probe``, cached per MAML and batch signature); ``plans`` resolves
    ``exact_states`` from it once and makes one plan per candidate; ``plan`` takes the
    default, or under a memory budget the fastest that fits (``fastest``).
    """

    exact = True

    def candidates(self, problem: InnerProblem, probe: Probe) -> list[Schedule]:
        """The schedules this strategy may run, the user's choice or the default first."""
        raise NotImplementedError

    def predict(self, schedule: Schedule, problem: InnerProblem, probe: Probe) -> Prediction:
        """Predicted peak memory, step evaluations, host bytes and seconds of ``schedule``
        (``problem``'s settings resolved), before the outer tensors' gradient buffers."""
        raise NotImplementedError

    def wants_probe(self, problem: InnerProblem) -> bool:
        return True

    def plans(self, problem: InnerProblem, probe: Probe | None) -> list[Plan]:
        """One plan per candidate schedule, the default first, each with its prediction
        (the outer tensors' gradient buffers included: Note [Outer gradient buffers])."""
        assert probe is not None, "a recomputing strategy plans from the probe"
        problem = resolve_states(problem, probe)
        extra = outer_bytes(problem.batches, problem.query)
        return [
            Plan(
                self,
                problem,
                self.label(s),
                self.resolved(s),
                probe,
                with_outer(self.predict(s, problem, probe), extra),
                s,
            )
            for s in self.candidates(problem, probe)
        ]

    def plan(self, problem: InnerProblem, probe: Probe | None) -> Plan:
        """The default schedule's plan, or under ``problem.settings.memory_budget`` the
        fastest that fits (``fastest``). Host memory (``offload``) must fit the host budget
        too.

        Raises:
            MemoryError: nothing fits (says the smallest budget that would, and why).
        """
        assert probe is not None, "a recomputing strategy plans from the probe"
        plans = self.plans(problem, probe)
        budget = problem.settings.memory_budget
        if budget is None:
            plans = plans[:1]
        host = host_budget(problem) if any(_host(p) for p in plans) else None
        best = fastest(plans, budget, host)
        if best is None:
            raise MemoryError(self._no_fit(problem, probe, plans, budget, host))
        return best

    def _no_fit(
        self,
        problem: InnerProblem,
        probe: Probe,
        plans: list[Plan],
        budget: int | None,
        host: int | None,
    ) -> str:
        n = problem.steps
        sizes = (
            f"state P={format_bytes(probe.state_bytes)}, one step's graph "
            f"A={format_bytes(probe.step_graph_bytes)}"
        )
        on_device = [p for p in plans if fits(p, budget)]
        if host is not None and on_device:
            least = min(_host(p) for p in on_device)
            return (
                f"strategy {self.name!r} needs at least {format_bytes(least)} of pinned host "
                f"memory for N={n} steps, over the host budget of {format_bytes(host)} "
                f"({sizes}); pass host_memory_budget= to allow more, a larger segment, or "
                f"use strategy='revolve' or 'auto', which need no host memory"
            )
        smallest = min(_peak(p) for p in plans)
        return (
            f"strategy {self.name!r} cannot run N={n} steps within memory_budget="
            f"{format_bytes(budget or 0)}: its smallest predicted peak is "
            f"{format_bytes(smallest)} ({sizes}); raise the budget to at least that, or use "
            f"strategy='auto'"
        )

    def execute(self, plan: Plan, rt: Runtime, state0: InnerState, consts: Consts) -> Outcome:
        """Run the plan's schedule on the engine."""
        problem, schedule = plan.problem, plan.schedule
        assert schedule is not None
        state, losses, queries, rec = run_schedule(
            problem, rt, state0, consts, schedule, plan.label
        )
        outer = rec.outer
        assert outer is not None
        facts = plan.facts(
            exact_states=problem.settings.exact_states,
            outer=tuple(outer.describe(i) for i in range(len(outer.tensors))),
            outer_bytes=outer.nbytes(),
        )
        qs = list(queries.unbind(0)) if problem.step_weights else []
        query = multi_step_loss(problem, qs)
        return Outcome(state, list(losses.unbind(0)), facts, qs, query, rec)

    def resolved(self, schedule: Schedule) -> dict[str, Any]:
        """The options as run (for ``Adapted.info``)."""
        return {}

    def label(self, schedule: Schedule) -> str:
        """The strategy with its options as run, e.g. ``checkpoint(segment=7, pullback='step')``."""
        opts = ", ".join(f"{k}={v!r}" for k, v in self.resolved(schedule).items())
        return f"{self.name}({opts})"


def _peak(plan: Plan) -> int:
    assert plan.prediction is not None
    return plan.prediction.peak_bytes


def _host(plan: Plan) -> int:
    return 0 if plan.prediction is None else plan.prediction.host_bytes
