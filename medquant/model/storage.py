"""An encoder's tensors in the C core's layout, and medquant's quantized save format.

The *storage* of an encoder is a dict of numpy arrays named like the checkpoint's parameters (embeddings,
LayerNorms, and per site ``<site>.weight`` / ``.bias`` / ``.weight_scale`` / ``.act_mul``) plus one *spec* per site
(its kind and activation parameters). This module builds the fp32 storage, hands a storage to a ``_core.Encoder``,
and writes / reads it as a ``FORMAT = "medquant-quantized-v1"`` directory (model.safetensors with the scheme and the
site specs as metadata), or as a plain Hugging Face checkpoint for fp32.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import uuid
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple

import numpy as np

from .._native import _core
from ..quant.schemes import SITE_KINDS, QuantScheme
from .architectures import (
    WORD_EMBEDDING_SCALES, WORD_EMBEDDINGS, BertConfig, expected_shapes, float_tensors, fp32_sites,
    load_float_tensors, parse_site, site_shapes,
)
from .checkpoint import CheckpointError
from .sentence import MODULES_FILE, QUANTIZED_MODULES_FILE, SENTENCE_FILES, copy_sentence_files

FORMAT = "medquant-quantized-v1"
#: The tensors a site may store, by suffix: ``<site>.weight`` (float, int8 or packed int4), ``.bias``, and as its kind
#: and scheme need them ``.weight_scale`` and ``.act_mul`` (SmoothQuant).
SITE_TENSOR_SUFFIXES = ("weight", "bias", "weight_scale", "act_mul")
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json")

#: QuantScheme fields added after the format's first saves, which lack them: their defaults are what those saves
#: did (round to nearest, no bias correction, no per-site overrides). Every other field must be in a save.
SCHEME_FIELDS_ADDED = frozenset({"rounding", "gptq_damp", "bias_correction", "overrides", "attention"})

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


ATTENTION_PRECISION = {"fp32": _core.ATTN_F32, "bf16": _core.ATTN_BF16, "int8": _core.ATTN_INT8}


def build_core(cfg: BertConfig, storage: Storage, sites: SiteSpecs, n_threads: int, attention: str = "fp32"):
    """A finalized ``_core.Encoder`` holding ``storage``, its attention in ``attention`` precision."""
    core = _core.Encoder(cfg.to_core(), int(n_threads), _core.Observer)
    core.set_attention_precision(ATTENTION_PRECISION[attention])
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


MARKER = "medquant.json"


def _marker(directory: Path) -> Optional[Dict]:
    """The contents of a directory's medquant save marker, or None."""
    try:
        with open(directory / MARKER, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("saved_by") == "medquant" else None


def is_medquant_save(directory: Path) -> bool:
    """Whether a directory holds a medquant save and nothing else, so replacing it loses nothing of anyone's:
    its marker lists every file in it (or, for saves written before the marker, model.safetensors is in
    ``FORMAT`` and the other files are ones medquant writes)."""
    directory = Path(directory)
    try:
        present = {p.name for p in directory.iterdir()}
    except OSError:
        return False
    marker = _marker(directory)
    if marker is not None:
        files = marker.get("files")
        return isinstance(files, list) and present <= set(map(str, files)) | {MARKER}
    if not present <= {"model.safetensors", "config.json", *TOKENIZER_FILES, *SENTENCE_FILES, MODULES_FILE,
                       QUANTIZED_MODULES_FILE}:
        return False
    try:
        from safetensors import safe_open

        with safe_open(str(directory / "model.safetensors"), framework="numpy") as f:
            return is_quantized(f.metadata() or {})
    except Exception:  # not readable: not recognisably ours
        return False


def _same_or_nested(a: Path, b: Path) -> bool:
    return a == b or a.is_relative_to(b) or b.is_relative_to(a)


def _write_files(d: Path, *, config: BertConfig, tokenizer, scheme: QuantScheme, storage: Storage,
                 sites: SiteSpecs, fp32: Optional[Storage], model_dir: Optional[Path]) -> None:
    from safetensors.numpy import save_file

    if scheme.name == "fp32" and fp32 is not None and all(v["kind"] == "fp32" for v in sites.values()):
        save_file(dict(fp32), str(d / "model.safetensors"), metadata={"format": "pt"})
        fmt = "huggingface"
    else:
        meta = {"format": FORMAT, "scheme": scheme.to_json(), "sites": json.dumps(sites, sort_keys=True)}
        save_file({k: np.ascontiguousarray(v) for k, v in storage.items()}, str(d / "model.safetensors"),
                  metadata=meta)
        fmt = FORMAT
    with open(d / "config.json", "w", encoding="utf-8") as f:
        json.dump(config.to_hf(quantized=fmt == FORMAT), f, indent=2)
    if model_dir is not None:
        for fn in TOKENIZER_FILES:
            src = Path(model_dir) / fn
            if src.is_file():
                shutil.copyfile(src, d / fn)
        copy_sentence_files(Path(model_dir), d, quantized=fmt == FORMAT)
    if not (d / "tokenizer.json").exists() and not (d / "vocab.txt").exists():
        tokenizer.save(str(d / "tokenizer.json"))
    from .. import __version__

    files = sorted(p.name for p in d.iterdir())
    with open(d / MARKER, "w", encoding="utf-8") as f:  # last: a directory with a marker is a complete save
        json.dump({"saved_by": "medquant", "version": __version__, "format": fmt, "scheme": scheme.name,
                   "files": files}, f, indent=2)


def swap_into_place(tmp: Path, target: Path) -> None:
    """Rename the finished directory ``tmp`` to ``target``; an existing ``target`` is moved aside first and removed
    only after the rename succeeded (put back if it failed), so ``target`` is always either the old or the new one."""
    if target.exists():
        old = target.parent / f".{target.name}.medquant-old-{uuid.uuid4().hex[:12]}"
        os.rename(target, old)
        try:
            os.rename(tmp, target)
        except BaseException:
            os.rename(old, target)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, target)


