"""Quantization schemes in the C core against an independent numpy reference, observers, and the real model."""
from __future__ import annotations

import numpy as np
import pytest

import medquant
from medquant import QuantScheme, _core
import quant_reference as ref
from kernel_support import SUPPORT, assert_optimized

RNG = np.random.default_rng(7)
K, N, M = 96, 80, 37  # M not a multiple of any bucket


def layer_data(heavy_tail=False):
    w = (RNG.standard_normal((N, K)) * 0.05).astype(np.float32)
    b = (RNG.standard_normal(N) * 0.1).astype(np.float32)
    x = RNG.standard_normal((M, K)).astype(np.float32)
    if heavy_tail:
        x[:, 5] *= 20.0  # an outlier channel, as in BERT's residual stream
    r = RNG.standard_normal((M, N)).astype(np.float32)
    return w, b, x, r


def tolerance(y_ref, step, qw, sw):
    """|C - reference| bound: float32 accumulation and scaling (1e-5 relative) plus one activation rounding flip
    per row (inputs on a .5 boundary may round either way in float32): step[m] * max_k |qw[n,k]| * sw[n]."""
    wmax = np.abs(qw.astype(np.float64)).max(axis=1) * np.broadcast_to(sw, (qw.shape[0],))
    return 1e-5 * np.abs(y_ref).max() + 1e-6 + 2.0 * step[:, None] * wmax[None, :]


EPIS = [("none", _core.EPI_NONE), ("gelu", _core.EPI_GELU), ("residual", _core.EPI_RESIDUAL)]


@pytest.mark.parametrize("epi_name,epi", EPIS)
@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("mode,symmetric", [("static", False), ("static", True), ("dynamic", False),
                                            ("dynamic", True), ("dynamic-token", True)])
def test_int8_linear_matches_reference(mode, symmetric, per_channel, epi_name, epi):
    w, b, x, r = layer_data(heavy_tail=True)
    qw, sw = _core.quantize_weight_s8(w, per_channel)
    qw_ref, sw_ref = ref.quantize_weight_s8(w, per_channel)
    assert np.array_equal(qw, qw_ref) and np.array_equal(sw, sw_ref)
    kw = {}
    scale = zp = None
    if mode == "static":
        lo, hi = float(np.percentile(x, 0.5)), float(np.percentile(x, 99.5))  # clipping on purpose
        scale, zp = _core.qparams(lo, hi, symmetric)
        rs, rz = ref.qparams_sym(lo, hi) if symmetric else ref.qparams_asym(lo, hi)
        assert np.float32(scale) == rs and zp == rz
        kw = dict(act_scale=scale, act_zero_point=zp)
    mode_code = {"static": _core.ACT_STATIC, "dynamic": _core.ACT_DYNAMIC, "dynamic-token": _core.ACT_DYNAMIC_TOKEN}[mode]
    lin = _core.Linear(_core.LINEAR_INT8, qw, sw, b, None, act_mode=mode_code, act_symmetric=symmetric,
                       w_per_channel=per_channel, epilogue=epi, **kw)
    y = lin.forward(x, r if epi_name == "residual" else None)
    y_ref, step = ref.int8_linear(x, qw, sw, b, mode=mode, symmetric=symmetric, scale=scale, zp=zp,
                                  per_channel=per_channel, epi=epi_name, residual=r)
    err = np.abs(y - y_ref)
    tol = tolerance(y_ref, step, qw, sw)
    assert np.all(err <= tol), f"max err {err.max()} vs tol {tol[err.argmax() // N].min()}"
    # the vast majority of outputs agree to float32 rounding (no rounding flip involved)
    assert np.mean(err <= 1e-5 * np.abs(y_ref).max() + 1e-6) > 0.95
    assert_optimized(lin.impl(), "int8")
    assert lin.emulated() == (not SUPPORT["int8_exact"])


