"""The mean and its confidence interval, as every report prints them.

One statistic for every table that prints "mean ± half-width": the half-width of the
two-sided 95% Student t interval, t₀.₉₇₅(n − 1)·s/√n, with s the sample standard deviation
(ddof 1). It is the right interval for a mean of n independent values whatever n is: with
bilevel's 3 seeds t is 4.30 (1.96, the normal quantile, would make the interval 2.2x too
narrow), with few-shot's hundreds of episodes it is 1.96 to within 1%. (Speed comparisons
report a median with a distribution-free interval instead: ``bench.timing.median_ci``.)
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable

__all__ = ["format_mean_t95", "mean_t95", "t95"]


def t95(df: int) -> float:
    """The two-sided 95% quantile of Student's t with ``df`` degrees of freedom."""
    from scipy.stats import t

    return float(t.ppf(0.975, df))


def mean_t95(values: Iterable[float]) -> tuple[float, float]:
    """The mean of ``values`` and the half-width of its 95% Student t interval (0 for one
    value; NaN values are left out, as pandas' mean leaves them out)."""
    xs = [float(v) for v in values if not math.isnan(float(v))]
    if not xs:
        return math.nan, math.nan
    mean = statistics.fmean(xs)
    if len(xs) < 2:
        return mean, 0.0
    return mean, t95(len(xs) - 1) * statistics.stdev(xs) / math.sqrt(len(xs))


def format_mean_t95(values: Iterable[float], scale: float = 1.0, digits: int = 2) -> str:
    """``"mean ± half-width"`` of ``mean_t95``, times ``scale``, to ``digits`` places."""
    mean, half = mean_t95(values)
    return f"{scale * mean:.{digits}f} ± {scale * half:.{digits}f}"
