"""Few-shot image classification data: Omniglot and miniImageNet read from disk, an
embedded procedural character set, and the N-way K-shot episode sampler.

Nothing is downloaded. ``load(spec)`` takes ``"characters"`` (the embedded default),
``"omniglot:/path"`` (torchvision's on-disk layout: ``[omniglot-py/]images_background/``
and ``images_evaluation/``, alphabet/character/*.png) or ``"miniimagenet:/path"`` (Ravi &
Larochelle's layout: ``train.csv``, ``val.csv``, ``test.csv`` with ``filename,label`` rows,
and ``images/``).

Class splits:

* Omniglot, and the procedural characters: all characters of both folders, shuffled with a
  fixed seed (as Finn et al.'s code does), the first 1100 for meta-training, the next 100
  for validation, the remaining 423 for testing (the usual 1200/423 split; proportionally
  for a folder with fewer characters); each character rotated by 0, 90, 180 and 270 degrees
  is four classes (Santoro et al. 2016, Vinyals et al. 2016). 28x28, one channel, ink 1.
* miniImageNet: the 64/16/20 classes of its CSV files. 84x84, three channels in [0, 1].
"""

from __future__ import annotations

import csv
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

__all__ = [
    "Characters",
    "Episodes",
    "FewShotData",
    "MiniImageNetFolder",
    "OmniglotFolder",
    "character_split",
    "load",
    "quarter_turns",
]

Split = dict[str, list[tuple[int, int]]]  # split -> [(source class, rotation)]
ALPHABET = 32  # procedural characters per alphabet (they share stroke shapes)
VERSION = 2  # of the procedural generator: a cached set from another version is not read


class FewShotData:
    """Classes of images by split; ``images(cls, indices)`` -> ``(n, C, H, W)`` in [0, 1].

    Attributes:
        name: for reports.
        channels, size: image shape.
        splits: ``"train"``, ``"val"``, ``"test"`` -> class references.
    """

    name: str
    channels: int
    size: int
    splits: Split

    def count(self, cls: tuple[int, int]) -> int:
        """Examples of class ``cls``."""
        raise NotImplementedError

    def images(self, cls: tuple[int, int], indices: Sequence[int]) -> Tensor:
        raise NotImplementedError


class ImageFolderData(FewShotData):
    """Image files on disk: ``files[c][i]`` is example ``i`` of source class ``c``, read on
    first use (``mode`` ``"L"`` or ``"RGB"``, resized to ``size`` with ``resample``, inverted
    if ``invert``) and kept as ``(C, size, size)`` floats in [0, 1]."""

    mode: str
    resample: str
    invert: bool = False
    files: list[list[Path]]

    def count(self, cls: tuple[int, int]) -> int:
        return len(self.files[cls[0]])

    @property
    def _cache(self) -> dict[tuple[int, int], Tensor]:
        return self.__dict__.setdefault("_images", {})

    def _image(self, c: int, i: int) -> Tensor:
        if (c, i) not in self._cache:
            from PIL import Image

            with Image.open(self.files[c][i]) as im:
                im = im.convert(self.mode)
                im = im.resize((self.size, self.size), getattr(Image, self.resample))
                x = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
            x = x.reshape(self.size, self.size, self.channels).permute(2, 0, 1).float() / 255
            self._cache[(c, i)] = 1.0 - x if self.invert else x
        return self._cache[(c, i)]


def character_split(n_chars: int, seed: int = 1) -> dict[str, list[int]]:
    """Finn et al.'s split of Omniglot's characters, scaled to ``n_chars``.

    All characters shuffled with ``seed``; of 1623, the first 1100 train, 100 validate and
    423 test (for fewer characters the same proportions, at least one in each).
    """
    order = list(range(n_chars))
    random.Random(seed).shuffle(order)
    n_train = max(1, round(1100 * n_chars / 1623))
    n_val = max(1, round(100 * n_chars / 1623))
    if n_chars < 3:
        raise ValueError(f"a character split needs at least 3 characters (got {n_chars})")
    n_train = min(n_train, n_chars - 2)
    n_val = min(n_val, n_chars - n_train - 1)
    return {
        "train": order[:n_train],
        "val": order[n_train : n_train + n_val],
        "test": order[n_train + n_val :],
    }


def _rotated(split: dict[str, list[int]]) -> Split:
    return {k: [(c, r) for c in v for r in range(4)] for k, v in split.items()}


