"""Inner optimizers: values match torch.optim; Adam's meta-gradient is finite at zero grads."""

import pytest
import torch

import effmaml

from .helpers import ce_loss, make_batch, make_model


@pytest.mark.parametrize(
    "ours,theirs",
    [
        (lambda: effmaml.SGD(0.1), lambda p: torch.optim.SGD(p, lr=0.1)),
        (
            lambda: effmaml.SGD(0.1, momentum=0.9, weight_decay=0.01),
            lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.01),
        ),
        (
            lambda: effmaml.SGD(0.1, momentum=0.9, nesterov=True),
            lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True),
        ),
    ],
    ids=["sgd", "momentum_wd", "nesterov"],
)
def test_sgd_matches_torch_optim(ours, theirs):
    torch.manual_seed(0)
    p = torch.randn(5, dtype=torch.float64)
    grads = [torch.randn(5, dtype=torch.float64) for _ in range(4)]
    opt = ours()
    state, params = opt.init({"p": p}), {"p": p}
    ref = p.clone().requires_grad_()
    torch_opt = theirs([ref])
    for t, g in enumerate(grads):
        state, params = opt.step(state, params, {"p": g}, t, opt.hyperparameters())
        ref.grad = g.clone()
        torch_opt.step()
        torch.testing.assert_close(params["p"], ref.detach(), rtol=1e-14, atol=1e-15)


def test_adam_close_to_torch_optim():
    """eps² sits under the square root (Note [Adam's eps inside the square root]), so the
    update differs from torch.optim.Adam's by far less than eps relative to the step."""
    torch.manual_seed(0)
    p = torch.randn(5, dtype=torch.float64)
    opt = effmaml.Adam(0.01)
    state, params = opt.init({"p": p}), {"p": p}
    ref = p.clone().requires_grad_()
    torch_opt = torch.optim.Adam([ref], lr=0.01)
    for t in range(5):
        g = torch.randn(5, dtype=torch.float64)
        state, params = opt.step(state, params, {"p": g}, t, {})
        ref.grad = g
        torch_opt.step()
    torch.testing.assert_close(params["p"], ref.detach(), rtol=0, atol=1e-9)


def test_adam_meta_gradient_finite_with_exactly_zero_gradient_entries():
    model = make_model(bn=False)
    with torch.no_grad():  # a dead output unit: its weights get an exactly-zero gradient
        model[6].weight[2].zero_()
        model[6].bias[2] = -1e4

    def loss_fn(m, batch):
        x, y = batch
        y = torch.where(y == 2, torch.zeros_like(y), y)
        return torch.nn.functional.cross_entropy(m(x), y)

    maml = effmaml.MAML(model, loss_fn, effmaml.Adam(0.01))
    adapted = maml.adapt(make_batch(0), steps=3)
    ce_loss(adapted, make_batch(1)).backward()
    for p in model.parameters():
        assert torch.isfinite(p.grad).all()
    # the naive formula m / (sqrt(v) + eps) would give NaN here: check the premise
    g = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    v = g * g
    (d,) = torch.autograd.grad((g / (torch.sqrt(v) + 1e-8)).sum(), g, create_graph=True)
    (dd,) = torch.autograd.grad(d.sum(), g)
    assert not torch.isfinite(dd).all()


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: effmaml.SGD(-1.0), "non-negative"),
        (lambda: effmaml.SGD(0.1, nesterov=True), "momentum > 0"),
        (lambda: effmaml.Adam(0.1, eps=0.0), "eps"),
        (lambda: effmaml.SGD("0.1"), "float"),
    ],
)
def test_bad_hyperparameters(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


def test_a_per_step_shaped_rate_without_per_step_is_refused_before_work():
    """What a user tries first for per-step rates: an (N,) lr without per_step=True. Refused
    at construction with the rule, not a broadcasting error from inside the update."""
    model = make_model()
    with pytest.raises(ValueError, match=r"lr has shape \(6,\).*'0.weight'.*per_step=True"):
        effmaml.MAML(model, ce_loss, effmaml.SGD(torch.full((6,), 0.1, dtype=torch.float64)))
    rates = {n: torch.ones(3, dtype=torch.float64) for n, _ in model.named_parameters()}
    with pytest.raises(ValueError, match=r"lr\['0.weight'\] has shape \(3,\)"):
        effmaml.MAML(model, ce_loss, effmaml.Adam(rates))
    per_step = effmaml.SGD(torch.full((6,), 0.1, dtype=torch.float64), per_step=True)
    effmaml.MAML(model, ce_loss, per_step).adapt(make_batch(0), steps=6)
