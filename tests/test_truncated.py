"""``truncated(window=K)``: exact through the last K steps, first order before them.

Checked against naive where truncation is exact (K ≥ N over the option grid; K = 1 on a
one-step problem), and elsewhere against a hand-written truncated unroll in float64 (plain
autograd: the steps before the window run without graph and φ_{N−K} is θ₀ plus a detached
offset, so that its Jacobian to θ₀ is the identity), for θ₀, learned per-step rates,
learned data, a closure tensor, a tensor read only before the window, the proximal term,
BatchNorm, non-adapted parameters and the multi-step loss; then RaT-BPTT's random window,
the cost model and the refusals.
"""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

import effmaml

from .helpers import (
    F64,
    FULL_ROW,
    assert_scaled_close,
    ce_loss,
    compare_to_naive,
    grad_scale,
    make_batch,
    make_model,
)

STEPS = 7


def _rows():
    """The exactness grid's rows that checkpoint runs in one or in single-step segments
    (tests/test_exact.py): a window of N steps is the one-segment schedule."""
    from .test_exact import _grid

    seen = [FULL_ROW]
    for opt, strategy, kw in _grid():
        if strategy == "checkpoint" and kw in (
            {"segment": s, "pullback": "segment"} for s in (1, STEPS)
        ):
            seen.append(opt)
    return seen


@pytest.mark.parametrize("opt", _rows(), ids=lambda o: o.id())
def test_a_window_of_n_steps_is_naive(opt):
    """K = N: nothing before the window; parameters, buffers and losses bitwise naive's,
    every gradient (θ, rates, outer tensors) to summation order, naive's RNG, over the
    option grid (optimizers, learned and per-step rates, BatchNorm, dropout, clipping, the
    head alone, lazy sources, the proximal term, SiLU, the multi-step loss, outer tensors)."""
    ours = compare_to_naive(opt, "truncated", STEPS, window=STEPS)
    assert ours["adapted"].info["window_start"] == 0


def test_a_window_longer_than_n_is_naive_and_reports_n():
    ours = compare_to_naive(FULL_ROW, "truncated", 3, window=50)
    assert ours["adapted"].info["window"] == 3


def test_a_window_of_one_on_a_one_step_problem_is_naive():
    compare_to_naive(FULL_ROW, "truncated", 1, window=1)


# -- the hand-written truncated unroll ----------------------------------------------------------
MOMENTUM = 0.9


def _problem(steps=STEPS, head_only=False):
    """A BatchNorm MLP, SGD with momentum at a learned per-step rate, learned inputs (views
    of one leaf), a learned temperature in loss_fn's closure, and a learned scale s that
    only the first two steps' batches read; the batches come from a function."""
    torch.manual_seed(0)
    model = make_model()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(steps, 8, 5, generator=g, dtype=F64, requires_grad=True)
    y = torch.randint(0, 3, (steps, 8), generator=g)
    s = torch.tensor(1.3, dtype=F64, requires_grad=True)
    tau = torch.tensor(1.2, dtype=F64, requires_grad=True)
    lr = (0.2 + 0.02 * torch.arange(steps, dtype=F64)).requires_grad_(True)

    def batches():  # built again for each use: the scaled ones hold a graph to s
        return [(x[t] * s if t < 2 else x[t], y[t]) for t in range(steps)]

    def loss_fn(module, batch):
        return F.cross_entropy(module(batch[0]) / tau, batch[1])

    names = ["6.weight", "6.bias"] if head_only else [n for n, _ in model.named_parameters()]
    return model, names, batches, loss_fn, [x, s, tau, lr]


def _reference(model, names, batches, loss_fn, lr, k, query, prox=0.0, weights=None):
    """Truncated by hand: steps before the window without graph, φ = θ₀ + detached offset
    there (so dφ/dθ₀ = I and nothing else flows), the window with create_graph."""
    named = dict(model.named_parameters())
    theta = {n: named[n] for n in names}
    fixed = {n: p for n, p in named.items() if n not in theta}
    phi = dict(theta)
    mom = {n: torch.zeros_like(p) for n, p in phi.items()}
    bufs = {n: b.clone() for n, b in model.named_buffers()}
    a = max(len(batches) - k, 0)
    total = 0.0

    def first_order(v, n):  # θ₀ plus a constant: the identity Jacobian
        return theta[n] + (v - theta[n]).detach()

    for t, batch in enumerate(batches):
        window = t >= a
        b = {n: v.clone() for n, v in bufs.items()}
        out = functional_call(model, {**fixed, **phi, **b}, (batch[0],))
        loss = loss_fn(lambda _, out=out: out, (None, batch[1]))
        if prox:
            loss = loss + 0.5 * prox * sum(((phi[n] - theta[n]) ** 2).sum() for n in phi)
        grads = torch.autograd.grad(loss, list(phi.values()), create_graph=window)
        mom = {n: MOMENTUM * mom[n] + g for n, g in zip(phi, grads)}
        phi = {n: p - lr[t] * mom[n] for n, p in phi.items()}
        if not window:
            phi = {n: first_order(p, n) for n, p in phi.items()}
            mom = {n: m.detach() for n, m in mom.items()}
        bufs = b
        if weights and weights[t]:
            q = functional_call(model, {**fixed, **phi, **{n: v.clone() for n, v in bufs.items()}},
                                (query[0],))  # fmt: skip
            total = total + weights[t] * loss_fn(lambda _, q=q: q, (None, query[1]))
    if weights:
        return total, phi, bufs
    q = functional_call(model, {**fixed, **phi, **{n: v.clone() for n, v in bufs.items()}},
                        (query[0],))  # fmt: skip
    return F.cross_entropy(q, query[1]), phi, bufs


