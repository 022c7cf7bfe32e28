"""The inner problem of ``make horizons``: T steps of SGD with momentum on an MLP, at a
per-step learning-rate schedule, on MNIST-1D or scikit-learn's digits.

A schedule is T rates, one per step; a learned one is parametrised by ``KNOTS`` log-rates
at evenly spaced steps, linearly interpolated in between (every step has its own rate; a
hypergradient at any step moves the two knots around it). Everything that scores a
schedule trains with plain torch (``train``), never through effmaml; the meta-learning
(``bench.horizons.meta``) runs the same steps through ``effmaml.MAML``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from ..bilevel.common import Split, digits, mlp, mnist1d

__all__ = [
    "KNOTS",
    "MOMENTUM",
    "Setup",
    "Trained",
    "cosine",
    "interpolate",
    "setup",
    "train",
    "train_hd",
]

MOMENTUM = 0.9
KNOTS = 20


@dataclass(frozen=True)
class Setup:
    """One dataset's inner problem.

    Attributes:
        name: ``"mnist1d"`` or ``"digits"``.
        split: the data (train / validation / test).
        steps: T, inner steps.
        batch: minibatch size of every inner step.
        width: hidden units of each of the MLP's two hidden layers.
    """

    name: str
    split: Split
    steps: int
    batch: int = 100
    width: int = 100

    def model(self, seed: int) -> nn.Module:
        """The MLP, initialised from ``seed``."""
        return mlp(self.split.x_train.shape[1], self.width, self.split.classes, 2, seed)

    def batches(self, seed: int, steps: int | None = None) -> list[tuple[Tensor, Tensor]]:
        """``steps`` (default T) minibatches of training examples, drawn with ``seed``."""
        g = torch.Generator().manual_seed(seed)
        n = self.steps if steps is None else steps
        idx = torch.randint(len(self.split.y_train), (n, self.batch), generator=g)
        return [(self.split.x_train[i], self.split.y_train[i]) for i in idx]

    def validation(self) -> tuple[Tensor, Tensor]:
        """The validation examples (the meta-objective's and the baselines' tuning data)."""
        return self.split.x_val, self.split.y_val


def setup(name: str, steps: int) -> Setup:
    """``mnist1d``: 3,000 train / 1,000 validation / 1,000 test signals of length 40;
    ``digits``: 1,000 / 300 / 497 images of 8x8 (``bench.bilevel.common``)."""
    if name == "mnist1d":
        return Setup(name, mnist1d(), steps)
    if name == "digits":
        return Setup(name, digits(), steps)
    raise ValueError(f"unknown dataset {name!r}; use 'mnist1d' or 'digits'")


def interpolate(log_knots: Tensor, steps: int) -> Tensor:
    """T rates from ``log_knots`` at evenly spaced steps (the first at step 0, the last at
    step T − 1), linear in log space: differentiable w.r.t. the knots."""
    k = log_knots.numel()
    pos = torch.linspace(0, k - 1, steps, dtype=log_knots.dtype)
    lo = pos.floor().long().clamp(max=k - 2)
    frac = pos - lo.to(pos.dtype)
    return (log_knots[lo] * (1 - frac) + log_knots[lo + 1] * frac).exp()


def cosine(peak: float, steps: int) -> list[float]:
    """Cosine annealing from ``peak`` to 0 over T steps (Loshchilov & Hutter)."""
    return [0.5 * peak * (1 + math.cos(math.pi * t / steps)) for t in range(steps)]


@dataclass(frozen=True)
class Trained:
    """What a training run ended at."""

    train_loss: float
    val_loss: float
    test_acc: float
    rates: list[float]


def _evaluate(model: nn.Module, params: dict[str, Tensor], s: Setup, rates: list[float]) -> Trained:
    split = s.split
    with torch.no_grad():

        def out(x: Tensor) -> Tensor:
            return functional_call(model, params, (x,))

        train_loss = float(F.cross_entropy(out(split.x_train), split.y_train))
        val_loss = float(F.cross_entropy(out(split.x_val), split.y_val))
        test_acc = float((out(split.x_test).argmax(1) == split.y_test).float().mean())
    if not math.isfinite(train_loss):
        train_loss = val_loss = float("inf")
    return Trained(train_loss, val_loss, test_acc, rates)


def train(s: Setup, rates: Sequence[float], seed: int) -> Trained:
    """T steps of SGD with momentum at ``rates`` from initialisation and minibatches
    ``seed`` (plain torch, no graph kept): training loss on the whole training set,
    validation loss and test accuracy at the end."""
    return _run(s, seed, lambda t, g, buf: float(rates[t]))


def train_hd(s: Setup, rate0: float, beta: float, seed: int) -> Trained:
    """Online hypergradient descent (Baydin et al. 2018, "Online learning rate adaptation
    with hypergradient descent", SGD with momentum): one rate, updated before every step t
    by the derivative of that step's training loss w.r.t. the previous step's rate,
    α_t = α_{t−1} + β · ∇f_t(θ_t) · v_{t−1} (θ_t = θ_{t−1} − α_{t−1}·v_{t−1}, v the
    momentum buffer): truncated backpropagation with a window of one step, at every step.
    The rates it used are in ``Trained.rates``."""
    state = {"rate": rate0}

    def rate(t: int, g: list[Tensor], prev: list[Tensor] | None) -> float:
        if prev is not None:
            h = sum(float((a * b).sum()) for a, b in zip(g, prev))
            state["rate"] = state["rate"] + beta * h
        return state["rate"]

    return _run(s, seed, rate)


def _run(
    s: Setup, seed: int, rate: Callable[[int, list[Tensor], list[Tensor] | None], float]
) -> Trained:
    model = s.model(seed)
    params = {k: v.detach().clone().requires_grad_(True) for k, v in model.named_parameters()}
    bufs: list[Tensor] | None = None
    used = []
    for t, (x, y) in enumerate(s.batches(seed)):
        loss = F.cross_entropy(functional_call(model, params, (x,)), y)
        grads = list(torch.autograd.grad(loss, list(params.values())))
        r = rate(t, grads, bufs)
        used.append(r)
        with torch.no_grad():
            if bufs is None:
                bufs = [g.clone() for g in grads]
            else:
                bufs = [MOMENTUM * b + g for b, g in zip(bufs, grads)]
            params = {
                k: (p - r * b).requires_grad_(True) for (k, p), b in zip(params.items(), bufs)
            }
        if not math.isfinite(float(loss.detach())):
            break
    return _evaluate(model, {k: v.detach() for k, v in params.items()}, s, used)
