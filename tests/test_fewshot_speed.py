"""make fewshot-speed at toy size: every library computes its family's reference meta-gradient
(float64), effmaml dispatches no tensor work beyond a hand-written loop's, and the table
carries each library's time, paired ratio to the fastest peer, ops and peak."""

import collections
import dataclasses
import math
import warnings

import pandas as pd
import pytest
import torch

from bench.fewshot.problems import ce_loss
from bench.fewshot_speed import (
    LIBRARIES,
    PEERS,
    REFERENCE,
    Speed,
    config_of,
    front,
    make_model,
    make_tasks,
    run,
)
from bench.fewshot_speed import summary as speed_summary
from bench.fewshot_speed.__main__ import main
from bench.timing import count_ops, median_ci, paired_ratios

# iMAML at toy size needs λ = 1 and damping 10 for a positive-definite system (the full
# workload's λ = 0.5, damping 0.1 is, measured, at N = 5 and 10); CG then runs all 5
# iterations without converging, so equal meta-gradients mean equal iterates
TOY = Speed(
    meta_batch=2,
    width=4,
    image=16,
    steps=(1, 3),
    imaml_steps=(3,),
    rounds=2,
    dtype="float64",
    imaml_lam=1.0,
    cg_damping=10.0,
)


def test_every_library_gives_its_familys_reference_meta_gradient_in_float64():
    df = run(TOY, torch.device("cpu"))
    assert set(df.library) == set(LIBRARIES)
    assert set(df[df.family == "maml"].steps) == {1, 3}
    assert set(df[df.family == "imaml"].steps) == {3}
    assert (df.reference == df.family.map(REFERENCE)).all()
    # the same sums, some in another order (TorchOpt's CG on the system scaled by λ)
    assert (df.grad_rel_l2 < 1e-12).all(), df[["library", "steps", "grad_rel_l2"]]
    assert (df.s_per_iteration > 0).all() and (df.s_min <= df.s_max).all()
    assert (df.aten_ops > 0).all() and (df.peak_mib >= 0).all()
    for (family, _), at in df.groupby(["family", "steps"]):
        fastest = at.fastest_peer.iloc[0]
        assert (at.fastest_peer == fastest).all() and LIBRARIES[fastest].family == family
        assert LIBRARIES[fastest].peer
        assert at.set_index("library").loc[fastest, "vs_fastest_peer"] == 1.0
    assert (df.vs_fastest_peer_lo <= df.vs_fastest_peer).all()
    assert (df.vs_fastest_peer <= df.vs_fastest_peer_hi).all()
    text = speed_summary(df, TOY, 1.0)
    assert "| iMAML" in text and "| MAML" in text and "N=3" in text and "ops ·" in text
    assert "effmaml implicit / torchopt implicit" in text


def test_a_run_needs_rounds_to_choose_the_fastest_peer_and_to_measure():
    with pytest.raises(ValueError, match="at least 2 rounds"):
        run(dataclasses.replace(TOY, rounds=1), torch.device("cpu"))


def test_the_imaml_comparison_is_not_at_convergence():
    """The toy's CG runs every iteration and stops short of the solution, so the float64
    equality above holds iterate by iterate, not only at a converged answer."""
    model = make_model(TOY, torch.device("cpu"))
    (support, query), *_ = make_tasks(TOY, torch.device("cpu"))
    maml = front(model, TOY, "implicit")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no non-positive curvature
        adapted = maml.adapt(support, steps=TOY.imaml_steps[0])
        ce_loss(adapted, query).backward()
    assert adapted.facts.solve.cg_iterations == TOY.cg_steps
    assert adapted.facts.solve.cg_residual > 1e-3


