"""Differentiable inner-loop optimizers.

An inner optimizer is *pure*: ``step(state, params, grads, t, hyper) -> (state, params)``
builds new tensors from old ones with ordinary differentiable operations, so that autograd
can differentiate the adapted parameters with respect to the initial ones (and with respect
to a learned learning rate). Nothing is updated in place.

State is a flat ``dict[str, Tensor]`` (for example ``"momentum.fc.weight"``) so that the
checkpoint engine can store, restore and differentiate it like the parameters.

Learning rates may be a float, a tensor (learned: give it ``requires_grad=True`` and pass
it to the outer optimizer) or a dict name -> float/tensor (one rate per adapted parameter,
Meta-SGD). With ``per_step=True`` every tensor rate has a leading step dimension and step t
reads ``lr[t]`` (MAML++'s per-layer, per-step rates, "LSLR"). Tensor rates are exposed by
``InnerOptimizer.hyperparameters``: every strategy passes them explicitly to
``InnerOptimizer.step``, which is how the exact strategies route meta-gradients to them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

__all__ = ["SGD", "Adam", "InnerOptimizer", "LearningRate"]

LearningRate = float | Tensor | Mapping[str, float | Tensor]


class InnerOptimizer:
    """Base class of the differentiable inner optimizers.

    Subclasses implement ``init`` and ``update``. The learning-rate plumbing
    (float / tensor / per-parameter dict) lives here.

    Args:
        lr: step size: a float, a tensor (a learned rate when it requires grad) or a
            mapping from adapted-parameter name to a float or tensor (Meta-SGD). A mapping
            must name every adapted parameter.
        per_step: every rate is a tensor whose first dimension is the inner step: step t
            uses ``lr[t]`` (shape ``(N,)``, or ``(N, *param_shape)``), and ``adapt`` must
            run exactly N steps. Default False.

    Raises:
        ValueError: a per-step rate that is not a tensor with a step dimension, or rates of
            different lengths.
    """

    def __init__(self, lr: LearningRate, per_step: bool = False) -> None:
        if isinstance(lr, Mapping):
            for name, value in lr.items():
                _check_lr(value, f"lr[{name!r}]")
            self.lr: LearningRate = dict(lr)
        else:
            _check_lr(lr, "lr")
            self.lr = lr
        self.per_step = bool(per_step)
        self.steps: int | None = None  # N of per-step rates
        if self.per_step:
            rates = self.lr.items() if isinstance(self.lr, dict) else [("lr", self.lr)]
            lengths = {}
            for name, value in rates:
                if not isinstance(value, Tensor) or value.dim() == 0:
                    raise ValueError(
                        f"per_step=True needs every rate to be a tensor with a leading step "
                        f"dimension; {name} is {value!r}. For N steps starting at 0.1: "
                        f"torch.full((N,), 0.1, requires_grad=True)"
                    )
                lengths[name] = value.shape[0]
            if len(set(lengths.values())) != 1:
                raise ValueError(
                    f"per-step rates must all have the same number of steps; got {lengths}"
                )
            self.steps = next(iter(lengths.values()))

    def check_steps(self, steps: int) -> None:
        """Raise if per-step rates do not have exactly ``steps`` entries.

        Raises:
            ValueError: says how many the rates have and what to do.
        """
        if self.steps is None or steps == self.steps:
            return
        if steps > self.steps:
            how = (
                f"e.g. repeat the last rate: torch.cat([lr, lr[-1:].expand({steps - self.steps})])"
            )
        else:
            how = f"e.g. the first {steps}: lr[:{steps}]"
        raise ValueError(
            f"the per-step learning rates have {self.steps} steps but adapt got {steps}: each "
            f"inner step has its own learned rate, so train and evaluate with the same number "
            f"of steps, or give an inner optimizer with rates for {steps} steps ({how})"
        )

    # -- learning rates -----------------------------------------------------------------
    def hyperparameters(self) -> dict[str, Tensor]:
        """Tensor-valued hyper-parameters (learning rates), keyed ``"lr"`` or ``"lr.<name>"``.

        Returns:
            The tensors that ``step`` reads through its ``hyper`` argument.
        """
        if isinstance(self.lr, Tensor):
            return {"lr": self.lr}
        if isinstance(self.lr, dict):
            return {f"lr.{k}": v for k, v in self.lr.items() if isinstance(v, Tensor)}
        return {}

    def check_names(self, names: tuple[str, ...]) -> None:
        """Raise if a per-parameter learning-rate dict does not match the adapted names."""
        if isinstance(self.lr, dict):
            missing = [n for n in names if n not in self.lr]
            extra = [n for n in self.lr if n not in names]
            if missing or extra:
                raise ValueError(
                    f"per-parameter lr must name exactly the adapted parameters; missing "
                    f"{missing}, unknown {extra}. Build it as {{name: lr for name in "
                    f"adapted_names}} or pass a single float/tensor lr"
                )

    def check_params(self, params: Mapping[str, Tensor]) -> None:
        """Raise, before any work, if the rates do not fit the adapted parameters: the
        names (``check_names``), and each tensor rate's shape, which must broadcast to
        its parameter's without changing it (after the leading step dimension of per-step
        rates).

        Raises:
            ValueError: names the rate, its shape and the parameter's, and what to do; an
                ``(N,)`` rate without ``per_step=True`` is told that per-step rates need it.
        """
        self.check_names(tuple(params))
        for name, p in params.items():
            rate = self.lr[name] if isinstance(self.lr, dict) else self.lr
            if not isinstance(rate, Tensor):
                continue
            shape = tuple(rate.shape[1:] if self.per_step else rate.shape)
            try:
                fits = torch.broadcast_shapes(shape, p.shape) == p.shape
            except RuntimeError:
                fits = False
            if fits:
                continue
            label = f"lr[{name!r}]" if isinstance(self.lr, dict) else "lr"
            hint = (
                f"; a rate per inner step needs per_step=True (effmaml.{type(self).__name__}"
                f"(lr, per_step=True)), whose first dimension is the step"
                if not self.per_step and rate.dim() == 1
                else ""
            )
            raise ValueError(
                f"{label} has shape {tuple(rate.shape)}, which does not fit parameter "
                f"{name!r} of shape {tuple(p.shape)}: a tensor rate must broadcast to its "
                f"parameter (a scalar, or the parameter's shape){hint}"
            )

    def _lr(self, name: str, hyper: Mapping[str, Tensor], t: int) -> float | Tensor:
        """The rate of parameter ``name`` at step ``t`` (``lr[t]`` for per-step rates:
        every strategy passes the step index, so a recomputed step reads the same slice)."""
        if isinstance(self.lr, dict):
            value = self.lr[name]
            rate = hyper.get(f"lr.{name}", value) if isinstance(value, Tensor) else value
        elif isinstance(self.lr, Tensor):
            rate = hyper.get("lr", self.lr)
        else:
            assert isinstance(self.lr, (int, float))
            rate = self.lr
        if self.per_step:
            assert isinstance(rate, Tensor)
            return rate[t]
        return rate

    # -- the optimizer ------------------------------------------------------------------
    def init(self, params: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Initial optimizer state for ``params`` (no graph; zeros or empty)."""
        raise NotImplementedError

    def step(
        self,
        state: Mapping[str, Tensor],
        params: Mapping[str, Tensor],
        grads: Mapping[str, Tensor],
        t: int,
        hyper: Mapping[str, Tensor],
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """One differentiable update.

        Args:
            state: optimizer state from ``init`` or the previous step.
            params: current adapted parameters.
            grads: gradients of the inner objective w.r.t. ``params`` (with a graph when
                second-order derivatives are wanted).
            t: zero-based index of the inner step (Adam's bias correction uses ``t + 1``).
            hyper: the tensors of ``hyperparameters``, possibly replaced by copies that
                the caller differentiates with respect to.

        Returns:
            ``(new_state, new_params)``.
        """
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._repr_args()})"

    def _repr_args(self) -> str:
        lr = self.lr
        step = f" x {self.steps} steps" if self.per_step else ""
        if isinstance(lr, Tensor):
            return f"lr=tensor(requires_grad={lr.requires_grad}{step})"
        if isinstance(lr, dict):
            return f"lr=<{len(lr)} per-parameter rates{step}>"
        return f"lr={lr}"


