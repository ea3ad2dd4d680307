"""ONNX export of a medquant encoder: fp32 as a plain graph, quantized encoders as a QDQ graph carrying medquant's own
scales and zero points (not recalibrated), for deployments on ONNX Runtime, OpenVINO and other ONNX stacks.

The graph mirrors the C core (csrc/encoder.c) op by op: word + position + token-type embeddings and their LayerNorm;
per layer the fused Q/K/V projection, scaled dot-product attention with padded keys masked by -1e30, the attention
output with its residual and LayerNorm, the erf-GELU FFN with its residual and LayerNorm; then mean (over the
attention mask) or CLS pooling and optional L2 normalisation, as ``Encoder.encode``. Each linear site is exported as
its precision kind (``SITE_KINDS`` of :mod:`medquant.quant.schemes`) computes it:

  fp32   MatMul with the fp32 weight.
  bf16   the input rounded to bf16 and back (Cast round trip, round to nearest even as the core's conversion), times
         the weight stored as a bf16 initializer widened by a Cast: the same bf16 operands, f32 accumulation.
  int8   input quantized to u8 and dequantized (QuantizeLinear / DequantizeLinear), times the s8 weight stored as an
         int8 initializer with DequantizeLinear (per output channel: axis 1 of the [K, N] weight; or per tensor):
         static: medquant's calibrated scale and zero point (128 for symmetric) as QDQ constants;
         dynamic (asymmetric): DynamicQuantizeLinear, whose scale / zero point formula is the core's
           (range widened to contain 0, span / 255, zero point rint(-min / scale)), over the non-padding tokens of
           the batch (padding rows are zeroed first, which cannot move a range that always contains 0);
         dynamic symmetric: scale = max|x| / 127 over the non-padding tokens, zero point 128;
         dynamic-token: one symmetric scale per token (max|row| / 127), computed with Reciprocal / Mul / Round /
           Clip exactly as the core does (QuantizeLinear has no per-row dynamic scales).
         SmoothQuant's per-input-channel multiplier ``act_mul`` is a Mul before the input quantization.
  w8     the int8 weight with DequantizeLinear (as int8), fp32 activations.
  w4     the int4 weight as an opset-21 INT4 initializer [K, N] with blocked DequantizeLinear (axis 0, block_size =
         group_size, scales [K / group, N]), fp32 activations.
  int8 word embeddings: Gather of the int8 rows, then dequantized with the Gathered row scales ((float)q * scale, as
         the core).

Rounding: medquant quantizes activations as ``q = clip(rint(x * (1 / scale)) + zp, 0, 255)`` (csrc/qparams.h;
multiplying by the reciprocal; its fused FFN_IN -> FFN_OUT path uses oneDNN's destination scale, x / scale);
ONNX's QuantizeLinear computes ``saturate(round(x / scale) + zp)``, both rounding half to even. ``x * (1 / scale)``
and ``x / scale`` differ by at most about one float32 ulp, so a value's q differs only when ``x / scale`` lies
within ~|x / scale| * 2^-23 (<= 3e-5 for |q| <= 255) of a rounding tie, and then by one step. Otherwise both compute
the same integers; the remaining differences are float32 summation order (oneDNN vs ONNX Runtime kernels).

Batch semantics: dynamic int8 takes its range per call over the non-padding tokens of the whole batch, in medquant per
call into the C core and here per ONNX Runtime run; the same batch gives the same ranges.

ONNX Runtime note: with its default graph optimizations, ORT fuses a DequantizeLinear'd int4 or int8 weight whose
MatMul input is a plain float (w4, w8, and int8 dynamic-token, whose dequantized input is computed in plain ops) into
MatMulNBits, whose default accuracy level (4) quantizes those *activations* to int8 once more, which medquant does
not: set the session config ``session.qdq_matmulnbits_accuracy_level`` to ``"0"`` (the exported model records this
in its metadata, ``ORT_SESSION_CONFIG``).
"""
from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Sequence, Union

import numpy as np

from . import limits
from .architectures import (
    EMBEDDING_LAYER_NORM, LAYER_NORMS, LAYER_PREFIX, POSITION_EMBEDDINGS, SITE_SUFFIXES, TOKEN_TYPE_EMBEDDINGS,
    WORD_EMBEDDING_SCALES, WORD_EMBEDDINGS, site_name,
)

