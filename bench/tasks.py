"""Few-shot task families: sine-wave regression and linear binary classification.

Each family is a callable ``family(generator) -> [(support, query), ...]`` of
``meta_batch`` tasks, drawing all its randomness from the given ``torch.Generator`` (what
:class:`effmaml.MetaTrainer` expects), plus ``sample(generator, n)`` for held-out tasks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["LinearClassTasks", "SineTasks", "bce_loss", "mlp", "mse_loss", "sigmoid_net"]


def mse_loss(model, batch) -> Tensor:
    x, y = batch
    return F.mse_loss(model(x), y)


def bce_loss(model, batch) -> Tensor:
    x, y = batch
    return F.binary_cross_entropy_with_logits(model(x).squeeze(-1), y)


def mlp(width: int = 40, dtype=torch.float32) -> nn.Module:
    """Finn et al.'s sine regressor: 1-40-40-1 with ReLU."""
    return nn.Sequential(
        nn.Linear(1, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 1)
    ).to(dtype)


def sigmoid_net(dim: int = 10, dtype=torch.float32) -> nn.Module:
    """A single-layer sigmoid network (the logit; the sigmoid is in the loss)."""
    return nn.Linear(dim, 1).to(dtype)


class _Family:
    """``family(g)``: ``meta_batch`` tasks; ``family.sample(g, n)``: n tasks."""

    meta_batch: int

    def task(self, g: torch.Generator):
        raise NotImplementedError

    def sample(self, g: torch.Generator, n: int) -> list:
        return [self.task(g) for _ in range(n)]

    def __call__(self, g: torch.Generator) -> list:
        return self.sample(g, self.meta_batch)


@dataclass
class SineTasks(_Family):
    """y = A sin(x − φ), A ~ U[0.1, 5], φ ~ U[0, π], x ~ U[−5, 5] (Finn et al. 2017)."""

    meta_batch: int
    k_support: int = 10
    k_query: int = 10
    dtype: torch.dtype = torch.float32

    def task(self, g: torch.Generator) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
        amp = 0.1 + 4.9 * torch.rand((), generator=g, dtype=self.dtype)
        phase = math.pi * torch.rand((), generator=g, dtype=self.dtype)
        x = -5 + 10 * torch.rand(self.k_support + self.k_query, 1, generator=g, dtype=self.dtype)
        y = amp * torch.sin(x - phase)
        k = self.k_support
        return (x[:k], y[:k]), (x[k:], y[k:])


@dataclass
class LinearClassTasks(_Family):
    """Binary classification with a shared structure: task boundary w = w₀ + σ·ε.

    Inputs x ~ N(0, I) in ``dim`` dimensions, label 1[w·x + b > 0] with the task's
    (w, b) drawn around a common (w₀, b₀) fixed by ``structure_seed``: a good
    initialisation exists, and a few shots adapt it to the task.
    """

    meta_batch: int
    k_support: int = 10
    k_query: int = 20
    dim: int = 10
    noise: float = 0.6
    structure_seed: int = 12345
    dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        g = torch.Generator().manual_seed(self.structure_seed)
        w0 = torch.randn(self.dim, generator=g, dtype=self.dtype)
        self.w0 = 3.0 * w0 / w0.norm()
        self.b0 = torch.zeros((), dtype=self.dtype)

    def task(self, g: torch.Generator):
        w = self.w0 + self.noise * 3.0 * torch.randn(self.dim, generator=g, dtype=self.dtype) / (
            self.dim**0.5
        )
        b = self.b0 + self.noise * torch.randn((), generator=g, dtype=self.dtype)
        x = torch.randn(self.k_support + self.k_query, self.dim, generator=g, dtype=self.dtype)
        y = (x @ w + b > 0).to(self.dtype)
        k = self.k_support
        return (x[:k], y[:k]), (x[k:], y[k:])
