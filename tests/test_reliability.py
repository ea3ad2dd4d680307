"""Reliability of the C core and its binding: no leaks (RSS, reference counts), thread safety, and hostile inputs
handed straight to ``medquant._core`` always give a Python exception, never a crash.

Everything runs on a tiny random BERT (tests/tiny_bert.py) so the file takes seconds; it is also the fast subset
that .ci/sanitize.sh runs under AddressSanitizer + UndefinedBehaviorSanitizer.
"""
from __future__ import annotations

import gc
import os
import sys
import threading

import numpy as np
import pytest

import medquant
from medquant import _core
from tiny_bert import random_texts, synthetic_vocab, tiny_config, write_tiny_bert

SANITIZED = bool(os.environ.get("MEDQUANT_SANITIZED"))  # set by .ci/sanitize.sh: fewer iterations, same checks


# ---------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module", autouse=True)
def _frozen_heap():
    """Moves every object that exists before this module runs into the collector's permanent generation, so the
    leak checks' gc.collect() calls (~130 of them) walk only the objects created here: in a full pytest run torch,
    transformers, pandas etc. make each collection ~0.35 s (45 s for this file) instead of milliseconds. What the
    checks see is unchanged: every object (and cycle) they watch is created after the freeze."""
    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()


# tiny_dir, tiny, tiny_int8: tests/conftest.py
@pytest.fixture(scope="module")
def tiny2(tiny_dir):
    """Two oneDNN threads: exercises the OpenMP paths (per-thread attention over sequences)."""
    return medquant.Encoder.from_pretrained(tiny_dir, n_threads=2)


@pytest.fixture(scope="module")
def texts():
    return random_texts(96, seed=3)


def core_config(**changes):
    """The C core's config dict (its own names) of a tiny BERT; changes are given by Hugging Face name."""
    c = {k: v for k, v in tiny_config(50, hidden=16, layers=1, heads=2, intermediate=32, max_position=64).items()
         if k not in ("architectures", "model_type", "hidden_act", "position_embedding_type", "pad_token_id")}
    c.update(changes)
    return {CORE_NAMES[k]: v for k, v in c.items()}


CORE_NAMES = {"vocab_size": "vocab_size", "hidden_size": "hidden", "num_hidden_layers": "n_layers",
              "num_attention_heads": "n_heads", "intermediate_size": "intermediate",
              "max_position_embeddings": "max_position", "type_vocab_size": "type_vocab", "layer_norm_eps": "ln_eps"}


def build_core(kind=_core.LINEAR_F32, n_threads=1, finalize=True, seed=0):
    """A 1-layer _core.Encoder (hidden 16, vocab 50, max_position 64) built directly through the binding."""
    rng = np.random.default_rng(seed)
    c = core_config()
    H, I = c["hidden"], c["intermediate"]
    e = _core.Encoder(c, n_threads, _core.Observer)
    e.set_word_embeddings(rng.standard_normal((c["vocab_size"], H)).astype(np.float32))
    e.set_position_type_embeddings(rng.standard_normal((c["max_position"], H)).astype(np.float32),
                                   rng.standard_normal((c["type_vocab"], H)).astype(np.float32))
    g, b = np.ones(H, np.float32), np.zeros(H, np.float32)
    for layer, which in ((-1, 0), (0, 0), (0, 1)):
        e.set_layernorm(layer, which, g, b)
    for s, (N, K) in enumerate([(3 * H, H), (H, H), (I, H), (H, I)]):
        w = (rng.standard_normal((N, K)) * 0.1).astype(np.float32)
        bias = (rng.standard_normal(N) * 0.1).astype(np.float32)
        if kind == _core.LINEAR_INT8:
            q, sc = _core.quantize_weight_s8(w, True)
            e.set_linear(0, s, kind, q, sc, bias, act_mode=_core.ACT_DYNAMIC)
        else:
            e.set_linear(0, s, kind, w, None, bias)
    if finalize:
        e.finalize()
    return e


def ids_mask(B, S, seed=0, vocab=50):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, size=(B, S)).astype(np.int32)
    lengths = rng.integers(1, S + 1, size=B)
    mask = (np.arange(S)[None, :] < lengths[:, None]).astype(np.int32)
    return ids, mask


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# ---------------------------------------------------------------------------------------------------- leaks
@pytest.mark.skipif(SANITIZED, reason="ASan keeps freed memory in its quarantine (256 MiB), so RSS grows by design; "
                    "leaks are checked by LeakSanitizer in .ci/sanitize.sh instead")
