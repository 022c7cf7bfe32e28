"""The real-Omniglot report, written from raw.json alone: results.csv (a row per set,
method and seed), values.csv (every run and episode), curves.csv (validation accuracy at
each checkpoint), summary.md with the budget, the search and the published figures beside,
error_by_method.png and val_error_vs_cpu.png."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from ..intervals import format_mean_t95, mean_t95
from .experiment import CURVE_TASKS, EVAL_QUERIES, METHODS, VAL_QUERIES

__all__ = ["CONTEXT", "PUBLISHED", "curves_frame", "results_frame", "values_frame", "write"]

# Lake, Salakhutdinov & Tenenbaum, "Human-level concept learning through probabilistic
# program induction", Science 350(6266), 2015: the same 20 runs, error %.
PUBLISHED = [
    ("people", "4.5", "Lake et al. 2015 (Science)"),
    ("Bayesian Program Learning (BPL)", "3.3", "Lake et al. 2015 (Science), 30 alphabets"),
]
# 20-way 1-shot accuracy % on held-out characters of the full set (1200 training
# characters of all 50 alphabets, Vinyals et al.'s split), Conv-4 with 64 filters,
# tens of thousands of outer steps: context only, not comparable with a minimal set.
CONTEXT = [
    ("MAML", "95.8 ± 0.3", "Finn et al. 2017"),
    ("iMAML (gradient descent inside)", "94.46 ± 0.42", "Rajeswaran et al. 2019"),
    ("MAML++", "97.65", "Antoniou et al. 2019"),
]
NAMES = {
    "maml": "MAML",
    "mamlpp": "MAML++",
    "first_order": "first-order MAML",
    "implicit": "iMAML",
    "transfer": "transfer",
    "random": "random init",
    "protonet": "ProtoNets",
    "mhd": "MHD, the demo's baseline (no training)",
    "pixel-nn-105": "pixel nearest neighbour, 105x105 (no training)",
    "pixel-nn-28": "pixel nearest neighbour, 28x28 (no training)",
}


def values_frame(jobs: list[dict], baselines: dict[str, list[float]]) -> pd.DataFrame:
    """One row per score: ``(set, method, seed, score, index, value)``; runs in error %,
    episodes in accuracy %. Baselines have no set (they learn nothing) and seed ``""``."""
    rows = []
    for j in jobs:
        for score, vals in j["scores"].items():
            scale = 1.0 if score == "runs" else 100.0
            rows += [
                {"set": j["set"], "method": j["method"], "seed": j["seed"], "score": score,
                 "index": i, "value": scale * v}
                for i, v in enumerate(vals)
            ]  # fmt: skip
    for method, vals in baselines.items():
        rows += [
            {"set": "", "method": method, "seed": "", "score": "runs", "index": i, "value": v}
            for i, v in enumerate(vals)
        ]
    return pd.DataFrame(rows)


def results_frame(raw: dict) -> pd.DataFrame:
    """A row per (set, method, seed): each score's mean, the training's outer steps,
    episodes, CPU and wall seconds, the schedule, the configuration and the budget."""
    rows = []
    for j in raw["jobs"]:
        c = j["cost"]
        row = {"set": j["set"], "method": j["method"], "seed": j["seed"]}
        for score, vals in j["scores"].items():
            row[score] = (1.0 if score == "runs" else 100.0) * sum(vals) / len(vals)
        row |= {k: c.get(k, "") for k in ("steps", "episodes", "cpu_s", "wall_s", "schedule")}
        row |= {
            "predicted_peak_mib": c.get("predicted_peak_mib", ""),
            "memory_budget_mib": c.get("memory_budget_mib", ""),
            "peak_rss_mib": c["peak_mib"],
            "final_val_accuracy": 100.0 * j["curve"][-1]["val_accuracy"],
            "job_cpu_s": j["job_cpu_s"],
            "job_wall_s": j["job_wall_s"],
            "budget_cpu_s": raw["budget_cpu_s"],
            "config": json.dumps(j["config"], sort_keys=True),
        }
        rows.append(row)
    return pd.DataFrame(rows)


def curves_frame(jobs: list[dict]) -> pd.DataFrame:
    """Validation accuracy at each checkpoint of each job (``cpu_s`` spent, steps taken)."""
    return pd.DataFrame(
        [
            {**_key(j), **point, "val_error": 100.0 * (1 - point["val_accuracy"])}
            for j in jobs
            for point in j["curve"]
        ]
    )


def _key(job: dict) -> dict:
    return {"set": job["set"], "method": job["method"], "seed": job["seed"]}


def _cell(rows: pd.DataFrame) -> str:
    """Mean ± 95% Student t interval over the scored items (the runs, the episodes): each
    item's value is first averaged over seeds, since every seed is scored on the same runs
    and the same episodes (pooling them would count each item once per seed)."""
    if not len(rows):
        return "—"
    return format_mean_t95(rows.groupby("index").value.mean(), digits=1)


def _config(config: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in config.items())


def _changed(config: dict, start: dict) -> str:
    diff = {k: v for k, v in config.items() if start.get(k) != v}
    return _config(diff) if diff else "start"


def write(out: Path, raw: dict) -> pd.DataFrame:
    """Write the report under ``out`` from ``raw`` (what raw.json holds); returns the
    per-value frame."""
    out.mkdir(parents=True, exist_ok=True)
    jobs, search = raw["jobs"], raw["search"]
    values = values_frame(jobs, raw["baselines"])
    values.to_csv(out / "values.csv", index=False)
    results = results_frame(raw)
    results.to_csv(out / "results.csv", index=False)
    curves = curves_frame(jobs)
    curves.to_csv(out / "curves.csv", index=False)
    ran = {j["method"] for j in jobs}
    methods = [m for m in METHODS if m in ran]
    sets = sorted({j["set"] for j in jobs})
    minutes = raw["budget_cpu_s"] / 60
    seeds = "; ".join(
        f"omniglot-{k}: {', '.join(v.split(','))}" for k, v in raw["seeds"].items() if v
    )
    lines = [
        "# Real Omniglot: Lake et al.'s one-shot task, every method given the same CPU time",
        "",
        f"**Budget: {minutes:g} CPU-minutes per method and seed** — the training process's "
        f"own CPU time (`time.process_time`, one torch thread per worker process, "
        f"{raw['workers']} workers), so that a busy neighbour on a shared machine takes no "
        f"time from the budget (shared caches and memory bandwidth can still make its steps "
        f"slower); the validation passes during training are paused out of it. "
        f"Meta-training on the training characters of one minimal background set "
        f"(quarter turns as classes) in 20-way 1-shot episodes, Conv-4, Adam 1e-3; each "
        f"method's hyperparameters chosen on small1's validation characters (below), the "
        f"same on small2. Seeds: {seeds}. The whole run: "
        f"{raw['wall_s'] / 60:.1f} minutes wall{_resumed(raw)} on {raw['machine']}, "
        f"{raw['job_cpu_s'] / 60:.1f} CPU-minutes in its jobs (training, validation "
        f"passes, scoring){_load(jobs)}.",
        "",
        "## The 20 runs (20-way within one evaluation alphabet), error % (lower is better)",
        "",
        "Scored once per trained model, with the method's own adaptation on the run's 20 "
        "training images. Mean over runs and seeds ± a 95% Student t interval over the 20 "
        "runs, each run's error averaged over the seeds first (every seed is scored on the "
        "same runs).",
        "",
        "| method | " + " | ".join(f"trained on {s}" for s in sets) + " |",
        "|---|" + "---|" * len(sets),
    ]
    runs = values[values.score == "runs"]
    for m in methods:
        cells = [_cell(runs[(runs.set == s) & (runs.method == m)]) for s in sets]
        lines.append(f"| {NAMES[m]} | " + " | ".join(cells) + " |")
    for m in raw["baselines"]:
        cell = _cell(runs[runs.method == m])
        lines.append(f"| {NAMES.get(m, m)} | " + " | ".join([cell] * len(sets)) + " |")
    lines += ["", "Published, on the same 20 runs (error %):", ""]
    lines += [f"- {who}: {err}% ({src})" for who, err, src in PUBLISHED]
    lines += [
        "",
        "Published 20-way 1-shot accuracy on **full Omniglot** (held-out characters; 1200 "
        "training characters of all 50 alphabets, 64 filters, tens of thousands of outer "
        "steps): context only, **not comparable** with 5 alphabets and minutes of CPU:",
        "",
    ]
    lines += [f"- {who}: {acc}% ({src})" for who, acc, src in CONTEXT]
    lines += [
        "",
        "## Held-out characters of the minimal set, 1-shot accuracy % (higher is better)",
        "",
        f"{len(jobs[0]['scores']['20-way'])} episodes per seed ({EVAL_QUERIES} queries per "
        "class), the same for every method and seed; mean ± a 95% Student t interval over "
        "the episodes, each episode's accuracy averaged over the seeds first.",
        "",
        "| method | " + " | ".join(f"{s} {w}" for s in sets for w in ("20-way", "5-way")) + " |",
        "|---|" + "---|" * (2 * len(sets)),
    ]
    for m in methods:
        cells = [
            _cell(values[(values.set == s) & (values.method == m) & (values.score == w)])
            for s in sets
            for w in ("20-way", "5-way")
        ]
        lines.append(f"| {NAMES[m]} | " + " | ".join(cells) + " |")
    lines += _compute(results, methods, sets)
    lines += _curve_table(curves, methods, sets, raw.get("curve_tasks", CURVE_TASKS))
    lines += _search_section(search, methods)
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    _plot_runs(out, values, methods, list(raw["baselines"]), sets)
    _plot_curves(out, curves, methods, sets)
    return values


def _resumed(raw: dict) -> str:
    """Whether some jobs were done by earlier invocations (their wall time is not in the
    run's), or ""."""
    n = raw.get("jobs_resumed", 0)
    if not n:
        return ""
    return (
        f" ({n} of its {len(raw['jobs'])} jobs were run by earlier invocations, stopped or "
        f"side by side with the search, and read back: the wall time is the rest's; each "
        f"job's own CPU and wall seconds are in results.csv)"
    )


def _load(jobs: list[dict]) -> str:
    """How busy the machine was: the 1-minute load average at the jobs' ends, or ""."""
    loads = [j["load_avg"] for j in jobs if "load_avg" in j]
    if not loads:
        return ""
    return (
        f"; the machine was shared, its 1-minute load average at the jobs' ends "
        f"{sum(loads) / len(loads):.1f} on average, at most {max(loads):.1f}"
    )


def _memory_rule(results: pd.DataFrame) -> str:
    """How MAML's memory was bounded in this run (its raw data says: a budget per job, or
    none)."""
    budgets = [b for b in results.get("memory_budget_mib", []) if str(b) not in ("", "nan")]
    if budgets:
        return "under a memory budget of 3/4 of naive's predicted peak (a recomputing schedule)"
    return "with no memory budget (the fastest exact schedule that fits the machine)"


def _compute(results: pd.DataFrame, methods, sets) -> list[str]:
    lines = [
        "",
        "## What each method did with the budget (mean per seed)",
        "",
        "Outer steps and episodes (transfer: steps over pooled images, as many per step as "
        "its meta-batch of episodes holds); the training's CPU and wall minutes (wall "
        "includes waiting for the shared CPU); MAML's schedule as `auto` chose it "
        + _memory_rule(results)
        + ".",
        "",
        "| method | set | outer steps | episodes | CPU-min | wall-min | schedule (predicted "
        "peak / budget, MiB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in methods:
        for s in sets:
            r = results[(results.method == m) & (results.set == s)]
            if r.empty:
                continue
            sched = r.schedule.iloc[0] or "—"
            if str(r.predicted_peak_mib.iloc[0]) not in ("", "nan"):
                sched += f" ({float(r.predicted_peak_mib.iloc[0]):.1f}"
                budget = r.memory_budget_mib.iloc[0]
                sched += f" / {float(budget):.1f})" if str(budget) not in ("", "nan") else ")"
            lines.append(
                f"| {NAMES[m]} | {s} | {r.steps.mean():.0f} | {r.episodes.mean():.0f} | "
                f"{r.cpu_s.mean() / 60:.2f} | {r.wall_s.mean() / 60:.2f} | {sched} |"
            )
    return lines


def _curve_table(curves: pd.DataFrame, methods, sets, tasks: int) -> list[str]:
    if curves.empty:
        return []
    first = sets[0]
    c = curves[curves.set == first]
    fractions = sorted(c.groupby(["method", "seed"]).cumcount().unique())
    lines = [
        "",
        f"## Validation error against CPU-minutes ({first})",
        "",
        f"Error % of {tasks} 20-way 1-shot episodes ({VAL_QUERIES} queries per class) "
        f"on the validation characters, measured with the clock paused at fractions of the "
        f"budget; mean over seeds (CPU-minutes in brackets). `val_error_vs_cpu.png` plots "
        f"every set.",
        "",
        "| method | " + " | ".join(f"checkpoint {i + 1}" for i in fractions) + " |",
        "|---|" + "---|" * len(fractions),
    ]
    for m in methods:
        pts = c[c.method == m].assign(k=lambda d: d.groupby("seed").cumcount())
        cells = []
        for i in fractions:
            at = pts[pts.k == i]
            cells.append(
                f"{at.val_error.mean():.1f} ({at.cpu_s.mean() / 60:.2f})" if len(at) else "—"
            )
        lines.append(f"| {NAMES[m]} | " + " | ".join(cells) + " |")
    return lines


def _incomplete(search: dict) -> str:
    """What the search had not done when its choices were read, or ""."""
    return f" **Incomplete:** {search['incomplete']}" if search.get("incomplete") else ""


def _search_section(search: dict, methods) -> list[str]:
    lines = [
        "",
        "## Hyperparameters, chosen on small1's validation characters",
        "",
        f"Each configuration trained once (seed 0) for {search['budget_cpu_s'] / 60:g} "
        f"CPU-minutes on small1's training characters and scored on {search['val_tasks']} "
        f"20-way 1-shot episodes ({VAL_QUERIES} queries per class) of its validation "
        f"characters; each method keeps its most accurate configuration. The 20 runs and the "
        f"held-out characters are never read. A grid is a starting configuration and "
        f"variants that change one value each. The search took "
        f"{search['wall_s'] / 60:.1f} minutes wall ({search['workers']} workers); rerun it "
        f"with `python -m bench.omniglot --search` (it rewrites `search.json`, which the "
        f"main run reads).{_incomplete(search)}",
        "",
        "| method | configuration | validation accuracy % | outer steps | |",
        "|---|---|---|---|---|",
    ]
    for m in methods:
        s = search["methods"].get(m)
        if s is None:
            continue
        start = s["grid"][0]
        for i, config in enumerate(s["grid"]):
            what = _config(config) if i == 0 else _changed(config, start)
            mark = "**chosen**" if config == s["chosen"] else ""
            lines.append(
                f"| {NAMES[m] if i == 0 else ''} | {what} | "
                f"{100 * s['val_accuracy'][i]:.1f} | {s['steps'][i]} | {mark} |"
            )
    lines += ["", "Chosen values:", ""]
    lines += [
        f"- {NAMES[m]}: {_config(search['methods'][m]['chosen'])}"
        for m in methods
        if m in search["methods"]
    ]
    return lines


def _plot_runs(out: Path, values: pd.DataFrame, methods, baselines, sets) -> None:
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
            errs.append(mean_t95(v)[1])
        xs = [i + (j - (len(sets) - 1) / 2) * width for i in range(len(names))]
        ax.bar(xs, means, width, yerr=errs, capsize=2, label=f"trained on {s}")
    published = ", ".join(f"{who.split(' (')[0]} {err}%" for who, err, _ in PUBLISHED)
    for _, err, _ in PUBLISHED:
        ax.axhline(float(err), ls=":", c="k", lw=0.8)
    top = max(float(err) for _, err, _ in PUBLISHED)
    ax.text(-0.5, top + 1, f"published: {published}", fontsize=7, va="bottom", ha="left")
    short = {
        "mhd": "MHD (no training)",
        "pixel-nn-105": "pixel NN 105x105",
        "pixel-nn-28": "pixel NN 28x28",
    }
    labels = [short.get(m, NAMES.get(m, m)) for m in names]
    ax.set_xticks(range(len(names)), labels, rotation=30, ha="right")
    ax.set_ylabel("error % on the 20 runs")
    ax.set_title("Omniglot one-shot (Lake et al.'s 20 runs), equal CPU time per method")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "error_by_method.png", dpi=120)
    plt.close(fig)


def _plot_curves(out: Path, curves: pd.DataFrame, methods, sets) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(sets), figsize=(5 * len(sets), 4), squeeze=False)
    for ax, s in zip(axes[0], sets):
        c = curves[curves.set == s]
        for m in methods:
            pts = c[c.method == m].assign(k=lambda d: d.groupby("seed").cumcount())
            mean = pts.groupby("k")[["cpu_s", "val_error"]].mean()
            if mean.empty:
                continue
            style = "--" if len(mean) == 1 else "-"
            xs = list(mean.cpu_s / 60)
            ys = list(mean.val_error)
            if len(mean) == 1:  # random init: no training, a flat line
                xs = [0.0, max(curves.cpu_s) / 60]
                ys = ys * 2
            ax.plot(xs, ys, style, marker="o", ms=3, label=NAMES[m])
        ax.set_xlabel("training CPU-minutes")
        ax.set_ylabel("validation error % (20-way 1-shot)")
        ax.set_title(f"trained on {s}")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "val_error_vs_cpu.png", dpi=120)
    plt.close(fig)
