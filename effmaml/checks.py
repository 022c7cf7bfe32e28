"""Early checks: operations without the double backward that exact MAML needs."""

from __future__ import annotations

from collections.abc import Iterable

from torch import Tensor

__all__ = ["check_double_backward", "raise_if_no_double_backward"]

_MAX_NODES = 200_000


def check_double_backward(tensors: Iterable[Tensor]) -> None:
    """Raise now if the graph behind ``tensors`` contains a node that cannot be differentiated.

    # Note [Detecting missing double backward early]
    # A custom Function marked @once_differentiable returns gradients whose grad_fn is a
    # DelayedError node, and a built-in op without a derivative for its backward (the fused
    # attention kernels' backward: flash attention on CPU and CUDA) a NotImplemented node:
    # autograd only complains when the meta-gradient is computed, long after adapt()
    # returned. Walking the first step's graph once finds either while the user can still be
    # told which strategy avoids it.

    Raises:
        RuntimeError: a ``DelayedError`` node (an operation without double backward) was found.
    """
    seen: set[int] = set()
    stack = [t.grad_fn for t in tensors if t.grad_fn is not None]
    while stack and len(seen) < _MAX_NODES:
        fn = stack.pop()
        if fn is None or id(fn) in seen:
            continue
        seen.add(id(fn))
        if type(fn).__name__ in ("DelayedError", "Error", "NotImplemented"):
            raise RuntimeError(
                f"an operation in the model or loss has no double backward ({type(fn).__name__} "
                f"node: a custom autograd Function marked @once_differentiable, or an op whose "
                f"backward is not differentiable, such as a fused attention kernel), which "
                f"second-order MAML needs; replace it (for attention: MAML(..., "
                f"math_attention=True), the default), or use strategy='first_order', which "
                f"needs no second derivatives"
            )
        stack.extend(f for f, _ in fn.next_functions if f is not None)


_NO_DOUBLE_BACKWARD = (
    "double backward",
    "not implemented",
    "once_differentiable",
    "twice differentiable",
)


def raise_if_no_double_backward(err: BaseException) -> None:
    """Re-raise an autograd error about missing second derivatives with a fix."""
    msg = str(err)
    if any(s in msg.lower() for s in _NO_DOUBLE_BACKWARD):
        raise RuntimeError(
            "an operation in the model or loss has no double backward, which exact "
            "(second-order) MAML needs; replace that operation, or use "
            f"strategy='first_order', which needs none. Autograd said: {msg}"
        ) from err
