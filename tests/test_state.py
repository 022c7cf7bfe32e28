"""The one flatten of the inner state (effmaml/state.py): structure, round trips, a new group."""

from dataclasses import dataclass

import pytest
import torch
from torch import Tensor

from effmaml.engine import Store, pullback
from effmaml.problem import NO_RECORDS
from effmaml.replay import capture_rng
from effmaml.state import Consts, InnerState, group

from .helpers import make_batch, maml_for


def _state() -> InnerState:
    return InnerState(
        {"w": torch.randn(3, 2, dtype=torch.float64), "b": torch.randn(2, dtype=torch.float64)},
        {"momentum.w": torch.zeros(3, 2, dtype=torch.float64)},
        {"running_mean": torch.ones(2, dtype=torch.float64)},
    )


def test_flatten_and_back_keeps_names_order_and_tensors():
    s = _state()
    spec = s.spec()
    flat = s.flat()
    assert spec.size == len(flat) == 4
    assert spec.differentiable() == [True, True, True, False]
    back = spec.unflatten(flat)
    assert back.params.keys() == s.params.keys() and back.buffers.keys() == s.buffers.keys()
    assert all(x is y for x, y in zip(back.flat(), flat))  # references, not copies
    head, rest = spec.split([*flat, "tail"])
    assert list(rest) == ["tail"] and head.opt["momentum.w"] is s.opt["momentum.w"]
    with pytest.raises(ValueError, match="needs 4 tensors, got 3"):
        spec.unflatten(flat[:3])


def test_cotangents_hold_the_differentiable_groups_only():
    s = _state()
    spec = s.spec()
    grads = [torch.ones_like(t) for t in s.flat(differentiable_only=True)]
    cot = spec.unflatten(grads, differentiable_only=True)
    assert cot.buffers == {} and cot.params["w"].shape == (3, 2)
    full = spec.full(cot)
    assert [g is None for g in full] == [False, False, False, True]


def test_detached_makes_leaves_of_the_differentiable_groups():
    s = _state().map(lambda t, _: t * 1)
    d = s.detached(requires_grad=True)
    assert all(t.is_leaf and t.requires_grad for t in d.flat(differentiable_only=True))
    assert not d.buffers["running_mean"].requires_grad


@dataclass
class _WithExtra(InnerState):
    """InnerState with one more group: what adding a field to the state means."""

    extra: dict[str, Tensor] = group()


def test_a_new_group_goes_through_every_consumer_of_the_flatten():
    """A field added to the state in its dataclass alone is flattened, mapped (the host
    store's copy), detached, stored and pulled back without any other edit."""
    base = _state()
    s = _WithExtra(base.params, base.opt, base.buffers, {"scale": torch.tensor(2.0).double()})
    spec = s.spec()
    assert spec.size == 5 and spec.differentiable()[-1]
    back = spec.unflatten(s.flat())
    assert isinstance(back, _WithExtra) and back.extra["scale"] is s.extra["scale"]
    copied = s.map(lambda t, _: t.clone())  # what HostStore does, down and up
    assert isinstance(copied, _WithExtra) and copied.extra["scale"].item() == 2.0
    assert Store().get(Store().put(s)) is s
    assert s.nbytes() == base.nbytes() + 8
    # the engine's pullback carries the group's cotangent back to the start untouched by a
    # step that does not read it (zeros: nothing depends on it)
    maml = maml_for(width=4)
    problem, state0, consts = maml.problem([make_batch(0)], None)
    s0 = _WithExtra(state0.params, state0.opt, state0.buffers, {"scale": torch.ones(()).double()})
    cot = s0.spec().unflatten(
        [torch.ones_like(t) for t in s0.flat(differentiable_only=True)], differentiable_only=True
    )
    need = [c.requires_grad for c in consts.flat()]
    grad, _, _ = pullback(
        problem,
        maml.runtime(),
        NO_RECORDS,
        s0,
        capture_rng(problem.rng_devices),
        0,
        0,  # no step: the cotangent passes through as it came
        consts,
        need,
        cot,
        torch.zeros(0, dtype=torch.float64),
    )
    assert isinstance(grad, _WithExtra) and grad.extra["scale"].item() == 1.0


def test_consts_detached():
    c = Consts({"w": torch.ones(2, requires_grad=True)}, {}, {})
    d = c.detached()
    assert not d.fixed["w"].requires_grad and d.fixed["w"].data_ptr() == c.fixed["w"].data_ptr()
