"""revolve and offload == naive (float64, the checkpoint tests' standard), their recompute
counts against the schedule formulas, and the binomial closed form against a brute force."""

import dataclasses
import math
from functools import lru_cache

import pytest

import effmaml
from effmaml.probe import PROBE_EVALS
from effmaml.schedules import (
    binomial_repetitions,
    count_plan,
    revolve_recomputations,
    revolve_split,
)

from .helpers import (
    FULL_ROW,
    GRID,
    LazyBatches,
    Opt,
    ce_loss,
    compare_to_naive,
    make_batch,
    make_model,
)

STEPS = 7


def _compare(opt, strategy, steps=STEPS, **kw):
    return compare_to_naive(opt, strategy, steps, **kw)


@pytest.mark.parametrize("slots", [1, 2, 3, 8])
def test_revolve_full_row(slots):
    ours = _compare(FULL_ROW, "revolve", slots=slots)
    assert ours["adapted"].info["slots"] == min(slots, STEPS)


@pytest.mark.parametrize("steps", [1, 2, 12])
def test_revolve_lengths(steps):
    _compare(FULL_ROW, "revolve", steps=steps, slots=3)


@pytest.mark.parametrize("pullback", ["segment", "step"])
def test_offload_full_row(pullback):
    """On a CPU offload is checkpoint; on CUDA the same test runs through pinned memory in
    tests/test_resnet.py."""
    _compare(FULL_ROW, "offload", segment=3, pullback=pullback)


@pytest.mark.parametrize(
    "opt,strategy",
    [(o, ("revolve", "offload")[i % 2]) for i, o in enumerate(GRID)],
    ids=lambda v: v.id() if isinstance(v, Opt) else v,
)
def test_pairwise_grid(opt, strategy):
    kw = {"slots": 2} if strategy == "revolve" else {"segment": 3}
    _compare(opt, strategy, **kw)


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
    assert adapted.step_evals == expected + PROBE_EVALS == adapted.info["step_evals_predicted"]
    assert batches.calls == expected + 1  # + the probe's read of batch 0
    r = binomial_repetitions(STEPS, s)
    assert expected <= (r + 1) * STEPS + 1


def test_revolve_long_chain_is_cheap_to_plan():
    import time

    t0 = time.perf_counter()
    for s in (2, 4, 8):
        count_plan(1000, s)
    assert time.perf_counter() - t0 < 10


def test_offload_counts_match_checkpoint():
    for strategy in ("checkpoint", "offload"):
        model = make_model()
        maml = effmaml.MAML(model, ce_loss, effmaml.SGD(0.1), strategy, segment=3, pullback="step")
        adapted = maml.adapt([make_batch(t) for t in range(STEPS)])
        ce_loss(adapted, make_batch(1)).backward()
        assert adapted.step_evals == 3 * STEPS - 3 + PROBE_EVALS


def test_bad_slots():
    for bad, err in [(0, ValueError), (1.5, TypeError), (True, TypeError)]:
        with pytest.raises(err, match="slots"):
            effmaml.MAML(make_model(), ce_loss, effmaml.SGD(0.1), "revolve", slots=bad)


def test_lazy_grid_row_with_dropout_and_bn():
    opt = dataclasses.replace(FULL_ROW, batches="lazy")
    _compare(opt, "revolve", slots=2)
