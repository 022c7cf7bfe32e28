"""Test helpers: models, batches, a hand-written unrolled reference, comparisons, pairwise grids.

The reference in :func:`reference_unroll` uses only torch (``functional_call`` and
``autograd.grad``) and writes its optimizer updates inline, so that effmaml's naive strategy is
checked against code that shares nothing with it.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import effmaml
from effmaml.step import at_step

F64 = torch.float64


class MLP(nn.Sequential):
    """Linear -> BatchNorm -> act -> Dropout -> Linear -> act -> Linear: smooth, so second
    derivatives are not trivially zero. ``act="silu"``: an activation whose first
    derivative PyTorch computes by another formula when the graph is kept."""

    def __init__(self, d_in=5, width=12, d_out=3, bn=True, p_drop=0.0, act="tanh"):
        act_cls = {"tanh": nn.Tanh, "silu": nn.SiLU}[act]
        super().__init__(
            nn.Linear(d_in, width),
            nn.BatchNorm1d(width) if bn else nn.Identity(),
            act_cls(),
            nn.Dropout(p_drop),
            nn.Linear(width, width),
            act_cls(),
            nn.Linear(width, d_out),
        )


def make_model(seed=0, dtype=F64, **kw) -> nn.Module:
    torch.manual_seed(seed)
    return MLP(**kw).to(dtype)


def ce_loss(module, batch):
    x, y = batch
    return F.cross_entropy(module(x), y)


def maml_for(strategy="naive", width=12, lr=0.1, **kw) -> effmaml.MAML:
    """A MAML on a fresh :func:`make_model` with plain SGD (the tests' usual front)."""
    return effmaml.MAML(make_model(width=width), ce_loss, effmaml.SGD(lr), strategy, **kw)


def make_batch(seed, n=8, d_in=5, classes=3, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d_in, generator=g, dtype=dtype), torch.randint(
        0, classes, (n,), generator=g
    )


class LazyBatches(Sequence):
    """Builds batch t on demand from seed + t; counts how often it is indexed."""

    def __init__(self, steps, seed=100, **kw):
        self.steps, self.seed, self.kw = steps, seed, kw
        self.calls = 0

    def __len__(self):
        return self.steps

    def __getitem__(self, t):
        if not 0 <= t < self.steps:
            raise IndexError(t)
        self.calls += 1
        return make_batch(self.seed + t, **self.kw)


def batches_for(kind: str, steps: int, dtype=F64):
    if kind == "reused":
        return make_batch(50, dtype=dtype), steps
    if kind == "distinct":
        return [make_batch(60 + t, dtype=dtype) for t in range(steps)], None
    if kind == "lazy":
        return LazyBatches(steps, dtype=dtype), None
    raise ValueError(kind)


# -- options ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Opt:
    """One row of the option grid."""

    optim: str = "sgd"  # a key of INNER: sgd | momentum | nesterov | adam | FAMILY
    lr: str = "float"  # float | learned | per_param | per_step (per parameter and step)
    bn: str = "update"  # update | fixed | none | per_step (MAML++'s per-step BatchNorm)
    dropout: bool = False
    clip: float | None = None
    select: str = "all"  # all | head
    batches: str = "distinct"  # reused | distinct | lazy
    prox: float = 0.0
    act: str = "tanh"  # tanh | silu
    msl: bool = False  # MAML++'s multi-step loss (MSL_WEIGHTS), else the final query loss
    outer: str = "none"  # OUTER_KINDS: what else requires grad and is read by the steps

    def id(self) -> str:
        return (
            f"{self.optim}-lr_{self.lr}-bn_{self.bn}-drop{int(self.dropout)}-"
            f"clip{self.clip}-{self.select}-{self.batches}-prox{self.prox}-{self.act}"
            f"{'-msl' if self.msl else ''}{'' if self.outer == 'none' else '-' + self.outer}"
        )


HEAD = ("6.weight", "6.bias")

# the inner optimizers' settings: read by inner_for (effmaml) and reference_unroll (inline)
SGD_LR, ADAM_LR = 0.3, 0.05
WEIGHT_DECAY = 0.01  # plain SGD
MOMENTUM = 0.9
NESTEROV_MOMENTUM = 0.8
ADAM_BETAS = (0.8, 0.95)
ADAM_EPS = 1e-8  # sqrt(v̂) + eps, the square root's derivative 0 at 0 (safe_sqrt)
P_DROP = 0.3


def build(opt: Opt, steps: int, dtype=F64, seed=0):
    """(model, MAML kwargs maker, batches, steps kw, learned tensors) for one grid row."""
    p_drop = P_DROP if opt.dropout else 0.0
    model = make_model(seed, dtype, bn=opt.bn != "none", p_drop=p_drop, act=opt.act)
    if opt.bn == "per_step":
        with torch.no_grad():  # slices that differ, so that a wrong slice shows
            effmaml.per_step_batchnorm(model, steps)
            model[1].weight.add_(0.1 * torch.arange(steps, dtype=dtype)[:, None])
            model[1].running_mean.add_(0.05 * torch.arange(steps, dtype=dtype)[:, None])
    model.train()
    names = [n for n, _ in model.named_parameters()]
    adapted = list(HEAD) if opt.select == "head" else names
    base = SGD_LR if opt.optim in ("sgd", "momentum", "nesterov", "dampening") else ADAM_LR
    if opt.lr == "float":
        lr = base
    elif opt.lr == "learned":
        lr = torch.tensor(base, dtype=dtype, requires_grad=True)
    elif opt.lr == "per_param":
        lr = {
            n: torch.tensor(0.1 + 0.05 * i, dtype=dtype, requires_grad=True)
            for i, n in enumerate(adapted)
        }
    else:  # MAML++'s LSLR: a rate per parameter and per step
        lr = {
            n: (0.1 + 0.05 * i) * (1 + 0.1 * torch.arange(steps, dtype=dtype))
            for i, n in enumerate(adapted)
        }
        lr = {n: v.requires_grad_(True) for n, v in lr.items()}
    batches, steps_kw = batches_for(opt.batches, steps, dtype)
    return model, lr, adapted, batches, steps_kw


# -- outer tensors: what else requires grad and is read by the inner steps ------------------
# leaf: learned inputs, views of one leaf per step (and a learned query); augment: a learned
# affine augmentation of fixed inputs (non-leaf batches, built in __getitem__ when lazy);
# weights: per-example log-weights in each batch; closure: a temperature exp(log_tau) that
# loss_fn reads from its closure (a non-leaf); module: a second network (an encoder) in it
OUTER_KINDS = ["none", "leaf", "augment", "weights", "closure", "module"]


class Built(Sequence):
    """A lazy source whose batch t is ``make(t)``, built again at every index (a Dataset
    whose items are views or functions of learned tensors: new objects each time)."""

    def __init__(self, steps, make):
        self.steps, self.make = steps, make

    def __len__(self):
        return self.steps

    def __getitem__(self, t):
        if not 0 <= t < self.steps:
            raise IndexError(t)
        return self.make(t)


def with_outer(kind: str, form: str, steps: int, dtype=F64):
    """``(batches, steps_kw, loss_fn, query, learned)`` for an outer kind and a source form
    (reused | distinct | lazy); ``learned``: the leaves whose meta-gradients are compared."""
    if kind == "none":
        batches, steps_kw = batches_for(form, steps, dtype)
        return batches, steps_kw, ce_loss, make_batch(999, dtype=dtype), []
    g = torch.Generator().manual_seed(5)
    base = [make_batch(60 + t, dtype=dtype) for t in range(steps)]
    query = make_batch(999, dtype=dtype)
    learned: list[torch.Tensor] = []
    loss_fn = ce_loss
    if kind == "leaf":
        xs = torch.randn(steps, 8, 5, generator=g, dtype=dtype).requires_grad_(True)
        xq = torch.randn(8, 5, generator=g, dtype=dtype).requires_grad_(True)
        learned, query = [xs, xq], (xq, query[1])

        def item(t):
            return xs[t], base[t][1]
    elif kind == "augment":
        scale = (1 + 0.1 * torch.randn(5, generator=g, dtype=dtype)).requires_grad_(True)
        shift = (0.1 * torch.randn(5, generator=g, dtype=dtype)).requires_grad_(True)
        learned = [scale, shift]

        def item(t):
            return base[t][0] * scale + shift, base[t][1]
    elif kind == "weights":
        logw = (0.3 * torch.randn(steps, 8, generator=g, dtype=dtype)).requires_grad_(True)
        learned = [logw]

        def item(t):
            return base[t][0], base[t][1], logw[t]

        loss_fn = weighted_ce
    else:
        item = base.__getitem__
        if kind == "closure":
            log_tau = torch.tensor(0.2, dtype=dtype, requires_grad=True)
            tau = log_tau.exp()  # a non-leaf: its gradient must reach log_tau
            learned = [log_tau]

            def loss_fn(module, batch):
                return F.cross_entropy(module(batch[0]) / tau, batch[1])
        elif kind == "module":
            torch.manual_seed(11)
            enc = nn.Linear(5, 5).to(dtype)
            learned = list(enc.parameters())

            def loss_fn(module, batch):
                return F.cross_entropy(module(torch.tanh(enc(batch[0]))), batch[1])
        else:
            raise ValueError(kind)
    if form == "reused":
        return item(0), steps, loss_fn, query, learned
    if form == "distinct":
        return [item(t) for t in range(steps)], None, loss_fn, query, learned
    return Built(steps, item), None, loss_fn, query, learned


def weighted_ce(module, batch):
    """Cross-entropy weighted by softmax(log-weights) when the batch holds them, else mean."""
    if len(batch) == 2:
        return ce_loss(module, batch)
    x, y, logw = batch
    return (torch.softmax(logw, 0) * F.cross_entropy(module(x), y, reduction="none")).sum()


# the inner optimizer of each value of Opt.optim, given the rate and per_step; the first
# four are the grid's (reference_unroll writes them inline), FAMILY the rest of the
# torch.optim family, each with its options on (tests/test_exact.py's optimizer rows)
INNER = {
    "sgd": lambda lr, s: effmaml.SGD(lr, weight_decay=WEIGHT_DECAY, per_step=s),
    "momentum": lambda lr, s: effmaml.SGD(lr, momentum=MOMENTUM, per_step=s),
    "nesterov": lambda lr, s: effmaml.SGD(
        lr, momentum=NESTEROV_MOMENTUM, nesterov=True, per_step=s
    ),
    "adam": lambda lr, s: effmaml.Adam(lr, betas=ADAM_BETAS, eps=ADAM_EPS, per_step=s),
    "dampening": lambda lr, s: effmaml.SGD(
        lr, momentum=MOMENTUM, dampening=0.3, weight_decay=WEIGHT_DECAY, per_step=s
    ),
    "adam_amsgrad": lambda lr, s: effmaml.Adam(
        lr, ADAM_BETAS, ADAM_EPS, weight_decay=WEIGHT_DECAY, amsgrad=True, per_step=s
    ),
    "adamw": lambda lr, s: effmaml.AdamW(lr, ADAM_BETAS, ADAM_EPS, weight_decay=0.1, per_step=s),
    "rmsprop": lambda lr, s: effmaml.RMSprop(lr, alpha=0.9, weight_decay=WEIGHT_DECAY, per_step=s),
    "rmsprop_centered": lambda lr, s: effmaml.RMSprop(
        lr, alpha=0.9, momentum=0.5, centered=True, per_step=s
    ),
    "adagrad": lambda lr, s: effmaml.Adagrad(
        lr, lr_decay=0.1, weight_decay=WEIGHT_DECAY, initial_accumulator_value=0.1, per_step=s
    ),
}
FAMILY = ["dampening", "adam_amsgrad", "adamw", "rmsprop", "rmsprop_centered", "adagrad"]


def inner_for(opt: Opt, lr):
    return INNER[opt.optim](lr, opt.lr == "per_step")


def learned_tensors(lr) -> list[torch.Tensor]:
    if isinstance(lr, torch.Tensor):
        return [lr]
    if isinstance(lr, dict):
        return [v for v in lr.values() if isinstance(v, torch.Tensor)]
    return []


def run_effmaml(
    opt: Opt,
    strategy: str,
    steps: int,
    dtype=F64,
    rng_seed=7,
    amp=None,
    theta_scale=None,
    **strategy_kw,
):
    """Adapt + query loss + meta-gradient; returns a dict of everything to compare.

    ``amp``: a dtype to run ``adapt`` and the query loss under CPU autocast (the usual AMP
    pattern: the backward outside the autocast block). ``theta_scale``: multiply the
    model's parameters by it first.
    """
    model, lr, adapted_names, batches, steps_kw = build(opt, steps, dtype)
    batches, steps_kw, loss_fn, query, outer = with_outer(opt.outer, opt.batches, steps, dtype)
    if theta_scale is not None:  # a perturbed problem, to measure its conditioning
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(theta_scale)
    if strategy_kw.get("memory_budget") == BELOW_NAIVE:
        strategy_kw = {**strategy_kw, "memory_budget": _below_naive(opt, steps, dtype)}
    maml = effmaml.MAML(
        model,
        loss_fn,
        inner_for(opt, lr),
        strategy,
        params=adapted_names,
        clip_grad_grad_norm=opt.clip,
        update_running_stats=opt.bn != "fixed",
        prox_lambda=opt.prox,
        **strategy_kw,
    )
    torch.manual_seed(rng_seed)
    amp_ctx = torch.autocast("cpu", dtype=amp) if amp is not None else contextlib.nullcontext()
    with amp_ctx:
        msl = {"query": query, "step_weights": msl_weights_for(steps)} if opt.msl else {}
        if steps_kw:
            adapted = maml.adapt(batches, steps=steps_kw, **msl)
        else:
            adapted = maml.adapt(batches, **msl)
        loss = adapted.query_loss if opt.msl else loss_fn(adapted, query)
    wrt = [*model.parameters(), *learned_tensors(lr), *outer]
    return {**result(loss, wrt, adapted), "model": model}


def result(loss, wrt, adapted) -> dict:
    """Everything the exactness rules compare: the meta-gradient of ``loss`` w.r.t.
    ``wrt`` (zeros where unused), the adapted parameters, buffers, inner losses, the query
    loss and the RNG state after it."""
    grads = torch.autograd.grad(loss, wrt, allow_unused=True)
    return {
        "grads": [torch.zeros_like(w) if g is None else g for w, g in zip(wrt, grads)],
        "params": {k: v.detach() for k, v in adapted.params.items()},
        "buffers": dict(adapted.buffers),
        "losses": torch.stack([x.detach() for x in adapted.losses]),
        "query_loss": loss.detach(),
        "rng": torch.get_rng_state(),
        "adapted": adapted,
    }


def dict_clone(tensors: dict) -> dict:
    return {n: v.clone() for n, v in tensors.items()}


def msl_weights_for(steps: int) -> list[float]:
    """The grid's multi-step loss weights: uneven, with zeros (skipped steps), the last 1."""
    w = [(0.5, 0.0, 0.25)[t % 3] for t in range(steps)]
    w[-1] = 1.0
    return w


# a memory budget for auto: halfway between the smallest predicted peak of an exact
# schedule and naive's, so auto must recompute wherever a schedule fits below naive
BELOW_NAIVE = "below_naive"


def _below_naive(opt: Opt, steps: int, dtype) -> int:
    model, lr, adapted_names, *_ = build(opt, steps, dtype)
    batches, steps_kw, loss_fn, query, _ = with_outer(opt.outer, opt.batches, steps, dtype)
    maml = effmaml.MAML(
        model, loss_fn, inner_for(opt, lr), params=adapted_names, prox_lambda=opt.prox
    )
    msl = {"query": query, "step_weights": msl_weights_for(steps)} if opt.msl else {}
    return _midpoint(maml.estimate(batches if steps_kw else batches[0], steps, **msl))


def below_naive_for(model, loss_fn, batches, inner=None) -> int:
    """:data:`BELOW_NAIVE`'s budget for any model and batch source."""
    maml = effmaml.MAML(model, loss_fn, inner or effmaml.SGD(0.01))
    return _midpoint(maml.estimate(batches[0], len(batches)))


def _midpoint(preds) -> int:
    peaks = [p.peak_bytes for p in preds.values()]
    naive = preds["naive"].peak_bytes
    return (min(peaks) + naive) // 2 if min(peaks) < naive else naive


# -- the hand-written reference -----------------------------------------------------------
def reference_unroll(opt: Opt, steps: int, dtype=F64, rng_seed=7):
    """Unrolled MAML with plain autograd and inline updates (no effmaml code)."""
    model, lr, adapted_names, batches, steps_kw = build(opt, steps, dtype)
    named = dict(model.named_parameters())
    theta = {n: named[n] for n in adapted_names}
    fixed = {n: p for n, p in named.items() if n not in theta}
    phi = {n: p.view_as(p) for n, p in theta.items()}  # φ₀ its own node, as naive's
    bufs = {n: b.clone() for n, b in model.named_buffers()}
    st = {n: [torch.zeros_like(p), torch.zeros_like(p)] for n, p in phi.items()}
    losses = []
    query = make_batch(999, dtype=dtype)
    weights = msl_weights_for(steps) if opt.msl else []
    total = 0.0

    def query_at(params, buffers, t):  # per-step BatchNorm reads the step index
        with at_step(t):
            out = functional_call(model, {**fixed, **params, **buffers}, (query[0],))
        return F.cross_entropy(out, query[1])

    torch.manual_seed(rng_seed)
    for t in range(steps):
        batch = batches if steps_kw else batches[t]
        b = {n: v.clone() for n, v in bufs.items()}
        x, y = batch
        with at_step(t):
            out = functional_call(model, {**fixed, **phi, **b}, (x,))
        loss = F.cross_entropy(out, y)
        obj = loss
        if opt.prox:
            obj = obj + 0.5 * opt.prox * sum(((phi[n] - theta[n]) ** 2).sum() for n in phi)
        g = dict(zip(phi, torch.autograd.grad(obj, list(phi.values()), create_graph=True)))
        new = {}
        for n, p in phi.items():
            r = lr[n] if isinstance(lr, dict) else lr
            if opt.lr == "per_step":
                r = r[t]
            if opt.optim == "sgd":
                new[n] = p - r * (g[n] + WEIGHT_DECAY * p)
            elif opt.optim in ("momentum", "nesterov"):
                mom = MOMENTUM if opt.optim == "momentum" else NESTEROV_MOMENTUM
                st[n][0] = mom * st[n][0] + g[n]
                d = g[n] + mom * st[n][0] if opt.optim == "nesterov" else st[n][0]
                new[n] = p - r * d
            elif opt.optim == "adam":  # torch.optim's operations, op for op (lerp and
                # addcmul round once where a * b + c rounds twice)
                b1, b2 = ADAM_BETAS
                st[n][0] = torch.lerp(st[n][0], g[n], 1 - b1)
                st[n][1] = torch.addcmul(st[n][1] * b2, g[n], g[n], value=1 - b2)
                c2_sqrt = (1 - b2 ** (t + 1)) ** 0.5
                denom = _sqrt_zero_slope(st[n][1]) / c2_sqrt + ADAM_EPS
                new[n] = p - ((r / (1 - b1 ** (t + 1))) * st[n][0]) / denom
            else:  # FAMILY: checked against torch.optim in tests/test_inner.py
                raise ValueError(f"no inline reference for {opt.optim}")
        phi = new
        if opt.bn != "fixed":
            bufs = b
        losses.append(loss)
        if weights and weights[t]:  # the query must not touch bufs: a copy
            total = total + weights[t] * query_at(phi, dict_clone(bufs), t)
    qloss = total if weights else query_at(phi, dict_clone(bufs), steps - 1)
    wrt = [*model.parameters(), *learned_tensors(lr)]
    grads = torch.autograd.grad(qloss, wrt, allow_unused=True)
    return {
        "grads": [torch.zeros_like(w) if g is None else g for w, g in zip(wrt, grads)],
        "params": {k: v.detach() for k, v in phi.items()},
        "buffers": bufs,
        "losses": torch.stack([x.detach() for x in losses]),
        "query_loss": qloss.detach(),
        "rng": torch.get_rng_state(),
    }


def _sqrt_zero_slope(x):
    """sqrt with derivative 0 at 0, written without effmaml.optim.safe_sqrt's custom
    Function: the masked branch takes the square root of 1, so no order of derivative
    meets sqrt's infinite slope at 0."""
    positive = x > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, x, 1.0)), 0.0)


