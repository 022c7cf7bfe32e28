"""``python -m bench.fewshot_speed`` (``make fewshot-speed``): the workload most MAML users
run every day, every library side by side in one process.

Finn et al.'s Omniglot network (Conv-4, 64 filters, 1x28x28), 5-way 1-shot tasks with 15
query images per class, a meta-batch of tasks, second order. One meta-iteration is: for
each task, adapt on the support set (N steps), query loss, backward (the meta-gradient
accumulates over the tasks, as a user's loop does). Two families of libraries, each
compared within itself:

* **MAML** (inner SGD 0.4, N = 1, 5, 10): effmaml ``naive``, ``auto`` and ``checkpoint``
  (one front each, built once, as a user builds it), higher (``innerloop_ctx``), TorchOpt
  (``MetaSGD``), and a plain loop of ``torch.func.functional_call`` +
  ``torch.autograd.grad(create_graph=True)`` over the tasks: the floor a Python loop over
  tasks can reach. Reference: effmaml ``naive``.
* **iMAML** (the few-shot bench's settings: inner SGD 0.1 on the proximal objective,
  λ = 0.5, 5 conjugate-gradient steps, damping 0.1; N = 5 and 10): effmaml ``implicit`` and
  TorchOpt's implicit differentiation (``torchopt.diff.implicit.custom_root`` with
  ``solve_cg``, ridge λ·damping: the same linear system). Not at N = 1: one step does not
  reach the inner solution iMAML's gradient is taken at, the Hessian there is indefinite
  here and the conjugate gradient stops (measured: every task). Reference: effmaml
  ``implicit``.

Per library and N:

* **seconds per meta-iteration**: after one warm-up iteration each, ``rounds`` rounds in
  which every library runs one iteration, the order rotating from round to round; the
  median per library.
* **vs fastest peer**: the median over rounds of the library's time over the fastest
  peer's *in the same round*, with a distribution-free confidence interval
  (:mod:`bench.timing`): paired rounds cancel the machine's slow spells, which moved a
  ratio of two medians by ±10% between runs of the same code on this 2-core CPU. The even
  rounds choose the fastest peer (least median), the odd rounds give the ratio, so that
  the peer's luck in choosing it does not lean the ratio (Note [Choosing the fastest peer
  on other rounds than the ratio's]).
* **aten ops**: the operations one meta-iteration dispatches (:func:`bench.timing.count_ops`),
  a count no load on the machine changes: where two libraries dispatch the same work, a
  difference in seconds is the machine's, or Python's.
* **peak memory**: the resident-set growth (CPU) or allocated-memory peak (CUDA) of one
  more meta-iteration, measured after the timing (:class:`effmaml.measure.PeakMemory`).
* **agreement**: the meta-gradient's relative L2 distance from the family's reference on
  the same tasks (float32 here; ``tests/test_fewshot_speed.py`` checks every library equal
  in float64).

The images are random (the speed does not depend on what they show); the tasks are drawn
from a seeded generator, the same for every library. Writes
``results/fewshot-speed/runs.csv`` and ``summary.md``.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

import effmaml
from effmaml.measure import PeakMemory, clock

from .env import environment, timestamp
from .fewshot.methods import IMAML_CG_DAMPING, IMAML_CG_STEPS
from .fewshot.problems import ce_loss
from .models import build_model
from .timing import count_ops, median_ci, paired_ratios
from .workload import agreement

__all__ = [
    "LIBRARIES",
    "PEERS",
    "REFERENCE",
    "Library",
    "Speed",
    "config_of",
    "front",
    "meta_gradient",
    "run",
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


def _higher(model: nn.Module, cfg: Speed) -> Step:
    import higher

    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr)

    def step(tasks: list[Task], n: int) -> None:
        for support, query in tasks:
            with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (f, diffopt):
                for _ in range(n):
                    diffopt.step(ce_loss(f, support))
                ce_loss(f, query).backward()

    return step


def _torchopt(model: nn.Module, cfg: Speed) -> Step:
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
    "higher": Library(_higher, peer=True),
    "torchopt": Library(_torchopt, peer=True),
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


def _ratio(r: pd.Series) -> str:
    return f"{r.vs_fastest_peer:.2f}x [{r.vs_fastest_peer_lo:.2f}, {r.vs_fastest_peer_hi:.2f}]"


def _per_n(df: pd.DataFrame, cell: Callable[[pd.Series], str], label: str) -> pd.DataFrame:
    """library x N table of ``cell(row)``, ``—`` where a library does not run at that N."""
    out = pd.DataFrame(index=list(dict.fromkeys(df.library)))
    out["family"] = df.groupby("library", sort=False).family.first().map(FAMILIES)
    for n, at in df.groupby("steps"):
        out[f"N={n}{label}"] = at.set_index("library").apply(cell, axis=1)
    return out.fillna("—")


def speed_table(df: pd.DataFrame) -> str:
    """Seconds per meta-iteration and the paired ratio to the fastest peer, per N, and the
    largest disagreement with the family's reference."""
    out = _per_n(df, lambda r: f"{r.s_per_iteration:.3f} s · {_ratio(r)}", "")
    worst = df.groupby("library", sort=False).grad_rel_l2.max().map("{:.1e}".format)
    out["rel. L2 vs reference"] = worst
    return out.to_markdown()


