"""The bench's code path at tiny size: subprocess runs, CSV columns, agreement, report."""

import dataclasses
import subprocess
import sys

import pandas as pd
import pytest
import torch

import effmaml
from bench.__main__ import plan
from bench.isolated import ROOT, ChildError, run_child
from bench.models import MODELS
from bench.presets import PRESETS, RUNS
from bench.report import TARGETS, derive_columns, styles
from bench.workload import build, make_maml, meta_gradient, predict


def test_presets_name_what_exists():
    """Every preset's runs, capped labels, targets and model are known to the bench."""
    for p in PRESETS.values():
        assert set(p.runs) <= set(RUNS), p.name
        assert {label for label, _ in p.caps} <= set(RUNS), p.name
        assert set(p.targets) <= set(TARGETS), p.name
        assert p.model in MODELS, p.name
        for label in p.runs:
            assert RUNS[label].strategy in effmaml.STRATEGIES, label


def test_gpu_preset_plans_the_memory_floor_at_the_longest_horizon():
    """resnet18-224: what fits only a few GiB is all that is planned at its largest N (the
    planner drops every run whose predicted memory rules it out), and higher, which cannot
    clip grad-of-grad, is skipped under a preset that clips."""
    gpu = PRESETS["resnet18-224"]
    runs = plan(gpu, list(gpu.steps))
    longest = max(gpu.steps)
    at = {n: {r.spec.label for r in runs if r.steps == n} for n in gpu.steps}
    assert at[longest] and at[longest] < at[min(gpu.steps)]
    assert "naive" in at[min(gpu.steps)] and "naive" not in at[longest]
    skipped = {r.spec.label: r.skip for r in runs if r.skip}
    assert set(skipped) == {"higher"} and "clip" in skipped["higher"]


def test_gpt2_tiny_preset_every_exact_run_equals_naive():
    """gpt2-tiny (gpt2-small's path shrunk, float64, dropout on, tied embeddings): every
    exact run it lists returns naive's meta-gradient, first order another."""
    pytest.importorskip("transformers")
    tiny, device = PRESETS["gpt2-tiny"], torch.device("cpu")
    assert tiny.model == PRESETS["gpt2-small"].model and tiny.inner == "adam"
    assert dict(tiny.model_options).keys() == dict(PRESETS["gpt2-small"].model_options).keys()
    (steps,) = tiny.steps
    grads = {}
    for label in tiny.runs:
        spec = RUNS[label]
        model, dtype, query = build(tiny, device)
        assert dtype == torch.float64 and model.config.tie_word_embeddings
        assert model.config.attn_pdrop > 0
        maml = make_maml(model, tiny, spec)
        pred, probe = predict(maml, tiny, spec, steps, device, dtype)
        assert pred.peak_bytes > 0 and pred.seconds > 0 and probe.step_graph_bytes > 0
        grads[label], evals, _ = meta_gradient(model, maml, tiny, spec, steps, device, dtype, query)
        assert evals >= steps and torch.isfinite(grads[label]).all()
    for label, g in grads.items():
        if effmaml.STRATEGIES[RUNS[label].strategy].exact:
            torch.testing.assert_close(g, grads["naive"], rtol=1e-10, atol=1e-13, msg=label)
    assert not torch.allclose(grads["first_order"], grads["naive"], rtol=1e-3)


def test_predict_runs_only_the_probe(tmp_path, capsys):
    """``python -m bench --predict``: one probe, a prediction per run and N, peers left out;
    auto's row names the schedule it would pick under its budget."""
    from bench.__main__ import main

    labels = "naive,first_order,checkpoint_auto_segment,auto_2GiB,torch_maml_naive"
    argv = ["--preset", "tiny", "--steps", "2,40", "--strategies", labels, "--predict"]
    main([*argv, "--out", str(tmp_path)])
    df = pd.read_csv(tmp_path / "tiny" / "predicted.csv")
    assert not (tmp_path / "tiny" / "runs.csv").exists()
    assert set(df.steps) == {2, 40} and len(df) == 2 * 4  # no prediction for the peer
    auto = df[df.strategy == "auto_2GiB"].set_index("steps")
    for n in (2, 40):  # naive where its predicted peak fits 2 GiB, a schedule that fits if not
        fits = df[(df.strategy == "naive") & (df.steps == n)].predicted_peak_mib.item() <= 2048
        assert (auto.chosen[n] == "auto -> naive") == fits and auto.predicted_peak_mib[n] <= 2048
    assert set(auto.chosen) != {"auto -> naive"}
    naive = df[df.strategy == "naive"].set_index("steps")
    ck = df[df.strategy == "checkpoint_auto_segment"].set_index("steps")
    assert naive.predicted_peak_mib[40] > 5 * naive.predicted_peak_mib[2] / 2
    assert ck.predicted_peak_mib[40] < naive.predicted_peak_mib[40]
    assert (df.predicted_s > 0).all() and (df.step_evals >= df.steps).all()
    assert "P = " in capsys.readouterr().out


