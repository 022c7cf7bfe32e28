"""The environment a measurement ran in, captured once per run the same way everywhere."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess

import torch

__all__ = ["device_name", "environment", "git_revision", "timestamp"]


def git_revision() -> str:
    """The checkout's short revision ("" outside a git checkout)."""
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=os.path.dirname(os.path.abspath(__file__)),
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def device_name(device: torch.device | str) -> str:
    """``"NVIDIA H200"`` or ``"cpu (x86_64, 2 cores)"``."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def environment(device: torch.device | str) -> dict:
    """Columns every results CSV carries: device, torch, threads, TF32, determinism, git."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "tf32": torch.backends.cuda.matmul.allow_tf32 if cuda else "",
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "git": git_revision(),
    }


def timestamp() -> str:
    """Now, UTC, to the second."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
