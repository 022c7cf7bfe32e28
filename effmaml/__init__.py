"""effmaml: memory-efficient, exact second-order MAML for PyTorch.

>>> maml = effmaml.MAML(model, loss_fn, inner=effmaml.SGD(lr=0.01), strategy="checkpoint")
>>> adapted = maml.adapt(batches)            # one batch per inner step
>>> loss_fn(adapted, query_batch).backward() # meta-gradient in model.parameters()
"""

from . import distributed, memory
from .inner import SGD, Adam, InnerOptimizer
from .maml import MAML, Adapted, RepeatedBatch
from .strategies import (
    STRATEGIES,
    Auto,
    Checkpoint,
    FirstOrder,
    Implicit,
    Naive,
    Offload,
    Revolve,
    Strategy,
    make_strategy,
    register_strategy,
)
from .train import MetaTrainer

__version__ = "0.1.0"

__all__ = [
    "MAML",
    "SGD",
    "STRATEGIES",
    "Adam",
    "Adapted",
    "Auto",
    "Checkpoint",
    "FirstOrder",
    "Implicit",
    "InnerOptimizer",
    "MetaTrainer",
    "Naive",
    "Offload",
    "RepeatedBatch",
    "Revolve",
    "Strategy",
    "distributed",
    "make_strategy",
    "memory",
    "register_strategy",
]
