"""The inner-optimizer protocol: pure ``init`` and ``step`` over flat dicts of tensors.

An inner optimizer is a pair of pure functions over tensor trees:

* ``init(params) -> state``: the optimizer state before step 0, a flat
  ``dict[str, Tensor]`` (for example ``"exp_avg.fc.weight"``), computed under
  ``torch.no_grad()``;
* ``step(state, params, grads, t, hyper) -> (state, params)``: one update at zero-based
  inner step ``t``, built from new tensors with ordinary differentiable operations, so that
  autograd can differentiate the adapted parameters with respect to the initial ones, to
  a learned learning rate and to whatever else the update reads.

Every strategy stores, restores and differentiates the state like the parameters, and a
recomputing one runs step ``t`` again in backward from a stored state. That is exact when
the step is a function of its arguments only: no in-place update of a tensor it is given,
no Python-side state that changes between a step and its recomputation, randomness only
through torch's global RNG (which every strategy replays). ``InnerOptimizer.init_state``
and ``InnerOptimizer.apply_step``, the calls every strategy makes, check the first two
(Note [Checking the protocol]); docs/inner-optimizers.md is the guide.

Learning rates may be a float, a tensor (learned: give it ``requires_grad=True`` and pass
it to the outer optimizer) or a dict name -> float/tensor (one rate per adapted parameter,
Meta-SGD). With ``per_step=True`` every tensor rate has a leading step dimension and step t
reads ``lr[t]`` (MAML++'s per-layer, per-step rates, "LSLR"). Tensor rates, and any other
tensor a subclass declares, are exposed by ``InnerOptimizer.hyperparameters``: every
strategy passes them explicitly to ``step`` as ``hyper``, which is how the exact strategies
route meta-gradients to them. The torch.optim family built on this protocol is in
``effmaml.optim``.
"""

from __future__ import annotations

import contextlib
import math
import random
import reprlib
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = ["InnerOptimizer", "InnerOptimizerError", "LearningRate"]

LearningRate = float | Tensor | Mapping[str, float | Tensor]

_GUIDE = "see docs/inner-optimizers.md"


class InnerOptimizerError(RuntimeError):
    """An inner optimizer broke the protocol (impure step, or a state that is not a flat
    dict of tensors); the message names the optimizer, the rule and the fix."""


