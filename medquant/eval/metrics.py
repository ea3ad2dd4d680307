"""Ranking metrics with trec_eval semantics, implemented with numpy (pytrec_eval serves as the test oracle).

trec_eval conventions mirrored here (checked against pytrec_eval-terrier):

* Ranking: each query's run is sorted by score descending, ties by document id descending (byte-wise string
  comparison, ``strcmp``), whatever order the run lists them in. E.g. with equal scores ``"b"`` ranks above
  ``"a"`` and ``"d9"`` above ``"d10"``.
* Relevance: a document is relevant iff its grade >= ``relevance_level`` (default 1); grade 0, negative grades
  and unjudged documents are non-relevant. ``num_rel`` counts the relevant judgements of the query.
* nDCG gains are the grades themselves, clipped at 0 (negative grades gain 0), independent of
  ``relevance_level``; discount ``1 / log2(rank + 1)``; the ideal ranking sorts all positive grades of the
  query; nDCG is 0 when the ideal DCG is 0.
* ``P@k`` divides by ``k`` even when fewer than ``k`` documents were retrieved; ``R@k`` and ``MAP@k``
  (trec_eval ``map_cut_k``) divide by ``num_rel`` (not ``min(k, num_rel)``); every measure is 0 for a query
  without relevant documents (such queries are still evaluated, as trec_eval does).
* ``MRR@k`` is trec_eval's ``recip_rank`` computed on the top ``k``; ``F1@k`` is the harmonic mean of
  ``P@k`` and ``R@k`` (0 when both are 0) - it has no trec_eval counterpart.
* Queries: those with at least one judgement in ``qrels`` (an empty qrels entry is ignored, as trec_eval does)
  that are in the run, even with an empty result list. Judged queries missing from the run get all-zero rows
  with ``missing="zero"`` (like ``trec_eval -c``, the default) or are dropped with ``missing="drop"``
  (pytrec_eval's behaviour). Run queries without judgements are ignored.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

Qrels = Mapping[str, Mapping[str, int]]
Run = Mapping[str, Mapping[str, float]]
DEFAULT_KS: Tuple[int, ...] = (1, 3, 5, 10, 100)


@dataclass(frozen=True)
class Metric:
    """One metric family, computed at every cutoff ``k``.

    compute(r, k, cols): the per-query column at cutoff k with numpy, from the ranked statistics ``r`` (see
    ``_ranked_stats``) and the columns computed before it. trec: the pytrec_eval measure giving the same value
    (``{k}`` for the cutoff); from_trec(measures, recip_rank_at_k, k, row): the value from pytrec_eval results
    otherwise.
    """

    family: str
    compute: Callable[[SimpleNamespace, int, Dict[str, np.ndarray]], np.ndarray]
    trec: Optional[str] = None
    from_trec: Optional[Callable[[Mapping[str, float], Mapping[str, float], int, Dict[str, float]], float]] = None

    def trec_value(self, measures: Mapping[str, float], rr: Mapping[str, float], k: int,
                   row: Dict[str, float]) -> float:
        if self.trec is not None:
            return measures.get(self.trec.format(k=k), 0.0)
        return self.from_trec(measures, rr, k, row)


def _ndcg(r, k, cols):
    j = k - 1
    return np.where(r.idcg[:, j] > 0, r.dcg[:, j] / np.where(r.idcg[:, j] > 0, r.idcg[:, j], 1.0), 0.0)


def _f1(p, r):
    return np.where(p + r > 0, 2 * p * r / np.where(p + r > 0, p + r, 1.0), 0.0)


def _f1_from_trec(measures, rr, k, row):
    p, r = row[f"P@{k}"], row[f"R@{k}"]
    return 2 * p * r / (p + r) if p + r > 0 else 0.0


#: Every metric family, in column order; a new retrieval metric is one entry here. F1 reads P and R, listed before it.
METRICS: Tuple[Metric, ...] = (
    Metric("nDCG", _ndcg, trec="ndcg_cut_{k}"),
    Metric("P", lambda r, k, cols: r.hits[:, k - 1] / k, trec="P_{k}"),
    Metric("R", lambda r, k, cols: np.where(r.has_rel, r.hits[:, k - 1] / r.safe_rel, 0.0), trec="recall_{k}"),
    Metric("F1", lambda r, k, cols: _f1(cols[f"P@{k}"], cols[f"R@{k}"]), from_trec=_f1_from_trec),
    Metric("MRR", lambda r, k, cols: np.where(r.first <= k, 1.0 / r.first, 0.0),
           from_trec=lambda measures, rr, k, row: rr.get("recip_rank", 0.0)),
    Metric("MAP", lambda r, k, cols: np.where(r.has_rel, r.ap_terms[:, k - 1] / r.safe_rel, 0.0),
           trec="map_cut_{k}"),
)
METRIC_FAMILIES: Tuple[str, ...] = tuple(m.family for m in METRICS)


def trec_order(docs: Mapping[str, float]) -> List[Tuple[str, float]]:
    """A query's results in trec_eval order: score descending, then document id descending.

    Parameters
    ----------
    docs : mapping of str to float

    Returns
    -------
    list of (doc id, score)
    """
    return sorted(docs.items(), key=lambda kv: (kv[1], kv[0]), reverse=True)


def metric_columns(ks: Sequence[int] = DEFAULT_KS) -> List[str]:
    """Column names produced by :func:`evaluate_run`, e.g. ``nDCG@10``, ``P@5``, ``R@100``, ``MRR@10``.

    Parameters
    ----------
    ks : sequence of int

    Returns
    -------
    list of str
    """
    return [f"{fam}@{k}" for fam in METRIC_FAMILIES for k in check_ks(ks)]


def check_ks(ks: Sequence[int]) -> List[int]:
    """Metric cutoffs: distinct positive ints, ascending. A fraction, a bool, a string or a single int (instead of
    a sequence) is refused rather than rounded or guessed."""
    from ..model.limits import positive_int

    if isinstance(ks, (str, bytes)) or not hasattr(ks, "__iter__"):
        raise TypeError(f"ks must be a sequence of positive ints such as (1, 10, 100), got {ks!r}")
    out = sorted({positive_int(k, "every cutoff in ks") for k in ks})
    if not out:
        raise ValueError("ks is empty: give at least one cutoff, e.g. (10,)")
    return out


def _query_ids(qrels: Qrels, run: Run, missing: str) -> List[str]:
    if missing not in ("zero", "drop"):
        raise ValueError("missing must be 'zero' or 'drop'")
    judged = [q for q, j in qrels.items() if len(j) > 0]
    if missing == "drop":
        return [q for q in judged if q in run]
    return judged


def _ranked_stats(qrels: Qrels, run: Run, kmax: int, relevance_level: int, qids: List[str]) -> SimpleNamespace:
    """Per query, cumulated over ranks 1..kmax: DCG, ideal DCG, relevant hits, AP terms; first relevant rank."""
    nq = len(qids)
    gains = np.zeros((nq, kmax), dtype=np.float64)
    rel = np.zeros((nq, kmax), dtype=bool)
    ideal = np.zeros((nq, kmax), dtype=np.float64)
    num_rel = np.zeros(nq, dtype=np.float64)
    num_ret = np.zeros(nq, dtype=np.int64)
    for i, q in enumerate(qids):
        judged = qrels[q]
        grades_all = list(judged.values())
        num_rel[i] = sum(1 for g in grades_all if g >= relevance_level)
        pos = sorted((g for g in grades_all if g > 0), reverse=True)[:kmax]
        ideal[i, :len(pos)] = pos
        docs = run.get(q)
        if not docs:
            continue
        num_ret[i] = len(docs)
        ranked = trec_order(docs)[:kmax]
        g = np.array([judged.get(d, 0) for d, _ in ranked], dtype=np.float64)
        gains[i, :g.size] = np.maximum(g, 0.0)
        rel[i, :g.size] = g >= relevance_level
    ranks = np.arange(1, kmax + 1, dtype=np.float64)
    disc = 1.0 / np.log2(ranks + 1.0)
    hits = np.cumsum(rel, axis=1).astype(np.float64)
    has_rel = num_rel > 0
    return SimpleNamespace(
        dcg=np.cumsum(gains * disc, axis=1), idcg=np.cumsum(ideal * disc, axis=1), hits=hits,
        ap_terms=np.cumsum(np.where(rel, hits / ranks, 0.0), axis=1),
        first=np.where(rel.any(axis=1), rel.argmax(axis=1) + 1, kmax + 1),
        has_rel=has_rel, safe_rel=np.where(has_rel, num_rel, 1.0), num_rel=num_rel, num_ret=num_ret,
    )


def _evaluate_numpy(qrels: Qrels, run: Run, ks: List[int], relevance_level: int, qids: List[str]) -> pd.DataFrame:
    r = _ranked_stats(qrels, run, max(ks), relevance_level, qids)
    cols: Dict[str, np.ndarray] = {}
    with np.errstate(divide="ignore", invalid="ignore"):
        for metric in METRICS:
            for k in ks:
                cols[f"{metric.family}@{k}"] = metric.compute(r, k, cols)
    df = pd.DataFrame(cols, index=pd.Index(qids, name="qid"))
    df["num_rel"] = r.num_rel.astype(np.int64)
    df["num_ret"] = r.num_ret
    return df


def _evaluate_pytrec(qrels: Qrels, run: Run, ks: List[int], relevance_level: int, qids: List[str]) -> pd.DataFrame:
    import pytrec_eval

    qset = set(qids)
    q_in = {q: {d: int(g) for d, g in qrels[q].items()} for q in qids}
    r_in = {q: {d: float(s) for d, s in run[q].items()} for q in qids if q in run}
    measures = {m.trec.format(k=k) for m in METRICS if m.trec is not None for k in ks}
    res = pytrec_eval.RelevanceEvaluator(q_in, measures, relevance_level=int(relevance_level)).evaluate(r_in)
    rr_eval = pytrec_eval.RelevanceEvaluator(q_in, {"recip_rank"}, relevance_level=int(relevance_level))
    rr: Dict[int, Dict[str, Dict[str, float]]] = {}
    for k in ks:
        cut = {q: dict(trec_order(docs)[:k]) for q, docs in r_in.items()}
        rr[k] = rr_eval.evaluate(cut)
    rows = []
    for q in qids:
        row: Dict[str, float] = {}
        m = res.get(q, {})
        for metric in METRICS:
            for k in ks:
                row[f"{metric.family}@{k}"] = metric.trec_value(m, rr[k].get(q, {}), k, row)
        rows.append(row)
    df = pd.DataFrame(rows, index=pd.Index(qids, name="qid"), columns=metric_columns(ks))
    df["num_rel"] = [sum(1 for g in qrels[q].values() if g >= relevance_level) for q in qids]
    df["num_ret"] = [len(run.get(q, {})) for q in qids]
    assert qset == set(df.index)
    return df


def evaluate_run(qrels: Qrels, run: Run, ks: Sequence[int] = DEFAULT_KS, *, relevance_level: int = 1,
                 missing: str = "zero", backend: str = "numpy") -> pd.DataFrame:
    """Per-query metrics of a run.

    Parameters
    ----------
    qrels : mapping str -> mapping str -> int
        Graded judgements ``{query id: {doc id: grade}}``.
    run : mapping str -> mapping str -> float
        Scores ``{query id: {doc id: score}}``; the order of entries is irrelevant (see module docstring).
    ks : sequence of int
        Cutoffs.
    relevance_level : int
        Minimum grade counted as relevant by the binary measures (>= 1).
    missing : {"zero", "drop"}
        Judged queries absent from the run: all-zero rows, or left out.
    backend : {"numpy", "pytrec_eval"}
        ``"pytrec_eval"`` computes the same table with pytrec_eval (MRR@k via ``recip_rank`` on the top-k run).

    Returns
    -------
    pandas.DataFrame
        Indexed by query id (``qid``), in qrels order; columns ``nDCG@k``, ``P@k``, ``R@k``, ``F1@k``,
        ``MRR@k``, ``MAP@k`` for every ``k`` (ascending), then ``num_rel`` and ``num_ret``.
    """
    from ..model.limits import positive_int

    relevance_level = positive_int(relevance_level, "relevance_level")
    ks_ = check_ks(ks)
    qids = _query_ids(qrels, run, missing)
    if backend == "numpy":
        return _evaluate_numpy(qrels, run, ks_, int(relevance_level), qids)
    if backend == "pytrec_eval":
        return _evaluate_pytrec(qrels, run, ks_, int(relevance_level), qids)
    raise ValueError("backend must be 'numpy' or 'pytrec_eval'")


def summarize(df: pd.DataFrame) -> pd.Series:
    """Mean of every metric column (those named ``<metric>@<k>``) of an :func:`evaluate_run` table.

    Parameters
    ----------
    df : pandas.DataFrame

    Returns
    -------
    pandas.Series
        Named ``"mean"``; also holds ``n_queries``.
    """
    cols = [c for c in df.columns if "@" in str(c)]
    out = df[cols].mean(axis=0) if len(df) else pd.Series(0.0, index=cols)
    out = out.astype(np.float64)
    out["n_queries"] = float(len(df))
    out.name = "mean"
    return out


__all__ = ["DEFAULT_KS", "METRICS", "METRIC_FAMILIES", "Metric", "check_ks", "evaluate_run", "metric_columns", "summarize", "trec_order"]
