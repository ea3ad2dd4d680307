"""Exercise every entry point of medquant._core (success and error paths), free everything, exit.

Not a pytest module: a script for leak checkers, which need a process whose own objects are all gone at exit so
that whatever is still allocated and unreachable is a leak:

  * LeakSanitizer, from .ci/sanitize.sh (ASan build): leaks whose allocation stack has a csrc/ frame fail CI;
  * valgrind, by hand:
      PYTHONMALLOC=malloc valgrind --leak-check=full --show-leak-kinds=definite python tests/leak_check.py

Usage: python tests/leak_check.py [rounds]   (default 3; every round repeats everything)
"""
from __future__ import annotations

import gc
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import medquant  # noqa: E402
from medquant import _core  # noqa: E402
from tiny_bert import random_texts, write_tiny_bert  # noqa: E402


def _bf16_supported() -> bool:
    """oneDNN's bf16 matmul needs avx512_core (or newer); not there e.g. under valgrind's emulated CPU."""
    try:
        _core.Linear(_core.LINEAR_BF16, np.ones((4, 4), np.float32))
        return True
    except RuntimeError:
        return False


BF16 = _bf16_supported()


def expect_error(fn, *args, **kw):
    try:
        fn(*args, **kw)
    except (ValueError, TypeError, RuntimeError, KeyError, OverflowError, MemoryError):
        return
    raise AssertionError(f"{fn} did not raise")


def core_round(rng):
    # module functions
    w = rng.standard_normal((24, 16)).astype(np.float32)
    _core.runtime_info()
    q8, s8 = _core.quantize_weight_s8(w, True)
    _core.quantize_weight_s8(w, False)
    q4, s4 = _core.quantize_weight_s4(w, 8)
    _core.dequantize_weight_s4(q4, s4, 8)
    _core.quantize_rows_s8(w)
    _core.qparams(-1.0, 3.0, False)
    expect_error(_core.quantize_weight_s8, np.full_like(w, np.nan))
    expect_error(_core.quantize_weight_s4, w, 5)
    expect_error(_core.dequantize_weight_s4, q4, s4[:1], 8)
    expect_error(_core.quantize_rows_s8, w[:0])
    expect_error(_core.qparams, 1.0, 0.0, True)

    # observers
    o = _core.Observer(256, 0.5)
    for k in range(3):
        o.update(rng.standard_normal((40, 16)).astype(np.float32) * (k + 1))
    o.update(rng.standard_normal(70_000).astype(np.float32))  # parallel path: per-thread scratch
    expect_error(o.update, np.array([np.nan], np.float32))
    expect_error(o.update, np.ones((2, 3), np.float32))
    o.minmax(), o.moving_minmax(), o.count(), o.histogram()
    for m in (_core.RANGE_MINMAX, _core.RANGE_PERCENTILE, _core.RANGE_ENTROPY, _core.RANGE_MSE):
        o.compute_range(m, 99.9, False)
        o.compute_range(m, 99.9, True)
    expect_error(o.compute_range, 17)
    o.reset()
    expect_error(o.column_absmax)
    o.update(np.ones((2, 4), np.float32))
    o.column_absmax()
    o.__init__(32)  # re-init frees the old C observer
    expect_error(_core.Observer, 3)
    # moments (Gram matrix, grid sums), re-tracked, reset, and a refused batch after staging nothing
    m = _core.Observer(16)
    m.track_moments(gram=True)
    m.set_grid(0.05, 100)
    m.update(rng.standard_normal((30, 12)).astype(np.float32))
    m.moments()
    expect_error(m.set_grid, 0.1, 1)
    expect_error(m.update, np.full((2, 12), np.nan, np.float32))
    m.reset()
    m.track_moments(gram=False)  # replaces the moments object
    m.update(np.ones((3, 12), np.float32))
    m.moments()
    m.__init__(16)  # frees observer and moments

    # linear layers of every kind
    x = rng.standard_normal((37, 16)).astype(np.float32)
    r = rng.standard_normal((37, 24)).astype(np.float32)
    b = rng.standard_normal(24).astype(np.float32)
    mul = (1 + rng.random(16)).astype(np.float32)
    lins = [
        _core.Linear(_core.LINEAR_F32, w, None, b, mul, epilogue=_core.EPI_GELU),
        _core.Linear(_core.LINEAR_BF16 if BF16 else _core.LINEAR_F32, w, None, b, epilogue=_core.EPI_RESIDUAL),
        _core.Linear(_core.LINEAR_INT8, q8, s8, b, mul, act_mode=_core.ACT_DYNAMIC, act_symmetric=False,
                     epilogue=_core.EPI_RESIDUAL),
        _core.Linear(_core.LINEAR_INT8, q8, s8, b, act_mode=_core.ACT_DYNAMIC_TOKEN, epilogue=_core.EPI_RESIDUAL),
        _core.Linear(_core.LINEAR_INT8, q8, s8[:1].copy(), None, act_mode=_core.ACT_STATIC, act_scale=0.05,
                     act_symmetric=False, act_zero_point=120, w_per_channel=False),
        _core.Linear(_core.LINEAR_W8, q8, s8, b),
        _core.Linear(_core.LINEAR_W4, q4, s4, b, group_size=8, epilogue=_core.EPI_GELU),
    ]
    for lin in lins:
        for m in (1, 37, 300):
            xm = np.resize(x, (m, 16)).astype(np.float32)
            rm = np.resize(r, (m, 24)).astype(np.float32)
            lin.forward(xm, rm)
        lin.impl(), lin.nbytes()
        expect_error(lin.forward, x[:, :3])
    expect_error(_core.Linear, _core.LINEAR_F32, np.full_like(w, np.inf))
    expect_error(_core.Linear, _core.LINEAR_INT8, q8, s8, act_mode=_core.ACT_STATIC, act_scale=-1.0)
    bad = _core.Linear.__new__(_core.Linear)
    expect_error(bad.__init__, _core.LINEAR_INT8, q8, -s8)  # fails after the engine was created
    bad.__init__(_core.LINEAR_F32, w)  # then succeeds
    del lins, bad


