"""Inner optimizers: the torch.optim family equals torch.optim's step; every kind of rate
works with each; meta-gradients are finite at zero gradients; the protocol's rules are
enforced with errors that name the optimizer and the rule."""

import itertools
import random

import pytest
import torch

import effmaml
from effmaml.inner import InnerOptimizerError
from effmaml.optim import safe_sqrt

from .helpers import ce_loss, make_batch, make_model

F64 = torch.float64
SHAPES = {"w": (3, 4), "b": (5,), "s": ()}
STEPS = 6


def _combos(**options):
    """Every combination of the options' values (the full product: pairwise and more)."""
    names = list(options)
    return [dict(zip(names, values)) for values in itertools.product(*options.values())]


# (effmaml class, torch.optim class, lr, every combination of the options)
FAMILY = {
    "SGD": (
        effmaml.SGD,
        torch.optim.SGD,
        0.1,
        [
            c
            for c in _combos(
                momentum=[0.0, 0.9],
                dampening=[0.0, 0.3],
                weight_decay=[0.0, 0.05],
                nesterov=[False, True],
            )
            if not c["nesterov"] or (c["momentum"] and not c["dampening"])
        ],
    ),
    "Adam": (
        effmaml.Adam,
        torch.optim.Adam,
        0.01,
        _combos(
            betas=[(0.9, 0.999), (0.8, 0.9)],
            eps=[1e-8, 1e-3],
            weight_decay=[0.0, 0.1],
            amsgrad=[False, True],
            decoupled_weight_decay=[False, True],
        ),
    ),
    "AdamW": (
        effmaml.AdamW,
        torch.optim.AdamW,
        0.01,
        _combos(
            betas=[(0.9, 0.999), (0.8, 0.9)], weight_decay=[0.0, 0.01, 0.1], amsgrad=[False, True]
        ),
    ),
    "RMSprop": (
        effmaml.RMSprop,
        torch.optim.RMSprop,
        0.01,
        _combos(
            alpha=[0.99, 0.9],
            eps=[1e-8, 1e-3],
            weight_decay=[0.0, 0.1],
            momentum=[0.0, 0.5],
            centered=[False, True],
        ),
    ),
    "Adagrad": (
        effmaml.Adagrad,
        torch.optim.Adagrad,
        0.1,
        _combos(
            lr_decay=[0.0, 0.1],
            weight_decay=[0.0, 0.1],
            initial_accumulator_value=[0.0, 0.5],
            eps=[1e-10, 1e-3],
        ),
    ),
}


def _problem(seed=0):
    """Parameters and STEPS gradients of several shapes; row 0 of ``w`` is zero in the
    parameters and in every gradient (a dead unit: the square roots see exactly 0)."""
    g = torch.Generator().manual_seed(seed)
    params = {k: torch.randn(s, generator=g, dtype=F64) for k, s in SHAPES.items()}
    params["w"][0] = 0
    grads = []
    for _ in range(STEPS):
        step = {k: torch.randn(s, generator=g, dtype=F64) for k, s in SHAPES.items()}
        step["w"][0] = 0
        grads.append(step)
    return params, grads


def _unroll(opt, params, grads):
    """Our parameters after each step (through ``apply_step``, as every strategy calls it)."""
    state, cur, out = opt.init_state(params), dict(params), []
    for t, g in enumerate(grads):
        state, cur = opt.apply_step(state, cur, g, t, opt.hyperparameters())
        out.append(cur)
    return out


def _torch_unroll(cls, lr, options, params, grads):
    refs = {k: p.clone().requires_grad_() for k, p in params.items()}
    opt = cls(list(refs.values()), lr=lr, **options)
    out = []
    for g in grads:
        for k, r in refs.items():
            r.grad = g[k].clone()
        opt.step()
        out.append({k: r.detach().clone() for k, r in refs.items()})
    return out


