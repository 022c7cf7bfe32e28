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
