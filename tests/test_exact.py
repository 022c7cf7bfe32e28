"""The exactness specification: every exact schedule == naive, in float64.

Parameters, BatchNorm buffers, inner losses and the query loss bitwise; every gradient
(adapted and fixed parameters, learned learning rates) to summation order (1e-12 of the
largest); the RNG after the query as naive leaves it (see ``helpers.compare_to_naive``).

A new schedule joins every check below by adding one line to :data:`SCHEDULES`: the
full option row (Adam, learned rates per parameter and step, per-step BatchNorm updated,
dropout, clipping, ANIL head, a lazy batch source, the proximal term, the multi-step
loss), the pairwise grid of options (the
schedule is one more factor, so each schedule meets every value of every other option),
and unrolls of 1, 2 and 12 steps. ``auto`` is in it twice: under the default budget and
under one between the smallest exact schedule's predicted peak and naive's, where it must
choose a recomputing schedule.

Outer tensors: the grid's factor "outer" is what else requires grad and is read by the
steps (``helpers.OUTER_KINDS``): learned inputs (views of one leaf), a learned
augmentation (non-leaf batches), per-example weights, a non-leaf temperature in loss_fn's
closure, a second network; their meta-gradients are compared like the parameters', and
the full option row meets each of them too.
"""

import dataclasses

import pytest
import torch

from .helpers import (
    BELOW_NAIVE,
    FAMILY,
    FULL_ROW,
    GRID_FACTORS,
    OUTER_KINDS,
    Opt,
    compare_to_naive,
    pairwise,
    run_effmaml,
)

STEPS = 7  # 3 does not divide it

SCHEDULES = [
    ("checkpoint", {"segment": 1, "pullback": "segment"}),
    ("checkpoint", {"segment": 2, "pullback": "segment"}),
    ("checkpoint", {"segment": 3, "pullback": "segment"}),
    ("checkpoint", {"segment": STEPS, "pullback": "segment"}),
    ("checkpoint", {"segment": None, "pullback": "segment"}),
    ("checkpoint", {"segment": 1, "pullback": "step"}),
    ("checkpoint", {"segment": 3, "pullback": "step"}),
    ("checkpoint", {"segment": None, "pullback": "step"}),
    ("revolve", {"slots": 1}),
    ("revolve", {"slots": 2}),
    ("revolve", {"slots": 3}),
    ("revolve", {"slots": 8}),
    # on a CPU offload is checkpoint; on CUDA, through pinned memory: tests/test_resnet.py
    ("offload", {"segment": 3, "pullback": "step"}),
    ("offload", {"segment": 3, "pullback": "segment"}),
    # auto under the default budget (naive fits) and under one that naive does not fit
    ("auto", {}),
    ("auto", {"memory_budget": BELOW_NAIVE}),
]


def _id(value) -> str:
    if isinstance(value, Opt):
        return value.id()
    if isinstance(value, dict):
        return "-".join(f"{k}{v}" for k, v in value.items())
    return str(value)


def named(*labels: str) -> list:
    """The rows of :data:`SCHEDULES` with these labels (``"revolve-slots2"``), in order."""
    rows = {f"{strategy}-{_id(kw)}": (strategy, kw) for strategy, kw in SCHEDULES}
    return [rows[label] for label in labels]


def _check_resolved(ours, kw, steps):
    """The options as run: given ones as given (capped at N), chosen ones in range."""
    info = ours["adapted"].info
    if "chosen" in info:  # auto: what it ran is exact, and a budget below naive recomputes
        if kw.get("memory_budget") == BELOW_NAIVE and steps > 1:
            assert not info["chosen"].startswith("naive"), info["chosen"]
        return
    for key, value in kw.items():
        if value is None:
            assert 1 <= info[key] <= steps, (key, info[key])
        elif isinstance(value, int):
            assert info[key] == min(value, steps), (key, info[key])
        else:
            assert info[key] == value


@pytest.mark.parametrize("strategy,kw", SCHEDULES, ids=_id)
def test_full_row(strategy, kw):
    ours = compare_to_naive(FULL_ROW, strategy, STEPS, **kw)
    _check_resolved(ours, kw, STEPS)


def _grid():
    factors = {**GRID_FACTORS, "outer": OUTER_KINDS, "schedule": list(range(len(SCHEDULES)))}
    rows = []
    for row in pairwise(factors):
        strategy, kw = SCHEDULES[row.pop("schedule")]
        rows.append((Opt(**row), strategy, kw))
    return rows


@pytest.mark.parametrize("opt,strategy,kw", _grid(), ids=_id)
def test_pairwise_grid(opt, strategy, kw):
    compare_to_naive(opt, strategy, STEPS, **kw)


@pytest.mark.parametrize("steps", [1, 2, 12])
@pytest.mark.parametrize("strategy,kw", SCHEDULES, ids=_id)
def test_unroll_lengths(strategy, kw, steps):
    ours = compare_to_naive(FULL_ROW, strategy, steps, **kw)
    _check_resolved(ours, kw, steps)


