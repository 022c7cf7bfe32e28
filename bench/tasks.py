"""Few-shot task families of the benchmark: linear binary classification (and, from
:mod:`effmaml.tasks`, sine regression)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from effmaml.tasks import SineTasks, TaskFamily, mlp, mse_loss

__all__ = ["LinearClassTasks", "SineTasks", "bce_loss", "mlp", "mse_loss", "sigmoid_net"]


def bce_loss(model, batch) -> Tensor:
    x, y = batch
    return F.binary_cross_entropy_with_logits(model(x).squeeze(-1), y)


def sigmoid_net(dim: int = 10, dtype=torch.float32) -> nn.Module:
    """A single-layer sigmoid network (the logit; the sigmoid is in the loss)."""
    return nn.Linear(dim, 1).to(dtype)


@dataclass
class LinearClassTasks(TaskFamily):
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
