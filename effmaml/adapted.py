"""The adapted model ``MAML.adapt`` returns: φ_N, the buffers, the inner losses and the
run's facts, callable like the user's module.

Memory: holds φ_N and, under exact strategies, the graph (or the schedule's stored states)
that backward needs, until it is dropped.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from .step import FunctionalModel, Runtime, at_step
from .strategies import Outcome, RunFacts, Strategy

__all__ = ["Adapted"]


class Adapted:
    """The adapted model: a callable that runs the user's module with φ_N.

    Not an ``nn.Module``: it holds tensors that are differentiable w.r.t. the original
    parameters (under exact strategies), so a query loss computed with it backpropagates
    into ``model.parameters()``. Calling it never changes ``buffers``; it runs in the
    model's current train/eval mode.

    Attributes:
        params: adapted parameters φ_N, name -> tensor.
        buffers: buffers after the inner loop (BatchNorm running statistics).
        losses: the N inner losses, each before its update (differentiable under exact
            strategies, detached under ``first_order``).
        inner_state: the inner optimizer's final state.
        fixed: the parameters that were not adapted (the model's own tensors).
        facts: what ran and what the cost model predicted (``RunFacts``).
        strategy: the strategy that produced it.
        query_loss: with ``adapt(..., query=...)``, the multi-step loss
            Σ_t w_t · L_query(φ_{t+1}), differentiable: ``query_loss.backward()`` puts the
            exact meta-gradient in the model's ``.grad``; else None.
        query_losses: the N query losses (detached values; 0 where w_t = 0), or empty.
    """

    def __init__(
        self,
        model: nn.Module,
        params: dict[str, Tensor],
        buffers: dict[str, Tensor],
        losses: list[Tensor],
        inner_state: dict[str, Tensor],
        fixed: dict[str, Tensor],
        facts: RunFacts,
        runtime: Runtime,
        strategy: Strategy,
        query_loss: Tensor | None = None,
        query_losses: list[Tensor] | None = None,
    ) -> None:
        self.model = model
        self.params = params
        self.buffers = buffers
        self.losses = losses
        self.inner_state = inner_state
        self.fixed = fixed
        self.facts = facts
        self.strategy = strategy
        self._runtime = runtime
        self.query_loss = query_loss
        self.query_losses = [q.detach() for q in query_losses or []]

    @classmethod
    def from_outcome(
        cls,
        model: nn.Module,
        out: Outcome,
        fixed: dict[str, Tensor],
        runtime: Runtime,
        strategy: Strategy,
    ) -> Adapted:
        """The adapted model of a strategy's ``Outcome`` (what ``MAML.adapt`` returns)."""
        return cls(
            model,
            out.state.params,
            out.state.buffers,
            out.losses,
            out.state.opt,
            fixed,
            out.facts,
            runtime,
            strategy,
            out.query_loss,
            out.queries,
        )

    @property
    def info(self) -> dict[str, Any]:
        """``facts`` as a flat dict (``segment``, ``predicted_peak_bytes``, ``chosen``
        ...): the flat view for users; code that reads one fact can use ``facts``."""
        return self.facts.as_dict()

    def host_peak_bytes(self) -> int:
        """Pinned host memory the run's store held at most (``offload`` on CUDA), else 0;
        recorded after the forward pass and again after backward."""
        return self._runtime.host_peak_bytes

    @property
    def step_evals(self) -> int:
        """Inner-step evaluations so far: forward pass, plus recomputation once backward ran."""
        return self._runtime.step_evals

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # as after the last inner step: per-step modules use their last step's slice
        with at_step(len(self.losses) - 1):
            return FunctionalModel(self.model, {**self.fixed, **self.params}, self.buffers)(
                *args, **kwargs
            )

    def named_parameters(self) -> dict[str, Tensor]:
        """All parameters as the adapted model sees them (adapted and fixed)."""
        return {**self.fixed, **self.params}

    def __repr__(self) -> str:
        return (
            f"Adapted({type(self.model).__name__}, {len(self.params)} adapted params, "
            f"steps={len(self.losses)}, strategy={self.strategy!r})"
        )
