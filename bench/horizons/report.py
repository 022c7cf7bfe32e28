"""``make horizons``' summary and plot, from the raw results (``raw.json``) alone.

Nothing here runs an experiment: ``python -m bench.horizons --report-only`` rewrites
``summary.md``, ``scores.csv`` and ``schedules.png`` from the committed ``raw.json``.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

from ..intervals import mean_t95

__all__ = ["compare", "headline", "plot_schedules", "summary", "write_scores"]

MIB = 1 << 20
BASELINES = ("best constant", "tuned cosine", "online HD")


def _f(x: float, digits: int = 3) -> str:
    return "inf" if not math.isfinite(x) else f"{x:.{digits}f}"


def _ci(values: list[float], scale: float = 1.0, digits: int = 3) -> str:
    if not all(map(math.isfinite, values)):
        return "diverged"
    m, h = mean_t95([scale * v for v in values])
    return f"{m:.{digits}f} ± {h:.{digits}f}"


def _vals(d: dict, label: str, key: str) -> list[float]:
    return [r[key] for r in d["scores"][label]]


def _methods(d: dict) -> list[str]:
    """The meta-learned methods in their order: exact, then the windows."""
    return list(d["meta"])


def compare(d: dict, a: str, b: str, key: str) -> tuple[float, float]:
    """Mean and 95% half-width of ``a − b`` in ``key`` over the test seeds (paired: the
    same initialisations and minibatches)."""
    diffs = [x - y for x, y in zip(_vals(d, a, key), _vals(d, b, key))]
    return mean_t95(diffs)


def _best_truncated(d: dict) -> str:
    truncated = [m for m in _methods(d) if m.startswith("truncated")]
    return min(truncated, key=lambda m: sum(_vals(d, m, "train_loss")))


def _verdict(name: str, d: dict) -> list[str]:
    """Plain sentences: where exact beats truncation (and the baselines), and by how much;
    where it does not."""
    out = []
    for other in [m for m in _methods(d) if m != "exact"] + list(BASELINES):
        for key, what, scale, unit in (
            ("train_loss", "final training loss", 1.0, ""),
            ("test_acc", "test accuracy", 100.0, " points"),
        ):
            m, h = compare(d, "exact", other, key)
            m, h = scale * m, scale * h
            better = m < -h if key == "train_loss" else m > h
            worse = m > h if key == "train_loss" else m < -h
            if not all(map(math.isfinite, (m, h))):
                word = "cannot be compared (a run diverged)"
            elif better:
                word = f"exact is better by {abs(m):.3f}{unit} (± {h:.3f})"
            elif worse:
                word = f"exact is WORSE by {abs(m):.3f}{unit} (± {h:.3f})"
            else:
                word = f"exact does not beat it: {m:+.3f}{unit} ± {h:.3f}, within the interval"
            out.append(f"- {name}, {what}, exact − {other}: {word}.")
    return out


def _costs_load(env: dict[str, Any]) -> str:
    """The load while the outer steps were timed (recorded since 2026-12-05), or ""."""
    if "load_costs" not in env:
        return ""
    a, b = env["load_costs"]
    return f", {a:.1f} and {b:.1f} when the cost of one outer step was measured"


def _resumed(env: dict[str, Any]) -> str:
    """What the wall and CPU minutes leave out: stages an earlier invocation ran."""
    stages = env.get("resumed_stages") or []
    if not stages:
        return ""
    named = {"datasets": "the schedule experiment", "distill": "the distillation"}
    what = " and ".join(named.get(s, s) for s in stages)
    return (
        f"; {what} ran in an earlier invocation with the same settings (saved as it ended, "
        "`OUT/stage-*.json`), and the minutes above count this invocation's stages only"
    )


def summary(raw: dict[str, Any]) -> str:
    """The markdown summary: set-up, one table per dataset, the verdicts, the cost of one
    outer step, the distillation comparison."""
    cfg, env = raw["settings"], raw["env"]
    data = raw["datasets"]
    first = next(iter(data.values()))
    lines = [
        "# The short-horizon bias, measured: exact against truncated hypergradients",
        "",
        f"{env['device']}, torch {env['torch']}, git {env['git']}, {env['date']}; "
        f"{env['minutes']:.1f} minutes wall ({env['cpu_minutes']:.1f} CPU-minutes over "
        f"{cfg['workers']} worker processes, load average {env['load']:.1f} at the start"
        f"{_costs_load(env)}) "
        f"(`make horizons`){_resumed(env)}. Every figure below is computed from `raw.json` "
        f"in this folder (`python -m bench.horizons --report-only`).",
        "",
        f"A learning-rate schedule for T = {first['steps']} inner steps of SGD with momentum "
        f"0.9 (an MLP with two hidden layers of 100 ReLU units; minibatches of "
        + ", ".join(f"{d['batch']} on {n}" for n, d in data.items())
        + f"), one rate per step, parametrised by {cfg['knots']} log-rate knots linearly "
        f"interpolated. Meta-objective: the cross-entropy on the validation set where the "
        f"unroll ends; every outer step draws a new initialisation and minibatch sequence. "
        f"Every meta-learned schedule starts from the best constant rate and takes "
        f"**{cfg['outer_steps']} outer steps** of Adam on the knots; its meta learning rate "
        f"is chosen from {cfg['meta_lrs']} by the validation loss of the schedule it "
        f"learned ({len(cfg['tune_seeds'])} runs). Methods:",
        "",
        '- **exact**: the hypergradient through all T steps (`strategy="checkpoint"`, '
        "naive's to float rounding);",
        "- **truncated K**: `truncated(window=K, random=True)` (RaT-BPTT): the unroll stops "
        "at a random step n ≥ K, the validation loss is taken there, the hypergradient "
        "goes through the last K steps (the earlier ones first order);",
        "- **online HD**: hypergradient descent (Baydin et al. 2018) on one rate, updated "
        "before every step by the derivative of that step's training loss w.r.t. the "
        "previous step's rate (truncation with K = 1 at every step, as people run it); it "
        "has no outer loop: its start is the best constant and its hyper-rate β is chosen "
        f"from {cfg['betas']} on validation;",
        "- baselines: the best constant rate of "
        f"{cfg['constants']} and the best cosine schedule (peak from {cfg['cosines']}), "
        "both chosen by the validation loss after T steps.",
        "",
        f"Scored from {len(cfg['test_seeds'])} initialisations and minibatch sequences "
        f"never used while learning or tuning: the training loss on the whole training set "
        f"and the test accuracy after T steps (mean ± 95% interval).",
    ]
    for name, d in data.items():
        lines += ["", f"## {name}", "", _table(d), "", *_verdict(name, d)]
    lines += ["", "![the learned schedules](schedules.png)", ""]
    lines += _costs(raw)
    if raw.get("distill"):
        lines += _distill(raw["distill"], cfg)
    return "\n".join(lines) + "\n"


def _table(d: dict) -> str:
    rows = [
        "| schedule | chosen | final training loss | test accuracy (%) | validation loss |",
        "|---|---|---|---|---|",
    ]
    chosen = {
        "best constant": f"rate {d['best_constant']}",
        "tuned cosine": f"peak {d['best_cosine']}",
        "online HD": f"β {d['best_beta']}",
        **{m: f"meta lr {d['meta_lr'][m]}" for m in _methods(d)},
    }
    for label in [*BASELINES, *_methods(d)]:
        rows.append(
            f"| {label} | {chosen[label]} | {_ci(_vals(d, label, 'train_loss'))} | "
            f"{_ci(_vals(d, label, 'test_acc'), 100.0, 1)} | "
            f"{_ci(_vals(d, label, 'val_loss'))} |"
        )
    return "\n".join(rows)


def _costs(raw: dict) -> list[str]:
    rows = raw.get("costs", [])
    if not rows:
        return []
    out = [
        "## The cost of one outer step",
        "",
        "Each in a fresh process, one thread, after one warm-up outer step: peak resident "
        "memory above the start (measured), the cost model's prediction, and the median "
        "time of 3 (measured in another process, without the allocator setting that "
        "memory needs). A truncated window is placed at the end here (the longest unroll "
        "a random window draws; its memory does not depend on where it lies); naive is "
        "the exact hypergradient without recomputation, for reference. Times move with "
        "other work on the machine (the load is in the header): compare them within the "
        "table.",
        "",
        "| problem | method | run | peak (MiB) | predicted (MiB) | seconds |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        pred = r.get("predicted_peak_bytes")
        out.append(
            f"| {r['problem']} | {r['method']} | {r['label']} | {r['peak_bytes'] / MIB:.1f} | "
            f"{'–' if pred is None else f'{pred / MIB:.1f}'} | {r['seconds']:.2f} |"
        )
    return [*out, ""]


def _distill(dist: dict, cfg: dict) -> list[str]:
    n, k = cfg["distill_steps"], cfg["distill_window"]
    runs = dist["runs"]
    accs = {
        kind: [r["test_acc"] for r in runs if r["kind"] == kind] for kind in ("exact", "truncated")
    }
    diffs = [a - b for a, b in zip(accs["exact"], accs["truncated"])]
    m, h = mean_t95(diffs)
    mem = {r["method"]: r for r in dist.get("costs", [])}
    out = [
        "## Dataset distillation at N = " + str(n) + ": exact against truncated",
        "",
        f"`make bilevel`'s digits distillation (10 learned 8x8 images and {n} learned "
        f"rates, a new initialisation every outer step, scored on the real test digits from "
        f"10 unseen initialisations) with RaT-BPTT's setting, a random window of {k} steps "
        f"(`truncated(window={k}, random=True)`), against the exact meta-gradient through "
        f"all {n} steps (`checkpoint` under a memory budget equal to truncation's predicted "
        f"peak); {cfg['distill_outer']} outer steps each, seeds {cfg['distill_seeds']}. "
        f"Test accuracy, % (mean ± 95% interval over the seeds):",
        "",
        "| meta-gradient | test accuracy (%) | peak of one outer step (MiB) | seconds |",
        "|---|---|---|---|",
    ]
    for kind in ("exact", "truncated"):
        c = mem.get(kind, {})
        peak = f"{c['peak_bytes'] / MIB:.1f}" if c else "–"
        secs = f"{c['seconds']:.2f}" if c else "–"
        out.append(f"| {kind} | {_ci(accs[kind], 100.0, 1)} | {peak} | {secs} |")
    if m - h > 0:
        verdict = f"exact is better by {100 * m:.1f} ± {100 * h:.1f} points (paired by seed)"
    elif m + h < 0:
        verdict = f"exact is WORSE by {100 * -m:.1f} ± {100 * h:.1f} points (paired by seed)"
    else:
        verdict = (
            f"exact does not beat truncation here: {100 * m:+.1f} ± {100 * h:.1f} points "
            f"(paired by seed), within the interval"
        )
    return [*out, "", f"Exact − truncated: {verdict}.", ""]


def headline(raw: dict) -> str:
    """README's line (without its link): exact against the best truncated schedule per
    dataset, paired over the test seeds, and the distillation comparison."""
    first = next(iter(raw["datasets"].values()))
    parts = []
    for name, d in raw["datasets"].items():
        tr = _best_truncated(d)
        lm, lh = compare(d, "exact", tr, "train_loss")
        am, ah = compare(d, "exact", tr, "test_acc")
        parts.append(
            f"{name} {lm:+.3f} ± {lh:.3f} training loss, {100 * am:+.1f} ± {100 * ah:.1f} "
            f"test accuracy points against {tr}"
        )
    line = (
        f"**What exactness buys** (`make horizons`, a {first['steps']}-step SGD-momentum "
        f"learning-rate schedule meta-learned on real data): the exact hypergradient's "
        f"schedule minus the best truncated one's, {'; '.join(parts)}"
    )
    dist = raw.get("distill")
    if dist and dist.get("runs"):
        cfg = raw["settings"]
        acc = {
            k: mean_t95([100 * r["test_acc"] for r in dist["runs"] if r["kind"] == k])
            for k in ("exact", "truncated")
        }
        line += (
            f"; distillation at N = {cfg['distill_steps']}, exact {acc['exact'][0]:.1f} ± "
            f"{acc['exact'][1]:.1f}% against RaT-BPTT's window of {cfg['distill_window']} "
            f"{acc['truncated'][0]:.1f} ± {acc['truncated'][1]:.1f}% at the same memory"
        )
    return line


def write_scores(raw: dict, path: Path) -> None:
    """Every scoring run as one CSV row (dataset, schedule, seed index, the three values)."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["dataset", "schedule", "seed", "train_loss", "val_loss", "test_acc"])
        for name, d in raw["datasets"].items():
            for label, runs in d["scores"].items():
                for i, r in enumerate(runs):
                    w.writerow([name, label, i, r["train_loss"], r["val_loss"], r["test_acc"]])


def plot_schedules(raw: dict, path: Path) -> None:
    """Every method's schedule over the T steps, one panel per dataset (Wu et al.'s figure
    on our data); online HD's is the mean of the rates it used from the test seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = raw["datasets"]
    fig, axes = plt.subplots(1, len(data), figsize=(5.2 * len(data), 3.6), squeeze=False)
    for ax, (name, d) in zip(axes[0], data.items()):
        for label, rates in d["schedules"].items():
            style = "--" if label in BASELINES else "-"
            ax.plot(rates, style, lw=1.4 if label == "exact" else 1.0, label=label)
        hd = d.get("hd_rates")
        if hd:
            mean = [sum(r[t] for r in hd) / len(hd) for t in range(len(hd[0]))]
            ax.plot(mean, ":", label="online HD")
        ax.set_yscale("log")
        ax.set_xlabel("inner step")
        ax.set_ylabel("learning rate")
        ax.set_title(name, fontsize=10)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
