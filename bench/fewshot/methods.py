"""The few-shot methods: meta-train (or pre-train) a model for a number of outer steps or
under a CPU-time budget (:mod:`.budget`), and adapt it at test."""

from __future__ import annotations

import contextlib
import copy
import math
import warnings
from collections.abc import Callable

import torch

import effmaml
from effmaml.curriculum import Curriculum
from effmaml.measure import PeakMemory

from .budget import Budget, Progress, drive
from .problems import (
    TRAIN_SEED_OFFSET,
    Problem,
    ce_loss,
    data_for,
    loss_of,
    make_model,
    tasks_for,
)
from .protonet import embedding, proto_logits, proto_loss

__all__ = [
    "IMAML_CG_DAMPING",
    "IMAML_CG_STEPS",
    "head_name",
    "inner_params",
    "own_steps",
    "predictor",
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
    budget: Budget | None = None,
) -> tuple[torch.nn.Module, dict]:
    """Meta-train (or pre-train) ``method`` for ``iterations`` outer steps (default the
    problem's) or, with ``budget``, until its CPU time is spent; return the initial model
    and its cost.

    Returns:
        ``(model, cost)`` with ``steps`` (outer steps taken), ``episodes`` (tasks seen;
        transfer: as many images per step as ``meta_batch`` episodes hold), ``cpu_s`` and
        ``wall_s`` (the training alone, budget checkpoints excluded), ``train_s`` (=
        ``wall_s``), ``s_per_iteration``, ``peak_mib`` (resident-set high-water mark of
        the training, this process), and for MAML/iMAML the schedule run and its
        predicted peak. MAML++'s model has per-step BatchNorm, and its learned per-step
        rates in ``model.lslr`` (name -> tensor of shape ``(steps,)``). ``random`` trains
        nothing (its budget checkpoints see the initial model once, at 0).
    """
    data_for(problem)  # read once per process, before any clock starts
    _warm_up()
    torch.manual_seed(seed)
    model = make_model(problem)
    cost: dict = {"train_s": 0.0, "s_per_iteration": 0.0, "peak_mib": 0.0, "schedule": ""}
    cost |= {"steps": 0, "episodes": 0, "cpu_s": 0.0, "wall_s": 0.0}
    if method == "random":
        if budget is not None and budget.on_checkpoint is not None and budget.checkpoints:
            budget.on_checkpoint(copy.deepcopy(model), 0.0, 0)
        return model, cost
    # set-up that is the benchmark's, not the method's: the memory budget MAML is held to
    memory = _memory_budget(problem, model, inner_steps) if method == "maml" else None
    progress = Progress(
        (problem.iterations if iterations is None else iterations) if budget is None else None,
        budget,
    )
    with PeakMemory("cpu") as pm, _one_thread(budget is not None):
        run = _training(problem, method, model, seed, lam, inner_steps, progress, memory)
        quiet = warnings.catch_warnings() if method == "implicit" else contextlib.nullcontext()
        with quiet:
            if method == "implicit":
                warnings.simplefilter("ignore")  # CG's non-convexity notes on ReLU nets
            cost |= drive(progress, run.step, run.current)
        model = run.current(copy_=False)
        cost |= run.facts()
    cost["train_s"] = cost["wall_s"]
    cost["episodes"] = cost["steps"] * problem.meta_batch
    cost["s_per_iteration"] = cost["wall_s"] / max(cost["steps"], 1)
    cost["peak_mib"] = pm.peak / 2**20
    return model, cost


class _Run:
    """One method's training in progress: ``step()`` takes an outer step, ``current()`` is
    the model training would return now (a copy, unless ``copy_=False`` at the end)."""

    def step(self) -> None:
        raise NotImplementedError

    def current(self, copy_: bool = True) -> torch.nn.Module:
        raise NotImplementedError

    def facts(self) -> dict:
        return {}


