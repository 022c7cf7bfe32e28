"""The real-Omniglot experiment: meta-train on one minimal background set, score Lake et
al.'s 20 one-shot runs once, and the usual held-out episodes.

Every method of ``make fewshot`` (:data:`bench.fewshot.METHODS`) trains on the ``"train"``
characters of one minimal set (with quarter turns as classes) in 20-way 1-shot episodes,
exactly as :func:`bench.fewshot.train_method` trains it; iMAML's λ is chosen on the
``"val"`` characters (never on the runs). The trained model is then scored, with the
method's own adaptation on each support set:

* ``runs``: the 20 runs of the original task (20-way within one evaluation alphabet; the
  20 training images are the support set), error %;
* ``20-way`` and ``5-way``: 1-shot episodes (15 queries per class) on the held-out
  ``"test"`` characters of the same minimal set, accuracy. The 5-way model keeps the first
  five rows of the 20-way head: every row of a meta-learned head is trained as the start
  of any class (episodes label classes in a random order), so any five are the same start.

Cost per job: the method's training (``Problem.iterations`` outer steps) plus 20 + 2 x
``eval_tasks`` adaptations.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings

import torch

from ..fewshot.evaluation import evaluate
from ..fewshot.methods import own_steps, train_method, tuner
from ..fewshot.problems import METHODS, PROBLEMS, Problem
from ..fewshot.run import choose_lam, pool_map, worker_pool
from .baselines import error_percent, mhd_error, pixel_error
from .data import BACKGROUND, Run, load_runs

__all__ = ["OMNIGLOT", "SETS", "baselines", "narrowed", "problem_for", "run", "score_runs"]

SETS = tuple(BACKGROUND)  # "small1", "small2"

# Finn et al.'s 20-way Omniglot recipe (inner SGD 0.1, 5 steps at train, meta-batch 16,
# 64 filters, 60000 outer steps) shrunk to fit 2 CPU cores in about 30 minutes for both sets
# and 3 seeds: 16 filters, one inner step of 0.4 at train (their 5-way step),
# meta-batch 4, 250 outer steps; one query per class at train as in their code (15 at test).
OMNIGLOT = dataclasses.replace(
    PROBLEMS["characters"],  # its filters, inner steps and iMAML's candidates
    name="omniglot",
    data="omniglot-small1",
    n_way=20,
    k_query=1,
    iterations=250,
    meta_batch=4,
    eval_steps=(10,),  # transfer and random: 10 SGD steps on the support set
    eval_tasks=50,
)
EVAL_QUERIES = 15


def problem_for(which: str, base: Problem = OMNIGLOT) -> Problem:
    """``base`` on minimal set ``which`` (``"small1"`` or ``"small2"``)."""
    return dataclasses.replace(base, name=f"omniglot-{which}", data=f"omniglot-{which}")


def narrowed(model: torch.nn.Module, n_way: int) -> torch.nn.Module:
    """A copy of a Conv-4 whose head keeps its first ``n_way`` rows."""
    wide = model.head
    if n_way > wide.out_features:
        raise ValueError(f"a {wide.out_features}-way head cannot be narrowed to {n_way}")
    out = copy.deepcopy(model)
    head = torch.nn.Linear(wide.in_features, n_way)
    with torch.no_grad():
        head.weight.copy_(wide.weight[:n_way])
        head.bias.copy_(wide.bias[:n_way])
    out[-1] = head
    return out


def score_runs(
    problem: Problem, model, method: str, runs: list[Run], lam: float | None = None
) -> list[float]:
    """Error % on each run: the method's own adaptation on the run's 20 training images
    (one per class), then its 20 test images classified."""
    adapt = tuner(problem, model, method, "own", lam)
    steps = own_steps(problem, method)
    errors = []
    for r in runs:
        support = (r.train, torch.arange(len(r.train)))
        f = adapt.adapt(support, steps=steps)
        with torch.no_grad():
            errors.append(error_percent(r, f(r.test).argmax(-1)))
    return errors


def baselines(runs105: list[Run], runs28: list[Run]) -> dict[str, list[float]]:
    """Per-run error % of the distance baselines: MHD (105x105, the demo's), pixel nearest
    neighbour at 105x105 and at the networks' 28x28."""
    return {
        "mhd": [mhd_error(r) for r in runs105],
        "pixel-nn-105": [pixel_error(r) for r in runs105],
        "pixel-nn-28": [pixel_error(r) for r in runs28],
    }


def _job(args):
    problem, method, seed, lam = args
    torch.set_num_threads(1)
    model, cost = train_method(problem, method, seed, lam=lam)
    out = {"runs": score_runs(problem, model, method, load_runs(), lam)}
    for way in (problem.n_way, 5):
        p = dataclasses.replace(problem, n_way=way, k_query=EVAL_QUERIES)
        m = model if way == problem.n_way else narrowed(model, way)
        out[f"{way}-way"] = evaluate(p, m, method, lam=lam, eval_steps=())["own"]
    return problem.name, method, seed, cost, out


def run(problems: list[Problem], seeds=(0, 1, 2), workers: int = 2, methods=METHODS):
    """Every (problem, method, seed): ``[(problem, method, seed, cost, scores), ...]`` with
    ``scores`` ``{"runs": [error % per run], "20-way": [...], "5-way": [...]}`` (accuracy per
    episode), and ``lams``: iMAML's λ per problem with the validation scores it chose by."""
    pool = worker_pool(workers)
    try:
        lams = {}
        for p in problems:
            if "implicit" in methods and len(p.imaml_lams) > 1:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    scores = pool_map(pool, choose_lam, [(p, lam) for lam in p.imaml_lams])
                lams[p.name] = {"chosen": max(scores, key=lambda s: s[1])[0], "scores": scores}
            else:
                lams[p.name] = {"chosen": p.imaml_lams[0], "scores": []}
        # the longest jobs first, so that the pool's two workers finish together
        order = {m: i for i, m in enumerate(("implicit", "mamlpp", "maml", "transfer"))}
        jobs = sorted(
            [
                (p, m, s, lams[p.name]["chosen"] if m == "implicit" else None)
                for p in problems
                for s in seeds
                for m in methods
            ],
            key=lambda j: order.get(j[1], len(order)),
        )
        results = pool_map(pool, _job, jobs)
    finally:
        if pool is not None:
            pool.close()
    return results, lams
