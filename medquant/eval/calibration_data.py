"""Where the calibration texts of static schemes come from: a held-out source, never the texts being evaluated.

Rules (used by :func:`medquant.evaluate` and by ``medquant compare`` / ``medquant quantize``):

* A *source* is a :class:`RetrievalDataset` (its queries and corpus texts), a dataset name (``"medquad-dev"``,
  ``"medquad-test"``, ``"medquad-all"`` or a BEIR directory) or a text file (:func:`read_text_file`).
* From a source, every text that is also evaluated is removed: a text counts as evaluated when, after whitespace
  normalisation and case folding, it equals an evaluated query, corpus text or (passage mode) passage. Repeated
  texts are kept once. Then ``calibration_size`` texts are drawn with ``seed``: half queries, half corpus texts
  (:func:`medquant.quant.calibration.sample_calibration_texts`); in passage mode a dataset's documents are split
  into passages like the evaluated corpus (lines of a file are used as they are).
* Default (no source given): MedQuAD dev is calibrated on the MedQuAD test split and test on dev (the splits are
  document-disjoint, and the filter above removes the few texts, such as boilerplate answers, that occur in both);
  ``medquad-all`` on the texts of the whole collection outside the evaluated sample. Any other collection has no
  held-out text medquant knows of: a scheme that needs calibration then raises :class:`CalibrationSourceError`.
  (``medquant compare`` also uses, for BEIR collections, the loaded split's texts outside the ``--limit`` sample.)
* Texts given directly (``evaluate(calibration_texts=...)``) are used as given; how many of them are evaluated
  texts is counted (``n_overlap_evaluated``) and warned about.
"""
from __future__ import annotations

import hashlib
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

from ..quant.calibration import sample_calibration_texts
from .datasets import (
    DatasetError, RetrievalDataset, _iter_jsonl, _iter_lines, _record_text, load_beir, medquad_retrieval,
    normalize_text, split_corpus,
)

_MEDQUAD_NAME = re.compile(r"medquad-(dev|test|all)(-limit\d+)?")
_OTHER_SPLIT = {"dev": "test", "test": "dev", "all": "all"}


class CalibrationSourceError(ValueError):
    """No calibration texts can be chosen: no held-out source is known, or the source holds only evaluated texts."""


@dataclass
class CalibrationSource:
    """A pool of candidate calibration texts.

    ``kind``: ``"split"`` (another split of the evaluated collection), ``"held-out"`` (the evaluated collection's
    texts outside the evaluated sample), ``"dataset"`` (a dataset given by the caller) or ``"file"``.
    ``split_documents``: in passage mode, documents are split into passages (False for the lines of a file).
    """

    name: str
    kind: str
    queries: List[str]
    documents: List[str]
    split_documents: bool = True

    @classmethod
    def from_dataset(cls, ds: RetrievalDataset, kind: str = "dataset") -> "CalibrationSource":
        return cls(name=ds.name, kind=kind, queries=list(ds.queries.values()), documents=list(ds.corpus.values()))

    @classmethod
    def from_file(cls, path: Union[str, os.PathLike]) -> "CalibrationSource":
        return cls(name=str(path), kind="file", queries=[], documents=read_text_file(path), split_documents=False)


def read_text_file(path: Union[str, os.PathLike]) -> List[str]:
    """Calibration texts from a file (UTF-8; ``.gz`` is decompressed).

    ``*.jsonl`` / ``*.jsonl.gz``: one JSON object per line with a string ``text`` field (a ``title``, if present,
    is prepended with a space, as :func:`load_beir` does). Any other file: one text per line. Blank lines and
    blank texts are skipped; surrounding whitespace is stripped. Malformed lines raise :class:`DatasetError`
    naming the file and line; a file without any text raises ValueError.
    """
    path = Path(path)
    texts: List[str] = []
    if path.name.endswith((".jsonl", ".jsonl.gz")):
        for lineno, rec in _iter_jsonl(path):
            where = f"{path}:{lineno}"
            title = _record_text(rec, "title", where, required=False).strip()
            text = _record_text(rec, "text", where, required=True).strip()
            texts.append(f"{title} {text}".strip() if title else text)
    else:
        texts = [line.strip() for _, line in _iter_lines(path)]
    texts = [t for t in texts if t]
    if not texts:
        raise ValueError(f"calibration file {path} holds no text")
    return texts


