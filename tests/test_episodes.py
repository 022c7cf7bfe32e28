"""effmaml.episodes: N-way K-shot episodes from a user's labelled dataset, each a pure
function of (seed, iteration, task); class transforms; the split; clear errors."""

import pytest
import torch
from torch import nn

import effmaml
from effmaml.episodes import QUARTER_TURNS, EpisodeSampler, QuarterTurn, class_index, split_classes


class Strokes(torch.utils.data.Dataset):
    """A user's dataset without ``targets``: item i is a 1x4x4 image whose pixels are its
    index, labelled i // 5 (4 classes of 5 items)."""

    def __len__(self):
        return 20

    def __getitem__(self, i):
        return torch.full((1, 4, 4), float(i)), i // 5


def _same(a, b):
    (xs, ys), (xq, yq) = a
    (xs2, ys2), (xq2, yq2) = b
    return all(torch.equal(u, v) for u, v in ((xs, xs2), (ys, ys2), (xq, xq2), (yq, yq2)))


def test_an_episode_is_a_pure_function_of_seed_iteration_and_task():
    s = EpisodeSampler(Strokes(), n_way=3, k_shot=1, k_query=2)
    one = s.episode(7, 2, 1)
    torch.manual_seed(0)  # the global RNG plays no part
    s.episode(7, 2, 0)  # nor what was drawn before
    again = EpisodeSampler(Strokes(), n_way=3, k_shot=1, k_query=2).episode(7, 2, 1)
    assert _same(one, again)
    others = [s.episode(7, 3, 1), s.episode(7, 2, 2), s.episode(8, 2, 1)]
    assert not any(_same(one, o) for o in others)


def test_an_episode_is_labelled_in_draw_order_with_distinct_items():
    s = EpisodeSampler(Strokes(), n_way=3, k_shot=2, k_query=3)
    (xs, ys), (xq, yq) = s.episode(1)
    assert xs.shape == (6, 1, 4, 4) and xq.shape == (9, 1, 4, 4)
    assert ys.tolist() == [0, 0, 1, 1, 2, 2] and yq.tolist() == [0] * 3 + [1] * 3 + [2] * 3
    items = torch.cat([xs, xq])[:, 0, 0, 0]  # each item's index
    assert len(set(items.tolist())) == 15
    for c in range(3):  # every item of episode class c comes from one dataset label
        labels = {int(i) // 5 for i in [*xs[ys == c, 0, 0, 0], *xq[yq == c, 0, 0, 0]]}
        assert len(labels) == 1


def test_as_sample_tasks_the_sampler_draws_one_number_per_call():
    """MetaTrainer hands its generator; the sampler draws exactly one number from it per
    call, and task i is episode(that number, 0, i) whatever the meta-batch's size."""
    s = EpisodeSampler(Strokes(), n_way=2, k_shot=1, k_query=1, meta_batch=3)
    g, h = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    tasks = s(g)
    seed = int(torch.randint(0, 2**63 - 1, (), generator=h))
    assert torch.equal(g.get_state(), h.get_state())
    assert len(tasks) == 3 and all(_same(t, s.episode(seed, 0, i)) for i, t in enumerate(tasks))
    two = s.sample(torch.Generator().manual_seed(4), 2)
    assert all(_same(a, b) for a, b in zip(two, tasks))


def test_quarter_turns_make_each_label_four_classes():
    s = EpisodeSampler(Strokes(), n_way=16, k_shot=1, k_query=0, transforms=QUARTER_TURNS)
    assert len(s.classes) == 16 and s.classes[:5] == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0)]
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    assert torch.equal(QuarterTurn(1)(x), torch.rot90(x, 1, (-2, -1)))
    plain = torch.stack([Strokes()[i][0] for i in (5, 6)])
    torch.testing.assert_close(s.examples((1, 0), [0, 1]), plain)
    # a turn is applied to the class's items (here constant images: marked to see it)
    s.dataset = [(torch.arange(16.0).reshape(1, 4, 4), 0)] * 20
    turned = s.examples((0, 3), [0])
    assert torch.equal(turned, torch.rot90(torch.arange(16.0).reshape(1, 1, 4, 4), 3, (-2, -1)))
    # all 16 classes in one episode: every label appears under four different turns
    (xs, _), _ = s.episode(0)
    assert xs.shape == (16, 1, 4, 4)


