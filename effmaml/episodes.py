"""N-way K-shot episodes from any labelled dataset, each a pure function of its seed.

>>> sampler = EpisodeSampler(dataset, n_way=5, k_shot=1, k_query=15, meta_batch=4)
>>> trainer = MetaTrainer(maml, opt, sampler, meta_batch=4, inner_steps=5)  # sample_tasks
>>> (x_support, y_support), (x_query, y_query) = sampler.episode(seed=0, iteration=3, task=1)

``dataset`` is any ``torch.utils.data.Dataset`` whose items are ``(image tensor, label)``
(a ``torchvision`` folder with ``transform=ToTensor()``, a ``TensorDataset``, your own).
A *class* of the episodes is a label under one of the class transforms: with
``transforms=QUARTER_TURNS`` each character turned by 0, 90, 180 and 270 degrees is four
classes (Santoro et al. 2016, Vinyals et al. 2016). ``split_classes`` splits labels into
training, validation and test classes in Finn et al.'s Omniglot proportions.
"""

from __future__ import annotations

import numbers
import random
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .tasks import task_seed

__all__ = [
    "QUARTER_TURNS",
    "Episode",
    "EpisodeSampler",
    "QuarterTurn",
    "class_index",
    "split_classes",
]

Episode = tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]
Transform = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class QuarterTurn:
    """A class transform: images ``(..., H, W)`` turned by ``turns`` x 90 degrees
    counter-clockwise (``torch.rot90`` on the last two dimensions). Picklable, so that a
    sampler travels to worker processes."""

    turns: int

    def __call__(self, images: Tensor) -> Tensor:
        return torch.rot90(images, self.turns, dims=(-2, -1)).contiguous()


QUARTER_TURNS: tuple[QuarterTurn, ...] = tuple(QuarterTurn(k) for k in range(4))


def class_index(dataset: Any, labels: Iterable[Hashable] | None = None) -> dict[Hashable, list]:
    """Which items of ``dataset`` carry each label: ``label -> [item index, ...]``.

    Args:
        dataset: a map-style dataset of ``(x, label)`` items.
        labels: every item's label, in item order; default: ``dataset.targets`` where the
            dataset has it (torchvision's convention), else read from ``dataset[i][1]`` for
            every item (one pass over the data: it decodes every item once).

    Raises:
        ValueError: ``labels`` of another length than the dataset.
        TypeError: an item that is not ``(x, label)``, or a label that is not one class (a
            one-hot tensor, a list): says which item.
    """
    if labels is None:
        labels = getattr(dataset, "targets", None)
    if labels is None:
        labels = [_item(dataset, i)[1] for i in range(len(dataset))]
    labels = [_plain(y, f"item {i}") for i, y in enumerate(labels)]
    if len(labels) != len(dataset):
        raise ValueError(
            f"{len(labels)} labels for a dataset of {len(dataset)} items: give one label per "
            f"item, in item order"
        )
    index: dict[Hashable, list] = {}
    for i, y in enumerate(labels):
        index.setdefault(y, []).append(i)
    return index


def _item(dataset: Any, i: int) -> tuple[Any, Any]:
    """``dataset[i]`` as ``(x, label)``.

    Raises:
        TypeError: an item that is not a pair (a bare tensor, a dict): says how to fix it.
    """
    item = dataset[i]
    if isinstance(item, (tuple, list)) and len(item) == 2:
        return item[0], item[1]
    if isinstance(item, Tensor):
        what = f"a tensor of shape {tuple(item.shape)}"
    elif isinstance(item, (tuple, list)):
        what = f"a {type(item).__name__} of {len(item)}"
    else:
        what = f"a {type(item).__name__}"
    raise TypeError(
        f"dataset[{i}] is {what}, not an (x, label) pair: episodes read items as "
        f"(x, label). Make __getitem__ return (x, label), or wrap tensors in "
        f"torch.utils.data.TensorDataset(x, y)"
    )


def _plain(label: Any, where: str) -> Hashable:
    """A label as a dict key: a one-element tensor (or array) becomes its Python number.
    ``where`` names it in an error (``"item 3"``).

    Raises:
        TypeError: a label that cannot be a class: a one-hot or multi-element tensor, a
            list (says which and how to fix it).
    """
    if isinstance(label, Tensor) or (hasattr(label, "ndim") and hasattr(label, "item")):
        size = label.numel() if isinstance(label, Tensor) else label.size  # numpy: .size
        if size != 1:
            raise TypeError(
                f"the label of {where} has shape {tuple(label.shape)}; a label is one class "
                f"(an int or a str). One-hot labels: give their class index (labels="
                f"targets.argmax(-1).tolist())"
            )
        return label.item()
    try:
        hash(label)
    except TypeError:
        raise TypeError(
            f"the label of {where} is a {type(label).__name__} ({label!r:.40}); a label is "
            f"one class, hashable (an int, a str, a tuple): give labels= with one per item"
        ) from None
    return label


