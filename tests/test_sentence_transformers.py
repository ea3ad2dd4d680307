"""sentence-transformers models as they are: pooling / Normalize / prompts / lower-casing from the model's own files,
checked against sentence-transformers itself; saves that Hugging Face refuses when quantized and loads when fp32;
sentence-transformers' encode keywords, the BEIR / MTEB protocol, and model names from the local Hugging Face cache.

sentence-transformers and transformers are test-only dependencies (with the pinned CPU torch)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import medquant
from medquant import CheckpointError
from medquant.eval.retrieval import quantize_embeddings
from conftest import require
from tiny_bert import write_tiny_bert

st = require("sentence_transformers")

TEXTS = ["What are the symptoms of glaucoma?", "Glaucoma is a group of diseases that damage the optic nerve.",
         "HEART disease", "x", "How many people are affected by diabetes? " * 6]
ST_TYPE = "sentence_transformers.models."


def write_st_model(directory: Path, tokenizer_dir: Path, *, pooling="mean", normalize=False, prompts=None,
                   default_prompt_name=None, similarity=None, lower=False, legacy=True, extra_modules=(),
                   pooling_extra=None, seed=0) -> Path:
    """A tiny random BERT with the MiniLM tokenizer laid out as a sentence-transformers directory."""
    d = write_tiny_bert(directory, tokenizer_dir, seed=seed)
    modules = [{"idx": 0, "name": "0", "path": "", "type": ST_TYPE + "Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": ST_TYPE + "Pooling"}]
    (d / "1_Pooling").mkdir()
    if legacy:
        keys = {"cls": "pooling_mode_cls_token", "max": "pooling_mode_max_tokens", "mean": "pooling_mode_mean_tokens",
                "mean_sqrt_len_tokens": "pooling_mode_mean_sqrt_len_tokens",
                "weightedmean": "pooling_mode_weightedmean_tokens", "lasttoken": "pooling_mode_lasttoken"}
        pool = {"word_embedding_dimension": 32, **{k: (m == pooling) for m, k in keys.items()}}
    else:
        pool = {"embedding_dimension": 32, "pooling_mode": pooling, "include_prompt": True}
    pool.update(pooling_extra or {})
    (d / "1_Pooling" / "config.json").write_text(json.dumps(pool))
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": ST_TYPE + "Normalize"})
        (d / "2_Normalize").mkdir()
    for i, m in enumerate(extra_modules):
        modules.append({"idx": len(modules), "name": str(len(modules)), "path": f"{len(modules)}_{m}",
                        "type": ST_TYPE + m})
    (d / "modules.json").write_text(json.dumps(modules))
    (d / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 64, "do_lower_case": lower}))
    cfg = {"prompts": prompts or {}, "default_prompt_name": default_prompt_name}
    if similarity:
        cfg["similarity_fn_name"] = similarity
    (d / "config_sentence_transformers.json").write_text(json.dumps(cfg))
    return d


@pytest.fixture(scope="module")
def minilm_dir():
    return medquant.Encoder.from_pretrained().model_dir


def _st(path):
    return st.SentenceTransformer(str(path), device="cpu")


VARIANTS = {
    "cls": dict(pooling="cls"),
    "cls-normalize": dict(pooling="cls", normalize=True),
    "mean-normalize": dict(pooling="mean", normalize=True),
    "max": dict(pooling="max"),
    "mean-sqrt-len": dict(pooling="mean_sqrt_len_tokens", normalize=True),
    "weightedmean": dict(pooling="weightedmean"),
    "lasttoken": dict(pooling="lasttoken", normalize=True),
    "cls-new-format": dict(pooling="cls", legacy=False),
    "lower-case": dict(pooling="mean", lower=True),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_embeddings_equal_sentence_transformers(tmp_path, minilm_dir, variant):
    d = write_st_model(tmp_path / variant, minilm_dir, **VARIANTS[variant])
    enc = medquant.Encoder.from_pretrained(d, n_threads=1)
    assert enc.sentence_config.pooling == VARIANTS[variant]["pooling"]
    assert enc.sentence_config.normalize == VARIANTS[variant].get("normalize", False)
    ours = enc.encode(TEXTS, batch_size=2)
    theirs = _st(d).encode(TEXTS, batch_size=2)
    np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0)
    # the mean-pooled vectors of before were far from these (the point of reading the config)
    if VARIANTS[variant]["pooling"] == "cls":
        mean = enc.encode(TEXTS, pooling="mean", normalize=True)
        cos = np.sum(mean * theirs, 1) / np.linalg.norm(theirs, axis=1)
        assert cos.min() < 0.99


def test_prompts_follow_sentence_transformers(tmp_path, minilm_dir):
    prompts = {"query": "query: ", "document": "passage: ", "clinical": "Represent the clinical note: "}
    d = write_st_model(tmp_path / "prompts", minilm_dir, pooling="cls", normalize=True, prompts=prompts)
    enc, ref = medquant.Encoder.from_pretrained(d, n_threads=1), _st(d)
    np.testing.assert_allclose(enc.encode_query(TEXTS), ref.encode_query(TEXTS), atol=1e-5, rtol=0)
    np.testing.assert_allclose(enc.encode_document(TEXTS), ref.encode_document(TEXTS), atol=1e-5, rtol=0)
    np.testing.assert_allclose(enc.encode(TEXTS, prompt_name="clinical"), ref.encode(TEXTS, prompt_name="clinical"),
                               atol=1e-5, rtol=0)
    np.testing.assert_allclose(enc.encode(TEXTS, prompt="Q: "), ref.encode(TEXTS, prompt="Q: "), atol=1e-5, rtol=0)
    np.testing.assert_allclose(enc.encode(TEXTS), ref.encode(TEXTS), atol=1e-5, rtol=0)  # no prompt by default
    assert not np.allclose(enc.encode_query(TEXTS), enc.encode(TEXTS), atol=1e-3)
    # BEIR / MTEB protocol: queries with the query prompt, corpus dicts with the document prompt, kwargs tolerated
    corpus = [{"title": "Glaucoma", "text": t} for t in TEXTS]
    np.testing.assert_array_equal(enc.encode_queries(TEXTS, batch_size=2, convert_to_tensor=False, task_name="x"),
                                  enc.encode_query(TEXTS))
    got = enc.encode_corpus(corpus, batch_size=2, show_progress_bar=False, unknown_option=1)
    np.testing.assert_array_equal(got, enc.encode_document([f"Glaucoma {t}" for t in TEXTS]))
    np.testing.assert_array_equal(enc.encode_corpus({"title": ["Glaucoma"] * len(TEXTS), "text": TEXTS}), got)
    np.testing.assert_array_equal(enc.encode_corpus([{"text": t} for t in TEXTS]), enc.encode_document(TEXTS))


def test_default_prompt_and_lower_case_inputs_not_changed(tmp_path, minilm_dir):
    d = write_st_model(tmp_path / "default", minilm_dir, prompts={"query": "query: "}, default_prompt_name="query",
                       lower=True)
    enc = medquant.Encoder.from_pretrained(d, n_threads=1)
    texts = list(TEXTS)
    np.testing.assert_allclose(enc.encode(texts), _st(d).encode(texts), atol=1e-5, rtol=0)
    assert texts == TEXTS  # the caller's list is not lower-cased or prompted in place
    np.testing.assert_array_equal(enc.encode(texts), enc.encode(texts, prompt_name="query"))


@pytest.mark.parametrize("kwargs, match", [
    (dict(extra_modules=("Dense",)), "Dense are not supported"),
    (dict(pooling_extra={"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": True}), "concatenates"),
    (dict(pooling_extra={"include_prompt": False}), "include_prompt"),
    (dict(legacy=False, pooling_extra={"pooling_mode": "sum"}), "pooling mode 'sum' is not supported"),
    (dict(prompts={"query": 3}), "prompts"),
    (dict(similarity="hamming"), "similarity_fn_name"),
    (dict(prompts={"query": "q: "}, default_prompt_name="doc"), "default_prompt_name"),
])
def test_unsupported_sentence_configs_are_refused(tmp_path, minilm_dir, kwargs, match):
    d = write_st_model(tmp_path / "bad", minilm_dir, **kwargs)
    with pytest.raises(CheckpointError, match=match):
        medquant.Encoder.from_pretrained(d, n_threads=1)


def test_quantized_save_refused_by_hugging_face_fp32_save_loads(tmp_path, minilm_dir):
    transformers = require("transformers")
    import torch

    d = write_st_model(tmp_path / "cls", minilm_dir, pooling="cls", normalize=True, prompts={"query": "q: "})
    enc = medquant.Encoder.from_pretrained(d, n_threads=1)
    q = enc.quantize("int8-static-asym", calibration_texts=TEXTS * 4)
    qdir = q.save_pretrained(tmp_path / "int8")
    assert not (qdir / "modules.json").exists() and (qdir / "medquant_modules.json").exists()
    with pytest.raises((ValueError, OSError, KeyError)):
        transformers.AutoModel.from_pretrained(str(qdir))
    with pytest.raises(Exception):
        st.SentenceTransformer(str(qdir), device="cpu")
    back = medquant.Encoder.from_pretrained(qdir, n_threads=1)  # medquant itself reads it, pooling included
    assert back.sentence_config.pooling == "cls" and back.sentence_config.prompts == {"query": "q: "}
    np.testing.assert_array_equal(back.encode_query(TEXTS), q.encode_query(TEXTS))

    fdir = enc.save_pretrained(tmp_path / "fp32")
    assert (fdir / "modules.json").exists() and (fdir / "1_Pooling" / "config.json").exists()
    hf = transformers.AutoModel.from_pretrained(str(fdir)).eval()
    ids, mask, tt = enc.tokenize(TEXTS)
    with torch.no_grad():
        out = hf(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long(),
                 token_type_ids=torch.from_numpy(tt).long()).last_hidden_state.numpy()
    ours = enc.forward(ids, mask, tt)
    real = mask.astype(bool)
    np.testing.assert_allclose(ours[real], out[real], atol=1e-4, rtol=0)
    np.testing.assert_allclose(enc.encode(TEXTS), _st(fdir).encode(TEXTS), atol=1e-5, rtol=0)


def test_sentence_transformers_keywords(tmp_path, minilm_dir):
    d = write_st_model(tmp_path / "kw", minilm_dir, pooling="mean", normalize=True)
    enc, ref = medquant.Encoder.from_pretrained(d, n_threads=1), _st(d)
    one = enc.encode(TEXTS[0])
    assert one.shape == (32,)
    np.testing.assert_array_equal(one, enc.encode(TEXTS[:1])[0])
    np.testing.assert_array_equal(enc.encode(TEXTS, normalize_embeddings=False), enc.encode(TEXTS, normalize=False))
    assert not np.allclose(np.linalg.norm(enc.encode(TEXTS, normalize_embeddings=False), axis=1), 1)
    as_list = enc.encode(TEXTS, convert_to_numpy=False)
    assert isinstance(as_list, list) and len(as_list) == len(TEXTS)
    tensor = enc.encode(TEXTS, convert_to_tensor=True)
    assert tuple(tensor.shape) == (len(TEXTS), 32)
    toks = enc.encode(TEXTS, output_value="token_embeddings")
    theirs = ref.encode(TEXTS, output_value="token_embeddings")
    assert [t.shape for t in toks] == [tuple(t.shape) for t in theirs]
    for a, b in zip(toks, theirs):
        np.testing.assert_allclose(a, b.numpy(), atol=1e-5, rtol=0)
    for precision in ("int8", "uint8", "binary", "ubinary"):
        got = enc.encode(TEXTS, precision=precision)
        emb = enc.encode(TEXTS)
        np.testing.assert_array_equal(got, quantize_embeddings(emb, precision))
    with pytest.raises(ValueError, match="calibrated on 1"):
        enc.encode(TEXTS[0], precision="int8")


def test_quantize_embeddings_matches_sentence_transformers():
    from sentence_transformers.util.quantization import quantize_embeddings as st_quantize

    rng = np.random.default_rng(3)
    emb = rng.standard_normal((50, 37)).astype(np.float32)
    calib = rng.standard_normal((80, 37)).astype(np.float32)
    for precision in ("float32", "int8", "uint8", "binary", "ubinary"):
        ours, theirs = quantize_embeddings(emb, precision), st_quantize(emb, precision)
        assert ours.dtype == theirs.dtype
        np.testing.assert_array_equal(ours, theirs)
    for precision in ("int8", "uint8"):
        np.testing.assert_array_equal(quantize_embeddings(emb, precision, calibration_embeddings=calib),
                                      st_quantize(emb, precision, calibration_embeddings=calib))
        ranges = np.stack([calib.min(0), calib.max(0)])
        np.testing.assert_array_equal(quantize_embeddings(emb, precision, ranges=ranges),
                                      st_quantize(emb, precision, ranges=ranges))
    with pytest.raises(ValueError, match="precision"):
        quantize_embeddings(emb, "int4")


def test_model_name_from_hugging_face_cache(tmp_path, monkeypatch, tiny_dir):
    cache = tmp_path / "hub"
    snap = cache / "models--medlab--tiny-bert" / "snapshots" / "0123abcd"
    shutil.copytree(tiny_dir, snap)
    (cache / "models--medlab--tiny-bert" / "refs").mkdir()
    (cache / "models--medlab--tiny-bert" / "refs" / "main").write_text("0123abcd")
    bare = cache / "models--sentence-transformers--tiny-st" / "snapshots" / "feed"
    shutil.copytree(tiny_dir, bare)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    ref = medquant.Encoder.from_pretrained(tiny_dir, n_threads=1).encode(TEXTS)
    enc = medquant.Encoder.from_pretrained("medlab/tiny-bert", n_threads=1)
    assert enc.model_dir == snap
    np.testing.assert_array_equal(enc.encode(TEXTS), ref)
    assert medquant.Encoder.from_pretrained("tiny-st", n_threads=1).model_dir == bare  # as sentence-transformers
    shutil.copytree(tiny_dir, bare.parent / "beef")  # two snapshots and no ref: ambiguous
    with pytest.raises(CheckpointError, match="2 snapshots"):
        medquant.Encoder.from_pretrained("tiny-st", n_threads=1)
    with pytest.raises(CheckpointError, match="Hugging Face cache"):
        medquant.Encoder.from_pretrained("medlab/not-there", n_threads=1)


def test_evaluate_uses_the_models_pooling_and_prompts(tmp_path, minilm_dir):
    from medquant.eval.datasets import RetrievalDataset
    from medquant.eval.retrieval import search

    d = write_st_model(tmp_path / "eval", minilm_dir, pooling="cls", normalize=True,
                       prompts={"query": "query: ", "passage": "passage: "})
    enc = medquant.Encoder.from_pretrained(d, n_threads=1)
    docs = {f"d{i}": t for i, t in enumerate(TEXTS)}
    queries = {"q0": "glaucoma symptoms", "q1": "diabetes", "q2": "heart"}
    qrels = {"q0": {"d0": 1, "d1": 1}, "q1": {"d4": 1}, "q2": {"d2": 1}}
    ds = RetrievalDataset(name="toy", corpus=docs, queries=queries, qrels=qrels)
    res = medquant.evaluate(enc, ds, index_kinds=(), measure_disk=False, warmup=False, n_boot=50, ks=(1, 3), k=5, main_metrics=("nDCG@3",))
    row = res.iloc[0]
    assert row["embedding"].startswith("cls pooling, cosine") and "'query: '" in row["embedding"]
    # the ranking evaluate scored is the one of the model's own query / passage embeddings
    q = enc.encode_query(list(queries.values()))
    c = enc.encode_document(list(docs.values()))
    _, idx = search(q, c, k=5)
    pq = res.attrs["per_query"][row["scheme"]]
    top1 = {qid: f"d{idx[i, 0]}" for i, qid in enumerate(queries)}
    assert pq["P@1"].to_dict() == {qid: float(top1[qid] in qrels[qid]) for qid in queries}
    res_mean = medquant.evaluate(enc, ds, index_kinds=(), measure_disk=False, warmup=False, n_boot=50, ks=(1, 3),
                                 k=5, pooling="mean", main_metrics=("nDCG@3",))
    assert res_mean.iloc[0]["embedding"].startswith("mean pooling")


def test_core_pooling_modes_against_numpy(tiny):
    """Every pooling mode of the C core (csrc/pooling.h) against numpy on the same hidden states."""
    from medquant.model.sentence import POOLING_MODES

    ids, mask, tt = tiny.tokenize(TEXTS)
    for mode, code in POOLING_MODES.items():
        hidden, pooled, _ = tiny._core.forward(ids, mask, tt, pooling=code, normalize=False, hidden=True)
        for b, n in enumerate(mask.sum(1)):
            h = hidden[b, :n].astype(np.float64)
            w = np.arange(1, n + 1, dtype=np.float64)[:, None]
            want = {"cls": h[0], "lasttoken": h[-1], "max": h.max(0), "mean": h.mean(0),
                    "mean_sqrt_len_tokens": h.sum(0) / np.sqrt(n), "weightedmean": (w * h).sum(0) / w.sum()}[mode]
            np.testing.assert_allclose(pooled[b], want, rtol=1e-5, atol=1e-6, err_msg=mode)
        _, normed, _ = tiny._core.forward(ids, mask, tt, pooling=code, normalize=True, hidden=False)
        np.testing.assert_allclose(normed, pooled / np.linalg.norm(pooled, axis=1, keepdims=True), atol=1e-6)
