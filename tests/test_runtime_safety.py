"""Fork safety, shared tokenizers under threads, memory bounds and thread counts (issue 10, classes 1, 2, 4, 6).

Each test here failed (hang, wrong result, unbounded allocation or a process killed by libgomp) before the fix it
covers; none measures time.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import subprocess
import sys
import textwrap
import threading
import warnings

import numpy as np
import pytest

import medquant
from medquant import _core
from medquant.model import limits
from tiny_bert import random_texts, write_tiny_bert

CHILD_TIMEOUT = 180  # seconds before a child that has not answered counts as hung (a hang is the defect)
TEXTS = ["What are the symptoms of type 2 diabetes?", "How is glaucoma treated?",
         "Metformin is a first-line medication for the treatment of type 2 diabetes. " * 8,
         "Who is at risk for Parkinson's disease?"] * 4

_FORKED_ENCODER = None  # the parent's encoder, inherited by fork children


def _encode_inherited(_):
    return _FORKED_ENCODER.encode(TEXTS)


def _encode_fresh(_):
    return medquant.Encoder.from_pretrained(n_threads=2).encode(TEXTS)


def _run_in_pool(method: str, fn):
    ctx = mp.get_context(method)
    pool = ctx.Pool(1)
    try:
        return pool.apply_async(fn, (0,)).get(timeout=CHILD_TIMEOUT)
    except mp.TimeoutError:
        pytest.fail(f"a {method} child did not finish encoding within {CHILD_TIMEOUT} s: hung")
    finally:
        pool.terminate()
        pool.join()


# ---------------------------------------------------------------------------------------------------- 1. fork
@pytest.fixture(scope="module")
def two_thread_encoder():
    return medquant.Encoder.from_pretrained(n_threads=min(2, limits.available_cpus()))


@pytest.mark.parametrize("method", ["fork", "forkserver", "spawn"])
def test_forked_and_spawned_children_encode_after_parent_used_threads(two_thread_encoder, method):
    global _FORKED_ENCODER
    expected = two_thread_encoder.encode(TEXTS)  # the parent's OpenMP pool now exists
    _FORKED_ENCODER = two_thread_encoder
    got = _run_in_pool(method, _encode_inherited if method == "fork" else _encode_fresh)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    # the parent keeps working (its pool was released before the fork and is rebuilt)
    np.testing.assert_array_equal(two_thread_encoder.encode(TEXTS), expected)


FORK_SCRIPT = textwrap.dedent("""
    import os, signal, sys, threading
    import numpy as np
    import medquant
    enc = medquant.Encoder.from_pretrained(n_threads=2)
    texts = ["chest pain and shortness of breath"] * 8 + ["a longer question about insulin dosing " * 6] * 8
    ref = enc.encode(texts)
    def child(depth):
        signal.alarm(120)  # a hang ends the child with SIGALRM instead of blocking the test
        ok = np.array_equal(enc.encode(texts), ref)
        if ok and depth < 2:  # a grandchild forked from the child
            pid = os.fork()
            if pid == 0:
                child(depth + 1)
            _, st = os.waitpid(pid, 0)
            ok = os.WIFEXITED(st) and os.WEXITSTATUS(st) == 0
        os._exit(0 if ok else 3)
    def fork_and_wait():
        pid = os.fork()
        if pid == 0:
            child(1)
        _, st = os.waitpid(pid, 0)
        return st
    # from the main thread, then from a thread that encoded itself (its own OpenMP pool)
    results = [fork_and_wait()]
    def worker():
        enc.encode(texts)
        results.append(fork_and_wait())
    t = threading.Thread(target=worker); t.start(); t.join()
    # while other threads encode with the same encoder (its lock and their OpenMP pools busy at the fork). Not under
    # AddressSanitizer: gcc 12's runtime has no fork handlers, and a child forked while another thread is inside
    # its allocator waits on that allocator's lock forever (seen: the child stuck in asan_realloc from tokenizers)
    stop = [1] if os.environ.get("MEDQUANT_SANITIZED") else []
    def spin():
        while not stop:
            enc.encode(texts * 4)
    spinners = [threading.Thread(target=spin) for _ in range(2)]
    for s in spinners: s.start()
    for _ in range(6):
        results.append(fork_and_wait())
    stop.append(1)
    for s in spinners: s.join()
    print("statuses", results, flush=True)
    sys.exit(0 if all(os.WIFEXITED(s) and os.WEXITSTATUS(s) == 0 for s in results) else 1)
