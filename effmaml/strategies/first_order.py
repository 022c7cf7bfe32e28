"""First-order MAML (FOMAML): no graph through the inner loop."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..clip import clip_backward
from ..engine import advance
from ..memory import Prediction, Probe, first_order_peak, predict_seconds
from ..state import InnerState
from ..step import Consts, InnerProblem, Runtime
from .base import Outcome, RunFacts, Strategy, register_strategy, warn_learned_hyper

__all__ = ["FirstOrder"]


class _StraightThrough(torch.autograd.Function):
    """Forward: the adapted value. Backward: hand the gradient to the initial parameter."""

    @staticmethod
    def forward(ctx: Any, value: Tensor, source: Tensor) -> Tensor:
        return value.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, Tensor]:
        return None, grad


@register_strategy
class FirstOrder(Strategy):
    """First-order MAML: trades the second-order terms for speed and constant memory.

    The inner loop runs without a graph between steps; the gradient of the query loss at
    φ_N is passed unchanged to θ (the Jacobian dφ_N/dθ is taken as the identity).
    Non-adapted parameters receive their query-loss gradient at φ_N. Learned
    hyper-parameters (a tensor inner lr) receive no meta-gradient, and the returned
    inner losses are detached.

    Memory: one state P plus one first-order step graph, independent of N.
    Compute: N first-order steps, no backward through them.
    """

    name = "first_order"
    exact = False
    second_order = False

    def run(
        self, problem: InnerProblem, rt: Runtime, state0: InnerState, consts: Consts
    ) -> Outcome:
        warn_learned_hyper(consts, self.name, "")
        state, losses = advance(problem, rt, state0.detached(False), 0, problem.steps, consts)
        params = {k: _StraightThrough.apply(v, state0.params[k]) for k, v in state.params.items()}
        params = clip_backward(params, problem.clip)
        return Outcome(InnerState(params, state.opt, state.buffers), losses, RunFacts(self.name))

    def plan(self, problem: InnerProblem, probe: Probe) -> tuple[str, Prediction]:
        # the working state, its successor and the output; one first-order step's graph
        n = problem.steps
        peak = first_order_peak(probe)
        seconds = predict_seconds(probe, n, 0)
        return "first_order", Prediction(peak, n + probe.evals, seconds=seconds)
