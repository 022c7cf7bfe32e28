"""``python -m bench.fewshot`` (``make fewshot``): does each method actually meta-learn?

Two problems, the same tasks and budget for every method:

* ``sine``: Finn et al.'s regression (amplitude U[0.1, 5], phase U[0, π], x U[−5, 5]),
  K=10 support and 10 query points, MLP 1-40-40-1 (ReLU), MSE.
* ``linear``: binary classification with a single-layer sigmoid network, 10-D inputs,
  task boundaries w = w₀ + noise around a common w₀, 10-shot support, 20 query points.

Methods: ``maml`` (exact second order; strategy ``naive``, the cheapest on these small
nets), ``first_order``, ``implicit`` (iMAML), ``transfer`` (one network trained on all
tasks pooled, then fine-tuned) and ``random`` (fine-tuned from a random
initialisation). The meta-learners train with :class:`effmaml.MetaTrainer` (meta-batch
10, Adam 1e-3, 5 inner SGD steps); ``transfer`` trains with the same optimizer on the
same task stream. Evaluation: the same held-out tasks for everyone, plain SGD fine-tuning
on the support set for 0, 1, 5 and 10 steps, query loss (and accuracy) per task; mean
and 95% CI over tasks, for 3 meta-training seeds. Writes ``results/fewshot/`` (runs.csv,
loss_vs_steps.png, summary.md).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

import effmaml

from .tasks import LinearClassTasks, SineTasks, bce_loss, mlp, mse_loss, sigmoid_net

__all__ = ["PROBLEMS", "Problem", "evaluate", "main", "train_method"]

METHODS = ("maml", "first_order", "implicit", "transfer", "random")
EVAL_STEPS = (0, 1, 5, 10)


@dataclass(frozen=True)
class Problem:
    """A few-shot problem and its fixed budget."""

    name: str
    inner_lr: float
    inner_steps: int
    iterations: int
    meta_batch: int = 10
    outer_lr: float = 1e-3
    eval_tasks: int = 200
    lam: float = 2.0  # iMAML's λ

    def tasks(self, meta_batch: int):
        if self.name == "sine":
            return SineTasks(meta_batch)
        return LinearClassTasks(meta_batch)

    def model(self):
        return mlp() if self.name == "sine" else sigmoid_net()

    def loss(self):
        return mse_loss if self.name == "sine" else bce_loss


PROBLEMS = {
    "sine": Problem("sine", inner_lr=0.01, inner_steps=5, iterations=2000),
    "linear": Problem("linear", inner_lr=0.3, inner_steps=5, iterations=300),
}


def train_method(problem: Problem, method: str, seed: int, iterations: int | None = None):
    """Train ``method`` on ``problem`` from seed ``seed``; return the initial model."""
    iterations = problem.iterations if iterations is None else iterations
    torch.manual_seed(seed)
    model = problem.model()
    loss = problem.loss()
    if method == "random":
        return model
    opt = torch.optim.Adam(model.parameters(), lr=problem.outer_lr)
    tasks = problem.tasks(problem.meta_batch)
    if method == "transfer":
        g = torch.Generator().manual_seed(10_000 + seed)
        for _ in range(iterations):
            opt.zero_grad()
            total = 0.0
            for (xs, ys), (xq, yq) in tasks(g):
                pooled = (torch.cat([xs, xq]), torch.cat([ys, yq]))
                total = total + loss(model, pooled)
            (total / problem.meta_batch).backward()
            opt.step()
        return model
    strategy = {"maml": "naive", "first_order": "first_order", "implicit": "implicit"}[method]
    kw = {"lam": problem.lam, "cg_steps": 5, "cg_damping": 0.1} if method == "implicit" else {}
    maml = effmaml.MAML(model, loss, effmaml.SGD(problem.inner_lr), strategy, **kw)
    trainer = effmaml.MetaTrainer(
        maml,
        opt,
        tasks,
        meta_batch=problem.meta_batch,
        inner_steps=problem.inner_steps,
        seed=10_000 + seed,
        progress=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # CG's non-convexity notes on ReLU nets
        trainer.train(iterations)
    return model


def evaluate(problem: Problem, model, n_tasks: int | None = None, eval_seed: int = 777):
    """Per held-out task and k in EVAL_STEPS: query loss (and accuracy) after k SGD steps."""
    n_tasks = problem.eval_tasks if n_tasks is None else n_tasks
    loss = problem.loss()
    tasks = problem.tasks(1).sample(torch.Generator().manual_seed(eval_seed), n_tasks)
    out = {k: {"loss": [], "acc": []} for k in EVAL_STEPS}
    tuner = effmaml.MAML(model, loss, effmaml.SGD(problem.inner_lr), "first_order")
    for support, (xq, yq) in tasks:
        for k in EVAL_STEPS:
            f = model if k == 0 else tuner.adapt(support, steps=k)
            with torch.no_grad():
                pred = f(xq)
                out[k]["loss"].append(float(loss(lambda x, p=pred: p, (xq, yq))))
                if problem.name == "linear":
                    acc = ((pred.squeeze(-1) > 0).to(yq.dtype) == yq).float().mean()
                    out[k]["acc"].append(float(acc))
    return out


def _job(args):
    name, method, seed, iterations, n_tasks = args
    torch.set_num_threads(1)
    problem = PROBLEMS[name]
    t0 = time.perf_counter()
    model = train_method(problem, method, seed, iterations)
    train_s = time.perf_counter() - t0
    res = evaluate(problem, model, n_tasks)
    rows = []
    for k, v in res.items():
        row = {
            "problem": name,
            "method": method,
            "seed": seed,
            "adapt_steps": k,
            "tasks": len(v["loss"]),
            "query_loss": float(pd.Series(v["loss"]).mean()),
            "query_loss_ci95": _ci95(v["loss"]),
            "accuracy": float(pd.Series(v["acc"]).mean()) if v["acc"] else "",
            "accuracy_ci95": _ci95(v["acc"]) if v["acc"] else "",
            "meta_iterations": iterations if method != "random" else 0,
            "train_s": round(train_s, 2),
        }
        rows.append((row, v))
    return rows


def _ci95(values) -> float:
    """Half-width of the 95% confidence interval of the mean: 1.96·sd/√n."""
    values = pd.Series(values, dtype=float)
    return float(1.96 * values.std(ddof=1) / len(values) ** 0.5) if len(values) > 1 else 0.0


COLUMNS = [
    "problem",
    "method",
    "seed",
    "adapt_steps",
    "tasks",
    "query_loss",
    "query_loss_ci95",
    "accuracy",
    "accuracy_ci95",
    "meta_iterations",
    "train_s",
]


def run(
    problems=("sine", "linear"),
    seeds=(0, 1, 2),
    iterations: dict | None = None,
    n_tasks: int | None = None,
    workers: int = 2,
):
    """Train and evaluate every (problem, method, seed); return rows and pooled values."""
    jobs = [
        (p, m, s, (iterations or {}).get(p, PROBLEMS[p].iterations), n_tasks)
        for p in problems
        for s in seeds
        for m in METHODS
    ]
    if workers > 1:
        with mp.get_context("spawn").Pool(workers) as pool:
            results = pool.map(_job, jobs, chunksize=1)
    else:
        results = [_job(j) for j in jobs]
    rows, pooled = [], {}
    for res in results:
        for row, values in res:
            rows.append(row)
            key = (row["problem"], row["method"], row["adapt_steps"])
            acc = pooled.setdefault(key, {"loss": [], "acc": []})
            acc["loss"] += values["loss"]
            acc["acc"] += values["acc"]
    return rows, pooled


def _long(pooled) -> pd.DataFrame:
    """Per held-out task values, one row each: problem, method, adapt_steps, metric, value."""
    records = [
        (p, m, k, metric, v)
        for (p, m, k), values in pooled.items()
        for metric, key in (("loss", "loss"), ("accuracy", "acc"))
        for v in values[key]
    ]
    return pd.DataFrame.from_records(
        records, columns=["problem", "method", "adapt_steps", "metric", "value"]
    )


def _mean_ci(values: pd.Series) -> str:
    """``mean ± CI95`` over the pooled tasks."""
    return f"{values.mean():.3f} ± {_ci95(values):.3f}"


def write(out: Path, rows, pooled, seeds) -> None:
    out.mkdir(parents=True, exist_ok=True)
    runs = pd.DataFrame(rows, columns=COLUMNS)
    runs.to_csv(out / "runs.csv", index=False)
    long = _long(pooled)
    problems = [p for p in PROBLEMS if p in set(runs.problem)]
    budget = runs.groupby("problem").meta_iterations.max()
    lines = [
        f"Held-out tasks: {rows[0]['tasks']} per seed, the same for every method; seeds "
        f"{', '.join(map(str, seeds))} (pooled: mean ± 95% CI over seeds × tasks). Budget: "
        + "; ".join(
            f"{p} {budget[p]} meta-iterations × {PROBLEMS[p].meta_batch} tasks" for p in problems
        )
        + ".",
        "",
    ]
    for p in problems:
        for metric in ("loss", "accuracy"):
            sub = long[(long.problem == p) & (long.metric == metric)]
            if sub.empty:
                continue
            table = sub.pivot_table(
                index="method", columns="adapt_steps", values="value", aggfunc=_mean_ci
            )
            table = table.reindex(METHODS).rename(columns=lambda k: f"k={k}")
            lines += [f"**{p}: query {metric} after k adaptation steps**", ""]
            lines += [table.to_markdown(), ""]
        last = runs[(runs.problem == p) & (runs.adapt_steps == EVAL_STEPS[-1])]
        per_seed = [
            f"{m} ({', '.join(f'seed {r.seed}: {r.query_loss:.3f}' for r in g.itertuples())})"
            for m, g in last.groupby("method", sort=False)
        ]
        lines += [
            f"Per seed, query loss after k={EVAL_STEPS[-1]}: " + "; ".join(per_seed) + ".",
            "",
        ]
    (out / "summary.md").write_text("\n".join(lines))
    _plot(out, problems, long)


def _plot(out: Path, problems, long: pd.DataFrame) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(problems), figsize=(5.5 * len(problems), 4))
    axes = axes if len(problems) > 1 else [axes]
    loss = long[long.metric == "loss"]
    stats = loss.groupby(["problem", "method", "adapt_steps"]).value.agg(["mean", _ci95])
    for ax, p in zip(axes, problems):
        for m in METHODS:
            s = stats.loc[(p, m)]
            ax.errorbar(s.index, s["mean"], yerr=s["_ci95"], marker="o", capsize=3, label=m)
        ax.set_title(f"{p}: query loss vs adaptation steps")
        ax.set_xlabel("SGD adaptation steps on the support set")
        ax.set_ylabel("query loss (mean, 95% CI)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "loss_vs_steps.png", dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.fewshot", description=__doc__)
    ap.add_argument("--out", default="results/fewshot")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--problems", default="sine,linear")
    ap.add_argument("--workers", type=int, default=2)
    a = ap.parse_args(argv)
    seeds = tuple(int(s) for s in a.seeds.split(","))
    t0 = time.perf_counter()
    rows, pooled = run(tuple(a.problems.split(",")), seeds, workers=a.workers)
    write(Path(a.out), rows, pooled, seeds)
    print((Path(a.out) / "summary.md").read_text())
    print(f"fewshot: {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
