"""naive == a hand-written unrolled reference (float64), over a pairwise option grid."""

import dataclasses

import pytest

from .helpers import FULL_ROW, GRID, Opt, assert_results_match, reference_unroll, run_effmaml

STEPS = 4
# The hand-written reference has no clipping; clipping has its own reference (test_clip).
ROWS = [dataclasses.replace(o, clip=None) for o in GRID] + [
    dataclasses.replace(FULL_ROW, clip=None)
]


@pytest.mark.parametrize("opt", ROWS, ids=Opt.id)
def test_naive_matches_reference(opt):
    ours = run_effmaml(opt, "naive", STEPS)
    ref = reference_unroll(opt, STEPS)
    # Same operations in the same order: values and gradients agree to the last bits.
    assert_results_match(ours, ref, grad_rel=1e-12)
    assert ours["rng"].equal(ref["rng"])


def test_grid_is_pairwise_and_small():
    from itertools import combinations

    from .helpers import GRID_FACTORS

    assert len(GRID) <= 20
    for a, b in combinations(GRID_FACTORS, 2):
        seen = {(getattr(o, a), getattr(o, b)) for o in GRID}
        assert len(seen) == len(GRID_FACTORS[a]) * len(GRID_FACTORS[b]), (a, b)
