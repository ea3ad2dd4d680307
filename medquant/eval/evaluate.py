"""``medquant.eval.evaluate``: what a quantization scheme costs in retrieval quality, and what it buys in speed and bytes.

One call encodes a retrieval collection with an fp32 baseline and with every requested scheme, searches it,
scores the runs with trec_eval semantics and compares each system with fp32 query by query::

    import medquant
    from medquant.eval.datasets import medquad_retrieval

    ds = medquad_retrieval("dev", limit=200)
    df = medquant.evaluate(["int8-dynamic", "int8-static-asym"], ds)       # + an fp32 baseline, always
    df[["scheme", "nDCG@10", "nDCG@10_delta", "nDCG@10_ci_low", "nDCG@10_ci_high", "corpus_texts_per_s"]]
    df.attrs["per_query"]["int8-dynamic"]                                  # per-query metrics of one system

Besides the model schemes, the fp32 corpus embeddings are also stored as a quantized *index* (int8 codes, packed
sign bits) and searched with and without float rescoring of a candidate list; those rows are named
``fp32+index-int8``, ``fp32+index-binary+rescore4`` and so on. They quantize the stored vectors, not the model,
so their encode throughput and model size are those of fp32 and only ``index_bytes`` changes.
"""
from __future__ import annotations

import dataclasses
import os
import re
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd

from ..model.checkpoint import DEFAULT_MODEL
from ..model.encoder import Encoder
from ..model.limits import finite_float, flag, positive_int, positive_int_or_none
from ..model.limits import seed as check_seed
from ..model.limits import texts as check_texts
from ..quant.quantize import calibrate_for
from ..quant.schemes import QuantScheme, get_scheme
from . import runinfo
from .calibration_data import (
    CalibrationSourceError, default_source, given_texts_info, held_out_texts, resolve_source,
)
from .datasets import RetrievalDataset, check_passage_window, is_sharded, load_beir, medquad_retrieval, split_corpus
from .metrics import DEFAULT_KS, check_ks, evaluate_run, metric_columns, summarize
from .retrieval import (
    INDEX_KINDS, check_index_kind, check_index_scoring, quantize_index, run_from_search, search, search_passages,
    write_trec_run,
)
from .stats import TESTS, holm_adjust, paired_comparison
from ..model.sentence import check_pooling



@dataclass
class EvalConfig:
    """Settings of :func:`evaluate`.

    Attributes
    ----------
    ks : tuple of int
        Metric cutoffs (``nDCG@k``, ``P@k``, ``R@k``, ``F1@k``, ``MRR@k``, ``MAP@k`` for each).
    k : int
        Documents retrieved per query (>= ``max(ks)``).
    batch_size : int
        Texts per forward pass.
    max_length : int, optional
        Token truncation length (default: the model's, 256 for all-MiniLM-L6-v2).
    calibration_size : int
        Texts used to calibrate static int8 schemes (and SmoothQuant), drawn with ``seed`` from a held-out source
        and never from the evaluated texts: by default MedQuAD dev is calibrated on the test split and test on
        dev; other collections need ``calibration_source`` (see :mod:`medquant.eval.calibration_data`). Texts
        given as ``calibration_texts`` are used as given (all of them).
    n_boot : int
        Resamples of the paired comparison with fp32 when ``test`` is ``"bootstrap"`` or ``"randomization"``.
    test : {"ttest", "randomization", "bootstrap"}
        Paired test of every delta; its interval and p-value come from the same test (see
        :mod:`medquant.eval.stats`; the default paired t-test is deterministic and has no resampling floor).
    confidence : float
        Confidence level of the delta intervals (an interval excludes 0 iff ``p < 1 - confidence``).
    seed : int
        Seeds the calibration sample and the resampling tests (``test="bootstrap"`` / ``"randomization"``).
    main_metrics : tuple of str
        Metrics compared with fp32 (``<metric>_delta``, ``_ci_low``, ``_ci_high``, ``_p``, ``_p_holm`` columns).
    passages : bool
        Split documents into overlapping word windows (``max_words`` / ``stride``), embed every passage and score
        a document by its best passage (max-pooling). Index rows then search the top ``8 * k`` passages of the
        quantized index and keep each document's best one (exact for the documents returned; a row can hold fewer
        than ``k`` documents if those passages cover fewer).
    max_words, stride : int
        Passage window and step, in whitespace words.
    index_kinds : tuple of str
        Quantized indexes of the fp32 corpus embeddings to evaluate: ``"int8"``, ``"binary"`` (empty: none).
    index_scoring : {"codes", "asymmetric"}
        ``"codes"``: the query is quantized like the corpus and scored in the quantized domain (int8 code dot
        product, binary Hamming), as sentence-transformers does; ``"asymmetric"``: the float query is scored
        against the dequantized corpus. See :func:`medquant.eval.retrieval.quantize_index`.
    rescore_multiplier : int, optional
        If set (> 0), every index kind also gets a row whose top ``k * rescore_multiplier`` candidates are
        re-ranked with the float corpus embeddings.
    threads : int, optional
        oneDNN threads of every encoder (default: as loaded).
    warmup : bool
        Encode a handful of texts before timing each encoder.
    measure_disk : bool
        Write each model with ``save_pretrained`` to a temporary directory to measure its size on disk.
    pooling : str, optional
        Pooling of every encoder (default: each model's own, from its sentence-transformers files; see
        :attr:`medquant.Encoder.sentence_config`). Queries get the model's query prompt and documents its document
        prompt; vectors are compared by cosine, or by dot product when the model's ``similarity_fn_name`` is
        "dot" (its own normalisation then applies). The ``embedding`` column reports the effective choice.
    """

    ks: Tuple[int, ...] = DEFAULT_KS
    k: int = 100
    batch_size: int = 32
    max_length: Optional[int] = None
    calibration_size: int = 256
    n_boot: int = 2000
    test: str = "ttest"
    confidence: float = 0.95
    seed: int = 0
    main_metrics: Tuple[str, ...] = ("nDCG@10", "MRR@10", "R@100")
    passages: bool = False
    max_words: int = 160
    stride: int = 120
    index_kinds: Tuple[str, ...] = INDEX_KINDS
    index_scoring: str = "codes"
    rescore_multiplier: Optional[int] = 4
    threads: Optional[int] = None
    warmup: bool = True
    measure_disk: bool = True
    pooling: Optional[str] = None

    def __post_init__(self):
        self.ks = tuple(check_ks(self.ks))
        self.k = positive_int(self.k, "k")
        if self.k < self.ks[-1]:
            raise ValueError(f"k (results per query, {self.k}) must be >= max(ks) ({self.ks[-1]})")
        for name in ("batch_size", "calibration_size", "n_boot", "max_words", "stride"):
            setattr(self, name, positive_int(getattr(self, name), name))
        self.max_length = positive_int_or_none(self.max_length, "max_length")  # the model's range: at load
        if self.test not in TESTS:
            raise ValueError(f"test must be one of {', '.join(TESTS)}, got {self.test!r}")
        self.confidence = finite_float(self.confidence, "confidence", 0.0, 1.0, low_open=True, high_open=True)
        self.seed = check_seed(self.seed)
        for name in ("passages", "warmup", "measure_disk"):
            setattr(self, name, flag(getattr(self, name), name))
        if isinstance(self.main_metrics, str):
            self.main_metrics = (self.main_metrics,)
        self.main_metrics = tuple(self.main_metrics)
        known = set(metric_columns(self.ks))
        bad = [m for m in self.main_metrics if m not in known]
        if bad:
            raise ValueError(f"main_metrics {bad} are not computed for ks={self.ks} (e.g. nDCG@10, MRR@10, R@100)")
        if isinstance(self.index_kinds, str):
            self.index_kinds = (self.index_kinds,)
        self.index_kinds = tuple(self.index_kinds)
        for kind in self.index_kinds:
            check_index_kind(kind)
        check_index_scoring(self.index_scoring)
        if self.rescore_multiplier is not None:
            if isinstance(self.rescore_multiplier, (int, np.integer)) and not isinstance(self.rescore_multiplier, bool) \
                    and self.rescore_multiplier == 0:
                self.rescore_multiplier = None
            else:
                try:
                    self.rescore_multiplier = positive_int(self.rescore_multiplier, "rescore_multiplier")
                except ValueError:
                    raise ValueError(f"rescore_multiplier must be an int >= 1 (or 0 / None for no rescoring), got "
                                     f"{self.rescore_multiplier!r}") from None
        if self.passages:
            check_passage_window(self.max_words, self.stride)
        if self.threads is not None:
            positive_int(self.threads, "threads")
        if self.pooling is not None:
            check_pooling(self.pooling)

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        for key, value in d.items():
            if isinstance(value, tuple):
                d[key] = list(value)
        return d


