"""What a recomputation must replay, and the check that it did.

Recomputing strategies run inner steps again in the backward pass. Each recomputed step
must see exactly what the original one saw:

* the RNG (dropout): ``RngState``, the CPU's generator and every device's that the model
  and the batches are on, captured before a step, replayed by ``replay_rng``;
* autocast (AMP): ``AutocastState``, captured when ``adapt`` starts and re-entered by
  every inner step (``replay_autocast``), so a step recomputed in backward, outside
  the user's ``torch.autocast`` block, runs in the same precision;
* the same batch for the same index: the engine cannot make a batch source deterministic,
  but a ``Witness`` notices one that is not, by comparing every recomputed inner loss
  and a fingerprint of every re-indexed batch with what the forward pass recorded.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "AutocastState",
    "NondeterministicBatchError",
    "RngState",
    "Witness",
    "batch_fingerprint",
    "capture_autocast",
    "capture_rng",
    "forked_rng",
    "loss_rtol",
    "replay_autocast",
    "replay_rng",
    "rng_devices",
]


# -- RNG -----------------------------------------------------------------------------------
@dataclass
class RngState:
    """The global RNG state at one point of the unroll: the CPU generator's and, for each
    accelerator device a step runs on, that device's generator's.

    Attributes:
        cpu: the CPU generator's state.
        devices: ``(device, state)`` for each device of ``rng_devices``.
    """

    cpu: Tensor
    devices: tuple[tuple[torch.device, Tensor], ...] = ()


def rng_devices(devices: Iterable[torch.device]) -> tuple[torch.device, ...]:
    """The devices among ``devices`` whose generator a step may draw from besides the CPU's,
    once each, in order (``torch.utils.checkpoint.get_device_states`` collects the same:
    every device but the CPU and ``meta``)."""
    return tuple(dict.fromkeys(d for d in devices if d.type not in ("cpu", "meta")))


def _generator_module(device: torch.device) -> Any:
    """The module whose ``get_rng_state(device)`` / ``set_rng_state(state, device)`` read and
    write ``device``'s default generator (``torch.cuda`` for CUDA)."""
    module = getattr(torch, device.type, None)
    if module is None or not hasattr(module, "get_rng_state"):
        raise RuntimeError(
            f"cannot save the random number generator of device {device}: torch.{device.type} "
            f"has no get_rng_state; dropout on it could not be replayed by a recomputation"
        )
    return module


def capture_rng(devices: Iterable[torch.device]) -> RngState:
    """Snapshot the RNG that a step on ``devices`` draws from (dropout): the CPU's, and each
    of ``rng_devices(devices)``'s."""
    states = tuple((d, _generator_module(d).get_rng_state(d)) for d in rng_devices(devices))
    return RngState(torch.get_rng_state(), states)


def _restore(state: RngState) -> None:
    torch.set_rng_state(state.cpu)
    for device, s in state.devices:
        _generator_module(device).set_rng_state(s, device)


@contextlib.contextmanager
def forked_rng(devices: Iterable[torch.device]) -> Iterator[None]:
    """The body may draw from the CPU's generator and those of ``devices``; afterwards
    they are as they were (``torch.random.fork_rng`` over ``rng_devices(devices)``)."""
    saved = capture_rng(devices)
    try:
        yield
    finally:
        _restore(saved)


@contextlib.contextmanager
def replay_rng(state: RngState) -> Iterator[None]:
    """Run the body from RNG ``state`` and restore the global RNG afterwards."""
    # Note [Dropout under recomputation]
    # A recomputed step must draw the same dropout masks as the original one, and the
    # backward pass must not disturb the RNG that the user's code sees after it. We save
    # the global state around the body (every generator ``state`` holds) and jump to the
    # state captured when the step first ran. The generators are those of every device the
    # model's tensors are on and the batches go to (InnerProblem.rng_devices): a model
    # split over two GPUs draws dropout on both.
    with forked_rng(d for d, _ in state.devices):
        _restore(state)
        yield


# -- autocast ------------------------------------------------------------------------------
_AMP_DEVICES = ("cpu", "cuda")


