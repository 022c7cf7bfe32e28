"""effmaml.learned.LearnedOptimizer: the rule's values, its purity, and its meta-gradient
under every strategy of the registry (float64; the exact ones against naive's)."""

import functools
import warnings

import pytest
import torch

import effmaml
from effmaml.learned import LearnedOptimizer

from .helpers import F64, assert_scaled_close, ce_loss, grad_scale, make_batch, make_model

STEPS = 7


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny tensors: a second thread only waits (10x slower on a loaded 2-core machine)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _rule(**overrides) -> LearnedOptimizer:
    # a larger output scale than the default, so that the network (not only the skip) moves
    # the parameters and its weights' meta-gradient is far from zero
    kw = {"lr": 0.05, "hidden": (8, 6), "out_scale": 0.5, "param_feature": True, "dtype": F64}
    kw.update(overrides)
    return LearnedOptimizer(**kw)


def _meta_gradient(strategy: str, rule=None, steps=STEPS, msl=True, **kw):
    """The meta-gradient of the rule's weights and the model's parameters, and the
    adapted parameters, after ``steps`` steps on distinct batches (the multi-step loss, as
    the benchmark meta-trains, or the final query loss)."""
    rule = rule or _rule()
    model = make_model(p_drop=0.1)
    batches = [make_batch(t) for t in range(steps)]
    query = make_batch(99)
    maml = effmaml.MAML(model, ce_loss, rule, strategy, **kw)
    torch.manual_seed(7)  # dropout
    if msl:
        adapted = maml.adapt(batches, query=query, step_weights=[1.0 / steps] * steps)
        loss = adapted.query_loss
    else:
        adapted = maml.adapt(batches)
        loss = ce_loss(adapted, query)
    wrt = [*rule.parameters(), *model.parameters()]
    grads = torch.autograd.grad(loss, wrt, allow_unused=True)
    params = {k: v.detach() for k, v in adapted.params.items()}
    return grads, params, loss.detach(), adapted.facts.strategy


EXACT = [
    ("checkpoint", {"segment": 3, "pullback": "segment"}),
    ("checkpoint", {"segment": 3, "pullback": "step"}),
    ("revolve", {"slots": 2}),
    ("offload", {"segment": 2, "pullback": "step"}),  # checkpoint's path on a CPU
    ("auto", {}),  # under a budget below naive's peak: a recomputing schedule
]


@functools.cache
def _naive(msl: bool):
    return _meta_gradient("naive", msl=msl)


@pytest.mark.parametrize("msl", [True, False], ids=["msl", "final"])
@pytest.mark.parametrize("strategy,kw", EXACT, ids=[f"{s}-{kw}" for s, kw in EXACT])
def test_exact_schedules_give_naives_meta_gradient(strategy, kw, msl):
    if strategy == "auto":
        kw = {"memory_budget": _naive_peak() - 1}
    ref_g, ref_p, ref_q, _ = _naive(msl)
    g, p, q, ran = _meta_gradient(strategy, msl=msl, **kw)
    assert not ran.startswith("naive"), ran
    assert all(x is not None for x in ref_g[:4]), "naive gave the rule's weights no gradient"
    scale = grad_scale(ref_g)
    for i, (a, b) in enumerate(zip(g, ref_g)):
        assert_scaled_close(a, b, 1e-12, f"grad[{i}]", scale=scale)
    for k in ref_p:  # the adapted parameters and the loss: bitwise
        torch.testing.assert_close(p[k], ref_p[k], rtol=0, atol=0)
    torch.testing.assert_close(q, ref_q, rtol=0, atol=0)


def _naive_peak() -> int:
    model = make_model(p_drop=0.1)
    maml = effmaml.MAML(model, ce_loss, _rule(), "naive")
    pred = maml.estimate(make_batch(0), STEPS, "naive")
    return next(iter(pred.values())).peak_bytes


def test_rule_weights_meta_gradient_matches_finite_differences():
    """naive itself, on one weight of the network, against a central difference of the
    meta-objective (the rule is smooth away from ReLU's kinks)."""
    rule = _rule()
    g = _meta_gradient("naive", rule=rule, steps=3)[0]
    key = "net.w1"
    w = rule.weights[key]
    idx = (1, 2)
    h = 1e-6
    values = []
    for sign in (1, -1):
        with torch.no_grad():
            w[idx] += sign * h
        values.append(_meta_gradient("naive", rule=rule, steps=3)[2])
        with torch.no_grad():
            w[idx] -= sign * h
    fd = (values[0] - values[1]) / (2 * h)
    analytic = g[list(rule.weights).index(key)][idx]
    torch.testing.assert_close(analytic, fd, rtol=1e-5, atol=1e-9)


def test_untrained_rule_with_zero_output_is_adam():
    """start="adam", out_scale=0: d = m̂/(√v̂ + eps) exactly and s = 0, so the rule's step is
    effmaml.Adam's with betas (0.9, beta2), step after step."""
    rule = LearnedOptimizer(0.01, out_scale=0.0, dtype=F64)
    adam = effmaml.Adam(0.01, betas=(0.9, 0.999))
    torch.manual_seed(0)
    params = {"a": torch.randn(4, 3, dtype=F64), "b": torch.randn(5, dtype=F64)}
    s_rule, s_adam = rule.init(params), adam.init(params)
    p_rule, p_adam = dict(params), dict(params)
    for t in range(6):
        grads = {k: torch.randn_like(v) for k, v in params.items()}
        s_rule, p_rule = rule.step(s_rule, p_rule, grads, t, rule.hyperparameters())
        s_adam, p_adam = adam.step(s_adam, p_adam, grads, t, {})
        for k in params:
            torch.testing.assert_close(p_rule[k], p_adam[k], rtol=1e-13, atol=1e-15)


