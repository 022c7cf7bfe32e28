"""Few-shot image classification data for the benchmark: the embedded procedural
character set, real Omniglot (the committed minimal sets, or a copy on disk) and
miniImageNet read from disk, each a labelled dataset with its class splits; episodes come
from the library's sampler (``effmaml.episodes``).

Nothing is downloaded. ``load(spec)`` takes ``"characters"`` (the embedded default),
``"omniglot-small1"`` / ``"omniglot-small2"`` (the minimal background sets committed in
``data/omniglot/``), ``"omniglot:/path"`` (torchvision's on-disk layout:
``[omniglot-py/]images_background/`` and ``images_evaluation/``) or
``"miniimagenet:/path"`` (Ravi & Larochelle's layout: ``train.csv``, ``val.csv``,
``test.csv`` with ``filename,label`` rows, and ``images/``).

Class splits:

* Omniglot, and the procedural characters: all characters, shuffled with a fixed seed (as
  Finn et al.'s code does), the first 1100 for meta-training, the next 100 for validation,
  the remaining 423 for testing (``effmaml.episodes.split_classes``; proportionally for
  fewer characters); each character rotated by 0, 90, 180 and 270 degrees is four classes
  (Santoro et al. 2016, Vinyals et al. 2016). 28x28, one channel, ink 1.
* miniImageNet: the 64/16/20 classes of its CSV files. 84x84, three channels in [0, 1].
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from effmaml.episodes import QUARTER_TURNS, EpisodeSampler, split_classes
from effmaml.omniglot import Omniglot

__all__ = [
    "OMNIGLOT_DIR",
    "Characters",
    "FewShotData",
    "MiniImageNetFolder",
    "load",
    "minimal_set",
]

ALPHABET = 32  # procedural characters per alphabet (they share stroke shapes)
VERSION = 2  # of the procedural generator: a cached set from another version is not read
OMNIGLOT_DIR = Path(__file__).resolve().parents[2] / "data" / "omniglot"
MINIMAL_SETS = {
    "small1": "images_background_small1.zip",
    "small2": "images_background_small2.zip",
}


@dataclass
class FewShotData:
    """A labelled dataset (items ``(image, label)``) and its class splits.

    Attributes:
        name: for reports.
        dataset: the items; images ``(channels, size, size)`` in [0, 1].
        splits: ``"train"``, ``"val"``, ``"test"`` -> labels.
        transforms: class transforms (each label under each is a class), or ().
        channels, size: the image shape.
    """

    name: str
    dataset: Any
    splits: dict[str, list]
    transforms: tuple = ()
    channels: int = 1
    size: int = 28
    _samplers: dict = field(default_factory=dict, init=False, repr=False)

    def sampler(
        self, split: str, n_way: int, k_shot: int = 1, k_query: int = 15, meta_batch: int = 1
    ) -> EpisodeSampler:
        """The episodes of ``split`` (built once per setting)."""
        key = (split, n_way, k_shot, k_query, meta_batch)
        if key not in self._samplers:
            self._samplers[key] = EpisodeSampler(
                self.dataset,
                n_way,
                k_shot,
                k_query,
                meta_batch=meta_batch,
                classes=self.splits[split],
                transforms=self.transforms,
            )
        return self._samplers[key]


def _characters(name: str, dataset: Any, n: int) -> FewShotData:
    """Characters ``0 .. n-1`` of ``dataset`` under Finn et al.'s split and quarter turns."""
    return FewShotData(name, dataset, split_classes(range(n)), QUARTER_TURNS)


def _rotation(angle: float) -> Tensor:
    """The 2x2 rotation matrix by ``angle`` radians (float64)."""
    c, s = math.cos(angle), math.sin(angle)
    return torch.tensor([[c, -s], [s, c]], dtype=torch.float64)


