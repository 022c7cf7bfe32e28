"""The adapted model ``MAML.adapt`` returns: φ_N, the buffers, the inner losses and the
run's facts, usable as the user's module (``effmaml.module.FunctionalModel``).

Memory: holds φ_N and, under exact strategies, the graph (or the schedule's stored states)
that backward needs, until it is dropped.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping
from typing import Any

from torch import Tensor, nn

from .module import FunctionalModel
from .problem import NO_RECORDS, Records, Runtime
from .step import at_step
from .strategies import Outcome, RunFacts, Strategy

__all__ = ["Adapted"]


class Buffers(dict[str, Tensor]):
    """The adapted buffers, name -> tensor; callable as ``nn.Module.buffers()`` too."""

    def __call__(self, recurse: bool = True) -> Iterator[Tensor]:
        return iter([b for n, b in self.items() if recurse or "." not in n])


class Adapted(FunctionalModel):
    """The adapted model: the user's module at φ_N, with what the inner loop left.

    It behaves as the user's module with the adapted parameters and buffers
    (``effmaml.module.FunctionalModel``): ``adapted(x)``, any method
    (``adapted.embed(x)``), submodule (``adapted.backbone(x)``, ``adapted[0]``), parameter
    (``adapted.fc.weight`` is φ_N's tensor), property, ``parameters()``,
    ``named_parameters()`` (the adapted tensors, differentiable), ``state_dict()``,
    ``train()``/``eval()`` (its own mode; the model's is not changed) and ``to_module()``
    (a plain detached ``nn.Module`` copy, for deployment). Not an ``nn.Module`` itself: it
    holds tensors that are differentiable w.r.t. the original parameters (under exact
    strategies), so a query loss computed with it backpropagates into
    ``model.parameters()``. Calling it never changes ``buffers``.

    BatchNorm (Note [BatchNorm at test time]): in train mode (the default, the model's),
    a call normalises with the statistics of the batch it is given, as MAML evaluates; in
    eval mode (``adapted.eval()``) with ``buffers``, the running statistics after the
    inner steps (with per-step BatchNorm, the last step's slice, as MAML++ evaluates).

    ``maml.adapt(batches, start=adapted)`` continues the inner loop from it (its
    parameters, inner-optimizer state, buffers and step count): the same as one ``adapt``
    over both sources.

    The names below are this object's: a submodule of the model with one of these names is
    reached with ``adapted.get_submodule(name)``.

    Attributes:
        params: adapted parameters φ_N, name -> tensor.
        buffers: buffers after the inner loop (BatchNorm running statistics), name ->
            tensor; ``buffers()`` iterates them as ``nn.Module.buffers()`` does.
        losses: this adapt's inner losses, each before its update (differentiable under
            exact strategies, detached under ``first_order``).
        inner_state: the inner optimizer's final state.
        fixed: the parameters that were not adapted (the model's own tensors).
        facts: what ran and what the cost model predicted (``RunFacts``).
        strategy: the strategy that produced it.
        query_loss: with ``adapt(..., query=...)``, the multi-step loss
            Σ_t w_t · L_query(φ_{t+1}), differentiable: ``query_loss.backward()`` puts the
            exact meta-gradient in the model's ``.grad``; else None.
        query_losses: the query losses (detached values; 0 where w_t = 0), or empty.
        first_step: the index in the whole inner loop of this adapt's first step (0, or
            where the adapted model it continued from stopped).
    """

    def __init__(
        self,
        model: nn.Module,
        params: dict[str, Tensor],
        buffers: Mapping[str, Tensor],
        losses: list[Tensor],
        inner_state: dict[str, Tensor],
        fixed: dict[str, Tensor],
        facts: RunFacts,
        runtime: Runtime,
        strategy: Strategy,
        query_loss: Tensor | None = None,
        query_losses: list[Tensor] | None = None,
        first_step: int = 0,
        records: Records = NO_RECORDS,
    ) -> None:
        self.buffers = Buffers(buffers)
        super().__init__(model, {**fixed, **params}, self.buffers)
        # as after the last inner step: per-step modules use their last step's slice
        self._fm.context = functools.partial(at_step, first_step + len(losses) - 1)
        self.params = params
        self.losses = losses
        self.inner_state = inner_state
        self.fixed = fixed
        self.facts = facts
        self.strategy = strategy
        self._runtime = runtime
        self.query_loss = query_loss
        self.query_losses = [q.detach() for q in query_losses or []]
        self.first_step = first_step
        self._records = records  # what the run recorded (the witness its backward checks)

    @classmethod
    def from_outcome(
        cls,
        model: nn.Module,
        out: Outcome,
        fixed: dict[str, Tensor],
        runtime: Runtime,
        strategy: Strategy,
        first_step: int = 0,
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
            first_step,
            out.records,
        )

    @property
    def end_step(self) -> int:
        """The index in the whole inner loop of the step after this adapt's last (where
        ``adapt(..., start=self)`` begins)."""
        return self.first_step + len(self.losses)

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

    def __repr__(self) -> str:
        return (
            f"Adapted({type(self._fm.model).__name__}, {len(self.params)} adapted params, "
            f"steps={len(self.losses)}, strategy={self.strategy!r})"
        )
