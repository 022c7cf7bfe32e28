"""Checkpointing schedules over the engine: uniform segments and binomial (revolve).

A schedule stores a few states in the forward pass and, in backward, recomputes the others
from them (``effmaml.engine.advance_to``) and pulls the gradient back
(``effmaml.engine.pullback``), always in reverse step order.

| schedule                 | stored states        | step evaluations          | graphs alive |
|--------------------------|----------------------|---------------------------|--------------|
| uniform k, "segment"     | ceil(N/k)            | 2N                        | k steps      |
| uniform k, "step"        | ceil(N/k) + k        | 3N − ceil(N/k)            | 1 step       |
| revolve, s slots         | s (+1 working)       | N + t(N, s) + 1 ≤ (r+1)·N + 1 | 1 step   |

with t(N, s) = r·N − C(s+r, s+1) and r the least integer with C(s+r, s) ≥ N
(Griewank & Walther, "Algorithm 799: revolve", ACM TOMS 2000): the provably least number of
step recomputations with s stored states, each step recomputed at most r times.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from typing import NamedTuple

from torch import Tensor

from .engine import Handle, Pull, Schedule, Store, advance, advance_to
from .problem import InnerProblem, Records, Runtime
from .replay import RngState, capture_rng, replay_rng
from .state import Consts, InnerState

__all__ = [
    "Action",
    "RevolveSchedule",
    "UniformSchedule",
    "binomial_repetitions",
    "revolve_plan",
    "revolve_recomputations",
    "revolve_split",
]


@dataclass
class UniformSchedule(Schedule):
    """Store every ``segment``-th state; pull back by segment or by step.

    Attributes:
        segment: steps per segment ``k`` (the last one may be shorter).
        pullback: ``"segment"`` (recompute a segment with its graph, pull it back whole) or
            ``"step"`` (re-advance the segment storing each state, then pull back one step
            at a time).
        store: where stored states live (``effmaml.engine.Store`` keeps them on the
            device; ``effmaml.offload.HostStore`` in pinned host memory).
    """

    segment: int
    pullback: str
    store: Store = field(default_factory=Store)

    def starts(self, steps: int) -> list[int]:
        return list(range(0, steps, self.segment))

    def step_evals(self, steps: int) -> int:
        if self.pullback == "segment":
            return 2 * steps
        # "step" re-advances all but the last step of each segment before pulling back.
        return 3 * steps - len(self.starts(steps))

    def stored_states(self, steps: int) -> int:
        n = len(self.starts(steps)) - 1  # the first one is the input
        return n + (min(self.segment, steps) if self.pullback == "step" else 0)

    def graph_steps(self, steps: int) -> int:
        return min(self.segment, steps) if self.pullback == "segment" else 1

    def moved_states(self, steps: int) -> int:
        # the segment starts after the first; with "step" also every re-advanced state
        starts = len(self.starts(steps)) - 1
        return starts + (steps if self.pullback == "step" else 0)

    def forward(
        self,
        problem: InnerProblem,
        rt: Runtime,
        rec: Records,
        state0: InnerState,
        rng0: RngState,
        consts: Consts,
    ) -> tuple[InnerState, list[Tensor], list[Tensor], object]:
        steps = problem.steps
        stored: list[tuple[int, Handle, RngState]] = []
        losses: list[Tensor] = []
        queries: list[Tensor] = []
        state = state0
        for a in self.starts(steps):
            b = min(a + self.segment, steps)
            if a > 0:
                stored.append((a, self.store.put(state), capture_rng(problem.rng_devices)))
            state, seg_losses, seg_queries = advance(problem, rt, rec, state, a, b, consts)
            losses += seg_losses
            queries += seg_queries
        return state, losses, queries, stored

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
        steps, store = problem.steps, self.store
        assert isinstance(memo, list)
        stored: list[tuple[int, Handle, RngState]] = [(0, Store().put(state0), rng0), *memo]
        memo.clear()
        while stored:
            # Popping frees each stored state as soon as its segment is pulled back.
            a, handle, rng_a = stored.pop()
            if stored:
                store.fetch(stored[-1][1])  # overlaps the copy with this segment's work
            state_a = store.get(handle)
            b = min(a + self.segment, steps)
            if self.pullback == "segment":
                pull(state_a, rng_a, a, b)
                continue
            keep: list[tuple[Handle, RngState]] = []

            def put(s: InnerState, r: RngState, keep: list = keep) -> None:
                keep.append((store.put(s), r))

            with replay_rng(rng_a):
                last, _, _ = advance(problem, rt, rec, state_a, a, b - 1, consts, keep=put)
                put(last, capture_rng(problem.rng_devices))
            del state_a, last
            for t in reversed(range(a, b)):
                handle_t, rng_t = keep.pop()
                if keep:
                    store.fetch(keep[-1][0])
                pull(store.get(handle_t), rng_t, t, t + 1)


def binomial_repetitions(steps: int, slots: int) -> int:
    """r: the least integer with C(slots + r, slots) ≥ steps (recomputations per step)."""
    if slots < 1:
        raise ValueError(f"slots must be >= 1 (got {slots})")
    if slots == 1:
        return max(steps - 1, 0)
    r = 0
    while math.comb(slots + r, slots) < steps:
        r += 1
    return r


def revolve_recomputations(steps: int, slots: int) -> int:
    """t(N, s): the least number of forward steps that reverse N steps with s stored states.

    One of the states is the chain's start. Closed form of Griewank & Walther:
    r·N − C(s + r, s + 1); with one slot, N(N − 1)/2.
    """
    if steps <= 1:
        return 0
    if slots == 1:
        return steps * (steps - 1) // 2
    r = binomial_repetitions(steps, slots)
    return r * steps - math.comb(slots + r, slots + 1)


@lru_cache(maxsize=65536)
def revolve_split(steps: int, slots: int) -> int:
    """Where to place the next stored state: the m in 1..N−1 minimising
    m + t(N − m, s − 1) + t(m, s) (advance m steps, reverse the right part with one slot
    fewer, then the left part with all of them). Smallest m on ties."""
    best, best_m = None, 1
    for m in range(1, steps):
        c = m + revolve_recomputations(steps - m, slots - 1) + revolve_recomputations(m, slots)
        if best is None or c < best:
            best, best_m = c, m
    return best_m


class Action(NamedTuple):
    """One move of the revolve plan.

    ``kind``: ``"store"`` (advance from the stored state at ``src`` to ``dst`` and store
    it), ``"advance"`` (advance from ``src`` to a working state at ``dst``), ``"pull"``
    (pull back step ``src``, from the working state or else the stored state at ``src``) or
    ``"free"`` (drop the stored state at ``src``).
    """

    kind: str
    src: int
    dst: int = -1


def revolve_plan(a: int, b: int, slots: int, have: set[int]) -> Iterator[Action]:
    """The binomial reversal of steps ``a..b-1`` with ``slots`` states (one at ``a``).

    ``have`` holds the stored positions (updated as the plan goes). A generator: the plan
    for N = 1000 is walked as it runs, never built.
    """
    if b - a == 1:
        yield Action("pull", a)
        return
    if slots == 1:
        for t in reversed(range(a, b)):
            if t != a:
                yield Action("advance", a, t)
            yield Action("pull", t)
        return
    m = a + revolve_split(b - a, slots)
    if m not in have:
        yield Action("store", a, m)
        have.add(m)
    yield from revolve_plan(m, b, slots - 1, have)
    yield Action("free", m)
    have.discard(m)
    yield from revolve_plan(a, m, slots, have)


@dataclass
class _RevolveMemo:
    plan: Iterator[Action]
    stored: dict[int, tuple[InnerState, RngState]]
    working: tuple[int, InnerState, RngState] | None


@dataclass
class RevolveSchedule(Schedule):
    """Binomial checkpointing with ``slots`` stored states; every pullback is one step.

    The forward pass follows the reversal's first descent (it stores the states the reversal
    would store first), then runs the last step for the output; the backward pass continues
    the same plan. Memory: the ``slots`` − 1 stored states besides the input, one working
    state and one step's graph A, for any N. Compute: N + t(N, s) + 1 step evaluations, the
    least possible with s states (each step recomputed at most r times, N ≤ C(s + r, s)).

    Attributes:
        slots: stored states, the initial one included (≥ 1; 1 recomputes every step from
            the start, N(N − 1)/2 steps).
    """

    slots: int
    store: Store = field(default_factory=Store)

    def step_evals(self, steps: int) -> int:
        # forward N + backward re-advances + N one-step pullbacks; the forward covers the
        # plan's first descent (N - 1 steps of it).
        t = revolve_recomputations(steps, min(self.slots, steps))
        return steps + (t - (steps - 1)) + steps

    def stored_states(self, steps: int) -> int:
        return min(self.slots, steps)  # the slots besides the input, + the working state

    def forward(
        self,
        problem: InnerProblem,
        rt: Runtime,
        rec: Records,
        state0: InnerState,
        rng0: RngState,
        consts: Consts,
    ) -> tuple[InnerState, list[Tensor], list[Tensor], object]:
        steps = problem.steps
        plan = revolve_plan(0, steps, min(self.slots, steps), {0})
        stored: dict[int, tuple[InnerState, RngState]] = {0: (state0, rng0)}
        losses: list[Tensor] = []
        queries: list[Tensor] = []
        state, pos = state0, 0
        first: Action | None = None
        for action in plan:
            if action.kind == "pull":
                first = action
                break
            assert action.src == pos, "the first descent advances from where it stands"
            state, seg, seg_q = advance(problem, rt, rec, state, pos, action.dst, consts)
            losses += seg
            queries += seg_q
            pos = action.dst
            if action.kind == "store":
                stored[pos] = (state, capture_rng(problem.rng_devices))
        assert first is not None and pos <= first.src == steps - 1
        state, seg, seg_q = advance(problem, rt, rec, state, pos, steps - 1, consts)
        losses += seg
        queries += seg_q
        # the global RNG is where step N-1 starts: run it in place, so that it moves on
        # exactly as naive's forward would leave it
        working = (steps - 1, state, capture_rng(problem.rng_devices))
        final, seg, seg_q = advance(problem, rt, rec, state, steps - 1, steps, consts)
        losses += seg
        queries += seg_q
        del stored[0]  # the input; backward gets it again from the Function's saved tensors
        memo = _RevolveMemo(itertools.chain([first], plan), stored, working)
        return final, losses, queries, memo

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
        assert isinstance(memo, _RevolveMemo)
        stored = memo.stored
        stored[0] = (state0, rng0)
        working = memo.working
        memo.working = None
        for action in memo.plan:
            if action.kind == "pull":
                t = action.src
                if working is not None and working[0] == t:
                    _, s, r = working
                else:
                    s, r = stored[t]
                working = None
                pull(s, r, t, t + 1)
                del s, r
            elif action.kind == "free":
                stored.pop(action.src, None)
            else:
                s, r = advance_to(
                    problem, rt, rec, *stored[action.src], action.src, action.dst, consts
                )
                if action.kind == "store":
                    stored[action.dst] = (s, r)
                else:
                    working = (action.dst, s, r)
                del s, r
        stored.clear()
