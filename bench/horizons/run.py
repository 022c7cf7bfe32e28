"""The short-horizon bias, measured: every method's schedule learned, tuned and scored.

For each dataset (``bench.horizons.problem``):

1. the grids, on validation data: constant rates, cosine peaks, online hypergradient
   descent's hyper-rate β (from the best constant); each scored by the validation loss
   after T steps, mean over ``tune_seeds``;
2. the meta-learned schedules (``bench.horizons.meta``), all from the best constant, the
   same number of outer steps each, at each meta learning rate of the grid;
3. each method's meta learning rate chosen by the validation loss of the schedule it
   learned (``tune_seeds`` again);
4. every method's schedule scored from the unseen ``test_seeds`` (initialisation and
   minibatches): the training loss on the whole training set and the test accuracy after
   T steps.

Jobs run in a pool of spawned processes, one thread each (``bench.fewshot.run``'s).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Any

import torch

from ..fewshot.run import pool_map, worker_pool
from .meta import learn, method
from .problem import Setup, cosine, interpolate, setup, train, train_hd

__all__ = ["QUICK", "Settings", "run"]


@dataclass(frozen=True)
class Settings:
    """How much runs (the full experiment, or the tests' tiny one)."""

    steps: int = 1000
    batches: tuple[tuple[str, int], ...] = (("mnist1d", 20), ("digits", 10))
    windows: tuple[int, ...] = (1, 10, 100)
    outer_steps: int = 40
    meta_lrs: tuple[float, ...] = (0.03, 0.1)
    constants: tuple[float, ...] = (0.003, 0.005, 0.01, 0.02, 0.03, 0.05, 0.1)
    cosines: tuple[float, ...] = (0.01, 0.02, 0.03, 0.05, 0.1, 0.2)
    betas: tuple[float, ...] = (1e-5, 1e-4, 1e-3, 1e-2)
    tune_seeds: tuple[int, ...] = (500, 501)
    test_seeds: tuple[int, ...] = (900, 901, 902, 903, 904)
    workers: int = 2
    # the distillation comparison (bench.horizons.distill)
    distill_steps: int = 300
    distill_window: int = 60
    distill_outer: int = 40
    distill_seeds: tuple[int, ...] = (0, 1, 2, 3)

    def methods(self) -> list[str]:
        """The meta-learned methods, exact first."""
        return ["exact", *(f"truncated {k}" for k in self.windows)]


QUICK = Settings(
    steps=16,
    batches=(("digits", 10),),
    windows=(1, 4),
    outer_steps=2,
    meta_lrs=(0.1,),
    constants=(0.01, 0.03),
    cosines=(0.03,),
    betas=(1e-3,),
    tune_seeds=(500,),
    test_seeds=(900, 901),
    workers=1,
    distill_steps=8,
    distill_window=3,
    distill_outer=2,
    distill_seeds=(0, 1),
)


Key = tuple[str, int, int]  # a dataset as jobs name it: (name, steps, batch)


@functools.cache
def _setup(key: Key) -> Setup:
    """The dataset's set-up, built once per process (MNIST-1D is generated)."""
    name, steps, batch = key
    return dataclasses.replace(setup(name, steps), batch=batch)


def _job(job: tuple) -> tuple[tuple, Any]:
    """One unit of work in a worker (one thread): a grid point or a scoring run (the
    validation loss or the final values after T steps), or a meta-learning run."""
    torch.set_num_threads(1)
    kind, key, label, *args = job
    s = _setup(key)
    if kind == "meta":
        name, meta_lr, rate0, outer = args
        return (kind, key, label), dataclasses.asdict(learn(s, method(name), rate0, outer, meta_lr))
    if kind == "hd":
        rate0, beta, seed = args
        return (kind, key, label), dataclasses.asdict(train_hd(s, rate0, beta, seed))
    rates, seed = args
    return (kind, key, label), dataclasses.asdict(train(s, rates, seed))


def _mean_val(results: list[dict]) -> float:
    losses = [r["val_loss"] for r in results]
    return sum(losses) / len(losses) if all(map(math.isfinite, losses)) else math.inf


def _rates(knots: list[float], steps: int) -> list[float]:
    return interpolate(torch.tensor(knots, dtype=torch.float64).log(), steps).tolist()


def _collect(pool: Any, jobs: list[tuple]) -> dict[tuple, list[Any]]:
    """Run ``jobs``; their results grouped by (kind, dataset, label), in job order."""
    out: dict[tuple, list[Any]] = {}
    for key, value in pool_map(pool, _job, jobs):
        out.setdefault(key, []).append(value)
    return out


def _best(grid: dict[Any, float]) -> Any:
    return min(grid, key=grid.__getitem__)


def run(cfg: Settings) -> dict[str, Any]:
    """Every dataset's grids, meta-learned schedules, choices and scores (the raw data
    ``bench.horizons.report`` turns into the summary), keyed by dataset name."""
    keys = [(name, cfg.steps, batch) for name, batch in cfg.batches]
    out: dict[str, Any] = {k[0]: {"batch": k[2], "steps": k[1]} for k in keys}
    tune, test = cfg.tune_seeds, cfg.test_seeds
    pool = worker_pool(cfg.workers)
    try:
        # 1. the constant grid: every meta-learned schedule and HD start from its best
        jobs = [("val", k, ("constant", r), [r] * cfg.steps, sd)
                for k in keys for r in cfg.constants for sd in tune]  # fmt: skip
        for (_, k, (_, r)), res in _collect(pool, jobs).items():
            out[k[0]].setdefault("constant_grid", {})[r] = _mean_val(res)
        for k in keys:
            out[k[0]]["best_constant"] = _best(out[k[0]]["constant_grid"])
        # 2. meta-learning (the long jobs first), the cosine grid, HD's β grid
        jobs = [
            ("meta", k, (name, lr), name, lr, out[k[0]]["best_constant"], cfg.outer_steps)
            for name in cfg.methods()
            for k in keys
            for lr in cfg.meta_lrs
        ]
        jobs += [("val", k, ("cosine", p), cosine(p, cfg.steps), sd)
                 for k in keys for p in cfg.cosines for sd in tune]  # fmt: skip
        jobs += [("hd", k, ("hd", b), out[k[0]]["best_constant"], b, sd)
                 for k in keys for b in cfg.betas for sd in tune]  # fmt: skip
        for (kind, k, (what, x)), res in _collect(pool, jobs).items():
            d = out[k[0]]
            if kind == "meta":
                d.setdefault("meta", {}).setdefault(what, {})[x] = res[0]
            else:
                d.setdefault(f"{what}_grid", {})[x] = _mean_val(res)
        # 3. each method's meta learning rate: the validation loss of what it learned
        jobs = [
            ("val", k, (name, lr), _rates(learned["knots"][-1], cfg.steps), sd)
            for k in keys
            for name, runs in out[k[0]]["meta"].items()
            for lr, learned in runs.items()
            for sd in tune
        ]
        for (_, k, (name, lr)), res in _collect(pool, jobs).items():
            out[k[0]].setdefault("meta_lr_val", {}).setdefault(name, {})[lr] = _mean_val(res)
        for k in keys:
            d = out[k[0]]
            d["meta_lr"] = {name: _best(vals) for name, vals in d["meta_lr_val"].items()}
        # 4. every schedule from the unseen test seeds
        jobs = []
        for k in keys:
            d = out[k[0]]
            d["best_cosine"], d["best_beta"] = _best(d["cosine_grid"]), _best(d["hd_grid"])
            d["schedules"] = {
                "best constant": [d["best_constant"]] * cfg.steps,
                "tuned cosine": cosine(d["best_cosine"], cfg.steps),
                **{
                    name: _rates(d["meta"][name][d["meta_lr"][name]]["knots"][-1], cfg.steps)
                    for name in cfg.methods()
                },
            }
            jobs += [("test", k, label, rates, sd)
                     for label, rates in d["schedules"].items() for sd in test]  # fmt: skip
            jobs += [("hd", k, "online HD", d["best_constant"], d["best_beta"], sd)
                     for sd in test]  # fmt: skip
        for (_, k, label), res in _collect(pool, jobs).items():
            d = out[k[0]]
            d.setdefault("scores", {})[label] = [
                {m: r[m] for m in ("train_loss", "val_loss", "test_acc")} for r in res
            ]
            if label == "online HD":
                d["hd_rates"] = [r["rates"] for r in res]
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    return out
