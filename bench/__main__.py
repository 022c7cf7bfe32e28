"""``python -m bench``: sweep inner steps x strategies, one subprocess per run, CSV rows.

plan -> run -> derive -> write:

* **plan**: the preset's (N, run) pairs, with those the preset skips (caps, no clipping);
* **run**: each (strategy, N) in a memory child (``bench.isolated.run_child``: on CPU
  started with ``effmaml.measure.MALLOC_FOR_MEASURING`` so glibc returns freed blocks) and
  a timing child (without it: that setting slows runs ~2x); raw rows are appended to
  ``results/<preset>/runs.csv`` as runs end, so an interrupted sweep keeps what it measured;
* **derive**: agreement of every meta-gradient with naive's at the same N (and, under
  ``--amp``, cosine with float32 naive's), whatever order the runs came in;
* **write**: the CSV again with the agreement columns; then the report
  (``bench.report``: plots, summary.md and the derived columns, ratios and errors).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import os
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

import effmaml

from . import child, report
from .env import environment, timestamp
from .isolated import run_child
from .presets import PRESETS, REFERENCE, RUNS, STAND_IN, Preset, RunSpec
from .workload import LazyBatches, agreement, amp_context, build, make_maml

COLUMNS = [
    "preset",
    "model",
    "strategy",
    "peer",
    "exact",
    "steps",
    "segment",
    "segment_resolved",
    "pullback",
    "slots",
    "chosen",
    "batch",
    "image",
    "dtype",
    "amp",
    "clip",
    "status",
    "error",
    "peak_mib",
    "reserved_mib",
    "memory_kind",
    "predicted_peak_mib",
    "state_mib",
    "step_graph_mib",
    "host_peak_mib",
    "predicted_host_mib",
    "time_s",
    "time_min_s",
    "repeats",
    "predicted_s",
    "reference",
    "grad_max_abs",
    "grad_rel_l2",
    "grad_cosine",
    "grad_finite",
    "grad_cosine_fp32",
    "step_evals",
    "device",
    "torch",
    "threads",
    "tf32",
    "deterministic",
    "git",
    "timestamp",
]
FP32_REFERENCE = "naive_fp32"


@dataclass(frozen=True)
class Run:
    """One (strategy, N) of the sweep; ``skip`` says why the plan leaves it out."""

    spec: RunSpec
    steps: int
    skip: str = ""


@dataclass(frozen=True)
class Target:
    """Which preset variant the children run: the preset's name, its batch and autocast
    overrides (``--batch``, ``--amp``), as :func:`bench.child.command` passes them on."""

    preset: str
    batch: int | None = None
    amp: str = ""

    def command(self, label: str, steps: list[int], mode: str, out_grad: str = "-") -> list[str]:
        return child.command(self.preset, label, steps, mode, out_grad, self.batch, self.amp)


def plan(
    preset: Preset, steps: list[int], labels: list[str] | None = None, cuda: bool = False
) -> list[Run]:
    """Every (N, label) in sweep order, with the runs the preset leaves out marked.

    ``labels``: the runs at every N (``--strategies``); default the preset's at each N, and
    on CUDA also ``naive_rerun`` where naive runs (the noise floor of agreement between two
    runs of nondeterministic GPU kernels).
    """
    runs = []
    for n in steps:
        at_n = list(labels if labels is not None else preset.labels_at(n))
        if cuda and labels is None and REFERENCE in at_n:
            at_n.append("naive_rerun")
        for label in at_n:
            spec, cap = RUNS[label], preset.cap(label)
            skip = ""
            if cap is not None and n > cap:
                skip = f"preset runs {label} up to N={cap}"
            elif spec.needs_no_clip and preset.clip is not None:
                skip = f"{label} has no grad-of-grad clipping"
            runs.append(Run(spec, n, skip))
    return runs


def timed(preset: Preset, steps: int) -> bool:
    return preset.time_max_steps is None or steps <= preset.time_max_steps


def run_one(run: Run, preset: Preset, target: Target, grad_file: str, share: int = 1) -> dict:
    """Measure one run in a child process; the raw row (status, memory, prediction, and on
    CUDA the time: there measuring memory costs nothing, so one process does both).

    ``share``: how many memory children run at once (CPU), each then with that share of
    the cores; a process's resident peak is its own, whatever runs beside it.
    """
    if torch.cuda.is_available():
        mode = ("once" if preset.single_run else "both") if timed(preset, run.steps) else "memory"
        args = target.command(run.spec.label, [run.steps], mode, grad_file)
        return run_child("bench.child", args, timeout=preset.timeout_s)
    env = dict(os.environ)
    if share > 1:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // share))
    args = target.command(run.spec.label, [run.steps], "memory", grad_file)
    return run_child("bench.child", args, memory=True, env=env, timeout=preset.timeout_s)


def time_strategy(label: str, steps: list[int], preset: Preset, target: Target) -> dict:
    """CPU: one child without the memory setting (it slows runs ~2x) times ``label`` at
    every N, after one warm-up: ``{N: {time_s, time_min_s, repeats}}``, or an error row."""
    timeout = preset.timeout_s * len(steps)
    out = run_child("bench.child", target.command(label, steps, "time"), timeout=timeout)
    if "times" not in out:
        return {
            n: {"status": out.get("status", "error"), "error": out.get("error", "")} for n in steps
        }
    return {int(n): v for n, v in out["times"].items()}


def base_row(run: Run, preset: Preset, env: dict) -> dict:
    """The columns a run's row has before it is measured (configuration and environment)."""
    spec, opts = run.spec, run.spec.opts()
    return {
        "preset": preset.name,
        "model": preset.model,
        "strategy": spec.label,
        "peer": spec.peer,
        "exact": effmaml.STRATEGIES[spec.strategy].exact,
        "steps": run.steps,
        "segment": opts.get("segment", ""),
        "pullback": opts.get("pullback", ""),
        "slots": opts.get("slots", ""),
        "batch": preset.batch,
        "image": preset.image,
        "dtype": preset.dtype,
        "amp": "" if spec.no_amp else preset.amp,
        "clip": preset.clip,
        **env,
    }


