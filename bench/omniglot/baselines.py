"""The one-shot task's distance baselines, from the same images the networks see.

* :func:`mhd_error`: the Modified Hausdorff Distance baseline of the dataset's own demo
  (Lake et al.'s ``demo_classification``; Dubuisson & Jain 1994), written here in torch:
  each 105x105 image becomes the coordinates of its inked pixels, centred on their mean; the
  distance between two images is the larger of the two mean nearest-point distances; a test
  image takes the class of the nearest training image. The demo states 38.8% error.
* :func:`pixel_error`: nearest neighbour in pixel space (Euclidean), at any resolution.

Both cost O(20 x 20) distance evaluations per run; MHD's is a ``(n, m)`` distance matrix of
inked pixels (a few hundred each), about a second for all 20 runs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from effmaml.omniglot import OneShotRun as Run

__all__ = ["classify", "error_percent", "inked_points", "mhd", "mhd_error", "pixel_error"]


def inked_points(image: Tensor) -> Tensor:
    """``(n, 2)`` float64 (row, column) coordinates of the inked pixels of a ``(1, H, W)``
    binary image (ink 1), centred on their mean, as the demo's ``LoadImgAsPoints`` does."""
    points = (image[0] > 0.5).nonzero().to(torch.float64)
    if len(points) == 0:
        raise ValueError("an image without ink has no Hausdorff distance to anything")
    return points - points.mean(0)


def mhd(a: Tensor, b: Tensor) -> float:
    """The Modified Hausdorff Distance of two point sets ``(n, 2)`` and ``(m, 2)``: the larger
    of the mean distance from each point of one to the nearest point of the other."""
    d = torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")
    return max(float(d.min(1).values.mean()), float(d.min(0).values.mean()))


def classify(cost: Tensor) -> Tensor:
    """The class of each test image under a ``(test, train)`` cost matrix: the cheapest."""
    return cost.argmin(1)


def error_percent(run: Run, predicted: Tensor) -> float:
    """The share of the run's test images given the wrong class, in percent."""
    return 100.0 * float((predicted != run.labels).double().mean())


def mhd_error(run: Run) -> float:
    """The MHD baseline's error (%) on one run, whose images are read at 105x105."""
    train = [inked_points(x) for x in run.train]
    sizes = [len(c) for c in train]
    every = torch.cat(train)
    cost = torch.empty(len(run.test), len(train), dtype=torch.float64)
    for i, x in enumerate(run.test):
        # one distance matrix against every training image's points at once, cut per image:
        # the same distances, minima and means as mhd() pair by pair
        d = torch.cdist(inked_points(x), every, compute_mode="donot_use_mm_for_euclid_dist")
        for j, block in enumerate(d.split(sizes, dim=1)):
            cost[i, j] = max(block.min(1).values.mean(), block.min(0).values.mean())
    return error_percent(run, classify(cost))


def pixel_error(run: Run) -> float:
    """Nearest neighbour in pixel space (Euclidean) on one run, at its images' size."""
    cost = torch.cdist(run.test.flatten(1).double(), run.train.flatten(1).double())
    return error_percent(run, classify(cost))
