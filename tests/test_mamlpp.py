"""MAML++'s recipe beyond the exactness specification (which runs per-step rates, per-step
BatchNorm and the multi-step loss through every schedule): the step-count errors, per-step
BatchNorm in eval mode and with frozen statistics, which slices a run touches, the
first-order multi-step loss, and the annealing weights."""

import copy

import pytest
import torch
import torch.nn.functional as F

import effmaml

from .helpers import (
    FULL_ROW,
    Opt,
    assert_same_as_naive,
    ce_loss,
    compare_to_naive,
    make_batch,
    make_model,
    run_model,
)

F64 = torch.float64


def _batches(n, seed=60):
    return [make_batch(seed + t) for t in range(n)]


def test_per_step_rates_need_as_many_steps_as_they_have():
    lr = torch.full((5,), 0.1, dtype=F64, requires_grad=True)
    maml = effmaml.MAML(make_model(), ce_loss, effmaml.SGD(lr, per_step=True), "checkpoint")
    with pytest.raises(ValueError, match=r"have 5 steps but adapt got 7.*lr\[-1:\]\.expand\(2\)"):
        maml.adapt(_batches(7))
    with pytest.raises(ValueError, match=r"have 5 steps but adapt got 3.*lr\[:3\]"):
        maml.adapt(_batches(3))
    maml.adapt(_batches(5))  # exactly 5: fine
    with pytest.raises(ValueError, match="leading step dimension"):
        effmaml.SGD(0.1, per_step=True)
    with pytest.raises(ValueError, match="same number of steps"):
        effmaml.Adam({"a": torch.ones(3), "b": torch.ones(4)}, per_step=True)


def test_per_step_batchnorm_with_fewer_slices_than_steps_fails_before_any_work():
    model = effmaml.per_step_batchnorm(make_model(), 4)
    maml = effmaml.MAML(model, ce_loss, effmaml.SGD(0.1), "revolve")
    with pytest.raises(
        ValueError, match=r"runs 6 inner steps but the per-step BatchNorm '1' has 4"
    ):
        maml.adapt(_batches(6))
    with pytest.raises(RuntimeError, match="needs the inner step's index"):
        model(make_batch(0)[0])  # outside an inner step
    with effmaml.at_step(5), pytest.raises(ValueError, match="4 per-step slices"):
        model(make_batch(0)[0])


