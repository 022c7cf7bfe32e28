"""Early checks: operations without the double backward that exact MAML needs."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import Tensor

__all__ = ["find_no_double_backward", "is_no_double_backward"]

_MAX_NODES = 200_000


def find_no_double_backward(tensors: Iterable[Tensor], every: bool = False) -> Any:
    """The first node in the graph behind ``tensors`` that cannot be differentiated, or None
    (with ``every``: the list of all of them).
    """
    # Note [Detecting missing double backward early]
    # A custom Function marked @once_differentiable returns gradients whose grad_fn is a
    # DelayedError node, and a built-in op without a derivative for its backward
    # (hardsigmoid; the fused attention kernels' backward: flash attention on CPU and CUDA)
    # a NotImplemented node: autograd only complains when the meta-gradient is computed,
    # long after adapt() returned. Walking the first step's graph once finds either while
    # the user can still be told which operation it is (effmaml.diagnose) and which
    # strategy avoids it.
    seen: set[int] = set()
    found = []
    stack = [t.grad_fn for t in tensors if t.grad_fn is not None]
    while stack and len(seen) < _MAX_NODES:
        fn = stack.pop()
        if fn is None or id(fn) in seen:
            continue
        seen.add(id(fn))
        if type(fn).__name__ in ("DelayedError", "Error", "NotImplemented"):
            if not every:
                return fn
            found.append(fn)
        stack.extend(f for f, _ in fn.next_functions if f is not None)
    return found if every else None


_NO_DOUBLE_BACKWARD = (
    "double backward",
    "not implemented",
    "once_differentiable",
    "twice differentiable",
)


def is_no_double_backward(err: BaseException) -> bool:
    """Whether an autograd error says that some derivative is missing."""
    return any(s in str(err).lower() for s in _NO_DOUBLE_BACKWARD)
