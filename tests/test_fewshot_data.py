"""Few-shot data of the benchmark: Omniglot (torchvision's layout, the committed minimal
sets) and miniImageNet loaders on fixtures written in exactly their on-disk layouts, clear
errors for wrong or incomplete folders, the embedded characters, and the episodes the
library's sampler draws from them."""

import csv

import pytest
import torch
from PIL import Image

from bench.fewshot.data import Characters, MiniImageNetFolder, load, minimal_set
from effmaml.episodes import QUARTER_TURNS

from .test_omniglot_data import torchvision_layout


def _png(path, size, mode, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (size, size), value).save(path)


def test_omniglot_on_disk_is_split_by_character_with_quarter_turns(tmp_path):
    n = torchvision_layout(tmp_path)
    data = load(f"omniglot:{tmp_path}")
    assert data.name == "omniglot" and data.transforms == QUARTER_TURNS
    assert sorted(c for split in data.splits.values() for c in split) == list(range(n))
    episodes = data.sampler("train", n_way=4, k_shot=1, k_query=2)
    assert len(episodes.classes) == 4 * len(data.splits["train"])


def test_a_minimal_set_is_split_as_finn_et_al_split_the_full_set():
    s = minimal_set("small1")
    assert s.name == "omniglot-small1"
    assert [len(s.splits[k]) for k in ("train", "val", "test")] == [92, 8, 36]
    assert [len(v) for v in minimal_set("small2").splits.values()] == [106, 10, 40]
    with pytest.raises(ValueError, match="unknown minimal set"):
        minimal_set("small3")


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
    assert isinstance(data.dataset, MiniImageNetFolder) and data.transforms == ()
    assert [len(data.splits[s]) for s in ("train", "val", "test")] == [6, 5, 5]
    episodes = data.sampler("val", n_way=5, k_shot=1, k_query=2)
    x = episodes.examples((data.splits["val"][0], None), [0, 3])
    assert x.shape == (2, 3, 84, 84)
    torch.testing.assert_close(x[:, 0].mean(), torch.tensor(70 / 255), rtol=0, atol=2 / 255)
    (xs, _), (xq, _) = data.sampler("test", n_way=5, k_shot=1, k_query=15).episode(0)
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


def test_embedded_characters_are_deterministic_and_varied():
    data = Characters(n_chars=30)
    a = data.images(3, [0, 1, 2])
    b = Characters(n_chars=30).images(3, [0, 1, 2])
    assert torch.equal(a, b) and a.shape == (3, 1, 28, 28)
    assert a.min() >= 0 and a.max() <= 1
    # the same character's examples are closer to each other than to another character's
    other = data.images(4, [0, 1, 2])
    within = (a[0] - a[1]).abs().mean()
    between = (a[0] - other[0]).abs().mean()
    assert within < between
    x, label = data[3 * 20 + 1]  # item c * 20 + e: example e of character c
    assert label == 3 and torch.equal(x, a[1])
    # no class of a test episode is seen in training
    splits = load("characters").splits
    assert not set(splits["train"]) & set(splits["test"])


def test_episodes_come_from_the_split_with_its_turns():
    data = load("characters")
    data.dataset = Characters(n_chars=30)
    data.splits = {"test": [0, 1, 2]}
    ep = data.sampler("test", n_way=12, k_shot=2, k_query=4)
    assert ep.classes == [(c, t) for c in (0, 1, 2) for t in range(4)]
    (xs, ys), (xq, _) = ep.episode(9)
    assert xs.shape == (24, 1, 28, 28) and xq.shape == (48, 1, 28, 28)
    assert ys.tolist() == [i // 2 for i in range(24)]
    with pytest.raises(ValueError, match="fewer than n_way"):
        data.sampler("test", n_way=13)
