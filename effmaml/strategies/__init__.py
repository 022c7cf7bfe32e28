"""Strategies: how to differentiate through the inner loop, and their registry."""

from .base import STRATEGIES, Outcome, Strategy, make_strategy, register_strategy
from .checkpoint import Checkpoint
from .first_order import FirstOrder
from .implicit import Implicit
from .naive import Naive

__all__ = [
    "STRATEGIES",
    "Checkpoint",
    "FirstOrder",
    "Implicit",
    "Naive",
    "Outcome",
    "Strategy",
    "make_strategy",
    "register_strategy",
]
