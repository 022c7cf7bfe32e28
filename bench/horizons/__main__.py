"""``make horizons``: the short-horizon bias measured, and what exactness buys.

``python -m bench.horizons [--quick] [--out DIR] [--workers W] [--report-only]`` runs the
schedule experiment on MNIST-1D and scikit-learn's digits (``bench.horizons.run``), the
distillation comparison at N = 300 (``bench.horizons.distill``) and the cost of one outer
step of each method in fresh processes (``bench.horizons.measure``); writes ``raw.json``
first, then ``summary.md``, ``scores.csv`` and ``schedules.png`` from it (default
``results/horizons``). ``--report-only`` rewrites the last three from an existing
``raw.json``; ``--quick`` runs everything at a tiny size (the tests').

Each of the first two stages, when done, is saved beside (``OUT/stage-*.json``, with the
settings it ran under): a run stopped after it starts again from the next stage (the
summary says which stages an earlier invocation ran); the files go once ``raw.json`` is
written.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..env import environment, timestamp
from ..fewshot.run import pool_map, worker_pool
from . import distill, measure
from .problem import KNOTS
from .report import plot_schedules, summary, write_scores
from .run import QUICK, Settings, run

__all__ = ["main", "report"]


def run_distill(cfg: Settings) -> dict[str, Any]:
    """Exact against truncated distillation, every seed, in the worker pool."""
    jobs = [("exact", cfg.distill_steps, cfg.distill_window, cfg.distill_outer, s)
            for s in cfg.distill_seeds]  # fmt: skip
    jobs += [("truncated", *j[1:]) for j in jobs]
    pool = worker_pool(cfg.workers)
    try:
        runs = pool_map(pool, distill.job, jobs)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    return {"runs": runs}


def run_costs(cfg: Settings, quick: bool) -> tuple[list[dict], list[dict]]:
    """One outer step of every method, memory and time, each in fresh processes, one at
    a time (nothing else running)."""
    from ..bilevel.common import digits
    from .distill import budget

    names = ["naive", *cfg.methods(), "online HD"]
    fresh = not quick  # the quick run measures in this process: its numbers mean nothing
    rows = []
    for problem, batch in cfg.batches:
        for name in names:
            rows.append(measure.measure(problem, name, cfg.steps, batch, fresh=fresh))
            print(rows[-1], flush=True)
    n, k = cfg.distill_steps, cfg.distill_window
    extra = {"memory_budget": budget(digits(), n, k)}
    dist = [
        {**measure.measure("distill", "exact", n, 0, extra, fresh), "method": "exact"},
        {**measure.measure("distill", f"truncated {k}", n, 0, None, fresh), "method": "truncated"},
    ]
    return rows, dist


def report(out: Path) -> None:
    """``summary.md``, ``scores.csv`` and ``schedules.png`` from ``out/raw.json``."""
    raw = json.loads((out / "raw.json").read_text())
    write_scores(raw, out / "scores.csv")
    plot_schedules(raw, out / "schedules.png")
    (out / "summary.md").write_text(summary(raw))


def _stage(
    out: Path, name: str, settings: dict, compute: Callable[[], Any], resumed: list[str]
) -> Any:
    """``compute()``, saved to ``out/stage-NAME.json`` with ``settings``; or what that file
    holds, when an earlier invocation with the same settings saved it (``name`` appended
    to ``resumed``)."""
    path = out / f"stage-{name}.json"
    same = json.loads(json.dumps(settings))  # as the file holds them: tuples as lists
    if path.exists():
        saved = json.loads(path.read_text())
        if saved["settings"] == same:
            print(f"{path}: done by an earlier invocation, not run again", file=sys.stderr)
            resumed.append(name)
            return saved["result"]
    result = compute()
    path.write_text(json.dumps({"settings": same, "result": result}))
    return result


def _cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.horizons", description=__doc__)
    ap.add_argument("--quick", action="store_true", help="everything at a tiny size")
    ap.add_argument("--out", default="results/horizons")
    ap.add_argument("--workers", type=int, default=None, help="worker processes (default 2)")
    ap.add_argument("--report-only", action="store_true", help="rewrite from raw.json")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(measure.main(args.child)))
        return
    out = Path(args.out)
    if args.report_only:
        report(out)
        return
    cfg = QUICK if args.quick else Settings()
    if args.workers is not None:
        cfg = dataclasses.replace(cfg, workers=args.workers)
    out.mkdir(parents=True, exist_ok=True)
    start, load = time.time(), os.getloadavg()[0]
    torch.set_num_threads(1)
    settings = {**dataclasses.asdict(cfg), "knots": KNOTS}
    resumed: list[str] = []
    datasets = _stage(out, "datasets", settings, lambda: run(cfg), resumed)
    distilled = _stage(out, "distill", settings, lambda: run_distill(cfg), resumed)
    before_costs = os.getloadavg()[0]
    costs, dist_costs = run_costs(cfg, args.quick)
    env = {
        **environment("cpu"),
        "date": timestamp(),
        "minutes": (time.time() - start) / 60,
        "cpu_minutes": _cpu_seconds() / 60,
        "load": load,
        # the times below are read against this: the costs phase measures one at a time
        "load_costs": [before_costs, os.getloadavg()[0]],
        "resumed_stages": resumed,
    }
    raw = {
        "settings": settings,
        "env": env,
        "datasets": datasets,
        "costs": costs,
        "distill": {**distilled, "costs": dist_costs},
    }
    (out / "raw.json").write_text(json.dumps(raw, indent=1))
    for name in ("datasets", "distill"):
        (out / f"stage-{name}.json").unlink(missing_ok=True)
    report(out)
    print(f"wrote {out} in {env['minutes']:.1f} minutes", file=sys.stderr)


if __name__ == "__main__":
    main()
