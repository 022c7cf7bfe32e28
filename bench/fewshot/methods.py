"""The few-shot methods: meta-train (or pre-train) a model, and adapt it at test."""

from __future__ import annotations

import time
import warnings

import torch

import effmaml
from effmaml.measure import PeakMemory

from .problems import TRAIN_SEED_OFFSET, Problem, data_for, loss_of, make_model, tasks_for

__all__ = [
    "IMAML_CG_DAMPING",
    "IMAML_CG_STEPS",
    "head_name",
    "inner_params",
    "own_steps",
    "train_method",
    "tuner",
]

# iMAML's solve: conjugate-gradient iterations (the paper's 5) and damping (ReLU nets are
# not convex: a little damping keeps CG's system positive definite)
IMAML_CG_STEPS = 5
IMAML_CG_DAMPING = 0.1


def train_method(
    problem: Problem,
    method: str,
    seed: int,
    iterations: int | None = None,
    lam: float | None = None,
    inner_steps: int | None = None,
) -> tuple[torch.nn.Module, dict]:
    """Meta-train (or pre-train) ``method``; return the initial model and its cost.

    Returns:
        ``(model, cost)`` with ``train_s``, ``s_per_iteration``, ``peak_mib`` (resident-set
        high-water mark of the training, this process), and for MAML/iMAML the schedule
        run and its predicted peak. MAML++'s model has per-step BatchNorm, and its learned
        per-step rates in ``model.lslr`` (name -> tensor of shape ``(steps,)``).
    """
    iterations = problem.iterations if iterations is None else iterations
    torch.manual_seed(seed)
    model = make_model(problem)
    cost: dict = {"train_s": 0.0, "s_per_iteration": 0.0, "peak_mib": 0.0, "schedule": ""}
    if method == "random":
        return model, cost
    g = torch.Generator().manual_seed(TRAIN_SEED_OFFSET + seed)
    t0 = time.perf_counter()
    with PeakMemory("cpu") as pm:
        if method == "transfer":
            model = _pretrain(problem, model, g, iterations)
        else:
            model, facts = _meta_train(problem, model, method, seed, iterations, lam, inner_steps)
            cost.update(facts)
    cost["train_s"] = time.perf_counter() - t0
    cost["s_per_iteration"] = cost["train_s"] / max(iterations, 1)
    cost["peak_mib"] = pm.peak / 2**20
    return model, cost


def _pretrain(problem: Problem, model, g: torch.Generator, iterations: int):
    """Transfer: one network over all training classes (or tasks, for sine), then a fresh
    head for the episodes' classes."""
    loss = loss_of(problem)
    if problem.kind == "sine":
        opt = torch.optim.Adam(model.parameters(), lr=problem.outer_lr)
        tasks = tasks_for(problem, "train", problem.meta_batch)
        for _ in range(iterations):
            opt.zero_grad()
            total = 0.0
            for (xs, ys), (xq, yq) in tasks(g):
                total = total + loss(model, (torch.cat([xs, xq]), torch.cat([ys, yq])))
            (total / problem.meta_batch).backward()
            opt.step()
        return model
    data = data_for(problem)
    wide = make_model(problem, classes=len(data.splits["train"]))
    opt = torch.optim.Adam(wide.parameters(), lr=problem.outer_lr)
    per_step = problem.meta_batch * problem.n_way * (problem.k_shot + problem.k_query)
    for _ in range(iterations):
        opt.zero_grad()
        loss(wide, _pooled(problem, g, per_step)).backward()
        opt.step()
    head = head_name(wide)
    body = {k: v for k, v in wide.state_dict().items() if not k.startswith(f"{head}.")}
    model.load_state_dict(body, strict=False)
    with torch.no_grad():
        for p in model.head.parameters():
            p.zero_()
    return model


def head_name(model: torch.nn.Module) -> str:
    """The module name of the classifier's head (``Conv4.head``): what transfer replaces
    and fine-tunes."""
    head = model.head
    return next(name for name, m in model.named_modules() if m is head)


def inner_params(model: torch.nn.Module) -> list[str]:
    """What MAML++ adapts in the inner loop: everything but the per-step BatchNorm weights,
    which the outer loop learns (their Omniglot configuration)."""
    bn = {n for n, m in model.named_modules() if isinstance(m, effmaml.PerStepBatchNorm)}
    return [n for n, _ in model.named_parameters() if n.rpartition(".")[0] not in bn]


