"""Naive MAML: keep the whole unrolled graph (the reference)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..checks import find_no_double_backward
from ..costs import Prediction, Probe, naive_peak, predict_seconds
from ..diagnose import no_double_backward_error
from ..problem import NO_RECORDS, InnerProblem, Runtime
from ..sources import outer_bytes
from ..state import Consts, InnerState
from ..step import inner_step
from .base import Outcome, Plan, Strategy, multi_step_loss, register_strategy

__all__ = ["Naive"]


@register_strategy
class Naive(Strategy):
    """Full unroll: trades nothing; keeps every step's second-order graph.

    Every inner step runs with ``create_graph=True`` and the query loss backpropagates
    through all of them with plain autograd; a multi-step loss keeps every query's graph too.
    This is the reference every other strategy is checked against.

    Memory: N·A (A one step's second-order graph, which holds the state the step started
    from) plus the working set of the backward (``effmaml.costs.naive_peak``). Compute: N
    steps forward, one backward through N steps.
    """

    name = "naive"
    exact = True
    streams = True

    @classmethod
    def auto_candidates(cls, device: torch.device) -> list[Strategy]:
        return [cls()]

    def execute(self, plan: Plan, rt: Runtime, state0: InnerState, consts: Consts) -> Outcome:
        problem = plan.problem
        # Note [φ₀ is not θ]
        # The first step differentiates its loss with respect to φ₀, whose value is θ. Were
        # φ₀ the model's tensors themselves, a batch or closure computed from them (ProtoMAML's
        # prototypes, features at θ) would put its own path to θ into that inner gradient,
        # at the first step only; every later step, each recomputing strategy and a loop
        # that starts from copies hold such tensors fixed. A view per parameter makes φ₀ a
        # node of its own (values unchanged; the meta-gradient still reaches θ through it).
        params = {k: v.view_as(v) for k, v in state0.params.items()}
        state = InnerState(params, state0.opt, state0.buffers)
        losses: list[Tensor] = []
        queries: list[Tensor] = []
        for t in range(problem.steps):
            state, loss, query = inner_step(
                problem, rt, NO_RECORDS, state, t, consts, create_graph=True
            )
            losses.append(loss)
            if problem.step_weights:  # a zero where the step's weight is 0
                queries.append(torch.zeros_like(loss) if query is None else query)
            if t == 0 and find_no_double_backward(state.params.values()) is not None:
                raise no_double_backward_error(problem, state0, consts)
            if rt.watch(t, loss):  # adapt's callback: N = t + 1
                break
        facts = plan.facts()
        return Outcome(state, losses, facts, queries, multi_step_loss(problem, queries))

    def plans(self, problem: InnerProblem, probe: Probe | None) -> list[Plan]:
        if probe is None:
            return [Plan(self, problem, "naive")]
        n = problem.steps
        # the gradient buffers of learned data in the batches (Note [Outer gradient buffers])
        peak = naive_peak(n, probe) + outer_bytes(problem.batches, problem.query)
        pred = Prediction(peak, n + probe.evals, seconds=predict_seconds(probe, 0, n))
        return [Plan(self, problem, "naive", {}, probe, pred)]