def quarter_turns(images: Tensor, turns: int) -> Tensor:
    """``images`` (``(..., H, W)``) turned by ``turns`` x 90 degrees counter-clockwise (the
    rotation classes of Omniglot and the procedural characters)."""
    return torch.rot90(images, turns, dims=(-2, -1)).contiguous()


def _rotation(angle: float) -> Tensor:
    """The 2x2 rotation matrix by ``angle`` radians (float64)."""
    c, s = math.cos(angle), math.sin(angle)
    return torch.tensor([[c, -s], [s, c]], dtype=torch.float64)


# -- the embedded procedural characters ---------------------------------------------------
@dataclass
class Characters(FewShotData):
    """A procedural character set standing in for Omniglot, rendered on demand.

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
    split, the rotations and the episode sampler are Omniglot's.

    Args:
        n_chars: characters (1623, as Omniglot).
        per_class: examples per character (20, as Omniglot).
        seed: the set's seed; the same seed gives the same images on every machine.
    """

    n_chars: int = 1623
    per_class: int = 20
    seed: int = 0
    name: str = "characters"
    channels: int = 1
    size: int = 28
    splits: Split = field(init=False)
    _all: Tensor | None = field(init=False, default=None, repr=False)

    def __post_init__(self) -> None:
        self.splits = _rotated(character_split(self.n_chars))

    def count(self, cls: tuple[int, int]) -> int:
        return self.per_class

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

    def images(self, cls: tuple[int, int], indices: Sequence[int]) -> Tensor:
        char, turns = cls
        if self._all is not None:
            out = self._all[char, list(indices)].float() / 255
        else:
            out = self._render(char, [int(i) for i in indices])
        return quarter_turns(out, turns)

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


# -- Omniglot on disk ---------------------------------------------------------------------
class OmniglotFolder(ImageFolderData):
    """Omniglot in torchvision's layout, read from ``root`` (nothing is downloaded).

    ``root`` holds ``images_background/`` and ``images_evaluation/`` (or ``omniglot-py/``
    with them inside, as torchvision extracts it): alphabet folders of character folders of
    105x105 PNGs. Images are read on first use, resized to 28x28 and inverted (ink 1).

    Raises:
        FileNotFoundError: a missing folder, or a character without images (says which).
    """

    name = "omniglot"
    channels = 1
    size = 28
    mode = "L"
    resample = "LANCZOS"
    invert = True  # ink 1

    def __init__(self, root: str | Path) -> None:
        root = Path(root)
        base = root / "omniglot-py" if (root / "omniglot-py").is_dir() else root
        folders = [base / "images_background", base / "images_evaluation"]
        missing = [str(f) for f in folders if not f.is_dir()]
        if missing:
            raise FileNotFoundError(
                f"not an Omniglot folder: {', '.join(missing)} missing. Give the folder "
                f"that holds images_background/ and images_evaluation/ (torchvision's "
                f"layout; unzip images_background.zip and images_evaluation.zip there)"
            )
        self.files: list[list[Path]] = []
        for folder in folders:
            for alphabet in sorted(p for p in folder.iterdir() if p.is_dir()):
                for char in sorted(p for p in alphabet.iterdir() if p.is_dir()):
                    pngs = sorted(char.glob("*.png"))
                    if not pngs:
                        raise FileNotFoundError(
                            f"incomplete Omniglot folder: {char} has no PNG images; "
                            f"unzip the archives again"
                        )
                    self.files.append(pngs)
        if len(self.files) < 3:
            raise FileNotFoundError(
                f"incomplete Omniglot folder: {len(self.files)} characters under {base} "
                f"(Omniglot has 1623)"
            )
        self.splits = _rotated(character_split(len(self.files)))

    def images(self, cls: tuple[int, int], indices: Sequence[int]) -> Tensor:
        char, turns = cls
        return quarter_turns(torch.stack([self._image(char, int(i)) for i in indices]), turns)


