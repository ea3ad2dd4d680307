"""Retrieval datasets: MedQuAD (parsed from its XML), BEIR-format directories and TREC qrels files.

MedQuAD parsing rules (they reproduce the documented counts exactly: 47,457 QA pairs in the XML, 16,423 of
them with an answer)
-------------------------------------------------------------------------------------------------------------
* Every ``*.xml`` file in every subset directory (``1_CancerGov_QA`` ... ``12_MPlusHerbsSupplements_QA``) is one
  MedQuAD *document*. Tags are matched case-insensitively, so the 4 NINDS files written in the lower-case schema
  (``<doc docid corpus>``, ``<doctitle-focus>``, ``<umls><cui>``, ``<qaPairs><pair><question><answer>``) and
  ``9_CDC_QA/0000397.xml`` (root ``<DiseaseFile fid>``, ``<UMLS>`` directly under the root) parse like the rest.
* A QA pair is any ``<QAPair>``/``<pair>`` element; its question and answer are its ``<Question>``/``<Answer>``
  children (full text content, leading/trailing whitespace stripped).
* A pair is *answered* iff its answer element exists and its text is non-empty after stripping whitespace.
  This removes all 31,029 pairs of the three MedlinePlus subsets whose answers were removed for copyright
  (A.D.A.M., Drugs, Herbs & Supplements: every ``<Answer>`` is empty) and 5 GARD pairs with an empty
  ``<Answer/>`` (files 0002079, 0002080, 0002253, 0002747, 0006509), which is what takes GARD from 5,394 pairs
  to the documented 5,389. No pair in the collection has a whitespace-only answer, so stripping does not
  change any count.
* The document id is the *file name stem*, not the XML ``id`` attribute: ten CancerGov files
  (``0000013_2_1.xml`` ... ``0000013_3_4.xml``) repeat the ``id`` (and hence the ``qid`` values) of their parent
  page ``0000013_2.xml``/``0000013_3.xml``. Ids are made globally unique by prefixing the subset name:
  ``doc_id = "<source>/<file stem>"`` and ``qa_id = "<doc_id>-<pid>"``, e.g. ``GARD/0000001-1``. The original
  ``qid`` attribute is kept in the ``qid`` column.
"""
from __future__ import annotations

import dataclasses
import functools
import gzip
import json
import os
import re
import warnings
import xml.etree.ElementTree as ET
import zlib
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple, Union

import numpy as np
import pandas as pd

from ..model.limits import regular_file

PathLike = Union[str, "os.PathLike[str]"]


class DatasetError(ValueError):
    """A dataset file is malformed; the message names the file and, where there is one, the line."""

#: Subset directory -> short source name used in ids and the ``source`` column.
MEDQUAD_SUBSETS: Dict[str, str] = {
    "1_CancerGov_QA": "CancerGov",
    "2_GARD_QA": "GARD",
    "3_GHR_QA": "GHR",
    "4_MPlus_Health_Topics_QA": "MPlusHealthTopics",
    "5_NIDDK_QA": "NIDDK",
    "6_NINDS_QA": "NINDS",
    "7_SeniorHealth_QA": "SeniorHealth",
    "8_NHLBI_QA_XML": "NHLBI",
    "9_CDC_QA": "CDC",
    "10_MPlus_ADAM_QA": "MPlusADAM",
    "11_MPlusDrugs_QA": "MPlusDrugs",
    "12_MPlusHerbsSupplements_QA": "MPlusHerbsSupplements",
}

#: Answered QA pairs per source, as documented for MedQuAD (the three other subsets have no answers).
MEDQUAD_ANSWERED_COUNTS: Dict[str, int] = {
    "CancerGov": 729, "GARD": 5389, "GHR": 5430, "MPlusHealthTopics": 981, "NIDDK": 1192, "NINDS": 1104,
    "SeniorHealth": 769, "NHLBI": 559, "CDC": 270,
}

MEDQUAD_COLUMNS = [
    "qa_id", "doc_id", "source", "subset", "file", "qid", "pid", "qtype", "focus", "category", "cuis",
    "semantic_types", "semantic_group", "synonyms", "url", "question", "answer",
]
_LIST_COLUMNS = ("cuis", "semantic_types", "synonyms")

_WS = re.compile(r"\s+")


def normalize_text(text: str, lower: bool = False) -> str:
    """Collapse runs of whitespace to one space and strip; optionally lower-case.

    Parameters
    ----------
    text : str
        Input text.
    lower : bool
        Also lower-case the text (used to merge identical questions).

    Returns
    -------
    str
    """
    out = _WS.sub(" ", text).strip()
    return out.lower() if lower else out


