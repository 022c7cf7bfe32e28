"""``python -m bench.fewshot_speed`` (``make fewshot-speed``): the command line."""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd
import torch

from . import __doc__ as DOC
from .libraries import LIBRARIES, Speed
from .report import config_of, summary
from .run import run

__all__ = ["main"]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.fewshot_speed", description=DOC)
    ap.add_argument("--meta-batch", type=int, help="default 32 on CUDA, 8 on CPU")
    ap.add_argument(
        "--rounds", type=int, default=Speed.rounds, help="at least 2 (even: choose, odd: measure)"
    )
    ap.add_argument("--steps", default="1,5,10", help="N of the MAML family")
    ap.add_argument("--imaml-steps", default="5,10", help="N of the iMAML family")
    ap.add_argument(
        "--libraries",
        default=",".join(LIBRARIES),
        help=f"a comma-separated subset of: {', '.join(LIBRARIES)}",
    )
    ap.add_argument("--out", default="results/fewshot-speed")
    ap.add_argument(
        "--report",
        metavar="DIR",
        help="run nothing: rewrite DIR/summary.md from DIR/runs.csv (after the summary's "
        "format changed)",
    )
    a = ap.parse_args(argv)
    if a.report:
        out = Path(a.report)
        df = pd.read_csv(out / "runs.csv")
        if "run_s" not in df:
            ap.error(f"{out}/runs.csv has no run_s column (the run's seconds); run it again")
        (out / "summary.md").write_text(summary(df, config_of(df), float(df.run_s.iloc[0])))
        print((out / "summary.md").read_text())
        return
    libraries = tuple(a.libraries.split(","))
    unknown = [lib for lib in libraries if lib not in LIBRARIES]
    if unknown:
        ap.error(f"unknown libraries {unknown}; known: {', '.join(LIBRARIES)}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = Speed(
        rounds=a.rounds,
        steps=tuple(int(s) for s in a.steps.split(",") if s),
        imaml_steps=tuple(int(s) for s in a.imaml_steps.split(",") if s),
    )
    cfg = replace(cfg, meta_batch=a.meta_batch or (32 if device.type == "cuda" else 8))
    t0 = time.perf_counter()
    df = run(cfg, device, libraries)
    df["run_s"] = time.perf_counter() - t0
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / "runs.csv", index=False)
    (out / "summary.md").write_text(summary(df, cfg, float(df.run_s.iloc[0])))
    print((out / "summary.md").read_text())


if __name__ == "__main__":
    main()
