"""The inner state and the constants, and the one way to flatten them.

An inner step maps ``(InnerState, Consts) -> InnerState``. Both are dataclasses whose every
field is a group ``name -> Tensor`` (``Tree``); a group declares whether it is
differentiable (buffers are not). Everything that must see a state as a flat list of
tensors (the engine's custom autograd Function, the host store of ``offload``, the probe's
pullback) goes through ``Tree.spec``, ``Spec.unflatten`` and ``Tree.map``, so a
new group is one line in the dataclass that holds it.

Cost: flattening and unflattening build lists and dicts of references; no tensor is copied.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from torch import Tensor

from .memory import nbytes

__all__ = ["Consts", "InnerState", "Spec", "Tree", "group"]

_DIFFERENTIABLE = "differentiable"

T = TypeVar("T", bound="Tree")


def group(differentiable: bool = True) -> Any:
    """A field of a ``Tree``: a dict name -> tensor, empty by default.

    Args:
        differentiable: whether gradients flow through the group (buffers: False). A
            non-differentiable group is carried through the engine and marked
            non-differentiable on its outputs.
    """
    return dataclasses.field(default_factory=dict, metadata={_DIFFERENTIABLE: differentiable})


class Tree:
    """A dataclass of tensor groups (see ``group``), flattened in field order."""

    @classmethod
    def groups(cls) -> tuple[tuple[str, bool], ...]:
        """``(field name, differentiable)`` for every group, in flattening order."""
        return tuple(
            (f.name, bool(f.metadata.get(_DIFFERENTIABLE, True)))
            for f in dataclasses.fields(cls)  # type: ignore[arg-type]
        )

    def group(self, name: str) -> dict[str, Tensor]:
        """The group called ``name``."""
        value: dict[str, Tensor] = getattr(self, name)
        return value

    def spec(self: T) -> Spec[T]:
        """The structure (type, groups, names), without the tensors."""
        return Spec(
            type(self),
            tuple((name, tuple(self.group(name)), diff) for name, diff in self.groups()),
        )

    def flat(self, differentiable_only: bool = False) -> list[Tensor]:
        """Every tensor in field order (only the differentiable groups' when asked)."""
        return [
            t
            for name, diff in self.groups()
            if diff or not differentiable_only
            for t in self.group(name).values()
        ]

    def map(self: T, fn: Callable[[Tensor, bool], Tensor]) -> T:
        """The same structure with ``fn(tensor, differentiable)`` applied to every tensor."""
        return type(self)(
            **{
                name: {k: fn(v, diff) for k, v in self.group(name).items()}
                for name, diff in self.groups()
            }
        )

    def nbytes(self) -> int:
        """Bytes held by the tensors (``P`` in the memory formulas, for a state)."""
        return nbytes(self.flat())


@dataclass(frozen=True)
class Spec(Generic[T]):
    """The structure of a ``Tree``: enough to rebuild it from a flat list.

    Attributes:
        cls: the dataclass.
        layout: ``(field, names, differentiable)`` per group, in flattening order.
    """

    cls: type[T]
    layout: tuple[tuple[str, tuple[str, ...], bool], ...]

    @property
    def size(self) -> int:
        """How many tensors the flat list holds."""
        return sum(len(names) for _, names, _ in self.layout)

    def differentiable(self) -> list[bool]:
        """Per flat position, whether its group is differentiable."""
        return [diff for _, names, diff in self.layout for _ in names]

    def unflatten(self, flat: Sequence[Any], differentiable_only: bool = False) -> T:
        """Rebuild the tree from ``flat`` (as ``Tree.flat`` orders it).

        With ``differentiable_only``, ``flat`` holds the differentiable groups alone and the
        others come back empty (a cotangent).

        Raises:
            ValueError: ``flat`` does not have the spec's length.
        """
        want = sum(len(n) for _, n, d in self.layout if d or not differentiable_only)
        if len(flat) != want:
            raise ValueError(f"{self.cls.__name__} needs {want} tensors, got {len(flat)}")
        it = iter(flat)
        groups = {
            name: ({k: next(it) for k in names} if diff or not differentiable_only else {})
            for name, names, diff in self.layout
        }
        return self.cls(**groups)

    def split(self, flat: Sequence[Any]) -> tuple[T, Sequence[Any]]:
        """The tree from the head of ``flat``, and what follows it."""
        return self.unflatten(flat[: self.size]), flat[self.size :]

    def full(self, cotangent: T) -> list[Any]:
        """A cotangent's tensors at every flat position, ``None`` for non-differentiable
        groups (what a custom Function's backward returns for its inputs)."""
        return [
            cotangent.group(name)[k] if diff else None
            for name, names, diff in self.layout
            for k in names
        ]


@dataclass
class InnerState(Tree):
    """What changes from one inner step to the next.

    Attributes:
        params: adapted parameters φ_t, name -> tensor.
        opt: inner-optimizer state (momentum, moments), flat name -> tensor.
        buffers: module buffers (BatchNorm running statistics), name -> tensor. Never
            differentiable.
    """

    params: dict[str, Tensor] = group()
    opt: dict[str, Tensor] = group()
    buffers: dict[str, Tensor] = group(differentiable=False)

    def detached(self, requires_grad: bool) -> InnerState:
        """A copy sharing storage, cut from any graph; the differentiable groups'
        floating-point tensors are leaves that require grad when asked."""

        def cut(t: Tensor, diff: bool) -> Tensor:
            t = t.detach()
            if requires_grad and diff and t.is_floating_point():
                t.requires_grad_(True)
            return t

        return self.map(cut)


@dataclass
class Consts(Tree):
    """Tensors every step reads but does not change; they receive accumulated gradients.

    Attributes:
        fixed: parameters that are not adapted (ANIL heads/bodies), name -> tensor.
        hyper: tensor hyper-parameters of the inner optimizer (learned learning rates).
        theta0: the initial adapted parameters θ₀, used by the proximal term (empty when
            ``prox == 0``).
    """

    fixed: dict[str, Tensor] = group()
    hyper: dict[str, Tensor] = group()
    theta0: dict[str, Tensor] = group()

    def detached(self) -> Consts:
        """The same constants cut from any graph (for steps that keep no graph)."""
        return self.map(lambda t, _: t.detach())