def work_table(df: pd.DataFrame) -> str:
    """Operations dispatched and peak memory of one meta-iteration, per N."""
    return _per_n(df, lambda r: f"{int(r.aten_ops):,} ops · {r.peak_mib:.0f} MiB", "").to_markdown()


def verdicts(df: pd.DataFrame, target: float = 1.05) -> list[str]:
    """Per family and N, effmaml's reference row against the fastest peer, in words, with
    the work each dispatches (and, for MAML, the hand-written loop's: the floor)."""
    lines = []
    for family, ref in REFERENCE.items():
        for _, r in df[(df.library == ref)].sort_values("steps").iterrows():
            within = "within" if r.vs_fastest_peer <= target else "**over**"
            tell = (
                "this run cannot tell them apart"
                if r.vs_fastest_peer_lo <= 1.0 <= r.vs_fastest_peer_hi
                else ("faster" if r.vs_fastest_peer_hi < 1.0 else "slower")
            )
            at = df[df.steps == r.steps].set_index("library").aten_ops
            ops = f"{int(r.aten_ops):,} ops against {r.fastest_peer}'s {int(at[r.fastest_peer]):,}"
            if family == "maml" and "torch.func loop" in at and r.fastest_peer != "torch.func loop":
                ops += f" and the torch.func loop's {int(at['torch.func loop']):,}"
            lines.append(
                f"- {FAMILIES[family]} N={r.steps}: {ref} / {r.fastest_peer} = {_ratio(r)} "
                f"({100 * r.ci_coverage:.0f}% interval): {within} {target:.2f}x; {tell}. "
                f"{ops}."
            )
    return lines


def _setting(df: pd.DataFrame, cfg: Speed) -> str:
    """What ran: the families present, and the peers that ran beside effmaml."""
    parts = []
    for family, what in (
        ("maml", f"MAML: inner SGD {cfg.lr}, second order"),
        (
            "imaml",
            f"iMAML: inner SGD {cfg.imaml_lr} on the proximal objective, λ = "
            f"{cfg.imaml_lam}, {cfg.cg_steps} CG steps, damping {cfg.cg_damping}, TorchOpt's "
            "implicit differentiation solving the same linear system",
        ),
    ):
        ran = list(dict.fromkeys(df[df.family == family].library))
        if ran:
            parts.append(f"{what} ({', '.join(ran)})")
    return "; ".join(parts)