def _max_deviation(name, tensor_lr):
    """The largest |ours - torch.optim's| over every option combination, step and entry,
    after asserting each step's parameters close to rounding (float64)."""
    ours_cls, torch_cls, lr, combos = FAMILY[name]
    params, grads = _problem()
    worst = 0.0
    for options in combos:
        rate = torch.tensor(lr, dtype=F64, requires_grad=True) if tensor_lr else lr
        ours = _unroll(ours_cls(rate, **options), params, grads)
        theirs = _torch_unroll(torch_cls, lr, options, params, grads)
        for t, (a, b) in enumerate(zip(ours, theirs)):
            for k in SHAPES:
                torch.testing.assert_close(
                    a[k].detach(),
                    b[k],
                    rtol=1e-14,
                    atol=1e-15,
                    msg=lambda m, t=t, k=k, o=options: f"{name}({o}) step {t} {k}: {m}",
                )
                worst = max(worst, (a[k].detach() - b[k]).abs().max().item())
    return worst


@pytest.mark.parametrize("name", list(FAMILY))
def test_matches_torch_optim_on_the_same_gradients(name):
    """Every combination of the options, STEPS steps, three shapes, a dead unit: float64
    parameters equal torch.optim's to rounding; with a float rate, to the bit, but SGD,
    which rounds as the peers do (Note [SGD's rounding]), a few ulps of parameters ~1."""
    assert _max_deviation(name, tensor_lr=False) <= (1e-15 if name == "SGD" else 0.0)
    assert _max_deviation(name, tensor_lr=True) <= 1e-15


def _rates(kind, lr, names, steps):
    if kind == "float":
        return lr
    if kind == "tensor":
        return torch.tensor(lr, dtype=F64, requires_grad=True)
    if kind == "dict":
        return {n: torch.tensor(lr, dtype=F64, requires_grad=True) for n in names}
    return {n: torch.full((steps,), lr, dtype=F64, requires_grad=True) for n in names}


@pytest.mark.parametrize("name", list(FAMILY))
def test_every_kind_of_rate(name):
    """A float, a tensor, a per-parameter dict and per-step rates of one value give the same
    parameters, and the meta-gradient of the learned ones is the derivative (a central
    difference agrees; per-parameter and per-step gradients sum to the single rate's)."""
    ours_cls, _, lr, combos = FAMILY[name]
    options = combos[-1]  # every option on
    params, grads = _problem()
    grads = grads[:4]

    def final(rate, per_step=False):
        return _unroll(ours_cls(rate, per_step=per_step, **options), params, grads)[-1]

    def objective(out):
        return sum(
            (out[k] * (1 + torch.arange(out[k].numel(), dtype=F64)).view_as(out[k])).sum()
            for k in out
        )

    ref = final(lr)
    grads_of = {}
    for kind in ("tensor", "dict", "per_step"):
        rate = _rates(kind, lr, list(SHAPES), len(grads))
        out = final(rate, per_step=kind == "per_step")
        for k in SHAPES:
            torch.testing.assert_close(out[k].detach(), ref[k], rtol=1e-14, atol=1e-15)
        leaves = [rate] if kind == "tensor" else list(rate.values())
        grads_of[kind] = torch.autograd.grad(objective(out), leaves)
    h = 1e-6 * lr
    fd = (objective(final(lr + h)) - objective(final(lr - h))) / (2 * h)
    (d,) = grads_of["tensor"]
    torch.testing.assert_close(d, fd, rtol=1e-6, atol=0)
    assert d.abs() > 0
    torch.testing.assert_close(sum(grads_of["dict"]), d, rtol=1e-12, atol=0)
    torch.testing.assert_close(sum(g.sum() for g in grads_of["per_step"]), d, rtol=1e-12, atol=0)


