"""``python -m bench.omniglot`` (``make fewshot-omniglot``): real Omniglot, Lake et al.'s
one-shot task, meta-trained on each "minimal" background set in turn.

Reads the committed archives in ``data/omniglot/`` (checksums verified), runs every few-shot
method on both minimal sets and 3 seeds, the distance baselines (MHD, pixel nearest
neighbour), and writes ``results/fewshot-omniglot/``: results.csv, values.csv, summary.md,
error_by_method.png and raw.json (what was measured; ``--report-only`` rewrites the rest
from it). ``--quick``: a tiny run (a few outer steps, one seed, one set).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from ..fewshot.problems import METHODS
from .data import load_runs
from .experiment import OMNIGLOT, SETS, baselines, problem_for, run
from .report import write

__all__ = ["main"]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.omniglot", description=__doc__)
    ap.add_argument("--sets", default=",".join(SETS), help="minimal sets (small1,small2)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--iterations", type=int, help=f"outer steps (default {OMNIGLOT.iterations})")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="3 outer steps, seed 0, small1")
    ap.add_argument("--out", default="results/fewshot-omniglot")
    ap.add_argument(
        "--report-only", action="store_true", help="rewrite the report from OUT/raw.json"
    )
    a = ap.parse_args(argv)
    base = OMNIGLOT
    if a.quick:
        base = dataclasses.replace(base, iterations=3, eval_tasks=5, imaml_lams=(2.0,))
        a.sets, a.seeds = "small1", "0"
    if a.iterations:
        base = dataclasses.replace(base, iterations=a.iterations)
    methods = tuple(a.methods.split(","))
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        ap.error(f"unknown methods {unknown}; known: {', '.join(METHODS)}")
    sets = a.sets.split(",")
    if set(sets) - set(SETS):
        ap.error(f"unknown sets {sorted(set(sets) - set(SETS))}; known: {', '.join(SETS)}")
    seeds = tuple(int(s) for s in a.seeds.split(","))
    t0 = time.perf_counter()
    out = Path(a.out)
    problems = [problem_for(s, base) for s in sets]
    if a.report_only:
        raw = json.loads((out / "raw.json").read_text())
        results, dist, lams, seconds = (raw[k] for k in ("results", "baselines", "lams", "s"))
    else:
        dist = baselines(load_runs(size=None), load_runs())
        results, lams = run(problems, seeds, a.workers, methods)
        seconds = time.perf_counter() - t0
        out.mkdir(parents=True, exist_ok=True)  # what was measured, before it is reported
        raw = {"results": results, "baselines": dist, "lams": lams, "s": seconds}
        (out / "raw.json").write_text(json.dumps(raw))
    write(out, results, dist, lams, problems, seeds, seconds)
    print((out / "summary.md").read_text())
    print(f"fewshot-omniglot: {time.perf_counter() - t0:.0f} s; wrote {out}/")


if __name__ == "__main__":
    main()
