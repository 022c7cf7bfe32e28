"""The memory model (estimate), memory budgets and strategy='auto'."""

import pytest
import torch

import effmaml
from effmaml.memory import estimate, format_bytes, parse_bytes

from .helpers import (
    FULL_ROW,
    LazyBatches,
    assert_results_match,
    ce_loss,
    make_batch,
    make_model,
    run_effmaml,
)

N = 12


def _maml(strategy="naive", **kw):
    return effmaml.MAML(make_model(width=32), ce_loss, effmaml.SGD(0.1), strategy, **kw)


def test_parse_bytes():
    assert parse_bytes("6GiB") == 6 * 2**30
    assert parse_bytes("512 MiB") == 512 * 2**20
    assert parse_bytes("1.5GB") == 1_500_000_000
    assert parse_bytes(1024) == 1024
    assert parse_bytes("2g") == 2 * 2**30
    for bad in ["lots", "6 parsecs", "-1GiB", 0, True]:
        with pytest.raises(ValueError, match="memory size"):
            parse_bytes(bad)
    with pytest.raises(ValueError, match="memory size"):
        _maml(memory_budget="six gigs")
    assert format_bytes(3 * 2**30) == "3.00 GiB"


def test_estimate_follows_the_formulas():
    maml = _maml()
    small = estimate(maml, make_batch(0), 10)
    large = estimate(maml, make_batch(0), 40)
    assert len(small) == len(large) == 6  # naive, 2 checkpoint, 3 revolve (no CUDA: no offload)
    assert {"naive"} <= set(small)
    revolve4 = next(k for k in small if k.startswith("revolve(slots=4"))
    # naive grows with N, revolve with fixed slots does not
    assert large["naive"].peak_bytes > 3.5 * small["naive"].peak_bytes / 1.2
    assert large[revolve4].peak_bytes == small[revolve4].peak_bytes
    assert small["naive"].step_evals == 10
    seg = next(k for k in small if "pullback='segment'" in k)
    assert small[seg].step_evals == 2 * 10 + 1
    # one named strategy: the same prediction adapt() records
    (pred,) = estimate(maml, make_batch(0), 10, "revolve", slots=3).values()
    m = _maml("revolve", slots=3)
    adapted = m.adapt(make_batch(0), steps=10)
    assert adapted.info["predicted_peak_bytes"] == pred.peak_bytes
    assert adapted.info["step_evals_predicted"] == pred.step_evals
    assert model_untouched(maml)


def model_untouched(maml):
    return all(p.grad is None for p in maml.model.parameters())


def _predictions(steps=N):
    return estimate(_maml(), make_batch(0), steps)


def test_auto_picks_naive_when_it_fits_and_checkpoint_when_not():
    preds = _predictions()
    naive = preds["naive"].peak_bytes
    roomy = _maml("auto", memory_budget=int(naive * 1.01))
    a = roomy.adapt([make_batch(t) for t in range(N)])
    assert a.info["chosen"] == "naive"
    tight = _maml("auto", memory_budget=int(naive * 0.9))
    a = tight.adapt([make_batch(t) for t in range(N)])
    assert a.info["chosen"].startswith("checkpoint(") and "pullback='segment'" in a.info["chosen"]
    assert a.info["predicted_peak_bytes"] <= naive * 0.9
    ce_loss(a, make_batch(99)).backward()
    assert a.step_evals == a.info["step_evals_predicted"]


def test_auto_is_exact_whatever_it_picks():
    preds = _predictions(7)
    floor = min(p.peak_bytes for p in preds.values())
    for budget in [None, floor * 1.05, preds["naive"].peak_bytes * 0.8]:
        kw = {} if budget is None else {"memory_budget": int(budget)}
        ref = run_effmaml(FULL_ROW, "naive", 7)
        ours = run_effmaml(FULL_ROW, "auto", 7, **kw)
        assert_results_match(ours, ref, grad_rel=1e-12, exact_values=True)


def test_nothing_fits_fails_before_any_work():
    batches = LazyBatches(N)
    maml = _maml("auto", memory_budget=1024)
    with pytest.raises(MemoryError, match="smallest feasible budget is about"):
        maml.adapt(batches)
    assert batches.calls == 1  # the probe step only
    with pytest.raises(MemoryError, match="raise the budget to at least"):
        _maml("checkpoint", memory_budget=1024).adapt(batches)


def test_budget_picks_segment_and_slots():
    preds = _predictions()
    seg_default = next(k for k in preds if "pullback='step'" in k)
    budget = preds[seg_default].peak_bytes
    a = _maml("checkpoint", pullback="step", memory_budget=budget).adapt(make_batch(0), steps=N)
    assert a.info["predicted_peak_bytes"] <= budget
    # "step": 3N - ceil(N/k) evaluations, fewer for shorter segments; the shortest that fits
    k = a.info["segment"]
    if k > 1:
        shorter = _maml("checkpoint", pullback="step", segment=k - 1).adapt(make_batch(0), steps=N)
        assert shorter.info["predicted_peak_bytes"] > budget
    # revolve: the most slots that fit
    r4 = estimate(_maml(), make_batch(0), N, "revolve", slots=4)
    budget = next(iter(r4.values())).peak_bytes
    a = _maml("revolve", memory_budget=budget).adapt(make_batch(0), steps=N)
    assert a.info["slots"] == 4


def test_named_strategy_over_budget_is_an_error():
    preds = _predictions()
    with pytest.raises(MemoryError, match="cannot run N=12"):
        _maml("revolve", slots=8, memory_budget=preds["naive"].peak_bytes // 100).adapt(
            make_batch(0), steps=N
        )


def test_auto_without_budget_uses_free_memory(monkeypatch):
    import effmaml.strategies.auto as auto

    preds = _predictions()
    monkeypatch.setattr(auto, "available_bytes", lambda d: int(preds["naive"].peak_bytes * 0.5))
    a = _maml("auto").adapt(make_batch(0), steps=N)
    assert a.info["chosen"] != "naive"
    assert a.info["memory_budget"] == int(0.9 * int(preds["naive"].peak_bytes * 0.5))
    assert torch.is_tensor(a.losses[0])