def _mamlpp(problem: Problem, model, seed: int, iterations: int):
    """MAML++ (:class:`~.problems.MamlPP`) on :class:`effmaml.MetaTrainer`."""
    r = problem.mamlpp
    model = effmaml.per_step_batchnorm(model, r.steps)
    names = inner_params(model)
    lslr = {n: torch.full((r.steps,), r.lr, requires_grad=True) for n in names}
    maml = effmaml.MAML(
        model, loss_of(problem), effmaml.SGD(lslr, per_step=True), "naive", params=names
    )
    opt = torch.optim.Adam([*model.parameters(), *lslr.values()], lr=problem.outer_lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, iterations, eta_min=r.min_outer_lr)
    anneal = max(1, round(r.msl_fraction * iterations))
    last = [0.0] * (r.steps - 1) + [1.0]

    def weights(i: int) -> list[float]:
        return effmaml.msl_weights(r.steps, i / anneal) if i < anneal else last

    trainer = effmaml.MetaTrainer(
        maml,
        opt,
        tasks_for(problem, "train", problem.meta_batch),
        meta_batch=problem.meta_batch,
        inner_steps=r.steps,
        seed=TRAIN_SEED_OFFSET + seed,
        progress=False,
        scheduler=sched,
        first_order_iterations=round(r.first_order_fraction * iterations),
        step_weights=weights,
    )
    trainer.train(iterations)
    model.lslr = {n: v.detach() for n, v in lslr.items()}
    return model, maml, r.steps


def _meta_train(problem, model, method, seed, iterations, lam, inner_steps):
    if method == "mamlpp":
        model, maml, steps = _mamlpp(problem, model, seed, iterations)
        return model, _facts(problem, maml, seed, steps)
    loss = loss_of(problem)
    steps = inner_steps or (problem.imaml_steps if method == "implicit" else problem.inner_steps)
    if method == "implicit":
        lam = lam if lam is not None else problem.imaml_lams[0]
        maml = effmaml.MAML(
            model,
            loss,
            effmaml.SGD(problem.imaml_lr),
            "implicit",
            lam=lam,
            cg_steps=IMAML_CG_STEPS,
            cg_damping=IMAML_CG_DAMPING,
        )
    elif method == "first_order":
        maml = effmaml.MAML(model, loss, effmaml.SGD(problem.inner_lr), "first_order")
    else:
        kw = {"memory_budget": problem.memory_budget} if problem.memory_budget else {}
        maml = effmaml.MAML(
            model,
            loss,
            effmaml.SGD(problem.inner_lr),
            problem.strategy,
            clip_grad_grad_norm=problem.clip,
            **kw,
        )
    opt = torch.optim.Adam(model.parameters(), lr=problem.outer_lr)
    trainer = effmaml.MetaTrainer(
        maml,
        opt,
        tasks_for(problem, "train", problem.meta_batch),
        meta_batch=problem.meta_batch,
        inner_steps=steps,
        seed=TRAIN_SEED_OFFSET + seed,
        progress=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # CG's non-convexity notes on ReLU nets
        trainer.train(iterations)
    return model, _facts(problem, maml, seed, steps)


def _facts(problem: Problem, maml: effmaml.MAML, seed: int, steps: int) -> dict:
    """What one adapt ran after training (the schedule auto chose, its predicted peak)."""
    support = tasks_for(problem, "train", 1)(torch.Generator().manual_seed(seed))[0][0]
    facts = maml.adapt(support, steps=steps).facts
    out = {"schedule": facts.strategy}
    if facts.prediction is not None:
        out["predicted_peak_mib"] = facts.prediction.peak_bytes / 2**20
    return out


def _pooled(problem: Problem, g: torch.Generator, n: int):
    """``n`` training images from all training classes pooled, with their class index."""
    data = data_for(problem)
    classes = data.splits["train"]
    pick = torch.randint(len(classes), (n,), generator=g).tolist()
    xs = [
        data.images(classes[c], [int(torch.randint(data.count(classes[c]), (), generator=g))])
        for c in pick
    ]
    return torch.cat(xs), torch.tensor(pick)


def tuner(problem: Problem, model, method: str, how: str, lam: float | None):
    """The MAML front that adapts ``model`` at test: plain SGD (``how="sgd"``) or the
    method's own adaptation (``how="own"``)."""
    loss = loss_of(problem)
    kw: dict = {}
    if method == "transfer" and problem.kind == "image":
        head = head_name(model)
        kw["params"] = [f"{head}.weight", f"{head}.bias"]
    if method == "mamlpp":  # its own adaptation: the learned rates; plain SGD: the same params
        lr = model.lslr if how == "own" else problem.inner_lr
        inner = effmaml.SGD(lr, per_step=how == "own")
        return effmaml.MAML(model, loss, inner, "first_order", params=inner_params(model))
    if how == "own" and method == "implicit":
        kw["prox_lambda"] = lam if lam is not None else problem.imaml_lams[0]
        return effmaml.MAML(model, loss, effmaml.SGD(problem.imaml_lr), "first_order", **kw)
    return effmaml.MAML(model, loss, effmaml.SGD(problem.inner_lr), "first_order", **kw)


def own_steps(problem: Problem, method: str, inner_steps: int | None = None) -> int:
    """How many steps the method's own adaptation takes at test."""
    if method == "implicit":
        return inner_steps or problem.imaml_steps
    if method == "mamlpp":
        return problem.mamlpp.steps
    if method in ("maml", "first_order"):
        return inner_steps or problem.inner_steps
    return max(problem.eval_steps)  # transfer, random: the most any method gets
