"""Exact dense retrieval (blocked top-k), passage max-pooling, and quantized (int8 / binary) embedding indexes.

Ranking convention everywhere: higher score first, ties broken by the lower corpus index. (Evaluation with
:mod:`medquant.eval.metrics` re-sorts each query's run the way trec_eval does - score descending, then document id
descending - unless the run is built with ``run_from_search(..., preserve_order=True)``.)
"""
from __future__ import annotations

import dataclasses
import os
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..model.limits import positive_int, positive_int_or_none, regular_file

PathLike = Union[str, "os.PathLike[str]"]

_HAS_BITWISE_COUNT = hasattr(np, "bitwise_count")
_POPCOUNT8 = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


# ---------------------------------------------------------------------------------------------------- helpers
#: Kinds of quantized index and how queries are scored against one (see :func:`quantize_index`).
INDEX_KINDS = ("int8", "binary")
INDEX_SCORINGS = ("codes", "asymmetric")


def check_index_kind(kind: str) -> None:
    if kind not in INDEX_KINDS:
        raise ValueError(f"index kind must be one of {', '.join(INDEX_KINDS)}, got {kind!r}")


def check_index_scoring(scoring: str) -> None:
    if scoring not in INDEX_SCORINGS:
        raise ValueError(f"index scoring must be one of {', '.join(INDEX_SCORINGS)}, got {scoring!r}")


def _float_matrix(x, name: str) -> np.ndarray:
    """``x`` as a 2-D float32 array (a converted copy where needed: any byte order, alignment or strides); real
    numbers only, and every value finite (a NaN or infinite embedding would make every score it touches
    meaningless and the ranking arbitrary)."""
    try:
        a = np.asarray(x)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{name} must be a 2-D array of floats, got {type(x).__name__} numpy cannot convert: {e}") from None
    if a.dtype.kind not in "fiub":
        raise TypeError(f"{name} must hold real numbers, got dtype {a.dtype}")
    if a.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D embedding matrix, got shape {a.shape}")
    a = np.asarray(a, dtype=np.float32)
    if a.size and not np.isfinite(a).all():
        bad = np.unique(np.nonzero(~np.isfinite(a))[0])
        raise ValueError(f"{name} has NaN or infinite values in {bad.size} rows (e.g. row {int(bad[0])}); "
                         "embeddings must be finite")
    return a


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows scaled to unit L2 norm, as C-contiguous float32 (zero rows stay zero).

    Parameters
    ----------
    x : array-like, shape (n, d)
    eps : float
        Norms below ``eps`` are treated as 1.

    Returns
    -------
    numpy.ndarray
        float32, shape (n, d).
    """
    a = _float_matrix(x, "embeddings")
    norms = np.linalg.norm(a, axis=1, keepdims=True)
    norms[norms < eps] = 1.0
    return np.ascontiguousarray(a / norms, dtype=np.float32)


def as_matrix(x: np.ndarray, normalize: bool, name: str = "embeddings") -> np.ndarray:
    a = _float_matrix(x, name)
    if normalize:
        return l2_normalize(a)
    return np.ascontiguousarray(a, dtype=np.float32)


def _select_topk(scores: np.ndarray, index: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
    """Keep the ``k`` best of each row; ties at the cut go to the earliest column.

    ``index`` must increase along each row (column order == corpus index order), so "earliest column" means
    "lowest corpus index". The kept entries are returned in their original column order (unsorted by score),
    which keeps that invariant for the next merge.
    """
    nq, width = scores.shape
    if width <= k:
        return scores, index
    part = np.argpartition(scores, width - k, axis=1)[:, width - k:]
    thresh = np.take_along_axis(scores, part, axis=1).min(axis=1)
    n_ge = (scores >= thresh[:, None]).sum(axis=1)
    tied = np.nonzero(n_ge > k)[0]
    if tied.size:
        # Rows where the k-th best value is shared beyond the cut: argpartition's pick among equal values is
        # arbitrary, so rebuild those rows deterministically (all values above the threshold, then the first
        # equal ones in column order).
        s = scores[tied]
        t = thresh[tied][:, None]
        gt = s > t
        eq = s == t
        need = k - gt.sum(axis=1)
        keep = gt | (eq & (np.cumsum(eq, axis=1) <= need[:, None]))
        rows_pos = np.nonzero(keep)[1].reshape(tied.size, k)
        part[tied] = rows_pos
    part.sort(axis=1)
    return np.take_along_axis(scores, part, axis=1), np.take_along_axis(index, part, axis=1)


def sort_topk(scores: np.ndarray, index: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Sort rows by score descending; ties by lower index (rows must be in increasing index order)."""
    order = np.argsort(-scores, axis=1, kind="stable")
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(index, order, axis=1)