def summary(df: pd.DataFrame, cfg: Speed, seconds: float) -> str:
    """The summary.md text: the speed table, the verdicts, the work table."""
    r = df.iloc[0]
    ran = list(dict.fromkeys(df.library))
    who = "every library" if set(ran) == set(LIBRARIES) else " and ".join(ran)
    lines = [
        f"# fewshot-speed: the daily workload, {who} side by side",
        "",
        f"Conv-4 ({cfg.width} filters) on 1x{cfg.image}x{cfg.image}, {cfg.n_way}-way "
        f"{cfg.k_shot}-shot with {cfg.k_query} queries per class, meta-batch "
        f"{cfg.meta_batch}, {cfg.dtype}. {_setting(df, cfg)}. Each cell: seconds per "
        f"meta-iteration (median of {cfg.rounds} rounds after a warm-up, the libraries "
        f"alternating within each round) · the median over the odd rounds of the time over "
        f"the fastest peer's in the same round, the fastest chosen on the even rounds "
        f"[{100 * df.ci_coverage.min():.0f}% interval, distribution-free]. {r.device}, "
        f"torch {r.torch}, {r.threads} threads; {seconds / 60:.1f} minutes.",
        "",
        speed_table(df),
        "",
        *(
            [
                "iMAML is not run at N = 1: one step does not reach the inner solution its "
                "gradient is taken at; there the Hessian is indefinite and the conjugate "
                "gradient stops."
            ]
            if (df.family == "imaml").any()
            else []
        ),
        "rel. L2: the meta-gradient against the family's reference (effmaml naive, effmaml "
        f"implicit) on the same tasks, {cfg.dtype} (equal in float64: "
        "tests/test_fewshot_speed.py).",
        "",
        "## effmaml against the fastest peer",
        "",
        *verdicts(df),
        "",
        "## The work: operations dispatched and peak memory of one meta-iteration",
        "",
        work_table(df),
        "",
        "Operations: every ATen call, forward and backward (bench.timing.count_ops), a count "
        "no load on the machine changes. Peak: the resident-set growth (CPU) or allocated "
        "peak (CUDA) of one more meta-iteration.",
        "",
    ]
    return "\n".join(lines)


def config_of(df: pd.DataFrame) -> Speed:
    """The :class:`Speed` a ``runs.csv`` was measured with (its columns carry every field)."""
    r = df.iloc[0]
    values = {}
    for f in fields(Speed):
        if f.name in ("steps", "imaml_steps"):  # the column "steps" is each row's N
            family = "imaml" if f.name == "imaml_steps" else "maml"
            values[f.name] = tuple(sorted(int(n) for n in set(df[df.family == family].steps)))
        else:
            values[f.name] = type(getattr(Speed, f.name))(r[f.name])
    return Speed(**values)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.fewshot_speed", description=__doc__)
    ap.add_argument("--meta-batch", type=int, help="default 32 on CUDA, 8 on CPU")
    ap.add_argument(
        "--rounds", type=int, default=Speed.rounds, help="at least 2 (even: choose, odd: measure)"
    )
    ap.add_argument("--steps", default="1,5,10", help="N of the MAML family")
    ap.add_argument("--imaml-steps", default="5,10", help="N of the iMAML family")
    ap.add_argument(
        "--libraries",
        default=",".join(LIBRARIES),
        help=f"a comma-separated subset of: {', '.join(LIBRARIES)}",
    )
    ap.add_argument("--out", default="results/fewshot-speed")
    ap.add_argument(
        "--report",
        metavar="DIR",
        help="run nothing: rewrite DIR/summary.md from DIR/runs.csv (after the summary's "
        "format changed)",
    )
    a = ap.parse_args(argv)
    if a.report:
        out = Path(a.report)
        df = pd.read_csv(out / "runs.csv")
        if "run_s" not in df:
            ap.error(f"{out}/runs.csv has no run_s column (the run's seconds); run it again")
        (out / "summary.md").write_text(summary(df, config_of(df), float(df.run_s.iloc[0])))
        print((out / "summary.md").read_text())
        return
    libraries = tuple(a.libraries.split(","))
    unknown = [lib for lib in libraries if lib not in LIBRARIES]
    if unknown:
        ap.error(f"unknown libraries {unknown}; known: {', '.join(LIBRARIES)}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = Speed(
        rounds=a.rounds,
        steps=tuple(int(s) for s in a.steps.split(",") if s),
        imaml_steps=tuple(int(s) for s in a.imaml_steps.split(",") if s),
    )
    cfg = replace(cfg, meta_batch=a.meta_batch or (32 if device.type == "cuda" else 8))
    t0 = time.perf_counter()
    df = run(cfg, device, libraries)
    df["run_s"] = time.perf_counter() - t0
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / "runs.csv", index=False)
    (out / "summary.md").write_text(summary(df, cfg, float(df.run_s.iloc[0])))
    print((out / "summary.md").read_text())


if __name__ == "__main__":
    main()