def execute(
    runs: list[Run],
    preset: Preset,
    target: Target,
    tmp: str,
    env: dict,
    on_rows: Callable[[list[dict]], None] = lambda rows: None,
) -> tuple[list[dict], dict[tuple[str, int], str]]:
    """Run a planned list: one memory child per run (several at once where the preset
    allows, on CPU), then on CPU one timing child per strategy for all its N.

    A strategy out of memory at some N is skipped at larger N. ``on_rows`` is called with
    the rows so far whenever one is added or completed (the CSV is rewritten as runs end,
    so an interrupted sweep keeps what it measured).

    Returns:
        ``(rows, grads)``: one row per run in plan order, and the file of each successful
        run's meta-gradient by ``(label, N)`` (inside ``tmp``).
    """
    cpu = not torch.cuda.is_available()
    to_time = sorted({r.spec.label for r in runs if timed(preset, r.steps) and not r.skip})
    workers = preset.memory_workers if cpu else 1
    rows: list[dict] = []
    grads: dict[tuple[str, int], str] = {}
    oom_at: dict[str, int] = {}

    def grad_file(run: Run) -> str:
        return os.path.join(tmp, f"{run.spec.label}-{run.steps}.pt")

    bar = tqdm(total=len(runs) + (len(to_time) if cpu else 0), desc=preset.name, unit="run")
    # the memory children are independent: with several workers, start them all at once
    with ThreadPoolExecutor(workers) if workers > 1 else contextlib.nullcontext() as pool:
        pending = {
            i: pool.submit(run_one, run, preset, target, grad_file(run), workers)
            for i, run in enumerate(runs)
            if pool is not None and not run.skip
        }
        for i, run in enumerate(runs):
            row = base_row(run, preset, env)
            bar.set_postfix_str(f"N={run.steps} {run.spec.label}")
            if run.skip:
                row.update(status="skipped", error=run.skip)
            elif run.spec.label in oom_at:
                row.update(status="skipped", error=f"out of memory at N={oom_at[run.spec.label]}")
            else:
                got = pending.pop(i).result() if i in pending else None
                row.update(got or run_one(run, preset, target, grad_file(run)))
                row.setdefault("status", "ok")
                if row["status"] == "oom":
                    oom_at[run.spec.label] = run.steps
                if row["status"] == "ok":
                    grads[(run.spec.label, run.steps)] = grad_file(run)
            row["timestamp"] = timestamp()
            rows.append(row)
            on_rows(rows)
            bar.update(1)
        for future in pending.values():
            future.cancel()
    if cpu:  # then the time, one child per strategy for all its N
        for label in [x for x in dict.fromkeys(r.spec.label for r in runs) if x in to_time]:
            mine = [r for r in rows if r["strategy"] == label and r["status"] == "ok"]
            bar.set_postfix_str(f"timing {label}")
            if mine:
                ns = [r["steps"] for r in mine if timed(preset, r["steps"])]
                times = time_strategy(label, ns, preset, target)
                for r in mine:
                    r.update(times.get(r["steps"], {}))
                on_rows(rows)
            bar.update(1)
    bar.close()
    return rows, grads


