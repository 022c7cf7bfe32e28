"""The bench's model registry: a preset names its model here.

Each entry builds the model (``fn(classes, **preset.model_options)``) and says what its
batches are and what loss it is trained with: ``"images"`` (``(x, y)``: random
``batch x 3 x image x image`` inputs, labels below ``classes``, cross-entropy) or
``"tokens"`` (``batch x seq`` random token ids below ``vocab``, causal language-model loss).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["INPUTS", "MODELS", "batch_for", "build_model", "loss_for", "register_model"]

MODELS: dict[str, Callable[..., nn.Module]] = {}
INPUTS: dict[str, str] = {}  # model name -> "images" | "tokens"


def register_model(name: str, inputs: str = "images"):
    """Decorator: add a builder ``fn(classes, **options) -> nn.Module`` under ``name``."""

    def add(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        MODELS[name] = fn
        INPUTS[name] = inputs
        return fn

    return add


def image_loss(model, batch) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def lm_loss(model, batch) -> torch.Tensor:
    """Causal language-model loss: each token predicts the next (Hugging Face's shift)."""
    return model(input_ids=batch, labels=batch).loss


def loss_for(model_name: str):
    """The loss a preset's model is trained with."""
    return lm_loss if INPUTS[model_name] == "tokens" else image_loss


def batch_for(preset: Any, g: torch.Generator, device: torch.device, dtype) -> Any:
    """One random batch for ``preset`` drawn from ``g`` (on ``device``)."""
    if INPUTS[preset.model] == "tokens":
        options = dict(preset.model_options)
        shape = (preset.batch, options["seq"])
        return torch.randint(0, options["vocab"], shape, generator=g, device=device)
    x = torch.randn(
        preset.batch, 3, preset.image, preset.image, generator=g, device=device, dtype=dtype
    )
    y = torch.randint(0, preset.classes, (preset.batch,), generator=g, device=device)
    return x, y


def build_model(name: str, classes: int, **options) -> nn.Module:
    """The registered model ``name`` for ``classes`` outputs (``options`` go to its builder).

    Raises:
        ValueError: an unknown name (lists the known ones).
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(sorted(MODELS))}")
    return MODELS[name](classes, **options)


@register_model("gpt2", inputs="tokens")
def gpt2(
    classes: int = 0,
    n_layer: int = 2,
    n_embd: int = 64,
    n_head: int = 2,
    vocab: int = 1000,
    seq: int = 64,
    dropout: float = 0.1,
    attention: str = "sdpa",
) -> nn.Module:
    """Hugging Face's ``GPT2LMHeadModel`` from a ``GPT2Config`` (no weights downloaded),
    input and output embeddings tied, ``attention`` ``"sdpa"`` (PyTorch's
    scaled_dot_product_attention, the default) or ``"eager"``. Needs ``transformers``
    (``pip install -e '.[transformers]'``). 124M parameters at n_layer=12, n_embd=768,
    n_head=12, vocab=50257."""
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError as err:
        raise ImportError(
            "the gpt2 presets need Hugging Face transformers: pip install -e '.[transformers]'"
        ) from err
    config = GPT2Config(
        vocab_size=vocab,
        n_positions=seq,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        tie_word_embeddings=True,
        bos_token_id=vocab - 1,
        eos_token_id=vocab - 1,
    )
    config._attn_implementation = attention
    return GPT2LMHeadModel(config)


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
