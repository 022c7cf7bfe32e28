"""``python -m bench.scaling``: meta-training throughput and memory for 1..P processes.

Each configuration runs under ``torchrun --standalone --nproc-per-node P`` (gloo on CPU,
NCCL on CUDA) with one thread per process, so that on a 2-core machine 1 and 2 processes
are compared fairly. The workload: ResNet18 (BatchNorm) on 32x32 synthetic 5-way tasks,
8 images per batch, 3 inner SGD steps with ``checkpoint``, meta-batch 8, Adam outer.
Reports meta-iterations per second (after a warm-up iteration) and each process's peak
memory (resident-set high-water mark on CPU, ``max_memory_allocated`` on CUDA) to
``results/scaling/scaling.csv`` and ``summary.md``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from effmaml.measure import MALLOC_FOR_MEASURING

from .env import environment, timestamp

__all__ = ["main", "worker"]

COLUMNS = [
    "device",
    "processes",
    "meta_batch",
    "iterations",
    "seconds",
    "meta_it_per_s",
    "speedup",
    "efficiency",
    "peak_mib_per_process",
    "threads_per_process",
    "torch",
    "git",
    "timestamp",
]


class ImageTasks:
    """Synthetic 5-way image tasks (random pixels, fixed per task seed)."""

    def __init__(self, meta_batch: int, device: torch.device, image: int = 32, batch: int = 8):
        self.meta_batch, self.device, self.image, self.batch = meta_batch, device, image, batch

    def __call__(self, g: torch.Generator):
        out = []
        for _ in range(self.meta_batch):
            x = torch.randn(2, self.batch, 3, self.image, self.image, generator=g)
            y = torch.randint(0, 5, (2, self.batch), generator=g)
            out.append(((x[0].to(self.device), y[0].to(self.device)), (x[1], y[1])))
        return [(s, tuple(t.to(self.device) for t in q)) for s, q in out]


def worker(out: str, iterations: int, meta_batch: int, device_name: str) -> None:
    """One rank: meta-train ``iterations`` timed steps after a warm-up; rank 0 writes JSON."""
    import torch.distributed as dist
    import torch.nn.functional as F
    import torchvision

    import effmaml
    from effmaml.distributed import init_from_env
    from effmaml.measure import PeakMemory

    torch.set_num_threads(1)
    device = torch.device(device_name)
    rank, world = init_from_env(device)
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=5).to(device)

    def loss_fn(m, b):
        return F.cross_entropy(m(b[0]), b[1])

    maml = effmaml.MAML(model, loss_fn, effmaml.SGD(0.01), "checkpoint")
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    trainer = effmaml.MetaTrainer(
        maml,
        opt,
        ImageTasks(meta_batch, device),
        meta_batch=meta_batch,
        inner_steps=3,
        progress=False,
    )
    trainer.train(1)  # warm-up
    if world > 1:
        dist.barrier()
    with PeakMemory(device) as pm:
        t0 = time.perf_counter()
        trainer.train(1 + iterations)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if world > 1:
            dist.barrier()
        seconds = time.perf_counter() - t0
    peaks = [pm.peak]
    if world > 1:
        peaks = [None] * world
        dist.all_gather_object(peaks, pm.peak)
    if rank == 0:
        Path(out).write_text(
            json.dumps({"processes": world, "seconds": seconds, "peaks": peaks, "kind": pm.kind})
        )
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
        # gloo's threads can abort the interpreter's teardown; the result is written
        sys.stdout.flush()
        os._exit(0)


def _run(procs: int, iterations: int, meta_batch: int, device: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "r.json")
        env = dict(os.environ, OMP_NUM_THREADS="1", **MALLOC_FOR_MEASURING)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        cmd += ["--nproc-per-node", str(procs), "-m", "bench.scaling", "--worker", out]
        cmd += ["--iterations", str(iterations), "--meta-batch", str(meta_batch)]
        cmd += ["--device", device]
        subprocess.run(cmd, env=env, check=True, timeout=1800)
        return json.loads(Path(out).read_text())


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.scaling", description=__doc__)
    ap.add_argument("--procs", default="1,2", help="process counts (default 1,2)")
    ap.add_argument("--iterations", type=int, default=6)
    ap.add_argument("--meta-batch", type=int, default=8)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--out", default="results/scaling")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        worker(a.worker, a.iterations, a.meta_batch, a.device)
        return
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    env = environment(a.device)
    rows = []
    base = None
    for p in [int(x) for x in a.procs.split(",")]:
        r = _run(p, a.iterations, a.meta_batch, a.device)
        rate = a.iterations / r["seconds"]
        base = base or rate
        rows.append(
            {
                "device": env["device"],
                "processes": p,
                "meta_batch": a.meta_batch,
                "iterations": a.iterations,
                "seconds": round(r["seconds"], 3),
                "meta_it_per_s": round(rate, 4),
                "speedup": round(rate / base, 3),
                "efficiency": round(rate / base / p, 3),
                "peak_mib_per_process": "/".join(f"{x / 2**20:.0f}" for x in r["peaks"]),
                "threads_per_process": 1,
                "torch": env["torch"],
                "git": env["git"],
                "timestamp": timestamp(),
            }
        )
        print(rows[-1], flush=True)
    name = "scaling.csv" if a.device == "cpu" else f"scaling-{a.device}.csv"
    with open(out_dir / name, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    write_summary(out_dir)


def write_summary(out_dir: Path) -> None:
    """summary.md from every scaling*.csv in ``out_dir``."""
    import pandas as pd

    df = pd.concat([pd.read_csv(p) for p in sorted(out_dir.glob("scaling*.csv"))])
    table = pd.DataFrame(
        {
            "device": df.device,
            "processes": df.processes,
            "meta-it/s": df.meta_it_per_s.map("{:.3f}".format),
            "speedup": df.speedup.map("{:.2f}x".format),
            "efficiency": df.efficiency.map("{:.0%}".format),
            "peak MiB per process": df.peak_mib_per_process.astype(str),
        }
    )
    (out_dir / "summary.md").write_text(table.to_markdown(index=False) + "\n")


if __name__ == "__main__":
    main()
