"""``make horizons``: the short-horizon bias measured, and what exactness buys.

``python -m bench.horizons [--quick] [--out DIR] [--workers W] [--report-only]`` runs the
schedule experiment on MNIST-1D and scikit-learn's digits (``bench.horizons.run``), the
distillation comparison at N = 300 (``bench.horizons.distill``) and the cost of one outer
step of each method in fresh processes (``bench.horizons.measure``); writes ``raw.json``
first, then ``summary.md``, ``scores.csv`` and ``schedules.png`` from it (default
``results/horizons``). ``--report-only`` rewrites the last three from an existing
``raw.json``; ``--quick`` runs everything at a tiny size (the tests').
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ..env import environment, timestamp
from ..fewshot.run import pool_map, worker_pool
from . import measure
from .problem import KNOTS
from .report import plot_schedules, summary, write_scores
from .run import QUICK, Settings, run

__all__ = ["main", "report"]


def _distill_job(args: tuple) -> dict[str, Any]:
    from ..bilevel.common import digits
    from .distill import learn_and_score

    torch.set_num_threads(1)
    kind, steps, window, outer, seed = args
    return learn_and_score(kind, digits(), steps, window, outer, seed)


def run_distill(cfg: Settings) -> dict[str, Any]:
    """Exact against truncated distillation, every seed, in the worker pool."""
    jobs = [("exact", cfg.distill_steps, cfg.distill_window, cfg.distill_outer, s)
            for s in cfg.distill_seeds]  # fmt: skip
    jobs += [("truncated", *j[1:]) for j in jobs]
    pool = worker_pool(cfg.workers)
    try:
        runs = pool_map(pool, _distill_job, jobs)
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
    datasets = run(cfg)
    distill = run_distill(cfg)
    costs, dist_costs = run_costs(cfg, args.quick)
    env = {
        **environment("cpu"),
        "date": timestamp(),
        "minutes": (time.time() - start) / 60,
        "cpu_minutes": _cpu_seconds() / 60,
        "load": load,
    }
    settings = {**dataclasses.asdict(cfg), "knots": KNOTS}
    raw = {
        "settings": settings,
        "env": env,
        "datasets": datasets,
        "costs": costs,
        "distill": {**distill, "costs": dist_costs},
    }
    (out / "raw.json").write_text(json.dumps(raw, indent=1))
    report(out)
    print(f"wrote {out} in {env['minutes']:.1f} minutes", file=sys.stderr)


if __name__ == "__main__":
    main()
