"""What ``adapt`` accepts as its batches (a source indexed by the inner step) and model.

Recomputing strategies run step t again in backward and read batch t again, by its index;
so a source is anything with ``__len__`` and ``__getitem__`` (a list, a
``torch.utils.data.Dataset`` whose item t is step t's batch, a lazy class that builds batch
t on demand), or one batch reused for ``steps`` steps (``effmaml.RepeatedBatch``).
One-pass sources (iterators, generators, a ``DataLoader``, ``IterableDataset``) are read
as they come (``OnePass``) by the strategies that read each batch once, in order
(``naive``, ``first_order``), and refused by the others with what to pass instead.
Nothing here copies a batch; cost O(1).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence, Sized
from typing import Any

import torch
from torch import Tensor, nn

from .notices import warn
from .outer import grad_tensors

__all__ = [
    "OnePass",
    "RepeatedBatch",
    "as_source",
    "check_buffers",
    "is_one_batch",
    "move_to",
    "outer_bytes",
    "warn_uncollected_batchnorm",
]


class OnePass(Sequence[Any]):
    """A one-pass source (an iterator, a generator, a ``DataLoader``) presented as a
    sequence to a strategy that reads each batch once, in order (``Strategy.streams``):
    batch t is the source's t-th item, drawn when step t first asks for it. Only the last
    item drawn is kept (a step may read its batch again).

    Args:
        source: the iterable (iterated once, from where it stands).
        steps: N, the batches to draw.
    """

    def __init__(self, source: Iterable[Any], steps: int) -> None:
        self.source = source
        self.steps = steps
        self._it: Iterator[Any] | None = None
        self._t = -1
        self._item: Any = None

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, t: Any) -> Any:
        if not isinstance(t, int):
            raise TypeError(f"a one-pass source is read by step index (got {t!r})")
        if not 0 <= t < self.steps:
            raise IndexError(t)
        if t == self._t:
            return self._item
        if t != self._t + 1:
            raise RuntimeError(
                f"a one-pass source was asked for step {t}'s batch after step {self._t}'s: "
                f"it can only be read once, in order; pass an indexable source (a list, a "
                f"Dataset of per-step batches) to run steps again"
            )
        if self._it is None:
            self._it = iter(self.source)
        try:
            self._item = next(self._it)
        except StopIteration:
            raise ValueError(
                f"the one-pass source ended after {t} batches but adapt runs {self.steps} "
                f"steps; pass steps=N with N <= {t}, or a source with more batches"
            ) from None
        self._t = t
        return self._item


def as_source(
    batches: Sequence[Any] | Any, steps: int | None, one_pass: bool = False
) -> Sequence[Any]:
    """The per-step source ``adapt(batches, steps)`` runs on.

    Args:
        batches: a source (one batch per step) or, with ``steps``, one batch. A tensor,
            tuple, dict or string is always one batch.
        steps: the number of inner steps when ``batches`` is one batch; with a source, it
            must equal its length; with a one-pass source, the batches to draw from it
            (its first ``steps``).
        one_pass: whether the strategy takes one-pass sources (``Strategy.streams``):
            they are then read as they come (``OnePass``: the source's length, or
            ``steps``, batches), else refused.

    Returns:
        The source itself, a ``OnePass`` over it, or a ``effmaml.RepeatedBatch`` of the
        one batch.

    Raises:
        TypeError: ``steps`` not an int, a one-pass source where it is refused or without
            a length or ``steps``, or one batch without ``steps``.
        ValueError: ``steps < 1``, an empty source, or a source whose length is not
            ``steps`` (a one-pass source's: less than ``steps``).
    """
    one_batch = is_one_batch(batches)
    if steps is not None:
        if isinstance(steps, bool) or not isinstance(steps, int):
            raise TypeError(f"steps must be an int (got {steps!r})")
        if steps < 1:
            raise ValueError(f"steps must be >= 1 (got {steps})")
        if one_pass and not one_batch and _is_one_pass(batches):
            return _one_pass(batches, steps)
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
    if one_pass and not one_batch and _is_one_pass(batches):
        return _one_pass(batches, None)
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


def is_one_batch(batches: Any) -> bool:
    """Whether ``adapt`` reads ``batches`` as one batch (a tensor, tuple, dict or string),
    not as a source of one batch per step."""
    return isinstance(batches, (Tensor, tuple, Mapping, str))


def _indexable(source: Any) -> bool:
    """Whether ``source`` can be indexed by step: ``__len__`` and ``__getitem__``."""
    cls = type(source)
    return hasattr(cls, "__len__") and hasattr(cls, "__getitem__")


def _is_one_pass(source: Any) -> bool:
    """Whether ``source`` can only be iterated: iterators, generators, ``IterableDataset``,
    a ``DataLoader`` (sized but not indexable)."""
    from torch.utils.data import IterableDataset

    return isinstance(source, (Iterator, IterableDataset)) or (
        not _indexable(source)
        and isinstance(source, Iterable)
        and not isinstance(source, (Tensor, Mapping, str))
    )


def _one_pass(source: Iterable[Any], steps: int | None) -> OnePass:
    """``OnePass`` over ``source``: ``steps`` batches, or its length."""
    length = len(source) if isinstance(source, Sized) and not isinstance(source, Iterator) else None
    if steps is None:
        if length is None:
            raise TypeError(
                f"adapt() got a one-pass source without a length ({type(source).__name__}); "
                f"pass steps=N: its first N batches are the N inner steps"
            )
        if length == 0:
            raise ValueError("adapt() got an empty batch source; pass at least one batch")
        steps = length
    elif length is not None and length < steps:
        raise ValueError(
            f"got a one-pass source of {length} batches with steps={steps}; pass steps=N "
            f"with N <= {length}"
        )
    return OnePass(source, steps)


def _refuse_iterator(source: Any) -> None:
    """Raise for one-pass sources (iterators, generators, a DataLoader, IterableDataset)."""
    if _is_one_pass(source):
        raise TypeError(
            f"adapt() got a one-pass source ({type(source).__name__}): recomputing "
            f"strategies (checkpoint, revolve, offload, auto) and implicit read batch t "
            f"again, by its index, which an iterator cannot give. strategy='naive' and "
            f"'first_order' take it as it is (they read each batch once, in order); "
            f"otherwise pass something indexable: list(source) materialises it, or a class "
            f"with __len__ and __getitem__(t) that builds batch t on demand"
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


def warn_uncollected_batchnorm(model: nn.Module) -> None:
    """Warn when the inner loop would normalise with statistics nobody collected: a
    BatchNorm in eval mode whose running statistics are still their initial zeros and
    ones (``num_batches_tracked == 0``), as after ``model.eval()`` on a meta-trained
    model (``adapt`` never writes the model's statistics)."""
    fresh = [
        name
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._NormBase)
        and not m.training
        and m.track_running_stats
        and m.num_batches_tracked is not None
        and int(m.num_batches_tracked) == 0
        and m.running_mean is not None
        and m.running_var is not None
        and not m.running_mean.any()
        and bool((m.running_var == 1).all())
    ]
    if fresh:
        warn(
            f"BatchNorm {', '.join(repr(n) for n in fresh[:3])}"
            f"{f' and {len(fresh) - 3} more' if len(fresh) > 3 else ''} in eval mode with "
            f"running statistics never collected (mean 0, variance 1, num_batches_tracked "
            f"0): the inner loop normalises with them. adapt never collects the model's "
            f"statistics: adapt in train mode (batch statistics, as MAML evaluates), or "
            f"collect them first (docs/evaluation.md, 'BatchNorm at test time')"
        )


class RepeatedBatch(Sequence):
    """One batch presented as a sequence of ``steps`` identical batches
    (``adapt(batch, steps=N)`` builds one).

    Args:
        batch: the batch every step gets.
        steps: N."""

    def __init__(self, batch: Any, steps: int) -> None:
        self.batch = batch
        self.steps = steps

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, t: Any) -> Any:
        if isinstance(t, slice):
            return [self.batch] * len(range(*t.indices(self.steps)))
        if not -self.steps <= t < self.steps:
            raise IndexError(t)
        return self.batch


def move_to(batch: Any, device: torch.device) -> Any:
    """Move every tensor inside ``batch`` (tensors, tuples, lists, dicts) to ``device``."""
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(move_to(b, device) for b in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: move_to(v, device) for k, v in batch.items()}
    return batch
