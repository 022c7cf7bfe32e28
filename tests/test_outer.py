"""Outer tensors: what the inner steps read that requires grad besides θ and the constants.

The exactness grid (tests/test_exact.py, factor "outer") holds every exact schedule to
naive's meta-gradient for them. Here: naive against a hand-written unroll, the user's
two-line script, every registered strategy (a gradient, or a refusal before backward), the
refusals and their messages, the memory model's count, and the guards (in-place changes,
reference cycles).
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import effmaml
from effmaml.outer import OuterTensorError, UnseenOuterTensorError

from .helpers import (
    F64,
    assert_scaled_close,
    below_naive_for,
    ce_loss,
    grad_scale,
    make_batch,
    make_model,
    objects_in_cycles,
)

STEPS = 6


def _data(steps=STEPS, seed=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(steps, 8, 5, generator=g, dtype=F64, requires_grad=True)
    y = torch.randint(0, 3, (steps, 8), generator=g)
    return x, y


def test_naive_equals_a_hand_written_unroll_for_data_gradients():
    """Plain SGD on learned inputs x (one per step), the unroll written out with
    functional_call and autograd.grad: naive's x.grad and θ's gradients are its."""
    lr = 0.3
    model = make_model(bn=False)
    x, y = _data()
    query = make_batch(999)
    theta = dict(model.named_parameters())
    phi = dict(theta)
    for t in range(STEPS):
        loss = F.cross_entropy(functional_call(model, phi, (x[t],)), y[t])
        grads = torch.autograd.grad(loss, list(phi.values()), create_graph=True)
        phi = {k: p - lr * g for (k, p), g in zip(phi.items(), grads)}
    ref_loss = F.cross_entropy(functional_call(model, phi, (query[0],)), query[1])
    ref = torch.autograd.grad(ref_loss, [x, *theta.values()])

    maml = effmaml.MAML(model, ce_loss, effmaml.SGD(lr), "naive")
    adapted = maml.adapt([(x[t], y[t]) for t in range(STEPS)])
    ours = torch.autograd.grad(ce_loss(adapted, query), [x, *theta.values()])
    assert ref[0].abs().max() > 1e-4  # the data matter
    scale = grad_scale(list(ref))
    for a, b in zip(ours, ref):
        assert_scaled_close(a, b, 1e-12, scale=scale)


@pytest.mark.parametrize("strategy", ["checkpoint", "revolve", "offload", "auto"])
def test_the_two_line_script_works_unchanged(strategy):
    """The issue's script: learned inputs as views of one leaf, a query loss's .backward();
    x.grad and every parameter's .grad are naive's."""

    def run(name):
        model = make_model()
        x, y = _data()
        batches = [(x[t], y[t]) for t in range(STEPS)]
        kw = {"memory_budget": below_naive_for(model, ce_loss, batches)} if name == "auto" else {}
        adapted = effmaml.MAML(model, ce_loss, effmaml.SGD(0.3), name, **kw).adapt(batches)
        ce_loss(adapted, make_batch(999)).backward()
        return [x.grad, *(p.grad for p in model.parameters())], adapted

    ref, _ = run("naive")
    ours, adapted = run(strategy)
    assert not adapted.facts.chosen.startswith("naive")
    assert ours[0] is not None
    scale = grad_scale(ref)
    for a, b in zip(ours, ref):
        assert_scaled_close(a, b, 1e-12, scale=scale)


def _convex(strategy, **kw):
    """A linear model trained to its proximal optimum (λ = 2, 300 steps) on learned inputs,
    per-example log-weights and a temperature in loss_fn's closure: where iMAML's implicit
    gradient is naive's."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3).to(F64)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 4, generator=g, dtype=F64, requires_grad=True)
    y = torch.randint(0, 3, (16,), generator=g)
    logw = torch.zeros(16, dtype=F64, requires_grad=True)
    tau = torch.tensor(1.5, dtype=F64, requires_grad=True)

    def loss_fn(module, batch):
        xb, yb, wb = batch
        losses = F.cross_entropy(module(xb) / tau, yb, reduction="none")
        return (torch.softmax(wb, 0) * losses).sum()

    maml = effmaml.MAML(model, loss_fn, effmaml.SGD(0.3), strategy, prox_lambda=2.0, **kw)
    adapted = maml.adapt((x, y, logw), steps=300)
    F.cross_entropy(adapted(x.detach() + 0.5), y).backward()
    return [x.grad, logw.grad, tau.grad, *(p.grad for p in model.parameters())], adapted


