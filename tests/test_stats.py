"""medquant.eval.stats: paired bootstrap CI and randomization / t tests."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from medquant.eval.stats import (
    PairedComparison, compare_runs, paired_comparison, randomization_pvalue, t_sf_two_sided, ttest_pvalue,
)


def systems(seed=0, n=400, shift=0.0, noise=0.15):
    rng = np.random.default_rng(seed)
    a = rng.uniform(0, 1, size=n)
    b = np.clip(a + shift + noise * rng.normal(size=n), 0, 1)
    return a, b


@pytest.mark.parametrize("test", ["randomization", "ttest"])
def test_identical_systems(test):
    a, _ = systems()
    r = paired_comparison(a, a.copy(), n_boot=2000, test=test)
    assert isinstance(r, PairedComparison)
    assert r.delta == 0 and r.rel_delta == 0 and r.mean_a == r.mean_b
    assert r.ci_low == 0.0 and r.ci_high == 0.0  # every paired resample of zero differences is zero
    assert r.p_value == 1.0
    assert not r.significant()


def test_same_distribution_is_not_significant():
    rng = np.random.default_rng(11)
    a = rng.uniform(size=300)
    b = a + rng.normal(0, 0.1, size=300)
    b = b - (b - a).mean()  # exactly zero mean difference
    r = paired_comparison(a, b, n_boot=3000)
    assert abs(r.delta) < 1e-12 and r.ci_low < 0 < r.ci_high and r.p_value > 0.5


@pytest.mark.parametrize("test", ["randomization", "ttest"])
def test_clearly_different_systems(test):
    a, b = systems(shift=0.08)
    r = paired_comparison(a, b, n_boot=3000, test=test)
    assert r.delta > 0.05 and r.mean_b > r.mean_a
    assert r.rel_delta == pytest.approx(r.delta / r.mean_a)
    assert r.p_value < 0.01 and r.significant(0.01)
    assert r.ci_low > 0 and r.ci_high > r.ci_low
    assert r.ci_low <= r.delta <= r.ci_high
    worse = paired_comparison(b, a, n_boot=3000, test=test)
    assert worse.delta == pytest.approx(-r.delta) and worse.ci_high < 0 and worse.p_value < 0.01


def test_seeds_are_reproducible():
    a, b = systems(seed=3, shift=0.01)
    r1 = paired_comparison(a, b, n_boot=2000, seed=5)
    r2 = paired_comparison(a, b, n_boot=2000, seed=5)
    r3 = paired_comparison(a, b, n_boot=2000, seed=6)
    assert r1 == r2
    assert (r1.ci_low, r1.ci_high, r1.p_value) != (r3.ci_low, r3.ci_high, r3.p_value)


def test_randomization_agrees_with_ttest_on_moderate_effect():
    rng = np.random.default_rng(4)
    a = rng.uniform(size=300)
    d = rng.normal(0, 0.15, size=300)
    b = a + d - d.mean() + 0.02  # mean difference exactly 0.02, t about 2.3
    p_rand = paired_comparison(a, b, n_boot=20000, test="randomization").p_value
    p_t = paired_comparison(a, b, n_boot=100, test="ttest").p_value
    assert 0.001 < p_t < 0.5
    assert abs(p_rand - p_t) < 0.02


def test_student_t_tail_without_scipy():
    # reference values of the two-sided Student-t tail probability
    assert t_sf_two_sided(2.0, 10) == pytest.approx(0.0733880347, abs=1e-8)
    assert t_sf_two_sided(1.0, 1) == pytest.approx(0.5, abs=1e-12)  # Cauchy: P(|T| > 1) = 1/2
    assert t_sf_two_sided(0.0, 5) == pytest.approx(1.0)
    assert t_sf_two_sided(1.959963985, 1e7) == pytest.approx(0.05, abs=1e-6)  # ~ normal
    for t, df in [(0.3, 4), (2.5, 30), (4.0, 200)]:
        # closed form for df = 2 checks the incomplete beta independently: P(|T|>t) = 1 - t / sqrt(2 + t^2)
        assert t_sf_two_sided(t, 2) == pytest.approx(1 - t / math.sqrt(2 + t * t), abs=1e-12)
        assert 0 < t_sf_two_sided(t, df) < 1
    d = np.array([0.1, 0.3, -0.05, 0.2, 0.15, 0.05])
    n = d.size
    t = d.mean() / (d.std(ddof=1) / math.sqrt(n))
    assert ttest_pvalue(d) == pytest.approx(t_sf_two_sided(t, n - 1), rel=1e-7)


def test_series_alignment_and_errors():
    idx = [f"q{i}" for i in range(50)]
    a, b = systems(seed=8, n=50, shift=0.05)
    sa = pd.Series(a, index=idx)
    sb = pd.Series(b, index=idx)[::-1]  # same queries, different order
    r = paired_comparison(sa, sb, n_boot=500)
    assert r.delta == pytest.approx(float(np.mean(b - a)))
    with pytest.raises(ValueError):
        paired_comparison(sa, pd.Series(b, index=[f"x{i}" for i in range(50)]))
    with pytest.raises(ValueError):
        paired_comparison(a, b[:10])
    with pytest.raises(ValueError):
        paired_comparison(a, b, test="wilcoxon")


def test_randomization_pvalue_bounds():
    d = np.full(20, 0.5)  # all differences positive: only the all-plus / all-minus flips are as extreme
    p = randomization_pvalue(d, n_perm=5000, seed=1)
    assert p == pytest.approx(1 / 5001, abs=3 / 5001)


@pytest.mark.parametrize("n_perm", [1, 99, 2000])
def test_randomization_pvalue_never_below_one_over_n_plus_one(n_perm):
    """The observed assignment counts as one of the resamples: p >= 1 / (n_perm + 1), never 0, and exactly that
    floor when no resample can be as extreme (40 equal positive differences: chance 2^-39 per resample)."""
    rng = np.random.default_rng(n_perm)
    for d in (np.full(40, 0.3), rng.normal(5.0, 0.1, 200), rng.normal(0, 1, 50), np.array([1e-9])):
        p = randomization_pvalue(d, n_perm=n_perm, seed=2)
        assert 1 / (n_perm + 1) <= p <= 1.0
    assert randomization_pvalue(np.full(40, 0.3), n_perm=n_perm, seed=2) == 1 / (n_perm + 1)
    r = paired_comparison(np.zeros(40), np.full(40, 0.3), n_boot=50, n_perm=n_perm)
    assert r.p_value == 1 / (n_perm + 1)


@pytest.mark.parametrize("confidence,z", [(0.95, 1.959963985), (0.90, 1.644853627)])
def test_bootstrap_interval_matches_normal_approximation(confidence, z):
    """On a large sample the paired percentile bootstrap interval of the mean difference is mean(d) +- z sd(d)/sqrt(n):
    its width pins the confidence level (a 90% interval is 16% narrower than a 95% one) and the pairing (the spread
    of the systems' own scores, here 12x that of their differences, must not enter)."""
    rng = np.random.default_rng(5)
    n = 4000
    a = rng.uniform(0, 1, n)
    d = rng.normal(0.01, 0.025, n)
    b = a + d
    r = paired_comparison(a, b, n_boot=4000, confidence=confidence, seed=3)
    half = z * d.std(ddof=1) / np.sqrt(n)
    assert r.confidence == confidence
    assert (r.ci_high - r.ci_low) == pytest.approx(2 * half, rel=0.05)
    assert (r.ci_low + r.ci_high) / 2 == pytest.approx(d.mean(), abs=0.1 * half)


def test_compare_runs_table():
    idx = pd.Index([f"q{i}" for i in range(100)], name="qid")
    a, b = systems(seed=9, n=100, shift=0.1)
    da = pd.DataFrame({"nDCG@10": a, "P@1": a, "num_rel": 1}, index=idx)
    db = pd.DataFrame({"nDCG@10": b, "P@1": a, "num_rel": 1}, index=idx)
    table = compare_runs(da, db, n_boot=500)
    assert list(table.index) == ["nDCG@10", "P@1"]
    assert table.loc["P@1", "p_value"] == pytest.approx(1.0) and table.loc["nDCG@10", "p_value"] < 0.01
