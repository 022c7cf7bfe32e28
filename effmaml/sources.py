"""What ``adapt`` accepts as its batches (a source indexed by the inner step) and model.

Recomputing strategies run step t again in backward and read batch t again, by its index;
so a source is anything with ``__len__`` and ``__getitem__`` (a list, a
``torch.utils.data.Dataset`` whose item t is step t's batch, a lazy class that builds batch
t on demand), or one batch reused for ``steps`` steps (``effmaml.RepeatedBatch``).
One-pass sources (iterators, generators, ``IterableDataset``) are refused with what to
pass instead. Nothing here copies a batch; cost O(1).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from .outer import grad_tensors
from .step import RepeatedBatch

__all__ = ["as_source", "check_buffers", "outer_bytes"]


def as_source(batches: Sequence[Any] | Any, steps: int | None) -> Sequence[Any]:
    """The per-step source ``adapt(batches, steps)`` runs on.

    Args:
        batches: a source (one batch per step) or, with ``steps``, one batch. A tensor,
            tuple, dict or string is always one batch.
        steps: the number of inner steps when ``batches`` is one batch; with a source, it
            must equal its length.

    Returns:
        The source itself, or a ``effmaml.RepeatedBatch`` of the one batch.

    Raises:
        TypeError: ``steps`` not an int, a one-pass source, or one batch without ``steps``.
        ValueError: ``steps < 1``, an empty source, or a source whose length is not
            ``steps``.
    """
    one_batch = isinstance(batches, (Tensor, tuple, Mapping, str))
    if steps is not None:
        if isinstance(steps, bool) or not isinstance(steps, int):
            raise TypeError(f"steps must be an int (got {steps!r})")
        if steps < 1:
            raise ValueError(f"steps must be >= 1 (got {steps})")
        if one_batch or not _indexable(batches):
            _refuse_iterator(batches)
            return RepeatedBatch(batches, steps)
        if len(batches) != steps:
            raise ValueError(
                f"got a source of {len(batches)} batches with steps={steps}; pass the "
                f"source alone, adapt(batches), for one batch per step, or one batch "
                f"(a tensor, tuple or dict) with steps={steps} to reuse it"
            )
        return batches
    _refuse_iterator(batches)
    if one_batch or not _indexable(batches):
        raise TypeError(
            f"adapt() takes a batch source, one batch per step: anything with __len__ and "
            f"__getitem__ (a list, a torch Dataset of per-step batches, a lazy class) (got "
            f"{type(batches).__name__}); to reuse one batch, call adapt(batch, steps=N)"
        )
    if len(batches) == 0:
        raise ValueError(
            "adapt() got an empty batch source; pass at least one batch, or one batch with steps=N"
        )
    return batches


def _indexable(source: Any) -> bool:
    """Whether ``source`` can be indexed by step: ``__len__`` and ``__getitem__``."""
    cls = type(source)
    return hasattr(cls, "__len__") and hasattr(cls, "__getitem__")


def _refuse_iterator(source: Any) -> None:
    """Raise for one-pass sources (iterators, generators, IterableDataset)."""
    from torch.utils.data import IterableDataset

    if isinstance(source, (Iterator, IterableDataset)) or (
        not _indexable(source)
        and isinstance(source, Iterable)
        and not isinstance(source, (Tensor, Mapping, str))
    ):
        raise TypeError(
            f"adapt() got a one-pass source ({type(source).__name__}): recomputing "
            f"strategies (checkpoint, revolve, offload, auto) run inner steps again in "
            f"backward and need batch t again by its index, which an iterator cannot give. "
            f"Pass something indexable: list(source) materialises it (fine for 'naive' and "
            f"'first_order', which never re-read it), or a class with __len__ and "
            f"__getitem__(t) that builds batch t on demand"
        )


def outer_bytes(batches: Sequence[Any], query: Any = None) -> int:
    """Bytes of the distinct tensors that require grad in an in-memory source (a list or
    tuple of batches, or one batch reused) and in the query: the gradient buffers a
    recomputing schedule returns for them (``effmaml.outer``). A lazy source (a Dataset)
    is not read here, and counts 0.

    Cost: a walk of every batch's structure; no tensor is read.
    """
    if isinstance(batches, RepeatedBatch):
        items: list[Any] = [batches.batch]
    elif isinstance(batches, (list, tuple)):
        items = list(batches)
    else:
        items = []
    seen: dict[int, int] = {}
    for batch in [*items, query]:
        for _, t in grad_tensors(batch):
            seen.setdefault(id(t), t.numel() * t.element_size())
    return sum(seen.values())


def check_buffers(model: nn.Module) -> None:
    """Refuse buffers that require grad, before any work.

    Raises:
        ValueError: names them and says what to do instead.
    """
    learned = [n for n, b in model.named_buffers() if b.requires_grad]
    if learned:
        raise ValueError(
            f"buffers {learned} of the model require grad; effmaml carries buffers through "
            f"the inner loop as state it does not differentiate (BatchNorm statistics), so "
            f"their meta-gradient would be lost under every strategy. Register them as "
            f"parameters (module.register_parameter): they then adapt, or stay fixed with "
            f"params= and receive their meta-gradient; or detach them"
        )
