"""Meta-learning a learning-rate schedule by hypergradient through effmaml.

Every outer step draws a new initialisation and minibatch sequence, runs the inner loop
through ``effmaml.MAML`` with the schedule's T rates (``effmaml.SGD(rates, momentum=0.9,
per_step=True)``), takes the validation loss where the unroll ends, and moves the
schedule's log-rate knots by Adam along its hypergradient:

* ``exact``: through all T steps, ``strategy="checkpoint"`` (naive's hypergradient, in
  the memory of about sqrt(T) states and a segment's graphs);
* ``truncated K``: ``strategy="truncated", window=K, random=True`` (RaT-BPTT): the unroll
  stops at a random step n ≥ K, the validation loss is taken there, and the hypergradient
  goes through its last K steps only: every rate is tuned for the loss K steps later.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

import effmaml

from .problem import KNOTS, MOMENTUM, Setup, interpolate

__all__ = ["Learned", "Method", "learn", "method", "outer_step"]


@dataclass(frozen=True)
class Method:
    """A way to get the hypergradient: an effmaml strategy and its options."""

    name: str
    strategy: str
    options: tuple[tuple[str, Any], ...] = ()

    def kwargs(self) -> dict[str, Any]:
        return dict(self.options)


def method(name: str) -> Method:
    """``"exact"`` or ``"truncated K"`` (K an int)."""
    if name == "exact":
        return Method(name, "checkpoint")
    if name.startswith("truncated "):
        k = int(name.split()[1])
        return Method(name, "truncated", (("window", k), ("random", True)))
    raise ValueError(f"unknown method {name!r}")


def _loss(adapted: Any, x: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(adapted(x), y)


def ce(module: Any, batch: tuple[Tensor, Tensor]) -> Tensor:
    """The inner loss: cross-entropy on a minibatch."""
    return F.cross_entropy(module(batch[0]), batch[1])


def outer_step(
    s: Setup, m: Method, log_knots: Tensor, seed: int, **extra: Any
) -> tuple[float, dict[str, Any]]:
    """One hypergradient: the validation loss where the unroll ends, backpropagated into
    ``log_knots.grad``. Returns the loss and ``Adapted.info``."""
    model = s.model(seed)
    rates = interpolate(log_knots, s.steps)
    inner = effmaml.SGD(rates, momentum=MOMENTUM, per_step=True)
    kw = {**m.kwargs(), **extra}
    if m.strategy == "truncated" and kw.get("random"):
        kw.setdefault("seed", seed)
    maml = effmaml.MAML(model, ce, inner, m.strategy, **kw)
    adapted = maml.adapt(s.batches(seed))
    loss = _loss(adapted, *s.validation())
    loss.backward()
    return float(loss.detach()), adapted.info


@dataclass
class Learned:
    """A meta-learned schedule's knots after each outer step, and the outer losses."""

    knots: list[list[float]]
    losses: list[float]
    ends: list[int]

    @property
    def final(self) -> list[float]:
        return self.knots[-1]


def learn(
    s: Setup, m: Method, rate0: float, outer_steps: int, meta_lr: float, seed: int = 0
) -> Learned:
    """``outer_steps`` of Adam (``meta_lr``) on the log-rate knots, from the constant
    ``rate0``; outer step i uses initialisation and minibatches ``seed·100003 + i``. A
    non-finite hypergradient skips its step (counted in ``Learned.losses`` as inf)."""
    log_knots = torch.full((KNOTS,), math.log(rate0), requires_grad=True)
    opt = torch.optim.Adam([log_knots], lr=meta_lr)
    knots, losses, ends = [], [], []
    for i in range(outer_steps):
        opt.zero_grad()
        loss, info = outer_step(s, m, log_knots, seed * 100_003 + i)
        grad = log_knots.grad
        if grad is None or not bool(torch.isfinite(grad).all()) or not math.isfinite(loss):
            losses.append(float("inf"))
        else:
            opt.step()
            losses.append(loss)
        knots.append(log_knots.detach().exp().tolist())
        ends.append(int(info.get("window_end", s.steps)))
    return Learned(knots, losses, ends)
