"""Paired significance testing of per-query metric differences between two systems.

Every test returns a confidence interval and a p-value *of the same kind*, dual to each other: the interval holds
exactly the shifts ``delta0`` that the test does not reject at level ``alpha = 1 - confidence``, so the interval
excludes 0 if and only if ``p < alpha`` (up to floating-point rounding at the boundary).

``test="ttest"`` (the default)
    Paired Student t-test (:func:`scipy.stats.ttest_rel`) and its t interval ``mean(d) +- t_{1-alpha/2, n-1}
    sd(d) / sqrt(n)``. It is the default because it is deterministic (no seed, no resampling floor on the p-value,
    which matters once p-values are multiplied by a multiple-comparison correction), cheap, and on per-query IR
    metrics with hundreds of queries its error rates are as good as those of the randomization test (Urbano,
    Lima and Hanjalic, SIGIR 2019, "Statistical significance testing in information retrieval: an empirical
    analysis of type I, type II and type III errors").
``test="randomization"``
    Paired randomization (sign-flip) test of ``mean(d) == 0``; the interval inverts the same test over the same
    sign flips (a shift ``delta0`` is in it iff the sign-flip test of ``d - delta0`` gives ``p >= alpha``; computed
    in closed form). The p-value is never below ``1 / (n_perm + 1)``.
``test="bootstrap"``
    Paired percentile bootstrap (queries resampled with replacement); the p-value is the one that inverts the
    percentile interval over the same resamples: ``min(1, 2 (1 + #{resampled means on the far side of 0}) /
    (n_boot + 1))``.

:func:`holm_adjust` corrects the p-values of several systems compared with one baseline (Holm-Bonferroni).
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd

from ..model.limits import finite_float, positive_int, positive_int_or_none
from ..model.limits import seed as check_seed

ArrayLike = Union[pd.Series, np.ndarray, Sequence[float]]

#: The tests of :func:`paired_comparison`; the first is the default.
TESTS: Tuple[str, ...] = ("ttest", "randomization", "bootstrap")
DEFAULT_TEST = TESTS[0]

_CHUNK_ELEMS = 1 << 22  # resampling matrices are processed in chunks of about 4M entries


@dataclasses.dataclass(frozen=True)
class PairedComparison:
    """Result of :func:`paired_comparison` (system ``a`` = baseline, ``b`` = candidate).

    Attributes
    ----------
    n : int
        Number of paired observations (queries).
    mean_a, mean_b : float
    delta : float
        ``mean_b - mean_a``.
    rel_delta : float
        ``delta / mean_a`` (NaN when ``mean_a == 0``).
    ci_low, ci_high : float
        Confidence interval of ``delta`` from the same test as ``p_value`` (see the module docstring).
    p_value : float
        Two-sided p-value of ``delta == 0``.
    test : str
        ``"ttest"``, ``"randomization"`` or ``"bootstrap"``.
    n_boot : int
        Bootstrap resamples (0 unless ``test="bootstrap"``).
    n_perm : int
        Sign-flip resamples (0 unless ``test="randomization"``).
    confidence : float
        Confidence level of the interval.
    seed : int
    """

    n: int
    mean_a: float
    mean_b: float
    delta: float
    rel_delta: float
    ci_low: float
    ci_high: float
    p_value: float
    test: str
    n_boot: int
    n_perm: int
    confidence: float
    seed: int

    def significant(self, alpha: float = 0.05) -> bool:
        """Whether ``p_value < alpha`` (for ``alpha = 1 - confidence``: iff the interval excludes 0)."""
        return self.p_value < alpha

    def to_dict(self) -> Dict[str, Any]:
        """Fields as a plain dict."""
        return dataclasses.asdict(self)


def _paired_arrays(a: ArrayLike, b: ArrayLike) -> Tuple[np.ndarray, np.ndarray]:
    if isinstance(a, pd.Series) and isinstance(b, pd.Series):
        if not a.index.equals(b.index):
            if set(a.index) != set(b.index) or a.index.has_duplicates or b.index.has_duplicates:
                raise ValueError("a and b are Series over different query ids; align them first")
            b = b.reindex(a.index)
    x = np.asarray(a, dtype=np.float64).ravel()
    y = np.asarray(b, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"a and b must have the same length ({x.size} != {y.size})")
    if x.size == 0:
        raise ValueError("need at least one paired observation")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("a and b must be finite")
    return x, y


def _needed(x: float) -> int:
    """Smallest integer ``c`` with ``c >= x`` (rounded to 1e-9 first, so 100.00000000000001 counts as 100)."""
    return int(math.ceil(round(x, 9)))


# ---------------------------------------------------------------------------------------------------- t-test
def ttest(d: np.ndarray, confidence: float = 0.95) -> Tuple[float, float, float]:
    """Paired t-test of ``mean(d) == 0`` and the t confidence interval of ``mean(d)`` (scipy).

    Parameters
    ----------
    d : numpy.ndarray
        Paired differences (candidate - baseline).
    confidence : float

    Returns
    -------
    (low, high, p) : tuple of float
        Constant differences give the degenerate interval ``[c, c]`` with p = 1 if ``c == 0`` else 0; fewer than
        two observations give NaNs.
    """
    from scipy import stats as sps

    d = np.asarray(d, dtype=np.float64).ravel()
    if d.size < 2:
        return float("nan"), float("nan"), float("nan")
    if np.ptp(d) == 0.0:  # sd = 0: t is 0/0 or +-inf
        c = float(d[0])
        return c, c, 1.0 if c == 0.0 else 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "precision loss" on nearly constant differences
        res = sps.ttest_rel(d, np.zeros_like(d))
        ci = res.confidence_interval(confidence_level=confidence)
    return float(ci.low), float(ci.high), float(res.pvalue)


def ttest_pvalue(d: np.ndarray) -> float:
    """Two-sided paired t-test p-value of ``mean(d) == 0`` (:func:`scipy.stats.ttest_rel`).

    Parameters
    ----------
    d : numpy.ndarray

    Returns
    -------
    float
        1.0 when all differences are zero; NaN for fewer than 2 observations.
    """
    return ttest(d)[2]


def t_sf_two_sided(t: float, df: float) -> float:
    """Two-sided tail probability ``P(|T| >= |t|)`` of Student's t with ``df`` degrees of freedom (scipy).

    Parameters
    ----------
    t : float
    df : float

    Returns
    -------
    float
    """
    from scipy import stats as sps

    if math.isnan(t):
        return float("nan")
    return float(min(1.0, 2.0 * sps.t.sf(abs(t), df)))


# ---------------------------------------------------------------------------------------------------- bootstrap
def _bootstrap_means(d: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    n = d.size
    rng = np.random.default_rng(seed)
    means = np.empty(int(n_boot), dtype=np.float64)
    rows = max(1, _CHUNK_ELEMS // max(n, 1))
    for s in range(0, int(n_boot), rows):
        m = min(rows, int(n_boot) - s)
        idx = rng.integers(0, n, size=(m, n))
        means[s:s + m] = d[idx].mean(axis=1)
    return means


def bootstrap(d: np.ndarray, n_boot: int = 10000, seed: int = 0, confidence: float = 0.95
              ) -> Tuple[float, float, float]:
    """Paired percentile bootstrap interval of ``mean(d)`` and the p-value that inverts it (same resamples).

    With ``B = n_boot`` resampled means sorted, ``k = ceil(alpha (B + 1) / 2 - 1)``: the interval is the k-th
    smallest to the k-th largest mean, and ``p = min(1, 2 (1 + min(#{means <= 0}, #{means >= 0})) / (B + 1))``,
    so the interval excludes 0 iff ``p < alpha``. Too few resamples for the level (``k < 1``) give an infinite
    interval.

    Parameters
    ----------
    d : numpy.ndarray
        Paired differences.
    n_boot : int
    seed : int
    confidence : float

    Returns
    -------
    (low, high, p) : tuple of float
    """
    d = np.asarray(d, dtype=np.float64).ravel()
    means = np.sort(_bootstrap_means(d, n_boot, seed))
    b = means.size
    k = _needed((1.0 - confidence) * (b + 1) / 2 - 1)
    lo, hi = (float(means[k - 1]), float(means[b - k])) if k >= 1 else (-math.inf, math.inf)
    far = min(int(np.count_nonzero(means <= 0.0)), int(np.count_nonzero(means >= 0.0)))
    return lo, hi, min(1.0, 2.0 * (1 + far) / (b + 1))


def bootstrap_ci(d: np.ndarray, n_boot: int = 10000, seed: int = 0, confidence: float = 0.95
                 ) -> Tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean of ``d`` (queries resampled with replacement); the
    interval of :func:`bootstrap`.

    Returns
    -------
    (low, high) : tuple of float
    """
    return bootstrap(d, n_boot, seed, confidence)[:2]


# ---------------------------------------------------------------------------------------------------- randomization
def _sign_flip_sums(d: np.ndarray, n_perm: int, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """For ``n_perm`` random sign vectors ``s``: ``s @ d`` and ``s @ 1`` (the sum of the signs)."""
    n = d.size
    rng = np.random.default_rng(seed)
    sums = np.empty(int(n_perm), dtype=np.float64)
    signs_total = np.empty(int(n_perm), dtype=np.float64)
    rows = max(1, _CHUNK_ELEMS // max(n, 1))
    for s in range(0, int(n_perm), rows):
        m = min(rows, int(n_perm) - s)
        signs = rng.integers(0, 2, size=(m, n), dtype=np.int8).astype(np.float64) * 2.0 - 1.0
        sums[s:s + m] = signs @ d
        signs_total[s:s + m] = signs.sum(axis=1)
    return sums, signs_total


def _flip_pvalue(d: np.ndarray, sums: np.ndarray) -> float:
    obs = abs(d.mean())
    tol = 1e-12 * max(1.0, float(np.abs(d).mean()))
    count = int(np.count_nonzero(np.abs(sums) / d.size >= obs - tol))
    return (count + 1) / (sums.size + 1)


def randomization(d: np.ndarray, n_perm: int = 10000, seed: int = 0, confidence: float = 0.95
                  ) -> Tuple[float, float, float]:
    """Paired randomization (sign-flip) test of ``mean(d) == 0`` and the interval that inverts it.

    The p-value is that of :func:`randomization_pvalue`. The interval holds every ``delta0`` for which the same
    sign flips applied to ``d - delta0`` give ``p >= alpha``. For one sign vector ``s`` (sum ``S``) the flipped mean
    of ``d - delta0`` is at least as extreme as the observed one iff ``u = delta0 - mean(d)`` lies between the roots
    ``b / (S + n)`` and ``b / (S - n)``, ``b = s @ (d - mean(d))`` (the whole line if ``|S| = n``; each root is
    widened by ``1e-12 sum(|d - mean(d)|)`` so that ties count as extreme, as in the p-value), so the interval
    is ``mean(d)`` plus the k-th smallest lower root to the k-th largest upper root, ``k = ceil(alpha (n_perm + 1)
    - 1)`` (infinite if ``k < 1``).

    Parameters
    ----------
    d : numpy.ndarray
    n_perm : int
    seed : int
    confidence : float

    Returns
    -------
    (low, high, p) : tuple of float
    """
    d = np.asarray(d, dtype=np.float64).ravel()
    n, mean = d.size, float(d.mean())
    sums, total = _sign_flip_sums(d, n_perm, seed)
    p = _flip_pvalue(d, sums)
    k = _needed((1.0 - confidence) * (sums.size + 1) - 1)
    if k < 1:
        return -math.inf, math.inf, p
    spread = float(np.abs(d - mean).sum())
    b = sums - mean * total if spread > 0 else np.zeros_like(sums)  # constant d: b is exactly 0
    whole = np.abs(total) >= n
    with np.errstate(divide="ignore", invalid="ignore"):
        r1, r2 = b / (total + n), b / (total - n)
    # widened by the rounding error of the sums, so that a tie counts as extreme here as in the p-value
    eps = 1e-12 * spread
    lower = np.where(whole, -math.inf, np.minimum(r1, r2) - eps)
    upper = np.where(whole, math.inf, np.maximum(r1, r2) + eps)
    # k <= n_perm since alpha < 1; the k-th smallest lower / k-th largest upper root
    return mean + float(np.sort(lower)[k - 1]), mean + float(np.sort(upper)[upper.size - k]), p


def randomization_pvalue(d: np.ndarray, n_perm: int = 10000, seed: int = 0) -> float:
    """Two-sided paired randomization (sign-flip) test of ``mean(d) == 0``.

    Each resample flips the sign of every difference independently with probability 1/2; the p-value is
    ``(1 + #{|mean(resample)| >= |mean(d)|}) / (1 + n_perm)`` (comparison with a 1e-12 relative tolerance, so
    all-zero differences give exactly 1).

    Parameters
    ----------
    d : numpy.ndarray
    n_perm : int
    seed : int

    Returns
    -------
    float
    """
    d = np.asarray(d, dtype=np.float64).ravel()
    return _flip_pvalue(d, _sign_flip_sums(d, n_perm, seed)[0])


# ---------------------------------------------------------------------------------------------------- multiple tests
def holm_adjust(p_values: ArrayLike) -> Union[np.ndarray, pd.Series]:
    """Holm-Bonferroni adjusted p-values of a family of tests (e.g. several systems against one baseline).

    With the ``m`` p-values sorted ascending, ``p_(1) <= ... <= p_(m)``, the adjusted value of ``p_(i)`` is
    ``max_{j <= i} min(1, (m - j + 1) p_(j))``; rejecting where the adjusted p-value is below ``alpha`` controls the
    family-wise error rate at ``alpha``. NaNs are left out of the family and stay NaN.

    Parameters
    ----------
    p_values : array-like or pandas.Series

    Returns
    -------
    numpy.ndarray, or a pandas.Series with the same index when given one
    """
    p = np.asarray(p_values, dtype=np.float64).ravel()
    ok = ~np.isnan(p)
    if ((p[ok] < 0) | (p[ok] > 1)).any():
        raise ValueError("p-values must lie in [0, 1]")
    out = np.full(p.shape, np.nan)
    vals = p[ok]
    order = np.argsort(vals, kind="stable")
    m = vals.size
    adjusted = np.empty(m)
    adjusted[order] = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * vals[order]))
    out[ok] = adjusted
    return pd.Series(out, index=p_values.index, name=p_values.name) if isinstance(p_values, pd.Series) else out


# ---------------------------------------------------------------------------------------------------- paired comparison
def paired_comparison(a: ArrayLike, b: ArrayLike, n_boot: int = 10000, seed: int = 0, test: str = DEFAULT_TEST,
                      n_perm: Optional[int] = None, confidence: float = 0.95) -> PairedComparison:
    """Compare two systems' per-query scores (``b`` against baseline ``a``).

    Parameters
    ----------
    a, b : pandas.Series or array-like
        Per-query values of the same metric, paired by position (two Series are aligned on their index).
    n_boot : int
        Bootstrap resamples (``test="bootstrap"``).
    seed : int
        Seeds the resampling tests.
    test : {"ttest", "randomization", "bootstrap"}
        Source of both the interval and the p-value (see the module docstring; default ``"ttest"``).
    n_perm : int, optional
        Sign-flip resamples (``test="randomization"``; default ``n_boot``).
    confidence : float
        Confidence level of the interval; it excludes 0 iff ``p < 1 - confidence``.

    Returns
    -------
    PairedComparison
    """
    x, y = _paired_arrays(a, b)
    if test not in TESTS:
        raise ValueError(f"test must be one of {', '.join(map(repr, TESTS))}, got {test!r}")
    positive_int(n_boot, "n_boot")
    positive_int_or_none(n_perm, "n_perm")
    seed = check_seed(seed)
    finite_float(confidence, "confidence", 0.0, 1.0, low_open=True, high_open=True)
    d = y - x
    mean_a, mean_b = float(x.mean()), float(y.mean())
    delta = float(d.mean())
    boots = perms = 0
    if test == "ttest":
        lo, hi, p = ttest(d, confidence)
    elif test == "bootstrap":
        boots = int(n_boot)
        lo, hi, p = bootstrap(d, boots, seed, confidence)
    else:
        perms = int(n_perm if n_perm is not None else n_boot)
        lo, hi, p = randomization(d, perms, seed, confidence)
    return PairedComparison(n=int(d.size), mean_a=mean_a, mean_b=mean_b, delta=delta,
                            rel_delta=delta / mean_a if mean_a != 0 else float("nan"), ci_low=lo, ci_high=hi,
                            p_value=float(p), test=test, n_boot=boots, n_perm=perms, confidence=float(confidence),
                            seed=int(seed))


def compare_runs(per_query_a: pd.DataFrame, per_query_b: pd.DataFrame, metrics: Optional[Sequence[str]] = None,
                 **kwargs: Any) -> pd.DataFrame:
    """:func:`paired_comparison` for several metric columns of two per-query tables.

    Parameters
    ----------
    per_query_a, per_query_b : pandas.DataFrame
        :func:`medquant.eval.metrics.evaluate_run` outputs over the same query ids.
    metrics : sequence of str, optional
        Columns to compare (default: every ``<metric>@<k>`` column present in both).
    **kwargs
        Passed to :func:`paired_comparison`.

    Returns
    -------
    pandas.DataFrame
        One row per metric with the :class:`PairedComparison` fields.
    """
    if metrics is None:
        metrics = [c for c in per_query_a.columns if "@" in str(c) and c in per_query_b.columns]
    rows = {m: paired_comparison(per_query_a[m], per_query_b[m], **kwargs).to_dict() for m in metrics}
    return pd.DataFrame.from_dict(rows, orient="index")


__all__ = [
    "DEFAULT_TEST", "PairedComparison", "TESTS", "bootstrap", "bootstrap_ci", "compare_runs", "holm_adjust",
    "paired_comparison", "randomization", "randomization_pvalue", "t_sf_two_sided", "ttest", "ttest_pvalue",
]
