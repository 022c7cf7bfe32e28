"""Truncated backpropagation: the meta-gradient through the last K inner steps only."""

from __future__ import annotations

import dataclasses
import random as _random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..clip import clip_backward
from ..costs import Prediction, Probe, predict_seconds, schedule_peak
from ..engine import Pull, Schedule, Store, advance, run_schedule
from ..outer import OuterTensors
from ..problem import InnerProblem, Records, Runtime
from ..replay import RngState
from ..sources import outer_bytes
from ..state import Consts, InnerState
from .base import Outcome, Plan, check_count, register_strategy
from .first_order import first_order_steps
from .scheduled import Scheduled, with_outer

__all__ = ["Truncated", "WindowSchedule"]


@dataclass
class WindowSchedule(Schedule):
    """The window of a truncated unroll: steps ``start..N-1`` with their graph in backward.

    Its input is the state at ``start``, produced first order by the caller; the forward
    pass advances the window without graph, the backward pass recomputes the window with
    its graph and pulls the gradient back to ``start`` in one pullback.

    Attributes:
        start: the window's first step a (N − K).
        end: one past its last step (N; a + K for a random window, whose unroll stops there).
        seed: the seed that placed a random window (``Truncated(random=True)``), else None.
    """

    start: int = 0
    end: int = 0
    seed: int | None = None
    store: Store = field(default_factory=Store)

    def step_evals(self, steps: int) -> int:
        # the whole call: N first-order steps (before and in the window), K pullbacks
        return steps + (steps - self.start)

    def stored_states(self, steps: int) -> int:
        return 1 if self.start > 0 else 0  # the state at the window's start (θ₀'s otherwise)

    def graph_steps(self, steps: int) -> int:
        return steps - self.start

    def forward(
        self,
        problem: InnerProblem,
        rt: Runtime,
        rec: Records,
        state0: InnerState,
        rng0: RngState,
        consts: Consts,
    ) -> tuple[InnerState, list[Tensor], list[Tensor], object]:
        state, losses, queries = advance(
            problem, rt, rec, state0, self.start, problem.steps, consts
        )
        zeros = [torch.zeros_like(losses[0])] * self.start
        # nothing stored beyond the window's input, which the engine holds; a memo that is
        # not None tells the engine the first backward has not run yet
        return state, zeros + losses, zeros + queries, ()

    def backward(
        self,
        problem: InnerProblem,
        rt: Runtime,
        rec: Records,
        memo: object,
        state0: InnerState,
        rng0: RngState,
        consts: Consts,
        pull: Pull,
    ) -> None:
        pull(state0, rng0, self.start, problem.steps)


class _Join(torch.autograd.Function):
    """Forward: the state's parameters at the window's start. Backward: their gradient to
    θ₀ unchanged (the identity Jacobian of the first-order steps before the window), and
    zeros to the outer tensors those steps read (Note [What truncation gives each outer
    variable])."""

    @staticmethod
    def forward(ctx: Any, n: int, *tensors: Tensor) -> tuple[Tensor, ...]:
        ctx.n = n
        ctx.outer = [(t.shape, t.dtype, t.device) for t in tensors[2 * n :]]
        # Note [Identity outputs of a custom Function] (effmaml.clip)
        return tuple(t.view_as(t) for t in tensors[:n])

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple[Tensor | None, ...]:
        zeros = [torch.zeros(s, dtype=d, device=v) for s, d, v in ctx.outer]
        return (None, *([None] * ctx.n), *grads, *zeros)


class _Prefix(Sequence[Any]):
    """The first ``n`` batches of a source (a random window's unroll stops at step n)."""

    def __init__(self, source: Sequence[Any], n: int) -> None:
        self.source, self.n = source, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, t: Any) -> Any:
        if isinstance(t, slice):
            return [self.source[i] for i in range(*t.indices(self.n))]
        if not -self.n <= t < self.n:
            raise IndexError(t)
        return self.source[t % self.n]