def write(out: Path, *, config: BertConfig, tokenizer, scheme: QuantScheme, storage: Storage, sites: SiteSpecs,
          fp32: Optional[Storage], model_dir: Optional[Path], overwrite: bool = False) -> Path:
    """Write a model directory: fp32 as a Hugging Face checkpoint, anything else in ``FORMAT``; tokenizer files
    from ``model_dir``; a ``MARKER`` file listing what was written.

    The files are written to a fresh directory next to ``out`` and renamed into place, so ``out`` ends up holding
    exactly this save (no stale files of what was there) and a failure part-way leaves ``out`` as it was. ``out``
    may be missing, an empty directory, or a previous medquant save (``is_medquant_save``); anything else is
    refused (FileExistsError) unless ``overwrite=True``, which replaces the directory and everything in it. The
    source directory ``model_dir`` (or one inside it, or one containing it) is never written (ValueError), even
    with ``overwrite=True``.
    """
    out = Path(out).expanduser()
    target = out.resolve()  # through symlinks and relative parts: the directory that would really be replaced
    if model_dir is not None and _same_or_nested(target, Path(model_dir).expanduser().resolve()):
        raise ValueError(f"refusing to save into {out}: it is (or contains, or lies inside) the directory the model "
                         f"was loaded from ({model_dir}); save to another directory")
    exists = target.exists()
    if exists and not target.is_dir():
        raise FileExistsError(f"cannot save to {out}: it exists and is not a directory")
    empty = exists and not any(target.iterdir())
    if exists and not empty and not overwrite and not is_medquant_save(target):
        raise FileExistsError(f"refusing to save into {out}: it is not empty and does not hold a medquant save "
                              f"(pass overwrite=True to replace the directory and everything in it)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:12]
    tmp = target.parent / f".{target.name}.medquant-tmp-{tag}"
    tmp.mkdir()
    try:
        _write_files(tmp, config=config, tokenizer=tokenizer, scheme=scheme, storage=storage, sites=sites, fp32=fp32,
                     model_dir=model_dir)
        if exists:
            shutil.copymode(target, tmp)
        swap_into_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _metadata(meta: Mapping) -> Tuple[QuantScheme, Dict]:
    """The scheme and the raw site specs of a ``FORMAT`` checkpoint's metadata; every scheme field must be there
    (a save writes them all: a missing one would silently take its default)."""
    parsed = {}
    for key in ("scheme", "sites"):
        if key not in meta:
            raise CheckpointError(f"quantized checkpoint metadata is missing {key!r}")
        try:
            parsed[key] = json.loads(meta[key])
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"quantized checkpoint metadata {key!r} is not valid JSON: {e}") from None
        if not isinstance(parsed[key], dict):
            raise CheckpointError(f"quantized checkpoint metadata {key!r} must be a JSON object")
    fields = {f.name for f in dataclasses.fields(QuantScheme)} - SCHEME_FIELDS_ADDED
    missing = sorted(fields - set(parsed["scheme"]))
    if missing:
        raise CheckpointError(f"quantized checkpoint metadata 'scheme' is missing field(s): {', '.join(missing)}")
    try:
        scheme = QuantScheme.from_dict(parsed["scheme"])
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"quantized checkpoint metadata 'scheme' is invalid: {e}") from None
    return scheme, parsed["sites"]


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_f32_positive(v) -> bool:
    """A positive, finite number that stays a positive normal float32 (what the core stores)."""
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
        return False
    with np.errstate(over="ignore", under="ignore"):
        f = np.float32(v)
    return bool(np.isfinite(f) and f >= np.finfo(np.float32).tiny)