# -- the square root at zero ----------------------------------------------------------------
def test_safe_sqrt_is_sqrt_with_a_finite_slope_at_zero():
    x = torch.tensor([0.0, 1e-300, 1e-20, 0.3, 4.0], dtype=F64, requires_grad=True)
    ref = x.detach().clone().requires_grad_()
    y = safe_sqrt(x)
    assert torch.equal(y, torch.sqrt(ref))  # the value, to the bit
    (d,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    (d_ref,) = torch.autograd.grad(torch.sqrt(ref).sum(), ref)
    assert d[0] == 0 and torch.isinf(d_ref[0])  # torch's slope at 0 is +inf
    assert torch.equal(d[1:].detach(), d_ref[1:])  # torch's derivative elsewhere, bitwise
    (dd,) = torch.autograd.grad(d.sum(), x, create_graph=True)
    (ddd,) = torch.autograd.grad(dd.sum(), x)
    assert dd[0] == 0 and ddd[0] == 0
    positive = torch.tensor([0.3, 1.7, 4.0], dtype=F64, requires_grad=True)
    assert torch.autograd.gradgradcheck(safe_sqrt, (positive,))


SQRT_RULES = {
    "Adam": lambda: effmaml.Adam(0.01),
    "AdamW_amsgrad": lambda: effmaml.AdamW(0.01, amsgrad=True),
    "RMSprop_centered": lambda: effmaml.RMSprop(0.01, centered=True, momentum=0.5),
    "Adagrad": lambda: effmaml.Adagrad(0.05),
}


@pytest.mark.parametrize("name", list(SQRT_RULES))
def test_meta_gradient_finite_with_exactly_zero_gradient_entries(name):
    """A dead output unit gives its weights exactly zero gradients at every step, so every
    square root of a sum of squared gradients sees 0: the meta-gradient stays finite, and
    checkpoint's equals naive's."""
    results = {}
    for strategy in ("naive", "checkpoint"):
        model = make_model(bn=False)
        with torch.no_grad():  # a dead output unit: its weights get an exactly-zero gradient
            model[6].weight[2].zero_()
            model[6].bias[2] = -1e4

        def loss_fn(m, batch):
            x, y = batch
            y = torch.where(y == 2, torch.zeros_like(y), y)
            return torch.nn.functional.cross_entropy(m(x), y)

        adapted = effmaml.MAML(model, loss_fn, SQRT_RULES[name](), strategy).adapt(
            make_batch(0), steps=3
        )
        ce_loss(adapted, make_batch(1)).backward()
        results[strategy] = [p.grad for p in model.parameters()]
        for p in model.parameters():
            assert torch.isfinite(p.grad).all()
    for a, b in zip(results["checkpoint"], results["naive"]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    # torch.sqrt instead of safe_sqrt would give NaN here: check the premise
    g = torch.zeros(1, dtype=F64, requires_grad=True)
    (d,) = torch.autograd.grad((g / (torch.sqrt(g * g) + 1e-8)).sum(), g, create_graph=True)
    (dd,) = torch.autograd.grad(d.sum(), g)
    assert not torch.isfinite(dd).all()


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: effmaml.SGD(-1.0), "non-negative"),
        (lambda: effmaml.SGD(0.1, nesterov=True), "momentum > 0"),
        (lambda: effmaml.SGD(0.1, momentum=0.9, dampening=0.1, nesterov=True), "dampening 0"),
        (lambda: effmaml.SGD(0.1, 0.9, True), "dampening must be a number .* by name"),
        (lambda: effmaml.Adam(0.1, eps=0.0), "eps must be > 0"),
        (lambda: effmaml.Adam(0.1, (0.9, 0.999), 1e-8, True), "weight_decay must be a number"),
        (lambda: effmaml.Adam(0.1, betas=(1.0, 0.9)), "betas"),
        (lambda: effmaml.AdamW(0.1, weight_decay=-0.1), "weight_decay must be finite and >= 0"),
        (lambda: effmaml.RMSprop(0.1, eps=0.0), "eps must be > 0"),
        (lambda: effmaml.RMSprop(0.1, momentum=-1), "momentum must be finite and >= 0"),
        (lambda: effmaml.Adagrad(0.1, lr_decay=-0.1), "lr_decay"),
        (lambda: effmaml.SGD("0.1"), "float"),
    ],
)
def test_bad_hyperparameters(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


def test_defaults_and_repr_are_torch_optims():
    for ours, theirs in [
        (effmaml.SGD(), torch.optim.SGD),
        (effmaml.Adam(), torch.optim.Adam),
        (effmaml.AdamW(), torch.optim.AdamW),
        (effmaml.RMSprop(), torch.optim.RMSprop),
        (effmaml.Adagrad(), torch.optim.Adagrad),
    ]:
        defaults = theirs([torch.zeros(1, requires_grad=True)]).defaults
        for key in ("lr", *type(ours)._options):
            assert getattr(ours, key) == defaults[key], (type(ours).__name__, key)
            assert f"{key}=" in repr(ours)


def test_a_per_step_shaped_rate_without_per_step_is_refused_before_work():
    """What a user tries first for per-step rates: an (N,) lr without per_step=True. Refused
    at construction with the rule, not a broadcasting error from inside the update."""
    model = make_model()
    with pytest.raises(ValueError, match=r"lr has shape \(6,\).*'0.weight'.*per_step=True"):
        effmaml.MAML(model, ce_loss, effmaml.SGD(torch.full((6,), 0.1, dtype=F64)))
    rates = {n: torch.ones(3, dtype=F64) for n, _ in model.named_parameters()}
    with pytest.raises(ValueError, match=r"lr\['0.weight'\] has shape \(3,\)"):
        effmaml.MAML(model, ce_loss, effmaml.Adam(rates))
    per_step = effmaml.SGD(torch.full((6,), 0.1, dtype=F64), per_step=True)
    effmaml.MAML(model, ce_loss, per_step).adapt(make_batch(0), steps=6)


# -- the protocol ---------------------------------------------------------------------------
class Plain(effmaml.InnerOptimizer):
    """Heavy-ball momentum, by the rules; each broken rule below overrides one thing."""

    def init(self, params):
        return {f"buf.{n}": torch.zeros_like(p) for n, p in params.items()}

    def step(self, state, params, grads, t, hyper):
        bufs = {f"buf.{n}": 0.9 * state[f"buf.{n}"] + grads[n] for n in params}
        new = {n: p - self.rate(n, hyper, t) * bufs[f"buf.{n}"] for n, p in params.items()}
        return bufs, new


class InPlaceState(Plain):
    def step(self, state, params, grads, t, hyper):
        for n in params:
            state[f"buf.{n}"].mul_(0.9).add_(grads[n].detach())
        return dict(state), {n: p - 0.1 * state[f"buf.{n}"] for n, p in params.items()}


class InPlaceParameter(Plain):
    def step(self, state, params, grads, t, hyper):
        for n, p in params.items():
            p.sub_(0.1 * grads[n])
        return super().step(state, params, grads, t, hyper)


class InPlaceGradient(Plain):
    def step(self, state, params, grads, t, hyper):
        for g in grads.values():
            g.clamp_(-1, 1)  # clip the gradient, in place
        return super().step(state, params, grads, t, hyper)


class Counter(Plain):
    def __init__(self, lr):
        super().__init__(lr)
        self.calls = 0

    def step(self, state, params, grads, t, hyper):
        self.calls += 1
        return super().step(state, params, grads, t, hyper)


class History(Plain):
    def __init__(self, lr):
        super().__init__(lr)
        self.seen = []

    def step(self, state, params, grads, t, hyper):
        self.seen.append(t)
        return super().step(state, params, grads, t, hyper)


class OwnGenerator(Plain):
    def __init__(self, lr):
        super().__init__(lr)
        self.gen = torch.Generator().manual_seed(0)

    def step(self, state, params, grads, t, hyper):
        bufs, new = super().step(state, params, grads, t, hyper)
        noise = 1e-3 * torch.randn((), generator=self.gen, dtype=F64)
        return bufs, {n: p + noise for n, p in new.items()}


class NumberState(Plain):
    def init(self, params):
        return {**super().init(params), "count": 0}


class NestedState(Plain):
    def init(self, params):
        return {"buf": super().init(params)}


class IntegerState(Plain):
    def init(self, params):
        return {**super().init(params), "count": torch.zeros((), dtype=torch.long)}


class AliasedState(Plain):
    def init(self, params):
        return {f"theta0.{n}": p for n, p in params.items()}


class DroppedEntry(Plain):
    def step(self, state, params, grads, t, hyper):
        bufs, new = super().step(state, params, grads, t, hyper)
        bufs.pop(next(iter(bufs)))
        return bufs, new


class Reshaped(Plain):
    def step(self, state, params, grads, t, hyper):
        bufs, new = super().step(state, params, grads, t, hyper)
        return bufs, {n: p.reshape(-1) for n, p in new.items()}


class OneDict(Plain):
    def step(self, state, params, grads, t, hyper):
        return super().step(state, params, grads, t, hyper)[1]


BROKEN = [
    (InPlaceState, r"InPlaceState.step .*(the state entry 'buf.0.weight' )?in place.*pure"),
    (InPlaceParameter, r"InPlaceParameter.step .*in place.*pure"),
    (InPlaceGradient, r"InPlaceGradient.step updated the gradient of '0.weight' in place"),
    (Counter, r"Counter.step changed its attribute 'calls' at inner step 0 \(now 1\).*index t"),
    (History, r"History.step changed its attribute 'seen' at inner step 0"),
    (OwnGenerator, r"OwnGenerator.step changed its attribute 'gen'.*global RNG"),
    (NumberState, r"NumberState.init returned a state that .* 'count' is of type int"),
    (NestedState, r"NestedState.init .* 'buf' is of type dict; flatten it"),
    (IntegerState, r"IntegerState.init .* 'count' of dtype torch.int64: .*floating-point"),
    (AliasedState, r"AliasedState.init returned state entry 'theta0.0.weight', which requires"),
    (DroppedEntry, r"DroppedEntry.step at inner step 0 returned a state .* missing \['buf.0.w"),
    (Reshaped, r"Reshaped.step at inner step 0 returned parameter '0.weight' of shape \(60,\)"),
    (OneDict, r"OneDict.step must return \(new_state, new_params\)"),
]


@pytest.mark.parametrize("strategy", ["naive", "checkpoint"])
@pytest.mark.parametrize("cls,match", BROKEN, ids=[c.__name__ for c, _ in BROKEN])
def test_a_broken_rule_is_named_before_any_gradient(cls, match, strategy):
    """Each rule broken is an InnerOptimizerError from adapt, at the first step, naming
    the optimizer, what broke the rule and the fix: never a gradient computed from it."""
    model = make_model()
    kw = {"segment": 2} if strategy == "checkpoint" else {}
    maml = effmaml.MAML(model, ce_loss, cls(0.1), strategy, **kw)
    with pytest.raises(InnerOptimizerError, match=match):
        maml.adapt(make_batch(0), steps=4)
    assert all(p.grad is None for p in model.parameters())


class Noisy(Plain):
    """By the rules: randomness from torch's global RNG, and a tensor hyper-parameter read
    from ``hyper``; its fixed Python attributes are read, never changed."""

    def __init__(self, lr, scale):
        super().__init__(lr)
        self.scale = scale
        self.names = ["unused", "list"]
        self.rng = random.Random(0)  # held, never drawn from in step

    def hyperparameters(self):
        return {**super().hyperparameters(), "scale": self.scale}

    def step(self, state, params, grads, t, hyper):
        bufs, new = super().step(state, params, grads, t, hyper)
        return bufs, {n: p + hyper["scale"] * torch.randn_like(p) for n, p in new.items()}


def test_an_optimizer_by_the_rules_is_exact_under_recomputation():
    """A rule with noise from torch's RNG and a learned tensor read from ``hyper`` gives
    naive's meta-gradient under checkpoint and revolve (and no false alarm)."""
    results = {}
    for strategy, kw in [("naive", {}), ("checkpoint", {"segment": 2}), ("revolve", {"slots": 2})]:
        model = make_model(bn=False)
        scale = torch.tensor(1e-2, dtype=F64, requires_grad=True)
        lr = torch.tensor(0.1, dtype=F64, requires_grad=True)
        maml = effmaml.MAML(model, ce_loss, Noisy(lr, scale), strategy, **kw)
        torch.manual_seed(3)
        ce_loss(maml.adapt([make_batch(t) for t in range(5)]), make_batch(9)).backward()
        results[strategy] = [scale.grad, lr.grad, *(p.grad for p in model.parameters())]
    assert results["naive"][0].abs() > 0
    for strategy in ("checkpoint", "revolve"):
        for a, b in zip(results[strategy], results["naive"]):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
