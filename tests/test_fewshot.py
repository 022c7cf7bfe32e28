"""The few-shot benchmark, short: on the embedded characters, MAML meta-learns (5-way
1-shot: after the same 5 plain SGD steps, MAML's initialisation beats a random one and
transfer's pooled features), and iMAML's λ is chosen on validation classes.

A fifth of make fewshot's budget, seed 0; margins from seeds 0-2 in the comment below.
"""

import dataclasses

import pytest

from bench.fewshot import PROBLEMS, evaluate, train_method

SMALL = dataclasses.replace(
    PROBLEMS["characters"], iterations=120, meta_batch=4, eval_tasks=40, eval_steps=(5,)
)


def _accuracy(method, seed=0):
    model, _ = train_method(SMALL, method, seed)
    res = evaluate(SMALL, model, method)
    return sum(res[5]) / len(res[5])


@pytest.mark.slow
def test_maml_beats_random_and_transfer_on_the_embedded_characters():
    maml, transfer, random = _accuracy("maml"), _accuracy("transfer"), _accuracy("random")
    assert maml > random + 0.05, (maml, random)
    assert maml > transfer + 0.05, (maml, transfer)
