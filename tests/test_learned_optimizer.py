"""``make learned-optimizer`` at tiny size: the rule meta-trains through an exact schedule
and a truncated one, the baselines' rates are tuned, everything is scored on a held-out
task, the exact meta-gradient is naive's, and the report is rebuilt from raw.json alone."""

import csv

import pytest

pytest.importorskip("sklearn")


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    from bench.learned_optimizer.__main__ import main

    out = tmp_path_factory.mktemp("learned-optimizer")
    main(["--quick", "--out", str(out)])
    return out


def test_every_optimizer_is_scored_at_n_and_2n(quick):
    rows = _rows(quick / "heldout.csv")
    methods = {r["method"] for r in rows}
    assert methods == {
        "exact", "truncated K=3", "untrained rule", "sgd-momentum (tuned)", "adam (tuned)"
    }  # fmt: skip
    assert {r["horizon"] for r in rows} == {"N", "2N"}
    assert all(float(r["train_loss"]) > 0 for r in rows)


def test_meta_training_improves_on_the_untrained_rule(quick):
    at_n = {r["method"]: float(r["train_loss"]) for r in _rows(quick / "heldout.csv")
            if r["horizon"] == "N"}  # fmt: skip
    assert at_n["exact"] < at_n["untrained rule"], at_n


def test_the_tuned_rate_is_the_grids_best(quick):
    rows = _rows(quick / "tuning.csv")
    for name in ("sgd-momentum", "adam"):
        grid = [r for r in rows if r["optimizer"] == name]
        best = min(grid, key=lambda r: float(r["val_loss"]))
        assert [r["chosen"] for r in grid].count("True") == 1
        assert best["chosen"] == "True"


def test_exact_is_naives_and_truncated_is_not(quick):
    rows = {r["strategy"]: r for r in _rows(quick / "memory.csv")}
    exact = next(r for k, r in rows.items() if k.startswith("checkpoint"))
    truncated = next(r for k, r in rows.items() if k.startswith("truncated"))
    assert float(exact["rel_l2_vs_naive"]) < 1e-5, exact
    assert float(truncated["rel_l2_vs_naive"]) > 1e-3, truncated
    assert all(int(r["peak"]) > 0 for r in rows.values())


def test_report_only_rebuilds_the_same_report(quick):
    from bench.learned_optimizer.__main__ import main

    before = {p.name: p.read_bytes() for p in quick.iterdir() if p.suffix in (".md", ".csv")}
    for name in before:
        (quick / name).unlink()
    main(["--quick", "--out", str(quick), "--report-only"])
    after = {p.name: p.read_bytes() for p in quick.iterdir() if p.suffix in (".md", ".csv")}
    assert after == before
    text = after["summary.md"].decode()
    for heading in ("## Meta-training", "## The baselines' rates", "## Memory and agreement"):
        assert heading in text
    assert (quick / "curves.png").stat().st_size > 1000


def test_readme_line_comes_from_the_raw_data(quick):
    import json

    from bench.learned_optimizer.report import headline

    line = headline(json.loads((quick / "raw.json").read_text()))
    for part in ("N = 6 inner steps", "exact ", "adam (tuned) ", "naive ", "MiB"):
        assert part in line, (part, line)
