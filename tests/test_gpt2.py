"""Language models: exact MAML on a tiny GPT-2 (Hugging Face transformers) in float64.

Every exact strategy == naive with dropout on, tied input/output embeddings, Adam inner
steps and distinct token batches; the same when only a subset adapts (the last block, or
LoRA adapters through peft); and the attention-kernel rule: second-order strategies run
attention with the math kernel, whose backward can be differentiated again.
"""

import pytest
import torch

import effmaml

from .helpers import assert_same_as_naive as assert_same
from .helpers import run_model

transformers = pytest.importorskip("transformers")

F64 = torch.float64
STEPS = 6
EXACT = [
    ("checkpoint", {"segment": 2}),
    ("checkpoint", {"segment": 4, "pullback": "step"}),
    ("revolve", {"slots": 2}),
    ("offload", {"segment": 3}),
]


def tiny_gpt2(seed=0, dropout=0.1, attention="sdpa"):
    """The bench's GPT-2 builder (tied embeddings) at 2 layers, 16 wide, in float64."""
    from bench.models import gpt2

    torch.manual_seed(seed)
    model = gpt2(
        n_layer=2, n_embd=16, n_head=2, vocab=50, seq=16, dropout=dropout, attention=attention
    )
    return model.to(F64).train()


def lm_loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


def token_batches(n=STEPS, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 50, (2, 8), generator=g) for _ in range(n)]


def run(model, strategy, params=None, **kw):
    """Adapt with Adam on 6 distinct batches, query loss, meta-gradient of every parameter
    that requires grad; values to compare."""
    query = token_batches(1, seed=99)[0]
    return run_model(
        model, lm_loss, token_batches(), query, strategy, effmaml.Adam(0.01), params=params, **kw
    )


def test_tiny_gpt2_ties_its_embeddings_and_uses_dropout():
    model = tiny_gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    ids = token_batches(1)[0]
    assert not torch.equal(model(ids).logits, model(ids).logits)  # dropout is on


@pytest.mark.parametrize("dropout", [0.1, 0.0], ids=["dropout", "fused_attention"])
@pytest.mark.parametrize("strategy,kw", EXACT, ids=lambda v: str(v))
def test_every_exact_strategy_equals_naive_on_gpt2(strategy, kw, dropout):
    """With dropout, and without (where PyTorch's SDPA would pick the fused flash kernel,
    whose backward has no derivative: the default math kernel makes it exact)."""
    ref = run(tiny_gpt2(dropout=dropout), "naive")
    assert_same(run(tiny_gpt2(dropout=dropout), strategy, **kw), ref)


def test_auto_under_a_budget_equals_naive_on_gpt2():
    model = tiny_gpt2()
    maml = effmaml.MAML(model, lm_loss, effmaml.Adam(0.01))
    naive = maml.estimate(token_batches(1)[0], STEPS)["naive"].peak_bytes
    ours = run(tiny_gpt2(), "auto", memory_budget=int(0.5 * naive))
    assert_same(ours, run(tiny_gpt2(), "naive"))


def test_adapting_the_last_block_only():
    def last(name):
        return name.startswith("transformer.h.1.")

    ref = run(tiny_gpt2(), "naive", params=last)
    ours = run(tiny_gpt2(), "checkpoint", params=last, segment=2, pullback="step")
    assert_same(ours, ref)
    # the fixed blocks (and the tied embedding) still get meta-gradients
    model = tiny_gpt2()
    assert sum(1 for n, _ in model.named_parameters() if not last(n)) > 0
    assert all(g.abs().sum() > 0 for g in ref["grads"][:3])


def test_lora_adapters_through_peft():
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], lora_dropout=0.0)

    def lora(seed=0):
        model = peft.get_peft_model(tiny_gpt2(seed), config).to(F64)
        torch.manual_seed(3)
        for n, p in model.named_parameters():  # B starts at zero: move it off
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.1)
        return model

    def is_lora(name):
        return "lora_" in name

    model = lora()
    assert all(is_lora(n) == p.requires_grad for n, p in model.named_parameters())
    ref = run(lora(), "naive", params=is_lora)
    assert ref["grads"] and all(g.abs().sum() > 0 for g in ref["grads"])
    for strategy, kw in EXACT[:3]:
        assert_same(run(lora(), strategy, params=is_lora, **kw), ref)


def test_second_order_strategies_run_attention_with_the_math_kernel(monkeypatch):
    """The kernel rule: every inner step of a second-order strategy uses the math kernel
    (fused CUDA kernels have no double backward); first_order keeps the default choice."""

    seen = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append(torch._C._get_math_sdp_enabled() and not torch._C._get_flash_sdp_enabled())
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    for strategy, math_only in (("checkpoint", True), ("first_order", False)):
        seen.clear()
        model = tiny_gpt2()
        maml = effmaml.MAML(model, lm_loss, effmaml.Adam(0.01), strategy)
        lm_loss(maml.adapt(token_batches()), token_batches(1, 99)[0]).backward()
        assert seen and all(s == math_only for s in seen[: STEPS * 2]), (strategy, seen)
    # and the user can turn it off (a model without SDPA, or a kernel known to work): the
    # fused kernels are then allowed under a second-order strategy too
    seen.clear()
    maml = effmaml.MAML(tiny_gpt2(), lm_loss, effmaml.Adam(0.01), "naive", math_attention=False)
    maml.adapt(token_batches())
    assert seen and not any(seen), seen


@pytest.mark.parametrize("strategy", ["naive", "checkpoint", "revolve"])
def test_fused_attention_kernel_fails_early_without_the_math_kernel(strategy):
    """Without dropout, PyTorch's SDPA runs the fused flash-attention kernel (on this CPU
    as on CUDA), whose backward has no derivative. Before this was handled, naive failed
    with PyTorch's error after the whole unroll and the recomputing strategies in backward;
    with the math kernel turned off by hand, every second-order strategy now stops in
    adapt, naming the way out."""
    maml = effmaml.MAML(
        tiny_gpt2(dropout=0.0), lm_loss, effmaml.Adam(0.01), strategy, math_attention=False
    )
    with pytest.raises(RuntimeError, match=r"no double backward.*math_attention=True"):
        maml.adapt(token_batches())