# truncated through all 300 steps is naive (shorter windows: tests/test_truncated.py)
_OPTIONS = {
    "implicit": {"lam": 2.0, "cg_steps": 50, "cg_tol": 1e-14},
    "checkpoint": {"segment": 7},
    "truncated": {"window": 300},
}


@pytest.mark.parametrize("name", sorted(effmaml.STRATEGIES))
def test_every_strategy_gives_outer_tensors_a_gradient_or_refuses(name):
    """For every registered strategy: each tensor naive differentiates gets naive's
    gradient (exact strategies to 1e-12; iMAML's implicit gradient, at the optimum, to
    1e-9), or adapt raises before any backward, naming it."""
    ref, _ = _convex("naive")
    cls = effmaml.STRATEGIES[name]
    try:
        ours, _ = _convex(name, **_OPTIONS.get(name, {}))
    except OuterTensorError as err:
        assert not cls.exact, f"exact strategy {name!r} refused: {err}"
        assert "shape (16, 4)" in str(err) and "inner step 0's batch[0]" in str(err)
        return
    rel = 1e-12 if cls.exact else 1e-9
    scale = grad_scale(ref)
    for i, (a, b) in enumerate(zip(ours, ref)):
        assert a is not None, f"{name}: no gradient for input {i}"
        assert_scaled_close(a, b, rel, f"{name} grad[{i}]", scale=scale)


def test_first_order_refuses_with_what_and_where():
    model = make_model()
    x, y = _data()
    tau = torch.tensor(2.0, dtype=F64, requires_grad=True)

    def loss_fn(module, batch):
        return F.cross_entropy(module(batch[0]) / tau, batch[1])

    maml = effmaml.MAML(model, loss_fn, effmaml.SGD(0.1), "first_order")
    with pytest.raises(OuterTensorError) as err:
        maml.adapt([(x[t], y[t]) for t in range(STEPS)])
    msg = str(err.value)
    assert "shape (8, 5)" in msg and "inner step 0's batch[0]" in msg
    assert "shape ()" in msg and "closure" in msg
    assert "checkpoint" in msg and ".detach()" in msg
    # detached, the same call runs
    detached = effmaml.MAML(model, ce_loss, effmaml.SGD(0.1), "first_order")
    detached.adapt([(x[t].detach(), y[t]) for t in range(STEPS)])


def test_implicit_refuses_tensors_its_solve_does_not_read():
    """hvp_batches=1 solves on the last batch: learned inputs of the other steps have no
    implicit gradient."""
    x, y = _data()
    maml = effmaml.MAML(make_model(), ce_loss, effmaml.SGD(0.1), "implicit", hvp_batches=1)
    with pytest.raises(OuterTensorError, match=r"steps \[5\] only.*shape \(8, 5\).*step 0"):
        maml.adapt([(x[t], y[t]) for t in range(STEPS)])


def test_a_buffer_that_requires_grad_is_refused_before_work():
    model = make_model()
    model.register_buffer("mask", torch.ones(3, dtype=F64, requires_grad=True))
    maml = effmaml.MAML(model, ce_loss, effmaml.SGD(0.1), "naive")
    with pytest.raises(ValueError, match=r"buffers \['mask'\].*register_parameter"):
        maml.adapt(make_batch(0), steps=2)


class _Scale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, s):
        ctx.save_for_backward(a, s)
        return a * s

    @staticmethod
    def backward(ctx, g):
        a, s = ctx.saved_tensors
        return g * s, (g * a).sum()


