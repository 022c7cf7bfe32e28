"""Training under a compute budget: the process's own CPU time, with evaluation paused.

On a shared machine a wall-clock budget would give a method less compute whenever a
neighbour is busy; the process's CPU time (``time.process_time``, all its threads: run
torch with one thread per worker) counts only what this training ran. Evaluations at the
checkpoints run with the clock paused, so they cost the budget nothing.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

__all__ = ["Budget", "CpuClock", "Progress", "drive"]


class CpuClock:
    """CPU seconds (``time.process_time``) and wall seconds since start, less the time spent
    inside :meth:`paused`."""

    def __init__(self) -> None:
        self._cpu0 = time.process_time()
        self._wall0 = time.perf_counter()
        self._cpu_paused = 0.0
        self._wall_paused = 0.0

    def cpu(self) -> float:
        return time.process_time() - self._cpu0 - self._cpu_paused

    def wall(self) -> float:
        return time.perf_counter() - self._wall0 - self._wall_paused

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        cpu, wall = time.process_time(), time.perf_counter()
        try:
            yield
        finally:
            self._cpu_paused += time.process_time() - cpu
            self._wall_paused += time.perf_counter() - wall


@dataclass(frozen=True)
class Budget:
    """Train until ``cpu_s`` CPU seconds are spent (the outer step under way finishes).

    Attributes:
        cpu_s: the budget, CPU seconds of this process.
        checkpoints: fractions of the budget (0 = before the first step, 1 = the end) at
            which ``on_checkpoint`` runs, with the clock paused.
        on_checkpoint: ``(model, cpu_s, steps)``: the model as training would return it now
            (a copy), the CPU seconds spent and the outer steps taken.
    """

    cpu_s: float
    checkpoints: tuple[float, ...] = ()
    on_checkpoint: Callable[[torch.nn.Module, float, int], None] | None = None


class Progress:
    """How far a training run is, in [0, 1]: steps taken over ``iterations``, or CPU time
    spent over the budget (what MAML++'s schedules follow)."""

    def __init__(self, iterations: int | None = None, budget: Budget | None = None) -> None:
        if (iterations is None) == (budget is None):
            raise ValueError("give iterations or a budget, one of them")
        self.iterations, self.budget = iterations, budget
        self.clock = CpuClock()
        self.steps = 0

    def fraction(self) -> float:
        if self.budget is not None:
            return min(1.0, self.clock.cpu() / self.budget.cpu_s)
        assert self.iterations is not None
        return min(1.0, self.steps / max(self.iterations, 1))

    def done(self) -> bool:
        if self.budget is not None:
            return self.clock.cpu() >= self.budget.cpu_s
        assert self.iterations is not None
        return self.steps >= self.iterations


def drive(
    progress: Progress, step: Callable[[], None], current: Callable[[], torch.nn.Module]
) -> dict:
    """Run ``step`` until ``progress`` is done, calling the budget's checkpoints on
    ``current()`` with the clock paused.

    Returns:
        ``steps``, ``cpu_s`` and ``wall_s`` of the training alone (checkpoints excluded),
        and ``eval_cpu_s`` spent at the checkpoints.
    """
    b = progress.budget
    marks = sorted(b.checkpoints) if b is not None and b.on_checkpoint is not None else []
    clock = progress.clock
    eval_cpu = 0.0

    def due() -> None:
        nonlocal eval_cpu
        assert b is not None and b.on_checkpoint is not None
        while marks and (clock.cpu() >= marks[0] * b.cpu_s or progress.done()):
            marks.pop(0)
            used, t = clock.cpu(), time.process_time()
            with clock.paused():
                b.on_checkpoint(current(), used, progress.steps)
            eval_cpu += time.process_time() - t

    if marks:
        due()
    while not progress.done():
        step()
        progress.steps += 1
        if marks:
            due()
    return {
        "steps": progress.steps,
        "cpu_s": clock.cpu(),
        "wall_s": clock.wall(),
        "eval_cpu_s": eval_cpu,
    }