def test_step_is_pure():
    """step builds new tensors: the state and parameters handed to it are unchanged, and
    the same inputs give the same outputs (what a recomputation relies on)."""
    rule = _rule()
    torch.manual_seed(0)
    params = {"a": torch.randn(4, 3, dtype=F64), "b": torch.randn(5, dtype=F64)}
    grads = {k: torch.randn_like(v) for k, v in params.items()}
    state = rule.step(rule.init(params), params, grads, 0, rule.hyperparameters())[0]
    before = ({k: v.clone() for k, v in state.items()}, {k: v.clone() for k, v in params.items()})
    out1 = rule.step(state, params, grads, 1, rule.hyperparameters())
    out2 = rule.step(state, params, grads, 1, rule.hyperparameters())
    for k in state:
        assert torch.equal(state[k], before[0][k])
    for k in params:
        assert torch.equal(params[k], before[1][k])
        assert torch.equal(out1[1][k], out2[1][k])
    assert out1[0]["stats"].data_ptr() != state["stats"].data_ptr()


def test_step_reads_the_weights_it_is_handed():
    """The strategies differentiate the copies they pass as ``hyper``: step must read
    those, not the rule's own tensors."""
    rule = _rule()
    params = {"a": torch.ones(3, dtype=F64)}
    grads = {"a": torch.tensor([1.0, -2.0, 0.5], dtype=F64)}
    state = rule.init(params)
    hyper = {k: v.detach().clone().requires_grad_(True) for k, v in rule.hyperparameters().items()}
    _, new = rule.step(state, params, grads, 0, hyper)
    g = torch.autograd.grad(new["a"].sum(), list(hyper.values()), allow_unused=True)
    assert all(x is not None for x in g)
    assert all(w.grad is None for w in rule.parameters())


def test_registry_wide():
    """Every registered strategy: the exact ones give naive's meta-gradient of the rule's
    weights (above); first_order and implicit give none and say so; truncated gives the
    gradient through its window (naive's when the window covers the unroll); a strategy
    not listed here fails this test until its behaviour with a learned rule is stated."""
    stated = {"first_order", "implicit", "truncated"}
    exact = {name for name, cls in effmaml.STRATEGIES.items() if cls.exact}
    assert {"naive", "checkpoint", "revolve", "offload", "auto"} <= exact
    assert exact | stated >= set(effmaml.STRATEGIES), (
        f"state what {sorted(set(effmaml.STRATEGIES) - exact - stated)} give a learned rule"
    )
    for name in ("first_order", "implicit"):
        kw = {"prox_lambda": 1.0} if name == "implicit" else {}
        with pytest.warns(UserWarning, match="no meta-gradient to the learned"):
            g = _meta_gradient(name, msl=False, **kw)[0]
        assert all(x is None for x in g[:4]), f"{name} gave the rule's weights a gradient"
    if "truncated" in effmaml.STRATEGIES:
        ref = _naive(False)[0][:4]
        whole = _meta_gradient("truncated", msl=False, window=STEPS)[0][:4]
        part = _meta_gradient("truncated", msl=False, window=2)[0][:4]
        scale = grad_scale(ref)
        for a, b in zip(whole, ref):
            assert_scaled_close(a, b, 1e-12, "truncated(window=N)", scale=scale)
        assert all(x is not None and x.abs().sum() > 0 for x in part)
        diff = max((a - b).abs().max().item() for a, b in zip(part, ref))
        assert diff > 1e-3 * scale, "a window of 2 of 7 steps gave naive's gradient"


def test_state_dict_round_trip_and_errors():
    a, b = _rule(seed=1), _rule(seed=2)
    assert not torch.equal(a.weights["net.w0"], b.weights["net.w0"])
    b.load_state_dict(a.state_dict())
    for k in a.weights:
        assert torch.equal(a.weights[k], b.weights[k])
        assert b.weights[k].requires_grad
    with pytest.raises(ValueError, match="build the LearnedOptimizer with"):
        _rule(start="random").load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="widths it was trained with"):
        _rule(hidden=(8, 5)).load_state_dict(a.state_dict())


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="decays"):
        LearnedOptimizer(decays=(0.9, 1.0))
    with pytest.raises(ValueError, match="add 0.9 to decays"):
        LearnedOptimizer(decays=(0.5, 0.99))
    with pytest.raises(ValueError, match="hidden"):
        LearnedOptimizer(hidden=(4, 0))
    with pytest.raises(ValueError, match="start"):
        LearnedOptimizer(start="sgd")
    with pytest.raises(ValueError, match="eps"):
        LearnedOptimizer(eps=0.0)
    rule = LearnedOptimizer(decays=(0.5, 0.99), start="random")
    assert "net.skip" not in rule.weights
    assert rule.features == 3
    assert LearnedOptimizer(param_feature=True).features == 6
    state = rule.init({"a": torch.zeros(3)})
    with pytest.raises(ValueError, match="coordinates"):
        rule.step(state, {"a": torch.zeros(4)}, {"a": torch.zeros(4)}, 0, {})


def test_random_start_learns_from_a_small_step():
    """start='random': the first update is about lr·out_scale in size, not lr."""
    rule = LearnedOptimizer(1.0, start="random", out_scale=1e-3, dtype=F64)
    params = {"a": torch.zeros(1000, dtype=F64)}
    grads = {"a": torch.randn(1000, dtype=F64)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, new = rule.step(rule.init(params), params, grads, 0, rule.hyperparameters())
    assert 0 < new["a"].abs().mean() < 1e-2
