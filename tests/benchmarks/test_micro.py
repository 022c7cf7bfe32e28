"""Micro-benchmarks (pytest-benchmark): one inner step, one segment pullback, one meta-gradient.

``make test`` runs them once with --benchmark-disable (they still must work);
``make bench-micro`` times them and saves JSON.
"""

import torch

import effmaml
from effmaml.engine import pullback
from effmaml.problem import NO_RECORDS, InnerProblem, Runtime
from effmaml.replay import capture_rng
from effmaml.state import Consts, InnerState
from effmaml.step import inner_step

from ..helpers import ce_loss, make_batch, make_model

F32 = torch.float32


def _problem(steps=4):
    model = make_model(dtype=F32, width=64)
    batches = [make_batch(t, dtype=F32) for t in range(steps)]
    problem = InnerProblem(model, ce_loss, effmaml.SGD(0.1), batches, torch.device("cpu"))
    params = {k: v.detach().requires_grad_() for k, v in model.named_parameters()}
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    return problem, InnerState(params, {}, buffers), Consts()


def test_inner_step(benchmark):
    problem, state, consts = _problem()
    benchmark.extra_info["what"] = "one second-order inner step, MLP width 64, batch 8"
    _out, loss, _query = benchmark(
        inner_step, problem, Runtime(), NO_RECORDS, state, 0, consts, True
    )
    assert torch.isfinite(loss)


def test_segment_pullback(benchmark):
    problem, state, consts = _problem()
    grad = InnerState({k: torch.ones_like(v) for k, v in state.params.items()})
    rng = capture_rng(problem.rng_devices)
    benchmark.extra_info["what"] = "pullback through a 4-step segment"
    rt = Runtime()
    g, _, _ = benchmark(
        pullback, problem, rt, NO_RECORDS, state, rng, 0, 4, consts, [], grad, torch.zeros(4)
    )
    assert all(torch.isfinite(v).all() for v in g.params.values())


def test_meta_gradient(benchmark):
    model = make_model(dtype=F32, width=64)
    batches = [make_batch(t, dtype=F32) for t in range(8)]
    maml = effmaml.MAML(model, ce_loss, effmaml.SGD(0.1), "checkpoint", segment=3)

    def run():
        model.zero_grad()
        ce_loss(maml.adapt(batches), make_batch(99, dtype=F32)).backward()
        return model[0].weight.grad

    benchmark.extra_info["what"] = "checkpoint meta-gradient, N=8, k=3"
    assert torch.isfinite(benchmark(run)).all()