def _training(problem, method, model, seed, lam, inner_steps, progress, memory) -> _Run:
    if method == "transfer":
        return _Pretrain(problem, model, seed)
    if method == "protonet":
        return _ProtoNet(problem, model, seed)
    return _Meta(problem, method, model, seed, lam, inner_steps, progress, memory)


@contextlib.contextmanager
def _one_thread(on: bool):
    """Torch on one thread while a CPU budget runs: a process's CPU time counts every
    thread, and idle intra-op threads spinning on a busy machine would spend the budget."""
    before = torch.get_num_threads()
    if on:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


_WARM: list[bool] = []


def _warm_up() -> None:
    """Once per process: a tiny second-order adapt under naive, checkpoint and implicit,
    and its backward, so that lazy imports and first-call set-up land before any budget's
    clock starts (they cost seconds, once, to whichever job a worker runs first)."""
    if _WARM:
        return
    with torch.random.fork_rng(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
        batch = (torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))
        opt = torch.optim.Adam(net.parameters(), 1e-3)  # its first use imports torch._dynamo
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
        for strategy in ("naive", "checkpoint", "implicit", "first_order"):
            maml = effmaml.MAML(net, ce_loss, effmaml.SGD(0.1), strategy)
            ce_loss(maml.adapt(batch, steps=2), batch).backward()
            opt.step()
            sched.step()
    _WARM.append(True)


def _memory_budget(problem: Problem, model, inner_steps) -> int | None:
    """The bytes MAML is held to: ``problem.memory_fraction`` of naive's predicted peak
    (``auto`` then picks the fastest schedule that fits: a recomputing one), or None."""
    if problem.memory_fraction is None:
        return None
    steps = own_steps(problem, "maml", inner_steps)
    support = tasks_for(problem, "train", 1)(torch.Generator().manual_seed(0))[0][0]
    plain = effmaml.MAML(model, loss_of(problem), effmaml.SGD(problem.inner_lr), "naive")
    naive = plain.estimate(support, steps, "naive")["naive"].peak_bytes
    return int(problem.memory_fraction * naive)


class _Pretrain(_Run):
    """Transfer: one network over all training classes (or tasks, for sine), then a fresh
    head for the episodes' classes."""

    def __init__(self, problem: Problem, model, seed: int) -> None:
        self.problem, self.model = problem, model
        self.g = torch.Generator().manual_seed(TRAIN_SEED_OFFSET + seed)
        self.loss = loss_of(problem)
        if problem.kind == "sine":
            self.wide = model
            self.tasks = tasks_for(problem, "train", problem.meta_batch)
        else:
            self.sampler = tasks_for(problem, "train", 1)
            self.wide = make_model(problem, classes=len(self.sampler.classes))
        self.opt = torch.optim.Adam(self.wide.parameters(), lr=problem.outer_lr)

    def step(self) -> None:
        p = self.problem
        self.opt.zero_grad()
        if p.kind == "sine":
            total = 0.0
            for (xs, ys), (xq, yq) in self.tasks(self.g):
                total = total + self.loss(self.wide, (torch.cat([xs, xq]), torch.cat([ys, yq])))
            (total / p.meta_batch).backward()
        else:
            per_step = p.meta_batch * p.n_way * (p.k_shot + p.k_query)
            self.loss(self.wide, self._pooled(per_step)).backward()
        self.opt.step()

    def _pooled(self, n: int):
        """``n`` training images from all training classes pooled, with their class."""
        classes, g = self.sampler.classes, self.g
        pick = torch.randint(len(classes), (n,), generator=g).tolist()
        xs = []
        for c in pick:
            count = len(self.sampler.index[classes[c][0]])
            xs.append(
                self.sampler.examples(classes[c], [int(torch.randint(count, (), generator=g))])
            )
        return torch.cat(xs), torch.tensor(pick)

    def current(self, copy_: bool = True) -> torch.nn.Module:
        if self.problem.kind == "sine":
            return copy.deepcopy(self.wide) if copy_ else self.wide
        model = copy.deepcopy(self.model) if copy_ else self.model
        head = head_name(self.wide)
        body = {k: v for k, v in self.wide.state_dict().items() if not k.startswith(f"{head}.")}
        model.load_state_dict(copy.deepcopy(body) if copy_ else body, strict=False)
        with torch.no_grad():
            for p in model.head.parameters():
                p.zero_()
        return model


