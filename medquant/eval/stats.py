"""Paired significance testing of per-query metric differences between two systems.

The default test is a two-sided paired randomization (sign-flip) test and the confidence interval is a paired
percentile bootstrap, so nothing beyond numpy is needed; ``test="ttest"`` uses scipy when installed and a
self-contained Student-t tail (regularised incomplete beta) otherwise.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd

from ..model.limits import finite_float, positive_int, positive_int_or_none
from ..model.limits import seed as check_seed

ArrayLike = Union[pd.Series, np.ndarray, Sequence[float]]

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
        Paired percentile-bootstrap confidence interval of ``delta``.
    p_value : float
        Two-sided p-value of the chosen test.
    test : str
        ``"randomization"`` or ``"ttest"``.
    n_boot : int
    n_perm : int
        Sign-flip resamples (0 for the t-test).
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
        """Whether ``p_value < alpha``."""
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


def bootstrap_ci(d: np.ndarray, n_boot: int = 10000, seed: int = 0, confidence: float = 0.95
                 ) -> Tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean of ``d`` (queries resampled with replacement).

    Parameters
    ----------
    d : numpy.ndarray
        Paired differences.
    n_boot : int
    seed : int
    confidence : float

    Returns
    -------
    (low, high) : tuple of float
    """
    d = np.asarray(d, dtype=np.float64)
    n = d.size
    rng = np.random.default_rng(seed)
    means = np.empty(int(n_boot), dtype=np.float64)
    rows = max(1, _CHUNK_ELEMS // max(n, 1))
    for s in range(0, int(n_boot), rows):
        m = min(rows, int(n_boot) - s)
        idx = rng.integers(0, n, size=(m, n))
        means[s:s + m] = d[idx].mean(axis=1)
    alpha = 1.0 - confidence
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


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
    d = np.asarray(d, dtype=np.float64)
    n = d.size
    obs = abs(d.mean())
    tol = 1e-12 * max(1.0, float(np.abs(d).mean()))
    rng = np.random.default_rng(seed)
    count = 0
    rows = max(1, _CHUNK_ELEMS // max(n, 1))
    for s in range(0, int(n_perm), rows):
        m = min(rows, int(n_perm) - s)
        signs = rng.integers(0, 2, size=(m, n), dtype=np.int8).astype(np.float64) * 2.0 - 1.0
        stats = np.abs(signs @ d) / n
        count += int(np.count_nonzero(stats >= obs - tol))
    return (count + 1) / (int(n_perm) + 1)


def _betainc_reg(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b) by its continued fraction (modified Lentz)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x > (a + 1.0) / (a + b + 2.0):
        return 1.0 - _betainc_reg(b, a, 1.0 - x)
    log_front = a * math.log(x) + b * math.log1p(-x) - math.log(a) - (math.lgamma(a) + math.lgamma(b)
                                                                        - math.lgamma(a + b))
    tiny = 1e-300
    f, c, dd = 1.0, 1.0, 0.0
    for i in range(0, 400):
        m = i // 2
        if i == 0:
            num = 1.0
        elif i % 2 == 0:
            num = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        else:
            num = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        dd = 1.0 + num * dd
        dd = tiny if abs(dd) < tiny else dd
        dd = 1.0 / dd
        c = 1.0 + num / c
        c = tiny if abs(c) < tiny else c
        f *= c * dd
        if abs(1.0 - c * dd) < 1e-15:
            break
    return math.exp(log_front) * (f - 1.0)


def t_sf_two_sided(t: float, df: float) -> float:
    """Two-sided tail probability ``P(|T| >= |t|)`` of Student's t with ``df`` degrees of freedom.

    Parameters
    ----------
    t : float
    df : float

    Returns
    -------
    float
    """
    if math.isnan(t):
        return float("nan")
    if math.isinf(t):
        return 0.0
    return min(1.0, max(0.0, _betainc_reg(df / 2.0, 0.5, df / (df + t * t))))


def ttest_pvalue(d: np.ndarray) -> float:
    """Two-sided paired t-test p-value of ``mean(d) == 0`` (scipy if installed, else :func:`t_sf_two_sided`).

    Parameters
    ----------
    d : numpy.ndarray

    Returns
    -------
    float
        1.0 when all differences are equal to zero; NaN for fewer than 2 observations.
    """
    d = np.asarray(d, dtype=np.float64)
    n = d.size
    if n < 2:
        return float("nan")
    sd = float(d.std(ddof=1))
    mean = float(d.mean())
    if sd == 0.0:
        return 1.0 if mean == 0.0 else 0.0
    t = mean / (sd / math.sqrt(n))
    try:
        from scipy import stats as _sps  # optional
    except ImportError:
        return t_sf_two_sided(t, n - 1)
    return float(2.0 * _sps.t.sf(abs(t), n - 1))


def paired_comparison(a: ArrayLike, b: ArrayLike, n_boot: int = 10000, seed: int = 0, test: str = "randomization",
                      n_perm: Optional[int] = None, confidence: float = 0.95) -> PairedComparison:
    """Compare two systems' per-query scores (``b`` against baseline ``a``).

    Parameters
    ----------
    a, b : pandas.Series or array-like
        Per-query values of the same metric, paired by position (two Series are aligned on their index).
    n_boot : int
        Bootstrap resamples for the confidence interval of ``delta``.
    seed : int
        Seeds the bootstrap (``seed``) and the randomization test (``seed + 1``).
    test : {"randomization", "ttest"}
    n_perm : int, optional
        Sign-flip resamples (default ``n_boot``).
    confidence : float
        Confidence level of the interval.

    Returns
    -------
    PairedComparison
    """
    x, y = _paired_arrays(a, b)
    if test not in ("randomization", "ttest"):
        raise ValueError("test must be 'randomization' or 'ttest'")
    positive_int(n_boot, "n_boot")
    positive_int_or_none(n_perm, "n_perm")
    seed = check_seed(seed)
    finite_float(confidence, "confidence", 0.0, 1.0, low_open=True, high_open=True)
    d = y - x
    mean_a, mean_b = float(x.mean()), float(y.mean())
    delta = float(d.mean())
    rel = delta / mean_a if mean_a != 0 else float("nan")
    lo, hi = bootstrap_ci(d, n_boot=n_boot, seed=seed, confidence=confidence)
    if test == "randomization":
        perms = int(n_perm if n_perm is not None else n_boot)
        p = randomization_pvalue(d, n_perm=perms, seed=seed + 1)
    else:
        perms = 0
        p = ttest_pvalue(d)
    return PairedComparison(n=int(d.size), mean_a=mean_a, mean_b=mean_b, delta=delta, rel_delta=rel, ci_low=lo,
                            ci_high=hi, p_value=float(p), test=test, n_boot=int(n_boot), n_perm=perms,
                            confidence=float(confidence), seed=int(seed))


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
    "PairedComparison", "bootstrap_ci", "compare_runs", "paired_comparison", "randomization_pvalue",
    "t_sf_two_sided", "ttest_pvalue",
]