def _check_lr(value: object, what: str) -> None:
    if isinstance(value, Tensor):
        if not value.is_floating_point():
            raise TypeError(f"{what} must be a floating-point tensor (got {value.dtype})")
        return
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{what} must be a float, a tensor or a dict of them (got {value!r})")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{what} must be a finite, non-negative number (got {value})")


class SGD(InnerOptimizer):
    """Differentiable SGD with optional momentum, Nesterov momentum and weight decay.

    Matches ``torch.optim.SGD`` with ``dampening=0``: ``g = grad + wd * p``;
    ``b = momentum * b + g``; ``d = g + momentum * b`` (Nesterov) or ``b``; ``p = p - lr * d``.
    The momentum buffer starts at zero, which equals torch's first-step ``b = g``.

    Memory: one extra tensor per parameter with momentum, none without. Compute: O(P).

    Args:
        lr: step size (float, tensor, or per-parameter dict; see ``InnerOptimizer``).
        momentum: momentum factor, default 0.0.
        nesterov: use Nesterov momentum (needs ``momentum > 0``), default False.
        weight_decay: L2 penalty coefficient, default 0.0.
        per_step: rates indexed by the inner step (see ``InnerOptimizer``).
    """

    def __init__(
        self,
        lr: LearningRate,
        momentum: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        per_step: bool = False,
    ) -> None:
        super().__init__(lr, per_step)
        if momentum < 0:
            raise ValueError(f"momentum must be >= 0 (got {momentum})")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0 (got {weight_decay})")
        if nesterov and momentum == 0:
            raise ValueError("nesterov=True needs momentum > 0; set momentum, e.g. 0.9")
        self.momentum = float(momentum)
        self.nesterov = bool(nesterov)
        self.weight_decay = float(weight_decay)

    def init(self, params: Mapping[str, Tensor]) -> dict[str, Tensor]:
        if self.momentum == 0:
            return {}
        return {f"momentum.{k}": torch.zeros_like(p) for k, p in params.items()}

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
            g = grads[name]
            if self.weight_decay:
                g = g + self.weight_decay * p
            if self.momentum:
                buf = self.momentum * state[f"momentum.{name}"] + g
                new_state[f"momentum.{name}"] = buf
                g = g + self.momentum * buf if self.nesterov else buf
            new_params[name] = p - self._lr(name, hyper, t) * g
        return new_state, new_params

    def _repr_args(self) -> str:
        return (
            f"{super()._repr_args()}, momentum={self.momentum}, nesterov={self.nesterov}, "
            f"weight_decay={self.weight_decay}"
        )


