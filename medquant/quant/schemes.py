"""Quantization schemes: a small dataclass, named presets, and validation.

A scheme says, for every linear layer (``site``) of the encoder, in which precision its weights and input
activations are held, and how the embedding table is stored. Every combination accepted here is implemented in the
C core (csrc/linear.c); everything else is rejected with an error rather than silently run another way.

Site names follow the Hugging Face module names (the Q/K/V projections are fused into one ``qkv`` site):
``encoder.layer.{i}.attention.self.qkv``, ``encoder.layer.{i}.attention.output.dense``,
``encoder.layer.{i}.intermediate.dense``, ``encoder.layer.{i}.output.dense`` (owned by
:mod:`medquant.model.architectures`). Whether a scheme needs calibration is decided here and nowhere else
(:attr:`QuantScheme.needs_calibration`, :meth:`QuantScheme.needs_calibration_for`).
"""
from __future__ import annotations

import dataclasses
import fnmatch
import json
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import numpy as np

from .._native import _core
from ..model.architectures import resolve_alias
from .calibration import CALIBRATION_METHODS
from .recovery import WeightGrid, pack_s4

MODES = ("dynamic", "dynamic-token", "static")
ROUNDINGS = ("nearest", "gptq")
MODE_CODES = {"dynamic": _core.ACT_DYNAMIC, "dynamic-token": _core.ACT_DYNAMIC_TOKEN, "static": _core.ACT_STATIC}
GRANULARITIES = ("per-channel", "per-tensor")
EMBEDDINGS = ("fp32", "int8")
ATTENTION = ("fp32", "bf16", "int8")


# ---------------------------------------------------------------------------------------------------- site kinds
@dataclass(frozen=True)
class SiteKind:
    """One precision a site can run in: the (weights, activations) pair that selects it, its code in the C core,
    how its weight is stored (``quantize_weight(w, scheme) -> (tensors by suffix, spec entries)``; None: the fp32
    weight as is) and which spec entries the core's ``set_linear`` reads (``core_args(spec)``).
    ``quantized_input``: its input activations are quantized (mode, scale, zero point in the spec).
    ``weight_spec(scheme)``: the spec entries its stored weight depends on (what ``quantize_weight`` records);
    ``weight_layout(spec, N, K)``: the tensors its weight is stored as, by suffix, as (dtype, shape) for a site
    with N outputs and K inputs (what ``quantize_weight`` writes; loading checks a checkpoint against it).
    Integer weights also give the grid they are rounded to (``weight_grid(scheme)``, for GPTQ), the stored tensors
    of integer codes and scales (``store_codes(codes, scales)``) and the weight the layer computes with
    (``dequantize(tensors, spec)``, float32 [N, K])."""

    name: str
    weights: str
    activations: str
    code: int
    quantize_weight: Optional[Callable[[np.ndarray, "QuantScheme"], Tuple[Dict[str, np.ndarray], Dict]]] = None
    core_args: Callable[[Dict], Dict] = lambda spec: {}
    quantized_input: bool = False
    weight_spec: Callable[["QuantScheme"], Dict] = lambda scheme: {}
    weight_layout: Callable[[Dict, int, int], Dict[str, Tuple[np.dtype, Tuple[int, ...]]]] = \
        lambda spec, n, k: {"weight": (np.dtype(np.float32), (n, k))}
    weight_grid: Optional[Callable[["QuantScheme"], WeightGrid]] = None
    store_codes: Optional[Callable[[np.ndarray, np.ndarray], Dict[str, np.ndarray]]] = None
    dequantize: Optional[Callable[[Dict[str, np.ndarray], Dict], np.ndarray]] = None

    @property
    def is_float(self) -> bool:
        return self.quantize_weight is None


def _s8_spec(scheme: "QuantScheme") -> Dict:
    return {"w_per_channel": scheme.weight_granularity == "per-channel"}


def _s8_weight(w: np.ndarray, scheme: "QuantScheme"):
    spec = _s8_spec(scheme)
    q, s = _core.quantize_weight_s8(w, spec["w_per_channel"])
    return {"weight": q, "weight_scale": s}, spec


def _s8_layout(spec: Dict, n: int, k: int) -> Dict:
    """int8 [N, K]; one scale per output channel, or one for the tensor."""
    return {"weight": (np.dtype(np.int8), (n, k)),
            "weight_scale": (np.dtype(np.float32), (n if spec["w_per_channel"] else 1,))}


def _s4_spec(scheme: "QuantScheme") -> Dict:
    return {"group_size": int(scheme.group_size)}


