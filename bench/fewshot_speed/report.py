"""fewshot-speed's summary.md: the speed table, the verdicts against the fastest peer, the
work table; rebuilt from a run's runs.csv as well as written after the run."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields

import pandas as pd

from .libraries import FAMILIES, LIBRARIES, REFERENCE, Speed

__all__ = ["config_of", "speed_table", "summary", "verdicts", "work_table"]


def _ratio(r: pd.Series) -> str:
    return f"{r.vs_fastest_peer:.2f}x [{r.vs_fastest_peer_lo:.2f}, {r.vs_fastest_peer_hi:.2f}]"


def _per_n(df: pd.DataFrame, cell: Callable[[pd.Series], str], label: str) -> pd.DataFrame:
    """library x N table of ``cell(row)``, ``—`` where a library does not run at that N."""
    out = pd.DataFrame(index=list(dict.fromkeys(df.library)))
    out["family"] = df.groupby("library", sort=False).family.first().map(FAMILIES)
    for n, at in df.groupby("steps"):
        out[f"N={n}{label}"] = at.set_index("library").apply(cell, axis=1)
    return out.fillna("—")


def speed_table(df: pd.DataFrame) -> str:
    """Seconds per meta-iteration and the paired ratio to the fastest peer, per N, and the
    largest disagreement with the family's reference."""
    out = _per_n(df, lambda r: f"{r.s_per_iteration:.3f} s · {_ratio(r)}", "")
    worst = df.groupby("library", sort=False).grad_rel_l2.max().map("{:.1e}".format)
    out["rel. L2 vs reference"] = worst
    return out.to_markdown()


def work_table(df: pd.DataFrame) -> str:
    """Operations dispatched and peak memory of one meta-iteration, per N."""
    return _per_n(df, lambda r: f"{int(r.aten_ops):,} ops · {r.peak_mib:.0f} MiB", "").to_markdown()


def verdicts(df: pd.DataFrame, target: float = 1.05) -> list[str]:
    """Per family and N, effmaml's reference row against the fastest peer, in words, with
    the work each dispatches (and, for MAML, the hand-written loop's: the floor)."""
    lines = []
    for family, ref in REFERENCE.items():
        for _, r in df[(df.library == ref)].sort_values("steps").iterrows():
            within = "within" if r.vs_fastest_peer <= target else "**over**"
            tell = (
                "this run cannot tell them apart"
                if r.vs_fastest_peer_lo <= 1.0 <= r.vs_fastest_peer_hi
                else ("faster" if r.vs_fastest_peer_hi < 1.0 else "slower")
            )
            at = df[df.steps == r.steps].set_index("library").aten_ops
            ops = f"{int(r.aten_ops):,} ops against {r.fastest_peer}'s {int(at[r.fastest_peer]):,}"
            if family == "maml" and "torch.func loop" in at and r.fastest_peer != "torch.func loop":
                ops += f" and the torch.func loop's {int(at['torch.func loop']):,}"
            lines.append(
                f"- {FAMILIES[family]} N={r.steps}: {ref} / {r.fastest_peer} = {_ratio(r)} "
                f"({100 * r.ci_coverage:.0f}% interval): {within} {target:.2f}x; {tell}. "
                f"{ops}."
            )
    return lines


def _setting(df: pd.DataFrame, cfg: Speed) -> str:
    """What ran: the families present, and the peers that ran beside effmaml."""
    parts = []
    for family, what in (
        ("maml", f"MAML: inner SGD {cfg.lr}, second order"),
        (
            "imaml",
            f"iMAML: inner SGD {cfg.imaml_lr} on the proximal objective, λ = "
            f"{cfg.imaml_lam}, {cfg.cg_steps} CG steps, damping {cfg.cg_damping}, TorchOpt's "
            "implicit differentiation solving the same linear system",
        ),
    ):
        ran = list(dict.fromkeys(df[df.family == family].library))
        if ran:
            parts.append(f"{what} ({', '.join(ran)})")
    return "; ".join(parts)


def summary(df: pd.DataFrame, cfg: Speed, seconds: float) -> str:
    """The summary.md text: the speed table, the verdicts, the work table."""
    r = df.iloc[0]
    ran = list(dict.fromkeys(df.library))
    who = "every library" if set(ran) == set(LIBRARIES) else " and ".join(ran)
    lines = [
        f"# fewshot-speed: the daily workload, {who} side by side",
        "",
        f"Conv-4 ({cfg.width} filters) on 1x{cfg.image}x{cfg.image}, {cfg.n_way}-way "
        f"{cfg.k_shot}-shot with {cfg.k_query} queries per class, meta-batch "
        f"{cfg.meta_batch}, {cfg.dtype}. {_setting(df, cfg)}. Each cell: seconds per "
        f"meta-iteration (median of {cfg.rounds} rounds after a warm-up, the libraries "
        f"alternating within each round) · the median over the odd rounds of the time over "
        f"the fastest peer's in the same round, the fastest chosen on the even rounds "
        f"[{100 * df.ci_coverage.min():.0f}% interval, distribution-free]. {r.device}, "
        f"torch {r.torch}, {r.threads} threads; {seconds / 60:.1f} minutes.",
        "",
        speed_table(df),
        "",
        *(
            [
                "iMAML is not run at N = 1: one step does not reach the inner solution its "
                "gradient is taken at; there the Hessian is indefinite and the conjugate "
                "gradient stops."
            ]
            if (df.family == "imaml").any()
            else []
        ),
        "rel. L2: the meta-gradient against the family's reference (effmaml naive, effmaml "
        f"implicit) on the same tasks, {cfg.dtype} (equal to 1e-12 in float64: "
        "tests/test_fewshot_speed.py).",
        "",
        "## effmaml against the fastest peer",
        "",
        *verdicts(df),
        "",
        "## The work: operations dispatched and peak memory of one meta-iteration",
        "",
        work_table(df),
        "",
        "Operations: every ATen call, forward and backward (bench.timing.count_ops), a count "
        "no load on the machine changes. Peak: the resident-set growth (CPU) or allocated "
        "peak (CUDA) of one more meta-iteration.",
        "",
    ]
    return "\n".join(lines)


def config_of(df: pd.DataFrame) -> Speed:
    """The :class:`Speed` a ``runs.csv`` was measured with (its columns carry every field)."""
    r = df.iloc[0]
    values = {}
    for f in fields(Speed):
        if f.name in ("steps", "imaml_steps"):  # the column "steps" is each row's N
            family = "imaml" if f.name == "imaml_steps" else "maml"
            values[f.name] = tuple(sorted(int(n) for n in set(df[df.family == family].steps)))
        else:
            values[f.name] = type(getattr(Speed, f.name))(r[f.name])
    return Speed(**values)