@pytest.mark.parametrize("kind", ["int8-static", "int8-dynamic"])
def test_fused_u8_output_is_the_next_layers_quantization(kind):
    """FFN_IN -> FFN_OUT fusion (csrc/encoder.c): a layer writing u8 with the next layer's static (scale, zero point)
    in its matmul epilogue equals quantizing its f32 output separately (numpy), up to one step where the f32
    value sits on a rounding boundary; and a static layer fed that u8 gives exactly what it gives from f32."""
    w, b, x, _ = layer_data(heavy_tail=True)
    qw, sw = _core.quantize_weight_s8(w, True)
    mode = _core.ACT_STATIC if kind == "int8-static" else _core.ACT_DYNAMIC
    make = lambda: _core.Linear(_core.LINEAR_INT8, qw, sw, b, None, act_mode=mode, act_symmetric=False,  # noqa: E731
                                act_scale=0.05, act_zero_point=100, epilogue=_core.EPI_GELU)
    y = make().forward(x)
    out_scale, out_zp = _core.qparams(float(y.min()), float(np.percentile(y, 99)), False)  # clips the top 1%
    fused = make()
    if not SUPPORT["int8_exact"]:
        with pytest.raises(ValueError, match="exact int8 kernels"):
            fused.set_output_u8(out_scale, out_zp)
        pytest.skip("a u8 matmul output needs oneDNN's exact int8 kernels (VNNI/AMX), which this CPU lacks; "
                    "checked that the layer refuses it with a clear error (the encoder then keeps FFN_IN in f32)")
    fused.set_output_u8(out_scale, out_zp)
    yq = fused.forward(x)
    assert yq.dtype == np.uint8 and yq.shape == y.shape
    q_ref = ref.quantize_act(y, out_scale, out_zp)
    diff = np.abs(yq.astype(np.int64) - q_ref)
    assert diff.max() <= 1 and np.mean(diff == 0) > 0.99, (diff.max(), np.mean(diff == 0))
    assert_optimized(fused.impl(), "int8")
    # the consumer: static int8 with that (scale, zp), fed u8 or f32
    w2 = (RNG.standard_normal((40, N)) * 0.05).astype(np.float32)
    q2, s2 = _core.quantize_weight_s8(w2, True)
    nxt = _core.Linear(_core.LINEAR_INT8, q2, s2, None, None, act_mode=_core.ACT_STATIC, act_symmetric=False,
                       act_scale=out_scale, act_zero_point=out_zp)
    from_f32 = nxt.forward(y)
    from_u8 = nxt.forward_u8(q_ref.astype(np.uint8))
    np.testing.assert_array_equal(from_u8, from_f32)


def test_fused_u8_output_rejections():
    w, b, x, r = layer_data()
    qw, sw = _core.quantize_weight_s8(w, True)
    res = _core.Linear(_core.LINEAR_INT8, qw, sw, b, None, act_mode=_core.ACT_STATIC, act_scale=0.05,
                       act_zero_point=100, act_symmetric=False, epilogue=_core.EPI_RESIDUAL)
    with pytest.raises(ValueError, match="residual"):
        res.set_output_u8(0.1, 3)
    with pytest.raises(ValueError, match="residual missing"):
        res.forward_u8(np.zeros((3, K), np.uint8))
    tok = _core.Linear(_core.LINEAR_INT8, qw, sw, b, None, act_mode=_core.ACT_DYNAMIC_TOKEN, act_symmetric=True)
    with pytest.raises(ValueError, match="per-token"):
        tok.set_output_u8(0.1, 3)
    with pytest.raises(ValueError, match="static int8"):
        tok.forward_u8(np.zeros((3, K), np.uint8))
    with pytest.raises(ValueError, match="int8 layers"):
        _core.Linear(_core.LINEAR_F32, w, None, b).set_output_u8(0.1, 3)
    plain = _core.Linear(_core.LINEAR_INT8, qw, sw, b, None, act_mode=_core.ACT_DYNAMIC, act_symmetric=False)
    for bad in [(0.0, 3), (float("nan"), 3), (0.1, 256), (0.1, -1)]:
        with pytest.raises(ValueError, match="output quantization"):
            plain.set_output_u8(*bad)
    static = _core.Linear(_core.LINEAR_INT8, qw, sw, b, None, act_mode=_core.ACT_STATIC, act_scale=0.05,
                          act_zero_point=100, act_symmetric=False)
    with pytest.raises(TypeError, match="uint8"):
        static.forward_u8(np.zeros((3, K), np.float32))
    with pytest.raises(ValueError):
        static.forward_u8(np.zeros((3, K + 1), np.uint8))


@pytest.mark.parametrize("epi_name,epi", EPIS)
def test_fp32_bf16_linear(epi_name, epi):
    w, b, x, r = layer_data()
    y_ref = ref.epilogue(x.astype(np.float64) @ w.T.astype(np.float64) + b, epi_name, r)
    res = r if epi_name == "residual" else None
    y32 = _core.Linear(_core.LINEAR_F32, w, None, b, epilogue=epi).forward(x, res)
    assert np.abs(y32 - y_ref).max() <= 1e-4
    lin = _core.Linear(_core.LINEAR_BF16, w, None, b, epilogue=epi)
    ybf = lin.forward(x, res)
    assert_optimized(lin.impl(), "bf16")
    # bf16 operands (rounded to nearest even), f32 accumulation: the reference multiplies the same rounded operands
    # in float64, so what is left is f32 summation over K = 96 terms and oneDNN's GELU (both ~1e-6 here)
    ybf_ref = ref.epilogue(ref.bf16(x).astype(np.float64) @ ref.bf16(w).T.astype(np.float64) + b, epi_name, r)
    assert np.abs(ybf - ybf_ref).max() <= 2e-5 * np.abs(ybf_ref).max()
    # and bf16 rounding is visible: far from the f32 result at the scale of 2^-9 relative rounding per operand
    assert np.abs(ybf - y_ref).max() > 1e-4


