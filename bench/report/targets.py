"""The targets a preset's sweep is checked against (:data:`TARGETS`, named by the preset)."""

from __future__ import annotations

import pandas as pd

from effmaml.memory import parse_bytes

from ..presets import RUNS, base_preset

__all__ = ["TARGETS", "exact_rows", "row_at", "targets"]


def row_at(df, label, n):
    r = df[(df.strategy == label) & (df.steps == n) & (df.status == "ok")]
    return None if r.empty else r.iloc[0]


def exact_rows(df: pd.DataFrame) -> pd.DataFrame:
    """effmaml's exact strategies (not peers), by the CSV's ``exact`` column."""
    peer = df.peer.where(df.peer.notna(), "").astype(str) if "peer" in df else ""
    return df[(df.exact.astype(str) == "True") & (peer == "")]


def _half_memory_n40(df: pd.DataFrame) -> list[str]:
    """N=40: some exact schedule at ≤ 50% of torch_maml_checkpoint's peak, ≤ 2x naive's time."""
    ref, naive = row_at(df, "torch_maml_checkpoint", 40), row_at(df, "naive", 40)
    if ref is None or naive is None:
        return []
    hits = []
    for s in exact_rows(df).strategy.unique():
        r = row_at(df, s, 40)
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
        a, b = row_at(df, s, 20), row_at(df, s, 160)
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
        for s in exact_rows(df).strategy.unique():
            r = row_at(df, s, n)
            if r is not None:
                gib = r.peak_mib / 1024
                out.append(
                    f"- N={n} {s}: peak {gib:.2f} GiB (target ≤ 3 GiB){' ✓' if gib <= 3 else ' ✗'}"
                )
    return out


def _model_fit(df: pd.DataFrame, column: str, what: str, bound: float) -> list[str]:
    rows = exact_rows(df) if what == "time" else df
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
    out = []
    exact = exact_rows(df[df.status == "ok"])
    named = exact[~exact.strategy.str.startswith("auto")]
    for _, r in exact[exact.strategy.str.startswith("auto_")].iterrows():
        budget_mib = parse_bytes(RUNS[r.strategy].opts()["memory_budget"]) / 2**20
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
    """The targets of the preset a results folder comes from (batch and autocast variants
    included: :func:`bench.presets.base_preset`)."""
    base = base_preset(name)
    return base.targets if base is not None else ("memory_model", "time_model")
