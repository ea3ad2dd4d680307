"""The fused attention kernel alone (``medquant._core.attention``, the kernel the encoder runs): against a float64
reference, bf16 rounding, bits independent of thread count, batch composition and kernel path, NaN propagation and
bad input."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from medquant import _core

LENGTHS = np.array([1, 5, 16, 17, 40, 100, 3, 33], np.int32)


def make_qkv(lengths, heads, d, seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((int(lengths.sum()), 3 * heads * d)) * scale).astype(np.float32)


def bf16_round(x):
    """Round to bf16, nearest even, back to float32 (what the core does)."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
    return u.astype(np.uint32).view(np.float32)


def int8_reference(qkv, lengths, heads):
    """The int8 scheme of attention="int8" in float64 (medquant/quant/schemes.py): Q and K quantized per token, V per
    column, symmetric int8 with absmax / 127 scales; the probabilities exp(s - max) as u8 of 1/255, normalized by
    their sum."""
    T, H3 = qkv.shape
    H = H3 // 3
    d = H // heads
    out = np.zeros((T, H))

    def quant(x, axis):
        scale = np.abs(x).max(axis=axis, keepdims=True) / 127.0
        return np.round(x / np.where(scale > 0, scale, 1)) * scale

    start = 0
    for n in lengths:
        rows = slice(start, start + n)
        for h in range(heads):
            q, k, v = (quant(qkv[rows, o * H + h * d:o * H + (h + 1) * d].astype(np.float64), a)
                       for o, a in ((0, 1), (1, 1), (2, 0)))
            s = q @ k.T / np.sqrt(d)
            p = np.round(np.exp(s - s.max(1, keepdims=True)) * 255)
            out[rows, h * d:(h + 1) * d] = (p @ v) / p.sum(1, keepdims=True)
        start += n
    return out


def reference(qkv, lengths, heads, bf16=False):
    """Softmax(Q K^T / sqrt(d)) V per sequence and head in float64 (bf16: Q, K, V and P rounded first)."""
    T, H3 = qkv.shape
    H = H3 // 3
    d = H // heads
    x = bf16_round(qkv) if bf16 else qkv
    out = np.zeros((T, H))
    start = 0
    for n in lengths:
        rows = slice(start, start + n)
        for h in range(heads):
            q = x[rows, h * d:(h + 1) * d].astype(np.float64)
            k = x[rows, H + h * d:H + (h + 1) * d].astype(np.float64)
            v = x[rows, 2 * H + h * d:2 * H + (h + 1) * d].astype(np.float64)
            s = q @ k.T / np.sqrt(d)
            p = np.exp(s - s.max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
            if bf16:
                p = bf16_round(p.astype(np.float32)).astype(np.float64)
            out[rows, h * d:(h + 1) * d] = p @ v
        start += n
    return out


@pytest.mark.parametrize("heads,d", [(4, 32), (3, 24), (2, 64), (1, 7)])
def test_attention_matches_float64(heads, d):
    """Head dims that are and are not multiples of the kernel's 16-wide blocks, sequence lengths around its 6-row
    tiles and 16-column blocks; scores spread wide enough (scale 2) that the softmax is far from uniform."""
    qkv = make_qkv(LENGTHS, heads, d, seed=d, scale=2.0)
    got = _core.attention(qkv, LENGTHS, heads, n_threads=2)
    want = reference(qkv, LENGTHS, heads)
    assert got.dtype == np.float32 and got.shape == (qkv.shape[0], heads * d)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * np.abs(want).max())


def test_bf16_attention_rounds_q_k_v_and_p():
    heads, d = 4, 32
    qkv = make_qkv(LENGTHS, heads, d, seed=3, scale=2.0)
    got = _core.attention(qkv, LENGTHS, heads, bf16=True, n_threads=2)
    want = reference(qkv, LENGTHS, heads, bf16=True)
    exact = reference(qkv, LENGTHS, heads)
    scale = np.abs(want).max()
    # f32 accumulation vs float64, and a probability rounded on the other side of a bf16 tie now and then
    assert np.abs(got - want).max() < 4e-3 * scale
    assert np.abs(got - want).mean() < 1e-5 * scale
    assert np.abs(got - exact).mean() > 20 * np.abs(got - want).mean()  # the rounding happened


