"""The on-disk layout of a sharded embedding index (what :func:`medquant.distributed.encode_corpus` writes and
:class:`medquant.distributed.ShardedIndex` reads). No Dask here: the layout is read and written by plain Python.

::

    out/
      manifest.json          what the shards were made from: model (path, sha256 of its weights, scheme),
                             embedding settings, source (path, columns, number of partitions), dimension
      shard-00000/           one per source partition, in source order
        embeddings.npy       float32 [rows, dim], the encoder's output as it is (row i = id i)
        ids.parquet          one column ``id`` (string), in row order
        meta.json            rows, dim, sha256 of ids and embeddings, per-dimension min / max (raw and of the
                             L2-normalised rows: global int8 calibration without reading every shard), worker,
                             encode seconds, tokens
      .shard-00000.tmp-<hex> a shard being written; renamed to ``shard-00000`` when complete (os.rename of a
                             directory is atomic), so a shard directory is either absent or complete

A shard directory without a readable ``meta.json`` (made by hand or by a crash of the file system) counts as
absent and is redone; a temporary directory left by an interrupted run is removed when the job starts again.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..model.checkpoint import file_digest  # noqa: F401  (part of this module's interface)

FORMAT = "medquant-shards/1"
MANIFEST = "manifest.json"
EMBEDDINGS = "embeddings.npy"
IDS = "ids.parquet"
META = "meta.json"


class ShardError(ValueError):
    """A sharded index that is incomplete, inconsistent, or made from another model, settings or source."""


def shard_name(partition: int) -> str:
    return f"shard-{int(partition):05d}"


def ids_digest(ids: Sequence[str]) -> str:
    """sha256 of the ids in order (each UTF-8 encoded, NUL-terminated)."""
    h = hashlib.sha256()
    for i in ids:
        h.update(str(i).encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


def array_digest(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def write_json_atomic(path: Path, obj: Dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_json(path: Path) -> Dict[str, Any]:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ShardError(f"cannot read {path}: {e}") from None


def _normalized(emb: np.ndarray) -> np.ndarray:
    from ..eval.retrieval import l2_normalize

    return l2_normalize(emb) if len(emb) else emb


def write_shard(out: Path, partition: int, ids: Sequence[str], emb: np.ndarray, info: Dict[str, Any]
                ) -> Tuple[Dict[str, Any], bool]:
    """Write one shard under a temporary name and rename it into place; returns its meta and whether this call
    wrote it.

    If the shard appeared meanwhile (a retried task whose first attempt was not dead after all), the one in place
    is kept when it holds the same ids, and ShardError is raised when it does not."""
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    if emb.ndim != 2 or emb.shape[0] != len(ids):
        raise ShardError(f"shard {partition}: {len(ids)} ids but embeddings of shape {emb.shape}")
    norm = _normalized(emb)
    meta = {
        "format": FORMAT, "partition": int(partition), "rows": int(emb.shape[0]), "dim": int(emb.shape[1]),
        "ids_sha256": ids_digest(ids), "embeddings_sha256": array_digest(emb),
        "min": emb.min(axis=0).tolist() if len(emb) else None, "max": emb.max(axis=0).tolist() if len(emb) else None,
        "min_normalized": norm.min(axis=0).tolist() if len(emb) else None,
        "max_normalized": norm.max(axis=0).tolist() if len(emb) else None,
        **info,
    }
    final = out / shard_name(partition)
    tmp = out / f".{shard_name(partition)}.tmp-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        import pandas as pd

        np.save(tmp / EMBEDDINGS, emb)
        pd.DataFrame({"id": pd.Series([str(i) for i in ids], dtype=object)}).to_parquet(tmp / IDS, index=False)
        write_json_atomic(tmp / META, meta)
        try:
            os.rename(tmp, final)
        except OSError:
            if final.is_dir() and (final / META).is_file():
                other = read_json(final / META)
                if other.get("ids_sha256") != meta["ids_sha256"]:
                    raise ShardError(f"{final} holds other ids than partition {partition} now has: the source "
                                     "changed while the job ran") from None
                return other, False
            raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return meta, True


def read_meta(out: Path, partition: int) -> Optional[Dict[str, Any]]:
    """The meta of a complete shard, or None if it is absent (or has no readable meta)."""
    path = out / shard_name(partition) / META
    if not path.is_file():
        return None
    try:
        meta = read_json(path)
    except ShardError:
        return None
    if meta.get("format") != FORMAT or meta.get("partition") != int(partition):
        return None
    return meta


def remove_incomplete(out: Path, n_partitions: int) -> List[str]:
    """Delete temporary shard directories and shard directories without a readable meta; returns their names."""
    removed = []
    for p in sorted(out.glob(".shard-*.tmp-*")):
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p.name)
    for i in range(n_partitions):
        d = out / shard_name(i)
        if d.exists() and read_meta(out, i) is None:
            shutil.rmtree(d)
            removed.append(d.name)
    return removed


def load_embeddings(out: Path, partition: int, mmap: bool = True) -> np.ndarray:
    return np.load(out / shard_name(partition) / EMBEDDINGS, mmap_mode="r" if mmap else None, allow_pickle=False)


def load_ids(out: Path, partition: int) -> List[str]:
    import pandas as pd

    return pd.read_parquet(out / shard_name(partition) / IDS, columns=["id"])["id"].astype(str).tolist()


def check_manifest(out: Path, manifest: Dict[str, Any]) -> bool:
    """True if ``out`` already holds a manifest equal to ``manifest`` (nothing to write), False if it has none;
    ShardError if it holds another (other model, settings or source: the shards would mix)."""
    path = out / MANIFEST
    if not path.exists():
        return False
    old = read_json(path)
    if old == manifest:
        return True
    diff = sorted(k for k in set(old) | set(manifest) if old.get(k) != manifest.get(k))
    raise ShardError(f"{out} holds shards of another job (differs in: {', '.join(diff)}); use another output "
                     "directory or overwrite=True to delete them")
