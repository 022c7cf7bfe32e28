"""One meta-gradient on a preset's workload, by effmaml or by a peer library."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import torch

import effmaml

from .models import batch_for, build_model, loss_for
from .presets import Preset, RunSpec

__all__ = [
    "PEER_STATUS",
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
    if spec.peer == "torch_maml":
        return _torch_maml(model, preset, spec, batches, query)
    if spec.peer == "higher":
        return _higher(model, preset, batches, query)
    if spec.peer == "torchopt":
        return _torchopt(model, preset, batches, query)
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


def _flat(model) -> torch.Tensor:
    return torch.cat(
        [
            (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
            for p in model.parameters()
        ]
    ).detach()


def _torch_maml(model, preset, spec, batches, query):
    import torch_maml

    loss_fn = loss_for(preset.model)
    evals = [0]

    def tm_loss(m, batch):
        evals[0] += 1
        return loss_fn(m, batch)

    opt = torch_maml.IngraphGradientDescent(learning_rate=preset.lr)
    if spec.strategy == "checkpoint":
        maml = torch_maml.GradientCheckpointMAML(
            model, tm_loss, optimizer=opt, checkpoint_steps=spec.opts()["segment"]
        )
    else:
        maml = torch_maml.NaiveMAML(model, tm_loss, optimizer=opt)
    kwargs = {}
    if preset.clip is not None and spec.strategy == "checkpoint":
        kwargs["max_grad_grad_norm"] = preset.clip
    updated, _, _ = maml(list(batches), **kwargs)
    loss_fn(updated, query).backward()
    return _flat(model), evals[0], {"note": "torch_maml disables BatchNorm running stats"}


def _higher(model, preset, batches, query):
    import higher

    loss_fn = loss_for(preset.model)
    inner_opt = torch.optim.SGD(model.parameters(), lr=preset.lr)
    with higher.innerloop_ctx(
        model, inner_opt, copy_initial_weights=False, track_higher_grads=True
    ) as (fmodel, diffopt):
        for t in range(len(batches)):
            diffopt.step(loss_fn(fmodel, batches[t]))
        loss_fn(fmodel, query).backward()
    return _flat(model), len(batches), {}


def _torchopt(model, preset, batches, query):
    """TorchOpt's MAML: ``torchopt.MetaSGD`` steps the module's parameters in place,
    differentiably; the state is saved before and restored after (its documented pattern).
    BatchNorm buffers are restored by value: its forward updates them in place."""
    import torchopt

    loss_fn = loss_for(preset.model)
    buffers = {k: b.detach().clone() for k, b in model.named_buffers()}
    state = torchopt.extract_state_dict(model, by="reference")
    inner = torchopt.MetaSGD(model, lr=preset.lr)
    for t in range(len(batches)):
        inner.step(loss_fn(model, batches[t]))
    loss_fn(model, query).backward()
    torchopt.recover_state_dict(model, state)
    with torch.no_grad():
        for k, b in model.named_buffers():
            b.copy_(buffers[k])
    return _flat(model), len(batches), {}


# Every peer the bench knows, and what became of it here (the summaries print the line of
# each peer a preset ran, and learn2learn's, which none can run).
PEER_STATUS = {
    "torch_maml": "torch_maml 1.0 (NaiveMAML, GradientCheckpointMAML)",
    "higher": "higher 0.2.1 (innerloop_ctx, second order)",
    "torchopt": (
        "TorchOpt 0.7.3 (MetaSGD; its C++ extension does not load against torch 2.14, "
        "`undefined symbol` at torchopt._C, and its pure-Python path runs)"
    ),
    "learn2learn": (
        "learn2learn 0.2.0: not run, it does not install on Python >= 3.11 (its sdist "
        "ships generated C files that include longintrepr.h, which CPython 3.11 moved: "
        "`fatal error: longintrepr.h: No such file or directory`)"
    ),
}


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