def _blocked_topk(n_queries: int, n_corpus: int, k: int, score_block: Callable[[slice, slice], np.ndarray],
                  block_size: int, query_block_size: Optional[int]) -> Tuple[np.ndarray, np.ndarray]:
    """Generic exact top-k over corpus blocks; ``score_block(q_slice, c_slice)`` returns a score matrix."""
    block_size = positive_int(block_size, "block_size")
    k = min(positive_int(k, "k"), n_corpus)
    if k <= 0 or n_queries == 0:
        return np.zeros((n_queries, max(k, 0)), dtype=np.float32), np.zeros((n_queries, max(k, 0)), dtype=np.int64)
    qb = n_queries if query_block_size is None else positive_int(query_block_size, "query_block_size")
    out_s: List[np.ndarray] = []
    out_i: List[np.ndarray] = []
    for q0 in range(0, n_queries, qb):
        qs = slice(q0, min(n_queries, q0 + qb))
        run_s: Optional[np.ndarray] = None
        run_i: Optional[np.ndarray] = None
        for c0 in range(0, n_corpus, block_size):
            c1 = min(n_corpus, c0 + block_size)
            s = score_block(qs, slice(c0, c1))
            idx = np.broadcast_to(np.arange(c0, c1, dtype=np.int64), s.shape)
            if run_s is not None:
                s = np.concatenate([run_s, s], axis=1)
                idx = np.concatenate([run_i, idx], axis=1)
            run_s, run_i = _select_topk(s, idx, k)
        assert run_s is not None and run_i is not None
        s_sorted, i_sorted = sort_topk(run_s, np.ascontiguousarray(run_i))
        out_s.append(s_sorted)
        out_i.append(i_sorted)
    return np.concatenate(out_s, axis=0), np.concatenate(out_i, axis=0)


def _ids(indices: np.ndarray, corpus_ids: Sequence[str]) -> np.ndarray:
    ids = np.asarray(list(corpus_ids), dtype=object)
    return ids[indices]


# ---------------------------------------------------------------------------------------------------- float search
def search(query_emb: np.ndarray, corpus_emb: np.ndarray, k: int = 100, block_size: int = 4096,
           corpus_ids: Optional[Sequence[str]] = None, *, normalize: bool = True,
           query_block_size: Optional[int] = 1024) -> Tuple[np.ndarray, np.ndarray]:
    """Exact top-k inner-product search, computed block by block over the corpus.

    Each corpus block is scored with one float32 matrix product and merged into a running top-k with
    :func:`numpy.argpartition`, so peak memory is about ``query_block_size * (block_size + k)`` scores.

    Parameters
    ----------
    query_emb : array-like, shape (nq, d)
    corpus_emb : array-like, shape (n, d)
    k : int
        Results per query (clipped to ``n``).
    block_size : int
        Corpus rows per block.
    corpus_ids : sequence of str, optional
        If given (length ``n``), the second output holds these ids instead of row indices.
    normalize : bool
        L2-normalise both sides first (cosine similarity). With ``False`` the raw inner product is used.
    query_block_size : int, optional
        Queries processed together (``None``: all at once).

    Returns
    -------
    scores : numpy.ndarray
        float32 ``[nq, k]``, descending per row.
    indices : numpy.ndarray
        int64 corpus row indices ``[nq, k]`` (object array of ids if ``corpus_ids`` is given); equal scores
        are ordered by lower row index.
    """
    k = positive_int(k, "k")
    block_size = positive_int(block_size, "block_size")
    query_block_size = positive_int_or_none(query_block_size, "query_block_size")
    q = as_matrix(query_emb, normalize, "query_emb")
    c = as_matrix(corpus_emb, normalize, "corpus_emb")
    if q.shape[1] != c.shape[1]:
        raise ValueError(f"dimension mismatch: queries {q.shape[1]}, corpus {c.shape[1]}")
    if corpus_ids is not None and len(corpus_ids) != c.shape[0]:
        raise ValueError("corpus_ids must have one id per corpus row")
    scores, idx = _blocked_topk(q.shape[0], c.shape[0], k, lambda qs, cs: q[qs] @ c[cs].T, block_size,
                                query_block_size)
    scores = scores.astype(np.float32, copy=False)
    return (scores, _ids(idx, corpus_ids)) if corpus_ids is not None else (scores, idx)


