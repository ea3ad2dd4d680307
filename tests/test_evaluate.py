"""End to end: medquant.evaluate on a small MedQuAD dev sample (fp32 + int8, index quantization, passage mode)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import medquant
from kernel_support import SUPPORT
from medquant.eval.datasets import medquad_retrieval
from medquant.eval.evaluate import EvalConfig, PerQueryResults, per_query_table
from medquant.eval.metrics import summarize

# small samples: their throughput figures are flagged as such (test_run_record checks it); not noise here
pytestmark = pytest.mark.filterwarnings("ignore::medquant.eval.runinfo.ThroughputWarning")

# 200 dev queries, a corpus of 400 answers (their ~210 relevant answers + random dev distractors), 64 tokens:
# about 3 s per encoder on 2 cores.
LIMIT, CORPUS_FACTOR, MAX_LENGTH = 200, 2, 64
MAIN = ("nDCG@10", "MRR@10", "R@100")


@pytest.fixture(scope="module")
def sample():
    return medquad_retrieval("dev", limit=LIMIT, corpus_factor=CORPUS_FACTOR)


@pytest.fixture(scope="module")
def results(minilm, sample):
    # an fp32 Encoder (reused as the baseline, not reloaded) plus a scheme name (quantized from it)
    return medquant.evaluate([minilm, "int8-dynamic"], sample, max_length=MAX_LENGTH, n_boot=500, seed=0)


def test_rows_and_columns(results, sample):
    expected = ["fp32", "fp32+index-int8", "fp32+index-int8+rescore4", "fp32+index-binary",
                "fp32+index-binary+rescore4", "int8-dynamic"]
    assert list(results["scheme"]) == expected
    for col in ("model_scheme", "index", "rescore", "n_queries", "n_docs", "nDCG@10", "MRR@10", "R@100", "P@1",
                "MAP@100", "overlap@10", "emb_cosine", "corpus_texts_per_s", "corpus_tokens_per_s",
                "query_texts_per_s", "model_bytes", "model_disk_bytes", "index_bytes", "rescore_bytes"):
        assert col in results.columns, col
    for m in MAIN:
        for s in ("delta", "ci_low", "ci_high", "p", "p_holm"):
            assert f"{m}_{s}" in results.columns
    assert (results["n_queries"] == len(sample.queries)).all()
    assert (results["n_docs"] == len(sample.corpus)).all()
    assert (results["corpus_texts_per_s"] > 0).all() and (results["corpus_tokens_per_s"] > 0).all()
    assert results.attrs["config"]["max_length"] == MAX_LENGTH
    assert results.attrs["dataset"]["n_queries"] == LIMIT


def test_fp32_quality_in_sane_range(results):
    """fp32 all-MiniLM-L6-v2, MedQuAD dev question -> answer, 200 queries against 400 answers.

    Measured: nDCG@10 0.889, MRR@10 0.873, R@100 0.9995 (the full dev split, 7447 queries against 7899 answers,
    is much harder). MTEB's MedicalQARetrieval (MedQuAD, 2048 queries against 2048 answers) reports 0.603 for
    this model; a corpus of 2 answers per query is far easier, hence the higher value here. The band [0.80, 0.96]
    leaves room for ISA-dependent rounding but fails on a broken encoder (random embeddings score ~0.02, a
    CLS-pooled or unnormalised model scores well below 0.8) or on leakage that makes retrieval trivial (~1.0).
    """
    fp32 = results.set_index("scheme").loc["fp32"]
    assert 0.80 <= fp32["nDCG@10"] <= 0.96
    assert 0.78 <= fp32["MRR@10"] <= 0.96
    assert fp32["R@100"] >= 0.97


def test_deltas_and_ci_consistent(results):
    base = results.set_index("scheme").loc["fp32"]
    for _, row in results.iterrows():
        for m in MAIN:
            assert row[f"{m}_delta"] == pytest.approx(row[m] - base[m], abs=1e-12)
            assert row[f"{m}_ci_low"] <= row[f"{m}_delta"] + 1e-12 <= row[f"{m}_ci_high"] + 2e-12
            assert 0.0 <= row[f"{m}_p"] <= row[f"{m}_p_holm"] <= 1.0
            # the interval and the p-value come from the same test (the paired t-test by default)
            assert (not row[f"{m}_ci_low"] <= 0.0 <= row[f"{m}_ci_high"]) == (row[f"{m}_p"] < 0.05)
    assert results.attrs["config"]["test"] == "ttest"
    b = results.iloc[0]
    assert b["nDCG@10_delta"] == 0.0 and b["nDCG@10_ci_low"] == 0.0 and b["nDCG@10_ci_high"] == 0.0
    assert b["nDCG@10_p"] == 1.0 and b["overlap@10"] == 1.0
    q = results.set_index("scheme").loc["int8-dynamic"]
    # int8 costs little here: well within a few points, embeddings close to fp32
    assert abs(q["nDCG@10_delta"]) < 0.05
    assert q["emb_cosine"] > 0.98
    assert 0.6 < q["overlap@10"] <= 1.0


def test_sizes(results, minilm):
    r = results.set_index("scheme")
    assert r.loc["fp32", "model_bytes"] == minilm.size_bytes()
    if SUPPORT["int8_exact"]:
        assert r.loc["int8-dynamic", "model_bytes"] < 0.35 * r.loc["fp32", "model_bytes"]
    else:  # emulated int8 layers on oneDNN's f32 matmul hold f32 weights (on medquant's panel matmul: int8, below
        # this bound too); the int8 embedding table shrinks
        assert r.loc["int8-dynamic", "model_bytes"] < 0.7 * r.loc["fp32", "model_bytes"]
    assert r.loc["int8-dynamic", "model_disk_bytes"] < 0.35 * r.loc["fp32", "model_disk_bytes"]
    n, d = int(r.loc["fp32", "n_docs"]), minilm.hidden_size
    assert r.loc["fp32", "index_bytes"] == n * d * 4
    assert r.loc["fp32+index-int8", "index_bytes"] == n * d + 2 * d * 4
    assert r.loc["fp32+index-binary", "index_bytes"] == n * d // 8
    assert r.loc["fp32+index-binary+rescore4", "rescore_bytes"] == n * d * 4
    assert r.loc["fp32+index-binary", "rescore_bytes"] == 0


def test_index_rows(results):
    r = results.set_index("scheme")
    for kind in ("int8", "binary"):
        assert r.loc[f"fp32+index-{kind}", "index"] == kind
        assert r.loc[f"fp32+index-{kind}+rescore4", "rescore"] == 4
        # index rows share the fp32 encoder
        assert r.loc[f"fp32+index-{kind}", "corpus_texts_per_s"] == r.loc["fp32", "corpus_texts_per_s"]
        # k * 4 = 400 candidates cover the whole 400-answer corpus: rescoring reproduces exact float search
        assert r.loc[f"fp32+index-{kind}+rescore4", "nDCG@10"] == pytest.approx(r.loc["fp32", "nDCG@10"], abs=1e-12)
        assert r.loc[f"fp32+index-{kind}+rescore4", "overlap@10"] == 1.0
    # sign bits lose some ranking detail, but retrieval still works
    assert 0.3 < r.loc["fp32+index-binary", "overlap@10"] < 1.0
    assert r.loc["fp32+index-binary", "nDCG@10"] > 0.7


def test_holm_over_the_systems_compared(results):
    """``<m>_p_holm``: Holm over every system but fp32 (5 here), per metric; fp32's own is its p (1)."""
    others = results[results["scheme"] != "fp32"]
    assert len(others) == 5
    for m in MAIN:
        p = others[f"{m}_p"].to_numpy()
        order = np.argsort(p, kind="stable")
        expected = np.empty(5)
        expected[order] = np.minimum(1, np.maximum.accumulate((5 - np.arange(5)) * p[order]))
        assert others[f"{m}_p_holm"].to_numpy() == pytest.approx(expected, rel=1e-12)
        assert results[f"{m}_p_holm"].iloc[0] == results[f"{m}_p"].iloc[0] == 1.0


