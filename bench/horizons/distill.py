"""Dataset distillation, exact against truncated at the same memory.

``make bilevel``'s digits distillation (``bench.bilevel.distill``: 10 learned 8x8 images
and N learned rates, a new initialisation every outer step, scored on the real test digits
from 10 unseen initialisations) at N = 300, learned by

* ``truncated``: RaT-BPTT's setting (Feng et al. 2024): a random window of 60 steps, the
  unroll stopping where the window ends (``truncated(window=60, random=True)``);
* ``exact``: the meta-gradient through all N steps, ``checkpoint`` under a memory budget
  equal to truncation's predicted peak (it picks the fastest segment that fits),

the same number of outer steps each, from the same seeds.
"""

from __future__ import annotations

from typing import Any

import torch

import effmaml

from ..bilevel import distill as bd
from ..bilevel.common import Split, ce

__all__ = ["budget", "learn_and_score", "options"]


def budget(split: Split, steps: int, window: int) -> int:
    """``truncated(window)``'s predicted peak on the distillation problem (bytes)."""
    del split  # the problem's shapes are fixed: 10 images of 64 pixels
    model = bd._model(0)
    images = torch.zeros(10, 64, requires_grad=True)
    rates = torch.full((steps,), 0.05, requires_grad=True)
    maml = effmaml.MAML(model, ce, effmaml.SGD(rates, per_step=True), "naive")
    ((_, pred),) = maml.estimate(
        (images, torch.arange(10)), steps, "truncated", window=window
    ).items()
    return pred.peak_bytes


def options(kind: str, split: Split, steps: int, window: int, seed: int) -> tuple[str, dict]:
    """The strategy and options of ``kind`` (``"exact"`` or ``"truncated"``)."""
    if kind == "exact":
        return "checkpoint", {"memory_budget": budget(split, steps, window)}
    if kind == "truncated":
        return "truncated", {"window": window, "random": True, "seed": seed}
    raise ValueError(kind)


def learn_and_score(
    kind: str, split: Split, steps: int, window: int, outer: int, seed: int
) -> dict[str, Any]:
    """Distil with ``kind``'s meta-gradient from ``seed``; the test accuracy from 10
    unseen initialisations, and the last outer losses."""
    strategy, opts = options(kind, split, steps, window, seed)
    d = bd.distill(split, steps, "random", outer, seed=seed, strategy=strategy, options=opts)
    acc = bd.score(split, d.images, d.labels, d.rates, "random", seed)
    return {"kind": kind, "seed": seed, "test_acc": acc, "outer_losses": d.losses}


def job(args: tuple) -> dict[str, Any]:
    """One seed of one kind (a pool job: defined here, not in ``__main__``, because a spawned
    worker imports the function it runs by its module's name)."""
    from ..bilevel.common import digits

    torch.set_num_threads(1)
    kind, steps, window, outer, seed = args
    return learn_and_score(kind, digits(), steps, window, outer, seed)
