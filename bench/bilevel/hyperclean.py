"""Data hyper-cleaning on MNIST-1D (Franceschi et al. 2017, "Forward and Reverse
Gradient-Based Hyperparameter Optimization", section 5.1), exact through 200 steps.

Half of 1,000 training signals get a wrong label (seeded, uniformly among the other
classes). One weight per training example, ``sigmoid(logit)``, weights its loss in the
inner problem: 200 full-batch SGD steps of an MLP (40 -> 100 -> 10, ReLU) on the weighted
mean loss. The outer objective is the loss on clean validation signals after the last
step; the logits are learned by Adam on its exact hypergradient (``checkpoint``: every
step, no truncation). Scored: test accuracy of a fresh network trained the same way with
the learned weights, against uniform weights (the noisy labels) and against the clean
examples alone (the oracle); and how well the lowest-weighted half finds the flipped
examples (precision, recall, F1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

import effmaml

from .common import Split, accuracy, ce, mlp, train_plain

__all__ = ["Noisy", "clean", "detection", "make_noisy", "scores"]

TRAIN = 1000
VAL = 1000
STEPS = 200
RATE = 0.5


def _model(seed: int) -> nn.Module:
    return mlp(40, 100, 10, seed=seed)


@dataclass(frozen=True)
class Noisy:
    """The training subset with its (half wrong) labels and which ones were flipped."""

    x: Tensor
    y: Tensor
    flipped: Tensor  # bool


def make_noisy(split: Split, seed: int = 0, n: int = TRAIN, fraction: float = 0.5) -> Noisy:
    """``n`` training signals, ``fraction`` of them relabelled to another class."""
    g = torch.Generator().manual_seed(seed)
    x, y = split.x_train[:n], split.y_train[:n].clone()
    flipped = torch.zeros(n, dtype=torch.bool)
    which = torch.randperm(n, generator=g)[: int(fraction * n)]
    flipped[which] = True
    shift = torch.randint(1, split.classes, (len(which),), generator=g)
    y[which] = (y[which] + shift) % split.classes
    return Noisy(x, y, flipped)


def clean(
    split: Split,
    noisy: Noisy,
    outer_steps: int,
    seed: int = 0,
    steps: int = STEPS,
    outer_lr: float = 0.1,
    strategy: str = "checkpoint",
) -> tuple[Tensor, list[float]]:
    """Learn the per-example logits; returns the weights (sigmoid of the logits) and the
    validation losses. A new initialisation every outer step.

    Memory: the strategy's for ``steps`` steps of a full batch of ``len(noisy.y)``;
    compute per outer step: about 2·steps full-batch steps and one validation pass.
    """
    logits = torch.zeros(len(noisy.y), requires_grad=True)
    opt = torch.optim.Adam([logits], lr=outer_lr)
    xv, yv = split.x_val[:VAL], split.y_val[:VAL]
    losses = []
    for it in range(outer_steps):
        model = _model(seed * 100_003 + it)
        maml = effmaml.MAML(model, ce, effmaml.SGD(RATE), strategy)
        adapted = maml.adapt((noisy.x, noisy.y, torch.sigmoid(logits)), steps=steps)
        loss = ce(adapted, (xv, yv))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return torch.sigmoid(logits.detach()), losses


def scores(split: Split, noisy: Noisy, weights: Tensor, seeds: list[int]) -> dict[str, list[float]]:
    """Test accuracy, per seed (fresh initialisations), of training with the learned
    weights, uniform weights (the noisy labels) and the clean examples alone (oracle)."""
    ways = {
        "learned": weights,
        "noisy": torch.ones_like(weights),
        "oracle": (~noisy.flipped).float(),
    }
    out: dict[str, list[float]] = {k: [] for k in ways}
    for s in seeds:
        for name, w in ways.items():
            model = _model(s)
            params = train_plain(model, lambda t, w=w: (noisy.x, noisy.y, w), [RATE] * STEPS)
            out[name].append(accuracy(model, params, split.x_test, split.y_test))
    return out


def detection(noisy: Noisy, weights: Tensor) -> dict[str, float]:
    """The lowest-weighted half called "flipped": precision, recall and F1 against the
    truth (half the examples were flipped, so precision = recall here)."""
    k = len(weights) // 2
    called = torch.zeros_like(noisy.flipped)
    called[weights.argsort()[:k]] = True
    tp = float((called & noisy.flipped).sum())
    precision = tp / max(float(called.sum()), 1.0)
    recall = tp / max(float(noisy.flipped.sum()), 1.0)
    f1 = 2 * precision * recall / max(precision + recall, 1e-12)
    return {"precision": precision, "recall": recall, "f1": f1}
