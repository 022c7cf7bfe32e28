"""The torch.optim family as differentiable inner optimizers: SGD, Adam, AdamW, RMSprop, Adagrad.

Each takes ``torch.optim``'s argument names, order and defaults, names its state entries
after torch.optim's state keys (``"exp_avg.fc.weight"``), and computes torch.optim's
update, so that on the same gradients its parameters equal torch.optim's own step to
rounding in float64 (``tests/test_inner.py``). Adam, AdamW, RMSprop and Adagrad use
torch.optim's operations in its order (``torch.add`` with ``alpha``, ``torch.addcmul``,
``torch.lerp``): bitwise on the CPU with a float learning rate. SGD rounds as effmaml's
SGD always did, and as TorchOpt's does (Note [SGD's rounding]): within an ulp per step.
Every rule is built on the protocol of ``effmaml.inner``: pure, nothing updated in
place, the rate plumbing of ``InnerOptimizer`` (float, learned tensor, per-parameter
dict, per step).

What differs from torch.optim: ``eps`` must be > 0 (where every gradient of an entry was
exactly zero, ``0 / (0 + eps)`` keeps the update finite), the options that choose kernels
or hardware paths (``foreach``, ``fused``, ``capturable``, ``differentiable``) and
``maximize`` are not taken, and gradients are dense and real. Where torch.optim's rule is
not differentiable, each docstring says which derivative is taken: the square root at
exactly zero (``safe_sqrt``), amsgrad's maximum at a tie.

Memory: the state tensors named in each docstring, one per adapted parameter each; a step
saves for backward what its operations save (a step of Adam: about six tensors of the
parameter's size). Compute: O(P) elementwise per step.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from .inner import InnerOptimizer, LearningRate

__all__ = ["SGD", "Adagrad", "Adam", "AdamW", "RMSprop", "safe_sqrt"]

Rate = float | Tensor
In = Mapping[str, Tensor]
Out = dict[str, Tensor]


class _SafeSqrt(torch.autograd.Function):
    """sqrt(x) whose derivative at x == 0 is 0 instead of +inf."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        y = torch.sqrt(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (y,) = ctx.saved_tensors
        # differentiable ops of y, itself this Function's output: twice differentiable,
        # and finite at y == 0 in every order (the masked branch divides by 1, not 0)
        positive = y > 0
        return torch.where(positive, grad / (2 * torch.where(positive, y, 1.0)), 0.0)


def safe_sqrt(x: Tensor) -> Tensor:
    """``torch.sqrt(x)`` in value, with derivative 0 where ``x == 0`` (torch's is +inf).

    The denominators of Adam, RMSprop and Adagrad are ``sqrt(v) + eps`` with ``v`` a sum of
    squared gradients. An entry whose gradients were all exactly zero (a dead ReLU unit, an
    unused class, a per-step slice before its step) has ``v == 0``, and torch.sqrt's
    derivative there is +inf: the first derivative of the update is ``inf * 0 = NaN``, and
    so is every meta-gradient. ``sqrt(g²) = |g|`` has a kink at 0; derivative 0 there is the
    subgradient ``torch.abs`` takes, so such an entry passes no gradient through the
    denominator. Elsewhere the derivative is torch.sqrt's (``grad / (2 sqrt(x))``, the same
    bits), and the backward is made of differentiable operations of the result, so every
    higher derivative is finite at 0 too. Negative ``x`` gives NaN, as torch.sqrt does.

    Memory: saves the result for backward, as torch.sqrt does.

    Args:
        x: a tensor of non-negative values.

    Returns:
        ``sqrt(x)``.
    """
    out: Tensor = _SafeSqrt.apply(x)
    return out


