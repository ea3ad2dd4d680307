"""Calibration observers (C core) on synthetic data with known distributions."""
from __future__ import annotations

import numpy as np
import pytest

from medquant import _core

RNG = np.random.default_rng(11)


def qmse(x, lo, hi, symmetric):
    """Squared error of quantizing x to the u8 grid chosen for [lo, hi] (medquant's conventions)."""
    scale, zp = _core.qparams(lo, hi, symmetric)
    q = np.clip(np.rint(x / scale) + zp, 0, 255)
    return float(np.mean((x - (q - zp) * scale) ** 2))


def observed(x, nbins=2048, momentum=0.0, chunks=1):
    obs = _core.Observer(nbins, momentum)
    for part in np.array_split(x.astype(np.float32), chunks):
        obs.update(np.ascontiguousarray(part))
    return obs


def test_minmax_and_moving_average_exact():
    x = RNG.standard_normal(10_000).astype(np.float32) * 3
    obs = observed(x, chunks=5)
    assert obs.minmax() == (x.min(), x.max())
    assert obs.count() == x.size
    mov = observed(x, momentum=0.9, chunks=5)
    lo = hi = None
    for part in np.array_split(x, 5):
        lo = part.min() if lo is None else 0.9 * lo + 0.1 * part.min()
        hi = part.max() if hi is None else 0.9 * hi + 0.1 * part.max()
    assert np.allclose(mov.moving_minmax(), (lo, hi), rtol=1e-5)
    assert observed(x, momentum=0.0, chunks=5).moving_minmax() == obs.minmax()


def test_histogram_counts_everything_and_column_absmax():
    x = RNG.standard_normal((300, 40)).astype(np.float32)
    x[:, 7] *= 50
    obs = _core.Observer(512, 0.0)
    obs.update(x[:100])
    obs.update(np.ascontiguousarray(x[100:] * 4))  # range growth re-bins without losing counts
    counts, lo, hi = obs.histogram()
    assert counts.sum() == x.size and lo <= -np.abs(x[100:] * 4).max() and hi >= np.abs(x[100:] * 4).max()
    expect = np.maximum(np.abs(x[:100]).max(0), np.abs(x[100:] * 4).max(0))
    assert np.array_equal(obs.column_absmax(), expect)
    assert obs.column_absmax().argmax() == 7


def test_percentile_clips_a_planted_outlier():
    x = np.append(RNG.standard_normal(100_000), 1000.0).astype(np.float32)
    obs = observed(x)
    assert obs.compute_range(_core.RANGE_MINMAX, 0, False, 256)[1] == pytest.approx(1000.0)
    lo, hi = obs.compute_range(_core.RANGE_PERCENTILE, 99.99, False, 256)
    exact_hi = np.percentile(x, 99.99)
    assert 3.0 < hi < 5.0 and abs(hi - exact_hi) <= 1.2  # within one histogram bin of the exact percentile
    assert -5.0 < lo < -3.0
    slo, shi = obs.compute_range(_core.RANGE_PERCENTILE, 99.99, True, 256)
    assert slo == -shi and 3.0 < shi < 5.0


def test_entropy_range_is_inside_the_max():
    x = RNG.laplace(size=200_000).astype(np.float32)
    lo, hi = observed(x).compute_range(_core.RANGE_ENTROPY, 0, True, 256)
    assert lo == -hi and 2.0 < hi < 0.9 * np.abs(x).max()


@pytest.mark.parametrize("symmetric", [False, True])
def test_mse_beats_minmax_on_heavy_tails(symmetric):
    x = RNG.standard_t(2, size=200_000).astype(np.float32)
    obs = observed(x)
    mm = obs.compute_range(_core.RANGE_MINMAX, 0, symmetric, 256)
    ms = obs.compute_range(_core.RANGE_MSE, 0, symmetric, 256)
    assert qmse(x, *ms, symmetric) < 0.9 * qmse(x, *mm, symmetric)
    pc = obs.compute_range(_core.RANGE_PERCENTILE, 99.99, symmetric, 256)
    assert qmse(x, *ms, symmetric) <= qmse(x, *pc, symmetric)


def test_asymmetric_wins_on_positive_data():
    x = np.abs(RNG.laplace(size=100_000)).astype(np.float32) + 1.0  # all positive, like post-GELU tails
    obs = observed(x)
    asym = obs.compute_range(_core.RANGE_MSE, 0, False, 256)
    sym = obs.compute_range(_core.RANGE_MSE, 0, True, 256)
    assert asym[0] >= -1e-6 and sym[0] < 0
    assert qmse(x, *asym, False) < qmse(x, *sym, True)


def test_observer_rejects_bad_input():
    obs = _core.Observer(256, 0.0)
    with pytest.raises(RuntimeError):
        obs.minmax()  # no data yet
    with pytest.raises(ValueError, match="non-finite"):
        obs.update(np.array([1.0, np.nan], np.float32))
    assert obs.count() == 0
    obs.update(np.array([1.0, 2.0], np.float32))
    with pytest.raises(ValueError, match="non-finite"):
        obs.update(np.array([np.inf], np.float32))
    assert obs.count() == 2 and obs.minmax() == (1.0, 2.0)
    with pytest.raises(TypeError):
        obs.update(np.array([1.0, 2.0]))  # float64
    with pytest.raises(ValueError):
        obs.compute_range(_core.RANGE_PERCENTILE, 101.0, False, 256)
    with pytest.raises(ValueError):
        obs.compute_range(9, 0, False, 256)
    with pytest.raises(ValueError):
        _core.Observer(4, 0.0)
    with pytest.raises(ValueError):
        _core.Observer(2048, 1.5)
    m = _core.Observer(64, 0.0)
    m.update(np.zeros((3, 4), np.float32))
    with pytest.raises(ValueError):
        m.update(np.zeros((3, 5), np.float32))  # column count must not change