def test_other_tests_selectable(minilm, sample):
    df = medquant.evaluate(minilm, sample, max_length=MAX_LENGTH, n_boot=300, test="randomization", index_kinds=("int8",),
                           rescore_multiplier=0, measure_disk=False, warmup=False)
    row = df.set_index("scheme").loc["fp32+index-int8"]
    assert row["nDCG@10_p"] >= 1 / 301 and df.attrs["config"]["test"] == "randomization"
    with pytest.raises(ValueError, match="test must be one of"):
        EvalConfig(test="wilcoxon")


def test_trec_run_files(results, sample, tmp_path):
    """runs/<system>.trec in the 6-column format parse with pytrec_eval and score the table's nDCG@10."""
    pytrec_eval = pytest.importorskip("pytrec_eval")
    from medquant.eval.evaluate import write_trec_runs

    paths = write_trec_runs(results, tmp_path / "runs")
    assert [p.name for p in paths] == [f"{s}.trec" for s in results["scheme"]]
    qrels = {q: dict(j) for q, j in sample.qrels.items() if j}
    table = results.set_index("scheme")
    for path in paths:
        system = path.stem
        lines = [line.split() for line in path.read_text().splitlines()]
        assert all(len(f) == 6 and f[1] == "Q0" and f[5] == system for f in lines)
        by_query = {}
        for qid, _, doc, rank, score, _ in lines:
            by_query.setdefault(qid, []).append((int(rank), float(score), doc))
        assert set(by_query) == set(sample.queries)
        for ranked in by_query.values():
            assert [r for r, _, _ in ranked] == list(range(1, len(ranked) + 1)) and len(ranked) <= 100
            # strictly decreasing in single precision (as trec_eval compares): no tie left to break by doc id
            assert all(np.float32(a[1]) > np.float32(b[1]) for a, b in zip(ranked, ranked[1:]))
        with open(path) as f:
            run = pytrec_eval.parse_run(f)
        ev = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10", "recall.100"}).evaluate(run)
        assert np.mean([v["ndcg_cut_10"] for v in ev.values()]) == pytest.approx(table.loc[system, "nDCG@10"],
                                                                                abs=1e-12)
        assert np.mean([v["recall_100"] for v in ev.values()]) == pytest.approx(table.loc[system, "R@100"], abs=1e-12)