# ---------------------------------------------------------------------------------------------------- data root
def data_root() -> Path:
    """Directory holding the MedQuAD subsets.

    ``$MEDQUANT_DATA`` if set; else the first existing of ``<repo>/../shared/data/medquad`` (``<repo>`` being
    the parent of the ``medquant`` package directory) and ``./shared/data/medquad``.

    Returns
    -------
    pathlib.Path

    Raises
    ------
    FileNotFoundError
        If ``$MEDQUANT_DATA`` points to a missing directory, or neither default location exists.
    """
    env = os.environ.get("MEDQUANT_DATA")
    if env:
        p = Path(env).expanduser()
        if not p.is_dir():
            raise FileNotFoundError(f"MEDQUANT_DATA={env!r} is not a directory")
        return p
    repo = Path(__file__).resolve().parents[2]  # medquant/eval/datasets.py -> the repository
    candidates = [repo.parent / "shared" / "data" / "medquad", Path.cwd() / "shared" / "data" / "medquad"]
    for c in candidates:
        if c.is_dir():
            return c
    raise FileNotFoundError(
        "MedQuAD data directory not found; looked in "
        + " and ".join(str(c) for c in candidates)
        + " (set $MEDQUANT_DATA to the directory holding the MedQuAD subset folders)"
    )


# ---------------------------------------------------------------------------------------------------- MedQuAD XML
def _lower_tag(el: ET.Element) -> str:
    return el.tag.lower() if isinstance(el.tag, str) else ""


def _text(el: Optional[ET.Element]) -> str:
    return "".join(el.itertext()).strip() if el is not None else ""


def _subset_sort_key(name: str) -> Tuple[int, str]:
    m = re.match(r"(\d+)_", name)
    return (int(m.group(1)) if m else 10**6, name)


def _source_name(subset: str) -> str:
    if subset in MEDQUAD_SUBSETS:
        return MEDQUAD_SUBSETS[subset]
    name = re.sub(r"^\d+_", "", subset)
    return re.sub(r"_QA(_XML)?$", "", name)


def _parse_medquad_file(path: Path, subset: str, source: str, include_unanswered: bool) -> List[tuple]:
    root = ET.parse(path).getroot()
    stem = path.stem
    doc_id = f"{source}/{stem}"
    focus = ""
    category = ""
    cuis: List[str] = []
    stypes: List[str] = []
    sgroups: List[str] = []
    unique_lists = {"cui": cuis, "semantictype": stypes, "semanticgroup": sgroups}
    synonyms: List[str] = []
    pairs: List[ET.Element] = []
    # Document-level annotations: walk everything except the QA pairs' subtrees.
    stack = list(root)
    while stack:
        el = stack.pop(0)
        tag = _lower_tag(el)
        if tag in ("qapair", "pair"):
            pairs.append(el)
            continue
        if tag in ("focus", "doctitle-focus") and not focus:
            focus = _text(el)
        elif tag == "category" and not category:
            category = _text(el)
        elif tag in unique_lists:  # UMLS annotations: distinct values in document order
            t = _text(el)
            if t and t not in unique_lists[tag]:
                unique_lists[tag].append(t)
        elif tag == "synonym":
            t = _text(el)
            if t:
                synonyms.append(t)
        stack.extend(list(el))
    url = root.get("url", "")
    rel_file = f"{subset}/{path.name}"
    rows = []
    for i, pair in enumerate(pairs):
        q_el = a_el = None
        for child in pair:
            tag = _lower_tag(child)
            if tag == "question" and q_el is None:
                q_el = child
            elif tag == "answer" and a_el is None:
                a_el = child
        answer = _text(a_el)
        if not answer and not include_unanswered:
            continue
        pid = pair.get("pid") or str(i + 1)
        rows.append((
            f"{doc_id}-{pid}", doc_id, source, subset, rel_file,
            q_el.get("qid", "") if q_el is not None else "", pid,
            q_el.get("qtype", "") if q_el is not None else "",
            focus, category, tuple(cuis), tuple(stypes), "|".join(sgroups), tuple(synonyms), url,
            _text(q_el), answer,
        ))
    return rows


@functools.lru_cache(maxsize=8)
def _load_medquad_cached(root: str, include_unanswered: bool) -> pd.DataFrame:
    base = Path(root)
    subsets = sorted((d.name for d in base.iterdir() if d.is_dir() and any(d.glob("*.xml"))),
                     key=_subset_sort_key)
    if not subsets:
        raise FileNotFoundError(f"no MedQuAD subset directories with XML files under {base}")
    rows: List[tuple] = []
    for subset in subsets:
        source = _source_name(subset)
        for path in sorted((base / subset).glob("*.xml")):
            regular_file(path, "MedQuAD file", DatasetError)  # a FIFO named *.xml would block the parser
            try:
                rows.extend(_parse_medquad_file(path, subset, source, include_unanswered))
            except ET.ParseError as exc:  # pragma: no cover - the shipped files all parse
                raise ValueError(f"cannot parse MedQuAD file {path}: {exc}") from exc
    df = pd.DataFrame.from_records(rows, columns=MEDQUAD_COLUMNS)
    if df["qa_id"].duplicated().any():  # pragma: no cover - guarded by the id rules above
        dup = df.loc[df["qa_id"].duplicated(), "qa_id"].iloc[0]
        raise ValueError(f"duplicate MedQuAD qa_id {dup!r}")
    return df


