"""Real Omniglot, read straight from the committed zips (``data/omniglot/``), checksums
verified.

Three archives from Lake et al.'s public repository (MIT licence, ``data/omniglot/LICENSE``):

* ``images_background_small1.zip`` and ``images_background_small2.zip``: the two "minimal"
  background sets, 5 alphabets each (136 and 156 characters), 20 drawers per character,
  105x105 PNGs, ink black on white.
* ``all_runs.zip``: the 20 runs of the original one-shot task: each 20-way within one
  evaluation alphabet (disjoint from every background set), one training image per class
  and 20 test images, ``class_labels.txt`` naming each test image's class.

Nothing is unzipped. :func:`verify` checks every archive against ``SHA256SUMS`` before it is
read; a missing or altered file raises :class:`OmniglotDataError` saying which and what to do.
"""

from __future__ import annotations

import hashlib
import io
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..fewshot.data import FewShotData, _rotated, character_split, quarter_turns

__all__ = [
    "BACKGROUND",
    "DATA_DIR",
    "MinimalSet",
    "OmniglotDataError",
    "Run",
    "load_runs",
    "read_png",
    "verify",
]

DATA_DIR = Path(__file__).resolve().parents[2] / "data" / "omniglot"
BACKGROUND = {"small1": "images_background_small1.zip", "small2": "images_background_small2.zip"}
RUNS = "all_runs.zip"
SIZE = 28  # what the networks see (Finn et al., Santoro et al.); the baselines read 105x105


class OmniglotDataError(RuntimeError):
    """A missing, altered or malformed Omniglot archive."""


def _sums(root: Path) -> dict[str, str]:
    path = root / "SHA256SUMS"
    if not path.is_file():
        raise OmniglotDataError(
            f"{path} is missing: the checksums of the Omniglot archives. Restore data/omniglot/ "
            f"from the repository (git checkout -- data/omniglot)"
        )
    sums = {}
    for line in path.read_text().splitlines():
        if line.strip():
            digest, name = line.split()
            sums[name.lstrip("*")] = digest
    return sums


_VERIFIED: set[Path] = set()


def verify(name: str, root: Path = DATA_DIR) -> Path:
    """The path of archive ``name`` under ``root``, once its SHA-256 matches ``SHA256SUMS``.

    Raises:
        OmniglotDataError: the archive is missing, not listed, or its digest differs (an
            altered or truncated file: says both digests).
    """
    path = (root / name).resolve()
    if path in _VERIFIED:
        return path
    sums = _sums(root)
    if name not in sums:
        raise OmniglotDataError(f"{name} is not listed in {root / 'SHA256SUMS'}")
    if not path.is_file():
        raise OmniglotDataError(
            f"{path} is missing. Restore it from the repository (git checkout -- "
            f"data/omniglot/{name}); it comes from github.com/brendenlake/omniglot (python/)"
        )
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != sums[name]:
        raise OmniglotDataError(
            f"{path} is altered: SHA-256 {digest}, expected {sums[name]} (SHA256SUMS). "
            f"Restore it from the repository (git checkout -- data/omniglot/{name})"
        )
    _VERIFIED.add(path)
    return path


def read_png(data: bytes, size: int | None = SIZE) -> Tensor:
    """One Omniglot PNG as a ``(1, H, W)`` float tensor, ink 1 and paper 0.

    ``size=None``: the 105x105 binary image as drawn (what the distance baselines read);
    otherwise resized to ``size`` x ``size`` with Lanczos (the networks' input).
    """
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("L")
        if size is not None:
            im = im.resize((size, size), Image.LANCZOS)
        w, h = im.size
        x = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).reshape(1, h, w)
    return 1.0 - x.float() / 255