def test_per_query(results, sample):
    pq = results.attrs["per_query"]
    assert isinstance(pq, PerQueryResults)
    assert list(pq) == list(results["scheme"])
    for name, df in pq.items():
        assert len(df) == len(sample.queries)
        s = summarize(df)
        row = results.set_index("scheme").loc[name]
        assert s["nDCG@10"] == pytest.approx(row["nDCG@10"], abs=1e-12)
    long = per_query_table(results)
    assert len(long) == len(results) * len(sample.queries)
    assert {"scheme", "qid", "source", "nDCG@10"} <= set(long.columns)
    # attrs survive pandas operations without copying the per-query tables
    assert results[["scheme"]].attrs["per_query"] is pq


def test_passage_mode(minilm):
    ds = medquad_retrieval("dev", limit=20, corpus_factor=2)
    df = medquant.evaluate(minilm, ds, passages=True, max_words=64, stride=48, max_length=96, n_boot=100,
                           index_kinds=("binary",), measure_disk=False)
    assert list(df["scheme"]) == ["fp32", "fp32+index-binary", "fp32+index-binary+rescore4"]
    assert (df["n_passages"] > df["n_docs"]).all()
    assert df.loc[0, "nDCG@10"] > 0.6
    assert (df["n_queries"] == 20).all()
    assert df.attrs["config"]["passages"] is True
    # every passage is a candidate after rescoring: exact max-pooled float search again
    assert df.loc[2, "nDCG@10"] == pytest.approx(df.loc[0, "nDCG@10"], abs=1e-12)


def test_config_validation():
    with pytest.raises(ValueError, match="max\\(ks\\)"):
        EvalConfig(k=5)
    with pytest.raises(ValueError, match="index kind"):
        EvalConfig(index_kinds=("int4",))
    with pytest.raises(ValueError, match="main_metrics"):
        EvalConfig(main_metrics=("nDCG@7",))
    with pytest.raises(ValueError, match="unknown quantization scheme"):
        medquant.evaluate(["int3-magic"], medquad_retrieval("dev", limit=5))
    assert EvalConfig(rescore_multiplier=0).rescore_multiplier is None


# ---------------------------------------------------------------------------------------------------- systems
TINY_KW = dict(max_length=64, n_boot=100, index_kinds=(), measure_disk=False, seed=0)


@pytest.fixture(scope="module")
def small():
    return medquad_retrieval("dev", limit=20, corpus_factor=2)


@pytest.fixture(scope="module")
def saved_int8(tiny_int8, tmp_path_factory):
    """tiny_int8 saved and loaded back: a quantized Encoder with no fp32 reference."""
    path = tiny_int8.save_pretrained(tmp_path_factory.mktemp("saved") / "tiny-q")
    return medquant.Encoder.from_pretrained(path, n_threads=1)