def split_classes(
    classes: Iterable[Hashable], seed: int = 1, train: float = 1100 / 1623, val: float = 100 / 1623
) -> dict[str, list]:
    """Split classes into ``"train"``, ``"val"`` and ``"test"`` as Finn et al. split
    Omniglot's 1623 characters: shuffled with ``seed``, the first 1100 to meta-train on,
    the next 100 to choose hyperparameters on, the remaining 423 held out; for another
    number of classes the same proportions (``train``, ``val``), at least one in each.

    Raises:
        ValueError: fewer than 3 classes.
    """
    order = list(classes)
    n = len(order)
    if n < 3:
        raise ValueError(f"a train/val/test split needs at least 3 classes (got {n})")
    random.Random(seed).shuffle(order)
    n_train = min(max(1, round(train * n)), n - 2)
    n_val = min(max(1, round(val * n)), n - n_train - 1)
    return {
        "train": order[:n_train],
        "val": order[n_train : n_train + n_val],
        "test": order[n_train + n_val :],
    }


class EpisodeSampler:
    """N-way K-shot episodes over the classes of a labelled dataset.

    An episode picks ``n_way`` classes (a class is a label under one of ``transforms``)
    and, from each, ``k_shot`` support and ``k_query`` query items, distinct, labelled
    ``0 .. n_way - 1`` in the order the classes were drawn:
    ``((x_support, y_support), (x_query, y_query))`` with ``x`` of shape
    ``(n_way * k, *item_shape)``, support and query grouped by class.

    Randomness: ``episode(seed, iteration, task)`` is a pure function of its three
    arguments (its generator is seeded by ``effmaml.tasks.task_seed``), whatever was drawn
    before, in whichever process. Called as ``MetaTrainer``'s ``sample_tasks(generator)``,
    the sampler draws exactly one number from the generator per call (the call's seed)
    and returns ``episode(that seed, 0, i)`` for ``i < meta_batch``: iteration t of a run
    seeded s gets the same episodes in 1 or P processes and after a resume, and task i
    of a meta-batch is the same whatever the meta-batch's size.

    Cost per episode: ``n_way * (k_shot + k_query)`` reads of ``dataset[i]``, the class
    transforms on each class's items, two ``torch.cat``.

    Args:
        dataset: a map-style dataset of ``(tensor, label)`` items.
        n_way: classes per episode.
        k_shot: support items per class.
        k_query: query items per class.
        meta_batch: episodes per ``sampler(generator)`` call.
        classes: the labels to draw from (e.g. one split of ``split_classes``); default
            every label in the dataset, sorted where labels sort.
        transforms: class transforms: each label under each transform is its own class
            (``QUARTER_TURNS``); default: none (each label one class).
        labels: every item's label in item order, if the dataset has no ``targets`` and
            reading each item to learn its label is slow (see ``class_index``).

    Raises:
        ValueError: fewer classes than ``n_way``; a class with fewer than
            ``k_shot + k_query`` items (says which); a label in ``classes`` that no item
            has; ``n_way``, ``k_shot`` or ``meta_batch`` below 1 or ``k_query`` below 0.
        TypeError: an item that is not ``(x, label)`` or a label that is not one class
            (see ``class_index``).
    """

    def __init__(
        self,
        dataset: Any,
        n_way: int,
        k_shot: int = 1,
        k_query: int = 15,
        *,
        meta_batch: int = 1,
        classes: Sequence[Hashable] | None = None,
        transforms: Sequence[Transform] | None = None,
        labels: Iterable[Hashable] | None = None,
    ) -> None:
        for name, value, low in (
            ("n_way", n_way, 1),
            ("k_shot", k_shot, 1),
            ("k_query", k_query, 0),
            ("meta_batch", meta_batch, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low} (got {value!r})")
        self.dataset = dataset
        self.n_way, self.k_shot, self.k_query, self.meta_batch = n_way, k_shot, k_query, meta_batch
        self.transforms: tuple[Transform, ...] = tuple(transforms or ())
        self.index: Mapping[Hashable, list] = class_index(dataset, labels)
        if classes is None:
            try:
                classes = sorted(self.index)  # type: ignore[type-var]
            except TypeError:
                classes = list(self.index)
        labels_ = [_plain(c, f"classes[{i}]") for i, c in enumerate(classes)]
        unknown = [c for c in labels_ if c not in self.index]
        if unknown:
            raise ValueError(
                f"no item of the dataset has label {unknown[0]!r} ({len(unknown)} of the "
                f"classes given are not labels of the dataset)"
            )
        need = k_shot + k_query
        short = [c for c in labels_ if len(self.index[c]) < need]
        if short:
            raise ValueError(
                f"class {short[0]!r} has {len(self.index[short[0]])} items, fewer than "
                f"k_shot + k_query = {need} ({len(short)} such classes); lower "
                f"{'k_shot or k_query' if k_query else 'k_shot'} or leave those classes out"
            )
        turns = range(len(self.transforms)) if self.transforms else [None]
        # (label, transform index or None): what an episode picks n_way of
        self.classes: list[tuple[Hashable, int | None]] = [(c, t) for c in labels_ for t in turns]
        if len(self.classes) < n_way:
            raise ValueError(
                f"{len(self.classes)} classes ({len(labels_)} labels x "
                f"{max(1, len(self.transforms))} transforms), fewer than n_way={n_way}"
            )

    def examples(self, cls: tuple[Hashable, int | None], indices: Sequence[int]) -> Tensor:
        """Items ``indices`` (positions among the label's items) of class ``cls``, stacked
        and under the class's transform.

        Raises:
            TypeError: an item that is not ``(tensor, label)`` (says how to fix it).
        """
        label, t = cls
        items = [_item(self.dataset, self.index[label][int(i)])[0] for i in indices]
        for x in items:
            if not isinstance(x, Tensor):
                raise TypeError(
                    f"dataset items must be (tensor, label); item of label {label!r} is "
                    f"({type(x).__name__}, ...). Give the dataset a transform that makes "
                    f"tensors (torchvision: transform=ToTensor())"
                )
        x = torch.stack(items)
        return self.transforms[t](x) if t is not None else x

    def episode(self, seed: int, iteration: int = 0, task: int = 0) -> Episode:
        """One episode, a pure function of ``(seed, iteration, task)`` (integers, any sign).

        Raises:
            TypeError: a seed, iteration or task that is not an integer.
            ValueError: class transforms that give classes of different shapes (names
                them).
        """
        for name, value in (("seed", seed), ("iteration", iteration), ("task", task)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"episode()'s {name} must be an int (got {value!r})")
        key = task_seed(int(seed), int(iteration), int(task))
        g = torch.Generator().manual_seed(key)
        pick = torch.randperm(len(self.classes), generator=g)[: self.n_way].tolist()
        need = self.k_shot + self.k_query
        xs: list[Tensor] = []
        xq: list[Tensor] = []
        for j in pick:
            cls = self.classes[j]
            idx = torch.randperm(len(self.index[cls[0]]), generator=g)[:need].tolist()
            x = self.examples(cls, idx)
            if xs and x.shape[1:] != xs[0].shape[1:]:
                (a, ta), (b, tb) = cls, self.classes[pick[0]]
                raise ValueError(
                    f"label {a!r} under transforms[{ta}] gives items of shape "
                    f"{tuple(x.shape[1:])}, label {b!r} under transforms[{tb}] "
                    f"{tuple(xs[0].shape[1:])}: every class of an episode needs one shape; "
                    f"make the transforms keep the images' shape (or resize in them)"
                )
            xs.append(x[: self.k_shot])
            xq.append(x[self.k_shot :])
        ys = torch.arange(self.n_way).repeat_interleave(self.k_shot)
        yq = torch.arange(self.n_way).repeat_interleave(self.k_query)
        return (torch.cat(xs), ys), (torch.cat(xq), yq)

    def sample(self, generator: torch.Generator, n: int) -> list[Episode]:
        """``n`` episodes: one number drawn from ``generator`` seeds them all (episode i
        is ``episode(that number, 0, i)``).

        Raises:
            TypeError: ``generator`` is not a ``torch.Generator``.
        """
        if not isinstance(generator, torch.Generator):
            raise TypeError(
                f"sample() takes a torch.Generator (got {type(generator).__name__}); for "
                f"the episodes of a given seed call episode(seed, iteration, task)"
            )
        seed = int(torch.randint(0, 2**63 - 1, (), generator=generator))
        return [self.episode(seed, 0, i) for i in range(n)]

    def __call__(self, generator: torch.Generator) -> list[Episode]:
        """``meta_batch`` episodes: what ``MetaTrainer`` calls ``sample_tasks``."""
        return self.sample(generator, self.meta_batch)
