"""implicit (iMAML): against closed forms on ridge regression, and against a converged naive."""

import warnings

import pytest
import torch
from torch import nn

import effmaml

from .helpers import assert_scaled_close, grad_scale

F64 = torch.float64


def sq_loss(module, batch):
    x, y = batch
    return 0.5 * ((module(x).squeeze(-1) - y) ** 2).mean()


def ridge_data(seed, n, d=6):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=F64), torch.randn(n, generator=g, dtype=F64)


def linear(d=6, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(d, 1, bias=False).to(F64)


@pytest.mark.parametrize("lam", [0.3, 2.0])
def test_ridge_matches_closed_form(lam):
    """φ* = (H + λI)⁻¹(Xᵀy/n + λθ); dL_q/dθ = λ(H + λI)⁻¹ ∇L_q(φ*)."""
    (X, y), (Xq, yq), d = ridge_data(1, 20), ridge_data(2, 15), 6
    model = linear()
    maml = effmaml.MAML(model, sq_loss, effmaml.SGD(0.3), "implicit", lam=lam, cg_steps=d + 2)
    adapted = maml.adapt((X, y), steps=600)
    sq_loss(adapted, (Xq, yq)).backward()
    theta = model.weight.detach().reshape(-1)
    eye = torch.eye(d, dtype=F64)
    H = X.T @ X / len(X)
    phi = torch.linalg.solve(H + lam * eye, X.T @ y / len(X) + lam * theta)
    assert_scaled_close(adapted.params["weight"].reshape(-1), phi, rel=1e-12, what="φ_N")
    gq = Xq.T @ (Xq @ phi - yq) / len(Xq)
    expected = lam * torch.linalg.solve(H + lam * eye, gq)
    assert_scaled_close(model.weight.grad.reshape(-1), expected, rel=1e-10, what="grad")
    assert adapted.facts.solve.cg_residual < 1e-10
    assert adapted.facts.solve.lam == lam


def test_distinct_batches_use_the_mean_hessian():
    """With distinct batches L_train is their mean: H = mean of X_tᵀX_t/n, evaluated at φ_N."""
    batches = [ridge_data(10 + t, 12) for t in range(3)]
    Xq, yq = ridge_data(2, 15)
    lam, d = 0.5, 6
    model = linear()
    maml = effmaml.MAML(model, sq_loss, effmaml.SGD(0.1), "implicit", lam=lam, cg_steps=d + 2)
    adapted = maml.adapt(batches)
    sq_loss(adapted, (Xq, yq)).backward()
    phi = adapted.params["weight"].detach().reshape(-1)
    H = sum(X.T @ X / len(X) for X, _ in batches) / 3
    gq = Xq.T @ (Xq @ phi - yq) / len(Xq)
    expected = lam * torch.linalg.solve(H + lam * torch.eye(d, dtype=F64), gq)
    assert_scaled_close(model.weight.grad.reshape(-1), expected, rel=1e-10, what="grad")
    # 3 distinct batches: every Hessian-vector product passes over each of them once
    assert adapted.facts.solve.hvp_batch_passes == 3 * adapted.facts.solve.cg_iterations
    # hvp_batches=1: only the last distinct batch enters the Hessian
    model1 = linear()
    maml = effmaml.MAML(model1, sq_loss, effmaml.SGD(0.1), "implicit", lam=lam, hvp_batches=1)
    maml.strategy.cg_steps = d + 2
    adapted = maml.adapt(batches)
    sq_loss(adapted, (Xq, yq)).backward()
    X2 = batches[-1][0]
    expected = lam * torch.linalg.solve(X2.T @ X2 / len(X2) + lam * torch.eye(d, dtype=F64), gq)
    assert_scaled_close(model1.weight.grad.reshape(-1), expected, rel=1e-10, what="grad")
    # the same batch object repeated is one batch
    one = effmaml.MAML(linear(), sq_loss, effmaml.SGD(0.1), "implicit", lam=lam)
    a1 = one.adapt([batches[0]] * 4)
    sq_loss(a1, (Xq, yq)).backward()
    assert a1.facts.solve.hvp_batch_passes == a1.facts.solve.cg_iterations


class Smooth(nn.Sequential):
    def __init__(self):
        super().__init__(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1))


