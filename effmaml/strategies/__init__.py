"""Strategies: how to differentiate through the inner loop, and their registry."""

# Registration order is import order, and auto breaks ties between candidates in that
# order: the reference first, then the schedules from least to most recomputation.
# ruff: noqa: I001
from .base import (
    STRATEGIES,
    Outcome,
    Plan,
    RunFacts,
    Strategy,
    make_strategy,
    register_strategy,
)
from .naive import Naive
from .first_order import FirstOrder
from .scheduled import Scheduled
from .checkpoint import Checkpoint
from .revolve import Revolve
from .offload import Offload
from .implicit import Implicit
from .truncated import Truncated
from .auto import Auto

__all__ = [
    "STRATEGIES",
    "Auto",
    "Checkpoint",
    "FirstOrder",
    "Implicit",
    "Naive",
    "Offload",
    "Outcome",
    "Plan",
    "Revolve",
    "RunFacts",
    "Scheduled",
    "Strategy",
    "Truncated",
    "make_strategy",
    "register_strategy",
]
