"""Plots of :func:`medquant.evaluate` results and of quantization diagnostics (matplotlib).

Every function draws into ``ax`` when given and returns it; without ``ax`` it creates a figure with
``matplotlib.pyplot``. To stay independent of the GUI backend (servers, CI) create the axes yourself from a bare
``matplotlib.figure.Figure`` - that is what ``medquant compare`` does - and call ``fig.savefig(...)``.
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence, Union

import numpy as np
import pandas as pd

from ..model.architectures import SITE_SUFFIXES

_MODEL_COLOR = "#1f77b4"
_INDEX_COLOR = "#ff7f0e"
_BASE_COLOR = "#2ca02c"


def _axes(ax, figsize=(6.4, 4.4)):
    if ax is not None:
        return ax
    import matplotlib.pyplot as plt

    _, ax = plt.subplots(figsize=figsize)
    return ax


def _model_rows(results: pd.DataFrame) -> pd.DataFrame:
    return results[results["index"] == "float32"] if "index" in results.columns else results


def _index_rows(results: pd.DataFrame) -> pd.DataFrame:
    if "index" not in results.columns:
        return results.iloc[:0]
    return results[(results["index"] != "float32") | (results["scheme"] == "fp32")]


def _yerr(df: pd.DataFrame, metric: str) -> Optional[np.ndarray]:
    """Error bars: the paired CI of the difference to fp32, placed around each system's mean."""
    lo, hi = f"{metric}_ci_low", f"{metric}_ci_high"
    if lo not in df.columns or hi not in df.columns or f"{metric}_delta" not in df.columns:
        return None
    d = df[f"{metric}_delta"].to_numpy(float)
    below = np.clip(d - df[lo].to_numpy(float), 0, None)
    above = np.clip(df[hi].to_numpy(float) - d, 0, None)
    return np.vstack([below, above])


def _scatter(ax, df: pd.DataFrame, x: str, metric: str, color: str, ci: bool, annotate: bool, label: str):
    if not len(df):
        return
    xs = df[x].to_numpy(float)
    ys = df[metric].to_numpy(float)
    yerr = _yerr(df, metric) if ci else None
    if yerr is not None:
        ax.errorbar(xs, ys, yerr=yerr, fmt="none", ecolor=color, elinewidth=1, capsize=3, alpha=0.7)
    is_base = (df["scheme"] == "fp32").to_numpy()
    rescored = (df["rescore"].to_numpy(float) > 0) if "rescore" in df.columns else np.zeros(len(df), bool)
    plain = ~is_base & ~rescored
    if plain.any():
        ax.plot(xs[plain], ys[plain], "o", color=color, label=label)
    if rescored.any():
        ax.plot(xs[rescored], ys[rescored], "o", mfc="none", color=color, ms=8, label="+ float rescoring")
    if is_base.any():
        ax.plot(xs[is_base], ys[is_base], "o", color=_BASE_COLOR, ms=9, zorder=3, label="fp32")
    if annotate:
        for xv, yv, name in zip(xs, ys, df["scheme"]):
            ax.annotate(str(name), (xv, yv), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.legend(fontsize=7, loc="best")


def plot_quality_vs_throughput(results: pd.DataFrame, metric: str = "nDCG@10", ax=None,
                               throughput: str = "corpus_texts_per_s", ci: bool = True, annotate: bool = True):
    """Retrieval quality against encode throughput, one point per model scheme (fp32 in green).

    Index-quantization rows are left out: they share fp32's encoder, hence its throughput. Error bars: the
    paired-bootstrap CI of the difference to fp32 (``<metric>_ci_low`` / ``_ci_high``) around each mean.
    """
    ax = _axes(ax)
    df = _model_rows(results)
    _scatter(ax, df, throughput, metric, _MODEL_COLOR, ci, annotate, "model scheme")
    ax.set_xlabel({"corpus_texts_per_s": "corpus encode throughput (texts/s)",
                   "corpus_tokens_per_s": "corpus encode throughput (tokens/s)",
                   "query_texts_per_s": "query encode throughput (queries/s)"}.get(throughput, throughput))
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} vs throughput")
    ax.grid(True, alpha=0.3)
    return ax


