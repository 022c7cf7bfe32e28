"""Implicit MAML (iMAML): the meta-gradient at the inner solution, by conjugate gradient.

Rajeswaran, Finn, Kakade, Levine, "Meta-Learning with Implicit Gradients" (NeurIPS 2019).
The inner problem is the proximal one, minimise L_train(φ) + (λ/2)‖φ − θ‖², run with the
shared inner step (its proximal term) for N steps from φ₀ = θ. If φ_N is its minimiser,
dφ/dθ = (I + H/λ)⁻¹ with H the Hessian of L_train at φ_N, whatever path the optimizer took.
So the meta-gradient needs only the final state: solve (I + H/λ) x = ∇L_query(φ_N) with
conjugate gradient and Hessian-vector products.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..checks import find_no_double_backward
from ..costs import Prediction, Probe, implicit_peak, predict_seconds
from ..diagnose import no_double_backward_error
from ..engine import advance, backward_again_error
from ..module import FunctionalModel
from ..notices import warn
from ..outer import OuterTensorError, OuterTensors, reading
from ..problem import InnerProblem, Records, Runtime
from ..sources import RepeatedBatch
from ..state import Consts, InnerState
from ..step import step_context
from .base import (
    Outcome,
    Plan,
    SolveStats,
    Strategy,
    check_count,
    register_strategy,
    warn_learned_hyper,
)

__all__ = ["Implicit", "conjugate_gradient"]


@register_strategy
class Implicit(Strategy):
    """iMAML: memory independent of N; an approximation that is exact at the inner optimum.

    Forward: N first-order steps on L_train(φ) + (λ/2)‖φ − θ‖², keeping only the current
    state. Backward (at ``loss.backward()``, through a custom autograd Function at φ_N):
    ``cg_steps`` conjugate-gradient iterations on (I + H/λ + δI) x = v, v the query
    gradient at φ_N; θ receives x. Parameters that do not adapt (``params=``) receive their
    direct query gradient plus the implicit term −(1/λ) ∂²L_train/∂w∂φ · x, and so does
    every other tensor that requires grad and that L_train reads (learned data in a batch,
    per-example weights, a temperature in ``loss_fn``'s closure: ``effmaml.outer``):
    the implicit-function gradient, exact at the inner optimum as θ's is. A tensor read only
    by steps whose batches the solve leaves out (``hvp_batches``) has none, and is refused
    with ``effmaml.outer.OuterTensorError`` before backward.

    L_train is the loss on the single batch when one batch is reused (``adapt(batch,
    steps=N)`` or a list holding one batch object N times); with distinct per-step batches
    it is the mean of the losses over the distinct batches, and every Hessian-vector product
    costs one forward/backward/double-backward pass over each of them. During the solve
    dropout is off and BatchNorm normalises with batch statistics (train mode) or running
    statistics (eval mode) and updates nothing.

    Memory: the state P, the CG vectors (4 copies of the adapted parameters) and one
    second-order graph A at a time; independent of N. Compute: N first-order steps, then
    about ``cg_steps`` + 1 Hessian-vector products (each ≈ 2-3 step evaluations per
    distinct batch).

    Not exact: it equals naive's meta-gradient (with ``prox_lambda=λ``) only when φ_N has
    converged and CG has; ``Adapted.info`` reports the CG residual. A learned inner lr has
    no implicit meta-gradient (the solution does not depend on it): a warning says so.

    The first Hessian-vector product walks L_train's gradient graph once for an operation
    without double backward, whose term autograd would drop without a word (Note [A
    missing double backward inside a pullback]): ``NoDoubleBackwardError`` in backward,
    naming it.

    Args:
        lam: λ, the proximal strength (> 0). None: the ``prox_lambda`` given to MAML, or 1.0.
        cg_steps: conjugate-gradient iterations (≥ 1). Default 5, as in the paper.
        cg_damping: δ ≥ 0 added to the system's diagonal, for a Hessian that is not
            positive definite far from the optimum. Default 0.
        cg_tol: stop early when the residual norm falls below ``cg_tol`` times the right-hand
            side's. Default 1e-10.
        hvp_batches: with distinct batches, use only the last ``hvp_batches`` distinct ones
            for L_train in the solve (a cheaper, stochastic Hessian; each product then costs
            that many passes). Default None: all of them.
    """

    name = "implicit"
    exact = False

    def __init__(
        self,
        lam: float | None = None,
        cg_steps: int = 5,
        cg_damping: float = 0.0,
        cg_tol: float = 1e-10,
        hvp_batches: int | None = None,
    ) -> None:
        if lam is not None and not (isinstance(lam, (int, float)) and lam > 0):
            raise ValueError(f"lam must be a number > 0 (got {lam!r}); iMAML needs λ > 0")
        check_count("cg_steps", cg_steps, allow_none=False)
        if not cg_damping >= 0:
            raise ValueError(f"cg_damping must be >= 0 (got {cg_damping!r})")
        if not cg_tol >= 0:
            raise ValueError(f"cg_tol must be >= 0 (got {cg_tol!r})")
        check_count("hvp_batches", hvp_batches, "; None uses every distinct batch")
        self.hvp_batches = hvp_batches
        self.lam = None if lam is None else float(lam)
        self.cg_steps = cg_steps
        self.cg_damping = float(cg_damping)
        self.cg_tol = float(cg_tol)

    def options(self) -> dict[str, Any]:
        return {
            "lam": self.lam,
            "cg_steps": self.cg_steps,
            "cg_damping": self.cg_damping,
            "cg_tol": self.cg_tol,
            "hvp_batches": self.hvp_batches,
        }

    def resolve_lam(self, prox: float) -> float:
        """λ for a run where MAML was given ``prox_lambda=prox``."""
        if self.lam is None:
            return prox or 1.0
        if prox and prox != self.lam:
            raise ValueError(
                f"strategy='implicit' got lam={self.lam} but MAML got prox_lambda={prox}; they "
                f"are the same λ, give one of them"
            )
        return self.lam

    def plans(self, problem: InnerProblem, probe: Probe | None) -> list[Plan]:
        """One plan: the problem with its proximal term at λ (its inner objective is the
        proximal one by definition).

        Raises:
            ValueError: a multi-step loss, or a continued adapt (``start=``), which
                iMAML's meta-gradient does not cover; λ given twice with different values.
        """
        if problem.step_weights:
            raise ValueError(
                "strategy='implicit' has no multi-step loss: its meta-gradient is taken at the "
                "inner solution φ_N only. Use an exact strategy (naive, checkpoint, revolve, "
                "auto) or first_order with step_weights, or adapt without step_weights"
            )
        if problem.first_step:
            raise ValueError(
                "strategy='implicit' cannot continue from an adapted model (adapt(..., "
                "start=adapted)): its meta-gradient is the implicit one of a proximal "
                "problem centred on the model's parameters, not a path through earlier steps. "
                "Adapt from the model with all the steps, or use an exact strategy or "
                "first_order"
            )
        lam = self.resolve_lam(problem.settings.prox)
        problem = problem.with_settings(prox=lam)
        options = {**self.options(), "lam": lam}
        if probe is None:
            return [Plan(self, problem, self.label(), options)]
        peak = implicit_peak(probe)
        passes = len(_distinct_indices(problem.batches))
        if self.hvp_batches is not None:
            passes = min(passes, self.hvp_batches)
        # N first-order steps, then about cg_steps + 1 Hessian-vector products, each a
        # step with graph and its pullback per distinct batch
        seconds = predict_seconds(probe, problem.steps, (self.cg_steps + 1) * passes)
        pred = Prediction(peak, problem.steps + probe.evals, seconds=seconds)
        return [Plan(self, problem, self.label(), options, probe, pred)]

    def execute(self, plan: Plan, rt: Runtime, state0: InnerState, consts: Consts) -> Outcome:
        problem = plan.problem
        lam = problem.settings.prox
        warn_learned_hyper(consts, self.name, ": the inner solution does not depend on them")
        theta0 = {k: v.detach() for k, v in state0.params.items()}
        consts = Consts(consts.fixed, consts.hyper, theta0)
        rec = Records(OuterTensors(problem.steps))
        final, losses, _ = advance(
            problem, rt, rec, state0.detached(False), 0, problem.steps, consts
        )
        stats = SolveStats(lam, self.cg_steps)
        solver = _Solver(self, problem, rt, rec, final, consts.fixed, lam, stats)
        solver.check_outer()
        fixed = list(consts.fixed.values())
        assert rec.outer is not None
        outer = rec.outer.tensors
        out = _ImplicitGrad.apply(solver, *state0.params.values(), *fixed, *outer)
        params = dict(zip(state0.params, out))
        facts = plan.facts(solve=stats)
        return Outcome(InnerState(params, final.opt, final.buffers), losses, facts, records=rec)

    def label(self) -> str:
        """``implicit(lam=..., cg_steps=..., ...)``."""
        return "implicit(" + ", ".join(f"{k}={v!r}" for k, v in self.options().items()) + ")"


def conjugate_gradient(
    matvec: Callable[[list[Tensor]], list[Tensor]],
    b: list[Tensor],
    steps: int,
    tol: float = 0.0,
) -> tuple[list[Tensor], float, int]:
    """Solve ``A x = b`` for a symmetric positive-definite ``A`` given as ``matvec``.

    Args:
        matvec: ``list[Tensor] -> list[Tensor]``, the product with A.
        b: the right-hand side, a list of tensors.
        steps: the most iterations.
        tol: stop when ‖r‖ ≤ tol·‖b‖.

    Returns:
        ``(x, relative residual norm, iterations run)``. Stops early, with a warning, if A
        shows non-positive curvature along a search direction.

    Cost: one ``matvec`` and one host sync per iteration; memory 4 vectors like ``b``.
    """
    x = [torch.zeros_like(t) for t in b]
    r = [t.clone() for t in b]
    p = [t.clone() for t in b]
    rs = _dot(r, r)
    b_norm = math.sqrt(rs)
    if b_norm == 0.0:
        return x, 0.0, 0
    it = 0
    for it in range(1, steps + 1):
        ap = matvec(p)
        curv = _dot(p, ap)
        if not curv > 0:
            warn(
                f"conjugate gradient met non-positive curvature ({curv:.3g}) at iteration "
                f"{it}: the inner problem is not convex at φ_N; increase lam or cg_damping"
            )
            it -= 1
            break
        alpha = rs / curv
        for xi, pi in zip(x, p):
            xi.add_(pi, alpha=alpha)
        for ri, api in zip(r, ap):
            ri.sub_(api, alpha=alpha)
        rs_new = _dot(r, r)
        if math.sqrt(rs_new) <= tol * b_norm:
            rs = rs_new
            break
        beta = rs_new / rs
        rs = rs_new
        for pi, ri in zip(p, r):
            pi.mul_(beta).add_(ri)
    return x, math.sqrt(rs) / b_norm, it


def _dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> float:
    return float(sum((x * y).sum() for x, y in zip(a, b)))


@contextlib.contextmanager
def _dropout_off(model: nn.Module) -> Iterator[None]:
    drops = [m for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
    modes = [m.training for m in drops]
    for m in drops:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(drops, modes):
            m.train(mode)


class _Solver:
    """The training loss at φ_N and its Hessian-vector products."""

    def __init__(
        self,
        strategy: Implicit,
        problem: InnerProblem,
        rt: Runtime,
        rec: Records,
        final: InnerState,
        fixed: dict[str, Tensor],
        lam: float,
        stats: SolveStats,
    ) -> None:
        self.strategy = strategy
        self.problem = problem
        self.rt = rt
        self.rec = rec
        self.phi = {k: v.detach() for k, v in final.params.items()}
        self.buffers = final.buffers
        self.checked = False  # whether L_train's gradient graph was walked once
        self.fixed_names = tuple(fixed)
        self.lam = lam
        self.stats = stats
        self.indices = _distinct_indices(problem.batches)
        if strategy.hvp_batches is not None:
            self.indices = self.indices[-strategy.hvp_batches :]
        stats.hvp_batches_used = len(self.indices)
        self.released = False  # backward released the pinned batches

    def check_outer(self) -> None:
        """Refuse outer tensors that L_train does not read (their steps' batches are not in
        the solve): the implicit function theorem gives them no gradient."""
        outer = self.rec.outer
        assert outer is not None
        used = set().union(*(outer.reads[t] for t in self.indices))
        mover = [i for i in range(len(outer.tensors)) if i not in outer.by_loss]
        unread = [i for i in outer.by_loss if i not in used]
        for left, why in (
            (
                mover,
                "strategy='implicit' gives no meta-gradient to tensors that only the inner "
                "optimizer's step reads: {listed}. The inner solution does not depend on how "
                "the optimizer reaches it (as for learned rates, which it warns about), so "
                "their implicit gradient is zero by construction, not naive's; use an exact "
                "strategy ('checkpoint', 'revolve', 'auto'), or .detach() them",
            ),
            (
                sorted(unread),
                f"strategy='implicit' with hvp_batches={self.strategy.hvp_batches} solves on "
                f"the batches of steps {self.indices} only, and these tensors that require "
                "grad are read by other steps alone: {listed}. They have no implicit "
                "gradient; pass hvp_batches=None (every distinct batch), or use an exact "
                "strategy ('checkpoint', 'revolve', 'auto')",
            ),
        ):
            if left:
                listed = "; ".join(outer.describe(i) for i in left[:3])
                raise OuterTensorError(why.format(listed=listed))

    def _grad_terms(self, phi: dict[str, Tensor], fixed: dict[str, Tensor]) -> Iterator[Tensor]:
        """For each distinct batch, its loss / n_batches (a graph through phi and fixed)."""
        n = len(self.indices)
        for t in self.indices:
            module = FunctionalModel(self.problem.model, {**fixed, **phi}, self.buffers)
            self.stats.hvp_batch_passes += 1
            # at φ_N: per-step modules use the last step's slice, as the adapted model does
            with (
                step_context(self.problem, self.problem.steps - 1, grad=False),
                reading(self.rec.outer, self.problem.steps - 1, [*phi.values(), *fixed.values()]),
            ):
                loss = self.problem.loss_fn(module, self.rec.batch(self.problem, t)) / n
            yield loss

    def hvp(self, vec: list[Tensor], fixed: dict[str, Tensor]) -> list[Tensor]:
        """H·vec, H the Hessian of L_train at φ_N w.r.t. the adapted parameters."""
        out = [torch.zeros_like(v) for v in vec]
        leaves = self._leaves()
        phi = list(leaves.values())
        fixed = {k: v.detach() for k, v in fixed.items()}
        for dot in self._grad_dots(leaves, fixed, vec):
            hv = torch.autograd.grad(dot, phi, allow_unused=True)
            for o, h in zip(out, hv):
                if h is not None:
                    o.add_(h)
        return out

    def _grad_dots(
        self, phi: dict[str, Tensor], fixed: dict[str, Tensor], vec: list[Tensor]
    ) -> Iterator[Tensor]:
        """For each distinct batch, ⟨∇_φ L_train, vec⟩ with its graph (for a second grad).

        The loss and its first gradient run under the autocast state ``adapt`` ran in, as
        the inner steps did (Note [Autocast under recomputation]); the caller's second
        gradient runs outside, as a user's backward does.
        """
        leaves = list(phi.values())
        for loss in self._grad_terms(phi, fixed):
            with step_context(self.problem, self.problem.steps - 1, grad=False):
                g = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
                dot = sum((gi * vi).sum() for gi, vi in zip(g, vec) if gi is not None)
            if not self.checked:  # Note [A missing double backward inside a pullback]
                self.checked = True
                if find_no_double_backward([x for x in g if x is not None]) is not None:
                    final = InnerState(self.phi, {}, self.buffers)
                    n = self.problem.steps - 1
                    raise no_double_backward_error(self.problem, final, Consts(fixed), step=n)
            if isinstance(dot, Tensor) and dot.requires_grad:
                yield dot

    def _leaves(self) -> dict[str, Tensor]:
        return {k: v.detach().requires_grad_(True) for k, v in self.phi.items()}

    def solve(self, v: list[Tensor], fixed: dict[str, Tensor]) -> list[Tensor]:
        """x = (I + H/λ + δI)⁻¹ v."""
        s = self.strategy
        scale = 1.0 / self.lam

        def matvec(p: list[Tensor]) -> list[Tensor]:
            hp = self.hvp(p, fixed)
            return [pi * (1.0 + s.cg_damping) + hi * scale for pi, hi in zip(p, hp)]

        x, residual, iters = conjugate_gradient(matvec, v, s.cg_steps, s.cg_tol)
        self.stats.cg_residual = residual
        self.stats.cg_iterations = iters
        return x

    def cross_term(
        self,
        x: list[Tensor],
        fixed: dict[str, Tensor],
        need: list[bool],
        outer: Sequence[Tensor] = (),
    ) -> tuple[list[Tensor | None], list[Tensor | None]]:
        """−(1/λ) ∂/∂w ⟨∇_φ L_train, x⟩ for each non-adapted parameter w that needs it, and
        for each of ``outer`` (stand-ins of the outer tensors that need it; the caller has
        ``rec.outer`` hand them to ``loss_fn``)."""
        leaves = {
            k: v.detach().requires_grad_(n) for (k, v), n in zip(fixed.items(), need, strict=True)
        }
        wanted = [leaves[k] for k, n in zip(fixed, need) if n] + list(outer)
        acc: list[Tensor | None] = [None] * len(wanted)
        for dot in self._grad_dots(self._leaves(), leaves, x):
            gw = torch.autograd.grad(dot, wanted, allow_unused=True)
            for i, h in enumerate(gw):
                if h is not None:
                    prev = acc[i]
                    acc[i] = -h / self.lam if prev is None else prev - h / self.lam
        it = iter(acc)
        return [next(it) if n else None for n in need], list(it)


def _distinct_indices(batches: Sequence[Any]) -> list[int]:
    """Indices of the distinct batches: one for a reused batch, all for a lazy sequence."""
    if isinstance(batches, RepeatedBatch):
        return [0]
    if isinstance(batches, (list, tuple)):
        seen: dict[int, int] = {}
        for t, b in enumerate(batches):
            seen.setdefault(id(b), t)
        return sorted(seen.values())
    return list(range(len(batches)))


class _ImplicitGrad(torch.autograd.Function):
    """Forward: φ_N (already computed). Backward: the implicit meta-gradient.

    Inputs ``(solver, *θ, *fixed, *outer)``; outputs ``φ_N`` (one tensor per adapted parameter).
    """

    @staticmethod
    def forward(ctx: Any, solver: _Solver, *flat: Tensor) -> tuple[Tensor, ...]:
        ctx.solver = solver
        ctx.n_theta = len(solver.phi)
        ctx.save_for_backward(*flat[ctx.n_theta :])
        return tuple(v.clone() for v in solver.phi.values())

    @staticmethod
    def backward(ctx: Any, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
        solver: _Solver = ctx.solver
        saved = ctx.saved_tensors
        n_fixed = len(solver.fixed_names)
        fixed = dict(zip(solver.fixed_names, saved[:n_fixed]))
        need_outer = list(ctx.needs_input_grad[1 + ctx.n_theta + n_fixed :])
        stand_ins = [o.detach().requires_grad_(n) for o, n in zip(saved[n_fixed:], need_outer)]
        v = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, solver.phi.values())]
        # Note [Implicit gradient outside the caller's graph]
        # The solve builds its own small graphs from detached leaves (φ_N, and copies of the
        # fixed parameters for the cross term) and frees each one right away, so nothing of
        # it joins the graph that is being differentiated and memory stays at one step's A.
        # The outer tensors' stand-ins are leaves too (Note [Outer tensors under
        # recomputation]).
        outer = solver.rec.outer
        assert outer is not None
        if solver.released and outer.tensors:  # the pinned batches of the first are gone
            raise backward_again_error("strategy implicit with outer tensors")
        with (
            torch.enable_grad(),
            _dropout_off(solver.problem.model),
            outer.substituting(stand_ins),
        ):
            x = solver.solve(v, fixed)
            need = list(ctx.needs_input_grad[1 + ctx.n_theta : 1 + ctx.n_theta + n_fixed])
            wanted = [s for s, n in zip(stand_ins, need_outer) if n]
            if any(need) or wanted:
                g_fixed, g_wanted = solver.cross_term(x, fixed, need, wanted)
            else:
                g_fixed, g_wanted = [None] * len(need), []
        outer.release()
        solver.released = True
        it = iter(g_wanted)
        g_outer = [next(it) if n else None for n in need_outer]
        return (None, *x, *g_fixed, *g_outer)
