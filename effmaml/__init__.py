"""effmaml: memory-efficient, exact second-order MAML for PyTorch.

>>> maml = effmaml.MAML(model, loss_fn, inner=effmaml.SGD(lr=0.01), strategy="checkpoint")
>>> adapted = maml.adapt(batches)            # one batch per inner step
>>> loss_fn(adapted, query_batch).backward() # meta-gradient in model.parameters()

The public names below are loaded on first use (PEP 562), so that importing one module
(``effmaml.memory``, say) loads only the layers under it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it (every registered strategy class is one)
_EXPORTS = {
    "MAML": "maml",
    "Adapted": "adapted",
    "RepeatedBatch": "sources",
    "SGD": "optim",
    "Adam": "optim",
    "AdamW": "optim",
    "RMSprop": "optim",
    "Adagrad": "optim",
    "InnerOptimizer": "inner",
    "LearnedOptimizer": "learned",
    "MetaTrainer": "train",
    "EpisodeSampler": "episodes",
    "PerStepBatchNorm": "perstep",
    "at_step": "step",
    "msl_weights": "perstep",
    "per_step_batchnorm": "perstep",
    **{
        name: "strategies"
        for name in (
            "STRATEGIES",
            "Auto",
            "Checkpoint",
            "FirstOrder",
            "Implicit",
            "Naive",
            "Offload",
            "Plan",
            "Revolve",
            "RunFacts",
            "Strategy",
            "Truncated",
            "make_strategy",
            "register_strategy",
        )
    },
}
_MODULES = (
    "costs",
    "distributed",
    "episodes",
    "measure",
    "memory",
    "omniglot",
    "replay",
    "tasks",
)

# the names the package exports; tests/test_api.py checks that this list, the lazy table
# above, the imports for type checkers below and the strategy registry agree
__all__ = [
    "MAML",
    "SGD",
    "STRATEGIES",
    "Adagrad",
    "Adam",
    "AdamW",
    "Adapted",
    "Auto",
    "Checkpoint",
    "EpisodeSampler",
    "FirstOrder",
    "Implicit",
    "InnerOptimizer",
    "LearnedOptimizer",
    "MetaTrainer",
    "Naive",
    "Offload",
    "PerStepBatchNorm",
    "Plan",
    "RMSprop",
    "RepeatedBatch",
    "Revolve",
    "RunFacts",
    "Strategy",
    "Truncated",
    "at_step",
    "costs",
    "distributed",
    "episodes",
    "make_strategy",
    "measure",
    "memory",
    "msl_weights",
    "omniglot",
    "per_step_batchnorm",
    "register_strategy",
    "replay",
    "tasks",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    elif name in _MODULES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module 'effmaml' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    # the public names and the package's own dunders, not this file's imports (Any, ...)
    return sorted({*__all__, *(n for n in globals() if n.startswith("__"))})


if TYPE_CHECKING:  # what the names are, for type checkers and editors
    from . import costs, distributed, episodes, measure, memory, omniglot, replay, tasks
    from .adapted import Adapted
    from .episodes import EpisodeSampler
    from .inner import InnerOptimizer
    from .learned import LearnedOptimizer
    from .maml import MAML
    from .optim import SGD, Adagrad, Adam, AdamW, RMSprop
    from .perstep import PerStepBatchNorm, msl_weights, per_step_batchnorm
    from .sources import RepeatedBatch
    from .step import at_step
    from .strategies import (
        STRATEGIES,
        Auto,
        Checkpoint,
        FirstOrder,
        Implicit,
        Naive,
        Offload,
        Plan,
        Revolve,
        RunFacts,
        Strategy,
        Truncated,
        make_strategy,
        register_strategy,
    )
    from .train import MetaTrainer
