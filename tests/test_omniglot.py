"""Real Omniglot (bench/omniglot, make fewshot-omniglot): the distance baselines, the CPU
budget and its paused checkpoints, MAML++'s schedules over a budget, Prototypical
Networks, the search's grids and choice, one method end to end at a tiny slice, both
steps of the command at --quick size, and README's line."""

from __future__ import annotations

import json
import time

import pytest
import torch

from bench.fewshot import problems as fewshot_problems
from bench.fewshot.budget import Budget, CpuClock, Progress, drive
from bench.fewshot.methods import _mamlpp_schedule
from bench.fewshot.protonet import proto_logits, proto_loss
from bench.omniglot import baselines, experiment, search
from effmaml.omniglot import OneShotRun


@pytest.fixture(scope="module")
def run01():
    return experiment.load_runs(size=None, runs=1)[0]


def test_mhd_is_a_symmetric_translation_invariant_distance(run01):
    a, b = (baselines.inked_points(x) for x in run01.train[:2])
    assert baselines.mhd(a, a) == 0.0
    assert baselines.mhd(a, b) == pytest.approx(baselines.mhd(b, a))
    shifted = baselines.inked_points(torch.roll(run01.train[0], (3, -2), dims=(1, 2)))
    assert baselines.mhd(a, shifted) == pytest.approx(0.0, abs=1e-9)
    # the vectorised per-run cost gives the pairwise function's classification (on 4 of the
    # run's test images, against all 20 classes)
    part = OneShotRun("part", run01.train, run01.test[:4], run01.labels[:4])
    train = [baselines.inked_points(x) for x in part.train]
    cost = torch.tensor([[baselines.mhd(baselines.inked_points(t), c) for c in train]
                         for t in part.test])  # fmt: skip
    assert baselines.mhd_error(part) == baselines.error_percent(part, baselines.classify(cost))


@pytest.mark.slow
def test_mhd_reproduces_the_demos_38_8_percent():
    errors = [baselines.mhd_error(r) for r in experiment.load_runs(size=None)]
    assert round(sum(errors) / len(errors), 1) == 38.8