def test_rss_does_not_grow_over_1000_encode_calls(tiny, tiny_int8, texts):
    """1,000 encode calls of mixed shapes (batch 1-12, 2-122 tokens), fp32 and int8 interleaved: after one warm-up
    pass over every shape (primitive caches and workspaces are grow-only by design), RSS stays flat."""
    rng = np.random.default_rng(0)
    batches = []
    for i in range(40):
        b = int(rng.integers(1, 13))
        batches.append([texts[int(j)] for j in rng.integers(0, len(texts), size=b)])
    encoders = (tiny, tiny_int8)
    for enc in encoders:  # warm-up: every shape once per encoder
        for batch in batches:
            enc.encode(batch)
            enc.forward(*enc.tokenize(batch))
    gc.collect()
    before = rss_bytes()
    calls = 1000
    checksum = 0.0
    for i in range(calls):
        enc = encoders[i % 2]
        batch = batches[(i // 2) % len(batches)]
        if i % 5 == 4:
            checksum += float(enc.forward(*enc.tokenize(batch))[0, 0, 0])
        else:
            checksum += float(enc.encode(batch)[0, 0])
    gc.collect()
    growth = rss_bytes() - before
    print(f"RSS before {before / 2**20:.1f} MiB, growth over {calls} calls {growth / 2**20:.2f} MiB")
    assert np.isfinite(checksum)
    assert growth < 4 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB over {calls} encode calls"


def _refcount_stable(fn, *objs, n=200):
    """fn() n times: the reference counts of objs and of None/True/False must not drift (a missing DECREF on an
    argument or on a returned singleton shows up as +n)."""
    watch = list(objs) + [None, True, False]
    fn()
    gc.collect()
    before = [sys.getrefcount(o) for o in watch]
    for _ in range(n):
        try:
            fn()
        except Exception:
            pass
    gc.collect()
    after = [sys.getrefcount(o) for o in watch]
    singletons = len(objs)  # watch[singletons:] are None, True, False: other code may touch them a little
    drift = [(repr(o)[:40], a - b) for i, (o, b, a) in enumerate(zip(watch, before, after))
             if abs(a - b) > (n // 4 if i >= singletons else 0)]
    assert not drift, f"reference counts drifted: {drift}"


def _raises(exc, fn, *a, **kw):
    def call():
        with pytest.raises(exc):
            fn(*a, **kw)
    return call


def test_reference_counts_of_every_entry_point():
    enc = build_core()
    ids, mask = ids_mask(3, 20)
    tt = np.zeros_like(ids)
    obs = [_core.Observer(64) for _ in range(4)]
    x = np.random.default_rng(1).standard_normal((50, 16)).astype(np.float32)
    w = np.random.default_rng(2).standard_normal((24, 16)).astype(np.float32)
    w48 = np.random.default_rng(3).standard_normal((48, 16)).astype(np.float32)
    bad_ids = ids.copy()
    bad_ids[0, 0] = 10**6
    bad_mask = mask.copy()
    bad_mask[:, 0] = 0
    lin = _core.Linear(_core.LINEAR_F32, w, None, np.zeros(24, np.float32), epilogue=_core.EPI_RESIDUAL)
    res = np.zeros((50, 24), np.float32)
    q4, s4 = _core.quantize_weight_s4(w, 8)
    o = _core.Observer(64)

    def forward_all():
        h, p, taps = enc.forward(ids, mask, tt, _core.POOL_MEAN, True, True, obs, True)
        assert sys.getrefcount(h) == 2 and sys.getrefcount(p) == 2 and sys.getrefcount(taps) == 2  # name + arg
        assert all(sys.getrefcount(t) == 3 for t in taps)  # list + loop variable + arg

    cases = [
        (forward_all, ids, mask, tt, *obs),
        (lambda: enc.forward(ids, mask), ids, mask),
        (_raises(ValueError, enc.forward, bad_ids, mask), bad_ids, mask),
        (_raises(ValueError, enc.forward, ids, bad_mask, tt), ids, bad_mask, tt),
        (_raises(ValueError, enc.forward, ids, mask, None, 0, False, True, obs[:2]), ids, mask, *obs),
        (_raises(TypeError, enc.forward, ids, mask, None, 0, False, True, [o, 1, None, None]), o),
        (_raises(TypeError, enc.forward, ids.astype(np.int64), mask), mask),
        (_raises(ValueError, enc.forward, ids[:, ::2], mask[:, ::2]), ids, mask),
        (lambda: enc.threads(),), (lambda: enc.nbytes(),), (lambda: enc.site_impl(0, 0),),
        (lambda: enc.set_threads(1),),
        (_raises(ValueError, enc.set_threads, -3),),
        (_raises(RuntimeError, enc.finalize),),  # already finalized
        (_raises(RuntimeError, enc.set_layernorm, 0, 0, x[0], x[0]), x),
        (_raises(RuntimeError, enc.set_linear, 0, 0, 0, w48), w48),
        (_raises(ValueError, enc.set_linear, 0, 0, 0, w), w),
        (_raises(RuntimeError, enc.set_word_embeddings, x), x),  # right shape, but finalized
        (_raises(ValueError, enc.set_position_type_embeddings, x, x), x),
        (lambda: o.update(x), x), (lambda: o.update(x[0]), x),
        (_raises(ValueError, o.update, np.full(4, np.nan, np.float32)),),
        (_raises(TypeError, o.update, x.astype(np.float64)),),
        (lambda: o.minmax(),), (lambda: o.moving_minmax(),), (lambda: o.count(),),
        (lambda: o.histogram(),), (lambda: o.column_absmax(),),
        (lambda: o.compute_range(_core.RANGE_MSE, 0.0, True),),
        (_raises(ValueError, o.compute_range, 99),),
        (lambda: lin.forward(x, res), x, res), (lambda: lin.impl(),), (lambda: lin.nbytes(),),
        (_raises(ValueError, lin.forward, x[:, :8]), x),
        (_raises(ValueError, lin.forward, x, res[:3]), x, res),
        (_raises(ValueError, _core.Linear, _core.LINEAR_INT8, w.astype(np.int8)), w),
        (lambda: _core.runtime_info(),),
        (lambda: _core.quantize_weight_s8(w, False), w), (lambda: _core.quantize_weight_s4(w, 8), w),
        (lambda: _core.dequantize_weight_s4(q4, s4, 8), q4, s4), (lambda: _core.quantize_rows_s8(x), x),
        (lambda: _core.qparams(-1.0, 2.0, False),),
        (_raises(ValueError, _core.quantize_weight_s4, w, 3), w),
        (_raises(ValueError, _core.dequantize_weight_s4, q4, s4[:-1], 8), q4, s4),
        (_raises(ValueError, _core.qparams, 2.0, 1.0, False),),
        (_raises(ValueError, _core.quantize_rows_s8, x[:0]), x),
    ]
    # parameter setters (success paths need an encoder that is not finalized yet; each call replaces the last)
    raw = build_core(finalize=False)
    emb = np.random.default_rng(4).standard_normal((50, 16)).astype(np.float32)
    pos = np.random.default_rng(5).standard_normal((64, 16)).astype(np.float32)
    typ = pos[:2].copy()
    g, bt = np.ones(16, np.float32), np.zeros(16, np.float32)
    qe, se = _core.quantize_rows_s8(emb)
    q48, s48 = _core.quantize_weight_s8(w48, True)
    cases += [
        (lambda: raw.set_word_embeddings(emb), emb), (lambda: raw.set_word_embeddings(qe, se), qe, se),
        (lambda: raw.set_position_type_embeddings(pos, typ), pos, typ),
        (lambda: raw.set_layernorm(0, 1, g, bt), g, bt), (lambda: raw.set_layernorm(-1, 0, g, bt), g, bt),
        (lambda: raw.set_linear(0, 0, _core.LINEAR_F32, w48, None, np.zeros(48, np.float32)), w48),
        (lambda: raw.set_linear(0, 0, _core.LINEAR_INT8, q48, s48, None, g, act_mode=_core.ACT_DYNAMIC), q48, s48, g),
        (_raises(ValueError, raw.set_layernorm, 5, 0, g, bt), g, bt),
        (_raises(ValueError, raw.set_linear, 0, 9, 0, w48), w48),
        (_raises(ValueError, raw.set_word_embeddings, np.full_like(emb, np.nan)),),
        (_raises(RuntimeError, raw.forward, ids, mask), ids, mask),  # not finalized
    ]
    for fn, *objs in cases:
        _refcount_stable(fn, *objs, n=40 if SANITIZED else 100)
    raw.finalize()
    assert raw.forward(ids, mask)[0].shape == (3, 20, 16)


@pytest.mark.parametrize("tp,make", [
    ("Observer", lambda: _core.Observer(32)),
    ("Encoder", lambda: build_core()),
    ("Linear", lambda: _core.Linear(_core.LINEAR_F32, np.ones((8, 8), np.float32))),
])
def test_instances_are_freed(tp, make):
    """Heap-type instances hold a reference to their type: after creating and dropping 50 objects (and 50 failed
    constructions) the type's reference count is back where it started."""
    t = getattr(_core, tp)
    make()
    gc.collect()
    before = sys.getrefcount(t)
    for _ in range(50):
        obj = make()
        del obj
        with pytest.raises((ValueError, TypeError)):
            {"Observer": lambda: _core.Observer(3), "Encoder": lambda: _core.Encoder(core_config(hidden_size=-1), 1, _core.Observer),
             "Linear": lambda: _core.Linear(_core.LINEAR_F32, np.full((8, 8), np.inf, np.float32))}[tp]()
    gc.collect()
    assert sys.getrefcount(t) == before


# ---------------------------------------------------------------------------------------------------- threads
def _run_threads(target, n, *args):
    errors = []

    def wrap(i):
        try:
            target(i, *args)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    ts = [threading.Thread(target=wrap, args=(i,)) for i in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    if errors:
        raise errors[0]


@pytest.mark.parametrize("which", ["fp32", "int8", "fp32-2-threads"])
def test_same_encoder_from_8_threads_is_bit_identical(tiny, tiny2, tiny_int8, texts, which):
    enc = {"fp32": tiny, "int8": tiny_int8, "fp32-2-threads": tiny2}[which]
    batches = [texts[i: i + 1 + i % 7] for i in range(0, 64, 4)]
    serial = [enc.encode(b) for b in batches]
    rounds = 2 if SANITIZED else 6
    results = {}

    def work(t):
        out = []
        for r in range(rounds):
            for k in range(len(batches)):
                j = (k + t + r) % len(batches)  # threads hit different shapes at the same time
                out.append((j, enc.encode(batches[j])))
        results[t] = out

    _run_threads(work, 8)
    for t in range(8):
        for j, emb in results[t]:
            assert np.array_equal(emb, serial[j]), f"thread {t} batch {j} differs from the serial result"


def test_two_encoders_with_different_schemes_do_not_interfere(tiny, tiny_int8, texts):
    w4 = tiny.quantize("w4-weight-only") if tiny.config.hidden_size % 32 == 0 else tiny.quantize("bf16")
    encs = [tiny, tiny_int8, w4]
    batches = [texts[i: i + 5] for i in range(0, 60, 5)]
    serial = [[e.encode(b) for b in batches] for e in encs]
    bad = []

    def work(t):
        e = t % len(encs)
        for r in range(2 if SANITIZED else 5):
            for j, b in enumerate(batches):
                if not np.array_equal(encs[e].encode(b), serial[e][j]):
                    bad.append((e, j))

    _run_threads(work, 6)
    assert not bad
    # and the schemes really differ
    assert not np.array_equal(serial[0][0], serial[1][0])


def test_set_threads_while_encoding(tiny_dir, texts):
    enc = medquant.Encoder.from_pretrained(tiny_dir, n_threads=2)
    batches = [texts[i: i + 6] for i in range(0, 48, 6)]
    base = [enc.encode(b) for b in batches]
    stop = threading.Event()

    def toggler():
        n = 0
        while not stop.is_set():
            enc.set_threads(1 + n % 2)
            n += 1

    tog = threading.Thread(target=toggler)
    tog.start()
    diffs = []
    try:
        def work(t):
            for r in range(2 if SANITIZED else 4):
                for j, b in enumerate(batches):
                    diffs.append(float(np.abs(enc.encode(b) - base[j]).max()))
        _run_threads(work, 4)
    finally:
        stop.set()
        tog.join()
    assert max(diffs) <= 1e-5
    enc.set_threads(2)


def test_same_minilm_from_8_threads(minilm, medquad_questions):
    """The real model: 8 threads sharing one encoder give exactly the serial embeddings."""
    batches = [medquad_questions[i: i + 4] for i in range(0, 32, 4)]
    serial = [minilm.encode(b) for b in batches]
    out = {}
    _run_threads(lambda t: out.__setitem__(t, minilm.encode(batches[t])), 8)
    assert all(np.array_equal(out[t], serial[t]) for t in range(8))


def test_one_observer_from_many_threads_raises_instead_of_crashing():
    """Regression: concurrent update/reset of one Observer used to free its buffers under another thread (segfault).
    Now a busy observer refuses with RuntimeError."""
    o = _core.Observer(1 << 14)
    xs = [np.random.default_rng(i).standard_normal((200, 64)).astype(np.float32) * (i + 1) for i in range(4)]
    refused = []

    def work(t):
        for k in range(30 if SANITIZED else 100):
            try:
                o.update(xs[(t + k) % 4])
                if k % 7 == 0:
                    o.reset()
                o.histogram() if o.count() else None
            except RuntimeError as e:
                assert "in use" in str(e)
                refused.append(1)

    _run_threads(work, 4)
    o.update(xs[0])
    assert o.count() >= xs[0].size


def test_observers_swapped_out_during_forward():
    """Regression: forward() kept only the caller's list; another thread replacing its entries freed the Observers
    while the C core was updating them. Now the call holds its own references (and marks them busy)."""
    enc = build_core()
    ids, mask = ids_mask(8, 60, seed=1)
    stop = threading.Event()
    shared = [_core.Observer(4096) for _ in range(4)]

    def swapper(_):
        while not stop.is_set():
            for i in range(4):
                shared[i] = _core.Observer(4096) if i % 2 else None
            for i in range(4):
                try:
                    shared[i] = _core.Observer(4096)
                except RuntimeError:
                    pass

    sw = threading.Thread(target=swapper, args=(0,))
    sw.start()
    try:
        for _ in range(30 if SANITIZED else 150):
            try:
                enc.forward(ids, mask, observers=shared, hidden=False)
            except (TypeError, RuntimeError):
                pass
    finally:
        stop.set()
        sw.join()


def test_ids_changed_by_another_thread_during_forward():
    """Regression (TOCTOU): forward validated the caller's ids, released the GIL and read them again; a thread
    writing an out-of-vocabulary id in between made the core read outside the embedding table. The binding now
    works on a private copy: each call either raises ValueError or returns finite output."""
    enc = build_core()
    ids, mask = ids_mask(16, 64, seed=2)
    mask[:] = 1
    stop = threading.Event()

    good = ids.copy()
    evil = np.full_like(ids, 2**30)

    def flipper(_):
        k = 0
        while not stop.is_set():
            np.copyto(ids, evil if k % 2 else good)
            k += 1

    fl = threading.Thread(target=flipper, args=(0,))
    fl.start()
    ok = bad = 0
    try:
        for _ in range(40 if SANITIZED else 200):
            try:
                h, _, _ = enc.forward(ids, mask)
                assert np.isfinite(h).all()
                ok += 1
            except ValueError as e:
                assert "vocabulary" in str(e)
                bad += 1
    finally:
        stop.set()
        fl.join()
    assert ok + bad > 0


def test_set_linear_racing_finalize_and_forward():
    """Regression: set_linear (GIL released) replaced a layer while another thread finalized and ran forward on it.
    The swap now happens under the encoder lock and is refused once the encoder is finalized."""
    rng = np.random.default_rng(0)
    for trial in range(3 if SANITIZED else 10):
        enc = build_core(finalize=False, seed=trial)
        w = (rng.standard_normal((48, 16)) * 0.1).astype(np.float32)
        ids, mask = ids_mask(2, 16)
        stop = threading.Event()

        def setter(_):
            while not stop.is_set():
                try:
                    enc.set_linear(0, 0, _core.LINEAR_F32, w)
                except RuntimeError as e:
                    assert "finalized" in str(e)
                    return

        st = threading.Thread(target=setter, args=(0,))
        st.start()
        try:
            enc.finalize()
            for _ in range(20):
                enc.forward(ids, mask)
        finally:
            stop.set()
            st.join()


def test_reinitialising_objects():
    enc = build_core()
    with pytest.raises(RuntimeError, match="already initialised"):
        enc.__init__(core_config(), 1, _core.Observer)
    assert enc.forward(*ids_mask(1, 4))[0].shape == (1, 4, 16)
    lin = _core.Linear(_core.LINEAR_F32, np.ones((4, 4), np.float32))
    with pytest.raises(RuntimeError, match="already initialised"):
        lin.__init__(_core.LINEAR_F32, np.ones((4, 4), np.float32))
    o = _core.Observer(32)
    o.update(np.ones(10, np.float32))
    o.__init__(64)  # an idle observer may be re-initialised: it starts empty
    assert o.count() == 0


# ---------------------------------------------------------------------------------------------------- hostile input
def test_observer_type_must_be_the_core_observer():
    """Regression: any type was accepted as observer_type, and forward() then read e.g. an int as an Observer
    (segfault)."""
    for bad in (int, object, np.ndarray, "Observer", None):
        with pytest.raises(TypeError, match="observer_type"):
            _core.Encoder(core_config(), 1, bad)

    class MyObserver(_core.Observer):
        def __init__(self):  # does not call the base __init__: no C observer behind it
            pass

    enc = _core.Encoder(core_config(), 1, MyObserver)
    del enc
    enc = build_core()
    ids, mask = ids_mask(1, 5)
    with pytest.raises(TypeError, match="observers"):
        enc.forward(ids, mask, observers=[12345678] * 4)
    with pytest.raises(TypeError, match="not an initialised Observer"):
        enc.forward(ids, mask, observers=[MyObserver(), None, None, None])
    with pytest.raises(TypeError, match="not an initialised Observer"):
        enc.forward(ids, mask, observers=[_core.Observer.__new__(_core.Observer), None, None, None])
    with pytest.raises(TypeError):
        enc.forward(ids, mask, observers=5)
    enc.forward(ids, mask, observers=iter([_core.Observer(32), None, None, None]))  # any iterable


@pytest.mark.parametrize("change,exc", [
    ({"hidden_size": 2**31}, ValueError), ({"vocab_size": 2**40}, ValueError), ({"vocab_size": -1}, ValueError),
    ({"hidden_size": 0}, ValueError), ({"num_hidden_layers": 10**6}, ValueError), ({"num_attention_heads": 3}, ValueError),
    ({"intermediate_size": 2**62}, ValueError), ({"max_position_embeddings": 2**20}, ValueError),
    ({"type_vocab_size": 0}, ValueError), ({"hidden_size": 2**70}, TypeError), ({"hidden_size": 16.0}, TypeError),
    ({"hidden_size": "16"}, TypeError), ({"layer_norm_eps": float("nan")}, ValueError), ({"layer_norm_eps": 0.0}, ValueError),
    ({"layer_norm_eps": "x"}, TypeError), ({"num_hidden_layers": None}, TypeError),
])
def test_core_encoder_rejects_overflowing_config(change, exc):
    with pytest.raises(exc):
        _core.Encoder(core_config(**change), 1, _core.Observer)


def test_core_encoder_config_shapes_and_threads():
    c = core_config()
    del c["vocab_size"]
    with pytest.raises(KeyError, match="vocab_size"):
        _core.Encoder(c, 1, _core.Observer)
    with pytest.raises(TypeError):
        _core.Encoder([("vocab_size", 5)], 1, _core.Observer)
    with pytest.raises(ValueError, match="n_threads"):
        _core.Encoder(core_config(), 10**5, _core.Observer)
    with pytest.raises(OverflowError):
        _core.Encoder(core_config(), 2**40, _core.Observer)
    # largest accepted shapes allocate nothing until parameters arrive
    big = _core.Encoder(core_config(vocab_size=1 << 22, hidden_size=1 << 14, num_attention_heads=1,
                                    intermediate_size=1 << 16, max_position_embeddings=1 << 14), 1, _core.Observer)
    with pytest.raises(RuntimeError, match="not finalized"):
        big.forward(*ids_mask(1, 4))
    with pytest.raises(RuntimeError, match="word embeddings not set"):
        big.finalize()
    enc = build_core()
    for n in (-1, 2**31, 10**6):
        with pytest.raises((ValueError, OverflowError)):
            enc.set_threads(n)
    enc.set_threads(0)  # all available
    assert enc.threads() >= 1


def test_uninitialised_objects_raise():
    e = _core.Encoder.__new__(_core.Encoder)
    o = _core.Observer.__new__(_core.Observer)
    lin = _core.Linear.__new__(_core.Linear)
    ids, mask = ids_mask(1, 4)
    for call in (lambda: e.forward(ids, mask), lambda: e.finalize(), lambda: e.threads(), lambda: e.nbytes(),
                 lambda: e.set_threads(1), lambda: e.site_impl(0, 0), lambda: e.set_word_embeddings(ids),
                 lambda: o.update(np.ones(3, np.float32)), lambda: o.minmax(), lambda: o.histogram(),
                 lambda: o.compute_range(0), lambda: o.reset(), lambda: lin.forward(np.ones((2, 2), np.float32)),
                 lambda: lin.impl(), lambda: lin.nbytes()):
        with pytest.raises(RuntimeError, match="not initialised"):
            call()
    del e, o, lin  # dealloc of never-initialised objects


def _unaligned_int32(shape):
    buf = np.zeros(int(np.prod(shape)) * 4 + 1, np.uint8)
    return np.frombuffer(buf.data, dtype=np.int32, count=int(np.prod(shape)), offset=1).reshape(shape)


def test_forward_hostile_arrays():
    enc = build_core()
    ids, mask = ids_mask(3, 10)
    huge = np.broadcast_to(np.int32(1), (2**31, 2**20))  # 2^51 elements, no memory: zero strides
    cases = [
        ((ids.astype(np.int64), mask), TypeError, "dtype"), ((ids.astype(np.float32), mask), TypeError, "dtype"),
        ((ids.astype(object), mask), TypeError, "dtype"), ((ids.tolist(), mask), TypeError, "numpy array"),
        ((ids, mask.astype(np.bool_)), TypeError, "dtype"), ((ids, mask.astype(np.uint32)), TypeError, "dtype"),
        ((ids[0], mask[0]), ValueError, "2-dimensional"), ((ids[None], mask[None]), ValueError, "2-dimensional"),
        ((np.int32(5), mask), TypeError, "numpy array"),
        ((ids[:, ::2], mask[:, ::2]), ValueError, "contiguous"), ((np.asfortranarray(ids), mask), ValueError, "contiguous"),
        ((_unaligned_int32(ids.shape), mask), ValueError, "aligned"),
        ((huge, huge), ValueError, "contiguous"), ((huge[:, :8], huge[:, :8]), ValueError, "contiguous"),
        ((np.zeros((0, 5), np.int32), np.zeros((0, 5), np.int32)), ValueError, "empty"),
        ((np.zeros((5, 0), np.int32), np.zeros((5, 0), np.int32)), ValueError, "empty"),
        ((ids, mask[:2]), ValueError, "size"), ((ids, mask[:, :5]), ValueError, "size"),
        ((ids, -mask), ValueError, "right-padded"), ((ids, 2 * mask), ValueError, "right-padded"),
        ((ids, np.zeros_like(mask)), ValueError, "no tokens"), ((ids, mask[:, ::-1].copy()), ValueError, "right-padded"),
        ((np.full_like(ids, 50), np.ones_like(mask)), ValueError, "vocabulary"),
        ((np.full_like(ids, -1), np.ones_like(mask)), ValueError, "vocabulary"),
        ((np.full_like(ids, np.iinfo(np.int32).min), np.ones_like(mask)), ValueError, "vocabulary"),
        ((np.full((1, 65), 1, np.int32), np.ones((1, 65), np.int32)), ValueError, "max_position"),
    ]
    for args, exc, match in cases:
        with pytest.raises(exc, match=match):
            enc.forward(*args)
    # ids past a row's length are never read (padding may hold anything)
    padded = ids.copy()
    padded[mask == 0] = -7
    assert np.array_equal(enc.forward(padded, mask)[0], enc.forward(np.where(mask == 1, ids, 0).astype(np.int32), mask)[0])
    with pytest.raises(ValueError, match="token type"):
        enc.forward(ids, mask, np.full_like(ids, 2))
    with pytest.raises(ValueError, match="token type"):
        enc.forward(ids, mask, np.full_like(ids, -1))
    with pytest.raises(ValueError, match="size"):
        enc.forward(ids, mask, ids[:1])
    for pooling in (-1, max(getattr(_core, n) for n in dir(_core) if n.startswith("POOL_")) + 1, 2**31 - 1):
        with pytest.raises(ValueError, match="pooling"):
            enc.forward(ids, mask, None, pooling)
    with pytest.raises(OverflowError):
        enc.forward(ids, mask, None, 2**40)
    # read-only and ndarray-subclass inputs are fine
    ro = ids.copy()
    ro.flags.writeable = False
    assert enc.forward(ro, mask)[0].shape == (3, 10, 16)
    seen = []

    class Sub(np.ndarray):
        def __array_finalize__(self, obj):  # Python code running inside the binding (on its private copy)
            seen.append(1)

    assert enc.forward(ids.view(Sub), mask.view(Sub))[0].shape == (3, 10, 16)


def test_linear_hostile_arrays():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((24, 16)).astype(np.float32)
    q, s = _core.quantize_weight_s8(w, True)
    q4, s4 = _core.quantize_weight_s4(w, 8)
    bad_init = [
        (dict(kind=_core.LINEAR_F32, weight=w.astype(np.float64)), TypeError),
        (dict(kind=_core.LINEAR_F32, weight=w[0]), ValueError),
        (dict(kind=_core.LINEAR_F32, weight=w[:, ::2]), ValueError),
        (dict(kind=_core.LINEAR_F32, weight=w[:0]), ValueError),
        (dict(kind=_core.LINEAR_F32, weight=np.full_like(w, np.nan)), ValueError),
        (dict(kind=_core.LINEAR_F32, weight=w, bias=np.full(24, np.inf, np.float32)), ValueError),
        (dict(kind=_core.LINEAR_F32, weight=w, bias=np.zeros(23, np.float32)), ValueError),
        (dict(kind=_core.LINEAR_F32, weight=w, act_mul=np.zeros(24, np.float32)), ValueError),
        (dict(kind=99, weight=w), (ValueError, TypeError)), (dict(kind=-1, weight=w), (ValueError, TypeError)),
        (dict(kind=_core.LINEAR_F32, weight=w, epilogue=7), ValueError),
        (dict(kind=_core.LINEAR_F32, weight=w, n_threads=10**6), ValueError),
        (dict(kind=_core.LINEAR_INT8, weight=q), ValueError),  # scales missing
        (dict(kind=_core.LINEAR_INT8, weight=q, w_scales=s[:3]), ValueError),
        (dict(kind=_core.LINEAR_INT8, weight=q, w_scales=-s), ValueError),
        (dict(kind=_core.LINEAR_INT8, weight=q, w_scales=s * np.nan), ValueError),
        (dict(kind=_core.LINEAR_INT8, weight=q, w_scales=s, act_mode=9), ValueError),
        (dict(kind=_core.LINEAR_INT8, weight=q, w_scales=s, act_mode=_core.ACT_STATIC, act_scale=0.0), ValueError),
        (dict(kind=_core.LINEAR_INT8, weight=q, w_scales=s, act_mode=_core.ACT_STATIC, act_scale=float("inf")), ValueError),
        (dict(kind=_core.LINEAR_INT8, weight=q, w_scales=s, act_mode=_core.ACT_STATIC, act_symmetric=False,
              act_zero_point=300), ValueError),
        (dict(kind=_core.LINEAR_INT8, weight=q, w_scales=s, act_mode=_core.ACT_DYNAMIC_TOKEN, act_symmetric=False), ValueError),
        (dict(kind=_core.LINEAR_W4, weight=q4, w_scales=s4), ValueError),  # group_size missing
        (dict(kind=_core.LINEAR_W4, weight=q4, w_scales=s4, group_size=3), ValueError),
        (dict(kind=_core.LINEAR_W4, weight=q4, w_scales=s4, group_size=-8), ValueError),
        (dict(kind=_core.LINEAR_W4, weight=q4, w_scales=s4, group_size=2**62), ValueError),
        (dict(kind=_core.LINEAR_W4, weight=q4, w_scales=s4[:-1], group_size=8), ValueError),
        (dict(kind=_core.LINEAR_W4, weight=q, w_scales=s4, group_size=8), TypeError),
    ]
    for kw, exc in bad_init:
        with pytest.raises(exc):
            _core.Linear(**kw)
    lin = _core.Linear(_core.LINEAR_INT8, q, s, None, act_mode=_core.ACT_DYNAMIC, epilogue=_core.EPI_RESIDUAL)
    x = rng.standard_normal((33, 16)).astype(np.float32)
    r = np.zeros((33, 24), np.float32)
    bad_fwd = [
        ((x.astype(np.float64), r), TypeError), ((x[:, :15], r), ValueError), ((x[0], r), ValueError),
        ((x[::2], r[::2]), ValueError), ((x[:0], r[:0]), ValueError), ((x, r[:5]), ValueError),
        ((x, r.astype(np.float16)), TypeError), ((np.broadcast_to(x[0], (2**40, 16)), r), ValueError),
        ((np.full_like(x, np.inf), r), ValueError),
        ((x,), ValueError),  # residual epilogue needs the residual
    ]
    for args, exc in bad_fwd:
        with pytest.raises(exc):
            lin.forward(*args)
    assert np.isfinite(lin.forward(x, r)).all()
    lin.forward(np.full_like(x, np.nan), r)  # NaN activations are not checked per call (quantize to 0): no crash


def test_observer_and_module_functions_hostile_arguments():
    for kw in (dict(nbins=0), dict(nbins=2**21), dict(nbins=-5), dict(momentum=1.0), dict(momentum=float("nan")),
               dict(momentum=-0.1)):
        with pytest.raises(ValueError):
            _core.Observer(**kw)
    with pytest.raises(OverflowError):
        _core.Observer(2**40)
    o = _core.Observer(16)
    with pytest.raises(RuntimeError, match="no values"):
        o.compute_range(_core.RANGE_MINMAX)
    for x, exc in ((np.ones((2, 2, 2), np.float32), ValueError), (np.ones((), np.float32), ValueError),
                   (np.ones(4, np.float64), TypeError), ([1.0, 2.0], TypeError), (np.float32(3), TypeError),
                   (np.array([1, np.inf], np.float32), ValueError), (np.ones((4, 0), np.float32), ValueError),
                   (np.ones((0, 4), np.float32), None)):
        if exc is None:
            o.update(x)
        else:
            with pytest.raises(exc):
                o.update(x)
    o.update(np.ones((3, 4), np.float32))
    with pytest.raises(ValueError):
        o.update(np.ones((3, 5), np.float32))  # column count changed
    for args in ((99,), (-1,), (_core.RANGE_PERCENTILE, 10.0), (_core.RANGE_PERCENTILE, float("nan")),
                 (_core.RANGE_MSE, 0.0, False, 2), (_core.RANGE_MSE, 0.0, False, 2**25)):
        with pytest.raises(ValueError):
            o.compute_range(*args)
    w = np.ones((4, 8), np.float32)
    for fn, args, exc in [
        (_core.quantize_weight_s8, (w[:0],), ValueError), (_core.quantize_weight_s8, (w.T,), ValueError),
        (_core.quantize_weight_s8, (np.full_like(w, np.nan),), ValueError),
        (_core.quantize_weight_s4, (w, 0), ValueError), (_core.quantize_weight_s4, (w, -2), ValueError),
        (_core.quantize_weight_s4, (w, 3), ValueError), (_core.quantize_weight_s4, (w, 2**62), ValueError),
        (_core.quantize_weight_s4, (np.full_like(w, np.inf), 4), ValueError),
        (_core.dequantize_weight_s4, (np.zeros((4, 4), np.uint8), np.ones(3, np.float32), 4), ValueError),
        (_core.dequantize_weight_s4, (np.zeros((4, 4), np.uint8), np.ones(8, np.float32), 0), ValueError),
        (_core.dequantize_weight_s4, (np.zeros((4, 4), np.int8), np.ones(8, np.float32), 4), TypeError),
        (_core.quantize_rows_s8, (np.ones((0, 3), np.float32),), ValueError),
        (_core.quantize_rows_s8, (np.full((2, 3), np.nan, np.float32),), ValueError),
        (_core.qparams, (float("nan"), 1.0, True), ValueError), (_core.qparams, (0.0, float("inf"), True), ValueError),
        (_core.qparams, (1e39, 2e39, False), ValueError), (_core.qparams, (3.0, 1.0, False), ValueError),
    ]:
        with pytest.raises(exc):
            fn(*args)


def test_hostile_texts(tiny):
    """Texts the tokenizer may choke on give a Python exception or a finite embedding, never a crash."""
    weird = ["", " ", "\x00" * 100, "\n\t\r" * 1000, "\U0001F600" * 20_000, "中文" * 50_000, "a" * 100_000,
             " ".join(["glaucoma"] * 20_000), "\u200b\ufeff" * 1000, "ü" * 3 + "\u0301" * 5000]
    out = tiny.encode(weird, batch_size=4)
    assert out.shape == (len(weird), tiny.hidden_size) and np.isfinite(out).all()
    assert tiny.encode("a single string").shape == (tiny.hidden_size,)  # sentence-transformers convention
    for bad in (["\ud800 lone surrogate"], [b"bytes"], [None], b"bytes", 42, []):
        with pytest.raises(Exception) as ei:
            tiny.encode(bad)
        assert isinstance(ei.value, (TypeError, ValueError, UnicodeError)) or type(ei.value).__name__ == "Exception"


def _extreme_copy(tiny_dir, tmp_path, tensor):
    import shutil

    from safetensors.numpy import load_file, save_file

    d = tmp_path / "extreme"
    shutil.copytree(tiny_dir, d)
    t = load_file(str(d / "model.safetensors"))
    t[tensor][3] = 1e38
    save_file(t, str(d / "model.safetensors"))
    return medquant.Encoder.from_pretrained(d, n_threads=1)


def test_extreme_final_layernorm_overflows_pooling(tiny_dir, tmp_path):
    """Fuzz finding (fuzz/fuzz_checkpoint.py, 5-minute run): a last-layer LayerNorm gain of 1e38 leaves the hidden
    states finite (one channel ~1e38) but the mean-pooling sum overflows: encode() returned NaN. Now ValueError."""
    enc = _extreme_copy(tiny_dir, tmp_path, "encoder.layer.1.output.LayerNorm.weight")
    ids, mask, _ = enc.tokenize(["what causes glaucoma?", "heart"])
    assert np.isfinite(enc.forward(ids, mask)).all()  # the hidden state itself is finite
    with pytest.raises(ValueError, match="pooling produced non-finite"):
        enc.encode(["what causes glaucoma? " * 10, "heart"])
    enc.encode(["heart"], pooling="cls")  # CLS pooling does not sum: finite


def test_extreme_but_finite_weights_raise_instead_of_returning_nan(tiny_dir, tmp_path):
    """Fuzz finding (fuzz/fuzz_checkpoint.py): a checkpoint whose tensors are all finite but extreme (an embedding
    LayerNorm gain of 1e38) loaded, and encode() returned NaN embeddings. The core now checks its output and
    raises ValueError instead."""
    enc = _extreme_copy(tiny_dir, tmp_path, "embeddings.LayerNorm.weight")
    for e in (enc, enc.quantize("w8-weight-only"), enc.quantize("bf16")):
        with pytest.raises(ValueError, match="non-finite"):
            e.encode(["what causes glaucoma?", "heart"])
        with pytest.raises(ValueError, match="non-finite"):
            e.forward(*e.tokenize(["what causes glaucoma?"])[:2])
    # dynamic int8 puts the 1e38 channel at the top of its u8 range (scale ~4e35) and everything else at the zero
    # point: the result is finite, if meaningless, on every kernel path (native or emulated int8)
    for scheme in ("int8-dynamic", "int8-dynamic-token"):
        assert np.isfinite(enc.quantize(scheme).encode(["what causes glaucoma?"])).all()


# ---------------------------------------------------------------------------------------------------- streaming
def test_encode_to_streams_a_generator_into_a_memmap(tiny, texts, tmp_path):
    n = 250

    def gen():
        for i in range(n):
            yield texts[i % len(texts)] + f" {i}"

    out = np.lib.format.open_memmap(tmp_path / "emb.npy", mode="w+", dtype=np.float32, shape=(n, tiny.hidden_size))
    assert tiny.encode_to(gen(), out, chunk_size=64, batch_size=16) == n
    out.flush()
    del out
    got = np.load(tmp_path / "emb.npy", mmap_mode="r")
    ref = tiny.encode(list(gen()), batch_size=16)
    assert np.abs(got - ref).max() <= 1e-5
    assert tiny.encode_to(iter([]), np.empty((0, tiny.hidden_size), np.float32)) == 0
    with pytest.raises(ValueError):  # more texts than rows: numpy refuses the assignment
        tiny.encode_to(gen(), np.empty((10, tiny.hidden_size), np.float32), chunk_size=8)


def test_vocab_sanity():
    assert len(set(synthetic_vocab())) == len(synthetic_vocab())