@register_strategy
class Truncated(Scheduled):
    """Truncated backpropagation: trades the meta-gradient's early steps for memory K·A + P.

    The inner loop runs every step; the meta-gradient goes exactly through the last K
    (``window``) steps, to the state at step N − K and to every tensor those steps read,
    and the steps before the window count as first-order MAML counts them: φ_{N−K} is taken
    to be θ₀ plus a constant (Shaban et al. 2019, "Truncated back-propagation for bilevel
    optimization"). What each outer variable gets (Note [What truncation gives each outer
    variable]):

    * θ₀: the cotangent at φ_{N−K} unchanged (identity Jacobian; clipped like every step's
      output under ``clip_grad_grad_norm``), plus the proximal term's gradient from the
      window's steps; the inner optimizer's state at N − K (momentum, moments) is a constant.
    * non-adapted parameters, learned rates, every other tensor the steps read (learned
      data, per-example weights, ``loss_fn``'s closure): the window's exact gradient; what
      only the steps before the window read gets a zero gradient (a tensor of zeros, never
      None), and a per-step rate of an earlier step gets 0 in its entry.
    * a multi-step loss: its terms after the window's steps exact; a term after an earlier
      step hands its gradient at φ_{t+1} to θ₀ unchanged and its direct gradient to the
      non-adapted parameters and the other tensors it reads (``first_order``'s multi-step
      loss, which refuses the latter).
    * the inner losses before the window are returned detached.

    ``window`` ≥ N gives naive's meta-gradient; ``window=1`` on a one-step problem too.

    ``random=True`` is RaT-BPTT (Feng et al. 2024, "Embarrassingly simple dataset
    distillation"): each call draws the window's start a uniformly from 0..N − K and the
    unroll *stops* at step n = a + K: the adapted model is φ_n (``n`` steps, ``n`` inner
    losses), the meta-gradient goes through steps a..n − 1 exactly; batches after step n
    are not read. ``Adapted.info`` records ``window_start``, ``window_end`` and
    ``window_seed`` (a = ``torch.randint(N − K + 1, (1,), generator=torch.Generator()
    .manual_seed(window_seed))``); the calls' seeds come from ``random.Random(seed)``. A
    multi-step loss (weights for N steps) is refused with a random window.

    Memory: K·A (the window's graphs in its one pullback) + P (the state at N − K) + a
    pullback's working set, plus the parameters' size for the summed first-order query
    gradients of a multi-step loss weighted before the window. Compute: N first-order
    steps and K steps recomputed with their graph and pulled back (n and K with a random
    window), plus the probe's ``PROBE_EVALS`` = 4 on a front's first call.

    Args:
        window: K, the steps the meta-gradient goes through (≥ 1; values ≥ N: all of them).
        random: draw the window's position per call (RaT-BPTT), else the last K steps.
        seed: the seed of the calls' window seeds (``random=True``); None: one drawn from
            the operating system, recorded.

    Raises:
        ValueError: no ``window``, or ``seed`` without ``random=True``.
    """

    name = "truncated"
    exact = False

    def __init__(self, window: int | None = None, random: bool = False, seed: int | None = None):
        if window is None:
            raise ValueError(
                "strategy 'truncated' needs window=K, the number of last inner steps the "
                "meta-gradient goes through, e.g. MAML(..., strategy='truncated', window=10)"
            )
        check_count("window", window, allow_none=False)
        if seed is not None and not random:
            raise ValueError("seed= places a random window; pass random=True with it")
        self.window = window
        self.random = bool(random)
        if self.random and seed is None:
            seed = _random.SystemRandom().randrange(2**31)
        self.seed = seed
        self._seeds = _random.Random(seed)

    def options(self) -> dict[str, Any]:
        return {"window": self.window, "random": self.random, "seed": self.seed}

    def candidates(self, problem: InnerProblem, probe: Probe) -> list[Schedule]:
        # a random window ends at step N at the latest: its longest unroll
        n = problem.steps
        return [WindowSchedule(max(n - self.window, 0), n)]

    def predict(self, schedule: Schedule, problem: InnerProblem, probe: Probe) -> Prediction:
        assert isinstance(schedule, WindowSchedule)
        n = problem.steps
        peak = schedule_peak(schedule.stored_states(n), schedule.graph_steps(n), probe)
        if any(problem.step_weights[: schedule.start]):  # the summed first-order queries
            peak += probe.param_bytes
        seconds = predict_seconds(
            probe,
            schedule.advances(n),
            schedule.graph_steps(n),
            graph_advances=bool(problem.settings.exact_states),
        )
        return Prediction(peak, schedule.step_evals(n) + probe.evals, seconds=seconds)

    def resolved(self, schedule: Schedule) -> dict[str, Any]:
        assert isinstance(schedule, WindowSchedule)
        out: dict[str, Any] = {
            "window": schedule.end - schedule.start,
            "window_start": schedule.start,
            "window_end": schedule.end,
        }
        if self.random:
            out.update(random=True, window_seed=schedule.seed)
        return out

    def label(self, schedule: Schedule) -> str:
        return f"truncated(window={self.window}{', random=True' if self.random else ''})"

    def plans(self, problem: InnerProblem, probe: Probe | None) -> list[Plan]:
        """One plan: the window over the last K steps (a random window's longest unroll,
        for the budget and the prediction; ``execute`` draws its place).

        Raises:
            ValueError: a random window with a multi-step loss.
        """
        if self.random and problem.step_weights:
            raise ValueError(
                "truncated(random=True) stops the unroll at a random step, where a multi-step "
                "loss's weights (one per step of N) have no meaning; use random=False, or "
                "the final query loss"
            )
        return super().plans(problem, probe)

    def execute(self, plan: Plan, rt: Runtime, state0: InnerState, consts: Consts) -> Outcome:
        """Steps 0..N−K first order, then the window on the engine."""
        # Note [A random window is drawn at execution]
        # The plan holds the last K steps (the longest unroll a window can be): its budget
        # check and prediction cover every draw. The draw is here, one per execution, so
        # that a plan made without running (MAML.estimate) takes no seed from the stream.
        problem, schedule, prediction = plan.problem, plan.schedule, plan.prediction
        assert isinstance(schedule, WindowSchedule)
        if self.random:
            k = min(self.window, problem.steps)
            seed = self._seeds.randrange(2**31)
            g = torch.Generator().manual_seed(seed)
            first = int(torch.randint(problem.steps - k + 1, (1,), generator=g))
            problem = dataclasses.replace(problem, batches=_Prefix(problem.batches, first + k))
            schedule = WindowSchedule(first, first + k, seed)
            assert plan.probe is not None
            extra = outer_bytes(problem.batches, problem.query)
            prediction = with_outer(self.predict(schedule, problem, plan.probe), extra)
        a, n = schedule.start, problem.steps
        assert schedule.end == n, (schedule, n)
        before = OuterTensors(n)
        head_rec = Records(before)
        start, term = state0, None
        losses: list[Tensor] = []
        queries: list[Tensor] = []
        if a > 0:
            if any(problem.step_weights[:a]):
                head = dataclasses.replace(problem, step_weights=problem.step_weights[:a])
                state_a, losses, queries, term = first_order_steps(
                    head, rt, head_rec, state0, a, consts, outer=True
                )
            else:
                state_a, losses, queries = advance(
                    problem, rt, head_rec, state0.detached(False), 0, a, consts
                )
            before.release()
            # Note [What truncation gives each outer variable]
            # The steps before the window are first order: φ_a = θ₀ + a constant. So the
            # cotangent at φ_a goes to θ₀ unchanged, and whatever enters those steps only
            # through their inner gradients (the optimizer state, learned rates, the
            # non-adapted parameters, learned data, closure tensors) contributes nothing:
            # each tensor they read gets an explicit zero here, the window's gradient (if the
            # window reads it too) from the engine. A multi-step loss's terms before the
            # window read φ_{t+1} and the non-adapted parameters directly: ``term``.
            names = list(state_a.params)
            joined = _Join.apply(
                len(names),
                *(state_a.params[k] for k in names),
                *(state0.params[k] for k in names),
                *before.tensors,
            )
            params = clip_backward(dict(zip(names, joined)), problem.settings.clip)
            start = InnerState(params, state_a.opt, state_a.buffers)
        state, out_losses, out_queries, rec = run_schedule(problem, rt, start, consts, schedule)
        window = rec.outer
        assert window is not None
        losses = losses + list(out_losses.unbind(0))[a:]
        qs: list[Tensor] = []
        query: Tensor | None = None
        if problem.step_weights:
            qs = queries + list(out_queries.unbind(0))[a:]
            for t in range(a, n):
                if problem.weight(t):
                    q = problem.weight(t) * qs[t]
                    query = q if query is None else query + q
            if term is not None:
                query = term if query is None else query + term
        seen = {id(t) for t in window.tensors}
        outer = [window.describe(i) for i in range(len(window.tensors))]
        outer += [
            f"{before.describe(i)} (only before the window: zero gradient)"
            for i, t in enumerate(before.tensors)
            if id(t) not in seen
        ]
        nbytes = window.nbytes() + sum(
            t.numel() * t.element_size() for t in before.tensors if id(t) not in seen
        )
        facts = plan.facts(
            options=self.resolved(schedule),
            prediction=prediction,
            schedule=schedule,
            exact_states=problem.settings.exact_states,
            outer=tuple(outer),
            outer_bytes=nbytes,
        )
        return Outcome(state, losses, facts, qs, query, rec)