def run_from_search(scores: np.ndarray, indices: np.ndarray, query_ids: Sequence[str],
                    corpus_ids: Optional[Sequence[str]] = None, *, preserve_order: bool = False
                    ) -> Dict[str, Dict[str, float]]:
    """Turn search output into a TREC-style run ``{query id: {doc id: score}}``.

    Parameters
    ----------
    scores : array-like, shape (nq, k)
    indices : array-like, shape (nq, k)
        Corpus row indices (then ``corpus_ids`` maps them to ids) or ids already.
    query_ids : sequence of str
        One per row.
    corpus_ids : sequence of str, optional
        Needed when ``indices`` are row indices.
    preserve_order : bool
        Replace the scores by ``k - rank`` so that any consumer (trec_eval breaks score ties by document id)
        sees exactly the search order, including its lower-index tie-breaking.

    Returns
    -------
    dict[str, dict[str, float]]
        Entries with a non-finite score (e.g. padding) are dropped.
    """
    scores = np.asarray(scores)
    indices = np.asarray(indices)
    if scores.shape != indices.shape or scores.ndim != 2:
        raise ValueError("scores and indices must be 2-D arrays of the same shape")
    if len(query_ids) != scores.shape[0]:
        raise ValueError("query_ids must have one id per row")
    ids = np.asarray(list(corpus_ids), dtype=object) if corpus_ids is not None else None
    if ids is not None and indices.size:
        if indices.dtype.kind not in "iu":
            raise TypeError(f"indices must be integer row indices when corpus_ids is given, got dtype {indices.dtype}")
        if indices.min() < 0 or indices.max() >= len(ids):
            raise ValueError(f"indices must be in [0, {len(ids)}) (rows of corpus_ids), got values in "
                             f"[{indices.min()}, {indices.max()}]")
    run: Dict[str, Dict[str, float]] = {}
    k = scores.shape[1]
    for r, qid in enumerate(query_ids):
        row: Dict[str, float] = {}
        for j in range(k):
            s = float(scores[r, j])
            if not np.isfinite(s):
                continue
            doc = str(ids[int(indices[r, j])]) if ids is not None else str(indices[r, j])
            if doc in row:
                continue
            row[doc] = float(k - j) if preserve_order else s
        run[str(qid)] = row
    return run