def _check_site_spec(name: str, spec, scheme: QuantScheme, k: int) -> None:
    """One site's spec against what ``scheme`` stores for it (kind, weight entries, activation parameters)."""
    def bad(msg):
        raise CheckpointError(f"quantized checkpoint: site {name}: {msg}")

    if not isinstance(spec, dict):
        bad(f"spec must be a JSON object, got {spec!r}")
    site = scheme.for_site(name)
    want_kind = scheme.site_kind(name)
    if spec.get("kind") != want_kind:
        bad(f"kind is {spec.get('kind')!r}, but scheme {scheme.name!r} stores this site as {want_kind!r}")
    kind = SITE_KINDS[want_kind]
    expected = {"kind": want_kind, **kind.weight_spec(site)}
    optional = set()
    if kind.quantized_input:
        expected["act_mode"] = site.mode
        expected["act_symmetric"] = bool(site.act_symmetric)
        if site.mode == "static":
            optional = {"act_scale", "act_zero_point", "act_range"}
    for key, value in expected.items():
        if key not in spec:
            bad(f"spec is missing {key!r}")
        got = spec[key]
        if type(got) is not type(value) or got != value:
            bad(f"{key} is {got!r}, but scheme {scheme.name!r} gives {value!r}")
    for key in sorted(optional):  # static activation parameters: all required
        if key not in spec:
            bad(f"spec is missing {key!r} (static activation quantization)")
    unknown = sorted(set(spec) - set(expected) - optional)
    if unknown:
        bad(f"spec has unknown field(s) {', '.join(map(repr, unknown))}")
    if "group_size" in expected and k % expected["group_size"]:
        bad(f"group_size {expected['group_size']} does not divide the {k} inputs")
    if optional:
        if not _is_f32_positive(spec["act_scale"]):
            bad(f"act_scale must be a positive finite number, got {spec['act_scale']!r}")
        zp = spec["act_zero_point"]
        if site.act_symmetric and not (_is_int(zp) and zp == 128):
            bad(f"act_zero_point must be 128 for symmetric activations, got {zp!r}")
        if not (_is_int(zp) and 0 <= zp <= 255):
            bad(f"act_zero_point must be an integer in [0, 255], got {zp!r}")
        rng = spec["act_range"]
        if not (isinstance(rng, list) and len(rng) == 2
                and all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in rng)
                and rng[0] <= rng[1]):
            bad(f"act_range must be [lo, hi] with finite lo <= hi, got {rng!r}")


def expected_tensors(cfg: BertConfig, scheme: QuantScheme, sites: SiteSpecs
                     ) -> Tuple[Dict[str, Tuple[np.dtype, Tuple[int, ...]]], List[str]]:
    """Every tensor a ``FORMAT`` checkpoint of this config, scheme and (checked) site specs holds, as
    {name: (dtype, shape)}, and the names whose values must be positive (scales, SmoothQuant factors).

    Derived from the tables: the embeddings and LayerNorms from ``expected_shapes`` / ``float_tensors``, the word
    embeddings as int8 rows + ``WORD_EMBEDDING_SCALES`` when ``scheme.embeddings`` says so, per site the kind's
    ``weight_layout`` (every stored tensor but the weight is a scale), the bias [N] (BERT always has one; a save
    always writes it), and ``act_mul`` [K] on the sites whose input is quantized when the scheme smooths."""
    f32 = np.dtype(np.float32)
    out = {n: (f32, tuple(shape)) for n, shape in float_tensors(expected_shapes(cfg), cfg).items()}
    positive = []
    if scheme.embeddings == "int8":
        out[WORD_EMBEDDINGS] = (np.dtype(np.int8), out[WORD_EMBEDDINGS][1])
        out[WORD_EMBEDDING_SCALES] = (f32, (cfg.vocab_size,))
        positive.append(WORD_EMBEDDING_SCALES)
    for name, (n, k) in site_shapes(cfg).items():
        kind = SITE_KINDS[sites[name]["kind"]]
        for suffix, (dtype, shape) in kind.weight_layout(sites[name], n, k).items():
            out[f"{name}.{suffix}"] = (np.dtype(dtype), tuple(shape))
            if suffix != "weight":
                positive.append(f"{name}.{suffix}")
        out[name + ".bias"] = (f32, (n,))
        if kind.quantized_input and scheme.smoothquant_alpha is not None:
            out[name + ".act_mul"] = (f32, (k,))
            positive.append(name + ".act_mul")
    return out, positive


