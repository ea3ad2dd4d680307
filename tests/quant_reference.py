"""An independent numpy reference of medquant's quantized linear layers (fake quantization, float64 accumulation).

It mirrors the conventions documented in csrc/qparams.h: activations u8 with q = clip(rint(x * (1/scale)) + zp, 0, 255)
(symmetric: zp = 128, scale = absmax/127), weights s8 q = clip(rint(w / s), -127, 127), int4 q = clip(rint(w/s), -7, 7)
per group; y = (sum_k (qx - zp) * qw) * sx * sw + b, then GELU(erf) or the residual add.
"""
from __future__ import annotations

import math

import numpy as np

F32 = np.float32


def sym_scale(a, qmax):
    """absmax / qmax as a positive normal float32: 1 for an all-zero group, FLT_MIN where it would underflow."""
    with np.errstate(under="ignore"):
        s = (np.asarray(a, F32) / F32(qmax)).astype(F32)
    tiny = np.finfo(F32).tiny
    return np.where(s >= tiny, s, np.where(np.asarray(a) > 0, tiny, F32(1))).astype(F32)


def quantize_weight_s8(w, per_channel=True):
    w = w.astype(F32)
    a = np.abs(w).max(axis=1) if per_channel else np.array([np.abs(w).max()], F32)
    s = sym_scale(a, 127)
    q = np.clip(np.rint(w / (s[:, None] if per_channel else s[0])), -127, 127).astype(np.int8)
    return q, s


def quantize_weight_s4(w, group):
    N, K = w.shape
    g = w.astype(F32).reshape(N, K // group, group)
    a = np.abs(g).max(axis=2)
    s = sym_scale(a, 7)
    q = np.clip(np.rint(g / s[..., None]), -7, 7).astype(np.int8)
    return q.reshape(N, K), s.reshape(-1)


def dequant_s4(q, s, group):
    N, K = q.shape
    return (q.reshape(N, K // group, group).astype(np.float64) * s.reshape(N, K // group, 1)).reshape(N, K)


def bf16(x):
    """float32 -> bfloat16 -> float32, round to nearest even (finite inputs)."""
    u = np.ascontiguousarray(x, F32).view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
    return u.astype(np.uint32).view(F32)


def qparams_asym(lo, hi):
    lo, hi = min(F32(lo), F32(0)), max(F32(hi), F32(0))
    span = max(F32(hi - lo), F32(1e-30))
    scale = F32(span / F32(255))
    zp = int(np.clip(np.rint(F32(-lo) / scale), 0, 255))
    return scale, zp


def qparams_sym(lo, hi):
    a = max(abs(F32(lo)), abs(F32(hi)), F32(1e-30))
    return F32(a / F32(127)), 128


def quantize_act(x, scale, zp):
    inv = F32(1) / F32(scale)
    return np.clip(np.rint(x.astype(F32) * inv) + F32(zp), 0, 255).astype(np.int64)


def gelu(y):
    erf = np.vectorize(math.erf)
    return 0.5 * y * (1.0 + erf(y / math.sqrt(2.0)))


def epilogue(y, epi, residual):
    if epi == "gelu":
        return gelu(y)
    if epi == "residual":
        return y + residual
    return y


def int8_linear(x, qw, sw, bias, *, mode, symmetric, scale=None, zp=None, per_channel=True, epi=None, residual=None):
    """Returns (y, step): step[m] is the activation quantization step of row m (for the tolerance)."""
    x = x.astype(F32)
    if mode == "dynamic-token":
        a = np.abs(x).max(axis=1)
        sx = np.where(a > 1e-30, a / F32(127), F32(1e-30)).astype(F32)
        qx = np.stack([quantize_act(x[m:m + 1], sx[m], 128)[0] for m in range(len(x))])
        acc = (qx - 128) @ qw.astype(np.int64).T
        y = acc * (sw if per_channel else sw[0])
        y = y * sx[:, None]
        step = sx
    else:
        if mode == "dynamic":
            lo, hi = x.min(), x.max()
            scale, zp = qparams_sym(lo, hi) if symmetric else qparams_asym(lo, hi)
        qx = quantize_act(x, scale, zp)
        acc = (qx - zp) @ qw.astype(np.int64).T
        y = acc * np.float64(scale) * (sw.astype(np.float64) if per_channel else np.float64(sw[0]))
        step = np.full(len(x), scale)
    if bias is not None:
        y = y + bias
    return epilogue(y, epi, residual), step
