"""``medquant.eval.objective``: a retrieval metric on a dev set as a cheap, repeatable objective for quantization.

The fp32 reference is encoded and scored once; every encoder of the same model is then scored against it, query by
query, exactly as :func:`medquant.evaluate` scores a system (the model's query and document prompts, cosine unless
the model scores by dot product, the same search and trec_eval-equivalent metrics, the same paired t-test)::

    from medquant.eval.datasets import medquad_retrieval
    from medquant.eval.objective import RetrievalObjective

    fp32 = medquant.Encoder.from_pretrained()
    obj = RetrievalObjective(fp32, medquad_retrieval("dev", limit=300), metric="ndcg@10")
    r = obj.score(fp32.quantize("int8-dynamic"))
    r.delta, (r.ci_low, r.ci_high), r.relative_loss, r.within(0.005)

Cheaper still: sample the queries (``dataset.sample(n)``), or ``reuse_corpus=True`` to score each encoder's query
embeddings against the fp32 corpus embeddings (only the queries are encoded; this measures the query side alone).
"""
from __future__ import annotations

import dataclasses
import re
import time
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

from ..model import limits
from ..model.encoder import Encoder
from .datasets import RetrievalDataset
from .evaluate import embedding_settings, judged_qrels, ranking_metrics
from .metrics import check_ks, metric_columns
from .retrieval import search
from .stats import paired_comparison


@dataclass(frozen=True)
class ObjectiveResult:
    """One encoder scored by a :class:`RetrievalObjective`.

    Attributes
    ----------
    metric : str
        The metric column (e.g. ``"nDCG@10"``).
    value, reference : float
        Mean of the metric over the judged queries: this encoder's, the fp32 reference's.
    delta, ci_low, ci_high, p_value : float
        Paired t-test over queries of this encoder against fp32: mean difference (``value - reference`` up to
        rounding; the ``<metric>_delta`` of :func:`medquant.evaluate`), its confidence interval and p-value.
    relative_loss : float
        ``(reference - value) / reference`` (NaN when the reference is 0).
    emb_cosine_mean, emb_cosine_min : float
        Cosine of this encoder's embeddings to fp32's, per text (corpus documents; queries with
        ``reuse_corpus``).
    encode_s : float
        Seconds spent encoding (corpus and queries).
    n_queries : int
    confidence : float
        Confidence level of the interval.
    scheme : str
        The encoder's scheme name.
    per_query : pandas.DataFrame
        Every column of :func:`~medquant.eval.metrics.evaluate_run`, one row per judged query.
    """

    metric: str
    value: float
    reference: float
    delta: float
    ci_low: float
    ci_high: float
    p_value: float
    relative_loss: float
    emb_cosine_mean: float
    emb_cosine_min: float
    encode_s: float
    n_queries: int
    confidence: float
    scheme: str
    per_query: pd.DataFrame = field(repr=False, compare=False)

    @property
    def loss(self) -> float:
        """Points of the metric lost against fp32 (``-delta``; negative: a gain)."""
        return -self.delta

    def within(self, tolerance: float, relative: bool = True, *, conservative: bool = False) -> bool:
        """Whether the loss is at most ``tolerance``: a fraction of the reference value (``relative=True``, e.g.
        0.005 = 0.5%) or absolute points of the metric. ``conservative``: judge the worst end of the confidence
        interval (``-ci_low``) instead of the mean loss."""
        tolerance = limits.finite_float(tolerance, "tolerance", 0.0, float("inf"))
        relative = limits.flag(relative, "relative")
        loss = -self.ci_low if limits.flag(conservative, "conservative") else self.loss
        allowed = tolerance * self.reference if relative else tolerance
        return bool(loss <= allowed)

    def to_dict(self) -> dict:
        """Every field but ``per_query``."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "per_query"}


def metric_column(metric: str, ks: Sequence[int]) -> str:
    """The :func:`~medquant.eval.metrics.evaluate_run` column a metric name means, case-insensitively
    (``"ndcg@10"`` -> ``"nDCG@10"``); ValueError listing the columns of ``ks`` otherwise."""
    if not isinstance(metric, str):
        raise TypeError(f"metric must be a string such as 'ndcg@10', got {type(metric).__name__}")
    columns = metric_columns(ks)
    by_lower = {c.lower(): c for c in columns}
    key = metric.strip().lower()
    if key not in by_lower:
        raise ValueError(f"unknown metric {metric!r} for ks={tuple(ks)}; valid: {', '.join(columns)}")
    return by_lower[key]


def _metric_ks(metric: str, ks: Optional[Sequence[int]]) -> List[int]:
    """``ks`` checked, or (None) the cutoff of the metric name (``ndcg@5`` -> [5])."""
    if ks is not None:
        return check_ks(ks)
    m = re.fullmatch(r"\s*[A-Za-z0-9]+@(\d+)\s*", metric) if isinstance(metric, str) else None
    return check_ks([int(m.group(1))] if m else [10])


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine of two embedding matrices, in float64 (identical rows: exactly 1; a zero row: 0)."""
    x, y = np.asarray(a, np.float64), np.asarray(b, np.float64)
    norms = np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1)
    dots = np.sum(x * y, axis=1)
    same = np.all(x == y, axis=1) & (norms > 0)
    cos = np.divide(dots, norms, out=np.zeros_like(dots), where=norms > 0)
    return np.where(same, 1.0, np.clip(cos, -1.0, 1.0))


