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


def describe_results(results: pd.DataFrame) -> str:
    """``"<dataset> · n=<queries> queries · <model>"`` for plot titles, from what :func:`medquant.evaluate` records
    (``attrs["dataset"]``, the ``n_queries`` and ``model`` columns); parts that are missing are left out."""
    parts = []
    name = (results.attrs.get("dataset") or {}).get("name")
    if name:
        parts.append(str(name))
    if "n_queries" in results.columns and len(results):
        parts.append(f"n={int(results['n_queries'].iloc[0])} queries")
    if "model" in results.columns and len(results):
        base = results[results["scheme"] == "fp32"] if "scheme" in results.columns else results
        model = str((base if len(base) else results)["model"].iloc[0]).rstrip("/\\")
        parts.append(model.replace("\\", "/").rsplit("/", 1)[-1])
    return " · ".join(parts)


def _title(ax, text: str, results: pd.DataFrame) -> None:
    sub = describe_results(results)
    ax.set_title(f"{text}\n{sub}" if sub else text, fontsize=10)


def _has_delta(df: pd.DataFrame, metric: str) -> bool:
    return all(f"{metric}_{s}" in df.columns for s in ("delta", "ci_low", "ci_high"))


def _delta_err(df: pd.DataFrame, metric: str) -> np.ndarray:
    """Error bars of each delta: its confidence interval (rows 0/1: below/above the delta; NaN where infinite)."""
    d = df[f"{metric}_delta"].to_numpy(float)
    below = d - df[f"{metric}_ci_low"].to_numpy(float)
    above = df[f"{metric}_ci_high"].to_numpy(float) - d
    err = np.clip(np.vstack([below, above]), 0, None)
    err[~np.isfinite(err)] = np.nan
    return err


def _spread_labels(ax, xs: np.ndarray, ys: np.ndarray, names, fontsize: float = 7) -> None:
    """Annotate points; a label whose box would overprint one placed before moves up or down by whole lines."""
    pts = (ax.transScale + ax.transLimits).transform(np.column_stack([xs, ys]))  # axes fraction
    fig = ax.get_figure()
    box = ax.get_position()
    width_pt, height_pt = box.width * fig.get_figwidth() * 72, box.height * fig.get_figheight() * 72
    names = [str(n) for n in names]
    widths = [(0.6 * fontsize * len(n) + 8) / max(width_pt, 1.0) for n in names]  # approximate text width
    gap = 1.3 * fontsize / max(height_pt, 1.0)
    left = [px + w > 1.02 for px, w in zip(pts[:, 0], widths)]  # would run past the right edge: put it left
    start = [px - w if lf else px for px, w, lf in zip(pts[:, 0], widths, left)]
    label_y = pts[:, 1].copy()
    placed: list = []

    def free(i: int, y: float) -> bool:
        """No overprinting of a label placed before, nor of another point."""
        labels = all(not (start[i] < start[j] + widths[j] and start[j] < start[i] + widths[i]
                          and abs(y - label_y[j]) < gap * (1 - 1e-6)) for j in placed)
        return labels and not any(k != i and start[i] <= pts[k, 0] <= start[i] + widths[i]
                                  and y - 0.2 * gap <= pts[k, 1] <= y + gap for k in range(len(pts)))

    for i in np.argsort(pts[:, 1], kind="stable"):  # bottom up; try the point's height, then 1, -1, 2, -2 ... gaps
        for step in range(2 * len(pts) + 1):
            y = pts[i, 1] + (step + 1) // 2 * gap * (1 if step % 2 else -1)
            if (step == 0 or -0.02 <= y <= 0.94) and free(i, y):
                break
        label_y[i] = y
        placed.append(i)
    for xv, yv, ly, py, lf, name in zip(xs, ys, label_y, pts[:, 1], left, names):
        dy = (ly - py) * height_pt + (3 if ly >= py else -3)
        ax.annotate(name, (xv, yv), textcoords="offset points", xytext=(-5 if lf else 5, dy), fontsize=fontsize,
                    va="bottom", ha="right" if lf else "left",
                    arrowprops=dict(arrowstyle="-", lw=0.5, color="grey") if abs(dy) > 8 else None)