def _number(value: Any, what: str, low: float = 0.0, strict: bool = False) -> float:
    """``value`` as a float, refusing booleans, non-numbers and values below ``low``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"{what} must be a number (got {value!r}); the options after lr follow "
            f"torch.optim's order, and per_step is keyword-only: pass options by name"
        )
    value = float(value)
    if not math.isfinite(value) or value < low or (strict and value == low):
        bound = f"> {low}" if strict else f">= {low}"
        raise ValueError(f"{what} must be finite and {bound} (got {value})")
    return value


def _eps(value: Any) -> float:
    try:
        return _number(value, "eps", strict=True)
    except ValueError:
        raise ValueError(
            f"eps must be > 0 (got {value}): where every gradient of an entry was exactly "
            f"zero the update is 0 / (0 + eps), finite only with eps > 0"
        ) from None


def _descend(p: Tensor, direction: Tensor, rate: float | Tensor) -> Tensor:
    """``p - rate * direction``: torch.optim's ``p.add_(direction, alpha=-lr)`` for a float
    rate (the same rounding), a product for a tensor rate."""
    if isinstance(rate, Tensor):
        return p - rate * direction
    return torch.add(p, direction, alpha=-rate)


class _TorchOptim(InnerOptimizer):
    """What the family shares: the loop over parameters, L2 weight decay, a repr that lists
    the options. A member implements ``_update`` for one parameter."""

    _options: tuple[str, ...] = ()
    weight_decay: float = 0.0

    def step(
        self,
        state: Mapping[str, Tensor],
        params: Mapping[str, Tensor],
        grads: Mapping[str, Tensor],
        t: int,
        hyper: Mapping[str, Tensor],
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        new_state: dict[str, Tensor] = {}
        new_params: dict[str, Tensor] = {}
        for name, p in params.items():
            lr = self.rate(name, hyper, t)
            new_params[name] = self._update(name, p, grads[name], lr, t, state, new_state)
        return new_state, new_params

    def _update(
        self, name: str, p: Tensor, g: Tensor, lr: Rate, t: int, old: In, new: Out
    ) -> Tensor:
        """Parameter ``name``'s new value at step ``t`` from the state ``old``; its state
        entries go into ``new`` (a fresh dict, not one of the tensors given)."""
        raise NotImplementedError

    def _l2(self, g: Tensor, p: Tensor) -> Tensor:
        """``g + weight_decay * p``, as torch.optim rounds it."""
        return torch.add(g, p, alpha=self.weight_decay) if self.weight_decay else g

    def _repr_args(self) -> str:
        options = ", ".join(f"{k}={getattr(self, k)}" for k in self._options)
        return f"{super()._repr_args()}, {options}" if options else super()._repr_args()


class SGD(_TorchOptim):
    """Differentiable SGD with momentum, dampening, Nesterov momentum and weight decay, as
    ``torch.optim.SGD``.

    ``g = grad + weight_decay * p``; with momentum, ``b = g`` at step 0 (torch's first
    step: no dampening) and ``b = momentum * b + (1 - dampening) * g`` after;
    ``d = g + momentum * b`` (Nesterov) or ``b``; ``p = p - lr * d``, each product and sum
    rounded on its own (Note [SGD's rounding]): an ulp per step from torch.optim.SGD's.

    State: ``"momentum_buffer.<name>"`` with momentum, none without. Memory: one extra
    tensor per parameter with momentum. Compute: O(P). Differentiable everywhere.

    Args:
        lr: step size (float, tensor, or per-parameter dict; see ``InnerOptimizer``),
            default 1e-3.
        momentum: momentum factor, default 0.
        dampening: dampening of the momentum after the first step, default 0.
        weight_decay: L2 penalty coefficient, default 0.
        nesterov: Nesterov momentum (needs momentum > 0 and dampening 0), default False.
        per_step: rates indexed by the inner step (see ``InnerOptimizer``).

    Raises:
        TypeError: an option that is not a number (a positional ``True`` meant for
            ``nesterov`` lands on ``dampening``).
        ValueError: a negative option, or Nesterov without momentum or with dampening.
    """

    _options = ("momentum", "dampening", "weight_decay", "nesterov")

    def __init__(
        self,
        lr: LearningRate = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        per_step: bool = False,
    ) -> None:
        super().__init__(lr, per_step)
        self.momentum = _number(momentum, "momentum")
        self.dampening = _number(dampening, "dampening", low=-math.inf)
        self.weight_decay = _number(weight_decay, "weight_decay")
        self.nesterov = bool(nesterov)
        if self.nesterov and (self.momentum == 0 or self.dampening != 0):
            raise ValueError(
                f"nesterov=True needs momentum > 0 and dampening 0 (got momentum="
                f"{self.momentum}, dampening={self.dampening}), as torch.optim.SGD does"
            )

    def init(self, params: Mapping[str, Tensor]) -> dict[str, Tensor]:
        if self.momentum == 0:
            return {}
        return {f"momentum_buffer.{k}": torch.zeros_like(p) for k, p in params.items()}

    def _update(
        self, name: str, p: Tensor, g: Tensor, lr: Rate, t: int, old: In, new: Out
    ) -> Tensor:
        # Note [SGD's rounding]: products and sums rounded one by one, as effmaml's SGD
        # always did and as TorchOpt's MetaSGD does; torch.optim fuses `p + (-lr) d` (and
        # the other add-with-alpha ops), an ulp apart per step. On an ill-conditioned
        # problem (BatchNorm over 2 examples) ulps grow to percents within two steps, so
        # staying bitwise the peers' keeps the benchmark's agreement columns meaningful.
        if self.weight_decay:
            g = g + self.weight_decay * p
        if self.momentum:
            key = f"momentum_buffer.{name}"
            # torch's first step: the buffer is g, undamped
            buf = g if t == 0 else self.momentum * old[key] + (1 - self.dampening) * g
            new[key] = buf
            g = g + self.momentum * buf if self.nesterov else buf
        return p - lr * g


class Adam(_TorchOptim):
    """Differentiable Adam, with amsgrad and (L2 or decoupled) weight decay, as
    ``torch.optim.Adam``.

    ``g = grad + weight_decay * p`` (or, decoupled, ``p = p (1 - lr weight_decay)`` first);
    ``m = lerp(m, g, 1 - β₁)``; ``v = β₂ v + (1 - β₂) g²``; with amsgrad
    ``v_max = max(v_max, v)`` replaces ``v`` below;
    ``p = p - (lr / (1 - β₁ᵗ⁺¹)) m / (sqrt(v) / sqrt(1 - β₂ᵗ⁺¹) + eps)``.

    Where the rule is not differentiable: the square root of an entry with ``v == 0``
    (every gradient so far exactly zero) has derivative 0 (``safe_sqrt``; torch's is +inf
    and makes every meta-gradient NaN), and amsgrad's ``max`` at a tie
    (``v_max == v``) passes half of the gradient to each side (``torch.maximum``'s rule).

    State: ``"exp_avg.<name>"``, ``"exp_avg_sq.<name>"`` and with amsgrad
    ``"max_exp_avg_sq.<name>"``. Memory: two extra tensors per parameter, three with
    amsgrad. Compute: O(P).

    Args:
        lr: step size (float, tensor, or per-parameter dict; see ``InnerOptimizer``),
            default 1e-3.
        betas: decay rates of the first and second moments, default (0.9, 0.999).
        eps: added to the denominator, default 1e-8; must be > 0.
        weight_decay: weight decay coefficient, default 0.
        amsgrad: normalise by the largest second moment so far, default False.
        decoupled_weight_decay: decay the parameters, not the gradient (AdamW), default
            False.
        per_step: rates indexed by the inner step (see ``InnerOptimizer``).

    Raises:
        TypeError: an option that is not a number.
        ValueError: betas outside [0, 1), eps <= 0, a negative weight decay.
    """

    # Note [Adam's eps outside a safe square root]
    # torch.optim divides by sqrt(v̂) + eps. The derivative of sqrt at v̂ = 0 is infinite,
    # and a gradient entry that is exactly zero at every step so far (a dead unit, an
    # unused class, a per-step slice before its step) makes v̂ = 0, so the first
    # derivative of the update is 0 * inf = NaN, and so is the meta-gradient. effmaml put
    # eps² under the root instead until 2026-12 (finite, but not torch's update: up to eps
    # apart in the denominator). safe_sqrt keeps torch's value to the bit and takes the
    # derivative 0 at v̂ = 0: at the first step sqrt(v̂) = sqrt(1 - β₂)|g| / sqrt(c2), whose
    # one-sided derivatives at g = 0 are ±sqrt(1 - β₂) / sqrt(c2), and 0 is their mean (the
    # subgradient torch.abs takes). The update's derivative there is then
    # (lr / c1)(1 - β₁) / eps, as it was with eps² under the root.

    _options = ("betas", "eps", "weight_decay", "amsgrad")

    def __init__(
        self,
        lr: LearningRate = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        *,
        decoupled_weight_decay: bool = False,
        per_step: bool = False,
    ) -> None:
        super().__init__(lr, per_step)
        b1, b2 = betas
        if not (0 <= b1 < 1 and 0 <= b2 < 1):
            raise ValueError(f"betas must lie in [0, 1) (got {betas})")
        self.betas = (float(b1), float(b2))
        self.eps = _eps(eps)
        self.weight_decay = _number(weight_decay, "weight_decay")
        self.amsgrad = bool(amsgrad)
        self.decoupled_weight_decay = bool(decoupled_weight_decay)

    def init(self, params: Mapping[str, Tensor]) -> dict[str, Tensor]:
        keys = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")[: 3 if self.amsgrad else 2]
        return {f"{key}.{k}": torch.zeros_like(p) for k, p in params.items() for key in keys}

    def _update(
        self, name: str, p: Tensor, g: Tensor, lr: Rate, t: int, old: In, new: Out
    ) -> Tensor:
        b1, b2 = self.betas
        if self.decoupled_weight_decay:
            p = p * (1 - lr * self.weight_decay) if self.weight_decay else p
        else:
            g = self._l2(g, p)
        m = torch.lerp(old[f"exp_avg.{name}"], g, 1 - b1)
        v = torch.addcmul(old[f"exp_avg_sq.{name}"] * b2, g, g, value=1 - b2)
        new[f"exp_avg.{name}"] = m
        new[f"exp_avg_sq.{name}"] = v
        if self.amsgrad:
            v = torch.maximum(old[f"max_exp_avg_sq.{name}"], v)
            new[f"max_exp_avg_sq.{name}"] = v
        denom = safe_sqrt(v) / (1 - b2 ** (t + 1)) ** 0.5 + self.eps
        return p - ((lr / (1 - b1 ** (t + 1))) * m) / denom


class AdamW(Adam):
    """Differentiable AdamW: Adam with decoupled weight decay, as ``torch.optim.AdamW``.

    ``p = p (1 - lr weight_decay)``, then Adam's update with that ``p`` (see ``Adam``,
    which also says what the derivative is at the square root's zero and amsgrad's ties).
    State, memory and compute as ``Adam``.

    Args:
        lr: step size (float, tensor, or per-parameter dict; see ``InnerOptimizer``),
            default 1e-3.
        betas: decay rates of the first and second moments, default (0.9, 0.999).
        eps: added to the denominator, default 1e-8; must be > 0.
        weight_decay: decoupled weight decay coefficient, default 1e-2.
        amsgrad: normalise by the largest second moment so far, default False.
        per_step: rates indexed by the inner step (see ``InnerOptimizer``).
    """

    def __init__(
        self,
        lr: LearningRate = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        per_step: bool = False,
    ) -> None:
        super().__init__(
            lr, betas, eps, weight_decay, amsgrad, decoupled_weight_decay=True, per_step=per_step
        )


class RMSprop(_TorchOptim):
    """Differentiable RMSprop, centered or not, with momentum and weight decay, as
    ``torch.optim.RMSprop``.

    ``g = grad + weight_decay * p``; ``v = α v + (1 - α) g²``; centered:
    ``ḡ = lerp(ḡ, g, 1 - α)`` and ``a = sqrt(v - ḡ²) + eps``, else ``a = sqrt(v) + eps``;
    with momentum ``b = momentum * b + g / a`` and ``p = p - lr * b``, without
    ``p = p - lr * g / a``.

    Where the rule is not differentiable: the square root at exactly zero (``v == 0``, or
    centered ``v == ḡ²``, which needs every gradient so far zero) has derivative 0
    (``safe_sqrt``). Centered, ``v - ḡ²`` is a variance, >= 0 up to rounding; a rounding
    below zero gives NaN, as in torch.optim.

    State: ``"square_avg.<name>"``, with momentum ``"momentum_buffer.<name>"``, centered
    ``"grad_avg.<name>"``. Memory: one to three extra tensors per parameter. Compute: O(P).

    Args:
        lr: step size (float, tensor, or per-parameter dict; see ``InnerOptimizer``),
            default 1e-2.
        alpha: smoothing constant of the squared-gradient average, default 0.99.
        eps: added to the denominator, default 1e-8; must be > 0.
        weight_decay: L2 penalty coefficient, default 0.
        momentum: momentum factor, default 0.
        centered: normalise by the estimated variance of the gradient, default False.
        per_step: rates indexed by the inner step (see ``InnerOptimizer``).

    Raises:
        TypeError: an option that is not a number.
        ValueError: a negative option, eps <= 0.
    """

    _options = ("alpha", "eps", "weight_decay", "momentum", "centered")

    def __init__(
        self,
        lr: LearningRate = 1e-2,
        alpha: float = 0.99,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        momentum: float = 0.0,
        centered: bool = False,
        *,
        per_step: bool = False,
    ) -> None:
        super().__init__(lr, per_step)
        self.alpha = _number(alpha, "alpha")
        self.eps = _eps(eps)
        self.weight_decay = _number(weight_decay, "weight_decay")
        self.momentum = _number(momentum, "momentum")
        self.centered = bool(centered)

    def init(self, params: Mapping[str, Tensor]) -> dict[str, Tensor]:
        keys = ["square_avg"]
        keys += ["momentum_buffer"] if self.momentum else []
        keys += ["grad_avg"] if self.centered else []
        return {f"{key}.{k}": torch.zeros_like(p) for k, p in params.items() for key in keys}

    def _update(
        self, name: str, p: Tensor, g: Tensor, lr: Rate, t: int, old: In, new: Out
    ) -> Tensor:
        g = self._l2(g, p)
        alpha = self.alpha
        v = torch.addcmul(old[f"square_avg.{name}"] * alpha, g, g, value=1 - alpha)
        new[f"square_avg.{name}"] = v
        if self.centered:
            mean = torch.lerp(old[f"grad_avg.{name}"], g, 1 - alpha)
            new[f"grad_avg.{name}"] = mean
            avg = safe_sqrt(torch.addcmul(v, mean, mean, value=-1)) + self.eps
        else:
            avg = safe_sqrt(v) + self.eps
        if not self.momentum:
            return p - (lr * g) / avg
        buf = torch.addcdiv(old[f"momentum_buffer.{name}"] * self.momentum, g, avg)
        new[f"momentum_buffer.{name}"] = buf
        return _descend(p, buf, lr)


class Adagrad(_TorchOptim):
    """Differentiable Adagrad with learning-rate decay and weight decay, as
    ``torch.optim.Adagrad``.

    ``g = grad + weight_decay * p``; ``s = s + g²`` (``s`` starts at
    ``initial_accumulator_value``); ``p = p - lr / (1 + t lr_decay) * g / (sqrt(s) + eps)``
    at zero-based step t.

    Where the rule is not differentiable: the square root of an entry with ``s == 0``
    (initial value 0 and every gradient so far exactly zero) has derivative 0
    (``safe_sqrt``).

    State: ``"sum.<name>"``. Memory: one extra tensor per parameter. Compute: O(P).

    Args:
        lr: step size (float, tensor, or per-parameter dict; see ``InnerOptimizer``),
            default 1e-2.
        lr_decay: the rate at step t is ``lr / (1 + t lr_decay)``, default 0.
        weight_decay: L2 penalty coefficient, default 0.
        initial_accumulator_value: the sum's starting value, default 0.
        eps: added to the denominator, default 1e-10; must be > 0.
        per_step: rates indexed by the inner step (see ``InnerOptimizer``).

    Raises:
        TypeError: an option that is not a number.
        ValueError: a negative option, eps <= 0.
    """

    _options = ("lr_decay", "weight_decay", "initial_accumulator_value", "eps")

    def __init__(
        self,
        lr: LearningRate = 1e-2,
        lr_decay: float = 0.0,
        weight_decay: float = 0.0,
        initial_accumulator_value: float = 0.0,
        eps: float = 1e-10,
        *,
        per_step: bool = False,
    ) -> None:
        super().__init__(lr, per_step)
        self.lr_decay = _number(lr_decay, "lr_decay")
        self.weight_decay = _number(weight_decay, "weight_decay")
        self.initial_accumulator_value = _number(
            initial_accumulator_value, "initial_accumulator_value"
        )
        self.eps = _eps(eps)

    def init(self, params: Mapping[str, Tensor]) -> dict[str, Tensor]:
        value = self.initial_accumulator_value
        return {f"sum.{k}": torch.full_like(p, value) for k, p in params.items()}

    def _update(
        self, name: str, p: Tensor, g: Tensor, lr: Rate, t: int, old: In, new: Out
    ) -> Tensor:
        g = self._l2(g, p)
        s = torch.addcmul(old[f"sum.{name}"], g, g, value=1)
        new[f"sum.{name}"] = s
        return p - ((lr / (1 + t * self.lr_decay)) * g) / (safe_sqrt(s) + self.eps)