def core_encoder_round(rng):
    c = {"vocab_size": 50, "hidden": 16, "n_layers": 1, "n_heads": 2, "intermediate": 32, "max_position": 64,
         "type_vocab": 2, "ln_eps": 1e-12}
    H, I = 16, 32
    for kind in (_core.LINEAR_F32, _core.LINEAR_INT8):
        e = _core.Encoder(c, 2, _core.Observer)
        emb = rng.standard_normal((50, H)).astype(np.float32)
        e.set_word_embeddings(emb)
        qe, se = _core.quantize_rows_s8(emb)
        e.set_word_embeddings(qe, se)  # replaces the f32 table
        e.set_position_type_embeddings(rng.standard_normal((64, H)).astype(np.float32),
                                       rng.standard_normal((2, H)).astype(np.float32))
        g, bb = np.ones(H, np.float32), np.zeros(H, np.float32)
        for layer, which in ((-1, 0), (0, 0), (0, 1), (0, 0)):
            e.set_layernorm(layer, which, g, bb)
        expect_error(e.finalize)
        for s, (N, K) in enumerate([(3 * H, H), (H, H), (I, H), (H, I)]):
            wt = (rng.standard_normal((N, K)) * 0.1).astype(np.float32)
            for _ in range(2):  # the second replaces the first
                if kind == _core.LINEAR_INT8:
                    q, sc = _core.quantize_weight_s8(wt, True)
                    e.set_linear(0, s, kind, q, sc, np.zeros(N, np.float32), act_mode=_core.ACT_DYNAMIC)
                else:
                    e.set_linear(0, s, kind, wt, None, np.zeros(N, np.float32))
        expect_error(e.set_linear, 0, 0, kind, np.ones((3, 3), np.float32))
        e.finalize()
        expect_error(e.set_layernorm, 0, 0, g, bb)
        obs = [_core.Observer(64) for _ in range(4)]
        for B, S in ((1, 3), (3, 17), (9, 64), (2, 40)):
            ids = rng.integers(0, 50, size=(B, S)).astype(np.int32)
            mask = np.ones((B, S), np.int32)
            mask[0, S // 2 + 1:] = 0
            tt = rng.integers(0, 2, size=(B, S)).astype(np.int32)
            for pooling in (_core.POOL_NONE, _core.POOL_CLS, _core.POOL_MEAN, _core.POOL_MAX, _core.POOL_MEAN_SQRT_LEN,
                            _core.POOL_WEIGHTED_MEAN, _core.POOL_LAST):
                e.forward(ids, mask, tt, pooling, True, True, obs, True)
            e.forward(ids, mask, None, _core.POOL_MEAN, False, False, None, False)
            bad_ids = ids.copy()
            bad_ids[0, 0] = 99
            expect_error(e.forward, bad_ids, mask)
            expect_error(e.forward, ids, mask * 2)
            expect_error(e.forward, ids, mask, tt + 5)
            expect_error(e.forward, ids, mask, observers=obs[:1])
            expect_error(e.forward, ids, mask, observers=[1, 2, 3, 4])
        e.set_threads(1)
        e.forward(ids, mask)
        e.threads(), e.nbytes(), e.site_impl(0, 0)
        expect_error(e.__init__, c, 1, _core.Observer)
        del e, obs
    expect_error(_core.Encoder, dict(c, hidden=2**31), 1, _core.Observer)
    expect_error(_core.Encoder, c, 1, int)


def python_round(tmp: Path, k: int):
    d = write_tiny_bert(tmp / f"tiny{k}", seed=k)
    enc = medquant.Encoder.from_pretrained(d, n_threads=2)
    texts = random_texts(24, seed=k)
    enc.encode(texts, batch_size=8)
    for scheme in ("int8-dynamic", "int8-static-asym", "int8-smoothquant", "w8-weight-only") + (("bf16",) if BF16 else ()):
        q = enc.quantize(scheme, calibration_texts=texts[:8])
        q.encode(texts[:5])
        q.quant_report(texts[:4])
    out = q.save_pretrained(tmp / f"q{k}")
    medquant.Encoder.from_pretrained(out).encode(texts[:3])
    out_arr = np.empty((len(texts), enc.hidden_size), np.float32)
    enc.encode_to(iter(texts), out_arr, chunk_size=7)
    del enc, q


def main(rounds: int = 3):
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as td:
        for k in range(rounds):
            core_round(rng)
            core_encoder_round(rng)
            python_round(Path(td), k)
            gc.collect()
    gc.collect()
    print("leak_check: ok", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 3)