@dataclass(frozen=True)
class AutocastState:
    """Autocast settings in effect when ``adapt`` started.

    Attributes:
        enabled: per device type (``"cpu"``, ``"cuda"``), whether autocast was on.
        dtype: per device type, the autocast dtype.
        cache: whether autocast's weight-cast cache was enabled.
    """

    enabled: tuple[tuple[str, bool], ...]
    dtype: tuple[tuple[str, torch.dtype], ...]
    cache: bool

    def on(self, device_type: str) -> torch.dtype | None:
        """The autocast dtype for ``device_type`` if autocast is on there, else None."""
        if dict(self.enabled).get(device_type, False):
            return dict(self.dtype)[device_type]
        return None


def capture_autocast() -> AutocastState:
    """The autocast state now (CPU and CUDA, dtype, cache flag)."""
    return AutocastState(
        tuple((d, torch.is_autocast_enabled(d)) for d in _AMP_DEVICES),
        tuple((d, torch.get_autocast_dtype(d)) for d in _AMP_DEVICES),
        torch.is_autocast_cache_enabled(),
    )


@contextlib.contextmanager
def replay_autocast(state: AutocastState) -> Iterator[None]:
    """Run the body under ``state``'s autocast settings, whatever is in effect outside."""
    # Note [Autocast under recomputation]
    # The usual AMP pattern runs adapt() and the query loss inside torch.autocast and calls
    # backward() outside it. A recomputing strategy runs inner steps again inside that
    # backward, where autocast is off: without this, they would run in float32 and pull
    # back a different graph than the forward built (rel. L2 0.2-0.3 on ResNet18 in
    # bfloat16). Like torch.utils.checkpoint, we record the state when adapt starts and
    # re-enter it around every inner step (a no-op in the forward pass). The pullback's own
    # backward call runs outside, as the user's backward does under naive.
    with contextlib.ExitStack() as stack:
        for device, enabled in state.enabled:
            if device == "cuda" and not enabled and not torch.cuda.is_available():
                continue
            stack.enter_context(
                torch.autocast(
                    device,
                    dtype=dict(state.dtype)[device],
                    enabled=enabled,
                    cache_enabled=state.cache,
                )
            )
        yield


# -- the same batch for the same index ---------------------------------------------------------
class NondeterministicBatchError(RuntimeError):
    """A recomputed inner step did not see what the forward pass saw."""


def loss_rtol(loss: Tensor, autocast: AutocastState) -> float:
    """The relative tolerance for a recomputed loss against the recorded one."""
    # Note [How far a recomputed loss may drift]
    # The same step on the same batch from the same stored state gives the same loss on a
    # CPU. On a GPU, kernels with atomics (convolution weight gradients, scatter) may sum in
    # another order: the loss at the first step of a recomputed range is bitwise equal, the
    # following ones differ by the rounding those gradients carry into the parameters, far
    # below 1e-4 relative in float32 and below one bfloat16 ulp (~4e-3) in 16-bit compute.
    # A different batch moves the loss by far more on real data. The tolerance is relative
    # to the largest recorded loss (so that a loss near zero is not judged by its own size).
    low = autocast.on(loss.device.type)
    if loss.dtype in (torch.float16, torch.bfloat16) or low in (torch.float16, torch.bfloat16):
        return 2e-2
    if loss.dtype == torch.float64:
        return 1e-9
    return 1e-4


def batch_fingerprint(batch: Any, device: torch.device) -> Tensor:
    """``(Σx, Σ|x|)`` over every tensor in ``batch``, in float64, on ``device`` (no sync)."""
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for i, x in enumerate(_tensors(batch)):
        w = float(i + 1)  # the same values in two tensors must not cancel out
        if x.is_complex():
            x = torch.view_as_real(x)
        elif not x.is_floating_point():
            x = x.to(torch.float64)  # labels, masks: small
        s = torch.stack([x.sum(dtype=torch.float64), x.abs().sum(dtype=torch.float64)])
        total = total + w * s.to(device)
    return total


def _tensors(batch: Any) -> Iterator[Tensor]:
    if isinstance(batch, Tensor):
        yield batch
    elif isinstance(batch, (list, tuple)):
        for b in batch:
            yield from _tensors(b)
    elif isinstance(batch, dict):
        for k in batch:
            yield from _tensors(batch[k])


