"""One meta-gradient on a preset's workload, by effmaml or by a peer library
(``bench.peers``)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import torch

import effmaml

from .models import batch_for, build_model, loss_for
from .peers import Higher, TorchOpt, torch_maml
from .presets import Preset, RunSpec

__all__ = [
    "LazyBatches",
    "agreement",
    "amp_context",
    "build",
    "make_maml",
    "meta_gradient",
    "predict",
]


class LazyBatches(Sequence):
    """Batch t is drawn from a generator seeded with ``seed + t``, on the device, on demand.

    The same index always gives the same batch, as recomputing strategies require; 1000
    batches never sit in memory at once.
    """

    def __init__(self, preset: Preset, steps: int, device: torch.device, dtype, seed=1000):
        self.p, self.steps, self.device, self.dtype, self.seed = preset, steps, device, dtype, seed

    def __len__(self):
        return self.steps

    def __getitem__(self, t):
        if not 0 <= t < self.steps:
            raise IndexError(t)
        g = torch.Generator(device=self.device).manual_seed(self.seed + t)
        return batch_for(self.p, g, self.device, self.dtype)


def build(preset: Preset, device: torch.device):
    """The model (seeded), dtype and the query batch."""
    dtype = getattr(torch, preset.dtype)
    torch.manual_seed(0)
    model = build_model(preset.model, preset.classes, **dict(preset.model_options))
    model = model.to(device, dtype)
    model.train()
    query = LazyBatches(preset, 1, device, dtype, seed=7)[0]
    return model, dtype, query


def make_maml(model, preset: Preset, spec: RunSpec) -> effmaml.MAML | None:
    """The front a run uses (None for peers). One per process: its probe is cached, so
    the prediction, the warm-up and the timed meta-gradients share it."""
    if spec.peer:
        return None
    inner = effmaml.Adam(preset.lr) if preset.inner == "adam" else effmaml.SGD(preset.lr)
    return effmaml.MAML(
        model,
        loss_for(preset.model),
        inner,
        spec.strategy,
        clip_grad_grad_norm=preset.clip,
        **spec.opts(),
    )


def amp_context(preset: Preset, spec: RunSpec, device: torch.device):
    """The preset's autocast (``preset.amp``), unless the run asks for float32."""
    if not preset.amp or spec.no_amp:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, preset.amp))


def predict(maml, preset: Preset, spec: RunSpec, steps: int, device, dtype, query=None):
    """effmaml's prediction for this run and the probe it came from (None for peers)."""
    if maml is None:
        return None
    batches = LazyBatches(preset, steps, device, dtype)
    msl = {"query": query, "step_weights": [1.0 / steps] * steps} if preset.msl else {}
    with amp_context(preset, spec, device):
        (pred,) = maml.estimate(batches[0], steps, maml.strategy, **msl).values()
        probe = maml.measure(batches[0], msl.get("query"))
    maml.model.zero_grad(set_to_none=True)
    return pred, probe


def meta_gradient(model, maml, preset: Preset, spec: RunSpec, steps: int, device, dtype, query):
    """Adapt for ``steps`` steps, compute the query loss and its meta-gradient.

    Returns:
        ``(flat_grad, step_evals, info)``; the gradient is left in ``model.parameters()``.
    """
    model.zero_grad(set_to_none=True)
    batches = LazyBatches(preset, steps, device, dtype)
    if spec.peer:
        return _peer(model, preset, spec, batches, query)
    with amp_context(preset, spec, device):
        if preset.msl:  # every step's query loss, weighted uniformly
            w = [1.0 / steps] * steps
            adapted = maml.adapt(batches, query=query, step_weights=w)
            assert adapted.query_loss is not None
            loss = adapted.query_loss
        else:
            adapted = maml.adapt(batches)
            loss = loss_for(preset.model)(adapted, query)
    loss.backward()
    facts = {**adapted.info, "host_peak_bytes": adapted.host_peak_bytes()}
    return _flat(model), adapted.step_evals, facts


def _peer(model, preset: Preset, spec: RunSpec, batches, query):
    """A peer's meta-gradient (``bench.peers``): its gradient, inner-loss evaluations, notes."""
    loss_fn = loss_for(preset.model)
    if spec.peer == "torch_maml":
        checkpoint = spec.strategy == "checkpoint"
        evals = torch_maml(
            model,
            loss_fn,
            preset.lr,
            batches,
            query,
            checkpoint_steps=spec.opts()["segment"] if checkpoint else None,
            max_grad_grad_norm=preset.clip if checkpoint else None,
        )
        return _flat(model), evals, {"note": "torch_maml disables BatchNorm running stats"}
    peer = {"higher": Higher, "torchopt": TorchOpt}[spec.peer](model, preset.lr)
    peer(loss_fn, batches, query)
    return _flat(model), len(batches), {}


def _flat(model) -> torch.Tensor:
    return torch.cat(
        [
            (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
            for p in model.parameters()
        ]
    ).detach()


def agreement(grad: torch.Tensor, ref: torch.Tensor) -> dict:
    """max abs difference, relative L2 and cosine against the reference meta-gradient."""
    if not torch.isfinite(grad).all():
        return {
            "grad_max_abs": math.inf,
            "grad_rel_l2": math.inf,
            "grad_cosine": math.nan,
            "grad_finite": False,
        }
    g, r = grad.double(), ref.double()
    return {
        "grad_max_abs": (g - r).abs().max().item(),
        "grad_rel_l2": ((g - r).norm() / r.norm()).item(),
        "grad_cosine": (g @ r / (g.norm() * r.norm())).item(),
        "grad_finite": True,
    }
