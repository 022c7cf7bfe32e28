"""The real-Omniglot report: results.csv (a row per method, set, seed and score), values.csv
(every run and episode), summary.md with the published figures beside, error_by_method.png."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from ..env import device_name
from ..fewshot.evaluation import ci95, mean_ci
from ..fewshot.problems import METHODS, Problem

__all__ = ["PUBLISHED", "values_frame", "write"]

# Lake, Salakhutdinov & Tenenbaum, "Human-level concept learning through probabilistic
# program induction", Science 350(6266), 2015: the 20 runs, error %, background set of 30
# alphabets (not the minimal sets).
PUBLISHED = [
    ("people", "4.5", "Lake et al. 2015 (Science)"),
    ("Bayesian Program Learning (BPL)", "3.3", "Lake et al. 2015 (Science), 30 alphabets"),
]


def values_frame(results, baselines: dict[str, list[float]]) -> pd.DataFrame:
    """One row per score: ``(set, method, seed, score, index, value)``; runs in error %,
    episodes in accuracy %. Baselines have no set (they learn nothing) and seed ``""``."""
    rows = []
    for name, method, seed, _cost, scores in results:
        for score, vals in scores.items():
            scale = 1.0 if score == "runs" else 100.0
            rows += [
                {"set": name, "method": method, "seed": seed, "score": score, "index": i,
                 "value": scale * v}
                for i, v in enumerate(vals)
            ]  # fmt: skip
    for method, vals in baselines.items():
        rows += [
            {"set": "", "method": method, "seed": "", "score": "runs", "index": i, "value": v}
            for i, v in enumerate(vals)
        ]
    return pd.DataFrame(rows)


def _cell(values: pd.Series) -> str:
    return mean_ci(values, digits=1)


def write(
    out: Path,
    results,
    baselines: dict[str, list[float]],
    lams: dict,
    problems: list[Problem],
    seeds,
    seconds: float,
) -> pd.DataFrame:
    """Write the report under ``out``; returns the per-value frame."""
    out.mkdir(parents=True, exist_ok=True)
    values = values_frame(results, baselines)
    values.to_csv(out / "values.csv", index=False)
    table = (
        values.groupby(["set", "method", "seed", "score"], sort=False)
        .value.agg(["mean", "count"])
        .reset_index()
    )
    costs = pd.DataFrame([{"set": n, "method": m, "seed": s, **c} for n, m, s, c, _ in results])
    table = table.merge(costs, on=["set", "method", "seed"], how="left")
    table.to_csv(out / "results.csv", index=False)
    ran = {m for _, m, _, _, _ in results}
    methods = [m for m in METHODS if m in ran]
    sets = [p.name for p in problems]
    p = problems[0]
    lines = [
        "# Real Omniglot: Lake et al.'s one-shot task, meta-trained on a minimal background set",
        "",
        f"Meta-training: {p.n_way}-way {p.k_shot}-shot episodes ({p.k_query} "
        f"{'query' if p.k_query == 1 else 'queries'} per class) on the training characters "
        f"of one minimal set (quarter turns as classes), "
        f"Conv-4 with {p.width} filters, {p.iterations} outer steps of {p.meta_batch} episodes "
        f"(Adam {p.outer_lr:g}); MAML and first order: {p.inner_steps} inner SGD step of "
        f"{p.inner_lr:g}; iMAML: {p.imaml_steps} steps of {p.imaml_lr:g}, λ chosen on the "
        f"validation characters ("
        + "; ".join(f"{k}: {v['chosen']:g}" for k, v in lams.items())
        + f"); MAML++: {p.mamlpp.steps} steps; transfer and random: "
        f"{max(p.eval_steps)} SGD steps of {p.inner_lr:g} on the support set's head (transfer) "
        f"or whole network (random). Seeds {', '.join(map(str, seeds))}. "
        f"{seconds / 60:.1f} minutes on {device_name('cpu')}.",
        "",
        "## The 20 runs (20-way within one evaluation alphabet), error % (lower is better)",
        "",
        "Mean over runs × seeds ± 95% interval over runs × seeds. Scored once, after training.",
        "",
        "| method | " + " | ".join(f"trained on {s}" for s in sets) + " |",
        "|---|" + "---|" * len(sets),
    ]
    runs = values[values.score == "runs"]
    for m in methods:
        cells = [_cell(runs[(runs.set == s) & (runs.method == m)].value) for s in sets]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    for m in baselines:
        cell = _cell(runs[runs.method == m].value)
        lines.append(f"| {m} (no training) | " + " | ".join([cell] * len(sets)) + " |")
    lines += ["", "Published, on the same 20 runs (error %):", ""]
    lines += [f"- {who}: {err}% ({src})" for who, err, src in PUBLISHED]
    lines += [
        "",
        "## Held-out characters of the minimal set, 1-shot accuracy % (higher is better)",
        "",
        f"{p.eval_tasks} episodes per seed (15 queries per class), the same for every method; "
        "mean ± 95% interval over episodes × seeds.",
        "",
        "| method | " + " | ".join(f"{s} {w}" for s in sets for w in ("20-way", "5-way")) + " |",
        "|---|" + "---|" * (2 * len(sets)),
    ]
    for m in methods:
        cells = [
            _cell(values[(values.set == s) & (values.method == m) & (values.score == w)].value)
            for s in sets
            for w in ("20-way", "5-way")
        ]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", "Training cost per seed (mean): " + "; ".join(
        f"{m} {costs[costs.method == m].train_s.mean():.0f} s" for m in methods
    ) + "."]  # fmt: skip
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    _plot(out, values, methods, list(baselines), sets)
    return values


def _plot(out: Path, values: pd.DataFrame, methods, baselines, sets) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = values[values.score == "runs"]
    names = [*methods, *baselines]
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(sets)
    for j, s in enumerate(sets):
        means, errs = [], []
        for m in names:
            v = runs[(runs.method == m) & ((runs.set == s) | (runs.set == ""))].value
            means.append(v.mean())
            errs.append(ci95(v))
        xs = [i + (j - (len(sets) - 1) / 2) * width for i in range(len(names))]
        ax.bar(xs, means, width, yerr=errs, capsize=2, label=f"trained on {s}")
    for who, err, _ in PUBLISHED:
        ax.axhline(float(err), ls=":", c="k", lw=0.8)
        ax.text(len(names) - 0.5, float(err), who, fontsize=7, va="bottom", ha="right")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_ylabel("error % on the 20 runs")
    ax.set_title("Omniglot one-shot (Lake et al.'s 20 runs), minimal background sets")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "error_by_method.png", dpi=120)
    plt.close(fig)