# -- miniImageNet on disk -----------------------------------------------------------------
class MiniImageNetFolder(ImageFolderData):
    """miniImageNet in Ravi & Larochelle's layout, read from ``root``.

    ``root`` holds ``train.csv``, ``val.csv``, ``test.csv`` (rows ``filename,label``, a
    header line) and ``images/`` with every file they name. 84x84 RGB in [0, 1].

    Raises:
        FileNotFoundError: a missing CSV or image folder, or images the CSVs name that are
            not there (says how many and the first).
    """

    name = "miniimagenet"
    channels = 3
    size = 84
    mode = "RGB"
    resample = "BILINEAR"

    def __init__(self, root: str | Path) -> None:
        root = Path(root)
        needed = [root / f"{s}.csv" for s in ("train", "val", "test")] + [root / "images"]
        missing = [str(p) for p in needed if not p.exists()]
        if missing:
            raise FileNotFoundError(
                f"not a miniImageNet folder: {', '.join(missing)} missing. Give the folder "
                f"with train.csv, val.csv, test.csv and images/ (Ravi & Larochelle's layout)"
            )
        self.files: list[list[Path]] = []
        self.splits = {}
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
                self.splits[split].append((len(self.files), 0))
                self.files.append(by_label[label])
        if absent:
            raise FileNotFoundError(
                f"incomplete miniImageNet folder: {len(absent)} images named in the CSVs are "
                f"missing, the first {absent[0]}"
            )

    def images(self, cls: tuple[int, int], indices: Sequence[int]) -> Tensor:
        return torch.stack([self._image(cls[0], int(i)) for i in indices])


def load(spec: str) -> FewShotData:
    """``"characters"``, ``"omniglot-small1"``/``"omniglot-small2"`` (real Omniglot's minimal
    background sets, read from the committed zips), ``"omniglot:/path"`` or
    ``"miniimagenet:/path"``.

    Raises:
        ValueError: an unknown kind (lists the known ones).
        FileNotFoundError: a folder that is not in the expected layout.
    """
    kind, _, path = spec.partition(":")
    if kind == "characters" and not path:
        return Characters()
    if kind == "omniglot" and path:
        return OmniglotFolder(path)
    if kind == "miniimagenet" and path:
        return MiniImageNetFolder(path)
    if kind in ("omniglot-small1", "omniglot-small2") and not path:
        from ..omniglot.data import MinimalSet  # the committed zips (make fewshot-omniglot)

        return MinimalSet(kind.removeprefix("omniglot-"))
    raise ValueError(
        f"unknown data {spec!r}: use 'characters' (embedded, the default), "
        f"'omniglot-small1' or 'omniglot-small2' (the committed minimal sets), "
        f"'omniglot:/path/to/omniglot' or 'miniimagenet:/path/to/miniimagenet'"
    )


# -- episodes -----------------------------------------------------------------------------
@dataclass
class Episodes:
    """N-way K-shot episodes from one split: ``episodes(g)`` draws ``meta_batch`` of them.

    Each episode picks ``n_way`` classes of the split and, from each, ``k_shot`` support
    and ``k_query`` query examples (distinct), labelled 0..n_way-1 in the order drawn. All
    randomness comes from the given ``torch.Generator`` (what ``MetaTrainer`` expects).

    Returns:
        ``[((x_support, y_support), (x_query, y_query)), ...]``, x of shape
        ``(n_way * k, C, H, W)``.
    """

    data: FewShotData
    split: str
    n_way: int = 5
    k_shot: int = 1
    k_query: int = 15
    meta_batch: int = 1

    def __post_init__(self) -> None:
        classes = self.data.splits[self.split]
        if len(classes) < self.n_way:
            raise ValueError(
                f"the {self.split} split of {self.data.name} has {len(classes)} classes, "
                f"fewer than n_way={self.n_way}"
            )

    def episode(self, g: torch.Generator):
        classes = self.data.splits[self.split]
        pick = torch.randperm(len(classes), generator=g)[: self.n_way].tolist()
        xs, xq = [], []
        for j in pick:
            cls = classes[j]
            need = self.k_shot + self.k_query
            if self.data.count(cls) < need:
                raise ValueError(
                    f"class {cls} of {self.data.name} has {self.data.count(cls)} examples, "
                    f"fewer than k_shot + k_query = {need}"
                )
            idx = torch.randperm(self.data.count(cls), generator=g)[:need].tolist()
            imgs = self.data.images(cls, idx)
            xs.append(imgs[: self.k_shot])
            xq.append(imgs[self.k_shot :])
        ys = torch.arange(self.n_way).repeat_interleave(self.k_shot)
        yq = torch.arange(self.n_way).repeat_interleave(self.k_query)
        return (torch.cat(xs), ys), (torch.cat(xq), yq)

    def sample(self, g: torch.Generator, n: int) -> list:
        return [self.episode(g) for _ in range(n)]

    def __call__(self, g: torch.Generator) -> list:
        return self.sample(g, self.meta_batch)
