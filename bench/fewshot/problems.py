"""The few-shot problems, the horizon experiment and what every method shares (data,
model, tasks, loss)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch.nn.functional as F

from effmaml.tasks import SineTasks, mlp, mse_loss

from ..models import build_model
from .data import Characters, FewShotData, load

__all__ = [
    "EVAL_SEED",
    "HORIZON",
    "METHODS",
    "PROBLEMS",
    "PROTONET",
    "TRAIN_SEED_OFFSET",
    "VAL_SEED",
    "Horizon",
    "MamlPP",
    "Problem",
    "ce_loss",
    "data_for",
    "loss_of",
    "make_model",
    "tasks_for",
]

METHODS = ("maml", "mamlpp", "first_order", "implicit", "transfer", "random")
# the metric-learning baseline beside them (real Omniglot, make fewshot-omniglot)
PROTONET = "protonet"

# a training run of seed s draws its tasks (and transfer its pooled batches) from
# TRAIN_SEED_OFFSET + s; the test episodes come from EVAL_SEED for every method and seed,
# the validation episodes that choose iMAML's λ from VAL_SEED
TRAIN_SEED_OFFSET = 10_000
EVAL_SEED = 777
VAL_SEED = 5


@dataclass(frozen=True)
class MamlPP:
    """MAML++'s recipe (Antoniou et al. 2019; their Omniglot configuration where it has
    one): ``steps`` inner SGD steps at train and test with per-layer, per-step learned
    rates starting at ``lr`` (LSLR); per-step BatchNorm weights, learned by the outer loop
    only (BNWB; the Conv-4 normalises with batch statistics, so there are no running
    statistics to keep per step); the multi-step loss annealed from uniform to the last
    step over the first ``msl_fraction`` of the iterations, then the last step's loss only
    (MSL); first order for the first ``first_order_fraction`` (DA); cosine annealing of the
    outer rate down to ``min_outer_lr`` (CA).
    """

    steps: int = 5
    lr: float = 0.1
    msl_fraction: float = 0.1
    first_order_fraction: float = 1 / 3
    min_outer_lr: float = 1e-5


@dataclass(frozen=True)
class Problem:
    """A few-shot problem, its model and the budget every method gets.

    Attributes:
        name: for reports.
        kind: ``"image"`` (N-way K-shot classification) or ``"sine"``.
        data: the image data (``"characters"``, ``"omniglot:/path"``, ...).
        n_way, k_shot, k_query: the episodes (15 query examples per class, as published).
        width: Conv-4 filters (Finn et al.: 64; 32 for miniImageNet).
        inner_lr, inner_steps: MAML's and first order's inner SGD (at train and as their own
            adaptation at test).
        iterations, meta_batch, outer_lr: the outer budget (Adam), the same for all.
        imaml_steps, imaml_lr, imaml_lams: iMAML's inner loop on the proximal objective and
            the λ it chooses from on the validation classes (one λ: no choice).
        eval_steps: the plain-SGD adaptation steps every method is also evaluated after.
        eval_tasks: test episodes (or sine tasks) per seed.
        strategy, memory_budget: how MAML differentiates its inner loop (``auto`` under a
            budget for long horizons).
        memory_fraction: if set, MAML runs ``auto`` under this fraction of naive's
            predicted peak (what recomputation buys; overrides ``strategy`` and
            ``memory_budget``).
        clip: MAML's grad-of-grad clipping (for long horizons), or None.
        methods: the methods this problem runs (``mamlpp`` on images only).
        mamlpp: MAML++'s recipe (:class:`MamlPP`).
    """

    name: str
    kind: str
    inner_lr: float
    inner_steps: int
    iterations: int
    meta_batch: int
    data: str = ""
    n_way: int = 5
    k_shot: int = 1
    k_query: int = 15
    width: int = 32
    outer_lr: float = 1e-3
    imaml_steps: int = 10
    imaml_lr: float = 0.1
    imaml_lams: tuple[float, ...] = (2.0,)
    eval_steps: tuple[int, ...] = (0, 1, 3, 5, 10)
    eval_tasks: int = 200
    strategy: str = "naive"
    memory_budget: str | None = None
    memory_fraction: float | None = None
    clip: float | None = None
    methods: tuple[str, ...] = METHODS
    mamlpp: MamlPP = MamlPP()

    def metric(self) -> str:
        return "accuracy" if self.kind == "image" else "loss"


PROBLEMS = {
    # Finn et al.'s Omniglot 5-way 1-shot recipe (inner SGD 0.4, one step at train), shrunk
    # to fit 2 CPU cores: 16 filters (64), meta-batch 8 (32), 300 outer steps (60000),
    # 100 test episodes per seed (600).
    "characters": Problem(
        "characters",
        "image",
        data="characters",
        width=16,
        inner_lr=0.4,
        inner_steps=1,
        iterations=300,
        meta_batch=8,
        eval_tasks=100,
        imaml_steps=10,
        imaml_lr=0.1,
        imaml_lams=(0.5, 2.0),
    ),
    # 5-shot: MAML and MAML++ only (the 1-shot problem compares every method), half the
    # 1-shot budget's outer steps, to fit make fewshot's time
    "characters-5shot": Problem(
        "characters-5shot",
        "image",
        data="characters",
        width=16,
        k_shot=5,
        inner_lr=0.4,
        inner_steps=1,
        iterations=150,
        meta_batch=8,
        eval_tasks=100,
        methods=("maml", "mamlpp"),
    ),
    "sine": Problem(
        "sine",
        "sine",
        inner_lr=0.01,
        inner_steps=5,
        iterations=500,
        meta_batch=10,
        imaml_steps=10,
        imaml_lr=0.01,
        imaml_lams=(2.0,),
        eval_steps=(0, 1, 5, 10),
        methods=tuple(m for m in METHODS if m != "mamlpp"),
    ),
}


@dataclass(frozen=True)
class Horizon:
    """The horizon experiment (``make fewshot-horizon``): MAML and iMAML with N inner steps
    at train and test, the same inner step size at every N, so that a longer horizon is
    more adaptation. MAML's second-order graph at N=100 is kept small by ``auto`` under a
    budget that naive exceeds, its meta-gradient by clipping. A smaller budget than
    ``make fewshot``'s: 100 outer steps of 4 episodes, 50 test episodes per seed.

    Attributes:
        steps: the N values (train = test).
        methods: the methods compared.
        strategy, memory_budget, clip: how MAML differentiates its inner loop.
        inner_lr, imaml_lr: the inner step sizes (MAML's, iMAML's), at every N.
        iterations, meta_batch, eval_tasks: the outer budget and the test episodes.
    """

    steps: tuple[int, ...] = (1, 5, 25, 100)
    methods: tuple[str, ...] = ("maml", "implicit")
    strategy: str = "auto"
    memory_budget: str = "48MiB"
    clip: float = 10.0
    inner_lr: float = 0.1
    imaml_lr: float = 0.1
    iterations: int = 100
    meta_batch: int = 4
    eval_tasks: int = 50

    def apply(self, problem: Problem, **overrides: object) -> Problem:
        """``problem`` under the experiment's settings (``overrides`` last)."""
        settings = {
            k: getattr(self, k)
            for k in (
                "strategy",
                "memory_budget",
                "clip",
                "inner_lr",
                "imaml_lr",
                "iterations",
                "meta_batch",
                "eval_tasks",
            )
        }
        return dataclasses.replace(problem, **{**settings, **overrides})


HORIZON = Horizon()

_DATA: dict[str, FewShotData] = {}


def data_for(problem: Problem) -> FewShotData | None:
    """The problem's image data, loaded once per process (None for sine)."""
    if problem.kind != "image":
        return None
    if problem.data not in _DATA:
        data = load(problem.data)
        if isinstance(data.dataset, Characters):
            data.dataset.materialize()
        _DATA[problem.data] = data
    return _DATA[problem.data]


def ce_loss(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def loss_of(problem: Problem):
    return ce_loss if problem.kind == "image" else mse_loss


def make_model(problem: Problem, classes: int | None = None):
    data = data_for(problem)
    if data is None:
        return mlp()
    return build_model(
        "conv4",
        classes or problem.n_way,
        channels=data.channels,
        width=problem.width,
        image=data.size,
    )


def tasks_for(problem: Problem, split: str, meta_batch: int):
    data = data_for(problem)
    if data is None:
        return SineTasks(meta_batch)
    return data.sampler(split, problem.n_way, problem.k_shot, problem.k_query, meta_batch)
