"""Host offload: stored states in pinned host memory, copied on a side stream.

``HostStore`` is a ``effmaml.engine.Store`` for CUDA: ``put`` starts an
asynchronous device-to-host copy into pinned memory on a side stream and lets the device
tensor go; ``fetch`` starts the copy back (the schedule calls it one state ahead, so the
copy overlaps the current pullback); ``get`` makes the compute stream wait for it. Device
memory then holds the working state, the one being prefetched and one step's graph,
whatever N is. On a CPU it is the plain ``Store``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .engine import Handle, Resident, Store
from .state import InnerState

__all__ = ["HostStore", "make_store", "pinned_high_water"]

_PINNED = {"held": 0, "high": 0}  # pinned bytes held by HostStores in this process


@dataclass
class _HostHandle(Handle):
    state: InnerState | None  # in pinned host memory; None once brought back
    nbytes: int
    fetched: tuple[InnerState, torch.cuda.Event] | None = None


class HostStore(Store):
    """Stored states in pinned host memory (CUDA only; see the module docstring).

    Memory: the stored states' bytes in pinned host memory (``peak_host_bytes``); on the
    device, the state being brought back.

    Args:
        device: the CUDA device the steps run on.

    Attributes:
        held_bytes: host bytes held now; peak_host_bytes: the most held at once.
    """

    off_device = True

    def __init__(self, device: torch.device) -> None:
        if device.type != "cuda":
            raise ValueError(f"HostStore needs a CUDA device (got {device}); use Store()")
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self.held_bytes = 0
        self.peak_host_bytes = 0

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
        nbytes = state.nbytes()
        self.held_bytes += nbytes
        self.peak_host_bytes = max(self.peak_host_bytes, self.held_bytes)
        _PINNED["held"] += nbytes
        _PINNED["high"] = max(_PINNED["high"], _PINNED["held"])
        handle = _HostHandle(host, nbytes)
        # released with the handle: pinned blocks go back to torch's host cache
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
        self.held_bytes -= handle.nbytes
        _PINNED["held"] -= handle.nbytes
        handle.state = None
        return state

    def host_bytes(self) -> int:
        return self.peak_host_bytes


def make_store(device: torch.device) -> Store:
    """``HostStore`` on CUDA, the device store elsewhere."""
    return HostStore(device) if device.type == "cuda" else Store()


def pinned_high_water() -> int:
    """The most pinned bytes HostStores of this process have held at once.

    torch's caching host allocator keeps freed pinned blocks, so only an offload that needs
    more than this pays for page-locking new memory (Note [The time model]).
    """
    return _PINNED["high"]