def test_multi_step_loss_arguments_are_checked():
    maml = effmaml.MAML(make_model(), ce_loss, effmaml.SGD(0.1), "checkpoint")
    with pytest.raises(ValueError, match="has 2 entries but adapt runs 3"):
        maml.adapt(_batches(3), query=make_batch(9), step_weights=[1.0, 1.0])
    with pytest.raises(ValueError, match="without a query batch"):
        maml.adapt(_batches(3), step_weights=[1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="not all zero"):
        maml.adapt(_batches(3), query=make_batch(9), step_weights=[0.0, 0.0, 0.0])
    imaml = effmaml.MAML(make_model(), ce_loss, effmaml.SGD(0.1), "implicit")
    with pytest.raises(ValueError, match="no multi-step loss"):
        imaml.adapt(_batches(3), query=make_batch(9))


def test_a_query_alone_is_the_final_query_loss():
    """adapt(..., query=q) without weights: Σ_t w_t L(φ_{t+1}) with w = (0, ..., 0, 1)."""
    model = make_model()
    maml = effmaml.MAML(model, ce_loss, effmaml.SGD(0.1), "checkpoint", segment=2)
    a = maml.adapt(_batches(4), query=make_batch(9))
    torch.testing.assert_close(a.query_loss, ce_loss(a, make_batch(9)), rtol=0, atol=0)
    assert [float(q) for q in a.query_losses[:3]] == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("strategy,kw", [("checkpoint", {"segment": 2}), ("revolve", {"slots": 2})])
@pytest.mark.parametrize("mode", ["eval", "frozen_stats"])
def test_per_step_batchnorm_in_eval_mode_and_with_frozen_statistics(mode, strategy, kw):
    def model():
        m = effmaml.per_step_batchnorm(make_model(), 5)
        with torch.no_grad():
            m[1].running_mean.add_(0.1 * torch.arange(5, dtype=F64)[:, None])
        return m.eval() if mode == "eval" else m.train()

    opts = {"update_running_stats": False} if mode == "frozen_stats" else {}
    batches, query = _batches(5), make_batch(9)
    ref = run_model(model(), ce_loss, batches, query, "naive", **opts)
    ours = run_model(model(), ce_loss, batches, query, strategy, **kw, **opts)
    assert_same_as_naive(ours, ref)
    before = model()[1].running_mean
    torch.testing.assert_close(ours["buffers"]["1.running_mean"], before, rtol=0, atol=0)


def test_each_step_updates_its_own_slice_once():
    model = effmaml.per_step_batchnorm(make_model(), 6)
    before = model[1].running_mean.clone()
    a = effmaml.MAML(model, ce_loss, effmaml.SGD(0.1), "checkpoint", segment=2).adapt(_batches(4))
    after = a.buffers["1.running_mean"]
    assert all(not torch.equal(after[t], before[t]) for t in range(4))
    assert torch.equal(after[4:], before[4:])  # slices of steps that did not run
    assert a.buffers["1.num_batches_tracked"].tolist() == [1, 1, 1, 1, 0, 0]
    assert torch.equal(model[1].running_mean, before)  # the model itself is never mutated


def test_first_order_multi_step_loss_hands_each_query_gradient_to_theta():
    """FOMAML with the multi-step loss: the meta-gradient is Σ_t w_t ∂L_q/∂φ at φ_{t+1}
    (each Jacobian dφ_{t+1}/dθ taken as the identity), computed here by hand."""
    w = [0.5, 0.0, 1.0]
    model = make_model(bn=False)
    maml = effmaml.MAML(model, ce_loss, effmaml.SGD(0.1), "first_order")
    a = maml.adapt(_batches(3), query=make_batch(9), step_weights=w)
    got = torch.autograd.grad(a.query_loss, list(model.parameters()))
    ref = make_model(bn=False)
    phi = {k: v.detach().clone() for k, v in ref.named_parameters()}
    want = [torch.zeros_like(p) for p in phi.values()]
    for t, batch in enumerate(_batches(3)):
        leaves = {k: v.requires_grad_(True) for k, v in phi.items()}
        loss = ce_loss(lambda x, p=leaves: torch.func.functional_call(ref, p, (x,)), batch)
        g = torch.autograd.grad(loss, list(leaves.values()))
        phi = {k: (v - 0.1 * gk).detach() for (k, v), gk in zip(leaves.items(), g)}
        if w[t]:
            leaves = {k: v.requires_grad_(True) for k, v in phi.items()}
            q = ce_loss(lambda x, p=leaves: torch.func.functional_call(ref, p, (x,)), make_batch(9))
            for acc, gq in zip(want, torch.autograd.grad(q, list(leaves.values()))):
                acc += w[t] * gq
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-14)


def test_msl_weights_anneal_from_uniform_to_the_last_step():
    assert effmaml.msl_weights(4, 0.0) == [0.25] * 4
    mid, end = effmaml.msl_weights(4, 0.5), effmaml.msl_weights(4, 1.0)
    assert mid[:3] == [0.125] * 3 and mid[3] == pytest.approx(0.625)
    assert end[:3] == [0.03 / 4] * 3 and end[3] == pytest.approx(1 - 3 * 0.0075)
    assert effmaml.msl_weights(4, 7.0) == end  # stays annealed
    for p in (0.0, 0.3, 1.0, 2.0):
        assert sum(effmaml.msl_weights(5, p)) == pytest.approx(1.0)


def test_the_full_recipe_at_once_equals_naive():
    """LSLR + per-step BatchNorm + MSL + Adam + dropout + clipping + ANIL head + a lazy
    source + the proximal term, under the step-wise checkpoint schedule."""
    row = Opt(**{**FULL_ROW.__dict__, "lr": "per_step", "bn": "per_step", "msl": True})
    compare_to_naive(row, "checkpoint", 7, segment=3, pullback="step")
    compare_to_naive(row, "revolve", 7, slots=2)


