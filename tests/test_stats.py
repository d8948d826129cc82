"""or_core.stats on differences whose mean, interval and verdict are known in closed form.

Tolerances: Student's t quantile has closed forms for 1 and 2 degrees of freedom,
``t_{p,1} = tan(pi (p - 1/2))`` and ``t_{p,2} = (2p - 1) / sqrt(2 p (1 - p))``; evaluated in double
precision they and scipy's numerical inverse agree to a few ulps (~1e-15 relative), so
``rel=1e-12`` leaves three orders of margin and still catches any wrong quantile, degrees of
freedom or ddof (those change the numbers in the first or second digit). A printed table value
(4 degrees of freedom) is only given to 6 digits, hence ``abs=5e-7`` there.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from or_core import stats

T2 = 0.95 / math.sqrt(2 * 0.975 * 0.025)  # t_{0.975, 2} = 4.30265...
T1 = math.tan(math.pi * 0.475)  # t_{0.975, 1} = 12.7062...


def test_t_quantile_matches_its_closed_forms_and_a_table() -> None:
    assert stats.t_quantile(3) == pytest.approx(T2, rel=1e-12)
    assert stats.t_quantile(2) == pytest.approx(T1, rel=1e-12)
    assert stats.t_quantile(5) == pytest.approx(2.776445, abs=5e-7)  # printed t tables, 4 degrees of freedom
    with pytest.raises(ValueError, match="at least 2"):
        stats.t_quantile(1)


def test_one_two_three_has_mean_2_sd_1_and_an_interval_containing_0() -> None:
    result = stats.paired_comparison([1.0, 2.0, 3.0])
    assert (result.n, result.mean, result.sd) == (3, 2.0, 1.0)  # exact in binary floating point
    assert result.half_width == pytest.approx(T2 / math.sqrt(3), rel=1e-12)  # 4.3027 / 1.7321 = 2.4841
    assert result.half_width == pytest.approx(2.4841, abs=5e-5)  # the brief's four decimals
    assert (result.low, result.high) == pytest.approx((2 - T2 / math.sqrt(3), 2 + T2 / math.sqrt(3)), rel=1e-12)
    assert result.low < 0 < result.high and result.verdict == stats.NO_EFFECT and result.has_interval


def test_an_interval_above_0_is_supported_and_one_below_0_contradicted() -> None:
    # mean 1 and -1, sd 0.1 (ddof=1): half width 4.3027 * 0.1 / sqrt(3) = 0.2484
    half = T2 * 0.1 / math.sqrt(3)
    up = stats.paired_comparison([0.9, 1.0, 1.1])
    assert up.sd == pytest.approx(0.1, rel=1e-12) and (up.low, up.high) == pytest.approx((1 - half, 1 + half), rel=1e-12)
    assert up.verdict == stats.SUPPORTED
    down = stats.paired_comparison([-1.1, -1.0, -0.9])
    assert (down.low, down.high) == pytest.approx((-1 - half, -1 + half), rel=1e-12)
    assert down.high < 0 and down.verdict == stats.CONTRADICTED
    two = stats.paired_comparison([1.0, 3.0])  # n = 2: mean 2, sd sqrt(2), half width 12.706 * sqrt(2) / sqrt(2)
    assert two.half_width == pytest.approx(T1, rel=1e-12) and two.verdict == stats.NO_EFFECT


def test_identical_differences_give_an_interval_of_width_0() -> None:
    same = stats.paired_comparison([0.25, 0.25, 0.25, 0.25])  # 0.25 is exact: sd is exactly 0
    assert (same.sd, same.half_width, same.low, same.high) == (0.0, 0.0, 0.25, 0.25)
    assert same.verdict == stats.SUPPORTED
    zeros = stats.paired_comparison([0.0, 0.0])
    assert (zeros.low, zeros.high, zeros.verdict) == (0.0, 0.0, stats.NO_EFFECT)  # an end at 0 contains 0
    assert stats.paired_comparison([-0.5, -0.5]).verdict == stats.CONTRADICTED


def test_one_pair_or_none_gives_no_interval_and_no_verdict() -> None:
    one = stats.paired_comparison([0.3])
    assert (one.n, one.mean, one.verdict, one.has_interval) == (1, 0.3, stats.TOO_FEW, False)
    assert all(math.isnan(v) for v in (one.sd, one.half_width, one.low, one.high))
    empty = stats.paired_comparison([])
    assert empty.n == 0 and math.isnan(empty.mean) and empty.verdict == stats.TOO_FEW


def test_nans_are_dropped_before_counting() -> None:
    result = stats.paired_comparison([1.0, math.nan, 2.0, np.nan, 3.0])
    assert result == stats.paired_comparison([1.0, 2.0, 3.0])
    assert stats.paired_comparison([math.nan, 0.4]).verdict == stats.TOO_FEW  # one value left
    assert stats.paired_comparison(np.array([0.9, 1.0, 1.1])).verdict == stats.SUPPORTED  # arrays too


def test_interval_verdict_reads_the_ends() -> None:
    assert stats.interval_verdict(0.01, 0.5) == stats.SUPPORTED
    assert stats.interval_verdict(-0.5, -0.01) == stats.CONTRADICTED
    assert stats.interval_verdict(-0.1, 0.1) == stats.NO_EFFECT
    assert stats.interval_verdict(0.0, 0.1) == stats.NO_EFFECT
    assert "t(0.975, n-1)" in stats.RULE and stats.VERDICTS == (stats.SUPPORTED, stats.NO_EFFECT, stats.CONTRADICTED)
