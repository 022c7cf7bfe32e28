"""Strategies: how to differentiate through the inner loop, and their registry."""

from .auto import Auto, Decision
from .base import STRATEGIES, Outcome, RunFacts, Strategy, make_strategy, register_strategy
from .checkpoint import Checkpoint
from .first_order import FirstOrder
from .implicit import Implicit
from .naive import Naive
from .offload import Offload
from .revolve import Revolve
from .scheduled import Scheduled

__all__ = [
    "STRATEGIES",
    "Auto",
    "Checkpoint",
    "Decision",
    "FirstOrder",
    "Implicit",
    "Naive",
    "Offload",
    "Outcome",
    "Revolve",
    "RunFacts",
    "Scheduled",
    "Strategy",
    "make_strategy",
    "register_strategy",
]