def _spin(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def test_the_budget_is_cpu_time_and_checkpoints_cost_it_nothing():
    seen = []

    def on_checkpoint(model, used, steps):
        seen.append((used, steps))
        _spin(0.05)  # an evaluation: paused out of the budget

    budget = Budget(0.2, (0.0, 0.5, 1.0), on_checkpoint)
    progress = Progress(budget=budget)
    ran = drive(progress, lambda: _spin(0.02), lambda: None)
    assert 0.2 <= ran["cpu_s"] < 0.2 + 0.05  # the step under way finishes, not a checkpoint
    assert ran["eval_cpu_s"] >= 0.15 and ran["steps"] >= 8
    assert [s for _, s in seen] == [0, seen[1][1], ran["steps"]]
    assert seen[1][0] >= 0.1 and seen[1][0] < 0.15
    clock = CpuClock()
    with clock.paused():
        _spin(0.05)
    assert clock.cpu() < 0.02
    with pytest.raises(ValueError, match="one of them"):
        Progress()


def test_mamlpps_schedules_follow_the_fraction_of_the_budget():
    import effmaml
    from bench.fewshot.problems import PROBLEMS, ce_loss

    p = PROBLEMS["characters"]
    model = torch.nn.Linear(2, 2)
    maml = effmaml.MAML(model, ce_loss, effmaml.SGD(0.1), "naive")
    opt = torch.optim.Adam(model.parameters(), lr=p.outer_lr)
    now = [0.0]
    sched, curriculum = _mamlpp_schedule(p, maml, opt, lambda: now[0])
    r = p.mamlpp
    assert curriculum.maml_at(0) is not maml  # first order for the first third
    assert curriculum.weights_at(0) == pytest.approx(effmaml.msl_weights(r.steps, 0.0))
    now[0] = 0.5
    opt.step()  # no gradients: nothing moves; the scheduler steps after it, as in training
    sched.step()
    assert curriculum.maml_at(10**6) is maml
    assert curriculum.weights_at(0) == [0.0] * (r.steps - 1) + [1.0]
    assert opt.param_groups[0]["lr"] == pytest.approx((p.outer_lr + r.min_outer_lr) / 2)
    now[0] = 1.0
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(r.min_outer_lr)


def test_prototypes_classify_their_own_examples_and_train_the_embedding_only():
    torch.manual_seed(0)
    model = fewshot_problems.make_model(experiment.configure("protonet", {"width": 8}))
    xs = torch.rand(5, 1, 28, 28)
    ys = torch.tensor([3, 0, 4, 1, 2])
    logits = proto_logits(model, (xs, ys), xs)
    assert logits.shape == (5, 5) and torch.equal(logits.argmax(-1), ys)
    proto_loss(model, ((xs, ys), (xs, ys))).backward()
    assert model.head.weight.grad is None and model[0].weight.grad.abs().sum() > 0


def test_configure_maps_each_knob_to_the_methods_own_setting():
    c = {"inner_lr": 0.4, "inner_steps": 3, "width": 64, "k_query": 1, "meta_batch": 4}
    assert experiment.configure("maml", c).inner_lr == 0.4
    pp = experiment.configure("mamlpp", c)
    assert (pp.mamlpp.lr, pp.mamlpp.steps, pp.inner_lr) == (0.4, 3, experiment.BASE.inner_lr)
    im = experiment.configure("implicit", {**c, "lam": 2.0})
    assert (im.imaml_lr, im.imaml_steps, im.imaml_lams) == (0.4, 3, (2.0,))
    assert experiment.configure("transfer", c).eval_steps == (3,)
    proto = experiment.configure("protonet", {"train_way": 60}, "small2")
    assert proto.n_way == 60 and proto.data == "omniglot-small2"
    with pytest.raises(ValueError, match="unknown knob"):
        experiment.configure("maml", {"depth": 4})


def test_every_grid_starts_from_one_configuration_and_changes_one_knob_at_a_time():
    for method in experiment.METHODS:
        configs = search.grid(method)
        assert len(configs) >= 4
        for c in configs[1:]:
            assert sum(c[k] != configs[0][k] for k in c) == 1, (method, c)
    results = [
        {"method": "maml", "index": i, "config": {"a": i}, "val_accuracy": acc, "steps": 1}
        for i, acc in enumerate([0.3, 0.5, 0.5, 0.2])
    ]
    chosen = search.choose(results)["maml"]
    assert chosen["chosen"] == {"a": 1} and chosen["val_accuracy"] == [0.3, 0.5, 0.5, 0.2]


def test_one_method_trains_under_a_budget_and_scores_the_runs():
    tiny = fewshot_problems.data_for(experiment.BASE)  # small1 (its validation: 32 classes)
    p = experiment.configure("maml", {"width": 8, "inner_steps": 3, "meta_batch": 1})
    model, cost, curve = experiment.train_tracked(p, "maml", 0, 3.0, (0.0, 1.0), 2)
    # no memory budget: auto runs the fastest exact schedule, which fits any machine here
    assert cost["schedule"] == "auto -> naive" and "memory_budget_mib" not in cost
    assert cost["steps"] >= 1 and cost["cpu_s"] >= 3.0 and cost["episodes"] == cost["steps"]
    assert [c["steps"] for c in curve] == [0, cost["steps"]]
    # the benchmark's set-up (reading the data, the memory budget's estimate, first-call
    # imports) is done before the clock starts: MAML's own set-up is all it pays before step 0
    assert curve[0]["cpu_s"] < 0.5
    errors = experiment.score_runs(p, model, "maml", experiment.load_runs(runs=1))
    assert len(errors) == 1 and 0.0 <= errors[0] <= 100.0
    five = experiment.narrowed(model, 5)
    episodes = tiny.sampler("train", 5, 1, 0)
    x = episodes.examples(episodes.classes[0], [0, 1])
    with torch.no_grad():
        torch.testing.assert_close(five(x), model(x)[:, :5])
    with pytest.raises(ValueError, match="cannot be narrowed"):
        experiment.narrowed(model, 21)


def test_quick_search_then_quick_run_write_the_report(tmp_path):
    """Both steps of make fewshot-omniglot at --quick size: the search writes its choices,
    the main run reads them, trains every method for a CPU-second and writes the report
    from raw.json alone (--report-only rewrites the same summary)."""
    from bench.omniglot.__main__ import main

    out = tmp_path / "out"
    main(["--search", "--quick", "--workers", "1", "--out", str(out)])
    found = json.loads((out / "search.json").read_text())
    assert set(found["methods"]) == set(experiment.METHODS)
    assert all(len(m["grid"]) == 2 for m in found["methods"].values())
    main(["--quick", "--workers", "1", "--out", str(out)])
    raw = json.loads((out / "raw.json").read_text())
    assert {j["method"] for j in raw["jobs"]} == set(experiment.METHODS)
    for j in raw["jobs"]:
        assert j["config"] == found["methods"][j["method"]]["chosen"]
        assert len(j["scores"]["runs"]) == 3 and len(j["scores"]["5-way"]) == 2
        trained = j["method"] != "random"
        assert len(j["curve"]) == (len(experiment.CURVE) if trained else 1)
        assert j["cost"]["cpu_s"] >= (1.0 if trained else 0.0)
    summary = (out / "summary.md").read_text()
    parts = ("CPU-minutes per method and seed", "ProtoNets", "chosen", "not comparable")
    for part in (*parts, "load average"):
        assert part in summary
    for name in ("error_by_method.png", "val_error_vs_cpu.png", "curves.csv", "results.csv"):
        assert (out / name).stat().st_size > 0
    (out / "summary.md").unlink()
    main(["--report-only", "--out", str(out)])
    assert (out / "summary.md").read_text() == summary


def test_the_readme_line_states_the_budget_and_the_best_against_mhd(tmp_path):
    from bench.omniglot.report import results_frame, values_frame
    from bench.report.readme import _omniglot_line

    jobs = [
        {"set": f"omniglot-{s}", "method": m, "seed": 0, "config": {}, "scores": {"runs": [e]},
         "cost": {"peak_mib": 1.0}, "curve": [{"val_accuracy": 0.5}], "job_cpu_s": 1.0,
         "job_wall_s": 1.0}
        for s in ("small1", "small2")
        for m, e in (("maml", 30.0), ("protonet", 20.0), ("first_order", 50.0))
    ]  # fmt: skip
    raw = {"jobs": jobs, "budget_cpu_s": 240.0}
    (tmp_path / "fewshot-omniglot").mkdir()
    values_frame(jobs, {"mhd": [40.0]}).to_csv(
        tmp_path / "fewshot-omniglot" / "values.csv", index=False
    )
    results_frame(raw).to_csv(tmp_path / "fewshot-omniglot" / "results.csv", index=False)
    longer = [
        dict(j, method="maml", scores={"runs": [e / 2]}) for j, e in zip(jobs[:2], (30.0, 10.0))
    ]
    sub = tmp_path / "fewshot-omniglot" / "maml-16-minutes"
    sub.mkdir()
    values_frame(longer[:1], {}).to_csv(sub / "values.csv", index=False)
    results_frame({"jobs": longer[:1], "budget_cpu_s": 960.0}).to_csv(
        sub / "results.csv", index=False
    )
    (sub / "summary.md").write_text("its report\n")
    line = _omniglot_line(tmp_path)
    assert "MAML 30.0% / 30.0%, MAML alone at 16 CPU-minutes (1/0 seeds) 15.0% / —;" in line
    assert "meta-trained for 4 CPU-minutes per seed" in line
    assert "minimal set (small1 / small2; 1 / 1 seeds)" in line
    assert "best of ours ProtoNets 20.0% / 20.0%, MAML 30.0% / 30.0%" in line
    assert "MHD baseline 40.0%; 2 of our 3 methods are below it on both sets" in line


def _square(x):
    _square.calls.append(x)
    return x * x


_square.calls = []


def test_a_stopped_run_resumes_with_the_jobs_not_done(tmp_path):
    from bench.fewshot.run import job_key, map_saved, saved
    from bench.omniglot.report import _resumed

    partial = tmp_path / "raw.partial.jsonl"
    partial.write_text(json.dumps([json.dumps(3), 9]) + "\n")  # job 3 done before a stop
    assert saved(partial) == {job_key(3): 9}
    _square.calls.clear()
    assert map_saved(1, _square, [1, 2, 3], partial) == [1, 4, 9]
    assert _square.calls == [1, 2] and not partial.exists()
    assert map_saved(1, _square, [4], partial, keep=True) == [16] and saved(partial)
    # the report says when jobs were read back (their wall time is not the run's)
    assert "1 of its 3 jobs were run by earlier invocations" in _resumed(
        {"jobs_resumed": 1, "jobs": [1, 4, 9]}
    )
    assert _resumed({"jobs": [1]}) == ""


def test_an_interval_over_the_runs_averages_each_run_over_the_seeds_first():
    """Every seed is scored on the same 20 runs: pooling runs x seeds would count each run
    once per seed and narrow the interval; the report's is over the runs' seed means."""
    import pandas as pd

    from bench.intervals import format_mean_t95
    from bench.omniglot.report import _cell

    errors = [5.0 * (i % 7) for i in range(20)]
    rows = pd.DataFrame(
        [{"index": i, "seed": s, "value": e + s} for s in (0, 1, 2) for i, e in enumerate(errors)]
    )
    per_run = pd.Series([e + 1.0 for e in errors])
    assert _cell(rows) == format_mean_t95(per_run, digits=1)
    assert _cell(rows) != format_mean_t95(rows.value, digits=1)
    assert _cell(rows.iloc[:0]) == "—"