def load_medquad(root: Optional[PathLike] = None, include_unanswered: bool = False) -> pd.DataFrame:
    """Parse every MedQuAD subset into one table, one row per QA pair.

    Parameters
    ----------
    root : path-like, optional
        Directory holding the subset folders; default :func:`data_root`.
    include_unanswered : bool
        Keep pairs without an answer (``answer == ""``); by default they are skipped (see module docstring).

    Returns
    -------
    pandas.DataFrame
        Columns ``qa_id`` (unique, ``<source>/<file stem>-<pid>``), ``doc_id`` (``<source>/<file stem>``),
        ``source`` (e.g. ``"CancerGov"``), ``subset`` (directory name), ``file`` (``<subset>/<name>.xml``),
        ``qid`` (original attribute, not unique), ``pid``, ``qtype``, ``focus``, ``category`` (MedlinePlus
        subsets only), ``cuis``, ``semantic_types``, ``synonyms`` (lists of str), ``semantic_group`` (str, ``|``
        separated if several), ``url``, ``question``, ``answer``. Rows are ordered by subset number, file name
        and position in the file. The parse is cached in-process; every call returns a fresh copy.
    """
    base = Path(root) if root is not None else data_root()
    df = _load_medquad_cached(str(base.resolve()), bool(include_unanswered)).copy()
    for col in _LIST_COLUMNS:
        df[col] = [list(v) for v in df[col]]
    return df


# ---------------------------------------------------------------------------------------------------- task type
@dataclasses.dataclass
class ShardedCorpus:
    """A corpus too large to hold as a dict: rows of a Parquet / JSONL dataset (or a pandas / dask DataFrame) that
    :func:`~medquant.evaluate` encodes on Dask into a sharded index per system
    (:func:`medquant.distributed.encode_corpus`, under ``work_dir/<system>``, resumed when already there) and
    searches shard by shard. Use it as the ``corpus`` of a :class:`RetrievalDataset`; needs ``medquant[dask]``.

    Attributes
    ----------
    source : path, pandas.DataFrame or dask DataFrame
        The rows (see :func:`medquant.distributed.encode_corpus`).
    work_dir : path
        Where each system's index is written.
    id_column, text_column : str
    client : distributed.Client, optional
        The cluster (default: a LocalCluster per encoding job).
    partition_rows : int
        Rows per partition of a pandas source.
    """

    source: Any
    work_dir: Union[str, "os.PathLike[str]"]
    id_column: str = "id"
    text_column: str = "text"
    client: Any = None
    partition_rows: int = 10_000
    _ids: Optional[List[str]] = dataclasses.field(default=None, repr=False, compare=False)
    _id_set: Optional[set] = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def ids(self) -> List[str]:
        """Every row's id in source (= shard) order, read once (only the id column is read)."""
        if self._ids is None:
            from ..distributed.encode import read_source_ids

            self._ids = read_source_ids(self.source, self.id_column, self.text_column, self.partition_rows)
        return self._ids

    def __len__(self) -> int:
        return len(self.ids)

    def __iter__(self):
        return iter(self.ids)

    def __contains__(self, doc_id) -> bool:
        if self._id_set is None:
            self._id_set = set(self.ids)
        return doc_id in self._id_set


def is_sharded(corpus) -> bool:
    return isinstance(corpus, ShardedCorpus)


