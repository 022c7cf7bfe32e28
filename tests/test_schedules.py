"""Every schedule's recomputation counts against its formulas (checkpoint, offload,
revolve), the binomial closed form against a brute force, checkpoint's segment rule and the
engine's behaviour across calls (exactness against naive: tests/test_exact.py)."""

import gc
import math
from functools import lru_cache

import pytest
import torch

import effmaml
from effmaml.probe import PROBE_EVALS
from effmaml.schedules import (
    binomial_repetitions,
    revolve_plan,
    revolve_recomputations,
    revolve_split,
)

from .helpers import (
    LazyBatches,
    ce_loss,
    make_batch,
    make_model,
)

STEPS = 7


def count_plan(steps: int, slots: int) -> int:
    """Step evaluations of the revolve plan, by walking it (a check on the closed form)."""
    return sum(
        a.dst - a.src
        for a in revolve_plan(0, steps, min(slots, steps), {0})
        if a.kind in ("store", "advance")
    )


@lru_cache(None)
def _brute(n, s):
    """Least forward steps to reverse n steps with s states (one at the start), by search."""
    if n <= 1:
        return 0
    if s == 1:
        return n * (n - 1) // 2
    return min(m + _brute(n - m, s - 1) + _brute(m, s) for m in range(1, n))


def test_binomial_closed_form_is_optimal():
    for n in range(1, 60):
        for s in range(1, 6):
            assert revolve_recomputations(n, s) == _brute(n, s), (n, s)
            assert count_plan(n, s) == _brute(n, s), (n, s)
            r = binomial_repetitions(n, s)
            if s > 1:
                assert math.comb(s + r - 1, s) < n <= math.comb(s + r, s) or n == 1
                # at most r recomputations per step (the first sweep counts as one)
                assert revolve_recomputations(n, s) <= r * n
            if n > 1 and s > 1:
                assert 1 <= revolve_split(n, s) < n


@pytest.mark.parametrize("slots", [1, 2, 3, 5])
def test_revolve_recomputation_count(slots):
    model = make_model()
    batches = LazyBatches(STEPS)
    maml = effmaml.MAML(model, ce_loss, effmaml.SGD(0.1), "revolve", slots=slots)
    adapted = maml.adapt(batches)
    assert adapted.step_evals == STEPS + PROBE_EVALS  # probe + forward
    ce_loss(adapted, make_batch(1)).backward()
    s = min(slots, STEPS)
    expected = STEPS + revolve_recomputations(STEPS, s) + 1  # + the output step
    assert adapted.step_evals == expected + PROBE_EVALS == adapted.facts.prediction.step_evals
    assert batches.calls == expected + 1  # + the probe's read of batch 0
    r = binomial_repetitions(STEPS, s)
    assert expected <= (r + 1) * STEPS + 1


@pytest.mark.parametrize("slots", [2, 4, 8])
def test_revolve_plan_for_long_chains(slots):
    """N=1000: the plan walked step by step costs what the closed form says, every step is
    pulled back exactly once, last first, and never more than ``slots`` states are stored."""
    n, have = 1000, {0}
    pulled, stored_max = [], 0
    for a in revolve_plan(0, n, slots, have):
        if a.kind == "pull":
            pulled.append(a.src)
        stored_max = max(stored_max, len(have))
    assert pulled == list(reversed(range(n)))
    assert stored_max <= slots
    assert count_plan(n, slots) == revolve_recomputations(n, slots)


def test_bad_slots():
    for bad, err in [(0, ValueError), (1.5, TypeError), (True, TypeError)]:
        with pytest.raises(err, match="slots"):
            effmaml.MAML(make_model(), ce_loss, effmaml.SGD(0.1), "revolve", slots=bad)


# forward N + the schedule's recomputation (+ the probe's evaluations on a first call)
@pytest.mark.parametrize("strategy", ["checkpoint", "offload"])  # offload on CPU: checkpoint's
@pytest.mark.parametrize("pullback,expected", [("segment", 2 * STEPS), ("step", 3 * STEPS - 3)])
def test_recomputation_happens(strategy, pullback, expected):
    """Count step evaluations: forward N, then the schedule's recomputation in backward."""
    model, lr = make_model(), 0.1
    batches = LazyBatches(STEPS)
    maml = effmaml.MAML(model, ce_loss, effmaml.SGD(lr), strategy, segment=3, pullback=pullback)
    for probe_evals in (PROBE_EVALS, 0):  # the second call reuses the probe
        batches.calls = 0
        adapted = maml.adapt(batches)
        assert adapted.facts.probe.evals == probe_evals
        # the probe reads batch 0 once (for its signature) and reuses it for its steps
        assert adapted.step_evals == STEPS + probe_evals and batches.calls == STEPS + 1
        ce_loss(adapted, make_batch(1)).backward()
        total = expected + probe_evals
        assert adapted.step_evals == total == adapted.facts.prediction.step_evals
        assert batches.calls == expected + 1  # each evaluation indexed its batch again


def test_a_model_cast_after_the_first_adapt_is_probed_again():
    """The probe's cache key holds the model's dtypes and devices: cast to float64, the
    parameters are twice the bytes and the step times and first_order_exact are another model's."""
    model = make_model(dtype=torch.float32)
    dtype = [torch.float32]  # the batch stays the same; the loss follows the model

    def loss(module, batch):
        return ce_loss(module, (batch[0].to(dtype[0]), batch[1]))

    maml = effmaml.MAML(model, loss, effmaml.SGD(0.1), "checkpoint", segment=2)
    batch = make_batch(0, dtype=torch.float32)
    first = maml.adapt(batch, steps=4).facts.probe
    assert maml.adapt(batch, steps=4).facts.probe.evals == 0  # cached
    model.double()
    dtype[0] = torch.float64
    again = maml.adapt(batch, steps=4).facts.probe
    assert again.evals == PROBE_EVALS
    assert again.param_bytes == 2 * first.param_bytes


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