def test_plot_styles_tell_strategies_apart():
    df = pd.DataFrame(
        {
            "strategy": [f"s{i}" for i in range(16)] + ["first_order", "tm", "hi"],
            "exact": [True] * 16 + [False, True, True],
            "peer": [""] * 17 + ["torch_maml", "higher"],
        }
    )
    st = styles(df)
    assert (
        len(
            {
                tuple(v["color"]) if not isinstance(v["color"], str) else v["color"]
                for k, v in st.items()
                if k.startswith("s")
            }
        )
        == 16
    )
    assert st["s0"]["linestyle"] == "-" and st["first_order"]["linestyle"] == ":"
    assert st["tm"]["linestyle"] == "--" and st["tm"]["marker"] != st["hi"]["marker"]


def test_child_once_mode_measures_and_times_one_meta_gradient(tmp_path):
    """The GPU preset's single-run mode (on the GPU one process measures memory and time
    together); run here on the CPU at toy size."""
    args = ["tiny", "checkpoint_k5", "2", "once", str(tmp_path / "g.pt")]
    row = run_child("bench.child", args, timeout=300, check=True)
    assert row["repeats"] == 1 and row["time_s"] > 0 and row["peak_mib"] > 0
    assert row["predicted_s"] > 0 and (tmp_path / "g.pt").exists()


def test_child_takes_the_batch_and_autocast_options_the_bench_passes(tmp_path):
    """``python -m bench --batch B --amp DTYPE`` hands its children ``PRESET --batch B --amp
    DTYPE LABEL STEPS MODE OUT``: the child runs that batch under that autocast (a step's
    graph is smaller at a quarter of the batch, and again under bfloat16)."""

    def child(*options):
        args = ["tiny", *options, "checkpoint_k5", "2", "once", str(tmp_path / "g.pt")]
        return run_child("bench.child", args, timeout=300, check=True)

    full = child()
    small = child("--batch", "2")
    small_bf16 = child("--batch", "2", "--amp", "bfloat16")
    assert small["step_graph_mib"] < 0.95 * full["step_graph_mib"]
    assert small_bf16["step_graph_mib"] < 0.95 * small["step_graph_mib"], (small, small_bf16)
    assert small_bf16["peak_mib"] > 0 and small_bf16["time_s"] > 0
    grad = torch.load(tmp_path / "g.pt")
    assert torch.isfinite(grad).all() and grad.abs().max() > 0


@pytest.mark.slow
def test_bench_tiny_end_to_end(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "bench",
        "--preset",
        "tiny",
        "--out",
        str(tmp_path),
    ]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600)
    out = tmp_path / "tiny"
    raw = pd.read_csv(out / "runs.csv")
    # the preset's runs at each N, in its order
    assert list(raw.strategy) == [
        "naive",
        "first_order",
        "checkpoint_auto_segment",
        "checkpoint_k5",
        "checkpoint_auto_segment",
        "revolve_s8",
        "offload",
    ]
    assert list(raw.steps) == [2, 2, 2, 2, 3, 3, 3]
    assert (raw.status == "ok").all()
    assert (raw.peak_mib > 0).all() and (raw.time_s > 0).all()
    assert (raw.predicted_s > 0).all() and (raw.predicted_peak_mib > 0).all()
    assert "overhead_vs_first_order" not in raw  # derived by the report, not measured
    df = derive_columns(raw)
    # naive at N=2; at N=3, where naive did not run, checkpoint(segment) stands in
    assert set(raw[raw.steps == 2].reference) == {"naive"}
    assert set(raw[raw.steps == 3].reference) == {"checkpoint_auto_segment"}
    assert (raw[raw.steps == 3].grad_rel_l2 < 1e-5).all()
    assert "stands in" in (out / "summary.md").read_text()
    ck = df[df.strategy == "checkpoint_k5"].iloc[0]
    assert ck.grad_rel_l2 < 1e-5 and ck.grad_cosine > 0.99999
    assert ck.step_evals == 2 * 2  # the probe ran for the prediction, before the run
    fo = df[df.strategy == "first_order"].iloc[0]
    assert fo.overhead_vs_first_order == 1.0 and fo.grad_cosine < 0.99999
    naive = df[df.strategy == "naive"].iloc[0]
    assert naive.grad_rel_l2 == 0.0 and naive.overhead_vs_first_order > 0
    for f in ("memory_vs_steps.png", "time_vs_steps.png", "summary.md"):
        assert (out / f).stat().st_size > 0