def _scatter(ax, df: pd.DataFrame, x: str, metric: str, color: str, ci: bool, annotate: bool, label: str) -> str:
    """Plot each system's difference to fp32 (with its CI) when ``df`` has it, else its raw ``metric``; returns
    the column plotted."""
    if not len(df):
        return metric
    delta = _has_delta(df, metric)
    y = f"{metric}_delta" if delta else metric
    xs, ys = df[x].to_numpy(float), df[y].to_numpy(float)
    if delta and ci:
        ax.errorbar(xs, ys, yerr=_delta_err(df, metric), fmt="none", ecolor=color, elinewidth=1, capsize=3,
                    alpha=0.7)
    if delta:
        ax.axhline(0.0, color="grey", lw=0.8, zorder=0)
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
        ax.autoscale_view()
        _spread_labels(ax, xs, ys, df["scheme"])
    ax.legend(fontsize=7, loc="best")
    return y


def _metric_axis(ax, results: pd.DataFrame, metric: str, plotted: str) -> None:
    """y label; for a delta axis also the absolute metric on the right (delta + fp32's value)."""
    if plotted == metric:
        ax.set_ylabel(metric)
        return
    conf = (results.attrs.get("config") or {}).get("confidence", 0.95)
    ax.set_ylabel(f"{metric} - fp32 ({conf:.0%} CI of the difference)")
    base = results.loc[results["scheme"] == "fp32", metric]
    if len(base):
        b = float(base.iloc[0])
        right = ax.secondary_yaxis("right", functions=(lambda v: v + b, lambda v: v - b))
        right.set_ylabel(metric)


def plot_quality_vs_throughput(results: pd.DataFrame, metric: str = "nDCG@10", ax=None,
                               throughput: str = "corpus_texts_per_s", ci: bool = True, annotate: bool = True):
    """Retrieval quality against encode throughput, one point per model scheme (fp32 in green).

    The y axis is each scheme's difference to fp32 (``<metric>_delta``) with its confidence interval as error bar
    (``<metric>_ci_low`` / ``_ci_high``), the absolute metric on the right axis; results without delta columns
    are plotted as raw ``metric`` without error bars. Index-quantization rows are left out: they share fp32's
    encoder, hence its throughput.
    """
    ax = _axes(ax)
    df = _model_rows(results)
    plotted = _scatter(ax, df, throughput, metric, _MODEL_COLOR, ci, annotate, "model scheme")
    ax.set_xlabel({"corpus_texts_per_s": "corpus encode throughput (texts/s)",
                   "corpus_tokens_per_s": "corpus encode throughput (tokens/s)",
                   "query_texts_per_s": "query encode throughput (queries/s)"}.get(throughput, throughput))
    _metric_axis(ax, results, metric, plotted)
    _title(ax, f"{metric} vs throughput", results)
    ax.grid(True, alpha=0.3)
    return ax


