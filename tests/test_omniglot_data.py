"""effmaml.omniglot: the archives' digests, the refusals of missing, altered and unknown
files, a minimal set and torchvision's folder layout read as a labelled dataset, and the
20 one-shot runs."""

import shutil
import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from effmaml.episodes import QUARTER_TURNS, EpisodeSampler
from effmaml.omniglot import DIGESTS, Omniglot, OmniglotDataError, one_shot_runs, verify

DATA = Path(__file__).resolve().parents[1] / "data" / "omniglot"
RUNS = "all_runs.zip"


def test_the_committed_archives_match_the_digests_and_sha256sums():
    listed = {}
    for line in (DATA / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split()
        listed[name] = digest
    assert listed == {n: d for n, (a, d) in DIGESTS.items() if a == "sha256"}
    for name in listed:
        assert verify(DATA / name) == (DATA / name).resolve()


def test_an_altered_missing_or_unknown_archive_is_refused(tmp_path):
    altered = tmp_path / RUNS
    raw = bytearray((DATA / RUNS).read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    altered.write_bytes(bytes(raw))
    with pytest.raises(OmniglotDataError, match=r"altered or truncated: SHA256 .* expected") as e:
        one_shot_runs(altered)
    assert "git checkout" not in str(e.value)  # a copy outside the repository's data/omniglot
    (tmp_path / "data" / "omniglot").mkdir(parents=True)
    in_repo = tmp_path / "data" / "omniglot" / RUNS
    altered.rename(in_repo)
    with pytest.raises(OmniglotDataError, match=r"git checkout -- data/omniglot/all_runs.zip"):
        one_shot_runs(in_repo)
    with pytest.raises(OmniglotDataError, match="does not exist"):
        Omniglot(tmp_path / "images_background_small1.zip")
    shutil.copy(DATA / "images_background_small2.zip", tmp_path / "mine.zip")
    with pytest.raises(OmniglotDataError, match="not a known Omniglot archive.*check=False"):
        Omniglot(tmp_path / "mine.zip")
    assert len(Omniglot(tmp_path / "mine.zip", check=False, characters=2)) == 40


def test_a_minimal_set_reads_as_a_labelled_dataset():
    s = Omniglot(DATA / "images_background_small2.zip", characters=6)
    assert s.alphabets == ["Greek"] and s.characters[0] == "Greek/character01"
    assert len(s) == 120 and s.targets == [c for c in range(6) for _ in range(20)]
    x, y = s[21]
    assert x.shape == (1, 28, 28) and y == 1 and 0.0 <= float(x.min()) <= float(x.max()) <= 1
    assert float(x.mean()) < 0.5  # ink 1 on paper 0: mostly paper
    big = Omniglot(DATA / "images_background_small2.zip", size=None, characters=1)
    assert set(big[0][0].unique().tolist()) == {0.0, 1.0} and big[0][0].shape == (1, 105, 105)
    episodes = EpisodeSampler(s, n_way=20, k_shot=1, k_query=2, transforms=QUARTER_TURNS)
    (xs, _), (xq, _) = episodes.episode(0)
    assert xs.shape == (20, 1, 28, 28) and xq.shape == (40, 1, 28, 28)


def _png(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (105, 105), value).save(path)


def torchvision_layout(root, chars=(("Alpha", 3), ("Beta", 2)), evaluation=(("Gamma", 2),)):
    """``omniglot-py/images_{background,evaluation}/Alphabet/characterNN/*.png`` (white
    paper; character n's images have paper of 255 - 10 n)."""
    n = 0
    for folder, alphabets in (("images_background", chars), ("images_evaluation", evaluation)):
        for alphabet, count in alphabets:
            for c in range(count):
                n += 1
                for i in range(20):
                    char = root / "omniglot-py" / folder / alphabet / f"character{c + 1:02d}"
                    _png(char / f"{n:04d}_{i + 1:02d}.png", 255 - 10 * n)
    return n


def test_torchvisions_folder_layout_reads_both_subsets_in_order(tmp_path):
    n = torchvision_layout(tmp_path)
    data = Omniglot(tmp_path)
    assert len(data.characters) == n == 7 and data.alphabets == ["Alpha", "Beta", "Gamma"]
    assert data.characters[5] == "Gamma/character01"
    x, y = data[0]
    assert y == 0
    torch.testing.assert_close(x, torch.full_like(x, 10 / 255), rtol=0, atol=1e-6)  # ink 10
    assert len(Omniglot(tmp_path / "omniglot-py").characters) == n  # without omniglot-py/
    only = Omniglot(tmp_path, subsets=("images_background",))
    assert len(only.characters) == 5


def test_a_users_copy_is_read_where_it_is_and_refused_with_what_is_wrong(tmp_path, monkeypatch):
    """A user's own archives and folders: ``~`` is their home; a path that does not exist,
    a truncated full archive, a file that is not a zip, a subset named wrong and an archive
    without runs each say what is wrong, without this repository's git advice for files it
    does not commit."""
    monkeypatch.setenv("HOME", str(tmp_path))
    torchvision_layout(tmp_path / "data")
    assert len(Omniglot("~/data/omniglot-py").characters) == 7
    assert len(Omniglot("~/data", subsets="images_background").characters) == 5  # one name
    with pytest.raises(OmniglotDataError, match=r"nowhere does not exist.*images_background/"):
        Omniglot(tmp_path / "nowhere")
    (tmp_path / "omniglot.tar").write_bytes(b"not a folder")
    with pytest.raises(OmniglotDataError, match=r"is a file, not a .zip archive or a folder"):
        Omniglot(tmp_path / "omniglot.tar")
    with pytest.raises(OmniglotDataError, match=r"holds images_background, images_evaluation\)"):
        Omniglot(tmp_path / "data", subsets=("background",))
    full = tmp_path / "images_background.zip"
    full.write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(OmniglotDataError, match=r"altered or truncated: MD5") as err:
        Omniglot(full)
    assert "git checkout" not in str(err.value)
    with pytest.raises(OmniglotDataError, match=r"not a readable zip archive.*fetch it again"):
        Omniglot(full, check=False)
    with pytest.raises(OmniglotDataError, match=r"no character folders.*one_shot_runs"):
        Omniglot(DATA / RUNS)
    with pytest.raises(OmniglotDataError, match=r"holds no run folders.*all_runs.zip"):
        one_shot_runs(DATA / "images_background_small1.zip")
    with pytest.raises(OmniglotDataError, match="is a folder, not an archive"):
        one_shot_runs(tmp_path / "data", check=False)


def test_a_wrong_or_incomplete_folder_is_refused(tmp_path):
    with pytest.raises(OmniglotDataError, match="not an Omniglot folder"):
        Omniglot(tmp_path)
    torchvision_layout(tmp_path)
    shutil.rmtree(tmp_path / "omniglot-py" / "images_evaluation")
    with pytest.raises(OmniglotDataError, match=r"images_evaluation missing.*subsets="):
        Omniglot(tmp_path)
    for p in (tmp_path / "omniglot-py" / "images_background" / "Beta" / "character01").glob("*"):
        p.unlink()
    with pytest.raises(OmniglotDataError, match="has no PNG images"):
        Omniglot(tmp_path, subsets=("images_background",))


def test_a_run_pairs_every_test_image_with_one_training_image():
    (run,) = one_shot_runs(DATA / RUNS, size=None, runs=1)
    assert run.name == "run01" and run.train.shape == run.test.shape == (20, 1, 105, 105)
    assert sorted(run.labels.tolist()) == list(range(20))  # one test image per class


def test_a_run_whose_answers_name_missing_images_is_refused(tmp_path):
    broken = tmp_path / "runs.zip"
    with zipfile.ZipFile(DATA / RUNS) as src, zipfile.ZipFile(broken, "w") as dst:
        for m in src.namelist():
            if m.startswith("run01/"):
                data = src.read(m)
                if m.endswith("class_labels.txt"):
                    data = data.replace(b"class01.png", b"class99.png")
                dst.writestr(m, data)
    with pytest.raises(OmniglotDataError, match="does not match the run's images"):
        one_shot_runs(broken, check=False)