if TYPE_CHECKING:  # pragma: no cover
    from .encoder import Encoder

#: opset 21: blocked (int4) DequantizeLinear; Gelu (20) and LayerNormalization (17) are core ops
OPSET = 21
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
OUTPUT_NAMES = ("last_hidden_state", "sentence_embedding")
#: ONNX Runtime session config entries that make ORT compute what medquant computes (see the module docstring)
ORT_SESSION_CONFIG = {"session.qdq_matmulnbits_accuracy_level": "0"}
#: the core's additive mask for padded keys (csrc/attention.c)
MASK_VALUE = -1e30
#: ONNX protobuf files cannot exceed 2 GiB
MAX_PROTO_BYTES = 2 ** 31 - 2 ** 24


# ---------------------------------------------------------------------------------------------------- graph builder
@dataclass
class _Graph:
    """Nodes and initializers of the graph being built, with fresh value names."""

    nodes: List = field(default_factory=list)
    initializers: List = field(default_factory=list)
    n: int = 0

    def fresh(self, hint: str) -> str:
        self.n += 1
        return f"{hint}_{self.n}"

    def const(self, name: str, value, dtype=np.float32) -> str:
        """An initializer from a numpy value."""
        from onnx import numpy_helper

        self.initializers.append(numpy_helper.from_array(np.asarray(value).astype(dtype, order="C"), name))
        return name

    def raw(self, name: str, onnx_type: int, dims: Sequence[int], data: bytes) -> str:
        """An initializer of an ONNX type numpy has no dtype for (bfloat16, int4), from its raw little-endian bytes."""
        from onnx import helper

        self.initializers.append(helper.make_tensor(name, onnx_type, list(dims), data, raw=True))
        return name

    def op(self, op_type: str, inputs: Sequence[str], hint: Optional[str] = None, n_out: int = 1,
           out: Optional[str] = None, **attrs):
        """Adds a node; returns its output name (``out`` if given, else a fresh one from ``hint``), or the list of
        them when n_out > 1."""
        from onnx import helper

        outs = [out] if out else [self.fresh(hint or op_type.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=self.fresh("n_" + op_type), **attrs))
        return outs[0] if n_out == 1 else outs


@dataclass
class _Ctx:
    """What the site builders need besides the site: the graph, the encoder's tensors and the masks."""

    g: _Graph
    storage: Dict[str, np.ndarray]
    mask_rows: str  # float [B, S, 1]: 1 for tokens, 0 for padding
    consts: Dict[str, str] = field(default_factory=dict)

    def scalar(self, value, dtype=np.float32) -> str:
        """A shared scalar initializer."""
        key = f"{np.dtype(dtype).name}:{value!r}"
        if key not in self.consts:
            self.consts[key] = self.g.const(f"const_{len(self.consts)}", np.array(value, dtype), dtype)
        return self.consts[key]

    def axes(self, *axes: int) -> str:
        return self.scalar(list(axes), np.int64)


# ---------------------------------------------------------------------------------------------------- site inputs
def _static_u8(c: _Ctx, name: str, x: str, spec: Dict) -> str:
    """QuantizeLinear / DequantizeLinear with medquant's calibrated scale and zero point."""
    zp = 128 if spec["act_symmetric"] else int(spec["act_zero_point"])
    scale = c.g.const(name + ".input_scale", np.float32(spec["act_scale"]))
    zero = c.g.const(name + ".input_zero_point", np.uint8(zp), np.uint8)
    q = c.g.op("QuantizeLinear", [x, scale, zero], hint="input_q")
    return c.g.op("DequantizeLinear", [q, scale, zero], hint="input_dq")


def _dynamic_u8(c: _Ctx, name: str, x: str, spec: Dict) -> str:
    """Per-batch u8 quantization over the non-padding tokens (padding rows zeroed: the ranges contain 0 anyway)."""
    xm = c.g.op("Mul", [x, c.mask_rows], hint="input_masked")
    if not spec["act_symmetric"]:
        q, scale, zp = c.g.op("DynamicQuantizeLinear", [xm], hint="input_dq8", n_out=3)
        return c.g.op("DequantizeLinear", [q, scale, zp], hint="input_dq")
    absmax = c.g.op("ReduceMax", [c.g.op("Abs", [xm])], keepdims=0)
    scale = c.g.op("Div", [c.g.op("Max", [absmax, c.scalar(1e-30)]), c.scalar(127.0)], hint="input_scale")
    zero = c.scalar(128, np.uint8)
    q = c.g.op("QuantizeLinear", [xm, scale, zero], hint="input_q")
    return c.g.op("DequantizeLinear", [q, scale, zero], hint="input_dq")


