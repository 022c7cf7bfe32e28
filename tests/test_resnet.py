"""float32 on torchvision ResNet18: the API works on the real model, checkpoint ≈ naive."""

import pytest
import torch
import torch.nn.functional as F
import torchvision

import effmaml

from .conftest import cuda_only


def loss_fn(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def _grads(strategy, device, steps=3, **kw):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).to(device)
    g = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g))
        for _ in range(steps)
    ]
    query = (torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g))
    maml = effmaml.MAML(model, loss_fn, effmaml.SGD(0.01), strategy, **kw)
    adapted = maml.adapt(batches)
    query = tuple(t.to(device) for t in query)
    grads = torch.autograd.grad(loss_fn(adapted, query), list(model.parameters()))
    return torch.cat([x.reshape(-1) for x in grads]), adapted


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.slow
@pytest.mark.parametrize("pullback", ["segment", "step"])
def test_resnet18_checkpoint_matches_naive_float32(pullback):
    ref, _ = _grads("naive", "cpu")
    ours, adapted = _grads("checkpoint", "cpu", segment=2, pullback=pullback)
    assert torch.isfinite(ref).all()
    assert _rel(ours, ref) <= 1e-5
    assert int(adapted.buffers["bn1.num_batches_tracked"]) == 3


@cuda_only
@pytest.mark.gpu
def test_resnet18_checkpoint_matches_naive_cuda():
    ref, _ = _grads("naive", "cuda")
    ours, _ = _grads("checkpoint", "cuda", segment=2, pullback="step")
    assert _rel(ours, ref) <= 1e-4  # TF32 / nondeterministic kernels allowed on the GPU