""")


def test_os_fork_from_threads_during_encodes_and_grandchildren():
    p = subprocess.run([sys.executable, "-c", FORK_SCRIPT], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr[-3000:]


# ---------------------------------------------------------------------------------------------------- 2. tokenizer
@pytest.fixture(scope="module")
def tiny_minilm_tok(tmp_path_factory, minilm_dir):
    d = write_tiny_bert(tmp_path_factory.mktemp("tiny_tok"), minilm_dir, max_position=128)
    return medquant.Encoder.from_pretrained(d, n_threads=1, max_length=128)


def test_parent_and_quantized_child_tokenize_concurrently(tiny_minilm_tok):
    parent = tiny_minilm_tok
    child = parent.quantize("int8-dynamic")
    texts = random_texts(24, seed=5, max_words=400)  # most are cut by every max_length below
    lengths = [16, 40, 64, 128]
    jobs = [(enc, L) for enc in (parent, child) for L in lengths]
    expected = {(id(enc), L): enc.encode(texts, max_length=L, batch_size=8) for enc, L in jobs}
    expected_ids = {L: parent.tokenize(texts, max_length=L)[0] for L in lengths}
    errors = []

    def run(k):
        try:
            for i in range(12):
                enc, L = jobs[(k + i) % len(jobs)]
                got = enc.encode(texts, max_length=L, batch_size=8)
                if not np.allclose(got, expected[(id(enc), L)], rtol=0, atol=1e-6):
                    errors.append(f"thread {k}: wrong embeddings for max_length {L}")
                ids = enc.tokenize(texts, max_length=L)[0]
                if not np.array_equal(ids, expected_ids[L]):
                    errors.append(f"thread {k}: token ids of shape {ids.shape} for max_length {L}")
        except Exception as e:  # noqa: BLE001 - collected and reported below
            errors.append(f"thread {k}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=run, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:10]
    assert parent.tokenizer.truncation is None  # the user's tokenizer object is never switched on and off
    assert child._tokenizers is parent._tokenizers


def test_tokenizer_copies_are_bounded_and_reused(tiny_minilm_tok):
    pool = tiny_minilm_tok._tokenizers
    assert pool.for_length(32) is pool.for_length(32)
    for L in range(2, 40):
        assert pool.for_length(L).truncation["max_length"] == L
    assert len(pool._by_length) <= pool._capacity


# ---------------------------------------------------------------------------------------------------- 4. memory
@pytest.fixture()
def tiny1(tiny_minilm_tok):
    enc = tiny_minilm_tok.with_storage(tiny_minilm_tok._storage, tiny_minilm_tok._sites, tiny_minilm_tok.scheme)
    return enc


@pytest.mark.parametrize("batch,seq", [(1, 7), (3, 40), (17, 128), (64, 33)])
def test_call_bytes_bounds_what_a_forward_holds(tiny1, batch, seq):
    rng = np.random.default_rng(batch)
    ids = rng.integers(1000, 2000, size=(batch, seq)).astype(np.int32)
    lengths = rng.integers(1, seq + 1, size=batch)
    mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int32)
    tiny1.set_memory_limit(None, keep_bytes=limits.memory_limit())
    tiny1.forward(ids, mask)
    held = tiny1.workspace_bytes()
    need = tiny1._core.call_bytes(batch, seq, int(lengths.sum()), hidden=True)
    assert 0 < held <= need


def test_forward_over_the_limit_raises_before_allocating(tiny1):
    tiny1.set_memory_limit("2MiB", keep_bytes="1MiB")
    before = tiny1.workspace_bytes()
    ids = np.full((512, 128), 1000, np.int32)
    with pytest.raises(MemoryError, match="memory limit"):
        tiny1.forward(ids)
    assert tiny1.workspace_bytes() == before


def test_encode_splits_batches_to_fit_and_gives_the_same_result(tiny1):
    texts = random_texts(64, seed=2, max_words=300)
    expected = tiny1.encode(texts, batch_size=64)
    tiny1.set_memory_limit("3MiB", keep_bytes="1MiB")
    full = tiny1._core.call_bytes(64, 128, 64 * 128)
    assert full > tiny1.memory_limit  # the requested batch would not fit: it must be split
    np.testing.assert_allclose(tiny1.encode(texts, batch_size=64), expected, rtol=0, atol=1e-6)
    assert tiny1.workspace_bytes() <= (1 << 20)
    cal = tiny1.calibrate(texts[:16], batch_size=16)  # observers: more memory per token, still split to fit
    assert cal.n_texts == 16


def test_workspace_shrinks_after_an_outsized_call(tiny1):
    tiny1.set_memory_limit("256MiB", keep_bytes="4MiB")
    small = ["a short question?"] * 2
    tiny1.encode(small)
    steady = tiny1.workspace_bytes()
    assert steady <= 4 << 20
    tiny1.encode(random_texts(400, seed=3, max_words=200), batch_size=400)  # a large call grows the workspace ...
    assert tiny1.workspace_bytes() <= 4 << 20  # ... which is released afterwards
    tiny1.set_memory_limit("256MiB", keep_bytes="256MiB")
    tiny1.encode(random_texts(400, seed=3, max_words=200), batch_size=400)
    assert tiny1.workspace_bytes() > 4 << 20  # kept when below keep_bytes


def test_config_whose_one_sequence_cannot_fit_is_refused(tmp_path, minilm_dir):
    d = write_tiny_bert(tmp_path / "wide", minilm_dir, hidden=4, heads=1, intermediate=65536, max_position=512)
    with pytest.raises(MemoryError, match="one sequence of max_length=512"):
        medquant.Encoder.from_pretrained(d, n_threads=1, max_length=512, memory_limit="16MiB")
    # 96 MiB: below avx512_core the linear layers' padded 64-row piece adds 64 rows of the 65536-wide layer (16 MiB)
    enc = medquant.Encoder.from_pretrained(d, n_threads=1, max_length=64, memory_limit="96MiB")
    assert enc.encode(["x " * 200] * 4).shape == (4, 4)


AMPLIFY_SCRIPT = textwrap.dedent("""
    import sys
    import medquant
    def hwm():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM"):
                return int(line.split()[1]) * 1024
    enc = medquant.Encoder.from_pretrained(sys.argv[1], n_threads=1, max_length=512, memory_limit="512MiB")
    base = hwm()
    out = enc.encode(["pain " * 600] * 32, batch_size=32)
    print(hwm() - base, enc.workspace_bytes(), out.shape)
