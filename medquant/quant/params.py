"""A quantized encoder's quantization parameters, apart from its weights: export, inspect, re-import.

:class:`QuantParams` holds what a scheme decided for one model: per site its kind (fp32, bf16, int8, w8, w4), weight
bit width and scale granularity, the int8 activation mode, scale, zero point and calibrated range, the SmoothQuant
factors, and the int8 word-embedding row scales. It is written as two files (``save``):

``quant_params.json``
    ``format`` (``"medquant-qparams-v1"``), ``medquant_version``, ``scheme`` (every :class:`QuantScheme` field),
    ``model`` (the encoder's shape: vocabulary, hidden and intermediate sizes, layers, heads), ``sites`` (per site
    its spec exactly as the C core is given it: ``kind``; ``w_per_channel`` or ``group_size``; for int8 inputs
    ``act_mode``, ``act_symmetric`` and, static, ``act_scale``, ``act_zero_point``, ``act_range``), ``summary`` (per
    site ``weight_bits``, ``act_bits``, granularity, and whether it is smoothed, bias-corrected or stores its codes),
    ``source_weights_sha256`` (per site that stores codes or a corrected bias: the fp32 weight they were computed
    for) and ``tensors`` (every tensor of the safetensors file: dtype, shape, meaning).
``quant_params.safetensors``
    ``<site>.weight_scale`` (float32: [N] per channel, [1] per tensor, [N * K / group] for int4),
    ``<site>.act_mul`` (float32 [K], SmoothQuant: the site's input is multiplied by it, its weight divided),
    ``<site>.bias`` (float32 [N], only where bias correction replaced the checkpoint's bias),
    ``<site>.weight`` (int8 [N, K] / packed int4 [N, K/2], only where GPTQ rounding chose codes that are not
    ``round(w / scale)``) and ``embeddings.word_embeddings.weight_scale`` (float32 [vocab], int8 embeddings).

:meth:`QuantParams.apply` quantizes an fp32 encoder with these parameters instead of choosing them: every weight is
rounded with the stored scales by the C core's own rounding (``_core.quantize_weight_s8(w, scales=...)``), so applied
to the model they were exported from they give a bit-identical quantized encoder; applied to another checkpoint of
the same shape (a fine-tuned one) they quantize it on the exported grid (activation scales, zero points, weight
scales). Codes chosen by GPTQ and corrected biases belong to the weights they were computed for: applying them to
other weights raises ``ValueError``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Dict, Mapping, Union

import numpy as np
import pandas as pd

from .._native import _core
from ..model.architectures import WORD_EMBEDDING_SCALES, WORD_EMBEDDINGS, fp32_sites, site_shapes
from ..model.checkpoint import CheckpointError
from ..model.storage import float_storage, smooth_weight
from .schemes import SITE_KINDS, QuantScheme, get_scheme

if TYPE_CHECKING:  # pragma: no cover
    from ..model.encoder import Encoder

PARAMS_FORMAT = "medquant-qparams-v1"
PARAMS_JSON = "quant_params.json"
PARAMS_TENSORS = "quant_params.safetensors"
#: The model fields a parameter set is tied to (a set applies only to an encoder of the same shape).
MODEL_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
_MEANING = {
    "weight_scale": "weight scales (float32): one per output channel, one per tensor, or one per int4 group",
    "act_mul": "SmoothQuant factors (float32 [K]): the input is multiplied by them, the weight's columns divided",
    "bias": "bias after bias correction (float32 [N]), replacing the checkpoint's",
    "weight": "weight codes chosen by GPTQ rounding (int8 [N, K] or packed int4 [N, K/2], low nibble first, q + 8)",
}


def weight_sha256(w: np.ndarray) -> str:
    """The fingerprint of an fp32 weight (its float32 bytes, C order)."""
    return hashlib.sha256(np.ascontiguousarray(w, dtype=np.float32).tobytes()).hexdigest()


def _site_summary(spec: Mapping, site: QuantScheme, tensors: Mapping[str, np.ndarray], name: str) -> Dict:
    kind = SITE_KINDS[spec["kind"]]
    bits = {"fp32": 32, "bf16": 16, "int8": 8, "int4": 4}
    out = {"kind": kind.name, "weight_bits": bits[kind.weights], "act_bits": bits[kind.activations]}
    if "w_per_channel" in spec:
        out["weight_granularity"] = "per-channel" if spec["w_per_channel"] else "per-tensor"
    if "group_size" in spec:
        out["weight_granularity"] = f"group-{spec['group_size']}"
    out["smoothed"] = name + ".act_mul" in tensors
    out["bias_corrected"] = name + ".bias" in tensors
    out["codes_stored"] = name + ".weight" in tensors
    return out


@dataclasses.dataclass(frozen=True)
class QuantParams:
    """The quantization parameters of one encoder under one scheme (see the module docstring for the file format).

    scheme: the scheme. sites: per site its spec (as the C core is given it). tensors: scales, SmoothQuant factors,
    corrected biases and GPTQ codes by storage name. model: the encoder's shape (``MODEL_FIELDS``).
    source_weights: per site that stores codes or a corrected bias, the sha256 of the fp32 weight they were
    computed for (empty when exported from a model loaded quantized, whose fp32 weights are unknown).
    """

    scheme: QuantScheme
    sites: Dict[str, Dict]
    tensors: Dict[str, np.ndarray]
    model: Dict[str, int]
    source_weights: Dict[str, str] = dataclasses.field(default_factory=dict)

    # ------------------------------------------------------------------ from a quantized encoder
    @classmethod
    def from_encoder(cls, encoder: "Encoder") -> "QuantParams":
        """The parameters of a quantized encoder (from :meth:`Encoder.quantize` or loaded from a quantized save)."""
        scheme, specs, storage = encoder.scheme, encoder.site_specs(), encoder.storage_tensors()
        fp32 = fp32_sites(encoder.fp32_params, encoder.config) if encoder.fp32_params is not None else None
        tensors: Dict[str, np.ndarray] = {}
        source: Dict[str, str] = {}
        if WORD_EMBEDDING_SCALES in storage:
            tensors[WORD_EMBEDDING_SCALES] = storage[WORD_EMBEDDING_SCALES]
        for name, spec in specs.items():
            site = scheme.for_site(name)
            kind = SITE_KINDS[spec["kind"]]
            for suffix in ("weight_scale", "act_mul"):
                if f"{name}.{suffix}" in storage:
                    tensors[f"{name}.{suffix}"] = storage[f"{name}.{suffix}"]
            if kind.is_float:
                continue
            tied = False
            if site.bias_correction:
                tensors[name + ".bias"] = storage[name + ".bias"]
                tied = True
            if site.rounding == "gptq":
                tensors[name + ".weight"] = storage[name + ".weight"]
                tied = True
            if tied and fp32 is not None:
                source[name] = weight_sha256(fp32[name][0])
        tensors = {k: np.array(v, copy=True) for k, v in tensors.items()}
        model = {f: int(getattr(encoder.config, f)) for f in MODEL_FIELDS}
        return cls(scheme=scheme, sites=specs, tensors=tensors, model=model, source_weights=source)

    # ------------------------------------------------------------------ files
    def to_json(self) -> Dict:
        """The JSON document ``save`` writes (see the module docstring)."""
        from .. import __version__

        tensors = {}
        for name, t in sorted(self.tensors.items()):
            suffix = "weight_scale" if name == WORD_EMBEDDING_SCALES else name.rsplit(".", 1)[1]
            meaning = ("int8 word-embedding row scales (float32 [vocab]): row r is stored as round(e_r / s_r)"
                       if name == WORD_EMBEDDING_SCALES else _MEANING[suffix])
            tensors[name] = {"dtype": str(t.dtype), "shape": list(t.shape), "meaning": meaning}
        return {
            "format": PARAMS_FORMAT, "medquant_version": __version__, "scheme": self.scheme.to_dict(),
            "model": dict(self.model), "sites": self.sites,
            "summary": {n: _site_summary(s, self.scheme.for_site(n), self.tensors, n) for n, s in self.sites.items()},
            "embeddings": {"kind": self.scheme.embeddings,
                           "granularity": "per-row" if self.scheme.embeddings == "int8" else None},
            "source_weights_sha256": dict(self.source_weights), "tensors": tensors,
        }

    def save(self, directory: Union[str, Path]) -> Path:
        """Write ``quant_params.json`` and ``quant_params.safetensors`` into ``directory`` (created if missing;
        those two files are replaced, nothing else is touched). Returns the directory."""
        from safetensors.numpy import save_file

        d = Path(directory).expanduser()
        d.mkdir(parents=True, exist_ok=True)
        save_file({k: np.ascontiguousarray(v) for k, v in sorted(self.tensors.items())}, str(d / PARAMS_TENSORS),
                  metadata={"format": PARAMS_FORMAT})
        with open(d / PARAMS_JSON, "w", encoding="utf-8") as f:
            json.dump(self.to_json(), f, indent=1, sort_keys=True)
            f.write("\n")
        return d

    @classmethod
    def load(cls, directory: Union[str, Path]) -> "QuantParams":
        """Read a directory written by :meth:`save`; every field and tensor is checked (CheckpointError)."""
        from safetensors.numpy import load_file

        d = Path(directory).expanduser()
        try:
            with open(d / PARAMS_JSON, encoding="utf-8") as f:
                doc = json.load(f)
        except OSError as e:
            raise CheckpointError(f"cannot read {d / PARAMS_JSON}: {e}") from None
        except ValueError as e:
            raise CheckpointError(f"{d / PARAMS_JSON} is not valid JSON: {e}") from None
        if not isinstance(doc, dict) or doc.get("format") != PARAMS_FORMAT:
            raise CheckpointError(f"{d / PARAMS_JSON} is not a medquant quantization-parameter file "
                                  f"(format {PARAMS_FORMAT!r})")
        for key in ("scheme", "model", "sites"):
            if not isinstance(doc.get(key), dict):
                raise CheckpointError(f"{d / PARAMS_JSON}: {key!r} must be a JSON object")
        try:
            scheme = QuantScheme.from_dict(doc["scheme"])
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{d / PARAMS_JSON}: invalid scheme: {e}") from None
        model = doc["model"]
        if sorted(model) != sorted(MODEL_FIELDS) or not all(isinstance(v, int) and v > 0 for v in model.values()):
            raise CheckpointError(f"{d / PARAMS_JSON}: 'model' must give positive integers for {', '.join(MODEL_FIELDS)}")
        try:
            tensors = load_file(str(d / PARAMS_TENSORS))
        except Exception as e:  # safetensors raises several types for unreadable files
            raise CheckpointError(f"cannot read {d / PARAMS_TENSORS}: {e}") from None
        source = doc.get("source_weights_sha256", {})
        if not isinstance(source, dict):
            raise CheckpointError(f"{d / PARAMS_JSON}: 'source_weights_sha256' must be a JSON object")
        params = cls(scheme=scheme, sites=doc["sites"], tensors=dict(tensors), model=dict(model),
                     source_weights={str(k): str(v) for k, v in source.items()})
        params.validate()
        order = site_shapes(params._shape_config())  # the model's site order (the JSON file sorts its keys)
        return dataclasses.replace(params, sites={n: params.sites[n] for n in order})

    # ------------------------------------------------------------------ checks
    def _shape_config(self):
        from ..model.architectures import BertConfig

        return BertConfig(max_position_embeddings=1, type_vocab_size=1, **self.model)

    def validate(self) -> None:
        """Check the site specs against the scheme and every tensor's presence, dtype, shape and values
        (CheckpointError naming the site or tensor)."""
        from ..model.storage import _check_site_spec, expected_tensors

        shapes = site_shapes(self._shape_config())
        if sorted(self.sites) != sorted(shapes):
            raise CheckpointError(f"quantization parameters: sites do not match the model shape "
                                  f"({len(self.sites)} given, {len(shapes)} expected)")
        for name, (_, k) in shapes.items():
            _check_site_spec(name, self.sites[name], self.scheme, k)
        expected, _ = expected_tensors(self._shape_config(), self.scheme, self.sites)
        required = [WORD_EMBEDDING_SCALES] if self.scheme.embeddings == "int8" else []
        optional = []
        for name in self.sites:
            required += [n for n in (name + ".weight_scale", name + ".act_mul") if n in expected]
            if not SITE_KINDS[self.sites[name]["kind"]].is_float:  # corrected bias and GPTQ codes, where used
                optional += [name + ".bias", name + ".weight"]
        allowed = {n: expected[n] for n in required + optional}
        positive = set(required)
        missing = sorted(set(required) - set(self.tensors))
        if missing:
            raise CheckpointError(f"quantization parameters are missing tensor(s): {', '.join(missing[:8])}")
        unknown = sorted(set(self.tensors) - set(allowed))
        if unknown:
            raise CheckpointError(f"quantization parameters hold unexpected tensor(s): {', '.join(unknown[:8])}")
        for name, t in self.tensors.items():
            dtype, shape = allowed[name]
            if not isinstance(t, np.ndarray) or t.dtype != dtype or tuple(t.shape) != tuple(shape):
                raise CheckpointError(f"quantization parameter {name} has {getattr(t, 'dtype', type(t).__name__)} "
                                      f"{tuple(getattr(t, 'shape', ()))}, expected {dtype} {tuple(shape)}")
            if t.dtype.kind == "f" and not np.isfinite(t).all():
                raise CheckpointError(f"quantization parameter {name} contains NaN or Inf")
            if name in positive and t.size and not (t >= np.finfo(np.float32).tiny).all():
                raise CheckpointError(f"quantization parameter {name} must be positive, found {float(t.min())!r}")

    # ------------------------------------------------------------------ use
    def table(self) -> pd.DataFrame:
        """One row per site: kind, bit widths, granularity, activation mode, scale, zero point, range, and
        whether it is smoothed, bias-corrected, or stores GPTQ codes."""
        rows = []
        for name, spec in self.sites.items():
            row = {"site": name, **_site_summary(spec, self.scheme.for_site(name), self.tensors, name)}
            row["act_mode"] = spec.get("act_mode")
            row["act_symmetric"] = spec.get("act_symmetric")
            row["act_scale"] = spec.get("act_scale", math.nan)
            row["act_zero_point"] = spec.get("act_zero_point")
            lo, hi = spec.get("act_range", (math.nan, math.nan))
            row["act_lo"], row["act_hi"] = lo, hi
            ws = self.tensors.get(name + ".weight_scale")
            row["weight_scale_min"] = float(ws.min()) if ws is not None else math.nan
            row["weight_scale_max"] = float(ws.max()) if ws is not None else math.nan
            rows.append(row)
        return pd.DataFrame(rows).set_index("site")

    def apply(self, encoder: "Encoder") -> "Encoder":
        """A new encoder: ``encoder``'s fp32 weights quantized with these parameters (``encoder`` is untouched).

        Weights are rounded with the stored scales (GPTQ codes and corrected biases are taken as stored: only on
        the weights they were computed for, else ValueError); activation scales and zero points, SmoothQuant factors
        and the embedding row scales are used as they are."""
        params = encoder.fp32_params
        if params is None:
            raise ValueError("apply() needs fp32 weights; this encoder was loaded quantized. Load the fp32 "
                             "checkpoint and apply the parameters to that.")
        cfg = encoder.config
        have = {f: int(getattr(cfg, f)) for f in MODEL_FIELDS}
        if have != self.model:
            diff = ", ".join(f"{f} {self.model[f]} vs {have[f]}" for f in MODEL_FIELDS if have[f] != self.model[f])
            raise ValueError(f"these quantization parameters are for a model of another shape ({diff})")
        storage, _ = float_storage(params, cfg, get_scheme("fp32"))
        if self.scheme.embeddings == "int8":
            q, s = _core.quantize_rows_s8(params[WORD_EMBEDDINGS], scales=self.tensors[WORD_EMBEDDING_SCALES])
            storage[WORD_EMBEDDINGS], storage[WORD_EMBEDDING_SCALES] = q, s
        for name, (w, b) in fp32_sites(params, cfg).items():
            spec = self.sites[name]
            kind = SITE_KINDS[spec["kind"]]
            storage[name + ".bias"] = b
            if kind.is_float:
                storage[name + ".weight"] = w
                continue
            tied = [s for s in ("weight", "bias") if f"{name}.{s}" in self.tensors]
            if tied:
                want = self.source_weights.get(name)
                if want is not None and want != weight_sha256(w):
                    raise ValueError(
                        f"site {name}: the stored {' and '.join(tied)} were computed for other fp32 weights (GPTQ "
                        "codes / bias correction belong to the weights they were made for); quantize this model "
                        "with the scheme instead, or export parameters without GPTQ rounding and bias correction")
            mul = self.tensors.get(name + ".act_mul")
            if mul is not None:
                w = smooth_weight(w, mul)
                storage[name + ".act_mul"] = mul
            scales = self.tensors[name + ".weight_scale"]
            if name + ".weight" in self.tensors:
                storage[name + ".weight"] = self.tensors[name + ".weight"]
                storage[name + ".weight_scale"] = scales
            elif "group_size" in spec:
                storage[name + ".weight"], storage[name + ".weight_scale"] = _core.quantize_weight_s4(
                    w, int(spec["group_size"]), scales=scales)
            else:
                storage[name + ".weight"], storage[name + ".weight_scale"] = _core.quantize_weight_s8(
                    w, bool(spec["w_per_channel"]), scales=scales)
            if name + ".bias" in self.tensors:
                storage[name + ".bias"] = self.tensors[name + ".bias"]
        sites = {n: dict(self.sites[n]) for n in cfg.site_names}
        return encoder.with_storage(storage, sites, self.scheme, fp32=params, reference=encoder)

    def __repr__(self) -> str:
        kinds: Dict[str, int] = {}
        for s in self.sites.values():
            kinds[s["kind"]] = kinds.get(s["kind"], 0) + 1
        return (f"QuantParams(scheme={self.scheme.name!r}, sites={kinds}, tensors={len(self.tensors)}, "
                f"embeddings={self.scheme.embeddings!r})")


def load_quant_params(directory: Union[str, Path]) -> QuantParams:
    """:meth:`QuantParams.load`."""
    return QuantParams.load(directory)


__all__ = ["PARAMS_FORMAT", "PARAMS_JSON", "PARAMS_TENSORS", "QuantParams", "load_quant_params", "weight_sha256"]
