"""An encoder's tensors in the C core's layout, and medquant's quantized save format.

The *storage* of an encoder is a dict of numpy arrays named like the checkpoint's parameters (embeddings,
LayerNorms, and per site ``<site>.weight`` / ``.bias`` / ``.weight_scale`` / ``.act_mul``) plus one *spec* per site
(its kind and activation parameters). This module builds the fp32 storage, hands a storage to a ``_core.Encoder``,
and writes / reads it as a ``FORMAT = "medquant-quantized-v1"`` directory (model.safetensors with the scheme and the
site specs as metadata), or as a plain Hugging Face checkpoint for fp32.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Dict, Mapping, Optional, Tuple

import numpy as np

from .._native import _core
from ..quant.schemes import MODE_CODES, SITE_KINDS, QuantScheme
from .architectures import BertConfig, float_tensors, fp32_sites, load_float_tensors, parse_site
from .checkpoint import CheckpointError

FORMAT = "medquant-quantized-v1"
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json",
                   "sentence_bert_config.json", "modules.json", "config_sentence_transformers.json")

Storage = Dict[str, np.ndarray]
SiteSpecs = Dict[str, Dict]


def float_storage(params: Mapping[str, np.ndarray], cfg: BertConfig, scheme: QuantScheme,
                  act_mul: Optional[Mapping[str, np.ndarray]] = None) -> Tuple[Storage, SiteSpecs]:
    """fp32 / bf16 storage of fp32 parameters; ``act_mul`` (SmoothQuant factors) divides into the weights."""
    storage = float_tensors(params, cfg)
    sites = {}
    for name, (w, b) in fp32_sites(params, cfg).items():
        kind = scheme.site_kind(name)
        if not SITE_KINDS[kind].is_float:
            raise ValueError(f"float_storage got a non-float site kind {kind}")
        if act_mul is not None and name in act_mul:
            w = smooth_weight(w, act_mul[name])
            storage[name + ".act_mul"] = act_mul[name]
        storage[name + ".weight"] = w
        storage[name + ".bias"] = b
        sites[name] = {"kind": kind}
    return storage, sites


def smooth_weight(w: np.ndarray, act_mul: np.ndarray) -> np.ndarray:
    """A weight [N, K] whose input is multiplied by ``act_mul`` [K]: the columns divided by it (SmoothQuant)."""
    return np.ascontiguousarray(w / act_mul[None, :], dtype=np.float32)


def build_core(cfg: BertConfig, storage: Storage, sites: SiteSpecs, n_threads: int):
    """A finalized ``_core.Encoder`` holding ``storage``."""
    core = _core.Encoder(cfg.to_core(), int(n_threads), _core.Observer)
    load_float_tensors(core, storage, cfg)
    for name in cfg.site_names:
        spec, (layer, s) = sites[name], parse_site(name)
        kind = SITE_KINDS[spec["kind"]]
        core.set_linear(layer, s, kind.code, storage[name + ".weight"], w_scales=storage.get(name + ".weight_scale"),
                        bias=storage.get(name + ".bias"), act_mul=storage.get(name + ".act_mul"),
                        **kind.core_args(spec))
    core.finalize()
    return core


def is_quantized(meta: Mapping) -> bool:
    """Whether a model.safetensors' metadata marks medquant's quantized format."""
    return meta.get("format") == FORMAT


def write(out: Path, *, config: BertConfig, tokenizer, scheme: QuantScheme, storage: Storage, sites: SiteSpecs,
          fp32: Optional[Storage], model_dir: Optional[Path]) -> Path:
    """Write a model directory: fp32 as a Hugging Face checkpoint, anything else in ``FORMAT``; tokenizer files."""
    from safetensors.numpy import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if scheme.name == "fp32" and fp32 is not None and all(v["kind"] == "fp32" for v in sites.values()):
        save_file(dict(fp32), str(out / "model.safetensors"), metadata={"format": "pt"})
    else:
        meta = {"format": FORMAT, "scheme": scheme.to_json(), "sites": json.dumps(sites, sort_keys=True)}
        save_file({k: np.ascontiguousarray(v) for k, v in storage.items()}, str(out / "model.safetensors"),
                  metadata=meta)
    with open(out / "config.json", "w", encoding="utf-8") as f:
        json.dump(config.to_hf(), f, indent=2)
    if model_dir is not None:
        for fn in TOKENIZER_FILES:
            src = Path(model_dir) / fn
            if src.exists() and src.resolve() != (out / fn).resolve():
                shutil.copyfile(src, out / fn)
    if not (out / "tokenizer.json").exists() and not (out / "vocab.txt").exists():
        tokenizer.save(str(out / "tokenizer.json"))
    return out


def read_quantized(meta: Mapping, state: Mapping[str, np.ndarray], cfg: BertConfig
                   ) -> Tuple[QuantScheme, SiteSpecs, Storage]:
    """(scheme, site specs, storage) of a ``FORMAT`` checkpoint, checked against its config."""
    try:
        scheme = QuantScheme.from_dict(json.loads(meta["scheme"]))
        sites = json.loads(meta["sites"])
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"quantized checkpoint metadata is corrupt: {e}") from None
    expected = cfg.site_names
    if not isinstance(sites, dict) or sorted(sites) != sorted(expected):
        raise CheckpointError("quantized checkpoint sites do not match config.json")
    for n, spec in sites.items():
        if not isinstance(spec, dict) or spec.get("kind") not in SITE_KINDS:
            raise CheckpointError(f"quantized checkpoint: bad site spec for {n}: {spec!r}")
        if SITE_KINDS[spec["kind"]].quantized_input and spec.get("act_mode") not in MODE_CODES:
            raise CheckpointError(f"quantized checkpoint: bad activation mode for {n}")
    storage = {k: np.ascontiguousarray(v) for k, v in state.items()}
    for k, v in storage.items():
        if v.dtype.kind == "f" and v.dtype != np.float32:
            storage[k] = v.astype(np.float32)
        if storage[k].dtype == np.float32 and not np.isfinite(storage[k]).all():
            raise CheckpointError(f"tensor {k} contains NaN or Inf")
    return scheme, {n: sites[n] for n in expected}, storage


__all__ = ["FORMAT", "TOKENIZER_FILES", "build_core", "float_storage", "is_quantized", "read_quantized",
           "smooth_weight", "write"]
