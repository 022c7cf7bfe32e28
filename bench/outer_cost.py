"""What differentiating with respect to the data costs: ``python -m bench.outer_cost``.

The workload of dataset distillation at a small size: a Conv-4 (32 filters, 28x28, 5
classes) trained for N inner steps on learned images, one batch of 10 per step, views of
one leaf ``x`` of shape (N, 10, 1, 28, 28). Each exact schedule runs the same problem
twice, with ``x`` requiring grad ("data") and detached ("plain"), alternated round by
round in one process; the ratio is the median of the paired per-round ratios with its
distribution-free interval (:mod:`bench.timing`). Memory: one meta-gradient per
subprocess (``bench.isolated.run_child``, the harness's way), its measured peak
against the cost model's prediction, which counts the data's gradient buffer.

Writes ``results/outer-cost/{runs.csv,summary.md}``.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import effmaml
from effmaml.measure import PeakMemory, clock

from .env import environment, timestamp
from .isolated import run_child
from .models import build_model
from .timing import median_ci, paired_ratios

OUT = Path("results/outer-cost")
SCHEDULES = {
    "naive": ("naive", {}),  # the gradient of the data itself costs this much
    "checkpoint_segment": ("checkpoint", {"pullback": "segment"}),
    "checkpoint_step": ("checkpoint", {"pullback": "step"}),
    "revolve_3": ("revolve", {"slots": 3}),
}


def _loss(module, batch):
    return F.cross_entropy(module(batch[0]), batch[1])


def problem(steps: int, data: bool, seed: int = 0):
    """(model, batches, query, x): the distillation workload; ``x`` requires grad with
    ``data``."""
    torch.manual_seed(seed)
    model = build_model("conv4", 5, width=32)
    x = torch.randn(steps, 10, 1, 28, 28).requires_grad_(data)
    y = torch.arange(10) % 5
    query = (torch.randn(25, 1, 28, 28), torch.arange(25) % 5)
    return model, [(x[t], y) for t in range(steps)], query, x


def meta_gradient(name: str, steps: int, data: bool) -> float:
    """One meta-gradient's seconds (after the probe, cached by a first call)."""
    model, batches, query, x = problem(steps, data)
    strategy, kw = SCHEDULES[name]
    maml = effmaml.MAML(model, _loss, effmaml.SGD(0.1), strategy, **kw)
    maml.measure(batches[0])
    t0 = clock(torch.device("cpu"))
    _loss(maml.adapt(batches), query).backward()
    seconds = clock(torch.device("cpu")) - t0
    assert (x.grad is not None) == data
    return seconds


def memory(name: str, steps: int, data: bool) -> dict[str, int]:
    """Measured and predicted peak of one meta-gradient (run in a fresh process)."""
    model, batches, query, _ = problem(steps, data)
    strategy, kw = SCHEDULES[name]
    maml = effmaml.MAML(model, _loss, effmaml.SGD(0.1), strategy, **kw)
    # the prediction for these batches: their gradient buffers (views of x) included
    pred = maml.strategy.plan(maml.problem(batches)[0], maml.measure(batches[0])).prediction
    assert pred is not None
    with PeakMemory("cpu") as peak:
        _loss(maml.adapt(batches), query).backward()
    return {"measured": peak.peak, "predicted": pred.peak_bytes}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.outer_cost", description=__doc__)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--child", nargs=3, metavar=("MODE", "NAME", "DATA"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    if args.child:
        mode, name, data = args.child
        if mode == "memory":
            print(json.dumps(memory(name, args.steps, data == "1")))
        else:
            times = [meta_gradient(name, args.steps, data == "1") for _ in range(3)]
            print(json.dumps({"seconds": min(times)}))
        return
    start = time.time()
    rows = []
    for name in SCHEDULES:
        meta_gradient(name, args.steps, True)  # warm-up
        with_data, plain = [], []
        for _ in range(args.rounds):
            with_data.append(meta_gradient(name, args.steps, True))
            plain.append(meta_gradient(name, args.steps, False))
        ratio, low, high, cover = median_ci(paired_ratios(with_data, plain))
        mem = {
            d: run_child(
                "bench.outer_cost",
                ["--steps", str(args.steps), "--child", "memory", name, d],
                memory=True,
                check=True,
            )
            for d in ("0", "1")
        }
        rows.append(
            {
                "schedule": name,
                "steps": args.steps,
                "data_s": sorted(with_data)[len(with_data) // 2],
                "plain_s": sorted(plain)[len(plain) // 2],
                "ratio": ratio,
                "ratio_low": low,
                "ratio_high": high,
                "coverage": cover,
                "peak_plain": mem["0"]["measured"],
                "peak_data": mem["1"]["measured"],
                "predicted_plain": mem["0"]["predicted"],
                "predicted_data": mem["1"]["predicted"],
            }
        )
        print(rows[-1], flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    with open(OUT / "runs.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    (OUT / "summary.md").write_text(summary(rows, time.time() - start))


def summary(rows: list[dict], seconds: float) -> str:
    """The summary table (markdown)."""
    mib = 1 << 20
    env = environment("cpu")
    x_bytes = rows[0]["steps"] * 10 * 28 * 28 * 4
    lines = [
        "# Outer tensors: what differentiating with respect to the data costs",
        "",
        f"{env['device']}, torch {env['torch']}, {env['threads']} threads, git {env['git']}, "
        f"{timestamp()}; {seconds / 60:.1f} minutes.",
        "",
        f"Conv-4 (32 filters, 28x28, 5 classes), N = {rows[0]['steps']} inner SGD steps on "
        f"learned images (one batch of 10 per step, views of one leaf of "
        f"{x_bytes / mib:.2f} MiB); the same schedule with the images requiring grad (data) "
        f"and detached (plain), alternated per round. Ratio: median of paired per-round "
        f"ratios [its interval]; naive's ratio is what the data's own gradient costs (the "
        f"first layer's input gradient), which every schedule pays too. Memory: one "
        f"meta-gradient per process, peak resident bytes above the start, and the cost "
        f"model's prediction.",
        "",
        "| schedule | data / plain | peak plain (MiB) | peak data (MiB) | measured Δ (MiB) "
        "| predicted plain | predicted data | predicted Δ |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['schedule']} | {r['ratio']:.3f}x [{r['ratio_low']:.3f}, {r['ratio_high']:.3f}]"
            f" | {r['peak_plain'] / mib:.1f} | {r['peak_data'] / mib:.1f} "
            f"| {(r['peak_data'] - r['peak_plain']) / mib:+.2f} "
            f"| {r['predicted_plain'] / mib:.1f} | {r['predicted_data'] / mib:.1f} "
            f"| {(r['predicted_data'] - r['predicted_plain']) / mib:+.2f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
