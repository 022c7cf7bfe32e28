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


def build_model(name: str, classes: int) -> nn.Module:
    """The registered model ``name`` for ``classes`` outputs.

    Raises:
        ValueError: an unknown name (lists the known ones).
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(sorted(MODELS))}")
    return MODELS[name](classes)


@register_model("resnet18")
def resnet18(classes: int) -> nn.Module:
    """torchvision's ResNet18 (BatchNorm, 11.2M parameters), randomly initialised."""
    import torchvision

    return torchvision.models.resnet18(num_classes=classes)