def test_bf16_rounds_to_nearest_even():
    """Activations (medquant's conversion) and weights (oneDNN's reorder, or medquant's where bf16 is emulated) are
    rounded to nearest, ties to even, as torch does: exact equality on ties, near-ties, signs, tiny and huge values."""
    import torch

    one = np.float32(1.0)
    ulp = np.float32(2.0 ** -7)  # bf16 spacing at 1
    vals = [one + ulp / 2,                       # tie between 1 and 1 + ulp: even is 1
            one + 3 * ulp / 2,                   # tie between 1 + ulp and 1 + 2 ulp: even is 1 + 2 ulp
            one + ulp / 2 + np.float32(2 ** -23),  # just above a tie: up
            one + ulp / 2 - np.float32(2 ** -24),  # just below a tie: down
            -(one + 3 * ulp / 2), np.float32(3.0e38), np.float32(-1.5e-38), np.float32(1e-3), np.float32(0.0),
            np.float32(-7.0), np.float32(2.0 ** 20 + 2.0 ** 12), np.float32(1.0 + 2 ** -8 + 2 ** -16)]
    v = np.array(vals, np.float32)
    n = v.size
    expect = torch.from_numpy(v).to(torch.bfloat16).to(torch.float32).numpy()
    np.testing.assert_array_equal(ref.bf16(v), expect)  # the numpy reference itself
    eye = np.eye(n, dtype=np.float32)
    # y = x I^T: every output is one bf16 activation times 1
    got_x = _core.Linear(_core.LINEAR_BF16, eye).forward(v[None, :])[0]
    np.testing.assert_array_equal(got_x, expect)
    # y = I W^T: every output is one bf16 weight
    got_w = _core.Linear(_core.LINEAR_BF16, np.ascontiguousarray(np.diag(v))).forward(eye)
    np.testing.assert_array_equal(np.diag(got_w), expect)


def test_weight_only_int8_and_int4():
    w, b, x, _ = layer_data()
    qw, sw = _core.quantize_weight_s8(w, True)
    y8 = _core.Linear(_core.LINEAR_W8, qw, sw, b).forward(x)
    y8_ref = x.astype(np.float64) @ (qw.astype(np.float64) * sw[:, None]).T + b
    assert np.abs(y8 - y8_ref).max() <= 1e-4
    packed, s4 = _core.quantize_weight_s4(w, 32)
    q4_ref, s4_ref = ref.quantize_weight_s4(w, 32)
    assert np.allclose(s4, s4_ref, rtol=0, atol=0)
    deq = _core.dequantize_weight_s4(packed, s4, 32)
    assert np.allclose(deq, ref.dequant_s4(q4_ref, s4_ref, 32), atol=1e-7)
    y4 = _core.Linear(_core.LINEAR_W4, packed, s4, b, group_size=32).forward(x)
    y4_ref = x.astype(np.float64) @ ref.dequant_s4(q4_ref, s4_ref, 32).T + b
    assert np.abs(y4 - y4_ref).max() <= 1e-4
    assert packed.nbytes == w.size // 2


# Weight-only kernel (csrc/wo_matmul.h): shapes that reach each of its paths: M in registers (1, 5, up to three row
# blocks), M from converted panel slices (37, 300: one or more row chunks), K in one block (96) or in 256-blocks (640),
# K a multiple of 1024 (2048: rows of x copied to a padded stride), N not a multiple of the 32-column panel (70).
WO_SHAPES = [(96, 70), (640, 80), (2048, 70)]
WO_MS = [1, 5, 13, 37, 300]
WO_EPILOGUES = {"none": _core.EPI_NONE, "gelu": _core.EPI_GELU, "residual": _core.EPI_RESIDUAL}


def _gelu64(v):
    from math import erf
    return 0.5 * v * (1.0 + np.vectorize(erf)(v / np.sqrt(2.0)))


def _panel_kinds(w, qw, sw, n_threads):
    """The panel matmul alone (``_core.panel_matmul``; Linear takes it for f32 layers only on some CPUs): f32 panels,
    and s8 panels with an input scale and per-row scales as emulated int8 layers apply them. {name: (forward(x, bias,
    epilogue, residual), float64 reference before the bias)}."""
    rows = np.random.default_rng(w.shape[0]).uniform(0.5, 2.0, max(WO_MS)).astype(np.float32)

    def f32(x, b, epi, r):
        return _core.panel_matmul(w, x, bias=b, epilogue=epi, residual=r, n_threads=n_threads)

    def s8(x, b, epi, r):
        return _core.panel_matmul(qw, x, scales=sw, alpha=0.75, row_scale=rows[:len(x)], bias=b, epilogue=epi,
                                  residual=r, n_threads=n_threads)

    def s8_ref(x):
        return (x.astype(np.float64) @ qw.T.astype(np.float64)) * sw * 0.75 * rows[:len(x), None]

    return {"panel-f32": (f32, lambda x: x.astype(np.float64) @ w.T.astype(np.float64)), "panel-s8": (s8, s8_ref)}


