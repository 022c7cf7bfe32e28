"""The base of every checkpointing strategy: probe one step, pick a schedule, run it."""

from __future__ import annotations

from typing import Any

import torch

from ..engine import Schedule, run_schedule
from ..memory import Prediction, Probe, format_bytes, saved_bytes
from ..step import Consts, InnerProblem, InnerState, inner_step
from .base import Outcome, Strategy
from .checks import check_double_backward

__all__ = ["Scheduled", "probe"]


class Scheduled(Strategy):
    """An exact strategy that runs a :class:`effmaml.engine.Schedule` on the engine.

    Subclasses say which schedules they can run (:meth:`candidates`, one per value of their
    free option) and how much each costs (:meth:`predict`). Every ``adapt`` probes step 0
    once (see Note [Why checkpoint probes one step]); with a memory budget, the candidate
    with the fewest step evaluations whose predicted peak fits is run.
    """

    exact = True

    def candidates(self, problem: InnerProblem, probe: Probe) -> list[Schedule]:
        """The schedules this strategy may run, the user's choice or the default first."""
        raise NotImplementedError

    def predict(self, schedule: Schedule, steps: int, probe: Probe) -> Prediction:
        """Predicted peak memory above the start and step evaluations of ``schedule``."""
        raise NotImplementedError

    def choose(self, problem: InnerProblem, probe: Probe) -> tuple[Schedule, Prediction]:
        """The schedule to run: the default, or under ``problem.memory_budget`` the cheapest
        candidate that fits.

        Raises:
            MemoryError: nothing fits the budget (says the smallest budget that would).
        """
        n = problem.steps
        options = [(s, self.predict(s, n, probe)) for s in self.candidates(problem, probe)]
        budget = problem.memory_budget
        if budget is None:
            return options[0]
        fits = [(p.step_evals, p.peak_bytes, i) for i, (s, p) in enumerate(options)]
        fits = [f for f in fits if f[1] <= budget]
        if not fits:
            smallest = min(p.peak_bytes for _, p in options)
            raise MemoryError(
                f"strategy {self.name!r} cannot run N={n} steps within memory_budget="
                f"{format_bytes(budget)}: its smallest predicted peak is "
                f"{format_bytes(smallest)} (state P={format_bytes(probe.state_bytes)}, one "
                f"step's graph A={format_bytes(probe.step_graph_bytes)}); raise the budget to "
                f"at least that, or use strategy='auto'"
            )
        return options[min(fits)[2]]

    def run(self, problem: InnerProblem, state0: InnerState, consts: Consts) -> Outcome:
        pr = probe(problem, state0, consts)
        schedule, prediction = self.choose(problem, pr)
        state, losses = run_schedule(problem, state0, consts, schedule)
        info = {
            **self.resolved(schedule),
            "state_bytes": pr.state_bytes,
            "step_graph_bytes": pr.step_graph_bytes,
            "probe_evals": 1,
            "step_evals_predicted": prediction.step_evals,
            "predicted_peak_bytes": prediction.peak_bytes,
            "predicted_host_bytes": prediction.host_bytes,
            "schedule": schedule,
        }
        return Outcome(state, list(losses.unbind(0)), info)

    def resolved(self, schedule: Schedule) -> dict[str, Any]:
        """The options as run (for ``Adapted.info``)."""
        return {}

    def plan(self, problem: InnerProblem, probe: Probe) -> tuple[str, Prediction]:
        schedule, prediction = self.choose(problem, probe)
        opts = ", ".join(f"{k}={v!r}" for k, v in self.resolved(schedule).items())
        return f"{self.name}({opts})", prediction


def probe(
    problem: InnerProblem, state0: InnerState, consts: Consts, first_order: bool = False
) -> Probe:
    """Run step 0 once with its graph: measure A and check that double backward exists.

    # Note [Why checkpoint probes one step]
    # Inside a custom Function's backward, a @once_differentiable operation does not leave
    # the DelayedError node that makes naive fail loudly: its second-order term would just be
    # missing. Probing step 0 in the forward pass, outside any backward, finds such an
    # operation before any work (check_double_backward), and measures A, the bytes autograd
    # saves for one second-order step, for the schedule's choice. Cost: one step evaluation,
    # counted in step_evals; RNG and buffers are left as they were.

    Args:
        problem: the problem.
        state0: the initial state.
        consts: the constants.
        first_order: also measure a first-order step's graph (one more step evaluation).

    Returns:
        The :class:`Probe`: P (state bytes), the adapted parameters' bytes and A.
    """
    devices = [problem.device] if problem.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        s = state0.detached(requires_grad=True)
        with saved_bytes() as count:
            out, loss = inner_step(problem, s, 0, consts, create_graph=True)
        check_double_backward(out.params.values())
        del out, loss
        fo = 0
        if first_order:
            s = state0.detached(requires_grad=True)
            with saved_bytes() as c1:
                out, loss = inner_step(problem, s, 0, consts, create_graph=False)
                # a first-order step frees its graph inside autograd.grad; what it keeps
                # alive at its peak is the forward's saved tensors
            fo = c1.bytes
            del out, loss
    params = sum(t.numel() * t.element_size() for t in state0.params.values())
    return Probe(state0.nbytes(), params, count.bytes, fo)
