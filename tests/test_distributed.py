"""Dask corpus encoding and sharded search (medquant.distributed): on a LocalCluster of 2 worker processes, the
shards hold exactly what single-process encode gives, every id once; a partition that fails, or a worker that
dies, is retried without losing or doubling a row; reruns write nothing and redo half-written shards; sharded
exact search equals single-index search; FAISS HNSW recall against exact search is above a floor."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import medquant
from conftest import require

dd = require("dask.dataframe")
distributed = require("distributed")
require("pyarrow")

from medquant.distributed import ShardedIndex, ShardError, build_faiss_index, encode_corpus  # noqa: E402
from medquant.eval.retrieval import quantize_index, search  # noqa: E402


@pytest.fixture(scope="module")
def client():
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0")
    c = distributed.Client(cluster)
    yield c
    c.close()
    cluster.close()


@pytest.fixture(scope="module")
def corpus(medquad):
    """240 distinct MedQuAD questions with their qa ids (short texts: the tests are about the job, not speed)."""
    df = medquad.drop_duplicates("question").sample(n=240, random_state=5)
    return pd.DataFrame({"id": df["qa_id"].to_numpy(), "text": df["question"].to_numpy()})


@pytest.fixture(scope="module")
def int8_dir(tmp_path_factory, minilm, corpus):
    q = minilm.quantize("int8-static-asym", calibration_texts=list(corpus["text"][:64]))
    return q.save_pretrained(tmp_path_factory.mktemp("int8") / "model")


def _files(out: Path):
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in sorted(out.rglob("*"))}


@pytest.mark.parametrize("model", ["fp32", "int8"])
def test_shards_equal_single_process_encode(tmp_path, client, corpus, minilm_dir, int8_dir, model):
    path = minilm_dir if model == "fp32" else int8_dir
    s = encode_corpus(corpus, path, tmp_path / "idx", client, partition_rows=40, show_progress_bar=False)
    assert (s.rows, s.shards, s.written, s.skipped) == (240, 6, 6, 0)
    assert int(s.workers["rows"].sum()) == 240 and (s.workers["threads"] == 1).all()
    index = ShardedIndex(tmp_path / "idx")
    assert list(index.ids) == list(corpus["id"])  # complete, in source order, each once
    enc = medquant.Encoder.from_pretrained(path)
    ref = enc.encode_document(list(corpus["text"]))
    assert np.array_equal(index.load(), ref)  # bit for bit


def test_parquet_and_jsonl_sources(tmp_path, client, corpus, minilm_dir):
    pq_dir = tmp_path / "pq"
    pq_dir.mkdir()
    for i in range(3):  # a Parquet dataset of three files
        corpus.iloc[i * 80:(i + 1) * 80].rename(columns={"text": "body"}).to_parquet(pq_dir / f"part{i}.parquet")
    with distributed.Client(client.scheduler.address) as by_address:  # a scheduler given by its address
        a = encode_corpus(pq_dir, minilm_dir, tmp_path / "a", by_address, text_column="body",
                          show_progress_bar=False)
    jl = tmp_path / "c.jsonl"
    corpus.to_json(jl, orient="records", lines=True)
    b = encode_corpus(jl, minilm_dir, tmp_path / "b", n_workers=2, show_progress_bar=False)  # its own LocalCluster
    assert a.rows == b.rows == 240
    ia, ib = ShardedIndex(a.out), ShardedIndex(b.out)
    assert list(ia.ids) == list(ib.ids) == list(corpus["id"])
    assert np.array_equal(ia.load(), ib.load())
    with pytest.raises(ValueError, match="no column 'text'"):
        encode_corpus(pq_dir, minilm_dir, tmp_path / "c", client, show_progress_bar=False)


def test_rerun_writes_nothing_and_redoes_half_written(tmp_path, client, corpus, minilm_dir):
    out = tmp_path / "idx"
    encode_corpus(corpus, minilm_dir, out, client, partition_rows=60, show_progress_bar=False)
    full = ShardedIndex(out).load()
    before = _files(out)
    again = encode_corpus(corpus, minilm_dir, out, client, partition_rows=60, show_progress_bar=False)
    assert (again.written, again.skipped, again.rows) == (0, 4, 240)
    assert _files(out) == before  # not a byte written, not a file touched
    # an interrupted run: one shard still under its temporary name, one directory without its meta
    os.rename(out / "shard-00001", out / ".shard-00001.tmp-0123abcd")
    (out / "shard-00002" / "meta.json").unlink()
    redo = encode_corpus(corpus, minilm_dir, out, client, partition_rows=60, show_progress_bar=False)
    assert (redo.written, redo.skipped) == (2, 2)
    assert sorted(redo.removed) == [".shard-00001.tmp-0123abcd", "shard-00002"]
    assert np.array_equal(ShardedIndex(out).load(), full)
    assert not list(out.glob(".shard-*"))


def test_failing_partition_is_retried(tmp_path, client, corpus, minilm_dir):
    marks = tmp_path / "marks"
    marks.mkdir()

    def fail_once(df, partition_info=None):  # partition 2 raises on its first attempt only
        if partition_info and partition_info["number"] == 2 and len(df):
            mark = marks / "failed"
            if not mark.exists():
                mark.write_text("1")
                raise RuntimeError("injected failure")
        return df

    ddf = dd.from_pandas(corpus, npartitions=4, sort=False).map_partitions(fail_once, meta=corpus.iloc[:0])
    with pytest.raises(RuntimeError, match="injected failure"):
        encode_corpus(ddf, minilm_dir, tmp_path / "a", client, retries=0, show_progress_bar=False)
    (marks / "failed").unlink()
    s = encode_corpus(ddf, minilm_dir, tmp_path / "b", client, retries=1, show_progress_bar=False)
    assert (marks / "failed").exists() and s.written == 4
    assert list(ShardedIndex(s.out).ids) == list(corpus["id"])
    # the job that failed resumes: its completed shards are kept, the failed one is done now
    done_before = len(list((tmp_path / "a").glob("shard-*")))
    r = encode_corpus(ddf, minilm_dir, tmp_path / "a", client, show_progress_bar=False)
    assert r.written == 4 - done_before and r.rows == 240
    assert np.array_equal(ShardedIndex(r.out).load(), ShardedIndex(s.out).load())


def test_worker_killed_mid_job(tmp_path, client, corpus, minilm_dir):
    marks = tmp_path / "marks"
    marks.mkdir()

    def die_once(df, partition_info=None):  # the worker process computing partition 1 dies, once
        if partition_info and partition_info["number"] == 1:
            mark = marks / "died"
            if not mark.exists():
                mark.write_text(str(os.getpid()))
                os._exit(1)
        return df

    ddf = dd.from_pandas(corpus, npartitions=4, sort=False).map_partitions(die_once, meta=corpus.iloc[:0])
    s = encode_corpus(ddf, minilm_dir, tmp_path / "idx", client, show_progress_bar=False)
    assert (marks / "died").exists()
    assert s.rows == 240 and s.written == 4
    ids = list(ShardedIndex(s.out).ids)
    assert ids == list(corpus["id"]) and len(set(ids)) == len(ids)
    client.wait_for_workers(2, timeout=60)


def test_bad_input_is_refused(tmp_path, client, corpus, minilm_dir, int8_dir):
    out = tmp_path / "idx"
    encode_corpus(corpus, minilm_dir, out, client, partition_rows=180, show_progress_bar=False)
    with pytest.raises(ShardError, match="another job"):  # another model into the same index
        encode_corpus(corpus, int8_dir, out, client, partition_rows=180, show_progress_bar=False)
    with pytest.raises(ShardError, match="another job"):  # another partitioning
        encode_corpus(corpus, minilm_dir, out, client, partition_rows=60, show_progress_bar=False)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    with pytest.raises(ShardError, match="holds no sharded index"):
        encode_corpus(corpus, minilm_dir, tmp_path / "notes", client, overwrite=True, show_progress_bar=False)
    assert (tmp_path / "notes" / "keep.txt").read_text() == "mine"
    bad = corpus.copy()
    bad.loc[bad.index[5], "text"] = None
    with pytest.raises(ShardError, match=r"id .*: text is \w+ \(.*\), expected str"):
        encode_corpus(bad, minilm_dir, tmp_path / "bad", client, retries=0, show_progress_bar=False)
    dup = pd.concat([corpus.iloc[:50], corpus.iloc[:1]])
    with pytest.raises(ShardError, match="duplicate ids"):
        encode_corpus(dup, minilm_dir, tmp_path / "dup", client, show_progress_bar=False)
    with pytest.raises(ShardError, match="not a sharded index"):
        ShardedIndex(tmp_path / "notes")


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, client, corpus, minilm_dir):
    out = tmp_path_factory.mktemp("sharded") / "idx"
    encode_corpus(corpus, minilm_dir, out, client, partition_rows=50, show_progress_bar=False)
    return ShardedIndex(out)


def _same_ranking(got, ref, float_scores: bool):
    """Equal results. Float32 matrix products of a shard and of the whole matrix may round a score differently in
    its last bit (BLAS blocks by matrix width), so there scores agree to 1e-6 and rows may differ only between
    scores that close; integer code scores and rescored lists are exact."""
    (gs, gi), (rs, ri) = got, ref
    if not float_scores:
        assert np.array_equal(gi, ri) and np.array_equal(gs, rs)
        return
    assert np.allclose(gs, rs, rtol=0, atol=1e-6)
    for row in np.nonzero((gi != ri).any(axis=1))[0]:
        j = int(np.argmax(gi[row] != ri[row]))
        assert abs(float(rs[row, j]) - float(rs[row, min(j + 1, rs.shape[1] - 1)])) <= 2e-6


@pytest.mark.parametrize("kind", ["float32", "int8", "binary"])
def test_sharded_search_equals_single_index(sharded, minilm, medquad_questions, client, kind):
    emb = sharded.load()
    q = minilm.encode_query(medquad_questions[:40])
    for mult in ((None,) if kind == "float32" else (None, 4)):
        if kind == "float32":
            ref = search(q, emb, k=20)
        else:
            ref = quantize_index(emb, kind).search(q, k=20, rescore_multiplier=mult,
                                                   float_corpus=emb if mult else None)
        got = sharded.search(q, k=20, kind=kind, rescore_multiplier=mult)
        _same_ranking(got, ref, kind == "float32")
    remote = sharded.search(q, k=20, kind=kind, client=client)
    local = sharded.search(q, k=20, kind=kind)
    # float32: the workers' BLAS (one thread) may round a product's last bit unlike this process's (two threads)
    _same_ranking(remote, local, kind == "float32")
    scores, ids = sharded.search(q[:3], k=5, kind=kind, return_ids=True)
    assert ids.shape == (3, 5) and set(ids.ravel()) <= set(sharded.ids)


def test_merge_keeps_the_tie_rule():
    from medquant.distributed import merge_topk

    # equal scores across shards: the lower global row comes first, as in a single index
    a = (np.array([[0.5, 0.5]], np.float32), np.array([[3, 7]]))
    b = (np.array([[0.9, 0.5]], np.float32), np.array([[10, 1]]))
    s, i = merge_topk([a, b], 3, 1)
    assert i.tolist() == [[10, 1, 3]] and s.tolist() == [[np.float32(0.9), 0.5, 0.5]]


def test_faiss_hnsw_recall_against_exact(tmp_path, client, medquad, minilm, minilm_dir):
    require("faiss")
    qs = medquad.drop_duplicates("question")
    docs = qs.iloc[:1200]
    queries = list(qs["question"].iloc[1200:1400])
    s = encode_corpus(pd.DataFrame({"id": docs["qa_id"], "text": docs["question"]}), minilm_dir, tmp_path / "idx",
                      client, partition_rows=300, show_progress_bar=False)
    index = ShardedIndex(s.out)
    q = minilm.encode_query(queries)
    hnsw = build_faiss_index(index, "hnsw", M=16, ef_search=64, threads=1, save=tmp_path / "hnsw.faiss")
    rep = hnsw.recall(q, index, k=10)
    # measured here: recall@10 = 0.998 (M=16, efSearch=64); the floor leaves room for other FAISS builds
    assert rep["recall@10"] >= 0.95 and rep["n_queries"] == 200
    from medquant.distributed import FaissIndex

    again = FaissIndex.load(tmp_path / "hnsw.faiss")
    assert np.array_equal(again.search(q, 10)[1], hnsw.search(q, 10)[1])
    ivf = build_faiss_index(index, "ivfpq", nlist=16, pq_m=48, nbits=6, train_size=1200, threads=1)
    rep_ivf = ivf.recall(q, index, k=10, nprobe=16)
    assert 0.4 <= rep_ivf["recall@10"] < 1.0  # measured 0.64: 6-bit product quantization loses part of the top-10
    with pytest.raises(ValueError, match="divide"):
        build_faiss_index(index, "ivfpq", pq_m=7)


def test_import_medquant_does_not_import_dask():
    code = ("import sys, medquant; "
            "print(sorted(m for m in ('dask', 'distributed', 'faiss', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


@pytest.mark.filterwarnings("ignore::medquant.eval.runinfo.ThroughputWarning")
def test_evaluate_on_a_sharded_corpus(tmp_path, client, minilm):
    from medquant.eval.datasets import RetrievalDataset, ShardedCorpus, medquad_retrieval

    ds = medquad_retrieval("test", limit=24)
    rows = pd.DataFrame({"id": list(ds.corpus), "text": list(ds.corpus.values())})
    sharded = RetrievalDataset(name=ds.name, corpus=ShardedCorpus(rows, tmp_path / "work", client=client,
                                                                  partition_rows=40),
                               queries=ds.queries, qrels=ds.qrels)
    assert sharded.doc_ids == ds.doc_ids and sharded.describe()["n_docs"] == len(ds.corpus)
    calib = list(medquad_retrieval("dev", limit=32).queries.values())
    kw = dict(model=minilm, calibration_texts=calib, index_kinds=("int8",), measure_disk=False, warmup=False,
              max_length=64)
    mem = medquant.evaluate(["int8-static-asym"], ds, **kw)
    shd = medquant.evaluate(["int8-static-asym"], sharded, **kw)
    assert list(shd["scheme"]) == list(mem["scheme"])
    for col in ("nDCG@10", "MRR@10", "R@100", "nDCG@10_delta", "overlap@10", "emb_cosine", "index_bytes"):
        assert np.allclose(shd[col].astype(float), mem[col].astype(float), atol=1e-6, equal_nan=True), col
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == ["fp32", "int8-static-asym"]
    again = medquant.evaluate(["int8-static-asym"], sharded, **kw)  # the indexes are reused, not re-encoded
    assert np.array_equal(again["nDCG@10"], shd["nDCG@10"]) and again["corpus_texts_per_s"].isna().all()
    with pytest.raises(ValueError, match="passages"):
        medquant.evaluate([], sharded, passages=True, **kw)
