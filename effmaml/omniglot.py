"""Omniglot (Lake et al. 2015) as a labelled dataset, and its 20 one-shot runs.

>>> chars = Omniglot("data/omniglot/images_background_small1.zip")   # checked, then read
>>> split = split_classes(range(len(chars.characters)))
>>> sampler = EpisodeSampler(chars, 20, 1, 15, classes=split["train"], transforms=QUARTER_TURNS)
>>> runs = one_shot_runs("data/omniglot/all_runs.zip")

``Omniglot(source)`` reads one of the dataset's archives in place (``zipfile``; nothing is
unzipped): the background and evaluation sets (``images_background.zip``,
``images_evaluation.zip``), or one of the two "minimal" background sets
(``images_background_small1.zip``, ``..._small2.zip``; 5 alphabets each), as published in
github.com/brendenlake/omniglot (``python/``), or a folder in torchvision's layout
(``[omniglot-py/]images_background/`` and ``images_evaluation/``, alphabet folders of
character folders of PNGs). An archive whose name is one of ``DIGESTS`` is checked
against its published digest before it is read; an altered, truncated or missing file is
an ``OmniglotDataError`` that says which and what to do. Each character is one label
(``targets``), items are ``(image, label)`` with the image ``(1, size, size)`` in [0, 1],
ink 1 and paper 0. Reading PNGs needs Pillow (``pip install pillow``, or torchvision,
which brings it).
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

__all__ = [
    "DIGESTS",
    "SIZE",
    "Omniglot",
    "OmniglotDataError",
    "OneShotRun",
    "one_shot_runs",
    "read_png",
    "verify",
]

# archive name -> (algorithm, hex digest). The minimal sets and the runs: SHA-256 of the
# files in Lake et al.'s repository (as committed in this repository's data/omniglot/,
# SHA256SUMS); the full sets: the MD5 sums torchvision's Omniglot checks.
DIGESTS: dict[str, tuple[str, str]] = {
    "images_background_small1.zip": (
        "sha256",
        "f38eb80f801274ac2b4dff5b24289016bfaba4a7d5bb50deebf27104ad6cb8a4",
    ),
    "images_background_small2.zip": (
        "sha256",
        "3ccaa407515a8778e5d0861875af38b17e418f301ad5bb3b5a6b65d901a41c7f",
    ),
    "all_runs.zip": ("sha256", "437c1eeab0af8484112e1b4cc0f3d541ec727f7c47b9b202da738af9dfd6c325"),
    "images_background.zip": ("md5", "68d2efa1b9178cc56df9314c21c6e718"),
    "images_evaluation.zip": ("md5", "6b91aef0f799c5bb55b94e3f2daec811"),
}
SIZE = 28  # what few-shot networks see (Santoro et al., Finn et al.)
SUBSETS = ("images_background", "images_evaluation")
# the archives effmaml's repository commits in data/omniglot/
COMMITTED = ("images_background_small1.zip", "images_background_small2.zip", "all_runs.zip")
SOURCE = "github.com/brendenlake/omniglot (folder python/)"


class OmniglotDataError(RuntimeError):
    """A missing, altered or malformed Omniglot archive or folder."""


_VERIFIED: set[tuple[Path, int, float]] = set()


def verify(path: str | Path) -> Path:
    """``path``, once the archive's digest matches ``DIGESTS`` for its name.

    Cost: one read of the file (about 10 ms per MB); a file checked before in this process,
    unchanged in size and modification time, is not read again.

    Raises:
        OmniglotDataError: the file is missing, its name is not a known archive (read it
            with ``check=False``), or its digest differs (says both digests).
    """
    path = Path(path).expanduser().resolve()
    _present(path)
    if path.name not in DIGESTS:
        raise OmniglotDataError(
            f"{path.name} is not a known Omniglot archive ({', '.join(sorted(DIGESTS))}); "
            f"pass check=False to read it without a checksum"
        )
    stat = path.stat()
    key = (path, stat.st_size, stat.st_mtime)
    if key in _VERIFIED:
        return path
    algorithm, expected = DIGESTS[path.name]
    digest = hashlib.new(algorithm, path.read_bytes()).hexdigest()
    if digest != expected:
        again = (
            f" (effmaml's repository commits it: git checkout -- data/omniglot/{path.name})"
            if path.name in COMMITTED and path.parent.parts[-2:] == ("data", "omniglot")
            else ""
        )
        raise OmniglotDataError(
            f"{path} is altered or truncated: {algorithm.upper()} {digest}, expected "
            f"{expected}. Fetch it again from {SOURCE}{again}"
        )
    _VERIFIED.add(key)
    return path


def read_png(data: bytes, size: int | None = SIZE) -> Tensor:
    """One Omniglot PNG as a ``(1, H, W)`` float tensor, ink 1 and paper 0.

    ``size=None``: the 105x105 binary image as drawn (what distance baselines read);
    otherwise resized to ``size`` x ``size`` with Lanczos.
    """
    return _pixels(data, size).float() / 255


def _pixels(data: bytes, size: int | None) -> Tensor:
    """``(1, H, W)`` uint8, ink 255 (the PNG's black)."""
    try:
        from PIL import Image
    except ImportError as e:  # pragma: no cover - Pillow comes with torchvision
        raise ImportError("reading Omniglot's PNGs needs Pillow: pip install pillow") from e

    with Image.open(io.BytesIO(data)) as png:
        gray = png.convert("L")
    if size is not None:
        gray = gray.resize((size, size), Image.Resampling.LANCZOS)
    w, h = gray.size
    x = torch.frombuffer(bytearray(gray.tobytes()), dtype=torch.uint8).reshape(1, h, w)
    return 255 - x


class Omniglot(torch.utils.data.Dataset):
    """Omniglot's characters as a dataset of ``(image, character)`` items.

    Characters are ordered by (subset, alphabet, character folder); ``characters[c]``
    names label ``c`` (``"Greek/character01"``), ``alphabets`` lists the alphabets read,
    ``targets`` holds every item's label (what ``effmaml.episodes.class_index`` reads).
    Every image is decoded once, at construction (a minimal set's 2720 PNGs in about a
    second, the full 32460 in about 15 s on one core) and kept as uint8
    (``size * size`` bytes each).

    Args:
        source: an archive (``.zip``) or a folder in torchvision's layout.
        size: image side (Lanczos); None: the 105x105 images as drawn.
        characters: read only the first this many characters (a test's slice), or all.
        check: verify an archive against ``DIGESTS`` (an archive of another name
            needs ``check=False``).
        subsets: for a folder, the subsets to read (both by default, as Finn et al.'s
            1623-character split needs); one name alone is one subset.

    Raises:
        OmniglotDataError: a missing, altered or unreadable archive, a path that does not
            exist, a folder that is not in the layout (says which subset is missing and
            what the folder holds), a character without images, or fewer than one
            character.
    """

    def __init__(
        self,
        source: str | Path,
        size: int | None = SIZE,
        characters: int | None = None,
        check: bool = True,
        subsets: Sequence[str] = SUBSETS,
    ) -> None:
        self.source = Path(source).expanduser()
        self.size = size
        if isinstance(subsets, str):
            subsets = (subsets,)
        z = _zip(_archive(self.source, check)) if self.source.suffix == ".zip" else None
        try:
            files = (
                _zip_characters(z) if z is not None else _folder_characters(self.source, subsets)
            )
            names = sorted(files)[:characters]
            if not names:
                runs = (
                    " (the one-shot runs: read them with one_shot_runs)"
                    if z and any(m.startswith("run") for m in z.namelist())
                    else ""
                )
                raise OmniglotDataError(
                    f"{self.source}: no character folders with PNGs found{runs}"
                )
            self.characters = ["/".join(n[1:]) for n in names]
            self.alphabets = sorted({n[1] for n in names})
            images: list[Tensor] = []
            self.targets: list[int] = []
            for label, name in enumerate(names):
                for f in files[name]:
                    images.append(_pixels(z.read(f) if z is not None else f.read_bytes(), size))
                    self.targets.append(label)
        finally:
            if z is not None:
                z.close()
        self._images = torch.stack(images)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return self._images[i].float() / 255, self.targets[i]


def _present(path: Path) -> None:
    """Raise ``OmniglotDataError`` unless ``path`` is a file (says what is there instead)."""
    if path.is_dir():
        raise OmniglotDataError(f"{path} is a folder, not an archive; give the .zip file")
    if not path.is_file():
        raise OmniglotDataError(f"{path} does not exist; the archive comes from {SOURCE}")


def _archive(path: Path, check: bool) -> Path:
    """``path`` verified (``check``), or at least present."""
    path = path.expanduser()
    if check:
        return verify(path)
    _present(path)
    return path


def _zip(path: Path) -> zipfile.ZipFile:
    """The archive opened, or ``OmniglotDataError`` naming it."""
    try:
        return zipfile.ZipFile(path)
    except zipfile.BadZipFile as e:
        raise OmniglotDataError(
            f"{path} is not a readable zip archive ({e}); it is truncated or not Omniglot's: "
            f"fetch it again from {SOURCE}"
        ) from None


def _zip_characters(z: zipfile.ZipFile) -> dict[tuple[str, str, str], list]:
    """(subset, alphabet, character) -> the character's PNG members, sorted."""
    files: dict[tuple[str, str, str], list] = {}
    for member in sorted(z.namelist()):
        parts = member.split("/")
        if len(parts) == 4 and parts[3].endswith(".png"):
            files.setdefault((parts[0], parts[1], parts[2]), []).append(member)
    return files


def _folder_characters(root: Path, subsets: Sequence[str]) -> dict[tuple[str, str, str], list]:
    if not root.is_dir():
        what = "is a file, not a .zip archive or a folder" if root.exists() else "does not exist"
        raise OmniglotDataError(
            f"{root} {what}: give an Omniglot archive (.zip) or the folder that "
            f"holds {' and '.join(f'{s}/' for s in SUBSETS)} (torchvision's layout)"
        )
    base = root / "omniglot-py" if (root / "omniglot-py").is_dir() else root
    missing = [str(base / s) for s in subsets if not (base / s).is_dir()]
    if missing:
        there = sorted(p.name for p in base.iterdir() if p.is_dir())
        raise OmniglotDataError(
            f"not an Omniglot folder: {', '.join(missing)} missing (the folder holds "
            f"{', '.join(there) or 'no folders'}). Give the folder that holds "
            f"{' and '.join(f'{s}/' for s in subsets)} (torchvision's layout; unzip the "
            f"archives there), or name the subsets you have with subsets= (Omniglot's: "
            f"{', '.join(SUBSETS)}, and the minimal sets images_background_small1, _small2)"
        )
    files: dict[tuple[str, str, str], list] = {}
    for s in subsets:
        for alphabet in sorted(p for p in (base / s).iterdir() if p.is_dir()):
            for char in sorted(p for p in alphabet.iterdir() if p.is_dir()):
                pngs = sorted(char.glob("*.png"))
                if not pngs:
                    raise OmniglotDataError(
                        f"incomplete Omniglot folder: {char} has no PNG images; unzip the "
                        f"archives again"
                    )
                files[(s, alphabet.name, char.name)] = pngs
    return files


@dataclass(frozen=True)
class OneShotRun:
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


def one_shot_runs(
    path: str | Path, size: int | None = SIZE, runs: int | None = None, check: bool = True
) -> list[OneShotRun]:
    """The 20 runs of ``all_runs.zip`` (or the first ``runs``), images read as
    ``read_png`` reads them at ``size``. Score a model once per run: the 20 training
    images are the support set, the 20 test images the queries (error % is the published
    measure: people 4.5%, Lake et al. 2015).

    Raises:
        OmniglotDataError: the archive is missing, fails its checksum, is not a zip or
            holds no runs, or a run's ``class_labels.txt`` names an image that is not in it.
    """
    path = _archive(Path(path), check)
    out = []
    with _zip(path) as z:
        present = set(z.namelist())
        names = sorted({m.split("/")[0] for m in present if m.startswith("run")})[:runs]
        if not names:
            raise OmniglotDataError(
                f"{path.name} holds no run folders (run01/ ... run20/): the one-shot runs "
                f"are all_runs.zip from {SOURCE}"
            )
        for name in names:
            pairs = [
                line.split()
                for line in z.read(f"{name}/class_labels.txt").decode().splitlines()
                if line.strip()
            ]
            train_files = sorted(m for m in present if _inside(m, f"{name}/training/"))
            test_files = sorted(m for m in present if _inside(m, f"{name}/test/"))
            answer = {test: train for test, train in pairs}
            missing = [f for f in [*answer, *answer.values()] if f not in present]
            if missing or sorted(answer) != test_files:
                raise OmniglotDataError(
                    f"{path.name}: {name}/class_labels.txt does not match the run's images "
                    f"(first problem: {(missing or test_files or ['no test images'])[0]})"
                )
            out.append(
                OneShotRun(
                    name,
                    torch.stack([read_png(z.read(f), size) for f in train_files]),
                    torch.stack([read_png(z.read(f), size) for f in test_files]),
                    torch.tensor([train_files.index(answer[f]) for f in test_files]),
                )
            )
    return out


def _inside(member: str, prefix: str) -> bool:
    return member.startswith(prefix) and member != prefix