def weight_only_outputs(seed=5, n_threads=0):
    """{key: y} for w8 (per channel and per tensor) and w4 layers over WO_SHAPES x WO_MS x WO_EPILOGUES, and for the
    same kernel on f32 and scaled s8 panels (_panel_kinds), with the float64 reference of each (x times the
    dequantized weights (scaled), + bias, epilogue)."""
    rng = np.random.default_rng(seed)
    out, refs = {}, {}
    for k, n in WO_SHAPES:
        w = (rng.standard_normal((n, k)) * 0.05).astype(np.float32)
        b = (rng.standard_normal(n) * 0.1).astype(np.float32)
        qw, sw = _core.quantize_weight_s8(w, True)
        qt, st = _core.quantize_weight_s8(w, False)
        p4, s4 = _core.quantize_weight_s4(w, 32)
        kinds = {"w8": (_core.LINEAR_W8, qw, sw, {}, qw * sw[:, None].astype(np.float64)),
                 "w8-tensor": (_core.LINEAR_W8, qt, st, {"w_per_channel": False}, qt * np.float64(st[0])),
                 "w4": (_core.LINEAR_W4, p4, s4, {"group_size": 32}, _core.dequantize_weight_s4(p4, s4, 32))}
        for m in WO_MS:
            x = rng.standard_normal((m, k)).astype(np.float32)
            r = rng.standard_normal((m, n)).astype(np.float32)
            for kname, (kind, q, s, kw, deq) in kinds.items():
                for ename, epi in WO_EPILOGUES.items():
                    lin = _core.Linear(kind, q, s, b, epilogue=epi, n_threads=n_threads, **kw)
                    key = f"{kname}_{k}x{n}_m{m}_{ename}"
                    out[key] = lin.forward(x, r if ename == "residual" else None)
                    y = x.astype(np.float64) @ deq.astype(np.float64).T + b
                    refs[key] = _gelu64(y) if ename == "gelu" else (y + r if ename == "residual" else y)
            for kname, (forward, reference) in _panel_kinds(w, qw, sw, n_threads or 2).items():
                for ename, epi in WO_EPILOGUES.items():
                    key = f"{kname}_{k}x{n}_m{m}_{ename}"
                    out[key] = forward(x, b, epi, r if ename == "residual" else None)
                    y = reference(x) + b
                    refs[key] = _gelu64(y) if ename == "gelu" else (y + r if ename == "residual" else y)
    return out, refs


def test_weight_only_kernel_against_float64():
    """Every path of the weight-only kernel computes x * dequant(W)^T + bias and its epilogue: within float32
    accumulation error of the float64 reference (GELU: erf approximated to 1.5e-7)."""
    out, refs = weight_only_outputs()
    for key, y in out.items():
        want = refs[key]
        assert y.shape == want.shape and y.dtype == np.float32, key
        err = np.abs(y - want).max()
        assert err <= 2e-6 * max(1.0, np.abs(want).max()) * np.sqrt(int(key.split("_")[1].split("x")[0])), (key, err)


def test_weight_only_gelu_is_accurate_everywhere():
    """The kernel's own GELU-erf (no libm, vectorized) against float64 on [-12, 12] and at the edges."""
    v = np.concatenate([np.linspace(-12, 12, 48001), [0.0, -0.0, 1e-30, -1e-30, 40.0, -40.0, 1e30, -1e30]])
    v = np.concatenate([v, np.zeros(-len(v) % 32)]).astype(np.float32)
    # y = x through a 32 x 32 f32 identity (exact: the f32 panels' fma chain adds zeros; the int8 layers' exact path
    # would round x to 24 bits of its row's largest value): every column of a 32-wide panel (the vector GELU's lanes),
    # and 1 column of 1 (the masked tail). All paths of the kernel finish a tile with the same GELU.
    def eye(x):
        return _core.panel_matmul(np.eye(32, dtype=np.float32), x, epilogue=_core.EPI_GELU)

    def one(x):
        return _core.panel_matmul(np.ones((1, 1), np.float32), x, epilogue=_core.EPI_GELU)

    want = _gelu64(v.astype(np.float64))
    for got in (eye(v.reshape(-1, 32)).ravel(), one(v[:, None])[:, 0]):
        err = np.abs(got - want)
        assert np.all(err <= 4e-7 * np.maximum(1.0, np.abs(want))), float((err / np.maximum(1.0, np.abs(want))).max())
    np.testing.assert_array_equal(eye(v.reshape(-1, 32)).ravel().view(np.uint32), one(v[:, None])[:, 0].view(np.uint32))
    for f, shape in ((eye, (3, 32)), (one, (1, 1))):
        assert np.isnan(f(np.full(shape, np.nan, np.float32))).all()
    w8 = _core.Linear(_core.LINEAR_W8, np.eye(32, dtype=np.int8), np.ones(32, np.float32), epilogue=_core.EPI_GELU)
    assert np.isnan(w8.forward(np.full((3, 32), np.nan, np.float32))).all()


def _exact_path() -> bool:
    """Whether weight-only layers take the exact integer path here (wo_matmul.h: avx512_vnni, not capped)."""
    return _core.Linear(_core.LINEAR_W8, np.ones((1, 4), np.int8), np.ones(1, np.float32)).impl().endswith("_vnni")