def test_loaded_quantized_encoder_is_a_labelled_system(tiny, tiny_dir, tiny_int8, saved_int8, small):
    df = medquant.evaluate([saved_int8, tiny_int8, ("mine", saved_int8)], small, model=tiny_dir, **TINY_KW)
    # quantized here: its scheme name; loaded from a directory: <scheme>@<directory>; a pair: its label
    assert list(df["scheme"]) == ["fp32", "int8-dynamic@tiny-q", "int8-dynamic", "mine"]
    assert list(df["model_scheme"]) == ["fp32", "int8-dynamic", "int8-dynamic", "int8-dynamic"]
    r = df.set_index("scheme")
    assert r.loc["fp32", "model_bytes"] == tiny.size_bytes()
    assert r.loc["int8-dynamic@tiny-q", "model_bytes"] == tiny_int8.size_bytes() < tiny.size_bytes()
    assert r.loc["int8-dynamic@tiny-q", "nDCG@10"] == r.loc["int8-dynamic", "nDCG@10"]  # the same weights
    # a loaded quantized encoder alone: the baseline is model=, never the quantized encoder
    alone = medquant.evaluate(saved_int8, small, model=tiny, **TINY_KW)
    assert list(alone["scheme"]) == ["fp32", "int8-dynamic@tiny-q"] and alone.loc[0, "model_scheme"] == "fp32"


def test_quantized_model_is_never_the_baseline(saved_int8, tiny_int8, small):
    with pytest.raises(ValueError, match="cannot be the baseline.*system"):
        medquant.evaluate(["int8-dynamic"], small, model=saved_int8.model_dir, **TINY_KW)
    with pytest.raises(ValueError, match="cannot be the baseline"):
        medquant.evaluate([], small, model=tiny_int8, **TINY_KW)


@pytest.mark.parametrize("systems, message", [
    ([("fp32", "int8-dynamic")], "reserved"),
    ([("fp32+index-int8", "int8-dynamic")], "reserved"),
    ([("a", "int8-dynamic"), ("a", "bf16")], "given twice"),
])
def test_bad_labels(systems, message, tiny, small):
    with pytest.raises(ValueError, match=message):
        medquant.evaluate(systems, small, model=tiny, **TINY_KW)


def test_another_architecture_is_refused(minilm, saved_int8, small):
    with pytest.raises(ValueError, match="another architecture"):
        medquant.evaluate(saved_int8, small, model=minilm, **TINY_KW)


# ---------------------------------------------------------------------------------------------------- calibration
def _keys(texts):
    from medquant.eval.calibration_data import text_key

    return {text_key(t) for t in texts}


@pytest.mark.parametrize("split, other", [("dev", "test"), ("test", "dev")])
def test_default_calibration_is_disjoint_from_evaluated_texts(split, other, tiny):
    ds = medquad_retrieval(split, limit=20, corpus_factor=2)
    df = medquant.evaluate("int8-static-asym", ds, model=tiny, calibration_size=64, **TINY_KW)
    texts = df.attrs["calibration_texts"]
    assert len(texts) == 64
    assert not _keys(texts) & _keys([*ds.queries.values(), *ds.corpus.values()])
    source = medquad_retrieval(other)
    assert _keys(texts) <= _keys([*source.queries.values(), *source.corpus.values()])
    cal = df.attrs["calibration"]
    assert (cal["source"], cal["kind"], cal["default"], cal["seed"]) == (f"medquad-{other}", "split", True, 0)
    assert cal["n_texts"] == 64 and cal["n_overlap_evaluated"] == 0


def test_passage_mode_calibration_excludes_evaluated_passages(tiny):
    ds = medquad_retrieval("dev", limit=20, corpus_factor=2)
    # the evaluated split itself as the source: only its texts outside the sample may be drawn
    df = medquant.evaluate("int8-static-asym", ds, model=tiny, calibration_source=medquad_retrieval("dev"),
                           calibration_size=48, passages=True, max_words=32, stride=24, **TINY_KW)
    from medquant.eval.datasets import split_corpus

    passages, _ = split_corpus(ds.corpus, max_words=32, stride=24)
    texts = df.attrs["calibration_texts"]
    assert len(texts) == 48
    assert not _keys(texts) & _keys([*ds.queries.values(), *ds.corpus.values(), *passages])
    assert df.attrs["calibration"]["n_excluded_evaluated"] >= 20 + len(passages)


