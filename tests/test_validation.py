"""Validation gaps (issue 10, class 7): bad input gets a clear Python exception naming what is wrong - never a crash,
a hang, a raw traceback from deep inside, or a silent change of what the user gave.

One section per kind of gap: numeric arguments, encode_to's ``out``, arrays of any layout, BEIR qrels naming unknown
ids, malformed dataset files, non-regular files (FIFOs, devices, directories), tokenizer files that make the Rust
`tokenizers` library panic, and a sweep of the rest of the public API. Everything runs on a tiny random BERT.
"""
from __future__ import annotations

import copy
import gzip
import json
import os
import socket
import tempfile
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest

import medquant
from medquant import CheckpointError
from medquant.eval.datasets import DatasetError, load_beir, load_trec_qrels
from medquant.eval.evaluate import EvalConfig
from medquant.eval.metrics import check_ks, evaluate_run
from medquant.eval.retrieval import (
    quantize_index, read_trec_run, run_from_search, search, search_passages, write_trec_run,
)
from medquant.eval.stats import paired_comparison
from medquant.model.checkpoint import load_tokenizer, tokenizer_call
from tiny_bert import write_tiny_bert

TEXTS = ["what causes glaucoma?", "heart disease", "blood pressure and diabetes risk", "cancer"]


# ---------------------------------------------------------------------------------------------------- fixtures
# tiny_dir, tiny, tiny_int8: tests/conftest.py
@pytest.fixture(scope="module")
def minilm_tokenizer_json(minilm_dir):
    return json.loads((minilm_dir / "tokenizer.json").read_text(encoding="utf-8"))


