"""First-order MAML (FOMAML): no graph through the inner loop."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor

from ..clip import clip_backward
from ..costs import Prediction, Probe, first_order_peak, predict_seconds
from ..engine import advance
from ..outer import OuterTensors
from ..problem import InnerProblem, Records, Runtime
from ..state import Consts, InnerState
from ..step import inner_step, query_loss, step_context
from .base import Outcome, Plan, Strategy, register_strategy, warn_learned_hyper

__all__ = ["FirstOrder", "first_order_steps"]

# what first-order MAML gives a tensor the inner steps read (the outer tensors' rule)
_WHY = (
    "First-order MAML takes the Jacobian of the adapted parameters as the identity: a "
    "tensor loss_fn reads enters them only through the inner gradients, which it treats as "
    "constants, and one the inner optimizer's step reads (a learned rate) only through the "
    "updates, which it skips; so their meta-gradient would be zero by construction, not "
    "the meta-gradient naive gives."
)


class _StraightThrough(torch.autograd.Function):
    """Forward: the adapted value. Backward: hand the gradient to the initial parameter."""

    @staticmethod
    def forward(ctx: Any, value: Tensor, source: Tensor) -> Tensor:
        return value.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, Tensor]:
        return None, grad


class _Precomputed(torch.autograd.Function):
    """Forward: a value. Backward: gradients computed in the forward pass, times the
    incoming one (the first-order multi-step loss)."""

    @staticmethod
    def forward(ctx: Any, value: Tensor, n: int, *tensors: Tensor) -> Tensor:
        ctx.grads = tensors[:n]
        return value.detach().clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        grads = ctx.grads
        return (None, None, *([None] * len(grads)), *(grad * g for g in grads))


@register_strategy
class FirstOrder(Strategy):
    """First-order MAML: trades the second-order terms for speed and constant memory.

    The inner loop runs without a graph between steps; the gradient of the query loss at
    φ_N is passed unchanged to θ (the Jacobian dφ_N/dθ is taken as the identity).
    Non-adapted parameters receive their query-loss gradient at φ_N. Learned
    hyper-parameters (a tensor inner lr) receive no meta-gradient, and the returned
    inner losses are detached. A tensor that requires grad and that the inner steps read
    (learned data in a batch, a temperature in ``loss_fn``'s closure, a rate the inner
    optimizer's ``step`` reads as ``self.lr``) is refused with
    ``effmaml.outer.OuterTensorError`` after the unroll, naming it and its reader: it
    enters only through the inner gradients or the updates, which first-order MAML treats
    as constants, so its first-order meta-gradient is zero by construction.

    Memory: one state P plus one first-order step graph, independent of N.
    Compute: N first-order steps, no backward through them.
    """

    name = "first_order"
    exact = False
    second_order = False
    streams = True

    def execute(self, plan: Plan, rt: Runtime, state0: InnerState, consts: Consts) -> Outcome:
        problem = plan.problem
        warn_learned_hyper(consts, self.name, "")
        rec = Records(OuterTensors(problem.steps))
        if problem.step_weights:
            return self._multi_step(plan, rt, rec, state0, consts)
        state, losses = state0.detached(False), []
        for t in range(problem.steps):
            state, loss, _ = advance(problem, rt, rec, state, t, t + 1, consts)
            losses += loss
            if rt.watch(t, loss[0]):  # adapt's callback: N = t + 1
                break
        assert rec.outer is not None
        rec.outer.refuse(self.name, _WHY)
        rec.outer.release()  # nothing to recompute: no batch need stay pinned
        params = {k: _StraightThrough.apply(v, state0.params[k]) for k, v in state.params.items()}
        params = clip_backward(params, problem.settings.clip)
        out = InnerState(params, state.opt, state.buffers)
        return Outcome(out, losses, plan.facts(), records=rec)

    def _multi_step(
        self, plan: Plan, rt: Runtime, rec: Records, state0: InnerState, consts: Consts
    ) -> Outcome:
        """The first-order multi-step loss (``first_order_steps`` over all N steps)."""
        problem = plan.problem
        state, losses, queries, query = first_order_steps(
            problem, rt, rec, state0, problem.steps, consts
        )
        assert rec.outer is not None
        rec.outer.refuse(self.name, _WHY)
        rec.outer.release()  # nothing to recompute: no batch need stay pinned
        params = {k: _StraightThrough.apply(v, state0.params[k]) for k, v in state.params.items()}
        params = clip_backward(params, problem.settings.clip)
        out = InnerState(params, state.opt, state.buffers)
        return Outcome(out, losses, plan.facts(), queries, query, rec)

    def plans(self, problem: InnerProblem, probe: Probe | None) -> list[Plan]:
        if probe is None:
            return [Plan(self, problem, "first_order")]
        # the working state, its successor and the output; one first-order step's graph
        n = problem.steps
        pred = Prediction(
            first_order_peak(probe), n + probe.evals, seconds=predict_seconds(probe, n, 0)
        )
        return [Plan(self, problem, "first_order", {}, probe, pred)]


def first_order_steps(
    problem: InnerProblem,
    rt: Runtime,
    rec: Records,
    state0: InnerState,
    b: int,
    consts: Consts,
    outer: bool = False,
) -> tuple[InnerState, list[Tensor], list[Tensor], Tensor]:
    """Steps ``0..b-1`` first order with the multi-step loss's terms after each of them.

    Each weighted query loss's gradient at φ_{t+1} is handed to θ₀ (``state0.params``)
    unchanged, and its gradient w.r.t. the non-adapted parameters to them, as first-order
    MAML does for the final query loss; with ``outer``, also its direct gradient w.r.t. the
    outer tensors it reads (``rec.outer``'s, found as the steps run).

    Returns:
        ``(state_b, losses, queries, term)``: the state after step ``b - 1`` (detached),
        the inner and query losses (detached; a query is 0 where its weight is), and
        Σ_{t<b} w_t · L_query(φ_{t+1}) as a tensor whose backward hands those first-order
        gradients to θ₀, the non-adapted parameters (and the outer tensors).

    Memory: one state and one summed query gradient (P). Compute: ``b`` first-order steps
    and one query forward/backward per weighted step.
    """
    quiet = dataclasses.replace(problem, step_weights=())  # the query is evaluated here
    fixed = consts.detached()
    names = [*state0.params, *fixed.fixed]
    acc: list[Tensor | None] = [None] * len(names)
    acc_outer: dict[int, Tensor] = {}
    state = state0.detached(False)
    losses, queries = [], []
    for t in range(b):
        new, loss, _ = inner_step(quiet, rt, rec, state.detached(True), t, fixed, False)
        state = new.detached(False)
        losses.append(loss.detach())
        w = problem.weight(t)
        if not w:
            queries.append(torch.zeros_like(losses[-1]))
            continue
        leaves = state.detached(True)
        consts_t = Consts(
            {k: v.requires_grad_(True) for k, v in fixed.detached().fixed.items()},
            fixed.hyper,
            fixed.theta0,
        )
        with step_context(problem, t):
            q = query_loss(problem, leaves, consts_t, rt, rec, t)
            wrt = [*leaves.params.values(), *consts_t.fixed.values()]
            read = sorted(rec.outer.reads[t]) if outer and rec.outer is not None else []
            stand_ins = rec.outer.stand_ins() if read and rec.outer is not None else []
            grads = torch.autograd.grad(q, [*wrt, *(stand_ins[i] for i in read)], allow_unused=True)
        for i, g in enumerate(grads[: len(wrt)]):
            if g is not None:
                prev = acc[i]
                acc[i] = w * g if prev is None else prev + w * g
        for i, g in zip(read, grads[len(wrt) :]):
            if g is not None:
                acc_outer[i] = w * g if i not in acc_outer else acc_outer[i] + w * g
        queries.append(q.detach())
    inputs = [*state0.params.values(), *consts.fixed.values()]
    total = sum(problem.weight(t) * q for t, q in enumerate(queries))
    summed = [torch.zeros_like(x) if g is None else g for g, x in zip(acc, inputs)]
    if outer and rec.outer is not None:
        for i, x in enumerate(rec.outer.tensors):
            inputs.append(x)
            summed.append(acc_outer[i] if i in acc_outer else torch.zeros_like(x))
    term = _Precomputed.apply(torch.as_tensor(total), len(summed), *summed, *inputs)
    return state, losses, queries, term