def _per_token_u8(c: _Ctx, name: str, x: str, spec: Dict) -> str:
    """One symmetric scale per token as the core computes it (mq_quantize_u8_per_row): a = max|row|,
    scale = a / 127 (1e-30 if a <= 1e-30), q = clip(rint(x * (1 / scale)), -128, 127) around the zero point 128."""
    g = c.g
    a = g.op("ReduceMax", [g.op("Abs", [x]), c.axes(-1)], keepdims=1)
    tiny = c.scalar(1e-30)
    scale = g.op("Where", [g.op("Greater", [a, tiny]), g.op("Div", [a, c.scalar(127.0)]), tiny], hint="token_scale")
    q = g.op("Round", [g.op("Mul", [x, g.op("Reciprocal", [scale])])])
    q = g.op("Clip", [q, c.scalar(-128.0), c.scalar(127.0)], hint="token_q")
    return g.op("Mul", [q, scale], hint="input_dq")


_INT8_INPUTS: Dict[str, Callable[[_Ctx, str, str, Dict], str]] = {
    "static": _static_u8, "dynamic": _dynamic_u8, "dynamic-token": _per_token_u8}


def _int8_input(c: _Ctx, name: str, x: str, spec: Dict) -> str:
    return _INT8_INPUTS[spec["act_mode"]](c, name, x, spec)


def _round_bf16(c: _Ctx, x: str, hint: str) -> str:
    """x rounded to bf16 and back to float (a Cast round trip: round to nearest even, as the core)."""
    from onnx import TensorProto

    return c.g.op("Cast", [c.g.op("Cast", [x], to=TensorProto.BFLOAT16)], hint=hint, to=TensorProto.FLOAT)


def _bf16_input(c: _Ctx, name: str, x: str, spec: Dict) -> str:
    return _round_bf16(c, x, "input_bf16")


def _float_input(c: _Ctx, name: str, x: str, spec: Dict) -> str:
    return x


# ---------------------------------------------------------------------------------------------------- site weights
# Each returns the name of a float [K, N] value (the weight transposed for MatMul), from the stored tensors.
def _fp32_weight(c: _Ctx, name: str, spec: Dict) -> str:
    return c.g.const(name + ".weight_t", c.storage[name + ".weight"].T)


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounded to nearest even as the core converts (finite values)."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def _bf16_weight(c: _Ctx, name: str, spec: Dict) -> str:
    from onnx import TensorProto

    wt = c.storage[name + ".weight"].T
    w = c.g.raw(name + ".weight_t_bf16", TensorProto.BFLOAT16, wt.shape, bf16_bits(wt).astype("<u2").tobytes())
    return c.g.op("Cast", [w], hint="weight", to=TensorProto.FLOAT)


def _s8_weight(c: _Ctx, name: str, spec: Dict) -> str:
    """int8 [K, N] with one scale per output channel (axis 1) or one for the tensor; zero point 0 (symmetric)."""
    q = c.g.const(name + ".weight_t_int8", c.storage[name + ".weight"].T, np.int8)
    s = c.storage[name + ".weight_scale"]
    if spec["w_per_channel"]:
        scale = c.g.const(name + ".weight_scale", s)
        zero = c.g.const(name + ".weight_zero_point", np.zeros(s.shape, np.int8), np.int8)
        return c.g.op("DequantizeLinear", [q, scale, zero], hint="weight", axis=1)
    scale = c.g.const(name + ".weight_scale", np.float32(s[0]))
    zero = c.g.const(name + ".weight_zero_point", np.int8(0), np.int8)
    return c.g.op("DequantizeLinear", [q, scale, zero], hint="weight")


def unpack_s4(packed: np.ndarray) -> np.ndarray:
    """The int4 values [N, K] (in [-7, 7]) of medquant's packed layout [N, K/2] (csrc/qparams.h: q + 8 in nibbles,
    low nibble = even input channel)."""
    q = np.empty((packed.shape[0], packed.shape[1] * 2), np.int8)
    q[:, 0::2] = (packed & 15).astype(np.int8) - 8
    q[:, 1::2] = (packed >> 4).astype(np.int8) - 8
    return q


