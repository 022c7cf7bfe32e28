"""Per-step pieces of the MAML++ recipe: per-step BatchNorm and the multi-step loss's weights.

Antoniou, Edwards & Storkey, "How to train your MAML" (ICLR 2019):

* per-step BatchNorm ("BNRS" + "BNWB"): a BatchNorm whose weight, bias and running
  statistics have one slice per inner step; step t normalises with, and updates, slice t
  only (``PerStepBatchNorm``, ``per_step_batchnorm`` to convert a model);
* per-step learning rates ("LSLR"): ``effmaml.SGD(lr, per_step=True)``;
* the multi-step loss ("MSL"): ``MAML.adapt(..., query=q, step_weights=w)`` with the
  annealing of ``msl_weights``.
"""
# Note [Per-step modules and recomputation]
# The step index reaches a per-step module from the inner step itself
# (effmaml.step.current_step, a context variable set around each step and its query
# loss): a step recomputed in backward selects the slice its forward selected, and two
# MAML objects never share an index. Outside an inner step (plain model(x)) there is no
# step, and the module says so.

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .step import current_step

__all__ = [
    "PerStepBatchNorm",
    "check_steps",
    "msl_weights",
    "per_step_batchnorm",
    "per_step_modules",
]


class PerStepBatchNorm(nn.Module):
    """BatchNorm with a weight, bias and running statistics per inner step.

    Inner step t (and the multi-step loss's query after it) normalises with slice t of the
    statistics and the affine parameters, and updates slice t's running statistics only;
    the adapted model (``Adapted(x)``) uses the last step's slice. Every exact strategy
    gives naive's running statistics and meta-gradients (they are ordinary buffers and
    parameters of shape ``(steps, C)``).

    Args:
        num_features: C.
        steps: slices, the most inner steps ``adapt`` may run.
        dims: 1 (``(B, C)`` or ``(B, C, L)``), 2 (``(B, C, H, W)``) or 3.
        eps: as ``torch.nn.BatchNorm2d``.
        momentum: as ``torch.nn.BatchNorm2d``; ``None``: a cumulative moving average per
            slice, slice t's statistics weighted by 1 / ``num_batches_tracked[t]`` (its own
            count, as ``torch.nn.BatchNorm2d`` weighs by its count; reading the count costs
            one host sync per call in train mode on CUDA, as it does there).
        affine: as ``torch.nn.BatchNorm2d`` (a weight and bias per slice).
        track_running_stats: as ``torch.nn.BatchNorm2d`` (running statistics per slice).

    Raises (in forward):
        RuntimeError: called outside an inner step (no step index; says how to set one).
        ValueError: a step index beyond the slices (evaluating with more steps than the
            model was built for).
    """

    weight: nn.Parameter
    bias: nn.Parameter
    running_mean: Tensor
    running_var: Tensor
    num_batches_tracked: Tensor

    def __init__(
        self,
        num_features: int,
        steps: int,
        dims: int = 2,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
    ) -> None:
        super().__init__()
        if steps < 1:
            raise ValueError(f"steps must be >= 1 (got {steps})")
        self.num_features, self.steps, self.dims = num_features, steps, dims
        self.eps, self.momentum = eps, momentum
        self.affine, self.track_running_stats = affine, track_running_stats
        if affine:
            self.weight = nn.Parameter(torch.ones(steps, num_features))
            self.bias = nn.Parameter(torch.zeros(steps, num_features))
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(steps, num_features))
            self.register_buffer("running_var", torch.ones(steps, num_features))
            self.register_buffer("num_batches_tracked", torch.zeros(steps, dtype=torch.long))

    def forward(self, x: Tensor) -> Tensor:
        t = current_step()
        if t is None:
            raise RuntimeError(
                "PerStepBatchNorm needs the inner step's index: run the model through "
                "effmaml (MAML.adapt, or the Adapted model it returns), or set one with "
                "`with effmaml.at_step(t): model(x)`"
            )
        if not 0 <= t < self.steps:
            raise ValueError(
                f"PerStepBatchNorm has {self.steps} per-step slices but inner step {t} "
                f"needs slice {t}: a model built for {self.steps} steps cannot adapt for "
                f"more; build it with steps >= the longest adapt (MAML++ trains and "
                f"evaluates with the same number of steps)"
            )
        if x.dim() not in (self.dims + 1, self.dims + 2) or x.shape[1] != self.num_features:
            raise ValueError(
                f"PerStepBatchNorm(dims={self.dims}, {self.num_features} features) got input "
                f"of shape {tuple(x.shape)}"
            )
        training = self.training or not self.track_running_stats
        mean = self.running_mean[t] if self.track_running_stats else None
        var = self.running_var[t] if self.track_running_stats else None
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked[t] += 1
            if self.momentum is None:  # cumulative moving average over slice t's batches
                momentum = 1.0 / float(self.num_batches_tracked[t])
        weight = self.weight[t] if self.affine else None
        bias = self.bias[t] if self.affine else None
        # the slices are views: F.batch_norm updates slice t of the running statistics
        return F.batch_norm(x, mean, var, weight, bias, training, momentum, self.eps)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, steps={self.steps}, dims={self.dims}, eps={self.eps}, "
            f"momentum={self.momentum}"
        )


