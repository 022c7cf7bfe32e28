"""One measurement in a fresh process: ``python -m MODULE ARGS``, its last JSON line read back.

Every harness that measures in a child (the sweep, bilevel's memory table, outer-cost) runs
it through :func:`run_child`: from the repository root (``bench`` runs from the source
tree; it is not in the wheel), and, for a memory child, with
``effmaml.measure.MALLOC_FOR_MEASURING`` in its environment so that glibc returns freed
blocks instead of inflating later peaks. That setting slows runs about 2x: never time
under it (``memory=False``, a separate child).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from effmaml.measure import MALLOC_FOR_MEASURING

__all__ = ["ROOT", "ChildError", "last_json", "run_child"]

ROOT = Path(__file__).resolve().parents[1]  # the repository root, where `bench` imports


class ChildError(RuntimeError):
    """A child that ran out of time, out of memory, or printed no JSON line."""


def last_json(stdout: str) -> dict | None:
    """The last line of ``stdout`` that is a JSON object, or None."""
    lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
    return json.loads(lines[-1]) if lines else None


def run_child(
    module: str,
    args: list[str],
    *,
    memory: bool = False,
    env: Mapping[str, str] | None = None,
    timeout: float | None = None,
    check: bool = False,
) -> dict:
    """Run ``python -m module args`` from the repository root; its last JSON line.

    Args:
        module: the module to run (``"bench.child"``).
        args: its arguments.
        memory: a memory child: start it with ``MALLOC_FOR_MEASURING``.
        env: the environment (default: this process's), before ``memory``'s setting.
        timeout: seconds before the child is stopped, or None.
        check: raise ``ChildError`` instead of returning a failure row.

    Returns:
        The child's last JSON object, with ``status`` ``"ok"`` (exit 0) or ``"error"`` added
        where it has none; without one, ``{"status": "timeout" | "oom" | "error", "error":
        what stderr said last}``.
    """
    full = dict(os.environ if env is None else env)
    if memory:
        full.update(MALLOC_FOR_MEASURING)
    try:
        out = subprocess.run(
            [sys.executable, "-m", module, *args],
            env=full,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        row = {"status": "timeout", "error": f"over {timeout}s"}
    else:
        found = last_json(out.stdout)
        if found is not None:
            found.setdefault("status", "ok" if out.returncode == 0 else "error")
            row = found
        else:
            err = (out.stderr.strip().splitlines() or ["no output"])[-1][:300]
            oom = "out of memory" in err.lower() or out.returncode in (-9, 137)
            row = {"status": "oom" if oom else "error", "error": err}
    if check and row["status"] != "ok":
        what = f"python -m {module} {' '.join(args)}"
        raise ChildError(f"{what}: {row['status']}: {row.get('error', '')}")
    return row