# -- comparisons ----------------------------------------------------------------------------
def assert_scaled_close(actual, expected, rel=1e-10, what="", scale=None):
    """assert_close with atol scaled to the size of what is compared (not the float64 default).

    The default float64 atol (1e-7) would hide real errors in gradients of size 1e-6; here
    ``atol = rel * scale`` and ``rtol = rel``, with ``scale = max|expected|`` unless given
    (pass the largest entry of the whole meta-gradient when comparing one of its tensors, so
    that a tensor whose true gradient is zero, such as a bias before BatchNorm, is judged by
    the size of the meta-gradient, not by its own rounding noise).
    """
    if scale is None:
        scale = expected.abs().max().item() if expected.numel() else 0.0
    atol = rel * scale if scale > 0 else 1e-300
    torch.testing.assert_close(actual, expected, rtol=rel, atol=atol, msg=lambda m: f"{what}: {m}")


def assert_results_match(a, b, grad_rel=1e-10, exact_values=False):
    """Compare every gradient, adapted parameter, buffer, inner loss and the query loss."""
    value_rel = 0.0 if exact_values else grad_rel
    assert len(a["grads"]) == len(b["grads"])
    scale = grad_scale(b["grads"])
    for i, (x, y) in enumerate(zip(a["grads"], b["grads"])):
        assert_scaled_close(x, y, grad_rel, f"grad[{i}]", scale=scale)
    assert a["params"].keys() == b["params"].keys()
    for k in a["params"]:
        _values_close(a["params"][k], b["params"][k], value_rel, f"param {k}")
    assert a["buffers"].keys() == b["buffers"].keys()
    for k in a["buffers"]:
        _values_close(a["buffers"][k], b["buffers"][k], value_rel, f"buffer {k}")
    _values_close(a["losses"], b["losses"], value_rel, "inner losses")
    _values_close(a["query_loss"], b["query_loss"], value_rel, "query loss")


