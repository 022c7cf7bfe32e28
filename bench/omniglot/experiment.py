"""The real-Omniglot experiment: each method meta-trains on one minimal background set for
the same CPU-time budget, with the hyperparameters chosen on the validation characters
(:mod:`.search`); then Lake et al.'s 20 one-shot runs are scored once, and held-out
episodes.

Every method trains on the ``"train"`` characters of one minimal set (quarter turns as
classes) in 20-way 1-shot episodes (ProtoNets: its own number of ways), under
:class:`bench.fewshot.budget.Budget`: until the training process has spent the budget's
CPU seconds (one torch thread per worker), with the error on the validation characters
measured at a few points on the way, the clock paused. The trained model is then scored
with the method's own adaptation on each support set (ProtoNets: nearest prototype):

* ``runs``: the 20 runs of the original task (20-way within one evaluation alphabet; the
  20 training images are the support set), error %;
* ``20-way`` and ``5-way``: 1-shot episodes (15 queries per class) on the held-out
  ``"test"`` characters of the same minimal set, accuracy. The 5-way model keeps the first
  five rows of the 20-way head: every row of a meta-learned head is trained as the start
  of any class (episodes label classes in a random order), so any five are the same start.

Cost per job: the budget, plus ``len(CURVE)`` validation passes of ``CURVE_TASKS`` episodes,
20 adaptations for the runs and 2 x ``eval_tasks`` for the held-out episodes.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import time

import torch

from effmaml.omniglot import OneShotRun, one_shot_runs

from ..fewshot.budget import Budget
from ..fewshot.data import MINIMAL_SETS, OMNIGLOT_DIR
from ..fewshot.evaluation import evaluate
from ..fewshot.methods import predictor, train_method
from ..fewshot.problems import METHODS as FEWSHOT_METHODS
from ..fewshot.problems import PROBLEMS, PROTONET, VAL_SEED, Problem
from .baselines import error_percent, mhd_error, pixel_error

__all__ = [
    "BASE",
    "CURVE",
    "CURVE_TASKS",
    "EVAL_QUERIES",
    "METHODS",
    "SETS",
    "VAL_TASKS",
    "baselines",
    "configure",
    "job",
    "load_runs",
    "narrowed",
    "score_runs",
    "scoring",
    "train_tracked",
    "val_accuracy",
]

SETS = tuple(MINIMAL_SETS)  # "small1", "small2"
METHODS = (*FEWSHOT_METHODS, PROTONET)
EVAL_QUERIES = 15
# 20-way 1-shot validation episodes, 5 queries per class: the search scores each
# configuration on VAL_TASKS, the curves measure CURVE_TASKS at each fraction of the budget
VAL_TASKS = 100
CURVE_TASKS = 25
VAL_QUERIES = 5
CURVE = (0.25, 0.5, 0.75, 1.0)

# What every method starts from before its own choices (:mod:`.search`): 20-way 1-shot
# episodes, Conv-4, Adam 1e-3; MAML under `auto` with no memory budget (the fastest exact
# schedule that fits the machine: under equal CPU minutes a recomputing schedule that saves
# memory nobody is short of would only cost MAML outer steps); transfer and random: 10 SGD
# steps on the support set at test; 50 held-out episodes per seed (15 queries per class).
BASE = dataclasses.replace(
    PROBLEMS["characters"],
    name="omniglot-small1",
    data="omniglot-small1",
    n_way=20,
    k_query=3,
    width=32,
    inner_lr=0.1,
    inner_steps=5,
    meta_batch=2,
    imaml_steps=10,
    imaml_lr=0.1,
    imaml_lams=(0.5,),
    eval_steps=(10,),
    eval_tasks=50,
    strategy="auto",
    memory_fraction=None,
)

# a configuration's knobs -> the Problem field each method reads it from
_PER_METHOD = {
    "inner_lr": {"implicit": "imaml_lr", "mamlpp": "mamlpp.lr"},
    "inner_steps": {
        "implicit": "imaml_steps",
        "mamlpp": "mamlpp.steps",
        "transfer": "eval_steps",
        "random": "eval_steps",
    },
}
_DIRECT = {"width": "width", "k_query": "k_query", "meta_batch": "meta_batch", "lam": "imaml_lams"}
_DIRECT |= {"train_way": "n_way", "inner_lr": "inner_lr", "inner_steps": "inner_steps"}


def configure(method: str, config: dict, which: str = "small1", base: Problem = BASE) -> Problem:
    """``base`` on minimal set ``which`` with ``method``'s configuration: ``inner_lr`` and
    ``inner_steps`` (MAML's and first order's inner SGD, iMAML's, MAML++'s initial learned
    rate and its steps, transfer's and random's fine-tuning), ``lam`` (iMAML's λ),
    ``width`` (Conv-4 filters), ``k_query`` (queries per class at training),
    ``meta_batch`` (episodes per outer step; transfer: as many images per step) and
    ``train_way`` (ProtoNets' ways at training).

    Raises:
        ValueError: an unknown knob.
    """
    p = dataclasses.replace(base, name=f"omniglot-{which}", data=f"omniglot-{which}")
    for knob, value in config.items():
        field = _PER_METHOD.get(knob, {}).get(method) or _DIRECT.get(knob)
        if field is None:
            raise ValueError(f"unknown knob {knob!r}; known: {sorted(_DIRECT)}")
        if field.startswith("mamlpp."):
            mamlpp = dataclasses.replace(p.mamlpp, **{field.partition(".")[2]: value})
            p = dataclasses.replace(p, mamlpp=mamlpp)
        elif field in ("eval_steps", "imaml_lams"):
            p = dataclasses.replace(p, **{field: (value,)})
        else:
            p = dataclasses.replace(p, **{field: value})
    return p


def scoring(problem: Problem, n_way: int = 20, k_query: int = EVAL_QUERIES) -> Problem:
    """The problem as its test episodes are drawn: ``n_way``-way, 15 queries per class."""
    return dataclasses.replace(problem, n_way=n_way, k_query=k_query)


def load_runs(size: int | None = 28, runs: int | None = None) -> list[OneShotRun]:
    """Lake et al.'s 20 runs (the committed ``all_runs.zip``, checked) at ``size``."""
    return one_shot_runs(OMNIGLOT_DIR / "all_runs.zip", size=size, runs=runs)


def val_accuracy(problem: Problem, model, method: str, n_tasks: int = VAL_TASKS) -> float:
    """Mean accuracy of 20-way 1-shot episodes (5 queries per class) on the validation
    characters (the same ``n_tasks`` for every method), with the method's own adaptation."""
    p = scoring(problem, 20, VAL_QUERIES)
    res = evaluate(p, model, method, n_tasks, VAL_SEED, "val", eval_steps=())
    return sum(res["own"]) / len(res["own"])


def train_tracked(
    problem: Problem,
    method: str,
    seed: int,
    cpu_s: float,
    checkpoints: tuple[float, ...] = CURVE,
    val_tasks: int = CURVE_TASKS,
):
    """Train under a budget of ``cpu_s`` CPU seconds; return ``(model, cost, curve)`` with
    the validation accuracy at each checkpoint (``{"cpu_s", "steps", "val_accuracy"}``)."""
    curve: list[dict] = []

    def on_checkpoint(model, used: float, steps: int) -> None:
        acc = val_accuracy(problem, model, method, val_tasks)
        curve.append({"cpu_s": used, "steps": steps, "val_accuracy": acc})

    budget = Budget(cpu_s, checkpoints, on_checkpoint)
    model, cost = train_method(problem, method, seed, budget=budget)
    return model, cost, curve


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


def score_runs(problem: Problem, model, method: str, runs: list[OneShotRun]) -> list[float]:
    """Error % on each run: the method's own classifier of the run's 20 training images
    (one per class) applied to its 20 test images."""
    classify = predictor(scoring(problem), model, method)
    errors = []
    for r in runs:
        support = (r.train, torch.arange(len(r.train)))
        errors.append(error_percent(r, classify(support, r.test).argmax(-1)))
    return errors


def baselines(runs105: list[OneShotRun], runs28: list[OneShotRun]) -> dict[str, list[float]]:
    """Per-run error % of the distance baselines: MHD (105x105, the demo's), pixel nearest
    neighbour at 105x105 and at the networks' 28x28."""
    return {
        "mhd": [mhd_error(r) for r in runs105],
        "pixel-nn-105": [pixel_error(r) for r in runs105],
        "pixel-nn-28": [pixel_error(r) for r in runs28],
    }


def job(args) -> dict:
    """One (set, method, seed): train under the budget, then score. ``args``:
    ``(which, method, seed, config, cpu_s, small)`` with ``small`` a dict of the quick
    run's reductions (``val_tasks``, ``eval_tasks``, ``runs``) or empty. The result holds
    the machine's load average as the job ends (``load_avg``): how shared the CPU was."""
    which, method, seed, config, cpu_s, small = args
    torch.set_num_threads(1)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    p = configure(method, config, which)
    if "eval_tasks" in small:
        p = dataclasses.replace(p, eval_tasks=small["eval_tasks"])
    val_tasks = small.get("val_tasks", CURVE_TASKS)
    model, cost, curve = train_tracked(p, method, seed, cpu_s, CURVE, val_tasks)
    scores = {"runs": score_runs(p, model, method, load_runs(runs=small.get("runs")))}
    for way in (20, 5):
        m = model if way == 20 or method == PROTONET else narrowed(model, way)
        scores[f"{way}-way"] = evaluate(scoring(p, way), m, method, eval_steps=())["own"]
    return {
        "set": f"omniglot-{which}",
        "method": method,
        "seed": seed,
        "config": config,
        "cost": cost,
        "curve": curve,
        "scores": scores,
        "job_cpu_s": time.process_time() - cpu0,
        "job_wall_s": time.perf_counter() - wall0,
        # the machine's 1-minute load average as the job ends (shared: others' work too)
        "load_avg": os.getloadavg()[0],
    }