def plot_quality_vs_size(results: pd.DataFrame, metric: str = "nDCG@10", ax=None, what: str = "both",
                         ci: bool = True, annotate: bool = True):
    """Retrieval quality against bytes.

    ``what="model"``: model schemes against ``model_bytes``; ``what="index"``: fp32 and its quantized indexes
    against ``index_bytes`` (the stored corpus vectors; rescoring reads the float vectors on top); ``"both"``:
    the two side by side (``ax`` is then a pair of axes, and the pair is returned).
    """
    if what not in ("model", "index", "both"):
        raise ValueError("what must be 'model', 'index' or 'both'")
    if what == "both":
        if ax is None:
            import matplotlib.pyplot as plt

            _, ax = plt.subplots(1, 2, figsize=(11, 4.4))
        if len(ax) != 2:
            raise ValueError("what='both' needs two axes")
        plot_quality_vs_size(results, metric, ax[0], "model", ci, annotate)
        plot_quality_vs_size(results, metric, ax[1], "index", ci, annotate)
        return ax
    ax = _axes(ax)
    if what == "model":
        df = _model_rows(results).assign(_mb=lambda d: d["model_bytes"] / 2**20)
        _scatter(ax, df, "_mb", metric, _MODEL_COLOR, ci, annotate, "model scheme")
        ax.set_xlabel("model size in memory (MiB)")
        ax.set_title(f"{metric} vs model size")
    else:
        df = _index_rows(results).assign(_mb=lambda d: d["index_bytes"] / 2**20)
        _scatter(ax, df, "_mb", metric, _INDEX_COLOR, ci, annotate, "corpus index")
        ax.set_xlabel("corpus index size (MiB)")
        ax.set_title(f"{metric} vs index size")
        if len(df) and (df["_mb"] > 0).all():
            ax.set_xscale("log")
    ax.set_ylabel(metric)
    ax.grid(True, alpha=0.3)
    return ax


def plot_deltas(results: pd.DataFrame, metric: str = "nDCG@10", ax=None):
    """Forest plot: each system's difference to fp32 with its confidence interval (p-value on the right)."""
    ax = _axes(ax, figsize=(6.4, 0.35 * len(results) + 1.2))
    df = results[results["scheme"] != "fp32"]
    y = np.arange(len(df))[::-1]
    d = df[f"{metric}_delta"].to_numpy(float)
    err = _yerr(df, metric)
    colors = [_INDEX_COLOR if i != "float32" else _MODEL_COLOR for i in df.get("index", ["float32"] * len(df))]
    for yi, di, lo, hi, c in zip(y, d, err[0], err[1], colors):
        ax.errorbar([di], [yi], xerr=[[lo], [hi]], fmt="o", color=c, capsize=3)
    ax.axvline(0.0, color="grey", lw=1)
    ax.set_yticks(y)
    ax.set_yticklabels(df["scheme"], fontsize=8)
    if f"{metric}_p" in df.columns:
        for yi, p in zip(y, df[f"{metric}_p"]):
            ax.annotate(f"p={p:.3g}", (1.01, yi), xycoords=("axes fraction", "data"), fontsize=7, va="center")
    ax.set_xlabel(f"{metric} difference to fp32")
    ax.grid(True, axis="x", alpha=0.3)
    return ax


def plot_layer_error(reports: Union[pd.DataFrame, Mapping[str, pd.DataFrame]], metric: str = "sqnr_db", ax=None):
    """Per-site error from :meth:`Encoder.quant_report` (one line per report; ``metric`` is ``sqnr_db`` - higher
    is better - or ``rel_error``)."""
    if isinstance(reports, pd.DataFrame):
        reports = {"": reports}
    ax = _axes(ax, figsize=(9, 4))
    labels: Sequence[str] = []
    for name, rep in reports.items():
        r = rep[rep["site"] != "embedding"]
        x = np.arange(len(r))
        ax.plot(x, r[metric].to_numpy(float), marker="o", ms=3, label=name or None)
        labels = [f"{row.layer}.{SITE_SUFFIXES.index(row.module)}" for row in r.itertuples()]
    ax.set_xticks(np.arange(len(labels)))
    ax.set_xticklabels(labels, rotation=90, fontsize=7)
    ax.set_xlabel("layer.site (0 qkv, 1 attn-out, 2 ffn-in, 3 ffn-out)")
    ax.set_ylabel({"sqnr_db": "SQNR (dB)", "rel_error": "relative error"}.get(metric, metric))
    if metric == "rel_error":
        ax.set_yscale("log")
    if any(reports):
        ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)
    return ax


def plot_calibration_ranges(calibration, ax=None, method: Optional[str] = None):
    """Observed activation range against the chosen clipping range per site (see
    :meth:`medquant.Calibration.plot_ranges`)."""
    return calibration.plot_ranges(ax=ax, method=method)


__all__ = [
    "plot_calibration_ranges", "plot_deltas", "plot_layer_error", "plot_quality_vs_size",
    "plot_quality_vs_throughput",
]