class MinimalSet(FewShotData):
    """One minimal background set (``"small1"`` or ``"small2"``) as few-shot classes.

    Characters are split as :func:`bench.fewshot.data.character_split` does for the full set
    (shuffled with seed 1; 1100/100/423 of 1623 in proportion: 92/8/36 of 136 characters,
    106/10/40 of 156): ``"train"`` to meta-train on, ``"val"`` to choose hyperparameters on,
    ``"test"`` for the usual held-out episodes. Each character under four quarter turns is
    four classes (Finn et al.'s augmentation). Every image is decoded once, at construction
    (2720 or 3120 PNGs, about a second), and kept at 28x28 (3 KiB each).

    Args:
        which: ``"small1"`` or ``"small2"``.
        root: the folder with the archives and ``SHA256SUMS`` (the repository's
            ``data/omniglot/``).
        characters: read only the first this many characters (alphabetical order; the
            tests' tiny slice), or all.
    """

    channels = 1
    size = SIZE

    def __init__(self, which: str, root: Path = DATA_DIR, characters: int | None = None) -> None:
        if which not in BACKGROUND:
            raise ValueError(f"unknown minimal set {which!r}: use one of {sorted(BACKGROUND)}")
        self.name = f"omniglot-{which}"
        by_char: dict[str, list[str]] = {}
        with zipfile.ZipFile(verify(BACKGROUND[which], root)) as z:
            for member in sorted(z.namelist()):
                parts = member.split("/")
                if len(parts) == 4 and parts[3].endswith(".png"):
                    by_char.setdefault(f"{parts[1]}/{parts[2]}", []).append(member)
            names = sorted(by_char)[:characters]
            self.characters = names
            self.alphabets = sorted({n.split("/")[0] for n in names})
            self._images = [torch.stack([read_png(z.read(m)) for m in by_char[n]]) for n in names]
        if len(names) < 3:
            raise OmniglotDataError(f"{self.name}: {len(names)} characters read; need 3")
        self.splits = _rotated(character_split(len(names)))

    def count(self, cls: tuple[int, int]) -> int:
        return len(self._images[cls[0]])

    def images(self, cls: tuple[int, int], indices: Sequence[int]) -> Tensor:
        char, turns = cls
        return quarter_turns(self._images[char][list(indices)], turns)


@dataclass(frozen=True)
class Run:
    """One run of Lake et al.'s one-shot task: 20-way within one evaluation alphabet.

    Attributes:
        name: ``"run01"`` ... ``"run20"``.
        train: ``(20, 1, H, W)``, one image per class (``class01`` ... ``class20``).
        test: ``(20, 1, H, W)``, ``item01`` ... ``item20``.
        labels: ``(20,)``, the class (0-based index into ``train``) of each test image.
    """

    name: str
    train: Tensor
    test: Tensor
    labels: Tensor


def load_runs(size: int | None = SIZE, root: Path = DATA_DIR, runs: int | None = None) -> list[Run]:
    """The 20 runs of ``all_runs.zip`` (or the first ``runs``), images as :func:`read_png`
    reads them at ``size``.

    Raises:
        OmniglotDataError: the archive fails its checksum, or a run's ``class_labels.txt``
            names an image that is not in it.
    """
    out = []
    with zipfile.ZipFile(verify(RUNS, root)) as z:
        present = set(z.namelist())
        names = sorted({m.split("/")[0] for m in present if m.startswith("run")})[:runs]
        for name in names:
            pairs = [
                line.split()
                for line in z.read(f"{name}/class_labels.txt").decode().splitlines()
                if line.strip()
            ]
            train_files = sorted(f"{name}/training/{p}" for p in _basenames(z, name, "training"))
            test_files = sorted(f"{name}/test/{p}" for p in _basenames(z, name, "test"))
            answer = {test: train for test, train in pairs}
            missing = [f for f in [*answer, *answer.values()] if f not in present]
            if missing or sorted(answer) != test_files:
                raise OmniglotDataError(
                    f"{RUNS}: {name}/class_labels.txt does not match the run's images "
                    f"(first problem: {(missing or test_files)[0]})"
                )
            out.append(
                Run(
                    name,
                    torch.stack([read_png(z.read(f), size) for f in train_files]),
                    torch.stack([read_png(z.read(f), size) for f in test_files]),
                    torch.tensor([train_files.index(answer[f]) for f in test_files]),
                )
            )
    return out


def _basenames(z: zipfile.ZipFile, run: str, folder: str) -> list[str]:
    prefix = f"{run}/{folder}/"
    return [m[len(prefix) :] for m in z.namelist() if m.startswith(prefix) and m != prefix]