def test_collection_without_held_out_text_needs_a_source(tiny, small):
    from medquant.eval.calibration_data import CalibrationSourceError
    from medquant.eval.datasets import RetrievalDataset

    own = RetrievalDataset(name="notes", corpus=dict(small.corpus), queries=dict(small.queries),
                           qrels=dict(small.qrels))
    with pytest.raises(CalibrationSourceError, match="calibration_source"):
        medquant.evaluate("int8-static-asym", own, model=tiny, **TINY_KW)
    with pytest.raises(TypeError, match="not both"):
        medquant.evaluate("int8-static-asym", own, model=tiny, calibration_texts=["a"], calibration_source="x",
                          **TINY_KW)
    # given texts are used as given; those that are evaluated are counted and warned about
    given = ["heart disease research", "treatment for glaucoma", *list(small.queries.values())[:2]]
    with pytest.warns(UserWarning, match="2 of the 4 calibration texts given are also evaluated"):
        df = medquant.evaluate("int8-static-asym", own, model=tiny, calibration_texts=given, **TINY_KW)
    assert df.attrs["calibration_texts"] == given
    assert (df.attrs["calibration"]["kind"], df.attrs["calibration"]["n_overlap_evaluated"]) == ("given", 2)


def test_read_text_file(tmp_path):
    from medquant.eval.calibration_data import read_text_file
    from medquant.eval.datasets import DatasetError

    (tmp_path / "a.txt").write_text("first text\n\n  second text  \n")
    assert read_text_file(tmp_path / "a.txt") == ["first text", "second text"]
    (tmp_path / "b.jsonl").write_text('{"text": "one"}\n{"title": "T", "text": "two"}\n')
    assert read_text_file(tmp_path / "b.jsonl") == ["one", "T two"]
    (tmp_path / "c.jsonl").write_text('{"text": "one"}\n{"body": "two"}\n')
    with pytest.raises(DatasetError, match="c.jsonl:2.*'text'"):
        read_text_file(tmp_path / "c.jsonl")
    (tmp_path / "d.txt").write_text("\n \n")
    with pytest.raises(ValueError, match="holds no text"):
        read_text_file(tmp_path / "d.txt")


# ---------------------------------------------------------------------------------------------------- run record
def test_run_record(tiny, small):
    from medquant.eval.runinfo import MIN_TIMED_TEXTS, ThroughputWarning

    with pytest.warns(ThroughputWarning, match="query_texts_per_s \\(20 < 100 texts"):
        df = medquant.evaluate("int8-dynamic", small, model=tiny, **TINY_KW)
    run = df.attrs["run"]
    assert run["max_length"] == {"fp32": 64, "int8-dynamic": 64} and list(df["max_length"]) == [64, 64]
    assert run["threads"] == {"fp32": 1, "int8-dynamic": 1}
    assert run["medquant_version"] == medquant.__version__ and run["cpu_isa"] == medquant.runtime_info()["cpu_isa"]
    assert len(run["load_before"]) == 3 and run["cpus_available"] >= 1
    counted = {(w["scheme"], w["figure"]) for w in run["throughput_warnings"] if f"< {MIN_TIMED_TEXTS} texts" in
               w["reason"]}
    # 40 corpus texts and 20 queries: every model figure is below the text floor, whatever the timing
    assert counted == {(s, f) for s in ("fp32", "int8-dynamic") for f in ("corpus_texts_per_s", "query_texts_per_s")}


def test_different_max_lengths_warn(tiny, tiny_dir, small):
    other = medquant.Encoder.from_pretrained(tiny_dir, n_threads=1, max_length=32).quantize("int8-dynamic")
    with pytest.warns(UserWarning, match="truncate at different lengths"):
        df = medquant.evaluate(other, small, model=tiny, **{**TINY_KW, "max_length": None})
    assert df.attrs["run"]["max_length"] == {"fp32": tiny.max_length, "int8-dynamic": 32}


def test_items_tuple_forms(tiny):
    from medquant.eval.evaluate import _as_items

    # a tuple of scheme names is a list of schemes; a pair inside a list is a labelled system
    assert [(l, s.name) for l, s in _as_items(None, ("int8-dynamic", "bf16"))] == [(None, "int8-dynamic"),
                                                                                 (None, "bf16")]
    assert [(l, s.name) for l, s in _as_items([("mine", "bf16")], None)] == [("mine", "bf16")]
    assert [(l, e) for l, e in _as_items(("mine", tiny), None)] == [("mine", tiny)]
