"""fewshot-speed's workload and the libraries that run it: the model, the tasks, and one
meta-iteration per library (effmaml's fronts, higher and TorchOpt's MetaSGD through the
sweep's adapters in ``bench.peers``, TorchOpt's implicit differentiation, a plain
torch.func loop), each in its family with its reference."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import effmaml

from ..fewshot.methods import IMAML_CG_DAMPING, IMAML_CG_STEPS
from ..fewshot.problems import ce_loss
from ..models import build_model
from ..peers import Higher, TorchOpt

__all__ = [
    "FAMILIES",
    "LIBRARIES",
    "PEERS",
    "REFERENCE",
    "Library",
    "Speed",
    "Step",
    "Task",
    "front",
    "make_model",
    "make_tasks",
    "meta_gradient",
]

Task = tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
Step = Callable[[list[Task], int], None]


@dataclass(frozen=True)
class Speed:
    """The workload. ``meta_batch``: Finn et al.'s 32 on a GPU; 8 on a CPU (32 would take
    four times as long for the same ratios). ``imaml_*``: iMAML's inner loop and solve, as
    the few-shot bench meta-trains it (``bench.fewshot``); ``imaml_steps``: the N at which
    the iMAML family runs."""

    n_way: int = 5
    k_shot: int = 1
    k_query: int = 15
    meta_batch: int = 32
    width: int = 64
    image: int = 28
    lr: float = 0.4
    steps: tuple[int, ...] = (1, 5, 10)
    rounds: int = 30
    dtype: str = "float32"
    imaml_steps: tuple[int, ...] = (5, 10)
    imaml_lr: float = 0.1
    imaml_lam: float = 0.5
    cg_steps: int = IMAML_CG_STEPS
    cg_damping: float = IMAML_CG_DAMPING
    cg_tol: float = 1e-10


def make_model(cfg: Speed, device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    model = build_model("conv4", cfg.n_way, channels=1, width=cfg.width, image=cfg.image)
    return model.to(device, getattr(torch, cfg.dtype))


def make_tasks(cfg: Speed, device: torch.device, seed: int = 0) -> list[Task]:
    """``meta_batch`` tasks of random images, drawn from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, cfg.dtype)

    def part(k: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(cfg.n_way * k, 1, cfg.image, cfg.image, generator=g, dtype=dtype)
        y = torch.arange(cfg.n_way).repeat_interleave(k)
        return x.to(device), y.to(device)

    return [(part(cfg.k_shot), part(cfg.k_query)) for _ in range(cfg.meta_batch)]


def front(model: nn.Module, cfg: Speed, strategy: str) -> effmaml.MAML:
    """The effmaml front a library row uses: ``implicit`` with the iMAML settings of
    ``cfg``, any other strategy with the MAML family's inner SGD."""
    if strategy != "implicit":
        return effmaml.MAML(model, ce_loss, effmaml.SGD(cfg.lr), strategy)
    return effmaml.MAML(
        model,
        ce_loss,
        effmaml.SGD(cfg.imaml_lr),
        "implicit",
        lam=cfg.imaml_lam,
        cg_steps=cfg.cg_steps,
        cg_damping=cfg.cg_damping,
        cg_tol=cfg.cg_tol,
    )


# -- one meta-iteration per library: accumulate the summed query losses' gradient ---------
def _effmaml(strategy: str) -> Callable[[nn.Module, Speed], Step]:
    def setup(model: nn.Module, cfg: Speed) -> Step:
        maml = front(model, cfg, strategy)

        def step(tasks: list[Task], n: int) -> None:
            for support, query in tasks:
                ce_loss(maml.adapt(support, steps=n), query).backward()

        return step

    return setup


def _peer(cls: type[Higher] | type[TorchOpt]) -> Callable[[nn.Module, Speed], Step]:
    """A peer of ``bench.peers``, the sweep's adapter: each task's support set at every
    step."""

    def setup(model: nn.Module, cfg: Speed) -> Step:
        peer = cls(model, cfg.lr)

        def step(tasks: list[Task], n: int) -> None:
            for support, query in tasks:
                peer(ce_loss, [support] * n, query)

        return step

    return setup


def _torchopt_implicit(model: nn.Module, cfg: Speed) -> Step:
    """TorchOpt's iMAML as its documentation builds it: the inner loop (first-order SGD on
    the proximal objective, as effmaml's ``implicit`` runs it) under ``custom_root``, whose
    optimality condition is the objective's gradient, solved by ``solve_cg``.

    TorchOpt solves (H + λI + ridge·I) u = v and effmaml ((1 + δ)I + H/λ) x = v: with
    ridge = λδ the same system scaled by λ, under which conjugate gradient's iterates
    scale and nothing else changes (both stop on ‖r‖ ≤ tol·‖b‖ or after ``cg_steps``).
    Unlike effmaml's, TorchOpt's CG does not stop at non-positive curvature.
    """
    import torchopt
    from torch.func import functional_call, grad

    names = [n for n, _ in model.named_parameters()]
    lam = cfg.imaml_lam

    def loss_at(phi: tuple[torch.Tensor, ...], batch: tuple[torch.Tensor, torch.Tensor]):
        return ce_loss(lambda x: functional_call(model, dict(zip(names, phi)), (x,)), batch)

    def objective(phi, theta, support):
        prox = sum(((p - q) ** 2).sum() for p, q in zip(phi, theta))
        return loss_at(phi, support) + 0.5 * lam * prox

    cg = torchopt.linear_solve.solve_cg(
        maxiter=cfg.cg_steps, rtol=cfg.cg_tol, atol=0.0, ridge=lam * cfg.cg_damping
    )

    def solver(n: int):
        @torchopt.diff.implicit.custom_root(grad(objective, argnums=0), argnums=1, solve=cg)
        def solve(phi0, theta, support):
            theta = tuple(t.detach() for t in theta)
            phi = tuple(p.detach().requires_grad_() for p in phi0)
            for _ in range(n):
                with torch.enable_grad():  # TorchOpt runs this in a Function's forward
                    g = torch.autograd.grad(objective(phi, theta, support), phi)
                phi = tuple(
                    (p - cfg.imaml_lr * gi).detach().requires_grad_() for p, gi in zip(phi, g)
                )
            return phi

        return solve

    def step(tasks: list[Task], n: int) -> None:
        theta = tuple(model.parameters())
        solve = solver(n)
        with warnings.catch_warnings():
            # TorchOpt 0.7.3 calls functorch.vjp, which torch deprecates at every call
            warnings.filterwarnings("ignore", ".*functorch.vjp.*", FutureWarning)
            for support, query in tasks:
                loss_at(solve(theta, theta, support), query).backward()

    return step


def _func_loop(model: nn.Module, cfg: Speed) -> Step:
    names = [n for n, _ in model.named_parameters()]
    theta = list(model.parameters())

    def step(tasks: list[Task], n: int) -> None:
        for support, query in tasks:
            params = [p.view_as(p) for p in theta]  # φ₀: θ's value, a node of its own
            for _ in range(n):
                out = torch.func.functional_call(model, dict(zip(names, params)), (support[0],))
                grads = torch.autograd.grad(
                    F.cross_entropy(out, support[1]), params, create_graph=True
                )
                params = [p - cfg.lr * g for p, g in zip(params, grads)]
            out = torch.func.functional_call(model, dict(zip(names, params)), (query[0],))
            F.cross_entropy(out, query[1]).backward()

    return step


@dataclass(frozen=True)
class Library:
    """One way to run the meta-iteration: ``setup(model, cfg) -> step(tasks, n)``; its
    family (``"maml"``: second-order MAML; ``"imaml"``: implicit gradients), and whether it
    is a peer (what effmaml is compared with) or effmaml itself."""

    setup: Callable[[nn.Module, Speed], Step]
    family: str = "maml"
    peer: bool = False


LIBRARIES: dict[str, Library] = {
    "effmaml naive": Library(_effmaml("naive")),
    "effmaml auto": Library(_effmaml("auto")),
    "effmaml checkpoint": Library(_effmaml("checkpoint")),
    "higher": Library(_peer(Higher), peer=True),
    "torchopt": Library(_peer(TorchOpt), peer=True),
    "torch.func loop": Library(_func_loop, peer=True),
    "effmaml implicit": Library(_effmaml("implicit"), family="imaml"),
    "torchopt implicit": Library(_torchopt_implicit, family="imaml", peer=True),
}
PEERS = tuple(name for name, lib in LIBRARIES.items() if lib.peer)
# each family's meta-gradient that the others in it are compared with, and its name
REFERENCE = {"maml": "effmaml naive", "imaml": "effmaml implicit"}
FAMILIES = {"maml": "MAML", "imaml": "iMAML"}


def meta_gradient(step: Step, model: nn.Module, tasks: list[Task], n: int) -> torch.Tensor:
    """One meta-iteration's gradient (flat), the model's ``.grad`` cleared before."""
    model.zero_grad(set_to_none=True)
    step(tasks, n)
    g = [p.grad if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]
    return torch.cat([t.reshape(-1) for t in g]).detach().clone()