def test_effmaml_naive_dispatches_the_hand_written_loops_ops_and_its_finiteness_check():
    """One meta-iteration of effmaml naive runs exactly the torch.func loop's operations plus
    ``bool(torch.isfinite(loss))`` once per inner step: no copy, no extra pass, whatever the
    machine's load says about the seconds."""
    n = 3
    model = make_model(TOY, torch.device("cpu"))
    tasks = make_tasks(TOY, torch.device("cpu"))
    eff = LIBRARIES["effmaml naive"].setup(model, TOY)
    loop = LIBRARIES["torch.func loop"].setup(model, TOY)
    eff(tasks, n)  # first calls set up caches (the probe is not run by naive, but be fair)
    loop(tasks, n)
    eff_ops = count_ops(lambda: eff(tasks, n))
    loop_ops = count_ops(lambda: loop(tasks, n))
    loss = torch.tensor(1.0, dtype=torch.float64)
    check = count_ops(lambda: bool(torch.isfinite(loss)))
    expected = collections.Counter({op: k * n * len(tasks) for op, k in check.items()})
    assert eff_ops - loop_ops == expected, (eff_ops - loop_ops, expected)
    assert not loop_ops - eff_ops


def test_peers_are_the_libraries_effmaml_is_compared_with():
    assert set(PEERS) == {"higher", "torchopt", "torch.func loop", "torchopt implicit"}
    assert all(not LIBRARIES[ref].peer for ref in REFERENCE.values())


def test_torchopt_here_is_the_sweeps_adapter_and_leaves_the_model_as_it_was():
    """One adapter per peer (bench.peers): fewshot-speed's TorchOpt is the sweep's, which
    restores the BatchNorm statistics its in-place forward moved (fewshot-speed's Conv-4
    keeps none; a model that does shows it) and the parameters it stepped in place."""
    pytest.importorskip("torchopt")
    from bench.fewshot_speed import libraries
    from bench.peers import TorchOpt

    device = torch.device("cpu")
    model = make_model(TOY, device)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    LIBRARIES["torchopt"].setup(model, TOY)(make_tasks(TOY, device), 2)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert libraries.TorchOpt is TorchOpt  # the sweep's adapter, not a copy

    torch.manual_seed(0)
    bn = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    assert any("running" in k for k in before)

    def loss(m, batch):
        return torch.nn.functional.cross_entropy(m(batch[0]), batch[1])

    batch = (torch.randn(8, 3), torch.randint(0, 2, (8,)))
    TorchOpt(bn, 0.1)(loss, [batch] * 3, batch)
    for k, v in bn.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is not None for p in bn.parameters())


@pytest.mark.parametrize(
    ("n", "ranks", "coverage"),
    # the textbook order statistics of a 95% interval for the median
    [(6, (1, 6), 0.969), (9, (2, 8), 0.961), (15, (4, 12), 0.965), (30, (10, 21), 0.957)],
)
def test_median_ci_takes_the_binomial_order_statistics(n, ranks, coverage):
    values = [10.0 * (k + 1) for k in reversed(range(n))]  # unsorted on purpose
    med, lo, hi, cov = median_ci(values)
    assert med == 10.0 * (n + 1) / 2
    assert (lo, hi) == (10.0 * ranks[0], 10.0 * ranks[1])
    assert math.isclose(cov, coverage, abs_tol=5e-4) and cov >= 0.95


def test_median_ci_with_few_values_gives_the_range_and_says_its_coverage():
    assert median_ci([3.0, 1.0, 2.0]) == (2.0, 1.0, 3.0, 0.75)
    with pytest.raises(ValueError, match="at least one"):
        median_ci([])


def test_paired_ratios_need_the_same_rounds():
    assert paired_ratios([2.0, 3.0], [1.0, 2.0]) == [2.0, 1.5]
    with pytest.raises(ValueError, match="same rounds"):
        paired_ratios([1.0], [1.0, 2.0])


def test_a_summary_is_rebuilt_from_its_csv_and_names_only_what_ran(tmp_path):
    pair = ("effmaml naive", "torch.func loop")
    df = run(dataclasses.replace(TOY, steps=(2,), imaml_steps=()), torch.device("cpu"), pair)
    df["run_s"] = 12.0
    df.to_csv(tmp_path / "runs.csv", index=False)
    written = pd.read_csv(tmp_path / "runs.csv")
    assert config_of(written) == dataclasses.replace(TOY, steps=(2,), imaml_steps=())
    main(["--report", str(tmp_path)])
    text = (tmp_path / "summary.md").read_text()
    assert text == speed_summary(written, config_of(written), 12.0)
    assert "effmaml naive and torch.func loop side by side" in text
    assert "iMAML" not in text and "higher" not in text and "0.2 minutes" in text
