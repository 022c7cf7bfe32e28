"""``python -m bench.report [results/<preset> ...]``: CSV -> plots and summary.md.

Reads ``runs.csv`` only, so ``make report`` rebuilds everything from the committed CSV.
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd

__all__ = ["summary_table", "update_readme", "write_report"]


def _plot(df: pd.DataFrame, column: str, ylabel: str, path: Path, title: str) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, g in df.groupby("strategy", sort=False):
        ok = g[g.status == "ok"].sort_values("steps")
        if len(ok):
            ax.plot(ok.steps, ok[column], marker="o", label=label)
        bad = g[g.status.isin(["oom", "timeout"])]
        for _, r in bad.iterrows():
            y = ok[column].max() if len(ok) else 1
            ax.scatter([r.steps], [y], marker="x", color="red", zorder=5)
            ax.annotate(r.status.upper(), (r.steps, y), fontsize=7, color="red")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("inner steps N (log)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary_table(df: pd.DataFrame) -> str:
    """Per strategy, at the largest N where it ran: memory, time, overhead, agreement."""
    lines = [
        "| strategy | N | status | peak MiB | time s (median) | × first_order | step evals "
        "| rel. L2 vs naive | cosine vs naive |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, g in df.groupby("strategy", sort=False):
        ok = g[g.status == "ok"]
        r = ok.loc[ok.steps.idxmax()] if len(ok) else g.loc[g.steps.idxmax()]

        def fmt(v, spec):
            return "" if pd.isna(v) or v == "" else format(float(v), spec)

        lines.append(
            f"| {label} | {int(r.steps)} | {r.status} | {fmt(r.peak_mib, '.0f')} | "
            f"{fmt(r.time_s, '.2f')} | {fmt(r.overhead_vs_first_order, '.2f')} | "
            f"{fmt(r.step_evals, '.0f')} | {fmt(r.grad_rel_l2, '.1e')} | "
            f"{fmt(r.grad_cosine, '.6f')} |"
        )
    return "\n".join(lines)


def write_report(out_dir: Path | str) -> None:
    """Write memory_vs_steps.png, time_vs_steps.png and summary.md next to runs.csv."""
    out_dir = Path(out_dir)
    df = pd.read_csv(out_dir / "runs.csv")
    first = df.iloc[0]
    title = (
        f"{first.preset}: ResNet18, {first.batch}x3x{first.image}x{first.image}, "
        f"{first['dtype']}, clip={first['clip']} — {first['device']}, torch {first['torch']}"
    )
    _plot(
        df,
        "peak_mib",
        f"peak memory MiB ({first.memory_kind})",
        out_dir / "memory_vs_steps.png",
        title,
    )
    _plot(df, "time_s", "seconds per meta-gradient (median)", out_dir / "time_vs_steps.png", title)
    errors = df[~df.status.isin(["ok"])]
    text = [
        f"# {first.preset}",
        "",
        title,
        "",
        f"git {first.git}, {first.timestamp}; threads {first.threads}",
        "",
        summary_table(df),
        "",
    ]
    if len(errors):
        text += ["Runs that did not finish:", ""]
        text += [
            f"- {r.strategy} N={r.steps}: {r.status} — {r.error}" for _, r in errors.iterrows()
        ]
        text.append("")
    (out_dir / "summary.md").write_text("\n".join(text))


START, END = "<!-- results:start -->", "<!-- results:end -->"


def update_readme(readme: Path | str = "README.md", root: Path | str = "results") -> bool:
    """Put every ``results/<preset>/summary.md`` and its memory plot between the markers."""
    readme, root = Path(readme), Path(root)
    if not readme.exists():
        return False
    text = readme.read_text()
    if START not in text or END not in text:
        return False
    parts = []
    for summary in sorted(root.glob("*/summary.md")):
        body = summary.read_text().strip().replace("# ", "### ", 1)
        parts += [body, "", f"![memory vs steps]({summary.parent / 'memory_vs_steps.png'})", ""]
    block = "\n".join([START, *parts, END]) if parts else f"{START}\n{END}"
    head, rest = text.split(START, 1)
    readme.write_text(head + block + rest.split(END, 1)[1])
    return True


if __name__ == "__main__":
    dirs = sys.argv[1:] or [str(p.parent) for p in Path("results").glob("*/runs.csv")]
    for d in dirs:
        write_report(d)
        print(f"wrote {d}/summary.md and plots")
    if not sys.argv[1:] and update_readme():
        print("updated README.md results section")
