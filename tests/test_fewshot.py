"""The few-shot benchmark, short: on the embedded characters, MAML meta-learns (5-way
1-shot: after the same plain SGD step, MAML's initialisation beats a random one and
transfer's pooled features with a fresh head).

A fifth of make fewshot's budget, seed 0. Measured for seeds 0-2, accuracy after 1 step:
MAML 0.485-0.517, random 0.227-0.271, transfer 0.337-0.377; after 5 steps MAML
0.572-0.592, random 0.537-0.543, transfer 0.369-0.409.
"""

import dataclasses

import pytest

from bench.fewshot import PROBLEMS, evaluate, train_method

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