def pack_int4(q: np.ndarray) -> bytes:
    """ONNX INT4 raw data: the values (in [-8, 7]) in row-major order, two's complement, two per byte, the first in
    the low nibble."""
    flat = (np.ascontiguousarray(q).reshape(-1).astype(np.int8) & 15).astype(np.uint8)
    if flat.size % 2:
        flat = np.append(flat, np.uint8(0))
    return (flat[0::2] | (flat[1::2] << 4)).tobytes()


def _s4_weight(c: _Ctx, name: str, spec: Dict) -> str:
    """INT4 [K, N] with blocked DequantizeLinear along K (block_size = group_size), scales [K / group, N]."""
    from onnx import TensorProto

    q = unpack_s4(c.storage[name + ".weight"])
    n, k = q.shape
    group = int(spec["group_size"])
    scales = c.storage[name + ".weight_scale"].reshape(n, k // group).T
    qt = c.g.raw(name + ".weight_t_int4", TensorProto.INT4, (k, n), pack_int4(q.T))
    st = c.g.const(name + ".weight_scale", scales)
    return c.g.op("DequantizeLinear", [qt, st], hint="weight", axis=0, block_size=group)


@dataclass(frozen=True)
class _KindExport:
    """How one site kind is exported: its input transform and its weight."""

    input: Callable[[_Ctx, str, str, Dict], str]
    weight: Callable[[_Ctx, str, Dict], str]


#: Every site kind the export implements (keys of ``SITE_KINDS``); any other kind is refused, never approximated.
KIND_EXPORTS: Dict[str, _KindExport] = {
    "fp32": _KindExport(_float_input, _fp32_weight),
    "bf16": _KindExport(_bf16_input, _bf16_weight),
    "int8": _KindExport(_int8_input, _s8_weight),
    "w8": _KindExport(_float_input, _s8_weight),
    "w4": _KindExport(_float_input, _s4_weight),
}


def check_exportable(encoder: "Encoder") -> None:
    """ValueError naming the site and the kind / activation mode the export cannot express faithfully."""
    for name, spec in encoder._sites.items():
        kind = spec.get("kind")
        if kind not in KIND_EXPORTS:
            raise ValueError(f"ONNX export does not implement site kind {kind!r} (site {name}); exportable kinds: "
                             f"{', '.join(KIND_EXPORTS)}")
        if kind == "int8" and spec.get("act_mode") not in _INT8_INPUTS:
            raise ValueError(f"ONNX export does not implement int8 activation mode {spec.get('act_mode')!r} (site "
                             f"{name}); exportable modes: {', '.join(_INT8_INPUTS)}")
    emb = encoder.scheme.embeddings
    if emb not in ("fp32", "int8") or (emb == "int8") != (WORD_EMBEDDING_SCALES in encoder._storage):
        raise ValueError(f"ONNX export does not implement word embeddings stored as {emb!r}")


def _site(c: _Ctx, name: str, spec: Dict, x: str) -> str:
    """x [B, S, K] -> x W^T + b [B, S, N] as the site's kind computes it, named ``<site>.output`` (and the
    residual sums after the attention output and the FFN output ``<site>.residual``: what ``Encoder.forward_taps``
    reports for those sites)."""
    kind = KIND_EXPORTS[spec["kind"]]
    if name + ".act_mul" in c.storage:  # SmoothQuant: the input times 1/s, before it is quantized
        x = c.g.op("Mul", [x, c.g.const(name + ".act_mul", c.storage[name + ".act_mul"])], hint="smoothed")
    y = c.g.op("MatMul", [kind.input(c, name, x, spec), kind.weight(c, name, spec)])
    return c.g.op("Add", [y, c.g.const(name + ".bias", c.storage[name + ".bias"])], out=name + ".output")


# ---------------------------------------------------------------------------------------------------- the encoder
def _layer_norm(c: _Ctx, prefix: str, x: str, eps: float) -> str:
    gamma = c.g.const(prefix + ".weight", c.storage[prefix + ".weight"])
    beta = c.g.const(prefix + ".bias", c.storage[prefix + ".bias"])
    return c.g.op("LayerNormalization", [x, gamma, beta], hint="ln", axis=-1, epsilon=float(eps))


def _embeddings(c: _Ctx, eps: float) -> str:
    """word + position + token type embeddings, then their LayerNorm: [B, S, H]."""
    from onnx import TensorProto

    g, st = c.g, c.storage
    ids = INPUT_NAMES[0]
    if WORD_EMBEDDING_SCALES in st:  # int8 rows: gather, then (float)q * row scale
        rows = g.op("Gather", [g.const(WORD_EMBEDDINGS + "_int8", st[WORD_EMBEDDINGS], np.int8), ids], axis=0)
        scales = g.op("Gather", [g.const(WORD_EMBEDDING_SCALES, st[WORD_EMBEDDING_SCALES]), ids], axis=0)
        scales = g.op("Unsqueeze", [scales, c.axes(-1)])
        word = g.op("Mul", [g.op("Cast", [rows], to=TensorProto.FLOAT), scales], hint="word")
    else:
        word = g.op("Gather", [g.const(WORD_EMBEDDINGS, st[WORD_EMBEDDINGS]), ids], hint="word", axis=0)
    seq = g.op("Gather", [g.op("Shape", [ids]), c.scalar(1, np.int64)], axis=0)
    positions = g.op("Range", [c.scalar(0, np.int64), seq, c.scalar(1, np.int64)], hint="positions")
    pos = g.op("Gather", [g.const(POSITION_EMBEDDINGS, st[POSITION_EMBEDDINGS]), positions], axis=0)
    typ = g.op("Gather", [g.const(TOKEN_TYPE_EMBEDDINGS, st[TOKEN_TYPE_EMBEDDINGS]), INPUT_NAMES[2]], axis=0)
    x = g.op("Add", [g.op("Add", [word, pos]), typ], hint="embeddings")
    return _layer_norm(c, EMBEDDING_LAYER_NORM, x, eps)


def _attention(c: _Ctx, qkv: str, mask_add: str, heads: int, hidden: int, precision: str) -> str:
    """Scaled dot-product attention of the fused [B, S, 3H] projection; padded keys get -1e30 (as the core). bf16
    precision rounds Q, K, V and the probabilities to bf16 (products and sums stay float, as the core)."""
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"ONNX export writes fp32 or bf16 attention; this scheme computes attention in {precision}")
    g, d = c.g, hidden // heads
    rnd = (lambda x, hint: _round_bf16(c, x, hint)) if precision == "bf16" else (lambda x, hint: x)
    split = g.op("Split", [qkv, c.scalar([hidden] * 3, np.int64)], n_out=3, axis=-1)
    shape = c.scalar([0, 0, heads, d], np.int64)
    q, k, v = (rnd(g.op("Reshape", [t, shape]), "attn_bf16") for t in split)
    q = g.op("Transpose", [q], perm=[0, 2, 1, 3])
    k = g.op("Transpose", [k], perm=[0, 2, 3, 1])
    v = g.op("Transpose", [v], perm=[0, 2, 1, 3])
    scores = g.op("Mul", [g.op("MatMul", [q, k]), c.scalar(np.float32(1.0) / np.sqrt(np.float32(d)))])
    probs = g.op("Softmax", [g.op("Add", [scores, mask_add])], hint="probs", axis=-1)
    ctx = g.op("Transpose", [g.op("MatMul", [rnd(probs, "probs_bf16"), v])], perm=[0, 2, 1, 3])
    return g.op("Reshape", [ctx, c.scalar([0, 0, hidden], np.int64)], hint="context")


