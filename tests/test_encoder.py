"""Foundation: the C encoder matches Hugging Face BertModel, is batch-invariant, and rejects bad input clearly."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import medquant
import quant_reference as ref
from test_attention import int8_reference
from tiny_bert import random_texts, write_tiny_bert

torch.set_num_threads(2)


def hf_last_hidden(model_dir, ids, mask, tt):
    from transformers import BertModel

    model = BertModel.from_pretrained(str(model_dir), add_pooling_layer=False).eval()
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids.astype(np.int64)), attention_mask=torch.from_numpy(mask.astype(np.int64)),
                    token_type_ids=torch.from_numpy(tt.astype(np.int64)))
    return out.last_hidden_state.numpy()


def st_mean_pooling(hidden, mask):
    """sentence-transformers' recipe: mask-aware mean over tokens, then L2 normalisation."""
    m = mask[..., None].astype(np.float32)
    emb = (hidden * m).sum(1) / np.clip(m.sum(1), 1e-9, None)
    return emb / np.clip(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12, None)


def test_runtime_info():
    info = medquant.runtime_info()
    assert info["onednn_version"].startswith("3.")
    assert info["threading"] == "OpenMP"
    assert info["cpu_isa"]
    assert info["max_threads"] >= 1


def check_parity(enc, model_dir, texts, max_length):
    ids, mask, tt = enc.tokenize(texts, max_length=max_length)
    lengths = mask.sum(1)
    assert len(texts) >= 64
    assert lengths.max() == max_length, "some texts must be truncated"
    assert lengths.min() < max_length // 4, "mixed lengths expected"
    ours = enc.forward(ids, mask, tt)
    ref = hf_last_hidden(model_dir, ids, mask, tt)
    m = mask.astype(bool)
    assert np.abs(ours[m] - ref[m]).max() <= 1e-4
    assert np.all(ours[~m] == 0)
    emb = enc.encode(texts, max_length=max_length, batch_size=16)
    cos = np.sum(emb * st_mean_pooling(ref, mask), axis=1)
    assert cos.min() >= 0.99999


def test_minilm_matches_huggingface(minilm, minilm_dir, mixed_texts):
    check_parity(minilm, minilm_dir, mixed_texts, max_length=128)


def test_random_bert_base_matches_huggingface(random_base_dir, mixed_texts):
    enc = medquant.Encoder.from_pretrained(random_base_dir)
    assert enc.config.hidden_size == 768 and enc.config.num_attention_heads == 12 and enc.config.num_hidden_layers == 4
    check_parity(enc, random_base_dir, mixed_texts, max_length=96)


def test_cls_pooling_and_unnormalized(minilm, minilm_dir, medquad_questions):
    texts = medquad_questions[:20]
    ids, mask, tt = minilm.tokenize(texts)
    ref = hf_last_hidden(minilm_dir, ids, mask, tt)
    cls = minilm.encode(texts, pooling="cls", normalize=False)
    assert np.abs(cls - ref[:, 0]).max() <= 1e-4
    mean = minilm.encode(texts, normalize=False)
    m = mask[..., None]
    assert np.abs(mean - (ref * m).sum(1) / m.sum(1)).max() <= 1e-4


def test_batch_invariance(minilm, mixed_texts):
    base = minilm.encode(mixed_texts, batch_size=32)
    for bs in (1, 7, 64):
        assert np.abs(minilm.encode(mixed_texts, batch_size=bs) - base).max() <= 1e-5
    perm = np.random.default_rng(3).permutation(len(mixed_texts))
    shuffled = minilm.encode([mixed_texts[i] for i in perm], batch_size=32)
    assert np.abs(shuffled - base[perm]).max() <= 1e-5
    single = np.concatenate([minilm.encode([t]) for t in mixed_texts[:10]])
    assert np.abs(single - base[:10]).max() <= 1e-5


def test_threads_do_not_change_results(minilm, medquad_questions):
    texts = medquad_questions[:16]
    base = minilm.encode(texts)
    try:
        minilm.set_threads(1)
        assert minilm.n_threads == 1
        assert np.abs(minilm.encode(texts) - base).max() <= 1e-5
    finally:
        minilm.set_threads(2)
    with pytest.raises(ValueError):
        minilm.set_threads(0)