class InnerOptimizer:
    """Base class of the differentiable inner optimizers.

    Subclasses implement ``init`` and ``step`` (and ``hyperparameters``, calling
    ``super()``'s, when ``step`` reads tensors of their own); every strategy calls them
    through ``init_state`` and ``apply_step``, which check the protocol. The learning-rate
    plumbing (float / tensor / per-parameter dict / per step) lives here: ``step`` reads
    parameter ``name``'s rate at step ``t`` as ``self.rate(name, hyper, t)``.

    Args:
        lr: step size: a float, a tensor (a learned rate when it requires grad) or a
            mapping from adapted-parameter name to a float or tensor (Meta-SGD). A mapping
            must name every adapted parameter. A rule without a step size passes 0.0.
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
        """The tensors ``step`` reads through ``hyper``: the learning rates, keyed ``"lr"``
        or ``"lr.<name>"``. A subclass whose step reads tensors of its own (a learned
        decay, a network's weights) returns them too, under other names:
        ``{**super().hyperparameters(), "logit": self.logit}``.

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

    def rate(self, name: str, hyper: Mapping[str, Tensor], t: int) -> float | Tensor:
        """The rate of parameter ``name`` at step ``t``: a float, or the tensor ``step``
        got in ``hyper`` (``lr[t]`` for per-step rates: every strategy passes the step
        index, so a recomputed step reads the same slice)."""
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

    # -- the optimizer: what a subclass implements ----------------------------------------
    def init(self, params: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The state before step 0 (runs under ``torch.no_grad()``).

        Args:
            params: the adapted parameters θ₀, by name.

        Returns:
            A flat ``dict[str, Tensor]``, empty for a stateless rule; new tensors (zeros,
            constants, ``p.clone()``), never the parameters themselves. Every entry
            ``step`` will return must be here.
        """
        raise NotImplementedError

    def step(
        self,
        state: Mapping[str, Tensor],
        params: Mapping[str, Tensor],
        grads: Mapping[str, Tensor],
        t: int,
        hyper: Mapping[str, Tensor],
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """One differentiable update: pure, and nothing updated in place.

        Args:
            state: the state from ``init`` or the previous step.
            params: the current adapted parameters.
            grads: gradients of the inner objective w.r.t. ``params`` (with a graph when
                second-order derivatives are wanted; zeros where a parameter was unused).
            t: zero-based index of the inner step (Adam's bias correction uses ``t + 1``;
                the same ``t`` when a strategy recomputes the step).
            hyper: the tensors of ``hyperparameters``, possibly replaced by copies that
                the caller differentiates with respect to: read them from here.

        Returns:
            ``(new_state, new_params)``: dicts with the names of ``state`` and ``params``.
        """
        raise NotImplementedError

    # -- the calls every strategy makes ---------------------------------------------------
    def init_state(self, params: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``init(params)``, checked: a flat dict of tensors that carry no graph.

        Cost: one ``isinstance`` per entry.

        Raises:
            InnerOptimizerError: names the optimizer, the entry and the rule.
        """
        state = self.init(params)
        _check_tree(self, state, "init returned a state that", None)
        for key, value in state.items():
            if value.requires_grad:
                raise InnerOptimizerError(
                    f"{type(self).__name__}.init returned state entry {key!r}, which "
                    f"requires grad (a parameter itself?): the state before step 0 holds new "
                    f"tensors that carry no graph; return p.detach().clone() or "
                    f"torch.zeros_like(p) ({_GUIDE})"
                )
        return dict(state)

    def apply_step(
        self,
        state: Mapping[str, Tensor],
        params: Mapping[str, Tensor],
        grads: Mapping[str, Tensor],
        t: int,
        hyper: Mapping[str, Tensor],
        around: contextlib.AbstractContextManager[Any] | None = None,
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """``step(state, params, grads, t, hyper)``, checked against the protocol.

        ``around`` (entered for the call of ``step`` alone, not for the checks) is how the
        inner step finds the tensors ``step`` reads: the checks' own reads of version
        counters and attributes are not the rule's.

        Before a wrong gradient can come of it, raises if the step updated a tensor it was
        given in place (state, parameter, gradient or hyper-parameter: its version counter
        moved), changed one of the optimizer's attributes, or returned anything but a flat
        dict of tensors with the state's names and the parameters with their names and
        shapes (Note [Checking the protocol]).

        Cost, every step: one version-counter read per tensor given and a shallow
        fingerprint of the optimizer's attributes (one entry per attribute, per item of a
        list or dict attribute, and the state of a generator attribute) before and after;
        no tensor is read, so no device sync.

        Raises:
            InnerOptimizerError: names the optimizer, the step, what broke which rule, and
                the fix.
        """
        # Note [Checking the protocol]
        # A recomputing strategy stores the state at some steps (by reference: no copy),
        # and in backward runs step t again from it, after later steps ran. An in-place
        # update of a tensor the step was given changes a stored state (or a parameter,
        # a gradient, a rate) under the feet of that recomputation; a Python attribute
        # that a step changes (a counter, a list, a private generator) is seen differently
        # by the recomputation. Either way the recomputed step computes other numbers
        # than the forward pass, and the meta-gradient is wrong without any error. Both
        # show cheaply: every in-place op bumps its tensor's version counter, and a
        # shallow fingerprint of ``vars(self)`` catches a rebound or mutated attribute.
        name = type(self).__name__
        given = [
            *((f"state entry {k!r}", v) for k, v in state.items()),
            *((f"parameter {k!r}", v) for k, v in params.items()),
            *((f"gradient of {k!r}", v) for k, v in grads.items()),
            *((f"hyper-parameter {k!r}", v) for k, v in hyper.items()),
        ]
        versions = [_version(v) for _, v in given]
        before = _fingerprints(self)
        try:
            with around if around is not None else contextlib.nullcontext():
                out = self.step(state, params, grads, t, hyper)
        except RuntimeError as err:
            if "in-place" in str(err) or "inplace" in str(err):
                raise InnerOptimizerError(
                    f"{name}.step at inner step {t} updated a tensor in place: {_PURE}. "
                    f"Autograd said: {err}"
                ) from err
            raise
        for (what, v), version in zip(given, versions):
            if _version(v) != version:
                raise InnerOptimizerError(
                    f"{name}.step updated the {what} in place at inner step {t} (its "
                    f"version counter went from {version} to {_version(v)}): {_PURE}"
                )
        after = _fingerprints(self)
        for attr in sorted(before.keys() | after.keys()):
            if before.get(attr, _MISSING) != after.get(attr, _MISSING):
                now = reprlib.repr(getattr(self, attr, "<deleted>"))
                raise InnerOptimizerError(
                    f"{name}.step changed its attribute {attr!r} at inner step {t} (now "
                    f"{now}): a step must leave the optimizer's Python state as it found "
                    f"it, because a recomputing strategy runs step t again in backward, "
                    f"after later steps, and it must compute what the forward pass did. "
                    f"Use the step index t instead of a counter, a tensor indexed by t for "
                    f"per-step values, the returned state for what evolves, and torch's "
                    f"global RNG (which every strategy replays) instead of a generator of "
                    f"its own ({_GUIDE})"
                )
        if not (isinstance(out, (tuple, list)) and len(out) == 2):
            raise InnerOptimizerError(
                f"{name}.step must return (new_state, new_params), two dicts; it returned "
                f"{reprlib.repr(out)} ({_GUIDE})"
            )
        new_state, new_params = out
        _check_tree(self, new_state, f"step at inner step {t} returned a state that", state)
        _check_tree(
            self, new_params, f"step at inner step {t} returned parameters that", params, False
        )
        for k, p in params.items():
            if new_params[k].shape != p.shape:
                raise InnerOptimizerError(
                    f"{name}.step at inner step {t} returned parameter {k!r} of shape "
                    f"{tuple(new_params[k].shape)}; it has shape {tuple(p.shape)}"
                )
        # in the order given: the engine flattens states by position
        return {k: new_state[k] for k in state}, {k: new_params[k] for k in params}

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


_PURE = (
    "an inner optimizer must be pure. Build new tensors (buf = beta * buf + g, not "
    "buf.mul_(beta).add_(g)) and return them: a recomputing strategy keeps stored states "
    "by reference and runs the step again in backward, so a tensor changed in place makes "
    f"that recomputation read other numbers than the forward pass ({_GUIDE})"
)

_MISSING = object()


def _version(t: Tensor) -> int:
    try:
        return int(t._version)
    except RuntimeError:  # an inference tensor keeps no version counter
        return -1


def _check_tree(
    opt: InnerOptimizer,
    tree: Any,
    what: str,
    like: Mapping[str, Tensor] | None,
    floating: bool = True,
) -> None:
    """Raise unless ``tree`` is a flat dict str -> Tensor (with the names of ``like``, of
    floating-point tensors with ``floating``)."""
    name = type(opt).__name__
    if not isinstance(tree, Mapping):
        raise InnerOptimizerError(
            f"{name}.{what} is a {type(tree).__name__}, not a flat dict of tensors "
            f"name -> Tensor ({_GUIDE})"
        )
    for key, value in tree.items():
        if not isinstance(key, str) or not isinstance(value, Tensor):
            hint = (
                "; flatten it into names such as 'exp_avg.fc.weight'"
                if isinstance(value, (Mapping, list, tuple))
                else "; the step count is the argument t; a number that evolves is a 0-d tensor"
            )
            raise InnerOptimizerError(
                f"{name}.{what} is not a flat dict of tensors: entry {key!r} is "
                f"of type {type(value).__name__}{hint}. Every strategy stores, restores and "
                f"differentiates the state as tensors, so nothing else can be exact "
                f"({_GUIDE})"
            )
        if floating and not value.is_floating_point():
            raise InnerOptimizerError(
                f"{name}.{what} holds entry {key!r} of dtype {value.dtype}: state entries "
                f"are floating-point tensors, because every strategy differentiates the "
                f"state. The step count is the argument t; store anything else as a float "
                f"tensor ({_GUIDE})"
            )
    if like is not None and tree.keys() != like.keys():
        missing = sorted(like.keys() - tree.keys())
        extra = sorted(tree.keys() - like.keys())
        raise InnerOptimizerError(
            f"{name}.{what} does not have the names it was given: missing {missing}, "
            f"new {extra}; init creates every state entry and step returns them all "
            f"({_GUIDE})"
        )


def _fingerprints(opt: object) -> dict[str, Any]:
    """A shallow fingerprint of each attribute of ``opt``."""
    return {k: _fingerprint(v, 1) for k, v in getattr(opt, "__dict__", {}).items()}


def _fingerprint(value: Any, depth: int) -> Any:
    """What changes when ``value`` is rebound or changed: its value for numbers and
    strings, identity and version counter for a tensor, the state of a generator, and
    one level of the items of a list, tuple, set or dict; identity otherwise."""
    if isinstance(value, Tensor):
        return ("tensor", id(value), _version(value))
    if isinstance(value, float):
        return (float, value.hex())  # NaN equals itself here
    if value is None or isinstance(value, (bool, int, str, bytes, complex)):
        return (type(value), value)
    if isinstance(value, torch.Generator):
        return ("generator", id(value), value.get_state().numpy().tobytes())
    if isinstance(value, random.Random):
        return ("random", id(value), value.getstate())
    if depth > 0 and isinstance(value, (list, tuple)):
        return (type(value), tuple(_fingerprint(v, depth - 1) for v in value))
    if depth > 0 and isinstance(value, Mapping):
        return (type(value), tuple((k, _fingerprint(v, depth - 1)) for k, v in value.items()))
    if depth > 0 and isinstance(value, (set, frozenset)):
        return (type(value), frozenset(id(v) for v in value))
    return ("object", id(value))
