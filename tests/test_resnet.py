"""float32 on torchvision ResNet18: the API works on the real model, checkpoint ≈ naive."""

import pytest
import torch
import torch.nn.functional as F
import torchvision

import effmaml
from effmaml.measure import PeakMemory


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


@pytest.mark.gpu
def test_resnet18_checkpoint_matches_naive_cuda():
    ref, _ = _grads("naive", "cuda")
    ours, _ = _grads("checkpoint", "cuda", segment=2, pullback="step")
    assert _rel(ours, ref) <= 1e-4  # TF32 / nondeterministic kernels allowed on the GPU


@pytest.mark.gpu
@pytest.mark.parametrize("strategy,kw", [("offload", {"segment": 2}), ("revolve", {"slots": 2})])
def test_resnet18_memory_floor_schedules_match_naive_cuda(strategy, kw):
    ref, _ = _grads("naive", "cuda", steps=5)
    ours, adapted = _grads(strategy, "cuda", steps=5, **kw)
    assert _rel(ours, ref) <= 1e-4
    if strategy == "offload":
        assert adapted.host_peak_bytes() > 0


@pytest.mark.gpu
def test_offload_float64_exact_on_cuda():
    """Through pinned memory and the side stream, offload equals naive in float64."""
    from .helpers import ce_loss, make_batch, make_model

    out = {}
    for strategy, kw in [("naive", {}), ("offload", {"segment": 2, "pullback": "step"})]:
        model = make_model(p_drop=0.0).cuda()
        batches = [tuple(t.cuda() for t in make_batch(s)) for s in range(7)]
        adapted = effmaml.MAML(
            model, ce_loss, effmaml.SGD(0.1, momentum=0.9), strategy, **kw
        ).adapt(batches)
        q = tuple(t.cuda() for t in make_batch(99))
        g = torch.autograd.grad(ce_loss(adapted, q), list(model.parameters()))
        out[strategy] = (torch.cat([x.reshape(-1) for x in g]), adapted.params)
    ref, ours = out["naive"], out["offload"]
    for k in ref[1]:  # float64: equal up to the GPU kernels' summation order
        torch.testing.assert_close(ours[1][k], ref[1][k], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(ours[0], ref[0], rtol=1e-10, atol=1e-10 * ref[0].abs().max().item())


@pytest.mark.gpu
def test_offload_device_memory_flat_in_steps_cuda():
    def peak(steps):
        torch.cuda.empty_cache()
        with PeakMemory("cuda") as pm:
            _grads("offload", "cuda", steps=steps, segment=2)
        return pm.peak

    p8, p32 = peak(8), peak(32)
    assert p32 <= 1.15 * p8 + 16 * 2**20, (p8, p32)


@pytest.mark.gpu
@pytest.mark.parametrize("strategy,kw", [("checkpoint", {"segment": 2}), ("revolve", {"slots": 2})])
def test_fp16_autocast_and_grad_scaler_match_naive_cuda(strategy, kw):
    """The AMP pattern on the outer loop: adapt + query under fp16 autocast, a GradScaler
    around the backward; recomputing strategies replay autocast, so they match naive."""

    def scaled_grads(name, **options):
        torch.manual_seed(0)
        model = torchvision.models.resnet18(num_classes=10).cuda()
        outer = torch.optim.SGD(model.parameters(), lr=0.1)
        scaler = torch.amp.GradScaler("cuda")
        g = torch.Generator().manual_seed(1)
        batches = [
            (torch.randn(4, 3, 32, 32, generator=g).cuda(), torch.randint(0, 10, (4,)).cuda())
            for _ in range(4)
        ]
        query = (torch.randn(4, 3, 32, 32, generator=g).cuda(), torch.randint(0, 10, (4,)).cuda())
        maml = effmaml.MAML(model, loss_fn, effmaml.SGD(0.01), name, **options)
        with torch.autocast("cuda", dtype=torch.float16):
            adapted = maml.adapt(batches)
            loss = loss_fn(adapted, query)
        scaler.scale(loss).backward()
        scaler.unscale_(outer)
        return torch.cat([p.grad.reshape(-1) for p in model.parameters()])

    ref = scaled_grads("naive")
    ours = scaled_grads(strategy, **kw)
    assert torch.isfinite(ref).all() and torch.isfinite(ours).all()
    assert _rel(ours, ref) <= 1e-2  # fp16 kernels sum in nondeterministic order on the GPU