def derive(rows: list[dict], grads: dict[tuple[str, int], str]) -> None:
    """Agreement with a reference meta-gradient at the same N: naive's where it ran, else
    checkpoint(segment)'s (shown equal to naive at the largest N where both ran; the
    ``reference`` column says which); and float32 naive's under AMP."""
    for row in rows:
        key = (row["strategy"], row["steps"])
        if key not in grads:
            continue
        grad = torch.load(grads[key])
        for label in (REFERENCE, STAND_IN):
            ref = grads.get((label, row["steps"]))
            if ref is not None:
                row.update(agreement(grad, torch.load(ref)), reference=label)
                break
        fp32 = grads.get((FP32_REFERENCE, row["steps"]))
        if fp32 is not None:
            row["grad_cosine_fp32"] = agreement(grad, torch.load(fp32))["grad_cosine"]


def write(path: Path, rows: list[dict]) -> None:
    """The CSV, one row per run, :data:`COLUMNS` in order."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows({k: r.get(k, "") for k in COLUMNS} for r in rows)


def predictions(preset: Preset, steps: list[int], labels: list[str], path: Path) -> None:
    """effmaml's predictions for ``labels`` x ``steps`` from one probe (nothing unrolled):
    one MAML front, whose cached probe every ``estimate`` reuses; peers are left out (effmaml
    has no model of their memory). Prints a table and writes ``path``."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, dtype, query = build(preset, device)
    maml = make_maml(model, preset, RUNS["naive"])
    batch = LazyBatches(preset, 1, device, dtype)[0]
    with amp_context(preset, RUNS["naive"], device):
        probe = maml.measure(batch)
        rows = []
        for n in steps:
            for label in labels:
                spec = RUNS[label]
                if spec.peer:
                    continue
                msl = {"query": query, "step_weights": [1.0 / n] * n} if preset.msl else {}
                opts = {**spec.opts(), **msl}
                ((chosen, pred),) = maml.estimate(batch, n, spec.strategy, **opts).items()
                rows.append(
                    {
                        "preset": preset.name,
                        "strategy": label,
                        "chosen": chosen,
                        "steps": n,
                        "predicted_peak_mib": round(pred.peak_bytes / 2**20, 1),
                        "predicted_host_mib": round(pred.host_bytes / 2**20, 1),
                        "step_evals": pred.step_evals,
                        "predicted_s": round(pred.seconds, 3),
                    }
                )
    facts = (
        f"{preset.name}: {preset.describe()} on {device.type}: P = "
        f"{probe.state_bytes / 2**20:.0f} MiB (one inner state), A = "
        f"{probe.step_graph_bytes / 2**20:.0f} MiB (one step's second-order graph)"
    )
    print(facts)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    for r in rows:
        print(
            f"N={r['steps']:<5} {r['strategy']:<24} {r['chosen']:<52} "
            f"{r['predicted_peak_mib']:>9.0f} MiB {r['predicted_s']:>9.2f} s"
        )
    print(f"wrote {path}")


