"""Real Omniglot (bench/omniglot): the committed zips, their checksums, the runs, the
distance baselines and one method end to end, at a tiny slice."""

from __future__ import annotations

import dataclasses
import shutil

import pytest
import torch

from bench.fewshot import problems as fewshot_problems
from bench.fewshot.evaluation import evaluate
from bench.fewshot.methods import train_method
from bench.omniglot import baselines, data, experiment


@pytest.fixture(scope="module")
def run01():
    return data.load_runs(size=None, runs=1)[0]


def test_committed_archives_match_their_checksums():
    for name in [*data.BACKGROUND.values(), data.RUNS]:
        assert data.verify(name).is_file()


def test_an_altered_or_missing_archive_is_refused(tmp_path):
    for f in ("SHA256SUMS", data.RUNS):
        shutil.copy(data.DATA_DIR / f, tmp_path / f)
    raw = bytearray((tmp_path / data.RUNS).read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    (tmp_path / data.RUNS).write_bytes(bytes(raw))
    with pytest.raises(data.OmniglotDataError, match="altered.*git checkout"):
        data.load_runs(root=tmp_path)
    with pytest.raises(data.OmniglotDataError, match="missing"):
        data.MinimalSet("small1", root=tmp_path)
    with pytest.raises(ValueError, match="unknown minimal set"):
        data.MinimalSet("small3")


def test_a_slice_of_a_minimal_set_reads_as_few_shot_classes():
    s = data.MinimalSet("small2", characters=6)
    assert s.alphabets == ["Greek"] and len(s.characters) == 6
    assert {c for split in s.splits.values() for c, _ in split} == set(range(6))
    x = s.images((0, 0), [0, 1, 2])
    assert x.shape == (3, 1, 28, 28) and float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert float(x.mean()) < 0.5  # ink 1 on paper 0: mostly paper
    torch.testing.assert_close(s.images((0, 1), [0]), torch.rot90(x[:1], 1, (-2, -1)))


def test_a_run_pairs_every_test_image_with_one_training_image(run01):
    assert run01.train.shape == run01.test.shape == (20, 1, 105, 105)
    assert sorted(run01.labels.tolist()) == list(range(20))  # one test image per class


def test_mhd_is_a_symmetric_translation_invariant_distance(run01):
    a, b = (baselines.inked_points(x) for x in run01.train[:2])
    assert baselines.mhd(a, a) == 0.0
    assert baselines.mhd(a, b) == pytest.approx(baselines.mhd(b, a))
    shifted = baselines.inked_points(torch.roll(run01.train[0], (3, -2), dims=(1, 2)))
    assert baselines.mhd(a, shifted) == pytest.approx(0.0, abs=1e-9)
    # the vectorised per-run cost gives the pairwise function's classification (on 4 of the
    # run's test images, against all 20 classes)
    part = data.Run("part", run01.train, run01.test[:4], run01.labels[:4])
    train = [baselines.inked_points(x) for x in part.train]
    cost = torch.tensor([[baselines.mhd(baselines.inked_points(t), c) for c in train]
                         for t in part.test])  # fmt: skip
    assert baselines.mhd_error(part) == baselines.error_percent(part, baselines.classify(cost))


@pytest.mark.slow
def test_mhd_reproduces_the_demos_38_8_percent():
    errors = [baselines.mhd_error(r) for r in data.load_runs(size=None)]
    assert round(sum(errors) / len(errors), 1) == 38.8


def test_one_method_trains_on_a_slice_and_scores_the_runs_and_episodes(monkeypatch):
    tiny = data.MinimalSet("small1", characters=12)  # 8 training characters: 32 classes
    monkeypatch.setitem(fewshot_problems._DATA, "omniglot-small1", tiny)
    p = dataclasses.replace(
        experiment.problem_for("small1"), iterations=2, meta_batch=1, k_query=1, eval_tasks=2
    )
    model, cost = train_method(p, "maml", 0)
    assert cost["schedule"] == "naive"
    errors = experiment.score_runs(p, model, "maml", data.load_runs(runs=1))
    assert len(errors) == 1 and 0.0 <= errors[0] <= 100.0
    five = experiment.narrowed(model, 5)
    x = tiny.images((0, 0), [0, 1, 2, 3, 4])
    with torch.no_grad():
        torch.testing.assert_close(five(x), model(x)[:, :5])
    acc = evaluate(dataclasses.replace(p, n_way=5, k_query=3), five, "maml", eval_steps=())
    assert len(acc["own"]) == 2
    with pytest.raises(ValueError, match="cannot be narrowed"):
        experiment.narrowed(model, 21)


def test_the_readme_line_names_the_best_method_and_whether_it_beats_mhd(tmp_path):
    from bench.omniglot.report import values_frame
    from bench.report.readme import _omniglot_line

    results = [
        (f"omniglot-{s}", m, 0, {}, {"runs": [e]})  # the runs in error %
        for s in ("small1", "small2")
        for m, e in (("maml", 70.0), ("transfer", 50.0))
    ]
    (tmp_path / "fewshot-omniglot").mkdir()
    values_frame(results, {"mhd": [40.0]}).to_csv(
        tmp_path / "fewshot-omniglot" / "values.csv", index=False
    )
    line = _omniglot_line(tmp_path)
    assert "best of ours transfer 50.0% / 50.0%, MAML 70.0% / 70.0%" in line
    assert "MHD baseline 40.0%; no learned method beats it" in line
