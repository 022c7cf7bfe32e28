"""Evaluation on held-out episodes: the same tasks for every method (the reports print the
mean ± its 95% interval, ``bench.intervals``)."""

from __future__ import annotations

import contextlib

import torch

import effmaml

from .methods import predictor, tuner
from .problems import EVAL_SEED, Problem, loss_of, tasks_for

__all__ = ["evaluate"]


def evaluate(
    problem: Problem,
    model,
    method: str,
    n_tasks: int | None = None,
    eval_seed: int = EVAL_SEED,
    split: str = "test",
    lam: float | None = None,
    inner_steps: int | None = None,
    eval_steps: tuple[int, ...] | None = None,
) -> dict:
    """Per held-out task: the metric after k plain SGD steps (k in ``eval_steps``) and after
    the method's own adaptation (key ``"own"``). The tasks are the same for every method
    (drawn from ``eval_seed``). MAML++'s per-step BatchNorm has a slice per step it was
    trained for: its plain-SGD curve stops there, and k=0 normalises with slice 0."""
    n_tasks = problem.eval_tasks if n_tasks is None else n_tasks
    eval_steps = problem.eval_steps if eval_steps is None else eval_steps
    loss = loss_of(problem)
    tasks = tasks_for(problem, split, 1).sample(torch.Generator().manual_seed(eval_seed), n_tasks)
    most = problem.mamlpp.steps if method == "mamlpp" else max(eval_steps, default=0)
    plan = [k for k in eval_steps if k <= most and method != "protonet"]
    out: dict = {key: [] for key in [*plan, "own"]}
    sgd = tuner(problem, model, method, "sgd", lam)
    own = predictor(problem, model, method, lam, inner_steps)
    for support, (xq, yq) in tasks:
        for key in out:
            if key == "own":
                pred = own(support, xq)
            else:
                f = model if key == 0 else sgd.adapt(support, steps=key)
                step0 = effmaml.at_step(0) if key == 0 and method == "mamlpp" else None
                with torch.no_grad(), step0 or contextlib.nullcontext():
                    pred = f(xq)
            if problem.kind == "image":
                out[key].append(float((pred.argmax(-1) == yq).float().mean()))
            else:
                out[key].append(float(loss(lambda x, p=pred: p, (xq, yq))))
    return out
