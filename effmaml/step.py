"""The one inner step that every strategy runs.

``inner_step(problem, rt, state, t, consts, create_graph)`` evaluates the user's loss on batch
``t`` with ``torch.func.functional_call`` (no deep copy and no patching of the user's
module), differentiates it (plus an optional proximal term ``(λ/2)‖φ − θ₀‖²``) with
``torch.autograd.grad``, and applies the inner optimizer. Strategies differ only in how
they differentiate *through* this function: keep its graph (naive), drop it (first order),
or drop it and rebuild it later (checkpoint).

Memory of one call: with ``create_graph=True`` it keeps one step's second-order graph ``A``
alive through its outputs; without, it keeps nothing beyond the new state ``P``.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from . import module as _module_py
from .clip import clip_backward
from .inner import InnerOptimizer
from .module import FunctionalModel
from .outer import reading
from .problem import InnerProblem, LossFn, Records, Runtime
from .replay import replay_autocast
from .state import Consts, InnerState
from .substitutes import substituted

__all__ = [
    "at_step",
    "attention_kernels",
    "call_loss",
    "check_loss_fn",
    "current_step",
    "differentiable_ops",
    "inner_step",
    "query_loss",
    "step_context",
]


def inner_step(
    problem: InnerProblem,
    rt: Runtime,
    rec: Records,
    state: InnerState,
    t: int,
    consts: Consts,
    create_graph: bool,
) -> tuple[InnerState, Tensor, Tensor | None]:
    """Run inner step ``t``: loss on batch ``t``, its gradient, one optimizer update, and
    with a multi-step loss the query loss at the state it produced.

    Args:
        problem: the problem.
        rt: the call's runtime (counts the evaluation).
        rec: the execution's records: the outer tensors the step reads are looked for
            there and the witness sees its loss and batch (``NO_RECORDS``: neither).
        state: φ_t, optimizer state and buffers. ``state.params`` must require grad (leaves
            or graph nodes).
        t: step index (selects the batch; Adam's bias correction).
        consts: non-adapted parameters, tensor hyper-parameters and θ₀.
        create_graph: keep the second-order graph (exact strategies) or not (first order).

    Returns:
        ``(state_{t+1}, loss_t, query_t)`` where ``loss_t`` is the user's loss before the
        update (without the proximal term) and ``query_t`` the query loss at
        ``state_{t+1}`` when ``problem.step_weights[t]`` is not 0 (with its graph when
        ``create_graph``), else None. Buffers of the new state are fresh tensors; the ones
        in ``state`` are left untouched; the query's forward updates none.

    Raises:
        TypeError: ``loss_fn`` cannot be called as ``loss_fn(m, batch)``, or returned
            something other than a tensor.
        ValueError: the loss is not a scalar (0-d) tensor, or does not depend on the
            adapted parameters.
        effmaml.outer.CapturedModelError: ``loss_fn`` read the model it captured instead
            of the module it is given (checked at step 0, and at every step of a strategy
            that finds outer tensors).
        FloatingPointError: the loss is not finite (names the step).
    """
    rt.step_evals += 1
    # Note [BatchNorm stats under recomputation]
    # functional_call hands our buffer tensors to the module, and train-mode BatchNorm
    # updates them in place. Each step therefore works on its own copy, so a stored state
    # (a checkpoint) keeps the statistics *before* the step, and recomputing step t from it
    # updates them exactly once more, in order, as the original pass did.
    buffers = {k: b.clone() for k, b in state.buffers.items()}
    # copy_buffers=False: the step's own copy is meant to be updated in place.
    module = FunctionalModel(
        problem.model, {**consts.fixed, **state.params}, buffers, copy_buffers=False
    )
    with step_context(problem, t):
        batch = rec.batch(problem, t)
        if rec.witness is not None:
            rec.witness.batch(t, batch)
        own = [*state.flat(), *consts.flat()]
        with reading(rec.outer, t, own, _captured(rt, rec, t)) as mode:
            loss = call_loss(problem.loss_fn, module, batch, t)
        if rec.outer is not None and t == 0 and isinstance(loss, Tensor) and rec.outer.discovering:
            rec.outer.check_graph(loss, t, mode)  # Note [What the mode cannot see]
        _check_loss(loss, t, problem.settings.check_finite)
        if rec.witness is not None:
            rec.witness.loss(t, loss)
        objective = loss
        if problem.settings.prox:
            sq = sum(((state.params[k] - consts.theta0[k]) ** 2).sum() for k in state.params)
            objective = loss + 0.5 * problem.settings.prox * sq
        names = list(state.params)
        grads = torch.autograd.grad(
            objective,
            [state.params[k] for k in names],
            create_graph=create_graph,
            allow_unused=True,
        )
        grads_d = {
            k: torch.zeros_like(state.params[k]) if g is None else g for k, g in zip(names, grads)
        }
        # what the inner optimizer's step reads is read by the step (Note [Finding what a
        # step reads]): a tensor attribute such as self.lr is an outer tensor
        reader = f"the inner optimizer {type(problem.inner).__name__}'s step"
        opt, params = problem.inner.apply_step(
            state.opt,
            state.params,
            grads_d,
            problem.first_step + t,
            consts.hyper,
            around=reading(rec.outer, t, [*own, *grads_d.values()], reader=reader),
        )
        if create_graph:
            params = clip_backward(params, problem.settings.clip)
        if not problem.settings.update_running_stats:
            buffers = state.buffers
        new = InnerState(params, opt, buffers)
        query = None
        if problem.weight(t):
            # with grad on, as naive computes it (no_grad may pick other kernels); a
            # first-order caller detaches it, which frees its graph at once
            query = query_loss(problem, new, consts, rt, rec, t)
    return new, loss, query


def query_loss(
    problem: InnerProblem,
    state: InnerState,
    consts: Consts,
    rt: Runtime,
    rec: Records,
    t: int,
) -> Tensor:
    """The query loss at ``state`` (the multi-step loss's term after step ``t``), under the
    contexts the caller entered (the step's autocast, stand-ins and step index). The
    module's buffers are copied: the query's forward never updates running statistics.
    The query batch and the outer tensors it reads go through ``rec`` (the execution's
    records).
    """
    # Note [The multi-step loss under recomputation]
    # Naive evaluates L_query(φ_{t+1}) right after step t, so the query's dropout draws
    # come between step t's and step t+1's. Every strategy evaluates it at the same place
    # (inside the step), in the forward pass and in every recomputation, so a replayed RNG
    # state reproduces both, and a pullback adds w_t · ∂L_query/∂φ_{t+1} to the cotangent
    # as it passes state t+1: no query graph outlives its step's pullback.
    module = FunctionalModel(problem.model, {**consts.fixed, **state.params}, state.buffers)
    outer = rec.outer
    query = rec.query(problem)
    captured = _captured(rt, rec, t)
    with reading(outer, t, [*state.flat(), *consts.flat()], captured):
        loss = call_loss(problem.loss_fn, module, query, t)
    if not isinstance(loss, Tensor) or loss.dim() != 0:
        raise ValueError("loss_fn must return a scalar tensor on the query batch too")
    return loss


_STEP: contextvars.ContextVar[int | None] = contextvars.ContextVar("effmaml_step", default=None)


def current_step() -> int | None:
    """The index of the inner step running now (in the forward pass or a recomputation),
    or the one ``at_step`` set; None outside. What per-step modules select from."""
    return _STEP.get()


@contextlib.contextmanager
def at_step(t: int | None) -> Iterator[None]:
    """Run the body as inner step ``t`` (``current_step``), restoring the previous one.

    A context variable, set and reset around each step: two ``MAML`` objects, or a step
    and its recomputation in backward, never see each other's index.

    Args:
        t: the step index (``None``: outside any step).

    Example:
        >>> with effmaml.at_step(0):  # a per-step BatchNorm model outside adapt
        ...     logits = model(x)
    """
    token = _STEP.set(t)
    try:
        yield
    finally:
        _STEP.reset(token)


def step_context(
    problem: InnerProblem, t: int, grad: bool = True
) -> contextlib.AbstractContextManager[Any]:
    """What inner step ``t``'s user code runs under, wherever it runs (the forward pass, a
    recomputation, the probe, the first-order multi-step loss, iMAML's solve, a diagnosis):
    the autocast state ``adapt`` started in (Note [Autocast under recomputation]), the
    double-backward kernels and stand-ins (``differentiable_ops``), the step index
    (``at_step``) and, with ``grad``, grad mode on."""
    stack = contextlib.ExitStack()
    stack.enter_context(replay_autocast(problem.autocast))
    stack.enter_context(differentiable_ops(problem))
    stack.enter_context(at_step(problem.first_step + t))
    if grad:
        stack.enter_context(torch.enable_grad())
    return stack


def differentiable_ops(problem: InnerProblem) -> contextlib.AbstractContextManager[Any]:
    """What an inner step runs under so that it can be differentiated twice: the math
    attention kernel (``attention_kernels``) and the stand-ins of
    ``effmaml.substitutes``, each where the problem asks for it."""
    stack = contextlib.ExitStack()
    stack.enter_context(attention_kernels(problem))
    stack.enter_context(substituted(problem.settings.substitute_ops))
    return stack


def attention_kernels(problem: InnerProblem) -> contextlib.AbstractContextManager[None]:
    """The scaled-dot-product-attention kernels an inner step may use."""
    # Note [Attention kernels and double backward]
    # On CUDA, F.scaled_dot_product_attention picks fused kernels (flash, memory-efficient)
    # whose backward is itself not differentiable: a second-order strategy would fail at
    # its first double backward. The math kernel is made of differentiable ops. Under a
    # second-order strategy every inner step (the forward's first-order advances too)
    # runs attention with the math kernel, so that a step recomputed with its graph gives
    # the very numbers the forward pass gave, as naive's steps do. Cost: the math kernel
    # keeps each head's (sequence x sequence) attention matrix for backward, where flash
    # keeps O(sequence). first_order never differentiates twice and keeps the fused kernels.
    if not problem.settings.math_attention:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


def _check_loss(loss: Any, t: int, check_finite: bool) -> None:
    if not isinstance(loss, Tensor):
        raise TypeError(
            f"loss_fn must return a scalar tensor; at inner step {t} it returned "
            f"{type(loss).__name__}"
        )
    if loss.dim() != 0:
        raise ValueError(
            f"loss_fn must return a scalar (0-d) tensor; at inner step {t} it returned shape "
            f"{tuple(loss.shape)}. Reduce it, e.g. with .mean() or reduction='mean'"
        )
    if not loss.requires_grad:
        raise ValueError(
            f"the inner loss at step {t} does not depend on the adapted parameters; make sure "
            f"loss_fn calls the module it is given (loss_fn(m, batch) -> m(x) ...)"
        )
    if check_finite and not bool(torch.isfinite(loss)):
        raise FloatingPointError(
            f"inner loss is {loss.item()} at step {t}; lower the inner lr, clip the inputs or "
            f"the loss, or check batch {t} for NaN/inf values"
        )


def _captured(rt: Runtime, rec: Records, t: int) -> dict[int, tuple[str, str]] | None:
    """The captured model's tensors to refuse at step ``t``: at the first step, and at every
    step whose user code runs under the outer-tensor mode anyway (no cost there)."""
    return rt.captured if t == 0 or rec.outer is not None else None


_MODULE_FILE = _module_py.__file__  # where FunctionalModel's own errors are raised

_RULE = (
    "loss_fn must be callable as loss_fn(m, batch) -> scalar tensor: m is the model at the "
    "step's parameters (call m(x), m.embed(x) ...) and batch is the step's batch as the "
    "source holds it, one argument (unpack it inside: x, y = batch)"
)


def check_loss_fn(loss_fn: Callable[..., Any]) -> None:
    """Raise, before any work, if ``loss_fn``'s signature cannot take ``(m, batch)`` (where
    ``inspect.signature`` can read it; ``call_loss`` catches the rest at the first step).

    Raises:
        TypeError: states the rule and the signature found.
    """
    if isinstance(loss_fn, (nn.Module, InnerOptimizer)) or getattr(
        loss_fn, "__module__", ""
    ).startswith("torch.nn"):
        # torch's losses take (input, target); a module or an inner optimizer here is
        # usually MAML's arguments in another order
        if isinstance(loss_fn, (nn.Module, InnerOptimizer)):
            what = type(loss_fn).__name__
        else:
            what = getattr(loss_fn, "__qualname__", repr(loss_fn))
        raise TypeError(
            f"{_RULE}; got {what} from torch or effmaml itself, which does not take (m, "
            f"batch): wrap a torch loss, e.g. loss_fn = lambda m, batch: "
            f"F.cross_entropy(m(batch[0]), batch[1]), and pass MAML(model, loss_fn, inner, "
            f"strategy) in that order"
        )
    if not callable(loss_fn):
        raise TypeError(f"{_RULE}; got {type(loss_fn).__name__}, which is not callable")
    try:
        sig = inspect.signature(loss_fn)
    except (TypeError, ValueError):  # a builtin or an extension: checked at the call
        return
    try:
        sig.bind(None, None)
    except TypeError as err:
        name = getattr(loss_fn, "__name__", type(loss_fn).__name__)
        raise TypeError(f"{_RULE}; {name}{sig} cannot: {err}") from None


def call_loss(loss_fn: LossFn, module: Any, batch: Any, t: int) -> Any:
    """``loss_fn(module, batch)``; a call that fails on its arguments (not inside
    ``loss_fn``) raises the rule.

    Raises:
        TypeError: ``loss_fn`` does not take ``(m, batch)`` (names the step); a
            ``TypeError`` raised inside ``loss_fn`` passes unchanged.
    """
    try:
        return loss_fn(module, batch)
    except TypeError as err:
        tb = err.__traceback__
        if tb is not None and tb.tb_next is None:  # raised by the call itself: no frame ran
            raise TypeError(f"{_RULE}; calling it so at inner step {t} failed: {err}") from err
        if f"'{type(batch).__name__}' object is not callable" in str(err):
            # the batch was called as the model (m(x) on a tuple): usually (batch, m)
            raise TypeError(
                f"{err} (raised at inner step {t} where loss_fn called the batch it was "
                f"given as a model; {_RULE}: if your loss_fn takes (batch, m), swap its "
                f"arguments)"
            ) from err
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        if tb is not None and tb.tb_frame.f_code.co_filename == _MODULE_FILE:
            # the model was used as something else (batch[0] on m): usually (batch, m)
            raise TypeError(
                f"{err} (raised at inner step {t} where loss_fn used the model m it was "
                f"given; {_RULE}: if your loss_fn takes (batch, m), swap its arguments)"
            ) from err
        raise