def _layer(c: _Ctx, encoder: "Encoder", i: int, x: str, mask_add: str) -> str:
    cfg, sites = encoder.config, encoder._sites
    names = [site_name(i, s) for s in range(len(SITE_SUFFIXES))]
    qkv = _site(c, names[0], sites[names[0]], x)
    ctx = _attention(c, qkv, mask_add, cfg.num_attention_heads, cfg.hidden_size, encoder.scheme.attention)
    x = c.g.op("Add", [_site(c, names[1], sites[names[1]], ctx), x], out=names[1] + ".residual")
    x = _layer_norm(c, f"{LAYER_PREFIX}{i}.{LAYER_NORMS[0]}", x, cfg.layer_norm_eps)
    h = c.g.op("Gelu", [_site(c, names[2], sites[names[2]], x)], hint="gelu", approximate="none")
    x = c.g.op("Add", [_site(c, names[3], sites[names[3]], h), x], out=names[3] + ".residual")
    return _layer_norm(c, f"{LAYER_PREFIX}{i}.{LAYER_NORMS[1]}", x, cfg.layer_norm_eps)


def _pool(c: _Ctx, x: str, pooling: str, normalize: bool) -> str:
    """The pooling modes of ``csrc/pooling.h`` over the mask rows (sums, then times a reciprocal, as the core);
    optional L2 normalisation p * (1 / max(||p||, 1e-12))."""
    from onnx import TensorProto

    g, m = c.g, c.mask_rows  # m: [B, S, 1], 1.0 on real tokens
    count = g.op("ReduceSum", [m, c.axes(1)], keepdims=0)  # [B, 1]
    if pooling == "cls":
        p = g.op("Gather", [x, c.scalar(0, np.int64)], axis=1)
    elif pooling == "max":
        real = g.op("Cast", [m], to=TensorProto.BOOL)
        p = g.op("ReduceMax", [g.op("Where", [real, x, c.scalar(-np.inf)]), c.axes(1)], keepdims=0)
    elif pooling == "lasttoken":  # the one row whose running token count equals the count
        pos = g.op("CumSum", [m, c.scalar(1, np.int64)])
        last = g.op("Mul", [g.op("Cast", [g.op("Equal", [pos, g.op("Unsqueeze", [count, c.axes(1)])])],
                                 to=TensorProto.FLOAT), m])
        p = g.op("ReduceSum", [g.op("Mul", [x, last]), c.axes(1)], keepdims=0)
    elif pooling == "weightedmean":  # weights 1..n over the real tokens
        w = g.op("Mul", [g.op("CumSum", [m, c.scalar(1, np.int64)]), m])
        total = g.op("ReduceSum", [g.op("Mul", [x, w]), c.axes(1)], keepdims=0)
        p = g.op("Mul", [total, g.op("Reciprocal", [g.op("ReduceSum", [w, c.axes(1)], keepdims=0)])])
    else:  # mean, mean_sqrt_len_tokens
        total = g.op("ReduceSum", [g.op("Mul", [x, m]), c.axes(1)], keepdims=0)
        denom = g.op("Sqrt", [count]) if pooling == "mean_sqrt_len_tokens" else count
        p = g.op("Mul", [total, g.op("Reciprocal", [denom])])
    if not normalize:
        return g.op("Identity", [p], hint="pooled")
    norm = g.op("Max", [g.op("ReduceL2", [p, c.axes(-1)], keepdims=1), c.scalar(1e-12)])
    return g.op("Mul", [p, g.op("Reciprocal", [norm])], hint="pooled")


