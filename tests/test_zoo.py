"""Any model a user brings: one small representative of each op family through every exact
strategy against naive (float64, train mode), the twice-differentiable stand-ins, and the
errors that name an operation without double backward.

Op families, at the smallest size that shows a difference: SiLU with squeeze-excitation
(EfficientNet), Hardsigmoid/Hardswish (MobileNetV3, whose ``F.hardsigmoid`` has no double
backward), grouped and depthwise convolutions with a channel shuffle (ShuffleNet,
RegNet), stochastic depth (random, replayed), LayerNorm/RMSNorm/GroupNorm, rotary
embeddings (Llama) and cross-attention (T5). ``make zoo`` runs the whole torchvision and
Hugging Face zoos the same way (results/zoo/).
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import effmaml
from effmaml.diagnose import NoDoubleBackwardError
from effmaml.step import current_step
from effmaml.substitutes import Substitutes, hardsigmoid, needs_substitutes

from .helpers import assert_same_as_naive, below_naive_for, run_model

F64 = torch.float64
STEPS = 3
EXACT = [
    ("checkpoint", {"segment": 1}),
    ("checkpoint", {"segment": 2, "pullback": "step"}),
    ("revolve", {"slots": 1}),
    ("offload", {"segment": 2}),
]


def image_loss(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def images(n, size=8, channels=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(2, channels, size, size, generator=g, dtype=F64), torch.randint(0, 3, (2,)))
        for _ in range(n)
    ]


class SqueezeExcite(nn.Module):
    def __init__(self, c, act, gate):
        super().__init__()
        self.reduce, self.expand = nn.Conv2d(c, 2, 1), nn.Conv2d(2, c, 1)
        self.act, self.gate = act, gate

    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1)
        return x * self.gate(self.expand(self.act(self.reduce(s))))


class Shuffle(nn.Module):
    def forward(self, x):
        return F.channel_shuffle(x, 2)


class Residual(nn.Module):
    def __init__(self, body, p):
        super().__init__()
        from torchvision.ops import StochasticDepth

        self.body, self.drop = body, StochasticDepth(p, "row")

    def forward(self, x):
        return x + self.drop(self.body(x))


def _head(c=4):
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 3))


FAMILIES = {
    "silu_se": lambda: nn.Sequential(
        nn.Conv2d(4, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.SiLU(),
        SqueezeExcite(4, nn.SiLU(), nn.Sigmoid()),
        _head(),
    ),
    "hardsigmoid_hardswish": lambda: nn.Sequential(
        nn.Conv2d(4, 4, 3, padding=1),
        nn.Hardswish(),
        SqueezeExcite(4, nn.ReLU(), nn.Hardsigmoid()),
        _head(),
    ),
    "grouped_depthwise_shuffle": lambda: nn.Sequential(
        nn.Conv2d(4, 4, 1, groups=2),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        Shuffle(),
        nn.Conv2d(4, 4, 3, padding=1, groups=4),
        _head(),
    ),
    "stochastic_depth": lambda: nn.Sequential(
        Residual(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.Tanh()), 0.5),
        Residual(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.Tanh()), 0.5),
        _head(),
    ),
    "layer_rms_group_norm": lambda: nn.Sequential(
        nn.Conv2d(4, 4, 3, padding=1),
        nn.GroupNorm(2, 4),
        nn.GELU(),
        nn.Flatten(2),  # (B, C, HW): normalise over positions
        nn.LayerNorm(64),
        nn.RMSNorm(64),
        nn.Flatten(),
        nn.Linear(256, 3),
    ),
}


@pytest.mark.parametrize("strategy,kw", EXACT, ids=str)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_op_family_equals_naive(family, strategy, kw):
    """Every op family through the exact schedules: values bitwise, gradients to summation
    order, the RNG as naive leaves it (stochastic depth draws from it)."""

    def model():
        torch.manual_seed(0)
        return FAMILIES[family]().to(F64).train()

    batches, query = images(STEPS), images(1, seed=9)[0]
    ref = run_model(model(), image_loss, batches, query, "naive")
    ours = run_model(model(), image_loss, batches, query, strategy, **kw)
    assert_same_as_naive(ours, ref)


@pytest.mark.parametrize("family", ["silu_se", "layer_rms_group_norm"])
def test_the_probe_finds_models_whose_first_derivatives_depend_on_the_graph(family):
    """SiLU and GroupNorm compute their first derivative by another formula when the graph
    is kept: the probe sees it and the advances keep each step's graph (states bitwise
    naive's); a ReLU/Tanh model runs its advances first order."""
    torch.manual_seed(0)
    m = FAMILIES[family]().to(F64)
    a = effmaml.MAML(m, image_loss, effmaml.SGD(0.01), "checkpoint", segment=1).adapt(images(2))
    assert a.facts.exact_states is True
    torch.manual_seed(0)
    plain = FAMILIES["stochastic_depth"]().to(F64)
    a = effmaml.MAML(plain, image_loss, effmaml.SGD(0.01), "checkpoint").adapt(images(2))
    assert a.facts.exact_states is False


