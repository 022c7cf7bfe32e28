"""``python -m bench.report [results/<preset> ...]``: CSV -> plots and summary.md.

Reads ``runs.csv`` only, so ``make report`` rebuilds everything from the committed CSV.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd

from .presets import REFERENCE, STAND_IN, base_preset

__all__ = ["pivot", "summary_table", "targets", "tradeoff_plot", "update_readme", "write_report"]


def _describe(row: pd.Series) -> str:
    """The set-up of a CSV row: model, input, dtype, autocast, clipping."""
    model = row.get("model", "resnet18")
    model = "resnet18" if pd.isna(model) else model
    amp = row.get("amp", "")
    amp = f", autocast {amp}" if isinstance(amp, str) and amp else ""
    clip = "no clipping" if pd.isna(row["clip"]) else f"clip {row['clip']:g}"
    if row.image == 0:  # token sequences: the preset knows the model's sizes
        base = base_preset(str(row.get("preset", "")))
        if base is not None:
            return f"{dataclasses.replace(base, batch=int(row.batch)).describe()}{amp}, {clip}"
        return f"{model}, {row.batch} token sequences, {row['dtype']}{amp}, {clip}"
    return f"{model}, {row.batch}x3x{row.image}x{row.image}, {row['dtype']}{amp}, {clip}"


def derive_columns(df: pd.DataFrame) -> pd.DataFrame:
    """The report's derived columns, from the raw CSV: the time over first_order's at the
    same N, ms per inner step, and the memory and time models' errors (predicted/measured
    - 1). Older CSVs without an ``exact`` column get it from the run registry."""
    df = df.copy()
    if "exact" not in df:
        import effmaml

        from .presets import RUNS

        df["exact"] = df.strategy.map(
            lambda s: s in RUNS and effmaml.STRATEGIES[RUNS[s].strategy].exact
        )
    fo = df[(df.strategy == "first_order") & (df.status == "ok")].set_index("steps").time_s
    df["overhead_vs_first_order"] = df.time_s / df.steps.map(fo)
    df["ms_per_step"] = 1000 * df.time_s / df.steps
    df["prediction_error"] = _ratio(df, "predicted_peak_mib", "peak_mib")
    df["time_prediction_error"] = _ratio(df, "predicted_s", "time_s")
    return df


def _ratio(df: pd.DataFrame, predicted: str, measured: str) -> pd.Series:
    if predicted not in df or measured not in df:
        return pd.Series(float("nan"), index=df.index)
    return pd.to_numeric(df[predicted], errors="coerce") / df[measured] - 1


_PEER_MARKERS = {"torch_maml": "s", "higher": "D"}
# matplotlib's ten, then six more of distinct hues: sixteen strategies, none alike
_COLOURS = [
    *plt.get_cmap("tab10").colors,
    "#000000",
    "#b8860b",
    "#008080",
    "#000080",
    "#ff00ff",
    "#556b2f",
]


def styles(df: pd.DataFrame) -> dict[str, dict]:
    """A line style per strategy, told apart by family and colour: effmaml's exact
    strategies solid with circles, its approximations dotted with triangles, peers dashed
    with their own markers; each strategy its own colour (in the order the CSV lists them),
    none alike up to sixteen strategies."""
    out = {}
    for i, (label, g) in enumerate(df.groupby("strategy", sort=False)):
        r = g.iloc[0]
        peer = str(r.get("peer", "") or "")
        peer = "" if peer == "nan" else peer
        if peer:
            line, marker = "--", _PEER_MARKERS.get(peer, "P")
        elif str(r.get("exact", "")) == "True":
            line, marker = "-", "o"
        else:
            line, marker = ":", "^"
        out[label] = {
            "linestyle": line,
            "marker": marker,
            "color": _COLOURS[i % len(_COLOURS)],
        }
    return out


def _plot(df: pd.DataFrame, column: str, ylabel: str, path: Path, title: str) -> None:
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    style = styles(df)
    for label, g in df.groupby("strategy", sort=False):
        ok = g[g.status == "ok"].sort_values("steps")
        if len(ok):
            ax.plot(ok.steps, ok[column], label=label, markersize=4, **style[label])
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
    ax.legend(
        fontsize=6.5,
        ncol=2,
        title="solid: exact · dotted: approximate · dashed: peers",
        title_fontsize=6.5,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary_table(df: pd.DataFrame) -> str:
    """Per strategy, at the largest N where it ran: memory, time, overhead, agreement."""
    # under autocast: also the cosine with float32 naive's meta-gradient (what AMP costs)
    fp32 = "grad_cosine_fp32" in df and df.grad_cosine_fp32.notna().any()
    lines = [
        "| strategy | N | status | peak MiB | predicted MiB (err) | time s | ms/step "
        "| predicted s (err) | × first_order | step evals | rel. L2 vs ref. | cosine vs ref. |"
        + (" cosine vs float32 naive |" if fp32 else ""),
        "|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if fp32 else ""),
    ]
    for label, g in df.groupby("strategy", sort=False):
        ok = g[g.status == "ok"]
        r = ok.loc[ok.steps.idxmax()] if len(ok) else g.loc[g.steps.idxmax()]

        def fmt(v, spec):
            return "" if pd.isna(v) or v == "" else format(float(v), spec)

        pred = ""
        if "predicted_peak_mib" in r and not pd.isna(r.predicted_peak_mib):
            pred = f"{r.predicted_peak_mib:.0f} ({r.prediction_error:+.0%})"
        pred_s = ""
        if "time_prediction_error" in r and not pd.isna(r.time_prediction_error):
            pred_s = f"{r.predicted_s:.2f} ({r.time_prediction_error:+.0%})"
        lines.append(
            f"| {label} | {int(r.steps)} | {r.status} | {fmt(r.peak_mib, '.0f')} | {pred} | "
            f"{fmt(r.time_s, '.2f')} | {fmt(r.ms_per_step, '.0f')} | {pred_s} | "
            f"{fmt(r.overhead_vs_first_order, '.2f')} | "
            f"{fmt(r.step_evals, '.0f')} | {fmt(r.grad_rel_l2, '.1e')} | "
            f"{fmt(r.grad_cosine, '.6f')} |"
            + (f" {fmt(r.grad_cosine_fp32, '.4f')} |" if fp32 else "")
        )
    return "\n".join(lines)


def reference_note(df: pd.DataFrame) -> str:
    """Which meta-gradient each N was compared with, and why that one can be trusted."""
    if "reference" not in df or df.reference.isna().all():
        return "Agreement: against naive at the same N."
    parts = []
    for ref, g in df[df.reference.notna()].groupby("reference", sort=False):
        ns = ", ".join(str(n) for n in sorted(g.steps.unique()))
        parts.append(f"{ref} at N = {ns}")
    text = "Agreement (rel. L2, cosine) against " + "; ".join(parts) + "."
    stand_in = df[(df.strategy == STAND_IN) & (df.reference == REFERENCE)]
    if not stand_in.empty and (df.reference == STAND_IN).any():
        r = stand_in.loc[stand_in.steps.idxmax()]
        text += (
            f" Where naive does not fit, {STAND_IN} stands in: it matched naive "
            f"at N={r.steps}, the largest N where both ran (rel. L2 {r.grad_rel_l2:.1e})."
        )
    repeats = df[df.status == "ok"].repeats.dropna()
    if len(repeats):
        text += f" Timed meta-gradients per cell: {int(repeats.min())}–{int(repeats.max())}."
    return text


def pivot(df: pd.DataFrame, column: str, spec: str) -> str:
    """strategy x N table of ``column`` (blank where the run did not finish)."""
    ok = df[df.status == "ok"]
    table = ok.pivot_table(index="strategy", columns="steps", values=column, aggfunc="first")
    table = table.reindex(index=df.strategy.unique(), columns=sorted(df.steps.unique()))
    table = table.map(lambda v: "" if pd.isna(v) else format(float(v), spec))
    table.columns = [f"N={n}" for n in table.columns]
    return table.to_markdown()


def _tradeoff_n(df: pd.DataFrame) -> int | None:
    """The largest N at which most strategies have both a peak and a time."""
    ok = df[(df.status == "ok") & df.time_s.notna()]
    if ok.empty:
        return None
    counts = ok.groupby("steps").strategy.nunique()
    best = counts.max()
    return int(max(n for n, c in counts.items() if c >= best - 1))


def tradeoff_plot(df: pd.DataFrame, path: Path, title: str) -> int | None:
    """Seconds vs peak memory at one N, every strategy and peer: the trade-off curve."""
    n = _tradeoff_n(df)
    if n is None:
        return None
    ok = df[(df.status == "ok") & (df.steps == n) & df.time_s.notna()]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    style = styles(df)
    for _, r in ok.iterrows():
        st = style[r.strategy]
        ax.scatter(r.peak_mib, r.time_s, marker=st["marker"], color=st["color"], s=40)
        ax.annotate(
            r.strategy,
            (r.peak_mib, r.time_s),
            fontsize=7,
            xytext=(4, 2),
            textcoords="offset points",
        )
    ax.set_xscale("log")
    ax.set_xlabel("peak memory MiB (log)")
    ax.set_ylabel("seconds per meta-gradient")
    ax.set_title(f"{title}\nN={n}: time vs memory (o exact, ^ approximate, s/D peers)", fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return n


def _row(df, label, n):
    r = df[(df.strategy == label) & (df.steps == n) & (df.status == "ok")]
    return None if r.empty else r.iloc[0]


def _exact_rows(df: pd.DataFrame) -> pd.DataFrame:
    """effmaml's exact strategies (not peers), by the CSV's ``exact`` column."""
    peer = df.peer.where(df.peer.notna(), "").astype(str) if "peer" in df else ""
    return df[(df.exact.astype(str) == "True") & (peer == "")]


def _half_memory_n40(df: pd.DataFrame) -> list[str]:
    """N=40: some exact schedule at ≤ 50% of torch_maml_checkpoint's peak, ≤ 2x naive's time."""
    ref, naive = _row(df, "torch_maml_checkpoint", 40), _row(df, "naive", 40)
    if ref is None or naive is None:
        return []
    hits = []
    for s in _exact_rows(df).strategy.unique():
        r = _row(df, s, 40)
        if s == "naive" or r is None or pd.isna(r.time_s):
            continue
        mem, t = r.peak_mib / ref.peak_mib, r.time_s / naive.time_s
        name = s if pd.isna(r.get("chosen")) or not r.get("chosen") else f"{s} ({r.chosen})"
        ok = " ✓" if mem <= 0.5 and t <= 2.0 else ""
        hits.append(f"{name} {mem:.0%} of the memory, {t:.2f}x the time{ok}")
    return [
        f"- N=40, peak ≤ 50% of torch_maml_checkpoint's ({ref.peak_mib:.0f} MiB) and "
        f"time ≤ 2x naive's ({naive.time_s:.2f} s): " + "; ".join(hits)
    ]


def _revolve_flat(df: pd.DataFrame) -> list[str]:
    """revolve with fixed slots: peak from N=20 to N=160 grows ≤ 20%."""
    out = []
    for s in sorted(x for x in df.strategy.unique() if str(x).startswith("revolve")):
        a, b = _row(df, s, 20), _row(df, s, 160)
        if a is not None and b is not None:
            g = b.peak_mib / a.peak_mib - 1
            out.append(
                f"- {s}: peak {a.peak_mib:.0f} MiB at N=20, {b.peak_mib:.0f} MiB at N=160: "
                f"{g:+.1%} (target ≤ +20%){' ✓' if g <= 0.2 else ' ✗'}"
            )
    return out


def _memory_floor(df: pd.DataFrame) -> list[str]:
    """The memory-floor schedules at N=500 and 1000: ≤ 3 GiB."""
    out = []
    for n in (500, 1000):
        for s in _exact_rows(df).strategy.unique():
            r = _row(df, s, n)
            if r is not None:
                gib = r.peak_mib / 1024
                out.append(
                    f"- N={n} {s}: peak {gib:.2f} GiB (target ≤ 3 GiB){' ✓' if gib <= 3 else ' ✗'}"
                )
    return out


def _model_fit(df: pd.DataFrame, column: str, what: str, bound: float) -> list[str]:
    rows = _exact_rows(df) if what == "time" else df
    rows = rows[(rows.status == "ok") & rows[column].notna()] if column in rows else rows[0:0]
    if rows.empty:
        return []
    worst = rows.loc[rows[column].abs().idxmax()]
    within = (rows[column].abs() <= bound).mean()
    kind = "exact rows" if what == "time" else "rows"
    return [
        f"- {what} model: {within:.0%} of {len(rows)} {kind} within ±{bound:.0%} of the "
        f"measured {'time' if what == 'time' else 'peak'}; worst {worst.strategy} "
        f"N={worst.steps}: {worst[column]:+.0%}"
    ]


def _auto_vs_named(df: pd.DataFrame) -> list[str]:
    """auto under a budget ≤ 1.15x the time of the fastest named exact strategy whose
    measured peak fits the same budget."""
    from effmaml.memory import parse_bytes

    out = []
    exact = _exact_rows(df[df.status == "ok"])
    named = exact[~exact.strategy.str.startswith("auto")]
    for _, r in exact[exact.strategy.str.startswith("auto_")].iterrows():
        budget_mib = parse_bytes(r.strategy.split("_", 1)[1]) / 2**20
        same_n = named[(named.steps == r.steps) & (named.peak_mib <= budget_mib)]
        same_n = same_n[same_n.time_s.notna()]
        if same_n.empty or pd.isna(r.time_s):
            continue
        best = same_n.loc[same_n.time_s.idxmin()]
        ratio = r.time_s / best.time_s
        out.append(
            f"- N={r.steps}, budget {budget_mib:.0f} MiB: auto chose {r.chosen} "
            f"({r.peak_mib:.0f} MiB, {r.time_s:.2f} s); fastest named exact strategy that fits: "
            f"{best.strategy} ({best.peak_mib:.0f} MiB, {best.time_s:.2f} s): {ratio:.2f}x "
            f"(target ≤ 1.15x){' ✓' if ratio <= 1.15 else ' ✗'}"
        )
    return out


TARGETS = {
    "half_memory_n40": _half_memory_n40,
    "revolve_flat": _revolve_flat,
    "memory_floor": _memory_floor,
    "auto_vs_named": _auto_vs_named,
    "memory_model": lambda df: _model_fit(df, "prediction_error", "memory", 0.15),
    "time_model": lambda df: _model_fit(df, "time_prediction_error", "time", 0.25),
}


def targets(df: pd.DataFrame, names=None) -> list[str]:
    """The preset's targets (:data:`TARGETS` by name), as measured in this CSV."""
    if names is None:
        names = _preset_targets(str(df.iloc[0].preset))
    return [line for name in names for line in TARGETS[name](df)]


