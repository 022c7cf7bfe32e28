"""Checkpointed MAML: store every k-th inner state, recompute the rest in backward."""

from __future__ import annotations

import math

import torch

from ..engine import UniformSchedule, run_uniform
from ..memory import saved_bytes
from ..step import Consts, InnerProblem, InnerState, inner_step
from .base import Outcome, Strategy, register_strategy
from .checks import check_double_backward

__all__ = ["Checkpoint", "best_segment"]

PULLBACKS = ("segment", "step")


def best_segment(steps: int, pullback: str, state_bytes: int, step_graph_bytes: int) -> int:
    """The segment length ``k`` that minimises the predicted peak of a uniform schedule.

    * ``pullback="step"``: memory ≈ (ceil(N/k) + k)·P + A, minimised near k = sqrt(N);
      returns ``ceil(sqrt(N))``.
    * ``pullback="segment"``: memory ≈ ceil(N/k)·P + k·A; returns the k in 1..N that
      minimises it (the smallest such k on ties).

    Args:
        steps: N.
        pullback: ``"segment"`` or ``"step"``.
        state_bytes: P, bytes of one inner state.
        step_graph_bytes: A, bytes autograd saves for one second-order step.
    """
    if pullback == "step":
        return max(1, min(steps, math.ceil(math.sqrt(steps))))
    costs = [
        (math.ceil(steps / k) * state_bytes + k * step_graph_bytes, k) for k in range(1, steps + 1)
    ]
    return min(costs)[1]


@register_strategy
class Checkpoint(Strategy):
    """Uniform checkpointing: trades recomputation for memory, exactly.

    The forward pass runs the inner loop first-order and stores the state (parameters,
    optimizer state, buffers, RNG) at every ``segment``-th step. The backward pass walks
    the segments in reverse:

    * ``pullback="segment"``: recompute the segment with its second-order graph and pull
      the gradient back through it whole. Memory ≈ ceil(N/k)·P + k·A; compute 2N steps.
    * ``pullback="step"``: re-advance the segment without graph, keeping its k states,
      then pull back one step at a time. Memory ≈ (ceil(N/k) + k)·P + A; compute about 3N
      steps (``3N - ceil(N/k)``).

    The meta-gradient equals naive's: parameters, buffers and losses bitwise in float64;
    gradients of quantities read at every step up to summation order.

    A batch sequence is indexed again during the recomputation, so a lazy sequence must
    return the same batch for the same index.

    Args:
        segment: steps per segment ``k`` (≥ 1; values above N mean one segment), or
            ``None`` to choose it: ``ceil(sqrt(N))`` for ``pullback="step"``; for
            ``"segment"`` the k minimising ceil(N/k)·P + k·A, with P counted from the
            state's tensors and A measured by the probe step (bytes saved by autograd).
            The resolved k is in ``Adapted.info["segment"]``.

    Every ``adapt`` runs one probe step first (see Note [Why checkpoint probes one step]):
    step evaluations are 2N + 1 (``"segment"``) or 3N - ceil(N/k) + 1 (``"step"``).
        pullback: ``"segment"`` (default) or ``"step"``.
    """

    name = "checkpoint"
    exact = True

    def __init__(self, segment: int | None = None, pullback: str = "segment") -> None:
        if segment is not None:
            if isinstance(segment, bool) or not isinstance(segment, int):
                raise TypeError(f"segment must be an int or None (got {segment!r})")
            if segment < 1:
                raise ValueError(
                    f"segment must be >= 1 (got {segment}); pass segment=None to choose it "
                    f"automatically"
                )
        if pullback not in PULLBACKS:
            raise ValueError(f"pullback must be one of {PULLBACKS} (got {pullback!r})")
        self.segment = segment
        self.pullback = pullback

    def options(self):
        return {"segment": self.segment, "pullback": self.pullback}

    def resolve_segment(self, problem: InnerProblem, state0: InnerState, step_bytes: int) -> int:
        """The segment length used for ``problem``, given A = ``step_bytes``."""
        n = problem.steps
        if self.segment is not None:
            return min(self.segment, n)
        return best_segment(n, self.pullback, state0.nbytes(), step_bytes)

    def run(self, problem: InnerProblem, state0: InnerState, consts: Consts) -> Outcome:
        step_bytes = probe_step(problem, state0, consts)
        k = self.resolve_segment(problem, state0, step_bytes)
        schedule = UniformSchedule(k, self.pullback)
        state, losses = run_uniform(problem, state0, consts, schedule)
        info = {
            "segment": k,
            "pullback": self.pullback,
            "state_bytes": state0.nbytes(),
            "step_graph_bytes": step_bytes,
            "probe_evals": 1,
            "step_evals_predicted": schedule.step_evals(problem.steps) + 1,
        }
        return Outcome(state, list(losses.unbind(0)), info)


def probe_step(problem: InnerProblem, state0: InnerState, consts: Consts) -> int:
    """Run step 0 once with its graph: measure A and check that double backward exists.

    # Note [Why checkpoint probes one step]
    # Inside a custom Function's backward, a @once_differentiable operation does not leave
    # the DelayedError node that makes naive fail loudly: its second-order term would just be
    # missing. Probing step 0 in the forward pass, outside any backward, finds such an
    # operation before any work (check_double_backward), and measures A, the bytes autograd
    # saves for one second-order step, for segment=None. Cost: one step evaluation, counted
    # in step_evals; RNG and buffers are left as they were.

    Returns:
        A, in bytes (deduplicated by storage).
    """
    devices = [problem.device] if problem.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        s = state0.detached(requires_grad=True)
        with saved_bytes() as count:
            out, loss = inner_step(problem, s, 0, consts, create_graph=True)
        check_double_backward(out.params.values())
        del out, loss
    return count.bytes