def _values_close(x, y, rel, what):
    if rel == 0.0:
        torch.testing.assert_close(x, y, rtol=0, atol=0, msg=lambda m: f"{what}: {m}")
    else:
        assert_scaled_close(x, y, rel, what)


def grad_scale(grads) -> float:
    """The largest entry of a meta-gradient (a list of tensors)."""
    return max(g.abs().max().item() for g in grads if g.numel())


# -- pairwise grid -------------------------------------------------------------------------
def pairwise(factors: dict[str, list]) -> list[dict]:
    """A small covering array: every pair of values of every two factors appears in a row.

    Greedy and deterministic (rows are built value by value, each time picking the value that
    covers most uncovered pairs with the values already chosen).
    """
    names = list(factors)
    uncovered = {
        (i, a, j, b)
        for i, j in itertools.combinations(range(len(names)), 2)
        for a in range(len(factors[names[i]]))
        for b in range(len(factors[names[j]]))
    }
    rows = []
    while uncovered:
        # seed the row with the first uncovered pair
        i0, a0, j0, b0 = min(uncovered)
        row: dict[int, int] = {i0: a0, j0: b0}
        for k in range(len(names)):
            if k in row:
                continue
            best, best_gain = 0, -1
            for v in range(len(factors[names[k]])):
                gain = sum(
                    (
                        (min(k, m), v if k < m else row[m], max(k, m), row[m] if k < m else v)
                        in uncovered
                    )
                    for m in row
                )
                if gain > best_gain:
                    best, best_gain = v, gain
            row[k] = best
        for i, j in itertools.combinations(range(len(names)), 2):
            uncovered.discard((i, row[i], j, row[j]))
        rows.append({names[k]: factors[names[k]][row[k]] for k in range(len(names))})
    return rows