def _preset_targets(name: str) -> tuple[str, ...]:
    from .presets import PRESETS

    base = name.split("-amp-")[0]
    return PRESETS[base].targets if base in PRESETS else ("memory_model", "time_model")


def write_report(out_dir: Path | str) -> None:
    """Write memory_vs_steps.png, time_vs_steps.png and summary.md next to runs.csv."""
    out_dir = Path(out_dir)
    df = derive_columns(pd.read_csv(out_dir / "runs.csv"))
    first = df.iloc[0]
    title = f"{first.preset}: {_describe(first)} — {first['device']}, torch {first['torch']}"
    _plot(
        df,
        "peak_mib",
        f"peak memory MiB ({first.memory_kind})",
        out_dir / "memory_vs_steps.png",
        title,
    )
    _plot(df, "time_s", "seconds per meta-gradient (median)", out_dir / "time_vs_steps.png", title)
    n_trade = tradeoff_plot(df, out_dir / "tradeoff.png", title)
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
        reference_note(df),
        "",
        "Peak MiB at each N:",
        "",
        pivot(df, "peak_mib", ".0f"),
        "",
        "Seconds per meta-gradient at each N:",
        "",
        pivot(df, "time_s", ".2f"),
        "",
    ]
    tg = targets(df)
    if tg:
        text += ["Targets:", "", *tg, ""]
    if n_trade is not None:
        text += [f"Time vs memory at N={n_trade}: tradeoff.png", ""]
    if len(errors):
        text += ["Runs that did not finish:", ""]
        text += [
            f"- {r.strategy} N={r.steps}: {r.status} — {r.error}" for _, r in errors.iterrows()
        ]
        text.append("")
    (out_dir / "summary.md").write_text("\n".join(text))