def search_passages(query_emb: np.ndarray, passage_emb: np.ndarray, passage_doc_index: np.ndarray, k: int = 100,
                    *, n_docs: Optional[int] = None, normalize: bool = True, block_size: int = 4096,
                    query_block_size: int = 256) -> Tuple[np.ndarray, np.ndarray]:
    """Document retrieval with max-pooled passage scores: a document scores as its best passage.

    Exact: every passage is scored. Memory is about ``query_block_size * (n_docs + block_size)`` scores.

    Parameters
    ----------
    query_emb : array-like, shape (nq, d)
    passage_emb : array-like, shape (npass, d)
    passage_doc_index : array-like of int, shape (npass,)
        Document index of each passage (e.g. from :func:`medquant.eval.datasets.split_corpus`); any order.
    k : int
        Documents per query (clipped to the number of documents that have a passage).
    n_docs : int, optional
        Number of documents (default ``max(passage_doc_index) + 1``).
    normalize : bool
        L2-normalise queries and passages.
    block_size, query_block_size : int
        Passages / queries per block.

    Returns
    -------
    scores : numpy.ndarray
        float32 ``[nq, k]`` best-passage scores, descending.
    doc_indices : numpy.ndarray
        int64 ``[nq, k]``; ties broken by lower document index.
    """
    k = positive_int(k, "k")
    block_size = positive_int(block_size, "block_size")
    query_block_size = positive_int(query_block_size, "query_block_size")
    if n_docs is not None and (isinstance(n_docs, bool) or not isinstance(n_docs, (int, np.integer)) or n_docs < 0):
        raise ValueError(f"n_docs must be a non-negative int, got {n_docs!r}")
    q = as_matrix(query_emb, normalize, "query_emb")
    p = as_matrix(passage_emb, normalize, "passage_emb")
    doc = np.asarray(passage_doc_index)
    if doc.size and doc.dtype.kind not in "iu":
        raise TypeError(f"passage_doc_index must hold integer document indices, got dtype {doc.dtype}")
    doc = doc.astype(np.int64)
    if doc.shape != (p.shape[0],):
        raise ValueError("passage_doc_index must have one entry per passage")
    if q.shape[1] != p.shape[1]:
        raise ValueError(f"dimension mismatch: queries {q.shape[1]}, passages {p.shape[1]}")
    if doc.size and doc.min() < 0:
        raise ValueError("passage_doc_index must be >= 0")
    nd = int(n_docs) if n_docs is not None else (int(doc.max()) + 1 if doc.size else 0)
    if doc.size and doc.max() >= nd:
        raise ValueError("passage_doc_index out of range for n_docs")
    order = np.argsort(doc, kind="stable")
    p, doc = p[order], doc[order]
    has_passage = np.zeros(nd, dtype=bool)
    has_passage[doc] = True
    k = min(int(k), int(has_passage.sum()))
    nq = q.shape[0]
    if k <= 0 or nq == 0:
        return np.zeros((nq, max(k, 0)), dtype=np.float32), np.zeros((nq, max(k, 0)), dtype=np.int64)
    out_s, out_i = [], []
    for q0 in range(0, nq, query_block_size):
        qq = q[q0:q0 + query_block_size]
        doc_scores = np.full((qq.shape[0], nd), -np.inf, dtype=np.float32)
        for p0 in range(0, p.shape[0], block_size):
            pd_ = doc[p0:p0 + block_size]
            s = qq @ p[p0:p0 + block_size].T
            starts = np.flatnonzero(np.r_[True, pd_[1:] != pd_[:-1]])
            pooled = np.maximum.reduceat(s, starts, axis=1)
            cols = pd_[starts]
            doc_scores[:, cols] = np.maximum(doc_scores[:, cols], pooled)
        idx = np.broadcast_to(np.arange(nd, dtype=np.int64), doc_scores.shape)
        s_k, i_k = _select_topk(doc_scores, idx, k)
        s_k, i_k = sort_topk(s_k, np.ascontiguousarray(i_k))
        out_s.append(s_k)
        out_i.append(i_k)
    return np.concatenate(out_s), np.concatenate(out_i)


# ---------------------------------------------------------------------------------------------------- quantized index
def _popcount(x: np.ndarray) -> np.ndarray:
    if _HAS_BITWISE_COUNT:
        return np.bitwise_count(x)
    return _POPCOUNT8[x.view(np.uint8)].reshape(*x.shape, x.itemsize).sum(axis=-1, dtype=np.int64)


