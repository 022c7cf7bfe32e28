"""The public front: registry, Adapted semantics, parameter selection, errors."""

import ast
import copy
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import effmaml

from .helpers import LazyBatches, below_naive_for, ce_loss, make_batch, make_model, maml_for

EXACT = [
    ("naive", {}),
    ("checkpoint", {"segment": 2}),
    ("checkpoint", {"segment": 2, "pullback": "step"}),
]
ALL = [*EXACT, ("first_order", {})]


def test_registry_lists_strategies():
    assert {"naive", "first_order", "checkpoint"} <= set(effmaml.STRATEGIES)
    for name, cls in effmaml.STRATEGIES.items():
        assert cls.name == name and issubclass(cls, effmaml.Strategy)


def _type_checking_names() -> set[str]:
    """The names effmaml/__init__.py imports under ``if TYPE_CHECKING`` (for editors)."""
    tree = ast.parse(Path(effmaml.__file__).read_text())
    (block,) = [
        n for n in tree.body if isinstance(n, ast.If) and ast.unparse(n.test) == "TYPE_CHECKING"
    ]
    return {a.asname or a.name for node in block.body for a in node.names}


def test_the_package_front_matches_the_registry():
    """Every registered strategy class is exported under its class name, and the three
    places the front names things (the lazy table, __all__, the imports for type checkers)
    agree; a strategy registered but not exported fails here."""
    exported = set(effmaml.__all__)
    for cls in effmaml.STRATEGIES.values():
        assert cls.__name__ in exported, f"{cls.__name__} is registered but not exported"
        assert getattr(effmaml, cls.__name__) is cls
    assert _type_checking_names() == exported
    assert exported == {*effmaml._EXPORTS, *effmaml._MODULES}
    for name in exported:
        assert getattr(effmaml, name) is not None


def test_auto_weighs_every_registered_exact_strategy():
    """auto's candidates come from the registry: a strategy registered with candidates is
    weighed without any edit to auto."""
    from effmaml.strategies.base import STRATEGIES

    problem, _, _ = maml_for().problem(make_batch(0), 3)
    names = [type(s).__name__ for s in effmaml.Auto.candidates(problem)]
    assert names == ["Naive", "Checkpoint", "Checkpoint", "Revolve"]  # CPU: no offload

    @effmaml.register_strategy
    class Extra(effmaml.Naive):
        name = "extra_for_test"

    try:
        assert type(effmaml.Auto.candidates(problem)[-1]) is Extra
    finally:
        del STRATEGIES["extra_for_test"]


@pytest.mark.parametrize("strategy,kw", ALL)
def test_model_is_never_mutated(strategy, kw):
    model = make_model(p_drop=0.2)
    model.train()
    before = copy.deepcopy(model.state_dict())
    maml = effmaml.MAML(model, ce_loss, effmaml.SGD(0.1, momentum=0.9), strategy, **kw)
    adapted = maml.adapt([make_batch(t) for t in range(4)])
    ce_loss(adapted, make_batch(9)).backward()
    assert model.training
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    # ... while the adapted buffers did move: running stats updated 4 times
    assert int(adapted.buffers["1.num_batches_tracked"]) == 4
    assert not adapted.buffers["1.running_mean"].equal(before["1.running_mean"])


@pytest.mark.parametrize("strategy,kw", ALL)
def test_update_running_stats_false_keeps_buffers(strategy, kw):
    model = make_model()
    maml = effmaml.MAML(
        model, ce_loss, effmaml.SGD(0.1), strategy, update_running_stats=False, **kw
    )
    adapted = maml.adapt(make_batch(0), steps=3)
    for k, v in model.named_buffers():
        torch.testing.assert_close(adapted.buffers[k], v, rtol=0, atol=0)


def test_calling_adapted_never_mutates_buffers_and_follows_mode():
    model = make_model()
    adapted = effmaml.MAML(model, ce_loss, effmaml.SGD(0.1)).adapt(make_batch(0), steps=2)
    snapshot = {k: v.clone() for k, v in adapted.buffers.items()}
    x = make_batch(5)[0]
    train_out = adapted(x)
    for k, v in adapted.buffers.items():
        assert v.equal(snapshot[k])
    model.eval()  # eval mode: running statistics normalise, so the output changes
    eval_out = adapted(x)
    assert not torch.allclose(train_out, eval_out)
    tensors = {**dict(adapted.named_parameters()), **adapted.buffers}
    ref = torch.func.functional_call(model, tensors, (x,))
    torch.testing.assert_close(eval_out, ref, rtol=0, atol=0)