class PerQueryResults(dict):
    """``{system: per-query metrics DataFrame}`` as stored in ``results.attrs["per_query"]``.

    A plain dict apart from two things that keep it cheap inside ``DataFrame.attrs``: pandas' deep copies of
    ``attrs`` share it instead of copying every table, and equality is identity. ``metadata`` holds the dataset's
    per-query metadata (e.g. MedQuAD ``source`` / ``qtype``) or None. ``rankings`` holds each system's ranked
    lists as evaluated, ``{system: (scores, rows)}`` (arrays of shape (queries, k); ``rows`` index ``doc_ids``,
    -1 = no document), for the queries ``query_ids``; :func:`trec_run` turns one into a run.
    """

    metadata: Optional[pd.DataFrame] = None
    rankings: Dict[str, Tuple[np.ndarray, np.ndarray]]
    query_ids: Sequence[str] = ()
    doc_ids: Sequence[str] = ()

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.rankings = {}

    def __deepcopy__(self, memo):
        return self

    def __eq__(self, other):
        return self is other

    def __ne__(self, other):
        return self is not other

    __hash__ = object.__hash__


def per_query_table(results: Union[pd.DataFrame, Mapping[str, pd.DataFrame]]) -> pd.DataFrame:
    """All systems' per-query metrics in one long table (columns ``scheme``, ``qid``, metadata, metrics)."""
    pq = results.attrs["per_query"] if isinstance(results, pd.DataFrame) else results
    frames = []
    for name, df in pq.items():
        f = df.reset_index()
        f.insert(0, "scheme", name)
        frames.append(f)
    if not frames:
        return pd.DataFrame(columns=["scheme", "qid"])
    out = pd.concat(frames, ignore_index=True)
    meta = getattr(pq, "metadata", None)
    if meta is not None and len(meta):
        cols = [c for c in ("source", "qtype") if c in meta.columns]
        if cols:
            m = meta[cols].copy()
            m.index = m.index.astype(str)
            out = out.join(m, on="qid")
            out = out[["scheme", "qid"] + cols + [c for c in out.columns if c not in ("scheme", "qid", *cols)]]
    return out


# ---------------------------------------------------------------------------------------------------- helpers
def _log(enabled: bool, msg: str) -> None:
    if enabled:
        print(f"[medquant] {msg}", file=sys.stderr, flush=True)


def _resolve_dataset(dataset) -> RetrievalDataset:
    if isinstance(dataset, RetrievalDataset):
        return dataset
    if isinstance(dataset, (str, os.PathLike)):
        s = str(dataset)
        if s in ("medquad", "medquad-dev"):
            return medquad_retrieval("dev")
        if s == "medquad-test":
            return medquad_retrieval("test")
        if Path(s).is_dir():
            return load_beir(s)
        raise ValueError(f"unknown dataset {s!r}: pass a RetrievalDataset, 'medquad', or a BEIR directory")
    raise TypeError(f"dataset must be a RetrievalDataset, got {type(dataset).__name__}")


Item = Tuple[Optional[str], Union[Encoder, QuantScheme]]


def _as_items(encoder_or_schemes, schemes) -> List[Item]:
    """(label or None, Encoder or QuantScheme) per given system; a system is an Encoder, a scheme (name, dict or
    QuantScheme) or a ``(label, encoder_or_scheme)`` pair."""
    items: List[Item] = []
    for group in (encoder_or_schemes, schemes):
        if group is None:
            continue
        # a top-level (label, system) pair is one system, except two strings: a tuple of scheme names
        if isinstance(group, (Encoder, str, QuantScheme, dict)) or (_is_labelled(group) and
                                                                    not isinstance(group[1], str)):
            group = [group]
        for it in group:
            label = None
            if _is_labelled(it):
                label, it = it
                if not label.strip() or label == "fp32" or label.startswith("fp32+"):
                    raise ValueError(f"system label {label!r} is empty or reserved ('fp32' names the baseline and "
                                     "'fp32+...' its index rows)")
            items.append((label, it if isinstance(it, Encoder) else get_scheme(it)))  # raises on unknown names
    return items


