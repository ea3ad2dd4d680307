"""medquant.eval.datasets: MedQuAD parsing and retrieval splits, BEIR and TREC loaders, passage splitting."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import IN_CI
from medquant.eval import datasets
from medquant.eval.datasets import (
    RetrievalDataset, load_beir, load_medquad, load_trec_qrels, medquad_retrieval, split_corpus, split_passages,
)


def _medquad_dir():
    try:
        return datasets.data_root()
    except FileNotFoundError as exc:
        return exc


_ROOT = _medquad_dir()
# outside CI a missing MedQuAD skips (saying where it was looked for); under CI the session fails first (conftest.py)
needs_medquad = pytest.mark.skipif(isinstance(_ROOT, Exception) and not IN_CI,
                                   reason=f"MedQuAD data not available: {_ROOT}")


@pytest.fixture(scope="module")
def mq():
    return load_medquad()


# ---------------------------------------------------------------------------------------------------- MedQuAD
@needs_medquad
def test_documented_counts(mq):
    assert len(mq) == 16423
    expected = {"CancerGov": 729, "GARD": 5389, "GHR": 5430, "MPlusHealthTopics": 981, "NIDDK": 1192,
                "NINDS": 1104, "SeniorHealth": 769, "NHLBI": 559, "CDC": 270}
    assert mq.groupby("source").size().to_dict() == expected
    assert (mq["answer"].str.strip() != "").all() and (mq["question"].str.strip() != "").all()


@needs_medquad
def test_all_pairs_including_unanswered():
    full = load_medquad(include_unanswered=True)
    assert len(full) == 47457  # as documented in readme.txt
    counts = full.groupby("source").size()
    assert counts["MPlusADAM"] + counts["MPlusDrugs"] + counts["MPlusHerbsSupplements"] == 31029
    assert (full.loc[full["source"].isin(["MPlusADAM", "MPlusDrugs", "MPlusHerbsSupplements"]), "answer"] == "").all()
    assert counts["GARD"] == 5394  # 5 GARD pairs have an empty <Answer/>


@needs_medquad
def test_quirky_files_are_parsed(mq):
    for stem in ("0000007", "0000018", "0000182", "0000244"):  # lower-case <doc>/<qaPairs>/<pair> schema
        rows = mq[mq["doc_id"] == f"NINDS/{stem}"]
        assert len(rows) >= 1, stem
        assert rows["focus"].str.len().gt(0).all()
    cdc = mq[mq["file"] == "9_CDC_QA/0000397.xml"]  # <DiseaseFile> root
    assert len(cdc) >= 1 and cdc["focus"].iloc[0] == "Parasites - Taeniasis"
    assert cdc["qa_id"].iloc[0] == "CDC/0000397-1"


@needs_medquad
def test_ids_unique_and_annotations(mq):
    assert mq["qa_id"].is_unique
    assert not mq["qid"].is_unique  # the raw qids do repeat (across subsets and within CancerGov)
    assert all(qa.startswith(src + "/") for qa, src in zip(mq["qa_id"], mq["source"]))
    assert (mq["qa_id"].str.rsplit("-", n=1).str[0] == mq["doc_id"]).all()
    assert mq["doc_id"].nunique() == mq["file"].nunique()
    first = mq.iloc[0]
    assert first["qa_id"] == "CancerGov/0000001_1-1" and first["cuis"] == ["C0751606"]
    assert first["semantic_types"] == ["T191"] and first["qtype"] == "information"
    assert mq["cuis"].map(len).gt(0).mean() > 0.5
    # cached parse, but callers get independent copies
    mq["cuis"].iloc[0].append("X")
    again = load_medquad()
    assert again["cuis"].iloc[0] == ["C0751606"]


@needs_medquad
def test_splits_are_disjoint_and_leak_free(mq):
    dev, test = medquad_retrieval("dev"), medquad_retrieval("test")
    alld = medquad_retrieval("all")
    qa_doc = dict(zip(mq["qa_id"], mq["doc_id"]))
    dev_docs = {qa_doc[i] for i in list(dev.corpus) + list(dev.queries)}
    test_docs = {qa_doc[i] for i in list(test.corpus) + list(test.queries)}
    assert dev_docs and test_docs and not dev_docs & test_docs
    assert not set(dev.corpus) & set(test.corpus)
    assert not set(dev.queries) & set(test.queries)
    for ds, other in ((dev, test), (test, dev)):
        for q, rel in ds.qrels.items():
            assert rel and all(d in ds.corpus and d not in other.corpus for d in rel)
    # roughly half of the pairs each, every source present in both
    assert 0.4 < len(dev.queries) / (len(dev.queries) + len(test.queries)) < 0.6
    assert set(dev.metadata["source"]) == set(test.metadata["source"])
    # "all": one query per distinct normalised question, one document per distinct answer text
    assert len(alld.corpus) == mq["answer"].map(datasets.normalize_text).nunique()
    assert len(alld.queries) == mq["question"].map(lambda t: datasets.normalize_text(t, lower=True)).nunique()
    assert sum(len(v) for v in alld.qrels.values()) <= len(mq)
    assert max(len(v) for v in alld.qrels.values()) > 1  # merged duplicate questions
    assert alld.metadata.loc[list(alld.queries)[0], "source"] == "CancerGov"


@needs_medquad
def test_split_is_deterministic_and_seeded():
    a, b = medquad_retrieval("test", seed=13), medquad_retrieval("test", seed=13)
    assert list(a.corpus) == list(b.corpus) and a.qrels == b.qrels and list(a.queries) == list(b.queries)
    c = medquad_retrieval("test", seed=14)
    assert set(c.queries) != set(a.queries)
    d = medquad_retrieval("dev", dev_fraction=0.3)
    assert len(d.queries) < 0.4 * len(medquad_retrieval("all").queries)


@needs_medquad
def test_limit_keeps_relevant_docs_and_distractors():
    full = medquad_retrieval("dev")
    small = medquad_retrieval("dev", limit=40)
    again = medquad_retrieval("dev", limit=40)
    assert len(small) == 40 and list(small.queries) == list(again.queries)
    assert list(small.corpus) == list(again.corpus)
    assert set(small.queries) <= set(full.queries) and set(small.corpus) <= set(full.corpus)
    relevant = {d for rel in small.qrels.values() for d in rel}
    assert relevant <= set(small.corpus)
    assert len(small.corpus) == max(160, len(relevant))
    order = {d: i for i, d in enumerate(full.corpus)}
    assert [order[d] for d in small.corpus] == sorted(order[d] for d in small.corpus)
    assert all(small.qrels[q] == full.qrels[q] for q in small.queries)
    assert list(small.metadata.index) == list(small.queries)


def test_data_root_errors(monkeypatch, tmp_path):
    monkeypatch.setenv("MEDQUANT_DATA", str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="MEDQUANT_DATA"):
        datasets.data_root()
    monkeypatch.setenv("MEDQUANT_DATA", str(tmp_path))
    assert datasets.data_root() == tmp_path
    with pytest.raises(FileNotFoundError):
        load_medquad(tmp_path)  # no subset directories


def test_load_medquad_on_a_tiny_synthetic_collection(tmp_path):
    sub = tmp_path / "1_CancerGov_QA"
    sub.mkdir()
    (sub / "0000001_1.xml").write_text(
        '<?xml version="1.0" encoding="UTF-8"?><Document id="0000001_1" source="CancerGov" url="u">'
        "<Focus>Thing</Focus><FocusAnnotations><UMLS><CUIs><CUI>C1</CUI><CUI>C2</CUI></CUIs>"
        "<SemanticTypes><SemanticType>T1</SemanticType></SemanticTypes><SemanticGroup>G</SemanticGroup></UMLS>"
        '</FocusAnnotations><QAPairs><QAPair pid="1"><Question qid="0000001_1-1" qtype="information">What?'
        '</Question><Answer>  An answer. </Answer></QAPair><QAPair pid="2"><Question qid="0000001_1-2" '
        'qtype="x">Empty?</Question><Answer>   </Answer></QAPair></QAPairs></Document>', encoding="utf-8")
    sub2 = tmp_path / "6_NINDS_QA"
    sub2.mkdir()
    (sub2 / "0000002.xml").write_text(
        '<doc docid="0000002" corpus="NINDS" url="v"><doctitle-focus>Other</doctitle-focus><umls><cui>C3</cui>'
        '</umls><qaPairs><pair pid="1"><question qid="0000002-1" qtype="information">what is other ?</question>'
        "<answer>Other is.</answer></pair></qaPairs></doc>", encoding="utf-8")
    df = load_medquad(tmp_path)
    assert list(df["qa_id"]) == ["CancerGov/0000001_1-1", "NINDS/0000002-1"]
    assert df["answer"].tolist() == ["An answer.", "Other is."]  # whitespace-only answer skipped
    assert df["cuis"].tolist() == [["C1", "C2"], ["C3"]] and df["focus"].tolist() == ["Thing", "Other"]
    assert len(load_medquad(tmp_path, include_unanswered=True)) == 3


# ---------------------------------------------------------------------------------------------------- BEIR / TREC
def write_beir(root: Path) -> Path:
    d = root / "tinybeir"
    (d / "qrels").mkdir(parents=True)
    corpus = [
        {"_id": "d1", "title": "Asthma", "text": "Asthma is a chronic disease of the airways."},
        {"_id": "d2", "title": "", "text": "Diabetes affects blood sugar."},
        {"_id": "d3", "text": "Influenza is a viral infection."},
    ]
    (d / "corpus.jsonl").write_text("\n".join(json.dumps(r) for r in corpus) + "\n", encoding="utf-8")
    queries = [{"_id": "q1", "text": "what is asthma"}, {"_id": "q2", "text": "blood sugar"},
               {"_id": "q3", "text": "not judged in test"}]
    (d / "queries.jsonl").write_text("\n".join(json.dumps(r) for r in queries) + "\n", encoding="utf-8")
    (d / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t2\nq1\td3\t0\nq2\td2\t1\n",
                                          encoding="utf-8")
    (d / "qrels" / "dev.tsv").write_text("query-id\tcorpus-id\tscore\nq3\td3\t1\n", encoding="utf-8")
    return d


def test_load_beir(tmp_path):
    d = write_beir(tmp_path)
    ds = load_beir(d)
    assert isinstance(ds, RetrievalDataset)
    assert ds.corpus == {"d1": "Asthma Asthma is a chronic disease of the airways.",
                         "d2": "Diabetes affects blood sugar.", "d3": "Influenza is a viral infection."}
    assert ds.queries == {"q1": "what is asthma", "q2": "blood sugar"}  # only queries judged in the split
    assert ds.qrels == {"q1": {"d1": 2, "d3": 0}, "q2": {"d2": 1}}  # graded, zero kept as non-relevant
    info = ds.describe()
    assert info["n_queries"] == 2 and info["n_docs"] == 3 and info["n_relevant"] == 2
    assert info["grades"] == {0: 1, 1: 1, 2: 1}
    dev = load_beir(d, split="dev")
    assert dev.queries == {"q3": "not judged in test"} and dev.qrels == {"q3": {"d3": 1}}
    with pytest.raises(FileNotFoundError):
        load_beir(d, split="train")


def test_load_trec_qrels(tmp_path):
    p = tmp_path / "qrels.txt"
    p.write_text("101 0 docA 2\n101 0 docB 0\n\n102 0 docA -1\n102 0 docC 1\n# comment\n", encoding="utf-8")
    assert load_trec_qrels(p) == {"101": {"docA": 2, "docB": 0}, "102": {"docA": -1, "docC": 1}}
    bad = tmp_path / "bad.txt"
    bad.write_text("101 docA 1\n", encoding="utf-8")
    with pytest.raises(ValueError):
        load_trec_qrels(bad)


def test_sample_and_describe():
    corpus = {f"d{i}": f"text {i} " * (i + 1) for i in range(50)}
    queries = {f"q{i}": f"query {i}" for i in range(20)}
    qrels = {f"q{i}": {f"d{i}": 1, f"d{i + 20}": 0} for i in range(20)}
    ds = RetrievalDataset("toy", corpus, queries, qrels)
    assert len(ds) == 20
    s1, s2 = ds.sample(5, seed=3), ds.sample(5, seed=3)
    assert list(s1.queries) == list(s2.queries) and len(s1) == 5 and s1.corpus == corpus
    s3 = ds.sample(5, seed=3, corpus_size=12)
    assert len(s3.corpus) == 12
    assert all(d in s3.corpus for q in s3.queries for d, g in qrels[q].items() if g > 0)
    assert ds.sample(100).queries == queries
    assert ds.describe()["doc_words_max"] == 100


# ---------------------------------------------------------------------------------------------------- passages
def test_split_passages_windows():
    text = " ".join(f"w{i}" for i in range(25))
    parts = split_passages(text, max_words=10, stride=7)
    assert [p.split()[0] for p in parts] == ["w0", "w7", "w14", "w15"]
    assert all(len(p.split()) == 10 for p in parts) and parts[-1].split()[-1] == "w24"
    assert split_passages("a  b\nc", max_words=10, stride=5) == ["a b c"]
    assert split_passages("", max_words=10, stride=5) == [""]
    exact = split_passages(" ".join(f"w{i}" for i in range(24)), max_words=10, stride=7)
    assert [p.split()[0] for p in exact] == ["w0", "w7", "w14"]
    with pytest.raises(ValueError):
        split_passages(text, max_words=10, stride=11)
    passages, doc_index = split_corpus({"a": text, "b": "short"}, max_words=10, stride=7)
    assert len(passages) == 5 and doc_index.tolist() == [0, 0, 0, 0, 1]
    assert doc_index.dtype == np.int64
