"""Comparing the speed of two pieces of code on a noisy machine, and the work they dispatch.

* :func:`paired_ratios` and :func:`median_ci`: when A and B run alternately, round after
  round, the ratio of A's time to B's *within* a round cancels the slow and fast spells
  of the machine that both shared; the median of those ratios, with a distribution-free
  confidence interval (order statistics of the binomial), says how far apart they are
  and whether this run can tell them apart at all. A ratio of two medians taken over the
  whole run does not: on this 2-core CPU it moved by ±10% from run to run for the same code.
* :func:`count_ops`: the ATen operations a call dispatches (forward, and every backward
  it runs on the calling thread), by name: a count that no load on the machine changes,
  for "does A do more work than B?".
"""

from __future__ import annotations

import collections
import math
import statistics
from collections.abc import Callable, Sequence
from typing import Any

from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["count_ops", "median_ci", "paired_ratios"]


def paired_ratios(a: Sequence[float], b: Sequence[float]) -> list[float]:
    """``a[r] / b[r]`` for every round ``r`` (the two lists in round order)."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired timings need the same rounds on both sides ({len(a)}, {len(b)})")
    return [x / y for x, y in zip(a, b)]


def median_ci(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float, float]:
    """The median of ``values`` and a confidence interval for it that assumes nothing of
    their distribution but independence.

    The interval is ``(x_(j), x_(n+1-j))`` in sorted order, with the largest ``j`` whose
    coverage ``1 - 2·P(Binomial(n, 1/2) < j)`` is at least ``level``; with too few values
    for that (n ≤ 5 at 95%), the whole range and its smaller coverage.

    Returns:
        ``(median, low, high, coverage)``.
    """
    xs = sorted(values)
    n = len(xs)
    if n == 0:
        raise ValueError("median_ci needs at least one value")
    below = 0.0  # P(Binomial(n, 1/2) < j)
    j = 1
    coverage = 1.0 - 2.0 * 0.5**n  # the whole range: j = 1
    while 2 * j <= n - 1:  # j + 1 still leaves x_(j+1) <= x_(n-j)
        below += math.comb(n, j - 1) * 0.5**n
        nxt = 1.0 - 2.0 * (below + math.comb(n, j) * 0.5**n)
        if nxt < level:
            break
        j += 1
        coverage = nxt
    return statistics.median(xs), xs[j - 1], xs[n - j], coverage


class _Counter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def count_ops(fn: Callable[[], Any]) -> collections.Counter[str]:
    """The ATen operations ``fn()`` dispatches, by name (``"aten.convolution"``: count).

    Counts what runs on the calling thread: the forward, and the backward passes of
    ``torch.autograd.grad`` / ``.backward()`` on CPU tensors. Cost: a Python call per
    operation, so count in a pass of its own, never in a timed one.
    """
    with _Counter() as counter:
        fn()
    return counter.ops
