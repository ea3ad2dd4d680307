"""medquant.eval.retrieval: blocked exact search, passage max-pooling and quantized indexes."""
from __future__ import annotations

import numpy as np
import pytest

from medquant.eval.retrieval import (
    l2_normalize, quantize_index, read_trec_run, run_from_search, search, search_passages, write_trec_run,
)


def brute_force(q, c, k):
    """Full score matrix, stable argsort: descending score, ties by lower index."""
    s = q @ c.T
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, order, axis=1), order


def clustered(seed=0, n_clusters=40, per_cluster=50, n_queries=200, dim=96, noise=0.45):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_clusters, dim))
    labels = rng.integers(0, n_clusters, size=n_clusters * per_cluster)
    corpus = centres[labels] + noise * rng.normal(size=(labels.size, dim))
    qlab = rng.integers(0, n_clusters, size=n_queries)
    queries = centres[qlab] + noise * rng.normal(size=(n_queries, dim))
    return l2_normalize(queries), l2_normalize(corpus)


def recall_at(ref_idx, idx):
    return float(np.mean([len(set(a) & set(b)) / len(a) for a, b in zip(ref_idx, idx)]))


@pytest.mark.parametrize("block_size", [1, 7, 64, 333, 5000])
def test_blocked_search_equals_brute_force_random(block_size):
    rng = np.random.default_rng(block_size)
    q = l2_normalize(rng.normal(size=(37, 24)))
    c = l2_normalize(rng.normal(size=(1000, 24)))
    s, i = search(q, c, k=15, block_size=block_size, normalize=False)
    ref_s, ref_i = brute_force(q, c, 15)
    np.testing.assert_array_equal(i, ref_i)
    np.testing.assert_allclose(s, ref_s, atol=1e-6)
    assert s.dtype == np.float32 and i.dtype == np.int64


@pytest.mark.parametrize("block_size", [3, 16, 100, 4096])
@pytest.mark.parametrize("query_block_size", [None, 5])
def test_ties_broken_by_lower_index(block_size, query_block_size):
    # small integers: every dot product is exact in float32, and ties are everywhere
    rng = np.random.default_rng(7)
    q = rng.integers(-1, 2, size=(30, 6)).astype(np.float32)
    c = rng.integers(-1, 2, size=(500, 6)).astype(np.float32)
    s, i = search(q, c, k=40, block_size=block_size, normalize=False, query_block_size=query_block_size)
    ref_s, ref_i = brute_force(q, c, 40)
    np.testing.assert_array_equal(s, ref_s)
    np.testing.assert_array_equal(i, ref_i)
    # duplicated documents: the first copy always ranks first
    c2 = np.repeat(c[:10], 3, axis=0)
    _, i2 = search(q, c2, k=30, block_size=block_size, normalize=False)
    for row in i2:
        assert len(set(row)) == 30
    _, ref2 = brute_force(q, c2, 30)
    np.testing.assert_array_equal(i2, ref2)


def test_k_larger_than_corpus_and_ids():
    rng = np.random.default_rng(1)
    q, c = rng.normal(size=(4, 8)), rng.normal(size=(6, 8))
    s, i = search(q, c, k=50, block_size=4)
    assert s.shape == (4, 6) and sorted(i[0]) == list(range(6))
    ids = [f"doc{j}" for j in range(6)]
    s2, names = search(q, c, k=3, corpus_ids=ids)
    assert names[0, 0] == ids[i[0, 0]]
    run = run_from_search(s2, names, ["a", "b", "c", "d"])
    assert list(run["a"]) == list(names[0]) and run["a"][names[0, 0]] == pytest.approx(float(s2[0, 0]))


def test_normalize_makes_search_cosine():
    rng = np.random.default_rng(2)
    q, c = rng.normal(size=(10, 16)), rng.normal(size=(200, 16)) * rng.uniform(0.1, 10, size=(200, 1))
    _, i = search(q, c, k=5)
    _, ref = brute_force(l2_normalize(q), l2_normalize(c), 5)
    np.testing.assert_array_equal(i, ref)


def test_run_from_search_preserve_order(tmp_path):
    scores = np.array([[1.0, 1.0, 0.5]], dtype=np.float32)
    idx = np.array([[0, 1, 2]])
    run = run_from_search(scores, idx, ["q"], ["a", "b", "c"], preserve_order=True)
    assert run == {"q": {"a": 3.0, "b": 2.0, "c": 1.0}}
    write_trec_run(run, tmp_path / "run.txt")
    assert read_trec_run(tmp_path / "run.txt") == run


def test_search_passages_max_pools():
    rng = np.random.default_rng(3)
    q = l2_normalize(rng.normal(size=(25, 20)))
    p = l2_normalize(rng.normal(size=(400, 20)))
    doc = rng.integers(0, 90, size=400)
    doc[:5] = 99  # document 99 exists, some documents (absent from doc) have no passage
    s, d = search_passages(q, p, doc, k=30, block_size=37, query_block_size=7)
    full = q @ p.T
    n_docs = 100
    ref = np.full((25, n_docs), -np.inf, dtype=np.float32)
    for j in range(400):
        ref[:, doc[j]] = np.maximum(ref[:, doc[j]], full[:, j])
    order = np.argsort(-ref, axis=1, kind="stable")[:, :30]
    np.testing.assert_array_equal(d, order)
    np.testing.assert_allclose(s, np.take_along_axis(ref, order, axis=1), atol=1e-6)
    # k clipped to the documents that have passages
    s_all, d_all = search_passages(q, p, doc, k=1000)
    assert d_all.shape[1] == len(set(doc.tolist())) and np.isfinite(s_all).all()