def per_step_batchnorm(module: nn.Module, steps: int) -> nn.Module:
    """Replace every ``nn.BatchNorm1d/2d/3d`` in ``module`` by a ``PerStepBatchNorm``
    with ``steps`` slices, each starting as a copy of the original (weight, bias, running
    statistics and their count) with its momentum (``None``, a cumulative average, stays
    one: each slice continues the original's average). Modifies ``module`` in place and
    returns it (a BatchNorm itself: its replacement), as
    ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` does.

    Args:
        module: the model (or one BatchNorm).
        steps: slices per layer: the most inner steps ``adapt`` may run.

    Returns:
        ``module``, converted (or the replacement of a BatchNorm given alone).
    """
    kinds: dict[type, int] = {nn.BatchNorm1d: 1, nn.BatchNorm2d: 2, nn.BatchNorm3d: 3}
    dims = kinds.get(type(module))
    if dims is not None:
        bn = module
        assert isinstance(bn, nn.modules.batchnorm._BatchNorm)
        new = PerStepBatchNorm(
            bn.num_features,
            steps,
            dims,
            bn.eps,
            bn.momentum,
            bn.affine,
            bn.track_running_stats,
        )
        ref = bn.weight if bn.affine else bn.running_mean
        if ref is not None:  # before copying: a float64 BatchNorm's statistics stay float64
            new = new.to(device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            if bn.affine:
                new.weight.copy_(bn.weight.expand(steps, -1))
                new.bias.copy_(bn.bias.expand(steps, -1))
            if bn.track_running_stats:
                assert bn.running_mean is not None and bn.running_var is not None
                new.running_mean.copy_(bn.running_mean.expand(steps, -1))
                new.running_var.copy_(bn.running_var.expand(steps, -1))
                if bn.num_batches_tracked is not None:
                    new.num_batches_tracked.copy_(bn.num_batches_tracked.expand(steps))
        new.train(bn.training)
        return new
    for name, child in module.named_children():
        setattr(module, name, per_step_batchnorm(child, steps))
    return module


def per_step_modules(model: nn.Module) -> list[tuple[str, PerStepBatchNorm]]:
    """The per-step modules of ``model`` (checked against the number of inner steps).

    Args:
        model: any module.

    Returns:
        ``(name, module)`` for every ``PerStepBatchNorm`` in it.
    """
    return [(n, m) for n, m in model.named_modules() if isinstance(m, PerStepBatchNorm)]


def msl_weights(steps: int, progress: float, floor: float = 0.03) -> list[float]:
    """MAML++'s multi-step loss weights, annealed from uniform to the last step.

    At ``progress = 0`` every step weighs 1/N; as ``progress`` grows to 1 (MAML++: the
    epoch over the number of annealing epochs) the weights of steps 0..N-2 fall linearly to
    ``floor``/N and the last one rises to take the rest; past 1 they stay there. The
    weights always sum to 1.

    Args:
        steps: N.
        progress: how far the annealing is, >= 0.
        floor: the smallest share of a non-final step, times 1/N.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1 (got {steps})")
    if progress < 0:
        raise ValueError(f"progress must be >= 0 (got {progress})")
    if steps == 1:
        return [1.0]
    early = max((1.0 - progress) / steps, floor / steps)
    return [early] * (steps - 1) + [1.0 - early * (steps - 1)]


def check_steps(model: nn.Module, steps: int) -> None:
    """Raise if a per-step module of ``model`` has fewer slices than ``steps``.

    Args:
        model: the model ``adapt`` runs.
        steps: the inner steps it is about to run.

    Raises:
        ValueError: naming the first short module, its slices, and what to build instead.
    """
    short: Sequence[tuple[str, PerStepBatchNorm]] = [
        (n, m) for n, m in per_step_modules(model) if m.steps < steps
    ]
    if short:
        name, m = short[0]
        raise ValueError(
            f"adapt runs {steps} inner steps but the per-step BatchNorm {name!r} has "
            f"{m.steps} slices ({len(short)} such module(s)); build the model with "
            f"per_step_batchnorm(model, steps={steps}) or more, or adapt for at most "
            f"{m.steps} steps"
        )
