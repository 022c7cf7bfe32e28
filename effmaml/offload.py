"""Host offload: stored states in pinned host memory, copied on a side stream.

``HostStore`` is a ``effmaml.engine.Store`` for CUDA: ``put`` starts an
asynchronous device-to-host copy into pinned memory on a side stream and lets the device
tensor go; ``fetch`` starts the copy back (the schedule calls it one state ahead, so the
copy overlaps the current pullback); ``get`` makes the compute stream wait for it. Device
memory then holds the working state, the one being prefetched and one step's graph,
whatever N is. On a CPU it is the plain ``Store``.

Pinned bytes are accounted per store (``PinnedLedger``): each stored state's bytes count
from ``put`` until ``get`` brings it back or its handle is freed (an ``adapt`` whose
backward never runs, an exception), so the process's high-water mark, which ``offload``'s
time prediction reads (``pinned_high_water``), counts only memory that was pinned at once.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .engine import Handle, Resident, Store
from .state import InnerState

__all__ = ["HostStore", "PinnedLedger", "make_store", "pinned_held", "pinned_high_water"]


class _Process:
    """Pinned bytes held by every live ledger of this process, and the most at once."""

    held = 0
    high = 0


class PinnedLedger:
    """The pinned host bytes one store holds: each charge counts until it is released.

    A charge is released by calling what ``charge`` returns (the state came back) or, at
    the latest, when its owner (the handle) is freed: with the store when ``adapt``'s
    result is dropped without backward, or with the frames of an exception.

    Attributes:
        held: bytes held now; peak: the most held at once.
    """

    def __init__(self) -> None:
        self.held = 0
        self.peak = 0

    def charge(self, owner: object, nbytes: int) -> Callable[[], object]:
        """Count ``nbytes`` until the returned callable is called or ``owner`` is freed."""
        self.held += nbytes
        self.peak = max(self.peak, self.held)
        _Process.held += nbytes
        _Process.high = max(_Process.high, _Process.held)
        return weakref.finalize(owner, self._release, nbytes)

    def _release(self, nbytes: int) -> None:
        self.held -= nbytes
        _Process.held -= nbytes


@dataclass(eq=False)
class _HostHandle(Handle):
    state: InnerState | None  # in pinned host memory; None once brought back
    nbytes: int
    fetched: tuple[InnerState, torch.cuda.Event] | None = None
    release: Callable[[], object] = lambda: None  # ends the ledger's charge


class HostStore(Store):
    """Stored states in pinned host memory (CUDA only; see the module docstring).

    Memory: the stored states' bytes in pinned host memory (``ledger.peak``); on the
    device, the state being brought back.

    Args:
        device: the CUDA device the steps run on.

    Attributes:
        ledger: the pinned bytes this store holds now and held at most (``PinnedLedger``).
    """

    off_device = True

    def __init__(self, device: torch.device) -> None:
        if device.type != "cuda":
            raise ValueError(f"HostStore needs a CUDA device (got {device}); use Store()")
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self.ledger = PinnedLedger()

    def put(self, state: InnerState) -> Handle:
        main = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(main)  # the state is computed before it is copied

        def down(v: Tensor, _: bool) -> Tensor:
            h = torch.empty(v.shape, dtype=v.dtype, pin_memory=True)
            h.copy_(v.detach(), non_blocking=True)
            # Note [Freeing a tensor that a side stream still reads]
            # The caching allocator would reuse v's block as soon as Python drops it,
            # while the copy may still be running; record_stream defers the reuse.
            v.record_stream(self.stream)
            return h

        with torch.cuda.stream(self.stream):
            host = state.map(down)
        handle = _HostHandle(host, state.nbytes())
        # released by get, or with the handle: pinned blocks go back to torch's host cache
        handle.release = self.ledger.charge(handle, handle.nbytes)
        return handle

    def fetch(self, handle: Handle) -> None:
        if not isinstance(handle, _HostHandle) or handle.fetched is not None:
            return
        assert handle.state is not None, "a stored state is brought back once"
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            state = handle.state.map(lambda v, _: v.to(self.device, non_blocking=True))
            event = torch.cuda.Event()
            event.record(self.stream)
        handle.fetched = (state, event)

    def get(self, handle: Handle) -> InnerState:
        if isinstance(handle, Resident):
            return handle.state
        assert isinstance(handle, _HostHandle)
        self.fetch(handle)
        assert handle.fetched is not None
        state, event = handle.fetched
        main = torch.cuda.current_stream(self.device)
        main.wait_event(event)
        for t in state.flat():
            t.record_stream(main)  # allocated on the side stream, used on the main one
        handle.fetched = None
        handle.state = None
        handle.release()
        return state

    def host_bytes(self) -> int:
        return self.ledger.peak


def make_store(device: torch.device) -> Store:
    """``HostStore`` on CUDA, the device store elsewhere."""
    return HostStore(device) if device.type == "cuda" else Store()


def pinned_held() -> int:
    """The pinned bytes the live stores of this process hold now."""
    return _Process.held


def pinned_high_water() -> int:
    """The most pinned bytes the stores of this process have held at once.

    torch's caching host allocator keeps freed pinned blocks, so only an offload that needs
    more than this pays for page-locking new memory (Note [The time model]).
    """
    return _Process.high