def _size_ticks(ax, sizes: np.ndarray) -> None:
    """Log x axis labelled at the plotted sizes (plain numbers, no minor-tick labels that overprint)."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullFormatter

    ax.set_xscale("log")
    values = np.unique(np.round(sizes[np.isfinite(sizes) & (sizes > 0)], 6))
    # ticks at the sizes, unless two are too close to label apart (< 1.6x): then one label per decade
    if values.size and values.size <= 8 and (values.size == 1 or np.min(values[1:] / values[:-1]) >= 1.6):
        ax.xaxis.set_major_locator(FixedLocator(values))
    else:
        ax.xaxis.set_major_locator(LogLocator(base=10, numticks=6))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    if values.size:
        ax.set_xlim(values[0] / 1.8, values[-1] * 1.8)


def plot_quality_vs_size(results: pd.DataFrame, metric: str = "nDCG@10", ax=None, what: str = "both",
                         ci: bool = True, annotate: bool = True):
    """Retrieval quality against bytes (difference to fp32 with its CI, as in :func:`plot_quality_vs_throughput`).

    ``what="model"``: model schemes against ``model_bytes``; ``what="index"``: fp32 and its quantized indexes
    against ``index_bytes`` (the stored corpus vectors, log scale; rescoring reads the float vectors on top);
    ``"both"``: the two side by side (``ax`` is then a pair of axes, and the pair is returned).
    """
    if what not in ("model", "index", "both"):
        raise ValueError("what must be 'model', 'index' or 'both'")
    if what == "both":
        if ax is None:
            import matplotlib.pyplot as plt

            _, ax = plt.subplots(1, 2, figsize=(12, 4.6))
        if len(ax) != 2:
            raise ValueError("what='both' needs two axes")
        plot_quality_vs_size(results, metric, ax[0], "model", ci, annotate)
        plot_quality_vs_size(results, metric, ax[1], "index", ci, annotate)
        return ax
    ax = _axes(ax)
    if what == "model":
        df = _model_rows(results).assign(_mb=lambda d: d["model_bytes"] / 2**20)
        ax.set_xlabel("model size in memory (MiB)")
        _title(ax, f"{metric} vs model size", results)
        color, label = _MODEL_COLOR, "model scheme"
    else:
        df = _index_rows(results).assign(_mb=lambda d: d["index_bytes"] / 2**20)
        ax.set_xlabel("corpus index size (MiB, log scale)")
        _title(ax, f"{metric} vs index size", results)
        color, label = _INDEX_COLOR, "corpus index"
        if len(df) and (df["_mb"] > 0).all():
            _size_ticks(ax, df["_mb"].to_numpy(float))
    plotted = _scatter(ax, df, "_mb", metric, color, ci, annotate, label)
    _metric_axis(ax, results, metric, plotted)
    ax.grid(True, alpha=0.3)
    return ax


def plot_deltas(results: pd.DataFrame, metric: str = "nDCG@10", ax=None):
    """Forest plot: each system's difference to fp32 with its confidence interval; p-values (and Holm-adjusted
    ones when present) on the right."""
    df = results[results["scheme"] != "fp32"]
    ax = _axes(ax, figsize=(7.5, 0.4 * len(df) + 1.6))
    if not _has_delta(df, metric):
        raise ValueError(f"results have no {metric}_delta / _ci_low / _ci_high columns (main_metrics of evaluate)")
    y = np.arange(len(df))[::-1]
    d = df[f"{metric}_delta"].to_numpy(float)
    err = _delta_err(df, metric)
    colors = [_INDEX_COLOR if i != "float32" else _MODEL_COLOR for i in df.get("index", ["float32"] * len(df))]
    for yi, di, lo, hi, c in zip(y, d, err[0], err[1], colors):
        ax.errorbar([di], [yi], xerr=[[lo], [hi]], fmt="o", color=c, capsize=3)
    ax.axvline(0.0, color="grey", lw=1)
    ax.set_yticks(y)
    ax.set_yticklabels(df["scheme"], fontsize=8)
    ax.set_ylim(-0.7, len(df) - 0.3)
    if f"{metric}_p" in df.columns:
        holm = df[f"{metric}_p_holm"] if f"{metric}_p_holm" in df.columns else [None] * len(df)
        for yi, p, ph in zip(y, df[f"{metric}_p"], holm):
            text = f"p={p:.2g}" + (f", Holm {ph:.2g}" if ph is not None else "")
            ax.annotate(text, (1.02, yi), xycoords=("axes fraction", "data"), fontsize=7, va="center")
    conf = (results.attrs.get("config") or {}).get("confidence", 0.95)
    test = (results.attrs.get("config") or {}).get("test")
    ax.set_xlabel(f"{metric} difference to fp32, {conf:.0%} CI" + (f" ({test})" if test else ""))
    _title(ax, f"{metric}: difference to fp32", results)
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


def _unit_label(unit: str) -> str:
    """A short label of a sensitivity unit: ``L3 ffn-in`` for a site, the name itself for groups / embeddings."""
    from ..model.architectures import LAYER_PREFIX, site_layer, site_module
    from ..quant.sensitivity import GROUPS

    if not unit.startswith(LAYER_PREFIX):
        return unit
    group = {suffix: g for g, suffix in GROUPS.items()}.get(site_module(unit), site_module(unit))
    return f"L{site_layer(unit)} {group}"


_PROXY_AXES = {"sqnr_db": "proxy: SQNR of the unit's sites (dB)",
               "emb_cosine_mean": "proxy: mean embedding cosine to fp32"}


def plot_sensitivity(df: pd.DataFrame, ax=None, proxy: Optional[str] = "sqnr_db"):
    """Sensitivity of the metric to each unit (:func:`medquant.quant.sensitivity.sensitivity`): horizontal bars of
    the metric's difference to fp32 with its confidence interval as whiskers, worst unit at the top; ``proxy``
    (``"sqnr_db"``, ``"emb_cosine_mean"`` or None) as diamonds on a second x axis (top; left = worse there too)."""
    metric = df.attrs.get("metric") or next((c[: -len("_delta")] for c in df.columns if c.endswith("_delta")), None)
    if metric is None or not _has_delta(df, metric):
        raise ValueError("df has no <metric>_delta / _ci_low / _ci_high columns: pass the result of sensitivity()")
    if proxy is not None and proxy not in _PROXY_AXES:
        raise ValueError(f"proxy must be one of {', '.join(_PROXY_AXES)} or None, got {proxy!r}")
    ax = _axes(ax, figsize=(7.5, 0.28 * len(df) + 1.8))
    y = np.arange(len(df))[::-1]
    d = df[f"{metric}_delta"].to_numpy(float)
    ax.barh(y, d, xerr=_delta_err(df, metric), color=_MODEL_COLOR, alpha=0.8, height=0.6,
            error_kw=dict(ecolor="black", elinewidth=0.8, capsize=2), label=f"{metric} - fp32")
    ax.axvline(0.0, color="grey", lw=1)
    ax.set_yticks(y)
    ax.set_yticklabels([_unit_label(str(u)) for u in df["unit"]], fontsize=7)
    ax.set_ylim(-0.7, len(df) - 0.3)
    conf = (df.attrs.get("objective") or {}).get("confidence", 0.95)
    ax.set_xlabel(f"{metric} difference to fp32 with only this unit quantized ({conf:.0%} CI, paired t-test)")
    ax.grid(True, axis="x", alpha=0.3)
    if proxy is not None:
        top = ax.twiny()
        values = df[proxy].to_numpy(float)
        top.plot(values, y, "D", color=_INDEX_COLOR, ms=4, label=_PROXY_AXES[proxy])
        top.set_xlabel(_PROXY_AXES[proxy], color=_INDEX_COLOR, fontsize=8)
        top.tick_params(axis="x", colors=_INDEX_COLOR, labelsize=7)
        rho = (df.attrs.get("rank_agreement") or {}).get("emb_cosine" if proxy == "emb_cosine_mean" else proxy)
        if rho is not None and np.isfinite(rho):
            top.annotate(f"Spearman (loss, proxy harm) {rho:+.2f}", (0.99, 0.01), xycoords="axes fraction",
                         ha="right", va="bottom", fontsize=7, color=_INDEX_COLOR)
    scheme = df.attrs.get("scheme", "")
    dataset = (df.attrs.get("objective") or {}).get("dataset", "")
    ax.set_title(f"{metric} sensitivity per unit: {scheme}" + (f"\n{dataset}" if dataset else ""), fontsize=10,
                 pad=30 if proxy is not None else 6)
    return ax


def plot_calibration_ranges(calibration, ax=None, method: Optional[str] = None):
    """Observed activation range against the chosen clipping range per site (see
    :meth:`medquant.Calibration.plot_ranges`)."""
    ax = calibration.plot_ranges(ax=ax, method=method)
    ax.set_ylabel("activation value (symmetric log scale)")
    ax.set_title(f"activation range per site: observed and chosen ({method or calibration.method}), "
                 f"{calibration.n_texts} calibration texts", fontsize=10)
    return ax


def plot_calibration_histogram(calibration, site: str, methods: Sequence[str] = ("minmax", "percentile", "entropy",
                                                                                  "mse"), ax=None):
    """Histogram of the values observed at one site (log counts; empty bins are left empty, not drawn at a
    floor) with the clipping range each method in ``methods`` would choose."""
    counts, edges = calibration.histogram(site)
    counts = np.asarray(counts, dtype=float)
    ax = _axes(ax, figsize=(8, 3.6))
    ax.stairs(counts, edges, fill=True, alpha=0.5, color="#7f7f7f", label="observed values")
    ax.set_yscale("log", nonpositive="mask")
    nz = np.nonzero(counts > 0)[0]
    lows, highs = [], []
    colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"]
    for i, m in enumerate(methods):
        lo, hi = calibration.range(site, m)
        c = colors[i % len(colors)]
        ax.axvline(lo, color=c, ls="--", lw=1)
        ax.axvline(hi, color=c, ls="--", lw=1, label=f"{m} [{lo:.3g}, {hi:.3g}]")
        lows.append(lo)
        highs.append(hi)
    if nz.size:
        lo = min([edges[nz[0]]] + lows)
        hi = max([edges[nz[-1] + 1]] + highs)
        pad = 0.03 * (hi - lo)
        ax.set_xlim(lo - pad, hi + pad)
        ax.set_ylim(0.7, counts.max() * 2)
    ax.set_xlabel(f"activation value at {site}")
    ax.set_ylabel("count per bin (log scale)")
    ax.set_title(f"{int(counts.sum()):,} values observed over {calibration.n_texts} calibration texts", fontsize=10)
    ax.legend(fontsize=7, loc="upper right")
    return ax


def plot_autoquant_pareto(trace: pd.DataFrame, objective: str = "throughput", allowed_loss: Optional[float] = None,
                          ax=None):
    """Every configuration an autoquantize search tried: metric delta against fp32 (with its CI) over throughput
    or model size; the Pareto front, the tolerance line and the chosen configuration marked."""
    ax = _axes(ax, figsize=(7.5, 4.6))
    size = objective == "size"
    x = trace["model_bytes"] / 2**20 if size else trace["texts_per_s"]
    y = trace["delta"]
    err = np.vstack([y - trace["ci_low"], trace["ci_high"] - y])
    within = trace["within_tolerance"].to_numpy(bool)
    for mask, color, label in ((within, "#2ca02c", "within tolerance"), (~within, "#d62728", "outside")):
        if mask.any():
            ax.errorbar(x[mask], y[mask], yerr=err[:, mask], fmt="o", ms=4, color=color, ecolor=color, alpha=0.7,
                        elinewidth=0.8, label=label)
    order = np.argsort(x.to_numpy() * (1 if size else -1))  # best objective first
    front, best = [], -np.inf
    for i in order:
        if y.iloc[i] > best:
            front.append(i)
            best = y.iloc[i]
    ax.step(x.iloc[front], y.iloc[front], where="post", color="#555555", lw=1, label="Pareto front")
    if allowed_loss is not None:
        ax.axhline(-allowed_loss, color="#555555", ls="--", lw=1, label=f"tolerance (-{allowed_loss:.4f})")
    if "chosen" in trace and trace["chosen"].any():
        c = trace.index[trace["chosen"]][0]
        ax.plot([x[c]], [y[c]], marker="*", ms=16, color="#1f77b4", ls="", label=f"chosen: {trace.loc[c, 'configuration']}")
    _spread_labels(ax, x.to_numpy(), y.to_numpy(), trace["configuration"].tolist(), fontsize=6)
    ax.set_xlabel("model size (MiB)" if size else "corpus texts per second (measured)")
    metric = trace["metric"].iloc[0] if len(trace) else "metric"
    ax.set_ylabel(f"{metric} delta vs fp32 (dev)")
    ax.legend(fontsize=7, loc="lower right")
    return ax


__all__ = [
    "describe_results", "plot_autoquant_pareto", "plot_calibration_histogram", "plot_calibration_ranges", "plot_deltas",
    "plot_layer_error", "plot_quality_vs_size", "plot_quality_vs_throughput", "plot_sensitivity",
]
