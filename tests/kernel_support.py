"""What the tests may assume about the CPU's kernels: no kernel or ISA names, only facts measured on this machine.

``SUPPORT`` is medquant's own measurement (``_core.kernel_support``): whether oneDNN's int8 matmul is exact here (VNNI
or AMX; without them the u8*s8 pair sums saturate in 16 bits) and whether a bf16 matmul exists. Where not, medquant
emulates the layer in f32 on the same rounded operands, and its implementation name says so.
"""
from __future__ import annotations

from medquant import _core

SUPPORT = _core.kernel_support()
EMULATED = " (emulated in f32)"


def assert_optimized(impl: str, precision: str) -> None:
    """An optimized oneDNN kernel ran (never the ``ref`` implementation), emulated exactly where the CPU lacks the
    native kernel for ``precision`` ("int8" or "bf16")."""
    assert impl and not impl.startswith("ref"), f"oneDNN's reference kernel ran: {impl!r}"
    native = SUPPORT["int8_exact"] if precision == "int8" else SUPPORT["bf16_native"]
    assert impl.endswith(EMULATED) != native, (impl, SUPPORT)