def test_threads_do_not_change_the_layernorm(minilm, medquad_questions):
    """LayerNorm (csrc/layernorm.c) splits rows over the threads, each row computed by one thread in a fixed order:
    with its u8 output fused (static int8), 1 and 2 threads give the same bits. Checked on layer 0's QKV output, which
    depends only on the embeddings, their LayerNorm with the fused quantization and an integer matmul (exact in any
    order, also where the int8 layer is emulated in f32), over enough tokens that the LayerNorm runs on both threads."""
    q = minilm.quantize("int8-static-asym", calibration_texts=medquad_questions[16:48])
    ids, mask, tt = q.tokenize(medquad_questions[:16])
    assert mask.sum() * q.hidden_size >= 1 << 15  # csrc/layernorm.c: MQ_LN_PAR_MIN
    taps = []
    for n in (1, 2):
        q.set_threads(n)
        taps.append(q.forward_taps(ids, mask, tt)[1][0])
    np.testing.assert_array_equal(taps[0], taps[1])


def test_forward_input_validation(minilm):
    ids = np.array([[101, 2054, 2003, 102]], dtype=np.int64)
    out = minilm.forward(ids)
    assert out.shape == (1, 4, 384) and ids.dtype == np.int64  # the caller's array is not converted in place
    with pytest.raises(TypeError, match="integers"):
        minilm.forward(ids.astype(np.float32))
    with pytest.raises(ValueError, match="vocabulary"):
        minilm.forward(np.array([[101, 40000, 102]]))
    with pytest.raises(ValueError, match="vocabulary"):
        minilm.forward(np.array([[101, -5, 102]]))
    with pytest.raises(ValueError, match="right-padded"):
        minilm.forward(np.array([[101, 2054, 102]]), np.array([[1, 0, 1]]))
    with pytest.raises(ValueError, match="no tokens"):
        minilm.forward(np.array([[101, 2054, 102]]), np.array([[0, 0, 0]]))
    with pytest.raises(ValueError, match="shape"):
        minilm.forward(np.array([[101, 2054, 102]]), np.array([[1, 1]]))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        minilm.forward(np.full((1, 600), 101))
    with pytest.raises(ValueError, match="token type"):
        minilm.forward(np.array([[101, 102]]), token_type_ids=np.array([[0, 5]]))
    with pytest.raises(ValueError, match="empty"):
        minilm.forward(np.zeros((0, 4), np.int32))
    # non-contiguous input is accepted (copied), result identical
    big = np.array([[101, 0, 2054, 0, 102, 0]])
    assert np.array_equal(minilm.forward(big[:, ::2]), minilm.forward(np.array([[101, 2054, 102]])))


def test_encode_input_validation(minilm):
    with pytest.raises(ValueError, match="empty"):
        minilm.encode([])
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        minilm.encode(["fine", 3])
    with pytest.raises(TypeError, match="single string"):
        minilm.encode(b"bytes")
    with pytest.raises(ValueError, match="pooling"):
        minilm.encode(["x"], pooling="sum")
    with pytest.raises(ValueError, match="max_length"):
        minilm.encode(["x"], max_length=10_000)
    out = minilm.encode(["", "a" * 100_000])  # empty and very long texts work (truncated)
    assert out.shape == (2, 384) and np.isfinite(out).all()


def _attention_ref(qkv, lengths, heads, round_bf16):
    """softmax(Q K^T / sqrt(d)) V per sequence and head over packed rows, in float64; with round_bf16, Q, K, V and the
    probabilities rounded to bf16 first (what bf16 attention multiplies)."""
    H = qkv.shape[1] // 3
    d = H // heads
    rnd = (lambda x: ref.bf16(np.asarray(x, np.float32)).astype(np.float64)) if round_bf16 else (lambda x: x)
    out, start = np.zeros((qkv.shape[0], H)), 0
    for n in lengths:
        rows = slice(start, start + n)
        for h in range(heads):
            cols = slice(h * d, (h + 1) * d)
            q, k, v = (rnd(qkv[rows, off * H:][:, cols].astype(np.float64)) for off in range(3))
            s = q @ k.T / np.sqrt(d)
            p = np.exp(s - s.max(axis=1, keepdims=True))
            out[rows, cols] = rnd(p / p.sum(axis=1, keepdims=True)) @ v
        start += n
    return out


