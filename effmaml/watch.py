"""Watching the inner loop: ``adapt``'s per-step callback and its stopping rule.

``MAML.adapt(..., callback=fn)`` calls ``fn(t, loss)`` once per inner step, in order, with
the step's index in this ``adapt`` and its inner loss (detached, before the step's update);
``fn`` returning True stops the inner loop after step t. The unroll is then exactly
``adapt`` over the first t + 1 batches, under every strategy:

* strategies that run each step once, in order (``naive``, ``first_order``:
  ``Strategy.streams``) call it in their own loop (``Runtime.watch``), at no cost but the
  call;
* the others plan from N before they run (a checkpoint schedule's segments, revolve's
  binomial plan, auto's choice, implicit's solve), and so does a multi-step loss (its
  default weight is on the last step): ``scan`` runs the steps first-order, calling the
  callback, to find N; then the strategy runs on the first N batches (``first``).
  Cost: up to N more first-order step evaluations (counted in ``Adapted.step_evals``)
  and the multi-step loss's weighted queries, one state of memory at a time; the callback
  sees this pass's losses, which are naive's bitwise where a first-order step reproduces a
  step with graph (Note [States bitwise naive's]; ``exact_states=True`` makes it so).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from .engine import advance
from .problem import NO_RECORDS, InnerProblem, Runtime, callback_stops
from .replay import forked_rng
from .sources import RepeatedBatch
from .state import Consts, InnerState

__all__ = ["Callback", "first", "scan"]

Callback = Callable[[int, Tensor], Any]


def scan(
    problem: InnerProblem, rt: Runtime, state0: InnerState, consts: Consts, callback: Callback
) -> int:
    """Run the steps first-order, handing each inner loss to ``callback``, until it returns
    True or the steps run out; the global RNG is left as it was (the strategy draws the
    same after it).

    Args:
        problem: the problem as planned (a multi-step loss's queries are evaluated where
            it weighs them, so that their random draws come where the run's do).
        rt: the call's runtime (counts the evaluations).
        state0: the initial state.
        consts: the constants.
        callback: ``callback(t, loss) -> bool | None``.

    Returns:
        N: one past the step at which ``callback`` returned True, else ``problem.steps``.
    """
    with forked_rng(problem.rng_devices), torch.no_grad():
        state = state0
        for t in range(problem.steps):
            state, losses, _ = advance(problem, rt, NO_RECORDS, state, t, t + 1, consts)
            if callback_stops(callback(t, losses[0]), t):
                return t + 1
    return problem.steps


def first(problem: InnerProblem, n: int) -> InnerProblem:
    """``problem`` over its first ``n`` batches (itself when ``n`` is all of them)."""
    if n == problem.steps:
        return problem
    batches = problem.batches
    prefix: Sequence[Any]
    if isinstance(batches, RepeatedBatch):
        prefix = RepeatedBatch(batches.batch, n)
    elif isinstance(batches, (list, tuple)):
        prefix = batches[:n]
    else:
        prefix = _Prefix(batches, n)
    return dataclasses.replace(problem, batches=prefix)


class _Prefix(Sequence[Any]):
    """The first ``n`` items of a lazy source, read from it by index."""

    def __init__(self, source: Sequence[Any], n: int) -> None:
        self.source, self.n = source, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, t: Any) -> Any:
        if isinstance(t, slice):
            return [self[i] for i in range(*t.indices(self.n))]
        if not -self.n <= t < self.n:
            raise IndexError(t)
        return self.source[t % self.n]
