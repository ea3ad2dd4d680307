"""A whole static-int8 encoder (tiny BERT) against an independent numpy fake-quantization reference, site by site.

Every linear site of every layer is checked on its own: the reference takes the C encoder's own state just before the
site (its taps, through numpy LayerNorm / attention / GELU), quantizes the site's input with the site's (scale, zero
point), multiplies by the dequantized int8 weights in float64 and applies the epilogue. The C output must agree within
float rounding almost everywhere and within one activation quantization step everywhere (an input exactly on a
rounding boundary may round either way). A wrong scale, zero point, weight scale or epilogue at any single site moves
most of that site's outputs by at least a step, so it cannot hide behind an embedding-cosine threshold.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

import medquant
import quant_reference as ref
from kernel_support import SUPPORT
from medquant.model.architectures import fp32_sites as _fp32_sites
from tiny_bert import random_texts, write_tiny_bert

_erf = np.vectorize(math.erf)


def layer_norm(x, w, b, eps):
    x = x.astype(np.float64)
    mu = x.mean(axis=1, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def gelu(x):
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def fake_quant(x, scale, zp):
    """(clip(rint(x / scale) + zp, 0, 255) - zp) * scale, computed as the core does (float32 multiply by 1/scale)."""
    q = ref.quantize_act(np.asarray(x, np.float32), scale, zp).astype(np.float64)
    return (q - zp) * float(scale)


def attention(qkv, lengths, heads):
    """Softmax(Q K^T / sqrt(d)) V per sequence and head over real tokens ([T, 3H] packed rows -> [T, H])."""
    H = qkv.shape[1] // 3
    d = H // heads
    out = np.zeros((qkv.shape[0], H))
    start = 0
    for n in lengths:
        rows = slice(start, start + n)
        for h in range(heads):
            cols = slice(h * d, (h + 1) * d)
            q, k, v = (qkv[rows, off * H:][:, cols].astype(np.float64) for off in range(3))
            s = q @ k.T / math.sqrt(d)
            p = np.exp(s - s.max(axis=1, keepdims=True))
            out[rows, cols] = (p / p.sum(axis=1, keepdims=True)) @ v
        start += n
    return out


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    d = write_tiny_bert(tmp_path_factory.mktemp("tiny_ref"), hidden=64, layers=2, heads=4, intermediate=128)
    fp32 = medquant.Encoder.from_pretrained(d, n_threads=2)
    texts = random_texts(48, seed=3, max_words=40)
    q = fp32.quantize("int8-static-asym", calibration_texts=texts[:32])
    return fp32, q, texts[32:]


def test_static_int8_encoder_matches_numpy_reference_site_by_site(tiny_pair):
    fp32, q, texts = tiny_pair
    cfg, params, storage, sites = q.config, fp32._fp32, q._storage, q._sites
    fp32_sites = _fp32_sites(params, cfg)
    eps, heads, H = cfg.layer_norm_eps, cfg.num_attention_heads, cfg.hidden_size
    encs = q._encode_tokens(texts, q.max_length)
    ids, mask, tt = q._pad([e.ids for e in encs], [e.type_ids for e in encs])
    hidden, _, taps = q._core.forward(ids, mask, tt, hidden=True, taps=True)
    lengths = mask.sum(axis=1)
    real = mask.astype(bool)

    # embeddings: int8 rows (the numpy reference's quantization, which the stored table must equal) + positions + types
    qe, se = ref.quantize_weight_s8(params["embeddings.word_embeddings.weight"], per_channel=True)
    np.testing.assert_array_equal(storage["embeddings.word_embeddings.weight"], qe)
    np.testing.assert_array_equal(storage["embeddings.word_embeddings.weight_scale"], se)
    pos = np.broadcast_to(np.arange(ids.shape[1]), ids.shape)
    emb = (qe[ids].astype(np.float64) * se[ids][..., None] + params["embeddings.position_embeddings.weight"][pos]
           + params["embeddings.token_type_embeddings.weight"][tt])[real]
    h_in = layer_norm(emb, params["embeddings.LayerNorm.weight"], params["embeddings.LayerNorm.bias"], eps)

    fused_ffn = SUPPORT["int8_exact"]  # FFN_IN writes FFN_OUT's u8 input itself (csrc/encoder.c) where int8 is native
    checked = 0
    for layer in range(cfg.num_hidden_layers):
        p = f"encoder.layer.{layer}."
        names = [n for n in q.site_names if n.startswith(p)]
        t = taps[layer * 4: layer * 4 + 4]

        def site_ref(i, x, residual=None, epi=None):
            name = names[i]
            spec = sites[name]
            assert spec["kind"] == "int8" and spec["act_mode"] == "static" and not spec["act_symmetric"]
            # the reference's own quantization of this site: weights from the fp32 checkpoint, (scale, zero point)
            # from the calibrated range; whatever the encoder holds is what is under test
            w32, _ = fp32_sites[name]
            qw, qs = ref.quantize_weight_s8(w32, per_channel=True)
            scale, zp = ref.qparams_asym(*spec["act_range"])
            w = qw.astype(np.float64) * qs[:, None]
            xq = fake_quant(x, scale, zp)
            y = xq @ w.T + fp32_sites[name][1]
            if epi == "gelu":
                y = gelu(y)
            if residual is not None:
                y = y + residual
            return y, float(scale) * np.abs(w).max(axis=1)

        def check(i, y_c, y_ref, step_w):
            nonlocal checked
            err = np.abs(y_c.astype(np.float64) - y_ref)
            float_tol = 2e-5 * np.abs(y_ref).max() + 1e-6
            assert np.all(err <= float_tol + 1.01 * step_w[None, :]), (names[i], float(err.max()))
            assert np.mean(err <= float_tol) > 0.99, (names[i], float(np.mean(err <= float_tol)))
            checked += 1

        y, sw = site_ref(0, h_in)                                           # QKV
        check(0, t[0], y, sw)
        ctx = attention(t[0], lengths, heads)
        y, sw = site_ref(1, ctx, residual=h_in)                              # attention output + residual
        check(1, t[1], y, sw)
        h1 = layer_norm(t[1], params[p + "attention.output.LayerNorm.weight"],
                        params[p + "attention.output.LayerNorm.bias"], eps)
        y, sw = site_ref(2, h1, epi="gelu")                                  # FFN in + GELU
        if fused_ffn:  # written as u8 with FFN_OUT's (scale, zero point): the tap is that, dequantized
            out_scale, out_zp = ref.qparams_asym(*sites[names[3]]["act_range"])
            y = fake_quant(y, out_scale, out_zp)
            sw = sw + float(out_scale)  # one output step on top of one input step
        check(2, t[2], y, sw)
        y, sw = site_ref(3, t[2], residual=h1)                               # FFN out + residual
        check(3, t[3], y, sw)
        h_in = layer_norm(t[3], params[p + "output.LayerNorm.weight"], params[p + "output.LayerNorm.bias"], eps)
    assert checked == 4 * cfg.num_hidden_layers
    # the last hidden state is the final LayerNorm of the last site's output
    np.testing.assert_allclose(hidden[real], h_in, rtol=0, atol=1e-4)


def test_layernorm_matches_float64_numpy(tiny_pair):
    """The C LayerNorm (csrc/layernorm.c): the last hidden state is the last LayerNorm of the last site's output tap,
    so it is checked against a float64 LayerNorm of that tap, to float32 rounding (as oneDNN's LayerNorm was)."""
    fp32, _, texts = tiny_pair
    cfg, params = fp32.config, fp32._fp32
    encs = fp32._encode_tokens(texts, fp32.max_length)
    ids, mask, tt = fp32._pad([e.ids for e in encs], [e.type_ids for e in encs])
    hidden, _, taps = fp32._core.forward(ids, mask, tt, hidden=True, taps=True)
    p = f"encoder.layer.{cfg.num_hidden_layers - 1}.output.LayerNorm."
    want = layer_norm(taps[-1], params[p + "weight"], params[p + "bias"], cfg.layer_norm_eps)
    err = np.abs(hidden[mask.astype(bool)] - want)
    assert np.all(err <= 1e-6 * np.abs(want).max(axis=1, keepdims=True)), err.max()


def test_layernorm_writes_exactly_the_u8_input_its_layer_would(tiny_pair):
    """The LayerNorms before QKV and FFN_IN write those static int8 layers' u8 input in their own pass (fuse_inputs in
    csrc/encoder.c). Against the same encoder with a SmoothQuant multiplier of exactly 1 on those sites (which turns
    the fusion off: the layers quantize the f32 LayerNorm output themselves, x * 1 == x), every output is identical.
    And the fusion is on: the hook shows QKV the u8 values dequantized (on the quantization grid), not f32 values."""
    from medquant.model.storage import build_core

    _, q, texts = tiny_pair
    storage = dict(q._storage)
    for name in q.site_names:
        if name.endswith(("attention.self.qkv", "intermediate.dense")):
            storage[name + ".act_mul"] = np.ones(q.config.hidden_size, np.float32)
    unfused = build_core(q.config, storage, q._sites, 2)
    encs = q._encode_tokens(texts, q.max_length)
    ids, mask, tt = q._pad([e.ids for e in encs], [e.type_ids for e in encs])
    outs, qkv_in = [], []
    for core in (q._core, unfused):
        obs = [medquant._core.Observer() for _ in q.site_names]
        outs.append(core.forward(ids, mask, tt, hidden=True, taps=True, observers=obs))
        qkv_in.append(obs[4].minmax())  # layer 1's QKV: fed by layer 0's last LayerNorm
    (h0, _, taps0), (h1, _, taps1) = outs
    np.testing.assert_array_equal(h0, h1)
    for a, b in zip(taps0, taps1):
        np.testing.assert_array_equal(a, b)
    spec = q._sites[q.site_names[4]]
    on_grid = [abs(v / spec["act_scale"] - round(v / spec["act_scale"])) < 1e-3 for v in qkv_in[0] + qkv_in[1]]
    assert on_grid == [True, True, False, False], (qkv_in, spec)


def test_reference_catches_a_wrong_parameter_at_one_site(tiny_pair):
    """The check above has teeth: the same encoder with one site's activation scale 2% off, or one site's weight
    scales 1% off, fails it at that site. (A zero point off by one that quantization and matmul share only shifts
    the grid; what the check compares is each site's arithmetic against the reference's own parameters.)"""
    fp32, q, texts = tiny_pair
    name = q.site_names[5]  # layer 1, attention output
    sites = {k: dict(v) for k, v in q._sites.items()}
    sites[name]["act_scale"] = float(np.float32(sites[name]["act_scale"]) * np.float32(1.02))
    bad = medquant.Encoder(config=q.config, tokenizer=q.tokenizer, storage=q._storage, sites=sites, scheme=q.scheme,
                           max_length=q.max_length, model_dir=q.model_dir, name=q.name, fp32=q._fp32, reference=fp32,
                           n_threads=2)
    with pytest.raises(AssertionError, match=name.replace(".", r"\.")):
        test_static_int8_encoder_matches_numpy_reference_site_by_site((fp32, bad, texts))
    # and a weight scale 1% off at one site
    storage = dict(q._storage)
    wname = q.site_names[2] + ".weight_scale"
    storage[wname] = (storage[wname] * np.float32(1.01)).astype(np.float32)
    bad = medquant.Encoder(config=q.config, tokenizer=q.tokenizer, storage=storage, sites=q._sites, scheme=q.scheme,
                           max_length=q.max_length, model_dir=q.model_dir, name=q.name, fp32=q._fp32, reference=fp32,
                           n_threads=2)
    with pytest.raises(AssertionError, match=q.site_names[2].replace(".", r"\.")):
        test_static_int8_encoder_matches_numpy_reference_site_by_site((fp32, bad, texts))