def test_weight_only_bits_do_not_depend_on_isa_or_threads():
    """The weight-only kernel's f32 chain does the same IEEE operations in the same order on its AVX-512, AVX2 and
    portable paths and for any thread count (wo_matmul.h): a process capped at AVX2 (ONEDNN_MAX_CPU_ISA picks the
    path) with 2 threads and one capped at SSE4.1 with one thread give the same bits, and the same as this process,
    except where this process takes the exact path (int8 / int4 weights on avx512_vnni: its own bits,
    test_weight_only_exact_path_bits); this process with one thread gives its own bits again."""
    import os
    import subprocess
    import sys
    import tempfile
    here, _ = weight_only_outputs()
    one, _ = weight_only_outputs(n_threads=1)
    for key, y in here.items():
        np.testing.assert_array_equal(y.view(np.uint32), one[key].view(np.uint32), err_msg=f"1 thread {key}")
    exact = _exact_path()
    code = ("import sys, numpy as np; sys.path.insert(0, {tests!r}); import test_quantization as t; "
            "out, _ = t.weight_only_outputs(n_threads=int(sys.argv[2])); np.savez(sys.argv[1], **out)")
    code = code.format(tests=os.path.dirname(os.path.abspath(__file__)))
    capped = {}
    with tempfile.TemporaryDirectory() as tmp:
        for isa, threads in (("AVX2", "2"), ("SSE41", "1")):
            path = os.path.join(tmp, f"{isa}.npz")
            env = dict(os.environ, ONEDNN_MAX_CPU_ISA=isa)
            subprocess.run([sys.executable, "-c", code, path, threads], env=env, check=True, capture_output=True)
            capped[isa] = dict(np.load(path))
    assert set(capped["AVX2"]) == set(capped["SSE41"]) == set(here)
    compared = 0
    for key, y in capped["AVX2"].items():
        np.testing.assert_array_equal(y.view(np.uint32), capped["SSE41"][key].view(np.uint32), err_msg=f"SSE41 {key}")
        if exact and key.startswith(("w8", "w4", "panel-s8")):
            continue
        np.testing.assert_array_equal(here[key].view(np.uint32), y.view(np.uint32), err_msg=f"AVX2 {key}")
        compared += 1
    assert compared >= len(here) // 5


def _exact_planes(x):
    """The exact path's rounding of x (wo_matmul.h): per row, 24-bit integers q of its largest value, as the three
    byte planes of q + 2^23 (int64), and the row scales."""
    one = np.float32(8388607)
    amax = np.abs(x).max(axis=1)
    inv = np.where(amax > 0, one / np.where(amax > 0, amax, np.float32(1)), np.float32(0)).astype(np.float32)
    q = np.clip(np.rint(x * inv[:, None]), -8388607, 8388607).astype(np.int64) + 8388608
    return [(q >> (8 * j)) & 255 for j in range(3)], (amax / one).astype(np.float32)


def _exact_reference(x, qw, sw, xs_after=()):
    """The exact int8 path in numpy, operation for operation: the integer sums over x's byte planes exact in int64,
    combined in f32 as the kernel does, times the column scale, the row scale and then each of xs_after (per-row or
    scalar multipliers)."""
    planes, xs = _exact_planes(x)
    acc = [b @ qw.T.astype(np.int64) for b in planes]
    hi = (acc[2] - 128 * qw.astype(np.int64).sum(axis=1)).astype(np.float32)
    f = hi * np.float32(65536) + (acc[1].astype(np.float32) * np.float32(256) + acc[0].astype(np.float32))
    y = f * sw.astype(np.float32) * xs[:, None]
    for s in xs_after:
        y = y * s
    return y.astype(np.float32)


