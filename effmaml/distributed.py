"""Task parallelism over ``torch.distributed``: split a meta-batch, average meta-gradients.

Each process (rank) adapts on its own slice of the meta-batch and sums its tasks'
meta-gradients; one coalesced all-reduce of the flattened gradients (and the loss sum)
then gives every rank the same total, which the trainer divides by the meta-batch size.
The split does not have to be even: the mean over all tasks is the same whatever each
rank holds.

Why not DistributedDataParallel: its gradient hooks assume one backward per forward and
do not support double backward through the inner loop (pytorch#63929); averaging after
the meta-gradient is computed sidesteps them and costs one all-reduce per outer step.

Launch with ``torchrun --nproc-per-node P script.py`` (or anything that sets ``RANK``,
``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``) and call ``init_from_env`` first.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["all_reduce_sum", "init_from_env", "rank_slice", "world"]


def world(group: dist.ProcessGroup | None = None) -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` when torch.distributed is not initialised.

    Args:
        group: the process group (default: the world).
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


def init_from_env(device: torch.device | str | None = None) -> tuple[int, int]:
    """Initialise the default process group from the launcher's environment, if any.

    Picks NCCL for a CUDA device (and sets this rank's device from ``LOCAL_RANK``), gloo
    otherwise. Without ``WORLD_SIZE`` in the environment it does nothing.

    Args:
        device: the device this process trains on (its type picks the backend).

    Returns:
        ``(rank, world_size)``.
    """
    if "WORLD_SIZE" not in os.environ or (dist.is_available() and dist.is_initialized()):
        return world()
    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    return world()


def rank_slice(n: int, rank: int, world_size: int) -> range:
    """The contiguous, deterministic share of ``n`` tasks held by ``rank``.

    The first ``n % world_size`` ranks hold one task more.

    Args:
        n: the meta-batch size.
        rank: this rank.
        world_size: the number of ranks.

    Returns:
        The task indices of ``rank``.

    Raises:
        ValueError: fewer tasks than ranks (a rank would sit idle).
    """
    if n < world_size:
        raise ValueError(
            f"meta_batch={n} is smaller than the world size {world_size}: every process needs "
            f"at least one task; use meta_batch >= {world_size} (a multiple of it balances "
            f"the work)"
        )
    q, r = divmod(n, world_size)
    start = rank * q + min(rank, r)
    return range(start, start + q + (1 if rank < r else 0))


def all_reduce_sum(tensors: Sequence[Tensor], group: dist.ProcessGroup | None = None) -> None:
    """Sum ``tensors`` over all ranks in place, with one coalesced all-reduce.

    No-op in a single process. Memory: one flat copy of the tensors.

    Args:
        tensors: same dtype and device, summed in place.
        group: the process group (default: the world).
    """
    if world(group)[1] == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    i = 0
    for t in tensors:
        t.copy_(flat[i : i + t.numel()].view_as(t))
        i += t.numel()