class Witness:
    """Records what each inner step saw in the forward pass; checks every recomputation.

    The first time step ``t`` runs, its loss and its batch's fingerprint are recorded;
    later runs of ``t`` (recomputations in backward) are compared with them on the device,
    with no host synchronisation; ``verify`` looks at the result once (one sync) and
    raises ``NondeterministicBatchError`` naming the first step that differed.

    Memory: two scalars per step and a few scalars of running state.

    Args:
        steps: N.
        device: where the comparisons run.
        autocast: the autocast state of the run (sets the loss tolerance).
    """

    def __init__(self, steps: int, device: torch.device, autocast: AutocastState) -> None:
        self.device = device
        self.autocast = autocast
        self.losses: list[Tensor | None] = [None] * steps
        self.prints: list[Tensor | None] = [None] * steps
        self.bad_step = torch.full((), -1, dtype=torch.long, device=device)
        self.bad_what = torch.zeros((), dtype=torch.long, device=device)  # 1 loss, 2 batch
        self.bad_values = torch.zeros(2, dtype=torch.float64, device=device)
        self.checks = 0
        self._scale: Tensor | None = None

    def batch(self, t: int, batch: Any) -> None:
        """See batch ``t`` (record it the first time, compare it afterwards)."""
        with torch.no_grad():  # a batch of learned data must not grow a graph per step
            fp = batch_fingerprint(batch, self.device)
        ref = self.prints[t]
        if ref is None:
            self.prints[t] = fp
            return
        # the same data gives the same sums up to float64 rounding of the reduction order
        tol = 1e-9 * ref[1].abs() + 1e-300
        self._flag(t, (fp[0] - ref[0]).abs() > tol, 2, torch.stack([ref[0], fp[0]]))

    def loss(self, t: int, loss: Tensor) -> None:
        """See step ``t``'s inner loss (record it the first time, compare it afterwards)."""
        value = loss.detach().to(torch.float64)
        ref = self.losses[t]
        if ref is None:
            self.losses[t] = value
            return
        if self._scale is None:
            recorded = torch.stack([x for x in self.losses if x is not None])
            self._scale = recorded.abs().max()
        bad = (value - ref).abs() > loss_rtol(loss, self.autocast) * self._scale
        bad = bad | ~torch.isfinite(value)
        self._flag(t, bad, 1, torch.stack([ref, value]))

    def _flag(self, t: int, bad: Tensor, what: int, values: Tensor) -> None:
        self.checks += 1
        first = bad & (self.bad_step < 0)
        self.bad_step = torch.where(first, torch.full_like(self.bad_step, t), self.bad_step)
        self.bad_what = torch.where(first, torch.full_like(self.bad_what, what), self.bad_what)
        self.bad_values = torch.where(first, values, self.bad_values)

    def verify(self) -> None:
        """Raise if any recomputation differed (one host sync).

        Raises:
            NondeterministicBatchError: names the step, both values and the likely causes.
        """
        if not self.checks:
            return
        t = int(self.bad_step)
        if t < 0:
            return
        recorded, again = (float(v) for v in self.bad_values)
        if int(self.bad_what) == 1:
            what = (
                f"inner loss at step {t} was {recorded!r} in the forward pass and {again!r} "
                f"when recomputed in backward"
            )
        else:
            what = (
                f"batch of step {t} is not the one the forward pass saw (sum of its values "
                f"{recorded!r} then, {again!r} when recomputed in backward)"
            )
        raise NondeterministicBatchError(
            f"The {what}: the meta-gradient would be wrong. "
            f"Recomputing strategies index the batch source again and need the same batch "
            f"for the same index. Likely causes: random augmentation drawn outside torch's "
            f"RNG (numpy, random) or in a DataLoader worker; a shuffling sampler or a "
            f"source that returns the next batch rather than batch t; data that changed on "
            f"disk; a loss_fn or inner optimizer that changed a tensor in place through "
            f"`.data` or under no_grad (autograd cannot see it, so the recomputation starts "
            f"from another value: return new tensors instead). Fix the source (seed its "
            f"randomness from the index), materialise the batches in a list, or use "
            f"strategy='naive', which does not recompute"
        )