@dataclasses.dataclass
class RetrievalDataset:
    """A retrieval task: a corpus, queries and graded relevance judgements.

    Attributes
    ----------
    name : str
        Human-readable name (e.g. ``"medquad-test"``).
    corpus : dict[str, str] or ShardedCorpus
        Document id -> text, in a fixed order (the order embeddings are computed in); or a
        :class:`ShardedCorpus` whose rows are encoded on Dask by :func:`~medquant.evaluate`.
    queries : dict[str, str]
        Query id -> text.
    qrels : dict[str, dict[str, int]]
        Query id -> {document id -> relevance grade}; grades <= 0 are judged non-relevant.
    metadata : pandas.DataFrame, optional
        Per-query metadata indexed by query id (e.g. MedQuAD ``source``/``qtype``), used for breakdowns.
    """

    name: str
    corpus: Dict[str, str]
    queries: Dict[str, str]
    qrels: Dict[str, Dict[str, int]]
    metadata: Optional[pd.DataFrame] = None

    def __len__(self) -> int:
        return len(self.queries)

    @property
    def query_ids(self) -> List[str]:
        """Query ids in order."""
        return list(self.queries)

    @property
    def doc_ids(self) -> List[str]:
        """Corpus ids in order."""
        return list(self.corpus.ids) if is_sharded(self.corpus) else list(self.corpus)

    def sample(self, n: int, seed: int = 0, corpus_size: Optional[int] = None) -> "RetrievalDataset":
        """A seeded subset of the queries, optionally with a smaller corpus.

        Parameters
        ----------
        n : int
            Number of queries to keep (all if ``n >= len(self)``); chosen uniformly at random with ``seed``,
            kept in their original order.
        seed : int
            Seed of :func:`numpy.random.default_rng`.
        corpus_size : int, optional
            If given, the corpus is cut to ``max(corpus_size, #docs judged relevant for the kept queries)``
            documents: every relevant (grade > 0) document of a kept query, plus distractors drawn uniformly
            at random (same seed) from the rest. Corpus order is preserved. By default the corpus is kept.

        Returns
        -------
        RetrievalDataset
        """
        if n < 0:
            raise ValueError("n must be >= 0")
        rng = np.random.default_rng(seed)
        qids = list(self.queries)
        if n < len(qids):
            keep = np.sort(rng.choice(len(qids), size=n, replace=False))
            qids = [qids[i] for i in keep]
        keep_q = set(qids)
        corpus = self.corpus
        if corpus_size is not None and is_sharded(corpus):
            raise ValueError("corpus_size cannot cut a sharded corpus (its texts are not in memory); sample its "
                             "source before encoding it")
        if corpus_size is not None:
            relevant = {d for q in qids for d, g in self.qrels.get(q, {}).items() if g > 0 and d in self.corpus}
            others = [d for d in self.corpus if d not in relevant]
            n_extra = max(0, min(len(others), int(corpus_size) - len(relevant)))
            extra = {others[i] for i in rng.choice(len(others), size=n_extra, replace=False)} if n_extra else set()
            corpus = {d: t for d, t in self.corpus.items() if d in relevant or d in extra}
        queries = {q: self.queries[q] for q in qids}
        qrels = {q: {d: g for d, g in self.qrels[q].items() if d in corpus} for q in qids if q in self.qrels}
        meta = None
        if self.metadata is not None:
            meta = self.metadata.loc[[q for q in self.metadata.index if q in keep_q]].copy()
        return RetrievalDataset(name=self.name, corpus=corpus if is_sharded(corpus) else dict(corpus), queries=queries,
                                qrels=qrels, metadata=meta)

    def describe(self) -> Dict[str, Any]:
        """Summary statistics.

        Returns
        -------
        dict
            ``name``, ``n_queries``, ``n_docs``, ``n_judgements``, ``n_relevant`` (grade > 0),
            ``relevant_per_query`` (mean), ``queries_without_relevant``, ``query_words`` / ``doc_words``
            (mean whitespace-token counts), ``doc_words_max``, ``grades`` ({grade: count}).
        """
        rel_counts = [sum(1 for g in self.qrels.get(q, {}).values() if g > 0) for q in self.queries]
        grades: Dict[int, int] = {}
        for judged in self.qrels.values():
            for g in judged.values():
                grades[int(g)] = grades.get(int(g), 0) + 1
        # a sharded corpus' texts are not read here
        doc_words = (np.zeros(0, np.int64) if is_sharded(self.corpus) else
                     np.array([len(t.split()) for t in self.corpus.values()], dtype=np.int64))
        q_words = np.array([len(t.split()) for t in self.queries.values()], dtype=np.int64)
        return {
            "name": self.name,
            "n_queries": len(self.queries),
            "n_docs": len(self.corpus),
            "n_judgements": int(sum(len(v) for v in self.qrels.values())),
            "n_relevant": int(sum(rel_counts)),
            "relevant_per_query": float(np.mean(rel_counts)) if rel_counts else 0.0,
            "queries_without_relevant": int(sum(1 for c in rel_counts if c == 0)),
            "query_words": float(q_words.mean()) if q_words.size else 0.0,
            "doc_words": float(doc_words.mean()) if doc_words.size else 0.0,
            "doc_words_max": int(doc_words.max()) if doc_words.size else 0,
            "grades": dict(sorted(grades.items())),
        }

    def __repr__(self) -> str:
        return (f"RetrievalDataset(name={self.name!r}, queries={len(self.queries)}, docs={len(self.corpus)}, "
                f"judgements={sum(len(v) for v in self.qrels.values())})")


