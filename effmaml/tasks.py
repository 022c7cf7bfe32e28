"""Task families and the seed of one task: sine-wave regression for examples and tests.

A task family is a callable ``family(generator) -> [(support, query), ...]`` of
``meta_batch`` tasks that draws all its randomness from the given ``torch.Generator``
(what ``effmaml.MetaTrainer`` expects), plus ``sample(generator, n)`` for held-out
tasks. N-way K-shot episodes from a labelled dataset are ``effmaml.episodes``;
``task_seed`` names the random stream of one task of one outer step.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["SineTasks", "TaskFamily", "mlp", "mse_loss", "task_seed"]


def task_seed(seed: int, iteration: int, index: int) -> int:
    """The seed of task ``index`` at outer step ``iteration`` of a run seeded ``seed``.

    A hash, so that neighbouring tasks and iterations get unrelated streams. Stable across
    processes, platforms and Python versions.
    """
    digest = hashlib.blake2b(f"{seed}:{iteration}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def mse_loss(model: Callable[[Tensor], Tensor], batch: tuple[Tensor, Tensor]) -> Tensor:
    """The regression loss ``loss_fn(m, batch)`` of the sine examples.

    Args:
        model: the module or adapted model (called on ``x``).
        batch: ``(x, y)``.

    Returns:
        The mean squared error of ``model(x)`` against ``y``.
    """
    x, y = batch
    return F.mse_loss(model(x), y)


def mlp(width: int = 40, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Finn et al.'s sine regressor: 1-40-40-1 with ReLU.

    Args:
        width: the hidden layers' width (40 in the paper).
        dtype: the parameters' dtype.
    """
    return nn.Sequential(
        nn.Linear(1, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 1)
    ).to(dtype)


class TaskFamily:
    """``family(g)``: ``meta_batch`` tasks; ``family.sample(g, n)``: n tasks."""

    meta_batch: int

    def task(self, g: torch.Generator):
        raise NotImplementedError

    def sample(self, g: torch.Generator, n: int) -> list:
        return [self.task(g) for _ in range(n)]

    def __call__(self, g: torch.Generator) -> list:
        return self.sample(g, self.meta_batch)


@dataclass
class SineTasks(TaskFamily):
    """y = A sin(x − φ), A ~ U[0.1, 5], φ ~ U[0, π], x ~ U[−5, 5] (Finn et al. 2017).

    ``SineTasks(m)(generator)`` draws ``m`` tasks, each ``((x_s, y_s), (x_q, y_q))``: the
    ``sample_tasks`` a ``MetaTrainer`` takes.

    Attributes:
        meta_batch: tasks per call.
        k_support: support examples per task.
        k_query: query examples per task.
        dtype: the tensors' dtype.
    """

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
