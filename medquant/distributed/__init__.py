"""Corpus encoding and search beyond one process, on Dask (``pip install 'medquant[dask]'``).

    from medquant.distributed import encode_corpus, ShardedIndex
    summary = encode_corpus("corpus.parquet", "int8-model/", "index/")   # a LocalCluster by default
    index = ShardedIndex("index/")
    scores, ids = index.search(enc.encode_query(queries), k=10, return_ids=True)

:func:`encode_corpus` writes one embedding shard per source partition (resumable, idempotent, retried when a
worker dies); :class:`ShardedIndex` searches the shards exactly (float32, int8 or binary, optional rescoring) with
the single-index ranking rule; :func:`build_faiss_index` builds an approximate FAISS index over them
(``faiss-cpu``) and reports its recall against exact search. ``import medquant`` does not import this module.
"""
from .encode import EncodeSummary, encode_corpus
from .faiss_index import FaissIndex, build_faiss_index
from .search import ShardedIndex, merge_topk
from .shards import ShardError

__all__ = ["EncodeSummary", "FaissIndex", "ShardError", "ShardedIndex", "build_faiss_index", "encode_corpus",
           "merge_topk"]
