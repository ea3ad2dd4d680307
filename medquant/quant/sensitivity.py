"""Sensitivity of a retrieval metric to quantizing one part of an encoder at a time.

For every *unit* (one site, a group of sites, or the int8 word-embedding table) a hybrid encoder is built: the
fp32 reference with only that unit's tensors and site specs taken from a quantized encoder. Each hybrid is scored
on a dev set by a :class:`~medquant.eval.objective.RetrievalObjective` (metric and paired t-test against fp32,
cosine of its embeddings to fp32's), and the units are ranked by the metric they lose. Next to the metric stand two
cheap proxies - the per-site SQNR of the fully quantized encoder (:meth:`Encoder.quant_report`) and the embedding
cosine of each hybrid - with their Spearman rank agreement with the metric and a sentence naming the units each
proxy misranks most::

    from medquant.quant.sensitivity import sensitivity

    q = fp32.quantize("int8-static-asym", calibration_texts=texts)
    df = sensitivity(q, RetrievalObjective(fp32, medquad_retrieval("dev", limit=300)))
    df.head(10), df.attrs["rank_agreement"], df.attrs["proxy_note"]
    medquant.eval.plots.plot_sensitivity(df)
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Union

import numpy as np
import pandas as pd

from ..model.architectures import SITE_SUFFIXES, WORD_EMBEDDING_SCALES, resolve_alias, site_module

if TYPE_CHECKING:  # pragma: no cover
    from ..eval.objective import ObjectiveResult, RetrievalObjective
    from ..model.encoder import Encoder

#: Group units: every layer's site of one module.
GROUPS: Dict[str, str] = dict(zip(("qkv", "attention-output", "ffn-in", "ffn-out"), SITE_SUFFIXES))
#: The unit of the word-embedding table.
EMBEDDINGS = "embeddings"
#: The proxies compared with the metric: column of the result -> how it is named in the note.
PROXIES = {"sqnr_db": "per-site SQNR", "emb_cosine_mean": "embedding cosine"}
#: Units at which a bar is shown when ``show_progress_bar`` is None.
AUTO_PROGRESS_UNITS = 8


# ---------------------------------------------------------------------------------------------------- units
def has_int8_embeddings(encoder: "Encoder") -> bool:
    """Whether ``encoder`` stores its word-embedding table as int8 rows."""
    return WORD_EMBEDDING_SCALES in encoder.storage_tensors(EMBEDDINGS)


def sensitivity_units(quantized: "Encoder", units: Union[str, Sequence[str]] = "sites") -> Dict[str, List[str]]:
    """Unit name -> the sites it takes from ``quantized`` (``"embeddings"``: none, the table only).

    ``"sites"``: every site ``quantized`` does not keep in fp32, plus ``"embeddings"`` when its table is int8;
    ``"groups"``: ``GROUPS`` (the quantized sites of that module in every layer; groups with none are left out)
    plus ``"embeddings"``; a list: those units, each a site name (a Hugging Face part such as
    ``...attention.self.query`` means its fused site), a group name or ``"embeddings"``.
    """
    kinds = quantized.site_kinds()
    quantized_sites = [s for s, k in kinds.items() if k != "fp32"]
    emb = has_int8_embeddings(quantized)
    if isinstance(units, str):
        if units == "sites":
            out = {s: [s] for s in quantized_sites}
        elif units == "groups":
            out = {g: [s for s in quantized_sites if site_module(s) == suffix] for g, suffix in GROUPS.items()}
            out = {g: sites for g, sites in out.items() if sites}
        else:
            raise ValueError(f"units must be 'sites', 'groups' or a list of unit names, got {units!r}")
        if emb:
            out[EMBEDDINGS] = []
        return out
    out = {}
    for unit in units:
        if not isinstance(unit, str):
            raise TypeError(f"a unit must be a site name, a group ({', '.join(GROUPS)}) or {EMBEDDINGS!r}, got "
                            f"{unit!r}")
        name = resolve_alias(unit)
        if name in out:
            raise ValueError(f"unit {unit!r} is given twice")
        if name == EMBEDDINGS:
            if not emb:
                raise ValueError(f"{quantized.scheme.name} keeps the word embeddings in fp32: no {EMBEDDINGS!r} unit")
            out[name] = []
        elif name in GROUPS:
            out[name] = [s for s in quantized_sites if site_module(s) == GROUPS[name]]
            if not out[name]:
                raise ValueError(f"{quantized.scheme.name} keeps every {GROUPS[name]} site in fp32: group {name!r} "
                                 "is empty")
        elif name in kinds:
            out[name] = [name]
        else:
            raise ValueError(f"unknown unit {unit!r}: a site name (e.g. {next(iter(kinds))!r}), a group "
                             f"({', '.join(GROUPS)}) or {EMBEDDINGS!r}")
    if not out:
        raise ValueError("units is empty")
    return out


# ---------------------------------------------------------------------------------------------------- hybrids
def _reference_of(quantized: "Encoder", reference: Optional["Encoder"]) -> "Encoder":
    ref = reference if reference is not None else quantized.reference
    if ref is None:
        raise ValueError(f"{quantized.name} ({quantized.scheme.name}) has no fp32 reference (it was loaded "
                         "quantized): pass reference=Encoder.from_pretrained(<its fp32 model>)")
    if not ref.is_fp32:
        raise ValueError(f"the reference must be fp32, got a {ref.scheme.name} encoder")
    if ref.config != quantized.config:
        raise ValueError(f"{quantized.name} has another architecture than the reference {ref.name}")
    return ref


def hybrid_encoder(quantized: "Encoder", unit: Union[str, Sequence[str]], reference: Optional["Encoder"] = None,
                   name: Optional[str] = None) -> "Encoder":
    """The fp32 reference with only ``unit`` quantized as in ``quantized``: its tensors and site specs (and the
    int8 word-embedding table for ``"embeddings"``). ``unit`` is a unit name (see :func:`sensitivity_units`) or a
    list of site names (``"embeddings"`` may be one of them). The scheme is ``quantized``'s, named
    ``<scheme>[<unit>]``, keeping every other site in fp32 (so the hybrid saves and reloads like any scheme).
    ``reference``: the fp32 encoder (default ``quantized.reference``)."""
    ref = _reference_of(quantized, reference)
    if isinstance(unit, str):
        label, units = unit, sensitivity_units(quantized, [unit])
    else:
        units = sensitivity_units(quantized, list(unit))
        label = name or "+".join(units)
    sites = [s for unit_sites in units.values() for s in unit_sites]
    emb = EMBEDDINGS in units
    storage, specs = ref.storage_tensors(), ref.site_specs()
    q_specs, kinds = quantized.site_specs(), quantized.site_kinds()
    for s in sites:
        for key in ref.storage_tensors(s):
            del storage[key]
        storage.update(quantized.storage_tensors(s))
        specs[s] = q_specs[s]
    if emb:
        storage.update(quantized.storage_tensors(EMBEDDINGS))
    chosen = set(sites)
    scheme = quantized.scheme.replace(
        name=f"{quantized.scheme.name}[{name or label}]",
        keep_fp32=tuple(s for s in kinds if s not in chosen or kinds[s] == "fp32"),
        keep_bf16=tuple(s for s in sites if kinds[s] == "bf16"),
        embeddings=quantized.scheme.embeddings if emb else "fp32")
    return ref.with_storage(storage, specs, scheme, fp32=ref.fp32_params, reference=ref)


# ---------------------------------------------------------------------------------------------------- analysis
def _proxy_texts(objective: "RetrievalObjective", proxy_texts: Union[int, Sequence[str]]) -> List[str]:
    """The texts of the SQNR report: given ones, or that many corpus documents of the objective, evenly spread."""
    from ..model import limits

    if isinstance(proxy_texts, (int, np.integer)) and not isinstance(proxy_texts, bool):
        n = limits.positive_int(proxy_texts, "proxy_texts")
        docs = objective.corpus_texts
        idx = np.unique(np.linspace(0, len(docs) - 1, num=min(n, len(docs))).round().astype(int))
        return [docs[i] for i in idx]
    return limits.texts(proxy_texts)


def _unit_row(unit: str, sites: List[str], kinds: Dict[str, str], emb_kind: str, sqnr: pd.Series,
              r: "ObjectiveResult") -> Dict:
    """One unit's result row (``sqnr``: the report's SQNR by site)."""
    m = r.metric
    unit_kinds = sorted({kinds[s] for s in sites} | ({emb_kind} if not sites else set()))
    return {"unit": unit, "kind": ",".join(unit_kinds), "n_sites": len(sites), m: r.value,
            f"{m}_delta": r.delta, f"{m}_ci_low": r.ci_low, f"{m}_ci_high": r.ci_high, f"{m}_p": r.p_value,
            "loss": r.loss, "relative_loss": r.relative_loss, "emb_cosine_mean": r.emb_cosine_mean,
            "emb_cosine_min": r.emb_cosine_min,
            "sqnr_db": float(sqnr.loc[sites].mean()) if sites else float("nan"), "encode_s": r.encode_s}


def _ranked(rows: List[Dict]) -> pd.DataFrame:
    """Rows sorted by metric loss (worst first) with the metric's and each proxy's rank (1 = most harmful)."""
    df = pd.DataFrame(rows)
    df = df.sort_values("loss", ascending=False, kind="stable").reset_index(drop=True)
    df.insert(df.columns.get_loc("loss") + 2, "rank", df["loss"].rank(ascending=False, method="min").astype(int))
    df["sqnr_rank"] = df["sqnr_db"].rank(ascending=True, method="min")
    df["cosine_rank"] = df["emb_cosine_mean"].rank(ascending=True, method="min")
    return df


def rank_agreement(df: pd.DataFrame) -> Dict[str, float]:
    """Spearman correlation of the metric loss with each proxy's harm (-SQNR, 1 - embedding cosine) over the units
    that have the proxy (NaN for fewer than two)."""
    loss = df["loss"].astype(float)
    return {"sqnr_db": float(loss.corr(-df["sqnr_db"].astype(float), method="spearman")),
            "emb_cosine": float(loss.corr(1.0 - df["emb_cosine_mean"].astype(float), method="spearman"))}


def _misranked(df: pd.DataFrame, rank_col: str, n: int = 3) -> List[str]:
    """The ``n`` units whose proxy rank is furthest from their metric rank, as ``unit (metric #a, proxy #b)``."""
    d = df[np.isfinite(df[rank_col].astype(float))]
    gap = (d["rank"] - d[rank_col]).abs()
    worst = d.assign(_gap=gap)[gap > 0].sort_values("_gap", ascending=False, kind="stable").head(n)
    return [f"{r.unit} (metric #{int(r.rank)}, proxy #{int(getattr(r, rank_col))})" for r in worst.itertuples()]


def proxy_note(df: pd.DataFrame, metric: str) -> str:
    """A few sentences on how far the metric's ranking is from noise, and how each proxy ranks the units: its
    Spearman agreement with the metric and the units it misranks most."""
    n = len(df)
    sig = int((df[f"{metric}_ci_high"] < 0).sum())
    parts = [f"{sig} of {n} units lose {metric} significantly (CI below 0)"
             + ("; the metric's order of the others is within noise." if sig < n else ".")]
    agreement = rank_agreement(df)
    for (col, label), rho, rank_col in zip(PROXIES.items(), agreement.values(), ("sqnr_rank", "cosine_rank")):
        if not np.isfinite(rho):
            parts.append(f"{label}: fewer than two units to compare.")
            continue
        worst = _misranked(df, rank_col)
        tail = f"; it misranks most {', '.join(worst)}." if worst else "; it ranks every unit as the metric does."
        parts.append(f"{label} vs {metric} loss: Spearman {rho:+.2f}{tail}")
    return " ".join(parts)


def _progress(units: Dict[str, List[str]], show_progress_bar: Optional[bool]):
    show = len(units) >= AUTO_PROGRESS_UNITS if show_progress_bar is None else bool(show_progress_bar)
    if not show:
        return units.items()
    from .._progress import tqdm

    return tqdm(units.items(), desc="sensitivity", unit="unit", total=len(units))


def sensitivity(quantized: "Encoder", objective: "RetrievalObjective", *,
                units: Union[str, Sequence[str]] = "sites", reference: Optional["Encoder"] = None,
                proxy_texts: Union[int, Sequence[str]] = 64, show_progress_bar: Optional[bool] = None
                ) -> pd.DataFrame:
    """Quantize one unit at a time and rank the units by the retrieval metric they cost.

    Parameters
    ----------
    quantized : Encoder
        A quantized encoder (e.g. from :meth:`Encoder.quantize`) whose units are tried one by one.
    objective : RetrievalObjective
        Scores each hybrid on its dev set against fp32 (metric, paired t-test, embedding cosine).
    units : "sites", "groups" or list of str
        See :func:`sensitivity_units`.
    reference : Encoder, optional
        The fp32 encoder the hybrids start from (default ``quantized.reference``).
    proxy_texts : int or list of str
        Texts of the per-site SQNR report of ``quantized`` (an int: that many of the objective's documents).
    show_progress_bar : bool, optional
        A tqdm bar over the units (default: from ``AUTO_PROGRESS_UNITS`` units on).

    Returns
    -------
    pandas.DataFrame
        One row per unit, worst first: ``unit``, ``kind`` (the unit's quantized kinds), ``n_sites``, the metric
        (e.g. ``nDCG@10``) and its ``_delta``, ``_ci_low``, ``_ci_high``, ``_p`` (paired t-test against fp32),
        ``loss`` (-delta), ``relative_loss``, ``rank`` (1 = largest loss), ``emb_cosine_mean`` /
        ``emb_cosine_min`` (the hybrid's embeddings against fp32's), ``sqnr_db`` (mean SQNR of the unit's sites
        in the fully quantized encoder; NaN for the embedding table), ``encode_s``, ``sqnr_rank`` and
        ``cosine_rank`` (each proxy's rank, 1 = most harmful by it). ``attrs``: ``metric``, ``reference_value``,
        ``scheme``, ``objective`` (its description), ``rank_agreement`` ({"sqnr_db", "emb_cosine"}: Spearman of
        the loss with each proxy's harm), ``proxy_note``, ``report`` (the SQNR report), ``wall_s``.
    """
    t0 = time.perf_counter()
    ref = _reference_of(quantized, reference)
    objective.check_encoder(quantized)
    objective.check_encoder(ref)
    chosen = sensitivity_units(quantized, units)
    report = quantized.quant_report(_proxy_texts(objective, proxy_texts), reference=ref,
                                    max_length=objective.max_length)
    sqnr = report.set_index("site")["sqnr_db"]
    kinds = quantized.site_kinds()
    emb_kind = "int8" if has_int8_embeddings(quantized) else "fp32"
    rows = []
    for unit, sites in _progress(chosen, show_progress_bar):
        result = objective.score(hybrid_encoder(quantized, unit, ref))
        rows.append(_unit_row(unit, sites, kinds, emb_kind, sqnr, result))
    df = _ranked(rows)
    metric = objective.metric
    df.attrs.update({"metric": metric, "reference_value": objective.reference_result.value,
                     "scheme": quantized.scheme.name, "objective": objective.describe(),
                     "rank_agreement": rank_agreement(df), "proxy_note": proxy_note(df, metric), "report": report,
                     "wall_s": time.perf_counter() - t0})
    return df


__all__ = ["EMBEDDINGS", "GROUPS", "has_int8_embeddings", "hybrid_encoder", "proxy_note", "rank_agreement",
           "sensitivity", "sensitivity_units"]