""")


@pytest.mark.skipif(bool(os.environ.get("MEDQUANT_SANITIZED")),
                    reason="AddressSanitizer's quarantine and shadow memory make peak RSS meaningless")
def test_small_checkpoint_wide_config_stays_within_the_limit(tmp_path, minilm_dir):
    """The review's example: a checkpoint of a few MiB whose config (tiny hidden, 65536 intermediate) multiplies out to
    gigabytes for one 32-text call. Peak RSS of a fresh process must stay within the limit."""
    d = write_tiny_bert(tmp_path / "amp", minilm_dir, hidden=4, heads=1, intermediate=65536, max_position=512)
    p = subprocess.run([sys.executable, "-c", AMPLIFY_SCRIPT, str(d)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    grew, held, _ = p.stdout.split(maxsplit=2)
    assert int(grew) <= (512 + 64) << 20, f"peak RSS grew by {int(grew) / 2**20:.0f} MiB"
    assert int(held) <= 512 << 20


@pytest.mark.parametrize("value,error", [(0, ValueError), (-5, ValueError), (True, TypeError), (1.5, TypeError),
                                         ("lots", ValueError), ("12XB", ValueError), ("inf", ValueError),
                                         ("1KiB", ValueError), (2**64, ValueError)])
def test_memory_limit_values_are_checked(tiny1, value, error):
    with pytest.raises(error):
        tiny1.set_memory_limit(value)


def test_memory_limit_from_environment(monkeypatch):
    monkeypatch.setenv("MEDQUANT_MEMORY_LIMIT", "3GiB")
    assert limits.memory_limit() == 3 << 30
    monkeypatch.setenv("MEDQUANT_MEMORY_LIMIT", "a lot")
    with pytest.raises(ValueError, match="MEDQUANT_MEMORY_LIMIT"):
        limits.memory_limit()


def test_batch_size_has_an_upper_bound(tiny1):
    with pytest.raises(ValueError, match="at most"):
        tiny1.encode(["x"], batch_size=limits.MAX_BATCH_SIZE + 1)


# ---------------------------------------------------------------------------------------------------- 6. threads
@pytest.mark.parametrize("bad", [-1, 0, 2.7, True, "2", None.__class__])
def test_thread_counts_are_validated_the_same_everywhere(tiny_minilm_tok, bad):
    with pytest.raises((ValueError, TypeError)):
        tiny_minilm_tok.set_threads(bad)
    with pytest.raises((ValueError, TypeError)):
        medquant.Encoder.from_pretrained(tiny_minilm_tok.model_dir, n_threads=bad)


def test_too_many_threads_are_capped_with_a_warning(tiny_minilm_tok):
    cpus = limits.available_cpus()
    with pytest.warns(RuntimeWarning, match="CPUs"):
        tiny_minilm_tok.set_threads(1000)
    assert tiny_minilm_tok.n_threads == cpus
    with pytest.warns(RuntimeWarning, match="CPUs"):
        enc = medquant.Encoder.from_pretrained(tiny_minilm_tok.model_dir, n_threads=10**6)
    assert enc.n_threads == cpus
    assert enc.encode(["still runs"]).shape == (1, enc.hidden_size)
    tiny_minilm_tok.set_threads(1)


def test_core_refuses_more_threads_than_cpus(tiny_minilm_tok):
    cpus = limits.available_cpus()
    with pytest.raises(ValueError, match="CPUs"):
        tiny_minilm_tok._core.set_threads(cpus + 1)
    with pytest.raises(ValueError, match="CPUs"):
        _core.Linear(_core.LINEAR_F32, np.ones((4, 4), np.float32), n_threads=cpus + 1)


def test_thread_count_from_environment(monkeypatch):
    monkeypatch.setenv("MEDQUANT_NUM_THREADS", "1")
    assert limits.default_threads() == 1
    for bad in ("-2", "two", "0"):
        monkeypatch.setenv("MEDQUANT_NUM_THREADS", bad)
        with pytest.raises(ValueError, match="MEDQUANT_NUM_THREADS"):
            limits.default_threads()
    monkeypatch.setenv("MEDQUANT_NUM_THREADS", "100000")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert limits.default_threads() == limits.available_cpus()
    assert any("CPUs" in str(x.message) for x in w)