ATTENTION_REFS = {  # precision: the float64 reference of what it computes
    "bf16": lambda qkv, lengths, heads: _attention_ref(qkv, lengths, heads, round_bf16=True),
    "int8": int8_reference,  # tests/test_attention.py
}


@pytest.mark.parametrize("precision", sorted(ATTENTION_REFS))
def test_reduced_precision_attention_matches_its_reference(tmp_path, precision):
    """attention="bf16" multiplies bf16-rounded Q, K, V and probabilities with f32 accumulation (natively or emulated,
    the same products); attention="int8" quantizes Q, K per token, V per column and the probabilities to u8, with
    exact integer products. Layer 0's attention-output site, from the encoder's own QKV tap, matches a float64
    reference that does exactly that, and visibly differs from unrounded attention (the rounding happened)."""
    d = write_tiny_bert(tmp_path, hidden=64, layers=1, heads=4, intermediate=128)
    fp32 = medquant.Encoder.from_pretrained(d, n_threads=2)
    enc = fp32.quantize(medquant.QuantScheme(name=f"fp32-{precision}-attention", attention=precision))
    info = enc.attention_info()
    assert info["precision"] == precision and info["kernel"].startswith("medquant:attention_")
    assert fp32.attention_info()["precision"] == "fp32"
    texts = random_texts(12, seed=5, max_words=60)
    encs = enc._encode_tokens(texts, enc.max_length)
    ids, mask, tt = enc._pad([e.ids for e in encs], [e.type_ids for e in encs])
    _, _, taps = enc._core.forward(ids, mask, tt, hidden=False, taps=True)
    params, cfg = fp32._fp32, fp32.config
    real = mask.astype(bool)
    pos = np.broadcast_to(np.arange(ids.shape[1]), ids.shape)
    emb = (params["embeddings.word_embeddings.weight"][ids] + params["embeddings.position_embeddings.weight"][pos]
           + params["embeddings.token_type_embeddings.weight"][tt])[real].astype(np.float64)
    mu, var = emb.mean(1, keepdims=True), emb.var(1, keepdims=True)
    h_in = (emb - mu) / np.sqrt(var + cfg.layer_norm_eps) * params["embeddings.LayerNorm.weight"] \
        + params["embeddings.LayerNorm.bias"]
    w = params["encoder.layer.0.attention.output.dense.weight"].astype(np.float64)
    b = params["encoder.layer.0.attention.output.dense.bias"]
    lengths = mask.sum(1)
    got = taps[1].astype(np.float64)
    errs = {}
    for reduced in (True, False):
        ctx = (ATTENTION_REFS[precision](taps[0], lengths, cfg.num_attention_heads) if reduced
               else _attention_ref(taps[0], lengths, cfg.num_attention_heads, round_bf16=False))
        errs[reduced] = np.abs(got - (ctx @ w.T + b + h_in))
    tol = 2e-5 * np.abs(got).max()
    assert np.mean(errs[True] <= tol) > 0.99 and errs[True].max() < 4 * tol, float(errs[True].max())
    assert errs[False].max() > 5 * errs[True].max(), f"no {precision} rounding is visible"


def test_stage_seconds_account_for_the_forward(tmp_path):
    """stage_seconds: every stage takes time inside the forward, the stages never add up to more than the forward, the
    sums grow with each call and start again after a reset."""
    d = write_tiny_bert(tmp_path, hidden=64, layers=2, heads=4, intermediate=128)
    enc = medquant.Encoder.from_pretrained(d, n_threads=2)
    enc.stage_seconds(reset=True)
    texts = random_texts(16, seed=3, max_words=40)
    enc.encode(texts, batch_size=8, show_progress_bar=False)
    first = enc.stage_seconds()
    assert set(first) == {"forward", "embeddings", "layernorm", "attention", "pooling", "linear"}
    assert all(first[k] > 0 for k in ("forward", "embeddings", "layernorm", "attention", "pooling"))
    parts = sum(v for k, v in first.items() if k not in ("forward", "linear"))
    assert parts <= first["forward"] and first["linear"] == pytest.approx(first["forward"] - parts)
    enc.encode(texts, batch_size=8, show_progress_bar=False)
    second = enc.stage_seconds(reset=True)
    assert all(second[k] > first[k] for k in ("forward", "attention", "layernorm"))
    assert all(v == 0 for v in enc.stage_seconds().values())
