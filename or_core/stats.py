"""Paired comparisons over seeds: the noise model behind the verdicts of :func:`or_core.report.claims`.

A comparison pairs runs that differ only in the thing a claim is about (same method, data set,
seed: the same training subset and initialization; with OR against without). Each seed gives
one signed difference ``d_i``, positive when it agrees with the claim. The seeds are taken as
independent draws of the training noise, and the mean difference gets the paired-t 95%
confidence interval

    mean = (1/n) sum_i d_i,
    sd   = sqrt( sum_i (d_i - mean)^2 / (n - 1) )            (ddof = 1),
    half = t_{0.975, n-1} * sd / sqrt(n),
    CI   = [mean - half, mean + half],

with ``t_{0.975, n-1}`` the 97.5% quantile of Student's t with ``n - 1`` degrees of freedom
(12.706 for n = 2, 4.303 for n = 3, 2.776 for n = 5). The verdict reads the interval:

* **supported**: the whole interval lies above 0 (``low > 0``);
* **contradicted**: the whole interval lies below 0 (``high < 0``);
* **no detectable effect**: the interval contains 0 (an end exactly at 0 counts as containing it);
* **too few seeds**: ``n < 2``; one pair says nothing about the spread between seeds, so it gets
  neither an interval nor a verdict.

Example::

    from or_core.stats import paired_comparison

    paired_comparison([0.9, 1.0, 1.1])   # mean 1, CI [0.752, 1.248]: supported
    paired_comparison([1.0, 2.0, 3.0])   # mean 2, CI [-0.484, 4.484]: no detectable effect

The interval assumes the differences are roughly normal; with the two to five seeds a matrix
affords, it is wide, and "no detectable effect" means the seeds cannot tell, not that there is
no effect.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from scipy import stats as _scipy_stats

__all__ = [
    "CONFIDENCE",
    "MIN_SEEDS",
    "SUPPORTED",
    "NO_EFFECT",
    "CONTRADICTED",
    "TOO_FEW",
    "VERDICTS",
    "RULE",
    "PairedComparison",
    "t_quantile",
    "paired_comparison",
    "interval_verdict",
]

#: The confidence level of every interval.
CONFIDENCE = 0.95
#: The fewest pairs that give an interval (a single pair has no spread).
MIN_SEEDS = 2
#: The verdicts of :func:`paired_comparison`.
SUPPORTED, NO_EFFECT, CONTRADICTED, TOO_FEW = "supported", "no detectable effect", "contradicted", "too few seeds"
#: The three verdicts an interval can give, in the order they are reported.
VERDICTS = (SUPPORTED, NO_EFFECT, CONTRADICTED)
#: The rule in words, for a table's caption.
RULE = ("mean paired difference over seeds with its 95% paired-t interval, mean +- t(0.975, n-1) * sd / sqrt(n): "
        "interval above 0: supported; containing 0: no detectable effect; below 0: contradicted; "
        "fewer than 2 seeds: too few seeds")


@dataclass(frozen=True)
class PairedComparison:
    """The paired differences of one comparison, summarized.

    ``n`` counts the differences kept (``NaN`` dropped); ``sd`` is the sample standard deviation
    (``ddof=1``); ``low``/``high`` are the 95% interval's ends and ``half_width`` its half width.
    With ``n < 2`` only ``mean`` (the single difference, or ``NaN`` for none) is set and the
    verdict is :data:`TOO_FEW`.
    """

    n: int
    mean: float
    sd: float
    half_width: float
    low: float
    high: float
    verdict: str

    @property
    def has_interval(self) -> bool:
        """Whether there were enough pairs for an interval."""
        return self.n >= MIN_SEEDS


def t_quantile(n: int, confidence: float = CONFIDENCE) -> float:
    """``t_{(1 + confidence)/2, n-1}``: the quantile of Student's t with ``n - 1`` degrees of
    freedom that a two-sided ``confidence`` interval of the mean of ``n`` values needs."""
    if n < MIN_SEEDS:
        raise ValueError(f"a t interval needs at least {MIN_SEEDS} values, got {n}")
    return float(_scipy_stats.t.ppf(0.5 + confidence / 2, df=n - 1))


def interval_verdict(low: float, high: float) -> str:
    """The verdict of an interval: above 0 (``low > 0``) supported, below 0 (``high < 0``)
    contradicted, else (it contains 0) no detectable effect."""
    if low > 0:
        return SUPPORTED
    if high < 0:
        return CONTRADICTED
    return NO_EFFECT


def paired_comparison(differences: Iterable[float], confidence: float = CONFIDENCE) -> PairedComparison:
    """Mean, paired-t interval and verdict of signed paired differences (> 0 agrees with the
    claim): ``mean +- t_{0.975, n-1} * sd / sqrt(n)``, ``sd`` with ``ddof=1``.

    ``NaN`` differences (a measure one of the two runs lacks) are dropped before counting. Fewer
    than two differences give no interval and the verdict :data:`TOO_FEW`. Identical differences
    (``sd = 0``) give an interval of width 0 at their value.
    """
    values = np.asarray([float(d) for d in differences], dtype=np.float64)
    values = values[~np.isnan(values)]
    n = int(values.size)
    mean = float(values.mean()) if n else math.nan
    if n < MIN_SEEDS:
        return PairedComparison(n, mean, math.nan, math.nan, math.nan, math.nan, TOO_FEW)
    sd = float(values.std(ddof=1))
    half = t_quantile(n, confidence) * sd / math.sqrt(n)
    low, high = mean - half, mean + half
    return PairedComparison(n, mean, sd, half, low, high, interval_verdict(low, high))
