"""Peak memory and time of one outer step, each measured in a fresh process.

``python -m bench.horizons --child MODE PROBLEM METHOD``: MODE ``memory`` (started with
``MALLOC_FOR_MEASURING``, ``bench.isolated.run_child``) or ``time`` (without);
PROBLEM a dataset of the schedule experiment (``mnist1d``, ``digits``) or ``distill``;
METHOD ``exact``, ``truncated K``, ``naive`` or ``online HD``. One outer step warms up
(the probe, allocator, caches), then memory: the peak resident bytes of one more above
what was resident before it (``effmaml.measure.PeakMemory``); time: the median of
``REPEATS`` more. A truncated window is placed at the end of the unroll here (the longest
unroll a random window can draw; its memory does not depend on where it lies). Prints one
JSON line.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from effmaml.measure import PeakMemory

from ..bilevel import distill as bd
from ..bilevel.common import digits
from ..isolated import run_child
from .meta import Method, method, outer_step
from .problem import KNOTS, setup, train_hd

__all__ = ["REPEATS", "main", "measure"]

REPEATS = 3
RATE = 0.01  # the schedule one measured outer step runs (the cost does not depend on it)


def _step(problem: str, name: str, steps: int, batch: int, extra: dict) -> Callable[[], dict]:
    """One outer step of ``name`` on ``problem``: a function returning ``Adapted.info``."""
    if problem == "distill":
        split = digits()
        strategy, kw = "checkpoint", dict(extra)
        if name.startswith("truncated"):
            strategy, kw = "truncated", {"window": int(name.split()[1])}
        elif name == "naive":
            strategy, kw = "naive", {}

        def run_distill() -> dict:
            bd.meta_gradient(split, steps, strategy, **kw)
            return {}

        return run_distill
    s = setup(problem, steps)
    s = dataclasses.replace(s, steps=steps, batch=batch)
    if name == "online HD":
        return lambda: (train_hd(s, RATE, 1e-4, 0), {})[1]
    m = Method("naive", "naive") if name == "naive" else method(name)
    if m.strategy == "truncated":
        m = Method(m.name, m.strategy, (("window", m.kwargs()["window"]),))

    def run_meta() -> dict:
        log_knots = torch.full((KNOTS,), math.log(RATE), requires_grad=True)
        _, info = outer_step(s, m, log_knots, 0)
        return info

    return run_meta


def main(argv: list[str]) -> dict[str, Any]:
    """The child: ``MODE PROBLEM METHOD STEPS BATCH [JSON options]``."""
    mode, problem, name, steps, batch = argv[:5]
    extra = json.loads(argv[5]) if len(argv) > 5 else {}
    torch.set_num_threads(1)
    run = _step(problem, name, int(steps), int(batch), extra)
    info = run()  # warm-up
    row: dict[str, Any] = {
        "label": str(info.get("chosen") or _label(info, name)),
        "predicted_peak_bytes": info.get("predicted_peak_bytes"),
    }
    if mode == "memory":
        with PeakMemory("cpu") as peak:
            run()
        row["peak_bytes"] = peak.peak
    else:
        times = []
        for _ in range(REPEATS):
            t0 = time.perf_counter()
            run()
            times.append(time.perf_counter() - t0)
        row["seconds"] = statistics.median(times)
    return row


def _label(info: dict, name: str) -> str:
    if "segment" in info:
        return f"checkpoint(segment={info['segment']})"
    if "window" in info:
        return f"truncated(window={info['window']})"
    return name


def measure(
    problem: str,
    name: str,
    steps: int,
    batch: int,
    extra: dict | None = None,
    fresh: bool = True,
) -> dict:
    """Memory and time of one outer step of ``name``, each in a fresh process (``fresh``;
    else both in this one: the tests' quick run, whose numbers mean nothing)."""
    args = [problem, name, str(steps), str(batch), json.dumps(extra or {})]
    if fresh:
        mem = run_child("bench.horizons", ["--child", "memory", *args], memory=True, check=True)
        tim = run_child("bench.horizons", ["--child", "time", *args], check=True)
    else:
        mem, tim = main(["memory", *args]), main(["time", *args])
    return {"problem": problem, "method": name, **mem, "seconds": tim["seconds"]}