# -- the embedded procedural characters ---------------------------------------------------
@dataclass
class Characters(torch.utils.data.Dataset):
    """A procedural character set standing in for Omniglot, rendered on demand: item
    ``c * per_class + e`` is example ``e`` of character ``c``, labelled ``c``.

    Characters come in alphabets of :data:`ALPHABET`: an alphabet has 8 stroke shapes
    (quadratic Bézier curves), and each of its characters is 2-4 of them, each placed,
    scaled (0.5-0.9) and turned its own way, from generators seeded by the alphabet's and
    the character's index. Each of its ``per_class`` examples is the character under its
    own random variation (:meth:`_jitter`): every control point moved by N(0, 0.045), an
    affine map (rotation ±15°, scale 0.8-1.15 per axis, shear ±0.25), a shift of ±0.1 of
    the canvas (±2.8 pixels), a stroke width of 0.9-2.2 pixels, an ink level of 0.7-1, one
    stroke left out with probability 0.2 (of characters with more than 2), a stray stroke
    added with probability 0.25, and pixel noise N(0, 0.05), clipped to [0, 1]. 28x28, ink 1.

    How it differs from Omniglot: smooth strokes without pen dynamics, alphabets that share
    exact stroke shapes rather than a style, and variation that is geometric jitter, dropped
    and stray strokes and noise where Omniglot has 20 different people's handwriting. The
    split, the rotations and the episode sampler are Omniglot's (``load("characters")``).

    Args:
        n_chars: characters (1623, as Omniglot).
        per_class: examples per character (20, as Omniglot).
        seed: the set's seed; the same seed gives the same images on every machine.
    """

    n_chars: int = 1623
    per_class: int = 20
    seed: int = 0
    size: int = 28
    _all: Tensor | None = field(init=False, default=None, repr=False)

    def __len__(self) -> int:
        return self.n_chars * self.per_class

    @property
    def targets(self) -> list[int]:
        return [i // self.per_class for i in range(len(self))]

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        char, example = divmod(int(i), self.per_class)
        return self.images(char, [example])[0], char

    def strokes(self, char: int) -> Tensor:
        """The character's control points, ``(strokes, 3, 2)``: 2-4 of its alphabet's 8
        stroke shapes, each placed, scaled and turned its own way."""
        alphabet = char // ALPHABET
        ga = torch.Generator().manual_seed(self._seed(alphabet=alphabet))
        shapes = torch.rand(8, 3, 2, generator=ga, dtype=torch.float64) - 0.5  # centred
        g = torch.Generator().manual_seed(self._seed(char=char))
        n = 2 + int(torch.randint(0, 3, (), generator=g))
        pick = torch.randperm(8, generator=g)[:n]
        out = []
        for s in pick.tolist():
            rot = _rotation(2 * math.pi * float(torch.rand((), generator=g)))
            scale = 0.5 + 0.4 * float(torch.rand((), generator=g))
            centre = 0.3 + 0.4 * torch.rand(2, generator=g, dtype=torch.float64)
            out.append(shapes[s] @ rot.T * scale + centre)
        return torch.stack(out)

    def images(self, char: int, indices: Sequence[int]) -> Tensor:
        """Examples ``indices`` of character ``char``: ``(len(indices), 1, 28, 28)``."""
        if self._all is not None:
            return self._all[char, list(indices)].float() / 255
        return self._render(char, [int(i) for i in indices])

    def _seed(self, alphabet: int = -1, char: int = -1, example: int = -1, part: int = 0) -> int:
        """The one seed formula of the set: an alphabet's stroke shapes, a character's
        strokes, or one example's variation (``part`` 0: its jitter, 1: its pixel noise)."""
        if alphabet >= 0:
            return 1_000_003 * self.seed + 31 * alphabet + 5
        if example < 0:
            return 1_000_003 * self.seed + 7919 * char + 1
        return 1_000_003 * self.seed + 7919 * char + 104_729 * (example + 1) + 17 * part

    def materialize(self, cache_dir: str | Path | None = None) -> Characters:
        """Render every example once (about a minute on 2 cores) and keep them as uint8
        (25 MB), read from / written to ``cache_dir`` (default ``~/.cache/effmaml``)."""
        if self._all is not None:
            return self
        folder = Path(cache_dir or Path.home() / ".cache" / "effmaml")
        path = folder / f"characters-v{VERSION}-{self.n_chars}x{self.per_class}-seed{self.seed}.pt"
        if path.exists():
            self._all = torch.load(path, weights_only=True)
            return self
        every = list(range(self.per_class))
        rendered = torch.stack([self._render(c, every) for c in range(self.n_chars)])
        self._all = (rendered * 255).round().to(torch.uint8)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{id(self)}")
        torch.save(self._all, tmp)
        tmp.replace(path)
        return self

    def _jitter(self, char: int, example: int) -> tuple:
        """Example ``example``'s variation: point noise, affine map, shift, width, ink, a
        stroke to leave out, a stray stroke."""
        g = torch.Generator().manual_seed(self._seed(char=char, example=example))

        def u(lo, hi, *shape):
            return lo + (hi - lo) * torch.rand(shape, generator=g, dtype=torch.float64)

        noise = 0.045 * torch.randn(5, 3, 2, generator=g, dtype=torch.float64)
        rot = _rotation(math.radians(float(u(-15, 15))))
        shear = torch.tensor([[1.0, float(u(-0.25, 0.25))], [0.0, 1.0]], dtype=torch.float64)
        affine = rot @ shear @ torch.diag(u(0.8, 1.15, 2))
        # a stroke left out (p 0.2), a stray stroke added (p 0.25): the slot past the
        # character's strokes holds it, or lies off the canvas
        drop = int(torch.randint(0, 5, (), generator=g)) if float(u(0, 1)) < 0.2 else -1
        stray = 0.2 + 0.6 * torch.rand(1, 3, 2, generator=g, dtype=torch.float64)
        stray = stray if float(u(0, 1)) < 0.25 else stray + 10.0
        return noise, affine, u(-0.1, 0.1, 2), float(u(0.9, 2.2)), float(u(0.7, 1.0)), drop, stray

    def _render(self, char: int, examples: list[int]) -> Tensor:
        """Render examples of one character at once: ``(len(examples), 1, 28, 28)``."""
        base = self.strokes(char)
        n = len(base)
        pts, widths, inks, seeds = [], [], [], []
        for e in examples:
            noise, affine, shift, width, ink, drop, stray = self._jitter(char, e)
            p = ((base + noise[:n]) - 0.5) @ affine.T + 0.5 + shift
            if 0 <= drop < n and n > 2:
                p[drop] = p[drop] + 10.0  # off the canvas
            pts.append(torch.cat([p, stray]))
            widths.append(width / self.size)
            inks.append(ink)
            seeds.append(self._seed(char=char, example=e, part=1))
        p = torch.stack(pts)  # (B, strokes, 3, 2)
        t = torch.linspace(0, 1, 40, dtype=torch.float64)[:, None]
        p0, p1, p2 = p[:, :, 0:1], p[:, :, 1:2], p[:, :, 2:3]
        curve = ((1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2).reshape(len(p), -1, 2)
        pix = (torch.arange(self.size, dtype=torch.float64) + 0.5) / self.size
        grid = torch.stack(torch.meshgrid(pix, pix, indexing="ij"), -1).reshape(-1, 2)
        grid = grid[:, [1, 0]].expand(len(p), -1, -1)  # (x, y) = (column, row)
        dist = torch.cdist(grid, curve).min(-1).values  # (B, pixels)
        w = torch.tensor(widths, dtype=torch.float64)[:, None]
        img = torch.tensor(inks, dtype=torch.float64)[:, None] * torch.exp(
            -0.5 * (dist / (0.6 * w)) ** 2
        )
        noise = torch.stack(
            [
                torch.randn(
                    img.shape[1], generator=torch.Generator().manual_seed(s), dtype=torch.float64
                )
                for s in seeds
            ]
        )
        img = (img + 0.05 * noise).clamp(0, 1)
        return img.reshape(len(p), 1, self.size, self.size).float()


# -- miniImageNet on disk -----------------------------------------------------------------
class MiniImageNetFolder(torch.utils.data.Dataset):
    """miniImageNet in Ravi & Larochelle's layout, read from ``root``: item ``i`` is
    ``(image, class)``, classes numbered over the three CSVs in order (``splits``).

    ``root`` holds ``train.csv``, ``val.csv``, ``test.csv`` (rows ``filename,label``, a
    header line) and ``images/`` with every file they name. Images are read on first use,
    resized to 84x84 (bilinear) and kept as ``(3, 84, 84)`` floats in [0, 1].

    Raises:
        FileNotFoundError: a missing CSV or image folder, or images the CSVs name that are
            not there (says how many and the first).
    """

    size = 84

    def __init__(self, root: str | Path) -> None:
        root = Path(root)
        needed = [root / f"{s}.csv" for s in ("train", "val", "test")] + [root / "images"]
        missing = [str(p) for p in needed if not p.exists()]
        if missing:
            raise FileNotFoundError(
                f"not a miniImageNet folder: {', '.join(missing)} missing. Give the folder "
                f"with train.csv, val.csv, test.csv and images/ (Ravi & Larochelle's layout)"
            )
        self.files: list[Path] = []
        self.targets: list[int] = []
        self.splits: dict[str, list[int]] = {}
        absent: list[Path] = []
        for split in ("train", "val", "test"):
            by_label: dict[str, list[Path]] = {}
            with open(root / f"{split}.csv", newline="") as f:
                for row in csv.DictReader(f):
                    path = root / "images" / row["filename"]
                    if not path.exists():
                        absent.append(path)
                    by_label.setdefault(row["label"], []).append(path)
            self.splits[split] = []
            for label in sorted(by_label):
                c = sum(map(len, self.splits.values()))
                self.splits[split].append(c)
                self.files += by_label[label]
                self.targets += [c] * len(by_label[label])
        if absent:
            raise FileNotFoundError(
                f"incomplete miniImageNet folder: {len(absent)} images named in the CSVs are "
                f"missing, the first {absent[0]}"
            )
        self._cache: dict[int, Tensor] = {}

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        if i not in self._cache:
            from PIL import Image

            with Image.open(self.files[i]) as im:
                im = im.convert("RGB").resize((self.size, self.size), Image.Resampling.BILINEAR)
                x = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
            self._cache[i] = x.reshape(self.size, self.size, 3).permute(2, 0, 1).float() / 255
        return self._cache[i], self.targets[i]


def minimal_set(which: str, characters: int | None = None) -> FewShotData:
    """One of real Omniglot's minimal background sets (``"small1"``, ``"small2"``), read
    from the committed zip after its checksum (``effmaml.omniglot.Omniglot``): its
    characters split 92/8/36 (small1) or 106/10/40 (small2) in Finn et al.'s proportions,
    quarter turns as classes. ``characters``: the first this many (a test's slice).

    Raises:
        ValueError: an unknown set.
    """
    if which not in MINIMAL_SETS:
        raise ValueError(f"unknown minimal set {which!r}: use one of {sorted(MINIMAL_SETS)}")
    chars = Omniglot(OMNIGLOT_DIR / MINIMAL_SETS[which], characters=characters)
    return _characters(f"omniglot-{which}", chars, len(chars.characters))


def load(spec: str) -> FewShotData:
    """``"characters"``, ``"omniglot-small1"``/``"omniglot-small2"`` (real Omniglot's minimal
    background sets, read from the committed zips), ``"omniglot:/path"`` or
    ``"miniimagenet:/path"``.

    Raises:
        ValueError: an unknown kind (lists the known ones).
        FileNotFoundError: a miniImageNet folder that is not in the expected layout;
        effmaml.omniglot.OmniglotDataError: an Omniglot folder that is not.
    """
    kind, _, path = spec.partition(":")
    if kind == "characters" and not path:
        return _characters("characters", Characters(), Characters.n_chars)
    if kind == "omniglot" and path:
        chars = Omniglot(path)
        return _characters("omniglot", chars, len(chars.characters))
    if kind == "miniimagenet" and path:
        mini = MiniImageNetFolder(path)
        return FewShotData("miniimagenet", mini, mini.splits, (), channels=3, size=84)
    if kind.startswith("omniglot-") and not path:
        return minimal_set(kind.removeprefix("omniglot-"))
    raise ValueError(
        f"unknown data {spec!r}: use 'characters' (embedded, the default), "
        f"'omniglot-small1' or 'omniglot-small2' (the committed minimal sets), "
        f"'omniglot:/path/to/omniglot' or 'miniimagenet:/path/to/miniimagenet'"
    )
