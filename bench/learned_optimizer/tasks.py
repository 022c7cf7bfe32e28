"""The task family: small MLPs on real data, a new initialisation and minibatch order each.

A task is (dataset, seed): an MLP (``d_in -> 32 -> 10``, ReLU) initialised from ``seed``,
trained on minibatches of :data:`BATCH` training examples drawn with ``seed``. The two
datasets ship with installed packages (``bench.bilevel.common``): scikit-learn's 1,797
digits (1,000 train / 300 validation / 497 test) and MNIST-1D (3,000 / 1,000 / 1,000).
:func:`train` runs any inner optimizer on a task without a graph (what scores the learned
rule and tunes the baselines).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call

import effmaml

from ..bilevel.common import Split, ce, digits, mlp, mnist1d

__all__ = ["BATCH", "DATASETS", "WIDTH", "Batches", "Task", "load", "train"]

DATASETS = ("digits", "mnist1d")
BATCH = 64
WIDTH = 32
QUERY = 300  # validation examples in the meta-objective


def load(names: Sequence[str] = DATASETS) -> dict[str, Split]:
    """The named datasets' splits, in that order (MNIST-1D is generated, about 5 s: load
    once and hand the splits to the jobs)."""
    loaders = {"digits": digits, "mnist1d": mnist1d}
    unknown = [n for n in names if n not in loaders]
    if unknown:
        raise ValueError(f"unknown datasets {unknown}; choose from {list(loaders)}")
    return {n: loaders[n]() for n in names}


class Batches:
    """Step t's minibatch of a task, built on demand from a seeded index table (a batch
    source that ``adapt`` and a recomputation index alike)."""

    def __init__(self, split: Split, steps: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x, self.y = split.x_train, split.y_train
        self.idx = torch.randint(len(self.y), (steps, BATCH), generator=g)

    def __len__(self) -> int:
        return len(self.idx)

    def __getitem__(self, t: int) -> tuple[Tensor, Tensor]:
        i = self.idx[t]
        return self.x[i], self.y[i]


@dataclass(frozen=True)
class Task:
    """One task of the family: ``data`` (a name in :data:`DATASETS`) and ``seed``."""

    data: str
    seed: int

    def model(self, split: Split) -> nn.Module:
        """The task's MLP at its initialisation."""
        return mlp(split.x_train.shape[1], WIDTH, split.classes, seed=self.seed)

    def batches(self, split: Split, steps: int) -> Batches:
        """Its first ``steps`` minibatches (a longer run starts with the same ones)."""
        return Batches(split, steps, self.seed + 7_919)

    @staticmethod
    def query(split: Split) -> tuple[Tensor, Tensor]:
        """The meta-objective's batch: the first :data:`QUERY` validation examples."""
        return split.x_val[:QUERY], split.y_val[:QUERY]


def _loss(model: nn.Module, params: dict[str, Tensor], x: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        return float(ce(lambda a: functional_call(model, params, (a,)), (x, y)))


def _acc(model: nn.Module, params: dict[str, Tensor], x: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        return float((functional_call(model, params, (x,)).argmax(1) == y).float().mean())


def train(
    task: Task,
    split: Split,
    inner: effmaml.InnerOptimizer,
    steps: int,
    record: Sequence[int] = (),
    val: bool = False,
) -> dict[str, list[float]]:
    """Train ``task``'s MLP with ``inner`` for ``steps`` steps, no graph kept.

    Args:
        task, split: the task and its dataset.
        inner: any effmaml inner optimizer (its tensor hyper-parameters are read detached).
        steps: how many steps.
        record: the step counts (``0 <= s <= steps``) after which to record the losses on
            the whole training split and the test split (and the validation loss with
            ``val``); ``steps`` is always recorded.
        val: record the validation loss too (what tunes the baselines).

    Returns:
        ``{"step": [...], "train": [...], "test": [...], "test_acc": [...]}`` (and
        ``"val"``), one entry per recorded step; non-finite losses are kept as they are
        (a diverged run reads inf or nan from its first non-finite step on).

    Compute: ``steps`` forward/backward passes of a minibatch plus the inner update, and a
    full pass over the train and test splits per recorded step.
    """
    model = task.model(split)
    params = {k: v.detach() for k, v in model.named_parameters()}
    hyper = {k: v.detach() for k, v in inner.hyperparameters().items()}
    state = inner.init(params)
    batches = task.batches(split, steps)
    marks = sorted({*record, steps})
    out: dict[str, list[float]] = {"step": [], "train": [], "test": [], "test_acc": []}
    if val:
        out["val"] = []

    finite = True

    def note(t: int) -> None:
        out["step"].append(t)
        for key, (x, y) in splits.items():
            out[key].append(_loss(model, params, x, y) if finite else math.inf)
        out["test_acc"].append(_acc(model, params, split.x_test, split.y_test) if finite else 0.0)

    splits = {"train": (split.x_train, split.y_train), "test": (split.x_test, split.y_test)}
    if val:
        splits["val"] = (split.x_val, split.y_val)
    for t in range(steps):
        if t in marks:
            note(t)
        if not finite:
            continue
        leaves = {k: v.requires_grad_(True) for k, v in params.items()}
        loss = ce(lambda a, w=leaves: functional_call(model, w, (a,)), batches[t])
        grads = torch.autograd.grad(loss, list(leaves.values()))
        with torch.no_grad():
            state, params = inner.step(state, leaves, dict(zip(leaves, grads)), t, hyper)
        # a diverged run reads inf from here on
        finite = math.isfinite(float(loss.detach())) and all(
            bool(v.isfinite().all()) for v in params.values()
        )
    note(steps)
    return out
