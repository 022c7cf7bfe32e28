"""Outer tensors: what an inner step reads that requires grad and that the front did not declare.

The meta-gradient is owed to every tensor that requires grad and that an inner step
reads: learned data in the batches (dataset distillation), per-example weights
(reweighting, hyper-cleaning), a temperature in ``loss_fn``'s closure, a second network's
parameters, a tensor attribute of the model. ``naive`` keeps the whole graph, so autograd
finds them. A recomputing schedule runs its backward inside one custom Function, and a
tensor that is not an input of that Function is cut there. This module finds them, so
that the engine can make them inputs:

* ``OuterTensors`` is one ``adapt`` call's record: the tensors found, where each was
  first read, which steps read which, and the batches that hold any (kept, *pinned*, so
  that a recomputation reads the very tensors the forward pass read).
* ``reading`` runs the user's code of one step (``loss_fn`` on the step's batch, the
  multi-step loss's query, and the inner optimizer's ``step``) under a ``TorchFunctionMode`` that
  sees every tensor handed to a torch function. Each one that requires grad and is
  neither the step's own state, a constant, nor a result of the step itself is outer: the
  forward pass records it, and every pass hands the function a stand-in instead (a leaf
  sharing its storage), so that backward can differentiate with respect to it. A tensor
  the forward pass did not read raises ``UnseenOuterTensorError`` in backward, and
  one read where the mode cannot see it ``OuterTensorError`` at step 0
  (``OuterTensors.check_graph``).
* The same mode refuses the slip of reading the model that ``loss_fn`` captured
  (``model(x)``, whose adapted parameters are θ) instead of the module it is given
  (``m(x)``, at φ_t): ``CapturedModelError``, at the first step, under every strategy.

Cost: for ``naive``, the mode on ``loss_fn``'s first step only (the captured model's
check). For the other strategies, one Python call per torch function that ``loss_fn`` and
the inner optimizer's ``step`` call (a Conv-4 step calls about 20), plus a walk of
each batch's structure; a batch holding a tensor that requires grad is kept until
backward (as ``naive``'s graph keeps it), and the Function returns one gradient buffer
per outer tensor: views of one leaf read by N steps add up to that leaf's size, N
separate leaves to N times theirs (``effmaml.sources.outer_bytes``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

from torch import Tensor
from torch.overrides import TorchFunctionMode

from .module import inside_module

__all__ = [
    "LOSS_FN",
    "QUERY",
    "CapturedModelError",
    "OuterTensorError",
    "OuterTensors",
    "UnseenOuterTensorError",
    "grad_tensors",
    "reading",
]

QUERY = -1  # the pin key of the multi-step loss's query batch
LOSS_FN = "loss_fn"  # the reader of the tensors loss_fn reads (an optimizer's: its name)


class CapturedModelError(ValueError):
    """``loss_fn`` read the model it captured instead of the module ``m`` it is given."""


class OuterTensorError(ValueError):
    """A strategy cannot differentiate with respect to an outer tensor the steps read."""


class UnseenOuterTensorError(RuntimeError):
    """A recomputed step read a tensor that requires grad which the forward pass did not."""


def grad_tensors(batch: Any, path: str = "") -> Iterator[tuple[str, Tensor]]:
    """``(path, tensor)`` for every tensor in ``batch`` (tensors, tuples, lists, dicts) that
    requires grad, e.g. ``("[0]", x)`` for ``(x, y)``."""
    if isinstance(batch, Tensor):
        if batch.requires_grad:
            yield path or "the batch itself", batch
    elif isinstance(batch, (list, tuple)):
        for i, b in enumerate(batch):
            yield from grad_tensors(b, f"{path}[{i}]")
    elif isinstance(batch, dict):
        for k, b in batch.items():
            yield from grad_tensors(b, f"{path}[{k!r}]")


class OuterTensors:
    """One ``adapt`` call's outer tensors, their places and the batches that hold them.

    Args:
        steps: N, the number of inner steps.

    Attributes:
        tensors: the outer tensors, in the order first read (the engine's extra inputs).
        where: for each, where it was first read (for messages).
        reads: for each step, the indices into ``tensors`` it read (its query too).
    """

    def __init__(self, steps: int) -> None:
        self.tensors: list[Tensor] = []
        self.where: list[str] = []
        self.reads: list[set[int]] = [set() for _ in range(steps)]
        self.by_loss: set[int] = set()  # the tensors loss_fn read (the others: an optimizer)
        self._index: dict[int, int] = {}
        self._paths: dict[int, str] = {}
        self._pins: dict[int, Any] = {}
        self._found: list[Tensor] = []  # the forward pass's stand-ins
        self._stand_ins: Sequence[Tensor] | None = None  # backward's

    def batch(self, key: int, fetch: Callable[[], Any]) -> Any:
        """Step ``key``'s batch (``QUERY``: the query): the pinned one if the forward
        pass kept it, else ``fetch()``, kept when it holds a tensor that requires grad."""
        if key in self._pins:
            return self._pins[key]
        batch = fetch()
        held = list(grad_tensors(batch))
        if held:
            self._pins[key] = batch
            name = "the query batch" if key == QUERY else f"inner step {key}'s batch"
            for path, t in held:
                self._paths.setdefault(id(t), f"{name}{path}")
        return batch

    def see(self, t: Tensor, step: int, func: Any, reader: str = LOSS_FN) -> int:
        """The index of ``t``, recorded now if new (forward) or looked up (backward);
        ``reader``: ``LOSS_FN`` or the inner optimizer that read it."""
        i = self._index.get(id(t))
        if i is None:
            if self._stand_ins is not None:
                raise UnseenOuterTensorError(
                    f"recomputing inner step {step} in backward, {reader} read a tensor of "
                    f"shape {tuple(t.shape)} that requires grad and that the forward pass "
                    f"did not read (in {_name(func)}); a recomputing strategy needs loss_fn "
                    f"to read the same tensors when a step runs again. Read it at every run "
                    f"of the step, or use strategy='naive'"
                )
            i = len(self.tensors)
            self._index[id(t)] = i
            self.tensors.append(t)
            self._found.append(t.detach().requires_grad_(True))
            place = self._paths.get(id(t))
            if place is None and reader == LOSS_FN:
                place = (
                    f"loss_fn at inner step {step} (through {_name(func)}): a tensor in its "
                    f"closure, a module other than the model, or an attribute of the model"
                )
            elif place is None:
                place = (
                    f"{reader} at inner step {step} (through {_name(func)}): a tensor "
                    f"attribute of the optimizer (such as self.lr) or one in its closure"
                )
            self.where.append(place)
        if step >= 0:
            self.reads[step].add(i)
        if reader == LOSS_FN:
            self.by_loss.add(i)
        return i

    @property
    def discovering(self) -> bool:
        """Whether new outer tensors are recorded (the forward pass), not refused."""
        return self._stand_ins is None

    def stand_ins(self) -> Sequence[Tensor]:
        """What ``reading`` hands torch functions in place of ``tensors`` now."""
        return self._found if self._stand_ins is None else self._stand_ins

    def check_graph(self, loss: Tensor, step: int, mode: Any) -> None:
        """Raise if ``loss`` depends on a tensor that requires grad other than the step's
        own and the stand-ins: one read where the mode could not see it.


        Raises:
            OuterTensorError: names the tensor's shape and what to do.
        """
        # Note [What the mode cannot see]
        # In the forward pass the steps read stand-ins of the outer tensors, so the loss's
        # graph ends at the step's own leaves and the stand-ins. A path to any other leaf
        # means an operation that the TorchFunctionMode does not intercept read a tensor
        # that requires grad: a custom autograd.Function handed it as an argument (its
        # apply is not intercepted, so the Function's graph edge goes to the tensor itself),
        # or code that reads it without a torch function. Its gradient would be lost in
        # backward; this walk of step 0's graph (the step's nodes only: it stops at leaves)
        # says so before any backward.
        own = mode.own if mode is not None else set()
        ends = own | {id(s) for s in self._found}
        seen: set[int] = set()
        stack = [loss.grad_fn]
        while stack:
            fn = stack.pop()
            if fn is None or id(fn) in seen:
                continue
            seen.add(id(fn))
            var = getattr(fn, "variable", None)
            if var is not None:
                if id(var) not in ends:
                    raise OuterTensorError(
                        f"the inner loss at step {step} depends on a tensor of shape "
                        f"{tuple(var.shape)} that requires grad through an operation "
                        f"effmaml cannot follow (a custom torch.autograd.Function that gets "
                        f"it as an argument or reads it from its closure, or code outside "
                        f"torch functions), so a recomputing strategy would lose its "
                        f"gradient. Hand the Function the result of a torch operation on it "
                        f"instead (t.clone(), which effmaml follows), or use strategy='naive'"
                    )
                continue
            stack.extend(f for f, _ in fn.next_functions)

    def read_by(self, a: int, b: int) -> list[int]:
        """Indices of the tensors read by steps ``a..b-1``, in order."""
        return sorted(set().union(*self.reads[a:b]))

    def describe(self, i: int) -> str:
        """``"a tensor of shape (8, 4) read by inner step 0's batch[0]"``."""
        t = self.tensors[i]
        return f"a tensor of shape {tuple(t.shape)} ({t.dtype}) read by {self.where[i]}"

    def nbytes(self) -> int:
        """Bytes of the outer tensors (one gradient buffer each)."""
        return sum(t.numel() * t.element_size() for t in self.tensors)

    @contextlib.contextmanager
    def substituting(self, stand_ins: Sequence[Tensor]) -> Iterator[None]:
        """While active, ``reading`` hands ``stand_ins[i]`` to torch functions in place
        of ``tensors[i]`` (the engine's backward: leaves it differentiates)."""
        self._stand_ins = stand_ins
        try:
            yield
        finally:
            self._stand_ins = None

    def refuse(self, strategy: str, why: str) -> None:
        """Raise if any outer tensor was read: ``strategy`` cannot give it its gradient.

        Raises:
            OuterTensorError: names each tensor (shape, where it was read), says ``why``
                and what to do.
        """
        if not self.tensors:
            return
        listed = "; ".join(self.describe(i) for i in range(min(3, len(self.tensors))))
        more = f" and {len(self.tensors) - 3} more" if len(self.tensors) > 3 else ""
        raise OuterTensorError(
            f"strategy={strategy!r} cannot give a meta-gradient to tensors the inner steps "
            f"read that require grad: {listed}{more}. {why} Use an exact strategy "
            f"('checkpoint', 'revolve', 'auto' or 'naive'), or .detach() what should stay "
            f"fixed"
        )

    def release(self) -> None:
        """Drop the pinned batches (after backward)."""
        self._pins.clear()


def _name(func: Any) -> str:
    return getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or repr(func)


class _Reading(TorchFunctionMode):
    """Records (forward) or substitutes (backward) the outer tensors torch functions get,
    and refuses the captured model's tensors read outside the module the step hands out."""

    # Note [Finding what a step reads]
    # A tensor handed to a torch function is outer when it requires grad and is neither one
    # of the step's own tensors (its state's leaves, the constants) nor a result of a torch
    # function called in this step: results are remembered by id as they are made, and an
    # outer tensor, alive since before the step, cannot share an id with one of them. The
    # mode is off inside its own handler, so a function implemented in Python (F.cross_entropy)
    # is seen once, with the user's arguments.

    def __init__(
        self,
        outer: OuterTensors | None,
        step: int,
        own: set[int],
        captured: Mapping[int, tuple[str, str]] | None,
        reader: str,
    ) -> None:
        super().__init__()
        self.outer, self.step, self.own = outer, step, own
        self.captured, self.reader = captured, reader

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if self.captured is not None and not inside_module():
            self._check(args, func)
            self._check(kwargs, func)
        if self.outer is None:
            return func(*args, **kwargs)
        args = self._swap(args, func)
        kwargs = self._swap(kwargs, func)
        out = func(*args, **kwargs)
        self._own(out)
        return out

    def _check(self, value: Any, func: Any) -> None:
        """Raise if ``value`` holds one of the captured model's adapted parameters."""
        # Note [The captured model]
        # loss_fn(m, batch) that calls the model it captured, model(x), reads θ where it
        # should read φ_t: naive differentiated that silently (48% off on a small MLP), and a
        # recomputing strategy counted θ as an outer tensor. The step's module never holds
        # the model's adapted parameters (φ₀ is a node of its own under every strategy:
        # Note [φ₀ is not θ]), so one of them handed to a torch function is the slip. Only
        # reads outside a call of m are looked at: inside one, the model holds m's tensors.
        # The model's fixed parameters are m's too, and reading them directly is harmless.
        assert self.captured is not None
        if isinstance(value, Tensor):
            hit = self.captured.get(id(value))
            if hit is not None:
                kind, name = hit
                raise CapturedModelError(
                    f"loss_fn read the model's own {kind} {name!r} at inner step "
                    f"{self.step} (in {_name(func)}): it uses the model it captured "
                    f"(model(x), model.parameters()), which holds the initial θ, instead of "
                    f"the module m it is given, which holds the adapted φ_t; the "
                    f"meta-gradient would be wrong under every strategy. Call m(x) inside "
                    f"loss_fn(m, batch), and m.embed(x), m.backbone(x), m.parameters() for "
                    f"the rest of the model. To read θ₀ on purpose (a pull towards the "
                    f"initial parameters), pass prox_lambda=λ to MAML (it adds "
                    f"(λ/2)‖φ − θ₀‖²), or give loss_fn copies taken before adapt "
                    f"(p.detach().clone() for a constant, p.clone() to differentiate them)"
                )
        elif isinstance(value, (list, tuple)):
            for v in value:
                self._check(v, func)
        elif isinstance(value, dict):
            for v in value.values():
                self._check(v, func)

    def _outer(self, a: Any) -> bool:
        return isinstance(a, Tensor) and a.requires_grad and id(a) not in self.own

    def _swap(self, value: Any, func: Any) -> Any:
        """``value`` with every outer tensor replaced by its stand-in (lists, tuples, dicts
        rebuilt; everything else as it is)."""
        assert self.outer is not None
        if isinstance(value, Tensor):
            if not self._outer(value):
                return value
            i = self.outer.see(value, self.step, func, self.reader)
            return self.outer.stand_ins()[i]
        if isinstance(value, tuple):
            items = [self._swap(v, func) for v in value]
            return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
        if isinstance(value, list):
            return [self._swap(v, func) for v in value]
        if isinstance(value, dict):
            return {k: self._swap(v, func) for k, v in value.items()}
        return value

    def _own(self, out: Any) -> None:
        if isinstance(out, Tensor):
            self.own.add(id(out))
        elif isinstance(out, (list, tuple)):
            for o in out:
                self._own(o)


@contextlib.contextmanager
def reading(
    outer: OuterTensors | None,
    step: int,
    own: Iterable[Tensor],
    captured: Mapping[int, tuple[str, str]] | None = None,
    reader: str = LOSS_FN,
) -> Iterator[_Reading | None]:
    """Run the user's code of inner step ``step`` so that outer tensors are found (forward)
    or replaced by their stand-ins (backward), and the captured model's tensors are
    refused; a no-op without either (``naive`` after its first step).

    Args:
        outer: the call's record, or None.
        step: the inner step's index.
        own: the step's own tensors (its state, the constants): never outer.
        captured: id -> ``(kind, name)`` of the model's adapted parameters, which the
            step's module replaces: read by a torch function outside a call of it,
            ``CapturedModelError`` (Note [The captured model]); None: not checked.
        reader: ``LOSS_FN``, or the inner optimizer whose ``step`` runs (for messages).

    Raises:
        CapturedModelError: names the tensor, the step and the fix.
    """
    if outer is None and captured is None:
        yield None
        return
    with _Reading(outer, step, {id(t) for t in own}, captured, reader) as mode:
        yield mode
