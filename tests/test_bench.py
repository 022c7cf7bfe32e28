"""The bench's code path at tiny size: subprocess runs, CSV columns, agreement, report."""

import subprocess
import sys

import pandas as pd
import pytest

import effmaml
from bench.models import MODELS
from bench.presets import PRESETS, RUNS
from bench.report import TARGETS, derive_columns


def test_presets_name_what_exists():
    """Every preset's runs, capped labels, targets and model are known to the bench."""
    for p in PRESETS.values():
        assert set(p.runs) <= set(RUNS), p.name
        assert {label for label, _ in p.caps} <= set(RUNS), p.name
        assert set(p.targets) <= set(TARGETS), p.name
        assert p.model in MODELS, p.name
        for label in p.runs:
            assert RUNS[label].strategy in effmaml.STRATEGIES, label


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
    raw = pd.read_csv(out / "runs.csv")
    # the runs in the order asked; agreement with naive whatever order naive ran in
    assert list(raw.strategy) == ["first_order", "checkpoint_k5", "naive"]
    assert (raw.status == "ok").all()
    assert (raw.peak_mib > 0).all() and (raw.time_s > 0).all()
    assert (raw.predicted_s > 0).all() and (raw.predicted_peak_mib > 0).all()
    assert "overhead_vs_first_order" not in raw  # derived by the report, not measured
    df = derive_columns(raw)
    ck = df[df.strategy == "checkpoint_k5"].iloc[0]
    assert ck.grad_rel_l2 < 1e-5 and ck.grad_cosine > 0.99999
    assert ck.step_evals == 2 * 2  # the probe ran for the prediction, before the run
    fo = df[df.strategy == "first_order"].iloc[0]
    assert fo.overhead_vs_first_order == 1.0 and fo.grad_cosine < 0.99999
    naive = df[df.strategy == "naive"].iloc[0]
    assert naive.grad_rel_l2 == 0.0 and naive.overhead_vs_first_order > 0
    for f in ("memory_vs_steps.png", "time_vs_steps.png", "summary.md"):
        assert (out / f).stat().st_size > 0
