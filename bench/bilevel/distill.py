"""Dataset distillation on real digits (Wang et al. 2018, "Dataset Distillation"), exact.

Learned: 10 synthetic 8x8 images, one per class, and one learning rate per inner step.
Scored: an MLP (64 -> 128 -> 10, ReLU) trained by plain SGD on the 10 images for N steps
at the learned rates classifies scikit-learn's held-out real test digits. "fixed": the
images are learned for, and scored from, one initialisation; "random": each outer step
draws a new initialisation, and the images are scored from 10 initialisations never seen
while learning (Wang et al.'s harder setting). The meta-gradient through all N steps is
exact (``strategy="checkpoint"``: naive's to float rounding, in the memory of a few
states); no truncation, no first-order approximation.

Baselines, scored the same way at the best constant rate of a grid (chosen on the
validation digits): 10 random real training images (one per class, mean over draws), the
10 per-class mean images, and the full training set (full-batch, N steps: the ceiling).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

import effmaml

from .common import Split, accuracy, ce, mlp, train_plain

__all__ = ["RATE_GRID", "Distilled", "baselines", "distill", "meta_gradient", "score"]

RATE_GRID = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0)
EVAL_INITS = 10  # the "random" setting's unseen initialisations
WIDTH = 128


@dataclass
class Distilled:
    """What distillation learned, and its outer losses."""

    images: Tensor
    labels: Tensor
    rates: Tensor
    losses: list[float]


def _model(seed: int) -> nn.Module:
    return mlp(64, WIDTH, 10, seed=seed)


def _init_seed(seed: int, it: int) -> int:
    return 1_000_003 * (seed + 1) + it  # the random setting's training inits


def distill(
    split: Split,
    steps: int,
    init: str,
    outer_steps: int,
    seed: int = 0,
    strategy: str = "checkpoint",
    options: Mapping[str, Any] | None = None,
    real_batch: int = 256,
    lr0: float = 0.05,
    image_lr: float = 0.03,
    rate_lr: float = 0.01,
) -> Distilled:
    """Learn the 10 images and N rates by the exact meta-gradient through N steps (or by
    the meta-gradient of ``strategy`` with ``options``, e.g. ``truncated``'s window).

    Memory: the strategy's (checkpoint: about sqrt(N) states and a segment's graph);
    compute per outer step: about 2N inner steps on 10 images, plus one forward and
    backward on ``real_batch`` real training digits.
    """
    if init not in ("fixed", "random"):
        raise ValueError(f"init must be 'fixed' or 'random' (got {init!r})")
    g = torch.Generator().manual_seed(seed)
    model = _model(seed)
    images = (0.5 + 0.1 * torch.randn(10, 64, generator=g)).requires_grad_(True)
    labels = torch.arange(10)
    rates = torch.full((steps,), lr0, requires_grad=True)
    maml = effmaml.MAML(model, ce, effmaml.SGD(rates, per_step=True), strategy, **(options or {}))
    opt = torch.optim.Adam(
        [{"params": [images], "lr": image_lr}, {"params": [rates], "lr": rate_lr}]
    )
    losses = []
    for it in range(outer_steps):
        if init == "random":
            fresh = _model(_init_seed(seed, it))
            with torch.no_grad():
                for p, q in zip(model.parameters(), fresh.parameters()):
                    p.copy_(q)
        idx = torch.randint(len(split.y_train), (real_batch,), generator=g)
        adapted = maml.adapt((images, labels), steps=steps)
        loss = ce(adapted, (split.x_train[idx], split.y_train[idx]))
        opt.zero_grad()
        loss.backward()
        model.zero_grad(set_to_none=True)
        opt.step()
        with torch.no_grad():
            rates.clamp_(min=1e-4)
        losses.append(float(loss.detach()))
    return Distilled(images.detach(), labels, rates.detach(), losses)


def _inits(init: str, seed: int) -> list[int]:
    return [seed] if init == "fixed" else [10_000 + i for i in range(EVAL_INITS)]


def score(
    split: Split,
    x: Tensor,
    y: Tensor,
    rates: Tensor | list[float],
    init: str,
    seed: int,
    on: str = "test",
) -> float:
    """Accuracy on the real ``test`` (or ``val``) digits of the MLP trained on ``(x, y)``
    for ``len(rates)`` full-batch steps, averaged over the setting's initialisations."""
    xs, ys = (split.x_test, split.y_test) if on == "test" else (split.x_val, split.y_val)
    accs = []
    for s in _inits(init, seed):
        model = _model(s)
        params = train_plain(model, lambda t: (x, y), rates)
        accs.append(accuracy(model, params, xs, ys))
    return sum(accs) / len(accs)


def _best_rate(split: Split, x: Tensor, y: Tensor, steps: int, init: str, seed: int) -> float:
    return max(RATE_GRID, key=lambda r: score(split, x, y, [r] * steps, init, seed, on="val"))


def baselines(split: Split, steps: int, init: str, seed: int, draws: int = 5) -> dict[str, float]:
    """Test accuracy of the baselines at ``steps``, each at its best grid rate."""
    g = torch.Generator().manual_seed(seed + 500)
    out: dict[str, float] = {}
    ten = []
    for _ in range(draws):
        pick = torch.stack(
            [
                torch.nonzero(split.y_train == c).flatten()[
                    torch.randint(int((split.y_train == c).sum()), (1,), generator=g)
                ][0]
                for c in range(10)
            ]
        )
        x, y = split.x_train[pick], split.y_train[pick]
        rate = _best_rate(split, x, y, steps, init, seed)
        ten.append(score(split, x, y, [rate] * steps, init, seed))
    out["random_real"] = sum(ten) / len(ten)
    means = torch.stack([split.x_train[split.y_train == c].mean(0) for c in range(10)])
    labels = torch.arange(10)
    rate = _best_rate(split, means, labels, steps, init, seed)
    out["class_means"] = score(split, means, labels, [rate] * steps, init, seed)
    rate = _best_rate(split, split.x_train, split.y_train, steps, init, seed)
    out["full_train"] = score(split, split.x_train, split.y_train, [rate] * steps, init, seed)
    return out


def meta_gradient(split: Split, steps: int, strategy: str, **kw: object) -> Tensor:
    """One outer step's meta-gradient (w.r.t. the images, the rates and the init), flat:
    what the memory and agreement table measures, from the same starting point for every
    strategy."""
    g = torch.Generator().manual_seed(0)
    model = _model(0)
    images = (0.5 + 0.1 * torch.randn(10, 64, generator=g)).requires_grad_(True)
    rates = torch.full((steps,), 0.05, requires_grad=True)
    maml = effmaml.MAML(model, ce, effmaml.SGD(rates, per_step=True), strategy, **kw)
    adapted = maml.adapt((images, torch.arange(10)), steps=steps)
    loss = ce(adapted, (split.x_train[:256], split.y_train[:256]))
    wrt = [images, rates, *model.parameters()]
    return torch.cat([gr.reshape(-1) for gr in torch.autograd.grad(loss, wrt)])
