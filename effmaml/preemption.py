"""Pre-emption: finish the iteration, checkpoint, leave; every rank at the same iteration.

SLURM and cloud schedulers send SIGTERM (or SIGUSR1) some time before they kill a job.
``Preemption`` catches them while ``effmaml.MetaTrainer.train`` runs, and after
each iteration says whether any rank received one, so that every rank stops after the same
iteration and the checkpoint is one a resumed run continues bitwise.

Cost: one all-reduce of one number per iteration under torchrun, on the gradients' device
(NCCL reduces only device tensors), and none without stop handlers.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist

from .distributed import all_reduce_sum, world

__all__ = ["STOP_SIGNALS", "Preemption"]

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # what SLURM and cloud pre-emption send


class Preemption:
    """Stop signals caught during a run, and the decision all ranks take on them.

    Args:
        signals: the signals to catch (empty: none).
        device: where the stop flag is reduced: the gradients' device.
        group: the process group (default: the world).
    """

    def __init__(
        self,
        signals: Sequence[int],
        device: torch.device,
        group: dist.ProcessGroup | None = None,
    ) -> None:
        self.signals = tuple(signals)
        self.device = device
        self.group = group
        self.received: int | None = None
        self.watching = False

    @contextlib.contextmanager
    def catching(self) -> Iterator[None]:
        """Catch the signals while the body runs (main thread only: Python delivers signals
        there), then restore the handlers they replaced."""
        self.watching = bool(self.signals) and (
            threading.current_thread() is threading.main_thread()
        )
        previous: dict[int, Any] = {}
        if self.watching:

            def stop(signum: int, frame: Any) -> None:
                self.received = signum

            previous = {sig: signal.signal(sig, stop) for sig in self.signals}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.watching = False

    def flag(self) -> torch.Tensor:
        """1 where a stop signal arrived here, else 0, on ``device``."""
        return torch.full((1,), 0.0 if self.received is None else 1.0, device=self.device)

    def stopping(self) -> bool:
        """Whether a stop signal arrived here or, under torchrun, on any rank.

        Without handlers (no signals, or off the main thread) nothing can arrive and no
        collective runs; every rank decides alike, since the same code installs them on
        every rank.
        """
        if not self.watching:
            return False
        flag = self.flag()
        if world(self.group)[1] > 1:
            all_reduce_sum([flag], self.group)
        return bool(flag.item() > 0)

    def name(self) -> str:
        """The signal received here, e.g. ``"SIGTERM"`` (or ``"a stop signal"``: another
        rank's)."""
        return signal.Signals(self.received).name if self.received is not None else "a stop signal"