# ---------------------------------------------------------------------------------------------------- MedQuAD task
def medquad_split_documents(df: pd.DataFrame, seed: int = 13, dev_fraction: float = 0.5) -> Dict[str, str]:
    """Assign every MedQuAD document (XML file) to ``"dev"`` or ``"test"``.

    Stratified by source: within each source the documents (sorted by id) are permuted with a generator
    seeded by ``(seed, crc32(source))`` and the first ones, until their QA pairs reach ``dev_fraction`` of the
    source's pairs (a document goes to dev if the midpoint of its cumulative pair count lies below the cut),
    go to dev; the rest to test.

    Parameters
    ----------
    df : pandas.DataFrame
        :func:`load_medquad` output.
    seed : int
    dev_fraction : float
        In ``(0, 1)``.

    Returns
    -------
    dict[str, str]
        doc_id -> ``"dev"`` | ``"test"``.
    """
    if not 0.0 < dev_fraction < 1.0:
        raise ValueError("dev_fraction must be in (0, 1)")
    out: Dict[str, str] = {}
    for source in sorted(df["source"].unique()):
        counts = df.loc[df["source"] == source].groupby("doc_id", sort=True).size()
        rng = np.random.default_rng([int(seed), zlib.crc32(source.encode("utf-8"))])
        order = rng.permutation(len(counts))
        sizes = counts.to_numpy()[order]
        cum = np.cumsum(sizes)
        mid = cum - sizes / 2.0
        is_dev = mid < dev_fraction * cum[-1]
        for doc, dev in zip(counts.index.to_numpy()[order], is_dev):
            out[str(doc)] = "dev" if dev else "test"
    return out


def medquad_retrieval(split: str = "dev", seed: int = 13, dev_fraction: float = 0.5, limit: Optional[int] = None,
                      root: Optional[PathLike] = None, corpus_factor: int = 4) -> RetrievalDataset:
    """MedQuAD as a question -> answer retrieval task.

    Construction (all deterministic given ``seed``):

    * Documents (XML files) are split into dev/test with :func:`medquad_split_documents`; a split's queries
      and corpus come only from its own documents (``split="all"`` uses every document), so no corpus entry,
      query or judgement is shared between dev and test.
    * Corpus: one entry per distinct answer text within the split (whitespace-normalised, case-sensitive),
      keyed by the ``qa_id`` of the first pair (in :func:`load_medquad` order) carrying that answer; the text is
      the whitespace-normalised answer. Identical boilerplate answers (e.g. GHR's inheritance paragraphs, which
      recur hundreds of times) thus become one document. Because the split is by document, the same
      boilerplate text can exist as one corpus entry in dev and another in test.
    * Queries: questions merged by case- and whitespace-normalised text within the split, keyed by the
      ``qa_id`` of the first pair; the text is that pair's question.
    * Qrels: a query is relevant (grade 1) to the corpus entries of the answers of all pairs merged into it.
    * ``limit``: keep ``limit`` queries (seeded sample) and cut the corpus to
      ``max(corpus_factor * limit, #relevant docs of the kept queries)`` entries: all relevant docs plus a
      seeded uniform sample of distractors from the split (see :meth:`RetrievalDataset.sample`).

    Parameters
    ----------
    split : {"dev", "test", "all"}
    seed : int
        Seed of the document split and of the ``limit`` sample.
    dev_fraction : float
        Fraction of each source's QA pairs assigned to dev.
    limit : int, optional
        Number of queries to keep (fast runs).
    root : path-like, optional
        MedQuAD directory (default :func:`data_root`).
    corpus_factor : int
        Corpus size per kept query when ``limit`` is set.

    Returns
    -------
    RetrievalDataset
        ``metadata`` is indexed by query id with columns ``source``, ``qtype``, ``focus``, ``doc_id``,
        ``n_pairs`` (pairs merged into the query) and ``n_relevant``.
    """
    if split not in ("dev", "test", "all"):
        raise ValueError(f"split must be 'dev', 'test' or 'all', not {split!r}")
    df = load_medquad(root)
    if split != "all":
        assign = medquad_split_documents(df, seed=seed, dev_fraction=dev_fraction)
        df = df.loc[df["doc_id"].map(assign) == split]
    corpus: Dict[str, str] = {}
    answer_key: Dict[str, str] = {}
    queries: Dict[str, str] = {}
    question_key: Dict[str, str] = {}
    qrels: Dict[str, Dict[str, int]] = {}
    meta: Dict[str, Dict[str, Any]] = {}
    for qa_id, question, answer, source, qtype, focus, doc_id in zip(
            df["qa_id"], df["question"], df["answer"], df["source"], df["qtype"], df["focus"], df["doc_id"]):
        a_norm = normalize_text(answer)
        cid = answer_key.get(a_norm)
        if cid is None:
            cid = answer_key[a_norm] = qa_id
            corpus[cid] = a_norm
        q_norm = normalize_text(question, lower=True)
        qid = question_key.get(q_norm)
        if qid is None:
            qid = question_key[q_norm] = qa_id
            queries[qid] = question
            qrels[qid] = {}
            meta[qid] = {"source": source, "qtype": qtype, "focus": focus, "doc_id": doc_id, "n_pairs": 0}
        qrels[qid][cid] = 1
        meta[qid]["n_pairs"] += 1
    metadata = pd.DataFrame.from_dict(meta, orient="index")
    if len(metadata):
        metadata["n_relevant"] = [len(qrels[q]) for q in metadata.index]
    metadata.index.name = "query_id"
    ds = RetrievalDataset(name=f"medquad-{split}", corpus=corpus, queries=queries, qrels=qrels, metadata=metadata)
    if limit is not None:
        if limit <= 0:
            raise ValueError("limit must be a positive number of queries")
        ds = ds.sample(int(limit), seed=seed, corpus_size=int(corpus_factor) * int(limit))
        ds.name = f"medquad-{split}-limit{int(limit)}"
    return ds