@pytest.mark.parametrize("through_an_op", [False, True])
def test_a_custom_function_reading_a_tensor_fails_loudly_or_works(through_an_op):
    """A custom autograd.Function's apply is not seen by the mode: handed a tensor that
    requires grad, it would cut the gradient, so step 0's graph walk refuses it; handed
    ``s.clone()``, it works and equals naive."""
    s = torch.tensor(2.0, dtype=F64, requires_grad=True)

    def loss_fn(module, batch):
        scale = s.clone() if through_an_op else s
        return F.cross_entropy(_Scale.apply(module(batch[0]), scale), batch[1])

    def run(name):
        kw = {"segment": 2} if name == "checkpoint" else {}
        maml = effmaml.MAML(make_model(), loss_fn, effmaml.SGD(0.1), name, **kw)
        adapted = maml.adapt(make_batch(0), steps=4)
        return torch.autograd.grad(loss_fn(adapted, make_batch(9)), s)[0]

    ref = run("naive")
    if not through_an_op:
        with pytest.raises(OuterTensorError, match=r"custom torch.autograd.Function.*clone"):
            run("checkpoint")
    else:
        assert_scaled_close(run("checkpoint"), ref, 1e-12)


def test_a_tensor_read_only_when_recomputed_is_refused():
    """loss_fn reads another tensor in backward than in the forward pass."""
    a = torch.tensor(1.0, dtype=F64, requires_grad=True)
    b = torch.tensor(1.0, dtype=F64, requires_grad=True)
    calls = []

    def loss_fn(module, batch):
        calls.append(1)
        w = a if len(calls) <= 3 else b  # the forward's three steps read a
        return F.cross_entropy(module(batch[0]) * w, batch[1])

    maml = effmaml.MAML(make_model(), loss_fn, effmaml.SGD(0.1), "checkpoint", segment=3)
    maml.measure(make_batch(0))  # the probe's calls first
    calls.clear()
    adapted = maml.adapt(make_batch(0), steps=3)
    with pytest.raises(UnseenOuterTensorError, match="did not read"):
        ce_loss(adapted, make_batch(9)).backward()


def test_an_outer_tensor_changed_in_place_before_backward_is_caught():
    x, y = _data()
    maml = effmaml.MAML(make_model(), ce_loss, effmaml.SGD(0.1), "checkpoint", segment=2)
    adapted = maml.adapt([(x[t], y[t]) for t in range(STEPS)])
    with torch.no_grad():
        x.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        ce_loss(adapted, make_batch(9)).backward()


def test_facts_and_the_memory_model_count_gradient_buffers():
    """Views of one leaf read by N steps: one leaf-sized buffer; N separate leaves: N; the
    same tensor at every step: one. The prediction adds exactly that, and the run reports
    it."""
    x, y = _data()
    views = [(x[t], y[t]) for t in range(STEPS)]
    leaves = [(x[t].detach().clone().requires_grad_(True), y[t]) for t in range(STEPS)]
    plain = [(x[t].detach(), y[t]) for t in range(STEPS)]
    maml = effmaml.MAML(make_model(), ce_loss, effmaml.SGD(0.1), "checkpoint", segment=2)
    one = x[0].numel() * x.element_size()

    def predicted(batches):
        pred = maml.strategy.plan(maml.problem(batches)[0], maml.measure(batches[0])).prediction
        return pred.peak_bytes

    base = predicted(plain)
    assert predicted(views) - base == STEPS * one  # the N views add up to the leaf
    assert predicted(leaves) - base == STEPS * one
    assert predicted([views[0]] * STEPS) - base == one  # one tensor, every step
    adapted = maml.adapt(views)
    assert len(adapted.facts.outer) == STEPS
    assert adapted.facts.outer_bytes == STEPS * one
    assert "inner step 3's batch[0]" in adapted.facts.outer[3]


def test_no_reference_cycles_with_outer_tensors():
    """The pinned batches, the stand-ins and the mode are freed by reference counting."""
    x, y = _data()
    tau = torch.tensor(2.0, dtype=F64, requires_grad=True)

    def loss_fn(module, batch):
        return F.cross_entropy(module(batch[0]) / tau, batch[1])

    maml = effmaml.MAML(make_model(), loss_fn, effmaml.SGD(0.1), "revolve", slots=2)

    def meta_iteration():
        adapted = maml.adapt([(x[t], y[t]) for t in range(STEPS)])
        loss_fn(adapted, make_batch(9)).backward()

    assert objects_in_cycles(meta_iteration) == 0


