"""``make learned-optimizer``'s tables (CSV), summary (markdown) and plot, from raw.json
alone (``--report-only`` rebuilds them without running anything)."""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ..intervals import mean_t95

__all__ = ["BASELINES", "UNTRAINED", "headline", "held_out_rows", "summary", "write"]

MIB = 1 << 20
BASELINES = ("sgd-momentum", "adam")
UNTRAINED = "untrained rule"  # the rule before meta-training: Adam at its starting rate


def held_out_rows(raw: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (N, method, task, horizon N or 2N): final train/test loss, accuracy."""
    rows = []
    for r in raw["held_out"]:
        n = r["steps"]
        for horizon, at in (("N", n), ("2N", 2 * n)):
            i = r["step"].index(at)
            rows.append({"steps": n, "method": r["method"], "data": r["data"], "seed": r["seed"],
                         "horizon": horizon, "train_loss": r["train"][i],
                         "test_loss": r["test"][i], "test_acc": r["test_acc"][i]})  # fmt: skip
    return rows


def _tables(raw: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    meta = [
        {"steps": m["steps"], "method": m["method"], "outer_step": i, **h}
        for m in raw["meta"]
        for i, h in enumerate(m["history"])
    ]
    chosen = {(c["optimizer"], c["steps"]): c["lr"] for c in raw["chosen"]}
    tuning = [{**t, "chosen": chosen[t["optimizer"], t["steps"]] == t["lr"]} for t in raw["tuning"]]
    curves = [
        {
            "steps": r["steps"],
            "method": r["method"],
            "data": r["data"],
            "seed": r["seed"],
            "step": s,
            "train_loss": a,
            "test_loss": b,
        }
        for r in raw["held_out"]
        for s, a, b in zip(r["step"], r["train"], r["test"])
    ]
    return {
        "heldout": held_out_rows(raw),
        "meta_training": meta,
        "tuning": tuning,
        "curves": curves,
        "memory": raw["memory"],
    }


def write(raw: dict[str, Any], out: Path) -> None:
    """Every CSV, ``summary.md`` and ``curves.png`` under ``out``, from ``raw``."""
    for name, rows in _tables(raw).items():
        with open(out / f"{name}.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    (out / "summary.md").write_text(summary(raw))
    plot(raw, out / "curves.png")


def _methods(raw: dict[str, Any], n: int) -> list[str]:
    learned = [m["method"] for m in raw["meta"] if m["steps"] == n]
    return [*learned, UNTRAINED, *[f"{b} (tuned)" for b in BASELINES]]


def headline(raw: dict[str, Any]) -> str:
    """README's line: at the longest N, every optimizer's held-out test loss after N and 2N
    steps (mean over the tasks) and one outer step's peak memory, naive against exact."""
    rows = held_out_rows(raw)
    n = max(r["steps"] for r in rows)

    def loss(method: str, horizon: str) -> str:
        v = [r["test_loss"] for r in _select(rows, steps=n, method=method, horizon=horizon)]
        bad = sum(not math.isfinite(x) for x in v)
        return f"diverged {bad}/{len(v)}" if bad else f"{sum(v) / len(v):.3f}"

    parts = [f"{m} {loss(m, 'N')} / {loss(m, '2N')}" for m in _methods(raw, n)]
    peaks = {r["strategy"].split("(")[0]: r["peak"] / MIB for r in raw["memory"]
             if r["steps"] == n and r["memory"]}  # fmt: skip
    memory = (
        f"; one outer step at N = {n}: naive {peaks['naive']:.0f} MiB, exact "
        f"{peaks['checkpoint']:.0f} MiB"
        if {"naive", "checkpoint"} <= set(peaks)
        else ""
    )
    return (
        f"**A learned optimizer, meta-trained exactly through N = {n} inner steps** (`make "
        f"learned-optimizer`, MLPs on digits and MNIST-1D): held-out test loss after N / 2N "
        f"steps, " + "; ".join(parts) + memory
    )


def _cell(values: Sequence[float], digits: int = 3) -> str:
    bad = sum(not math.isfinite(v) for v in values)
    ok = [v for v in values if math.isfinite(v)]
    if not ok:
        return f"diverged {bad}/{len(values)}"
    mean, half = mean_t95(ok)
    text = f"{mean:.{digits}f} ± {half:.{digits}f}"
    return text + (f" (diverged {bad}/{len(values)})" if bad else "")


def _finite_mean(values: Sequence[float]) -> float:
    ok = [v for v in values if math.isfinite(v)]
    return sum(ok) / len(ok) if ok else math.nan


def _select(rows: Iterable[dict[str, Any]], **match: Any) -> list[dict[str, Any]]:
    return [r for r in rows if all(r[k] == v for k, v in match.items())]


def summary(raw: dict[str, Any]) -> str:
    """The markdown summary: held-out scores, per dataset, meta-training, the tuned rates,
    memory and agreement, and what was done for stability."""
    env, s = raw["env"], raw["settings"]
    rows = held_out_rows(raw)
    horizons = sorted({r["steps"] for r in rows})
    datasets = list(dict.fromkeys(r["data"] for r in rows))
    tasks = len({(r["data"], r["seed"]) for r in rows})
    cfg0 = raw["meta"][0]["config"]
    lines = [
        "# A learned optimizer meta-trained through long unrolls, exactly",
        "",
        f"{env['device']}, torch {env['torch']}, one thread per process, "
        f"{s['workers']} processes, git {env['git']}, {env['date']}; "
        f"{raw['minutes']:.1f} minutes (`make learned-optimizer`) on a machine shared "
        f"with other work (load average {raw['load_average'][0]:.1f} at the start, "
        f"{raw['load_average'][1]:.1f} at the end); {raw['cpu_minutes']:.1f} CPU-minutes "
        f"in all processes, about {raw['cpu_minutes'] / s['workers']:.0f} minutes on "
        f"{s['workers']} idle cores.",
        "",
        f"A coordinate-wise MLP update rule (`effmaml.learned.LearnedOptimizer`, hidden "
        f"{tuple(cfg0['hidden'])}, features: the gradient and its moving averages at 0.5, "
        f"0.9, 0.99, 0.999 over a running RMS; it starts as Adam at "
        f"lr {cfg0['rule_lr']}) meta-trained on a family of tasks: an MLP (d-32-10, a new "
        f"initialisation and minibatch order each) on {' and '.join(datasets)}, minibatches "
        f"of 64, through N-step unrolls. exact: the meta-gradient through all N steps "
        f"(`checkpoint(segment={s['segment']}, pullback='segment')`, naive's to rounding); "
        f"truncated K: through the last K steps only (`truncated(window=K)`), the same "
        f"number of outer steps; untrained rule: the rule before meta-training (Adam at "
        f"lr {cfg0['rule_lr']}, up to its small output layer). Baselines: SGD with "
        f"momentum 0.9 and Adam, their rate "
        f"chosen from a grid by the mean validation loss after N steps on "
        f"{s['tune_tasks']} meta-training tasks per dataset. Scored on {tasks} held-out "
        f"tasks (new initialisations and minibatch orders, {s['held_out']} per dataset) "
        f"trained for N and for 2N steps: cross-entropy on the whole training split and on "
        f"the test split, mean ± 95% interval over the tasks.",
        "",
        "| N | optimizer | train loss at N | test loss at N | train loss at 2N | test loss at 2N |",
        "|---|---|---|---|---|---|",
    ]
    for n in horizons:
        for m in _methods(raw, n):
            cells = []
            for h in ("N", "2N"):
                sel = _select(rows, steps=n, method=m, horizon=h)
                cells += [
                    _cell([r["train_loss"] for r in sel]),
                    _cell([r["test_loss"] for r in sel]),
                ]
            lines.append(f"| {n} | {m} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "![training loss on held-out tasks](curves.png)",
        "",
        "Test loss and accuracy per dataset (held-out tasks, after N and 2N steps):",
        "",
        "| N | optimizer | "
        + " | ".join(f"{d} test loss N / 2N | {d} test acc. % N / 2N" for d in datasets)
        + " |",
        "|---|---|" + "---|---|" * len(datasets),
    ]
    for n in horizons:
        for m in _methods(raw, n):
            cells = []
            for d in datasets:
                at = [_select(rows, steps=n, method=m, horizon=h, data=d) for h in ("N", "2N")]
                cells.append(" / ".join(_cell([r["test_loss"] for r in a]) for a in at))
                cells.append(" / ".join(_cell([100 * r["test_acc"] for r in a], 1) for a in at))
            lines.append(f"| {n} | {m} | " + " | ".join(cells) + " |")
    lines += _meta_section(raw) + _tuning_section(raw) + _memory_section(raw)
    return "\n".join(lines) + "\n"


def _meta_section(raw: dict[str, Any]) -> list[str]:
    cfg0 = raw["meta"][0]["config"]
    lines = [
        "",
        "## Meta-training",
        "",
        f"Adam on the rule's weights (lr {cfg0['meta_lr']}), one task per outer step, the "
        f"datasets in turn. For stability (Metz et al. 2019): the meta-objective is the "
        f"validation loss averaged over the unroll (at {cfg0['points']} evenly spaced steps, "
        f"the last included; effmaml's multi-step loss), the rule's output layer starts at "
        f"scale {cfg0['out_scale']} (the untrained rule is Adam), and the meta-gradient's "
        f"global norm is clipped to {cfg0['clip']}; an outer step whose unroll diverges (a "
        f"non-finite inner loss) or whose meta-gradient is not finite is skipped. "
        f"Meta-objective: the mean over the first and over the last tenth of the outer steps "
        f"(each dataset's tasks alike; skipped steps left out).",
        "",
        "| N | meta-gradient | outer steps | skipped | objective, first tenth | "
        "objective, last tenth | median grad. norm | minutes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m in raw["meta"]:
        h = m["history"]
        tenth = max(1, len(h) // 10)
        first, last = (_finite_mean([x["objective"] for x in part])
                       for part in (h[:tenth], h[-tenth:]))  # fmt: skip
        norms = sorted(x["grad_norm"] for x in h if math.isfinite(x["grad_norm"])) or [math.nan]
        lines.append(
            f"| {m['steps']} | {m['method']} | {len(h)} | {m['skipped']} | {first:.3f} | "
            f"{last:.3f} | {norms[len(norms) // 2]:.3g} | {m['seconds'] / 60:.1f} |"
        )
    return lines


def _tuning_section(raw: dict[str, Any]) -> list[str]:
    lines = [
        "",
        "## The baselines' rates",
        "",
        "Mean validation loss after N steps on the tuning tasks, per rate of the grid; the "
        "chosen rate in bold (inf: a run diverged).",
        "",
        "| N | optimizer | " + "validation loss by rate |",
        "|---|---|---|",
    ]
    for c in raw["chosen"]:
        grid = sorted(
            (t["lr"], t["val_loss"])
            for t in raw["tuning"]
            if t["optimizer"] == c["optimizer"] and t["steps"] == c["steps"]
        )
        cells = [
            (f"**{lr:g}: {v:.3f}**" if lr == c["lr"] else f"{lr:g}: {v:.3f}") for lr, v in grid
        ]
        edge = " (at the grid's edge)" if c["lr"] in (grid[0][0], grid[-1][0]) else ""
        lines.append(f"| {c['steps']} | {c['optimizer']}{edge} | " + ", ".join(cells) + " |")
    return lines


def _memory_section(raw: dict[str, Any]) -> list[str]:
    s = raw["settings"]
    lines = [
        "",
        "## Memory and agreement",
        "",
        "One outer step's meta-gradient (the untrained rule, the first meta-training task, "
        "digits), each in a fresh process: peak resident memory above the start, and the "
        f"meta-gradient against naive's at N = {s['agreement']} (rel. L2; a truncated "
        "gradient is biased by design, not by rounding).",
        "",
        "| N | strategy | peak (MiB) | rel. L2 vs naive |",
        "|---|---|---|---|",
    ]
    for r in raw["memory"]:
        rel = f"{r['rel_l2_vs_naive']:.1e}" if r["agreement"] else ""
        lines.append(f"| {r['steps']} | {r['strategy']} | {r['peak'] / MIB:.1f} | {rel} |")
    return lines


def plot(raw: dict[str, Any], path: Path) -> None:
    """Training loss (whole training split) along 2N steps on the held-out tasks, mean over
    tasks: one panel per (dataset, N), every optimizer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = raw["held_out"]
    horizons = sorted({r["steps"] for r in runs})
    datasets = list(dict.fromkeys(r["data"] for r in runs))
    fig, axes = plt.subplots(
        len(datasets), len(horizons), figsize=(4.2 * len(horizons), 3.2 * len(datasets)),
        squeeze=False,
    )  # fmt: skip
    for i, d in enumerate(datasets):
        for j, n in enumerate(horizons):
            ax = axes[i][j]
            for m in _methods(raw, n):
                sel = [r for r in runs if r["steps"] == n and r["method"] == m and r["data"] == d]
                if not sel:
                    continue
                steps = sel[0]["step"]
                mean = [sum(r["train"][k] for r in sel) / len(sel) for k in range(len(steps))]
                mean = [v if math.isfinite(v) else math.nan for v in mean]  # diverged: a gap
                style = "--" if m.endswith("(tuned)") else ":" if m == UNTRAINED else "-"
                ax.plot(steps, mean, style, label=m)
            ax.axvline(n, color="grey", lw=0.8, ls=":")
            ax.set_yscale("log")
            ax.set_title(f"{d}, meta-trained at N = {n}")
            ax.set_xlabel("inner step")
            if j == 0:
                ax.set_ylabel("training loss")
            if i == 0 and j == 0:
                ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