def _grads(loss, wrt, allow_unused=False):
    grads = torch.autograd.grad(loss, wrt, allow_unused=allow_unused)
    return [torch.zeros_like(w) if g is None else g for w, g in zip(wrt, grads)]


@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("prox", [0.0, 0.5])
def test_the_window_gradient_is_a_hand_written_truncated_unroll(k, prox):
    """θ₀ (BatchNorm's affine parameters among them), the learned per-step rates, the
    learned inputs, the temperature and the scale read only by steps 0 and 1: every
    gradient is the hand-written truncation's, none is None (autograd.grad refuses an
    unused input), the rates of steps before the window get 0, and the scale, read
    before the window only, gets an explicit 0."""
    model, names, make_batches, loss_fn, learned = _problem()
    lr = learned[-1]
    query = make_batch(999)
    wrt = [*model.parameters(), *learned]
    ref_loss, ref_phi, ref_bufs = _reference(
        model, names, make_batches(), loss_fn, lr, k, query, prox
    )
    ref = _grads(ref_loss, wrt, allow_unused=True)

    maml = effmaml.MAML(model, loss_fn, effmaml.SGD(lr, momentum=MOMENTUM, per_step=True),
                        "truncated", window=k, prox_lambda=prox)  # fmt: skip
    adapted = maml.adapt(make_batches())
    ours = _grads(ce_loss(adapted, query), wrt)  # no unused input allowed
    scale = grad_scale(ref)
    for i, (a, b) in enumerate(zip(ours, ref)):
        assert_scaled_close(a, b, 1e-10, f"grad[{i}]", scale=scale)
    a = STEPS - k
    assert torch.equal(ours[-1][:a], torch.zeros(a, dtype=F64))
    assert ours[-1][a:].abs().min() > 0
    assert a < 2 or torch.equal(ours[-3], torch.zeros((), dtype=F64))  # s: zeros, not None
    # the unroll itself is the full one: parameters and BatchNorm statistics as naive's
    for n in names:
        assert_scaled_close(adapted.params[n].detach(), ref_phi[n].detach(), 1e-12, n)
    for n, v in ref_bufs.items():
        assert_scaled_close(adapted.buffers[n], v, 1e-12, n)
    assert adapted.info["window_start"] == a and adapted.info["window_end"] == STEPS
    assert all(not x.requires_grad for x in adapted.losses[:a])
    assert all(x.requires_grad for x in adapted.losses[a:])
    if a > 0:
        assert any("only before the window" in d for d in adapted.facts.outer)


@pytest.mark.parametrize("k", [2, 5])
def test_the_multi_step_loss_before_the_window_is_first_order(k):
    """A multi-step loss weighted at every step, only the head adapted: the terms after
    the window's steps are exact, the earlier ones hand their gradient at φ_{t+1} to θ₀
    and their direct gradient to the non-adapted body, as the hand-written unroll does."""
    model, names, make_batches, loss_fn, learned = _problem(head_only=True)
    lr = learned[-1]
    query = make_batch(999)
    weights = [0.1 * (t + 1) for t in range(STEPS)]
    wrt = [*model.parameters(), *learned]
    ref_loss, _, _ = _reference(
        model, names, make_batches(), loss_fn, lr, k, query, weights=weights
    )
    ref = _grads(ref_loss, wrt, allow_unused=True)

    maml = effmaml.MAML(model, loss_fn, effmaml.SGD(lr, momentum=MOMENTUM, per_step=True),
                        "truncated", window=k, params=names)  # fmt: skip
    adapted = maml.adapt(make_batches(), query=query, step_weights=weights)
    assert_scaled_close(adapted.query_loss.detach(), ref_loss.detach(), 1e-12, "query loss")
    ours = _grads(adapted.query_loss, wrt)
    scale = grad_scale(ref)
    for i, (a, b) in enumerate(zip(ours, ref)):
        assert_scaled_close(a, b, 1e-10, f"grad[{i}]", scale=scale)


def test_truncation_differs_from_naive_where_it_should():
    """A window shorter than N is not naive's meta-gradient (the test above would pass for
    a strategy that ran naive only if the reference were naive too)."""

    def grads(strategy, **kw):
        model, _, make_batches, loss_fn, learned = _problem()
        inner = effmaml.SGD(learned[-1], momentum=MOMENTUM, per_step=True)
        adapted = effmaml.MAML(model, loss_fn, inner, strategy, **kw).adapt(make_batches())
        wrt = [*model.parameters(), *learned]
        return _grads(ce_loss(adapted, make_batch(999)), wrt, allow_unused=True)

    naive, ours = grads("naive"), grads("truncated", window=2)
    rel = sum(((a - b) ** 2).sum() for a, b in zip(ours, naive)) ** 0.5
    assert rel / sum((b**2).sum() for b in naive) ** 0.5 > 1e-2