def headline(out_dir: Path | str) -> str:
    """The table a sweep prints when it ends: its summary's first table and targets."""
    text = (Path(out_dir) / "summary.md").read_text()
    keep = [ln for ln in text.splitlines() if ln.startswith(("|", "- ", "#"))]
    return "\n".join(keep)


def claims(root: Path | str = "results") -> str:
    """The seed's claims against what the committed CSVs measured (claims.md)."""
    root = Path(root)
    sweeps = {d.name: derive_columns(pd.read_csv(d / "runs.csv")) for d in sweep_dirs(root)}
    rows = []
    gpu = sweeps.get("resnet18-224")
    notebook = "not measured yet (no resnet18-224 CSV)"
    if gpu is not None:
        ok = gpu[gpu.status == "ok"]
        tm = ok[ok.strategy == "torch_maml_checkpoint"]
        big = ok[(ok.steps >= 500) & (ok.exact.astype(str) == "True") & (ok.peer.isna())]
        cells = []
        if not tm.empty:
            r = tm.loc[tm.steps.idxmax()]
            cells.append(f"torch_maml checkpoint (k=5) at N={r.steps}: {r.peak_mib / 1024:.2f} GiB")
        if not big.empty:
            r = big.loc[big.peak_mib.idxmin()]
            cells.append(
                f"effmaml's least at N={r.steps}: {r.strategy} {r.peak_mib / 1024:.2f} GiB"
            )
        notebook = "; ".join(cells) + f" ({gpu.iloc[0].device})" if cells else notebook
    rows.append(
        (
            '">500 steps on an 11 GB GPU" with segments of 5 (seed notebook; ResNet18, '
            "16x3x224x224)",
            notebook,
            "results/resnet18-224",
        )
    )
    speed, cosine = [], []
    for name, df in sweeps.items():
        if "-amp-" in name:  # compared with bf16 naive there, not the float32 meta-gradient
            continue
        ok = df[df.status == "ok"]
        fo = ok[ok.strategy == "first_order"].set_index("steps")
        naive = ok[ok.strategy == "naive"].set_index("steps")
        timed = fo.time_s.notna() & naive.time_s.reindex(fo.index).notna()
        both = sorted(n for n in fo.index[timed] if n in naive.index)
        if not both:
            continue
        ratios = ", ".join(f"{naive.time_s[n] / fo.time_s[n]:.1f}x at N={n}" for n in both)
        speed.append(f"{name}: {ratios}")
        cos = ", ".join(f"{fo.grad_cosine[n]:.2f} at N={n}" for n in sorted(fo.index))
        cosine.append(f"{name}: {cos}")
    rows.append(
        (
            "first-order MAML is ≈33% faster than second order (Finn et al. 2017, a small "
            "conv net on a GPU)",
            "second order (naive) over first order: " + "; ".join(speed),
            "results/*/runs.csv",
        )
    )
    rows.append(
        (
            'first-order MAML is "almost as good" (Finn et al. 2017)',
            "cosine of first order's meta-gradient with the exact one: "
            + "; ".join(cosine)
            + _fewshot_first_order(root / "fewshot" / "runs.csv"),
            "results/*/runs.csv, results/fewshot",
        )
    )
    table = pd.DataFrame(rows, columns=["claim", "what we measured", "where"])
    return "### The seed's claims, measured\n\n" + table.to_markdown(index=False) + "\n"


