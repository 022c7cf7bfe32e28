"""The one inner step that every strategy runs, and the problem it runs on.

``inner_step(problem, state, t, consts, create_graph)`` evaluates the user's loss on batch
``t`` with :func:`torch.func.functional_call` (no deep copy and no patching of the user's
module), differentiates it (plus an optional proximal term ``(λ/2)‖φ − θ₀‖²``) with
:func:`torch.autograd.grad`, and applies the inner optimizer. Strategies differ only in how
they differentiate *through* this function: keep its graph (naive), drop it (first order),
or drop it and rebuild it later (checkpoint).

Memory of one call: with ``create_graph=True`` it keeps one step's second-order graph ``A``
alive through its outputs; without, it keeps nothing beyond the new state ``P``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .clip import clip_backward
from .inner import InnerOptimizer
from .memory import nbytes
from .replay import AutocastState, Witness, capture_autocast, replay_autocast

__all__ = [
    "Consts",
    "Counter",
    "FunctionalModel",
    "InnerProblem",
    "InnerState",
    "RepeatedBatch",
    "attention_kernels",
    "inner_step",
    "move_to",
]

LossFn = Callable[[Callable[..., Any], Any], Tensor]


@dataclass
class InnerState:
    """What changes from one inner step to the next.

    Attributes:
        params: adapted parameters φ_t, name -> tensor.
        opt: inner-optimizer state (momentum, moments), flat name -> tensor.
        buffers: module buffers (BatchNorm running statistics), name -> tensor. Never
            differentiable.
    """

    params: dict[str, Tensor]
    opt: dict[str, Tensor]
    buffers: dict[str, Tensor]

    def nbytes(self) -> int:
        """Bytes held by the state's tensors (``P`` in the memory formulas)."""
        return nbytes([*self.params.values(), *self.opt.values(), *self.buffers.values()])

    def detached(self, requires_grad: bool) -> InnerState:
        """A copy sharing storage, cut from any graph; params/opt leaves when asked."""

        def cut(d: dict[str, Tensor], rg: bool) -> dict[str, Tensor]:
            out = {}
            for k, v in d.items():
                v = v.detach()
                if rg and v.is_floating_point():
                    v.requires_grad_(True)
                out[k] = v
            return out

        return InnerState(
            cut(self.params, requires_grad), cut(self.opt, requires_grad), cut(self.buffers, False)
        )


@dataclass
class Consts:
    """Tensors every step reads but does not change; they receive accumulated gradients.

    Attributes:
        fixed: parameters that are not adapted (ANIL heads/bodies), name -> tensor.
        hyper: tensor hyper-parameters of the inner optimizer (learned learning rates).
        theta0: the initial adapted parameters θ₀, used by the proximal term (empty when
            ``prox == 0``).
    """

    fixed: dict[str, Tensor]
    hyper: dict[str, Tensor]
    theta0: dict[str, Tensor]

    def flat(self) -> list[Tensor]:
        return [*self.fixed.values(), *self.hyper.values(), *self.theta0.values()]

    def like(self, tensors: Sequence[Tensor]) -> Consts:
        """The same structure filled with ``tensors`` (in :meth:`flat` order)."""
        it = iter(tensors)
        return Consts(
            {k: next(it) for k in self.fixed},
            {k: next(it) for k in self.hyper},
            {k: next(it) for k in self.theta0},
        )


@dataclass
class Counter:
    """Counts inner-step evaluations (forward + backward of the inner loss)."""

    step_evals: int = 0


class FunctionalModel:
    """Calls a module with given parameters and buffers, without touching the module.

    Buffers are copied per call so that running statistics updated by a train-mode
    BatchNorm never leak into the tensors held here. The module's own train/eval mode
    applies.
    """

    def __init__(
        self,
        model: nn.Module,
        tensors: Mapping[str, Tensor],
        buffers: Mapping[str, Tensor],
        copy_buffers: bool = True,
    ) -> None:
        self._model = model
        self._tensors = dict(tensors)
        self._buffers = buffers
        self._copy_buffers = copy_buffers

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        buffers = self._buffers
        if self._copy_buffers:
            buffers = {k: b.clone() for k, b in buffers.items()}
        return functional_call(self._model, {**self._tensors, **buffers}, args, kwargs)