GRID_FACTORS = {
    "optim": ["sgd", "momentum", "nesterov", "adam"],
    "lr": ["float", "learned", "per_param", "per_step"],
    "bn": ["update", "fixed", "none", "per_step"],
    "dropout": [False, True],
    "clip": [None, 0.5],
    "select": ["all", "head"],
    "batches": ["reused", "distinct", "lazy"],
    "prox": [0.0, 0.3],
    "act": ["tanh", "silu"],
    "msl": [False, True],
}

GRID = [Opt(**row) for row in pairwise(GRID_FACTORS)]
# every option at its hardest value at once: Adam, a learned rate per parameter and step,
# per-step BatchNorm (updated), dropout, clipping, the ANIL head, a lazy source, the
# proximal term and the multi-step loss
FULL_ROW = Opt(
    optim="adam",
    lr="per_step",
    bn="per_step",
    dropout=True,
    clip=0.5,
    select="head",
    batches="lazy",
    prox=0.3,
    msl=True,
)


def compare_to_naive(opt: Opt, strategy: str, steps: int, **strategy_kw):
    """Run ``strategy`` and naive on the same problem; assert the exactness rules.

    Parameters, buffers and losses bitwise; gradients of quantities read at every step (lr,
    fixed parameters, θ₀) accumulate in another order: scaled 1e-12. The RNG after the
    query must be naive's.
    """
    ref = naive_reference(opt, steps, torch.get_num_threads())
    ours = run_effmaml(opt, strategy, steps, **strategy_kw)
    assert_same_as_naive(ours, ref)
    return ours