def test_int8_index_recall_and_rescoring():
    q, c = clustered(seed=0)
    _, ref = search(q, c, k=10)
    index = quantize_index(c, "int8")
    assert index.codes.dtype == np.int8 and index.codes.shape == c.shape
    assert index.nbytes == c.shape[0] * c.shape[1] + 2 * 4 * c.shape[1]
    s, i = index.search(q, k=10)
    assert s.dtype == np.int32
    # int32 dot products of per-dimension-range codes distort the ranking (about 0.65 on these data and on
    # all-MiniLM-L6-v2 MedQuAD embeddings); rescoring the top 40 with float embeddings recovers it
    r_plain = recall_at(ref, i)
    assert r_plain >= 0.55, r_plain
    s_r, i_r = index.search(q, k=10, rescore_multiplier=4, float_corpus=c)
    r_res = recall_at(ref, i_r)
    assert r_res >= r_plain + 0.2 and r_res >= 0.97, (r_plain, r_res)
    np.testing.assert_allclose(s_r, np.take_along_axis(q @ c.T, i_r, axis=1), atol=1e-5)  # float scores
    # asymmetric scoring (float query x dequantized int8 corpus) is close to exact on its own
    s_a, i_a = index.search(q, k=10, scoring="asymmetric")
    r_asym = recall_at(ref, i_a)
    assert r_asym >= 0.93, r_asym
    np.testing.assert_allclose(s_a, np.take_along_axis(q @ index.dequantize().T, i_a, axis=1), atol=1e-4)
    _, i_ar = index.search(q, k=10, scoring="asymmetric", rescore_multiplier=4, float_corpus=c)
    assert recall_at(ref, i_ar) >= max(r_asym, 0.99)


def test_int8_dequantize_error_is_bounded_by_half_a_step():
    q, c = clustered(seed=3, n_queries=5)
    index = quantize_index(c, "int8")
    err = np.abs(index.dequantize() - c)
    assert (err <= index.step / 2 + 1e-6).all()
    ranges = np.stack([c.min(axis=0) * 0.5, c.max(axis=0) * 0.5])  # narrower calibration: values get clipped
    clipped = quantize_index(c, "int8", ranges=ranges)
    assert clipped.codes.min() == -128 and clipped.codes.max() == 127


def test_int8_scores_are_exact_integer_dot_products():
    q, c = clustered(seed=1, n_queries=20)
    index = quantize_index(c, "int8")
    qc = index.quantize_queries(q).astype(np.int64)
    s, i = index.search(q, k=25, block_size=100)
    full = qc @ index.codes.astype(np.int64).T
    order = np.argsort(-full, axis=1, kind="stable")[:, :25]
    np.testing.assert_array_equal(i, order)
    np.testing.assert_array_equal(s, np.take_along_axis(full, order, axis=1))


def test_binary_index_hamming_recall_and_rescoring():
    q, c = clustered(seed=2)
    _, ref = search(q, c, k=10)
    index = quantize_index(c, "binary")
    assert index.codes.dtype == np.uint8 and index.codes.shape == (c.shape[0], c.shape[1] // 8)
    assert index.nbytes == c.shape[0] * c.shape[1] // 8
    assert index.compression_ratio == pytest.approx(32.0)
    s, i = index.search(q, k=10)
    # score = d - 2 * Hamming distance of the sign bits, ties by lower index
    qb, cb = (q > 0), (c > 0)
    ham = (qb[:, None, :] != cb[None, :, :]).sum(axis=2)
    full = c.shape[1] - 2 * ham
    order = np.argsort(-full, axis=1, kind="stable")[:, :10]
    np.testing.assert_array_equal(i, order)
    np.testing.assert_array_equal(s, np.take_along_axis(full, order, axis=1))
    r_plain = recall_at(ref, i)
    assert r_plain >= 0.3, r_plain
    _, i_r = index.search(q, k=10, rescore_multiplier=10, float_corpus=c)
    r_res = recall_at(ref, i_r)
    assert r_res >= r_plain + 0.3 and r_res >= 0.95, (r_plain, r_res)
    s_a, i_a = index.search(q, k=10, scoring="asymmetric")  # float query x +-1 corpus
    assert recall_at(ref, i_a) > r_plain
    np.testing.assert_allclose(s_a, np.take_along_axis(q @ np.where(c > 0, 1.0, -1.0).T, i_a, axis=1), atol=1e-4)


def test_binary_odd_dimension_and_nbytes():
    rng = np.random.default_rng(4)
    c = rng.normal(size=(50, 13))
    index = quantize_index(c, "binary")
    assert index.codes.shape == (50, 2) and index.nbytes == 100
    s, i = index.search(c[:5], k=3)
    assert (i[:, 0] == np.arange(5)).all() and (s[:, 0] == 13).all()


def test_quantized_index_errors():
    c = np.random.default_rng(5).normal(size=(20, 8))
    with pytest.raises(ValueError):
        quantize_index(c, "int4")
    idx = quantize_index(c, "int8")
    with pytest.raises(ValueError):
        idx.search(c[:2], k=3, rescore_multiplier=2)
    with pytest.raises(ValueError):
        idx.search(np.zeros((2, 5)), k=3)