def test_adapted_attributes():
    model = make_model()
    inner = effmaml.Adam(0.01)
    adapted = effmaml.MAML(model, ce_loss, inner).adapt([make_batch(t) for t in range(3)])
    assert set(adapted.params) == {n for n, _ in model.named_parameters()}
    assert len(adapted.losses) == 3 and all(x.requires_grad for x in adapted.losses)
    assert set(adapted.inner_state) == {
        f"{k}.{n}" for k in ("exp_avg", "exp_avg_sq") for n in adapted.params
    }
    assert "Adapted(" in repr(adapted) and "MAML(" in repr(effmaml.MAML(model, ce_loss, inner))


@pytest.mark.parametrize("selector", [["6.weight", "6.bias"], lambda n: n.startswith("6.")])
def test_params_selection_adapts_only_selected_and_fixed_get_meta_grads(selector):
    model = make_model()
    adapted = effmaml.MAML(model, ce_loss, effmaml.SGD(0.5), params=selector).adapt(
        make_batch(0), steps=3
    )
    assert set(adapted.params) == {"6.weight", "6.bias"}
    assert adapted.fixed["0.weight"] is model[0].weight
    ce_loss(adapted, make_batch(1)).backward()
    assert model[0].weight.grad is not None and model[0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("strategy,kw,probe_reads", [(s, kw, int(s != "naive")) for s, kw in EXACT])
def test_lazy_sequence_is_indexed_per_step(strategy, kw, probe_reads):
    batches = LazyBatches(5)
    maml = effmaml.MAML(make_model(), ce_loss, effmaml.SGD(0.1), strategy, **kw)
    maml.adapt(batches)
    # forward: each batch once, plus the probe's one read of batch 0 (checkpoint)
    assert batches.calls == 5 + probe_reads
    maml.adapt(batches)  # the probe's result is cached: only its signature read again
    assert batches.calls == 2 * (5 + probe_reads)


def test_steps_with_a_matching_list_uses_it_per_step():
    model = make_model()
    batches = [make_batch(t) for t in range(3)]
    a = effmaml.MAML(model, ce_loss, effmaml.SGD(0.1)).adapt(batches, steps=3)
    b = effmaml.MAML(model, ce_loss, effmaml.SGD(0.1)).adapt(batches)
    torch.testing.assert_close(torch.stack(a.losses), torch.stack(b.losses), rtol=0, atol=0)


# -- errors -------------------------------------------------------------------------------
def test_unknown_strategy_lists_known():
    with pytest.raises(ValueError, match="known strategies: .*checkpoint.*first_order.*naive"):
        maml_for(strategy="revolvee")


def test_bad_strategy_option():
    with pytest.raises(TypeError, match="does not take options"):
        maml_for(strategy="naive", segment=3)
    with pytest.raises(ValueError, match="segment must be >= 1 .*segment=None"):
        maml_for(strategy="checkpoint", segment=0)
    with pytest.raises(ValueError, match="pullback must be one of"):
        maml_for(strategy="checkpoint", pullback="layer")


def test_empty_sequence_and_bad_steps():
    with pytest.raises(ValueError, match="empty batch source"):
        maml_for().adapt([])
    with pytest.raises(ValueError, match="steps must be >= 1"):
        maml_for().adapt(make_batch(0), steps=0)
    with pytest.raises(ValueError, match="got a source of 2 batches with steps=3"):
        maml_for().adapt([make_batch(0), make_batch(1)], steps=3)
    with pytest.raises(TypeError, match="adapt\\(batch, steps=N\\)"):
        maml_for().adapt(make_batch(0)[0])


def test_non_scalar_loss():
    maml = effmaml.MAML(
        make_model(),
        lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1], reduction="none"),
        effmaml.SGD(0.1),
    )
    with pytest.raises(ValueError, match="scalar .* step 0 .* shape \\(8,\\)"):
        maml.adapt(make_batch(0), steps=2)


@pytest.mark.parametrize("strategy,kw", ALL)
def test_non_finite_loss_names_the_step(strategy, kw):
    bad = [make_batch(t) for t in range(4)]
    bad[2] = (torch.full_like(bad[2][0], math.nan), bad[2][1])
    with pytest.raises(FloatingPointError, match="at step 2"):
        maml_for(strategy=strategy, **kw).adapt(bad)


def test_no_trainable_parameters():
    model = make_model()
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        effmaml.MAML(model, ce_loss, effmaml.SGD(0.1))
    with pytest.raises(ValueError, match="no trainable parameters"):
        maml_for(params=lambda n: False)
    with pytest.raises(ValueError, match="not parameters of the model"):
        maml_for(params=["nope"])


