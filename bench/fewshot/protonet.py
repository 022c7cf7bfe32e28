"""Prototypical Networks (Snell, Swersky & Zemel 2017), the metric-learning baseline.

A class's prototype is the mean embedding of its support examples; a query is classified by
the softmax over negative squared Euclidean distances to the prototypes. Training: the
cross-entropy of the episode's queries, averaged over a meta-batch of episodes, one Adam
step. The embedding is the Conv-4 without its head (its flattened last feature map, as in
the paper); support and queries go through it as one batch (the Conv-4 normalises with
batch statistics, as MAML's query batches do). No inner loop: one forward and backward
per episode.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["embedding", "proto_logits", "proto_loss"]


def embedding(model: nn.Module) -> nn.Module:
    """The Conv-4 without its head (a ``nn.Sequential`` of the same modules: shares the
    parameters)."""
    return nn.Sequential(*list(model)[:-1])


def proto_logits(model: nn.Module, support: tuple[Tensor, Tensor], x: Tensor) -> Tensor:
    """``(len(x), classes)``: minus the squared distance of each of ``x``'s embeddings to
    each class's prototype (the mean embedding of its support examples, classes
    ``0 .. max(y)``)."""
    xs, ys = support
    z = embedding(model)(torch.cat([xs, x]))
    zs, zq = z[: len(xs)], z[len(xs) :]
    n = int(ys.max()) + 1
    protos = torch.zeros(n, z.shape[1], dtype=z.dtype).index_add_(0, ys, zs)
    protos = protos / torch.bincount(ys, minlength=n).unsqueeze(1).to(z.dtype)
    return -(zq.unsqueeze(1) - protos.unsqueeze(0)).pow(2).sum(-1)


def proto_loss(model: nn.Module, episode) -> Tensor:
    """One episode's query cross-entropy."""
    support, (xq, yq) = episode
    return F.cross_entropy(proto_logits(model, support, xq), yq)
