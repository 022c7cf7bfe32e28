"""MAML++'s curriculum over outer steps: which derivative order an iteration adapts with
(derivative-order annealing, "DA") and the multi-step loss's weights ("MSL").

A function of the iteration alone, so that a resumed or many-process run follows the
same curriculum. Cost: nothing per iteration (the first-order front is built once).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from .maml import MAML

__all__ = ["Curriculum", "StepWeights"]

StepWeights = Sequence[float] | Callable[[int], Sequence[float]]


class Curriculum:
    """What iteration ``i`` of a meta-training run adapts with.

    Args:
        maml: the front (its strategy, second order, after the annealing).
        first_order_iterations: the first this many iterations adapt first order.
        step_weights: the multi-step loss's weights for every iteration, or a function of
            the iteration giving them (``effmaml.msl_weights``); None: the query loss
            after the last step.

    Raises:
        ValueError: ``first_order_iterations`` < 0.
    """

    def __init__(
        self,
        maml: MAML,
        first_order_iterations: int = 0,
        step_weights: StepWeights | None = None,
    ) -> None:
        if first_order_iterations < 0:
            raise ValueError(f"first_order_iterations must be >= 0 (got {first_order_iterations})")
        self.maml = maml
        self.first_order_iterations = first_order_iterations
        self.step_weights = step_weights
        self._first_order = maml.with_strategy("first_order") if first_order_iterations else None

    def maml_at(self, iteration: int) -> MAML:
        """The front iteration ``iteration`` adapts with (first order during the
        derivative-order annealing's first iterations, then ``maml``)."""
        if self._first_order is not None and iteration < self.first_order_iterations:
            return self._first_order
        return self.maml

    def weights_at(self, iteration: int) -> list[float] | None:
        """The multi-step loss's weights at ``iteration``, or None without one."""
        if self.step_weights is None:
            return None
        w = self.step_weights(iteration) if callable(self.step_weights) else self.step_weights
        return [float(x) for x in w]