@dataclass
class InnerProblem:
    """Everything static about one ``adapt`` call; built by :class:`effmaml.MAML`.

    Attributes:
        model: the user's module (never mutated).
        loss_fn: ``loss_fn(module_like, batch) -> scalar``.
        inner: the differentiable inner optimizer.
        batches: one batch per step (indexed again during recomputation).
        device: where steps run; each batch is moved there only for its own step.
        prox: λ of the proximal term (0 disables it).
        clip: grad-of-grad clipping bound, or None.
        update_running_stats: whether train-mode BatchNorm updates running statistics.
        check_finite: raise on a non-finite inner loss (one host sync per step).
        counter: step-evaluation counter shared with the result.
        memory_budget: bytes the meta-gradient may use above the start (device memory, or
            resident memory on a CPU), or None.
        host_memory_budget: bytes of pinned host memory ``offload`` may hold, or None.
        probe_cache: the front's cache of probe results (:func:`effmaml.probe.probe`).
        autocast: the autocast state when ``adapt`` started; every inner step re-enters it
            (Note [Autocast under recomputation]).
        witness: set by recomputing strategies: records each step's loss and batch in the
            forward pass and checks them when the step is recomputed.
        math_attention: run every inner step's scaled-dot-product attention with the math
            kernel (Note [Attention kernels and double backward]).
    """

    model: nn.Module
    loss_fn: LossFn
    inner: InnerOptimizer
    batches: Sequence[Any]
    device: torch.device
    prox: float = 0.0
    clip: float | None = None
    update_running_stats: bool = True
    check_finite: bool = True
    counter: Counter = field(default_factory=Counter)
    memory_budget: int | None = None
    host_memory_budget: int | None = None
    probe_cache: dict[Any, Any] | None = None
    autocast: AutocastState = field(default_factory=capture_autocast)
    witness: Witness | None = None
    math_attention: bool = False

    @property
    def steps(self) -> int:
        return len(self.batches)

    def batch(self, t: int) -> Any:
        """Batch ``t`` on the device (seen by the witness, if any)."""
        batch = move_to(self.batches[t], self.device)
        if self.witness is not None:
            self.witness.batch(t, batch)
        return batch


class RepeatedBatch(Sequence):
    """One batch presented as a sequence of ``steps`` identical batches."""

    def __init__(self, batch: Any, steps: int) -> None:
        self.batch = batch
        self.steps = steps

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, t):  # type: ignore[override]
        if isinstance(t, slice):
            return [self.batch] * len(range(*t.indices(self.steps)))
        if not -self.steps <= t < self.steps:
            raise IndexError(t)
        return self.batch


def move_to(batch: Any, device: torch.device) -> Any:
    """Move every tensor inside ``batch`` (tensors, tuples, lists, dicts) to ``device``."""
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(move_to(b, device) for b in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: move_to(v, device) for k, v in batch.items()}
    return batch


def inner_step(
    problem: InnerProblem,
    state: InnerState,
    t: int,
    consts: Consts,
    create_graph: bool,
) -> tuple[InnerState, Tensor]:
    """Run inner step ``t``: loss on batch ``t``, its gradient, one optimizer update.

    Args:
        problem: the static problem.
        state: φ_t, optimizer state and buffers. ``state.params`` must require grad (leaves
            or graph nodes).
        t: step index (selects the batch; Adam's bias correction).
        consts: non-adapted parameters, tensor hyper-parameters and θ₀.
        create_graph: keep the second-order graph (exact strategies) or not (first order).

    Returns:
        ``(state_{t+1}, loss_t)`` where ``loss_t`` is the user's loss before the update
        (without the proximal term). Buffers of the new state are fresh tensors; the ones
        in ``state`` are left untouched.

    Raises:
        ValueError: the loss is not a scalar tensor.
        FloatingPointError: the loss is not finite (names the step).
    """
    problem.counter.step_evals += 1
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
    with replay_autocast(problem.autocast), attention_kernels(problem), torch.enable_grad():
        loss = problem.loss_fn(module, problem.batch(t))
        _check_loss(loss, t, problem.check_finite)
        if problem.witness is not None:
            problem.witness.loss(t, loss)
        objective = loss
        if problem.prox:
            sq = sum(((state.params[k] - consts.theta0[k]) ** 2).sum() for k in state.params)
            objective = loss + 0.5 * problem.prox * sq
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
        opt, params = problem.inner.step(state.opt, state.params, grads_d, t, consts.hyper)
        if create_graph:
            params = clip_backward(params, problem.clip)
    if not problem.update_running_stats:
        buffers = state.buffers
    return InnerState(params, opt, buffers), loss


def attention_kernels(problem: InnerProblem) -> contextlib.AbstractContextManager:
    """The scaled-dot-product-attention kernels an inner step may use.

    # Note [Attention kernels and double backward]
    # On CUDA, F.scaled_dot_product_attention picks fused kernels (flash, memory-efficient)
    # whose backward is itself not differentiable: a second-order strategy would fail at
    # its first double backward. The math kernel is made of differentiable ops. Under a
    # second-order strategy every inner step (the forward's first-order advances too)
    # runs attention with the math kernel, so that a step recomputed with its graph gives
    # the very numbers the forward pass gave, as naive's steps do. Cost: the math kernel
    # keeps each head's (sequence x sequence) attention matrix for backward, where flash
    # keeps O(sequence). first_order never differentiates twice and keeps the fused kernels.
    """
    if not problem.math_attention:
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
            f"loss_fn calls the module it is given (loss_fn(model, batch) -> model(x) ...)"
        )
    if check_finite and not bool(torch.isfinite(loss)):
        raise FloatingPointError(
            f"inner loss is {loss.item()} at step {t}; lower the inner lr, clip the inputs or "
            f"the loss, or check batch {t} for NaN/inf values"
        )