@functools.cache
def naive_reference(opt: Opt, steps: int, threads: int) -> dict:
    """naive's results for a grid row, computed once per session and thread count (every
    schedule of the row compares with the same ones; the run is seeded, and the thread
    count, which some tests change, picks the kernels' summation order)."""
    return run_effmaml(opt, "naive", steps)


def run_model(model, loss_fn, batches, query, strategy, inner=None, rng_seed=7, **kw):
    """Adapt any model on ``batches`` (one per step), the query loss and the meta-gradient
    of every parameter that requires grad; everything the exactness rules compare."""
    maml = effmaml.MAML(model, loss_fn, inner or effmaml.SGD(0.01), strategy, **kw)
    torch.manual_seed(rng_seed)  # dropout, stochastic depth
    adapted = maml.adapt(batches)
    loss = loss_fn(adapted, query)
    return result(loss, [p for p in model.parameters() if p.requires_grad], adapted)


def assert_same_as_naive(ours, ref):
    """The exactness rules: values bitwise, gradients to summation order, naive's RNG."""
    assert_results_match(ours, ref, grad_rel=1e-12, exact_values=True)
    assert torch.equal(ours["rng"], ref["rng"]), "RNG after the query differs from naive's"


def objects_in_cycles(meta_iteration, windows=3) -> int:
    """How many objects two calls of ``meta_iteration`` (after a first, which probes and
    warms up) leave for the cyclic collector: 0 when reference counting frees it all.

    The fewest over ``windows`` measurements: a leak of the meta-iteration's own shows in
    every one; garbage that something else in the process (another test's leftovers, a
    thread) happens to drop inside one window does not (seen once in a full run: 5207
    objects under auto, never alone)."""
    import gc
    from collections import Counter

    meta_iteration()
    counts = []
    for _ in range(windows):
        gc.collect()
        gc.disable()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            meta_iteration()
            meta_iteration()
            found = gc.collect()
            if found:  # what they are, for the failure's output
                kinds = Counter(f"{type(o).__module__}.{type(o).__qualname__}" for o in gc.garbage)
                print("objects in cycles:", found, kinds.most_common(12))
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
            gc.enable()
        counts.append(found)
        if found == 0:
            break
    return min(counts)