def _s4_weight(w: np.ndarray, scheme: "QuantScheme"):
    spec = _s4_spec(scheme)
    q, s = _core.quantize_weight_s4(w, spec["group_size"])
    return {"weight": q, "weight_scale": s}, spec


def _s4_layout(spec: Dict, n: int, k: int) -> Dict:
    """Two int4 values per byte [N, K/2]; one scale per group of ``group_size`` inputs, row-major [N * K/group]."""
    return {"weight": (np.dtype(np.uint8), (n, k // 2)),
            "weight_scale": (np.dtype(np.float32), (n * (k // spec["group_size"]),))}


def _s8_codes(codes: np.ndarray, scales: np.ndarray) -> Dict[str, np.ndarray]:
    return {"weight": np.ascontiguousarray(codes, np.int8), "weight_scale": np.ascontiguousarray(scales, np.float32)}


def _s8_dequantize(tensors: Dict[str, np.ndarray], spec: Dict) -> np.ndarray:
    s = tensors["weight_scale"]
    return tensors["weight"].astype(np.float32) * (s[:, None] if spec["w_per_channel"] else s[0])


def _s4_codes(codes: np.ndarray, scales: np.ndarray) -> Dict[str, np.ndarray]:
    return {"weight": pack_s4(codes), "weight_scale": np.ascontiguousarray(scales, np.float32)}


def _s4_dequantize(tensors: Dict[str, np.ndarray], spec: Dict) -> np.ndarray:
    return _core.dequantize_weight_s4(tensors["weight"], tensors["weight_scale"], int(spec["group_size"]))


_S8 = dict(weight_spec=_s8_spec, weight_layout=_s8_layout, store_codes=_s8_codes, dequantize=_s8_dequantize,
           weight_grid=lambda scheme: WeightGrid(127, per_channel=scheme.weight_granularity == "per-channel"))


def _w8_args(spec: Dict) -> Dict:
    return {"w_per_channel": bool(spec["w_per_channel"])}


def _int8_args(spec: Dict) -> Dict:
    return dict(act_mode=MODE_CODES[spec["act_mode"]], act_symmetric=bool(spec["act_symmetric"]),
                act_scale=float(spec.get("act_scale", 1.0)), act_zero_point=int(spec.get("act_zero_point", 0)),
                **_w8_args(spec))


#: Every precision a site can run in; a new precision kind (one the core implements) is one entry here.
SITE_KINDS: Dict[str, SiteKind] = {k.name: k for k in (
    SiteKind("fp32", "fp32", "fp32", _core.LINEAR_F32),
    SiteKind("bf16", "bf16", "bf16", _core.LINEAR_BF16),
    SiteKind("int8", "int8", "int8", _core.LINEAR_INT8, _s8_weight, _int8_args, quantized_input=True, **_S8),
    SiteKind("w8", "int8", "fp32", _core.LINEAR_W8, _s8_weight, _w8_args, **_S8),
    SiteKind("w4", "int4", "fp32", _core.LINEAR_W4, _s4_weight, lambda spec: {"group_size": int(spec["group_size"])},
             weight_spec=_s4_spec, weight_layout=_s4_layout, store_codes=_s4_codes, dequantize=_s4_dequantize,
             weight_grid=lambda scheme: WeightGrid(7, group=int(scheme.group_size))),
)}
KIND_CODES = {name: k.code for name, k in SITE_KINDS.items()}
WEIGHT_DTYPES = tuple(dict.fromkeys(k.weights for k in SITE_KINDS.values()))
ACT_DTYPES = tuple(dict.fromkeys(k.activations for k in SITE_KINDS.values()))
_KIND_OF_PAIR = {(k.weights, k.activations): k.name for k in SITE_KINDS.values()}


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, resolve_alias(p)) for p in patterns)


@dataclass(frozen=True)
class QuantScheme:
    """How every linear layer and the embedding table are quantized.

    weights / activations: the precisions of a linear layer's weights and input activations. Supported pairs:
      fp32/fp32, bf16/bf16, int8/int8 (W8A8 on the VNNI kernels), int8/fp32 (weight-only), int4/fp32 (weight-only,
      group-wise scales).
    mode: for int8 activations: "dynamic" (scale from each batch's min/max), "dynamic-token" (one symmetric scale
      per token), "static" (fixed by calibration).
    act_symmetric: symmetric activations (zero point 128 in u8) or asymmetric u8 with a zero point.
    weight_granularity: "per-channel" (one scale per output channel) or "per-tensor" (int8 weights).
    group_size: int4 group size along the input dimension.
    calibration: how static ranges are chosen: minmax, moving-average, percentile, entropy, mse.
    smoothquant_alpha: if set, migrate activation outliers into the weights (SmoothQuant) with this alpha first.
    embeddings: "int8" stores the word-embedding table as int8 with one scale per row.
    rounding: how int8 / int4 weights are rounded: "nearest" (round to nearest), or "gptq" (error-compensating
      rounding, Frantar et al. 2023: column by column, the rounding error is pushed onto the columns not yet
      rounded through the inverse Hessian of the layer's calibration inputs; needs calibration texts).
    gptq_damp: GPTQ's dampening, a fraction of the mean Hessian diagonal added to the diagonal.
    bias_correction: fold each quantized layer's expected output error, E[W_q fq(x)] - E[W x] over the calibration
      inputs (fq: the layer's static activation grid; x itself for weight-only and dynamic layers), into its bias
      (Nagel et al. 2019; needs calibration texts).
    attention: the precision of attention (Q K^T, softmax, P V): "fp32", "bf16" (Q, K, V and the softmax
      probabilities rounded to bf16, products accumulated in f32; on vdpbf16ps where the CPU has avx512_bf16, else
      emulated in f32 on the same rounded values), or "int8" (per sequence and head: Q and K symmetric int8 with a
      scale per token, V with a scale per column, all absmax / 127 of the values themselves; the probabilities
      exp(s - max) as u8 x 1/255, normalized by their integer sum; Q K^T and P V in exact int32 arithmetic, on
      vpdpbusd where the CPU has avx512_vnni, the softmax in f32).
    keep_fp32 / keep_bf16: site names or glob patterns (e.g. "encoder.layer.5.output.dense") kept in higher precision.
    overrides: per-site settings, as (site name or glob pattern, {field: value}) pairs (or a dict); a site takes the
      fields of the first pattern it matches (see :meth:`for_site`). Fields: ``SITE_FIELDS``. keep_fp32 / keep_bf16
      come first.
    """

    name: str = "custom"
    weights: str = "fp32"
    activations: str = "fp32"
    mode: str = "static"
    act_symmetric: bool = False
    weight_granularity: str = "per-channel"
    group_size: int = 32
    calibration: str = "minmax"
    percentile: float = 99.99
    momentum: float = 0.9
    smoothquant_alpha: Optional[float] = None
    embeddings: str = "fp32"
    keep_fp32: Tuple[str, ...] = field(default_factory=tuple)
    keep_bf16: Tuple[str, ...] = field(default_factory=tuple)
    rounding: str = "nearest"
    gptq_damp: float = 0.01
    bias_correction: bool = False
    overrides: Tuple[Tuple[str, Tuple[Tuple[str, object], ...]], ...] = field(default_factory=tuple)
    attention: str = "fp32"

    def __post_init__(self):
        for key in ("keep_fp32", "keep_bf16"):
            patterns = getattr(self, key)
            if not isinstance(patterns, (list, tuple, set, frozenset)) or not all(isinstance(p, str) for p in patterns):
                raise TypeError(f"{key} must be a list of site names or glob patterns (strings), got {patterns!r}")
            object.__setattr__(self, key, tuple(patterns))
        object.__setattr__(self, "overrides", _normalize_overrides(self.overrides))
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        def one_of(value, allowed, what):
            if value not in allowed:
                raise ValueError(f"{what} must be one of {', '.join(allowed)}; got {value!r}")

        one_of(self.weights, WEIGHT_DTYPES, "weights")
        one_of(self.activations, ACT_DTYPES, "activations")
        one_of(self.mode, MODES, "mode")
        one_of(self.weight_granularity, GRANULARITIES, "weight_granularity")
        one_of(self.calibration, CALIBRATION_METHODS, "calibration")
        one_of(self.embeddings, EMBEDDINGS, "embeddings")
        one_of(self.attention, ATTENTION, "attention")
        pair = (self.weights, self.activations)
        supported = set(_KIND_OF_PAIR)
        if pair not in supported:
            raise ValueError(
                f"unsupported combination weights={self.weights} activations={self.activations}; supported: "
                + ", ".join(f"{w}/{a}" for w, a in sorted(supported))
            )
        if self.activations == "int8" and self.mode == "dynamic-token" and not self.act_symmetric:
            raise ValueError(
                "per-token dynamic activation quantization must be symmetric (act_symmetric=True): oneDNN applies one "
                "common source zero point"
            )
        if self.weights == "int4" and (self.group_size <= 0 or self.group_size % 2):
            raise ValueError(f"int4 group_size must be a positive even number, got {self.group_size}")
        if self.weights == "int4" and self.weight_granularity != "per-channel":
            raise ValueError("int4 weights use group-wise scales; weight_granularity must stay 'per-channel'")
        if not (50.0 < self.percentile <= 100.0):
            raise ValueError(f"percentile must be in (50, 100], got {self.percentile}")
        if not (0.0 <= self.momentum < 1.0):
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.smoothquant_alpha is not None:
            if not (0.0 <= self.smoothquant_alpha <= 1.0):
                raise ValueError(f"smoothquant_alpha must be in [0, 1], got {self.smoothquant_alpha}")
            if self.activations != "int8":
                raise ValueError("SmoothQuant only makes sense with int8 activations")
        one_of(self.rounding, ROUNDINGS, "rounding")
        if not isinstance(self.bias_correction, bool):
            raise TypeError(f"bias_correction must be True or False, got {self.bias_correction!r}")
        if isinstance(self.gptq_damp, bool) or not isinstance(self.gptq_damp, (int, float)) \
                or not (0.0 < self.gptq_damp <= 1.0):
            raise ValueError(f"gptq_damp must be in (0, 1], got {self.gptq_damp!r}")
        overlap = set(self.keep_fp32) & set(self.keep_bf16)
        if overlap:
            raise ValueError(f"sites listed in both keep_fp32 and keep_bf16: {sorted(overlap)}")
        for pattern, fields in self.overrides:
            try:
                self._merged(fields)
            except (ValueError, TypeError) as e:
                raise ValueError(f"overrides[{pattern!r}]: {e}") from None

    # ------------------------------------------------------------------ per site
    def _merged(self, fields: Tuple[Tuple[str, object], ...]) -> "QuantScheme":
        """This scheme with one override's fields (validated), without keep lists or overrides: a site's scheme."""
        changes = dict(fields)
        if changes.get("activations", self.activations) != "int8":  # SmoothQuant smooths int8 inputs only
            changes["smoothquant_alpha"] = None
        return dataclasses.replace(self, keep_fp32=(), keep_bf16=(), overrides=(), **changes)

    def for_site(self, name: str) -> "QuantScheme":
        """The scheme one site is quantized under: keep_fp32 / keep_bf16 first, then the first matching override;
        a scheme without keep lists or overrides (its ``site_kind`` is the site's kind)."""
        if _matches(name, self.keep_fp32):
            return self._merged((("weights", "fp32"), ("activations", "fp32")))
        if _matches(name, self.keep_bf16):
            return self._merged((("weights", "bf16"), ("activations", "bf16")))
        for pattern, fields in self.overrides:
            if _matches(name, (pattern,)):
                return self._merged(fields)
        return self._merged(())

    def _site_schemes(self) -> List["QuantScheme"]:
        """The scheme itself and every override merged: all the per-site schemes this scheme can produce."""
        return [self._merged(())] + [self._merged(f) for _, f in self.overrides]

    # ------------------------------------------------------------------ derived
    @property
    def is_float(self) -> bool:
        return all(s.weights in ("fp32", "bf16") for s in self._site_schemes()) and self.embeddings == "fp32"

    @property
    def _static(self) -> bool:
        return self.activations == "int8" and (self.mode == "static" or self.smoothquant_alpha is not None)

    @property
    def needs_calibration(self) -> bool:
        """Static int8 activations or SmoothQuant (for some site): quantizing may need calibration statistics."""
        return any(s._static for s in self._site_schemes())

    @property
    def _recovers(self) -> bool:
        return self.weights in ("int8", "int4") and (self.rounding == "gptq" or self.bias_correction)

    @property
    def needs_calibration_texts(self) -> bool:
        """SmoothQuant measures its ranges after smoothing, and GPTQ rounding and bias correction gather their
        statistics from the texts, so these need the texts, not only a calibration."""
        return self.smoothquant_alpha is not None or any(s._recovers for s in self._site_schemes())

    def quantized_input_sites(self, site_names: Iterable[str]) -> List[str]:
        """The sites (of a model with these site names) whose input activations this scheme quantizes (int8)."""
        return [n for n in site_names if SITE_KINDS[self.site_kind(n)].quantized_input]

    def needs_calibration_for(self, site_names: Iterable[str]) -> bool:
        """Whether quantizing a model with these sites needs calibration (some site quantizes its input, statically
        or with SmoothQuant)."""
        return any(self.for_site(n)._static for n in self.quantized_input_sites(site_names))

    def recovery_sites(self, site_names: Iterable[str]) -> List[str]:
        """The sites whose quantization needs recovery statistics (GPTQ rounding or bias correction)."""
        return [n for n in site_names if self.for_site(n)._recovers]

    def site_kind(self, name: str) -> str:
        """The precision of one site: fp32, bf16, int8, w8 or w4."""
        s = self.for_site(name)
        return _KIND_OF_PAIR[(s.weights, s.activations)]

    def replace(self, **changes) -> "QuantScheme":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> Dict:
        d = dataclasses.asdict(self)
        d["keep_fp32"] = list(self.keep_fp32)
        d["keep_bf16"] = list(self.keep_bf16)
        d["overrides"] = [[p, dict(f)] for p, f in self.overrides]  # a list: the order matters
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: Dict) -> "QuantScheme":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown QuantScheme fields: {sorted(unknown)}")
        return cls(**d)


#: Fields an override may set for its sites (the rest are the scheme's, for every site).
SITE_FIELDS = ("weights", "activations", "mode", "act_symmetric", "weight_granularity", "group_size", "calibration",
               "percentile", "rounding", "gptq_damp", "bias_correction")


def _normalize_overrides(overrides) -> Tuple[Tuple[str, Tuple[Tuple[str, object], ...]], ...]:
    """Overrides as a tuple of (pattern, sorted (field, value) pairs), from a dict {pattern: {field: value}} or a
    sequence of (pattern, fields) pairs; unknown fields and non-string patterns are refused."""
    items = overrides.items() if isinstance(overrides, dict) else overrides
    if isinstance(items, (str, bytes)) or not hasattr(items, "__iter__"):
        raise TypeError(f"overrides must be a dict {{pattern: {{field: value}}}} or a list of (pattern, fields) pairs, "
                        f"got {overrides!r}")
    out = []
    for item in items:
        if not (isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[0], str)):
            raise TypeError(f"an override must be a (site pattern, fields) pair, got {item!r}")
        pattern, fields = item
        fields = dict(fields) if isinstance(fields, (dict, list, tuple)) else fields
        if not isinstance(fields, dict) or not all(isinstance(k, str) for k in fields):
            raise TypeError(f"overrides[{pattern!r}] must map field names to values, got {item[1]!r}")
        unknown = sorted(set(fields) - set(SITE_FIELDS))
        if unknown:
            raise ValueError(f"overrides[{pattern!r}]: fields {unknown} cannot be set per site; per-site fields: "
                             f"{', '.join(SITE_FIELDS)}")
        out.append((pattern, tuple(sorted(fields.items()))))
    return tuple(out)


PRESETS: Dict[str, QuantScheme] = {
    s.name: s
    for s in [
        QuantScheme(name="fp32"),
        QuantScheme(name="bf16", weights="bf16", activations="bf16", attention="bf16"),
        QuantScheme(name="int8-dynamic", weights="int8", activations="int8", mode="dynamic", embeddings="int8"),
        QuantScheme(
            name="int8-dynamic-token", weights="int8", activations="int8", mode="dynamic-token", act_symmetric=True,
            embeddings="int8",
        ),
        QuantScheme(
            name="int8-static-sym", weights="int8", activations="int8", mode="static", act_symmetric=True,
            calibration="mse", embeddings="int8",
        ),
        QuantScheme(
            name="int8-static-asym", weights="int8", activations="int8", mode="static", act_symmetric=False,
            calibration="mse", embeddings="int8",
        ),
        QuantScheme(
            name="int8-static-per-tensor", weights="int8", activations="int8", mode="static",
            weight_granularity="per-tensor", calibration="minmax", embeddings="int8",
        ),
        QuantScheme(
            name="int8-smoothquant", weights="int8", activations="int8", mode="static", act_symmetric=False,
            calibration="mse", smoothquant_alpha=0.5, embeddings="int8",
        ),
        QuantScheme(name="w8-weight-only", weights="int8", activations="fp32", embeddings="int8"),
        QuantScheme(name="w4-weight-only", weights="int4", activations="fp32", group_size=32, embeddings="int8"),
    ]
}


def get_scheme(scheme) -> QuantScheme:
    """A QuantScheme from a preset name, a dict, or a QuantScheme."""
    if isinstance(scheme, QuantScheme):
        return scheme
    if isinstance(scheme, dict):
        return QuantScheme.from_dict(scheme)
    if isinstance(scheme, str):
        if scheme in PRESETS:
            return PRESETS[scheme]
        raise ValueError(f"unknown quantization scheme {scheme!r}; presets: {', '.join(PRESETS)}")
    raise TypeError(f"scheme must be a preset name, a dict or a QuantScheme, got {type(scheme).__name__}")

