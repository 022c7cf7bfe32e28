"""``make learned-optimizer``: a learned optimizer meta-trained through long unrolls.

``python -m bench.learned_optimizer [--quick] [--out DIR] [--report-only]`` meta-trains
the coordinate-wise MLP rule (``effmaml.learned.LearnedOptimizer``) through unrolls of
N = 50, 200 and 1000 inner steps, exactly (a checkpoint schedule) and truncated to the
last K = 10 and 50 steps; tunes SGD-momentum's and Adam's rates on the same tasks'
validation data; scores all on held-out tasks trained for N and 2N steps; measures one
outer step's peak memory in fresh processes and its meta-gradient against naive's. It
writes ``DIR/raw.json`` first, then from it the CSVs, ``summary.md`` and ``curves.png``
(default ``results/learned-optimizer``). ``--report-only``: rebuild those from
``DIR/raw.json``. ``--quick``: everything at a tiny size (the tests' run).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import time
from pathlib import Path
from typing import Any

import torch

from ..env import environment, timestamp
from ..fewshot.run import pool_map, worker_pool
from . import experiment as ex
from . import meta
from .report import BASELINES, UNTRAINED, write
from .tasks import load

__all__ = ["main", "run"]


def run(cfg: ex.Settings, out: Path, quick: bool) -> dict[str, Any]:
    """Every job of the experiment; returns the raw record (what raw.json holds)."""
    start = time.time()
    load_start = os.getloadavg()[0]
    splits = load(cfg.datasets)
    configs = ex.configs(cfg)
    pool = worker_pool(cfg.workers)
    try:
        # meta-training and tuning, the longest jobs first
        work: list[tuple[float, tuple[str, Any]]] = [
            (mc.outer_steps * mc.steps * (2.0 if mc.strategy != "truncated" else 1.0),
             ("meta", (mc, splits)))
            for mc in configs
        ]  # fmt: skip
        for name, grid in cfg.grids:
            for n in cfg.horizons:
                for lr in grid:
                    work.append(
                        (cfg.tune_tasks * n * 0.2, ("tune", (name, lr, n, cfg.tune_tasks, splits)))
                    )
        work.sort(key=lambda w: -w[0])
        done = pool_map(pool, ex.run_job, [w[1] for w in work])
        metas = [d for d in done if "history" in d]
        tuning = [d for d in done if "val_loss" in d]
        chosen = []
        for name, _ in cfg.grids:
            for n in cfg.horizons:
                grid = [t for t in tuning if t["optimizer"] == name and t["steps"] == n]
                best = min(grid, key=lambda t: t["val_loss"])
                chosen.append({"optimizer": name, "steps": n, "lr": best["lr"]})
        print("meta-training and tuning done", f"{(time.time() - start) / 60:.1f} min", flush=True)
        # the held-out tasks: every rule and the tuned baselines, for 2N steps
        scored = []
        for n in cfg.horizons:
            first = next(c for c in configs if c.steps == n)
            untrained = {k: v.tolist() for k, v in meta.rule(first).state_dict().items()}
            for data, seed in ex.held_out_tasks(cfg):
                scored.append(ex.Scored(n, UNTRAINED, data, seed, rule=first, weights=untrained))
                for m in metas:
                    if m["steps"] == n:
                        mc = next(c for c in configs if c.steps == n and c.label == m["method"])
                        scored.append(
                            ex.Scored(n, m["method"], data, seed, rule=mc, weights=m["weights"])
                        )
                for c in chosen:
                    if c["steps"] == n:
                        scored.append(ex.Scored(n, f"{c['optimizer']} (tuned)", data, seed,
                                                baseline=(c["optimizer"], c["lr"])))  # fmt: skip
        scored.sort(key=lambda j: -j.steps)
        held_out = pool_map(
            pool, ex.run_job, [("score", (j, splits[j.data], cfg.curve_points)) for j in scored]
        )
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    print("held-out scoring done", f"{(time.time() - start) / 60:.1f} min", flush=True)
    memory = ex.agreement_and_memory(cfg, out, quick)
    env = {**environment("cpu"), "threads": 1, "date": timestamp()}
    # CPU time of this process and of every process it waited for (the pool's workers, the
    # memory children): what the run costs on an idle machine, whatever else shared it
    own, kids = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    cpu = own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime
    return {
        "settings": dataclasses.asdict(cfg),
        "env": env,
        "minutes": (time.time() - start) / 60,
        "cpu_minutes": cpu / 60,
        "load_average": [load_start, os.getloadavg()[0]],
        "meta": metas,
        "tuning": tuning,
        "chosen": chosen,
        "held_out": held_out,
        "memory": memory,
        "baselines": list(BASELINES),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.learned_optimizer", description=__doc__)
    ap.add_argument("--quick", action="store_true", help="everything at a tiny size")
    ap.add_argument("--out", default="results/learned-optimizer")
    ap.add_argument("--report-only", action="store_true", help="rebuild from DIR/raw.json")
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.child:
        n, strategy, options, path = args.child
        ex.measure_child(int(n), strategy, json.loads(options), path)
        return
    cfg = ex.QUICK if args.quick else ex.Settings()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        raw = run(cfg, out, args.quick)
        (out / "raw.json").write_text(json.dumps(raw, indent=1))
    raw = json.loads((out / "raw.json").read_text())
    write(raw, out)
    print(f"wrote {out}" + (f" in {raw['minutes']:.1f} minutes" if not args.report_only else ""))


if __name__ == "__main__":
    main()