class _ProtoNet(_Run):
    """Prototypical Networks (:mod:`.protonet`): Adam on the embedding, the mean query
    cross-entropy of a meta-batch of episodes per step."""

    def __init__(self, problem: Problem, model, seed: int) -> None:
        self.model, self.meta_batch = model, problem.meta_batch
        self.g = torch.Generator().manual_seed(TRAIN_SEED_OFFSET + seed)
        self.tasks = tasks_for(problem, "train", problem.meta_batch)
        self.opt = torch.optim.Adam(embedding(model).parameters(), lr=problem.outer_lr)

    def step(self) -> None:
        self.opt.zero_grad()
        loss = sum(proto_loss(self.model, ep) for ep in self.tasks(self.g))
        (loss / self.meta_batch).backward()
        self.opt.step()

    def current(self, copy_: bool = True) -> torch.nn.Module:
        return copy.deepcopy(self.model) if copy_ else self.model


class _Meta(_Run):
    """MAML (its strategy, or ``auto`` under a memory budget), first order, iMAML and
    MAML++ on :class:`effmaml.MetaTrainer`."""

    def __init__(self, problem, method, model, seed, lam, inner_steps, progress, memory) -> None:
        self.problem, self.seed = problem, seed
        self.lslr: dict | None = None
        self.memory_budget: int | None = None
        curriculum = None
        if method == "mamlpp":
            r = problem.mamlpp
            model = effmaml.per_step_batchnorm(model, r.steps)
            names = inner_params(model)
            self.lslr = {n: torch.full((r.steps,), r.lr, requires_grad=True) for n in names}
            inner = effmaml.SGD(self.lslr, per_step=True)
            maml = effmaml.MAML(model, loss_of(problem), inner, "naive", params=names)
            params = [*model.parameters(), *self.lslr.values()]
            self.steps = r.steps
        else:
            maml = _front(problem, method, model, lam, memory)
            self.memory_budget = memory
            params = list(model.parameters())
            self.steps = own_steps(problem, method, inner_steps)
        opt = torch.optim.Adam(params, lr=problem.outer_lr)
        sched = None
        if method == "mamlpp":
            sched, curriculum = _mamlpp_schedule(problem, maml, opt, progress.fraction)
        self.maml = maml
        self.trainer = effmaml.MetaTrainer(
            maml,
            opt,
            tasks_for(problem, "train", problem.meta_batch),
            meta_batch=problem.meta_batch,
            inner_steps=self.steps,
            seed=TRAIN_SEED_OFFSET + seed,
            progress=False,
            scheduler=sched,
        )
        if curriculum is not None:
            self.trainer.curriculum = curriculum

    def step(self) -> None:
        self.trainer.step()

    def current(self, copy_: bool = True) -> torch.nn.Module:
        model = copy.deepcopy(self.trainer.model) if copy_ else self.trainer.model
        if self.lslr is not None:
            model.lslr = {n: v.detach().clone() for n, v in self.lslr.items()}
        return model

    def facts(self) -> dict:
        """What one adapt runs after training (the schedule auto chose, its predicted
        peak)."""
        p = self.problem
        support = tasks_for(p, "train", 1)(torch.Generator().manual_seed(self.seed))[0][0]
        facts = self.maml.adapt(support, steps=self.steps).facts
        out: dict = {"schedule": facts.strategy}
        if facts.prediction is not None:
            out["predicted_peak_mib"] = facts.prediction.peak_bytes / 2**20
        if self.memory_budget is not None:
            out["memory_budget_mib"] = self.memory_budget / 2**20
        return out