def test_per_parameter_lr_must_match():
    with pytest.raises(ValueError, match="per-parameter lr must name exactly"):
        effmaml.MAML(make_model(), ce_loss, effmaml.SGD({"6.weight": 0.1}))


def test_loss_must_use_the_module():
    maml = effmaml.MAML(make_model(), lambda m, b: b[0].sum(), effmaml.SGD(0.1))
    with pytest.raises(ValueError, match="does not depend on the adapted parameters"):
        maml.adapt(make_batch(0), steps=1)


class _OnceDifferentiableTanh(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * (1 - y * y)


class _OnceModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 3).double()

    def forward(self, x):
        return _OnceDifferentiableTanh.apply(self.lin(x))


@pytest.mark.parametrize("strategy,kw", EXACT)
def test_operation_without_double_backward_is_named(strategy, kw):
    """Caught in adapt, before any backward (naive walks step 0's graph; the engine-based
    strategies' probe does that and a real pullback): the point of effmaml.checks."""
    maml = effmaml.MAML(_OnceModel(), ce_loss, effmaml.SGD(0.1), strategy, **kw)
    with pytest.raises(RuntimeError, match="no double backward.*first_order"):
        maml.adapt(make_batch(0), steps=3)
    # ... and first_order, which needs none, works
    adapted = effmaml.MAML(_OnceModel(), ce_loss, effmaml.SGD(0.1), "first_order").adapt(
        make_batch(0), steps=3
    )
    ce_loss(adapted, make_batch(1)).backward()


# -- the errors a newcomer meets ----------------------------------------------------------
_TWICE_OPTIONS = {
    "checkpoint": {"segment": 2},
    "revolve": {"slots": 2},
    "offload": {"segment": 2},
    "truncated": {"window": 2},
}


@pytest.mark.parametrize("name", sorted(effmaml.STRATEGIES))
def test_a_second_backward_works_or_says_what_to_do(name):
    """backward(retain_graph=True) then backward again over one adapt: the gradients add up
    (naive, first_order, implicit), or a clear error says how to take them in one backward
    (the schedules, which free what they stored as their backward runs; it was a bare
    AssertionError)."""
    from effmaml.engine import BackwardAgainError

    batches = [make_batch(t) for t in range(4)]
    model = make_model()
    kw = dict(_TWICE_OPTIONS.get(name, {}))
    if name == "auto":
        kw["memory_budget"] = below_naive_for(model, ce_loss, batches)
    maml = effmaml.MAML(model, ce_loss, effmaml.SGD(0.1), name, **kw)
    loss = ce_loss(maml.adapt(batches), make_batch(9))
    loss.backward(retain_graph=True)
    once = [p.grad.clone() for p in model.parameters()]
    try:
        loss.backward()
    except BackwardAgainError as err:
        assert name in ("checkpoint", "revolve", "offload", "auto", "truncated"), name
        assert "retain_graph" in str(err) and "(loss_a + loss_b).backward()" in str(err)
        return
    for p, g in zip(model.parameters(), once):
        torch.testing.assert_close(p.grad, 2 * g, rtol=1e-12, atol=0)


@pytest.mark.parametrize(
    "loss_fn",
    [lambda batch: batch[0].sum(), lambda m, x, y: m(x).sum(), lambda *, m, batch: 0],
    ids=["batch", "m-x-y", "keywords"],
)
def test_a_loss_fn_that_cannot_take_m_and_batch_is_refused_with_the_rule(loss_fn):
    with pytest.raises(TypeError, match=r"loss_fn\(m, batch\).*unpack it inside.*cannot"):
        effmaml.MAML(make_model(), loss_fn, effmaml.SGD(0.1))


class _Opaque:
    """A one-argument callable whose signature inspect cannot read (as some extension
    types)."""

    __signature__ = property(lambda self: (_ for _ in ()).throw(ValueError("no signature")))

    def __call__(self, batch):
        return batch[0].sum()


def test_a_loss_fn_whose_signature_cannot_be_read_is_caught_at_the_first_step():
    """The call fails on its arguments: the rule, at step 0. A TypeError raised inside the
    user's code passes unchanged."""
    maml = effmaml.MAML(make_model(), _Opaque(), effmaml.SGD(0.1))
    with pytest.raises(TypeError, match=r"loss_fn\(m, batch\).*at inner step 0 failed"):
        maml.adapt(make_batch(0), steps=2)

    def inside(m, batch):
        return m(batch[0]).sum() + "oops"  # the user's own TypeError

    maml = effmaml.MAML(make_model(), inside, effmaml.SGD(0.1))
    with pytest.raises(TypeError) as err:
        maml.adapt(make_batch(0), steps=2)
    assert "loss_fn(m, batch)" not in str(err.value)