class RetrievalObjective:
    """A dev-set retrieval metric that scores any encoder of one model against its fp32 reference.

    Parameters
    ----------
    reference : Encoder
        The fp32 encoder (``is_fp32``); encoded and scored once, here.
    dataset : RetrievalDataset
        Queries, corpus and judgements (only judged queries are encoded and scored).
    metric : str
        Any column of :func:`~medquant.eval.metrics.evaluate_run` for ``ks``, case-insensitive (``"ndcg@10"``,
        ``"mrr@10"``, ``"R@100"``, ...).
    ks : sequence of int, optional
        Metric cutoffs computed (``per_query`` has every metric at each); default: the metric's own cutoff.
    k : int
        Documents retrieved per query (>= max(ks); clipped to the corpus size).
    batch_size : int
        Texts per forward pass.
    max_length : int, optional
        Token truncation length of every encoder scored (default: the reference's).
    confidence : float
        Confidence level of the paired t-test intervals.
    reuse_corpus : bool
        Score each encoder's query embeddings against the fp32 corpus embeddings (only queries are encoded;
        ``emb_cosine_*`` are then the queries'). Default False: both sides by the encoder, as deployed.
    show_progress_bar : bool, optional
        tqdm bars while encoding (default: only for long inputs).
    """

    def __init__(self, reference: Encoder, dataset: RetrievalDataset, metric: str = "ndcg@10",
                 ks: Optional[Sequence[int]] = None, k: int = 100, batch_size: int = 32,
                 max_length: Optional[int] = None, confidence: float = 0.95, *, reuse_corpus: bool = False,
                 show_progress_bar: Optional[bool] = None):
        if not isinstance(reference, Encoder):
            raise TypeError(f"reference must be an fp32 medquant Encoder, got {type(reference).__name__}")
        if not reference.is_fp32:
            raise ValueError(f"the reference must be fp32, got a {reference.scheme.name} encoder: pass its fp32 model "
                             "(e.g. quantized.reference or Encoder.from_pretrained(...))")
        if not isinstance(dataset, RetrievalDataset):
            raise TypeError(f"dataset must be a RetrievalDataset (e.g. medquad_retrieval('dev')), got "
                            f"{type(dataset).__name__}")
        self.ks = tuple(_metric_ks(metric, ks))
        self.metric = metric_column(metric, self.ks)
        k = limits.positive_int(k, "k")
        if k < self.ks[-1]:
            raise ValueError(f"k (results per query, {k}) must be >= max(ks) ({self.ks[-1]})")
        self.batch_size = limits.batch_size(batch_size)
        self.max_length = reference.max_length if max_length is None else \
            limits.max_length(max_length, reference.config.max_position_embeddings)
        self.confidence = limits.finite_float(confidence, "confidence", 0.0, 1.0, low_open=True, high_open=True)
        self.reuse_corpus = limits.flag(reuse_corpus, "reuse_corpus")
        self.show_progress_bar = show_progress_bar
        self.dataset = dataset
        self.qrels = judged_qrels(dataset)
        self.query_ids = [q for q in dataset.queries if q in self.qrels]
        self.query_texts = [dataset.queries[q] for q in self.query_ids]
        self.doc_ids = dataset.doc_ids
        self.corpus_texts = list(dataset.corpus.values())
        self.k = min(k, len(self.doc_ids))
        self.reference = reference
        self._tokenizer_json: Optional[str] = None
        _, self.embedding, self._cosine = embedding_settings(reference, None)
        q_emb, c_emb, seconds = self._encode(reference, None)
        self._ref_q, self._ref_c = q_emb, c_emb
        self._ref_pq = self._per_query(q_emb, c_emb)
        self.reference_result = self._result(reference, self._ref_pq, q_emb, c_emb, seconds)

    # -------------------------------------------------------------------------------------------- scoring
    def score(self, encoder: Encoder) -> ObjectiveResult:
        """Encode the dev set with ``encoder`` (same model as the reference, any precision) and compare it with
        fp32 query by query."""
        self.check_encoder(encoder)
        q_emb, c_emb, seconds = self._encode(encoder, self._ref_c if self.reuse_corpus else None)
        return self._result(encoder, self._per_query(q_emb, c_emb), q_emb, c_emb, seconds)

    def check_encoder(self, encoder: Encoder) -> None:
        """TypeError / ValueError unless ``encoder`` is an Encoder of the reference's model: the same config,
        tokenizer and sentence-embedding settings (pooling, prompts, similarity)."""
        if not isinstance(encoder, Encoder):
            raise TypeError(f"can only score a medquant Encoder, got {type(encoder).__name__}")
        ref = self.reference
        if encoder.config != ref.config:
            raise ValueError(f"encoder {encoder.name} ({encoder.scheme.name}) has another architecture than the "
                             f"reference {ref.name}: score it with an objective built on its own fp32 model")
        if encoder.tokenizer is not ref.tokenizer:
            if self._tokenizer_json is None:
                self._tokenizer_json = ref.tokenizer.to_str()
            if encoder.tokenizer.to_str() != self._tokenizer_json:
                raise ValueError(f"encoder {encoder.name} has another tokenizer than the reference {ref.name}")
        if dataclasses.replace(encoder.sentence_config, source="") != dataclasses.replace(ref.sentence_config,
                                                                                          source=""):
            raise ValueError(f"encoder {encoder.name} pools or prompts differently from the reference ({ref.name}): "
                             f"{encoder.sentence_config} vs {ref.sentence_config}")

    def _encode(self, enc: Encoder, corpus: Optional[np.ndarray]) -> Tuple[np.ndarray, np.ndarray, float]:
        """(query embeddings, corpus embeddings, seconds); ``corpus`` given: reused, not encoded."""
        settings, _, _ = embedding_settings(enc, None)
        kw = dict(batch_size=self.batch_size, max_length=self.max_length, show_progress_bar=self.show_progress_bar,
                  **settings)
        t0 = time.perf_counter()
        c_emb = enc.encode_document(self.corpus_texts, **kw) if corpus is None else corpus
        q_emb = enc.encode_query(self.query_texts, **kw)
        return q_emb, c_emb, time.perf_counter() - t0

    def _per_query(self, q_emb: np.ndarray, c_emb: np.ndarray) -> pd.DataFrame:
        scores, idx = search(q_emb, c_emb, k=self.k, normalize=self._cosine)
        return ranking_metrics(self.qrels, scores, idx, self.query_ids, self.doc_ids, self.ks)

    def _result(self, enc: Encoder, pq: pd.DataFrame, q_emb: np.ndarray, c_emb: np.ndarray,
                seconds: float) -> ObjectiveResult:
        base = self._ref_pq[self.metric]
        c = paired_comparison(base, pq[self.metric], test="ttest", confidence=self.confidence)
        ref_value = float(base.mean())
        cos = _cosines(q_emb, self._ref_q) if self.reuse_corpus else _cosines(c_emb, self._ref_c)
        return ObjectiveResult(
            metric=self.metric, value=float(pq[self.metric].mean()), reference=ref_value, delta=c.delta,
            ci_low=c.ci_low, ci_high=c.ci_high, p_value=c.p_value,
            relative_loss=(ref_value - float(pq[self.metric].mean())) / ref_value if ref_value else float("nan"),
            emb_cosine_mean=float(cos.mean()), emb_cosine_min=float(cos.min()), encode_s=float(seconds),
            n_queries=len(pq), confidence=self.confidence, scheme=enc.scheme.name, per_query=pq)

    # -------------------------------------------------------------------------------------------- description
    @property
    def n_queries(self) -> int:
        return len(self.query_ids)

    @property
    def n_docs(self) -> int:
        return len(self.doc_ids)

    def describe(self) -> dict:
        """What the objective measures: metric, dataset, sizes and encoding settings."""
        return {"metric": self.metric, "dataset": self.dataset.name, "n_queries": self.n_queries,
                "n_docs": self.n_docs, "ks": list(self.ks), "k": self.k, "max_length": self.max_length,
                "batch_size": self.batch_size, "confidence": self.confidence, "reuse_corpus": self.reuse_corpus,
                "embedding": self.embedding, "reference": str(self.reference.name),
                "reference_value": self.reference_result.value}

    def __repr__(self) -> str:
        return (f"RetrievalObjective({self.metric} on {self.dataset.name}: {self.n_queries} queries, "
                f"{self.n_docs} documents, fp32 {self.reference_result.value:.4f})")


__all__ = ["ObjectiveResult", "RetrievalObjective", "metric_column"]