def test_the_forward_pass_keeps_no_graph_of_learned_data():
    """The batch check (Note [Checking that a recomputation saw the same batch]) sums each
    batch; on learned data under grad mode that built a graph per step, which held about a
    state per step until backward (revolve at N=300 on the distillation problem: 17 MiB
    where 2 were predicted). Every record of the forward pass is graph-free."""
    x, y = _data()
    maml = effmaml.MAML(make_model(), ce_loss, effmaml.SGD(0.1), "revolve", slots=2)
    adapted = maml.adapt([(x[t], y[t]) for t in range(STEPS)])
    witness = adapted._records.witness
    assert all(p is not None and p.grad_fn is None for p in witness.prints)
    assert all(v is not None and v.grad_fn is None for v in witness.losses)


class _Scaled(nn.Module):
    """A model whose forward reads a plain tensor attribute that requires grad (neither a
    parameter nor a buffer: functional_call does not replace it)."""

    def __init__(self, scale):
        super().__init__()
        self.body = make_model()
        self.scale = scale

    def forward(self, x):
        return self.body(x) * self.scale


@pytest.mark.parametrize("strategy", ["checkpoint", "revolve"])
def test_a_tensor_attribute_of_the_model_gets_naives_gradient(strategy):
    def run(name):
        scale = torch.tensor(1.3, dtype=F64, requires_grad=True)
        model = _Scaled(scale)
        kw = {"segment": 2} if name == "checkpoint" else {"slots": 2} if name == "revolve" else {}
        maml = effmaml.MAML(model, ce_loss, effmaml.SGD(0.3), name, **kw)
        adapted = maml.adapt([make_batch(t) for t in range(STEPS)])
        ce_loss(adapted, make_batch(99)).backward()
        return [scale.grad, *(p.grad for p in model.parameters())], adapted

    ref, _ = run("naive")
    ours, adapted = run(strategy)
    assert ours[0] is not None and "attribute of the model" in adapted.facts.outer[0]
    scale = grad_scale(ref)
    for a, b in zip(ours, ref):
        assert_scaled_close(a, b, 1e-12, scale=scale)


# -- slips: the captured model read instead of m; tensors an inner optimizer's step reads ---
_SLIP_OPTIONS = {
    "checkpoint": {"segment": 2},
    "revolve": {"slots": 2},
    "truncated": {"window": 10},  # >= N: through every step, as naive
}


@pytest.mark.parametrize("slip", ["call", "regulariser"])
@pytest.mark.parametrize("name", sorted(effmaml.STRATEGIES))
def test_every_strategy_refuses_the_captured_model_before_work(name, slip):
    """loss_fn reads the model it captured (whose tensors are θ) instead of m (φ_t): naive
    and checkpoint gave meta-gradients 48% apart, silently. Every strategy refuses it at
    inner step 0, before any work, naming the parameter and saying to call m."""
    model = make_model()

    def loss_fn(m, batch):
        if slip == "call":
            return F.cross_entropy(model(batch[0]), batch[1]) + 0 * m(batch[0]).sum()
        reg = sum(p.pow(2).sum() for p in model.parameters())  # θ, not φ_t
        return F.cross_entropy(m(batch[0]), batch[1]) + 1e-3 * reg

    maml = effmaml.MAML(model, loss_fn, effmaml.SGD(0.3), name, **_SLIP_OPTIONS.get(name, {}))
    with pytest.raises(ValueError, match=r"model's own parameter '0\.weight' at inner step 0.*m\("):
        maml.adapt([make_batch(t) for t in range(4)])


class _RateSGD(effmaml.InnerOptimizer):
    """A user's SGD that reads its rate and a per-parameter scale as tensor attributes in
    step (not through ``hyper``): the natural way to write one."""

    def __init__(self, rate, scale):
        super().__init__(0.0)
        self.rate, self.scale = rate, scale

    def init(self, params):
        return {}

    def step(self, state, params, grads, t, hyper):
        return {}, {k: p - self.rate * self.scale[k] * grads[k] for k, p in params.items()}