@dataclasses.dataclass
class QuantizedIndex:
    """A corpus embedding matrix stored as int8 codes or packed sign bits.

    Attributes
    ----------
    kind : {"int8", "binary"}
    codes : numpy.ndarray
        int8 ``[n, d]`` or uint8 ``[n, ceil(d / 8)]`` (``numpy.packbits`` of ``x > 0``, big-endian bit order).
    dim : int
        Embedding dimension ``d``.
    lower : numpy.ndarray, optional
        int8 only: float32 ``[d]`` calibration minimum per dimension.
    step : numpy.ndarray, optional
        int8 only: float32 ``[d]`` quantization step per dimension (``(max - min) / 255``).
    normalize : bool
        Whether embeddings (corpus and queries) are L2-normalised before quantization.
    scoring : {"codes", "asymmetric"}
        Default scoring of :meth:`search`. ``"codes"``: the query is quantized like the corpus and scored in the
        quantized domain (int8: int32 dot product of the codes, as sentence-transformers does; binary:
        ``d - 2 * Hamming``). ``"asymmetric"``: the float query is scored against the dequantized corpus
        (int8: ``q . (lower + (code + 128) * step)``; binary: ``q . (2 * bit - 1)``) - the corpus stays
        quantized, only the query keeps full precision.
    """

    kind: str
    codes: np.ndarray
    dim: int
    lower: Optional[np.ndarray] = None
    step: Optional[np.ndarray] = None
    normalize: bool = True
    scoring: str = "codes"

    def __len__(self) -> int:
        return int(self.codes.shape[0])

    @property
    def nbytes(self) -> int:
        """Bytes of the index: the codes plus (int8) the two float32 calibration vectors."""
        extra = 0
        if self.lower is not None:
            extra += int(self.lower.nbytes)
        if self.step is not None:
            extra += int(self.step.nbytes)
        return int(self.codes.nbytes) + extra

    @property
    def compression_ratio(self) -> float:
        """float32 matrix bytes divided by :attr:`nbytes`."""
        return (len(self) * self.dim * 4) / max(self.nbytes, 1)

    def quantize_queries(self, query_emb: np.ndarray) -> np.ndarray:
        """Quantize query embeddings with this index's calibration.

        Parameters
        ----------
        query_emb : array-like, shape (nq, d)

        Returns
        -------
        numpy.ndarray
            int8 ``[nq, d]`` (values outside the calibration range are clipped) or packed uint8 bits.
        """
        x = as_matrix(query_emb, self.normalize, "query_emb")
        if x.shape[1] != self.dim:
            raise ValueError(f"dimension mismatch: queries {x.shape[1]}, index {self.dim}")
        if self.kind == "int8":
            assert self.lower is not None and self.step is not None
            return _int8_codes(x, self.lower, self.step)
        return np.packbits(x > 0, axis=1)

    def dequantize(self, rows: slice = slice(None)) -> np.ndarray:
        """Float32 reconstruction of (a slice of) the corpus embeddings.

        Parameters
        ----------
        rows : slice

        Returns
        -------
        numpy.ndarray
            int8: ``lower + (code + 128) * step``; binary: ``2 * bit - 1`` (+-1 per dimension).
        """
        if self.kind == "int8":
            assert self.lower is not None and self.step is not None
            return (self.codes[rows].astype(np.float32) + 128.0) * self.step + self.lower
        bits = np.unpackbits(self.codes[rows], axis=1, count=self.dim)
        return bits.astype(np.float32) * 2.0 - 1.0

    def _asymmetric_score_fn(self, qf: np.ndarray) -> Callable[[slice, slice], np.ndarray]:
        if self.kind == "int8":
            assert self.lower is not None and self.step is not None
            q_scaled = np.ascontiguousarray(qf * self.step, dtype=np.float32)
            bias = (qf @ (self.lower + 128.0 * self.step)).astype(np.float32)

            def score(qs: slice, cs: slice) -> np.ndarray:
                return q_scaled[qs] @ self.codes[cs].astype(np.float32).T + bias[qs, None]

            return score

        def score_bin(qs: slice, cs: slice) -> np.ndarray:
            return qf[qs] @ self.dequantize(cs).T

        return score_bin

    def _score_fn(self, qcodes: np.ndarray) -> Callable[[slice, slice], np.ndarray]:
        if self.kind == "int8":
            # Exact integer dot products. float32 GEMM is exact while every partial sum stays below 2**24
            # (|code| <= 128, so d * 128 * 128 <= 2**24, i.e. d <= 1024); beyond that float64 (exact to 2**53).
            ftype = np.float32 if self.dim * 128 * 128 <= 2 ** 24 else np.float64
            qf = qcodes.astype(ftype)

            def score(qs: slice, cs: slice) -> np.ndarray:
                return np.rint(qf[qs] @ self.codes[cs].astype(ftype).T).astype(np.int32)

            return score
        nb = self.codes.shape[1]
        pad = (-nb) % 8
        cw = np.ascontiguousarray(np.pad(self.codes, ((0, 0), (0, pad)))).view(np.uint64)
        qw = np.ascontiguousarray(np.pad(qcodes, ((0, 0), (0, pad)))).view(np.uint64)
        dim = self.dim

        def score(qs: slice, cs: slice) -> np.ndarray:
            x = np.bitwise_xor(qw[qs][:, None, :], cw[cs][None, :, :])
            ham = _popcount(x).sum(axis=2, dtype=np.int32)
            return (dim - 2 * ham).astype(np.int32)  # = dot product of the +-1 sign vectors

        return score

    def search(self, query_emb: np.ndarray, k: int = 100, rescore_multiplier: Optional[int] = None,
               float_corpus: Optional[np.ndarray] = None, *, scoring: Optional[str] = None, block_size: int = 4096,
               query_block_size: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
        """Top-k search against the quantized corpus, optionally rescored with float embeddings.

        ``scoring="codes"`` - int8: score = int32 dot product of the query's and documents' int8 codes (exact
        integer arithmetic); binary: score = ``d - 2 * hamming(query bits, doc bits)`` (the dot product of the
        sign vectors), Hamming distances from popcounts of XORed packed bits. ``scoring="asymmetric"``: float
        query against the dequantized corpus (see :class:`QuantizedIndex`). With ``rescore_multiplier=m`` the
        top ``k * m`` candidates are re-ranked by float32 ``normalised query . normalised float_corpus`` and the
        best ``k`` returned.

        Parameters
        ----------
        query_emb : array-like, shape (nq, d)
            Float query embeddings (quantized here).
        k : int
        rescore_multiplier : int, optional
        float_corpus : array-like, shape (n, d), optional
            The float corpus embeddings; required for rescoring.
        scoring : {"codes", "asymmetric"}, optional
            Overrides :attr:`scoring`.
        block_size : int
            Corpus rows per block.
        query_block_size : int, optional
            Queries per block (default 1024 for int8, 64 for binary, whose XOR tensor is
            ``queries x block x d/8`` bytes).

        Returns
        -------
        scores : numpy.ndarray
            ``[nq, k]`` descending: int32 for ``"codes"``, float32 for ``"asymmetric"`` and after rescoring.
        indices : numpy.ndarray
            int64 ``[nq, k]``; ties broken by lower index.
        """
        mode = scoring or self.scoring
        check_index_scoring(mode)
        k = positive_int(k, "k")
        block_size = positive_int(block_size, "block_size")
        query_block_size = positive_int_or_none(query_block_size, "query_block_size")
        rescore_multiplier = positive_int_or_none(rescore_multiplier, "rescore_multiplier")
        if mode == "codes":
            qcodes = self.quantize_queries(query_emb)
            score_fn = self._score_fn(qcodes)
            hamming = self.kind == "binary"
        else:  # asymmetric
            qf0 = as_matrix(query_emb, self.normalize, "query_emb")
            if qf0.shape[1] != self.dim:
                raise ValueError(f"dimension mismatch: queries {qf0.shape[1]}, index {self.dim}")
            score_fn = self._asymmetric_score_fn(qf0)
            hamming = False
        nq, n = _as_len(query_emb), len(self)
        qbs = query_block_size or (64 if hamming else 1024)
        bs = min(block_size, 1024) if hamming else block_size
        if rescore_multiplier is None:
            return _blocked_topk(nq, n, k, score_fn, bs, qbs)
        if float_corpus is None:
            raise ValueError("rescoring needs float_corpus (the float32 corpus embeddings)")
        if int(rescore_multiplier) < 1:
            raise ValueError("rescore_multiplier must be >= 1")
        fc = as_matrix(float_corpus, self.normalize, "float_corpus")
        if fc.shape != (n, self.dim):
            raise ValueError(f"float_corpus must have shape {(n, self.dim)}, got {fc.shape}")
        kk = min(int(k), n)
        _, cand = _blocked_topk(nq, n, kk * int(rescore_multiplier), score_fn, bs, qbs)
        return rescore(as_matrix(query_emb, self.normalize), cand, fc, kk)


def rescore(qf: np.ndarray, cand: np.ndarray, vectors: np.ndarray, k: int,
            positions: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Re-rank each query's candidates by float32 ``qf . vectors[positions]`` (``positions`` default ``cand``) and
    keep the best ``k``: (scores, candidate indices), ties by lower candidate index."""
    order = np.argsort(cand, axis=1, kind="stable")  # increasing index: the stable sort below breaks ties by it
    cand = np.take_along_axis(cand, order, axis=1)
    pos = cand if positions is None else np.take_along_axis(positions, order, axis=1)
    nq = qf.shape[0]
    out_s = np.empty((nq, k), dtype=np.float32)
    out_i = np.empty((nq, k), dtype=np.int64)
    step = max(1, (1 << 24) // max(1, cand.shape[1] * vectors.shape[1]))
    for q0 in range(0, nq, step):
        s = np.einsum("qd,qcd->qc", qf[q0:q0 + step], vectors[pos[q0:q0 + step]], optimize=False).astype(np.float32)
        s_sorted, i_sorted = sort_topk(s, cand[q0:q0 + step])
        out_s[q0:q0 + step] = s_sorted[:, :k]
        out_i[q0:q0 + step] = i_sorted[:, :k]
    return out_s, out_i


def _as_len(x: np.ndarray) -> int:
    return int(np.shape(x)[0])


def _int8_codes(x: np.ndarray, lower: np.ndarray, step: np.ndarray) -> np.ndarray:
    q = np.rint((x - lower) / step) - 128.0
    return np.clip(q, -128, 127).astype(np.int8)


def quantize_index(emb: np.ndarray, kind: str = "int8", *, ranges: Optional[np.ndarray] = None,
                   normalize: bool = True, scoring: str = "codes") -> QuantizedIndex:
    """Quantize corpus embeddings into an int8 or binary index.

    int8 (scalar quantization calibrated on ranges): per dimension ``lower = min``, ``step = (max - min) / 255``
    over the corpus embeddings (or the given ``ranges``), ``code = clip(round((x - lower) / step) - 128,
    -128, 127)``; queries are quantized with the same calibration. binary: one sign bit per dimension
    (``x > 0``) packed 8 per byte with :func:`numpy.packbits`.

    Parameters
    ----------
    emb : array-like, shape (n, d)
        Float corpus embeddings.
    kind : {"int8", "binary"}
    ranges : array-like, shape (2, d), optional
        int8 only: per-dimension ``[min, max]`` to calibrate on instead of the corpus' own ranges (e.g. from a
        calibration set of normalised embeddings).
    normalize : bool
        L2-normalise embeddings (and later queries) before quantizing.
    scoring : {"codes", "asymmetric"}
        Default scoring of :meth:`QuantizedIndex.search`. On all-MiniLM-L6-v2 MedQuAD embeddings the int8
        ``"codes"`` scoring keeps about 2/3 of the float top-10 (per-dimension scales weight the dimensions
        unequally and the offsets shift the query) while ``"asymmetric"`` keeps over 99%.

    Returns
    -------
    QuantizedIndex
    """
    check_index_scoring(scoring)
    check_index_kind(kind)
    x = as_matrix(emb, normalize, "emb")
    n, d = x.shape
    if kind == "int8":
        if ranges is not None:
            r = _float_matrix(ranges, "ranges")
            if r.shape != (2, d):
                raise ValueError(f"ranges must have shape (2, {d})")
            lo, hi = r[0], r[1]
            if (lo > hi).any():
                raise ValueError(f"ranges must hold [min, max] per dimension; min > max in "
                                 f"{int((lo > hi).sum())} dimensions (e.g. dimension {int(np.argmax(lo > hi))})")
        else:
            if n == 0:
                raise ValueError("cannot calibrate int8 ranges on an empty corpus")
            lo, hi = x.min(axis=0), x.max(axis=0)
        step = ((hi - lo) / 255.0).astype(np.float32)
        step[~(step > 0)] = 1.0
        lo = lo.astype(np.float32)
        return QuantizedIndex("int8", _int8_codes(x, lo, step), d, lower=lo, step=step, normalize=normalize,
                              scoring=scoring)
    return QuantizedIndex("binary", np.packbits(x > 0, axis=1), d, normalize=normalize, scoring=scoring)


EMBEDDING_PRECISIONS = ("float32", "int8", "uint8", "binary", "ubinary")


def quantize_embeddings(emb, precision: str, *, ranges: Optional[np.ndarray] = None,
                        calibration_embeddings: Optional[np.ndarray] = None) -> np.ndarray:
    """Embeddings in sentence-transformers' quantized ``precision`` conventions (what ``encode(precision=...)``
    returns there, so vectors from either tool can share an index).

    int8 / uint8: per dimension ``lower = min`` and ``step = (max - min) / 255`` over ``ranges`` ([2, d]), else
    over ``calibration_embeddings``, else over ``emb`` itself; ``code = clip(floor((x - lower) / step), 0, 255)``,
    minus 128 for int8. binary / ubinary: the sign bits ``x > 0`` packed 8 per byte (:func:`numpy.packbits`),
    minus 128 as int8 for binary. float32: a float32 copy. (:func:`quantize_index` rounds to nearest instead and
    keeps its calibration for scoring queries.)
    """
    if precision not in EMBEDDING_PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(EMBEDDING_PRECISIONS)}, got {precision!r}")
    x = _float_matrix(emb, "embeddings")
    if precision == "float32":
        return x.copy()
    if precision.endswith("binary"):
        bits = np.packbits(x > 0, axis=-1)
        return (bits.astype(np.int16) - 128).astype(np.int8) if precision == "binary" else bits
    if ranges is None:
        calib = x if calibration_embeddings is None else _float_matrix(calibration_embeddings,
                                                                       "calibration_embeddings")
        if calib.shape[1] != x.shape[1]:
            raise ValueError(f"calibration_embeddings have {calib.shape[1]} dimensions, embeddings {x.shape[1]}")
        if len(calib) < 2:
            raise ValueError(f"{precision} ranges cannot be calibrated on {len(calib)} embedding(s): pass ranges= "
                             "or calibration_embeddings= (or encode more texts at once)")
        ranges = np.stack([calib.min(axis=0), calib.max(axis=0)])
    r = _float_matrix(ranges, "ranges")
    if r.shape != (2, x.shape[1]):
        raise ValueError(f"ranges must have shape (2, {x.shape[1]}), got {r.shape}")
    step = (r[1] - r[0]) / np.float32(255)
    step = np.where(step == 0, np.float32(1), step)
    q = np.clip(np.floor((x - r[0]) / step), 0, 255)
    return (q - 128).astype(np.int8) if precision == "int8" else q.astype(np.uint8)


# ---------------------------------------------------------------------------------------------------- run files
def write_trec_run(run: Dict[str, Dict[str, float]], path: PathLike, tag: str = "medquant") -> None:
    """Write a run in TREC format (``qid Q0 docid rank score tag``), each query sorted like trec_eval.

    Parameters
    ----------
    run : dict[str, dict[str, float]]
    path : path-like
    tag : str
        Run tag (no whitespace).
    """
    if not isinstance(tag, str) or not tag or any(c.isspace() for c in tag):
        raise ValueError(f"tag must be a non-empty string without whitespace (it is one field of the run file), "
                         f"got {tag!r}")
    for qid, docs in run.items():
        for name in (qid, *docs):
            if not str(name) or any(c.isspace() for c in str(name)):
                raise ValueError(f"query and document ids are fields of the run file and cannot be empty or hold "
                                 f"whitespace, got {str(name)!r}")
    with open(path, "w", encoding="utf-8") as fh:
        for qid, docs in run.items():
            ranked = sorted(docs.items(), key=lambda kv: (kv[1], kv[0]), reverse=True)
            for rank, (doc, score) in enumerate(ranked, 1):
                fh.write(f"{qid} Q0 {doc} {rank} {score!r} {tag}\n")


def read_trec_run(path: PathLike) -> Dict[str, Dict[str, float]]:
    """Read a TREC run file (``qid Q0 docid rank score tag``).

    Parameters
    ----------
    path : path-like

    Returns
    -------
    dict[str, dict[str, float]]
    """
    run: Dict[str, Dict[str, float]] = {}
    regular_file(path, "run file")  # a FIFO or device would block the reader forever
    lineno = 0
    try:
        with open(path, "r", encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                parts = line.split()
                if not parts:
                    continue
                if len(parts) != 6:
                    raise ValueError(f"{path}:{lineno}: expected 6 fields 'qid Q0 docid rank score tag'")
                try:
                    score = float(parts[4])
                except ValueError:
                    raise ValueError(f"{path}:{lineno}: score {parts[4]!r} is not a number") from None
                if not np.isfinite(score):
                    raise ValueError(f"{path}:{lineno}: score {parts[4]!r} is not finite")
                run.setdefault(parts[0], {})[parts[2]] = score
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}:{lineno + 1}: not valid UTF-8 ({e})") from None
    return run


__all__ = [
    "INDEX_KINDS", "INDEX_SCORINGS", "check_index_kind", "check_index_scoring",
    "EMBEDDING_PRECISIONS", "QuantizedIndex", "l2_normalize", "quantize_embeddings", "quantize_index", "read_trec_run", "run_from_search", "search",
    "search_passages", "write_trec_run",
]
