"""medquant.eval.stats: paired t, randomization and bootstrap tests, each with its own dual interval; Holm."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from scipy import stats as sps

from medquant.eval.stats import (
    TESTS, PairedComparison, compare_runs, holm_adjust, paired_comparison, randomization_pvalue, t_sf_two_sided,
    ttest_pvalue,
)


def systems(seed=0, n=400, shift=0.0, noise=0.15):
    rng = np.random.default_rng(seed)
    a = rng.uniform(0, 1, size=n)
    b = np.clip(a + shift + noise * rng.normal(size=n), 0, 1)
    return a, b


@pytest.mark.parametrize("test", TESTS)
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


@pytest.mark.parametrize("test", TESTS)
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


@pytest.mark.parametrize("test", ["randomization", "bootstrap"])
def test_seeds_are_reproducible(test):
    a, b = systems(seed=3, shift=0.01)
    r1 = paired_comparison(a, b, n_boot=2000, seed=5, test=test)
    r2 = paired_comparison(a, b, n_boot=2000, seed=5, test=test)
    r3 = paired_comparison(a, b, n_boot=2000, seed=6, test=test)
    assert r1 == r2
    assert (r1.ci_low, r1.ci_high, r1.p_value) != (r3.ci_low, r3.ci_high, r3.p_value)
    t1, t2 = (paired_comparison(a, b, seed=s) for s in (5, 6))  # the default t-test does not resample
    assert t1.test == "ttest" and (t1.ci_low, t1.ci_high, t1.p_value) == (t2.ci_low, t2.ci_high, t2.p_value)


def test_randomization_agrees_with_ttest_on_moderate_effect():
    rng = np.random.default_rng(4)
    a = rng.uniform(size=300)
    d = rng.normal(0, 0.15, size=300)
    b = a + d - d.mean() + 0.02  # mean difference exactly 0.02, t about 2.3
    p_rand = paired_comparison(a, b, n_boot=20000, test="randomization").p_value
    p_t = paired_comparison(a, b, n_boot=100, test="ttest").p_value
    assert 0.001 < p_t < 0.5
    assert abs(p_rand - p_t) < 0.02


def test_student_t_tail():
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
    r = paired_comparison(np.zeros(40), np.full(40, 0.3), n_boot=50, n_perm=n_perm, test="randomization")
    assert r.p_value == 1 / (n_perm + 1) and r.n_perm == n_perm


@pytest.mark.parametrize("test", TESTS)
@pytest.mark.parametrize("confidence,z", [(0.95, 1.959963985), (0.90, 1.644853627)])
def test_bootstrap_interval_matches_normal_approximation(confidence, z, test):
    """On a large sample every test's paired interval of the mean difference is mean(d) +- z sd(d)/sqrt(n):
    its width pins the confidence level (a 90% interval is 16% narrower than a 95% one) and the pairing (the spread
    of the systems' own scores, here 12x that of their differences, must not enter)."""
    rng = np.random.default_rng(5)
    n = 4000
    a = rng.uniform(0, 1, n)
    d = rng.normal(0.01, 0.025, n)
    b = a + d
    r = paired_comparison(a, b, n_boot=4000, confidence=confidence, seed=3, test=test)
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


def test_ttest_is_scipys():
    """p from scipy.stats.ttest_rel, interval mean(d) +- t_{1-alpha/2, n-1} sd(d) / sqrt(n) by hand."""
    a, b = systems(seed=21, n=60, shift=0.02)
    d = b - a
    for confidence in (0.95, 0.8):
        r = paired_comparison(a, b, confidence=confidence)
        assert r.test == "ttest" and r.n_boot == 0 and r.n_perm == 0
        assert r.p_value == pytest.approx(sps.ttest_rel(b, a).pvalue, rel=1e-12)
        half = sps.t.ppf(0.5 + confidence / 2, d.size - 1) * d.std(ddof=1) / math.sqrt(d.size)
        assert (r.ci_low, r.ci_high) == pytest.approx((d.mean() - half, d.mean() + half), rel=1e-10)
    assert math.isnan(paired_comparison([0.5], [0.7]).p_value)  # one query: no t-test
    const = paired_comparison(np.zeros(10), np.full(10, 0.25))  # sd 0: degenerate interval, certain difference
    assert (const.ci_low, const.ci_high, const.p_value) == (0.25, 0.25, 0.0)


def _t_at(q, factor, n=50, seed=0):
    """Differences whose t statistic is ``factor`` t_{1-q/2, n-1} (factor 1: two-sided p = q)."""
    d = np.random.default_rng(seed).normal(size=n)
    d = (d - d.mean()) / d.std(ddof=1)  # mean 0, sd 1: t = shift * sqrt(n)
    return d + factor * sps.t.ppf(1 - q / 2, n - 1) / math.sqrt(n)


@pytest.mark.parametrize("alpha", [0.05, 0.01])
def test_ttest_interval_excludes_zero_iff_p_below_alpha(alpha):
    """Right at the boundary (t = t_crit * (1 +- 1e-6)) and on random samples: 0 outside the (1 - alpha) interval
    exactly when p < alpha."""
    cases = [_t_at(alpha, f) for f in (1 - 1e-6, 1 + 1e-6, -(1 - 1e-6), -(1 + 1e-6))]
    rng = np.random.default_rng(1)
    cases += [rng.normal(rng.normal(0, 0.1), 0.3, int(rng.integers(2, 80))) for _ in range(300)]
    seen = set()
    for d in cases:
        r = paired_comparison(np.zeros(d.size), d, confidence=1 - alpha)
        excludes = not r.ci_low <= 0.0 <= r.ci_high
        assert excludes == (r.p_value < alpha) == r.significant(alpha)
        seen.add(excludes)
    assert seen == {True, False}
    near = [paired_comparison(np.zeros(50), _t_at(alpha, f), confidence=1 - alpha) for f in (1 - 1e-6, 1 + 1e-6)]
    assert near[0].ci_low < 0 < near[1].ci_low and near[0].p_value > alpha > near[1].p_value


@pytest.mark.parametrize("test", ["randomization", "bootstrap"])
def test_resampling_interval_excludes_zero_iff_p_below_alpha(test):
    rng = np.random.default_rng(2)
    seen = set()
    for i in range(200):
        n = int(rng.integers(2, 60))
        d = rng.normal(rng.normal(0, 0.08), 0.25, n)
        if i % 4 == 0:
            d = np.round(d, 1)  # ties and zeros, as in per-query metrics
        r = paired_comparison(np.zeros(n), d, n_boot=int(rng.integers(20, 400)), seed=i, test=test, confidence=0.9)
        excludes = not r.ci_low <= 0.0 <= r.ci_high
        assert excludes == (r.p_value < 0.1), (i, r)
        seen.add(excludes)
    assert seen == {True, False}


def test_randomization_interval_inverts_the_test():
    """Just inside each end of the interval the sign-flip test of d - delta0 (same flips) gives p >= alpha, just
    outside p < alpha."""
    d = np.random.default_rng(3).normal(0.05, 0.2, 30)
    r = paired_comparison(np.zeros(30), d, n_perm=999, seed=4, test="randomization")
    alpha, eps = 0.05, 1e-9
    for end, inward in ((r.ci_low, eps), (r.ci_high, -eps)):
        assert randomization_pvalue(d - (end + inward), n_perm=999, seed=4) >= alpha
        assert randomization_pvalue(d - (end - inward), n_perm=999, seed=4) < alpha
    assert r.p_value == randomization_pvalue(d, n_perm=999, seed=4)


def test_holm_hand_computed():
    # sorted 0.005, 0.01, 0.03, 0.04 -> 4 * 0.005, 3 * 0.01, 2 * 0.03, max(1 * 0.04, 0.06)
    assert holm_adjust([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # capped at 1; NaN is not a member of the family (m = 2)
    out = holm_adjust([0.5, float("nan"), 0.2, ])
    assert out[0] == pytest.approx(0.5) and math.isnan(out[1]) and out[2] == pytest.approx(0.4)
    assert holm_adjust([0.02, 0.02]) == pytest.approx([0.04, 0.04])
    assert holm_adjust([0.3, 0.6, 0.9]) == pytest.approx([0.9, 1.0, 1.0])
    assert holm_adjust([0.07]) == pytest.approx([0.07])  # one test: unchanged
    s = holm_adjust(pd.Series([0.01, 0.02], index=["int8", "bf16"], name="p"))
    assert list(s.index) == ["int8", "bf16"] and s.name == "p" and list(s) == pytest.approx([0.02, 0.02])
    with pytest.raises(ValueError):
        holm_adjust([0.5, 1.5])
