"""What one ``adapt`` call's inner problem is and what it does as it runs.

``Settings`` (a front's resolved settings), ``InnerProblem`` (the frozen problem a
strategy plans and executes), ``Runtime`` (one call's counters, the front's probe cache
and the callback) and ``Records`` (what one execution records about its steps: the outer
tensors they read, the witness of a recomputing run). The inner step itself is ``effmaml.step``.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .inner import InnerOptimizer
from .outer import QUERY, OuterTensors
from .replay import AutocastState, Witness, capture_autocast, rng_devices
from .sources import move_to

__all__ = [
    "NO_RECORDS",
    "InnerProblem",
    "LossFn",
    "Records",
    "Runtime",
    "Settings",
    "callback_stops",
]

LossFn = Callable[[Any, Any], Tensor]  # loss_fn(m, batch), m a FunctionalModel


@dataclass(frozen=True)
class Settings:
    """A front's settings, resolved once by ``effmaml.MAML`` and embedded in every problem
    it builds (frozen): what each layer below reads, under one meaning.

    Three entries are resolved further where the information first exists: by the
    strategy's ``plan``, once per ``adapt``, into the ``Plan``'s problem (the strategy
    executes that one): ``exact_states`` None -> the probe's answer
    (``Scheduled.plans``), ``memory_budget`` None -> ``auto``'s default budget
    (``Auto.plan``), ``prox`` -> iMAML's λ (``Implicit.plans``: its inner objective is
    the proximal one by definition).

    Attributes:
        prox: λ of the proximal term (0 disables it).
        clip: grad-of-grad clipping bound, or None.
        update_running_stats: whether train-mode BatchNorm updates running statistics.
        check_finite: raise on a non-finite inner loss (one host sync per step).
        memory_budget: bytes the meta-gradient may use above the start (device memory, or
            resident memory on a CPU), or None.
        host_memory_budget: bytes of pinned host memory ``offload`` may hold, or None.
        math_attention: run every inner step's scaled-dot-product attention with the math
            kernel (Note [Attention kernels and double backward]).
        substitute_ops: run every inner step under the twice-differentiable stand-ins of
            ``effmaml.substitutes`` (Note [Substitutes under recomputation]).
        exact_states: whether the forward pass's first-order advances compute each step's
            gradient as a step with graph does (Note [States bitwise naive's]); None: the
            probe decides, and a recomputing strategy runs with the resolved bool.
    """

    prox: float = 0.0
    clip: float | None = None
    update_running_stats: bool = True
    check_finite: bool = True
    memory_budget: int | None = None
    host_memory_budget: int | None = None
    math_attention: bool = False
    substitute_ops: bool = False
    exact_states: bool | None = None


@dataclass(frozen=True)
class InnerProblem:
    """What one ``adapt`` call's inner problem is (frozen); built by ``effmaml.MAML``.

    What a call does as it runs (counting, checking recomputations, the probe cache) is
    its ``Runtime``, passed beside it.

    Attributes:
        model: the user's module (never mutated).
        loss_fn: ``loss_fn(module_like, batch) -> scalar``.
        inner: the differentiable inner optimizer.
        batches: one batch per step (indexed again during recomputation).
        device: where steps run; each batch is moved there only for its own step.
        settings: the front's resolved settings (``Settings``).
        autocast: the autocast state when ``adapt`` started; every inner step re-enters it
            (Note [Autocast under recomputation]).
        query: the query batch of a multi-step loss, or None.
        step_weights: the multi-step loss's weights w_0..w_{N-1} (empty: none); the query
            loss after step t counts w_t times.
        first_step: the index in the whole inner loop of this problem's step 0 (an adapt
            continued from an adapted model, ``adapt(..., start=adapted)``): what the
            inner optimizer (Adam's bias correction, per-step rates) and per-step modules
            (``current_step``) see is ``first_step + t``; batch t is still ``batches[t]``.
    """

    model: nn.Module
    loss_fn: LossFn
    inner: InnerOptimizer
    batches: Sequence[Any]
    device: torch.device
    settings: Settings = field(default_factory=Settings)
    autocast: AutocastState = field(default_factory=capture_autocast)
    query: Any = None
    step_weights: tuple[float, ...] = ()
    first_step: int = 0

    def with_settings(self, **changes: Any) -> InnerProblem:
        """The same problem with some settings resolved further (``Settings``' docstring
        lists the three places that do)."""
        return dataclasses.replace(self, settings=dataclasses.replace(self.settings, **changes))

    def weight(self, t: int) -> float:
        """The multi-step loss's weight of the query loss after step ``t`` (0 without one)."""
        return self.step_weights[t] if self.step_weights else 0.0

    @property
    def steps(self) -> int:
        """N, the number of inner steps."""
        return len(self.batches)

    @functools.cached_property
    def rng_devices(self) -> tuple[torch.device, ...]:
        """The devices whose generators a step may draw from besides the CPU's (dropout),
        which a recomputation replays: where the batches go (``device``) and where the
        model's parameters and buffers are (``effmaml.replay.rng_devices``)."""
        tensors = itertools.chain(self.model.parameters(), self.model.buffers())
        return rng_devices([self.device, *(t.device for t in tensors)])

    def batch(self, t: int) -> Any:
        """Batch ``t`` on the device."""
        return move_to(self.batches[t], self.device)


def callback_stops(answer: object, t: int) -> bool:
    """Whether a callback's ``answer`` after step ``t`` says to stop: True, or a bool
    (a one-element boolean tensor such as ``loss < 0.3``, NumPy's bool); None and False go
    on.

    Raises:
        TypeError: any other answer (a number, a string, a float tensor), which would
            otherwise be read one way or the other silently.
    """
    if answer is None or answer is False or answer is True:
        return bool(answer)
    if isinstance(answer, Tensor) and answer.dtype == torch.bool and answer.numel() == 1:
        return bool(answer)
    if type(answer).__name__ == "bool_":  # NumPy's
        return bool(answer)
    raise TypeError(
        f"callback(t, loss) returned {answer!r} after inner step {t}: return True to stop "
        f"there, and None or False to go on (a one-element boolean tensor such as "
        f"loss < 0.3 counts as a bool)"
    )


@dataclass
class Runtime:
    """What one ``adapt`` call counts as it runs, and the front's caches; one object per
    call, passed explicitly. What an execution records about its steps is its
    ``Records``, a value it returns.

    Attributes:
        step_evals: inner-step evaluations so far (forward and recomputations).
        probes: the front's cache of probe results by batch signature
            (``effmaml.probe.probe``); shared by the calls of one ``MAML``.
        host_peak_bytes: the most pinned host memory the run's store held (``offload`` on
            CUDA), updated after the forward pass and after backward.
        captured: id -> ``(kind, name)`` of the model's tensors that the step's module
            replaces (its adapted parameters, its buffers), set by the front: read by
            ``loss_fn`` outside the module it is given, they are refused
            (``effmaml.outer.CapturedModelError``); None: not checked.
        callback: ``callback(t, loss)`` of ``MAML.adapt``, for a strategy that calls it in
            its own loop (``watch``); None otherwise.
    """

    step_evals: int = 0
    probes: dict[Hashable, Any] = field(default_factory=dict)
    host_peak_bytes: int = 0
    captured: dict[int, tuple[str, str]] | None = None
    callback: Callable[[int, Tensor], Any] | None = None

    def watch(self, t: int, loss: Tensor) -> bool:
        """Hand step ``t``'s inner loss (detached) to the callback; whether it says to
        stop after this step (it returned True)."""
        if self.callback is None:
            return False
        return callback_stops(self.callback(t, loss.detach()), t)


@dataclass(frozen=True)
class Records:
    """What one execution records about its steps as they run: handed to every step
    beside the ``Runtime`` and returned in the ``Outcome`` (``effmaml.strategies``).

    Attributes:
        outer: the tensors the steps read that require grad (``effmaml.outer``), for a
            strategy that differentiates through the steps without keeping their graph;
            None: not looked for (``naive``, whose graph reaches them, and the probe).
        witness: for a recomputing run, each step's loss and batch in the forward pass,
            against which their recomputations are checked (Note [Checking that a
            recomputation saw the same batch]); None otherwise.
    """

    outer: OuterTensors | None = None
    witness: Witness | None = None

    def batch(self, problem: InnerProblem, t: int) -> Any:
        """Batch ``t`` on the device (the one the forward pass kept, if it holds an outer
        tensor: a recomputation reads the very tensors the forward read)."""
        if self.outer is None:
            return problem.batch(t)
        return self.outer.batch(t, lambda: problem.batch(t))

    def query(self, problem: InnerProblem) -> Any:
        """The multi-step loss's query batch on the device (kept likewise)."""
        if self.outer is None:
            return move_to(problem.query, problem.device)
        return self.outer.batch(QUERY, lambda: move_to(problem.query, problem.device))


NO_RECORDS = Records()