# -- RaT-BPTT's random window ----------------------------------------------------------------
def test_a_random_window_ends_the_unroll_where_it_was_drawn():
    """Each call draws a ∈ 0..N−K, runs a + K steps and differentiates the last K exactly:
    the gradient is the hand-written truncated unroll of that prefix; the seed in the facts
    reproduces a; the same seed gives the same sequence of windows."""
    model, names, make_batches, loss_fn, learned = _problem()
    lr = learned[-1]
    query = make_batch(999)
    wrt = [*model.parameters(), *learned]
    k = 3
    inner = effmaml.SGD(lr, momentum=MOMENTUM, per_step=True)
    maml = effmaml.MAML(model, loss_fn, inner, "truncated", window=k, random=True, seed=4)
    starts = []
    for _ in range(6):
        adapted = maml.adapt(make_batches())
        info = adapted.info
        a, n = info["window_start"], info["window_end"]
        g = torch.Generator().manual_seed(info["window_seed"])
        assert a == int(torch.randint(STEPS - k + 1, (1,), generator=g)) and n == a + k
        assert len(adapted.losses) == n
        ours = _grads(ce_loss(adapted, query), wrt, allow_unused=True)
        ref_loss, _, _ = _reference(model, names, make_batches()[:n], loss_fn, lr, k, query)
        ref = _grads(ref_loss, wrt, allow_unused=True)
        for i, (x, y) in enumerate(zip(ours, ref)):
            assert_scaled_close(x, y, 1e-10, f"grad[{i}]", scale=grad_scale(ref))
        starts.append(a)
    assert len(set(starts)) > 1
    again = effmaml.MAML(model, loss_fn, inner, "truncated", window=k, random=True, seed=4)
    assert [again.adapt(make_batches()).info["window_start"] for _ in range(6)] == starts


def test_a_random_window_refuses_the_multi_step_loss():
    maml = effmaml.MAML(make_model(), ce_loss, effmaml.SGD(0.1), "truncated", window=2,
                        random=True)  # fmt: skip
    with pytest.raises(ValueError, match="random step.*multi-step loss"):
        maml.adapt(make_batch(0), steps=4, query=make_batch(1))


# -- the cost model and the refusals -------------------------------------------------------
def test_the_cost_model_is_k_graphs_and_one_state_with_n_first_order_steps():
    """Predicted peak K·A + P + the working set, flat in N; N + K + probe evaluations."""
    maml = effmaml.MAML(make_model(), ce_loss, effmaml.SGD(0.1), "naive")
    batch = make_batch(0)
    pr = maml.measure(batch)

    def predicted(k, n):
        ((label, pred),) = maml.estimate(batch, n, "truncated", window=k).items()
        assert label == f"truncated(window={k})"
        return pred

    assert predicted(3, 10).peak_bytes == predicted(3, 40).peak_bytes
    grow = predicted(4, 40).peak_bytes - predicted(3, 40).peak_bytes
    assert grow == pr.step_graph_bytes
    assert predicted(3, 40).step_evals == 40 + 3
    adapted = effmaml.MAML(make_model(), ce_loss, effmaml.SGD(0.1), "truncated",
                           window=3).adapt(batch, steps=10)  # fmt: skip
    ce_loss(adapted, make_batch(1)).backward()
    assert adapted.step_evals == adapted.info["step_evals_predicted"] == 10 + 3 + 4


def test_auto_never_weighs_it():
    problem, _, _ = effmaml.MAML(make_model(), ce_loss, effmaml.SGD(0.1)).problem(make_batch(0), 3)
    assert effmaml.Truncated.exact is False
    assert not any(isinstance(s, effmaml.Truncated) for s in effmaml.Auto.candidates(problem))


@pytest.mark.parametrize(
    "kw,match",
    [
        ({}, "needs window=K"),
        ({"window": 0}, "window must be >= 1"),
        ({"window": 2, "seed": 1}, "random=True"),
    ],
)
def test_bad_options_say_what_to_pass(kw, match):
    with pytest.raises(ValueError, match=match):
        effmaml.MAML(make_model(), ce_loss, effmaml.SGD(0.1), "truncated", **kw)


def test_dropout_replays_in_the_window():
    """Dropout in the window: the recomputed window sees the forward's masks (its losses
    are checked by the witness, which would raise), and K = N equals naive with dropout."""
    opt = dataclasses.replace(FULL_ROW, dropout=True)
    compare_to_naive(opt, "truncated", 4, window=4)
    model = make_model(p_drop=0.3)
    maml = effmaml.MAML(model, ce_loss, effmaml.SGD(0.1), "truncated", window=2)
    torch.manual_seed(3)
    adapted = maml.adapt([make_batch(t) for t in range(5)])
    ce_loss(adapted, make_batch(9)).backward()
    assert all(p.grad is not None for p in model.parameters())