@pytest.mark.parametrize("heads,d", [(4, 32), (3, 24), (2, 64), (1, 7)])
def test_int8_attention_matches_its_scheme(heads, d):
    """attention="int8" against the same quantization done in float64: what is left is f32 arithmetic and a value
    rounded on the other side of a tie now and then; far closer to that than to unquantized attention, whose
    distance from it is the quantization error (a few tenths of a percent of the largest value, on average)."""
    qkv = make_qkv(LENGTHS, heads, d, seed=d, scale=2.0)
    got = _core.attention(qkv, LENGTHS, heads, int8=True, n_threads=2)
    want, exact = int8_reference(qkv, LENGTHS, heads), reference(qkv, LENGTHS, heads)
    scale = np.abs(exact).max()
    assert got.dtype == np.float32 and got.shape == (qkv.shape[0], heads * d)
    assert np.abs(got - want).mean() < 1e-5 * scale
    quant_err = np.abs(got - exact).mean()
    assert 5e-4 * scale < quant_err < 1e-2 * scale
    assert quant_err > 100 * np.abs(got - want).mean()


@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8"])
def test_attention_bits_do_not_depend_on_threads_or_batch(precision):
    """One thread, two, three (as far as this machine has CPUs); the whole batch (a task per sequence) or each sequence alone (a task per head)."""
    heads, d = 4, 32
    kw = {"bf16": precision == "bf16", "int8": precision == "int8"}
    qkv = make_qkv(LENGTHS, heads, d, seed=7)
    base = _core.attention(qkv, LENGTHS, heads, n_threads=1, **kw)
    for n in range(2, min(4, len(os.sched_getaffinity(0))) + 1):
        got = _core.attention(qkv, LENGTHS, heads, n_threads=n, **kw)
        assert np.array_equal(got.view(np.uint32), base.view(np.uint32))
    start = 0
    for n in LENGTHS:
        alone = _core.attention(qkv[start:start + n], np.array([n], np.int32), heads, n_threads=2, **kw)
        assert np.array_equal(alone.view(np.uint32), base[start:start + n].view(np.uint32)), n
        start += n


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_heads_staged_in_groups_give_the_same_bits(precision):
    """Where int8 attention runs on vpdpbusd (bf16 on vdpbf16ps), a task that is a whole sequence stages its heads
    together as far as their blocks stay in a core's cache: BERT-base's 12 heads of 64 over 260-300 tokens in groups
    of 6 (int8) or 4 (bf16), over 17 tokens all 12 at once. The bits are those of each sequence alone (a task per
    head, each staged by itself), and close to the scheme computed in float64. (Elsewhere the same assertions hold
    for the other paths.)"""
    heads, d = 12, 64
    lengths = np.array([300, 17, 290, 260], np.int32)
    qkv = make_qkv(lengths, heads, d, seed=3, scale=2.0)
    kw = {precision: True}
    got = _core.attention(qkv, lengths, heads, n_threads=2, **kw)
    start = 0
    for n in lengths:
        alone = _core.attention(qkv[start:start + n], np.array([n], np.int32), heads, n_threads=2, **kw)
        assert np.array_equal(alone.view(np.uint32), got[start:start + n].view(np.uint32)), n
        start += n
    want = int8_reference(qkv, lengths, heads) if precision == "int8" else reference(qkv, lengths, heads, bf16=True)
    assert np.abs(got - want).mean() < 1e-5 * np.abs(want).max()


# (heads, head_dim, scale of Q/K/V): the encoder's kind of shape; an odd head dimension (a bf16 pair half empty);
# tiny values whose products are denormal (bf16 attention flushes them, as vdpbf16ps does, on every path)
PATH_CASES = [(3, 24, 2.0), (2, 7, 1.0), (2, 16, 1e-19)]


