"""The bench's code path at tiny size: subprocess runs, CSV columns, agreement, report."""

import subprocess
import sys

import pandas as pd
import pytest

from bench.presets import PRESETS, RUNS


def test_presets_are_frozen_and_reference_known_runs():
    for p in PRESETS.values():
        assert set(p.runs) <= set(RUNS)
        with pytest.raises(AttributeError):
            p.steps = (1,)  # frozen dataclass
    seed = PRESETS["resnet18-224"]
    assert (seed.image, seed.batch, seed.lr, seed.clip) == (224, 16, 0.01, 100.0)
    assert 1000 in seed.steps


@pytest.mark.slow
def test_bench_tiny_end_to_end(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "bench",
        "--preset",
        "tiny",
        "--steps",
        "2",
        "--strategies",
        "first_order,checkpoint_k5,naive",
        "--out",
        str(tmp_path),
    ]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600)
    out = tmp_path / "tiny"
    df = pd.read_csv(out / "runs.csv")
    assert list(df.strategy) == ["naive", "first_order", "checkpoint_k5"]
    assert (df.status == "ok").all()
    assert (df.peak_mib > 0).all() and (df.time_s > 0).all()
    ck = df[df.strategy == "checkpoint_k5"].iloc[0]
    assert ck.grad_rel_l2 < 1e-5 and ck.grad_cosine > 0.99999
    assert ck.step_evals == 2 * 2  # the probe ran for the prediction, before the run
    fo = df[df.strategy == "first_order"].iloc[0]
    assert fo.overhead_vs_first_order == 1.0 and fo.grad_cosine < 0.99999
    assert df[df.strategy == "naive"].iloc[0].overhead_vs_first_order > 0
    for f in ("memory_vs_steps.png", "time_vs_steps.png", "summary.md"):
        assert (out / f).stat().st_size > 0
