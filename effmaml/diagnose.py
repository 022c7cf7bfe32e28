"""Naming the operation that has no double backward: its autograd node and its module.

When the early checks (``effmaml.checks.find_no_double_backward``, a real pullback in
the probe) find that step 0 cannot be differentiated twice, or a pullback in backward finds
that a later step cannot, ``no_double_backward_error`` runs that step's loss and gradient
once more, under anomaly mode (which links each node made
in a backward pass to the node whose backward made it) and with forward hooks that record
which module each autograd node was created in. The error then names the node
(``HardsigmoidBackward0``), the module path (``features.1.block.1.scale_activation``) and
the ways out.

Cost: one more forward and backward of the step, only on this error path; the hooks and the
tracing mode exist only during it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

from .checks import find_no_double_backward
from .module import FunctionalModel
from .problem import InnerProblem
from .replay import forked_rng
from .state import Consts, InnerState
from .step import step_context
from .substitutes import NODES

__all__ = ["NoDoubleBackwardError", "culprit", "no_double_backward_error"]


class NoDoubleBackwardError(RuntimeError):
    """An operation of the model (or loss) has no double backward."""


class _Trace(TorchFunctionMode):
    """Records, for every autograd node a torch function creates, the module it ran in."""

    def __init__(self, stack: list[str], created: dict[int, tuple[Any, str]]) -> None:
        super().__init__()
        self.stack, self.created = stack, created

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        if self.stack:
            for t in _tensors(out):
                if t.grad_fn is not None and id(t.grad_fn) not in self.created:
                    # keep the node alive: its id must not be reused while we look it up
                    self.created[id(t.grad_fn)] = (t.grad_fn, self.stack[-1])
        return out


def _tensors(out: Any) -> Iterator[Tensor]:
    if isinstance(out, Tensor):
        yield out
    elif isinstance(out, (tuple, list)):
        for o in out:
            yield from _tensors(o)


def culprit(
    problem: InnerProblem, state: InnerState, consts: Consts, step: int = 0
) -> list[tuple[str, str, str]]:
    """Every node without double backward in inner step ``step`` from ``state``: its name,
    the node whose backward made it, and the module that created that one (in the model's
    module order).

    Returns:
        ``[(bad node, forward node, module path), ...]``, a ``""`` where it was not found.
    """
    model = problem.model
    names = {id(m): n for n, m in model.named_modules()}
    stack: list[str] = []
    created: dict[int, tuple[Any, str]] = {}

    def enter(module: torch.nn.Module, args: Any) -> None:
        if id(module) in names:
            stack.append(names[id(module)] or "(the model)")

    def leave(module: torch.nn.Module, args: Any, out: Any) -> None:
        if id(module) in names and stack:
            path = stack.pop()
            # what the trace does not see (a custom autograd Function's apply): a module's
            # output node, if no inner module or traced op claimed it first
            for t in _tensors(out):
                if t.grad_fn is not None and id(t.grad_fn) not in created:
                    created[id(t.grad_fn)] = (t.grad_fn, path)

    from torch.nn.modules.module import (
        register_module_forward_hook,
        register_module_forward_pre_hook,
    )

    handles = [register_module_forward_pre_hook(enter), register_module_forward_hook(leave)]
    try:
        with (
            forked_rng(problem.rng_devices),
            torch.autograd.set_detect_anomaly(True, check_nan=False),
            torch.enable_grad(),
            _Trace(stack, created),
            step_context(problem, step, grad=False),
        ):
            params = {k: v.detach().requires_grad_(True) for k, v in state.params.items()}
            buffers = {k: b.clone() for k, b in state.buffers.items()}
            module = FunctionalModel(model, {**consts.fixed, **params}, buffers, False)
            loss = problem.loss_fn(module, problem.batch(step))
            grads = torch.autograd.grad(
                loss, list(params.values()), create_graph=True, allow_unused=True
            )
    finally:
        for h in handles:
            h.remove()
    found = []
    for bad in find_no_double_backward([g for g in grads if g is not None], every=True):
        parent = bad.metadata.get("parent_")
        path = "" if parent is None else created.get(id(parent), (None, ""))[1]
        found.append((_node_name(bad), "" if parent is None else _node_name(parent), path))
    order = {n or "(the model)": i for i, (n, _) in enumerate(model.named_modules())}
    return sorted(set(found), key=lambda f: (order.get(f[2], len(order)), f))


def _node_name(node: Any) -> str:
    return str(node.name()).removeprefix("torch::autograd::")


def no_double_backward_error(
    problem: InnerProblem,
    state: InnerState,
    consts: Consts,
    detail: str = "",
    step: int = 0,
    found: list[tuple[str, str, str]] | None = None,
) -> NoDoubleBackwardError:
    """The error to raise when inner step ``step`` (from ``state``) cannot be differentiated
    twice: names the operation's autograd node and module (``culprit``, unless ``found``
    already holds its answer), the step, and the ways out."""
    found = (culprit(problem, state, consts, step) if found is None else found) or [("", "", "")]
    bad, node, path = found[0]
    where = f"autograd node {node or bad or 'unknown'}"
    if path:
        kind = type(problem.model.get_submodule(path)).__name__ if path != "(the model)" else ""
        where += f", created in module {path!r}" + (f" ({kind})" if kind else "")
    if len(found) > 1:
        where += (
            f" (and {len(found) - 1} more: "
            + ", ".join(f"{n or b} in {p!r}" if p else (n or b) for b, n, p in found[1:4])
            + (", ..." if len(found) > 4 else "")
            + ")"
        )
    if bad and node:
        where += f"; its backward leaves a {bad} node"
    where += f" (inner step {step})"
    fixes = []
    if node in NODES:
        fixes.append(
            f"MAML(..., substitute_ops=True) runs {NODES[node]} as a twice-differentiable "
            f"formulation with the same values (on by default for second-order strategies "
            f"when the model holds the module that calls it; here it was off, or the "
            f"function is called outside such a module)"
        )
    elif node.startswith("ScaledDotProduct") or "attention" in bad.lower():
        fixes.append(
            "MAML(..., math_attention=True) (the default for second-order strategies) runs "
            "attention with the math kernel, whose backward is differentiable"
        )
    else:
        fixes.append(
            "replace the operation with a twice-differentiable one (a custom autograd "
            "Function marked @once_differentiable needs a backward made of differentiable "
            "operations)"
        )
    fixes.append("use strategy='first_order', which needs no second derivatives")
    said = f" Autograd said: {detail}" if detail else ""
    return NoDoubleBackwardError(
        f"an operation in the model or loss has no double backward, which second-order MAML "
        f"needs: {where}. Ways out: " + "; or ".join(fixes) + "." + said
    )