class Adam(InnerOptimizer):
    """Differentiable Adam with a second derivative that stays finite at zero gradients.

    ``m = b1 m + (1-b1) g``; ``v = b2 v + (1-b2) g²``;
    ``p = p - lr * m̂ / sqrt(v̂ + eps²)`` with bias-corrected ``m̂, v̂``.


    Memory: two extra tensors per parameter. Compute: O(P).

    Args:
        lr: step size (float, tensor, or per-parameter dict; see ``InnerOptimizer``).
        betas: decay rates of the first and second moments, default (0.9, 0.999).
        eps: denominator floor, default 1e-8 (enters as eps² under the square root).
        per_step: rates indexed by the inner step (see ``InnerOptimizer``).
    """

    # Note [Adam's eps inside the square root]
    # torch.optim.Adam divides by sqrt(v̂) + eps. The derivative of sqrt at v̂ = 0 is
    # infinite, and a gradient entry that is exactly zero (a dead ReLU unit, an unused
    # class) makes v̂ = 0, so the meta-gradient becomes 0 * inf = NaN. With eps² under the
    # root the derivative is bounded by 1 / (2 eps) and the update differs from torch's by
    # less than eps in the denominator.

    def __init__(
        self,
        lr: LearningRate,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        per_step: bool = False,
    ) -> None:
        super().__init__(lr, per_step)
        b1, b2 = betas
        if not (0 <= b1 < 1 and 0 <= b2 < 1):
            raise ValueError(f"betas must lie in [0, 1) (got {betas})")
        if eps <= 0:
            raise ValueError(f"eps must be > 0 (got {eps}); it keeps the second derivative finite")
        self.betas = (float(b1), float(b2))
        self.eps = float(eps)

    def init(self, params: Mapping[str, Tensor]) -> dict[str, Tensor]:
        state: dict[str, Tensor] = {}
        for k, p in params.items():
            state[f"exp_avg.{k}"] = torch.zeros_like(p)
            state[f"exp_avg_sq.{k}"] = torch.zeros_like(p)
        return state

    def step(
        self,
        state: Mapping[str, Tensor],
        params: Mapping[str, Tensor],
        grads: Mapping[str, Tensor],
        t: int,
        hyper: Mapping[str, Tensor],
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        b1, b2 = self.betas
        c1 = 1.0 - b1 ** (t + 1)
        c2 = 1.0 - b2 ** (t + 1)
        eps2 = self.eps * self.eps
        new_state: dict[str, Tensor] = {}
        new_params: dict[str, Tensor] = {}
        for name, p in params.items():
            g = grads[name]
            m = b1 * state[f"exp_avg.{name}"] + (1.0 - b1) * g
            v = b2 * state[f"exp_avg_sq.{name}"] + (1.0 - b2) * (g * g)
            new_state[f"exp_avg.{name}"] = m
            new_state[f"exp_avg_sq.{name}"] = v
            denom = torch.sqrt(v / c2 + eps2)
            new_params[name] = p - self._lr(name, hyper, t) * (m / c1) / denom
        return new_state, new_params

    def _repr_args(self) -> str:
        return f"{super()._repr_args()}, betas={self.betas}, eps={self.eps}"
