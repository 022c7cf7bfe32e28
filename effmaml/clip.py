"""Grad-of-grad clipping: bound the meta-gradient flowing back through each inner step.

Long unrolls multiply many Jacobians, and the meta-gradient can explode. The seed notebook
("clip meta-learning gradients by global norm to avoid explosion") and torch_maml's
``max_grad_grad_norm`` rescale, in the backward pass, the gradient with respect to the
parameters produced by each inner step to a global norm of at most ``c``. ``clip_backward``
is the identity in the forward pass and does exactly that in the backward pass.

Cost: one norm over the adapted parameters per step in backward; no host synchronisation
(the scale is computed on the device with ``clamp``).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["clip_backward", "clip_scale"]


def clip_scale(grads: tuple[Tensor, ...], max_norm: float) -> Tensor:
    """The factor ``min(1, max_norm / (‖grads‖ + 1e-6))`` as a 0-d tensor (no host sync).

    Args:
        grads: the gradients whose global L2 norm is bounded (``None`` entries not allowed).
        max_norm: the bound ``c``.

    Returns:
        The scale, on the gradients' device, in their dtype.
    """
    norms = torch.stack([torch.linalg.vector_norm(g) for g in grads])
    total = torch.linalg.vector_norm(norms)
    return torch.clamp(max_norm / (total + 1e-6), max=1.0)


class _ClipBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, max_norm: float, *tensors: Tensor):
        ctx.max_norm = max_norm
        # Note [Identity outputs of a custom Function]
        # Returning the inputs themselves would make autograd treat the outputs as views of
        # the inputs; ``view_as`` makes that explicit and costs no memory.
        return tuple(t.view_as(t) for t in tensors)

    @staticmethod
    def backward(ctx, *grads: Tensor):
        present = [g for g in grads if g is not None]
        if not present:
            return (None, *grads)
        scale = clip_scale(tuple(present), ctx.max_norm)
        return (None, *(None if g is None else g * scale for g in grads))


def clip_backward(tensors: dict[str, Tensor], max_norm: float | None) -> dict[str, Tensor]:
    """Identity forward; in backward, rescale the incoming gradients to global norm ≤ max_norm.

    Args:
        tensors: the adapted parameters produced by one inner step.
        max_norm: the bound ``c``, or ``None`` for no clipping (returns ``tensors`` as is).

    Returns:
        Tensors equal to ``tensors`` whose backward clips the joint gradient.
    """
    if max_norm is None or not tensors:
        return tensors
    if not any(t.requires_grad for t in tensors.values()):
        return tensors
    out = _ClipBackward.apply(float(max_norm), *tensors.values())
    return dict(zip(tensors.keys(), out))
