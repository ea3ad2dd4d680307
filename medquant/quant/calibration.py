"""Calibration: the statistics of every quantized matmul input, gathered by observers in the C core.

``Encoder.calibrate(texts)`` runs the fp32 encoder once over the texts with one observer per linear layer input
(running and moving-average min/max, a histogram, per-channel max |x|) and returns a ``Calibration``. Ranges are
chosen from it by name (minmax, moving-average, percentile, entropy, mse); the range choice itself runs in C.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

from .._native import _core
from ..model.architectures import SITE_SUFFIXES, site_layer, site_module

#: Calibration range methods by name -> the core's code: the observer's own table (csrc/observer.c), where every range
#: choice (minmax, moving average, percentile, entropy, MSE, symmetric or not) runs. A new method is an entry there.
RANGE_METHODS = dict(_core.RANGE_METHODS)
CALIBRATION_METHODS = tuple(RANGE_METHODS)


def qparams(lo: float, hi: float, symmetric: bool) -> Tuple[float, int]:
    """(scale, zero_point) of the u8 activation grid for [lo, hi] (symmetric: zero point 128)."""
    return _core.qparams(float(lo), float(hi), bool(symmetric))


def sample_calibration_texts(queries: Sequence[str], corpus: Sequence[str], n: int, seed: int) -> List[str]:
    """Half queries, half corpus texts (seeded, without replacement); a short pool is filled from the other."""
    rng = np.random.default_rng([int(seed), 0xCA11B])
    nq = min(len(queries), n // 2)
    nc = min(len(corpus), n - nq)
    nq = min(len(queries), n - nc)
    qi = rng.choice(len(queries), size=nq, replace=False) if nq else []
    ci = rng.choice(len(corpus), size=nc, replace=False) if nc else []
    return [queries[i] for i in qi] + [corpus[i] for i in ci]


@dataclass
class Calibration:
    """Per-site observers of one calibration run. Sites are named like the schemes' site names."""

    sites: List[str]
    observers: List[object]
    n_texts: int
    method: str = "minmax"
    percentile: float = 99.99
    act_mul: Optional[Dict[str, np.ndarray]] = field(default=None, repr=False)

    def observer(self, site: str):
        try:
            return self.observers[self.sites.index(site)]
        except ValueError:
            raise KeyError(f"no calibration site {site!r}") from None

    def range(self, site: str, method: Optional[str] = None, symmetric: bool = False,
              percentile: Optional[float] = None) -> Tuple[float, float]:
        """The clipping range [lo, hi] chosen for one site."""
        method = method or self.method
        if method not in CALIBRATION_METHODS:
            raise ValueError(f"unknown calibration method {method!r}; one of {', '.join(CALIBRATION_METHODS)}")
        obs = self.observer(site)
        if obs.count() == 0:
            raise ValueError(f"site {site} observed no values")
        param = float(percentile if percentile is not None else self.percentile) if method == "percentile" else 0.0
        lo, hi = obs.compute_range(RANGE_METHODS[method], param, bool(symmetric), 256)
        return float(lo), float(hi)

    def ranges(self, method: Optional[str] = None, symmetric: bool = False,
               percentile: Optional[float] = None) -> Dict[str, Tuple[float, float]]:
        return {s: self.range(s, method, symmetric, percentile) for s in self.sites}

    def histogram(self, site: str) -> Tuple[np.ndarray, np.ndarray]:
        """(counts, bin edges) of the values observed at a site."""
        counts, lo, hi = self.observer(site).histogram()
        return counts, np.linspace(lo, hi, len(counts) + 1)

    def column_absmax(self, site: str) -> np.ndarray:
        return self.observer(site).column_absmax()

    def to_frame(self, method: Optional[str] = None, symmetric: bool = False) -> pd.DataFrame:
        """One row per site: observed min/max, outlier structure, chosen range, scale and zero point."""
        rows = []
        for s, obs in zip(self.sites, self.observers):
            mn, mx = obs.minmax()
            mmn, mmx = obs.moving_minmax()
            col = obs.column_absmax()
            lo, hi = self.range(s, method, symmetric)
            scale, zp = qparams(lo, hi, symmetric)
            rows.append(
                {
                    "site": s,
                    "layer": site_layer(s),
                    "module": site_module(s),
                    "n_values": int(obs.count()),
                    "min": mn,
                    "max": mx,
                    "moving_min": mmn,
                    "moving_max": mmx,
                    "absmax_col_median": float(np.median(col)),
                    "absmax_col_max": float(col.max()),
                    "outlier_ratio": float(col.max() / max(np.median(col), 1e-12)),
                    "outlier_channel": int(col.argmax()),
                    "lo": lo,
                    "hi": hi,
                    "scale": scale,
                    "zero_point": zp,
                    "clipped_fraction_of_range": 1.0 - (hi - lo) / max(mx - mn, 1e-12),
                }
            )
        return pd.DataFrame(rows)

    def plot_ranges(self, ax=None, method: Optional[str] = None):
        """Observed [min, max] against the chosen range per site (log scale of |x|): outliers stand out."""
        import matplotlib.pyplot as plt

        df = self.to_frame(method)
        if ax is None:
            _, ax = plt.subplots(figsize=(max(6, 0.35 * len(df)), 4))
        x = np.arange(len(df))
        ax.bar(x, df["max"] - df["min"], bottom=df["min"], color="#cccccc", label="observed min..max")
        ax.bar(x, df["hi"] - df["lo"], bottom=df["lo"], width=0.5, color="#1f77b4",
               label=f"chosen range ({method or self.method})")
        ax.set_xticks(x)
        ax.set_xticklabels([f"{r.layer}.{SITE_SUFFIXES.index(r.module)}" for r in df.itertuples()], rotation=90,
                           fontsize=7)
        ax.set_yscale("symlog")
        ax.set_xlabel("layer.site (0 qkv, 1 attn-out, 2 ffn-in, 3 ffn-out)")
        ax.set_ylabel("activation value")
        ax.legend(fontsize=8)
        return ax
