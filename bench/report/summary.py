"""A sweep's summary: the derived columns, the plots and summary.md, from runs.csv alone."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd

from ..models import INPUTS
from ..presets import REFERENCE, STAND_IN, base_preset
from .targets import targets

__all__ = [
    "derive_columns",
    "headline",
    "pivot",
    "styles",
    "summary_table",
    "sweep_dirs",
    "tradeoff_plot",
    "write_report",
]


def _describe(row: pd.Series) -> str:
    """The set-up of a CSV row: model, input, dtype, autocast, clipping."""
    model = row.get("model", "resnet18")
    model = "resnet18" if pd.isna(model) else model
    amp = row.get("amp", "")
    amp = f", autocast {amp}" if isinstance(amp, str) and amp else ""
    clip = "no clipping" if pd.isna(row["clip"]) else f"clip {row['clip']:g}"
    if INPUTS.get(str(model)) == "tokens":  # the preset knows the model's sizes
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

        from ..presets import RUNS

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


_PEER_MARKERS = {"torch_maml": "s", "higher": "D", "torchopt": "v"}
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
    """Per strategy, at the largest N where it ran and was timed (where it ran, if the
    preset timed it nowhere): memory, time, overhead, agreement. The peak table beside it
    has every N."""
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
        if ok.time_s.notna().any():
            ok = ok[ok.time_s.notna()]
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


def peers_note(df: pd.DataFrame) -> str:
    """The peers this preset ran, their versions and state, and learn2learn's status."""
    from ..peers import PEER_STATUS

    ran = [p for p in PEER_STATUS if "peer" in df and (df.peer.astype(str) == p).any()]
    if not ran:
        return ""
    return "Peers: " + "; ".join(PEER_STATUS[p] for p in [*ran, "learn2learn"]) + "."


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
        *([peers_note(df), ""] if peers_note(df) else []),
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


def sweep_dirs(root: Path | str = "results") -> list[Path]:
    """The folders under ``root`` holding a sweep's runs.csv (not fewshot's or scaling's)."""
    return [
        p.parent
        for p in sorted(Path(root).glob("*/runs.csv"))
        if "strategy" in p.read_text().partition("\n")[0].split(",")
    ]