@pytest.mark.parametrize("name", ["naive", "first_order", "implicit"])
def test_a_budget_the_strategy_cannot_meet_is_a_memory_error_before_work(name):
    calls = []

    def loss_fn(m, batch):
        calls.append(1)
        return ce_loss(m, batch)

    maml = effmaml.MAML(make_model(), loss_fn, effmaml.SGD(0.1), name, memory_budget=1000)
    with pytest.raises(MemoryError, match=rf"strategy '{name}'.*over memory_budget=.*'auto'"):
        maml.adapt(make_batch(0), steps=50)
    from effmaml.probe import PROBE_EVALS

    assert len(calls) <= PROBE_EVALS + 1  # the probe's steps; none of the 50
    big = effmaml.MAML(make_model(), ce_loss, effmaml.SGD(0.1), name, memory_budget="1GiB")
    big.adapt(make_batch(0), steps=3)


@pytest.mark.parametrize(
    "loss_fn,what",
    [
        (torch.nn.functional.cross_entropy, "cross_entropy"),
        (torch.nn.CrossEntropyLoss(), "CrossEntropyLoss"),
        (effmaml.SGD(0.1), "SGD"),
    ],
    ids=["torch-function", "torch-module", "inner-optimizer"],
)
def test_a_torch_loss_or_swapped_arguments_as_loss_fn_get_the_rule(loss_fn, what):
    """Passing torch's loss itself (a habit from other libraries) or MAML's arguments in
    another order: the rule, what was given, and how to wrap it, at MAML(...); torch's
    own error named an internal class."""
    with pytest.raises(TypeError, match=rf"got {what} .*lambda m, batch: F\.cross_entropy"):
        effmaml.MAML(make_model(), loss_fn, effmaml.SGD(0.1))


def test_everyday_slips_get_messages_that_name_the_fix():
    """What a newcomer hit: a strategy name one letter off, an option of the right name
    with a bad value, loss_fn's arguments swapped, an inner optimizer that skipped
    super().__init__."""
    net = nn.Linear(2, 2)

    def loss(m, batch):
        return nn.functional.cross_entropy(m(batch[0]), batch[1])

    with pytest.raises(ValueError, match="did you mean 'checkpoint'"):
        effmaml.MAML(net, loss, effmaml.SGD(0.1), "checkpointing")
    with pytest.raises(TypeError, match="window must be an int") as bad:
        effmaml.MAML(net, loss, effmaml.SGD(0.1), "truncated", window=2.5)
    assert "does not take" not in str(bad.value)
    with pytest.raises(TypeError, match="does not take options"):
        effmaml.MAML(net, loss, effmaml.SGD(0.1), "truncated", windw=2)

    batch = (torch.randn(4, 2), torch.zeros(4, dtype=torch.long))
    swapped = effmaml.MAML(net, lambda b, m: loss(m, b), effmaml.SGD(0.1), "checkpoint")
    with pytest.raises(TypeError, match=r"inner step 0.*swap its arguments"):
        swapped.adapt([batch] * 2)

    def swapped_loss(batch, m):  # a Sequential indexes: "'tuple' object is not callable"
        return nn.functional.cross_entropy(m(batch[0]), batch[1])

    seq = nn.Sequential(nn.Linear(2, 2))
    calls_batch = effmaml.MAML(seq, swapped_loss, effmaml.SGD(0.1), "naive")
    with pytest.raises(TypeError, match=r"not callable.*inner step 0.*swap its arguments"):
        calls_batch.adapt(batch, steps=3)

    class NoSuper(effmaml.InnerOptimizer):
        def __init__(self):
            pass

        def init(self, params):
            return {}

        def step(self, state, params, grads, t, hyper):
            return {}, {n: p - 0.1 * grads[n] for n, p in params.items()}

    with pytest.raises(TypeError, match=r"NoSuper .*super\(\).__init__\(lr\)"):
        effmaml.MAML(net, loss, NoSuper(), "naive")


def test_a_strategy_without_execute_is_told_how_to_port_it():
    """A Strategy subclass written for the protocol before Plan (a run method) fails at
    adapt with what to implement, before any step runs."""

    class Old(effmaml.Strategy):
        name = "old_protocol"

        def run(self, problem, rt, state0, consts):
            raise AssertionError("never called")

    maml = effmaml.MAML(nn.Linear(2, 2), lambda m, b: m(b).sum(), effmaml.SGD(0.1), Old())
    with pytest.raises(NotImplementedError, match=r"Old implements no execute.*defines run"):
        maml.adapt(torch.randn(3, 2), steps=2)