@pytest.mark.parametrize("cap", ["SSE41", "AVX2", "AVX512_CORE"])
def test_attention_paths_give_the_same_bits(tmp_path, cap):
    """The kernel another ISA takes and this CPU's kernel give the same bits: the portable C one (cap SSE41), AVX2,
    and AVX-512 on f32 arithmetic (cap AVX512_CORE: for bf16 attention the emulation of the vdpbf16ps path that
    CPUs with avx512_bf16 take). int8 attention runs on vpdpbusd where the CPU has avx512_vnni (and the cap allows
    it), else in portable C: every cap below AVX512_CORE_VNNI takes the C one. A cap at or above this CPU's ISA runs
    this CPU's own kernel again."""
    for i, (heads, d, scale) in enumerate(PATH_CASES):
        np.save(tmp_path / f"qkv{i}.npy", make_qkv(LENGTHS, heads, d, seed=11 + i, scale=scale))
    np.save(tmp_path / "lengths.npy", LENGTHS)
    code = ("import json, sys, numpy as np, medquant; from medquant import _core; d = sys.argv[1]; "
            "n = np.load(d + '/lengths.npy')\n"
            f"for i, (h, _, _) in enumerate({PATH_CASES!r}):\n"
            "    q = np.load(d + f'/qkv{i}.npy')\n"
            "    np.save(d + f'/ctx{i}.npy', _core.attention(q, n, h, n_threads=2))\n"
            "    np.save(d + f'/ctx_bf16{i}.npy', _core.attention(q, n, h, bf16=True, n_threads=2))\n"
            "    np.save(d + f'/ctx_int8{i}.npy', _core.attention(q, n, h, int8=True, n_threads=2))\n"
            "print(json.dumps(medquant.runtime_info()['cpu_isa']))")
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": cap}
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    isa = json.loads(r.stdout.strip().splitlines()[-1])
    allowed = {"SSE41": ("sse41", "default"), "AVX2": ("avx2", "avx", "sse41", "default"),
               "AVX512_CORE": ("avx512_core", "avx2", "avx", "sse41", "default")}[cap]
    assert isa in allowed, isa
    for i, (heads, d, scale) in enumerate(PATH_CASES):
        qkv = np.load(tmp_path / f"qkv{i}.npy")
        for name, kw in (("ctx", {}), ("ctx_bf16", {"bf16": True}), ("ctx_int8", {"int8": True})):
            native = _core.attention(qkv, LENGTHS, heads, n_threads=2, **kw)
            capped = np.load(tmp_path / f"{name}{i}.npy")
            assert np.array_equal(native.view(np.uint32), capped.view(np.uint32)), (name, heads, d, scale)


def test_nan_stays_in_its_sequence_and_head():
    heads, d = 2, 16
    lengths = np.array([9, 20], np.int32)
    qkv = make_qkv(lengths, heads, d, seed=5)
    H = heads * d
    qkv[4, H + 3] = np.nan  # a key of sequence 0, head 0
    got = _core.attention(qkv, lengths, heads, n_threads=2)
    assert np.isnan(got[:9, :d]).all()
    assert np.isfinite(got[:9, d:]).all() and np.isfinite(got[9:]).all()
    qkv[4, H + 3] = np.inf  # a score of +inf makes its row NaN (inf - inf); one of -inf is a probability of 0
    got = _core.attention(qkv, lengths, heads)
    pos, neg = qkv[:9, 3] > 0, qkv[:9, 3] < 0
    assert pos.any() and neg.any()
    assert np.isnan(got[:9][pos, :d]).all() and np.isfinite(got[:9][neg, :d]).all()
    without = qkv[[i for i in range(9) if i != 4]]
    ref = reference(without, np.array([8], np.int32), heads)  # the key gone, its row as a query gone too
    rows = [i for i in range(9) if neg[i] and i != 4]
    np.testing.assert_allclose(got[rows, :d], ref[[i - (i > 4) for i in rows], :d], atol=2e-6)


def test_int8_nan_stays_in_its_sequence_and_head():
    """int8 attention: a NaN or infinite key makes its key scale NaN or inf, so every row of its sequence and head
    is NaN (the f32 kernel keeps rows whose score with an infinite key is -inf); a NaN value makes its column NaN;
    nothing leaks into other heads or sequences."""
    heads, d = 2, 16
    lengths = np.array([9, 20], np.int32)
    H = heads * d
    for col, bad in ((H + 3, np.nan), (H + 3, np.inf), (2 * H + 5, np.nan)):
        qkv = make_qkv(lengths, heads, d, seed=5)
        qkv[4, col] = bad
        got = _core.attention(qkv, lengths, heads, int8=True, n_threads=2)
        head0 = got[:9, :d]
        if col == 2 * H + 5:
            assert np.isnan(head0[:, 5]).all() and np.isfinite(np.delete(head0, 5, axis=1)).all()
        else:
            assert np.isnan(head0).all()
        assert np.isfinite(got[:9, d:]).all() and np.isfinite(got[9:]).all()


@pytest.mark.parametrize("qkv,lengths,heads,match", [
    (np.zeros((10, 96), np.float32), np.array([4, 5], np.int32), 2, "lengths add up to 9"),
    (np.zeros((10, 96), np.float32), np.array([10], np.int32), 5, "not 3 x n_heads"),
    (np.zeros((10, 96), np.float32), np.array([10, 0], np.int32), 2, "length 0 outside"),
    (np.zeros((10, 96), np.float64), np.array([10], np.int32), 2, "qkv"),
    (np.zeros((10, 96), np.float32), np.array([10], np.int64), 2, "lengths"),
    (np.zeros((10, 96), np.float32)[:, ::2], np.array([10], np.int32), 2, "qkv"),
])
def test_bad_input_is_a_python_error(qkv, lengths, heads, match):
    with pytest.raises((ValueError, TypeError), match=match):
        _core.attention(qkv, lengths, heads)
