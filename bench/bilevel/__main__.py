"""``make bilevel``: what exact long-horizon hypergradients buy, on real data.

``python -m bench.bilevel [--quick] [--out DIR]`` runs the three problems (dataset
distillation on scikit-learn's digits, a learning-rate schedule and data hyper-cleaning on
MNIST-1D) and the memory table, and writes ``DIR/{distill,schedule,hyperclean,memory}.csv``,
``summary.md`` and the plots (default ``results/bilevel``). ``--quick``: every problem at
a tiny size (the tests' run).
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..env import environment, timestamp
from ..intervals import mean_t95
from ..isolated import run_child
from . import distill, hyperclean, schedule
from .common import digits, mnist1d
from .report import plot_images, plot_schedule, plot_weights, summary

__all__ = ["Settings", "main"]


@dataclass(frozen=True)
class Settings:
    """How much of each problem runs (the full run, or the tests' tiny one)."""

    horizons: tuple[int, ...] = (10, 100, 300)
    seeds: tuple[int, ...] = (0, 1, 2)
    distill_outer: tuple[tuple[int, int], ...] = ((10, 100), (100, 60), (300, 40))
    draws: int = 5
    schedule_outer: int = 60
    schedule_steps: int = schedule.STEPS
    schedule_seeds: tuple[int, ...] = (900, 901, 902)
    clean_outer: int = 80
    clean_steps: int = hyperclean.STEPS
    clean_train: int = hyperclean.TRAIN
    memory: tuple[str, ...] = ("naive", "checkpoint", "revolve")


QUICK = Settings(
    horizons=(5,),
    seeds=(0,),
    distill_outer=((5, 30),),
    draws=2,
    schedule_outer=8,
    schedule_steps=20,
    schedule_seeds=(900,),
    clean_outer=15,
    clean_steps=30,
    clean_train=200,
    memory=("naive", "checkpoint"),
)


def run_distill(cfg: Settings) -> tuple[list[dict], dict]:
    split = digits()
    outer = dict(cfg.distill_outer)
    rows, images = [], {}
    for n in cfg.horizons:
        for init in ("fixed", "random"):
            accs = []
            for seed in cfg.seeds:
                d = distill.distill(split, n, init, outer[n], seed=seed)
                accs.append(distill.score(split, d.images, d.labels, d.rates, init, seed))
                if seed == cfg.seeds[0]:
                    images[(n, init)] = d.images
            base = distill.baselines(split, n, init, cfg.seeds[0], draws=cfg.draws)
            mean, half = mean_t95(accs)
            row = {"steps": n, "init": init, "outer_steps": outer[n], "distilled": mean}
            rows.append({**row, "distilled_ci": half, "seeds": len(accs), **base})
            print(rows[-1], flush=True)
    return rows, images


def run_schedule(cfg: Settings) -> tuple[list[dict], dict]:
    split = mnist1d()
    out: dict = {}
    starts = {}
    for start in (1.5, 0.15):
        learned = schedule.learn(split, start, cfg.schedule_outer, cfg.schedule_steps)
        starts[start] = [h[0] for h in learned.history]
    final = sum(v[-1] for v in starts.values()) / 2
    per_step = schedule.learn(split, [final] * cfg.schedule_steps, cfg.schedule_outer,
                              cfg.schedule_steps)  # fmt: skip
    grid = schedule.grid(split, cfg.schedule_seeds)
    best = max(grid, key=grid.__getitem__)
    seeds = [s + 50 for s in cfg.schedule_seeds]

    def acc(rates: list[float]) -> tuple[float, float]:
        return mean_t95(schedule.test_accuracy(split, rates, seeds))

    n = cfg.schedule_steps
    named = {f"learned constant (from {s}): {h[-1]:.3f}": [h[-1]] * n for s, h in starts.items()}
    named[f"best grid constant: {best}"] = [best] * n
    named[f"learned per-step ({n} rates)"] = per_step.rates
    rows = [{"schedule": k, "acc": acc(v)} for k, v in named.items()]
    out = {"starts": starts, "per_step": per_step.rates, "grid": grid, "best": best}
    flat = [{"schedule": r["schedule"], "test_acc": r["acc"][0], "ci": r["acc"][1]} for r in rows]
    for r in flat:
        print(r, flush=True)
    return flat, out


def run_clean(cfg: Settings) -> tuple[dict, torch.Tensor, hyperclean.Noisy]:
    split = mnist1d()
    noisy = hyperclean.make_noisy(split, n=cfg.clean_train)
    weights, losses = hyperclean.clean(split, noisy, cfg.clean_outer, steps=cfg.clean_steps)
    acc = hyperclean.scores(split, noisy, weights, [910, 911, 912])
    det = hyperclean.detection(noisy, weights)
    row: dict = {f"{k}_acc": mean_t95(v)[0] for k, v in acc.items()}
    row.update({f"{k}_ci": mean_t95(v)[1] for k, v in acc.items()})
    row.update(det, outer_steps=cfg.clean_outer, val_loss_first=losses[0], val_loss_last=losses[-1])
    print(row, flush=True)
    return row, weights, noisy


def run_memory(cfg: Settings, out: Path) -> list[dict]:
    """One outer step of distillation per (N, strategy), each in a fresh process: peak
    resident memory, the cost model's prediction, and the meta-gradient against naive's."""
    rows = []
    for n in cfg.horizons:
        ref = None
        for strategy in cfg.memory:
            path = out / f".grad_{n}_{strategy}.pt"
            args = ["--child", str(n), strategy, str(path)]
            r = run_child("bench.bilevel", args, memory=True, check=True)
            g = torch.load(path)
            path.unlink()
            ref = g if ref is None else ref
            rel = float((g - ref).norm() / ref.norm())
            rows.append({"steps": n, "strategy": r["label"], "peak": r["peak"],
                         "predicted": r["predicted"], "rel_l2_vs_naive": rel})  # fmt: skip
            print(rows[-1], flush=True)
    return rows


def _child(n: int, strategy: str, path: str) -> None:
    from effmaml.measure import PeakMemory

    split = digits()
    kw = {"slots": 4} if strategy == "revolve" else {}
    probe = distill.meta_gradient(split, n, strategy, **kw)  # warm-up: the probe, caches
    del probe
    with PeakMemory("cpu") as peak:
        g = distill.meta_gradient(split, n, strategy, **kw)
    pred, label = _predicted(split, n, strategy, kw)
    torch.save(g, path)
    print(json.dumps({"peak": peak.peak, "predicted": pred, "label": label}))


def _predicted(split, n: int, strategy: str, kw: dict) -> tuple[int, str]:
    import effmaml

    from .common import ce

    model = distill._model(0)
    images = torch.zeros(10, 64, requires_grad=True)
    rates = torch.full((n,), 0.05, requires_grad=True)
    maml = effmaml.MAML(model, ce, effmaml.SGD(rates, per_step=True), strategy, **kw)
    batch = (images, torch.arange(10))
    plan = maml.strategy.plan(maml.problem(batch, n)[0], maml.measure(batch))
    label, pred = plan.label, plan.prediction
    assert pred is not None
    return pred.peak_bytes, label


def _write(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.bilevel", description=__doc__)
    ap.add_argument("--quick", action="store_true", help="every problem at a tiny size")
    ap.add_argument("--out", default="results/bilevel")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    if args.child:
        _child(int(args.child[0]), args.child[1], args.child[2])
        return
    cfg = QUICK if args.quick else Settings()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    d_rows, images = run_distill(cfg)
    s_rows, s_out = run_schedule(cfg)
    c_row, weights, noisy = run_clean(cfg)
    m_rows = run_memory(cfg, out)
    _write(out / "distill.csv", d_rows)
    _write(out / "schedule.csv", s_rows)
    _write(out / "hyperclean.csv", [c_row])
    _write(out / "memory.csv", m_rows)
    plot_images(images, out / "distilled.png")
    plot_schedule(s_out, out / "schedule.png")
    plot_weights(weights, noisy.flipped, out / "weights.png")
    env = {**environment("cpu"), "date": timestamp(), "minutes": (time.time() - start) / 60}
    (out / "summary.md").write_text(summary(d_rows, s_rows, s_out, c_row, m_rows, env, cfg))
    print(f"wrote {out} in {env['minutes']:.1f} minutes")


if __name__ == "__main__":
    main()
