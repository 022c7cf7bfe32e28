"""The adapted model as a module (``effmaml.module.FunctionalModel``, ``effmaml.Adapted``):
methods, submodules, attributes and properties on the adapted tensors, its own train/eval
mode, parameters and state_dict, a plain copy, continuing to adapt, BatchNorm at test
time; and inside ``loss_fn``, ``m`` as the same kind of object under every strategy."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import effmaml
from effmaml.module import FunctionalModel

from .helpers import (
    F64,
    P_DROP,
    assert_same_as_naive,
    assert_scaled_close,
    below_naive_for,
    ce_loss,
    grad_scale,
    make_batch,
    result,
)

STEPS = 5


class Net(nn.Module):
    """A backbone with BatchNorm and dropout, a head, and the methods metric-based and
    ANIL-style losses call."""

    def __init__(self, p_drop=0.0):
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Dropout(p_drop)
        )
        self.fc = nn.Linear(8, 3)
        self.temperature = 2.0

    def embed(self, x):
        return self.backbone(x)

    def forward(self, x):
        return self.fc(self.embed(x))

    @property
    def head_norm(self):
        return self.fc.weight.norm()


def make_net(seed=0, p_drop=0.0):
    torch.manual_seed(seed)
    return Net(p_drop).to(F64)


def method_loss(m, batch):
    """A loss through the module's methods, a submodule, an attribute, a property and a
    parameter read outside any call (at naive's step 0 it is the model's own tensor)."""
    x, y = batch
    logits = m.fc(m.embed(x)) / m.temperature
    return F.cross_entropy(logits, y) + 1e-2 * m.head_norm + 1e-3 * m.fc.weight.pow(2).sum()


def forward_loss(m, batch):
    """The same loss written with m(x) and plain reads."""
    x, y = batch
    logits = m(x) / 2.0
    weight = dict(m.named_parameters())["fc.weight"]
    return F.cross_entropy(logits, y) + 1e-2 * weight.norm() + 1e-3 * weight.pow(2).sum()


def _adapted(strategy="naive", n=STEPS, **kw):
    model = make_net()
    maml = effmaml.MAML(model, method_loss, effmaml.SGD(0.3), strategy, **kw)
    return model, maml.adapt([make_batch(t) for t in range(n)])


# -- the adapted model ------------------------------------------------------------------
def test_methods_submodules_attributes_and_properties_read_the_adapted_tensors():
    model, adapted = _adapted()
    x = make_batch(9)[0]
    tensors = {**dict(adapted.named_parameters()), **adapted.buffers}
    with torch.no_grad():
        ref_out = functional_call(model, {k: v.clone() for k, v in tensors.items()}, (x,))
        ref_embed = functional_call(model.backbone, _under(tensors, "backbone."), (x,))
    torch.testing.assert_close(adapted(x), ref_out, rtol=0, atol=0)
    torch.testing.assert_close(adapted.embed(x), ref_embed, rtol=0, atol=0)
    torch.testing.assert_close(adapted.backbone(x), ref_embed, rtol=0, atol=0)
    assert adapted.fc.weight is adapted.params["fc.weight"]
    assert adapted.backbone[0].weight is adapted.params["backbone.0.weight"]
    assert adapted.get_parameter("fc.bias") is adapted.params["fc.bias"]
    assert adapted.backbone[1].running_mean is adapted.buffers["backbone.1.running_mean"]
    torch.testing.assert_close(adapted.head_norm, adapted.params["fc.weight"].norm())
    assert adapted.head_norm.requires_grad  # on φ_N's graph
    assert adapted.temperature == 2.0
    assert len(adapted.backbone) == 4 and isinstance(adapted.backbone[-1], FunctionalModel)
    assert [type(v._module) for v in adapted.backbone] == [type(m) for m in model.backbone]
    assert [n for n, _ in adapted.named_modules()] == [n for n, _ in model.named_modules()]
    assert not adapted.fc.weight.equal(model.fc.weight)  # the model is not the adapted one


def _under(tensors, prefix):
    return {k[len(prefix) :]: v.clone() for k, v in tensors.items() if k.startswith(prefix)}


def test_parameters_are_the_adapted_tensors_and_differentiable():
    model, adapted = _adapted()
    named = list(adapted.named_parameters())
    assert [n for n, _ in named] == [n for n, _ in model.named_parameters()]
    assert all(t is adapted.params[n] for n, t in named)
    assert [t for _, t in named] == list(adapted.parameters())
    assert all(t.grad_fn is not None for t in adapted.parameters())
    sum(p.sum() for p in adapted.parameters()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    assert list(adapted.buffers()) == list(adapted.buffers.values())
    assert [n for n, _ in adapted.named_buffers()] == [n for n, _ in model.named_buffers()]


def test_state_dict_holds_the_adapted_tensors():
    model, adapted = _adapted()
    state = adapted.state_dict()
    assert list(state) == list(model.state_dict())
    for k, v in state.items():
        value = adapted.params.get(k, adapted.buffers.get(k))
        assert not v.requires_grad and torch.equal(v, value), k
    assert adapted.state_dict(keep_vars=True)["fc.weight"] is adapted.params["fc.weight"]
    plain = make_net(seed=1)
    plain.load_state_dict(state)
    torch.testing.assert_close(plain(make_batch(3)[0]), adapted(make_batch(3)[0]).detach())


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_to_module_is_a_plain_detached_copy(mode):
    model, adapted = _adapted()
    if mode == "eval":
        adapted.eval()
    copy = adapted.to_module()
    assert type(copy) is Net and copy.training == (mode == "train")
    assert all(p.is_leaf and p.requires_grad for p in copy.parameters())
    x = make_batch(4)[0]
    torch.testing.assert_close(copy(x), adapted(x).detach(), rtol=0, atol=0)
    for name, p in copy.named_parameters():
        assert torch.equal(p, adapted.params[name]) and p is not adapted.params[name]
    assert model.training and not model.fc.weight.equal(copy.fc.weight)
    head = adapted.fc.to_module()  # a submodule's copy
    assert type(head) is nn.Linear and torch.equal(head.weight, adapted.params["fc.weight"])


def test_its_own_mode_leaves_the_models_alone():
    model, adapted = _adapted()
    model.backbone[1].eval()  # the user's own per-module flag survives a call
    x = make_batch(4)[0]
    flags = [m.training for m in model.modules()]
    assert adapted.eval() is adapted and not adapted.training and model.training
    out = adapted(x)
    assert [m.training for m in model.modules()] == flags
    with torch.no_grad():
        model.eval()
        ref = functional_call(model, {**adapted.params, **adapted.buffers}, (x,))
        model.train()
        model.backbone[1].eval()
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    adapted.train()
    adapted.backbone.eval()  # a submodule's mode, kept by the root's views
    assert adapted.training and not adapted.backbone.training and adapted.fc.training
    assert not adapted.backbone[1].training


def test_methods_that_would_change_the_model_are_refused():
    _, adapted = _adapted()
    for name in ("to", "zero_grad", "load_state_dict", "requires_grad_", "apply"):
        with pytest.raises(AttributeError, match=rf"{name}\(\) would change .*to_module\(\)"):
            getattr(adapted, name)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = adapted.backbone.nope


# -- m inside loss_fn, under every strategy ----------------------------------------------
def _run(loss_fn, strategy, p_drop=P_DROP, **kw):
    model = make_net(p_drop=p_drop)
    batches = [make_batch(t) for t in range(STEPS)]
    if kw.pop("below_naive", False):
        kw["memory_budget"] = below_naive_for(model, loss_fn, batches)
    inner = effmaml.Adam(0.05)
    maml = effmaml.MAML(model, loss_fn, inner, strategy, params=lambda n: n != "fc.bias", **kw)
    torch.manual_seed(7)
    adapted = maml.adapt(batches)
    loss = method_loss(adapted, make_batch(99))
    return result(loss, list(model.parameters()), adapted)


EXACT = [
    ("checkpoint", {"segment": 2}),
    ("checkpoint", {"segment": 2, "pullback": "step"}),
    ("revolve", {"slots": 2}),
    ("offload", {"segment": 2}),
    ("auto", {"below_naive": True}),
]


@pytest.mark.parametrize("strategy,kw", EXACT, ids=lambda v: str(v))
def test_m_is_the_module_under_every_exact_schedule(strategy, kw):
    """loss_fn through m's methods, submodules, attributes and properties (dropout,
    BatchNorm updated in place on the step's copy, a fixed head bias): naive's values and
    meta-gradient."""
    ref = _run(method_loss, "naive")
    ours = _run(method_loss, strategy, **kw)
    assert_same_as_naive(ours, ref)
    assert int(ours["buffers"]["backbone.1.num_batches_tracked"]) == STEPS
    if strategy == "auto":
        assert not ours["adapted"].facts.chosen.startswith("naive")


@pytest.mark.parametrize("strategy", sorted(effmaml.STRATEGIES))
def test_m_methods_give_what_its_call_gives_under_every_strategy(strategy):
    """The loss written with m's methods and with m(x): the same values and meta-gradient,
    bitwise, under every registered strategy."""
    kw = {"implicit": {"lam": 2.0}, "truncated": {"window": 2}}.get(strategy, {})
    a = _run(method_loss, strategy, p_drop=0.0, **kw)
    b = _run(forward_loss, strategy, p_drop=0.0, **kw)
    for x, y in zip(a["grads"], b["grads"]):
        assert_scaled_close(x, y, 1e-12, scale=grad_scale(b["grads"]))
    torch.testing.assert_close(a["losses"], b["losses"], rtol=0, atol=0)


# -- continuing to adapt ------------------------------------------------------------------
CONTINUED = [("naive", {}), *[(s, kw) for s, kw in EXACT if s != "auto"], ("first_order", {})]


def _per_step_net(p_drop=P_DROP):
    net = make_net(p_drop=p_drop)
    with torch.no_grad():  # per-step BatchNorm with slices that differ
        effmaml.per_step_batchnorm(net, STEPS)
        net.backbone[1].weight.add_(0.1 * torch.arange(STEPS, dtype=F64)[:, None])
    return net


def _continued(strategy, kw, split):
    """Adam (bias correction by step), per-step BatchNorm (slice by step), dropout: adapt
    over the batches in pieces, each continuing the last."""
    model = _per_step_net()
    maml = effmaml.MAML(model, ce_loss, effmaml.Adam(0.05), strategy, **kw)
    batches = [make_batch(t) for t in range(STEPS)]
    torch.manual_seed(7)
    adapted, losses, a = None, [], 0
    for b in [*split, STEPS]:
        adapted = maml.adapt(batches[a:b], start=adapted)
        losses += adapted.losses
        a = b
    out = result(ce_loss(adapted, make_batch(99)), list(model.parameters()), adapted)
    out["losses"] = torch.stack([x.detach() for x in losses])
    return out


@pytest.mark.parametrize("strategy,kw", CONTINUED, ids=lambda v: str(v))
def test_continuing_from_an_adapted_model_is_one_adapt(strategy, kw):
    whole = _continued("naive" if strategy != "first_order" else strategy, {}, [])
    ours = _continued(strategy, kw, [2, 3])
    assert_same_as_naive(ours, whole)
    assert ours["adapted"].first_step == 3 and ours["adapted"].end_step == STEPS


def test_continuing_is_checked():
    model = make_net()
    maml = effmaml.MAML(model, ce_loss, effmaml.SGD(0.1))
    adapted = maml.adapt(make_batch(0), steps=2)
    with pytest.raises(TypeError, match="start= takes an adapted model"):
        maml.adapt(make_batch(1), steps=2, start=model)
    other = effmaml.MAML(make_net(), ce_loss, effmaml.SGD(0.1))
    with pytest.raises(ValueError, match="from this front's model"):
        other.adapt(make_batch(1), steps=2, start=adapted)
    adam = effmaml.MAML(model, ce_loss, effmaml.Adam(0.1))
    with pytest.raises(ValueError, match="another inner optimizer"):
        adam.adapt(make_batch(1), steps=2, start=adapted)
    implicit = effmaml.MAML(model, ce_loss, effmaml.SGD(0.1), "implicit")
    with pytest.raises(ValueError, match="implicit.*cannot continue"):
        implicit.adapt(make_batch(1), steps=2, start=adapted)
    rates = effmaml.SGD(torch.full((3,), 0.1, dtype=F64), per_step=True)
    stepped = effmaml.MAML(model, ce_loss, rates)
    first = stepped.adapt(make_batch(0), steps=3)
    with pytest.raises(ValueError, match="per-step learning rates have 3 steps"):
        stepped.adapt(make_batch(1), steps=1, start=first)


# -- BatchNorm at test time ---------------------------------------------------------------
def test_batchnorm_at_test_time_batch_statistics_or_the_adapted_running_ones():
    """Train mode (the default): the statistics of the batch given, as MAML evaluates;
    nothing is updated. Eval mode: the running statistics the inner steps left."""
    model, adapted = _adapted()
    x = make_batch(4)[0]
    initial = {k: b.clone() for k, b in model.named_buffers()}
    with torch.no_grad():
        batch_stats = functional_call(model, {**adapted.params, **initial}, (x,))
    torch.testing.assert_close(adapted(x), batch_stats, rtol=0, atol=0)  # buffers unused
    assert int(adapted.buffers["backbone.1.num_batches_tracked"]) == STEPS
    with torch.no_grad():
        model.eval()
        running = functional_call(model, {**adapted.params, **adapted.buffers}, (x,))
        stale = functional_call(model, {**adapted.params, **initial}, (x,))
        model.train()
    out = adapted.eval()(x)
    torch.testing.assert_close(out, running, rtol=0, atol=0)
    assert not torch.allclose(out, stale)  # the model's own statistics never moved
    assert int(model.backbone[1].num_batches_tracked) == 0


def test_per_step_batchnorm_evaluates_with_the_last_steps_slice():
    """MAML++: the adapted model normalises with slice N-1 of the per-step statistics."""
    model = _per_step_net(p_drop=0.0)
    adapted = effmaml.MAML(model, ce_loss, effmaml.SGD(0.1)).adapt(make_batch(0), steps=3)
    x = make_batch(4)[0]
    model.eval()
    with torch.no_grad(), effmaml.at_step(2):
        ref = functional_call(model, {**adapted.params, **adapted.buffers}, (x,))
    with torch.no_grad(), effmaml.at_step(3):
        other = functional_call(model, {**adapted.params, **adapted.buffers}, (x,))
    model.train()
    out = adapted.eval()(x)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert not torch.allclose(out, other)


# -- a submodule under two names, a Parameter in two modules -------------------------------
class _Twice(nn.Module):
    """One Linear registered under two names (``self.b = self.a``), applied twice, and a
    Parameter shared by two distinct modules (weight tying)."""

    def __init__(self, twice=True):
        super().__init__()
        self.a = nn.Linear(5, 5)
        if twice:
            self.b = self.a
        self.tied_in, self.tied_out = nn.Linear(5, 5, bias=False), nn.Linear(5, 3)
        self.head = nn.Linear(5, 3)
        self.head.weight = self.tied_out.weight  # one Parameter, two modules

    def forward(self, x):
        second = self.b if hasattr(self, "b") else self.a
        h = torch.tanh(second(torch.tanh(self.a(x))))
        return self.head(torch.tanh(self.tied_in(h))) + self.tied_out(h)


@pytest.mark.parametrize("strategy", sorted(effmaml.STRATEGIES))
def test_a_submodule_under_two_names_leaves_the_model_as_it_was(strategy):
    """torch.func.functional_call's weight tying left an adapted tensor in place of the
    Parameter of a submodule registered under two names (Note [A submodule under two
    names]): the model changed silently, its gradient went nowhere, the next iteration
    crashed. Every strategy now leaves the model's Parameters in place, twice running,
    and gives the meta-gradient of the same network with the module registered once."""
    kw = {"implicit": {"lam": 2.0}, "truncated": {"window": 10}}.get(strategy, {})

    def run(twice):
        torch.manual_seed(0)
        model = _Twice(twice).to(F64)
        before = {n: p for n, p in model.named_parameters(remove_duplicate=False)}
        maml = effmaml.MAML(model, ce_loss, effmaml.SGD(0.1), strategy, **kw)
        grads = []
        for _ in range(2):  # a second iteration crashed
            model.zero_grad()
            adapted = maml.adapt([make_batch(t) for t in range(3)])
            ce_loss(adapted, make_batch(9)).backward()
            after = dict(model.named_parameters(remove_duplicate=False))
            assert after.keys() == before.keys()
            for n, p in after.items():
                assert p is before[n] and isinstance(p, nn.Parameter), n
            grads.append([p.grad.clone() for p in model.parameters()])
        return grads

    for x, y in zip(run(True), run(False)):
        for gx, gy in zip(x, y):
            torch.testing.assert_close(gx, gy, rtol=1e-12, atol=1e-14)


def test_a_parameter_in_two_modules_is_one_adapted_tensor():
    """Weight tying (head.weight is tied_out.weight): the adapted tensor stands in both
    modules, as in a hand-written unroll with torch.func.functional_call."""
    torch.manual_seed(0)
    model = _Twice(twice=False).to(F64)
    batches = [make_batch(t) for t in range(3)]
    adapted = effmaml.MAML(model, ce_loss, effmaml.SGD(0.1), "checkpoint").adapt(batches)
    ours = torch.autograd.grad(ce_loss(adapted, make_batch(9)), list(model.parameters()))
    params = dict(model.named_parameters())
    for b in batches:
        loss = F.cross_entropy(functional_call(model, params, (b[0],)), b[1])
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
        params = {n: p - 0.1 * g for (n, p), g in zip(params.items(), grads)}
    x, y = make_batch(9)
    ref = torch.autograd.grad(
        F.cross_entropy(functional_call(model, params, (x,)), y), list(model.parameters())
    )
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
