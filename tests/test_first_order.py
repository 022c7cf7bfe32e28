"""first_order (FOMAML) against a hand-computed first-order meta-gradient."""

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

import effmaml

from .helpers import assert_scaled_close, ce_loss, grad_scale, make_batch, make_model


@pytest.mark.parametrize("select", ["all", "head"])
def test_first_order_matches_hand_computed(select):
    model = make_model(p_drop=0.2)
    batches = [make_batch(t) for t in range(4)]
    query = make_batch(99)
    named = dict(model.named_parameters())
    adapted_names = list(named) if select == "all" else ["6.weight", "6.bias"]
    # hand: plain SGD with detached gradients, then the query gradient at φ_N
    torch.manual_seed(3)
    phi = {n: named[n].detach().clone() for n in adapted_names}
    fixed = {n: p.detach() for n, p in named.items() if n not in phi}
    bufs = {n: b.clone() for n, b in model.named_buffers()}
    for x, y in batches:
        leaves = {n: v.requires_grad_() for n, v in phi.items()}
        loss = F.cross_entropy(functional_call(model, {**fixed, **leaves, **bufs}, (x,)), y)
        g = torch.autograd.grad(loss, list(leaves.values()))
        phi = {n: (v - 0.2 * gi).detach() for (n, v), gi in zip(leaves.items(), g)}
    leaves = {n: v.requires_grad_() for n, v in phi.items()}
    fixed_leaves = {n: p.detach().requires_grad_() for n, p in named.items() if n not in phi}
    q = F.cross_entropy(
        functional_call(model, {**fixed_leaves, **leaves, **bufs}, (query[0],)), query[1]
    )
    expected = dict(
        zip(
            [*leaves, *fixed_leaves],
            torch.autograd.grad(q, [*leaves.values(), *fixed_leaves.values()]),
        )
    )
    torch.manual_seed(3)
    maml = effmaml.MAML(model, ce_loss, effmaml.SGD(0.2), "first_order", params=adapted_names)
    adapted = maml.adapt(batches)
    assert all(not loss.requires_grad for loss in adapted.losses)
    ce_loss(adapted, query).backward()
    scale = grad_scale(list(expected.values()))
    for n, p in model.named_parameters():
        assert_scaled_close(p.grad, expected[n], 1e-12, n, scale=scale)
    # first order is not the exact meta-gradient: the head adapts in both selections, and its
    # exact gradient carries the second-order terms first order drops
    model.zero_grad()
    ce_loss(
        effmaml.MAML(model, ce_loss, effmaml.SGD(0.2), params=adapted_names).adapt(batches), query
    ).backward()
    assert not torch.allclose(model[6].weight.grad, expected["6.weight"], rtol=1e-3, atol=0)


def test_first_order_warns_for_learned_lr():
    model = make_model()
    lr = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    with pytest.warns(UserWarning, match="no meta-gradient to the learned"):
        effmaml.MAML(model, ce_loss, effmaml.SGD(lr), "first_order").adapt(make_batch(0), steps=2)
