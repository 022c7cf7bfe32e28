"""The few-shot benchmark, short: on the embedded characters, MAML meta-learns (5-way
1-shot: after the same plain SGD step, MAML's initialisation beats a random one and
transfer's pooled features with a fresh head).

A fifth of make fewshot's budget, seed 0. Measured for seeds 0-2, accuracy after 1 step:
MAML 0.485-0.517, random 0.227-0.271, transfer 0.337-0.377; after 5 steps MAML
0.572-0.592, random 0.537-0.543, transfer 0.369-0.409.
"""

import dataclasses

import pytest

from bench.fewshot import HORIZON, PROBLEMS, evaluate, run, train_method, write_horizon

SMALL = dataclasses.replace(
    PROBLEMS["characters"], iterations=120, meta_batch=4, eval_tasks=40, eval_steps=(1, 5)
)


def _accuracy(method, seed=0):
    model, _ = train_method(SMALL, method, seed)
    res = evaluate(SMALL, model, method)
    return {k: sum(res[k]) / len(res[k]) for k in SMALL.eval_steps}


@pytest.mark.slow
def test_maml_beats_random_and_transfer_on_the_embedded_characters():
    maml, transfer, random = _accuracy("maml"), _accuracy("transfer"), _accuracy("random")
    assert maml[1] > random[1] + 0.2, (maml, random)
    assert maml[1] > transfer[1] + 0.08, (maml, transfer)
    assert maml[5] > transfer[5], (maml, transfer)


def test_horizon_experiment_records_schedule_cost_and_accuracy(tmp_path):
    """make fewshot-horizon's path at toy size: under a budget naive exceeds at the longer
    N, MAML's auto runs a checkpoint schedule; the table names it with its cost."""
    toy = {"iterations": 2, "meta_batch": 2, "eval_tasks": 3, "memory_budget": "6MiB"}
    p = HORIZON.apply(PROBLEMS["characters"], **toy, imaml_lams=(0.5,))
    runs, values, lams = run([p], (0,), 1, HORIZON.methods, (1, 8))
    write_horizon(tmp_path, runs, values, p, lams, (0,), 1.0)
    own = runs[runs.adapt == "own"].set_index(["method", "inner_steps"])
    assert own.schedule["maml", 1] == "auto -> naive"
    assert own.schedule["maml", 8].startswith("auto -> checkpoint(")
    assert own.predicted_peak_mib["maml", 8] <= 6
    assert own.schedule["implicit", 8].startswith("implicit(lam=0.5")
    assert (own.s_per_iteration > 0).all() and (own.tasks == 3).all()
    summary = (tmp_path / "summary.md").read_text()
    assert "predicted MiB (one meta-gradient)" in summary and "auto -> checkpoint(" in summary
    assert (tmp_path / "accuracy_vs_N.png").stat().st_size > 0


def test_mamlpp_trains_with_the_whole_recipe_and_reports_beside_maml(tmp_path):
    """make fewshot's MAML++ path at toy size: per-step BatchNorm and learned per-step rates
    (that moved), evaluated after its own 5 steps; its plain-SGD curve stops at the steps
    its BatchNorm has slices for; the summary names it and the published MAML++ numbers."""
    import torch

    import effmaml
    from bench.fewshot import write
    from bench.fewshot.methods import inner_params

    p = dataclasses.replace(PROBLEMS["characters-5shot"], iterations=4, meta_batch=2, eval_tasks=3)
    model, cost = train_method(p, "mamlpp", 0)
    assert cost["schedule"] == "naive" and cost["s_per_iteration"] > 0
    bn = [m for m in model.modules() if isinstance(m, effmaml.PerStepBatchNorm)]
    assert len(bn) == 4 and all(m.steps == p.mamlpp.steps for m in bn)
    assert set(model.lslr) == set(inner_params(model))
    assert not any(n.startswith(("1.", "5.")) for n in model.lslr)  # BN: outer loop only
    assert any(not torch.allclose(v, torch.full_like(v, p.mamlpp.lr)) for v in model.lslr.values())
    runs, values, lams = run([p], (0,), 1, ("maml", "mamlpp"))
    keys = set(runs[runs.method == "mamlpp"].adapt)
    assert keys == {0, 1, 3, 5, "own"}, keys  # k=10 would need 10 slices
    write(tmp_path, runs, values, lams, [p], (0,), 1.0)
    summary = (tmp_path / "summary.md").read_text()
    assert "| mamlpp" in summary and "MAML++: 5 steps with its learned" in summary
    assert "52.15 ± 0.26" in summary and "Not comparable in absolute terms" in summary
