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
    assert "when the cost of one outer step was measured" in text  # the load the times saw
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


def test_a_pool_job_from_a_main_module_is_refused_before_any_work():
    """``python -m bench.horizons`` once handed a function of its own ``__main__`` to the
    spawned workers, which cannot import it: every worker died and the run hung after its
    first stage. The one-worker run (this file's) now fails the same way a pooled one would."""
    from bench.fewshot.run import importable, map_saved, pool_map
    from bench.horizons import distill

    importable(distill.job)  # the distillation's job lives in a module a worker imports

    def local(x):
        return x

    def in_main(x):
        return x

    in_main.__module__ = "bench.horizons.__main__"
    for fn in (local, in_main, lambda x: x):
        with pytest.raises(ValueError, match="cannot run in a spawned worker"):
            pool_map(None, fn, [1])
    with pytest.raises(ValueError, match="define it at the top of a module"):
        map_saved(1, in_main, [1], __import__("pathlib").Path("unused.jsonl"))


def test_a_stopped_run_starts_again_from_the_stage_after_the_last_saved(quick, tmp_path):
    from bench.horizons import __main__ as cli

    raw = json.loads((quick / "raw.json").read_text())
    assert not list(quick.glob("stage-*.json"))  # removed once raw.json is written
    settings = {"a": (1, 2)}
    saved = {"settings": {"a": [1, 2]}, "result": raw["datasets"]}
    (tmp_path / "stage-datasets.json").write_text(json.dumps(saved))
    resumed: list[str] = []
    got = cli._stage(tmp_path, "datasets", settings, lambda: pytest.fail("ran again"), resumed)
    assert got == raw["datasets"] and resumed == ["datasets"]
    # other settings: the saved stage is not theirs, it runs (and is saved) again
    again = cli._stage(tmp_path, "datasets", {"a": (3,)}, lambda: {"new": 1}, resumed)
    assert again == {"new": 1} and resumed == ["datasets"]
    assert json.loads((tmp_path / "stage-datasets.json").read_text())["result"] == {"new": 1}