def _masks(c: _Ctx) -> str:
    """The float mask rows [B, S, 1] (into c.mask_rows) and the additive key mask [B, 1, 1, S] (returned)."""
    from onnx import TensorProto

    g = c.g
    m = g.op("Cast", [INPUT_NAMES[1]], hint="mask", to=TensorProto.FLOAT)
    c.mask_rows = g.op("Unsqueeze", [m, c.axes(-1)], hint="mask_rows")
    add = g.op("Mul", [g.op("Sub", [c.scalar(1.0), m]), c.scalar(MASK_VALUE)])
    return g.op("Unsqueeze", [add, c.axes(1, 2)], hint="mask_add")


def build_model(encoder: "Encoder", pooling: str = "mean", normalize: bool = True):
    """The ``onnx.ModelProto`` of an encoder (see the module docstring); checked by ``onnx.checker``."""
    import onnx
    from onnx import TensorProto, helper

    check_exportable(encoder)
    cfg = encoder.config
    c = _Ctx(_Graph(), encoder._storage, mask_rows="")
    mask_add = _masks(c)
    x = _embeddings(c, cfg.layer_norm_eps)
    for i in range(cfg.num_hidden_layers):
        x = _layer(c, encoder, i, x, mask_add)
    pooled = _pool(c, x, pooling, normalize)
    c.g.nodes.append(helper.make_node("Mul", [x, c.mask_rows], [OUTPUT_NAMES[0]], name="padding_rows_zero"))
    c.g.nodes.append(helper.make_node("Identity", [pooled], [OUTPUT_NAMES[1]], name="sentence_embedding"))
    dims = ["batch", "sequence"]
    inputs = [helper.make_tensor_value_info(n, TensorProto.INT64, dims) for n in INPUT_NAMES]
    outputs = [helper.make_tensor_value_info(OUTPUT_NAMES[0], TensorProto.FLOAT, [*dims, cfg.hidden_size]),
               helper.make_tensor_value_info(OUTPUT_NAMES[1], TensorProto.FLOAT, ["batch", cfg.hidden_size])]
    graph = helper.make_graph(c.g.nodes, f"medquant_{encoder.scheme.name}", inputs, outputs, c.g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_operatorsetid("", OPSET)], producer_name="medquant")
    model.ir_version = 10  # the IR of opset 21 (onnxruntime >= 1.18); a newer onnx would write a newer one
    from .. import __version__

    helper.set_model_props(model, {
        "medquant_version": __version__, "scheme": encoder.scheme.to_json(), "pooling": pooling,
        "normalize": json.dumps(bool(normalize)), "max_length": str(encoder.max_length),
        "source_model": str(encoder.name), "ORT_SESSION_CONFIG": json.dumps(ORT_SESSION_CONFIG),
    })
    onnx.checker.check_model(model)
    return model


