"""What the bilevel problems share: real data from packages, small networks, a plain
trainer to score what was learned.

Nothing downloads: ``sklearn.datasets.load_digits`` ships 1,797 real 8x8 digits, and
``mnist1d.data.make_dataset`` generates Greydanus's MNIST-1D (4,000 train and 1,000 test
signals of length 40 with the default arguments) from its templates.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

__all__ = [
    "Split",
    "accuracy",
    "digits",
    "mlp",
    "mnist1d",
    "train_plain",
]


@dataclass(frozen=True)
class Split:
    """Inputs (float32, standardised) and labels of a train / validation / test split."""

    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor

    @property
    def classes(self) -> int:
        return int(self.y_train.max()) + 1


def digits(seed: int = 0, test: int = 497, val: int = 300) -> Split:
    """scikit-learn's 1,797 handwritten 8x8 digits (UCI), pixel values 0..16 scaled to
    [0, 1], flattened to 64; a seeded split: ``test`` held out, ``val`` for choosing
    learning rates, the rest (1,000 by default) for training."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    te, va, tr = perm[:test], perm[test : test + val], perm[test + val :]
    return Split(x[tr], y[tr], x[va], y[va], x[te], y[te])


def mnist1d(seed: int = 0, val: int = 1000) -> Split:
    """MNIST-1D with its default arguments (4,000 train, 1,000 test; generated, seed 42 as
    the package sets it); ``val`` of the training signals, chosen by ``seed``, are held out
    for validation."""
    from mnist1d.data import get_dataset_args, make_dataset

    data = make_dataset(get_dataset_args())
    x = torch.tensor(data["x"], dtype=torch.float32)
    y = torch.tensor(data["y"], dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    va, tr = perm[:val], perm[val:]
    xt = torch.tensor(data["x_test"], dtype=torch.float32)
    yt = torch.tensor(data["y_test"], dtype=torch.long)
    return Split(x[tr], y[tr], x[va], y[va], xt, yt)


def mlp(d_in: int, width: int, classes: int, depth: int = 1, seed: int = 0) -> nn.Module:
    """``depth`` hidden ReLU layers of ``width``, seeded."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    d = d_in
    for _ in range(depth):
        layers += [nn.Linear(d, width), nn.ReLU()]
        d = width
    return nn.Sequential(*layers, nn.Linear(d, classes))


def ce(module: Callable[[Tensor], Tensor], batch: Sequence[Tensor]) -> Tensor:
    """Cross-entropy of ``(x, y)``; with a third entry, weighted by it (per example)."""
    x, y = batch[0], batch[1]
    if len(batch) == 2:
        return F.cross_entropy(module(x), y)
    w = batch[2]
    return (w * F.cross_entropy(module(x), y, reduction="none")).sum() / w.sum().clamp_min(1e-8)


def train_plain(
    model: nn.Module,
    batches: Callable[[int], Sequence[Tensor]],
    rates: Sequence[float] | Tensor,
) -> dict[str, Tensor]:
    """Train a copy of ``model``'s parameters by plain SGD, step t on ``batches(t)`` at
    rate ``rates[t]`` (no graph kept): what scores a distilled set, a schedule or a
    weighting. Returns the trained parameters."""
    params = {k: v.detach().clone().requires_grad_(True) for k, v in model.named_parameters()}

    def forward(x: Tensor) -> Tensor:
        return functional_call(model, params, (x,))

    for t in range(len(rates)):
        loss = ce(forward, batches(t))
        grads = torch.autograd.grad(loss, list(params.values()))
        with torch.no_grad():
            params = {
                k: (p - float(rates[t]) * g).requires_grad_(True)
                for (k, p), g in zip(params.items(), grads)
            }
    return {k: v.detach() for k, v in params.items()}


def accuracy(model: nn.Module, params: dict[str, Tensor], x: Tensor, y: Tensor) -> float:
    """Fraction of ``x`` that the model with ``params`` classifies as ``y``."""
    with torch.no_grad():
        return float((functional_call(model, params, (x,)).argmax(1) == y).float().mean())
