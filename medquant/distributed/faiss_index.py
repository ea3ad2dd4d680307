"""Approximate search with FAISS (``pip install faiss-cpu``) over a sharded index, for corpora where exact search is
too slow: HNSW (graph; no training, best recall per query time) or IVF-PQ (inverted lists of product-quantized
codes; a few bytes per vector). Vectors are added shard by shard; inner product on L2-normalised vectors (cosine)
by default, the similarity of the exact :class:`~medquant.distributed.ShardedIndex` search. :meth:`FaissIndex.recall`
measures what the approximation loses against that exact search."""
from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import numpy as np

from ..eval.retrieval import as_matrix
from ..model.limits import positive_int, positive_int_or_none
from .search import ShardedIndex

PathLike = Union[str, "os.PathLike[str]"]
FAISS_KINDS = ("hnsw", "ivfpq")


def _faiss():
    try:
        import faiss
    except ImportError as e:
        raise ImportError(f"FAISS indexes need faiss-cpu: pip install faiss-cpu ({e})") from e
    return faiss


@dataclasses.dataclass
class FaissIndex:
    """A FAISS index over a :class:`~medquant.distributed.ShardedIndex` (rows numbered as there).

    Attributes: ``kind`` ("hnsw" / "ivfpq"), ``index`` (the faiss object), ``params`` (build and search
    parameters), ``normalize``, ``build_s`` (seconds to train and add), ``path`` (where it was saved, if it was).
    """

    kind: str
    index: Any
    params: Dict[str, Any]
    normalize: bool = True
    build_s: float = float("nan")
    path: Optional[Path] = None

    @property
    def nbytes(self) -> int:
        """Bytes of the serialized index."""
        return int(_faiss().serialize_index(self.index).nbytes)

    def search(self, query_emb, k: int = 10, *, ef_search: Optional[int] = None, nprobe: Optional[int] = None
               ) -> Tuple[np.ndarray, np.ndarray]:
        """Approximate top-k: (float32 scores, int64 global rows) [nq, k], -1 where fewer were found."""
        k = positive_int(k, "k")
        q = as_matrix(query_emb, self.normalize, "query_emb")
        if self.kind == "hnsw":
            self.index.hnsw.efSearch = max(k, positive_int(ef_search or self.params["ef_search"], "ef_search"))
        else:
            self.index.nprobe = positive_int(nprobe or self.params["nprobe"], "nprobe")
        s, i = self.index.search(q, k)
        return s.astype(np.float32), i.astype(np.int64)

    def recall(self, query_emb, exact: ShardedIndex, k: int = 10, **search_kwargs) -> Dict[str, float]:
        """Recall@k against exact search (the fraction of the exact top-k the approximate top-k holds, averaged
        over queries), and both search times."""
        t0 = time.perf_counter()
        _, approx = self.search(query_emb, k, **search_kwargs)
        t_approx = time.perf_counter() - t0
        t0 = time.perf_counter()
        _, ref = exact.search(query_emb, k, normalize=self.normalize)
        t_exact = time.perf_counter() - t0
        hits = [len(set(a[a >= 0].tolist()) & set(r.tolist())) / max(1, len(r)) for a, r in zip(approx, ref)]
        return {f"recall@{k}": float(np.mean(hits)) if hits else float("nan"), "n_queries": len(hits),
                "approx_s": t_approx, "exact_s": t_exact}

    def save(self, path: PathLike) -> Path:
        """Write the index (``faiss.write_index``) and its parameters (``<path>.json``)."""
        path = Path(path)
        _faiss().write_index(self.index, str(path))
        Path(str(path) + ".json").write_text(json.dumps({"kind": self.kind, "params": self.params,
                                                         "normalize": self.normalize}, indent=1) + "\n")
        self.path = path
        return path

    @classmethod
    def load(cls, path: PathLike) -> "FaissIndex":
        path = Path(path)
        info = json.loads(Path(str(path) + ".json").read_text())
        return cls(kind=info["kind"], index=_faiss().read_index(str(path)), params=info["params"],
                   normalize=bool(info["normalize"]), path=path)


