"""The unroll engine: ``advance`` and ``pullback`` over the shared inner step, and schedules.

Checkpointed MAML trades compute for memory: the forward pass runs the inner loop without
keeping its second-order graph, storing only a few states; the backward pass recomputes
what it needs from the stored states with the graph and pulls the meta-gradient back.

Two primitives build every exact schedule:

* :func:`advance` runs steps ``a..b`` with no graph between them (each step still
  differentiates its own loss, first order). Memory: one state ``P`` at a time.
* :func:`pullback` recomputes steps ``a..b`` from a stored state with
  ``create_graph=True`` and pulls the incoming gradient at ``b`` back to ``a``,
  accumulating the gradients of everything every step reads (non-adapted parameters, a
  learned lr, θ₀ through the proximal term). Memory: ``(b - a)`` steps' graphs ``A``.

A :class:`Schedule` (see :mod:`effmaml.schedules`) decides which states the forward pass
stores and how the backward pass splits into advances and pullbacks; a :class:`Store`
decides where stored states live (the device, or pinned host memory for ``offload``).
:func:`run_schedule` runs a schedule inside one custom :class:`torch.autograd.Function`, so
that the forward pass keeps no graph at all.

Why not :mod:`torch.utils.checkpoint`: the reentrant variant refuses
``torch.autograd.grad``, which every inner step calls; the non-reentrant one recomputes a
segment at every inner ``autograd.grad`` call and holds what it recomputed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .checks import raise_if_no_double_backward
from .replay import RngState, Witness, capture_rng, replay_rng
from .step import Consts, InnerProblem, InnerState, inner_step

__all__ = [
    "Cotangent",
    "Handle",
    "Resident",
    "Schedule",
    "Store",
    "advance",
    "advance_to",
    "pullback",
    "run_schedule",
]


def advance(
    problem: InnerProblem,
    state: InnerState,
    a: int,
    b: int,
    consts: Consts,
    keep: Callable[[InnerState, RngState], None] | None = None,
) -> tuple[InnerState, list[Tensor]]:
    """Run steps ``a..b-1`` first-order, keeping no graph between steps.

    Args:
        problem: the static problem.
        state: the state before step ``a``.
        a: first step.
        b: one past the last step.
        consts: constants (used detached).
        keep: if given, called with the state and RNG *before* each step.

    Returns:
        ``(state_b, [loss_a, ..., loss_{b-1}])`` with every tensor detached.

    Memory: one state and one first-order step graph at a time. Compute: ``b - a`` steps.
    """
    consts = Consts(
        {k: v.detach() for k, v in consts.fixed.items()},
        {k: v.detach() for k, v in consts.hyper.items()},
        {k: v.detach() for k, v in consts.theta0.items()},
    )
    losses = []
    for t in range(a, b):
        if keep is not None:
            keep(state, capture_rng(problem.device))
        new, loss = inner_step(
            problem, state.detached(requires_grad=True), t, consts, create_graph=False
        )
        state = new.detached(requires_grad=False)
        losses.append(loss.detach())
    return state, losses


@dataclass
class Cotangent:
    """Gradients with respect to one state (params and optimizer state); zeros allowed."""

    params: dict[str, Tensor]
    opt: dict[str, Tensor]


def pullback(
    problem: InnerProblem,
    state: InnerState,
    rng: RngState,
    a: int,
    b: int,
    consts: Consts,
    need_consts: Sequence[bool],
    grad_b: Cotangent,
    grad_losses: Tensor,
) -> tuple[Cotangent, list[Tensor | None]]:
    """Recompute steps ``a..b-1`` from ``state`` with their graph and pull ``grad_b`` back.

    Args:
        problem: the static problem.
        state: the stored state before step ``a``.
        rng: the RNG state before step ``a`` (dropout replays).
        a: first step.
        b: one past the last step.
        consts: constants (the Function's saved inputs).
        need_consts: which of ``consts.flat()`` need a gradient.
        grad_b: gradient w.r.t. the state after step ``b - 1``.
        grad_losses: gradients w.r.t. ``loss_a .. loss_{b-1}`` (shape ``(b - a,)``).

    Returns:
        ``(grad_a, grad_consts)``: the gradient w.r.t. ``state`` and, for each constant,
        its gradient from these steps (``None`` where not needed or unused).

    Memory: ``b - a`` second-order step graphs, freed on return.
    """
    flat_consts = consts.flat()
    leaves = [c.detach().requires_grad_(need) for c, need in zip(flat_consts, need_consts)]
    c = consts.like(leaves)
    with replay_rng(rng), torch.enable_grad():
        s0 = state.detached(requires_grad=True)
        s = s0
        losses = []
        for t in range(a, b):
            s, loss = inner_step(problem, s, t, c, create_graph=True)
            losses.append(loss)
    outputs: list[Tensor] = []
    cotangents: list[Tensor] = []
    for k, v in s.params.items():
        outputs.append(v)
        cotangents.append(grad_b.params[k])
    for k, v in s.opt.items():
        if v.requires_grad:
            outputs.append(v)
            cotangents.append(grad_b.opt[k])
    for i, loss in enumerate(losses):
        outputs.append(loss)
        cotangents.append(grad_losses[i])
    inputs = [*s0.params.values(), *s0.opt.values()]
    inputs += [leaf for leaf, need in zip(leaves, need_consts) if need]
    try:
        with torch.enable_grad():
            grads = torch.autograd.grad(outputs, inputs, cotangents, allow_unused=True)
    except (RuntimeError, NotImplementedError) as err:
        raise_if_no_double_backward(err)
        raise
    n_p, n_o = len(s0.params), len(s0.opt)
    gp = {k: _or_zeros(g, v) for (k, v), g in zip(s0.params.items(), grads[:n_p])}
    go = {k: _or_zeros(g, v) for (k, v), g in zip(s0.opt.items(), grads[n_p : n_p + n_o])}
    it = iter(grads[n_p + n_o :])
    g_consts = [next(it) if need else None for need in need_consts]
    return Cotangent(gp, go), g_consts


def _or_zeros(g: Tensor | None, like: Tensor) -> Tensor:
    return torch.zeros_like(like) if g is None else g


def advance_to(
    problem: InnerProblem, state: InnerState, rng: RngState, a: int, b: int, consts: Consts
) -> tuple[InnerState, RngState]:
    """Replay steps ``a..b-1`` from a stored ``(state, rng)``; return state and RNG at ``b``."""
    if a == b:
        return state, rng
    with replay_rng(rng):
        out, _ = advance(problem, state, a, b, consts)
        return out, capture_rng(problem.device)


class Handle:
    """A stored state, wherever it lives; :meth:`Store.get` brings it to the device."""


@dataclass
class Resident(Handle):
    """A handle to a state kept where it is (on the device)."""

    state: InnerState


class Store:
    """Where a schedule keeps its stored states. This one: on the device, as they are."""

    def put(self, state: InnerState) -> Handle:
        """Keep ``state`` (detached) and return a handle to it."""
        return Resident(state)

    def fetch(self, handle: Handle) -> None:
        """Start bringing ``handle`` back to the device (asynchronously where possible)."""

    def get(self, handle: Handle) -> InnerState:
        """The state on the device, once any copy has finished."""
        assert isinstance(handle, Resident)
        return handle.state

    def host_bytes(self) -> int:
        """Peak bytes kept off the device (0 here)."""
        return 0


class Schedule:
    """Which states the forward pass stores and how the backward pass pulls back.

    Subclasses implement :meth:`forward` (run all N steps without graph, store states) and
    :meth:`backward` (recompute and pull back, in reverse order, through
    :func:`pullback`), and the cost formulas used by the memory model.
    """

    store: Store

    def forward(
        self, problem: InnerProblem, state0: InnerState, rng0: RngState, consts: Consts
    ) -> tuple[InnerState, list[Tensor], object]:
        """Run steps ``0..N-1``; return the final state, the losses and a memo for backward."""
        raise NotImplementedError

    def backward(
        self,
        problem: InnerProblem,
        memo: object,
        state0: InnerState,
        rng0: RngState,
        consts: Consts,
        pull: Callable[[InnerState, RngState, int, int], None],
    ) -> None:
        """Call ``pull(state_a, rng_a, a, b)`` for consecutive ranges from the end to step 0."""
        raise NotImplementedError

    def step_evals(self, steps: int) -> int:
        """Inner-step evaluations of one forward + backward (without the probe)."""
        raise NotImplementedError

    def advances(self, steps: int) -> int:
        """Steps run without graph (forward and re-advances): every exact schedule pulls
        each of the N steps back exactly once, and each pullback is one evaluation."""
        return self.step_evals(steps) - steps

    def moved_states(self, steps: int) -> int:
        """States that pass through :attr:`store` (each goes off the device and back)."""
        return 0

    def stored_states(self, steps: int) -> int:
        """The most states held at once on the device besides the working one."""
        raise NotImplementedError

    def graph_steps(self, steps: int) -> int:
        """The most steps whose second-order graph is alive at once in backward."""
        return 1


class _Unroll(torch.autograd.Function):
    """Forward: the schedule's forward, storing states. Backward: its pullbacks.

    Flat inputs: ``[params..., opt..., buffers..., consts...]``; outputs:
    ``[params..., opt..., buffers..., losses]`` with buffers non-differentiable.
    """

    @staticmethod
    def forward(ctx, run: _Run, *flat: Tensor):  # type: ignore[override]
        state0, consts = run.unflatten(flat)
        rng0 = capture_rng(run.problem.device)
        state, losses, memo = run.schedule.forward(
            run.problem, state0.detached(requires_grad=False), rng0, consts
        )
        # The initial state is the input itself; save_for_backward guards it (and the
        # constants) against in-place changes between adapt and backward.
        ctx.save_for_backward(*flat)
        ctx.run = run
        ctx.memo = memo
        ctx.rng0 = rng0
        buffers = tuple(b.detach() for b in state.buffers.values())
        ctx.mark_non_differentiable(*buffers)
        return (*state.params.values(), *state.opt.values(), *buffers, torch.stack(losses))

    @staticmethod
    def backward(ctx, *grads: Tensor):  # type: ignore[override]
        run: _Run = ctx.run
        problem = run.problem
        flat = ctx.saved_tensors
        state0, consts = run.unflatten(flat)
        n_p, n_o = len(state0.params), len(state0.opt)
        grad = [
            Cotangent(
                dict(zip(state0.params, grads[:n_p])),
                dict(zip(state0.opt, grads[n_p : n_p + n_o])),
            )
        ]
        grad_losses = grads[-1]
        n_c = len(consts.flat())
        need = list(ctx.needs_input_grad[1 + len(flat) - n_c :])
        acc: list[Tensor | None] = [None] * n_c
        expect = [problem.steps]

        def pull(state_a: InnerState, rng_a: RngState, a: int, b: int) -> None:
            # the schedule must hand over consecutive ranges, last first
            assert b == expect[0], (a, b, expect[0])
            grad[0], g_c = pullback(
                problem, state_a, rng_a, a, b, consts, need, grad[0], grad_losses[a:b]
            )
            _accumulate(acc, g_c)
            expect[0] = a

        memo, ctx.memo = ctx.memo, None
        run.schedule.backward(problem, memo, state0.detached(False), ctx.rng0, consts, pull)
        assert expect[0] == 0
        if problem.witness is not None:
            problem.witness.verify()
        n_b = len(state0.buffers)
        g = grad[0]
        return (None, *g.params.values(), *g.opt.values(), *([None] * n_b), *acc)


def _accumulate(acc: list[Tensor | None], grads: Sequence[Tensor | None]) -> None:
    for i, g in enumerate(grads):
        if g is not None:
            acc[i] = g if acc[i] is None else acc[i] + g


@dataclass
class _Run:
    """What the custom Function needs besides tensors."""

    problem: InnerProblem
    schedule: Schedule
    names: tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]
    consts_template: Consts

    def unflatten(self, flat: Sequence[Tensor]) -> tuple[InnerState, Consts]:
        state, rest = self.unflatten_state(flat)
        return state, self.consts_template.like(rest)

    def unflatten_state(self, flat: Sequence[Tensor]) -> tuple[InnerState, Sequence[Tensor]]:
        p_names, o_names, b_names = self.names
        i = 0
        params = dict(zip(p_names, flat[i : i + len(p_names)]))
        i += len(p_names)
        opt = dict(zip(o_names, flat[i : i + len(o_names)]))
        i += len(o_names)
        buffers = dict(zip(b_names, flat[i : i + len(b_names)]))
        i += len(b_names)
        return InnerState(params, opt, buffers), flat[i:]


def run_schedule(
    problem: InnerProblem,
    state0: InnerState,
    consts: Consts,
    schedule: Schedule,
) -> tuple[InnerState, Tensor]:
    """Run the unroll under ``schedule``; the result is differentiable w.r.t. the inputs.

    Args:
        problem: the static problem.
        state0: the initial state (params θ, optimizer state, buffers).
        consts: constants (fixed params, tensor hyper-parameters, θ₀).
        schedule: the schedule.

    Returns:
        ``(state_N, losses)`` with ``losses`` of shape ``(N,)``.
    """
    names = (tuple(state0.params), tuple(state0.opt), tuple(state0.buffers))
    # Note [Checking that a recomputation saw the same batch]
    # The forward pass records each step's loss and batch fingerprint; every step run
    # again in backward is compared with them on the device, and the backward ends with one
    # check (one host sync) that raises if a batch source gave another batch for an index.
    witness = Witness(problem.steps, problem.device, problem.autocast)
    problem = dataclasses.replace(problem, witness=witness)
    run = _Run(problem, schedule, names, consts)
    flat = [*state0.params.values(), *state0.opt.values(), *state0.buffers.values(), *consts.flat()]
    out = _Unroll.apply(run, *flat)
    state, _ = run.unflatten_state(out[:-1])
    return state, out[-1]
