"""Few-shot data: the Omniglot and miniImageNet loaders on fixtures written in exactly their
on-disk layouts, clear errors for wrong or incomplete folders, the embedded characters, and
the episode sampler."""

import csv

import pytest
import torch
from PIL import Image

from bench.fewshot.data import (
    Characters,
    Episodes,
    MiniImageNetFolder,
    OmniglotFolder,
    character_split,
    load,
)


def _png(path, size, mode, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (size, size), value).save(path)


def omniglot_fixture(root, chars=(("Alpha", 3), ("Beta", 2)), evaluation=(("Gamma", 2),)):
    """torchvision's layout: omniglot-py/images_{background,evaluation}/Alphabet/charNN/*.png
    (105x105, white background; character i's images are ink level i)."""
    n = 0
    for folder, alphabets in (("images_background", chars), ("images_evaluation", evaluation)):
        for alphabet, count in alphabets:
            for c in range(count):
                n += 1
                for i in range(20):
                    path = root / "omniglot-py" / folder / alphabet / f"character{c + 1:02d}"
                    _png(path / f"{n:04d}_{i + 1:02d}.png", 105, "L", 255 - 10 * n)
    return n


def test_omniglot_loader_reads_the_layout(tmp_path):
    n = omniglot_fixture(tmp_path)
    data = load(f"omniglot:{tmp_path}")
    assert isinstance(data, OmniglotFolder) and len(data.files) == n == 7
    # every character in exactly one split, four rotations each
    chars = [c for split in data.splits.values() for c, r in split if r == 0]
    assert sorted(chars) == list(range(n))
    assert all(len(v) % 4 == 0 for v in data.splits.values())
    x = data.images((0, 0), [0, 5])
    assert x.shape == (2, 1, 28, 28) and x.dtype == torch.float32
    # inverted: character 1's background of 245 reads as ink 10/255
    torch.testing.assert_close(x, torch.full_like(x, 10 / 255), rtol=0, atol=1e-6)
    # the layout without the omniglot-py folder works too
    assert len(OmniglotFolder(tmp_path / "omniglot-py").files) == n


def test_omniglot_rotations_are_new_classes(tmp_path):
    omniglot_fixture(tmp_path)
    data = OmniglotFolder(tmp_path)
    img = torch.zeros(1, 1, 28, 28)
    data._cache[(0, 0)] = img[0].clone()
    data._cache[(0, 0)][0, 0, 5] = 1.0  # a mark in the top row
    quarter = data.images((0, 1), [0])
    assert quarter[0, 0, 22, 0] == 1.0  # rotated by 90 degrees (counter-clockwise)


@pytest.mark.parametrize(
    "damage,match",
    [
        ("no_evaluation", r"images_evaluation missing"),
        ("empty_character", r"has no PNG images"),
        ("nothing", r"not an Omniglot folder"),
    ],
)
def test_omniglot_wrong_or_incomplete_folder(tmp_path, damage, match):
    if damage != "nothing":
        omniglot_fixture(tmp_path)
    if damage == "no_evaluation":
        for p in sorted((tmp_path / "omniglot-py" / "images_evaluation").rglob("*"), reverse=True):
            p.unlink() if p.is_file() else p.rmdir()
        (tmp_path / "omniglot-py" / "images_evaluation").rmdir()
    if damage == "empty_character":
        for p in (tmp_path / "omniglot-py" / "images_background" / "Beta" / "character01").glob(
            "*.png"
        ):
            p.unlink()
    with pytest.raises(FileNotFoundError, match=match):
        OmniglotFolder(tmp_path)


def mini_fixture(root, per_split=(("train", 6), ("val", 5), ("test", 5)), per_class=20):
    """Ravi & Larochelle's layout: {train,val,test}.csv (filename,label) + images/."""
    n = 0
    for split, classes in per_split:
        with open(root / f"{split}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["filename", "label"])
            for _ in range(classes):
                n += 1
                label = f"n{n:08d}"
                for i in range(per_class):
                    name = f"{label}{i:08d}.jpg"
                    _png(root / "images" / name, 100, "RGB", (n * 10, 0, 255 - n * 10))
                    w.writerow([name, label])
    return n


def test_miniimagenet_loader_reads_the_layout(tmp_path):
    mini_fixture(tmp_path)
    data = load(f"miniimagenet:{tmp_path}")
    assert isinstance(data, MiniImageNetFolder)
    assert [len(data.splits[s]) for s in ("train", "val", "test")] == [6, 5, 5]
    x = data.images(data.splits["val"][0], [0, 3])
    assert x.shape == (2, 3, 84, 84)
    torch.testing.assert_close(x[:, 0].mean(), torch.tensor(70 / 255), rtol=0, atol=2 / 255)
    ep = Episodes(data, "test", n_way=5, k_shot=1, k_query=15)
    (xs, _), (xq, _) = ep.episode(torch.Generator().manual_seed(0))
    assert xs.shape == (5, 3, 84, 84) and xq.shape == (75, 3, 84, 84)


@pytest.mark.parametrize("damage,match", [("csv", r"val\.csv missing"), ("image", r"1 images")])
def test_miniimagenet_wrong_or_incomplete_folder(tmp_path, damage, match):
    mini_fixture(tmp_path)
    if damage == "csv":
        (tmp_path / "val.csv").unlink()
    else:
        next((tmp_path / "images").glob("*.jpg")).unlink()
    with pytest.raises(FileNotFoundError, match=match):
        MiniImageNetFolder(tmp_path)


def test_unknown_data_spec():
    with pytest.raises(ValueError, match="omniglot:/path"):
        load("imagenet:/x")


def test_character_split_is_finns_at_full_size():
    split = character_split(1623)
    assert [len(split[k]) for k in ("train", "val", "test")] == [1100, 100, 423]
    assert sorted(c for v in split.values() for c in v) == list(range(1623))
    assert split == character_split(1623)  # fixed seed


def test_embedded_characters_are_deterministic_and_varied():
    data = Characters(n_chars=30)
    a = data.images((3, 0), [0, 1, 2])
    b = Characters(n_chars=30).images((3, 0), [0, 1, 2])
    assert torch.equal(a, b) and a.shape == (3, 1, 28, 28)
    assert a.min() >= 0 and a.max() <= 1
    # the same character's examples are closer to each other than to another character's
    other = data.images((4, 0), [0, 1, 2])
    within = (a[0] - a[1]).abs().mean()
    between = (a[0] - other[0]).abs().mean()
    assert within < between
    # no class of a test episode is seen in training
    train = {c for c, _ in data.splits["train"]}
    test = {c for c, _ in data.splits["test"]}
    assert not train & test


def test_episodes_fixed_per_seed_and_labelled():
    data = Characters(n_chars=30)
    ep = Episodes(data, "test", n_way=3, k_shot=2, k_query=4)
    one = ep.sample(torch.Generator().manual_seed(9), 2)
    two = ep.sample(torch.Generator().manual_seed(9), 2)
    for (s1, q1), (s2, q2) in zip(one, two):
        assert torch.equal(s1[0], s2[0]) and torch.equal(q1[0], q2[0])
    (_, ys), (_, yq) = one[0]
    assert ys.tolist() == [0, 0, 1, 1, 2, 2] and yq.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    with pytest.raises(ValueError, match="fewer than n_way"):
        Episodes(data, "val", n_way=50)