def test_per_step_batchnorm_is_a_batchnorm_at_each_slice():
    """Slice t of a converted model computes what the original BatchNorm computes."""
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(3).double()
    converted = effmaml.per_step_batchnorm(torch.nn.Sequential(bn), 2)
    x = torch.randn(4, 3, 5, 5, dtype=F64)
    with effmaml.at_step(1):
        out = converted(x)
    torch.testing.assert_close(out, F.batch_norm(x, None, None, bn.weight, bn.bias, True))


def test_per_step_batchnorm_copies_a_float64_batchnorm_exactly():
    """Each slice is the original bitwise: the copy is made in the original's dtype (it was
    made in float32 and cast after, rounding a float64 model's statistics and affine
    parameters to float32)."""
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm1d(4).double()
    with torch.no_grad():
        for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var):
            t.copy_(torch.rand(4, dtype=F64) + 0.5)
    converted = effmaml.per_step_batchnorm(torch.nn.Sequential(bn), 3)[0]
    for name in ("weight", "bias", "running_mean", "running_var"):
        got = getattr(converted, name)
        assert got.dtype == F64
        assert torch.equal(got, getattr(bn, name).expand(3, -1)), name


def test_per_step_batchnorm_keeps_a_cumulative_average():
    """momentum=None (a cumulative moving average) stays one: each slice continues the
    original's average with its own count, as the BatchNorm itself would."""
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm1d(4, momentum=None).double()
    for _ in range(3):  # the history the slices continue from
        bn(torch.randn(8, 4, dtype=F64))
    converted = effmaml.per_step_batchnorm(torch.nn.Sequential(copy.deepcopy(bn)), 2)[0]
    assert converted.momentum is None
    for seed in range(4):
        x = torch.randn(8, 4, dtype=F64, generator=torch.Generator().manual_seed(seed))
        with effmaml.at_step(1):
            converted(x)
        bn(x)
    torch.testing.assert_close(converted.running_mean[1], bn.running_mean, rtol=1e-14, atol=0)
    torch.testing.assert_close(converted.running_var[1], bn.running_var, rtol=1e-14, atol=0)
    assert converted.num_batches_tracked.tolist() == [3, 7]


def test_a_cumulative_per_step_batchnorm_under_recomputation_equals_naive():
    def run(strategy, **kw):
        model = make_model()
        model[1].momentum = None
        model = effmaml.per_step_batchnorm(model, 4)
        a = effmaml.MAML(model, ce_loss, effmaml.SGD(0.1), strategy, **kw).adapt(_batches(4))
        g = torch.autograd.grad(ce_loss(a, make_batch(9)), list(model.parameters()))
        return a.buffers, g

    (ref_b, ref_g), (b, g) = run("naive"), run("checkpoint", segment=2, pullback="step")
    for k in ref_b:
        torch.testing.assert_close(b[k], ref_b[k], rtol=0, atol=0)
    for x, y in zip(g, ref_g):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)


def test_the_probe_counts_a_query_graph_without_the_state_it_is_evaluated_at():
    """With a multi-step loss, A (one step's graph) holds the query's graph at φ_1, but not
    φ_1's parameters, which the query's layers save (a linear layer saves its weight): they
    are the next step's input state, which naive's next graph and the schedules' stored
    states already count (Note [A with a multi-step loss])."""
    from effmaml.memory import saved_bytes

    model = make_model()
    maml = effmaml.MAML(model, ce_loss, effmaml.SGD(0.1), "checkpoint")
    batch, query = make_batch(1), make_batch(2)
    plain = maml.measure(batch).step_graph_bytes
    with_query = maml.measure(batch, query).step_graph_bytes
    params = {k: p.detach().clone().requires_grad_(True) for k, p in model.named_parameters()}
    with saved_bytes() as count:
        ce_loss(lambda x: torch.func.functional_call(model, params, (x,)), query)
    query_graph = count.without(params.values())
    weights = count.bytes - query_graph  # the query saved its weights too
    assert weights > 0.1 * (plain + query_graph)  # counting them would fail below
    # (within a few bytes: the two graphs may share a small storage, counted once)
    assert with_query == pytest.approx(plain + query_graph, rel=0.03)