def test_a_tensor_dataset_with_labels_given_and_a_class_subset():
    x = torch.randn(30, 2)
    y = torch.arange(30) % 6
    data = torch.utils.data.TensorDataset(x, y)
    assert class_index(data)[5] == [5, 11, 17, 23, 29]  # 0-d tensor labels read as numbers
    s = EpisodeSampler(data, n_way=2, k_shot=2, k_query=3, classes=[1, 4], labels=y.tolist())
    (xs, _), (xq, _) = s.episode(0)
    assert xs.shape == (4, 2) and xq.shape == (6, 2)
    rows = {tuple(r.tolist()) for r in torch.cat([xs, xq])}
    allowed = {tuple(x[i].tolist()) for i in range(30) if i % 6 in (1, 4)}
    assert rows <= allowed


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"n_way": 5, "k_query": 1}, r"4 classes \(4 labels x 1 transforms\), fewer than n_way=5"),
        ({"n_way": 2, "k_shot": 3, "k_query": 3}, r"class 0 has 5 items, fewer than k_shot"),
        ({"n_way": 2, "k_shot": 6, "k_query": 0}, r"= 6 \(4 such classes\); lower k_shot or"),
        ({"n_way": 2, "classes": [0, 9]}, r"no item of the dataset has label 9"),
        ({"n_way": 0}, r"n_way must be an int >= 1"),
        ({"n_way": 2, "k_query": -1}, r"k_query must be an int >= 0"),
    ],
)
def test_bad_settings_are_refused_with_the_reason(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EpisodeSampler(Strokes(), **kwargs)


def test_items_that_are_not_tensors_are_refused_with_the_fix():
    pil_like = [(object(), i // 2) for i in range(8)]
    s = EpisodeSampler(pil_like, n_way=2, k_shot=1, k_query=1)
    with pytest.raises(TypeError, match=r"transform=ToTensor\(\)"):
        s.episode(0)
    with pytest.raises(ValueError, match="3 labels for a dataset of 8 items"):
        class_index(pil_like, labels=[0, 1, 2])


@pytest.mark.parametrize(
    "items,match",
    [
        ([torch.zeros(3) for _ in range(6)], r"dataset\[0\] is a tensor of shape \(3,\), not an"),
        ([{"x": torch.zeros(3), "y": 0}] * 6, r"dataset\[0\] is a dict.*TensorDataset\(x, y\)"),
        ([(torch.zeros(3), [i % 2]) for i in range(6)], r"label of item 0 is a list"),
        ([(torch.zeros(3), torch.eye(2)[i % 2]) for i in range(6)], r"0 has shape \(2,\).*argmax"),
    ],
)  # fmt: skip
def test_items_and_labels_that_are_not_x_and_one_class_name_the_item(items, match):
    with pytest.raises(TypeError, match=match):
        EpisodeSampler(items, n_way=2, k_shot=1, k_query=1)


def test_labels_of_every_plain_kind_are_classes():
    import numpy as np

    for y in (lambda i: i, str, torch.tensor, lambda i: torch.tensor([i]), np.int64):
        items = [(torch.full((1,), float(i)), y(i // 3)) for i in range(6)]
        (xs, ys), _ = EpisodeSampler(items, n_way=2, k_shot=1, k_query=2).episode(0)
        assert ys.tolist() == [0, 1] and xs.shape == (2, 1)


def test_seeds_calls_and_transforms_that_cannot_make_an_episode_are_refused():
    s = EpisodeSampler(Strokes(), n_way=2, k_shot=1, k_query=1)
    assert _same(s.episode(-3, 1, 2), s.episode(-3, 1, 2))  # any sign
    with pytest.raises(TypeError, match=r"episode\(\)'s seed must be an int \(got 1.5\)"):
        s.episode(1.5)
    with pytest.raises(TypeError, match=r"takes a torch.Generator \(got int\).*episode\(seed"):
        s.sample(0, 2)
    crop = EpisodeSampler(Strokes(), 8, 1, 1, transforms=[lambda x: x, lambda x: x[..., :2]])
    with pytest.raises(
        ValueError, match=r"under transforms\[\d\] gives items of shape \(1, 4, \d\), label"
    ):
        crop.episode(0)


def test_split_classes_is_finns_at_omniglots_size_and_at_least_one_each():
    split = split_classes(range(1623))
    assert [len(split[k]) for k in ("train", "val", "test")] == [1100, 100, 423]
    assert sorted(c for v in split.values() for c in v) == list(range(1623))
    assert split == split_classes(range(1623)) != split_classes(range(1623), seed=2)
    assert [len(v) for v in split_classes("abc").values()] == [1, 1, 1]
    with pytest.raises(ValueError, match="at least 3 classes"):
        split_classes([0, 1])


def test_meta_trainer_trains_on_the_sampler():
    """The sampler is MetaTrainer's sample_tasks as it stands: a model meta-trains on
    episodes of a user's dataset, and the same seed gives the same model."""

    def train():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
        maml = effmaml.MAML(model, _ce, effmaml.SGD(0.1), "naive")
        s = EpisodeSampler(Strokes(), n_way=2, k_shot=1, k_query=2, meta_batch=2)
        opt = torch.optim.SGD(model.parameters(), 1e-3)
        trainer = effmaml.MetaTrainer(maml, opt, s, meta_batch=2, inner_steps=1, progress=False)
        trainer.train(2)
        return model[1].weight.detach().clone()

    a, b = train(), train()
    assert torch.equal(a, b)


def _ce(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def test_one_batch_per_task_without_inner_steps_is_told_to_pass_them():
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
    maml = effmaml.MAML(model, _ce, effmaml.SGD(0.1), "naive")
    s = EpisodeSampler(Strokes(), n_way=2, k_shot=1, k_query=2, meta_batch=2)
    opt = torch.optim.SGD(model.parameters(), 1e-3)
    trainer = effmaml.MetaTrainer(maml, opt, s, meta_batch=2, progress=False)
    with pytest.raises(TypeError, match=r"task 0's support set is one batch.*inner_steps=N"):
        trainer.train(1)


def test_adapting_in_eval_mode_with_statistics_never_collected_warns():
    """``model.eval()`` straight after meta-training: the model's BatchNorm statistics are
    still their initial zeros and ones (adapt never writes them), so the inner loop would
    normalise with them; collected statistics, or train mode, adapt without a word."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(8, 2))
    maml = effmaml.MAML(model, _ce, effmaml.SGD(0.1), "naive")
    support = EpisodeSampler(Strokes(), n_way=2, k_shot=2, k_query=0).episode(0)[0]
    maml.adapt(support, steps=1)  # train mode: batch statistics
    model.eval()
    with pytest.warns(UserWarning, match=r"BatchNorm '1' in eval mode with running statistics"):
        maml.adapt(support, steps=1)
    model.train()
    model(support[0])  # collected (one batch)
    model.eval()
    maml.adapt(support, steps=1)