@pytest.mark.parametrize(
    "params,inner",
    [(None, "sgd"), (lambda n: n.startswith("4."), "sgd"), (None, "momentum")],
    ids=["all-sgd", "head-only", "all-momentum"],
)
def test_converged_matches_naive_on_the_proximal_objective(params, inner):
    """Run to convergence: naive (prox_lambda=λ) differentiates the whole path, implicit only
    the solution; the two meta-gradients agree, fixed parameters' cross term included."""
    lam, steps = 2.0, 300
    X, y = ridge_data(3, 32, d=4)
    Xq, yq = ridge_data(4, 16, d=4)
    opt = effmaml.SGD(0.2) if inner == "sgd" else effmaml.SGD(0.1, momentum=0.5)
    grads = {}
    for name, kw in [("naive", {"prox_lambda": lam}), ("implicit", {"lam": lam, "cg_steps": 60})]:
        torch.manual_seed(0)
        model = Smooth().to(F64)
        maml = effmaml.MAML(model, sq_loss, opt, name, params=params, **kw)
        adapted = maml.adapt((X, y), steps=steps)
        sq_loss(adapted, (Xq, yq)).backward()
        grads[name] = {n: p.grad.clone() for n, p in model.named_parameters()}
    scale = grad_scale(grads["naive"].values())
    for n in grads["naive"]:
        assert_scaled_close(grads["implicit"][n], grads["naive"][n], rel=1e-7, scale=scale, what=n)


def test_dropout_is_off_and_rng_untouched_during_the_solve():
    X, y = ridge_data(3, 32, d=4)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, 1)).to(F64)
    maml = effmaml.MAML(model, sq_loss, effmaml.SGD(0.1), "implicit", lam=1.0, cg_steps=30)
    adapted = maml.adapt((X, y), steps=5)
    q = sq_loss(adapted, ridge_data(4, 16, d=4))
    before = torch.get_rng_state()
    g1 = torch.autograd.grad(q, list(model.parameters()), retain_graph=True)
    assert torch.equal(torch.get_rng_state(), before)
    g2 = torch.autograd.grad(q, list(model.parameters()))
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)  # no dropout mask drawn in the solve: deterministic
    assert model[2].training  # the module's mode is restored


def test_options_and_warnings():
    X, y = ridge_data(3, 8)
    with pytest.raises(ValueError, match="lam must be"):
        effmaml.MAML(linear(), sq_loss, effmaml.SGD(0.1), "implicit", lam=0)
    with pytest.raises(ValueError, match="cg_steps"):
        effmaml.MAML(linear(), sq_loss, effmaml.SGD(0.1), "implicit", cg_steps=0)
    maml = effmaml.MAML(linear(), sq_loss, effmaml.SGD(0.1), "implicit", lam=1.0, prox_lambda=2.0)
    with pytest.raises(ValueError, match="same λ"):
        maml.adapt((X, y), steps=2)
    # prox_lambda alone sets λ
    a = effmaml.MAML(linear(), sq_loss, effmaml.SGD(0.1), "implicit", prox_lambda=3.0).adapt(
        (X, y), steps=2
    )
    assert a.facts.solve.lam == 3.0
    lr = torch.tensor(0.1, dtype=F64, requires_grad=True)
    maml = effmaml.MAML(linear(), sq_loss, effmaml.SGD(lr), "implicit")
    with pytest.warns(UserWarning, match="no meta-gradient to the learned"):
        maml.adapt((X, y), steps=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        effmaml.MAML(linear(), sq_loss, effmaml.SGD(0.1), "implicit").adapt((X, y), steps=2)
