"""One isolated run: ``python -m bench.child PRESET LABEL STEPS MODE OUT_GRAD``.

MODE ``memory``: one meta-gradient inside a peak-memory window (start this process with
``MALLOC_MMAP_THRESHOLD_=65536`` on CPU); saves the flat meta-gradient to OUT_GRAD.
MODE ``time``: a warm-up meta-gradient at 2 steps, then ``preset.repeats`` timed ones.
MODE ``both`` (CUDA, where measuring memory does not slow anything): ``memory``, then
``preset.repeats`` timed meta-gradients in the same process (the memory run warms up).
Prints one JSON line.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import torch

from effmaml.memory import PeakMemory

from .presets import PRESETS, RUNS
from .workload import build, meta_gradient, predict


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str]) -> dict:
    preset, spec = PRESETS[argv[0]], RUNS[argv[1]]
    steps, mode, out_grad = int(argv[2]), argv[3], argv[4]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, dtype, query = build(preset, device)
    row: dict = {}
    if mode in ("memory", "both"):
        predicted = predict(model, preset, spec, steps, device, dtype)
        with PeakMemory(device) as pm:
            grad, evals, info = meta_gradient(model, preset, spec, steps, device, dtype, query)
        torch.save(grad.cpu(), out_grad)
        row.update(
            peak_mib=pm.peak / 2**20,
            reserved_mib=pm.reserved / 2**20,
            memory_kind=pm.kind,
            step_evals=evals,
            segment_resolved=info.get("segment"),
            chosen=info.get("chosen", ""),
        )
        if predicted is not None:
            row.update(
                predicted_peak_mib=predicted.peak_bytes / 2**20,
                predicted_host_mib=predicted.host_bytes / 2**20,
                prediction_error=predicted.peak_bytes / pm.peak - 1 if pm.peak > 0 else "",
            )
        schedule = info.get("schedule")
        if schedule is not None and device.type == "cuda":
            row["host_peak_mib"] = schedule.store.host_bytes() / 2**20
    if mode in ("time", "both"):
        if mode == "time":
            meta_gradient(model, preset, spec, min(2, steps), device, dtype, query)  # warm-up
        times = []
        for _ in range(preset.repeats):
            _sync(device)
            t0 = time.perf_counter()
            meta_gradient(model, preset, spec, steps, device, dtype, query)
            _sync(device)
            times.append(time.perf_counter() - t0)
        row.update(time_s=statistics.median(times), time_min_s=min(times), repeats=len(times))
    return row


if __name__ == "__main__":
    try:
        print(json.dumps(main(sys.argv[1:])))
    except torch.OutOfMemoryError as err:
        print(json.dumps({"status": "oom", "error": str(err).splitlines()[0][:300]}))
        sys.exit(3)
