"""The experiment's jobs: meta-training, tuning, held-out scoring, memory and agreement.

Each job is a plain function of picklable arguments, so the runner can hand them to a pool
of processes (one thread each); everything a job returns is plain data (lists, floats).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..bilevel.common import Split
from ..isolated import run_child
from . import meta
from .meta import HELD_OUT, MetaConfig
from .tasks import Task, train

__all__ = [
    "QUICK",
    "Settings",
    "agreement_and_memory",
    "configs",
    "held_out_job",
    "meta_job",
    "run_job",
    "tune_job",
]


@dataclass(frozen=True)
class Settings:
    """What ``make learned-optimizer`` runs (the full run, or the tests' tiny one)."""

    horizons: tuple[int, ...] = (50, 200, 1000)
    windows: tuple[int, ...] = (10, 50)
    outer_steps: tuple[tuple[int, int], ...] = ((50, 200), (200, 100), (1000, 40))
    segment: int = 10  # the exact schedule: checkpoint(segment, pullback="segment")
    # Adam's rate on the rule's weights: 1e-2 diverged the exact N = 200 run in a first full
    # run (objective 261 at outer step 10, 1e17 by 30): Adam moves every weight by about
    # its rate per step, and the output layer starts at out_scale = 1e-2
    meta_lr: float = 3e-3
    clip: float = 1.0
    held_out: int = 5  # held-out tasks per dataset
    tune_tasks: int = 2  # meta-training tasks per dataset that tune the baselines' rates
    grids: tuple[tuple[str, tuple[float, ...]], ...] = (
        ("sgd-momentum", (0.003, 0.01, 0.03, 0.1, 0.3, 1.0)),
        ("adam", (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1)),
    )
    curve_points: int = 40  # recorded steps along a held-out run of 2N steps
    agreement: int = 200  # N of the meta-gradient against naive's
    memory: tuple[int, ...] = (200, 1000)  # N of the peak-memory columns
    datasets: tuple[str, ...] = ("digits", "mnist1d")
    workers: int = 2


QUICK = Settings(
    horizons=(6,),
    windows=(3,),
    outer_steps=((6, 3),),
    segment=2,
    held_out=1,
    tune_tasks=1,
    grids=(("sgd-momentum", (0.1,)), ("adam", (1e-3, 1e-2))),
    curve_points=3,
    agreement=6,
    memory=(6,),
    datasets=("digits",),
    workers=1,
)


def configs(cfg: Settings) -> list[MetaConfig]:
    """Every meta-training run: at each N the exact schedule, then each window K < N."""
    outer = dict(cfg.outer_steps)
    out = []
    for n in cfg.horizons:
        common = {"outer_steps": outer[n], "meta_lr": cfg.meta_lr, "clip": cfg.clip}
        exact = (("segment", cfg.segment), ("pullback", "segment"))
        out.append(MetaConfig(n, "checkpoint", exact, **common))
        for k in cfg.windows:
            if k < n:
                out.append(MetaConfig(n, "truncated", (("window", k),), **common))
    return out


def run_job(job: tuple[str, Any]) -> dict[str, Any]:
    """One pool job: ``("meta" | "tune" | "score", args)`` (here, not in ``__main__``: a
    spawned worker imports the function it runs by its module's name)."""
    kind, args = job
    fn = {"meta": meta_job, "tune": tune_job, "score": held_out_job}[kind]
    return fn(args)


def meta_job(args: tuple[MetaConfig, dict[str, Split]]) -> dict[str, Any]:
    """Meta-train one rule (a pool job)."""
    mc, splits = args
    torch.set_num_threads(1)
    out = meta.meta_train(mc, splits)
    out["weights"] = {k: v.tolist() for k, v in out["weights"].items()}
    return {"steps": mc.steps, "method": mc.label, "config": _plain(mc), **out}


def tune_job(args: tuple[str, float, int, int, dict[str, Split]]) -> dict[str, Any]:
    """One (baseline, rate, N) of the tuning grid (a pool job)."""
    name, lr, n, tasks, splits = args
    torch.set_num_threads(1)
    return {
        "optimizer": name,
        "lr": lr,
        "steps": n,
        "val_loss": meta.tune(name, lr, n, splits, tasks),
    }


@dataclass(frozen=True)
class Scored:
    """One held-out run: an optimizer (a trained rule's weights, or a baseline and rate)."""

    steps: int  # N (the run lasts 2N)
    method: str
    data: str
    seed: int
    rule: MetaConfig | None = None
    weights: dict[str, list] = field(default_factory=dict)
    baseline: tuple[str, float] | None = None


def held_out_job(args: tuple[Scored, Split, int]) -> dict[str, Any]:
    """Train a held-out task for 2N steps with one optimizer, recording the losses (a pool
    job)."""
    job, split, points = args
    torch.set_num_threads(1)
    if job.rule is not None:
        inner = meta.rule(job.rule)
        inner.load_state_dict({k: torch.tensor(v) for k, v in job.weights.items()})
    else:
        assert job.baseline is not None
        inner = meta.baseline(*job.baseline)
    total = 2 * job.steps
    record = sorted({round(i * total / points) for i in range(points + 1)} | {job.steps})
    curve = train(Task(job.data, job.seed), split, inner, total, record=record)
    return {"steps": job.steps, "method": job.method, "data": job.data, "seed": job.seed, **curve}


def held_out_tasks(cfg: Settings) -> list[tuple[str, int]]:
    """(dataset, seed) of the held-out tasks (seeds never used in meta-training)."""
    return [(d, HELD_OUT + i) for d in cfg.datasets for i in range(cfg.held_out)]


def agreement_and_memory(cfg: Settings, out: Path, quick: bool) -> list[dict[str, Any]]:
    """Peak memory of one outer step (naive, the exact schedule, each truncation) at each N
    of ``cfg.memory``, each in a fresh process; at N = ``cfg.agreement`` the meta-gradient
    of each against naive's (rel. L2)."""
    rows = []
    for n in sorted({*cfg.memory, cfg.agreement}):
        ref = None
        runs = [("naive", "{}")]
        runs.append(("checkpoint", json.dumps({"segment": cfg.segment, "pullback": "segment"})))
        runs += [("truncated", json.dumps({"window": k})) for k in cfg.windows if k < n]
        for strategy, options in runs:
            path = out / f".grad_{n}_{strategy}.pt"
            argv = ["--child", str(n), strategy, options, str(path)]
            r = run_child(
                "bench.learned_optimizer",
                argv + (["--quick"] if quick else []),
                memory=True,
                check=True,
            )
            g = torch.load(path)
            path.unlink()
            ref = g if ref is None else ref
            rel = float((g - ref).norm() / ref.norm())
            rows.append({"steps": n, "strategy": r["label"], "peak": r["peak"],
                         "rel_l2_vs_naive": rel, "agreement": n == cfg.agreement,
                         "memory": n in cfg.memory})  # fmt: skip
            print(rows[-1], flush=True)
    return rows


def measure_child(n: int, strategy: str, options: dict[str, Any], path: str) -> None:
    """One meta-gradient (after a warm-up one) inside a peak-memory window; prints JSON
    ``{"peak", "label"}`` and saves the flat meta-gradient to ``path``."""
    from effmaml.measure import PeakMemory

    from ..bilevel.common import digits

    torch.set_num_threads(1)
    splits = {"digits": digits()}  # the first meta-training task's dataset
    mc = MetaConfig(n, strategy, tuple(options.items()))
    meta.meta_gradient(mc, splits, strategy, **options)  # the probe, caches
    with PeakMemory("cpu") as peak:
        g = meta.meta_gradient(mc, splits, strategy, **options)
    torch.save(g, path)
    label = strategy + (
        f"({', '.join(f'{k}={v!r}' for k, v in options.items())})" if options else ""
    )
    print(json.dumps({"peak": peak.peak, "label": label}))


def _plain(mc: MetaConfig) -> dict[str, Any]:
    return {
        "steps": mc.steps,
        "strategy": mc.strategy,
        "options": dict(mc.options),
        "outer_steps": mc.outer_steps,
        "meta_lr": mc.meta_lr,
        "clip": mc.clip,
        "rule_lr": mc.rule_lr,
        "hidden": list(mc.hidden),
        "out_scale": mc.out_scale,
        "points": mc.points,
    }