def parser(cuda: bool) -> argparse.ArgumentParser:
    """``python -m bench``'s command line."""
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    ap.add_argument("--preset", default="resnet18-224" if cuda else "cpu-quick")
    ap.add_argument("--steps", help="comma-separated N values (default: the preset's)")
    ap.add_argument("--strategies", help="comma-separated run labels (default: all)")
    ap.add_argument("--out", default="results", help="results root (default: results)")
    ap.add_argument("--list", action="store_true", help="list presets and strategies")
    ap.add_argument("--no-report", action="store_true", help="write runs.csv only")
    ap.add_argument(
        "--append",
        action="store_true",
        help="keep the rows of runs.csv at other N (a sweep split over several sessions)",
    )
    ap.add_argument(
        "--predict",
        action="store_true",
        help="run nothing but the probe (one batch, one process): print and write "
        "predicted.csv with effmaml's predicted peak, step evaluations and seconds per run "
        "and N (what a configuration needs before it is run)",
    )
    ap.add_argument(
        "--batch",
        type=int,
        help="override the preset's batch size (results/<preset>-b<B>/): a model too large "
        "for this machine at the preset's batch, checked at a smaller one",
    )
    ap.add_argument(
        "--amp",
        choices=["bfloat16", "float16"],
        help="run adapt + query loss under autocast (results/<preset>-amp-<dtype>/; adds a "
        "float32 naive run as the reference for grad_cosine_fp32)",
    )
    return ap


def main(argv: list[str] | None = None) -> None:
    cuda = torch.cuda.is_available()
    ap = parser(cuda)
    a = ap.parse_args(argv)
    if a.list:
        for p in PRESETS.values():
            print(f"preset {p.name}: {p.describe()}, N={list(p.steps)}")
        for r in RUNS.values():
            print(f"strategy {r.label}: {r.strategy} {r.opts()} {r.peer}")
        return
    if a.preset not in PRESETS:
        ap.error(f"unknown preset {a.preset!r}; known: {', '.join(PRESETS)}")
    if a.batch is not None and a.batch < 1:
        ap.error(f"--batch must be a positive integer, got {a.batch}")
    preset = PRESETS[a.preset].variant(a.batch, a.amp or "")
    target = Target(a.preset, a.batch, a.amp or "")
    steps = [int(s) for s in a.steps.split(",")] if a.steps else list(preset.steps)
    labels = a.strategies.split(",") if a.strategies else None
    if a.amp:
        base = list(labels or preset.runs)
        labels = base + ([FP32_REFERENCE] if FP32_REFERENCE not in base else [])
    unknown = [x for x in (labels or []) if x not in RUNS]
    if unknown:
        ap.error(f"unknown strategies {unknown}; known: {', '.join(RUNS)}")
    out_dir = Path(a.out) / preset.name
    out_dir.mkdir(parents=True, exist_ok=True)
    if a.predict:
        predictions(preset, steps, labels or list(preset.runs), out_dir / "predicted.csv")
        return
    csv_path = out_dir / "runs.csv"
    kept: list[dict] = []
    if a.append and csv_path.exists():
        with open(csv_path, newline="") as f:
            kept = [r for r in csv.DictReader(f) if int(r["steps"]) not in set(steps)]
    runs = plan(preset, steps, labels, cuda)
    with tempfile.TemporaryDirectory() as tmp:
        rows, grads = execute(
            runs,
            preset,
            target,
            tmp,
            environment("cuda" if cuda else "cpu"),
            on_rows=lambda rows: write(csv_path, kept + rows),
        )
        derive(rows, grads)
    write(csv_path, kept + rows)
    if not a.no_report:
        report.write_report(out_dir)
        print(report.headline(out_dir))
    print(
        f"wrote {out_dir}/ (runs.csv{'' if a.no_report else ', summary.md, plots'}); "
        f"`make report` puts it in README.md"
    )


if __name__ == "__main__":
    main()
