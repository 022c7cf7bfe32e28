"""Running the few-shot jobs: every (problem, method, seed[, N]) in a process pool."""

from __future__ import annotations

import json
import multiprocessing as mp
from pathlib import Path

import pandas as pd
import torch

from ..intervals import mean_t95
from .evaluation import evaluate
from .methods import train_method
from .problems import METHODS, VAL_SEED, Problem, data_for

__all__ = [
    "choose_lam",
    "importable",
    "job_key",
    "map_saved",
    "pool_map",
    "run",
    "saved",
    "worker_pool",
]


def choose_lam(args) -> tuple[float, float]:
    """iMAML's λ candidate ``lam``: a quarter budget on seed 0, accuracy on validation."""
    problem, lam = args
    torch.set_num_threads(1)
    model, _ = train_method(problem, "implicit", 0, problem.iterations // 4, lam=lam)
    res = evaluate(
        problem, model, "implicit", n_tasks=100, split="val", lam=lam, eval_seed=VAL_SEED
    )
    return lam, sum(res["own"]) / len(res["own"])


def _job(args):
    problem, method, seed, lam, inner_steps = args
    torch.set_num_threads(1)
    model, cost = train_method(problem, method, seed, lam=lam, inner_steps=inner_steps)
    res = evaluate(problem, model, method, lam=lam, inner_steps=inner_steps)
    return problem.name, method, seed, inner_steps, cost, res


def worker_pool(workers: int):
    """A pool of ``workers`` spawned processes, or None for one (jobs run in this one)."""
    return mp.get_context("spawn").Pool(workers) if workers > 1 else None


def importable(fn) -> None:
    """Refuse a pool job ``fn`` that a spawned worker could not import by name: one defined
    in a ``__main__`` module (``python -m pkg`` runs ``pkg/__main__.py`` as ``__main__``,
    which a worker does not re-run), or a lambda or local function. Checked in every run,
    pooled or not, so that a one-worker run (the tests') fails as a pooled one would.

    Raises:
        ValueError: ``fn`` is not importable; move it to a module and import it.
    """
    module, name = getattr(fn, "__module__", "") or "", getattr(fn, "__qualname__", "")
    if module.split(".")[-1] == "__main__" or "<" in name:  # <lambda>, f.<locals>.g
        raise ValueError(
            f"pool job {module}.{name} cannot run in a spawned worker: a worker imports the "
            "function by its module and name, and a __main__ module, a lambda or a local "
            "function cannot be imported; define it at the top of a module other than "
            "__main__ and import it"
        )


def pool_map(pool, fn, jobs):
    """``fn`` over ``jobs`` in order, in ``pool`` or (None) here (``fn`` must be
    :func:`importable`)."""
    importable(fn)
    return pool.map(fn, jobs, chunksize=1) if pool is not None else [fn(j) for j in jobs]


def _keyed(item):
    key, fn, args = item
    return key, fn(args)


def job_key(job) -> str:
    """A job's arguments as the key its result is saved under."""
    return json.dumps(job, sort_keys=True)


def saved(partial: Path) -> dict[str, object]:
    """The results ``partial`` (JSON lines of ``[job_key, result]``) holds, by key."""
    done: dict[str, object] = {}
    if partial.exists():
        for line in partial.read_text().splitlines():
            if line.strip():
                key, result = json.loads(line)
                done[key] = result
    return done


def map_saved(workers: int, fn, jobs: list, partial: Path, keep: bool = False) -> list:
    """``fn`` over ``jobs`` in ``workers`` spawned processes (here, for one), each result
    appended to ``partial`` (JSON lines) as it comes: a run stopped part way and started
    again with the same jobs does only those not done (delete ``partial`` to start
    afresh). Returns the results in the jobs' order; removes ``partial`` when all are in,
    unless ``keep`` (runs made side by side, combined by a later one)."""
    importable(fn)
    done = saved(partial)
    keys = [job_key(j) for j in jobs]
    todo = [(k, fn, j) for k, j in zip(keys, jobs) if k not in done]
    if done:
        print(f"{partial}: {len(jobs) - len(todo)} of {len(jobs)} jobs already done")
    partial.parent.mkdir(parents=True, exist_ok=True)
    pool = worker_pool(workers)
    try:
        results = pool.imap_unordered(_keyed, todo) if pool is not None else map(_keyed, todo)
        with open(partial, "a") as f:
            for key, result in results:
                done[key] = result
                f.write(json.dumps([key, result]) + "\n")
                f.flush()
    finally:
        if pool is not None:
            pool.close()
    if not keep:
        partial.unlink()
    return [done[k] for k in keys]


def run(
    problems: list[Problem],
    seeds=(0, 1, 2),
    workers: int = 2,
    methods=METHODS,
    horizon: tuple[int, ...] | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Train and evaluate every (problem, method, seed[, inner steps]).

    Returns:
        ``(runs, values, lams)``: a row per job and metric key (mean, CI, cost), every
        per-episode value, and the λ iMAML chose per problem.
    """
    for p in problems:
        data_for(p)  # renders/caches the embedded characters once, before the workers
    pool = worker_pool(workers)
    try:
        lams = {}
        for p in problems:
            if "implicit" in methods and "implicit" in p.methods and len(p.imaml_lams) > 1:
                scores = pool_map(pool, choose_lam, [(p, lam) for lam in p.imaml_lams])
                lams[p.name] = {"chosen": max(scores, key=lambda s: s[1])[0], "scores": scores}
            else:
                lams[p.name] = {"chosen": p.imaml_lams[0], "scores": []}
        jobs = [
            (p, m, s, lams[p.name]["chosen"] if m == "implicit" else None, n)
            for p in problems
            for n in (sorted(horizon, reverse=True) if horizon else (None,))  # longest first
            for s in seeds
            for m in methods
            if m in p.methods
        ]
        results = pool_map(pool, _job, jobs)
    finally:
        if pool is not None:
            pool.close()
    rows, values = [], []
    for name, method, seed, n, cost, res in results:
        for key, vals in res.items():
            series = pd.Series(vals, dtype=float)
            rows.append(
                {
                    "problem": name,
                    "method": method,
                    "seed": seed,
                    "inner_steps": n if n is not None else "",
                    "adapt": key,
                    "tasks": len(vals),
                    "mean": series.mean(),
                    "ci95": mean_t95(series)[1],
                    **cost,
                }
            )
            values += [
                {
                    "problem": name,
                    "method": method,
                    "seed": seed,
                    "inner_steps": n,
                    "adapt": key,
                    "value": v,
                }
                for v in vals
            ]
    return pd.DataFrame(rows), pd.DataFrame(values), lams
