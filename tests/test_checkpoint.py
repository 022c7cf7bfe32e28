"""checkpoint's recomputation counts, the segment rule, and the API around it
(exactness against naive: tests/test_exact.py)."""

import gc

import pytest
import torch

import effmaml
from effmaml.probe import PROBE_EVALS

from .helpers import (
    LazyBatches,
    ce_loss,
    make_batch,
    make_model,
)

STEPS = 7


# forward N + the schedule's recomputation (+ the probe's evaluations on a first call)
@pytest.mark.parametrize("pullback,expected", [("segment", 2 * STEPS), ("step", 3 * STEPS - 3)])
def test_recomputation_happens(pullback, expected):
    """Count step evaluations: forward N, then the schedule's recomputation in backward."""
    model, lr = make_model(), 0.1
    batches = LazyBatches(STEPS)
    maml = effmaml.MAML(model, ce_loss, effmaml.SGD(lr), "checkpoint", segment=3, pullback=pullback)
    for probe_evals in (PROBE_EVALS, 0):  # the second call reuses the probe
        batches.calls = 0
        adapted = maml.adapt(batches)
        assert adapted.info["probe_evals"] == probe_evals
        # the probe reads batch 0 once (for its signature) and reuses it for its steps
        assert adapted.step_evals == STEPS + probe_evals and batches.calls == STEPS + 1
        ce_loss(adapted, make_batch(1)).backward()
        total = expected + probe_evals
        assert adapted.step_evals == total == adapted.info["step_evals_predicted"]
        assert batches.calls == expected + 1  # each evaluation indexed its batch again


def test_naive_does_not_recompute():
    model = make_model()
    adapted = effmaml.MAML(model, ce_loss, effmaml.SGD(0.1)).adapt(make_batch(0), steps=5)
    ce_loss(adapted, make_batch(1)).backward()
    assert adapted.step_evals == 5


def test_autograd_grad_equals_backward():
    model = make_model()
    maml = effmaml.MAML(
        model, ce_loss, effmaml.SGD(0.1, momentum=0.9), "checkpoint", segment=2, pullback="step"
    )
    batches = [make_batch(t) for t in range(5)]
    g1 = torch.autograd.grad(ce_loss(maml.adapt(batches), make_batch(9)), list(model.parameters()))
    ce_loss(maml.adapt(batches), make_batch(9)).backward()
    for p, g in zip(model.parameters(), g1):
        torch.testing.assert_close(p.grad, g, rtol=0, atol=0)


def test_segment_auto_rule():
    from effmaml.strategies.checkpoint import best_segment

    assert best_segment(100, "step", 0, 0) == 10
    assert best_segment(101, "step", 0, 0) == 11
    # ceil(N/k)·P + k·A with P = A: minimised at k ≈ sqrt(N)
    assert best_segment(100, "segment", 1, 1) == 10
    # a large graph per step favours short segments, a large state long ones
    assert best_segment(100, "segment", 1, 1000) == 1
    assert best_segment(100, "segment", 1000, 1) == 100


def test_repeated_adapt_does_not_leak():
    model = make_model(width=64)
    maml = effmaml.MAML(model, ce_loss, effmaml.SGD(0.1), "checkpoint", segment=2)
    batches = [make_batch(t) for t in range(6)]

    def live_tensors():
        gc.collect()
        return sum(1 for o in gc.get_objects() if torch.is_tensor(o))

    for _ in range(2):  # warm up caches
        ce_loss(maml.adapt(batches), make_batch(9)).backward()
    before = live_tensors()
    for _ in range(3):
        ce_loss(maml.adapt(batches), make_batch(9)).backward()
    assert live_tensors() <= before