def _fewshot_first_order(path: Path) -> str:
    """MAML against first order after each method's own adaptation, per few-shot problem
    (accuracy for images, mean squared error for sine), from make fewshot's CSV."""
    if not path.exists():
        return ""
    df = pd.read_csv(path)
    own = df[df.adapt.astype(str) == "own"].groupby(["problem", "method"])["mean"].mean()
    cells = []
    for problem in own.index.get_level_values(0).unique():
        if {"maml", "first_order"} - set(own[problem].index):
            continue
        m, f = own[problem]["maml"], own[problem]["first_order"]
        if problem == "sine":
            cells.append(f"sine test MSE: MAML {m:.2f}, first order {f:.2f}")
        else:
            cells.append(f"{problem} 5-way 1-shot: MAML {100 * m:.1f}%, first order {100 * f:.1f}%")
    return ". Few-shot (make fewshot): " + "; ".join(cells) if cells else ""


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
    # what a newcomer reproduces first (make bench on a CPU), the claims, the GPU sweep,
    # then the rest by name
    first = ["cpu-quick", "claims", "resnet18-224"]

    def name(p: Path) -> str:
        return p.stem if p.name == "claims.md" else p.parent.name

    summaries = sorted(
        [*root.glob("*/summary.md"), *root.glob("claims.md")],
        key=lambda p: (first.index(name(p)) if name(p) in first else len(first), name(p)),
    )
    for summary in summaries:
        body = summary.read_text().strip()
        if body.startswith("# "):
            body = body.replace("# ", "### ", 1)
        elif not body.startswith("#"):
            body = f"### {summary.parent.name}\n\n{body}"
        parts += [body, ""]
        for png in ("memory_vs_steps.png", "tradeoff.png", "loss_vs_steps.png"):
            if (summary.parent / png).exists():
                parts += [f"![{png[:-4]}]({summary.parent / png})", ""]
    block = "\n".join([START, *parts, END]) if parts else f"{START}\n{END}"
    head, rest = text.split(START, 1)
    readme.write_text(head + block + rest.split(END, 1)[1])
    return True


def sweep_dirs(root: Path | str = "results") -> list[Path]:
    """The folders under ``root`` holding a sweep's runs.csv (not fewshot's or scaling's)."""
    return [
        p.parent
        for p in sorted(Path(root).glob("*/runs.csv"))
        if "strategy" in p.read_text().partition("\n")[0].split(",")
    ]


if __name__ == "__main__":
    dirs = sys.argv[1:] or sweep_dirs()
    for d in dirs:
        write_report(d)
        print(f"wrote {d}/summary.md and plots")
    if not sys.argv[1:]:
        Path("results/claims.md").write_text(claims("results"))
        print("wrote results/claims.md")
    if not sys.argv[1:] and update_readme():
        print("updated README.md results section")