def _exact_reference_s4(x, packed, scales, group):
    """The exact int4 path in numpy: per group, the integer sums over x's byte planes of the weights nibble - 8, in
    f32 as the kernel combines them, times the group's scale, added group after group; then the row scale."""
    n, k = packed.shape[0], 2 * packed.shape[1]
    wq = np.stack([packed & 15, packed >> 4], axis=-1).reshape(n, k).astype(np.int64) - 8
    scales = scales.reshape(n, k // group)
    planes, xs = _exact_planes(x)
    y = np.zeros((len(x), n), np.float32)
    for g in range(k // group):
        wg = wq[:, g * group:(g + 1) * group]
        acc = [b[:, g * group:(g + 1) * group] @ wg.T for b in planes]
        t = (acc[2] - 128 * wg.sum(axis=1)).astype(np.float32) * np.float32(65536) + (acc[0] + 256 * acc[1]).astype(np.float32)
        y = y + t * scales[:, g]
    return (y * xs[:, None]).astype(np.float32)


def test_weight_only_exact_path_bits():
    """Where weight-only layers take the exact path (CPUs with avx512_vnni), their outputs are bit for bit the integer
    computation of _exact_reference (int8) / _exact_reference_s4 (int4), for every row count (one or several row
    chunks, a tile's remainder rows), K not a multiple of 4, per-channel and per-tensor scales, int4 groups of 4 to
    128, and the panel kernel's alpha and row scales; rows of zeros give zeros, a NaN or an infinity in a row makes
    that row NaN, only that row, and rows of tiny values (down to denormals) keep them."""
    if not _exact_path():
        pytest.skip("no exact weight-only path here (it needs avx512_vnni, and ONEDNN_MAX_CPU_ISA at or above "
                    "AVX512_CORE_VNNI)")
    rng = np.random.default_rng(11)
    for k, n in ((97, 70), (384, 100), (1536, 64)):
        w = (rng.standard_normal((n, k)) * 0.05).astype(np.float32)
        for per_channel in (True, False):
            qw, sw = _core.quantize_weight_s8(w, per_channel)
            lin = _core.Linear(_core.LINEAR_W8, qw, sw, w_per_channel=per_channel, n_threads=2)
            cols = sw if per_channel else np.full(n, sw[0], np.float32)
            for m in (1, 3, 5, 37, 301):
                x = rng.standard_normal((m, k)).astype(np.float32)
                x[0, :3] *= 40.0  # an outlier row
                np.testing.assert_array_equal(lin.forward(x).view(np.uint32),
                                              _exact_reference(x, qw, cols).view(np.uint32), err_msg=f"{k} {n} {m}")
        rows = rng.uniform(0.5, 2.0, 9).astype(np.float32)
        x = rng.standard_normal((9, k)).astype(np.float32)
        got = _core.panel_matmul(qw, x, scales=cols, alpha=0.75, row_scale=rows, n_threads=2)
        want = _exact_reference(x, qw, cols, (np.float32(0.75), rows[:, None]))
        np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
    for k, n, group in ((96, 70, 32), (384, 100, 128), (64, 33, 4)):
        packed, s4 = _core.quantize_weight_s4((rng.standard_normal((n, k)) * 0.05).astype(np.float32), group)
        lin = _core.Linear(_core.LINEAR_W4, packed, s4, group_size=group, n_threads=2)
        for m in (1, 5, 301):
            x = rng.standard_normal((m, k)).astype(np.float32)
            x[0, :3] *= 40.0
            np.testing.assert_array_equal(lin.forward(x).view(np.uint32),
                                          _exact_reference_s4(x, packed, s4, group).view(np.uint32),
                                          err_msg=f"w4 {k} {n} {group} {m}")
    x = rng.standard_normal((4, 97)).astype(np.float32)
    x[1] = 0.0
    x[2, 5], x[3, 7] = np.nan, np.inf
    qw, sw = _core.quantize_weight_s8((rng.standard_normal((40, 97)) * 0.05).astype(np.float32), True)
    lin = _core.Linear(_core.LINEAR_W8, qw, sw)
    y = lin.forward(x)
    assert np.isfinite(y[0]).all() and (y[1] == 0).all() and np.isnan(y[2:]).all()
    # tiny rows (largest |x| 1e-33, and a denormal 1e-40: (2^23 - 1) / max|x| would overflow f32, max|x| / (2^23 - 1)
    # underflow): as accurate as f32 outputs of that size can be (denormals are spaced 2^-149)
    x = rng.standard_normal((1, 97)).astype(np.float32)
    for tiny in (1e-33, 1e-40):
        xt = (x.astype(np.float64) * tiny / np.abs(x).max()).astype(np.float32)
        want = xt.astype(np.float64) @ (qw * sw[:, None]).astype(np.float64).T
        err = np.abs(lin.forward(xt) - want).max()
        assert err <= 1e-6 * np.abs(want).max() + 4 * 2.0 ** -149, (tiny, err)


def test_panel_matmul_rejects_bad_arguments():
    w, b, x, r = layer_data()
    q, s = _core.quantize_weight_s8(w, True)
    with pytest.raises(ValueError, match="scales"):
        _core.panel_matmul(q, x)
    with pytest.raises(ValueError, match="scales"):
        _core.panel_matmul(w, x, scales=s)
    with pytest.raises(ValueError, match="residual"):
        _core.panel_matmul(w, x, epilogue=_core.EPI_RESIDUAL)
    with pytest.raises(ValueError, match="residual"):
        _core.panel_matmul(w, x, residual=r)
    with pytest.raises(ValueError):
        _core.panel_matmul(w, x[:, :10].copy())
    with pytest.raises(ValueError):
        _core.panel_matmul(w, x, row_scale=np.ones(3, np.float32))
    with pytest.raises(TypeError):
        _core.panel_matmul(w, x.astype(np.float64))
    with pytest.raises(ValueError):
        _core.panel_matmul(w, x, n_threads=0)
    np.testing.assert_array_equal(_core.panel_matmul(w, x, bias=b, epilogue=_core.EPI_RESIDUAL, residual=r),
                                  _core.panel_matmul(w, x, bias=b, epilogue=_core.EPI_RESIDUAL, residual=r, n_threads=2))


def test_zero_and_denormal_rows_get_positive_scales():
    """Fuzz finding (fuzz_binding.py, op_functions): a weight row of denormals made absmax / 127 underflow to a zero
    scale (so w / s was inf and the Linear built from it refused the scale). Every scale is now a positive normal
    float, equal to the numpy reference, and the quantized weights still build a working layer."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((6, 32)).astype(np.float32)
    w[1] = 0.0
    w[2] = np.float32(1e-45)          # the smallest denormal
    w[3, :5] = np.float32(-3e-39)     # denormal absmax with zeros around it
    w[4] *= np.float32(3.4e38) / np.abs(w[4]).max()  # the other end of the range
    for per_channel in (True, False):
        q, s = _core.quantize_weight_s8(w, per_channel)
        q_ref, s_ref = ref.quantize_weight_s8(w, per_channel)
        assert np.all(s > 0) and np.all(np.isfinite(s))
        np.testing.assert_array_equal(s, s_ref)
        np.testing.assert_array_equal(q, q_ref)
        _core.Linear(_core.LINEAR_W8, q, s, w_per_channel=per_channel).forward(np.ones((2, 32), np.float32))
    packed, s4 = _core.quantize_weight_s4(w, 8)
    q4_ref, s4_ref = ref.quantize_weight_s4(w, 8)
    np.testing.assert_array_equal(s4, s4_ref)
    assert np.all(s4 > 0)
    qe, se = _core.quantize_rows_s8(w)
    assert np.all(se > 0) and se[1] == 1.0 and se[2] == np.finfo(np.float32).tiny
    assert np.all(np.abs(qe[2]) <= 1)


def test_smoothquant_multiplier_is_exact_in_float():
    w, b, x, _ = layer_data(heavy_tail=True)
    s = np.abs(x).max(0) ** 0.5 / np.abs(w).max(0) ** 0.5
    y = _core.Linear(_core.LINEAR_F32, np.ascontiguousarray(w * s[None, :]), None, b,
                     (1 / s).astype(np.float32)).forward(x)
    assert np.abs(y - (x.astype(np.float64) @ w.T + b)).max() <= 1e-4


def test_linear_rejects_bad_arguments():
    w, b, x, _ = layer_data()
    qw, sw = _core.quantize_weight_s8(w, True)
    with pytest.raises(ValueError, match="symmetric only"):
        _core.Linear(_core.LINEAR_INT8, qw, sw, b, act_mode=_core.ACT_DYNAMIC_TOKEN, act_symmetric=False)
    with pytest.raises(ValueError, match="scale"):
        _core.Linear(_core.LINEAR_INT8, qw, sw, b, act_mode=_core.ACT_STATIC, act_scale=-1.0)
    with pytest.raises(ValueError, match="zero point"):
        _core.Linear(_core.LINEAR_INT8, qw, sw, b, act_mode=_core.ACT_STATIC, act_scale=0.1, act_zero_point=300)
    with pytest.raises(TypeError, match="dtype"):
        _core.Linear(_core.LINEAR_INT8, w, sw, b)
    with pytest.raises(ValueError, match="w_scales"):
        _core.Linear(_core.LINEAR_INT8, qw, None, b)
    w_nan = w.copy()
    w_nan[1, 2] = np.inf
    with pytest.raises(ValueError, match="non-finite"):
        _core.Linear(_core.LINEAR_F32, w_nan, None, b)
    with pytest.raises(ValueError, match="non-finite"):
        _core.quantize_weight_s8(w_nan, True)
    lin = _core.Linear(_core.LINEAR_F32, w, None, b)
    with pytest.raises(ValueError, match="size"):
        lin.forward(x[:, :10].copy())
    with pytest.raises(ValueError, match="contiguous"):
        lin.forward(np.asfortranarray(x))
    with pytest.raises(ValueError, match="group"):
        _core.quantize_weight_s4(w, 7)


ROW_PLAN_MS = [1, 37, 64, 65, 1000, 1024, 1090, 2500]  # one exact piece, 64, 64 + 1, 960 + 40, a chunk, ... + 2 chunks


def row_plan_layers():
    """(name, layer, uses residual, fed u8) for every kind: f32, bf16, int8 static / dynamic / dynamic-token, static
    with a u8 output, static fed u8, w8, w4; epilogues chosen so the residual and per-row scale offsets are used."""
    w, b, _, _ = layer_data()
    qw, sw = _core.quantize_weight_s8(w, True)
    packed, s4 = _core.quantize_weight_s4(w, 32)
    int8 = dict(w_per_channel=True)
    static = dict(act_mode=_core.ACT_STATIC, act_symmetric=False, act_scale=0.03, act_zero_point=120, **int8)
    out = [("f32", _core.Linear(_core.LINEAR_F32, w, None, b, epilogue=_core.EPI_RESIDUAL), True, False),
           ("bf16", _core.Linear(_core.LINEAR_BF16, w, None, b, epilogue=_core.EPI_GELU), False, False),
           ("int8-static", _core.Linear(_core.LINEAR_INT8, qw, sw, b, epilogue=_core.EPI_RESIDUAL, **static), True, False),
           ("int8-static-u8in", _core.Linear(_core.LINEAR_INT8, qw, sw, b, **static), False, True),
           ("int8-dynamic", _core.Linear(_core.LINEAR_INT8, qw, sw, b, act_mode=_core.ACT_DYNAMIC, act_symmetric=False,
                                         **int8), False, False),
           ("int8-dynamic-token", _core.Linear(_core.LINEAR_INT8, qw, sw, b, act_mode=_core.ACT_DYNAMIC_TOKEN,
                                               act_symmetric=True, epilogue=_core.EPI_RESIDUAL, **int8), True, False),
           ("w8", _core.Linear(_core.LINEAR_W8, qw, sw, b), False, False),
           ("w4", _core.Linear(_core.LINEAR_W4, packed, s4, b, group_size=32, epilogue=_core.EPI_RESIDUAL), True, False)]
    if SUPPORT["int8_exact"]:  # a u8 matmul output needs the exact int8 kernels
        u8out = _core.Linear(_core.LINEAR_INT8, qw, sw, b, epilogue=_core.EPI_GELU, **static)
        u8out.set_output_u8(0.02, 7)
        out.append(("int8-static-u8out", u8out, False, False))
    return out


@pytest.mark.parametrize("name,lin,residual,u8_in", row_plan_layers(), ids=lambda v: v if isinstance(v, str) else "")
def test_rows_do_not_depend_on_the_call(name, lin, residual, u8_in):
    """A linear layer computes exactly its M rows as pieces of fixed-shape primitives (csrc/linear.h, row plan: 1024-row
    chunks, a multiple of 64, an exact remainder): every row of a call of M rows equals that row computed alone (one
    1-row primitive), for M exercising every piece type. Rows depend on their call only through the scheme itself:
    int8-dynamic's one scale per call, which is held fixed here by giving every row the same min and max."""
    rng = np.random.default_rng(11)
    rows = max(ROW_PLAN_MS)
    x = rng.standard_normal((rows, K)).astype(np.float32)
    x[:, 0], x[:, 1] = -6.0, 9.0  # every subset of rows has the same min / max: the same dynamic scale
    xq = rng.integers(0, 256, (rows, K), dtype=np.uint8)
    r = rng.standard_normal((rows, N)).astype(np.float32)

    def run(lo, hi):
        if u8_in:
            return lin.forward_u8(xq[lo:hi])
        return lin.forward(x[lo:hi], r[lo:hi] if residual else None)

    alone = np.concatenate([run(i, i + 1) for i in range(rows)])
    for M in ROW_PLAN_MS:
        y = run(0, M)
        assert y.shape == (M, N) and y.dtype == alone.dtype
        # medquant's panel matmul (weight-only kinds; f32-computed layers where oneDNN's rows vary): one k order for
        # every M (wo_matmul.h)
        if y.dtype == np.uint8 or name in ("w8", "w4") or lin.impl().startswith("medquant:"):
            np.testing.assert_array_equal(y, alone[:M], err_msg=f"{name} M={M}")
        else:
            err = np.abs(y - alone[:M]).max()
            assert err <= 1e-5 * np.abs(alone[:M]).max() + 1e-6, (name, M, err)
    # and an offset call (rows [37, 37 + 1090)) gives those rows too
    y = run(37, 37 + 1090)
    assert np.abs(y.astype(np.float64) - alone[37:37 + 1090]).max() <= 1e-5 * np.abs(alone).max() + 1e-6


# ---------------------------------------------------------------------------------------------------- schemes


def test_presets_and_validation():
    for name, s in medquant.PRESETS.items():
        assert s.name == name and medquant.get_scheme(name) is s
    with pytest.raises(ValueError, match="unknown quantization scheme"):
        medquant.get_scheme("int3-magic")
    with pytest.raises(ValueError, match="unsupported combination"):
        QuantScheme(weights="int4", activations="int8")
    with pytest.raises(ValueError, match="unsupported combination"):
        QuantScheme(weights="fp32", activations="int8")
    with pytest.raises(ValueError, match="symmetric"):
        QuantScheme(weights="int8", activations="int8", mode="dynamic-token", act_symmetric=False)
    with pytest.raises(ValueError, match="calibration"):
        QuantScheme(weights="int8", activations="int8", calibration="magic")
    with pytest.raises(ValueError, match="SmoothQuant"):
        QuantScheme(smoothquant_alpha=0.5)
    with pytest.raises(ValueError, match="both"):
        QuantScheme(keep_fp32=("a",), keep_bf16=("a",))
    with pytest.raises(ValueError, match="unknown QuantScheme fields"):
        medquant.get_scheme({"weights": "int8", "bits": 3})
    s = QuantScheme(weights="int8", activations="int8", keep_fp32=("encoder.layer.5.output.dense",),
                    keep_bf16=("encoder.layer.0.attention.self.query",))
    assert s.site_kind("encoder.layer.5.output.dense") == "fp32"
    assert s.site_kind("encoder.layer.0.attention.self.qkv") == "bf16"
    assert s.site_kind("encoder.layer.4.output.dense") == "int8"
    assert medquant.get_scheme(s.to_dict()) == s