def test_claims_and_readme_block_come_from_the_csvs(tmp_path):
    """make report's claims table quotes the CSVs' own numbers; README's block holds the
    headline (cpu-quick's first table and plot, the claims, the GPU sweep's first table) and
    points to results/README.md, which holds every summary in full, the headline first."""
    import shutil
    from pathlib import Path

    from bench.report import claims, update_readme

    root = tmp_path / "results"
    for name in ("fewshot", "resnet18-224", "cpu-small", "cpu-quick"):
        shutil.copytree(Path("results") / name, root / name)
    text = claims(root)
    quick = pd.read_csv(root / "cpu-quick" / "runs.csv")
    t = quick.set_index(["strategy", "steps"]).time_s
    assert f"cpu-quick: {t['naive', 10] / t['first_order', 10]:.1f}x at N=10" in text
    few = pd.read_csv(root / "fewshot" / "runs.csv")
    own = few[(few.adapt == "own") & (few.problem == "characters")].groupby("method")["mean"]
    assert f"MAML {100 * own.mean()['maml']:.1f}%" in text
    (root / "claims.md").write_text(text)
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- results:start -->\nold\n<!-- results:end -->\nafter\n")
    assert update_readme(readme, root)
    out = readme.read_text()
    order = ["cpu-quick", "The seed's claims, measured", "resnet18-224"]
    at = [out.index(f"\n### {h}\n") for h in order]
    assert at == sorted(at), at
    assert "\n### cpu-small\n" not in out and "Peak MiB at each N" not in out  # full tables
    assert f"({root}/cpu-quick/memory_vs_steps.png)" in out and f"({root}/README.md)" in out
    assert "old" not in out and out.startswith("intro\n") and out.endswith("after\n")
    full = (root / "README.md").read_text()
    order = [*order, "cpu-small", "fewshot"]
    at = [full.index(f"\n### {h}\n") for h in order]
    assert at == sorted(at), at
    assert "Peak MiB at each N" in full and "(cpu-quick/memory_vs_steps.png)" in full


def test_child_command_line_round_trips_through_the_one_parser():
    """The bench builds each child's line with bench.child.command and the child reads it
    with bench.child.parser: options given are options read, wherever they sit."""
    from bench import child

    argv = child.command("tiny", "checkpoint_k5", [2, 40], "time", "-", batch=3, amp="bfloat16")
    a = child.parser().parse_args(argv)
    assert (a.preset, a.label, a.steps, a.mode, a.out_grad) == (
        "tiny",
        "checkpoint_k5",
        "2,40",
        "time",
        "-",
    )
    assert (a.batch, a.amp) == (3, "bfloat16")
    plain = child.parser().parse_args(child.command("tiny", "naive", [5], "memory", "g.pt"))
    assert (plain.batch, plain.amp) == (0, "")
    with pytest.raises(ValueError, match="mode must be one of"):
        child.command("tiny", "naive", [5], "fast")


def test_one_runner_reads_every_child(monkeypatch):
    """bench.isolated.run_child: from the repository root, glibc's setting for a memory
    child only, the last JSON line, and a failure as a row (or an error with check)."""
    import bench.isolated as isolated

    seen = {}

    def fake_run(cmd, env, cwd, capture_output, text, timeout):
        seen.update(cmd=cmd, env=env, cwd=cwd)
        out = 'progress\n{"a": 1}\nnoise\n{"peak": 2}\n' if "ok" in cmd else ""
        return subprocess.CompletedProcess(cmd, 0 if out else 1, out, "Killed: out of memory")

    monkeypatch.setattr(isolated.subprocess, "run", fake_run)
    assert run_child("m", ["ok"], memory=True) == {"peak": 2, "status": "ok"}
    assert seen["cmd"] == [sys.executable, "-m", "m", "ok"] and seen["cwd"] == ROOT
    assert seen["env"]["MALLOC_MMAP_THRESHOLD_"] == "65536"
    run_child("m", ["ok"], env={"X": "1"})
    assert seen["env"] == {"X": "1"}  # timing children run without the memory setting
    assert run_child("m", ["bad"]) == {"status": "oom", "error": "Killed: out of memory"}
    with pytest.raises(ChildError, match="python -m m bad: oom"):
        run_child("m", ["bad"], check=True)
    assert (ROOT / "bench" / "isolated.py").exists()