def _front(problem: Problem, method: str, model, lam, memory: int | None) -> effmaml.MAML:
    """The MAML front ``method`` meta-trains with (MAML: ``auto`` under ``memory`` bytes
    when given, else the problem's strategy and budget)."""
    loss = loss_of(problem)
    if method == "implicit":
        lam = lam if lam is not None else problem.imaml_lams[0]
        inner = effmaml.SGD(problem.imaml_lr)
        kw = {"lam": lam, "cg_steps": IMAML_CG_STEPS, "cg_damping": IMAML_CG_DAMPING}
        return effmaml.MAML(model, loss, inner, "implicit", **kw)
    if method == "first_order":
        return effmaml.MAML(model, loss, effmaml.SGD(problem.inner_lr), "first_order")
    if method != "maml":
        raise ValueError(f"unknown method {method!r}")
    budget = memory if memory is not None else problem.memory_budget
    kw = {"memory_budget": budget} if budget else {}
    strategy = "auto" if memory is not None else problem.strategy
    inner = effmaml.SGD(problem.inner_lr)
    return effmaml.MAML(model, loss, inner, strategy, clip_grad_grad_norm=problem.clip, **kw)


class _Schedule(Curriculum):
    """MAML++'s derivative-order annealing and multi-step loss as functions of the
    training's progress (a fraction of its outer steps or of its CPU budget)."""

    def __init__(self, maml, fraction: Callable[[], float], r) -> None:
        last = [0.0] * (r.steps - 1) + [1.0]

        def weights(_: int) -> list[float]:
            f = fraction()
            return effmaml.msl_weights(r.steps, f / r.msl_fraction) if f < r.msl_fraction else last

        super().__init__(maml, 0, weights)
        self.fraction, self.until = fraction, r.first_order_fraction
        self.first_order = maml.with_strategy("first_order")

    def maml_at(self, iteration: int) -> effmaml.MAML:
        return self.first_order if self.fraction() < self.until else self.maml


def _mamlpp_schedule(problem: Problem, maml, opt, fraction: Callable[[], float]):
    """MAML++'s cosine annealing of the outer rate down to ``min_outer_lr`` and its
    curriculum, both over the training's progress."""
    r = problem.mamlpp
    floor = r.min_outer_lr / problem.outer_lr

    def factor(_: int) -> float:
        return floor + (1 - floor) * (1 + math.cos(math.pi * fraction())) / 2

    return torch.optim.lr_scheduler.LambdaLR(opt, factor), _Schedule(maml, fraction, r)


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


def predictor(
    problem: Problem,
    model,
    method: str,
    lam: float | None = None,
    inner_steps: int | None = None,
):
    """The method's own classifier of a task: ``(support, x) -> logits`` (ProtoNets: the
    distances to the support's prototypes; the others: adapted on the support with their
    own adaptation, :func:`tuner` and :func:`own_steps`, then run on ``x``)."""
    if method == "protonet":

        def nearest(support, x):
            with torch.no_grad():
                return proto_logits(model, support, x)

        return nearest
    adapt = tuner(problem, model, method, "own", lam)
    steps = own_steps(problem, method, inner_steps)

    def adapted(support, x):
        f = adapt.adapt(support, steps=steps)
        with torch.no_grad():
            return f(x)

    return adapted


def own_steps(problem: Problem, method: str, inner_steps: int | None = None) -> int:
    """How many steps the method's own adaptation takes at test (ProtoNets: none)."""
    if method == "implicit":
        return inner_steps or problem.imaml_steps
    if method == "mamlpp":
        return problem.mamlpp.steps
    if method in ("maml", "first_order"):
        return inner_steps or problem.inner_steps
    if method == "protonet":
        return 0
    return max(problem.eval_steps)  # transfer, random: the most any method gets