def test_auto_under_a_budget_naive_does_not_fit_on_a_silu_model():
    def model():
        torch.manual_seed(0)
        return FAMILIES["silu_se"]().to(F64)

    batches, query = images(5), images(1, seed=9)[0]
    budget = below_naive_for(model(), image_loss, batches)
    ref = run_model(model(), image_loss, batches, query, "naive")
    ours = run_model(model(), image_loss, batches, query, "auto", memory_budget=budget)
    assert not ours["adapted"].facts.chosen.startswith("naive")
    assert_same_as_naive(ours, ref)


# -- the stand-in for F.hardsigmoid -----------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_hardsigmoid_stand_in_has_pytorchs_values_bitwise(dtype):
    g = torch.Generator().manual_seed(0)
    x = (5 * torch.randn(100_000, generator=g, dtype=torch.float64)).to(dtype)
    x[:6] = torch.tensor([-3.0, 3.0, 0.0, -2.9999, 2.9999, 1e-30]).to(dtype)
    torch.testing.assert_close(hardsigmoid(x), F.hardsigmoid(x), rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_hardsigmoid_stand_in_on_cuda(dtype):
    x = (5 * torch.randn(100_000, device="cuda")).to(dtype)
    torch.testing.assert_close(hardsigmoid(x), F.hardsigmoid(x), rtol=0, atol=0)


def test_every_scanned_functional_op_has_a_double_backward_under_the_stand_ins():
    """The scan of torch.nn.functional that found hardsigmoid the only op without double
    backward (besides fused attention): under the stand-ins, each differentiates twice."""
    x = torch.randn(2, 4, 6, 6, dtype=F64, requires_grad=True)
    ops = [
        F.elu, F.selu, F.celu, F.gelu, F.silu, F.mish, F.hardtanh, F.relu6, F.leaky_relu,
        F.hardshrink, F.softshrink, F.tanhshrink, F.softsign, F.softplus, F.logsigmoid,
        F.hardsigmoid, F.hardswish, torch.sigmoid, F.instance_norm,
        lambda t: F.gelu(t, approximate="tanh"),
        lambda t: F.glu(t, 1),
        lambda t: F.softmax(t, 1),
        lambda t: F.layer_norm(t, t.shape[-1:]),
        lambda t: F.rms_norm(t, t.shape[-1:]),
        lambda t: F.group_norm(t, 2),
        lambda t: F.local_response_norm(t, 2),
        lambda t: F.max_pool2d(t, 2),
        lambda t: F.avg_pool2d(t, 2),
        lambda t: F.adaptive_max_pool2d(t, 2),
        lambda t: F.interpolate(t, scale_factor=2, mode="bilinear"),
        lambda t: F.interpolate(t, scale_factor=2, mode="bicubic"),
        lambda t: F.pixel_shuffle(t, 2),
        lambda t: F.channel_shuffle(t, 2),
        lambda t: F.unfold(t, 2),
        lambda t: F.normalize(t),
    ]  # fmt: skip
    for i, op in enumerate(ops):
        with Substitutes():
            (g,) = torch.autograd.grad(op(x).sin().sum(), x, create_graph=True)
            (gg,) = torch.autograd.grad(g.sum(), x, allow_unused=True)
        assert gg is None or torch.isfinite(gg).all(), i


# -- MobileNetV3 and the errors ---------------------------------------------------------------
def _mobilenet():
    from torchvision.models import mobilenet_v3_small

    torch.manual_seed(0)
    return mobilenet_v3_small(num_classes=3).to(F64).train()


def test_mobilenet_v3_small_equals_naive_under_every_exact_strategy():
    m = _mobilenet()
    assert len(needs_substitutes(m)) == 9  # its squeeze-excitation gates
    batches, query = images(2, 32, 3), images(1, 32, 3, seed=9)[0]
    ref = run_model(_mobilenet(), image_loss, batches, query, "naive")
    budget = below_naive_for(_mobilenet(), image_loss, batches)
    for strategy, kw in [*EXACT, ("auto", {"memory_budget": budget})]:
        ours = run_model(_mobilenet(), image_loss, batches, query, strategy, **kw)
        assert_same_as_naive(ours, ref)


@pytest.mark.parametrize("strategy", ["naive", "checkpoint"])
def test_without_the_stand_in_the_error_names_the_node_and_module(strategy):
    maml = effmaml.MAML(_mobilenet(), image_loss, effmaml.SGD(0.01), strategy, substitute_ops=False)
    with pytest.raises(NoDoubleBackwardError) as err:
        maml.adapt(images(2, 32, 3))
    msg = str(err.value)
    assert "HardsigmoidBackward0" in msg and "'features.1.block.1.scale_activation'" in msg
    assert "(Hardsigmoid)" in msg and "and 8 more" in msg
    assert "substitute_ops=True" in msg and "strategy='first_order'" in msg


class _OnceDifferentiable(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.tanh()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * (1 - x.tanh() ** 2)


class _Custom(nn.Module):
    def forward(self, x):
        return _OnceDifferentiable.apply(x)


class _FunctionalHardsigmoid(nn.Module):
    def forward(self, x):
        return F.hardsigmoid(x)


def _with(block):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.Sequential(block), _head()).to(F64)


@pytest.mark.parametrize("strategy", ["naive", "revolve"])
def test_a_once_differentiable_function_is_named_with_its_module(strategy):
    maml = effmaml.MAML(_with(_Custom()), image_loss, effmaml.SGD(0.01), strategy)
    with pytest.raises(NoDoubleBackwardError) as err:
        maml.adapt(images(2))
    msg = str(err.value)
    assert "_OnceDifferentiableBackward" in msg and "module '1.0' (_Custom)" in msg
    assert "@once_differentiable" in msg and "strategy='first_order'" in msg


class _AtStep2(nn.Module):
    """Runs ``op`` at inner step 2 and tanh elsewhere: the probe (step 0) cannot see it."""

    def __init__(self, op):
        super().__init__()
        self.op = op

    def forward(self, x):
        return self.op(x) if current_step() == 2 else x.tanh()


@pytest.mark.parametrize(
    "op,node",
    [
        # its double backward is not implemented: autograd.grad fails
        (F.hardsigmoid, "HardsigmoidBackward0"),
        # its backward is @once_differentiable: autograd.grad would drop its term silently
        (_OnceDifferentiable.apply, "_OnceDifferentiableBackward"),
    ],
)
@pytest.mark.parametrize(
    "kw", [{"segment": 3, "pullback": "segment"}, {"segment": 2, "pullback": "step"}]
)
def test_a_missing_double_backward_found_in_backward_is_named_like_the_probes(op, node, kw):
    """The same error type and message as at probe time: the node, its module, the step."""
    model = _with(_AtStep2(op))
    maml = effmaml.MAML(
        model, image_loss, effmaml.SGD(0.01), "checkpoint", substitute_ops=False, **kw
    )
    adapted = maml.adapt(images(4))  # the probe passes: step 0 is twice differentiable
    with pytest.raises(NoDoubleBackwardError) as err:
        image_loss(adapted, images(1, seed=9)[0]).backward()
    msg = str(err.value)
    assert node in msg and "module '1.0' (_AtStep2)" in msg
    assert "(inner step 2)" in msg and "strategy='first_order'" in msg


def test_implicit_refuses_a_once_differentiable_function_in_its_solve():
    """iMAML's Hessian-vector products differentiate the inner gradient again: the same
    error, where its term would otherwise be missing without a word."""
    maml = effmaml.MAML(_with(_Custom()), image_loss, effmaml.SGD(0.01), "implicit")
    adapted = maml.adapt(images(3))
    with pytest.raises(NoDoubleBackwardError) as err:
        image_loss(adapted, images(1, seed=9)[0]).backward()
    assert "module '1.0' (_Custom)" in str(err.value)


def test_hardsigmoid_called_outside_its_module_needs_the_switch():
    """F.hardsigmoid called directly in a forward: not found by module type, so the error
    says to turn the stand-ins on; with them on, the model equals naive."""
    maml = effmaml.MAML(
        _with(_FunctionalHardsigmoid()), image_loss, effmaml.SGD(0.01), "checkpoint"
    )
    with pytest.raises(NoDoubleBackwardError, match=r"HardsigmoidBackward0.*'1.0'.*substitute_ops"):
        maml.adapt(images(2))
    batches, query = images(STEPS), images(1, seed=9)[0]
    model = _with(_FunctionalHardsigmoid())
    ref = run_model(model, image_loss, batches, query, "naive", substitute_ops=True)
    model = _with(_FunctionalHardsigmoid())
    ours = run_model(model, image_loss, batches, query, "checkpoint", substitute_ops=True)
    assert_same_as_naive(ours, ref)


def test_first_order_needs_no_stand_in():
    maml = effmaml.MAML(_mobilenet(), image_loss, effmaml.SGD(0.01), "first_order")
    assert maml.substitute_ops is False
    image_loss(maml.adapt(images(2, 32, 3)), images(1, 32, 3)[0]).backward()


# -- Hugging Face: rotary embeddings (Llama), cross-attention (T5) ----------------------------
# importorskip inside the builders, not at module level: there it would skip this whole
# module, the op families above included, wherever transformers is missing
def _transformers():
    return pytest.importorskip("transformers")


def _tokens(n, seed=1, vocab=50):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (2, 6), generator=g) for _ in range(n)]