# ---------------------------------------------------------------------------------------------------- BEIR / TREC
def _find(path: Path, name: str) -> Path:
    for cand in (path / name, path / (name + ".gz")):
        if os.path.lexists(cand):
            regular_file(cand, "dataset file", DatasetError)
            return cand
    raise FileNotFoundError(f"{path / name} not found")


def _iter_lines(path: Path) -> Iterator[Tuple[int, str]]:
    """(line number, line) of a UTF-8 text file (gzip if ``.gz``); undecodable lines and truncated files are
    DatasetErrors naming the file and the line. Lines are decoded one by one, so the line number is exact."""
    regular_file(path, "dataset file", DatasetError)  # a FIFO or device would block the reader forever
    lineno = 0
    try:
        with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as fh:
            for lineno, raw in enumerate(fh, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise DatasetError(f"{path}:{lineno}: not valid UTF-8 ({exc})") from None
                yield lineno, line
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise DatasetError(f"{path}: corrupt or truncated gzip file after line {lineno} ({exc})") from None


def _iter_jsonl(path: Path) -> Iterator[Tuple[int, dict]]:
    for lineno, line in _iter_lines(path):
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as exc:
            raise DatasetError(f"{path}:{lineno}: invalid JSON ({exc})") from None
        if not isinstance(rec, dict):
            raise DatasetError(f"{path}:{lineno}: expected a JSON object per line, got {type(rec).__name__}")
        yield lineno, rec


def _records(path: Path, kind: str) -> Iterator[Tuple[str, str, dict]]:
    """(where, id, record) per JSONL record of ``path``, ``where`` being ``path:line``; a repeated id is a
    DatasetError naming both lines (``kind``: "document" or "query")."""
    seen: Dict[str, int] = {}
    for lineno, rec in _iter_jsonl(path):
        where = f"{path}:{lineno}"
        rid = _record_id(rec, where)
        if rid in seen:
            raise DatasetError(f"{where}: {kind} id {rid!r} repeats line {seen[rid]}")
        seen[rid] = lineno
        yield where, rid, rec


def _record_id(rec: dict, where: str) -> str:
    """A record's ``_id``: a non-empty string, or an integer (converted with ``str``, so ``5`` and the ``5`` of a
    qrels file are one id). Anything else (float, bool, null, list) is a DatasetError."""
    if "_id" not in rec:
        raise DatasetError(f"{where}: record has no '_id' field")
    v = rec["_id"]
    if isinstance(v, bool) or not isinstance(v, (str, int)):
        raise DatasetError(f"{where}: '_id' must be a string (or an integer), got {type(v).__name__} {v!r}")
    v = str(v)
    if not v.strip():
        raise DatasetError(f"{where}: '_id' is empty")
    if v != v.strip() or any(c in v for c in "\t\n\r"):
        raise DatasetError(f"{where}: '_id' {v!r} has surrounding or embedded whitespace, which a qrels TSV "
                           "cannot match")
    return v


def _record_text(rec: dict, field: str, where: str, required: bool) -> str:
    """A string field of a record: required ``text`` must be present and a string (may be empty); an optional
    ``title`` may be missing or null (no title) and a number is converted with ``str``; other types are errors."""
    if field not in rec or rec[field] is None:
        if required:
            raise DatasetError(f"{where}: record has no '{field}' string")
        return ""
    v = rec[field]
    if isinstance(v, str):
        return v
    if not required and not isinstance(v, bool) and isinstance(v, (int, float)):
        return str(v)
    raise DatasetError(f"{where}: '{field}' must be a string, got {type(v).__name__}")


def _grade(value: str, where: str, allow_negative: bool = True) -> int:
    """An integer relevance grade (``"2"`` or ``"2.0"``); NaN, infinities, fractions, grades beyond a 32-bit int
    (what trec_eval reads) and, unless ``allow_negative``, negative grades are DatasetErrors."""
    try:
        f = float(value)
    except ValueError:
        raise DatasetError(f"{where}: relevance grade {value!r} is not a number") from None
    if not np.isfinite(f):
        raise DatasetError(f"{where}: relevance grade {value!r} is not finite")
    if f != int(f):
        raise DatasetError(f"{where}: relevance grade {value!r} is not an integer")
    g = int(f)
    if not -(2**31) <= g < 2**31:
        raise DatasetError(f"{where}: relevance grade {value!r} is out of range for a 32-bit integer")
    if g < 0 and not allow_negative:
        raise DatasetError(f"{where}: relevance grade {value!r} is negative (BEIR grades are >= 0; use 0 for "
                           "judged non-relevant)")
    return g


def _examples(items: List[str], n: int = 3) -> str:
    shown = ", ".join(repr(x) for x in items[:n])
    return shown + (", ..." if len(items) > n else "")


def load_beir(path: PathLike, split: str = "test", title_sep: str = " ") -> RetrievalDataset:
    """Load a dataset in BEIR layout.

    Parameters
    ----------
    path : path-like
        Directory with ``corpus.jsonl`` (``_id``, ``title``, ``text``), ``queries.jsonl`` (``_id``, ``text``)
        and ``qrels/<split>.tsv`` (tab separated, header ``query-id corpus-id score``); ``.gz`` variants of the
        JSONL files are accepted.
    split : str
        Qrels file to use.
    title_sep : str
        Separator between a non-empty title and the text (the title is prepended).

    Returns
    -------
    RetrievalDataset
        As in BEIR, only queries that appear in the split's qrels are kept (in ``queries.jsonl`` order).
        Grades are kept as given (integers); grade-0 rows stay in the qrels as judged non-relevant.

    Raises
    ------
    DatasetError
        (a ValueError) naming the file and line of: a line that is not a JSON object; a record without ``_id``
        or ``text``; an ``_id`` that is not a string or integer (integers become strings, so ``"_id": 5`` matches
        ``5`` in the qrels), empty, or repeated; a ``text`` that is not a string; a ``title`` that is not a
        string, number or null (numbers become strings); a qrels grade that is not a finite, non-negative
        integer. Files that are not regular files (FIFOs, devices, directories) are refused before opening.

    Warns
    -----
    UserWarning
        * qrels queries missing from ``queries.jsonl``: they are dropped (with their judgements), as BEIR does.
        * qrels documents missing from ``corpus.jsonl``: their judgements are *kept*, as in pytrec_eval / trec_eval
          (and BEIR's evaluation): relevant ones count in ``num_rel`` (the recall / MAP / nDCG denominators) but
          can never be retrieved, so they cap recall below 1. Fix the corpus or the qrels if that is not intended.
    """
    if not isinstance(split, str) or not split or os.sep in split or "/" in split:
        raise ValueError(f"split must be the name of a qrels file in qrels/ (e.g. 'test'), got {split!r}")
    if not isinstance(title_sep, str):
        raise TypeError(f"title_sep must be a string, got {type(title_sep).__name__}")
    base = Path(path)
    if not base.is_dir():
        raise FileNotFoundError(f"BEIR dataset directory {base} not found (or not a directory)")
    corpus: Dict[str, str] = {}
    corpus_path, queries_path = _find(base, "corpus.jsonl"), _find(base, "queries.jsonl")
    for where, did, rec in _records(corpus_path, "document"):
        title = _record_text(rec, "title", where, required=False).strip()
        text = _record_text(rec, "text", where, required=True)
        corpus[did] = f"{title}{title_sep}{text}" if title else text
    qrels_path = base / "qrels" / f"{split}.tsv"
    if not os.path.lexists(qrels_path):
        raise FileNotFoundError(f"{qrels_path} not found")
    qrels: Dict[str, Dict[str, int]] = {}
    for lineno, line in _iter_lines(qrels_path):
        parts = line.rstrip("\n").split("\t")
        if len(parts) < 3:
            parts = line.split()
        if not parts or not line.strip():
            continue
        if lineno == 1 and parts[0].strip().lower() in ("query-id", "query_id", "qid"):
            continue
        if len(parts) < 3:
            raise DatasetError(f"{qrels_path}:{lineno}: expected 'query-id corpus-id score'")
        qid, did, score = parts[0].strip(), parts[1].strip(), parts[2].strip()
        if not qid or not did:
            raise DatasetError(f"{qrels_path}:{lineno}: empty query-id or corpus-id")
        qrels.setdefault(qid, {})[did] = _grade(score, f"{qrels_path}:{lineno}", allow_negative=False)
    all_queries: Dict[str, str] = {}
    for where, qid, rec in _records(queries_path, "query"):
        all_queries[qid] = _record_text(rec, "text", where, required=True)
    queries = {q: t for q, t in all_queries.items() if q in qrels}
    missing = [q for q in qrels if q not in all_queries]
    if missing:
        n_judged = sum(len(qrels[q]) for q in missing)
        warnings.warn(f"{qrels_path}: {len(missing)} queries ({n_judged} judgements) have no text in "
                      f"{queries_path.name} and are dropped (e.g. {_examples(missing)})", stacklevel=2)
        for q in missing:
            del qrels[q]
    qrels = {q: qrels[q] for q in queries}
    unknown = [(q, d) for q, judged in qrels.items() for d in judged if d not in corpus]
    if unknown:
        docs = list(dict.fromkeys(d for _, d in unknown))
        n_rel = sum(1 for q, d in unknown if qrels[q][d] > 0)
        warnings.warn(f"{qrels_path}: {len(unknown)} judgements ({n_rel} relevant) of "
                      f"{len(set(q for q, _ in unknown))} queries name {len(docs)} documents not in "
                      f"{corpus_path.name} (e.g. {_examples(docs)}); they are kept, as pytrec_eval does: relevant "
                      "ones count in recall/MAP/nDCG denominators but can never be retrieved", stacklevel=2)
    return RetrievalDataset(name=f"{base.name}-{split}", corpus=corpus, queries=queries, qrels=qrels)


def load_trec_qrels(path: PathLike) -> Dict[str, Dict[str, int]]:
    """Read a TREC qrels file (``qid iter docid grade`` per line, whitespace separated).

    Parameters
    ----------
    path : path-like

    Returns
    -------
    dict[str, dict[str, int]]
        Graded judgements as given, including 0 (judged non-relevant) and negative grades (trec_eval reads
        them as non-relevant); blank lines and lines starting with ``#`` are skipped; a repeated (qid, docid)
        keeps the last grade. A malformed line, or a grade that is not a finite 32-bit integer, is a
        :class:`DatasetError` naming the file and line.
    """
    qrels: Dict[str, Dict[str, int]] = {}
    p = Path(path)
    for lineno, line in _iter_lines(p):
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        parts = s.split()
        if len(parts) != 4:
            raise DatasetError(f"{p}:{lineno}: expected 4 fields 'qid iter docid grade', got {len(parts)}")
        qrels.setdefault(parts[0], {})[parts[2]] = _grade(parts[3], f"{p}:{lineno}")
    return qrels


# ---------------------------------------------------------------------------------------------------- passages
def check_passage_window(max_words: int, stride: int) -> None:
    """A passage window: ``max_words > 0`` and ``0 < stride <= max_words`` (ValueError otherwise)."""
    if max_words <= 0:
        raise ValueError("max_words must be > 0")
    if not 0 < stride <= max_words:
        raise ValueError("stride must satisfy 0 < stride <= max_words")


def split_passages(text: str, max_words: int = 160, stride: int = 120) -> List[str]:
    """Split a text into overlapping windows of whitespace-separated words.

    Windows start every ``stride`` words and hold ``max_words`` words (overlap ``max_words - stride``); when
    the regular windows would not reach the end, one last full-size window ending at the last word is
    added. A text of at most ``max_words`` words is one passage; an empty text gives ``[""]`` so that every
    document has at least one passage.

    Parameters
    ----------
    text : str
    max_words : int
        Window length in words (> 0).
    stride : int
        Step between window starts, ``0 < stride <= max_words``.

    Returns
    -------
    list[str]
        Passages, words joined by single spaces.
    """
    check_passage_window(max_words, stride)
    words = text.split()
    n = len(words)
    if n <= max_words:
        return [" ".join(words)]
    starts = list(range(0, n - max_words + 1, stride))
    if starts[-1] + max_words < n:
        starts.append(n - max_words)
    return [" ".join(words[s:s + max_words]) for s in starts]


def split_corpus(corpus: Mapping[str, str], max_words: int = 160, stride: int = 120
                 ) -> Tuple[List[str], np.ndarray]:
    """Split every document of a corpus with :func:`split_passages`.

    Parameters
    ----------
    corpus : mapping of str to str
        Document id -> text (iteration order defines document indices).
    max_words, stride : int
        See :func:`split_passages`.

    Returns
    -------
    passages : list[str]
        All passages, document by document.
    doc_index : numpy.ndarray
        int64 ``[len(passages)]``: index (in corpus order) of each passage's document; input to
        :func:`medquant.eval.retrieval.search_passages`.
    """
    passages: List[str] = []
    index: List[int] = []
    for i, text in enumerate(corpus.values()):
        parts = split_passages(text, max_words=max_words, stride=stride)
        passages.extend(parts)
        index.extend([i] * len(parts))
    return passages, np.asarray(index, dtype=np.int64)


__all__ = [
    "DatasetError", "check_passage_window",
    "MEDQUAD_ANSWERED_COUNTS", "MEDQUAD_SUBSETS", "RetrievalDataset", "data_root", "load_beir", "load_medquad",
    "load_trec_qrels", "medquad_retrieval", "medquad_split_documents", "normalize_text", "split_corpus",
    "split_passages",
]
