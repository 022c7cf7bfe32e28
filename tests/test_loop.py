"""The inner loop one can feed and watch: one-pass sources under the strategies that read
each batch once, and adapt's callback (logging, and a stopping rule whose N is the
unroll's N under every strategy, recomputation included)."""

import dataclasses

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import effmaml

from .helpers import (
    FULL_ROW,
    assert_same_as_naive,
    build,
    ce_loss,
    inner_for,
    make_batch,
    make_model,
    msl_weights_for,
    result,
    run_effmaml,
    with_outer,
)

STEPS = 6


# -- one-pass sources ---------------------------------------------------------------------
def _loader():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(STEPS * 8, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (STEPS * 8,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=8), [
        (x[8 * t : 8 * t + 8], y[8 * t : 8 * t + 8]) for t in range(STEPS)
    ]


def _meta(strategy, batches, steps=None):
    model = make_model()
    adapted = effmaml.MAML(model, ce_loss, effmaml.SGD(0.3), strategy).adapt(batches, steps)
    return result(ce_loss(adapted, make_batch(99)), list(model.parameters()), adapted)


@pytest.mark.parametrize("strategy", ["naive", "first_order"])
@pytest.mark.parametrize("form", ["loader", "generator", "iterator"])
def test_one_pass_sources_under_the_strategies_that_read_once(strategy, form):
    loader, listed = _loader()
    ref = _meta(strategy, listed[:4])
    if form == "loader":  # sized: its length, or the first `steps` batches
        ours, full = _meta(strategy, loader, steps=4), _meta(strategy, loader)
        assert len(full["adapted"].losses) == STEPS
    elif form == "generator":
        ours = _meta(strategy, (b for b in listed), steps=4)
    else:
        ours = _meta(strategy, iter(listed), steps=4)
    assert_same_as_naive({**ours, "rng": ref["rng"]}, ref)


def test_one_pass_sources_are_checked():
    loader, listed = _loader()
    with pytest.raises(TypeError, match="without a length.*steps=N"):
        _meta("naive", (b for b in listed))
    with pytest.raises(ValueError, match="ended after 6 batches but adapt runs 7"):
        _meta("naive", iter(listed), steps=7)
    with pytest.raises(ValueError, match="source of 6 batches with steps=7"):
        _meta("naive", loader, steps=7)


@pytest.mark.parametrize("strategy", ["checkpoint", "revolve", "auto", "implicit"])
def test_strategies_that_read_again_refuse_one_pass_sources(strategy):
    loader, listed = _loader()
    for source in (loader, iter(listed)):
        with pytest.raises(TypeError, match="one-pass source.*'naive' and 'first_order'"):
            _meta(strategy, source, steps=4)


# -- the callback -------------------------------------------------------------------------
STOP_AT = 3  # the callback stops after step 3: N = 4 of the 6 planned

SCHEDULES = [
    ("naive", {}),
    ("checkpoint", {"segment": 2}),  # 6 steps -> 3 segments; 4 -> 2
    ("checkpoint", {"segment": None, "pullback": "step"}),  # k = ceil(sqrt(N))
    ("revolve", {"slots": 2}),
    ("offload", {"segment": 3}),
    ("auto", {}),
]


class Watcher:
    def __init__(self, stop_at=STOP_AT):
        self.seen, self.stop_at = [], stop_at

    def __call__(self, t, loss):
        assert not loss.requires_grad and loss.dim() == 0
        self.seen.append((t, loss))
        return t == self.stop_at


@pytest.mark.parametrize("msl", [False, True])
@pytest.mark.parametrize("strategy,kw", SCHEDULES, ids=str)
def test_a_stopping_callback_gives_naives_stopped_unroll(strategy, kw, msl):
    """At the hardest row (Adam, learned per-step rates, per-step BatchNorm, dropout,
    clipping, a lazy source, the proximal term; with and without the multi-step loss),
    stopped after step 3 of 6: naive's values bitwise and its meta-gradient to summation
    order (the per-step slices of the steps not run get none); the callback saw each step
    once, in order, with naive's inner losses."""
    row = dataclasses.replace(FULL_ROW, msl=msl)
    ref = _stopped(row, "naive", Watcher())
    watcher = Watcher()
    ours = _stopped(row, strategy, watcher, **kw)
    assert_same_as_naive(ours, ref)
    assert len(ours["adapted"].losses) == STOP_AT + 1
    assert [t for t, _ in watcher.seen] == list(range(STOP_AT + 1))
    torch.testing.assert_close(torch.stack([x for _, x in watcher.seen]), ref["losses"])


@pytest.mark.parametrize("msl", [False, True])
@pytest.mark.parametrize("strategy,kw", SCHEDULES[:4], ids=str)
def test_a_stopped_unroll_is_adapt_over_the_batches_run(strategy, kw, msl):
    """Without per-step rates (whose length fixes N): stopped after step 3 of 6 is naive's
    adapt over the first 4 batches (the multi-step loss's weights cut to them)."""
    row = dataclasses.replace(FULL_ROW, lr="per_param", bn="update", msl=msl)
    ref = run_effmaml(row, "naive", STOP_AT + 1)
    ours = _stopped(row, strategy, Watcher(), **kw)
    assert_same_as_naive(ours, ref)


def _stopped(row, strategy, callback, **kw):
    """run_effmaml's problem planned for STEPS steps, adapted with ``callback``."""
    model, lr, names, _, _ = build(row, STEPS)
    batches, _, loss_fn, query, _ = with_outer(row.outer, row.batches, STEPS)
    kw.setdefault("params", names)
    maml = effmaml.MAML(
        model, loss_fn, inner_for(row, lr), strategy, clip_grad_grad_norm=row.clip,
        prox_lambda=row.prox, **kw
    )  # fmt: skip
    torch.manual_seed(7)
    weights = [*msl_weights_for(STOP_AT + 1), 0.5, 1.0]  # the first 4: run_effmaml's for N=4
    msl = {"query": query, "step_weights": weights} if row.msl else {}
    adapted = maml.adapt(batches, callback=callback, **msl)
    loss = adapted.query_loss if row.msl else loss_fn(adapted, query)
    return {**result(loss, [*model.parameters(), *lr.values()], adapted), "model": model}


def test_a_logging_callback_changes_nothing_and_recomputing_strategies_pay_one_pass():
    watcher = Watcher(stop_at=None)
    ref = _stopped(FULL_ROW, "revolve", None, slots=2)
    ours = _stopped(FULL_ROW, "revolve", watcher, slots=2)
    assert_same_as_naive(ours, ref)
    assert len(watcher.seen) == STEPS
    assert ours["adapted"].step_evals == ref["adapted"].step_evals + STEPS


def test_the_multi_step_losss_weights_are_cut_to_the_steps_run():
    model = make_model()
    maml = effmaml.MAML(model, ce_loss, effmaml.SGD(0.1), "checkpoint", segment=2)
    batches = [make_batch(t) for t in range(STEPS)]
    with pytest.raises(ValueError, match="stopped the inner loop after step 1.*weight 0"):
        maml.adapt(batches, query=make_batch(9), step_weights=[0, 0, 0, 0, 0, 1],
                   callback=lambda t, loss: t == 1)  # fmt: skip
    with pytest.raises(TypeError, match="callback must be callable"):
        maml.adapt(batches, callback="stop")
    naive = effmaml.MAML(model, ce_loss, effmaml.SGD(0.1))
    with pytest.raises(TypeError, match="one-pass source cannot give twice"):
        naive.adapt(iter(batches), steps=3, query=make_batch(9), callback=print)


@pytest.mark.parametrize("strategy,kw", [("naive", {}), ("checkpoint", {"segment": 2})], ids=str)
def test_a_callback_answering_a_boolean_tensor_stops_and_other_answers_are_refused(strategy, kw):
    """``loss < c`` is a one-element boolean tensor: it stops as True does (it was ignored:
    only ``is True`` stopped); a number or a string is refused with the rule, not read one
    way or the other silently."""
    batches = [make_batch(t) for t in range(6)]
    maml = effmaml.MAML(make_model(), ce_loss, effmaml.SGD(0.1), strategy, **kw)
    ref = maml.adapt(batches, callback=lambda t, loss: t == STOP_AT)
    ours = maml.adapt(batches, callback=lambda t, loss: torch.tensor(t == STOP_AT))
    assert len(ours.losses) == len(ref.losses) == STOP_AT + 1
    for answer in (1, "stop", torch.tensor(0.5)):
        with pytest.raises(TypeError, match=r"returned .* after inner step 0: return True"):
            maml.adapt(batches, callback=lambda t, loss, a=answer: a)
