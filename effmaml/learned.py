"""A learned inner optimizer: a small MLP applied to every coordinate, its weights meta-learned.

``LearnedOptimizer`` is an ``InnerOptimizer`` like ``SGD`` and ``Adam``: a pure ``init`` and
``step`` over flat dicts of tensors. Its update rule is a network (Andrychowicz et al. 2016,
coordinate-wise; features after Metz et al. 2019), and the network's weights are tensor
hyper-parameters (``hyperparameters()``), so every exact strategy differentiates the
meta-objective with respect to them through the whole unroll, as it does a learned rate.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from .inner import InnerOptimizer, LearningRate
from .optim import safe_sqrt

__all__ = ["LearnedOptimizer"]


class LearnedOptimizer(InnerOptimizer):
    """A coordinate-wise MLP update rule whose weights are learned through the inner loop.

    For every coordinate of every adapted parameter the rule reads the features

    * the gradient ``g`` and its exponential moving averages ``m_i`` at each of ``decays``
      (bias-corrected as Adam's first moment), each divided by the running RMS
      ``sqrt(v̂) + eps`` of the gradient (``v``: the average of ``g²`` at decay ``beta2``,
      bias-corrected; the square root as ``effmaml.Adam``'s, derivative 0 at v̂ = 0), so
      that the features are scale-free (Metz et al. 2019);
    * with ``param_feature=True``, the parameter's own value (Metz et al.'s rule reads it;
      it is unbounded, so a rule can learn to grow the parameters, which lowers a
      classifier's loss for a while and then diverges: off by default).

    An MLP (``hidden`` ReLU layers) maps these F features to a direction ``d`` and a
    log-magnitude ``s``; a linear skip from the features adds to the direction. The update
    is ``p ← p − lr · d · exp(s)``. Every coordinate of every parameter runs the same
    network (one batched matrix product per layer over all coordinates).

    Initialisation (``start="adam"``, the default): the skip reads the normalised momentum
    at decay 0.9 with weight 1 and the MLP's output layer is scaled by ``out_scale``, so
    the untrained rule is Adam(lr, betas=(0.9, beta2)) up to a perturbation of relative
    size about ``out_scale``; the output layer's bias on ``s`` is then a learned log
    learning rate. ``start="random"``: no skip, the output layer at the same small scale
    (an Andrychowicz-style rule from scratch, whose first updates are about
    ``lr · out_scale``).

    The weights (``weights``, also ``hyperparameters()``) are leaf tensors that require
    grad: hand ``parameters()`` to the outer optimizer. Under the exact strategies
    (``naive``, ``checkpoint``, ``revolve``, ``offload``, ``auto``) they receive naive's
    meta-gradient through every step. ``first_order`` and ``implicit`` give them none,
    and warn: first-order MAML treats every inner update as a constant, and the implicit
    gradient of a stationary point does not depend on the optimizer that reached it.

    Memory: state of ``len(decays) + 1`` values per adapted coordinate (the moving
    averages); one step with graph additionally keeps about ``P · (F + sum(hidden) + 9)``
    values for the backward (P adapted coordinates), the network's activations.
    Compute per step: ``O(P · (F·h₁ + h₁·h₂ + … + 2·h_last))`` multiply-adds, on top of
    the model's loss and gradient.

    Args:
        lr: the step scale (float, tensor, or per-parameter dict; see ``InnerOptimizer``).
            Default 1e-3.
        decays: decay rates of the gradient's moving averages (features), each in [0, 1).
            Default (0.5, 0.9, 0.99, 0.999).
        beta2: decay rate of the running second moment that normalises the features.
            Default 0.999.
        hidden: widths of the MLP's hidden layers. Default (32, 32).
        eps: added to the running RMS (as ``effmaml.Adam``, torch.optim's convention).
            Default 1e-8.
        param_feature: add the parameter's value as a feature. Default False.
        start: ``"adam"`` or ``"random"`` (see above). Default ``"adam"``.
        out_scale: scale of the output layer's initial weights. Default 1e-2.
        seed: seed of the weights' initialisation (a private generator; the global RNG is
            not touched). Default 0.
        dtype: dtype of the weights. Default ``torch.float32``.
        device: device of the weights. Default the CPU.

    Raises:
        ValueError: a decay outside [0, 1), a width < 1, ``start`` unknown, ``start="adam"``
            without 0.9 in ``decays``, ``out_scale`` < 0, eps <= 0.
    """

    # Note [The learned rule under recomputation]
    # step reads the network's weights from `hyper` (the copies a recomputing strategy
    # differentiates), never from `self.weights` directly, and draws nothing at random:
    # a recomputed step t is then the same function of (state_t, t, hyper) as the forward
    # pass's, which is what makes checkpoint and revolve return naive's meta-gradient. The
    # state is only the moving averages, a new tensor every step (no in-place update).

    def __init__(
        self,
        lr: LearningRate = 1e-3,
        decays: Sequence[float] = (0.5, 0.9, 0.99, 0.999),
        beta2: float = 0.999,
        hidden: Sequence[int] = (32, 32),
        eps: float = 1e-8,
        param_feature: bool = False,
        start: str = "adam",
        out_scale: float = 1e-2,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(lr)
        self.decays = tuple(float(b) for b in decays)
        if not self.decays or not all(0 <= b < 1 for b in self.decays):
            raise ValueError(f"decays must be one or more rates in [0, 1) (got {tuple(decays)})")
        if not 0 <= beta2 < 1:
            raise ValueError(f"beta2 must lie in [0, 1) (got {beta2})")
        if eps <= 0:
            raise ValueError(f"eps must be > 0 (got {eps}); it keeps the second derivative finite")
        self.hidden = tuple(int(h) for h in hidden)
        if any(h < 1 for h in self.hidden):
            raise ValueError(f"hidden widths must be >= 1 (got {tuple(hidden)})")
        if start not in ("adam", "random"):
            raise ValueError(f"start must be 'adam' or 'random' (got {start!r})")
        if start == "adam" and 0.9 not in self.decays:
            raise ValueError(
                f"start='adam' reads the momentum at decay 0.9, which decays={self.decays} "
                f"lacks; add 0.9 to decays or use start='random'"
            )
        if not out_scale >= 0:
            raise ValueError(f"out_scale must be >= 0 (got {out_scale})")
        self.beta2 = float(beta2)
        self.eps = float(eps)
        self.param_feature = bool(param_feature)
        self.start = start
        self.out_scale = float(out_scale)
        self.seed = int(seed)
        self.weights = self._init_weights(dtype, device)

    @property
    def features(self) -> int:
        """F, the number of features per coordinate."""
        return 1 + len(self.decays) + int(self.param_feature)

    def _init_weights(
        self, dtype: torch.dtype, device: torch.device | str | None
    ) -> dict[str, Tensor]:
        gen = torch.Generator().manual_seed(self.seed)
        sizes = [self.features, *self.hidden, 2]
        out: dict[str, Tensor] = {}
        for i, (a, b) in enumerate(itertools.pairwise(sizes)):
            last = i == len(sizes) - 2
            scale = self.out_scale / math.sqrt(a) if last else math.sqrt(2.0 / a)  # He init
            out[f"net.w{i}"] = torch.randn(a, b, generator=gen, dtype=torch.float64) * scale
            out[f"net.b{i}"] = torch.zeros(b, dtype=torch.float64)
        skip = torch.zeros(self.features, dtype=torch.float64)
        if self.start == "adam":
            skip[1 + self.decays.index(0.9)] = 1.0
            out["net.skip"] = skip
        return {k: v.to(dtype=dtype, device=device).requires_grad_(True) for k, v in out.items()}

    # -- what the outer loop learns -------------------------------------------------------
    def hyperparameters(self) -> dict[str, Tensor]:
        """The network's weights (``"net.w0"``, ``"net.b0"``, …, ``"net.skip"``) and any
        tensor learning rate: what ``step`` reads through ``hyper``."""
        return {**super().hyperparameters(), **self.weights}

    def parameters(self) -> list[Tensor]:
        """The network's weights, for the outer optimizer
        (``torch.optim.Adam(rule.parameters(), 1e-3)``)."""
        return list(self.weights.values())

    def state_dict(self) -> dict[str, Tensor]:
        """A detached copy of the weights (``torch.save`` it to keep a trained rule)."""
        return {k: v.detach().clone() for k, v in self.weights.items()}

    def load_state_dict(self, weights: Mapping[str, Tensor]) -> None:
        """Copy ``weights`` (from ``state_dict``) into this rule's weights, in place.

        Raises:
            ValueError: names or shapes that do not match this rule's (built with other
                ``decays``, ``hidden``, ``param_feature`` or ``start``).
        """
        if set(weights) != set(self.weights):
            raise ValueError(
                f"weights name {sorted(weights)} but this rule has {sorted(self.weights)}; "
                f"build the LearnedOptimizer with the decays, hidden, param_feature and start "
                f"the weights were trained with"
            )
        for k, v in weights.items():
            if v.shape != self.weights[k].shape:
                raise ValueError(
                    f"weight {k!r} has shape {tuple(v.shape)}, this rule's "
                    f"{tuple(self.weights[k].shape)}; build it with the widths it was "
                    f"trained with"
                )
        with torch.no_grad():
            for k, v in weights.items():
                self.weights[k].copy_(v)

    # -- the optimizer ----------------------------------------------------------------------
    def init(self, params: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``{"stats": zeros (P, len(decays) + 1)}``: per coordinate of the adapted
        parameters (in order, flattened), the moving averages of ``g`` at each decay, then
        that of ``g²``."""
        p = next(iter(params.values()))
        total = sum(v.numel() for v in params.values())
        return {"stats": p.new_zeros(total, len(self.decays) + 1)}

    def step(
        self,
        state: Mapping[str, Tensor],
        params: Mapping[str, Tensor],
        grads: Mapping[str, Tensor],
        t: int,
        hyper: Mapping[str, Tensor],
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        names = list(params)
        sizes = [params[n].numel() for n in names]
        stats = state["stats"]
        if stats.shape[0] != sum(sizes):
            raise ValueError(
                f"LearnedOptimizer's state has {stats.shape[0]} coordinates but the adapted "
                f"parameters have {sum(sizes)}; build the state with init(params) for these "
                f"parameters"
            )
        k = len(self.decays)
        rates = torch.tensor([*self.decays, self.beta2], dtype=stats.dtype, device=stats.device)
        g = torch.cat([grads[n].reshape(-1) for n in names])
        fresh = torch.cat([g.unsqueeze(1).expand(-1, k), (g * g).unsqueeze(1)], dim=1)
        stats = rates * stats + (1.0 - rates) * fresh  # (P, k + 1)
        corrections = 1.0 - rates ** (t + 1)  # the bias corrections (Adam's)
        rms = safe_sqrt(stats[:, k]) / corrections[k] ** 0.5 + self.eps
        columns = [g.unsqueeze(1), stats[:, :k] / corrections[:k]]
        x = torch.cat(columns, dim=1) / rms.unsqueeze(1)
        if self.param_feature:
            p = torch.cat([params[n].reshape(-1) for n in names])
            x = torch.cat([x, p.unsqueeze(1)], dim=1)  # (P, F)
        update = self._apply(x, hyper)
        new_params = {
            n: params[n] - self.rate(n, hyper, t) * part.view_as(params[n])
            for n, part in zip(names, update.split(sizes))
        }
        return {"stats": stats}, new_params

    def _apply(self, x: Tensor, hyper: Mapping[str, Tensor]) -> Tensor:
        """The network on the features ``x`` (P, F): ``d · exp(s)`` per coordinate."""

        def w(key: str) -> Tensor:
            return hyper.get(key, self.weights[key]).to(dtype=x.dtype, device=x.device)

        h = x
        layers = len(self.hidden) + 1
        for i in range(layers):
            h = torch.addmm(w(f"net.b{i}"), h, w(f"net.w{i}"))
            if i < layers - 1:
                h = torch.relu(h)
        d = h[:, 0]
        if "net.skip" in self.weights:
            d = d + x @ w("net.skip")
        return d * torch.exp(h[:, 1])

    def _repr_args(self) -> str:
        return (
            f"{super()._repr_args()}, decays={self.decays}, hidden={self.hidden}, "
            f"param_feature={self.param_feature}, start={self.start!r}"
        )