def finishes(fn, fifos=(), timeout=20.0):
    """Runs fn in a thread and returns the exception it raised (None if none); fails if it is still running after
    ``timeout`` seconds (a read blocked on a FIFO), after unblocking it by opening the FIFOs for writing."""
    box = {}

    def run():
        try:
            fn()
        except BaseException as e:  # noqa: B902 - the test inspects whatever came out
            box["exc"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    hung = t.is_alive()
    if hung:
        for f in fifos:  # give a blocked reader a writer that closes at once: it reads EOF and returns
            try:
                os.close(os.open(f, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass
        t.join(5)
    assert not hung, f"{fn} blocked (still running after {timeout} s)"
    return box.get("exc")


def unaligned(a: np.ndarray) -> np.ndarray:
    """A copy of ``a`` in a buffer at an odd byte offset: same values, misaligned, C-contiguous."""
    buf = np.zeros(a.nbytes + 1, np.uint8)
    out = np.frombuffer(buf.data, dtype=a.dtype, count=a.size, offset=1).reshape(a.shape)
    out[...] = a
    assert not out.flags.aligned and out.flags.c_contiguous
    return out


def read_only(a: np.ndarray) -> np.ndarray:
    out = a.copy()
    out.flags.writeable = False
    return out


def strided(a: np.ndarray) -> np.ndarray:
    """Same values, every other column of a twice-as-wide array (not contiguous)."""
    wide = np.zeros((a.shape[0], 2 * a.shape[1]), a.dtype)
    wide[:, ::2] = a
    return wide[:, ::2]


LAYOUTS = {
    "unaligned": unaligned, "read-only": read_only, "strided": strided, "fortran": np.asfortranarray,
    "big-endian": lambda a: a.astype(a.dtype.newbyteorder(">")),
    "bytes-buffer": lambda a: np.frombuffer(b"\0" + a.tobytes(), dtype=a.dtype, offset=1).reshape(a.shape),
}


# ---------------------------------------------------------------------------------------------------- 1. numeric args
BAD_COUNTS = [0, -1, 2.5, True, "4", None, np.float64(3.0)]


@pytest.mark.parametrize("bad", BAD_COUNTS, ids=repr)
def test_counts_are_positive_ints_everywhere(tiny, tiny_int8, bad):
    calls = {
        "calibrate": lambda: tiny.calibrate(TEXTS, batch_size=bad),
        "calibrate nbins": lambda: tiny.calibrate(TEXTS, nbins=bad),
        "encode": lambda: tiny.encode(TEXTS, batch_size=bad),
        "encode_to": lambda: tiny.encode_to(iter(TEXTS), np.empty((4, tiny.hidden_size), np.float32), chunk_size=bad),
        "encode_to batch_size": lambda: tiny.encode_to(TEXTS, np.empty((4, tiny.hidden_size), np.float32),
                                                       batch_size=bad),
        "quantize": lambda: tiny.quantize("int8-dynamic", batch_size=bad),  # no calibration: was ignored
        "quantize static": lambda: tiny.quantize("int8-static-asym", calibration_texts=TEXTS, batch_size=bad),
        "quant_report": lambda: tiny_int8.quant_report(TEXTS, batch_size=bad),
        "batches": lambda: list(tiny.batches(TEXTS, batch_size=bad)),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError, match="(batch_size|chunk_size|nbins) must be a positive int") as ei:
            call()
        assert repr(bad) in str(ei.value), name


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(method="bogus"), ValueError, "method must be one of"),
    (dict(method=None), ValueError, "method must be one of"),
    (dict(momentum=1.0), ValueError, r"momentum must be in \[0, 1\)"),
    (dict(momentum=float("nan")), ValueError, "momentum"),
    (dict(momentum="0.9"), TypeError, "momentum must be a real number"),
    (dict(percentile=0), ValueError, r"percentile must be in \(0, 100\]"),
    (dict(percentile=100.5), ValueError, "percentile"),
    (dict(percentile=float("inf")), ValueError, "percentile"),
    (dict(max_length=1), ValueError, "max_length"),
    (dict(max_length=10**6), ValueError, "max_length"),
])
def test_calibrate_checks_its_settings_before_running(tiny, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        tiny.calibrate(TEXTS, **kwargs)


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(normalize="no"), TypeError, "normalize must be True or False"),
    (dict(normalize_embeddings="yes"), TypeError, "normalize_embeddings"),
    (dict(normalize=True, normalize_embeddings=False), ValueError, "disagree"),
    (dict(precision="int4"), ValueError, "precision must be one of"),
    (dict(output_value="all"), ValueError, "output_value"),
    (dict(device="cuda"), ValueError, "CPU"),
    (dict(prompt_name="query"), ValueError, "prompt_name 'query' is not one of"),
    (dict(prompt="q: ", prompt_name="query"), ValueError, "not both"),
    (dict(normalize=2), TypeError, "normalize"),
    (dict(pooling="sum"), ValueError, "pooling must be one of"),
    (dict(pooling=["mean"]), ValueError, "pooling must be one of"),
    (dict(max_length=0), ValueError, "max_length"),
])
def test_encode_settings(tiny, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        tiny.encode(TEXTS, **kwargs)


def test_valid_settings_still_work(tiny):
    a = tiny.encode(TEXTS, batch_size=np.int64(2), normalize=np.bool_(True))
    b = tiny.encode(TEXTS, batch_size=3, normalize=1)
    assert np.array_equal(a, b)
    cal = tiny.calibrate(TEXTS, method="percentile", percentile=100, momentum=0, nbins=64, batch_size=1)
    assert cal.n_texts == len(TEXTS)


# ---------------------------------------------------------------------------------------------------- 2. encode_to out
def test_encode_to_checks_out_before_encoding(tiny, tmp_path):
    H = tiny.hidden_size
    ro = np.lib.format.open_memmap(tmp_path / "ro.npy", mode="w+", dtype=np.float32, shape=(4, H))
    del ro
    ro = np.load(tmp_path / "ro.npy", mmap_mode="r")
    cases = [
        (np.empty((4, H - 1), np.float32), ValueError, rf"out must have shape \(n, {H}\)"),
        (np.empty((4, H + 1), np.float32), ValueError, "out must have shape"),
        (np.empty(4 * H, np.float32), ValueError, "out must have shape"),
        (np.empty((4, H, 1), np.float32), ValueError, "out must have shape"),
        (np.empty((4, H), np.int32), TypeError, "out must hold floats"),
        (np.empty((4, H), np.uint8), TypeError, "out must hold floats"),
        (np.empty((4, H), np.complex64), TypeError, "out must hold floats"),
        (read_only(np.zeros((4, H), np.float32)), ValueError, "read-only"),
        (ro, ValueError, "read-only"),
        ([[0.0] * H] * 4, TypeError, "writable array-like with a shape"),
        (None, TypeError, "writable array-like"),
    ]
    for out, exc, match in cases:
        consumed = []

        def gen():
            for t in TEXTS:
                consumed.append(t)
                yield t

        with pytest.raises(exc, match=match):
            tiny.encode_to(gen(), out)
        assert consumed == [], "out was checked only after texts were consumed"
    for texts in ("a single string", b"bytes", None):
        with pytest.raises(TypeError, match="single string"):
            tiny.encode_to(texts, np.empty((20, H), np.float32))


@pytest.mark.parametrize("chunk_size", [1, 3, 4, 100])
def test_encode_to_too_few_rows_keeps_what_fits(tiny, chunk_size):
    texts = [f"{t} {i}" for i, t in enumerate(TEXTS * 3)]  # 12 texts
    ref = tiny.encode(texts)
    out = np.full((5, tiny.hidden_size), np.nan, np.float32)
    with pytest.raises(ValueError, match="out has 5 rows but more texts were given: rows 0..4 hold the first 5"):
        tiny.encode_to(iter(texts), out, chunk_size=chunk_size)
    assert np.abs(out - ref[:5]).max() <= 1e-5  # every row it has was filled, none lost
    exact = np.empty((12, tiny.hidden_size), np.float32)
    assert tiny.encode_to(iter(texts), exact, chunk_size=chunk_size) == 12
    assert np.abs(exact - ref).max() <= 1e-5
    bigger = np.zeros((20, tiny.hidden_size), np.float64)  # more rows than texts and float64: fine
    assert tiny.encode_to(texts, bigger, chunk_size=chunk_size) == 12
    assert not bigger[12:].any()


# ---------------------------------------------------------------------------------------------------- 3. array layouts
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("which", ["input_ids", "attention_mask", "token_type_ids"])
def test_forward_accepts_any_layout_and_never_modifies_it(tiny, layout, which):
    ids, mask, tt = tiny.tokenize(TEXTS)
    ref = tiny.forward(ids, mask, tt)
    args = {"input_ids": ids, "attention_mask": mask, "token_type_ids": tt}
    arg = LAYOUTS[layout](args[which])
    before = np.array(arg, copy=True)
    args[which] = arg
    got = tiny.forward(args["input_ids"], args["attention_mask"], args["token_type_ids"])
    assert np.array_equal(got, ref)
    assert np.array_equal(arg, before) and arg.dtype == before.dtype  # the caller's array is untouched


@pytest.mark.parametrize("dtype", [np.int64, np.int16, np.uint8, np.uint32, ">i8", "<i2"])
def test_forward_converts_other_integer_dtypes(tiny, dtype):
    ids, mask, tt = tiny.tokenize(TEXTS)
    ref = tiny.forward(ids, mask, tt)
    assert np.array_equal(tiny.forward(ids.astype(dtype), mask.astype(dtype), tt.astype(dtype)), ref)


@pytest.mark.parametrize("bad, exc, match", [
    ([[1, 2], [3]], TypeError, "2-D array of token ids"),
    (np.zeros((2, 3), np.float32), TypeError, "must hold integers"),
    (np.array([["a", "b"]]), TypeError, "must hold integers"),
    (np.zeros(3, np.int32), ValueError, "2-D"),
    (np.full((1, 3), 2**40, np.int64), ValueError, "int32 range"),
])
def test_forward_bad_arrays(tiny, bad, exc, match):
    with pytest.raises(exc, match=match):
        tiny.forward(bad)


def test_binding_alignment_advice_works(tiny):
    """The core binding refuses a misaligned array; the fix its message gives must make the call succeed
    (numpy.ascontiguousarray, the old advice, hands the same misaligned array back)."""
    ids, mask, _ = tiny.tokenize(TEXTS)
    bad = unaligned(ids)
    assert not np.ascontiguousarray(bad).flags.aligned  # why the old advice did not work
    with pytest.raises(ValueError, match=r"aligned.*numpy\.require\(a, requirements='CA'\) or a\.copy\(\)"):
        tiny._core.forward(bad, mask, None, hidden=True)
    good_require = tiny._core.forward(np.require(bad, requirements="CA"), mask, None, hidden=True)[0]
    good_copy = tiny._core.forward(bad.copy(), mask, None, hidden=True)[0]
    assert np.array_equal(good_require, tiny.forward(ids, mask)) and np.array_equal(good_copy, good_require)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_retrieval_accepts_any_layout(layout):
    rng = np.random.default_rng(0)
    q, c = rng.standard_normal((5, 8)).astype(np.float32), rng.standard_normal((30, 8)).astype(np.float32)
    q_in, c_in = LAYOUTS[layout](q), LAYOUTS[layout](c)
    q_before, c_before = np.array(q_in, copy=True), np.array(c_in, copy=True)
    ref_s, ref_i = search(q, c, k=7)
    s, i = search(q_in, c_in, k=7)
    assert np.array_equal(i, ref_i) and np.allclose(s, ref_s)
    doc = np.arange(30) // 3
    assert np.array_equal(search_passages(q_in, c_in, LAYOUTS[layout](doc[None])[0], k=4)[1],
                          search_passages(q, c, doc, k=4)[1])
    for kind in ("int8", "binary"):
        ref_idx = quantize_index(c, kind)
        idx = quantize_index(c_in, kind)
        assert np.array_equal(idx.codes, ref_idx.codes)
        assert np.array_equal(idx.search(q_in, k=5)[1], ref_idx.search(q, k=5)[1])
        assert np.array_equal(idx.search(q_in, k=5, rescore_multiplier=2, float_corpus=c_in)[1],
                              ref_idx.search(q, k=5, rescore_multiplier=2, float_corpus=c)[1])
    assert np.array_equal(q_in, q_before) and np.array_equal(c_in, c_before)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_retrieval_refuses_non_finite_embeddings(value):
    rng = np.random.default_rng(0)
    q, c = rng.standard_normal((3, 8)).astype(np.float32), rng.standard_normal((20, 8)).astype(np.float32)
    bad_c = c.copy()
    bad_c[7, 2] = value
    bad_q = q.copy()
    bad_q[1, 0] = value
    with pytest.raises(ValueError, match="corpus_emb has NaN or infinite values in 1 rows \\(e.g. row 7\\)"):
        search(q, bad_c)
    with pytest.raises(ValueError, match="query_emb has NaN or infinite"):
        search(bad_q, c, normalize=False)
    with pytest.raises(ValueError, match="NaN or infinite"):
        quantize_index(bad_c)
    with pytest.raises(ValueError, match="NaN or infinite"):
        quantize_index(c).search(bad_q)
    with pytest.raises(ValueError, match="NaN or infinite"):
        search_passages(q, bad_c, np.arange(20))
    with pytest.raises(ValueError, match="NaN or infinite"):
        quantize_index(c, ranges=np.array([[-1.0] * 8, [value] * 8]))


def test_retrieval_refuses_non_numeric_arrays():
    c = np.random.default_rng(0).standard_normal((20, 8)).astype(np.float32)
    for bad in (np.array([["a"] * 8] * 3), np.zeros((3, 8), np.complex64), np.zeros((3, 8), object),
                [[1.0, 2.0], [3.0]]):
        with pytest.raises(TypeError):
            search(bad, c)
    with pytest.raises(TypeError, match="passage_doc_index must hold integer"):
        search_passages(c[:2], c, np.arange(20) + 0.5)  # fractions were silently truncated
    with pytest.raises(ValueError, match="min > max"):
        quantize_index(c, ranges=np.array([[1.0] * 8, [-1.0] * 8]))


# ---------------------------------------------------------------------------------------------------- 4. BEIR unknown ids
def write_beir(root: Path, corpus=None, queries=None, qrels="q1\td1\t1\n", split="test") -> Path:
    d = root / "beir"
    (d / "qrels").mkdir(parents=True, exist_ok=True)
    corpus = corpus if corpus is not None else [
        json.dumps({"_id": "d1", "title": "Asthma", "text": "Asthma is a disease."}),
        json.dumps({"_id": "d2", "text": "Diabetes affects blood sugar."})]
    queries = queries if queries is not None else [json.dumps({"_id": "q1", "text": "what is asthma"}),
                                                   json.dumps({"_id": "q2", "text": "sugar"})]
    (d / "corpus.jsonl").write_text("\n".join(corpus) + "\n", encoding="utf-8")
    (d / "queries.jsonl").write_text("\n".join(queries) + "\n", encoding="utf-8")
    (d / "qrels" / f"{split}.tsv").write_text("query-id\tcorpus-id\tscore\n" + qrels, encoding="utf-8")
    return d


def test_qrels_naming_unknown_documents_warn_and_count_like_pytrec_eval(tmp_path):
    pytrec_eval = pytest.importorskip("pytrec_eval")
    d = write_beir(tmp_path, qrels="q1\td1\t1\nq1\tgone1\t2\nq1\tgone2\t0\nq2\td2\t1\nq2\tgone1\t1\n")
    with pytest.warns(UserWarning, match=r"3 judgements \(2 relevant\) of 2 queries name 2 documents not in "
                                         r"corpus.jsonl \(e.g. 'gone1', 'gone2'\); they are kept"):
        ds = load_beir(d)
    assert ds.qrels == {"q1": {"d1": 1, "gone1": 2, "gone2": 0}, "q2": {"d2": 1, "gone1": 1}}  # nothing dropped
    run = {"q1": {"d1": 1.0, "d2": 0.5}, "q2": {"d2": 1.0, "d1": 0.5}}
    ours = evaluate_run(ds.qrels, run, ks=(1, 10))
    assert list(ours["num_rel"]) == [2, 2]  # the unretrievable relevant documents stay in the denominator
    assert ours.loc["q1", "R@10"] == 0.5 and ours.loc["q2", "R@10"] == 0.5
    ref = pytrec_eval.RelevanceEvaluator(ds.qrels, {"recall_10"}).evaluate(run)
    assert ref["q1"]["recall_10"] == 0.5 and ref["q2"]["recall_10"] == 0.5


def test_qrels_naming_unknown_queries_warn_with_counts(tmp_path):
    d = write_beir(tmp_path, qrels="q1\td1\t1\nq9\td1\t1\nq9\td2\t1\nq8\td2\t0\n")
    with pytest.warns(UserWarning, match=r"2 queries \(3 judgements\) have no text in queries.jsonl and are "
                                         r"dropped \(e.g. 'q9', 'q8'\)"):
        ds = load_beir(d)
    assert ds.qrels == {"q1": {"d1": 1}} and list(ds.queries) == ["q1"]


def test_consistent_beir_loads_without_warnings(tmp_path):
    d = write_beir(tmp_path, qrels="q1\td1\t1\nq2\td2\t0\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = load_beir(d)
    assert ds.corpus["d1"] == "Asthma Asthma is a disease."


# ---------------------------------------------------------------------------------------------------- 5. malformed files
@pytest.mark.parametrize("line, match", [
    ("{not json", "invalid JSON"),
    ('["d3", "text"]', "expected a JSON object per line, got list"),
    ('"just a string"', "got str"),
    ("42", "got int"),
    ('{"text": "no id"}', "no '_id' field"),
    ('{"_id": "d3"}', "no 'text' string"),
    ('{"_id": "d3", "text": null}', "no 'text' string"),
    ('{"_id": "d3", "text": 17}', "'text' must be a string, got int"),
    ('{"_id": "d3", "text": ["a"]}', "'text' must be a string, got list"),
    ('{"_id": 3.5, "text": "x"}', "'_id' must be a string \\(or an integer\\), got float"),
    ('{"_id": true, "text": "x"}', "got bool"),
    ('{"_id": null, "text": "x"}', "got NoneType"),
    ('{"_id": "", "text": "x"}', "'_id' is empty"),
    ('{"_id": " d3", "text": "x"}', "whitespace"),
    ('{"_id": "d1", "text": "again"}', "document id 'd1' repeats line 1"),
    ('{"_id": "d3", "title": ["t"], "text": "x"}', "'title' must be a string, got list"),
    ('{"_id": "d3", "title": true, "text": "x"}', "'title' must be a string, got bool"),
])
def test_malformed_corpus_lines_name_file_and_line(tmp_path, line, match):
    d = write_beir(tmp_path, corpus=[json.dumps({"_id": "d1", "text": "a"}), "", line])
    with pytest.raises(DatasetError, match=rf"corpus.jsonl:3: .*{match}"):
        load_beir(d)


@pytest.mark.parametrize("line, match", [
    ("[1]", "expected a JSON object"), ('{"_id": "q3"}', "no 'text' string"), ('{"_id": "q1", "text": "x"}',
                                                                             "query id 'q1' repeats line 1"),
    ('{"_id": {"a": 1}, "text": "x"}', "got dict"), ('{"_id": "q3", "text": 1.5}', "'text' must be a string"),
])
def test_malformed_query_lines_name_file_and_line(tmp_path, line, match):
    d = write_beir(tmp_path, queries=[json.dumps({"_id": "q1", "text": "a"}), line])
    with pytest.raises(DatasetError, match=rf"queries.jsonl:2: .*{match}"):
        load_beir(d)


def test_numeric_ids_and_titles_become_strings_consistently(tmp_path):
    d = write_beir(tmp_path, corpus=[json.dumps({"_id": 5, "title": 123, "text": "five"}),
                                     json.dumps({"_id": "6", "title": 1.5, "text": "six"}),
                                     json.dumps({"_id": 7, "title": None, "text": ""})],
                   queries=[json.dumps({"_id": 1, "text": "q one"})], qrels="1\t5\t1\n1\t6\t0\n1\t7\t1\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the int ids match the qrels' "5", "1": no unknown-id warning
        ds = load_beir(d)
    assert ds.corpus == {"5": "123 five", "6": "1.5 six", "7": ""}
    assert ds.queries == {"1": "q one"} and ds.qrels == {"1": {"5": 1, "6": 0, "7": 1}}
    dup = write_beir(tmp_path / "dup", corpus=[json.dumps({"_id": 5, "text": "a"}), json.dumps({"_id": "5", "text": "b"})])
    with pytest.raises(DatasetError, match="corpus.jsonl:2: document id '5' repeats line 1"):
        load_beir(dup)


@pytest.mark.parametrize("grade, match", [
    ("inf", "not finite"), ("-inf", "not finite"), ("nan", "not finite"), ("NaN", "not finite"),
    ("1.5", "not an integer"), ("-1", "negative"), ("high", "not a number"), ("", "expected|not a number"),
    ("1e40", "out of range"), ("2147483648", "out of range"),
])
def test_bad_beir_grades_name_file_and_line(tmp_path, grade, match):
    d = write_beir(tmp_path, qrels=f"q1\td1\t1\nq2\td2\t{grade}\n")
    with pytest.raises(DatasetError, match=rf"test.tsv:3: .*({match})"):
        load_beir(d)


@pytest.mark.parametrize("grade, match", [("inf", "not finite"), ("nan", "not finite"), ("0.5", "not an integer"),
                                          ("9e99", "out of range"), ("x", "not a number")])
def test_bad_trec_grades_name_file_and_line(tmp_path, grade, match):
    p = tmp_path / "qrels.txt"
    p.write_text(f"1 0 a 1\n\n1 0 b {grade}\n", encoding="utf-8")
    with pytest.raises(DatasetError, match=rf"qrels.txt:3: relevance grade .*{match}"):
        load_trec_qrels(p)
    p.write_text("1 0 a -1\n1 0 b 2.0\n", encoding="utf-8")
    assert load_trec_qrels(p) == {"1": {"a": -1, "b": 2}}  # TREC keeps negative grades (non-relevant)


def test_undecodable_and_truncated_files(tmp_path):
    d = write_beir(tmp_path)
    (d / "corpus.jsonl").write_bytes(b'{"_id": "d1", "text": "ok"}\n{"_id": "d2", "text": "\xff\xfe"}\n')
    with pytest.raises(DatasetError, match="corpus.jsonl:2: not valid UTF-8"):
        load_beir(d)
    (d / "corpus.jsonl").unlink()
    raw = gzip.compress(b"".join(json.dumps({"_id": f"d{i}", "text": "x" * 50}).encode() + b"\n" for i in range(200)))
    (d / "corpus.jsonl.gz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DatasetError, match="corrupt or truncated gzip"):
        load_beir(d)
    (d / "qrels" / "test.tsv").write_bytes(b"q1\td1\t1\n\xc3\n")
    (d / "corpus.jsonl.gz").write_bytes(raw)
    with pytest.raises(DatasetError, match="test.tsv:2: not valid UTF-8"):
        load_beir(d)


def test_beir_argument_checks(tmp_path):
    d = write_beir(tmp_path)
    for split in ("../test", "", None):
        with pytest.raises(ValueError, match="split must be the name of a qrels file"):
            load_beir(d, split=split)
    with pytest.raises(TypeError, match="title_sep"):
        load_beir(d, title_sep=None)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_beir(d / "corpus.jsonl")


# ---------------------------------------------------------------------------------------------------- 6. non-regular files
def _fifo(path: Path) -> Path:
    if path.exists():
        path.unlink()
    os.mkfifo(path)
    return path


@pytest.mark.parametrize("name", ["config.json", "tokenizer.json", "vocab.txt", "model.safetensors",
                                  "tokenizer_config.json", "sentence_bert_config.json"])
def test_model_file_as_fifo_is_refused_not_waited_for(tiny_dir, minilm_dir, tmp_path, name):
    import shutil

    d = tmp_path / "model"
    shutil.copytree(tiny_dir, d)
    if name == "tokenizer.json":
        shutil.copyfile(minilm_dir / "tokenizer.json", d / "tokenizer.json")
    f = _fifo(d / name)
    exc = finishes(lambda: medquant.Encoder.from_pretrained(d, n_threads=1), fifos=[f])
    assert isinstance(exc, CheckpointError), repr(exc)
    assert "FIFO" in str(exc) and name in str(exc)


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="no /dev/zero")
def test_model_file_as_device_directory_or_socket(tiny_dir, tmp_path):
    import shutil

    d = tmp_path / "model"
    shutil.copytree(tiny_dir, d)
    (d / "vocab.txt").unlink()
    (d / "vocab.txt").symlink_to("/dev/zero")  # endless data: would never finish reading
    exc = finishes(lambda: load_tokenizer(d))
    assert isinstance(exc, CheckpointError) and "a device" in str(exc)
    (d / "vocab.txt").unlink()
    (d / "vocab.txt").mkdir()
    with pytest.raises(CheckpointError, match="vocab.txt .* is a directory"):
        load_tokenizer(d)
    (d / "config.json").unlink()
    (d / "config.json").mkdir()
    with pytest.raises(CheckpointError, match="config.json .* is a directory"):
        medquant.Encoder.from_pretrained(d)
    short = Path(tempfile.mkdtemp(prefix="mq"))  # AF_UNIX paths are limited to ~107 bytes
    try:
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(short / "tokenizer.json"))
        with pytest.raises(CheckpointError, match="a socket"):
            load_tokenizer(short)
        sock.close()
    finally:
        shutil.rmtree(short, ignore_errors=True)


def test_oversized_config_is_refused_before_reading(tiny_dir, tmp_path):
    import shutil

    d = tmp_path / "model"
    shutil.copytree(tiny_dir, d)
    with open(d / "config.json", "r+b") as f:
        f.truncate(64 << 20)  # sparse: costs no disk
    with pytest.raises(CheckpointError, match="config.json .* bytes, more than"):
        medquant.Encoder.from_pretrained(d)


@pytest.mark.parametrize("name", ["corpus.jsonl", "queries.jsonl", "qrels/test.tsv"])
def test_dataset_file_as_fifo_is_refused(tmp_path, name):
    d = write_beir(tmp_path)
    f = _fifo(d / name)
    exc = finishes(lambda: load_beir(d), fifos=[f])
    assert isinstance(exc, DatasetError) and "FIFO" in str(exc) and name.split("/")[-1] in str(exc), repr(exc)


def test_other_dataset_readers_refuse_fifos_and_directories(tmp_path):
    from medquant.eval.datasets import load_medquad

    f = _fifo(tmp_path / "qrels.txt")
    exc = finishes(lambda: load_trec_qrels(f), fifos=[f])
    assert isinstance(exc, DatasetError) and "FIFO" in str(exc)
    r = _fifo(tmp_path / "run.txt")
    exc = finishes(lambda: read_trec_run(r), fifos=[r])
    assert isinstance(exc, ValueError) and "FIFO" in str(exc)
    sub = tmp_path / "mq" / "1_CancerGov_QA"
    sub.mkdir(parents=True)
    x = _fifo(sub / "0000001.xml")
    exc = finishes(lambda: load_medquad(tmp_path / "mq"), fifos=[x])
    assert isinstance(exc, DatasetError) and "FIFO" in str(exc)
    d = write_beir(tmp_path / "b")
    (d / "queries.jsonl").unlink()
    (d / "queries.jsonl").mkdir()
    with pytest.raises(DatasetError, match="is a directory"):
        load_beir(d)


# ---------------------------------------------------------------------------------------------------- 7. tokenizer panics
def _panic_at_load(tok):  # a Precompiled normalizer whose charsmap does not parse: panics in Tokenizer.from_file
    tok["normalizer"] = {"type": "Precompiled", "precompiled_charsmap": "AAAA"}


def _panic_at_encode(tok):  # a single-sequence template naming sequence B: loads, then panics on every encode
    tok["post_processor"] = {"type": "TemplateProcessing", "single": [{"Sequence": {"id": "B", "type_id": 0}}],
                             "pair": [{"Sequence": {"id": "A", "type_id": 0}}], "special_tokens": {}}


@pytest.mark.parametrize("mutate", [_panic_at_load, _panic_at_encode])
def test_tokenizer_panics_become_checkpoint_errors(tiny_dir, minilm_tokenizer_json, tmp_path, mutate):
    import shutil

    tok = copy.deepcopy(minilm_tokenizer_json)
    mutate(tok)
    d = tmp_path / "model"
    shutil.copytree(tiny_dir, d)
    (d / "tokenizer.json").write_text(json.dumps(tok), encoding="utf-8")
    with pytest.raises(CheckpointError, match=r"tokenizer.json crashed inside the tokenizers library \(Rust panic"):
        load_tokenizer(d)
    with pytest.raises(CheckpointError, match="Rust panic"):
        medquant.Encoder.from_pretrained(d, n_threads=1)


def test_tokenizer_call_converts_only_panics(minilm_tokenizer_json):
    from tokenizers import Tokenizer

    tok = copy.deepcopy(minilm_tokenizer_json)
    _panic_at_encode(tok)
    t = Tokenizer.from_str(json.dumps(tok))
    with pytest.raises(BaseException) as ei:  # what tokenizers itself raises: not an Exception
        t.encode("x")
    panic = type(ei.value)
    assert panic.__name__ == "PanicException" and not issubclass(panic, Exception)
    with pytest.raises(CheckpointError, match="my tokenizer crashed"):
        tokenizer_call(t.encode_batch, ["x"], what="my tokenizer")

    def raising(exc):
        raise exc

    for exc in (KeyboardInterrupt(), SystemExit(3), ValueError("plain"), MemoryError()):
        with pytest.raises(type(exc)):
            tokenizer_call(raising, exc)
    assert tokenizer_call(lambda a, b=0: a + b, 1, b=2) == 3


@pytest.mark.parametrize("content, match", [
    (b"", "is empty"), (b"\n \n\t\n", "is empty"), (b"\x00\x01\x02\x03" * 64, "NUL bytes"),
    (b"\xff\xfe\x00a", "not valid UTF-8"), (b"x" * 2_000_000 + b"\n", "could not be loaded"),
    (b"[PAD]\n[UNK]\nfoo\n", "could not be loaded"),  # no [CLS] / [SEP]
])
def test_hostile_vocab_txt(tmp_path, content, match):
    (tmp_path / "vocab.txt").write_bytes(content)
    with pytest.raises(CheckpointError, match=match):
        load_tokenizer(tmp_path)


def test_hostile_tokenizer_json_files(tmp_path, minilm_tokenizer_json):
    for content, match in ((b"", "corrupt"), (b"[]", "corrupt"), (b"\x00" * 100, "corrupt"),
                           (json.dumps({"model": {"type": "WordPiece"}}).encode(), "corrupt"),
                           (b"[" * 100_000, "corrupt")):
        (tmp_path / "tokenizer.json").write_bytes(content)
        with pytest.raises(CheckpointError, match=match):
            load_tokenizer(tmp_path)


# ---------------------------------------------------------------------------------------------------- 8. sweep
@pytest.mark.parametrize("ks, exc", [(10, TypeError), ("10", TypeError), ((), ValueError), ((0, 10), ValueError),
                                     ((1.5,), ValueError), ((True,), ValueError), ((-5,), ValueError),
                                     (("10",), ValueError)])
def test_metric_cutoffs(ks, exc):
    with pytest.raises(exc, match="ks"):
        check_ks(ks)
    with pytest.raises(exc):
        evaluate_run({"q": {"a": 1}}, {"q": {"a": 1.0}}, ks=ks)


def test_metric_relevance_level_is_not_rounded():
    for level in (1.5, 0, True, "1"):
        with pytest.raises(ValueError, match="relevance_level must be a positive int"):
            evaluate_run({"q": {"a": 1}}, {"q": {"a": 1.0}}, relevance_level=level)


@pytest.mark.parametrize("kwargs", [dict(k=0), dict(k=-3), dict(k=2.5), dict(k=True), dict(block_size=0),
                                    dict(block_size=1.5), dict(query_block_size=0), dict(query_block_size=-1)])
def test_search_counts(kwargs):
    rng = np.random.default_rng(0)
    q, c = rng.standard_normal((3, 8)), rng.standard_normal((10, 8))
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=f"{name} must be a positive int"):
        search(q, c, **kwargs)
    with pytest.raises(ValueError, match=f"{name} must be a positive int"):
        quantize_index(c).search(q, **kwargs)
    with pytest.raises(ValueError, match=f"{name} must be a positive int"):
        search_passages(q, c, np.arange(10), **{"query_block_size": 4, **kwargs})
    for bad in (0, 1.5, -2):
        with pytest.raises(ValueError, match="rescore_multiplier must be a positive int"):
            quantize_index(c).search(q, rescore_multiplier=bad, float_corpus=c)
    with pytest.raises(ValueError, match="n_docs must be a non-negative int"):
        search_passages(q, c, np.arange(10), n_docs=10.5)


def test_run_files(tmp_path):
    with pytest.raises(ValueError, match="tag must be a non-empty string without whitespace"):
        write_trec_run({"q": {"d": 1.0}}, tmp_path / "r.txt", tag="my run")
    with pytest.raises(ValueError, match="cannot be empty or hold whitespace"):
        write_trec_run({"q 1": {"d": 1.0}}, tmp_path / "r.txt")
    with pytest.raises(ValueError, match="cannot be empty or hold whitespace"):
        write_trec_run({"q": {"d\t2": 1.0}}, tmp_path / "r.txt")
    assert not (tmp_path / "r.txt").exists()  # nothing half-written
    p = tmp_path / "run.txt"
    for score, match in (("high", "not a number"), ("nan", "not finite"), ("inf", "not finite")):
        p.write_text(f"q Q0 d1 1 0.5 t\nq Q0 d2 2 {score} t\n", encoding="utf-8")
        with pytest.raises(ValueError, match=f"run.txt:2: score .*{match}"):
            read_trec_run(p)
    with pytest.raises(ValueError, match=r"indices must be in \[0, 2\)"):
        run_from_search(np.ones((1, 2)), np.array([[0, 5]]), ["q"], ["a", "b"])
    with pytest.raises(TypeError, match="integer row indices"):
        run_from_search(np.ones((1, 2)), np.array([[0.0, 1.0]]), ["q"], ["a", "b"])


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(k=100.5), ValueError, "k must be a positive int"), (dict(confidence=1.0), ValueError, "confidence"),
    (dict(confidence=0), ValueError, "confidence"), (dict(confidence=float("nan")), ValueError, "confidence"),
    (dict(seed=-1), ValueError, "seed must be a non-negative int"), (dict(seed=1.5), ValueError, "seed"),
    (dict(max_length=0), ValueError, "max_length"), (dict(max_words=0), ValueError, "max_words"),
    (dict(stride=2.5), ValueError, "stride"), (dict(rescore_multiplier=1.5), ValueError, "rescore_multiplier"),
    (dict(rescore_multiplier=-1), ValueError, "rescore_multiplier"), (dict(passages="yes"), TypeError, "passages"),
    (dict(warmup=None), TypeError, "warmup"), (dict(ks=10), TypeError, "ks"),
    (dict(batch_size=0), ValueError, "batch_size"), (dict(n_boot=2.0), ValueError, "n_boot"),
])
def test_eval_config(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        EvalConfig(**kwargs)


def test_eval_config_keeps_sensible_values():
    cfg = EvalConfig(main_metrics="nDCG@10", rescore_multiplier=0, k=np.int64(100), seed=np.int32(3))
    assert cfg.main_metrics == ("nDCG@10",) and cfg.rescore_multiplier is None and cfg.k == 100 and cfg.seed == 3


def test_paired_comparison_arguments():
    a, b = np.linspace(0, 1, 10), np.linspace(0, 1, 10)[::-1]
    with pytest.raises(ValueError, match="seed must be a non-negative int"):
        paired_comparison(a, b, seed=-1, n_boot=10)
    with pytest.raises(ValueError, match="n_perm must be a positive int"):
        paired_comparison(a, b, n_perm=0, n_boot=10)
    with pytest.raises(TypeError, match="confidence"):
        paired_comparison(a, b, confidence="0.9", n_boot=10)


@pytest.mark.parametrize("argv, match", [
    (["quantize", "--scheme", "int8-dynamic", "--batch-size", "0"], "--batch-size must be a positive int"),
    (["quantize", "--scheme", "int8-dynamic", "--threads", "-2"], "--threads must be a positive int"),
    (["quantize", "--scheme", "int8-dynamic", "--seed", "-1"], "--seed must be a non-negative int"),
    (["compare", "--seed", "-5", "--no-progress"], "seed must be a non-negative int"),
    (["compare", "--max-length", "100000", "--no-progress"], "--max-length: max_length must be in"),
    (["compare", "--max-length", "0", "--no-progress"], "max_length must be a positive int"),
])
def test_cli_rejects_bad_numbers_with_exit_2(argv, match, tmp_path, capsys):
    from medquant.cli import main

    with pytest.raises(SystemExit) as ei:
        main(argv + ["--out", str(tmp_path / "out")])
    assert ei.value.code == 2
    assert match in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_out_must_not_be_a_file(tmp_path, capsys):
    from medquant.cli import main

    f = tmp_path / "file"
    f.write_text("keep me")
    for argv in (["quantize", "--scheme", "int8-dynamic"], ["compare", "--no-progress"]):
        with pytest.raises(SystemExit) as ei:
            main(argv + ["--out", str(f)])
        assert ei.value.code == 2 and "exists and is not a directory" in capsys.readouterr().err
    assert f.read_text() == "keep me"


@pytest.mark.parametrize("dtype", [">i4", ">f4"])
def test_binding_refuses_byte_swapped_arrays(minilm, dtype):
    """A big-endian array has the right dtype number but the wrong bytes: the binding refuses it (the Python API
    converts first, see test above)."""
    from medquant import _core

    if dtype == ">i4":
        with pytest.raises(ValueError, match="byte order"):
            minilm._core.forward(np.array([[101, 2054, 102]], dtype), np.ones((1, 3), np.int32))
    else:
        with pytest.raises(ValueError, match="byte order"):
            _core.Linear(_core.LINEAR_F32, np.ones((4, 4), dtype))
