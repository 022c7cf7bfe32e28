"""The few-shot reports: runs.csv, per-episode values, summary.md and the plots."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from ..env import device_name
from ..intervals import format_mean_t95, mean_t95
from .problems import METHODS, Problem

__all__ = ["PUBLISHED", "describe", "write", "write_horizon"]

PUBLISHED = [
    ("Omniglot 5-way 1-shot", "MAML", "98.7 ± 0.4", "Finn et al. 2017"),
    ("Omniglot 5-way 1-shot", "first-order MAML", "98.3 ± 0.5", "Finn et al. 2017"),
    (
        "Omniglot 5-way 1-shot",
        "iMAML, gradient-descent inner loop",
        "99.16 ± 0.35",
        "Rajeswaran et al. 2019",
    ),
    (
        "Omniglot 5-way 1-shot",
        "iMAML, Hessian-free inner loop",
        "99.50 ± 0.26",
        "Rajeswaran et al. 2019",
    ),
    ("Omniglot 5-way 1-shot", "MAML++", "99.47 ± 0.05", "Antoniou et al. 2019"),
    ("Omniglot 5-way 5-shot", "MAML", "99.9 ± 0.1", "Finn et al. 2017"),
    ("Omniglot 5-way 5-shot", "MAML++", "99.93 ± 0.02", "Antoniou et al. 2019"),
    ("miniImageNet 5-way 1-shot", "MAML", "48.70 ± 1.84", "Finn et al. 2017"),
    ("miniImageNet 5-way 1-shot", "first-order MAML", "48.07 ± 1.75", "Finn et al. 2017"),
    ("miniImageNet 5-way 1-shot", "MAML++", "52.15 ± 0.26", "Antoniou et al. 2019"),
    ("miniImageNet 5-way 5-shot", "MAML", "63.11 ± 0.92", "Finn et al. 2017"),
    ("miniImageNet 5-way 5-shot", "MAML++", "68.32 ± 0.44", "Antoniou et al. 2019"),
]


def write(
    out: Path,
    runs: pd.DataFrame,
    values: pd.DataFrame,
    lams: dict,
    problems,
    seeds,
    seconds: float,
    raw: bool = True,
) -> None:
    """runs.csv and values.csv.gz (with ``raw``: what was measured), summary.md and the
    plot."""
    out.mkdir(parents=True, exist_ok=True)
    if raw:
        runs.to_csv(out / "runs.csv", index=False)
        values.to_csv(out / "values.csv.gz", index=False)
    lines = [
        f"Test episodes per seed: {int(runs.tasks.iloc[0])}, the same for every method; seeds "
        f"{', '.join(map(str, seeds))}; mean ± its 95% Student t interval over seeds × episodes. "
        f"{seconds / 60:.1f} minutes on {_machine()}.",
        "",
    ]
    for p in problems:
        sub = values[values.problem == p.name]
        scale = 100.0 if p.kind == "image" else 1.0
        unit = "accuracy %" if p.kind == "image" else "query MSE"
        lines += [f"### {p.name}: {describe(p)}", ""]
        own = sub[sub.adapt == "own"].groupby("method", sort=False).value
        ran = set(sub.method)
        how = [f"MAML, first order: {p.inner_steps} SGD step(s) of {p.inner_lr}"]
        if "mamlpp" in ran:
            r = p.mamlpp
            how.append(
                f"MAML++: {r.steps} steps with its learned per-layer, per-step rates "
                f"(from {r.lr}), per-step BatchNorm; trained with the multi-step loss "
                f"annealed over the first {r.msl_fraction:.0%} of the outer steps, first "
                f"order for the first {r.first_order_fraction:.0%}, the outer rate "
                f"cosine-annealed to {r.min_outer_lr:g}"
            )
        if "implicit" in ran:
            how.append(
                f"iMAML: {p.imaml_steps} steps of {p.imaml_lr} on the proximal objective, "
                f"λ = {lams[p.name]['chosen']}"
            )
        if ran & {"transfer", "random"}:
            how.append(
                f"transfer (head only) and random: {max(p.eval_steps)} steps of {p.inner_lr}"
            )
        lines += [
            f"**{unit} after each method's own adaptation** ({'; '.join(how)})",
            "",
            own.apply(lambda v, s=scale: format_mean_t95(v, s))
            .reindex(list(METHODS))
            .dropna()
            .to_frame(unit)
            .to_markdown(),
            "",
        ]
        curve = sub[sub.adapt != "own"].copy()
        curve["k"] = curve.adapt.astype(int)
        table = (
            curve.pivot_table(
                index="method",
                columns="k",
                values="value",
                aggfunc=lambda v, s=scale: format_mean_t95(v, s),
            )
            .reindex(list(METHODS))
            .dropna(how="all")
        )
        table.columns = [f"k={k}" for k in table.columns]
        lines += [
            f"{unit} after k plain SGD steps on the support set (— where a method cannot run k):",
            "",
            table.fillna("—").to_markdown(),
            "",
        ]
        cost = runs[(runs.problem == p.name) & (runs.adapt == "own")]
        cost = cost.groupby("method", sort=False)[["train_s", "s_per_iteration", "peak_mib"]]
        lines += [
            "Training cost per seed (mean; one worker process, 1 thread): "
            + "; ".join(
                f"{m} {r.train_s:.0f} s ({r.s_per_iteration:.2f} s per meta-iteration), "
                f"{r.peak_mib:.0f} MiB peak"
                for m, r in cost.mean().iterrows()
            )
            + ".",
            "",
        ]
        if lams[p.name]["scores"]:
            lines += [
                "iMAML's λ on the validation classes (a quarter budget, seed 0): "
                + ", ".join(f"λ={lam}: {100 * acc:.1f}%" for lam, acc in lams[p.name]["scores"])
                + ".",
                "",
            ]
    lines += [
        "### Published (Conv-4, full budgets)",
        "",
        pd.DataFrame(PUBLISHED, columns=["data", "method", "accuracy %", "source"]).to_markdown(
            index=False
        ),
        "",
        "**Not comparable in absolute terms.** Ours are on the embedded procedural "
        "characters unless a problem above names omniglot or miniimagenet, with the "
        "reduced budget stated there (MAML++'s published runs: 64 filters, 100 epochs x "
        "500 iterations x 8 tasks, one query image per class on Omniglot); only the "
        "ordering of the methods carries over.",
        "",
    ]
    (out / "summary.md").write_text("\n".join(lines))
    _plot(out, problems, values)


def describe(p: Problem) -> str:
    if p.kind == "sine":
        return (
            f"sine regression, K=10, MLP 1-40-40-1, {p.iterations} outer steps × "
            f"{p.meta_batch} tasks"
        )
    return (
        f"{p.n_way}-way {p.k_shot}-shot on {p.data}, {p.k_query} queries per class, "
        f"Conv-4 with {p.width} filters (published: 64), {p.iterations} outer steps × "
        f"{p.meta_batch} episodes (published: 60000 × 32), Adam {p.outer_lr}"
    )


def _half_t95(values: pd.Series) -> float:
    return mean_t95(values)[1]


def _machine() -> str:
    return device_name("cpu")


def _plot(out: Path, problems, values: pd.DataFrame) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(problems), figsize=(5.5 * len(problems), 4))
    axes = axes if len(problems) > 1 else [axes]
    for ax, p in zip(axes, problems):
        sub = values[(values.problem == p.name) & (values.adapt != "own")].copy()
        sub["k"] = sub.adapt.astype(int)
        scale = 100.0 if p.kind == "image" else 1.0
        stats = sub.groupby(["method", "k"]).value.agg(mean="mean", ci95=_half_t95)
        for m in METHODS:
            if m in stats.index.get_level_values(0):
                s = stats.loc[m]
                ax.errorbar(
                    s.index,
                    scale * s["mean"],
                    yerr=scale * s["ci95"],
                    marker="o",
                    capsize=3,
                    label=m,
                )
        ax.set_title(f"{p.name}: {p.metric()} vs adaptation steps", fontsize=9)
        ax.set_xlabel("plain SGD steps on the support set")
        ax.set_ylabel("accuracy % (mean, 95% CI)" if p.kind == "image" else "query MSE")
        if p.kind == "sine":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / ("accuracy_vs_steps.png"), dpi=110)
    plt.close(fig)


def write_horizon(
    out: Path,
    runs: pd.DataFrame,
    values: pd.DataFrame,
    problem: Problem,
    lams: dict,
    seeds,
    seconds: float,
    raw: bool = True,
) -> None:
    """The horizon experiment's table (accuracy and cost against N) and plot (and with
    ``raw``, runs.csv and values.csv.gz)."""
    out.mkdir(parents=True, exist_ok=True)
    if raw:
        runs.to_csv(out / "runs.csv", index=False)
        values.to_csv(out / "values.csv.gz", index=False)
    own = values[values.adapt == "own"]
    acc = own.groupby(["method", "inner_steps"]).value.agg(mean="mean", ci95=_half_t95)
    cost = (
        runs[runs.adapt == "own"]
        .groupby(["method", "inner_steps"])
        .agg(
            s_per_iteration=("s_per_iteration", "mean"),
            peak_mib=("peak_mib", "mean"),
            predicted_mib=("predicted_peak_mib", "mean"),
            schedule=("schedule", "first"),
        )
    )
    table = acc.join(cost).reset_index()
    table["accuracy %"] = [
        f"{100 * m:.2f} ± {100 * c:.2f}" for m, c in zip(table["mean"], table["ci95"])
    ]
    table = table[
        [
            "method",
            "inner_steps",
            "accuracy %",
            "s_per_iteration",
            "peak_mib",
            "predicted_mib",
            "schedule",
        ]
    ]
    table.columns = [
        "method",
        "N (train = test)",
        "accuracy %",
        "s / meta-iteration",
        "peak MiB (training)",
        "predicted MiB (one meta-gradient)",
        "schedule",
    ]
    lines = [
        f"# fewshot-horizon: {describe(problem)}",
        "",
        f"MAML ({problem.strategy} under a {problem.memory_budget} budget, grad-of-grad "
        f"clipping {problem.clip}) and iMAML (λ = {lams[problem.name]['chosen']}, chosen on "
        f"the validation classes) with N inner SGD steps of {problem.inner_lr} at train and "
        f"test; seeds "
        f"{', '.join(map(str, seeds))}, {int(runs.tasks.iloc[0])} test episodes each; "
        f"{seconds / 60:.1f} minutes on {_machine()}.",
        "",
        table.to_markdown(index=False, floatfmt=".3g").replace("nan", "—"),
        "",
        "Peak MiB (training): the worker's resident-set growth over the whole meta-training "
        f"(a meta-batch of {problem.meta_batch} tasks, the outer Adam, the episodes), measured "
        "after handing freed heap back to the system. Predicted MiB: effmaml's model for one "
        "adapt and its query backward, what `memory_budget` bounds and `auto` chose by. "
        "The schedule is what one adapt ran after training.",
        "",
    ]
    (out / "summary.md").write_text("\n".join(lines))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for m, g in acc.reset_index().groupby("method"):
        a1.errorbar(
            g.inner_steps, 100 * g["mean"], yerr=100 * g["ci95"], marker="o", capsize=3, label=m
        )
    for m, g in cost.reset_index().groupby("method"):
        a2.plot(g.inner_steps, g.s_per_iteration, marker="o", label=m)
    for ax, ylabel in ((a1, "test accuracy % (95% CI)"), (a2, "seconds per meta-iteration")):
        ax.set_xscale("log")
        ax.set_xlabel("inner steps N at train and test (log)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{problem.name}: what long inner horizons buy", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_N.png", dpi=110)
    plt.close(fig)
