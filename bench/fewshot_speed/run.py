"""One fewshot-speed run: every library at every N, timed round by round, its work counted,
its peak and its meta-gradient's agreement with its family's reference measured."""

from __future__ import annotations

import statistics
from dataclasses import asdict

import pandas as pd
import torch
from torch import nn

from effmaml.measure import PeakMemory, clock

from ..env import environment, timestamp
from ..timing import count_ops, median_ci, paired_ratios
from ..workload import agreement
from .libraries import (
    LIBRARIES,
    REFERENCE,
    Speed,
    Step,
    Task,
    make_model,
    make_tasks,
    meta_gradient,
)

__all__ = ["run"]


def _runs_at(cfg: Speed, n: int, family: str) -> bool:
    return n in (cfg.imaml_steps if family == "imaml" else cfg.steps)


def _time_rounds(
    steps: dict[str, Step], model: nn.Module, tasks: list[Task], n: int, cfg: Speed
) -> dict[str, list[float]]:
    """Seconds per meta-iteration of every library, round by round (the order rotating)."""
    device = next(model.parameters()).device
    times: dict[str, list[float]] = {lib: [] for lib in steps}
    order = list(steps)
    for r in range(cfg.rounds):
        for lib in order[r % len(order) :] + order[: r % len(order)]:
            model.zero_grad(set_to_none=True)
            t0 = clock(device)
            steps[lib](tasks, n)
            times[lib].append(clock(device) - t0)
    return times


def run(cfg: Speed, device: torch.device, libraries=tuple(LIBRARIES)) -> pd.DataFrame:
    """Time, count, measure and compare every library at every N (module docstring).

    Raises:
        ValueError: fewer than 2 rounds (one chooses the fastest peer, one measures).
    """
    if cfg.rounds < 2:
        raise ValueError(
            f"fewshot-speed needs at least 2 rounds (got {cfg.rounds}): the even rounds "
            f"choose the fastest peer, the odd ones measure the ratio to it"
        )
    model = make_model(cfg, device)
    tasks = make_tasks(cfg, device)
    steps = {lib: LIBRARIES[lib].setup(model, cfg) for lib in libraries}
    rows = []
    for n in sorted(set(cfg.steps) | set(cfg.imaml_steps)):
        here = {lib: s for lib, s in steps.items() if _runs_at(cfg, n, LIBRARIES[lib].family)}
        grads = {lib: meta_gradient(s, model, tasks, n) for lib, s in here.items()}  # warm-up
        times = _time_rounds(here, model, tasks, n, cfg)
        for lib, s in here.items():
            family = LIBRARIES[lib].family
            peers = [p for p in here if LIBRARIES[p].peer and LIBRARIES[p].family == family]
            # Note [Choosing the fastest peer on other rounds than the ratio's]
            # Among peers about as fast as each other, the one with the least median over
            # some rounds is partly the luckiest there, and effmaml's ratio to it over those
            # same rounds would lean above 1. The even rounds choose it, the odd rounds
            # (interleaved, so both halves see the machine's drift) measure the ratio.
            fastest = min(peers, key=lambda p: statistics.median(times[p][0::2]), default=lib)
            ratio, lo, hi, coverage = median_ci(
                paired_ratios(times[lib][1::2], times[fastest][1::2])
            )
            ops = count_ops(lambda s=s, n=n: meta_gradient(s, model, tasks, n))
            with PeakMemory(device) as pm:
                meta_gradient(s, model, tasks, n)
            reference = REFERENCE[family] if REFERENCE[family] in grads else lib
            rows.append(
                {
                    "library": lib,
                    "family": family,
                    "steps": n,
                    "meta_batch": cfg.meta_batch,
                    "s_per_iteration": statistics.median(times[lib]),
                    "s_min": min(times[lib]),
                    "s_max": max(times[lib]),
                    "rounds": cfg.rounds,
                    "fastest_peer": fastest,
                    "vs_fastest_peer": ratio,
                    "vs_fastest_peer_lo": lo,
                    "vs_fastest_peer_hi": hi,
                    "ci_coverage": coverage,
                    "aten_ops": sum(ops.values()),
                    "peak_mib": pm.peak / 2**20,
                    "memory_kind": pm.kind,
                    "reference": reference,
                    **{
                        k: v
                        for k, v in agreement(grads[lib], grads[reference]).items()
                        if k != "grad_finite"
                    },
                }
            )
            r = rows[-1]
            print(
                f"N={n:<3} {lib:<20} {r['s_per_iteration']:7.3f} s  {ratio:5.2f}x "
                f"[{lo:.2f}, {hi:.2f}] of {fastest}  {r['aten_ops']:7d} ops  "
                f"{r['peak_mib']:7.1f} MiB  rel L2 {r['grad_rel_l2']:.1e}",
                flush=True,
            )
    df = pd.DataFrame(rows)
    env = {**environment(device), "timestamp": timestamp(), **asdict(cfg)}
    for key in ("steps", "imaml_steps"):
        env[key] = ",".join(map(str, getattr(cfg, key)))
    return df.assign(**{k: v for k, v in env.items() if k not in df.columns})