def test_execute_runs_a_plan(monkeypatch, tmp_path):
    """The run step on its own, with the children replaced: rows in plan order, a strategy
    out of memory at some N skipped at larger N, skips from the plan kept, times merged into
    the rows they belong to, and the CSV callback called as rows arrive."""
    import bench.__main__ as bm
    from bench.presets import PRESETS

    preset = dataclasses.replace(PRESETS["tiny"], memory_workers=1, caps=(("revolve_s2", 4),))
    monkeypatch.setattr(bm.torch.cuda, "is_available", lambda: False)
    calls = []

    def fake_run_one(run, preset, target, grad_file, share=1):
        calls.append((run.spec.label, run.steps))
        if run.spec.label == "naive" and run.steps >= 4:
            return {"status": "oom", "error": "out of memory"}
        return {"peak_mib": float(run.steps)}

    def fake_time(label, steps, preset, target):
        return {n: {"time_s": 0.5 * n} for n in steps}

    monkeypatch.setattr(bm, "run_one", fake_run_one)
    monkeypatch.setattr(bm, "time_strategy", fake_time)
    runs = bm.plan(preset, [2, 4, 8], ["naive", "revolve_s2"])
    seen = []
    rows, grads = bm.execute(
        runs, preset, bm.Target("tiny"), str(tmp_path), {}, on_rows=lambda r: seen.append(len(r))
    )
    got = [(r["strategy"], r["steps"], r["status"]) for r in rows]
    assert got == [
        ("naive", 2, "ok"),
        ("revolve_s2", 2, "ok"),
        ("naive", 4, "oom"),
        ("revolve_s2", 4, "ok"),
        ("naive", 8, "skipped"),
        ("revolve_s2", 8, "skipped"),
    ]
    assert ("naive", 8) not in calls  # never started after its OOM
    assert rows[4]["error"] == "out of memory at N=4" and "up to N=4" in rows[5]["error"]
    assert set(grads) == {("naive", 2), ("revolve_s2", 2), ("revolve_s2", 4)}
    assert rows[3]["time_s"] == 2.0 and "time_s" not in rows[2]
    assert seen[:6] == [1, 2, 3, 4, 5, 6] and len(seen) == 8  # + one per timed strategy


def test_plan_adds_the_noise_floor_run_on_cuda():
    import bench.__main__ as bm
    from bench.presets import PRESETS

    preset = PRESETS["tiny"]
    cpu = [r.spec.label for r in bm.plan(preset, [2])]
    gpu = [r.spec.label for r in bm.plan(preset, [2], cuda=True)]
    assert "naive_rerun" not in cpu and gpu == [*cpu, "naive_rerun"]
    named = [r.spec.label for r in bm.plan(preset, [2], ["checkpoint_k5"], cuda=True)]
    assert named == ["checkpoint_k5"]  # runs asked for by name: only those


def test_multi_step_loss_presets_path_at_tiny_size():
    """cpu-quick-msl's path: the bench's meta-gradient under the multi-step loss, naive and
    the schedules agree; the prediction knows the query (more than without it)."""
    tiny = dataclasses.replace(PRESETS["tiny"], msl=True, dtype="float64")
    device = torch.device("cpu")
    grads = {}
    for label in ("naive", "checkpoint_auto_step", "revolve_s4"):
        model, dtype, query = build(tiny, device)
        maml = make_maml(model, tiny, RUNS[label])
        pred, _ = predict(maml, tiny, RUNS[label], 6, device, dtype, query)
        grads[label], _, _ = meta_gradient(model, maml, tiny, RUNS[label], 6, device, dtype, query)
        if label == "naive":
            plain, _ = predict(
                make_maml(model, tiny, RUNS[label]), PRESETS["tiny"], RUNS[label], 6, device, dtype
            )
            assert pred.peak_bytes > plain.peak_bytes
    for label in ("checkpoint_auto_step", "revolve_s4"):
        torch.testing.assert_close(grads[label], grads["naive"], rtol=1e-10, atol=1e-13)
    assert PRESETS["cpu-quick-msl"].msl and PRESETS["cpu-quick-msl"].steps == (5, 20, 100)


def test_torchopt_peer_agrees_with_effmaml_naive():
    """TorchOpt's MetaSGD in the sweep: the same meta-gradient as effmaml's naive (float64),
    and the model left as it was (parameters and BatchNorm buffers)."""
    pytest.importorskip("torchopt")
    tiny = dataclasses.replace(PRESETS["tiny"], dtype="float64", clip=None, batch=2)
    device = torch.device("cpu")
    model, dtype, query = build(tiny, device)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    peer, _, _ = meta_gradient(model, None, tiny, RUNS["torchopt"], 2, device, dtype, query)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    maml = make_maml(model, tiny, RUNS["naive"])
    ours, _, _ = meta_gradient(model, maml, tiny, RUNS["naive"], 2, device, dtype, query)
    torch.testing.assert_close(peer, ours, rtol=1e-10, atol=1e-12)