def _target(path, overwrite: bool) -> Path:
    """The file to write: refused when it is a directory, when its directory is missing, or when it exists and
    ``overwrite`` is False."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    out = Path(path).expanduser()
    if str(path) == "" or out.name in ("", ".", ".."):
        raise ValueError(f"path must name a file (e.g. model.onnx), got {str(path)!r}")
    if out.is_dir():
        raise IsADirectoryError(f"cannot write the ONNX model to {out}: it is a directory; pass a file path such as "
                                f"{out / 'model.onnx'}")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"cannot write the ONNX model to {out}: directory {out.parent} does not exist")
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True to replace it")
    return out


def _write(model, out: Path) -> None:
    """Serialize next to ``out`` and rename into place: ``out`` is either the whole model or left as it was."""
    data = model.SerializeToString()
    tmp = out.parent / f".{out.name}.medquant-tmp-{uuid.uuid4().hex[:12]}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def export_onnx(encoder: "Encoder", path: Union[str, os.PathLike], *, pooling: Optional[str] = None,
                normalize: Optional[bool] = None, overwrite: bool = False) -> Path:
    """Write ``encoder`` as an ONNX model file (opset 21) with inputs input_ids, attention_mask, token_type_ids
    (int64 [batch, sequence], right-padded as ``Encoder.tokenize`` gives them; mask 1 for tokens, 0 for padding;
    positions count from 0 at the first column) and outputs
    last_hidden_state [batch, sequence, hidden] (padding rows zero, as ``Encoder.forward``) and sentence_embedding
    [batch, hidden] (``pooling``: one of :data:`medquant.model.sentence.POOLING_MODES`, L2-normalized if
    ``normalize``; None: the model's own, :attr:`Encoder.sentence_config`, as ``Encoder.encode``). Prompts are
    text: prepend them before tokenizing. Quantized encoders become QDQ graphs with medquant's own scales and zero
    points (module docstring). Site kinds the graph cannot express exactly raise ValueError. An existing file is
    refused (FileExistsError) unless ``overwrite=True``. Returns the path written."""
    from .sentence import check_pooling

    sentence = encoder.sentence_config.override(None if pooling is None else check_pooling(pooling),
                                                None if normalize is None else limits.flag(normalize, "normalize"))
    pooling, normalize = sentence.pooling, sentence.normalize
    overwrite = limits.flag(overwrite, "overwrite")
    out = _target(path, overwrite)
    model = build_model(encoder, pooling, normalize)
    size = model.ByteSize()
    if size > MAX_PROTO_BYTES:
        raise ValueError(f"the ONNX model would be {size / 2**30:.2f} GiB, above protobuf's 2 GiB limit for one file; "
                         "ONNX external data is not supported by this export")
    _write(model, out)
    return out


__all__ = ["INPUT_NAMES", "KIND_EXPORTS", "OPSET", "ORT_SESSION_CONFIG", "OUTPUT_NAMES", "bf16_bits", "build_model",
           "check_exportable", "export_onnx", "pack_int4", "unpack_s4"]
