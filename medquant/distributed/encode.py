"""Corpus encoding on Dask: one embedding shard per source partition, resumable and idempotent.

Each worker loads the model once (a Dask worker plugin, registered for the job and removed after it; workers that
join or restart during the job get it too) and encodes one partition at a time with as many oneDNN threads as the
worker has Dask threads. A shard is written under a temporary name and renamed into place when complete
(:mod:`medquant.distributed.shards`), so a rerun skips finished shards, redoes half-written ones, and a partition
whose worker died is simply computed again by Dask (``retries``) without leaving a partial or duplicate shard.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd

from .._progress import tqdm
from ..model import limits
from ..model.checkpoint import resolve_model_path
from ..model.encoder import Encoder
from . import shards as _shards
from .shards import ShardError

try:
    import dask
    import dask.dataframe as dd
    from distributed import Client, LocalCluster, WorkerPlugin, as_completed, get_worker
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("medquant.distributed needs Dask: pip install 'medquant[dask]' "
                      f"(dask, distributed, pyarrow); {e}") from e

PathLike = Union[str, "os.PathLike[str]"]

#: Rows per partition when the source is a pandas DataFrame (a Parquet / JSONL source keeps its own partitions).
DEFAULT_PARTITION_ROWS = 10_000
#: Bytes per partition of a JSONL source.
DEFAULT_JSONL_BLOCKSIZE = 16 * 2 ** 20


# ---------------------------------------------------------------------------------------------------- summary
@dataclasses.dataclass
class EncodeSummary:
    """What :func:`encode_corpus` did.

    Attributes
    ----------
    out : pathlib.Path
        The sharded index directory (open it with :class:`~medquant.distributed.ShardedIndex`).
    rows : int
        Rows in the index (all shards, written now or before).
    shards : int
        Shards in the index (one per source partition).
    written, skipped : int
        Shards written by this call / found complete and left as they were.
    rows_written : int
    wall_s : float
        Seconds of this call from the first task submitted to the last shard written (0 when nothing was to do).
    workers : pandas.DataFrame
        Per worker of this call: ``worker``, ``host``, ``threads``, ``shards``, ``rows``, ``encode_s`` (seconds
        inside the encoder) and ``texts_per_s`` (= rows / encode_s).
    dashboard : str, optional
        The Dask dashboard address of the cluster that ran the job.
    removed : list of str
        Incomplete shards (from an interrupted run) deleted and redone.
    """

    out: Path
    rows: int
    shards: int
    written: int
    skipped: int
    rows_written: int
    wall_s: float
    workers: pd.DataFrame
    dashboard: Optional[str] = None
    removed: List[str] = dataclasses.field(default_factory=list)

    @property
    def texts_per_s(self) -> float:
        """Rows written per wall second, all workers together (NaN when nothing was written)."""
        return self.rows_written / self.wall_s if self.rows_written and self.wall_s > 0 else float("nan")

    def __str__(self) -> str:
        head = (f"{self.out}: {self.rows} rows in {self.shards} shards; wrote {self.written} shards "
                f"({self.rows_written} rows) in {self.wall_s:.1f} s")
        if self.rows_written:
            head += f" = {self.texts_per_s:.1f} texts/s in total"
        head += f", skipped {self.skipped} complete shards"
        if len(self.workers):
            head += "\n" + self.workers.to_string(index=False, float_format=lambda v: f"{v:.1f}")
        return head


# ---------------------------------------------------------------------------------------------------- the source
def _read_source(source, id_column: str, text_column: str, partition_rows: int,
                 blocksize: int) -> Tuple["dd.DataFrame", Dict[str, Any]]:
    """The source as a dask DataFrame of the two columns, and its description for the manifest."""
    if isinstance(source, dd.DataFrame):
        ddf, desc = source, {"kind": "dask"}
    elif isinstance(source, pd.DataFrame):
        _check_columns(source.columns, id_column, text_column, "source")
        ddf = dd.from_pandas(source[[id_column, text_column]], chunksize=partition_rows, sort=False)
        desc = {"kind": "pandas", "rows": int(len(source)), "partition_rows": int(partition_rows)}
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"source {path} does not exist (a Parquet file or directory, or a JSONL file)")
        name = path.name.lower()
        if path.is_dir() or name.endswith(".parquet"):
            ddf = dd.read_parquet(str(path))  # columns checked below, then only these two are read
            kind = "parquet"
        elif name.endswith((".jsonl", ".json", ".jsonl.gz")):
            ddf = dd.read_json(str(path), lines=True, blocksize=blocksize if not name.endswith(".gz") else None)
            kind = "jsonl"
        else:
            raise ValueError(f"source {path}: expected a Parquet file or directory or a .jsonl file")
        desc = {"kind": kind, "path": str(path.resolve())}
    else:
        raise TypeError(f"source must be a Parquet / JSONL path, a pandas or a dask DataFrame; got "
                        f"{type(source).__name__}")
    _check_columns(ddf.columns, id_column, text_column, "source")
    ddf = ddf[[id_column, text_column]]
    desc.update({"id_column": id_column, "text_column": text_column, "partitions": int(ddf.npartitions)})
    return ddf, desc


def read_source_ids(source, id_column: str = "id", text_column: str = "text",
                    partition_rows: int = DEFAULT_PARTITION_ROWS) -> List[str]:
    """The ids of a source as :func:`encode_corpus` partitions it, in shard order (only the id column is read)."""
    ddf, _ = _read_source(source, id_column, text_column, partition_rows, DEFAULT_JSONL_BLOCKSIZE)
    return [str(i) for i in ddf[id_column].compute(scheduler="sync").tolist()]


def _check_columns(columns, id_column: str, text_column: str, what: str) -> None:
    missing = [c for c in (id_column, text_column) if c not in list(columns)]
    if missing:
        raise ValueError(f"{what} has no column {', '.join(map(repr, missing))} (columns: {list(columns)}); set "
                         "id_column= / text_column=")


def _partition_rows(df: pd.DataFrame, partition: int, id_column: str, text_column: str) -> Tuple[List[str], List[str]]:
    """Ids (as str) and texts of one partition; ShardError naming the row for a missing id or a non-text."""
    ids, texts = df[id_column], df[text_column]
    bad = ids.isna().to_numpy()
    if bad.any():
        raise ShardError(f"partition {partition}: {int(bad.sum())} rows have no id (first at row {int(bad.argmax())})")
    ids = [str(i) for i in ids.tolist()]
    texts = texts.tolist()
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise ShardError(f"partition {partition}, id {ids[i]!r}: text is {type(t).__name__} ({t!r}), expected "
                             "str (fill or drop rows without text first)")
    return ids, texts


# ---------------------------------------------------------------------------------------------------- the model
def _weights_digest(model_dir: Path) -> str:
    """sha256 of the model's tensors and metadata by name (two saves of one encoder can order a safetensors header
    differently; their digests are equal)."""
    from safetensors import safe_open

    files = sorted(p for p in model_dir.iterdir() if p.suffix in (".safetensors", ".bin") and p.is_file())
    if not files:
        raise ShardError(f"{model_dir} holds no weight file (*.safetensors)")
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode())
        if p.suffix != ".safetensors":
            h.update(_shards.file_digest(p).encode())
            continue
        with safe_open(str(p), "np") as f:
            h.update(json.dumps(f.metadata() or {}, sort_keys=True).encode())
            for name in sorted(f.keys()):
                t = f.get_tensor(name)
                h.update(f"{name}:{t.dtype.str}:{t.shape}".encode())
                h.update(np.ascontiguousarray(t).tobytes())
    return h.hexdigest()


def _saved_model(model, out: Path) -> Path:
    """The directory workers load: a name or directory as given; an Encoder that is not its own directory's
    fp32 checkpoint is saved to ``out/model`` (kept as it is if the same weights are already there)."""
    if not isinstance(model, Encoder):
        return resolve_model_path(model)
    if model.is_fp32 and model.model_dir is not None and model.reference is None and model.fp32_params is not None:
        return Path(model.model_dir)
    target = out / "model"
    tmp = out / f".model.tmp-{uuid.uuid4().hex}"
    model.save_pretrained(tmp)
    try:
        if target.is_dir() and _weights_digest(target) == _weights_digest(tmp):
            return target
        if target.exists():
            raise ShardError(f"{target} holds another model than the encoder given; use another output directory "
                             "or overwrite=True")
        os.rename(tmp, target)
        return target
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


class _EncoderPlugin(WorkerPlugin):
    """Loads the model once per worker, on first use; one partition encodes at a time with the worker's threads."""

    def __init__(self, name: str, model_dir: str, max_length: int, n_threads: Optional[int]):
        self.name = name
        self.model_dir = model_dir
        self.max_length = max_length
        self.n_threads = n_threads
        self.encoder: Optional[Encoder] = None
        self.lock = threading.Lock()
        self.threads = 1

    def setup(self, worker):
        self.threads = int(self.n_threads or worker.state.nthreads)

    def teardown(self, worker):
        self.encoder = None

    def load(self) -> Encoder:
        if self.encoder is None:
            self.encoder = Encoder.from_pretrained(self.model_dir, max_length=self.max_length,
                                                   n_threads=min(self.threads, limits.available_cpus()))
        return self.encoder

    # the lock is per process; pickled copies (one per worker) start without it
    def __getstate__(self):
        state = dict(self.__dict__)
        state.update(encoder=None, lock=None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.lock = threading.Lock()


def _encode_partition(df: pd.DataFrame, partition: int, out: str, plugin: str, settings: Dict[str, Any],
                      id_column: str, text_column: str) -> Dict[str, Any]:
    """The task: encode one partition into its shard (or find it complete); returns the shard's meta."""
    outp = Path(out)
    ids, texts = _partition_rows(df, partition, id_column, text_column)
    done = _shards.read_meta(outp, partition)
    if done is not None:
        if done["ids_sha256"] != _shards.ids_digest(ids):
            raise ShardError(f"{outp / _shards.shard_name(partition)} holds other ids than partition {partition} of "
                             "the source: the source changed since it was written")
        return {**_small(done), "written": False}
    worker = get_worker()
    p: _EncoderPlugin = worker.plugins[plugin]
    with p.lock:
        enc = p.load()
        t0 = time.perf_counter()
        if texts:
            emb = enc.encode_document(texts, batch_size=settings["batch_size"], max_length=settings["max_length"],
                                      pooling=settings["pooling"], normalize=settings["normalize"],
                                      show_progress_bar=False)
        else:
            emb = np.zeros((0, enc.hidden_size), np.float32)
        encode_s = time.perf_counter() - t0
        threads = enc.n_threads
    info = {"worker": worker.address, "host": socket.gethostname(), "pid": os.getpid(), "threads": threads,
            "encode_s": encode_s}
    meta, written = _shards.write_shard(outp, partition, ids, emb, info)
    return {**_small(meta), "written": written}


def _small(meta: Dict[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in meta.items() if not k.startswith(("min", "max"))}


# ---------------------------------------------------------------------------------------------------- the job
def _embedding_settings(enc: Encoder, batch_size: int, max_length: Optional[int], pooling: Optional[str],
                        normalize: Optional[bool]) -> Dict[str, Any]:
    cfg = enc.sentence_config.override(pooling, normalize)
    return {"batch_size": int(batch_size), "max_length": enc._max_length(max_length), "pooling": cfg.pooling,
            "normalize": bool(cfg.normalize), "prompt": cfg.prompt_text(enc.sentence_config.document_prompt_name()),
            "dim": int(enc.hidden_size)}


def _prepare_out(out: Path, overwrite: bool) -> None:
    if overwrite and out.exists():
        if any(out.iterdir()) and not (out / _shards.MANIFEST).exists():
            raise ShardError(f"{out} is not empty and holds no sharded index: refusing to delete it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    if any(out.iterdir()) and not (out / _shards.MANIFEST).exists():
        raise ShardError(f"{out} is not empty and holds no sharded index: choose an empty or new directory")


def _workers_table(results: Sequence[Dict[str, Any]]) -> pd.DataFrame:
    cols = ["worker", "host", "threads", "shards", "rows", "encode_s", "texts_per_s"]
    rows = [r for r in results if r.get("written")]
    if not rows:
        return pd.DataFrame(columns=cols)
    df = pd.DataFrame(rows)
    g = df.groupby("worker", sort=True).agg(host=("host", "first"), threads=("threads", "max"),
                                            shards=("partition", "size"), rows=("rows", "sum"),
                                            encode_s=("encode_s", "sum")).reset_index()
    g["texts_per_s"] = g["rows"] / g["encode_s"].where(g["encode_s"] > 0)
    return g[cols]


def _verify(out: Path, n_partitions: int, ids: bool) -> int:
    """Every shard present; ids unique across shards (ShardError otherwise). Returns the row count."""
    metas = [_shards.read_meta(out, i) for i in range(n_partitions)]
    missing = [i for i, m in enumerate(metas) if m is None]
    if missing:
        raise ShardError(f"{out}: {len(missing)} shards missing after the job (e.g. partition {missing[0]})")
    if ids:
        all_ids = pd.Series(np.concatenate([np.asarray(_shards.load_ids(out, i), dtype=object)
                                            for i in range(n_partitions)]) if n_partitions else [], dtype=object)
        dup = all_ids[all_ids.duplicated()]
        if len(dup):
            raise ShardError(f"the source has {len(dup)} duplicate ids (e.g. {dup.iloc[0]!r}): every row was encoded, "
                             "but ids must be unique for the index to map results back to rows")
    return int(sum(m["rows"] for m in metas))


def encode_corpus(source, model: Union[PathLike, Encoder], out: PathLike, client: Optional["Client"] = None, *,
                  id_column: str = "id", text_column: str = "text", batch_size: int = 32,
                  max_length: Optional[int] = None, pooling: Optional[str] = None, normalize: Optional[bool] = None,
                  n_workers: Optional[int] = None, threads_per_worker: int = 1, n_threads: Optional[int] = None,
                  partition_rows: int = DEFAULT_PARTITION_ROWS, retries: int = 3, overwrite: bool = False,
                  verify_ids: bool = True, show_progress_bar: Optional[bool] = None) -> EncodeSummary:
    """Encode a corpus on a Dask cluster into a sharded embedding index (one shard per source partition).

    Parameters
    ----------
    source : path, pandas.DataFrame or dask.dataframe.DataFrame
        Rows with an id and a text column: a Parquet file or directory (its partitions are kept), a JSONL file
        (split every 16 MiB), a pandas DataFrame (split every ``partition_rows`` rows) or a dask DataFrame.
        Partitioning must be the same on every run for a rerun to resume (it is, for the same files).
    model : path, model name or Encoder
        A saved medquant model directory (fp32 or quantized, :meth:`Encoder.save_pretrained`) or packaged model
        name; every worker loads it once, so on a remote cluster it must be at the same path on every worker. An
        Encoder that is not an fp32 checkpoint as loaded is saved to ``out/model`` first.
    out : path
        The index directory (new, empty, or the output of an earlier run of the same job to resume).
    client : distributed.Client, optional
        The cluster to run on (a ``LocalCluster`` or a remote scheduler). Default: a ``LocalCluster`` of
        ``n_workers`` processes (default: the CPUs this process may use // ``threads_per_worker``) with
        ``threads_per_worker`` threads each, closed afterwards.
    id_column, text_column : str
    batch_size, max_length, pooling, normalize
        As :meth:`Encoder.encode`; documents get the model's document prompt (:meth:`Encoder.encode_document`).
    n_threads : int, optional
        oneDNN threads per worker (default: the worker's Dask threads; each worker encodes one partition at a
        time with all of them).
    retries : int
        Times a failed partition is retried (a worker dying is retried by Dask independently of this).
    overwrite : bool
        Delete an existing index in ``out`` first (a directory that is not an index is never deleted).
    verify_ids : bool
        Read every shard's ids at the end and check that they are unique (ShardError if the source repeats one).
    show_progress_bar : bool, optional
        A bar over shards (default on); the Dask dashboard (:attr:`EncodeSummary.dashboard`) shows the workers.

    Returns
    -------
    EncodeSummary

    Embeddings equal :meth:`Encoder.encode_document` of the same texts bit for bit for every scheme whose result
    does not depend on which texts share a batch (all presets except ``int8-dynamic``, whose activation scales are
    per batch: those equal the encoding of the same partition). A rerun of a finished job reads the shard metas
    and writes nothing; ``out/manifest.json`` ties the shards to their model, settings and source, and a rerun
    with another model, settings or partitioning is refused (ShardError) instead of mixing shards.
    """
    out = Path(out).expanduser()
    batch_size = limits.batch_size(batch_size)
    partition_rows = limits.positive_int(partition_rows, "partition_rows")
    threads_per_worker = limits.positive_int(threads_per_worker, "threads_per_worker")
    if isinstance(retries, bool) or not isinstance(retries, (int, np.integer)) or retries < 0:
        raise ValueError(f"retries must be an int >= 0, got {retries!r}")
    if n_threads is not None:
        n_threads = limits.positive_int(n_threads, "n_threads")
    ddf, source_desc = _read_source(source, id_column, text_column, partition_rows, DEFAULT_JSONL_BLOCKSIZE)
    _prepare_out(out, overwrite)
    model_dir = _saved_model(model, out)
    probe = model if isinstance(model, Encoder) else Encoder.from_pretrained(model_dir, n_threads=1)
    settings = _embedding_settings(probe, batch_size, max_length, pooling, normalize)
    manifest = {"format": _shards.FORMAT, "model": {"path": str(Path(model_dir).resolve()),
                                                   "weights_sha256": _weights_digest(Path(model_dir)),
                                                   "scheme": probe.scheme.to_json()},
                "settings": settings, "source": source_desc, "dim": settings["dim"]}
    del probe
    if not _shards.check_manifest(out, manifest):
        _shards.write_json_atomic(out / _shards.MANIFEST, manifest)
    n = source_desc["partitions"]
    removed = _shards.remove_incomplete(out, n)
    todo = [i for i in range(n) if _shards.read_meta(out, i) is None]
    results: List[Dict[str, Any]] = []
    wall = 0.0
    dashboard = None
    if todo:
        results, wall, dashboard = _run(ddf, todo, out, str(model_dir), settings, id_column, text_column, client,
                                        n_workers, threads_per_worker, n_threads, retries, show_progress_bar)
    rows = _verify(out, n, verify_ids and bool(todo))
    written = [r for r in results if r.get("written")]
    return EncodeSummary(out=out, rows=rows, shards=n, written=len(written), skipped=n - len(written),
                         rows_written=int(sum(r["rows"] for r in written)), wall_s=wall,
                         workers=_workers_table(results), dashboard=dashboard, removed=removed)


def _run(ddf, todo: List[int], out: Path, model_dir: str, settings: Dict[str, Any], id_column: str, text_column: str,
         client, n_workers, threads_per_worker: int, n_threads, retries: int, show_progress_bar
         ) -> Tuple[List[Dict[str, Any]], float, Optional[str]]:
    own = None
    if client is None:
        workers = n_workers if n_workers is not None else max(1, limits.available_cpus() // threads_per_worker)
        own = LocalCluster(n_workers=limits.positive_int(workers, "n_workers"), threads_per_worker=threads_per_worker,
                           processes=True, dashboard_address=":0")
        client = Client(own)
    plugin = _EncoderPlugin(f"medquant-encode-{uuid.uuid4().hex[:12]}", model_dir, settings["max_length"], n_threads)
    parts = ddf.to_delayed()
    try:
        client.register_plugin(plugin)
        tasks = [dask.delayed(_encode_partition, pure=False)(parts[i], i, str(out), plugin.name, settings, id_column,
                                                             text_column) for i in todo]
        t0 = time.perf_counter()
        futures = client.compute(tasks, retries=retries)
        results = []
        bar = tqdm(total=len(futures), desc=f"encode_corpus -> {out.name}", unit="shard",
                   disable=show_progress_bar is False)
        try:
            for fut in as_completed(futures):
                results.append(fut.result())
                bar.update(1)
        except BaseException:
            client.cancel(futures)
            raise
        finally:
            bar.close()
        return results, time.perf_counter() - t0, client.dashboard_link
    finally:
        try:
            client.unregister_worker_plugin(plugin.name)
        except Exception:  # the cluster may be gone; the plugin goes with it
            pass
        if own is not None:
            client.close()
            own.close()
