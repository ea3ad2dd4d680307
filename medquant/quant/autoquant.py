"""``medquant.autoquantize``: the fastest (or smallest) quantized encoder whose retrieval metric on a dev split stays
within a tolerance of fp32, proven on a held-out split the search never looked at.

The search, every step measured (nothing assumed):

1. **Schemes.** Every candidate scheme (presets, or your own QuantSchemes) is quantized, scored on the dev split
   (:class:`~medquant.eval.objective.RetrievalObjective`: the metric, a paired t-test against fp32, embedding
   cosine) and timed (encode throughput on a fixed sample of dev documents) and sized (:meth:`Encoder.size_bytes`).
   With ``calibration_methods`` given, static int8 candidates also get a variant whose calibration method is chosen
   per site (the one with the best site SQNR among them; off by default: on MedQuAD it lowered the embedding cosine
   of all four static presets).
2. **Repair.** Candidates better on the objective than the best one already within tolerance, but outside it, are
   repaired: their sites are ranked by the cheap proxy (per-site SQNR against fp32, :meth:`Encoder.quant_report`)
   and the worst 1, 2, 4, ... sites are given a more faithful precision (static int8 -> per-token dynamic int8;
   int4 weights -> int8 weights; otherwise fp32), until the tolerance is met.
3. **Choice.** The best objective among everything within tolerance on dev (fp32 itself if nothing is), which is
   then scored on the held-out split. Objectives within ``objective_tie`` (relative) of the best count as a tie:
   timings of identical int8 kernels vary by several percent between runs, so a 2% faster configuration is not
   really faster; ties go to the configuration closest to fp32 (mean embedding cosine over every dev document, far
   less noisy than the metric on a dev sample), then to the better metric.

A time budget bounds steps 1-2 (the configuration being measured when it runs out is finished). The result holds
the chosen scheme (``to_json`` / ``QuantScheme.from_dict``), the quantized encoder (``save_pretrained``), the trace
of every configuration tried, the before/after table, and a Pareto plot.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd

from ..model import limits
from .calibration import CALIBRATION_METHODS, sample_calibration_texts
from .schemes import QuantScheme, get_scheme

if TYPE_CHECKING:  # pragma: no cover
    from ..eval.datasets import RetrievalDataset
    from ..eval.objective import ObjectiveResult, RetrievalObjective
    from ..model.encoder import Encoder

OBJECTIVES = ("throughput", "size")

#: The schemes tried by default: every int8 preset, weight-only int8, and int4 weights with GPTQ rounding.
DEFAULT_CANDIDATES: Tuple[Union[str, QuantScheme], ...] = (
    "int8-static-asym", "int8-static-per-tensor", "int8-static-sym", "int8-smoothquant", "int8-dynamic",
    "int8-dynamic-token", "w8-weight-only",
    QuantScheme(name="w4-gptq", weights="int4", activations="fp32", group_size=32, rounding="gptq",
                embeddings="int8"),
)


@dataclass
class AutoQuantConfig:
    """Settings of :func:`autoquantize`.

    metric: any :func:`~medquant.eval.metrics.evaluate_run` column, case-insensitive ("ndcg@10", "mrr@10", ...).
    tolerance: the loss allowed on dev: a fraction of fp32's value (``relative=True``, 0.005 = 0.5%) or points.
    conservative: judge the worst end of the paired confidence interval of the loss instead of its mean.
    objective: "throughput" (corpus texts per second, measured) or "size" (bytes in memory).
    candidates: preset names, dicts or QuantSchemes tried in step 1.
    objective_tie: objectives within this fraction of each other tie (broken by embedding cosine, then metric).
    calibration_methods: per-site calibration choices for static int8 candidates (empty, the default: no per-site
    variant), e.g. ("minmax", "percentile", "mse", "entropy").
    max_fallback_sites: the most sites one repair may move to a higher precision.
    time_budget_s: bound on the search (None: none).
    calibration_size: dev texts (half queries, half documents; seeded) calibrating static schemes and GPTQ.
    throughput_texts: dev documents encoded to time each configuration (best of ``throughput_repeats``).
    proxy_texts: dev documents of the per-site SQNR report ranking sites for repair.
    """

    metric: str = "ndcg@10"
    tolerance: float = 0.005
    relative: bool = True
    conservative: bool = False
    objective: str = "throughput"
    candidates: Tuple[Union[str, QuantScheme], ...] = DEFAULT_CANDIDATES
    objective_tie: float = 0.05
    calibration_methods: Tuple[str, ...] = ()
    max_fallback_sites: int = 8
    time_budget_s: Optional[float] = None
    calibration_size: int = 256
    throughput_texts: int = 128
    throughput_repeats: int = 3
    proxy_texts: int = 48
    batch_size: int = 32
    seed: int = 0

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        self.tolerance = limits.finite_float(self.tolerance, "tolerance", 0.0, float("inf"))
        self.objective_tie = limits.finite_float(self.objective_tie, "objective_tie", 0.0, 1.0)
        if isinstance(self.candidates, (str, QuantScheme, dict)):
            self.candidates = (self.candidates,)
        self.candidates = tuple(get_scheme(c) for c in self.candidates)
        if not self.candidates:
            raise ValueError("candidates is empty")
        bad = [m for m in self.calibration_methods if m not in CALIBRATION_METHODS]
        if bad:
            raise ValueError(f"unknown calibration methods {bad}; one of {', '.join(CALIBRATION_METHODS)}")
        self.calibration_methods = tuple(self.calibration_methods)
        self.max_fallback_sites = limits.positive_int(self.max_fallback_sites, "max_fallback_sites")
        if self.time_budget_s is not None:
            self.time_budget_s = limits.finite_float(self.time_budget_s, "time_budget_s", 0.0, float("inf"))
        for key in ("calibration_size", "throughput_texts", "throughput_repeats", "proxy_texts"):
            setattr(self, key, limits.positive_int(getattr(self, key), key))
        self.batch_size = limits.batch_size(self.batch_size)


@dataclass
class AutoQuantResult:
    """What :func:`autoquantize` found: ``scheme`` and ``encoder`` (the choice), ``trace`` (every configuration
    tried on dev, in order), ``table`` (fp32 and the choice on dev and on the held-out split), ``config``."""

    scheme: QuantScheme
    encoder: "Encoder"
    trace: pd.DataFrame
    table: pd.DataFrame
    config: AutoQuantConfig
    info: Dict[str, Any] = field(default_factory=dict)

    def plot_pareto(self, ax=None):
        """Quality against the objective for every configuration tried; the Pareto front, the tolerance and the
        choice marked."""
        from ..eval.plots import plot_autoquant_pareto

        return plot_autoquant_pareto(self.trace, self.config.objective, self.info.get("allowed_loss"), ax=ax)


# ---------------------------------------------------------------------------------------------------- measuring
def measure_throughput(encoder: "Encoder", texts: Sequence[str], batch_size: int = 32, repeats: int = 3) -> float:
    """Texts per second encoding ``texts`` (best of ``repeats`` timed runs, after one warm-up batch)."""
    encoder.encode(list(texts[:batch_size]), batch_size=batch_size, show_progress_bar=False)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        encoder.encode(list(texts), batch_size=batch_size, show_progress_bar=False)
        best = min(best, time.perf_counter() - t0)
    return len(texts) / best


class _Search:
    """The state of one search: the dev objective, the shared calibration, the trace and the clock."""

    def __init__(self, encoder: "Encoder", objective: "RetrievalObjective", cfg: AutoQuantConfig,
                 calibration_texts: List[str], show_progress_bar: Optional[bool]):
        self.encoder, self.objective, self.cfg = encoder, objective, cfg
        self.calibration_texts = calibration_texts
        self.show_progress_bar = show_progress_bar
        self.calibration = encoder.calibrate(calibration_texts, batch_size=cfg.batch_size, show_progress_bar=False)
        docs = objective.corpus_texts
        step = max(1, len(docs) // cfg.throughput_texts)
        self.speed_texts = docs[::step][: cfg.throughput_texts]
        self.proxy_texts = docs[::max(1, len(docs) // cfg.proxy_texts)][: cfg.proxy_texts]
        ref = objective.reference_result
        self.allowed = cfg.tolerance * ref.value if cfg.relative else cfg.tolerance
        self.rows: List[Dict[str, Any]] = []
        self.schemes: Dict[str, QuantScheme] = {}
        self.encoders: Dict[str, "Encoder"] = {}  # only those the search may still need (see _forget)
        self.t0 = time.perf_counter()
        self.stopped = ""

    def out_of_time(self) -> bool:
        budget = self.cfg.time_budget_s
        if budget is not None and time.perf_counter() - self.t0 > budget:
            self.stopped = f"time budget of {budget:.0f} s reached"
        return bool(self.stopped)

    def quantize(self, scheme: QuantScheme) -> "Encoder":
        if scheme.is_float and scheme.weights == "fp32" and not scheme.overrides:
            return self.encoder
        texts = self.calibration_texts if scheme.needs_calibration_texts else None
        calib = self.calibration if scheme.needs_calibration else None
        return self.encoder.quantize(scheme, calibration=calib, calibration_texts=texts,
                                     batch_size=self.cfg.batch_size, show_progress_bar=False)

    def try_scheme(self, scheme: QuantScheme, step: str, parent: str = "") -> Dict[str, Any]:
        """Quantize, score on dev, time and size one configuration; its trace row."""
        t0 = time.perf_counter()
        enc = self.quantize(scheme)
        quantize_s = time.perf_counter() - t0
        res = self.objective.score(enc)
        tput = measure_throughput(enc, self.speed_texts, self.cfg.batch_size, self.cfg.throughput_repeats)
        loss = -res.ci_low if self.cfg.conservative else -res.delta
        row = {"configuration": scheme.name, "step": step, "parent": parent, "metric": res.metric,
               "value": res.value, "delta": res.delta, "ci_low": res.ci_low, "ci_high": res.ci_high,
               "relative_loss": res.relative_loss, "within_tolerance": bool(loss <= self.allowed),
               "texts_per_s": tput, "model_bytes": enc.size_bytes(), "emb_cosine_mean": res.emb_cosine_mean,
               "n_fallback_sites": 0, "quantize_s": quantize_s, "elapsed_s": time.perf_counter() - self.t0,
               "scheme": scheme.to_json()}
        self.rows.append(row)
        self.schemes[scheme.name] = scheme
        self.encoders[scheme.name] = enc
        self._forget()
        return row

    def encoder_of(self, scheme: QuantScheme) -> "Encoder":
        """The encoder of a configuration tried (quantized again, identically, if :meth:`_forget` dropped it)."""
        enc = self.encoders.get(scheme.name)
        return enc if enc is not None else self.quantize(scheme)

    def _forget(self) -> None:
        """Drop the encoders the search is unlikely to need again (memory: one per configuration otherwise): all but
        the best one within tolerance and the first-pass configurations outside it that beat it."""
        best = self.best_within()
        keep = {best["configuration"]} if best is not None else set()
        keep |= {r["configuration"] for r in self.rows if not r["within_tolerance"] and r["step"] != "repair"
                 and self.better(r, best)}
        self.encoders = {k: e for k, e in self.encoders.items() if k in keep}

    def gain(self, row: Dict[str, Any]) -> float:
        """The objective of a trace row, higher is better."""
        return -float(row["model_bytes"]) if self.cfg.objective == "size" else float(row["texts_per_s"])

    def ties(self, a: Dict[str, Any], b: Dict[str, Any]) -> bool:
        ga, gb = self.gain(a), self.gain(b)
        return abs(ga - gb) <= self.cfg.objective_tie * max(abs(ga), abs(gb))

    def better(self, a: Dict[str, Any], b: Optional[Dict[str, Any]]) -> bool:
        """Whether configuration ``a`` beats ``b``: on the objective, or, when the objectives tie, on fidelity to
        fp32 (embedding cosine, then the metric)."""
        if b is None:
            return True
        if not self.ties(a, b):
            return self.gain(a) > self.gain(b)
        return (a["emb_cosine_mean"], a["value"]) > (b["emb_cosine_mean"], b["value"])

    def best_within(self) -> Optional[Dict[str, Any]]:
        """Among configurations within tolerance, those tying with the best objective; of them the most faithful."""
        within = [r for r in self.rows if r["within_tolerance"]]
        if not within:
            return None
        top = max(within, key=self.gain)
        tier = [r for r in within if self.ties(r, top)]
        return max(tier, key=lambda r: (r["emb_cosine_mean"], r["value"], self.gain(r)))


# ---------------------------------------------------------------------------------------------------- search steps
def per_site_calibration(encoder: "Encoder", scheme: QuantScheme, calibration, methods: Sequence[str],
                         texts: Sequence[str], calibration_texts: Optional[Sequence[str]] = None) -> QuantScheme:
    """``scheme`` with, per static int8 site, the calibration method whose quantized model has the best SQNR at
    that site on ``texts`` (one quantization and one report per method). ``calibration_texts``: for schemes that
    need them (SmoothQuant, GPTQ, bias correction)."""
    sqnr = {}
    for m in methods:
        q = encoder.quantize(scheme.replace(name=f"{scheme.name}/{m}", calibration=m), calibration=calibration,
                             calibration_texts=calibration_texts if scheme.needs_calibration_texts else None,
                             show_progress_bar=False)
        sqnr[m] = q.quant_report(list(texts), reference=encoder).set_index("site")["sqnr_db"]
    table = pd.DataFrame(sqnr).drop(index="embedding", errors="ignore")
    best = table.idxmax(axis=1)
    static = [s for s in encoder.site_names if scheme.for_site(s).mode == "static"
              and scheme.site_kind(s) == "int8"]
    overrides = tuple((s, (("calibration", best[s]),)) for s in static if best[s] != scheme.calibration)
    return scheme.replace(name=f"{scheme.name}+site-calibration", overrides=overrides + scheme.overrides)


def fallback_override(scheme: QuantScheme, site: str) -> Dict[str, Any]:
    """The more faithful precision a failing site falls back to: static int8 -> per-token dynamic int8, int4
    weights -> int8 weights, anything else -> fp32."""
    s = scheme.for_site(site)
    kind = scheme.site_kind(site)
    if kind == "int8" and s.mode == "static":
        return {"mode": "dynamic-token", "act_symmetric": True}
    if kind == "w4":
        return {"weights": "int8"}
    return {"weights": "fp32", "activations": "fp32"}


def _repair(search: _Search, row: Dict[str, Any]) -> None:
    """Give the worst sites of a configuration outside tolerance (by SQNR) more faithful precisions, 1, 2, 4, ...
    at a time, until it is within tolerance or cannot beat the best one within it."""
    scheme = search.schemes[row["configuration"]]
    enc = search.encoder_of(scheme)
    report = enc.quant_report(search.proxy_texts, reference=search.encoder)
    ranked = [s for s in report.sort_values("sqnr_db")["site"] if s in enc.site_names
              and enc.site_kinds()[s] != "fp32"]
    n = 1
    while n <= min(search.cfg.max_fallback_sites, len(ranked)) and not search.out_of_time():
        sites = ranked[:n]
        overrides = tuple((s, tuple(sorted(fallback_override(scheme, s).items()))) for s in sites)
        trial = scheme.replace(name=f"{scheme.name}+fallback{n}", overrides=overrides + scheme.overrides)
        new = search.try_scheme(trial, "repair", parent=scheme.name)
        new["n_fallback_sites"] = n
        if new["within_tolerance"] or not search.better(new, search.best_within()):
            return
        n *= 2


def _search(search: _Search) -> None:
    cfg = search.cfg
    candidates = list(cfg.candidates)
    from .._progress import tqdm

    bar = tqdm(candidates, desc="autoquantize: schemes", unit="scheme", disable=search.show_progress_bar is False)
    for scheme in bar:
        if search.out_of_time():
            break
        search.try_scheme(scheme, "scheme")
        if cfg.calibration_methods and scheme.needs_calibration and not search.out_of_time():
            variant = per_site_calibration(search.encoder, scheme, search.calibration, cfg.calibration_methods,
                                           search.proxy_texts, search.calibration_texts)
            if variant.overrides != scheme.overrides:
                search.try_scheme(variant, "site-calibration", parent=scheme.name)
    for row in sorted([r for r in search.rows if not r["within_tolerance"]],
                      key=lambda r: r["model_bytes"] if cfg.objective == "size" else -r["texts_per_s"]):
        if search.out_of_time():
            break
        if search.better(row, search.best_within()):
            _repair(search, row)


# ---------------------------------------------------------------------------------------------------- entry point
def autoquantize(encoder: "Encoder", dataset: "RetrievalDataset", *, test_dataset: Optional["RetrievalDataset"] = None,
                 metric: Optional[str] = None, tolerance: Optional[float] = None, objective: Optional[str] = None,
                 candidates: Optional[Sequence[Union[str, QuantScheme]]] = None,
                 time_budget_s: Optional[float] = None, calibration_texts: Optional[Sequence[str]] = None,
                 config: Optional[AutoQuantConfig] = None, show_progress_bar: Optional[bool] = None,
                 **overrides) -> AutoQuantResult:
    """Search quantization schemes for the fastest (``objective="throughput"``) or smallest (``"size"``) encoder
    whose ``metric`` on ``dataset`` (the dev split) is within ``tolerance`` of fp32, then score the choice on
    ``test_dataset`` (held out: never looked at by the search). See the module docstring for the steps.

    encoder: the fp32 encoder. dataset / test_dataset: RetrievalDatasets (e.g. ``medquad_retrieval("dev")`` and
    ``medquad_retrieval("test")``). calibration_texts: default, ``calibration_size`` dev texts (seeded).
    metric, tolerance, objective, candidates, time_budget_s: as in :class:`AutoQuantConfig` (defaults "ndcg@10",
    0.005 relative, "throughput", ``DEFAULT_CANDIDATES``, no budget); given ones replace ``config``'s.
    config: an :class:`AutoQuantConfig`; keyword ``overrides`` replace single fields.
    """
    from ..eval.datasets import RetrievalDataset
    from ..eval.objective import RetrievalObjective

    given = dict(metric=metric, tolerance=tolerance, objective=objective, time_budget_s=time_budget_s,
                 candidates=None if candidates is None else tuple(candidates))
    fields = {**{k: v for k, v in given.items() if v is not None}, **overrides}
    base = config.__dict__ if config is not None else {}
    cfg = AutoQuantConfig(**{**base, **fields})
    if not isinstance(dataset, RetrievalDataset):
        raise TypeError(f"dataset must be a RetrievalDataset (the dev split), got {type(dataset).__name__}")
    if test_dataset is not None and not isinstance(test_dataset, RetrievalDataset):
        raise TypeError(f"test_dataset must be a RetrievalDataset, got {type(test_dataset).__name__}")
    dev = RetrievalObjective(encoder, dataset, metric=cfg.metric, batch_size=cfg.batch_size,
                             show_progress_bar=show_progress_bar)
    if calibration_texts is None:
        calibration_texts = sample_calibration_texts(dev.query_texts, dev.corpus_texts, cfg.calibration_size,
                                                     cfg.seed)
    search = _Search(encoder, dev, cfg, limits.texts(calibration_texts), show_progress_bar)
    search.try_scheme(get_scheme("fp32"), "reference")
    _search(search)
    chosen = search.best_within()
    trace = pd.DataFrame(search.rows)
    trace["chosen"] = trace["configuration"] == chosen["configuration"]
    scheme = search.schemes[chosen["configuration"]]
    enc = search.encoder_of(scheme)
    table = _before_after(search, chosen, enc, test_dataset)
    info = {"allowed_loss": search.allowed, "stopped": search.stopped or "searched every candidate",
            "search_s": time.perf_counter() - search.t0, "dev": dev.describe(),
            "n_calibration_texts": len(search.calibration_texts), "n_configurations": len(trace)}
    trace.attrs.update(info)
    return AutoQuantResult(scheme=scheme, encoder=enc, trace=trace, table=table, config=cfg, info=info)


def _before_after(search: _Search, chosen: Dict[str, Any], enc: "Encoder",
                  test_dataset: Optional["RetrievalDataset"]) -> pd.DataFrame:
    """fp32 and the choice on dev (from the trace) and on the held-out split (scored now)."""
    from ..eval.objective import RetrievalObjective

    fp32 = search.rows[0]
    rows = []
    for split, row in (("dev", fp32), ("dev", chosen)):
        rows.append({"split": split, "configuration": row["configuration"], "value": row["value"],
                     "delta": row["delta"], "ci_low": row["ci_low"], "ci_high": row["ci_high"],
                     "relative_loss": row["relative_loss"], "texts_per_s": row["texts_per_s"],
                     "model_bytes": row["model_bytes"], "emb_cosine_mean": row["emb_cosine_mean"]})
    if test_dataset is not None:
        test = RetrievalObjective(search.encoder, test_dataset, metric=search.cfg.metric,
                                  batch_size=search.cfg.batch_size, show_progress_bar=search.show_progress_bar)
        for label, e in (("fp32", search.encoder), (chosen["configuration"], enc)):
            r = test.reference_result if e is search.encoder else test.score(e)
            src = fp32 if e is search.encoder else chosen
            rows.append({"split": "test", "configuration": label, "value": r.value, "delta": r.delta,
                         "ci_low": r.ci_low, "ci_high": r.ci_high, "relative_loss": r.relative_loss,
                         "texts_per_s": src["texts_per_s"], "model_bytes": src["model_bytes"],
                         "emb_cosine_mean": r.emb_cosine_mean})
    table = pd.DataFrame(rows)
    table["metric"] = search.objective.metric
    return table


__all__ = ["AutoQuantConfig", "AutoQuantResult", "DEFAULT_CANDIDATES", "autoquantize", "fallback_override",
           "measure_throughput", "per_site_calibration"]