def _names(names) -> str:
    names = sorted(names)
    more = f" (and {len(names) - 8} more)" if len(names) > 8 else ""
    return ", ".join(names[:8]) + more


def validate_quantized(cfg: BertConfig, scheme: QuantScheme, sites, state: Mapping[str, np.ndarray]) -> SiteSpecs:
    """Check a ``FORMAT`` checkpoint completely before anything is built from it: one spec per site of the config,
    each matching what the scheme stores (``_check_site_spec``), and exactly the tensors ``expected_tensors``
    names, each with its dtype and shape, finite, scales and SmoothQuant factors positive. Raises CheckpointError
    naming the site, field or tensor; returns the site specs in the config's order."""
    shapes = site_shapes(cfg)
    if not isinstance(sites, dict) or sorted(sites) != sorted(shapes):
        have = set(sites) if isinstance(sites, dict) else set()
        detail = "; ".join(x for x in (
            f"missing {_names(set(shapes) - have)}" if set(shapes) - have else "",
            f"unknown {_names(have - set(shapes))}" if have - set(shapes) else "") if x)
        raise CheckpointError(f"quantized checkpoint sites do not match config.json ({detail or 'not a JSON object'})")
    for name, (_, k) in shapes.items():
        _check_site_spec(name, sites[name], scheme, k)
    sites = {n: sites[n] for n in shapes}
    expected, positive = expected_tensors(cfg, scheme, sites)
    missing = set(expected) - set(state)
    if missing:
        raise CheckpointError(f"quantized checkpoint is missing {len(missing)} tensor(s) that scheme "
                              f"{scheme.name!r} needs: {_names(missing)}")
    unexpected = set(state) - set(expected)
    if unexpected:
        raise CheckpointError(f"quantized checkpoint has {len(unexpected)} tensor(s) that scheme {scheme.name!r} "
                              f"does not use: {_names(unexpected)}")
    for name, (dtype, shape) in expected.items():
        v = state[name]
        if not isinstance(v, np.ndarray) or v.dtype != dtype:
            raise CheckpointError(f"tensor {name} has dtype {getattr(v, 'dtype', type(v).__name__)}, expected {dtype}")
        if tuple(v.shape) != shape:
            raise CheckpointError(f"tensor {name} has shape {tuple(v.shape)}, expected {shape}")
        if v.dtype.kind == "f" and not np.isfinite(v).all():
            raise CheckpointError(f"tensor {name} contains NaN or Inf")
    for name in positive:
        v = state[name]
        if v.size and not (v >= np.finfo(np.float32).tiny).all():
            raise CheckpointError(f"tensor {name} must hold positive scales, found {float(v.min())!r}")
    return sites


def read_quantized(meta: Mapping, state: Mapping[str, np.ndarray], cfg: BertConfig
                   ) -> Tuple[QuantScheme, SiteSpecs, Storage]:
    """(scheme, site specs, storage) of a ``FORMAT`` checkpoint, checked by :func:`validate_quantized`."""
    scheme, sites = _metadata(meta)
    sites = validate_quantized(cfg, scheme, sites, state)
    storage = {k: np.ascontiguousarray(v) for k, v in state.items()}
    return scheme, sites, storage


__all__ = ["FORMAT", "MARKER", "SITE_TENSOR_SUFFIXES", "TOKENIZER_FILES", "build_core", "expected_tensors", "float_storage", "is_medquant_save",
           "is_quantized", "read_quantized", "smooth_weight", "swap_into_place", "validate_quantized",
           "write"]
