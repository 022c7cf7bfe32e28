"""Meta-training the learned rule through N-step unrolls, and tuning the baselines' rates.

The meta-objective of one task (Metz et al. 2019's remedy for exploding meta-gradients:
the loss averaged over the unroll, not the final one) is the mean, over every
``stride``-th inner step t, of the loss on the task's validation batch at φ_{t+1}: effmaml's
multi-step loss (``adapt(..., query=, step_weights=)``), which every recomputing schedule
evaluates as its pullbacks pass each state. The two other remedies: the rule's output
layer starts small (``LearnedOptimizer(out_scale=...)``) and the meta-gradient's global
norm is clipped before Adam's step; an outer step whose unroll diverges (a non-finite
inner loss) or whose meta-gradient is not finite is skipped and counted.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

import effmaml
from effmaml.learned import LearnedOptimizer

from ..bilevel.common import Split, ce
from .tasks import Task, train

__all__ = [
    "MetaConfig",
    "baseline",
    "meta_gradient",
    "meta_train",
    "objective_weights",
    "rule",
    "training_task",
    "tune",
]

TRAIN_SEEDS = 10_000  # meta-training task t: seed TRAIN_SEEDS + t; held-out: HELD_OUT + i
HELD_OUT = 90_000


@dataclass(frozen=True)
class MetaConfig:
    """One meta-training run: N, how the meta-gradient is taken, and its optimisation."""

    steps: int  # N
    strategy: str  # "checkpoint" (exact) or "truncated"
    options: tuple[tuple[str, Any], ...] = ()  # the strategy's options (segment=, window=)
    outer_steps: int = 100
    meta_lr: float = 3e-3
    clip: float = 1.0  # the meta-gradient's global norm
    rule_lr: float = 1e-2  # LearnedOptimizer(lr=...): Adam's rate the untrained rule starts at
    hidden: tuple[int, ...] = (32, 32)
    out_scale: float = 1e-2
    points: int = 50  # query losses in the meta-objective (every N // points steps)
    seed: int = 0

    @property
    def label(self) -> str:
        """``"exact"`` or ``"truncated K=10"``."""
        if self.strategy == "truncated":
            return f"truncated K={dict(self.options)['window']}"
        return "exact"


def rule(cfg: MetaConfig) -> LearnedOptimizer:
    """The untrained rule of ``cfg``."""
    return LearnedOptimizer(cfg.rule_lr, hidden=cfg.hidden, out_scale=cfg.out_scale, seed=cfg.seed)


def objective_weights(steps: int, points: int) -> list[float]:
    """Equal weights on every ``max(1, steps // points)``-th step, the last one included,
    summing to 1 (the loss averaged over the unroll)."""
    stride = max(1, steps // points)
    marks = set(range(steps - 1, -1, -stride))
    return [1.0 / len(marks) if t in marks else 0.0 for t in range(steps)]


@dataclass
class _Fronts:
    """One MAML front per dataset (its model's parameters reset to each task's
    initialisation; a front keeps its probe for every task of the same shapes)."""

    splits: dict[str, Split]
    inner: LearnedOptimizer
    strategy: str
    options: dict[str, Any]
    fronts: dict[str, effmaml.MAML] = field(default_factory=dict)

    def adapt(self, task: Task, steps: int, weights: Sequence[float]) -> torch.Tensor:
        split = self.splits[task.data]
        init = task.model(split)
        if task.data not in self.fronts:
            self.fronts[task.data] = effmaml.MAML(
                init, ce, self.inner, self.strategy, **self.options
            )
        front = self.fronts[task.data]
        with torch.no_grad():
            for p, q in zip(front.model.parameters(), init.parameters()):
                p.copy_(q)
        adapted = front.adapt(
            task.batches(split, steps), query=Task.query(split), step_weights=weights
        )
        assert adapted.query_loss is not None
        return adapted.query_loss


def meta_train(cfg: MetaConfig, splits: dict[str, Split]) -> dict[str, Any]:
    """Meta-train a rule by Adam on the unroll-averaged validation loss, one task per outer
    step (the datasets alternating, a new initialisation and minibatch order each).

    Memory: the strategy's for one N-step unroll. Compute per outer step: the strategy's
    (``checkpoint(segment=k, pullback="segment")``: about 2N steps and N pullbacks;
    ``truncated(window=K)``: N steps and K pullbacks).

    Returns:
        ``{"weights": the trained rule's state_dict, "history": per outer step the
        meta-objective, the meta-gradient's norm before clipping and the seconds,
        "skipped": outer steps whose unroll diverged or whose meta-gradient was not
        finite, "seconds": total}``.
    """
    torch.manual_seed(cfg.seed)
    r = rule(cfg)
    opt = torch.optim.Adam(r.parameters(), lr=cfg.meta_lr)
    fronts = _Fronts(splits, r, cfg.strategy, dict(cfg.options))
    weights = objective_weights(cfg.steps, cfg.points)
    history: list[dict[str, float]] = []
    skipped = 0
    start = time.perf_counter()
    for it in range(cfg.outer_steps):
        t0 = time.perf_counter()
        task = training_task(list(splits), it)
        try:
            loss = fronts.adapt(task, cfg.steps, weights)
        except FloatingPointError:  # the rule diverged inside the unroll: skip the task
            skipped += 1
            history.append({"objective": math.inf, "grad_norm": math.nan,
                            "seconds": time.perf_counter() - t0})  # fmt: skip
            continue
        grads = torch.autograd.grad(loss, r.parameters())
        norm = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))
        if math.isfinite(norm):
            scale = min(1.0, cfg.clip / (norm + 1e-12))
            for p, g in zip(r.parameters(), grads):
                p.grad = g * scale
            opt.step()
        else:
            skipped += 1
        history.append(
            {
                "objective": float(loss.detach()),
                "grad_norm": norm,
                "seconds": time.perf_counter() - t0,
            }
        )
        if (it + 1) % max(1, cfg.outer_steps // 10) == 0:
            last = history[-1]["objective"]
            print(f"N={cfg.steps} {cfg.label}: outer step {it + 1}/{cfg.outer_steps}, "
                  f"objective {last:.3f}, skipped {skipped}", flush=True)  # fmt: skip
    return {
        "weights": r.state_dict(),
        "history": history,
        "skipped": skipped,
        "seconds": time.perf_counter() - start,
    }


def meta_gradient(
    cfg: MetaConfig, splits: dict[str, Split], strategy: str, **options: Any
) -> torch.Tensor:
    """The flat meta-gradient of the untrained rule's weights on the first meta-training
    task under ``strategy`` (what the agreement and memory columns compare)."""
    r = rule(cfg)
    fronts = _Fronts(splits, r, strategy, options)
    task = training_task(list(splits), 0)
    loss = fronts.adapt(task, cfg.steps, objective_weights(cfg.steps, cfg.points))
    grads = torch.autograd.grad(loss, r.parameters())
    return torch.cat([g.reshape(-1) for g in grads])


def tune(
    name: str,
    lr: float,
    steps: int,
    splits: dict[str, Split],
    tasks: int,
) -> float:
    """Mean validation loss after ``steps`` steps of baseline ``name`` (``"sgd-momentum"``:
    SGD with momentum 0.9; ``"adam"``: Adam's defaults) at ``lr``, over the first
    ``tasks`` meta-training tasks of each dataset (inf if any diverged)."""
    losses = []
    for it in range(tasks * len(splits)):
        task = training_task(list(splits), it)
        out = train(task, splits[task.data], baseline(name, lr), steps, val=True)
        losses.append(out["val"][-1])
    return sum(losses) / len(losses)


def training_task(datasets: Sequence[str], it: int) -> Task:
    """Meta-training task ``it``: the datasets in turn, seed ``TRAIN_SEEDS + it``."""
    return Task(datasets[it % len(datasets)], TRAIN_SEEDS + it)


def baseline(name: str, lr: float) -> effmaml.InnerOptimizer:
    """A baseline optimizer by name: ``"sgd-momentum"`` or ``"adam"``."""
    if name == "sgd-momentum":
        return effmaml.SGD(lr, momentum=0.9)
    if name == "adam":
        return effmaml.Adam(lr)
    raise ValueError(f"unknown baseline {name!r}; use 'sgd-momentum' or 'adam'")
