"""``make bilevel`` at tiny size: each problem runs from the packaged real data and does
what it is for (distilled images beat random real ones, the learned rate moves toward the
grid's best, flipped examples get lower weights); the report and plots are written."""

import csv
import math

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("mnist1d")


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    from bench.bilevel.__main__ import main

    out = tmp_path_factory.mktemp("bilevel")
    main(["--quick", "--out", str(out)])
    return out


def test_distilled_images_beat_random_real_ones(quick):
    for row in _rows(quick / "distill.csv"):
        assert float(row["distilled"]) > float(row["random_real"]) + 0.05, row


def test_the_learned_rate_moves_toward_the_grids_best(quick):

    rows = _rows(quick / "schedule.csv")
    best = float(next(r for r in rows if r["schedule"].startswith("best"))["schedule"].split()[-1])
    small = next(r for r in rows if "(from 0.15)" in r["schedule"])
    final = float(small["schedule"].rsplit(":", 1)[1])
    assert abs(math.log(final / best)) < abs(math.log(0.15 / best)), (final, best)


def test_flipped_examples_get_lower_weights(quick):
    (row,) = _rows(quick / "hyperclean.csv")
    assert float(row["f1"]) > 0.55, row
    assert float(row["val_loss_last"]) < float(row["val_loss_first"])


def test_the_meta_gradients_agree_and_the_report_is_written(quick):
    for row in _rows(quick / "memory.csv"):
        assert float(row["rel_l2_vs_naive"]) < 1e-5, row
        assert int(row["peak"]) > 0 and int(row["predicted"]) > 0
    text = (quick / "summary.md").read_text()
    for heading in ("Dataset distillation", "A learning rate", "hyper-cleaning", "93.8%"):
        assert heading in text
    for png in ("distilled.png", "schedule.png", "weights.png"):
        assert (quick / png).stat().st_size > 1000
