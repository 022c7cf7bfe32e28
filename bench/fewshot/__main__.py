"""``python -m bench.fewshot`` (``make fewshot``): few-shot learning the way the field runs
it, and what long inner horizons buy (``--horizon``, ``make fewshot-horizon``).

Problems (the same tasks, test episodes and outer budget for every method):

* ``characters``: 5-way 1-shot image classification, 15 query images per class, on the
  embedded procedural character set (``bench/fewshot/data.py``; Omniglot's split and
  rotations, episodes from ``effmaml.EpisodeSampler``). ``--data omniglot:/path`` or
  ``miniimagenet:/path`` runs the same on the real data sets, read from disk. Model:
  Conv-4 (Finn et al. 2017; the filters are a preset field). Accuracy on held-out classes.
* ``sine``: Finn et al.'s regression (the seed's example), MLP 1-40-40-1, query MSE.

Methods: ``maml`` (second order, exact), ``first_order``, ``implicit`` (iMAML in its own
regime: more, smaller inner steps on the proximal objective, λ chosen on the validation
classes), ``transfer`` (pre-trained on all training classes pooled, the head fine-tuned on
the support set) and ``random`` (a random initialisation fine-tuned). The meta-learners
train with :class:`effmaml.MetaTrainer`; ``transfer`` with the same optimizer for the same
number of outer steps on as many images. Evaluation: a fixed set of test episodes per seed,
the same for every method; accuracy (or loss) after k plain SGD steps on the support set,
and after the method's own adaptation (the headline); mean ± 95% CI over seeds × episodes.

Writes ``results/fewshot/`` (runs.csv, per-episode values, meta.json with iMAML's λ and the
run's minutes, summary.md with the published numbers beside ours, accuracy_vs_steps.png)
or, with ``--horizon``, results/fewshot-horizon/. ``--report-only`` rewrites summary.md and
the plot from runs.csv, the per-episode values and meta.json (the problems, seeds and
methods given as for the run).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import pandas as pd

from .problems import HORIZON, METHODS, PROBLEMS
from .report import write, write_horizon
from .run import run


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.fewshot", description=__doc__)
    ap.add_argument(
        "--data",
        default="characters",
        help="characters (embedded), omniglot:/path or miniimagenet:/path",
    )
    ap.add_argument("--problems", default="characters,characters-5shot,sine")
    ap.add_argument("--seeds", help="default 0,1,2 (the horizon experiment: 0,1)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--iterations", type=int, help="outer steps (default: the problem's)")
    ap.add_argument("--horizon", action="store_true", help="the long-horizon experiment")
    ap.add_argument("--methods", help="comma-separated subset of the methods (default: all)")
    ap.add_argument("--out", help="default results/fewshot (or results/fewshot-horizon)")
    ap.add_argument(
        "--report-only",
        action="store_true",
        help="rewrite summary.md and the plot from what --out holds (runs.csv, values.csv.gz, "
        "meta.json); nothing runs",
    )
    a = ap.parse_args(argv)
    seeds = tuple(int(s) for s in (a.seeds or ("0,1" if a.horizon else "0,1,2")).split(","))
    problems = []
    for name in a.problems.split(","):
        p = PROBLEMS[name]
        if p.kind == "image" and a.data != "characters":
            kind = a.data.partition(":")[0]
            p = dataclasses.replace(p, name=p.name.replace("characters", kind), data=a.data)
            if kind == "miniimagenet":  # Finn et al.: 32 filters, 5 inner steps of 0.01
                p = dataclasses.replace(p, inner_lr=0.01, inner_steps=5)
        if a.iterations:
            p = dataclasses.replace(p, iterations=a.iterations)
        problems.append(p)
    t0 = time.perf_counter()
    out = Path(a.out or ("results/fewshot-horizon" if a.horizon else "results/fewshot"))
    methods = tuple(a.methods.split(",")) if a.methods else METHODS
    unknown = set(methods) - set(METHODS)
    if unknown:
        ap.error(f"unknown methods {sorted(unknown)}; known: {', '.join(METHODS)}")
    if a.horizon:
        problems = [HORIZON.apply(problems[0])]
        if a.iterations:
            problems = [dataclasses.replace(problems[0], iterations=a.iterations)]
    if a.report_only:  # what was measured, reported again
        runs = pd.read_csv(out / "runs.csv", keep_default_na=False, na_values=[""])
        values = pd.read_csv(out / "values.csv.gz", keep_default_na=False, na_values=[""])
        meta = json.loads((out / "meta.json").read_text())
        lams, seconds = meta["lams"], meta["seconds"]
    else:
        if a.horizon:
            runs, values, lams = run(problems, seeds, a.workers, HORIZON.methods, HORIZON.steps)
        else:
            runs, values, lams = run(problems, seeds, a.workers, methods)
        seconds = time.perf_counter() - t0
        out.mkdir(parents=True, exist_ok=True)
        (out / "meta.json").write_text(json.dumps({"lams": lams, "seconds": seconds}))
    raw = not a.report_only
    if a.horizon:
        write_horizon(out, runs, values, problems[0], lams, seeds, seconds, raw=raw)
    else:
        write(out, runs, values, lams, problems, seeds, seconds, raw=raw)
    print((out / "summary.md").read_text())
    print(f"fewshot: {time.perf_counter() - t0:.0f} s; wrote {out}/")


if __name__ == "__main__":
    main()
