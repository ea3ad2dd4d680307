"""Exact search over a sharded embedding index: top-k per shard, merged into the global top-k.

Rows are numbered globally in shard order (shard 0's rows first), and the merge keeps the single-index rule of
:mod:`medquant.eval.retrieval`: higher score first, equal scores by lower (global) row. Float32, int8 and binary
vectors are supported; int8 codes use one calibration for the whole corpus (each shard's meta carries its
per-dimension min / max), so a sharded int8 search scores exactly as :func:`~medquant.eval.retrieval.quantize_index`
of the concatenated corpus does. With ``rescore_multiplier`` the global top ``k * m`` candidates (not each shard's)
are rescored with the float vectors, again as the single index does.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import numpy as np

from ..eval.retrieval import INDEX_KINDS, as_matrix, check_index_scoring, quantize_index, rescore
from ..eval.retrieval import search as _float_search
from ..model.limits import positive_int, positive_int_or_none
from . import shards as _shards
from .shards import ShardError

PathLike = Union[str, "os.PathLike[str]"]
SEARCH_KINDS = ("float32",) + INDEX_KINDS


def merge_topk(parts: Sequence[Tuple[np.ndarray, np.ndarray]], k: int, nq: int) -> Tuple[np.ndarray, np.ndarray]:
    """The global top-k of per-shard top-k lists ``(scores [nq, k_s], global rows [nq, k_s])``: score descending,
    equal scores by lower row (the rule of a single index)."""
    parts = [(s, i) for s, i in parts if s.shape[1]]
    if not parts:
        return np.zeros((nq, 0), np.float32), np.zeros((nq, 0), np.int64)
    s = np.concatenate([p[0] for p in parts], axis=1)
    i = np.concatenate([p[1] for p in parts], axis=1).astype(np.int64, copy=False)
    order = np.lexsort((i, -s.astype(np.float64)), axis=1)[:, :k]
    return np.take_along_axis(s, order, axis=1), np.take_along_axis(i, order, axis=1)


class ShardedIndex:
    """A sharded embedding index written by :func:`medquant.distributed.encode_corpus`.

    Shards are memory-mapped one at a time, so searching needs memory for one shard plus the results. Attributes:
    ``out`` (its directory), ``manifest`` (model, settings, source), ``dim``, ``shard_rows`` (rows per shard),
    ``offsets`` (global row of each shard's first row), ``rows`` (total).
    """

    def __init__(self, out: PathLike):
        self.out = Path(out).expanduser()
        path = self.out / _shards.MANIFEST
        if not path.is_file():
            raise ShardError(f"{self.out} is not a sharded index (no {_shards.MANIFEST}); write one with "
                             "medquant.distributed.encode_corpus")
        self.manifest = _shards.read_json(path)
        n = int(self.manifest["source"]["partitions"])
        self._metas = [_shards.read_meta(self.out, i) for i in range(n)]
        missing = [i for i, m in enumerate(self._metas) if m is None]
        if missing:
            raise ShardError(f"{self.out}: {len(missing)} of {n} shards are missing or incomplete (e.g. "
                             f"{_shards.shard_name(missing[0])}): run encode_corpus again to finish them")
        self.dim = int(self.manifest["dim"])
        self.shard_rows = [int(m["rows"]) for m in self._metas]
        self.offsets = np.concatenate([[0], np.cumsum(self.shard_rows)]).astype(np.int64)
        self.rows = int(self.offsets[-1])
        self._ids: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return self.rows

    def __repr__(self) -> str:
        return f"ShardedIndex({str(self.out)!r}, rows={self.rows}, shards={len(self.shard_rows)}, dim={self.dim})"

    @property
    def n_shards(self) -> int:
        return len(self.shard_rows)

    @property
    def normalized(self) -> bool:
        """Whether the stored vectors are L2-normalised by the encoder (the model's sentence config)."""
        return bool(self.manifest["settings"]["normalize"])

    @property
    def ids(self) -> np.ndarray:
        """Every row's id (object array, global row order), read once."""
        if self._ids is None:
            parts = [np.asarray(_shards.load_ids(self.out, i), dtype=object) for i in range(self.n_shards)]
            self._ids = np.concatenate(parts) if parts else np.zeros(0, dtype=object)
        return self._ids

    def embeddings(self, shard: int, mmap: bool = True) -> np.ndarray:
        """One shard's float32 vectors (memory-mapped by default)."""
        return _shards.load_embeddings(self.out, shard, mmap=mmap)

    def load(self) -> np.ndarray:
        """All vectors as one float32 matrix in memory (for corpora that fit)."""
        out = np.empty((self.rows, self.dim), np.float32)
        for s in range(self.n_shards):
            out[self.offsets[s]:self.offsets[s + 1]] = self.embeddings(s)
        return out

    def ranges(self, normalize: bool = True) -> np.ndarray:
        """Per-dimension ``[min, max]`` [2, dim] over every row (of the L2-normalised rows with ``normalize``)."""
        lo_key, hi_key = ("min_normalized", "max_normalized") if normalize else ("min", "max")
        metas = [m for m in self._metas if m["rows"]]
        if not metas:
            raise ShardError(f"{self.out} is empty: no ranges")
        lo = np.min(np.asarray([m[lo_key] for m in metas], np.float32), axis=0)
        hi = np.max(np.asarray([m[hi_key] for m in metas], np.float32), axis=0)
        return np.stack([lo, hi])

    def gather(self, rows: np.ndarray) -> np.ndarray:
        """The float32 vectors of the given global rows (sorted, unique), read shard by shard."""
        out = np.empty((rows.size, self.dim), np.float32)
        shard_of = np.searchsorted(self.offsets, rows, side="right") - 1
        for s in np.unique(shard_of):
            sel = shard_of == s
            out[sel] = self.embeddings(int(s))[rows[sel] - self.offsets[s]]
        return out

    # ------------------------------------------------------------------------------------------ search
    def search(self, query_emb, k: int = 100, kind: str = "float32", *, scoring: str = "codes",
               rescore_multiplier: Optional[int] = None, normalize: bool = True, client=None,
               return_ids: bool = False) -> Tuple[np.ndarray, np.ndarray]:
        """Exact top-k over every shard.

        Parameters
        ----------
        query_emb : array-like, shape (nq, dim)
        k : int
            Results per query (clipped to the rows of the index).
        kind : {"float32", "int8", "binary"}
            Score the float vectors (:func:`~medquant.eval.retrieval.search`), or int8 codes / sign bits of them
            (:meth:`~medquant.eval.retrieval.QuantizedIndex.search` with ``scoring``).
        rescore_multiplier : int, optional
            int8 / binary: rescore the global top ``k * m`` candidates with the float vectors.
        normalize : bool
            Cosine similarity (L2-normalise queries and vectors), as the single-index functions.
        client : distributed.Client, optional
            Search the shards on the cluster's workers (each reads its shards from ``out``, which must be on a
            file system they share); default: here, one shard after another.
        return_ids : bool
            Return ids (object array) instead of global row numbers.

        Returns
        -------
        scores : numpy.ndarray
            ``[nq, k]`` descending (float32; int32 for int8 / binary ``"codes"`` without rescoring).
        rows : numpy.ndarray
            int64 global rows ``[nq, k]`` (or ids); equal scores ordered by lower row.
        """
        if kind not in SEARCH_KINDS:
            raise ValueError(f"kind must be one of {', '.join(SEARCH_KINDS)}, got {kind!r}")
        check_index_scoring(scoring)
        k = positive_int(k, "k")
        rescore_multiplier = positive_int_or_none(rescore_multiplier, "rescore_multiplier")
        if rescore_multiplier is not None and kind == "float32":
            raise ValueError("rescore_multiplier applies to int8 / binary search")
        q = as_matrix(query_emb, False, "query_emb")
        if q.shape[1] != self.dim:
            raise ValueError(f"dimension mismatch: queries {q.shape[1]}, index {self.dim}")
        kk = min(k, self.rows)
        width = kk * (rescore_multiplier or 1)
        spec = {"kind": kind, "scoring": scoring, "normalize": bool(normalize), "k": width,
                "ranges": self.ranges(normalize) if kind == "int8" else None}
        shards = [s for s in range(self.n_shards) if self.shard_rows[s]]
        offsets = [int(self.offsets[s]) for s in shards]
        if client is None:
            parts = [_search_shard(str(self.out), s, off, q, spec) for s, off in zip(shards, offsets)]
        else:
            qf = client.scatter(q, broadcast=True)
            n = len(shards)
            parts = client.gather(client.map(_search_shard, [str(self.out)] * n, shards, offsets, [qf] * n,
                                             [spec] * n, pure=False))
        scores, rows = merge_topk(parts, width, q.shape[0])
        if rescore_multiplier is not None:
            scores, rows = self._rescore(q, rows, kk, normalize)
        return (scores, self.ids[rows]) if return_ids else (scores, rows)

    def _rescore(self, q: np.ndarray, cand: np.ndarray, k: int, normalize: bool) -> Tuple[np.ndarray, np.ndarray]:
        """Float scores of each query's candidates (read from their shards), best ``k`` kept."""
        flat = np.unique(cand)
        vecs = as_matrix(self.gather(flat), normalize, "float_corpus")
        return rescore(as_matrix(q, normalize, "query_emb"), cand, vecs, k, np.searchsorted(flat, cand))


def _search_shard(out: str, shard: int, offset: int, q: np.ndarray, spec: Dict[str, Any]
                  ) -> Tuple[np.ndarray, np.ndarray]:
    """Top ``spec["k"]`` of one shard, rows made global (runs here or on a worker)."""
    emb = _shards.load_embeddings(Path(out), shard)
    if spec["kind"] == "float32":
        s, i = _float_search(q, emb, k=spec["k"], normalize=spec["normalize"])
    else:
        qi = quantize_index(emb, spec["kind"], ranges=spec["ranges"], normalize=spec["normalize"],
                            scoring=spec["scoring"])
        s, i = qi.search(q, k=spec["k"])
    return s, i + offset
