"""Fuzz harness (atheris) for memory amplification: config combinations whose parameters are small but whose
forward work multiplies out (wide intermediate, many heads, long positions, many layers), run on fuzzed call shapes
under a memory limit.

Every input builds a C encoder (medquant._core) from a fuzzed config with random weights -- configs whose parameters
alone exceed PARAM_CAP are skipped, they are not amplification -- sets MEMORY_LIMIT with a fuzzed keep size, and runs
forward calls of fuzzed batch, length and options (hidden state, observers, per-site copies). A call must either
raise MemoryError before allocating or succeed; a finding is any other exception, a process whose peak RSS grows
by more than the limit plus the parameters plus SLACK in one input, a workspace left above the keep size, or a
call_bytes estimate below what the workspace actually holds.

    python fuzz/fuzz_config_memory.py -max_total_time=300 [-seed=N]      (libFuzzer flags)
"""
from __future__ import annotations

import os
import sys

import atheris
import numpy as np

with atheris.instrument_imports(include=["medquant"]):
    from medquant import _core

MEMORY_LIMIT = 96 << 20
PARAM_CAP = 24 << 20
SLACK = 48 << 20  # allocator and oneDNN JIT / primitive overheads, NumPy inputs
# under AddressSanitizer (.ci/sanitize.sh) freed memory sits in a quarantine and shadow memory grows with use: peak
# RSS says nothing there, the other oracles still hold
CHECK_RSS = not os.environ.get("MEDQUANT_SANITIZED")
EXPECTED = (ValueError, MemoryError)


def peak_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM"):
                return int(line.split()[1]) * 1024
    return 0


def fuzz_config(fdp):
    heads = fdp.PickValueInList([1, 1, 2, 4, 12, 64, 256, 1024])
    head_dim = fdp.PickValueInList([1, 2, 4, 8, 16])
    return {"vocab_size": fdp.ConsumeIntInRange(2, 64), "hidden": heads * head_dim,
            "n_layers": fdp.PickValueInList([1, 1, 2, 3, 12, 48]),
            "n_heads": heads, "intermediate": fdp.PickValueInList([1, 4, 64, 4096, 32768, 65536]),
            "max_position": fdp.PickValueInList([2, 16, 64, 512, 2048, 16384]), "type_vocab": 2, "ln_eps": 1e-12}


def param_bytes(c) -> int:
    H, I, L = c["hidden"], c["intermediate"], c["n_layers"]
    return 4 * ((c["vocab_size"] + c["max_position"] + 2) * H + L * (4 * H * H + 2 * H * I + 9 * H + I))


def build(c, rng):
    H, I = c["hidden"], c["intermediate"]
    e = _core.Encoder(c, 1, _core.Observer)
    f = lambda *s: (rng.standard_normal(s) * 0.05).astype(np.float32)  # noqa: E731
    e.set_word_embeddings(f(c["vocab_size"], H))
    e.set_position_type_embeddings(f(c["max_position"], H), f(2, H))
    g, b = np.ones(H, np.float32), np.zeros(H, np.float32)
    e.set_layernorm(-1, 0, g, b)
    for layer in range(c["n_layers"]):
        e.set_layernorm(layer, 0, g, b)
        e.set_layernorm(layer, 1, g, b)
        for s, (N, K) in enumerate([(3 * H, H), (H, H), (I, H), (H, I)]):
            e.set_linear(layer, s, _core.LINEAR_F32, f(N, K), None, f(N))
    e.finalize()
    return e


def TestOneInput(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    c = fuzz_config(fdp)
    if param_bytes(c) > PARAM_CAP:
        return
    keep = fdp.PickValueInList([0, 1 << 20, 16 << 20, MEMORY_LIMIT])
    rng = np.random.default_rng(fdp.ConsumeIntInRange(0, 2**31))
    try:
        enc = build(c, rng)
    except EXPECTED:
        return
    enc.set_memory_limits(MEMORY_LIMIT, keep)
    before = peak_rss()
    for _ in range(fdp.ConsumeIntInRange(1, 3)):
        B = fdp.PickValueInList([1, 2, 7, 32, 512, 4096])
        S = min(c["max_position"], fdp.PickValueInList([1, 2, 16, 100, 512, 4096, 16384]))
        lengths = rng.integers(1, S + 1, size=B)
        ids = rng.integers(0, c["vocab_size"], size=(B, S), dtype=np.int32)
        mask = (np.arange(S)[None, :] < lengths[:, None]).astype(np.int32)
        hidden, taps = fdp.ConsumeBool(), fdp.ConsumeIntInRange(0, 3) == 0
        observers = [_core.Observer(64, 0.9) for _ in range(4 * c["n_layers"])] if fdp.ConsumeIntInRange(0, 3) == 0 else None
        need = enc.call_bytes(B, S, int(lengths.sum()), hidden=hidden, taps=taps, hook=taps or observers is not None)
        try:
            enc.forward(ids, mask, None, pooling=_core.POOL_MEAN, normalize=True, hidden=hidden, observers=observers,
                        taps=taps)
        except MemoryError:
            assert need > MEMORY_LIMIT, f"MemoryError although call_bytes {need} is within the limit"
            continue
        except ValueError as e:  # finite weights can still overflow float32 on the way
            assert "non-finite" in str(e), e
            continue
        assert need <= MEMORY_LIMIT, f"a call of {need} bytes ran above the limit {MEMORY_LIMIT}"
        held = enc.workspace_bytes()
        assert held <= keep, f"workspace holds {held} bytes after a call, keep size {keep}"
    grew = peak_rss() - before
    assert not CHECK_RSS or grew <= MEMORY_LIMIT + param_bytes(c) + SLACK, f"peak RSS grew by {grew >> 20} MiB for config {c}"


def main():
    atheris.Setup(sys.argv, atheris.instrument_func(TestOneInput))
    atheris.Fuzz()


if __name__ == "__main__":
    main()
