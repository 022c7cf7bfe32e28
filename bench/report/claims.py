"""The seed's claims against what the committed CSVs measured (results/claims.md)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from .summary import derive_columns, sweep_dirs

__all__ = ["claims"]


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