# -- SiLU: states bitwise naive's only because the advances keep their graph ----------------
# every parameter adapts: the head alone (after the last SiLU) never meets its backward
# (per-parameter rates and BatchNorm without per-step slices: with every parameter adapted
# by Adam under the proximal term, a per-step slice not yet used sees a gradient of ~0, and
# Adam's update divides it by ~eps: ~1e8 per step of sensitivity, so naive and checkpoint
# part by 1e-6 after 3 steps from 1e-17 summation differences, SiLU or not). SGD with
# momentum, not Adam: a bias before BatchNorm has a true gradient of 0, so Adam's update of
# it is rounding noise divided by ~eps (torch's sqrt(v̂) + eps), a sensitivity that the
# conditioning measured below (θ scaled) does not see
SILU_ROW = dataclasses.replace(
    FULL_ROW,
    optim="momentum",
    act="silu",
    dropout=False,
    clip=None,
    select="all",
    lr="per_param",
    bn="update",
    msl=False,
)


SILU_SCHEDULES = named("checkpoint-segment1-pullbacksegment", "checkpoint-segment3-pullbackstep",
                       "revolve-slots2")  # fmt: skip


@pytest.mark.parametrize("strategy,kw", SILU_SCHEDULES, ids=_id)
def test_silu_model_is_bitwise_naive_by_default(strategy, kw):
    """SiLU's first derivative differs (1 ulp) with and without create_graph; the probe
    sees it and the advances keep each step's graph: values bitwise naive's."""
    ours = compare_to_naive(SILU_ROW, strategy, STEPS, **kw)
    assert ours["adapted"].facts.exact_states is True


def test_silu_model_with_first_order_advances_is_within_rounding_times_conditioning():
    """exact_states=False: the forward's states are not naive's. The meta-gradient's error
    is bounded by float64 rounding, a few ulps per step (8·N·ε), times the problem's
    conditioning, measured as the meta-gradient's relative change per relative change of
    θ (naive, θ scaled by 1 + 1e-7)."""
    eps = torch.finfo(torch.float64).eps
    ref = run_effmaml(SILU_ROW, "naive", STEPS)
    off = run_effmaml(SILU_ROW, "checkpoint", STEPS, segment=1, exact_states=False)
    assert off["adapted"].facts.exact_states is False
    assert any(not torch.equal(off["params"][k], ref["params"][k]) for k in ref["params"])
    delta = 1e-7
    moved = run_effmaml(SILU_ROW, "naive", STEPS, theta_scale=1 + delta)
    conditioning = _rel(moved["grads"], ref["grads"]) / delta
    bound = 8 * STEPS * eps * max(conditioning, 1.0)
    error = _rel(off["grads"], ref["grads"])
    assert 0 < error <= bound, (error, bound, conditioning)


def _rel(a, b):
    diff = sum(((x - y) ** 2).sum() for x, y in zip(a, b)) ** 0.5
    return float(diff / sum((y**2).sum() for y in b) ** 0.5)


# -- outer tensors at the hardest row (a lazy source builds each batch again at every index)
OUTER_SCHEDULES = named(
    "checkpoint-segment3-pullbacksegment",
    "checkpoint-segment3-pullbackstep",
    "revolve-slots2",
    "offload-segment3-pullbacksegment",
    "auto-memory_budgetbelow_naive",
)


@pytest.mark.parametrize("strategy,kw", OUTER_SCHEDULES, ids=_id)
@pytest.mark.parametrize("outer", OUTER_KINDS[1:])
def test_outer_tensors_at_the_hardest_row(outer, strategy, kw):
    ours = compare_to_naive(dataclasses.replace(FULL_ROW, outer=outer), strategy, STEPS, **kw)
    facts = ours["adapted"].facts
    if not facts.chosen.startswith("naive"):  # naive finds nothing: its graph needs no help
        assert len(facts.outer) >= 1


# -- the rest of the torch.optim family (helpers.FAMILY), each at the hardest row ------------
# Each rule meets the three ways a schedule recomputes (segment pullbacks, step pullbacks,
# the binomial schedule) in `make test`, and every schedule of SCHEDULES under `make
# test-slow`; the rate kind cycles through the learned ones (per parameter and step, one
# tensor, per parameter).
FAMILY_SCHEDULES = named(
    "checkpoint-segment3-pullbacksegment", "checkpoint-segment3-pullbackstep", "revolve-slots2"
)


def _family_rows():
    rows = []
    for i, optim in enumerate(FAMILY):
        opt = dataclasses.replace(
            FULL_ROW, optim=optim, lr=("per_step", "learned", "per_param")[i % 3]
        )
        for strategy, kw in SCHEDULES:
            marks = [] if (strategy, kw) in FAMILY_SCHEDULES else [pytest.mark.slow]
            rows.append(pytest.param(opt, strategy, kw, marks=marks))
    return rows


@pytest.mark.parametrize("opt,strategy,kw", _family_rows(), ids=_id)
def test_every_inner_optimizer(opt, strategy, kw):
    compare_to_naive(opt, strategy, STEPS, **kw)
