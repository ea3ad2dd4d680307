"""Training data for fine-tuning an encoder on a retrieval collection: mined hard negatives, teacher scores, and
where quantization hurts, in files that ``datasets`` and sentence-transformers trainers take as they are.

:func:`export_training_data` takes a training collection (a :class:`RetrievalDataset`), an fp32 *teacher* encoder and
optionally a quantized *student*, and writes to a new directory:

``pairs.{parquet,jsonl}``
    ``anchor``, ``positive``: every (query, relevant document) pair kept (in-batch-negative training,
    MultipleNegativesRankingLoss).
``triplets.{parquet,jsonl}``
    ``anchor``, ``positive``, ``negative``: one row per mined hard negative of a pair (MultipleNegativesRankingLoss
    with hard negatives, TripletLoss).
``scored.{parquet,jsonl}``
    ``query``, ``positive``, ``negative``, ``score``: the same rows with the teacher's margin
    ``score = cos_t(query, positive) - cos_t(query, negative)`` (MarginMSELoss distillation; sentence-transformers
    reads a column named ``score`` as the label).
``triplets_meta.{parquet,jsonl}``
    Row by row with ``triplets`` / ``scored``: ``query_id``, ``positive_id``, ``negative_id``, ``teacher_rank`` and
    ``student_rank`` of the negative (-1: not in that model's top ``range_max``), ``teacher_positive`` /
    ``teacher_negative`` (cosines), ``quant_hurt`` and ``weight`` of the query. Kept apart because trainers take
    every column of a training file as an input.
``queries.{parquet,jsonl}``
    Per training query: ``query_id``, ``query``, ``source`` (if the collection has one), ``n_positives``,
    ``n_negatives``, ``teacher_<metric>``, and with a student ``student_<metric>``, ``delta``, ``quant_hurt``
    (the student ranks it worse than the teacher) and ``weight`` (``hurt_weight`` where it hurts, else 1).
``documents.{parquet,jsonl}``
    ``doc_id``, ``text``, ``source``: the mining corpus (rows of the teacher's document embeddings).
``teacher_embeddings.safetensors`` (``ExportConfig.teacher_embeddings``)
    ``query`` [queries, hidden] and ``document`` [documents, hidden], L2-normalised float32, in the row order of
    ``queries`` and ``documents``.
``quant_params/`` (with a student)
    The student's quantization parameters (:class:`medquant.QuantParams`: JSON + safetensors).
``dataset_card.md``, ``export.json``
    What was exported from what (model, scheme, seed, source data and its license, counts, leakage checks), and
    the manifest: configuration, counts and the sha256 of every file.

Hard negatives are mined per (query, positive) pair from the top ``range_max`` documents of the teacher's ranking
(or the student's, or both: ``negatives_from``), ranks ``range_min`` and below, skipping every candidate that is
judged relevant, whose text equals a positive's (whitespace- and case-normalised: MedQuAD repeats answers across
documents), whose teacher cosine to a positive is at least ``duplicate_cosine``, or that the teacher scores within
the margin of the positive (``cos_t(q, n) > cos_t(q, p) - margin - relative_margin * |cos_t(q, p)|``, the false
negatives of Moreira et al. 2024, NV-Retriever). ``sampling="top"`` keeps the best-ranked eligible candidates,
``"random"`` draws them with a generator seeded by ``(seed, query id, positive id)``, so a pair's negatives do not
depend on the other pairs.

Leakage: with ``holdout`` (the collection evaluation uses), every training query whose text (normalised, lower-cased)
is a held-out query, and every document whose text is a held-out document or query, is dropped before mining, so no
exported query, positive or negative text occurs in the held-out split. :func:`medquad_training_data` trains on
MedQuAD ``dev`` and holds out ``test`` (document-disjoint splits; the text filter removes the boilerplate answers both
share). ``exclude_sources`` drops whole sources (their queries and documents), to measure generalisation to a source
never trained on.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import uuid
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd

from ..eval.datasets import RetrievalDataset, is_sharded, medquad_retrieval, normalize_text
from ..eval.evaluate import ranking_metrics
from ..eval.retrieval import search
from ..model import limits
from ..model.checkpoint import file_digest
from ..model.storage import swap_into_place

if TYPE_CHECKING:  # pragma: no cover
    from ..model.encoder import Encoder

FORMATS = ("parquet", "jsonl")
NEGATIVE_SOURCES = ("teacher", "student", "both")
SAMPLINGS = ("top", "random")
MANIFEST = "export.json"
CARD = "dataset_card.md"
EXPORT_FORMAT = "medquant-training-export-v1"
MEDQUAD_LICENSE = "CC BY 4.0"
MEDQUAD_CITATION = ("Ben Abacha, A. and Demner-Fushman, D. (2019). A question-entailment approach to question "
                    "answering. BMC Bioinformatics 20, 511. https://github.com/abachaa/MedQuAD")
#: Training files and their columns (what trainers read); meta files are row-aligned with them.
COLUMNS = {
    "pairs": ["anchor", "positive"],
    "triplets": ["anchor", "positive", "negative"],
    "scored": ["query", "positive", "negative", "score"],
}


@dataclasses.dataclass
class ExportConfig:
    """How training data is mined and written (see the module docstring).

    num_negatives: hard negatives per (query, positive) pair (fewer where fewer are eligible).
    range_min, range_max: candidates are the documents ranked ``range_min`` .. ``range_max - 1`` (0-based).
    margin, relative_margin: a candidate is skipped as a likely false negative when the teacher scores it above
      ``cos(q, p) - margin - relative_margin * |cos(q, p)|``.
    duplicate_cosine: a candidate whose teacher cosine to a positive reaches this is a duplicate and skipped.
    sampling: "top" (best-ranked eligible) or "random" (seeded draw among the eligible).
    negatives_from: whose ranking supplies candidates: "teacher", "student" (needs a student) or "both".
    metric: the per-query metric that says where quantization hurts (``<name>@<k>`` of
      :func:`medquant.eval.metrics.evaluate_run`).
    hurt_weight: the ``weight`` of a query the student ranks worse than the teacher (others: 1).
    teacher_embeddings: also write the teacher's query and document embeddings.
    seed, batch_size, max_length: of sampling and encoding (max_length: default the teacher's).
    formats: "parquet" (needs pyarrow) and/or "jsonl".
    """

    num_negatives: int = 4
    range_min: int = 0
    range_max: int = 30
    margin: float = 0.0
    relative_margin: float = 0.05
    duplicate_cosine: float = 0.98
    sampling: str = "top"
    negatives_from: str = "teacher"
    metric: str = "nDCG@10"
    hurt_weight: float = 2.0
    teacher_embeddings: bool = False
    seed: int = 13
    batch_size: int = 32
    max_length: Optional[int] = None
    formats: Tuple[str, ...] = FORMATS

    def __post_init__(self):
        self.num_negatives = limits.positive_int(self.num_negatives, "num_negatives")
        if isinstance(self.range_min, bool) or not isinstance(self.range_min, (int, np.integer)) or self.range_min < 0:
            raise ValueError(f"range_min must be an int >= 0, got {self.range_min!r}")
        self.range_max = limits.positive_int(self.range_max, "range_max")
        if self.range_max <= self.range_min:
            raise ValueError(f"range_max ({self.range_max}) must be above range_min ({self.range_min})")
        self.margin = limits.finite_float(self.margin, "margin", -2.0, 2.0)
        self.relative_margin = limits.finite_float(self.relative_margin, "relative_margin", 0.0, 1.0)
        self.duplicate_cosine = limits.finite_float(self.duplicate_cosine, "duplicate_cosine", -1.0, 1.0,
                                                    low_open=True)
        if self.sampling not in SAMPLINGS:
            raise ValueError(f"sampling must be one of {', '.join(SAMPLINGS)}, got {self.sampling!r}")
        if self.negatives_from not in NEGATIVE_SOURCES:
            raise ValueError(f"negatives_from must be one of {', '.join(NEGATIVE_SOURCES)}, got {self.negatives_from!r}")
        name, _, k = str(self.metric).partition("@")
        if not k.isdigit() or int(k) < 1 or not name:
            raise ValueError(f"metric must look like 'nDCG@10', got {self.metric!r}")
        self.hurt_weight = limits.finite_float(self.hurt_weight, "hurt_weight", 0.0, 1e6, low_open=True)
        self.teacher_embeddings = limits.flag(self.teacher_embeddings, "teacher_embeddings")
        self.seed = limits.seed(self.seed)
        self.batch_size = limits.batch_size(self.batch_size)
        self.max_length = limits.positive_int_or_none(self.max_length, "max_length")
        formats = (self.formats,) if isinstance(self.formats, str) else tuple(self.formats)
        if not formats or any(f not in FORMATS for f in formats) or len(set(formats)) != len(formats):
            raise ValueError(f"formats must be a non-empty selection of {', '.join(FORMATS)}, got {self.formats!r}")
        self.formats = formats

    @property
    def metric_k(self) -> int:
        return int(self.metric.partition("@")[2])

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["formats"] = list(self.formats)
        return d


@dataclasses.dataclass
class TrainingExport:
    """What :func:`export_training_data` wrote: the directory, its files by name, the counts, and the tables."""

    directory: Path
    files: Dict[str, Path]
    counts: Dict[str, int]
    pairs: pd.DataFrame
    triplets: pd.DataFrame
    scored: pd.DataFrame
    triplets_meta: pd.DataFrame
    queries: pd.DataFrame
    documents: pd.DataFrame

    def __repr__(self) -> str:
        return (f"TrainingExport({str(self.directory)!r}, pairs={len(self.pairs)}, triplets={len(self.triplets)}, "
                f"queries={len(self.queries)})")


# ---------------------------------------------------------------------------------------------------- selection
def _doc_sources(ds: RetrievalDataset) -> Optional[Dict[str, str]]:
    """Each document's source: the source of a query that judges it relevant (MedQuAD: every answer belongs to one
    document of one source). None when the collection has no per-query ``source``."""
    if ds.metadata is None or "source" not in ds.metadata.columns:
        return None
    src = ds.metadata["source"].to_dict()
    out: Dict[str, str] = {}
    for q, judged in ds.qrels.items():
        for d, g in judged.items():
            if g > 0 and q in src:
                out.setdefault(d, str(src[q]))
    return out


def _select(ds: RetrievalDataset, holdout: Optional[RetrievalDataset], exclude_sources: Sequence[str]
            ) -> Tuple[Dict[str, str], Dict[str, str], Dict[str, List[str]], Dict[str, Optional[str]],
                       Dict[str, Optional[str]], Dict[str, int]]:
    """(queries, corpus, positives per query, query sources, document sources, counts) after the exclusions."""
    counts = {"queries_in": len(ds.queries), "documents_in": len(ds.corpus)}
    doc_src = _doc_sources(ds) or {}
    q_src: Dict[str, Optional[str]] = ({} if ds.metadata is None or "source" not in ds.metadata.columns
                                       else {str(k): str(v) for k, v in ds.metadata["source"].items()})
    excluded = set(exclude_sources)
    if excluded:
        if not q_src:
            raise ValueError("exclude_sources needs a collection with a per-query 'source' (MedQuAD has one)")
        unknown = excluded - set(q_src.values())
        if unknown:
            raise ValueError(f"exclude_sources: no source named {', '.join(sorted(unknown))} in {ds.name} "
                             f"(sources: {', '.join(sorted(set(q_src.values())))})")
    held_q, held_d = set(), set()
    if holdout is not None:
        if is_sharded(holdout.corpus):
            raise ValueError("holdout must hold its corpus texts in memory (not a sharded corpus)")
        held_q = {normalize_text(t, lower=True) for t in holdout.queries.values()}
        held_d = {normalize_text(t, lower=True) for t in holdout.corpus.values()}
    corpus: Dict[str, str] = {}
    n_src_d = n_hold_d = 0
    for d, text in ds.corpus.items():
        if doc_src.get(d) in excluded:
            n_src_d += 1
        elif normalize_text(text, lower=True) in held_d or normalize_text(text, lower=True) in held_q:
            n_hold_d += 1
        else:
            corpus[d] = text
    queries: Dict[str, str] = {}
    positives: Dict[str, List[str]] = {}
    n_src_q = n_hold_q = n_nopos = 0
    for q, text in ds.queries.items():
        if q_src.get(q) in excluded:
            n_src_q += 1
            continue
        if normalize_text(text, lower=True) in held_q:
            n_hold_q += 1
            continue
        pos = [d for d, g in ds.qrels.get(q, {}).items() if g > 0 and d in corpus]
        if not pos:
            n_nopos += 1
            continue
        queries[q] = text
        positives[q] = pos
    counts.update(queries_dropped_excluded_source=n_src_q, queries_dropped_in_holdout=n_hold_q,
                  queries_dropped_no_positive=n_nopos, documents_dropped_excluded_source=n_src_d,
                  documents_dropped_in_holdout=n_hold_d, queries=len(queries), documents=len(corpus))
    return queries, corpus, positives, q_src, {d: doc_src.get(d) for d in corpus}, counts


# ---------------------------------------------------------------------------------------------------- mining
def _pair_rng(seed: int, qid: str, pid: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(qid.encode("utf-8")), zlib.crc32(pid.encode("utf-8"))])


def _candidates(t_rank: np.ndarray, s_rank: Optional[np.ndarray], cfg: ExportConfig) -> List[Tuple[int, int, int]]:
    """(doc row, teacher rank, student rank) of the candidates in the rank range, best rank first (teacher first
    on ties), each document once; ranks are -1 where that model did not rank it in its top ``range_max``."""
    t_pos = {int(d): r for r, d in enumerate(t_rank)}
    s_pos = {int(d): r for r, d in enumerate(s_rank)} if s_rank is not None else {}
    lists = {"teacher": [t_rank], "student": [s_rank], "both": [t_rank, s_rank]}[cfg.negatives_from]
    order: List[Tuple[int, int, int]] = []
    for li, ranking in enumerate(lists):
        for r in range(cfg.range_min, min(cfg.range_max, len(ranking))):
            order.append((r, li, int(ranking[r])))
    order.sort()
    seen, out = set(), []
    for _, _, d in order:
        if d not in seen:
            seen.add(d)
            out.append((d, t_pos.get(d, -1), s_pos.get(d, -1)))
    return out


def _mine_pair(qi: int, pi: int, pos_rows: Sequence[int], relevant: set, cands, q_emb: np.ndarray,
               d_emb: np.ndarray, d_norm: Sequence[str], cfg: ExportConfig, rng: Optional[np.random.Generator]
               ) -> Tuple[List[Tuple[int, int, int, float]], Dict[str, int]]:
    """The negatives of one (query, positive) pair: (doc row, teacher rank, student rank, teacher cosine)."""
    s_pos = float(q_emb[qi] @ d_emb[pi])
    ceiling = s_pos - cfg.margin - cfg.relative_margin * abs(s_pos)
    pos_norm = {d_norm[p] for p in pos_rows}
    skipped = {"relevant": 0, "duplicate_text": 0, "duplicate_cosine": 0, "margin": 0}
    eligible = []
    for d, tr, sr in cands:
        if d in relevant:
            skipped["relevant"] += 1
        elif d_norm[d] in pos_norm:
            skipped["duplicate_text"] += 1
        elif float(np.max(d_emb[pos_rows] @ d_emb[d])) >= cfg.duplicate_cosine:
            skipped["duplicate_cosine"] += 1
        else:
            s = float(q_emb[qi] @ d_emb[d])
            if s > ceiling:
                skipped["margin"] += 1
            else:
                eligible.append((d, tr, sr, s))
    if cfg.sampling == "random" and len(eligible) > cfg.num_negatives:
        keep = np.sort(rng.choice(len(eligible), size=cfg.num_negatives, replace=False))
        eligible = [eligible[i] for i in keep]
    return eligible[: cfg.num_negatives], skipped


def _rankings(q_emb: np.ndarray, d_emb: np.ndarray, depth: int) -> Tuple[np.ndarray, np.ndarray]:
    return search(q_emb, d_emb, k=min(depth, d_emb.shape[0]), normalize=False)


def _encode(enc: "Encoder", texts: List[str], what: str, cfg: ExportConfig, show_progress_bar) -> np.ndarray:
    fn = enc.encode_query if what == "query" else enc.encode_document
    return fn(texts, batch_size=cfg.batch_size, max_length=cfg.max_length, normalize=True,
              show_progress_bar=show_progress_bar)


# ---------------------------------------------------------------------------------------------------- files
def _write_table(df: pd.DataFrame, d: Path, name: str, formats: Sequence[str]) -> List[Path]:
    out = []
    for fmt in formats:
        path = d / f"{name}.{fmt}"
        if fmt == "parquet":
            df.to_parquet(path, index=False, compression="zstd")
        else:
            with open(path, "w", encoding="utf-8", newline="\n") as f:
                for rec in df.to_dict(orient="records"):
                    f.write(json.dumps({k: _json_value(v) for k, v in rec.items()}, ensure_ascii=False))
                    f.write("\n")
        out.append(path)
    return out


def _json_value(v):
    if isinstance(v, (np.floating, float)):
        return float(v)
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, np.bool_):
        return bool(v)
    return v


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"cannot export to {out}: it exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not overwrite:
        try:
            ours = json.loads((out / MANIFEST).read_text(encoding="utf-8")).get("format") == EXPORT_FORMAT
        except (OSError, ValueError, AttributeError):
            ours = False
        if not ours:
            raise FileExistsError(f"refusing to export into {out}: it is not empty and holds no medquant export "
                                  "(pass overwrite=True to replace the directory and everything in it)")


def _card(info: Dict[str, Any]) -> str:
    c, cfg = info["counts"], info["config"]
    student = info["student"]
    lines = [
        f"# medquant training data: {info['dataset']}",
        "",
        f"Exported by medquant {info['medquant_version']} with `medquant.finetune.export_training_data`.",
        "",
        "## Source",
        f"- Collection: `{info['dataset']}`; license: {info['license']}.",
    ]
    if info.get("citation"):
        lines.append(f"- Cite: {info['citation']}")
    lines += [
        f"- Held out (never exported): `{info['holdout'] or 'nothing'}`; every training query whose text is a "
        "held-out query, and every document whose text is a held-out document or query, was dropped before mining.",
        f"- Sources excluded entirely: {', '.join(info['exclude_sources']) or 'none'}.",
        "",
        "## Models",
        f"- Teacher (fp32, mines negatives and gives the scores): `{info['teacher']}`.",
        f"- Student: {'`' + student + '` (its quantization parameters are in `quant_params/`)' if student else 'none'}.",
        "",
        "## Mining",
        f"- Seed {cfg['seed']}; {cfg['num_negatives']} negatives per pair, sampling `{cfg['sampling']}` from ranks "
        f"{cfg['range_min']}..{cfg['range_max'] - 1} of the "
        f"{ {'teacher': 'teacher', 'student': 'student', 'both': 'teacher and student'}[cfg['negatives_from']]}"
        f"'s ranking{'s' if cfg['negatives_from'] == 'both' else ''}.",
        f"- Skipped as false negatives: judged relevant ({c['skipped_relevant']}), same text as a positive "
        f"({c['skipped_duplicate_text']}), teacher cosine to a positive >= {cfg['duplicate_cosine']} "
        f"({c['skipped_duplicate_cosine']}), teacher score within margin {cfg['margin']} + "
        f"{cfg['relative_margin']} x |positive score| of the positive ({c['skipped_margin']}).",
        "",
        "## Counts",
        f"- Queries: {c['queries']} of {c['queries_in']} (dropped: {c['queries_dropped_in_holdout']} in the held-out "
        f"split, {c['queries_dropped_excluded_source']} of excluded sources, {c['queries_dropped_no_positive']} "
        "without a remaining positive).",
        f"- Documents: {c['documents']} of {c['documents_in']} (dropped: {c['documents_dropped_in_holdout']} in the "
        f"held-out split, {c['documents_dropped_excluded_source']} of excluded sources).",
        f"- Pairs {c['pairs']}; triplets {c['triplets']}; pairs without an eligible negative "
        f"{c['pairs_without_negative']}.",
    ]
    if student:
        lines.append(f"- Queries the student ranks worse than the teacher ({cfg['metric']}): {c['queries_hurt']}.")
    lines += [
        "",
        "## Files",
        "- `pairs`: anchor, positive. `triplets`: anchor, positive, negative. `scored`: query, positive, negative, "
        "score (teacher cosine margin, MarginMSELoss's label).",
        "- `triplets_meta` (row-aligned with `triplets` and `scored`): query_id, positive_id, negative_id, "
        "teacher_rank, student_rank, teacher_positive, teacher_negative, quant_hurt, weight.",
        "- `queries`: per query its positives, negatives and per-query metric of teacher (and student); `documents`: "
        "the mining corpus.",
        f"- Formats: {', '.join(cfg['formats'])}. Load with `datasets.load_dataset(\"parquet\", "
        "data_files=\"triplets.parquet\")` or pandas.",
        "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- export
def export_training_data(teacher: "Encoder", dataset: RetrievalDataset, out: Union[str, os.PathLike], *,
                         student: Optional["Encoder"] = None, holdout: Optional[RetrievalDataset] = None,
                         exclude_sources: Sequence[str] = (), config: Optional[ExportConfig] = None,
                         license: Optional[str] = None, citation: Optional[str] = None, overwrite: bool = False,
                         show_progress_bar: Optional[bool] = None) -> TrainingExport:
    """Mine hard negatives, score them with the teacher, flag where the student loses, and write the training files
    (see the module docstring) to ``out``, a new directory (or an earlier export, replaced; anything else is
    refused unless ``overwrite``). The directory is written next to ``out`` and renamed into place.

    teacher: the fp32 encoder. student: optionally the quantized encoder (its ranking can supply negatives, its
    per-query losses are flagged, its parameters exported). holdout: the collection evaluation uses (no text of it
    is exported). exclude_sources: sources dropped entirely. license / citation: of the collection, for the
    dataset card (MedQuAD's are filled in by :func:`medquad_training_data`).
    Same inputs, same seed: byte-identical files.
    """
    cfg = config if config is not None else ExportConfig()
    _check_inputs(teacher, dataset, student, holdout, cfg)
    out = Path(out).expanduser()
    _check_out(out, overwrite)
    queries, corpus, positives, q_src, d_src, counts = _select(dataset, holdout, tuple(exclude_sources))
    if not queries:
        raise ValueError(f"no training query is left in {dataset.name} after the exclusions ({counts})")
    qids, dids = list(queries), list(corpus)
    qrels = {q: {d: 1 for d in positives[q]} for q in qids}
    t_q, t_d, t_idx, t_metric = _rank(teacher, queries, corpus, qrels, cfg, show_progress_bar)
    s_idx = s_metric = None
    if student is not None:
        _, _, s_idx, s_metric = _rank(student, queries, corpus, qrels, cfg, show_progress_bar)
    rows = _mine(queries, corpus, positives, q_src, (t_q, t_d, t_idx, t_metric), s_idx, s_metric, cfg, counts)
    tables = _tables(rows, dids, corpus, d_src)

    from .. import __version__

    info = {
        "format": EXPORT_FORMAT, "medquant_version": __version__, "dataset": dataset.name,
        "holdout": holdout.name if holdout is not None else None, "exclude_sources": sorted(exclude_sources),
        "license": license or "not recorded (give license= for the dataset card)", "citation": citation,
        "teacher": teacher.name, "student": (f"{student.name} [{student.scheme.name}]" if student is not None
                                             else None),
        "config": cfg.to_dict(), "counts": counts,
        "columns": {**COLUMNS, **{n: list(tables[n].columns) for n in ("triplets_meta", "queries", "documents")}},
    }
    embeddings = {"query": t_q, "document": t_d} if cfg.teacher_embeddings else None
    _write_export(out, tables, info, cfg, embeddings, student)
    paths = {name: out / name for name in sorted(info["files"])}
    paths[MANIFEST] = out / MANIFEST
    return TrainingExport(directory=out, files=paths, counts=counts, **tables)


def _check_inputs(teacher, dataset, student, holdout, cfg: ExportConfig) -> None:
    from ..model.encoder import Encoder

    if not isinstance(cfg, ExportConfig):
        raise TypeError("config must be a medquant.finetune.ExportConfig")
    if not isinstance(teacher, Encoder) or (student is not None and not isinstance(student, Encoder)):
        raise TypeError("teacher and student must be medquant Encoders")
    if not isinstance(dataset, RetrievalDataset) or (holdout is not None and not isinstance(holdout, RetrievalDataset)):
        raise TypeError("dataset and holdout must be RetrievalDatasets (medquant.eval.datasets)")
    if is_sharded(dataset.corpus):
        raise ValueError("export_training_data needs the corpus texts in memory (not a sharded corpus)")
    if not teacher.is_fp32:
        raise ValueError(f"the teacher must be an fp32 encoder; {teacher.name} runs scheme {teacher.scheme.name!r}")
    if cfg.negatives_from != "teacher" and student is None:
        raise ValueError(f"negatives_from={cfg.negatives_from!r} needs a student")
    if "parquet" in cfg.formats:
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise ImportError("Parquet files need pyarrow: pip install 'medquant[finetune]' (or pyarrow), or "
                              "export formats=('jsonl',)") from None


def _rank(enc: "Encoder", queries: Dict[str, str], corpus: Dict[str, str], qrels, cfg: ExportConfig,
          show_progress_bar) -> Tuple[np.ndarray, np.ndarray, np.ndarray, pd.Series]:
    """One model's query and document embeddings, its top ``max(range_max, k)`` per query and its per-query
    metric."""
    qids, dids = list(queries), list(corpus)
    q = _encode(enc, [queries[x] for x in qids], "query", cfg, show_progress_bar)
    d = _encode(enc, [corpus[x] for x in dids], "document", cfg, show_progress_bar)
    scores, idx = _rankings(q, d, max(cfg.range_max, cfg.metric_k))
    return q, d, idx, ranking_metrics(qrels, scores, idx, qids, dids, [cfg.metric_k])[cfg.metric]


def _mine(queries, corpus, positives, q_src, teacher, s_idx, s_metric, cfg: ExportConfig,
          counts: Dict[str, int]) -> Dict[str, list]:
    """The rows of every file: per (query, positive) pair its negatives (:func:`_mine_pair`), per query its line;
    adds the mining counts to ``counts``."""
    t_q, t_d, t_idx, t_metric = teacher
    dids = list(corpus)
    row_of = {d: i for i, d in enumerate(dids)}
    d_norm = [normalize_text(corpus[d], lower=True) for d in dids]
    skipped_total = {"relevant": 0, "duplicate_text": 0, "duplicate_cosine": 0, "margin": 0}
    rows: Dict[str, list] = {"pairs": [], "triplets": [], "scored": [], "triplets_meta": [], "queries": []}
    no_negative = 0
    metric = cfg.metric
    for qi, q in enumerate(queries):
        pos_rows = [row_of[d] for d in positives[q]]
        hurt = bool(s_metric is not None and s_metric[q] < t_metric[q])
        weight = cfg.hurt_weight if hurt else 1.0
        cands = _candidates(t_idx[qi], s_idx[qi] if s_idx is not None else None, cfg)
        n_neg = 0
        for d in positives[q]:
            pi = row_of[d]
            rows["pairs"].append((queries[q], corpus[d]))
            rng = _pair_rng(cfg.seed, q, d) if cfg.sampling == "random" else None
            negs, skipped = _mine_pair(qi, pi, pos_rows, set(pos_rows), cands, t_q, t_d, d_norm, cfg, rng)
            for key, v in skipped.items():
                skipped_total[key] += v
            no_negative += not negs
            s_pos = float(t_q[qi] @ t_d[pi])
            for nd, tr, sr, s_neg in negs:
                rows["triplets"].append((queries[q], corpus[d], corpus[dids[nd]]))
                rows["scored"].append((queries[q], corpus[d], corpus[dids[nd]], np.float32(s_pos - s_neg)))
                rows["triplets_meta"].append((q, d, dids[nd], tr, sr, np.float32(s_pos), np.float32(s_neg), hurt,
                                              weight))
            n_neg += len(negs)
        row = {"query_id": q, "query": queries[q]}
        if q_src:
            row["source"] = q_src.get(q)
        row.update(n_positives=len(positives[q]), n_negatives=n_neg, **{f"teacher_{metric}": float(t_metric[q])})
        if s_metric is not None:
            row.update(**{f"student_{metric}": float(s_metric[q])}, delta=float(s_metric[q] - t_metric[q]),
                       quant_hurt=hurt, weight=weight)
        rows["queries"].append(row)
    counts.update(pairs=len(rows["pairs"]), triplets=len(rows["triplets"]), pairs_without_negative=no_negative,
                  **{f"skipped_{k}": v for k, v in skipped_total.items()})
    if s_metric is not None:
        counts["queries_hurt"] = int(sum(1 for r in rows["queries"] if r["quant_hurt"]))
    return rows


def _tables(rows: Dict[str, list], dids: List[str], corpus: Dict[str, str], d_src) -> Dict[str, pd.DataFrame]:
    return {
        "pairs": pd.DataFrame(rows["pairs"], columns=COLUMNS["pairs"]),
        "triplets": pd.DataFrame(rows["triplets"], columns=COLUMNS["triplets"]),
        "scored": pd.DataFrame(rows["scored"], columns=COLUMNS["scored"]).astype({"score": np.float32}),
        "triplets_meta": pd.DataFrame(rows["triplets_meta"], columns=[
            "query_id", "positive_id", "negative_id", "teacher_rank", "student_rank", "teacher_positive",
            "teacher_negative", "quant_hurt", "weight"]).astype(
            {"teacher_rank": np.int32, "student_rank": np.int32, "teacher_positive": np.float32,
             "teacher_negative": np.float32, "quant_hurt": bool, "weight": np.float32}),
        "queries": pd.DataFrame(rows["queries"]),
        "documents": pd.DataFrame({"doc_id": dids, "text": [corpus[d] for d in dids],
                                   "source": [d_src.get(d) for d in dids]}),
    }


def _write_export(out: Path, tables: Dict[str, pd.DataFrame], info: Dict[str, Any], cfg: ExportConfig,
                  embeddings: Optional[Dict[str, np.ndarray]], student) -> None:
    """Every file into a fresh directory beside ``out``, the manifest (with each file's sha256) last, then renamed
    into place; sets ``info["files"]``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.medquant-tmp-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        files: Dict[str, Path] = {}
        for name, df in tables.items():
            for p in _write_table(df, tmp, name, cfg.formats):
                files[p.name] = p
        if embeddings is not None:
            from safetensors.numpy import save_file

            save_file(embeddings, str(tmp / "teacher_embeddings.safetensors"),
                      metadata={"rows": "L2-normalised; rows follow the queries and documents tables"})
            # (one metadata entry: safetensors writes several in no fixed order, and the files must be byte-stable)
            files["teacher_embeddings.safetensors"] = tmp / "teacher_embeddings.safetensors"
        if student is not None and not student.is_fp32:
            student.quant_params().save(tmp / "quant_params")
            for p in sorted((tmp / "quant_params").iterdir()):
                files[f"quant_params/{p.name}"] = p
        (tmp / CARD).write_text(_card(info), encoding="utf-8")
        files[CARD] = tmp / CARD
        info["files"] = {name: file_digest(p) for name, p in sorted(files.items())}
        with open(tmp / MANIFEST, "w", encoding="utf-8") as f:
            json.dump(info, f, indent=1, sort_keys=True)
            f.write("\n")
        swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def medquad_training_data(teacher: "Encoder", out: Union[str, os.PathLike], *, student: Optional["Encoder"] = None,
                          limit: Optional[int] = None, exclude_sources: Sequence[str] = (),
                          config: Optional[ExportConfig] = None, seed: int = 13, root=None, overwrite: bool = False,
                          show_progress_bar: Optional[bool] = None) -> TrainingExport:
    """:func:`export_training_data` on MedQuAD: trains on the ``dev`` split (optionally a seeded sample of
    ``limit`` queries with a corpus of 4 x ``limit`` documents), holds out the whole ``test`` split (what
    ``benchmarks/recovery.py`` evaluates on), MedQuAD's license and citation on the dataset card. ``seed`` is the
    seed of the document split and of the sample (13: the splits every medquant result uses)."""
    train = medquad_retrieval("dev", seed=seed, limit=limit, root=root)
    test = medquad_retrieval("test", seed=seed, root=root)
    return export_training_data(teacher, train, out, student=student, holdout=test, exclude_sources=exclude_sources,
                                config=config, license=MEDQUAD_LICENSE, citation=MEDQUAD_CITATION,
                                overwrite=overwrite, show_progress_bar=show_progress_bar)


__all__ = ["COLUMNS", "ExportConfig", "FORMATS", "TrainingExport", "export_training_data", "medquad_training_data"]
