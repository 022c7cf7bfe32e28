"""Twice-differentiable stand-ins for operations whose backward PyTorch cannot differentiate.

Second-order MAML differentiates every inner step's gradient, so every operation of the
model needs a double backward. Two common ones have none:

* the fused scaled-dot-product-attention kernels (flash, memory-efficient): handled by
  running attention with the math kernel (``effmaml.step.attention_kernels``);
* ``F.hardsigmoid`` (``aten::hardsigmoid_backward`` has no derivative): MobileNetV3's
  squeeze-excitation gates. ``hardsigmoid`` computes the same values from
  twice-differentiable operations.

A scan of ``torch.nn.functional``'s activations, normalisations, poolings, resampling and
convolutions (``tests/test_zoo.py``) found no other. ``Substitutes`` is a
``TorchFunctionMode`` that routes each listed function to its stand-in while it is active;
the inner steps of second-order strategies enter it (Note [Substitutes under
recomputation]), so the forward pass and every recomputation run the same formula.

Cost: one Python dispatch per torch function call inside an inner step while active, so it
is only entered when the model holds a module that needs it (``needs_substitutes``) or
the user asks for it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

__all__ = ["SUBSTITUTES", "Substitutes", "hardsigmoid", "needs_substitutes", "substituted"]


def hardsigmoid(input: Tensor, inplace: bool = False) -> Tensor:
    """``F.hardsigmoid`` from twice-differentiable operations, with the same values.

    PyTorch's kernels compute ``min(max(x + 3, 0), 6)`` in the op-math type (float32 for
    float16/bfloat16 inputs) and then divide by 6 (CPU) or multiply by 1/6 (CUDA); this
    does the same with ``relu6`` (whose backward is differentiable), so the values are
    bitwise PyTorch's on the CPU in float64, float32, bfloat16 and float16 (tested).
    ``inplace`` is accepted and ignored: a new tensor is returned.
    """
    wide = input.float() if input.dtype in (torch.float16, torch.bfloat16) else input
    gate = F.relu6(wide + 3.0)
    gate = gate * (1.0 / 6.0) if input.device.type == "cuda" else gate / 6.0
    return gate.to(input.dtype)


#: function -> its twice-differentiable stand-in
SUBSTITUTES: dict[Callable[..., Any], Callable[..., Any]] = {F.hardsigmoid: hardsigmoid}

#: module types whose forward calls a function in ``SUBSTITUTES``
_MODULES: tuple[type[nn.Module], ...] = (nn.Hardsigmoid,)

#: the autograd node a function without double backward leaves, and the stand-in for it
NODES = {"HardsigmoidBackward0": "F.hardsigmoid"}


class Substitutes(TorchFunctionMode):
    """While active, calls of a function in ``table`` run its stand-in instead.

    Args:
        table: function -> stand-in; default ``SUBSTITUTES``.
    """

    def __init__(self, table: Mapping[Callable[..., Any], Callable[..., Any]] | None = None):
        super().__init__()
        self.table = dict(SUBSTITUTES if table is None else table)

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        # the mode is off inside this handler: the stand-in's own calls run as they are
        return self.table.get(func, func)(*args, **kwargs)


def needs_substitutes(model: nn.Module) -> list[str]:
    """The names of ``model``'s modules that call a function without double backward which
    ``SUBSTITUTES`` replaces (``nn.Hardsigmoid``), in module order."""
    return [name for name, m in model.named_modules() if isinstance(m, _MODULES)]


@contextlib.contextmanager
def substituted(active: bool) -> Iterator[None]:
    """Run the body with ``Substitutes`` active when ``active``."""
    # Note [Substitutes under recomputation]
    # A stand-in gives the original op's values bitwise on the CPU, but its first
    # derivative is computed by other kernels. Every inner step of a second-order strategy
    # (the forward's first-order advances too) runs under the same stand-ins, so a step
    # recomputed in backward gives the very numbers the forward pass gave, as naive's do.
    if not active:
        yield
        return
    with Substitutes():
        yield
