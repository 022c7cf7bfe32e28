"""Choosing each method's hyperparameters on validation characters only.

Each method has a small grid (:data:`GRIDS`): a starting configuration and variants that
change one knob each (inner rate, inner steps, filters 32/64, queries per class,
meta-batch; iMAML's λ; ProtoNets' ways at training; transfer's and random's fine-tuning
rate and steps). Every configuration trains once (seed 0) on small1's training characters
for the search's CPU budget, and is scored on ``VAL_TASKS`` (100) 20-way 1-shot
episodes of small1's validation characters; each method keeps its most accurate
configuration (the first on a tie). Lake et al.'s 20 runs and the held-out characters are
never read. The main run (``python -m bench.omniglot``) uses the chosen values on both
minimal sets.
"""

from __future__ import annotations

import time

import torch

from .experiment import configure, train_tracked

__all__ = ["GRIDS", "SEARCH_SEED", "choose", "grid", "search_job"]

SEARCH_SEED = 0
_SGD = {"inner_lr": 0.1, "inner_steps": 5, "width": 32, "k_query": 3, "meta_batch": 2}
_ONE_AT_A_TIME = [
    ("inner_lr", 0.4),
    ("inner_steps", 3),
    ("width", 64),
    ("k_query", 1),
    ("meta_batch", 4),
]
# method -> (the starting configuration, [(knob, value) changed alone, ...])
GRIDS: dict[str, tuple[dict, list[tuple[str, object]]]] = {
    # 5 steps of 0.1, 32 filters, 3 queries, meta-batch 2: a user's recipe that trains
    "maml": (_SGD, _ONE_AT_A_TIME),
    "first_order": (_SGD, _ONE_AT_A_TIME),
    "mamlpp": (_SGD, _ONE_AT_A_TIME),  # inner_lr: the learned rates' start
    "implicit": (
        {**_SGD, "inner_steps": 10, "lam": 0.5},
        [("lam", 2.0), ("inner_lr", 0.4), ("inner_steps", 5), ("width", 64), ("k_query", 1)],
    ),
    # fine-tuning the head at test (inner_lr, inner_steps); the pooled batch holds as many
    # images as meta_batch episodes of 20 x (1 + k_query)
    "transfer": (
        {"inner_lr": 0.1, "inner_steps": 10, "width": 32, "k_query": 3, "meta_batch": 2},
        [("inner_lr", 0.4), ("inner_steps", 50), ("width", 64), ("meta_batch", 4)],
    ),
    "random": (
        {"inner_lr": 0.1, "inner_steps": 10, "width": 32},
        [("inner_lr", 0.4), ("inner_steps", 50), ("width", 64)],
    ),
    # Snell et al.'s Omniglot training used 60-way episodes with 5 queries per class
    "protonet": (
        {"train_way": 20, "width": 32, "k_query": 5, "meta_batch": 1},
        [("train_way", 60), ("width", 64), ("k_query", 15), ("meta_batch", 4)],
    ),
}


def grid(method: str) -> list[dict]:
    """The method's configurations: the starting one, then one per variant."""
    start, variants = GRIDS[method]
    return [dict(start)] + [{**start, knob: value} for knob, value in variants]


def search_job(args) -> dict:
    """Train one configuration on small1 (seed 0) for ``cpu_s`` CPU seconds; its
    validation accuracy and cost. ``args``: ``(method, index, config, cpu_s, val_tasks)``."""
    method, index, config, cpu_s, val_tasks = args
    torch.set_num_threads(1)
    wall0 = time.perf_counter()
    p = configure(method, config, "small1")
    _, cost, curve = train_tracked(p, method, SEARCH_SEED, cpu_s, (1.0,), val_tasks)
    return {
        "method": method,
        "index": index,
        "config": config,
        "val_accuracy": curve[-1]["val_accuracy"],
        "steps": cost["steps"],
        "cpu_s": cost["cpu_s"],
        "job_wall_s": time.perf_counter() - wall0,
        "schedule": cost.get("schedule", ""),
    }


def choose(results: list[dict]) -> dict[str, dict]:
    """Per method: its grid in order, each configuration's validation accuracy and outer
    steps, and the chosen (most accurate; the first on a tie) configuration."""
    out: dict[str, dict] = {}
    for r in sorted(results, key=lambda r: (r["method"], r["index"])):
        m = out.setdefault(r["method"], {"grid": [], "val_accuracy": [], "steps": []})
        m["grid"].append(r["config"])
        m["val_accuracy"].append(r["val_accuracy"])
        m["steps"].append(r["steps"])
    for m in out.values():
        best = max(range(len(m["grid"])), key=lambda i: (m["val_accuracy"][i], -i))
        m["chosen"] = m["grid"][best]
    return out
