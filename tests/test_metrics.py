"""medquant.eval.metrics against pytrec_eval (trec_eval) on random and hand-built runs."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from conftest import require

pytrec_eval = require("pytrec_eval")

from medquant.eval.metrics import evaluate_run, metric_columns, summarize, trec_order  # noqa: E402

KS = (1, 2, 3, 5, 10, 20, 100)


def random_case(seed: int, n_queries: int = 300, n_docs: int = 60):
    """Random graded qrels (0-3, some negative) and runs with many score ties, short and empty runs."""
    rng = np.random.default_rng(seed)
    docs = [f"d{i}" for i in range(n_docs)]
    qrels, run = {}, {}
    for qi in range(n_queries):
        q = f"q{qi}"
        judged = rng.choice(n_docs, size=int(rng.integers(1, 20)), replace=False)
        grades = rng.integers(0, 4, size=judged.size)
        if qi % 17 == 0:
            grades[:] = 0  # judged, but nothing relevant
        if qi % 23 == 0:
            grades[0] = -1  # negative grade
        qrels[q] = {docs[j]: int(g) for j, g in zip(judged, grades)}
        if qi % 29 == 0:
            continue  # judged query missing from the run
        n_ret = int(rng.integers(0, n_docs)) if qi % 5 else int(rng.integers(0, 8))  # often shorter than k
        ret = rng.choice(n_docs, size=n_ret, replace=False)
        if qi % 11 == 0:
            ret = np.array([j for j in ret if docs[j] not in qrels[q]], dtype=int)  # relevant ones not retrieved
        # few distinct score values -> many ties, resolved by trec_eval's docid ordering
        scores = rng.integers(0, 4, size=ret.size) / 2.0 if qi % 2 else rng.normal(size=ret.size)
        run[q] = {docs[j]: float(s) for j, s in zip(ret, scores)}
    run["unjudged"] = {"d1": 1.0}
    return qrels, run


def oracle(qrels, run, ks=KS, relevance_level=1):
    measures = set()
    for k in ks:
        measures |= {f"P_{k}", f"recall_{k}", f"ndcg_cut_{k}", f"map_cut_{k}"}
    res = pytrec_eval.RelevanceEvaluator(qrels, measures, relevance_level=relevance_level).evaluate(run)
    rr = {}
    for k in ks:
        cut = {q: dict(sorted(d.items(), key=lambda kv: (kv[1], kv[0]), reverse=True)[:k]) for q, d in run.items()}
        rr[k] = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}, relevance_level=relevance_level).evaluate(cut)
    rows = {}
    for q, m in res.items():
        row = {}
        for k in ks:
            row[f"nDCG@{k}"] = m[f"ndcg_cut_{k}"]
            row[f"P@{k}"] = m[f"P_{k}"]
            row[f"R@{k}"] = m[f"recall_{k}"]
            row[f"MAP@{k}"] = m[f"map_cut_{k}"]
            row[f"MRR@{k}"] = rr[k][q]["recip_rank"]
        rows[q] = row
    return pd.DataFrame.from_dict(rows, orient="index")


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("relevance_level", [1, 2])
def test_matches_pytrec_eval_on_random_runs(seed, relevance_level):
    qrels, run = random_case(seed)
    ours = evaluate_run(qrels, run, ks=KS, relevance_level=relevance_level, missing="drop")
    ref = oracle(qrels, run, relevance_level=relevance_level)
    assert set(ours.index) == set(ref.index)
    assert len(ours) > 250
    ref = ref.loc[ours.index]
    for col in ref.columns:
        diff = np.abs(ours[col].to_numpy() - ref[col].to_numpy())
        assert diff.max() <= 1e-6, (col, ours.index[diff.argmax()], diff.max())
    # the cases the generator is meant to produce are really there
    assert (ours["num_rel"] == 0).any()
    assert ((ours["num_ret"] < 5) & (ours["num_ret"] > 0)).any()
    assert (ours["num_ret"] == 0).any()


def test_pytrec_backend_agrees_with_numpy_backend():
    qrels, run = random_case(5, n_queries=120)
    a = evaluate_run(qrels, run, ks=(1, 5, 10))
    b = evaluate_run(qrels, run, ks=(1, 5, 10), backend="pytrec_eval")
    pd.testing.assert_frame_equal(a, b, check_exact=False, atol=1e-9, rtol=0)


def test_missing_queries_zero_or_drop():
    qrels = {"q1": {"a": 1}, "q2": {"b": 1}, "q3": {}}
    run = {"q1": {"a": 1.0}, "other": {"a": 1.0}}
    zero = evaluate_run(qrels, run, ks=(1,))
    assert list(zero.index) == ["q1", "q2"]  # empty qrels entries are ignored like trec_eval
    assert zero.loc["q2", metric_columns((1,))].eq(0).all()
    drop = evaluate_run(qrels, run, ks=(1,), missing="drop")
    assert list(drop.index) == ["q1"]


def test_trec_tie_breaking_is_docid_descending():
    assert [d for d, _ in trec_order({"a": 1.0, "b": 1.0, "c": 2.0})] == ["c", "b", "a"]
    assert [d for d, _ in trec_order({"d10": 0.5, "d9": 0.5})] == ["d9", "d10"]
    # relevant doc "a" ties with "b": trec_eval ranks "b" first
    df = evaluate_run({"q": {"a": 1}}, {"q": {"a": 1.0, "b": 1.0}}, ks=(1, 2))
    assert df.loc["q", "P@1"] == 0.0 and df.loc["q", "MRR@2"] == 0.5


def test_hand_built_values():
    qrels = {"q": {"a": 3, "b": 0, "c": 1, "d": 2, "e": -1}}
    run = {"q": {"x": 0.9, "a": 0.8, "e": 0.7, "c": 0.6, "b": 0.5}}
    df = evaluate_run(qrels, run, ks=(1, 3, 5, 10))
    r = df.loc["q"]
    # ranking: x, a, e, c, b ; relevant (grade >= 1): a (rank 2), c (rank 4); num_rel = 3 (a, c, d)
    assert r["P@1"] == 0 and r["P@3"] == pytest.approx(1 / 3) and r["P@5"] == pytest.approx(2 / 5)
    assert r["P@10"] == pytest.approx(2 / 10)
    assert r["R@3"] == pytest.approx(1 / 3) and r["R@5"] == pytest.approx(2 / 3)
    assert r["MRR@1"] == 0 and r["MRR@3"] == pytest.approx(0.5)
    assert r["MAP@5"] == pytest.approx((1 / 2 + 2 / 4) / 3)
    dcg5 = 3 / math.log2(3) + 1 / math.log2(5)  # negative grade of "e" gains 0
    idcg5 = 3 + 2 / math.log2(3) + 1 / math.log2(4)
    assert r["nDCG@5"] == pytest.approx(dcg5 / idcg5)
    p, rc = 2 / 5, 2 / 3
    assert r["F1@5"] == pytest.approx(2 * p * rc / (p + rc))
    assert r["num_rel"] == 3 and r["num_ret"] == 5


def test_perfect_and_empty_runs():
    qrels = {"q1": {"a": 1, "b": 2}, "q2": {"a": 0}}
    run = {"q1": {"b": 2.0, "a": 1.0}, "q2": {"a": 1.0}}
    df = evaluate_run(qrels, run, ks=(2,))
    assert df.loc["q1", ["nDCG@2", "R@2", "MRR@2", "MAP@2", "P@2", "F1@2"]].tolist() == [1, 1, 1, 1, 1, 1]
    assert df.loc["q2", metric_columns((2,))].eq(0).all()  # no relevant documents: all zero


def test_summarize_means_metric_columns():
    qrels, run = random_case(3, n_queries=50)
    df = evaluate_run(qrels, run, ks=(1, 10, 100))
    s = summarize(df)
    assert s["nDCG@10"] == pytest.approx(df["nDCG@10"].mean())
    assert s["R@100"] == pytest.approx(df["R@100"].mean())
    assert "num_rel" not in s.index and s["n_queries"] == len(df)
    assert list(df.columns[:3]) == ["nDCG@1", "nDCG@10", "nDCG@100"]


def test_invalid_arguments():
    with pytest.raises(ValueError):
        evaluate_run({"q": {"a": 1}}, {"q": {"a": 1.0}}, ks=(0,))
    with pytest.raises(ValueError):
        evaluate_run({"q": {"a": 1}}, {"q": {"a": 1.0}}, relevance_level=0)
    with pytest.raises(ValueError):
        evaluate_run({"q": {"a": 1}}, {"q": {"a": 1.0}}, backend="nope")