def _optimizer_reads(name):
    model = make_model()
    rate = torch.tensor(0.3, dtype=F64, requires_grad=True)
    scale = {k: (1 + 0.1 * torch.rand_like(p)).requires_grad_(True) for k, p in
             model.named_parameters()}  # fmt: skip
    batches = [make_batch(t) for t in range(5)]
    kw = dict(_SLIP_OPTIONS.get(name, {}))
    if name == "auto":  # a budget naive does not fit: auto recomputes
        kw["memory_budget"] = below_naive_for(model, ce_loss, batches)
    maml = effmaml.MAML(model, ce_loss, _RateSGD(rate, scale), name, **kw)
    adapted = maml.adapt(batches)
    assert name != "auto" or not adapted.facts.chosen.startswith("naive")
    ce_loss(adapted, make_batch(99)).backward()
    return [rate.grad, scale["6.weight"].grad, *(p.grad for p in model.parameters())]


@pytest.mark.parametrize("name", sorted(effmaml.STRATEGIES))
def test_every_strategy_gives_tensors_the_inner_optimizer_reads_a_gradient_or_refuses(name):
    """A tensor that requires grad and that an inner optimizer's step reads (its own rate,
    as self.rate) is an outer tensor like those loss_fn reads: naive's lr.grad was 0.185
    and checkpoint's and revolve's None. Exact strategies give naive's gradient; the others
    refuse before backward, naming the optimizer and the tensor."""
    torch.manual_seed(0)
    ref = _optimizer_reads("naive")
    cls = effmaml.STRATEGIES[name]
    torch.manual_seed(0)
    try:
        ours = _optimizer_reads(name)
    except OuterTensorError as err:
        assert not cls.exact, f"exact strategy {name!r} refused: {err}"
        assert "_RateSGD" in str(err) and "shape ()" in str(err), str(err)
        return
    assert ref[0] is not None and ref[0].abs() > 1e-6
    scale = grad_scale(ref)
    for i, (a, b) in enumerate(zip(ours, ref)):
        assert a is not None, f"{name}: no gradient for input {i}"
        assert_scaled_close(a, b, 1e-12, f"{name} grad[{i}]", scale=scale)


class _At:
    """A module of the model at given tensors, indexable as the adapted model is."""

    def __init__(self, module, tensors):
        self.module, self.tensors = module, tensors

    def __call__(self, x):
        return functional_call(self.module, self.tensors, (x,))

    def __getitem__(self, i):
        prefix = f"{i}."
        sub = {k[len(prefix) :]: v for k, v in self.tensors.items() if k.startswith(prefix)}
        return _At(self.module[i], sub)

    def __getattr__(self, name):
        return self.tensors[name]


@pytest.mark.parametrize("strategy", ["naive", "checkpoint", "revolve"])
def test_a_batch_computed_from_the_models_parameters_is_held_by_the_inner_steps(strategy):
    """A batch holding a head computed from the model's parameters at θ (ProtoMAML's
    prototypes): the inner steps differentiate the adapted parameters with the batch held,
    at every step, as a hand-written unroll whose φ₀ is a node of its own does. naive's
    first step took θ itself as φ₀, so its first inner gradient also ran through the
    batch's path to θ: 1e-2 apart from checkpoint's, silently."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).to(F64)
    names = [n for n, _ in model.named_parameters()]
    x, y = make_batch(0)
    head = 2 * torch.tanh(model[0](x[:3]))  # (3, 4): one prototype per class, from θ

    def loss_fn(m, batch):
        xb, yb, w = batch
        return F.cross_entropy(F.linear(m[1](m[0](xb)), w + m[2].weight, m[2].bias), yb)

    query = (*make_batch(9), head)
    phi = [p.view_as(p) for p in model.parameters()]  # φ₀: θ's value, a node of its own
    for _ in range(3):
        loss = loss_fn(_At(model, dict(zip(names, phi))), (x, y, head))
        grads = torch.autograd.grad(loss, phi, create_graph=True)
        phi = [p - 0.3 * g for p, g in zip(phi, grads)]
    wrt = list(model.parameters())
    ref = torch.autograd.grad(
        loss_fn(_At(model, dict(zip(names, phi))), query), wrt, retain_graph=True
    )

    kw = {"segment": 2} if strategy == "checkpoint" else {}
    maml = effmaml.MAML(model, loss_fn, effmaml.SGD(0.3), strategy, **kw)
    ours = torch.autograd.grad(loss_fn(maml.adapt((x, y, head), steps=3), query), wrt)
    scale = grad_scale(list(ref))
    for a, b in zip(ours, ref):
        assert_scaled_close(a, b, 1e-12, scale=scale)
