"""One isolated run: ``python -m bench.child PRESET LABEL STEPS MODE OUT_GRAD [--batch B]
[--amp DTYPE]``; :func:`command` builds that line and :func:`parser` reads it.

Each child first asks effmaml for its prediction (``MAML.estimate``, whose probe
the run then reuses: measured time and memory are the steady state of a meta-training
loop, without the probe).

MODE ``memory``: one meta-gradient inside a peak-memory window (start this process with
``MALLOC_MMAP_THRESHOLD_=65536`` on CPU); saves the flat meta-gradient to OUT_GRAD.
MODE ``time`` (STEPS may list several N, comma-separated): a warm-up meta-gradient at 2
steps, then ``preset.repeats`` timed ones at each N; prints ``{"times": {N: ...}}``.
MODE ``both`` (CUDA, where measuring memory does not slow anything): ``memory``, then
``preset.repeats`` timed meta-gradients in the same process (the memory run warms up).
MODE ``once`` (CUDA, long unrolls): a 2-step warm-up, then one meta-gradient measured for
memory and timed at once (``repeats`` 1).
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Sequence

import torch

from effmaml.measure import PeakMemory, clock

from .presets import PRESETS, RUNS
from .workload import build, make_maml, meta_gradient, predict

MODES = ("memory", "time", "both", "once")


def parser() -> argparse.ArgumentParser:
    """The child's command line (the one parser :func:`command` builds lines for)."""
    ap = argparse.ArgumentParser(prog="python -m bench.child", description=__doc__)
    ap.add_argument("preset", help="a preset name (bench.presets.PRESETS)")
    ap.add_argument("label", help="a run label (bench.presets.RUNS)")
    ap.add_argument("steps", help="N; in mode 'time' several, comma-separated")
    ap.add_argument("mode", choices=MODES)
    ap.add_argument("out_grad", help="where mode memory/both/once saves the meta-gradient")
    ap.add_argument("--batch", type=int, default=0, help="the preset at another batch size")
    ap.add_argument("--amp", default="", help="the preset under autocast in this dtype")
    return ap


def command(
    preset: str,
    label: str,
    steps: Sequence[int],
    mode: str,
    out_grad: str = "-",
    batch: int | None = None,
    amp: str = "",
) -> list[str]:
    """The arguments of ``python -m bench.child`` for one run (what :func:`parser` reads)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES} (got {mode!r})")
    argv = [preset, label, ",".join(str(n) for n in steps), mode, out_grad]
    if batch:
        argv += ["--batch", str(batch)]
    if amp:
        argv += ["--amp", amp]
    return argv


def timings(run, steps: int, repeats: int, device) -> dict:
    """``repeats`` timed meta-gradients at N=``steps``: median, min, count."""
    times = []
    for _ in range(repeats):
        t0 = clock(device)
        run(steps)
        times.append(clock(device) - t0)
    return {"time_s": statistics.median(times), "time_min_s": min(times), "repeats": len(times)}


def main(argv: list[str]) -> dict:
    a = parser().parse_args(argv)
    preset = PRESETS[a.preset].variant(a.batch, a.amp)
    spec = RUNS[a.label]
    steps_list, mode, out_grad = [int(n) for n in a.steps.split(",")], a.mode, a.out_grad
    steps = steps_list[-1]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, dtype, query = build(preset, device)
    maml = make_maml(model, preset, spec)
    predicted, probe = predict(maml, preset, spec, steps, device, dtype, query) or (None, None)
    row: dict = {}
    if probe is not None:
        row.update(
            state_mib=probe.state_bytes / 2**20, step_graph_mib=probe.step_graph_bytes / 2**20
        )
    if predicted is not None:
        row.update(
            predicted_peak_mib=predicted.peak_bytes / 2**20,
            predicted_host_mib=predicted.host_bytes / 2**20,
            predicted_s=predicted.seconds,
        )

    def run(n):
        return meta_gradient(model, maml, preset, spec, n, device, dtype, query)

    if mode == "once":
        run(min(2, steps))  # warm-up
        t0 = clock(device)
    if mode in ("memory", "both", "once"):
        with PeakMemory(device) as pm:
            grad, evals, info = run(steps)
        if mode == "once":
            dt = clock(device) - t0
            row.update(time_s=dt, time_min_s=dt, repeats=1)
        torch.save(grad.cpu(), out_grad)
        row.update(
            peak_mib=pm.peak / 2**20,
            reserved_mib=pm.reserved / 2**20,
            memory_kind=pm.kind,
            step_evals=evals,
            segment_resolved=info.get("segment"),
            chosen=info.get("chosen", ""),
        )
        if device.type == "cuda":
            row["host_peak_mib"] = info.get("host_peak_bytes", 0) / 2**20
    if mode == "time":  # every N given, after one warm-up; what the memory child lacks
        run(min(2, steps_list[0]))
        if maml is not None:
            # probe again, warm (Note [Timing the probe]): a process's first steps run
            # slower than the steady state the timed meta-gradients measure
            maml = make_maml(model, preset, spec)
        times = {}
        for n in steps_list:
            # the time model's prediction from this process's probe (before the timed runs,
            # which reuse it): the memory child's ran under the allocator setting that
            # slows everything down
            pred = predict(maml, preset, spec, n, device, dtype, query)
            times[n] = timings(run, n, preset.repeats, device)
            if pred is not None:
                times[n]["predicted_s"] = pred[0].seconds
        row = {"times": times}
    if mode == "both":
        row.update(timings(run, steps, preset.repeats, device))
    return row


if __name__ == "__main__":
    try:
        print(json.dumps(main(sys.argv[1:])))
    except torch.OutOfMemoryError as err:
        print(json.dumps({"status": "oom", "error": str(err).splitlines()[0][:300]}))
        sys.exit(3)