def _train_sample(index: ShardedIndex, n: int, seed: int, normalize: bool) -> np.ndarray:
    rows = np.sort(np.random.default_rng(seed).choice(index.rows, size=min(n, index.rows), replace=False))
    return as_matrix(index.gather(rows), normalize, "sample")


def build_faiss_index(index: Union[ShardedIndex, PathLike], kind: str = "hnsw", *, M: int = 32,
                      ef_construction: int = 200, ef_search: int = 128, nlist: Optional[int] = None,
                      pq_m: Optional[int] = None, nbits: int = 8, nprobe: int = 16, train_size: int = 100_000,
                      seed: int = 0, normalize: bool = True, threads: Optional[int] = None,
                      save: Optional[PathLike] = None) -> FaissIndex:
    """Build a FAISS index over every shard of ``index``.

    Parameters
    ----------
    index : ShardedIndex or its directory
    kind : {"hnsw", "ivfpq"}
        ``"hnsw"``: ``IndexHNSWFlat`` with ``M`` links per node, ``ef_construction`` / ``ef_search`` candidate
        lists. ``"ivfpq"``: ``IndexIVFPQ`` with ``nlist`` lists (default about ``4 * sqrt(rows)``), ``pq_m``
        sub-quantizers of ``nbits`` bits (default ``dim / 8``, which must divide ``dim``), ``nprobe`` lists
        searched; trained on ``train_size`` rows sampled with ``seed``.
    normalize : bool
        L2-normalise vectors and queries (inner product = cosine).
    threads : int, optional
        FAISS's OpenMP threads (default: its own).
    save : path, optional
        Write the index there (and its parameters next to it).
    """
    faiss = _faiss()
    idx = index if isinstance(index, ShardedIndex) else ShardedIndex(index)
    if kind not in FAISS_KINDS:
        raise ValueError(f"kind must be one of {', '.join(FAISS_KINDS)}, got {kind!r}")
    if idx.rows == 0:
        raise ValueError(f"{idx.out} has no rows to index")
    threads = positive_int_or_none(threads, "threads")
    if threads is not None:
        faiss.omp_set_num_threads(threads)
    d = idx.dim
    metric = faiss.METRIC_INNER_PRODUCT
    t0 = time.perf_counter()
    if kind == "hnsw":
        params = {"M": positive_int(M, "M"), "ef_construction": positive_int(ef_construction, "ef_construction"),
                  "ef_search": positive_int(ef_search, "ef_search")}
        fi = faiss.IndexHNSWFlat(d, params["M"], metric)
        fi.hnsw.efConstruction = params["ef_construction"]
    else:
        pq_m = positive_int(pq_m, "pq_m") if pq_m is not None else max(1, d // 8)
        if d % pq_m:
            raise ValueError(f"pq_m must divide the dimension {d}, got {pq_m}")
        nl = positive_int(nlist, "nlist") if nlist is not None else max(1, int(4 * np.sqrt(idx.rows)))
        params = {"nlist": nl, "pq_m": pq_m, "nbits": positive_int(nbits, "nbits"),
                  "nprobe": positive_int(nprobe, "nprobe"), "train_size": positive_int(train_size, "train_size"),
                  "seed": int(seed)}
        sample = _train_sample(idx, max(params["train_size"], 39 * nl), int(seed), normalize)
        if len(sample) < nl:
            raise ValueError(f"{len(sample)} rows cannot train {nl} lists: lower nlist")
        quantizer = faiss.IndexFlatIP(d)
        fi = faiss.IndexIVFPQ(quantizer, d, nl, pq_m, params["nbits"], metric)
        fi.cp.seed = int(seed)
        fi.train(sample)
    for s in range(idx.n_shards):
        if idx.shard_rows[s]:
            fi.add(as_matrix(idx.embeddings(s), normalize, "embeddings"))
    out = FaissIndex(kind=kind, index=fi, params=params, normalize=normalize, build_s=time.perf_counter() - t0)
    if save is not None:
        out.save(save)
    return out