def _llama():
    transformers = _transformers()
    cfg = transformers.LlamaConfig(
        vocab_size=50,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=16,
        attention_dropout=0.1,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).to(F64).train()


def _t5():
    transformers = _transformers()
    cfg = transformers.T5Config(
        vocab_size=50,
        d_model=16,
        d_kv=8,
        d_ff=32,
        num_layers=1,
        num_heads=2,
        dropout_rate=0.1,
        decoder_start_token_id=0,
    )
    torch.manual_seed(0)
    return transformers.T5ForConditionalGeneration(cfg).to(F64).train()


def lm_loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


@pytest.mark.parametrize("build", [_llama, _t5], ids=["llama_rotary_rmsnorm", "t5_cross_attention"])
@pytest.mark.parametrize("strategy,kw", EXACT[:3], ids=str)
def test_hugging_face_families_equal_naive(build, strategy, kw):
    batches, query = _tokens(STEPS), _tokens(1, seed=9)[0]
    adam = effmaml.Adam(0.01)
    ref = run_model(build(), lm_loss, batches, query, "naive", adam)
    ours = run_model(build(), lm_loss, batches, query, strategy, effmaml.Adam(0.01), **kw)
    assert_same_as_naive(ours, ref)


def test_make_zoo_path_at_toy_size(tmp_path):
    """``python -m bench.zoo`` on one small torchvision model: the CSV rows and summary."""
    import pandas as pd

    from bench.zoo import main

    main(["--models", "squeezenet1_1", "--no-hf", "--size", "32", "--workers", "1",
          "--out", str(tmp_path)])  # fmt: skip
    df = pd.read_csv(tmp_path / "zoo.csv")
    assert set(df.strategy) >= {"naive", "checkpoint_segment1", "auto_below_naive"}
    assert (df[df.strategy != "naive"].result == "bitwise").all()
    summary = (tmp_path / "summary.md").read_text()
    assert "1 bitwise, 0 summation order, 0 rounding, 0 failed" in summary


def test_without_transformers_only_the_hugging_face_cases_skip(tmp_path):
    """With transformers unimportable, the op-family cases still run and pass; the Hugging
    Face cases alone skip."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    code = (
        "import sys; sys.modules['transformers'] = None; import pytest; "
        "sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', 'tests/test_zoo.py', '-k', "
        "'(op_family and silu_se and revolve) or (hugging_face and llama and revolve)']))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 passed, 1 skipped" in out.stdout, out.stdout
