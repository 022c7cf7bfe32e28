"""``make horizons`` at tiny size: every method learns, is tuned and scored; the summary is
rebuilt from the raw data alone; the memory of exact and truncated is measured; online
hypergradient descent's step is truncation with a window of one step."""

import dataclasses
import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    from bench.horizons.__main__ import main

    out = tmp_path_factory.mktemp("horizons")
    main(["--quick", "--out", str(out)])
    return out


def test_every_method_is_scored_from_every_test_seed(quick):
    from bench.horizons.run import QUICK

    raw = json.loads((quick / "raw.json").read_text())
    (d,) = raw["datasets"].values()
    labels = {"best constant", "tuned cosine", "online HD", *QUICK.methods()}
    assert set(d["scores"]) == labels
    for label, runs in d["scores"].items():
        assert len(runs) == len(QUICK.test_seeds), label
        assert all(math.isfinite(r["train_loss"]) and 0 <= r["test_acc"] <= 1 for r in runs)
    for name in QUICK.methods():  # every outer step was taken (none skipped as non-finite)
        (learned,) = d["meta"][name].values()
        assert len(learned["knots"]) == QUICK.outer_steps
        assert all(math.isfinite(x) for x in learned["losses"])
    # truncated windows stopped the unroll at random steps, never before K
    ends = d["meta"]["truncated 4"][str(QUICK.meta_lrs[0])]["ends"]
    assert all(4 <= n <= QUICK.steps for n in ends)
    assert d["meta"]["exact"][str(QUICK.meta_lrs[0])]["ends"] == [QUICK.steps] * QUICK.outer_steps


def test_the_summary_is_rebuilt_from_the_raw_data_alone(quick, tmp_path):
    from bench.horizons.__main__ import main

    shutil.copy(quick / "raw.json", tmp_path / "raw.json")
    main(["--report-only", "--out", str(tmp_path)])
    assert (tmp_path / "summary.md").read_text() == (quick / "summary.md").read_text()
    assert (tmp_path / "scores.csv").read_text() == (quick / "scores.csv").read_text()
    text = (quick / "summary.md").read_text()
    for phrase in ("## digits", "exact −", "## The cost of one outer step", "Dataset distillation"):
        assert phrase in text
    assert (quick / "schedules.png").stat().st_size > 1000


def test_memory_of_exact_and_truncated_is_measured(quick):
    raw = json.loads((quick / "raw.json").read_text())
    methods = {r["method"]: r for r in raw["costs"]}
    assert {"naive", "exact", "truncated 4", "online HD"} <= set(methods)
    for r in methods.values():
        assert r["peak_bytes"] > 0 and r["seconds"] > 0
    assert methods["exact"]["label"].startswith("checkpoint")
    assert methods["truncated 4"]["label"] == "truncated(window=4)"
    assert {r["method"] for r in raw["distill"]["costs"]} == {"exact", "truncated"}


def test_online_hypergradient_descent_is_a_window_of_one_step():
    """HD's rate update at step N is −β times effmaml's truncated(window=1) hypergradient
    of the loss on batch N w.r.t. the rate of step N − 1, on the rates HD used."""
    import effmaml
    from bench.horizons.meta import ce
    from bench.horizons.problem import MOMENTUM, setup, train_hd

    n, beta = 5, 0.01
    s = dataclasses.replace(setup("digits", n + 1), batch=10)
    rates = train_hd(s, 0.05, beta, seed=3).rates
    batches = s.batches(3)
    lr = torch.tensor(rates[:n], requires_grad=True)
    maml = effmaml.MAML(
        s.model(3), ce, effmaml.SGD(lr, momentum=MOMENTUM, per_step=True), "truncated", window=1
    )
    adapted = maml.adapt(batches[:n])
    (grad,) = torch.autograd.grad(F.cross_entropy(adapted(batches[n][0]), batches[n][1]), lr)
    assert torch.equal(grad[: n - 1], torch.zeros(n - 1))
    torch.testing.assert_close(
        torch.tensor(rates[n] - rates[n - 1]), -beta * grad[n - 1], rtol=1e-4, atol=1e-9
    )