def resolve_source(source) -> CalibrationSource:
    """A :class:`CalibrationSource` from a source, a RetrievalDataset, a dataset name or a text file path."""
    if isinstance(source, CalibrationSource):
        return source
    if isinstance(source, RetrievalDataset):
        return CalibrationSource.from_dataset(source)
    if isinstance(source, (str, os.PathLike)):
        s = str(source)
        m = _MEDQUAD_NAME.fullmatch(s)
        if m and not m.group(2):
            return CalibrationSource.from_dataset(medquad_retrieval(m.group(1)))
        if s == "medquad":
            return CalibrationSource.from_dataset(medquad_retrieval("dev"))
        if Path(s).is_dir():
            return CalibrationSource.from_dataset(load_beir(s))
        if Path(s).exists():
            return CalibrationSource.from_file(s)
        raise CalibrationSourceError(f"unknown calibration source {s!r}: pass a RetrievalDataset, 'medquad-dev', "
                                     "'medquad-test', a BEIR directory or a text file")
    raise TypeError(f"calibration_source must be a RetrievalDataset, a dataset name or a file path, got "
                    f"{type(source).__name__}")


def default_source(ds: RetrievalDataset) -> Optional[CalibrationSource]:
    """The held-out source of a MedQuAD dataset (by its name, e.g. ``medquad-dev-limit150``), else None."""
    m = _MEDQUAD_NAME.fullmatch(str(ds.name))
    if m is None:
        return None
    split = m.group(1)
    other = medquad_retrieval(_OTHER_SPLIT[split])
    return CalibrationSource.from_dataset(other, kind="split" if split != "all" else "held-out")


def text_key(text: str) -> str:
    """What makes two texts 'the same text' here: whitespace-normalised, case-folded."""
    return normalize_text(text, lower=True)


def fingerprint(texts: Sequence[str]) -> str:
    """sha256 of the texts in order (one per line), to recognise the same calibration set across runs."""
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8") + b"\n")
    return h.hexdigest()


def _keep(texts: Iterable[str], exclude: set, seen: set) -> Tuple[List[str], int]:
    """Texts not in ``exclude`` and not yet ``seen`` (updated), and how many were excluded as evaluated."""
    out, n_excluded = [], 0
    for t in texts:
        key = text_key(t)
        if key in exclude:
            n_excluded += 1
        elif key and key not in seen:
            seen.add(key)
            out.append(t)
    return out, n_excluded


def held_out_texts(source: CalibrationSource, evaluated: Iterable[str], size: int, seed: int,
                   passage_window: Optional[Tuple[int, int]] = None) -> Tuple[List[str], Dict[str, Any]]:
    """A seeded sample of ``size`` texts of ``source`` that are none of the ``evaluated`` texts, and a record of
    where they came from. ``passage_window``: (max_words, stride) to split the source's documents into passages."""
    exclude = {text_key(t) for t in evaluated}
    docs = source.documents
    if passage_window is not None and source.split_documents and docs:
        docs, _ = split_corpus({str(i): d for i, d in enumerate(docs)}, *passage_window)
    seen: set = set()
    queries, q_excluded = _keep(source.queries, exclude, seen)
    docs, d_excluded = _keep(docs, exclude, seen)
    texts = sample_calibration_texts(queries, docs, size, seed)
    if not texts:
        raise CalibrationSourceError(
            f"calibration source {source.name} ({source.kind}) holds no text outside the evaluated texts; give "
            "another source (another split, a file of texts) or calibration texts")
    n_q = len(set(texts) & set(queries))
    info = {"source": source.name, "kind": source.kind, "seed": int(seed), "n_requested": int(size),
            "n_texts": len(texts), "n_from_queries": n_q, "n_from_documents": len(texts) - n_q,
            "pool_size": len(queries) + len(docs), "n_excluded_evaluated": q_excluded + d_excluded,
            "n_overlap_evaluated": 0, "sha256": fingerprint(texts)}
    return texts, info


def given_texts_info(texts: Sequence[str], evaluated: Iterable[str]) -> Dict[str, Any]:
    """The record of texts given directly: how many, and how many of them are evaluated texts (with a warning)."""
    exclude = {text_key(t) for t in evaluated}
    overlap = sum(1 for t in texts if text_key(t) in exclude)
    if overlap:
        warnings.warn(f"{overlap} of the {len(texts)} calibration texts given are also evaluated texts: the static "
                      "schemes are calibrated on the data they are scored on", UserWarning, stacklevel=3)
    return {"source": "given", "kind": "given", "n_texts": len(texts), "n_overlap_evaluated": overlap,
            "sha256": fingerprint(texts)}


__all__ = ["CalibrationSource", "CalibrationSourceError", "default_source", "given_texts_info", "held_out_texts",
           "read_text_file", "resolve_source", "text_key"]
