"""A learning rate, then a schedule, by the exact hypergradient through 200 SGD steps, on
MNIST-1D (Greydanus 2020, "Scaling down deep learning", its metalearning experiment).

An MLP (40 -> 100 -> 100 -> 10, ReLU) trained by plain SGD for 200 inner steps on
minibatches of 100 training signals; the outer objective is the loss on 500 validation
signals after the last step. First one rate for all steps, learned from a start of 1.5
and from 0.15 (in the author's notebook both converged to about 0.62); then one rate per
step (200 of them), started from the learned constant; scored by test accuracy after 200
steps against the best constant rate of a grid (chosen on the validation signals).
The hypergradient goes through all 200 steps exactly (``checkpoint``), not a truncated
window.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

import effmaml

from .common import Split, accuracy, ce, mlp, train_plain

__all__ = ["GRID", "Learned", "batches_for", "grid", "learn", "test_accuracy"]

GRID = (0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 1.5)
STEPS = 200
BATCH = 100
VAL = 500


def _model(seed: int) -> nn.Module:
    return mlp(40, 100, 10, depth=2, seed=seed)


def batches_for(split: Split, steps: int, seed: int) -> list[tuple[Tensor, Tensor]]:
    """``steps`` minibatches of :data:`BATCH` training signals, drawn with ``seed``."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(split.y_train), (steps, BATCH), generator=g)
    return [(split.x_train[i], split.y_train[i]) for i in idx]


@dataclass
class Learned:
    """The rates (one, or one per step) after each outer step."""

    history: list[list[float]]

    @property
    def rates(self) -> list[float]:
        return self.history[-1]


def learn(
    split: Split,
    start: float | Sequence[float],
    outer_steps: int,
    steps: int = STEPS,
    seed: int = 0,
    outer_lr: float = 0.05,
    strategy: str = "checkpoint",
) -> Learned:
    """Learn log-rates by Adam on the validation loss after ``steps`` SGD steps (a new
    initialisation and minibatch sequence every outer step). ``start``: one rate (a
    constant schedule) or one per step.

    Memory: the strategy's for ``steps`` steps; compute per outer step: about 2·steps
    inner steps of minibatch 100 and one validation forward/backward.
    """
    per_step = not isinstance(start, (int, float))
    init = torch.tensor(start if per_step else [start], dtype=torch.float32)
    log_rate = init.log().requires_grad_(True)
    opt = torch.optim.Adam([log_rate], lr=outer_lr)
    xv, yv = split.x_val[:VAL], split.y_val[:VAL]
    history = []
    for it in range(outer_steps):
        model = _model(seed * 100_003 + it)
        rate = log_rate.exp()
        lr = rate if per_step else rate[0]
        maml = effmaml.MAML(model, ce, effmaml.SGD(lr, per_step=per_step), strategy)
        adapted = maml.adapt(batches_for(split, steps, seed * 100_003 + it))
        loss = ce(adapted, (xv, yv))
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(log_rate.detach().exp().tolist())
    return Learned(history)


def test_accuracy(
    split: Split, rates: Callable[[int], float] | Sequence[float], seeds: Sequence[int]
) -> list[float]:
    """Test accuracy after :data:`STEPS` plain SGD steps at ``rates``, one per seed (its
    initialisation and minibatches; the seeds are never used while learning)."""
    rs = [rates(t) for t in range(STEPS)] if callable(rates) else list(rates)
    out = []
    for s in seeds:
        model = _model(s)
        batches = batches_for(split, len(rs), s)
        params = train_plain(model, batches.__getitem__, rs)
        out.append(accuracy(model, params, split.x_test, split.y_test))
    return out


def grid(split: Split, seeds: Sequence[int]) -> dict[float, float]:
    """Validation accuracy after :data:`STEPS` steps at each constant rate of
    :data:`GRID` (mean over ``seeds``)."""
    out = {}
    for r in GRID:
        accs = []
        for s in seeds:
            model = _model(s)
            params = train_plain(model, batches_for(split, STEPS, s).__getitem__, [r] * STEPS)
            accs.append(accuracy(model, params, split.x_val, split.y_val))
        out[r] = sum(accs) / len(accs)
    return out
