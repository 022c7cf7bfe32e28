"""The unroll engine: ``advance`` and ``pullback`` over the shared inner step, and schedules.

Checkpointed MAML trades compute for memory: the forward pass runs the inner loop without
keeping its second-order graph, storing only a few states; the backward pass recomputes
what it needs from the stored states with the graph and pulls the meta-gradient back.

Two primitives build every exact schedule:

* ``advance`` runs steps ``a..b`` with no graph between them (each step still
  differentiates its own loss, first order). Memory: one state ``P`` at a time.
* ``pullback`` recomputes steps ``a..b`` from a stored state with
  ``create_graph=True`` and pulls the incoming gradient at ``b`` back to ``a``,
  accumulating the gradients of everything every step reads (non-adapted parameters, a
  learned lr, θ₀ through the proximal term). Memory: ``(b - a)`` steps' graphs ``A``.

A ``Schedule`` (see ``effmaml.schedules``) decides which states the forward pass
stores and how the backward pass splits into advances and pullbacks; a ``Store``
decides where stored states live (the device, or pinned host memory for ``offload``).
``run_schedule`` runs a schedule inside one custom ``torch.autograd.Function``, so
that the forward pass keeps no graph at all.

Why not ``torch.utils.checkpoint``: the reentrant variant refuses
``torch.autograd.grad``, which every inner step calls; the non-reentrant one recomputes a
segment at every inner ``autograd.grad`` call and holds what it recomputed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .checks import find_no_double_backward, is_no_double_backward
from .diagnose import NoDoubleBackwardError, culprit, no_double_backward_error
from .outer import OuterTensors
from .problem import InnerProblem, Records, Runtime
from .replay import RngState, Witness, capture_rng, replay_rng
from .state import Consts, InnerState, Spec
from .step import inner_step

__all__ = [
    "BackwardAgainError",
    "Handle",
    "Resident",
    "Schedule",
    "Store",
    "advance",
    "advance_to",
    "backward_again_error",
    "pullback",
    "run_schedule",
]


def advance(
    problem: InnerProblem,
    rt: Runtime,
    rec: Records,
    state: InnerState,
    a: int,
    b: int,
    consts: Consts,
    keep: Callable[[InnerState, RngState], None] | None = None,
) -> tuple[InnerState, list[Tensor], list[Tensor]]:
    """Run steps ``a..b-1`` first-order, keeping no graph between steps.

    Args:
        problem: the problem.
        rt: the call's runtime.
        rec: the execution's records (``effmaml.problem.Records``).
        state: the state before step ``a``.
        a: first step.
        b: one past the last step.
        consts: constants (used detached).
        keep: if given, called with the state and RNG *before* each step.

    Returns:
        ``(state_b, [loss_a, ..., loss_{b-1}], [query_a, ..., query_{b-1}])`` with every
        tensor detached; a query loss is 0 where the multi-step loss does not weigh it.

    Memory: one state and one first-order step graph at a time (one second-order step
    graph under ``problem.settings.exact_states``, freed when the step is done). Compute: ``b - a``
    steps.
    """
    consts = consts.detached()
    losses, queries = [], []
    graph = bool(problem.settings.exact_states)  # Note [States bitwise naive's]
    for t in range(a, b):
        if keep is not None:
            keep(state, capture_rng(problem.rng_devices))
        new, loss, query = inner_step(
            problem, rt, rec, state.detached(requires_grad=True), t, consts, create_graph=graph
        )
        state = new.detached(requires_grad=False)
        losses.append(loss.detach())
        queries.append(torch.zeros_like(losses[-1]) if query is None else query.detach())
    return state, losses, queries


def pullback(
    problem: InnerProblem,
    rt: Runtime,
    rec: Records,
    state: InnerState,
    rng: RngState,
    a: int,
    b: int,
    consts: Consts,
    need_consts: Sequence[bool],
    grad_b: InnerState,
    grad_losses: Tensor,
    inspect: Callable[[InnerState], None] | None = None,
    grad_queries: Tensor | None = None,
    outer: Sequence[Tensor] = (),
) -> tuple[InnerState, list[Tensor | None], list[Tensor | None]]:
    """Recompute steps ``a..b-1`` from ``state`` with their graph and pull ``grad_b`` back.

    Args:
        problem: the problem.
        rt: the call's runtime.
        rec: the execution's records (``effmaml.problem.Records``).
        state: the stored state before step ``a``.
        rng: the RNG state before step ``a`` (dropout replays).
        a: first step.
        b: one past the last step.
        consts: constants (the Function's saved inputs).
        need_consts: which of ``consts.flat()`` need a gradient.
        grad_b: the cotangent at the state after step ``b - 1``: an ``InnerState``
            whose differentiable groups hold gradients (zeros allowed; the others empty).
        grad_losses: gradients w.r.t. ``loss_a .. loss_{b-1}`` (shape ``(b - a,)``).
        inspect: called with the recomputed state at ``b`` before it is differentiated
            (the probe walks its graph for operations without double backward).
        grad_queries: gradients w.r.t. the multi-step loss's query losses after steps
            ``a .. b-1`` (shape ``(b - a,)``); each is added into the cotangent as the
            pullback passes its state (Note [The multi-step loss under recomputation]).
        outer: stand-ins of the outer tensors these steps read that need a gradient
            (leaves that ``rec.outer`` hands to the steps in their place, ``effmaml.outer``).

    Returns:
        ``(grad_a, grad_consts, grad_outer)``: the cotangent at ``state`` (same form as
        ``grad_b``), for each constant its gradient from these steps (``None`` where not
        needed or unused), and for each of ``outer`` its gradient (``None`` where unused).

    Raises:
        NoDoubleBackwardError: one of the steps cannot be differentiated twice (names the
            operation, its module and the step, as the probe does for step 0).

    Memory: ``b - a`` second-order step graphs, freed on return. Compute: the steps with
    graph, one walk of their graph's nodes (Note [A missing double backward inside a
    pullback]) and their backward.
    """
    leaves = [c.detach().requires_grad_(need) for c, need in zip(consts.flat(), need_consts)]
    c = consts.spec().unflatten(leaves)
    with replay_rng(rng), torch.enable_grad():
        s0 = state.detached(requires_grad=True)
        s = s0
        losses, queries = [], []
        for t in range(a, b):
            s, loss, query = inner_step(problem, rt, rec, s, t, c, create_graph=True)
            losses.append(loss)
            queries.append(query)
    if inspect is not None:
        inspect(s)
    # Note [A missing double backward inside a pullback]
    # A @once_differentiable backward hands its result on through a DelayedError node
    # whose inputs are detached stand-ins, not the graph: loss.backward() runs that node and
    # fails, but autograd.grad(outputs, inputs) runs only the nodes on a path to its inputs,
    # so the operation's second-order term would be missing without a word. Every pullback
    # therefore walks the graph it recomputed for such a node (a few microseconds per node:
    # about 1 ms for a ResNet18 step) before differentiating it; an operation whose double
    # backward is not implemented fails inside autograd.grad and is named the same way.
    found = find_no_double_backward(
        [*s.flat(differentiable_only=True), *losses, *(q for q in queries if q is not None)]
    )
    if found is not None:
        raise _no_double_backward(problem, rt, rec, state, rng, a, b, consts, "")
    outputs: list[Tensor] = []
    cotangents: list[Tensor] = []
    for v, g in zip(s.flat(differentiable_only=True), grad_b.flat(differentiable_only=True)):
        if v.requires_grad:  # an optimizer state that does not depend on the inputs
            outputs.append(v)
            cotangents.append(g)
    outputs += losses
    cotangents += [g.to(loss.dtype) for g, loss in zip(grad_losses.unbind(0), losses)]
    if grad_queries is not None:
        for g, query in zip(grad_queries.unbind(0), queries):
            if query is not None:
                outputs.append(query)
                cotangents.append(g.to(query.dtype))
    inputs = s0.flat(differentiable_only=True)
    n_s = len(inputs)
    inputs += [leaf for leaf, need in zip(leaves, need_consts) if need]
    n_c = len(inputs)
    inputs += list(outer)
    try:
        with torch.enable_grad():
            grads = torch.autograd.grad(outputs, inputs, cotangents, allow_unused=True)
    except (RuntimeError, NotImplementedError) as err:
        if isinstance(err, NoDoubleBackwardError) or not is_no_double_backward(err):
            raise
        raise _no_double_backward(problem, rt, rec, state, rng, a, b, consts, str(err)) from err
    grad_a = [_or_zeros(g, v) for g, v in zip(grads[:n_s], inputs[:n_s])]
    it = iter(grads[n_s:n_c])
    g_consts = [next(it) if need else None for need in need_consts]
    return s0.spec().unflatten(grad_a, differentiable_only=True), g_consts, list(grads[n_c:])


def _no_double_backward(
    problem: InnerProblem,
    rt: Runtime,
    rec: Records,
    state: InnerState,
    rng: RngState,
    a: int,
    b: int,
    consts: Consts,
    detail: str,
) -> NoDoubleBackwardError:
    """The error for a pullback of steps ``a..b-1`` that autograd could not differentiate
    twice: the first of those steps whose graph holds the operation, named with its module
    (``effmaml.diagnose``). Runs only on this error path: each step once more, first order,
    from the stored state and its RNG, and the diagnosis of each until one is found."""
    with replay_rng(rng):
        s = state
        for t in range(a, b):
            found = culprit(problem, s, consts, t)
            if found or t == b - 1:
                return no_double_backward_error(problem, s, consts, detail, t, found)
            s, _, _ = advance(problem, rt, rec, s, t, t + 1, consts)
    raise AssertionError("unreachable: a pullback covers at least one step")


def _or_zeros(g: Tensor | None, like: Tensor) -> Tensor:
    return torch.zeros_like(like) if g is None else g


def advance_to(
    problem: InnerProblem,
    rt: Runtime,
    rec: Records,
    state: InnerState,
    rng: RngState,
    a: int,
    b: int,
    consts: Consts,
) -> tuple[InnerState, RngState]:
    """Replay steps ``a..b-1`` from a stored ``(state, rng)``; return state and RNG at ``b``."""
    if a == b:
        return state, rng
    with replay_rng(rng):
        out, _, _ = advance(problem, rt, rec, state, a, b, consts)
        return out, capture_rng(problem.rng_devices)


class BackwardAgainError(RuntimeError):
    """A second backward through an unroll whose stored states the first one used up."""


def backward_again_error(what: str) -> BackwardAgainError:
    """The error of a second backward through one ``adapt`` run by ``what``, with the fixes."""
    return BackwardAgainError(
        f"backward ran a second time through one adapt run by {what}: its first backward "
        f"used up what the forward pass kept for it (retain_graph=True keeps autograd's "
        f"graph, not the inner states a strategy recomputes from). Take every gradient in "
        f"one backward: sum the losses ((loss_a + loss_b).backward()), or pass them together "
        f"to torch.autograd.grad([loss_a, loss_b], ...); or call adapt again for each "
        f"backward; or use strategy='naive', whose graph retain_graph keeps"
    )


class Handle:
    """A stored state, wherever it lives; ``Store.get`` brings it to the device."""


@dataclass
class Resident(Handle):
    """A handle to a state kept where it is (on the device)."""

    state: InnerState


class Store:
    """Where a schedule keeps its stored states. This one: on the device, as they are."""

    #: whether stored states leave the device (and cost host memory and transfers)
    off_device: bool = False

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


Pull = Callable[[InnerState, RngState, int, int], None]


class Schedule:
    """Which states the forward pass stores and how the backward pass pulls back.

    Subclasses implement ``forward`` (run all N steps without graph, store states) and
    ``backward`` (recompute and pull back, in reverse order, through
    ``pullback``), and the cost formulas used by the memory model.

    Attributes:
        store: where stored states live.
        start: the step the input state is at: 0 for every exact schedule, whose pullbacks
            reach step 0; a truncated window's input is the state at its first step,
            produced by the caller (``effmaml.strategies.truncated``), and its pullbacks
            stop there.
    """

    store: Store
    start: int = 0

    def forward(
        self,
        problem: InnerProblem,
        rt: Runtime,
        rec: Records,
        state0: InnerState,
        rng0: RngState,
        consts: Consts,
    ) -> tuple[InnerState, list[Tensor], list[Tensor], object]:
        """Run steps ``start..N-1``; return the final state, the N inner losses, the N query
        losses (``advance``'s; zeros before ``start``) and a memo for backward."""
        raise NotImplementedError

    def backward(
        self,
        problem: InnerProblem,
        rt: Runtime,
        rec: Records,
        memo: object,
        state0: InnerState,
        rng0: RngState,
        consts: Consts,
        pull: Pull,
    ) -> None:
        """Call ``pull(state_a, rng_a, a, b)`` for consecutive ranges from the end to
        ``start``."""
        raise NotImplementedError

    def step_evals(self, steps: int) -> int:
        """Inner-step evaluations of one forward + backward (without the probe)."""
        raise NotImplementedError

    def advances(self, steps: int) -> int:
        """Steps run without graph (forward and re-advances): every exact schedule pulls
        each of the N steps back exactly once, and each pullback is one evaluation."""
        return self.step_evals(steps) - steps

    def moved_states(self, steps: int) -> int:
        """States that pass through ``store`` (each goes off the device and back)."""
        return 0

    def stored_states(self, steps: int) -> int:
        """The most states held at once on the device besides the working one."""
        raise NotImplementedError

    def graph_steps(self, steps: int) -> int:
        """The most steps whose second-order graph is alive at once in backward."""
        return 1


class _Unroll(torch.autograd.Function):
    """Forward: the schedule's forward, already run (its results are in the run). Backward:
    its pullbacks.

    Flat inputs: the initial state's tensors, then the constants' (``_Run``'s specs),
    then the outer tensors the forward pass found (``effmaml.outer``); outputs: the final
    state's tensors (non-differentiable groups marked so), then the stacked inner losses
    and the stacked query losses of a multi-step loss (zeros without).
    """

    @staticmethod
    def forward(ctx: Any, run: _Run, *flat: Tensor) -> tuple[Tensor, ...]:
        assert run.result is not None
        state, losses, queries = run.result
        run.result = None
        # The initial state is the input itself; save_for_backward guards it, the constants
        # and the outer tensors against in-place changes between adapt and backward.
        ctx.save_for_backward(*flat)
        ctx.run = run
        out = state.map(lambda t, diff: t if diff else t.detach())
        fixed = [t for t, diff in zip(out.flat(), run.state_spec.differentiable()) if not diff]
        ctx.mark_non_differentiable(*fixed)
        return (*out.flat(), torch.stack(losses), torch.stack(queries))

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple[Tensor | None, ...]:
        run: _Run = ctx.run
        if run.memo is None:  # the first backward used the stored states up
            raise backward_again_error(f"strategy {run.label or type(run.schedule).__name__}")
        problem, rt, rec, spec = run.problem, run.rt, run.rec, run.state_spec
        flat = ctx.saved_tensors
        n_c = run.consts_spec.size
        n_in = spec.size + n_c
        state0, consts = run.unflatten(flat[:n_in])
        diff = [g for g, d in zip(grads[: spec.size], spec.differentiable()) if d]
        grad = [spec.unflatten(diff, differentiable_only=True)]
        grad_losses, grad_queries = grads[-2], grads[-1]
        msl = bool(problem.step_weights)
        need = list(ctx.needs_input_grad[1 + spec.size : 1 + n_in])
        need_outer = list(ctx.needs_input_grad[1 + n_in :])
        assert len(need) == n_c and len(need_outer) == len(flat) - n_in
        # Note [Outer tensors under recomputation]
        # The steps read the outer tensors themselves (a batch, loss_fn's closure); while
        # they run again here, rec.outer hands each torch function a leaf sharing the outer
        # tensor's storage instead, so the pullback's autograd.grad differentiates with
        # respect to it, and the gradient leaves this Function for the outer tensor: into
        # the graph it came from (a view of a learned leaf, augment(x, θ), G(z)).
        stand_ins = [o.detach().requires_grad_(n) for o, n in zip(flat[n_in:], need_outer)]
        acc: list[Tensor | None] = [None] * n_c
        acc_outer: list[Tensor | None] = [None] * len(stand_ins)
        expect = [problem.steps]

        def pull(state_a: InnerState, rng_a: RngState, a: int, b: int) -> None:
            # the schedule must hand over consecutive ranges, last first
            assert b == expect[0], (a, b, expect[0])
            wanted = [] if rec.outer is None else rec.outer.read_by(a, b)
            wanted = [i for i in wanted if need_outer[i]]
            grad[0], g_c, g_o = pullback(
                problem,
                rt,
                rec,
                state_a,
                rng_a,
                a,
                b,
                consts,
                need,
                grad[0],
                grad_losses[a:b],
                grad_queries=grad_queries[a:b] if msl else None,
                outer=[stand_ins[i] for i in wanted],
            )
            _accumulate(acc, g_c)
            for i, g in zip(wanted, g_o):
                if g is not None:
                    prev = acc_outer[i]
                    acc_outer[i] = g if prev is None else prev + g
            expect[0] = a

        memo, run.memo = run.memo, None
        with contextlib.ExitStack() as stack:
            if rec.outer is not None:
                stack.enter_context(rec.outer.substituting(stand_ins))
            run.schedule.backward(
                problem, rt, rec, memo, state0.detached(False), run.rng0, consts, pull
            )
        assert expect[0] == run.schedule.start
        if rec.outer is not None:
            rec.outer.release()
        rt.host_peak_bytes = max(rt.host_peak_bytes, run.schedule.store.host_bytes())
        if rec.witness is not None:
            rec.witness.verify()
        return (None, *spec.full(grad[0]), *acc, *acc_outer)


def _accumulate(acc: list[Tensor | None], grads: Sequence[Tensor | None]) -> None:
    for i, g in enumerate(grads):
        if g is not None:
            prev = acc[i]
            acc[i] = g if prev is None else prev + g


@dataclass
class _Run:
    """What the custom Function needs besides tensors: the forward pass's results (until
    the Function takes them), the schedule's memo and RNG for backward."""

    problem: InnerProblem
    rt: Runtime
    rec: Records
    schedule: Schedule
    state_spec: Spec[InnerState]
    consts_spec: Spec[Consts]
    rng0: RngState
    memo: object = None
    result: tuple[InnerState, list[Tensor], list[Tensor]] | None = None
    label: str = ""

    def unflatten(self, flat: Sequence[Tensor]) -> tuple[InnerState, Consts]:
        state, rest = self.state_spec.split(flat)
        return state, self.consts_spec.unflatten(rest)


def run_schedule(
    problem: InnerProblem,
    rt: Runtime,
    state0: InnerState,
    consts: Consts,
    schedule: Schedule,
    label: str = "",
) -> tuple[InnerState, Tensor, Tensor, Records]:
    """Run the unroll under ``schedule``; the result is differentiable w.r.t. the inputs
    and every outer tensor the steps read (``effmaml.outer``).

    Args:
        problem: the problem.
        rt: the call's runtime (counts, the host store's peak).
        state0: the state at ``schedule.start`` (the initial one, params θ, optimizer
            state and buffers, for every exact schedule).
        consts: constants (fixed params, tensor hyper-parameters, θ₀).
        schedule: the schedule.
        label: the strategy as run, for messages (``checkpoint(segment=5, ...)``).

    Returns:
        ``(state_N, losses, queries, records)``: the inner and query losses of shape
        ``(N,)``, and the run's ``Records`` (the outer tensors the steps read, the
        witness that checks the recomputations in backward).
    """
    # Note [Checking that a recomputation saw the same batch]
    # The forward pass records each step's loss and batch fingerprint; every step run
    # again in backward is compared with them on the device, and the backward ends with one
    # check (one host sync) that raises if a batch source gave another batch for an index.
    rec = Records(
        OuterTensors(problem.steps), Witness(problem.steps, problem.device, problem.autocast)
    )
    # Note [The forward pass before the Function]
    # The forward pass runs before the custom Function is applied (without graph, as a
    # Function's forward would), so that the outer tensors it finds can be the Function's
    # inputs: what is not an input of the Function gets no gradient from its backward.
    rng0 = capture_rng(problem.rng_devices)
    with torch.no_grad():
        state, losses, queries, memo = schedule.forward(
            problem, rt, rec, state0.detached(requires_grad=False), rng0, consts
        )
    rt.host_peak_bytes = max(rt.host_peak_bytes, schedule.store.host_bytes())
    run = _Run(problem, rt, rec, schedule, state0.spec(), consts.spec(), rng0, memo, label=label)
    run.result = (state, losses, queries)
    assert rec.outer is not None
    out = _Unroll.apply(run, *state0.flat(), *consts.flat(), *rec.outer.tensors)
    state, _ = run.state_spec.split(out[:-2])
    return state, out[-2], out[-1], rec
