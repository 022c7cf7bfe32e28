"""``python -m bench``: sweep inner steps x strategies, one subprocess per run, CSV rows.

Each (strategy, N) gets a memory child (on CPU started with MALLOC_MMAP_THRESHOLD_=65536 so
glibc returns freed blocks) and a timing child (without it: that setting slows runs ~2x).
Rows are appended to ``results/<preset>/runs.csv`` as runs end; the report follows.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from tqdm import tqdm

import effmaml

from . import report
from .presets import PRESETS, RUNS
from .workload import agreement

COLUMNS = [
    "preset",
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
    "prediction_error",
    "host_peak_mib",
    "predicted_host_mib",
    "time_s",
    "time_min_s",
    "repeats",
    "predicted_s",
    "time_prediction_error",
    "overhead_vs_first_order",
    "grad_max_abs",
    "grad_rel_l2",
    "grad_cosine",
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


def _git() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def _child(args: list[str], env: dict, timeout: int) -> dict:
    try:
        out = subprocess.run(
            [sys.executable, "-m", "bench.child", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "error": f"over {timeout}s"}
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if lines:
        row = json.loads(lines[-1])
        row.setdefault("status", "ok" if out.returncode == 0 else "error")
        return row
    err = (out.stderr.strip().splitlines() or ["no output"])[-1][:300]
    status = "oom" if "out of memory" in err.lower() or out.returncode in (-9, 137) else "error"
    return {"status": status, "error": err}


def main(argv=None) -> None:
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    ap.add_argument("--preset", default="resnet18-224" if cuda else "cpu-small")
    ap.add_argument("--steps", help="comma-separated N values (default: the preset's)")
    ap.add_argument("--strategies", help="comma-separated run labels (default: all)")
    ap.add_argument("--out", default="results", help="results root (default: results)")
    ap.add_argument("--list", action="store_true", help="list presets and strategies")
    ap.add_argument("--no-report", action="store_true", help="write runs.csv only")
    ap.add_argument(
        "--amp",
        choices=["bfloat16", "float16"],
        help="run adapt + query loss under autocast (results/<preset>-amp-<dtype>/; adds a "
        "float32 naive run as the reference for grad_cosine_fp32)",
    )
    a = ap.parse_args(argv)
    if a.list:
        for p in PRESETS.values():
            print(f"preset {p.name}: {p}")
        for r in RUNS.values():
            print(f"strategy {r.label}: {r.strategy} {r.opts()} {r.peer}")
        return
    if a.preset not in PRESETS:
        ap.error(f"unknown preset {a.preset!r}; known: {', '.join(PRESETS)}")
    preset = PRESETS[a.preset]
    if a.amp:
        preset = dataclasses.replace(preset, name=f"{preset.name}-amp-{a.amp}", amp=a.amp)
    steps = [int(s) for s in a.steps.split(",")] if a.steps else list(preset.steps)
    labels = a.strategies.split(",") if a.strategies else list(preset.runs)
    if a.amp and "naive_fp32" not in labels:
        labels.append("naive_fp32")
    if cuda and not a.strategies and "naive" in labels:
        labels.append("naive_rerun")  # agreement noise floor of the GPU's kernels
    unknown = [x for x in labels if x not in RUNS]
    if unknown:
        ap.error(f"unknown strategies {unknown}; known: {', '.join(RUNS)}")
    # the references run first at each N (agreement needs them), then first_order
    labels = sorted(labels, key=lambda x: (x != "naive_fp32", x != "naive", x != "first_order"))
    out_dir = Path(a.out) / preset.name
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / "runs.csv"
    env_cols = {
        "device": torch.cuda.get_device_name()
        if cuda
        else f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "tf32": torch.backends.cuda.matmul.allow_tf32 if cuda else "",
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "git": _git(),
    }
    env_time = dict(os.environ)
    env_mem = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    rows = []
    oom_at: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmp, open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        bar = tqdm(total=len(steps) * len(labels), desc=preset.name, unit="run")
        for n in steps:
            ref_grad = None
            fp32_grad = None
            fo_time = None
            for label in labels:
                spec = RUNS[label]
                opts = spec.opts()
                row = {
                    "preset": preset.name,
                    "strategy": label,
                    "peer": spec.peer,
                    "exact": effmaml.STRATEGIES[spec.strategy].exact,
                    "steps": n,
                    "segment": opts.get("segment", ""),
                    "pullback": opts.get("pullback", ""),
                    "slots": opts.get("slots", ""),
                    "batch": preset.batch,
                    "image": preset.image,
                    "dtype": preset.dtype,
                    "amp": "" if spec.no_amp else preset.amp,
                    "clip": preset.clip,
                    **env_cols,
                }
                bar.set_postfix_str(f"N={n} {label}")
                cap = preset.cap(label)
                if label in oom_at:
                    row.update(status="skipped", error=f"out of memory at N={oom_at[label]}")
                elif cap is not None and n > cap:
                    row.update(status="skipped", error=f"preset runs {label} up to N={cap}")
                elif spec.needs_no_clip and preset.clip is not None:
                    row.update(status="skipped", error=f"{label} has no grad-of-grad clipping")
                else:
                    grad_file = os.path.join(tmp, f"{label}-{n}.pt")
                    args = [a.preset, label, str(n), *(["--amp", a.amp] if a.amp else [])]
                    timed = preset.time_max_steps is None or n <= preset.time_max_steps
                    if cuda:  # one process: the memory run is the warm-up of the timed ones
                        mode = "both" if timed else "memory"
                        row.update(_child([*args, mode, grad_file], env_time, preset.timeout_s))
                    else:
                        mem = _child([*args, "memory", grad_file], env_mem, preset.timeout_s)
                        row.update(mem)
                        if mem.get("status", "ok") == "ok" and timed:
                            env = env_time
                            row.update(_child([*args, "time", grad_file], env, preset.timeout_s))
                    row.setdefault("status", "ok")
                    if row["status"] == "oom":
                        oom_at[label] = n
                    if row["status"] == "ok":
                        grad = torch.load(grad_file)
                        if label == "naive_fp32":
                            fp32_grad = grad
                        if fp32_grad is not None:
                            row["grad_cosine_fp32"] = agreement(grad, fp32_grad)["grad_cosine"]
                        if label == "naive":
                            ref_grad = grad
                            row.update(agreement(grad, grad))
                        elif ref_grad is not None:
                            row.update(agreement(grad, ref_grad))
                        if label == "first_order":
                            fo_time = row.get("time_s")
                        if fo_time and row.get("time_s"):
                            row["overhead_vs_first_order"] = row["time_s"] / fo_time
                row.pop("grad_finite", None)
                row["timestamp"] = datetime.datetime.now(datetime.timezone.utc).isoformat(
                    timespec="seconds"
                )
                writer.writerow({k: row.get(k, "") for k in COLUMNS})
                f.flush()
                rows.append(row)
                bar.update(1)
        bar.close()
    # naive ran before first_order at each N: complete the derived column, rewrite the CSV
    fo = {r["steps"]: r.get("time_s") for r in rows if r["strategy"] == "first_order"}
    for r in rows:
        if r.get("time_s") and fo.get(r["steps"]):
            r["overhead_vs_first_order"] = r["time_s"] / fo[r["steps"]]
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows({k: r.get(k, "") for k in COLUMNS} for r in rows)
    if a.no_report:
        return
    report.write_report(out_dir)
    if Path(a.out) == Path("results"):
        report.update_readme("README.md", a.out)
    print((out_dir / "summary.md").read_text())


if __name__ == "__main__":
    main()
