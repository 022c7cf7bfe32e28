"""``python -m bench.omniglot`` (``make fewshot-omniglot``): real Omniglot, Lake et al.'s
one-shot task, every method meta-trained for the same CPU time on each "minimal"
background set.

Two steps, each reproducible on its own:

* ``--search``: each method's small grid (``bench/omniglot/search.py``), trained on
  small1 for ``--search-minutes`` CPU-minutes per configuration and scored on small1's
  validation characters; writes ``OUT/search.json`` (committed: the main run reads it).
* the main run (default): each method with its chosen values, ``--minutes`` CPU-minutes
  per method and seed, seeds ``--seeds`` on small1 and ``--seeds-small2`` on small2; the
  20 runs scored once per trained model, held-out 20- and 5-way episodes, the distance
  baselines; writes ``OUT/``: raw.json (everything measured, the search's results
  included; ``--report-only`` rewrites the rest from it), results.csv, values.csv,
  curves.csv, summary.md, error_by_method.png, val_error_vs_cpu.png.

The budget is each training process's own CPU time (``time.process_time``, one torch
thread per worker), so that methods get equal compute on a shared machine; validation
passes during training are paused out of it. ``--quick``: a tiny run of both steps'
code (a second of CPU per job, a few episodes, small1, seed 0).

The main run goes a seed at a time (seed 0 on both sets, then seed 1, ...), each job's
result appended to ``OUT/raw.partial.jsonl`` as it ends: stopped part way, it continues
where it was when started again, and started with fewer ``--seeds`` it reports the seeds
that are done without training them again.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ..env import device_name
from ..fewshot.run import job_key, map_saved, saved
from .experiment import CURVE_TASKS, METHODS, SETS, VAL_TASKS, baselines, job, load_runs
from .report import write
from .search import choose, grid, search_job

__all__ = ["main"]

QUICK = {"val_tasks": 3, "eval_tasks": 2, "runs": 3}


def _search(a, methods, out: Path) -> None:
    cpu_s = 1.0 if a.quick else 60 * a.search_minutes
    val_tasks = QUICK["val_tasks"] if a.quick else VAL_TASKS
    jobs = [
        (m, i, c, cpu_s, val_tasks)
        for m in methods
        for i, c in enumerate(grid(m)[: 2 if a.quick else None])
    ]
    t0 = time.perf_counter()
    results = map_saved(a.workers, search_job, jobs, out / "search.partial.jsonl")
    found = {
        "set": "omniglot-small1",
        "split": "val",
        "budget_cpu_s": cpu_s,
        "val_tasks": val_tasks,
        "methods": choose(results),
        "jobs": results,
        "wall_s": time.perf_counter() - t0,
        "job_cpu_s": sum(r["cpu_s"] for r in results),
        "machine": device_name("cpu"),
        "workers": a.workers,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "search.json").write_text(json.dumps(found, indent=1))
    for m, r in found["methods"].items():
        print(f"{m}: chosen {r['chosen']} (validation accuracy {max(r['val_accuracy']):.3f})")
    print(f"search: {found['wall_s'] / 60:.1f} min; wrote {out}/search.json")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.omniglot", description=__doc__)
    ap.add_argument("--search", action="store_true", help="run the grid search only")
    ap.add_argument("--minutes", type=float, default=4.0, help="CPU-minutes per job (4)")
    # the main run's budget: at 1.5 minutes the search preferred configurations (64 filters,
    # 5 inner steps for MAML) that lose at 4 (fewer outer steps per minute pay off later)
    ap.add_argument(
        "--search-minutes", type=float, default=4.0, help="per configuration (4, as --minutes)"
    )
    ap.add_argument("--seeds", default="0,1,2", help="seeds on small1")
    ap.add_argument("--seeds-small2", default="0", help="seeds on small2")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="tiny: 1 CPU-second jobs, small1")
    ap.add_argument("--out", default="results/fewshot-omniglot")
    ap.add_argument(
        "--keep-partial",
        action="store_true",
        help="keep OUT/raw.partial.jsonl when done (runs of some methods side by side, "
        "combined by a later run that reads them back)",
    )
    ap.add_argument(
        "--report-only", action="store_true", help="rewrite the report from OUT/raw.json"
    )
    a = ap.parse_args(argv)
    methods = tuple(a.methods.split(","))
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        ap.error(f"unknown methods {unknown}; known: {', '.join(METHODS)}")
    out = Path(a.out)
    if a.search:
        _search(a, methods, out)
        return
    if a.report_only:
        raw = json.loads((out / "raw.json").read_text())
        write(out, raw)
        print((out / "summary.md").read_text())
        return
    if not (out / "search.json").exists():
        ap.error(
            f"{out}/search.json is missing: the chosen hyperparameters. Restore the committed "
            f"one (git checkout -- {out}/search.json) or run python -m bench.omniglot "
            f"--search --out {out} (about 80 minutes on 2 idle cores)"
        )
    search = json.loads((out / "search.json").read_text())
    missing = [m for m in methods if m not in search["methods"]]
    if missing:
        ap.error(f"{out}/search.json has no choice for {missing}; rerun the search")
    seeds = {"small1": a.seeds, "small2": a.seeds_small2}
    if a.quick:
        seeds = {"small1": "0", "small2": ""}
    cpu_s = 1.0 if a.quick else 60 * a.minutes
    small = QUICK if a.quick else {}
    runs = [
        (which, m, int(s), search["methods"][m]["chosen"], cpu_s, small)
        for which in SETS
        for s in seeds[which].split(",")
        if s
        for m in methods
    ]
    # a round per seed (seed 0 on every set first): a run stopped part way has whole seeds
    # for every method, and rerun with fewer --seeds reports them from raw.partial.jsonl;
    # in a round the jobs with the longest evaluations first, so the workers finish together
    order = {m: i for i, m in enumerate(("implicit", "transfer", "mamlpp", "maml"))}
    runs.sort(key=lambda j: (j[2], order.get(j[1], len(order))))
    partial = out / "raw.partial.jsonl"
    resumed = sum(job_key(j) in saved(partial) for j in runs)
    t0 = time.perf_counter()
    results = map_saved(a.workers, job, runs, partial, keep=a.keep_partial)
    n = small.get("runs")
    dist = baselines(load_runs(size=None, runs=n), load_runs(runs=n))
    raw = {
        "budget_cpu_s": cpu_s,
        "seeds": seeds,
        "search": search,
        "jobs": results,
        "baselines": dist,
        "curve_tasks": small.get("val_tasks", CURVE_TASKS),
        "wall_s": time.perf_counter() - t0,
        "jobs_resumed": resumed,  # done by an earlier invocation: not in wall_s
        "job_cpu_s": sum(r["job_cpu_s"] for r in results),
        "machine": device_name("cpu"),
        "workers": a.workers,
    }
    out.mkdir(parents=True, exist_ok=True)  # what was measured, before it is reported
    (out / "raw.json").write_text(json.dumps(raw))
    write(out, raw)
    print((out / "summary.md").read_text())
    print(f"fewshot-omniglot: {raw['wall_s'] / 60:.1f} min; wrote {out}/")


if __name__ == "__main__":
    main()