def _is_labelled(it) -> bool:
    return isinstance(it, tuple) and len(it) == 2 and isinstance(it[0], str)


def encoder_label(enc: Encoder) -> str:
    """An Encoder's default label: its scheme name if it was quantized in this session, else (loaded from a
    directory) ``<scheme>@<directory name>``, so a saved model is never mistaken for the scheme run here."""
    if enc.reference is not None or enc.model_dir is None:
        return enc.scheme.name
    return f"{enc.scheme.name}@{Path(enc.model_dir).name}"


def unique_label(label: str, taken: set) -> str:
    if label not in taken:
        return label
    i = 2
    while f"{label}#{i}" in taken:
        i += 1
    return f"{label}#{i}"


def _token_count(enc: Encoder, texts: Sequence[str], max_length: Optional[int], chunk: int = 2048) -> int:
    n = 0
    for s in range(0, len(texts), chunk):
        _, mask, _ = enc.tokenize(texts[s: s + chunk], max_length=max_length)
        n += int(mask.sum())
    return n


def _disk_bytes(enc: Encoder) -> int:
    with tempfile.TemporaryDirectory(prefix="medquant-size-") as d:
        out = enc.save_pretrained(d)
        return int((Path(out) / "model.safetensors").stat().st_size)


def _pool_passages(scores: np.ndarray, pidx: np.ndarray, doc_index: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
    """Document ranking from a passage ranking: each document at the rank of its best passage.

    Exact for the documents it returns (a document's score is the score of its first passage in the ranking);
    a row holds fewer than ``k`` documents (padded with -inf / -1) if the passage list covers fewer.
    """
    nq = scores.shape[0]
    out_s = np.full((nq, k), -np.inf, dtype=np.float32)
    out_i = np.full((nq, k), -1, dtype=np.int64)
    docs = doc_index[pidx]
    for r in range(nq):
        _, first = np.unique(docs[r], return_index=True)
        first = np.sort(first)[:k]
        out_s[r, : first.size] = scores[r, first]
        out_i[r, : first.size] = docs[r, first]
    return out_s, out_i


def _top_overlap(a: np.ndarray, b: np.ndarray, n: int = 10) -> float:
    """Mean fraction of the top-n of ``b`` that is also in the top-n of ``a`` (row by row)."""
    a, b = a[:, :n], b[:, :n]
    if a.size == 0:
        return float("nan")
    hits = [np.intersect1d(x[x >= 0], y[y >= 0]).size / max(1, min(n, (x >= 0).sum())) for x, y in zip(a, b)]
    return float(np.mean(hits))


# ---------------------------------------------------------------------------------------------------- the study
@dataclass
class _Study:
    """What :func:`evaluate` works on (inputs resolved once) and what it has produced so far."""

    cfg: EvalConfig
    ds: RetrievalDataset
    qrels: Dict[str, Mapping[str, int]]
    qids: List[str]
    doc_ids: List[str]
    query_texts: List[str]
    corpus_texts: List[str]
    doc_index: Optional[np.ndarray]
    k: int
    progress: bool
    show_progress_bar: Optional[bool]
    calibration_texts: Optional[List[str]] = None
    calib_info: Dict[str, Any] = field(default_factory=lambda: {"n_texts": 0, "source": None})
    calibrations: Dict[float, Tuple[Any, float]] = field(default_factory=dict)
    token_counts: Dict[int, int] = field(default_factory=dict)
    per_query: PerQueryResults = field(default_factory=PerQueryResults)
    rows: List[Dict[str, Any]] = field(default_factory=list)
    base_idx: Optional[np.ndarray] = None
    base_c: Optional[np.ndarray] = None  # fp32 corpus embeddings (a ShardedIndex for a sharded corpus)

    @property
    def sharded(self) -> bool:
        return is_sharded(self.ds.corpus)

    @property
    def n_corpus_texts(self) -> int:
        """Texts encoded for the corpus: documents, passages in passage mode, rows of a sharded corpus."""
        return len(self.doc_ids) if self.sharded else len(self.corpus_texts)


def judged_qrels(ds: RetrievalDataset) -> Dict[str, Mapping[str, int]]:
    """The judgements of the queries ``ds`` has (and that have any), checking that there are some and that the
    corpus is not empty (ValueError)."""
    qrels = {q: j for q, j in ds.qrels.items() if q in ds.queries and len(j) > 0}
    if not ds.corpus:
        raise ValueError(f"dataset {ds.name!r} has an empty corpus")
    if not qrels:
        raise ValueError(f"dataset {ds.name!r} has no judged queries")
    return qrels


def _resolve_study(ds: RetrievalDataset, cfg: EvalConfig, show_progress_bar: Optional[bool]) -> _Study:
    """The dataset's judged queries and the texts to encode (passages in passage mode)."""
    qrels = judged_qrels(ds)
    qids = list(ds.queries)
    if is_sharded(ds.corpus):
        if cfg.passages:
            raise ValueError("passages=True needs the corpus texts in memory: split a sharded corpus into passage "
                             "rows before encoding it")
        corpus_texts, doc_index = [], None
    elif cfg.passages:
        corpus_texts, doc_index = split_corpus(ds.corpus, max_words=cfg.max_words, stride=cfg.stride)
    else:
        corpus_texts, doc_index = list(ds.corpus.values()), None
    study = _Study(cfg=cfg, ds=ds, qrels=qrels, qids=qids, doc_ids=ds.doc_ids,
                   query_texts=[ds.queries[q] for q in qids], corpus_texts=corpus_texts, doc_index=doc_index,
                   k=min(cfg.k, len(ds.doc_ids)), progress=bool(show_progress_bar),
                   show_progress_bar=show_progress_bar)
    study.per_query.metadata = ds.metadata
    study.per_query.query_ids, study.per_query.doc_ids = qids, study.doc_ids
    return study


def _baseline(items: List[Item], model: Union[str, os.PathLike, Encoder], study: _Study) -> Encoder:
    """The fp32 encoder: ``model`` if it is an Encoder, else an unlabelled fp32 encoder in ``items``, else the
    reference of one quantized here, else ``model`` loaded. A quantized model is never the baseline."""
    encoders = [(label, it) for label, it in items if isinstance(it, Encoder)]
    baseline = model if isinstance(model, Encoder) else None
    if baseline is None:
        baseline = next((it for label, it in encoders if label is None and it.is_fp32), None)
    if baseline is None:
        baseline = next((it.reference for _, it in encoders if it.reference is not None and it.reference.is_fp32),
                        None)
    if baseline is None:
        _log(study.progress, f"loading {model} (fp32)")
        baseline = Encoder.from_pretrained(model, n_threads=study.cfg.threads)
    if not baseline.is_fp32:
        raise ValueError(f"the fp32 baseline {baseline.name} is a {baseline.scheme.name} model: a quantized model "
                         f"cannot be the baseline. Evaluate it as a system (evaluate([Encoder.from_pretrained(path)], "
                         f"..., model=<its fp32 model>), or medquant compare --model <its fp32 model> --system path)")
    for _, it in encoders:
        if it.config != baseline.config:
            raise ValueError(f"encoder {it!r} has another architecture than the fp32 baseline {baseline.name}: "
                             "compare it with its own fp32 model")
    return baseline


def _systems(items: List[Item], baseline: Encoder, threads: Optional[int]) -> List[Tuple[str, Any]]:
    """(label, encoder or scheme) per system, fp32 first, unlabelled duplicates dropped, labels made unique
    (a label given twice is an error)."""
    systems: List[Tuple[str, Any]] = [("fp32", baseline)]
    taken = {"fp32"}
    seen_schemes = set()
    for label, it in items:
        if it is baseline:
            continue
        if label is not None and label in taken:
            raise ValueError(f"system label {label!r} is given twice (or names another system)")
        if isinstance(it, QuantScheme):
            if label is None and it.name == "fp32" and it == get_scheme("fp32"):
                continue
            key = it.to_json()
            if label is None and key in seen_schemes:
                continue
            seen_schemes.add(key)
            label = label or unique_label(it.name, taken)
        else:
            label = label or unique_label(encoder_label(it), taken)
        taken.add(label)
        systems.append((label, it))
    if threads is not None:
        for _, it in systems:
            if isinstance(it, Encoder) and it.n_threads != int(threads):
                it.set_threads(int(threads))
    return systems


def _evaluated_texts(study: _Study) -> List[str]:
    """Every text the study encodes or scores: queries, documents and (passage mode) passages."""
    if study.sharded:  # its texts are not read into memory: only the queries can be excluded
        return list(study.query_texts)
    return study.query_texts + list(study.ds.corpus.values()) + (study.corpus_texts if study.cfg.passages else [])


def _choose_calibration_texts(study: _Study, systems, calibration_texts: Optional[Sequence[str]],
                              calibration_source) -> None:
    """Calibration texts when some scheme needs calibration: the given ones, else a seeded sample of a held-out
    source that excludes every evaluated text (see :mod:`medquant.eval.calibration_data`)."""
    external = [label for label, it in systems if isinstance(it, Encoder) and it.scheme.needs_calibration]
    if external:  # saved / given calibrated encoders: their calibration texts are not known here
        study.calib_info["calibrated_elsewhere"] = external
    if not any(isinstance(it, QuantScheme) and (it.needs_calibration or it.needs_calibration_texts)
               for _, it in systems):
        return
    cfg, ds = study.cfg, study.ds
    if calibration_texts is not None:
        study.calibration_texts = check_texts(calibration_texts)
        info = given_texts_info(study.calibration_texts, _evaluated_texts(study))
    else:
        source = resolve_source(calibration_source) if calibration_source is not None else default_source(ds)
        if source is None:
            raise CalibrationSourceError(
                f"a scheme needs calibration and {ds.name!r} has no held-out text medquant knows of (only MedQuAD "
                "dev/test have one: the other split). Pass calibration_source= (a RetrievalDataset, a dataset name "
                "or a text file) or calibration_texts= with texts that are not evaluated")
        window = (cfg.max_words, cfg.stride) if cfg.passages else None
        study.calibration_texts, info = held_out_texts(source, _evaluated_texts(study), cfg.calibration_size,
                                                       cfg.seed, window)
        info["default"] = calibration_source is None
    study.calib_info.update(info)


def _quantized(study: _Study, baseline: Encoder, scheme: QuantScheme, label: str, pos: str
               ) -> Tuple[Encoder, float, float]:
    """(encoder, calibration seconds, quantize seconds) of a scheme; one calibration per momentum is shared."""
    cfg, calib_s = study.cfg, 0.0
    texts = study.calibration_texts if scheme.needs_calibration_texts else None
    if not scheme.needs_calibration_for(baseline.site_names):  # GPTQ / bias correction may still need texts
        t0 = time.perf_counter()
        enc = baseline.quantize(scheme, calibration_texts=texts, batch_size=cfg.batch_size,
                                show_progress_bar=study.show_progress_bar)
        return enc, calib_s, time.perf_counter() - t0
    key = float(scheme.momentum)
    if key not in study.calibrations:
        _log(study.progress, f"{pos} {label}: calibrating on {len(study.calibration_texts)} texts")
        t0 = time.perf_counter()
        cal = calibrate_for(baseline, scheme, study.calibration_texts, cfg.batch_size, cfg.max_length,
                            study.show_progress_bar)
        study.calibrations[key] = (cal, time.perf_counter() - t0)
    cal, calib_s = study.calibrations[key]
    t0 = time.perf_counter()
    enc = baseline.quantize(scheme, calibration=cal, batch_size=cfg.batch_size,
                            show_progress_bar=study.show_progress_bar, calibration_texts=texts)
    return enc, calib_s, time.perf_counter() - t0


def _corpus_tokens(study: _Study, enc: Encoder) -> float:
    if study.sharded:  # not tokenized here: the workers do it
        return float("nan")
    key = id(enc.tokenizer)
    if key not in study.token_counts:
        study.token_counts[key] = _token_count(enc, study.corpus_texts, study.cfg.max_length)
    return study.token_counts[key]


def embedding_settings(enc: Encoder, pooling: Optional[str]) -> Tuple[Dict[str, Any], str, bool]:
    """encode keywords for retrieval with ``enc`` (its pooling unless overridden; cosine unless the model scores by
    dot product), a one-line description of them for the ``embedding`` column, and whether scores are cosines."""
    sc = enc.sentence_config.override(pooling)
    dot = sc.similarity == "dot"
    normalize = sc.normalize if dot else True
    prompts = ", ".join(f"{k}={sc.prompts[n]!r}" for k, n in (("query", sc.query_prompt_name()),
                                                             ("document", sc.document_prompt_name())) if n)
    text = f"{sc.pooling} pooling, {'dot product' if dot else 'cosine'}" + (f", prompts {prompts}" if prompts else "")
    return {"pooling": sc.pooling, "normalize": normalize}, text, not dot


def _sharded_encode_and_search(study: _Study, enc: Encoder, label: str) -> Dict[str, Any]:
    """:func:`_encode_and_search` for a sharded corpus: the corpus encoded on Dask into ``work_dir/<label>``
    (resumed if there), queries here, exact search shard by shard."""
    from ..distributed import ShardedIndex, encode_corpus

    cfg, corpus = study.cfg, study.ds.corpus
    settings, embedding, cosine = embedding_settings(enc, cfg.pooling)
    out = Path(corpus.work_dir) / re.sub(r"[^A-Za-z0-9_.+-]+", "_", label)
    summary = encode_corpus(corpus.source, enc, out, corpus.client, id_column=corpus.id_column,
                            text_column=corpus.text_column, batch_size=cfg.batch_size, max_length=cfg.max_length,
                            partition_rows=corpus.partition_rows, show_progress_bar=study.show_progress_bar,
                            **settings)
    index = ShardedIndex(out)
    if list(index.ids) != study.doc_ids:
        raise ValueError(f"{out} holds other ids (or another order) than the corpus source: delete it")
    t0 = time.perf_counter()
    q_emb = enc.encode_query(study.query_texts, batch_size=cfg.batch_size, max_length=cfg.max_length,
                             show_progress_bar=study.show_progress_bar, **settings)
    t_queries = time.perf_counter() - t0
    t0 = time.perf_counter()
    scores, idx = index.search(q_emb, k=study.k, normalize=cosine)
    t_search = time.perf_counter() - t0
    timed = summary.rows_written == index.rows  # encoded by this call (not found complete from an earlier one)
    return {
        "c_emb": index, "q_emb": q_emb, "idx": idx, "scores": scores, "cosine": cosine,
        "row": {
            "corpus_texts_per_s": summary.texts_per_s if timed else float("nan"), "corpus_tokens_per_s": np.nan,
            "query_texts_per_s": len(study.query_texts) / t_queries if t_queries > 0 else float("nan"),
            "encode_corpus_s": summary.wall_s if timed else float("nan"), "encode_queries_s": t_queries,
            "search_s": t_search, "model_bytes": enc.size_bytes(),
            "model_disk_bytes": _disk_bytes(enc) if cfg.measure_disk else np.nan,
            "index_bytes": index.rows * index.dim * 4, "rescore_bytes": 0, "embedding": embedding,
        },
    }


def _mean_cosine(base, other) -> float:
    """Mean row-wise inner product of two corpus embedding matrices (or two sharded indexes, shard by shard)."""
    if isinstance(base, np.ndarray):
        return float(np.mean(np.sum(base * other, axis=1)))
    total = sum(float(np.sum(np.asarray(base.embeddings(s)) * np.asarray(other.embeddings(s)), dtype=np.float64))
                for s in range(base.n_shards))
    return total / max(1, base.rows)


def _encode_and_search(study: _Study, enc: Encoder) -> Dict[str, Any]:
    """Corpus and query embeddings of one encoder, its search results, and its timing and byte columns."""
    cfg, corpus_texts, query_texts = study.cfg, study.corpus_texts, study.query_texts
    settings, embedding, cosine = embedding_settings(enc, cfg.pooling)
    kw = dict(batch_size=cfg.batch_size, max_length=cfg.max_length, show_progress_bar=study.show_progress_bar,
              **settings)
    if cfg.warmup:
        enc.encode(corpus_texts[: min(4, len(corpus_texts))] + query_texts[:4], batch_size=cfg.batch_size,
                   max_length=cfg.max_length, show_progress_bar=False)
    t0 = time.perf_counter()
    c_emb = enc.encode_document(corpus_texts, **kw)
    t_corpus = time.perf_counter() - t0
    t0 = time.perf_counter()
    q_emb = enc.encode_query(query_texts, **kw)
    t_queries = time.perf_counter() - t0
    t0 = time.perf_counter()
    if cfg.passages:
        scores, idx = search_passages(q_emb, c_emb, study.doc_index, k=study.k, n_docs=len(study.doc_ids),
                                      normalize=cosine)
    else:
        scores, idx = search(q_emb, c_emb, k=study.k, normalize=cosine)
    t_search = time.perf_counter() - t0
    n_tok = _corpus_tokens(study, enc)
    return {
        "c_emb": c_emb, "q_emb": q_emb, "idx": idx, "scores": scores, "cosine": cosine,
        "row": {
            "corpus_texts_per_s": len(corpus_texts) / t_corpus if t_corpus > 0 else float("nan"),
            "corpus_tokens_per_s": n_tok / t_corpus if t_corpus > 0 else float("nan"),
            "query_texts_per_s": len(query_texts) / t_queries if t_queries > 0 else float("nan"),
            "encode_corpus_s": t_corpus, "encode_queries_s": t_queries, "search_s": t_search,
            "model_bytes": enc.size_bytes(),
            "model_disk_bytes": _disk_bytes(enc) if cfg.measure_disk else np.nan,
            "index_bytes": int(c_emb.nbytes), "rescore_bytes": 0, "embedding": embedding,
        },
    }


def ranking_metrics(qrels: Mapping[str, Mapping[str, int]], scores: np.ndarray, idx: np.ndarray,
                    query_ids: Sequence[str], doc_ids: Sequence[str], ks: Sequence[int]) -> pd.DataFrame:
    """Per-query metrics (:func:`~medquant.eval.metrics.evaluate_run`) of ranked lists from :func:`search`:
    ``idx`` rows index ``doc_ids`` (-1: no document), scored in exactly the searched order."""
    run = run_from_search(np.where(idx >= 0, scores, -np.inf), np.maximum(idx, 0), query_ids, doc_ids,
                          preserve_order=True)
    return evaluate_run(qrels, run, ks)


def _add_row(study: _Study, label: str, info: Dict[str, Any], scores: np.ndarray, idx: np.ndarray) -> None:
    """Score one system's ranking and append its result row (per-query metrics go to ``study.per_query``)."""
    pq = ranking_metrics(study.qrels, scores, idx, study.qids, study.doc_ids, study.cfg.ks)
    study.per_query[label] = pq
    study.per_query.rankings[label] = (scores, idx)
    row = {"scheme": label}
    row.update(info)
    row.update({"n_queries": len(pq), "n_docs": len(study.doc_ids), "n_passages": study.n_corpus_texts})
    row.update(summarize(pq).drop("n_queries").to_dict())
    row["overlap@10"] = _top_overlap(study.base_idx, idx) if study.base_idx is not None else 1.0
    study.rows.append(row)


def _index_rows(study: _Study, res: Dict[str, Any], base_info: Dict[str, Any], pos: str) -> None:
    """Rows of the quantized indexes of the fp32 corpus embeddings (with and without rescoring)."""
    cfg, k = study.cfg, study.k
    for kind in cfg.index_kinds:
        t0 = time.perf_counter()
        if study.sharded:  # quantized shard by shard inside the search, with the corpus' own ranges
            index, rows, dim = None, res["c_emb"].rows, res["c_emb"].dim
            index_bytes = rows * dim + 8 * dim if kind == "int8" else rows * ((dim + 7) // 8)
        else:
            index = quantize_index(res["c_emb"], kind, scoring=cfg.index_scoring, normalize=res["cosine"])
            index_bytes = int(index.nbytes)
        build_s = time.perf_counter() - t0
        for mult in (None, cfg.rescore_multiplier) if cfg.rescore_multiplier else (None,):
            name = f"fp32+index-{kind}" + ("" if cfg.index_scoring == "codes" else "-asym")
            name += f"+rescore{mult}" if mult else ""
            _log(study.progress, f"{pos} {name}: searching")
            kq = k if not cfg.passages else min(len(study.corpus_texts), k * 8)
            t0 = time.perf_counter()
            if index is None:
                s, i = res["c_emb"].search(res["q_emb"], k=kq, kind=kind, scoring=cfg.index_scoring,
                                           rescore_multiplier=mult, normalize=res["cosine"])
            else:
                s, i = index.search(res["q_emb"], k=kq, rescore_multiplier=mult,
                                    float_corpus=res["c_emb"] if mult else None)
            if cfg.passages:
                s, i = _pool_passages(np.asarray(s, dtype=np.float32), i, study.doc_index, k)
            t_search = time.perf_counter() - t0
            row_info = dict(base_info)
            row_info.update({"index": kind, "index_scoring": cfg.index_scoring, "rescore": int(mult or 0),
                             "search_s": t_search, "quantize_s": build_s, "emb_cosine": np.nan,
                             "index_bytes": index_bytes,
                             "rescore_bytes": int(res["row"]["index_bytes"]) if mult else 0})
            _add_row(study, name, row_info, np.asarray(s, dtype=np.float32), i)


def _run_system(study: _Study, baseline: Encoder, label: str, item, pos: str) -> None:
    """Quantize (schemes), encode, search and score one system; fp32 also gets its index rows."""
    calib_s = quant_s = 0.0
    enc = item
    if isinstance(item, QuantScheme):
        enc, calib_s, quant_s = _quantized(study, baseline, item, label, pos)
    _log(study.progress, f"{pos} {label}: encoding {study.n_corpus_texts} corpus texts and "
                         f"{len(study.query_texts)} queries")
    res = _sharded_encode_and_search(study, enc, label) if study.sharded else _encode_and_search(study, enc)
    info = {"model": str(enc.name), "model_scheme": enc.scheme.name, "index": "float32", "index_scoring": "",
            "rescore": 0, "max_length": enc._max_length(study.cfg.max_length), "threads": enc.n_threads}
    info.update(res["row"])
    info.update({"calibration_s": calib_s, "quantize_s": quant_s})
    if study.base_c is None:
        info["emb_cosine"] = 1.0
    else:
        info["emb_cosine"] = _mean_cosine(study.base_c, res["c_emb"])
    _add_row(study, label, info, res["scores"], res["idx"])
    if label == "fp32":
        study.base_idx, study.base_c = res["idx"], res["c_emb"]
        _index_rows(study, res, info, pos)


def _compare_with_fp32(study: _Study) -> None:
    """Paired comparison of every row's main metrics with fp32 (delta, CI, p), and per metric the Holm-adjusted
    p-values over the systems compared (every row but fp32's own, whose ``_p_holm`` is its ``_p``)."""
    cfg = study.cfg
    base_pq = study.per_query["fp32"]
    family = [row for row in study.rows if row["scheme"] != "fp32"]
    for m in cfg.main_metrics:
        for row in study.rows:
            c = paired_comparison(base_pq[m], study.per_query[row["scheme"]][m], n_boot=cfg.n_boot, seed=cfg.seed,
                                  test=cfg.test, confidence=cfg.confidence)
            row.update({f"{m}_delta": c.delta, f"{m}_ci_low": c.ci_low, f"{m}_ci_high": c.ci_high,
                        f"{m}_p": c.p_value, f"{m}_p_holm": c.p_value})
        for row, p in zip(family, holm_adjust([row[f"{m}_p"] for row in family])):
            row[f"{m}_p_holm"] = float(p)


_HEAD_COLUMNS = ["scheme", "model", "model_scheme", "index", "index_scoring", "rescore", "n_queries", "n_docs",
                 "n_passages"]
_TAIL_COLUMNS = ["overlap@10", "emb_cosine", "corpus_texts_per_s", "corpus_tokens_per_s", "query_texts_per_s",
                 "encode_corpus_s", "encode_queries_s", "search_s", "calibration_s", "quantize_s", "model_bytes",
                 "model_disk_bytes", "index_bytes", "rescore_bytes", "max_length", "threads", "embedding"]


def _results_frame(study: _Study) -> pd.DataFrame:
    """The rows as a DataFrame in the documented column order, with its attrs."""
    cfg = study.cfg
    df = pd.DataFrame(study.rows)
    metrics = [c for c in metric_columns(cfg.ks) if c in df.columns]
    deltas = [f"{m}_{s}" for m in cfg.main_metrics for s in ("delta", "ci_low", "ci_high", "p", "p_holm")]
    df = df[_HEAD_COLUMNS + metrics + deltas + _TAIL_COLUMNS]
    df.attrs["per_query"] = study.per_query
    df.attrs["config"] = cfg.to_dict()
    df.attrs["dataset"] = study.ds.describe()
    df.attrs["calibration"] = study.calib_info
    df.attrs["calibration_texts"] = study.calibration_texts
    return df


def _max_lengths(study: _Study, systems: List[Tuple[str, Any]], baseline: Encoder) -> Dict[str, int]:
    """Each system's effective truncation length (checked against its model before any work); a warning when
    they differ, since quality and throughput are then not comparable."""
    lengths = {label: (it if isinstance(it, Encoder) else baseline)._max_length(study.cfg.max_length)
               for label, it in systems}
    if len(set(lengths.values())) > 1:
        warnings.warn(f"systems truncate at different lengths ({lengths}): their quality and throughput are not "
                      "comparable; set max_length", UserWarning, stacklevel=3)
    return lengths


def _run_record(study: _Study, load_before, t0: float, max_lengths: Dict[str, int]) -> Dict[str, Any]:
    """Where and how the run was measured: machine, load before/after, threads and max_length per system, and
    the throughput figures timed on too small a sample (also warned about as a ThroughputWarning)."""
    warns = runinfo.throughput_warnings(study.rows, study.n_corpus_texts, len(study.query_texts))
    if warns:
        warnings.warn(runinfo.describe_warnings(warns), runinfo.ThroughputWarning, stacklevel=3)
    model_rows = [r for r in study.rows if r["index"] == "float32"]
    return {**runinfo.machine_info(), "load_before": load_before, "load_after": runinfo.load_average(),
            "wall_s": time.perf_counter() - t0, "threads": {r["scheme"]: r["threads"] for r in model_rows},
            "max_length": max_lengths,
            "throughput_rule": {"min_texts": runinfo.MIN_TIMED_TEXTS, "min_seconds": runinfo.MIN_TIMED_SECONDS},
            "throughput_warnings": warns}


# ---------------------------------------------------------------------------------------------------- evaluate
def evaluate(encoder_or_schemes=None, dataset=None, *, model: Union[str, os.PathLike, Encoder] = DEFAULT_MODEL,
             schemes=None, config: Optional[EvalConfig] = None, calibration_texts: Optional[Sequence[str]] = None,
             calibration_source=None, show_progress_bar: Optional[bool] = None, **overrides) -> pd.DataFrame:
    """Compare quantization schemes on a retrieval collection: quality (with a paired test against fp32), encode
    throughput, model bytes and index bytes - one row per system.

    Parameters
    ----------
    encoder_or_schemes : Encoder, scheme name, QuantScheme, (label, system) pair, or a list of them
        Systems to evaluate. Encoders are used as given; scheme names (presets such as ``"int8-dynamic"``),
        dicts and :class:`QuantScheme` objects are quantized from the fp32 baseline. A system is labelled by its
        scheme name, except an Encoder loaded quantized from a directory: ``<scheme>@<directory name>``; a
        ``(label, system)`` pair in the list sets the label (``[("mine", enc), "int8-dynamic"]``). An fp32 baseline is always evaluated (label ``fp32``): ``model``
        if it is an Encoder, else an unlabelled fp32 encoder in the list, else the ``reference`` of an encoder
        quantized in this session, else ``model`` is loaded. A quantized model is never the baseline (ValueError).
    dataset : RetrievalDataset, "medquad" or a BEIR directory
        The collection (``"medquad"`` is the full MedQuAD dev split). A :class:`~medquant.eval.datasets.ShardedCorpus`
        corpus is encoded on Dask per system into ``work_dir/<system>`` (reused if there: throughput NaN), searched
        shard by shard; calibration then excludes only the queries, and ``passages=True`` is refused.
    model : str, path or Encoder
        The fp32 baseline (an fp32 Encoder, or a model name / directory loaded when no baseline is given).
    schemes : list, optional
        More schemes (same forms as ``encoder_or_schemes``).
    config : EvalConfig, optional
        Settings; keyword ``overrides`` replace single fields (``evaluate(..., n_boot=500, passages=True)``).
    calibration_texts : sequence of str, optional
        Texts for static-int8 / SmoothQuant calibration, used as given (a warning counts those that are also
        evaluated). One calibration pass of the fp32 model is shared by every static scheme.
    calibration_source : RetrievalDataset, dataset name, text file or CalibrationSource, optional
        Where to draw ``calibration_size`` calibration texts from (seeded), after removing every evaluated text.
        Default: MedQuAD dev -> the test split, test -> dev; other collections need a source or texts
        (:class:`~medquant.eval.calibration_data.CalibrationSourceError` otherwise). See
        :mod:`medquant.eval.calibration_data`.
    show_progress_bar : bool, optional
        tqdm bars for encoding and calibration plus one progress line per system on stderr (default: bars only
        for long inputs, no progress lines).

    Returns
    -------
    pandas.DataFrame
        One row per system, fp32 first, then its index variants, then the other schemes. Columns:

        * ``scheme`` (system name, e.g. ``int8-dynamic`` or ``fp32+index-binary+rescore4``), ``model``,
          ``model_scheme``, ``index`` (``float32``, ``int8``, ``binary``), ``index_scoring``, ``rescore``
          (candidate multiplier, 0 = none), ``n_queries``, ``n_docs``, ``n_passages``;
        * every metric of :func:`medquant.eval.metrics.evaluate_run` (mean over judged queries);
        * for each of ``config.main_metrics``: ``<m>_delta`` (system - fp32), ``<m>_ci_low`` / ``<m>_ci_high``
          (its confidence interval) and ``<m>_p`` (two-sided p-value), both from the paired test ``config.test``
          over queries (default the paired t-test), and ``<m>_p_holm`` (``<m>_p`` Holm-adjusted over the systems
          compared with fp32 in this call);
        * ``overlap@10`` (fraction of fp32's top-10 retrieved in the system's top-10), ``emb_cosine`` (mean cosine
          of the system's and fp32's corpus embeddings; NaN for index rows);
        * ``corpus_texts_per_s``, ``corpus_tokens_per_s``, ``query_texts_per_s`` (encode throughput, timed
          around :meth:`Encoder.encode` - tokenization included - after a warm-up; tokens are the non-padding
          tokens after truncation; index rows repeat fp32's. Wall-clock: measure on an otherwise idle machine), ``encode_corpus_s``,
          ``encode_queries_s``, ``search_s`` (all queries), ``calibration_s``, ``quantize_s``;
        * ``model_bytes`` (:meth:`Encoder.size_bytes`, in memory), ``model_disk_bytes`` (``model.safetensors``
          written by :meth:`Encoder.save_pretrained`), ``index_bytes`` (stored corpus vectors: float32 matrix or
          quantized codes), ``rescore_bytes`` (float32 vectors read at rescoring, 0 without; they may live on
          disk);
        * ``max_length`` (the system's effective truncation length), ``threads`` (its oneDNN threads);
        * ``embedding``: the pooling, similarity and prompts used (the model's own unless ``pooling`` overrides).

        ``attrs``: ``per_query`` (:class:`PerQueryResults`, system -> per-query metrics indexed by query id, and
        the ranked lists: :func:`trec_run`, :func:`write_trec_runs`),
        ``config``, ``dataset`` (:meth:`RetrievalDataset.describe`), ``calibration`` (where the texts came from:
        ``source``, ``kind``, ``seed``, ``n_texts``, ``n_excluded_evaluated``, ``n_overlap_evaluated``, ``sha256``,
        ...), ``calibration_texts`` (the texts, or None), ``run`` (machine, CPU model, oneDNN ISA, load averages
        before / after, threads and max_length per system, ``throughput_warnings``: figures timed on fewer than
        100 texts or under 2 s, also issued as a :class:`~medquant.eval.runinfo.ThroughputWarning`).
    """
    load_before, t0 = runinfo.load_average(), time.perf_counter()
    cfg = dataclasses.replace(config, **overrides) if config is not None else EvalConfig(**overrides)
    if dataset is None:
        raise TypeError("evaluate() needs a dataset")
    if calibration_texts is not None and calibration_source is not None:
        raise TypeError("pass calibration_texts or calibration_source, not both")
    ds = _resolve_dataset(dataset)
    items = _as_items(encoder_or_schemes, schemes)
    study = _resolve_study(ds, cfg, show_progress_bar)
    baseline = _baseline(items, model, study)
    systems = _systems(items, baseline, cfg.threads)
    max_lengths = _max_lengths(study, systems, baseline)
    _choose_calibration_texts(study, systems, calibration_texts, calibration_source)
    for pos, (label, item) in enumerate(systems, 1):
        _run_system(study, baseline, label, item, f"[{pos}/{len(systems)}]")
    _compare_with_fp32(study)
    df = _results_frame(study)
    df.attrs["run"] = _run_record(study, load_before, t0, max_lengths)
    return df


# ---------------------------------------------------------------------------------------------------- run files
def _per_query_results(results: Union[pd.DataFrame, PerQueryResults]) -> PerQueryResults:
    pq = results.attrs.get("per_query") if isinstance(results, pd.DataFrame) else results
    if not isinstance(pq, PerQueryResults) or not pq.rankings:
        raise ValueError("no ranked lists: pass the DataFrame returned by evaluate() (or its attrs['per_query'])")
    return pq


def trec_run(results: Union[pd.DataFrame, PerQueryResults], system: str) -> Dict[str, Dict[str, float]]:
    """One system's ranked lists, as evaluated, as a run ``{query id: {doc id: score}}``.

    The scores are the search scores as float32, each lowered by one float32 ulp below the one ranked above where
    the search tied (trec_eval / pytrec_eval compare scores in single precision), so that trec_eval's order (score
    descending, then doc id descending) is exactly the evaluated order and the run scores the same as the table.

    Parameters
    ----------
    results : pandas.DataFrame
        :func:`evaluate` output (or its ``attrs["per_query"]``).
    system : str
        A ``scheme`` value of the results.
    """
    pq = _per_query_results(results)
    if system not in pq.rankings:
        raise KeyError(f"no system {system!r}; systems: {', '.join(pq.rankings)}")
    scores, idx = pq.rankings[system]
    s = np.where(idx >= 0, scores, -np.inf).astype(np.float32)
    for j in range(1, s.shape[1]):
        s[:, j] = np.minimum(s[:, j], np.nextafter(s[:, j - 1], np.float32(-np.inf)))
    return run_from_search(s, np.maximum(idx, 0), pq.query_ids, pq.doc_ids)


def run_file_name(system: str) -> str:
    """File stem and TREC tag of a system's run: its name with characters other than letters, digits and
    ``._+#=-`` replaced by ``_``."""
    return re.sub(r"[^A-Za-z0-9._+#=-]", "_", str(system)) or "_"


def write_trec_runs(results: Union[pd.DataFrame, PerQueryResults], directory: Union[str, os.PathLike]
                    ) -> List[Path]:
    """Write every system's run as ``<directory>/<system>.trec`` (``qid Q0 docid rank score tag``, tag = the file
    stem, see :func:`run_file_name`); returns the paths. Systems whose names map to the same file get ``#2``, ..."""
    pq = _per_query_results(results)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths: List[Path] = []
    taken: set = set()
    for system in pq.rankings:
        name = unique_label(run_file_name(system), taken)
        taken.add(name)
        paths.append(directory / f"{name}.trec")
        write_trec_run(trec_run(pq, system), paths[-1], tag=name)
    return paths


__all__ = ["EvalConfig", "PerQueryResults", "embedding_settings", "evaluate", "judged_qrels", "per_query_table",
           "ranking_metrics", "run_file_name", "trec_run", "write_trec_runs"]
