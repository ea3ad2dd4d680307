"""Fuzz harness (atheris) for the binding's array and scalar inputs: medquant._core.Encoder.forward, Linear,
Observer, Encoder construction/parameter setting and the module functions.

The fuzzer's bytes choose dtypes, shapes (including empty, huge-but-virtual and mismatched ones), memory layouts
(non-contiguous, Fortran, unaligned, read-only, ndarray subclasses), values (ids outside the vocabulary, negative
lengths, broken masks, NaN/Inf, extreme scales) and scalar arguments. Every call must either succeed with sane
output or raise one of the documented exception types; anything else -- a crash, SystemError, an unexpected
exception type, a wrong output shape -- is a finding.

    python fuzz/fuzz_binding.py -max_total_time=300 [-seed=N] [corpus_dir]      (libFuzzer flags)

Note: the C extension is built with gcc, so libFuzzer gets coverage feedback only from the Python side (this
harness); the search over the C core is structured-random.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import atheris
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

with atheris.instrument_imports(include=["medquant"]):
    from medquant import _core

EXPECTED = (ValueError, TypeError, RuntimeError, KeyError, OverflowError, MemoryError)


class Skip(Exception):
    """Building a test input failed (a numpy limit, not a finding): skip this input."""


def build(fn, *a):
    try:
        return fn(*a)
    except Exception as e:
        raise Skip from e
VOCAB, H, I, MAXPOS, LAYERS = 50, 16, 32, 64, 2
CFG = {"vocab_size": VOCAB, "hidden": H, "n_layers": LAYERS, "n_heads": 2, "intermediate": I, "max_position": MAXPOS,
       "type_vocab": 2, "ln_eps": 1e-12}
DTYPES = [np.int32, np.int32, np.int32, np.float32, np.float32, np.int64, np.int8, np.uint8, np.float64, np.float16,
          np.uint32, np.bool_, np.int16, object]
SPECIAL_FLOATS = [0.0, -0.0, 1.0, -1.0, 1e-45, 1e-38, 3.4e38, -3.4e38, 1e39, float("inf"), float("-inf"),
                  float("nan"), 127.0, 255.0, 1e-30, 0.5]
SPECIAL_INTS = [0, 1, -1, 2, 3, 7, 8, 16, 31, 32, 33, 64, 65, 127, 128, 255, 256, 2**15, 2**20, 2**31 - 1, -2**31,
                2**31, 2**32, 2**40, 2**62, 2**63 - 1, -2**63, 2**64]


def _build_encoders():
    rng = np.random.default_rng(0)
    encs = []
    for kind in ("f32", "bf16", "int8-dyn", "int8-tok", "int8-static", "w8", "w4"):
        e = _core.Encoder(CFG, 1 + len(encs) % min(2, len(os.sched_getaffinity(0))), _core.Observer)  # 1 or 2 threads, never more than CPUs
        emb = rng.standard_normal((VOCAB, H)).astype(np.float32)
        if kind.startswith("int8"):
            e.set_word_embeddings(*_core.quantize_rows_s8(emb))
        else:
            e.set_word_embeddings(emb)
        e.set_position_type_embeddings(rng.standard_normal((MAXPOS, H)).astype(np.float32),
                                       rng.standard_normal((2, H)).astype(np.float32))
        g, b = np.ones(H, np.float32), np.zeros(H, np.float32)
        e.set_layernorm(-1, 0, g, b)
        for layer in range(LAYERS):
            e.set_layernorm(layer, 0, g, b)
            e.set_layernorm(layer, 1, g, b)
            for s, (N, K) in enumerate([(3 * H, H), (H, H), (I, H), (H, I)]):
                w = (rng.standard_normal((N, K)) * 0.2).astype(np.float32)
                bias = (rng.standard_normal(N) * 0.1).astype(np.float32)
                if kind == "f32":
                    e.set_linear(layer, s, _core.LINEAR_F32, w, None, bias)
                elif kind == "bf16":
                    e.set_linear(layer, s, _core.LINEAR_BF16, w, None, bias)
                elif kind == "w4":
                    q, sc = _core.quantize_weight_s4(w, 8)
                    e.set_linear(layer, s, _core.LINEAR_W4, q, sc, bias, group_size=8)
                else:
                    q, sc = _core.quantize_weight_s8(w, True)
                    k = _core.LINEAR_W8 if kind == "w8" else _core.LINEAR_INT8
                    mode = {"int8-dyn": _core.ACT_DYNAMIC, "int8-tok": _core.ACT_DYNAMIC_TOKEN}.get(kind, _core.ACT_STATIC)
                    e.set_linear(layer, s, k, q, sc, bias, (1 + rng.random(K)).astype(np.float32), act_mode=mode,
                                 act_symmetric=kind != "int8-static", act_scale=0.05, act_zero_point=100)
        e.finalize()
        encs.append(e)
    return encs


ENCODERS = _build_encoders()


# ---------------------------------------------------------------------------------------------- value builders
def pick_int(fdp, lo=-3, hi=70):
    if fdp.ConsumeIntInRange(0, 9) == 0:
        return fdp.PickValueInList(SPECIAL_INTS)
    return fdp.ConsumeIntInRange(lo, hi)


def pick_float(fdp):
    if fdp.ConsumeBool():
        return fdp.PickValueInList(SPECIAL_FLOATS)
    return fdp.ConsumeRegularFloat()


def small_dim(fdp, typical):
    r = fdp.ConsumeIntInRange(0, 15)
    if r == 0:
        return 0
    if r == 1:
        return fdp.ConsumeIntInRange(1, 3)
    if r == 2:
        return typical + fdp.ConsumeIntInRange(-2, 2)
    return max(1, min(typical, fdp.ConsumeIntInRange(1, typical)))


def fill(fdp, shape, dtype, lo=-5, hi=60):
    n = int(np.prod(shape)) if len(shape) else 1
    seed = fdp.ConsumeIntInRange(0, 2**31)
    rng = np.random.default_rng(seed)
    dt = np.dtype(dtype)
    if dt == object:
        return np.array(rng.integers(lo, hi, size=n).tolist(), dtype=object).reshape(shape)
    if dt.kind == "f":
        a = rng.standard_normal(n) * fdp.PickValueInList([1.0, 0.01, 100.0, 1e30])
        for _ in range(fdp.ConsumeIntInRange(0, 3)):
            if n:
                a[rng.integers(0, n)] = fdp.PickValueInList(SPECIAL_FLOATS)
        with np.errstate(all="ignore"):
            return a.astype(dt).reshape(shape)
    if dt.kind == "b":
        return (rng.integers(0, 2, size=n) > 0).reshape(shape)
    info = np.iinfo(dt)
    a = rng.integers(max(lo, info.min), min(hi, info.max) + 1, size=n)
    for _ in range(fdp.ConsumeIntInRange(0, 2)):
        if n:
            a[rng.integers(0, n)] = fdp.PickValueInList([info.min, info.max, -1, VOCAB, VOCAB - 1, 2, 0])
    return a.astype(dt).reshape(shape)


class Sub(np.ndarray):
    def __array_finalize__(self, obj):
        pass


def layout(fdp, a):
    """Some memory layout of the same logical array (or a hostile replacement)."""
    r = fdp.ConsumeIntInRange(0, 12)
    if r <= 5 or not isinstance(a, np.ndarray):
        return a
    if r == 6 and a.ndim == 2:
        big = np.repeat(a, 2, axis=1)
        return big[:, ::2]  # non-contiguous, same values
    if r == 7:
        return np.asfortranarray(a)
    if r == 8 and a.dtype != object:
        buf = np.zeros(a.nbytes + 1, np.uint8)
        u = np.frombuffer(buf.data, dtype=a.dtype, count=a.size, offset=1).reshape(a.shape)
        u[...] = a
        return u  # unaligned
    if r == 9:
        b = a.copy()
        b.flags.writeable = False
        return b
    if r == 10:
        return a.view(Sub) if a.dtype != object else a
    if r == 11:
        shape = fdp.PickValueInList([(2**31, 64), (2**20, 2**20), (1, 2**40), (2**40, 1), (3, 2**31)])
        return np.broadcast_to(a.reshape(-1)[:1] if a.size else np.int32(0), shape)  # huge, zero strides
    return a.tolist() if fdp.ConsumeBool() else (a.item() if a.size == 1 else a)


def mask_for(fdp, B, S):
    r = fdp.ConsumeIntInRange(0, 7)
    if r <= 3:
        lengths = [fdp.ConsumeIntInRange(min(1 if r else 0, S), S) for _ in range(B)]
        if fdp.ConsumeIntInRange(0, 5) == 0 and B:
            lengths[fdp.ConsumeIntInRange(0, B - 1)] = fdp.PickValueInList([-1, 0, S + 1, -2**31])
        m = np.zeros((B, S), np.int32)
        for b, ln in enumerate(lengths):
            m[b, : max(0, min(ln, S))] = 1
        return m
    if r == 4:
        return np.ones((B, S), np.int32)
    return fill(fdp, (B, S), np.int32, -2, 3)


# ---------------------------------------------------------------------------------------------- operations
def op_forward(fdp):
    enc = ENCODERS[fdp.ConsumeIntInRange(0, len(ENCODERS) - 1)]
    B, S, ids, mask, args, want_hidden, want_taps, pooling = build(_forward_inputs, fdp)
    try:
        out = enc.forward(*args)
    except EXPECTED:
        return
    _check_forward(out, B, S, ids, mask, args, want_hidden, want_taps, pooling)


def _forward_inputs(fdp):
    B = small_dim(fdp, 9)
    S = small_dim(fdp, MAXPOS) if fdp.ConsumeIntInRange(0, 20) else fdp.PickValueInList([MAXPOS + 1, 2**12])
    shape = (B, S) if fdp.ConsumeIntInRange(0, 12) else fdp.PickValueInList([(B,), (B, S, 1), ()])
    ids_dtype = np.int32 if fdp.ConsumeIntInRange(0, 6) else fdp.PickValueInList(DTYPES)
    ids = layout(fdp, fill(fdp, shape, ids_dtype, -2 if fdp.ConsumeIntInRange(0, 8) == 0 else 0,
                           VOCAB + (3 if fdp.ConsumeIntInRange(0, 8) == 0 else 0)))
    mask = mask_for(fdp, B, S) if len(shape) == 2 else fill(fdp, shape, np.int32, 0, 2)
    if fdp.ConsumeIntInRange(0, 10) == 0:
        mask = mask[: max(0, B - 1)] if fdp.ConsumeBool() else fill(fdp, mask.shape, fdp.PickValueInList(DTYPES), 0, 2)
    mask = layout(fdp, mask)
    tt = None
    if fdp.ConsumeBool():
        tt = layout(fdp, fill(fdp, shape, np.int32 if fdp.ConsumeIntInRange(0, 6) else fdp.PickValueInList(DTYPES),
                              -1 if fdp.ConsumeIntInRange(0, 8) == 0 else 0, 2 + (fdp.ConsumeIntInRange(0, 8) == 0)))
    pooling = fdp.ConsumeIntInRange(0, 2) if fdp.ConsumeIntInRange(0, 10) else pick_int(fdp)
    normalize, want_hidden, want_taps = fdp.ConsumeBool(), fdp.ConsumeBool(), fdp.ConsumeIntInRange(0, 4) == 0
    observers = None
    r = fdp.ConsumeIntInRange(0, 5)
    if r == 1:
        n = LAYERS * 4 if fdp.ConsumeIntInRange(0, 6) else fdp.ConsumeIntInRange(0, 12)
        pool = [lambda: _core.Observer(fdp.PickValueInList([16, 64, 2048])), lambda: None, lambda: 0,
                lambda: _core.Observer.__new__(_core.Observer), lambda: "observer"]
        observers = [pool[fdp.ConsumeIntInRange(0, 1) if fdp.ConsumeIntInRange(0, 8) else
                          fdp.ConsumeIntInRange(0, len(pool) - 1)]() for _ in range(n)]
        if fdp.ConsumeBool():
            observers = tuple(observers)
    elif r == 2:
        observers = fdp.PickValueInList([5, "x", [None], iter([])])
    args = [ids, mask, tt, pooling, normalize, want_hidden, observers, want_taps]
    if fdp.ConsumeIntInRange(0, 15) == 0:
        args = args[: fdp.ConsumeIntInRange(0, len(args))]
    return B, S, ids, mask, args, want_hidden, want_taps, pooling


def _check_forward(out, B, S, ids, mask, args, want_hidden, want_taps, pooling):
    assert len(args) >= 2, "accepted too few arguments"
    want_hidden = want_hidden if len(args) > 5 else True
    want_taps = want_taps if len(args) > 7 else False
    pooling = pooling if len(args) > 3 else 0
    hidden, pooled, taps = out
    assert isinstance(ids, np.ndarray) and ids.dtype == np.int32 and ids.ndim == 2, "accepted bad ids"
    if want_hidden:
        assert hidden.shape == (B, S, H) and hidden.dtype == np.float32
        lengths = np.asarray(mask).sum(1)
        for b in range(B):
            assert not hidden[b, lengths[b]:].any(), "padding rows not zero"
        assert np.isfinite(hidden).all(), "non-finite hidden state from finite weights"
    else:
        assert hidden is None
    if pooling:
        assert pooled.shape == (B, H) and np.isfinite(pooled).all()
    if want_taps:
        assert len(taps) == LAYERS * 4


def op_linear(fdp):
    kind, kin, N, w, ws, bias, mul, kw = build(_linear_inputs, fdp)
    try:
        lin = _core.Linear(kind, w, ws, bias, mul, **kw)
    except EXPECTED:
        return
    lin.impl(), lin.nbytes()
    for _ in range(fdp.ConsumeIntInRange(1, 3)):
        M, x, r = build(_linear_x, fdp, kin, N)
        try:
            y = lin.forward(x, r)
        except EXPECTED:
            continue
        assert y.shape == (M, N) and y.dtype == np.float32


def _linear_x(fdp, kin, N):
    M = small_dim(fdp, 70)
    x = layout(fdp, fill(fdp, (M, kin) if fdp.ConsumeIntInRange(0, 10) else (M, kin + 1),
                         np.float32 if fdp.ConsumeIntInRange(0, 10) else fdp.PickValueInList(DTYPES)))
    r = layout(fdp, fill(fdp, (M, N), np.float32)) if fdp.ConsumeBool() else None
    return M, x, r


def _linear_inputs(fdp):
    kind = fdp.ConsumeIntInRange(0, 4) if fdp.ConsumeIntInRange(0, 10) else pick_int(fdp)
    N, K = small_dim(fdp, 40), small_dim(fdp, 48)
    wdtype = {0: np.float32, 1: np.float32, 2: np.int8, 3: np.int8, 4: np.uint8}.get(kind, np.float32)
    if fdp.ConsumeIntInRange(0, 8) == 0:
        wdtype = fdp.PickValueInList(DTYPES)
    wshape = (N, K) if fdp.ConsumeIntInRange(0, 10) else fdp.PickValueInList([(N,), (N, K, 1), ()])
    w = layout(fdp, fill(fdp, wshape, wdtype, -127, 127))
    per_ch = fdp.ConsumeBool()
    group = fdp.PickValueInList([2, 4, 8, 16, 3, 0, -2, 2**40]) if fdp.ConsumeBool() else 0
    kin = K * (2 if kind == 4 else 1)
    nsc = {2: N if per_ch else 1, 3: N if per_ch else 1, 4: N * (kin // group) if group > 0 else 1}.get(kind, 0)
    if fdp.ConsumeIntInRange(0, 8) == 0:
        nsc += fdp.ConsumeIntInRange(-2, 2)
    ws = None
    if fdp.ConsumeIntInRange(0, 6):
        ws = np.abs(fill(fdp, (max(nsc, 0),), np.float32)) * 0.01 if nsc >= 0 else None
        if ws is not None and fdp.ConsumeIntInRange(0, 10) == 0:
            ws = -ws
    bias = layout(fdp, fill(fdp, (N,), np.float32)) if fdp.ConsumeBool() else None
    mul = layout(fdp, np.abs(fill(fdp, (kin,), np.float32)) + 0.1) if fdp.ConsumeIntInRange(0, 3) == 0 else None
    kw = dict(act_mode=fdp.ConsumeIntInRange(0, 2) if fdp.ConsumeIntInRange(0, 10) else pick_int(fdp),
              act_symmetric=fdp.ConsumeBool(), act_scale=pick_float(fdp),
              act_zero_point=fdp.ConsumeIntInRange(0, 255) if fdp.ConsumeIntInRange(0, 8) else pick_int(fdp),
              w_per_channel=per_ch, group_size=group,
              epilogue=fdp.ConsumeIntInRange(0, 2) if fdp.ConsumeIntInRange(0, 10) else pick_int(fdp),
              n_threads=fdp.ConsumeIntInRange(0, 2) if fdp.ConsumeIntInRange(0, 10) else pick_int(fdp))
    return kind, kin, N, w, ws, bias, mul, kw


def _observer_x(fdp):
    nd = fdp.ConsumeIntInRange(1, 2) if fdp.ConsumeIntInRange(0, 10) else fdp.ConsumeIntInRange(0, 3)
    shape = tuple(small_dim(fdp, 200 if nd == 1 else 20) for _ in range(nd))
    x = fill(fdp, shape, np.float32 if fdp.ConsumeIntInRange(0, 8) else fdp.PickValueInList(DTYPES))
    if fdp.ConsumeBool() and x.dtype == np.float32 and x.size:
        x = x * fdp.PickValueInList([np.float32(1.0), np.float32(1e-40), np.float32(1e30), np.float32(3e38)])
    return layout(fdp, x)


def op_observer(fdp):
    nbins = fdp.ConsumeIntInRange(16, 4096) if fdp.ConsumeIntInRange(0, 8) else pick_int(fdp)
    momentum = fdp.ConsumeProbability() * 0.99 if fdp.ConsumeIntInRange(0, 8) else pick_float(fdp)
    try:
        o = _core.Observer(nbins, momentum)
    except EXPECTED:
        return
    for _ in range(fdp.ConsumeIntInRange(1, 6)):
        r = fdp.ConsumeIntInRange(0, 9)
        try:
            if r <= 4:
                o.update(build(_observer_x, fdp))
            elif r == 5:
                lo, hi = o.compute_range(fdp.ConsumeIntInRange(0, 3) if fdp.ConsumeIntInRange(0, 8) else pick_int(fdp),
                                         fdp.ConsumeFloatInRange(50.0, 100.0) if fdp.ConsumeBool() else pick_float(fdp),
                                         fdp.ConsumeBool(),
                                         fdp.PickValueInList([256, 16, 4, 2**24, 3, 2**25, 0, -1, 255]))
                assert lo < hi or not (np.isfinite(lo) and np.isfinite(hi)), (lo, hi)
            elif r == 6:
                counts, lo, hi = o.histogram()
                assert counts.sum() == o.count()
            elif r == 7:
                o.column_absmax(), o.minmax(), o.moving_minmax()
            elif r == 8:
                o.reset()
            else:
                o.__init__(fdp.ConsumeIntInRange(16, 300))
        except EXPECTED:
            pass


def op_functions(fdp):
    r = fdp.ConsumeIntInRange(0, 4)
    shape = (small_dim(fdp, 20), small_dim(fdp, 32)) if fdp.ConsumeIntInRange(0, 10) else (small_dim(fdp, 9),)
    dt = np.float32 if fdp.ConsumeIntInRange(0, 8) else fdp.PickValueInList(DTYPES)
    x = build(lambda: layout(fdp, fill(fdp, shape, dt)))
    try:
        if r == 0:
            q, s = _core.quantize_weight_s8(x, fdp.ConsumeBool())
            assert q.shape == x.shape and np.all(s > 0)
        elif r == 1:
            q, s = _core.quantize_weight_s4(x, fdp.PickValueInList([2, 4, 8, 16, 32, 3, 0, -2, 2**40]))
        elif r == 2:
            g = fdp.PickValueInList([2, 4, 8, 3, 0, -4])
            q = build(lambda: layout(fdp, fill(fdp, shape, np.uint8 if fdp.ConsumeIntInRange(0, 8) else
                                              fdp.PickValueInList(DTYPES), 0, 255)))
            n = (shape[0] * (2 * shape[-1] // g)) if len(shape) == 2 and g > 0 else 1
            s = build(lambda: fill(fdp, (max(0, n + (fdp.ConsumeIntInRange(-1, 1) if fdp.ConsumeIntInRange(0, 5) == 0
                                                     else 0)),), np.float32))
            _core.dequantize_weight_s4(q, s, g)
        elif r == 3:
            q, s = _core.quantize_rows_s8(x)
        else:
            lo, hi = pick_float(fdp), pick_float(fdp)
            scale, zp = _core.qparams(lo, hi, fdp.ConsumeBool())
            assert scale > 0 and 0 <= zp <= 255
    except EXPECTED:
        pass


def op_construct(fdp):
    cfg = dict(CFG)
    for _ in range(fdp.ConsumeIntInRange(0, 3)):
        key = fdp.PickValueInList(list(CFG) + ["unknown"])
        v = fdp.ConsumeIntInRange(0, 6)
        cfg[key] = (pick_int(fdp, -3, 100) if v <= 3 else pick_float(fdp) if v == 4 else
                    fdp.PickValueInList([None, "16", [16], True]))
        if fdp.ConsumeIntInRange(0, 10) == 0:
            cfg.pop(key, None)
    try:
        e = _core.Encoder(cfg, pick_int(fdp, 0, 3), _core.Observer if fdp.ConsumeIntInRange(0, 10) else
                          fdp.PickValueInList([int, object, None]))
    except EXPECTED:
        return
    c = e  # set some parameters with fuzzed arrays, then try to finalize and run
    h, v = cfg["hidden"], cfg["vocab_size"]
    if not all(isinstance(cfg.get(k), int) for k in CFG if k != "layer_norm_eps"):
        return
    if h * v > 10**6 or cfg["max_position"] * h > 10**6 or cfg["intermediate"] * h > 10**6:
        return
    for _ in range(fdp.ConsumeIntInRange(0, 6)):
        r = fdp.ConsumeIntInRange(0, 3)
        try:
            if r == 0:
                c.set_word_embeddings(build(lambda: layout(fdp, fill(fdp, (v, h), np.float32))))
            elif r == 1:
                c.set_position_type_embeddings(fill(fdp, (cfg["max_position"], h), np.float32),
                                               fill(fdp, (cfg["type_vocab"], h), np.float32))
            elif r == 2:
                c.set_layernorm(pick_int(fdp, -2, 3), pick_int(fdp, -1, 2), fill(fdp, (h,), np.float32),
                                fill(fdp, (h,), np.float32))
            else:
                site = pick_int(fdp, -1, 4)
                K = cfg["intermediate"] if site == 3 else h
                N = 3 * h if site == 0 else (cfg["intermediate"] if site == 2 else h)
                c.set_linear(pick_int(fdp, -1, 2), site, fdp.ConsumeIntInRange(0, 1), fill(fdp, (N, K), np.float32))
        except EXPECTED:
            pass
    try:
        c.finalize()
    except EXPECTED:
        return


OPS = [op_forward, op_forward, op_forward, op_linear, op_linear, op_observer, op_functions, op_construct]


def TestOneInput(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    with np.errstate(all="ignore"):
        try:
            OPS[fdp.ConsumeIntInRange(0, len(OPS) - 1)](fdp)
        except Skip:
            pass


def main():
    # coverage feedback: the harness's own branches (which inputs were built) and medquant's Python code
    for i, op in enumerate(OPS):
        OPS[i] = atheris.instrument_func(op)
    for fn in (pick_int, pick_float, small_dim, fill, layout, mask_for, _forward_inputs, _linear_inputs,
               _linear_x, _observer_x):
        globals()[fn.__name__] = atheris.instrument_func(fn)
    atheris.Setup(sys.argv, atheris.instrument_func(TestOneInput))
    atheris.Fuzz()


if __name__ == "__main__":
    main()
