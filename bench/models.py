"""The bench's model registry: a preset names its model here.

Each entry builds the model for a number of classes; the preset's batches must fit its
input (images ``3 x image x image`` for the vision models).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

__all__ = ["MODELS", "build_model", "register_model"]

MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str):
    """Decorator: add a builder ``fn(classes) -> nn.Module`` under ``name``."""

    def add(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        MODELS[name] = fn
        return fn

    return add


def build_model(name: str, classes: int, **options) -> nn.Module:
    """The registered model ``name`` for ``classes`` outputs (``options`` go to its builder).

    Raises:
        ValueError: an unknown name (lists the known ones).
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(sorted(MODELS))}")
    return MODELS[name](classes, **options)


@register_model("resnet18")
def resnet18(classes: int) -> nn.Module:
    """torchvision's ResNet18 (BatchNorm, 11.2M parameters), randomly initialised."""
    import torchvision

    return torchvision.models.resnet18(num_classes=classes)


class Conv4(nn.Sequential):
    """Finn et al. 2017's few-shot backbone: 4 x [3x3 conv, BatchNorm, ReLU, 2x2 max-pool]
    and a linear head (``self.head``).

    BatchNorm normalises with the batch's statistics always (``track_running_stats=False``),
    as in the MAML reference code: a support set is one batch, and test episodes are
    normalised by their own statistics (transductive, as the published numbers are).
    """

    def __init__(self, classes: int, channels: int = 1, width: int = 64, image: int = 28):
        layers: list[nn.Module] = []
        c = channels
        for _ in range(4):
            layers += [
                nn.Conv2d(c, width, 3, padding=1),
                nn.BatchNorm2d(width, track_running_stats=False),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ]
            c = width
        side = image
        for _ in range(4):
            side //= 2
        super().__init__(*layers, nn.Flatten(), nn.Linear(width * side * side, classes))

    @property
    def head(self) -> nn.Linear:
        return self[-1]


@register_model("conv4")
def conv4(classes: int, channels: int = 1, width: int = 64, image: int = 28) -> nn.Module:
    """Conv-4: 28x28 Omniglot-like (1 channel) or 84x84 miniImageNet (3 channels)."""
    return Conv4(classes, channels, width, image)
