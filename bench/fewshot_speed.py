"""``python -m bench.fewshot_speed`` (``make fewshot-speed``): the workload most MAML users
run every day, every library side by side in one process.

Finn et al.'s Omniglot network (Conv-4, 64 filters, 1x28x28), 5-way 1-shot tasks with 15
query images per class, a meta-batch of tasks, inner SGD 0.4, N = 1, 5 and 10 steps, second
order. One meta-iteration is: for each task, adapt on the support set (N steps), query loss,
backward (the meta-gradient accumulates over the tasks, as a user's loop does). Per library:

* **seconds per meta-iteration**: after one warm-up iteration each, ``rounds`` rounds in
  which every library runs one iteration, the order rotating from round to round (so that
  a slow spell of the machine is shared); the median per library. Timings on a shared CPU
  vary by up to 30% between runs: compare rows of one run, by their ratio.
* **peak memory**: the resident-set growth (CPU) or allocated-memory peak (CUDA) of one
  more meta-iteration, measured after the timing (:class:`effmaml.measure.PeakMemory`).
* **agreement**: the meta-gradient's relative L2 distance from effmaml ``naive``'s on the
  same tasks (float32; ``tests/test_fewshot_speed.py`` checks every library equal in
  float64).

Libraries: effmaml ``naive``, ``auto`` and ``checkpoint`` (one front each, built once, as a
user builds it), higher (``innerloop_ctx``), TorchOpt (``MetaSGD``), and a plain loop of
``torch.func.functional_call`` + ``torch.autograd.grad(create_graph=True)`` over the tasks:
the floor a Python loop over tasks can reach. The images are random (the speed does not
depend on what they show); the tasks are drawn from a seeded generator, the same for every
library.

Writes ``results/fewshot-speed/runs.csv`` and ``summary.md`` (the ratio of each effmaml row
to the fastest other library per N).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

import effmaml
from effmaml.measure import PeakMemory

from .env import environment, timestamp
from .fewshot.problems import ce_loss
from .models import build_model
from .workload import agreement

__all__ = ["LIBRARIES", "PEERS", "Speed", "meta_gradient", "run"]

Task = tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Speed:
    """The workload. ``meta_batch``: Finn et al.'s 32 on a GPU; 8 on a CPU (32 would take
    four times as long for the same ratios)."""

    n_way: int = 5
    k_shot: int = 1
    k_query: int = 15
    meta_batch: int = 32
    width: int = 64
    image: int = 28
    lr: float = 0.4
    steps: tuple[int, ...] = (1, 5, 10)
    rounds: int = 5
    dtype: str = "float32"


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


# -- one meta-iteration per library: accumulate the summed query losses' gradient ---------
def _effmaml(strategy: str) -> Callable:
    def setup(model: nn.Module, cfg: Speed) -> Callable[[list[Task], int], None]:
        maml = effmaml.MAML(model, ce_loss, effmaml.SGD(cfg.lr), strategy)

        def step(tasks: list[Task], n: int) -> None:
            for support, query in tasks:
                ce_loss(maml.adapt(support, steps=n), query).backward()

        return step

    return setup


def _higher(model: nn.Module, cfg: Speed) -> Callable[[list[Task], int], None]:
    import higher

    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr)

    def step(tasks: list[Task], n: int) -> None:
        for support, query in tasks:
            with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (f, diffopt):
                for _ in range(n):
                    diffopt.step(ce_loss(f, support))
                ce_loss(f, query).backward()

    return step


def _torchopt(model: nn.Module, cfg: Speed) -> Callable[[list[Task], int], None]:
    import torchopt

    inner = torchopt.MetaSGD(model, lr=cfg.lr)

    def step(tasks: list[Task], n: int) -> None:
        for support, query in tasks:
            state = torchopt.extract_state_dict(model, by="reference")
            for _ in range(n):
                inner.step(ce_loss(model, support))
            ce_loss(model, query).backward()
            torchopt.recover_state_dict(model, state)

    return step


def _func_loop(model: nn.Module, cfg: Speed) -> Callable[[list[Task], int], None]:
    names = [n for n, _ in model.named_parameters()]
    theta = list(model.parameters())

    def step(tasks: list[Task], n: int) -> None:
        for support, query in tasks:
            params = theta
            for _ in range(n):
                out = torch.func.functional_call(model, dict(zip(names, params)), (support[0],))
                grads = torch.autograd.grad(
                    F.cross_entropy(out, support[1]), params, create_graph=True
                )
                params = [p - cfg.lr * g for p, g in zip(params, grads)]
            out = torch.func.functional_call(model, dict(zip(names, params)), (query[0],))
            F.cross_entropy(out, query[1]).backward()

    return step


LIBRARIES: dict[str, Callable[[nn.Module, Speed], Callable[[list[Task], int], None]]] = {
    "effmaml naive": _effmaml("naive"),
    "effmaml auto": _effmaml("auto"),
    "effmaml checkpoint": _effmaml("checkpoint"),
    "higher": _higher,
    "torchopt": _torchopt,
    "torch.func loop": _func_loop,
}
PEERS = ("higher", "torchopt", "torch.func loop")  # what effmaml is compared with


def meta_gradient(
    step: Callable[[list[Task], int], None], model: nn.Module, tasks: list[Task], n: int
) -> torch.Tensor:
    """One meta-iteration's gradient (flat), the model's ``.grad`` cleared before."""
    model.zero_grad(set_to_none=True)
    step(tasks, n)
    g = [p.grad if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]
    return torch.cat([t.reshape(-1) for t in g]).detach().clone()


def _clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def run(cfg: Speed, device: torch.device, libraries=tuple(LIBRARIES)) -> pd.DataFrame:
    """Time, measure and compare every library at every N (module docstring)."""
    model = make_model(cfg, device)
    tasks = make_tasks(cfg, device)
    steps = {lib: LIBRARIES[lib](model, cfg) for lib in libraries}
    rows = []
    for n in cfg.steps:
        grads = {lib: meta_gradient(steps[lib], model, tasks, n) for lib in libraries}  # warm-up
        times: dict[str, list[float]] = {lib: [] for lib in libraries}
        order = list(libraries)
        for r in range(cfg.rounds):
            for lib in order[r % len(order) :] + order[: r % len(order)]:
                model.zero_grad(set_to_none=True)
                t0 = _clock(device)
                steps[lib](tasks, n)
                times[lib].append(_clock(device) - t0)
        ref = grads.get("effmaml naive", next(iter(grads.values())))
        for lib in libraries:
            with PeakMemory(device) as pm:
                meta_gradient(steps[lib], model, tasks, n)
            rows.append(
                {
                    "library": lib,
                    "steps": n,
                    "meta_batch": cfg.meta_batch,
                    "s_per_iteration": statistics.median(times[lib]),
                    "s_min": min(times[lib]),
                    "s_max": max(times[lib]),
                    "rounds": cfg.rounds,
                    "peak_mib": pm.peak / 2**20,
                    "memory_kind": pm.kind,
                    **{k: v for k, v in agreement(grads[lib], ref).items() if k != "grad_finite"},
                }
            )
            print(
                f"N={n:<3} {lib:<20} {rows[-1]['s_per_iteration']:7.3f} s  "
                f"{rows[-1]['peak_mib']:7.1f} MiB  rel L2 {rows[-1]['grad_rel_l2']:.1e}",
                flush=True,
            )
    df = pd.DataFrame(rows)
    fastest = df[df.library.isin(PEERS)].groupby("steps").s_per_iteration.min()
    df["vs_fastest_peer"] = df.s_per_iteration / df.steps.map(fastest)
    env = {**environment(device), "timestamp": timestamp(), **asdict(cfg)}
    env["steps"] = ",".join(map(str, cfg.steps))
    return df.assign(**{k: v for k, v in env.items() if k not in df.columns})


def summary(df: pd.DataFrame, cfg: Speed, seconds: float) -> str:
    """The summary.md text: seconds, ratio to the fastest peer, peak and agreement."""
    r = df.iloc[0]
    table = df.pivot_table(index="library", columns="steps", values="s_per_iteration")
    ratio = df.pivot_table(index="library", columns="steps", values="vs_fastest_peer")
    peak = df.pivot_table(index="library", columns="steps", values="peak_mib")
    out = pd.DataFrame(index=list(dict.fromkeys(df.library)))
    for n in table.columns:
        out[f"N={n} s"] = table[n].map("{:.3f}".format)
        out[f"N={n} vs fastest peer"] = ratio[n].map("{:.2f}x".format)
        out[f"N={n} peak MiB"] = peak[n].map("{:.0f}".format)
    worst = df.groupby("library").grad_rel_l2.max()
    out["max rel. L2 vs effmaml naive"] = worst.map("{:.1e}".format)
    lines = [
        "# fewshot-speed: the daily workload, every library side by side",
        "",
        f"Conv-4 ({cfg.width} filters) on 1x{cfg.image}x{cfg.image}, {cfg.n_way}-way "
        f"{cfg.k_shot}-shot with {cfg.k_query} queries per class, meta-batch "
        f"{cfg.meta_batch}, inner SGD {cfg.lr}, second order, {cfg.dtype}. Seconds per "
        f"meta-iteration: median of {cfg.rounds} rounds after a warm-up, the libraries "
        f"alternating within each round; peak: one more meta-iteration. {r.device}, torch "
        f"{r.torch}, {r.threads} threads; {seconds / 60:.1f} minutes.",
        "",
        out.to_markdown(),
        "",
        "vs fastest peer: seconds over the fastest of higher, TorchOpt and the torch.func "
        "loop at the same N in this run. Agreement: the meta-gradient against effmaml "
        "naive's on the same tasks (float32; equal in float64, tests/test_fewshot_speed.py).",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.fewshot_speed", description=__doc__)
    ap.add_argument("--meta-batch", type=int, help="default 32 on CUDA, 8 on CPU")
    ap.add_argument("--rounds", type=int, default=Speed.rounds)
    ap.add_argument("--steps", default="1,5,10")
    ap.add_argument("--out", default="results/fewshot-speed")
    a = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = Speed(rounds=a.rounds, steps=tuple(int(s) for s in a.steps.split(",")))
    cfg = replace(cfg, meta_batch=a.meta_batch or (32 if device.type == "cuda" else 8))
    t0 = time.perf_counter()
    df = run(cfg, device)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / "runs.csv", index=False)
    (out / "summary.md").write_text(summary(df, cfg, time.perf_counter() - t0))
    print((out / "summary.md").read_text())


if __name__ == "__main__":
    main()
