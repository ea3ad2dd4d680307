"""medquant.Encoder: load a BERT checkpoint, encode texts with the C core, calibrate, quantize, save."""
from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Union

import numpy as np
import pandas as pd

from .._native import _core
from ..quant.calibration import Calibration, qparams
from ..quant.schemes import KIND_CODES, MODE_CODES, SITE_SUFFIXES, QuantScheme, get_scheme, site_name
from .checkpoint import (
    DEFAULT_MODEL, BertConfig, CheckpointError, default_max_length, fp32_params, load_config, load_state_dict,
    load_tokenizer, read_safetensors, resolve_model_path,
)

FORMAT = "medquant-quantized-v1"
_POOLING = {"mean": _core.POOL_MEAN, "cls": _core.POOL_CLS}
_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json",
                    "sentence_bert_config.json", "modules.json", "config_sentence_transformers.json")


def _default_threads() -> int:
    env = os.environ.get("MEDQUANT_NUM_THREADS")
    if env:
        return int(env)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        return os.cpu_count() or 1


def _fp32_sites(params: Dict[str, np.ndarray], cfg: BertConfig):
    """Per-site fp32 (weight [N, K], bias [N]); Q, K, V fused into one [3H, H] projection."""
    sites = {}
    for i in range(cfg.num_hidden_layers):
        p = f"encoder.layer.{i}."
        qkv = [p + f"attention.self.{n}" for n in ("query", "key", "value")]
        sites[site_name(i, 0)] = (
            np.ascontiguousarray(np.concatenate([params[n + ".weight"] for n in qkv], axis=0)),
            np.ascontiguousarray(np.concatenate([params[n + ".bias"] for n in qkv], axis=0)),
        )
        for s, mod in ((1, "attention.output.dense"), (2, "intermediate.dense"), (3, "output.dense")):
            sites[site_name(i, s)] = (params[p + mod + ".weight"], params[p + mod + ".bias"])
    return sites


class Encoder:
    """A BERT encoder whose forward pass runs in the medquant C core (oneDNN), in fp32 or quantized.

    Create with :meth:`from_pretrained`; derive quantized encoders with :meth:`quantize` (the original is untouched).
    """

    def __init__(self, *, config: BertConfig, tokenizer, storage: Dict[str, np.ndarray], sites: Dict[str, Dict],
                 scheme: QuantScheme, max_length: int, model_dir: Optional[Path], name: str,
                 fp32: Optional[Dict[str, np.ndarray]] = None, reference: Optional["Encoder"] = None,
                 n_threads: Optional[int] = None):
        self.config = config
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.scheme = scheme
        self.name = name
        self.model_dir = model_dir
        self._storage = storage
        self._sites = sites
        self._fp32 = fp32
        self.reference = reference
        self._tok_lock = threading.Lock()
        self._core = self._build(n_threads if n_threads is not None else _default_threads())

    # ------------------------------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, name_or_path: Union[str, os.PathLike] = DEFAULT_MODEL, *, max_length: Optional[int] = None,
                        n_threads: Optional[int] = None, allow_pickle: bool = False) -> "Encoder":
        """Load a Hugging Face BERT directory, a medquant quantized directory, or a packaged model by name."""
        model_dir = resolve_model_path(name_or_path)
        cfg = load_config(model_dir)
        tokenizer = load_tokenizer(model_dir)
        ml = default_max_length(model_dir, cfg) if max_length is None else cls._check_max_length(max_length, cfg)
        state, meta = load_state_dict(model_dir, allow_pickle=allow_pickle)
        name = str(name_or_path)
        if meta.get("format") == FORMAT:
            scheme, sites, storage = cls._read_quantized(meta, state, cfg)
            return cls(config=cfg, tokenizer=tokenizer, storage=storage, sites=sites, scheme=scheme, max_length=ml,
                       model_dir=model_dir, name=name, n_threads=n_threads)
        params = fp32_params(state, cfg)
        scheme = get_scheme("fp32")
        storage, sites = cls._float_storage(params, cfg, scheme)
        return cls(config=cfg, tokenizer=tokenizer, storage=storage, sites=sites, scheme=scheme, max_length=ml,
                   model_dir=model_dir, name=name, fp32=params, n_threads=n_threads)

    @staticmethod
    def _check_max_length(max_length, cfg: BertConfig) -> int:
        if not isinstance(max_length, (int, np.integer)) or isinstance(max_length, bool):
            raise TypeError(f"max_length must be an int, got {type(max_length).__name__}")
        if not (2 <= max_length <= cfg.max_position_embeddings):
            raise ValueError(f"max_length must be in [2, {cfg.max_position_embeddings}], got {max_length}")
        return int(max_length)

    @staticmethod
    def _float_storage(params, cfg, scheme, act_mul=None):
        storage = {
            "embeddings.word_embeddings.weight": params["embeddings.word_embeddings.weight"],
            "embeddings.position_embeddings.weight": params["embeddings.position_embeddings.weight"],
            "embeddings.token_type_embeddings.weight": params["embeddings.token_type_embeddings.weight"],
            "embeddings.LayerNorm.weight": params["embeddings.LayerNorm.weight"],
            "embeddings.LayerNorm.bias": params["embeddings.LayerNorm.bias"],
        }
        for i in range(cfg.num_hidden_layers):
            for ln in ("attention.output.LayerNorm", "output.LayerNorm"):
                for t in ("weight", "bias"):
                    k = f"encoder.layer.{i}.{ln}.{t}"
                    storage[k] = params[k]
        sites = {}
        for name, (w, b) in _fp32_sites(params, cfg).items():
            kind = scheme.site_kind(name)
            if kind not in ("fp32", "bf16"):
                raise ValueError(f"_float_storage got a non-float site kind {kind}")
            if act_mul is not None and name in act_mul:
                w = np.ascontiguousarray(w / act_mul[name][None, :], dtype=np.float32)
                storage[name + ".act_mul"] = act_mul[name]
            storage[name + ".weight"] = w
            storage[name + ".bias"] = b
            sites[name] = {"kind": kind}
        return storage, sites

    def _build(self, n_threads: int):
        cfg, st = self.config, self._storage
        core = _core.Encoder(cfg.to_core(), int(n_threads), _core.Observer)
        if "embeddings.word_embeddings.weight_scale" in st:
            core.set_word_embeddings(st["embeddings.word_embeddings.weight"], st["embeddings.word_embeddings.weight_scale"])
        else:
            core.set_word_embeddings(st["embeddings.word_embeddings.weight"])
        core.set_position_type_embeddings(st["embeddings.position_embeddings.weight"],
                                          st["embeddings.token_type_embeddings.weight"])
        core.set_layernorm(-1, 0, st["embeddings.LayerNorm.weight"], st["embeddings.LayerNorm.bias"])
        for i in range(cfg.num_hidden_layers):
            for which, ln in enumerate(("attention.output.LayerNorm", "output.LayerNorm")):
                core.set_layernorm(i, which, st[f"encoder.layer.{i}.{ln}.weight"], st[f"encoder.layer.{i}.{ln}.bias"])
            for s in range(len(SITE_SUFFIXES)):
                name = site_name(i, s)
                spec = self._sites[name]
                kw = dict(
                    w_scales=st.get(name + ".weight_scale"),
                    bias=st.get(name + ".bias"),
                    act_mul=st.get(name + ".act_mul"),
                )
                if spec["kind"] == "int8":
                    kw.update(
                        act_mode=MODE_CODES[spec["act_mode"]],
                        act_symmetric=bool(spec["act_symmetric"]),
                        act_scale=float(spec.get("act_scale", 1.0)),
                        act_zero_point=int(spec.get("act_zero_point", 0)),
                    )
                if spec["kind"] in ("int8", "w8"):
                    kw["w_per_channel"] = bool(spec["w_per_channel"])
                if spec["kind"] == "w4":
                    kw["group_size"] = int(spec["group_size"])
                core.set_linear(i, s, KIND_CODES[spec["kind"]], st[name + ".weight"], **kw)
        core.finalize()
        return core

    # ------------------------------------------------------------------------------------------ properties
    @property
    def n_threads(self) -> int:
        return self._core.threads()

    def set_threads(self, n_threads: int) -> None:
        """Threads used by oneDNN for this encoder's forward passes."""
        if not isinstance(n_threads, (int, np.integer)) or n_threads < 1:
            raise ValueError(f"n_threads must be a positive int, got {n_threads!r}")
        self._core.set_threads(int(n_threads))

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def site_names(self) -> List[str]:
        return list(self._sites)

    def site_kinds(self) -> Dict[str, str]:
        return {k: v["kind"] for k, v in self._sites.items()}

    def site_impl(self, site: str) -> str:
        """The oneDNN implementation that ran a site's matmul (e.g. 'brg:avx512_core_vnni'), '' before it ran."""
        layer, s = int(site.split(".")[2]), SITE_SUFFIXES.index(site.split(".", 3)[3])
        return self._core.site_impl(layer, s)

    def size_bytes(self) -> int:
        """Bytes the encoder's parameters take in memory (prepacked weights, scales, embeddings)."""
        return int(self._core.nbytes())

    def __repr__(self) -> str:
        return (f"Encoder({self.name!r}, scheme={self.scheme.name!r}, layers={self.config.num_hidden_layers}, "
                f"hidden={self.config.hidden_size}, max_length={self.max_length}, threads={self.n_threads})")

    # ------------------------------------------------------------------------------------------ running
    def tokenize(self, texts: Sequence[str], max_length: Optional[int] = None):
        """Token ids, attention mask and token type ids (int32, right-padded) for a list of texts."""
        texts = self._check_texts(texts)
        ml = self.max_length if max_length is None else self._check_max_length(max_length, self.config)
        encs = self._encode_tokens(texts, ml)
        return self._pad([e.ids for e in encs], [e.type_ids for e in encs])

    def _encode_tokens(self, texts: List[str], max_length: int):
        with self._tok_lock:
            self.tokenizer.enable_truncation(max_length)
            try:
                return self.tokenizer.encode_batch(texts)
            finally:
                self.tokenizer.no_truncation()

    @staticmethod
    def _pad(ids_list, types_list):
        B, S = len(ids_list), max(len(x) for x in ids_list)
        ids = np.zeros((B, S), np.int32)
        mask = np.zeros((B, S), np.int32)
        types = np.zeros((B, S), np.int32)
        for b, (x, t) in enumerate(zip(ids_list, types_list)):
            ids[b, : len(x)] = x
            mask[b, : len(x)] = 1
            types[b, : len(t)] = t
        return ids, mask, types

    @staticmethod
    def _check_texts(texts) -> List[str]:
        if isinstance(texts, (str, bytes)):
            raise TypeError("texts must be a list of strings, not a single string (wrap it: [text])")
        if texts is None:
            raise TypeError("texts must be a list of strings, got None")
        texts = list(texts)
        if not texts:
            raise ValueError("texts is empty: nothing to encode")
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"texts[{i}] is {type(t).__name__}, expected str")
        return texts

    @staticmethod
    def _as_int32(a, name: str, shape=None) -> np.ndarray:
        arr = np.asarray(a)
        if arr.dtype.kind not in "iub":
            raise TypeError(f"{name} must hold integers, got dtype {arr.dtype}")
        if arr.ndim != 2:
            raise ValueError(f"{name} must be 2-D [batch, seq], got shape {arr.shape}")
        if shape is not None and arr.shape != shape:
            raise ValueError(f"{name} has shape {arr.shape}, expected {shape} (like input_ids)")
        if arr.size and (arr.min() < np.iinfo(np.int32).min or arr.max() > np.iinfo(np.int32).max):
            raise ValueError(f"{name} has values outside the int32 range")
        return np.ascontiguousarray(arr, dtype=np.int32)  # a converted copy; the caller's array is never modified

    def forward(self, input_ids, attention_mask=None, token_type_ids=None) -> np.ndarray:
        """Last hidden state [batch, seq, hidden] (float32) for right-padded inputs; padding positions are zero."""
        ids = self._as_int32(input_ids, "input_ids")
        if ids.shape[0] == 0 or ids.shape[1] == 0:
            raise ValueError(f"input_ids is empty (shape {ids.shape})")
        mask = np.ones_like(ids) if attention_mask is None else self._as_int32(attention_mask, "attention_mask", ids.shape)
        tt = None if token_type_ids is None else self._as_int32(token_type_ids, "token_type_ids", ids.shape)
        hidden, _, _ = self._core.forward(ids, mask, tt, hidden=True)
        return hidden

    def encode(self, texts: Iterable[str], batch_size: int = 32, max_length: Optional[int] = None,
               pooling: str = "mean", normalize: bool = True, show_progress_bar: Optional[bool] = None) -> np.ndarray:
        """Sentence embeddings [len(texts), hidden] (float32) in input order.

        Texts are tokenized (truncated to max_length, default the model's), sorted by length and batched so little
        padding is computed; each batch is one call into the C core (all layers, GIL released).
        """
        texts = self._check_texts(texts)
        if pooling not in _POOLING:
            raise ValueError(f"pooling must be one of {', '.join(_POOLING)}, got {pooling!r}")
        if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        ml = self.max_length if max_length is None else self._check_max_length(max_length, self.config)
        encs = self._encode_tokens(texts, ml)
        order = np.argsort([-len(e.ids) for e in encs], kind="stable")
        out = np.empty((len(texts), self.config.hidden_size), np.float32)
        starts = range(0, len(texts), batch_size)
        if show_progress_bar is None:
            show_progress_bar = len(starts) >= 32
        if show_progress_bar:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc=f"encode [{self.scheme.name}]", unit="batch")
        for s in starts:
            idx = order[s: s + batch_size]
            ids, mask, tt = self._pad([encs[i].ids for i in idx], [encs[i].type_ids for i in idx])
            _, pooled, _ = self._core.forward(ids, mask, tt, pooling=_POOLING[pooling], normalize=bool(normalize),
                                              hidden=False)
            out[idx] = pooled
        return out

    def encode_to(self, texts: Iterable[str], out, chunk_size: int = 2048, **encode_kwargs) -> int:
        """Stream texts (any iterable, e.g. a generator) into ``out`` (an array-like of shape [n, hidden], such as a
        numpy memmap) chunk by chunk, so memory stays bounded by one chunk. Returns the number of texts encoded."""
        n = 0
        chunk: List[str] = []
        for t in texts:
            chunk.append(t)
            if len(chunk) == chunk_size:
                out[n: n + len(chunk)] = self.encode(chunk, **encode_kwargs)
                n += len(chunk)
                chunk = []
        if chunk:
            out[n: n + len(chunk)] = self.encode(chunk, **encode_kwargs)
            n += len(chunk)
        return n

    # ------------------------------------------------------------------------------------------ calibration
    def calibrate(self, texts: Sequence[str], method: str = "minmax", batch_size: int = 32,
                  max_length: Optional[int] = None, nbins: int = 2048, momentum: float = 0.9,
                  percentile: float = 99.99, show_progress_bar: Optional[bool] = None) -> Calibration:
        """Observe every linear layer's input over ``texts`` (C observers) and return the statistics."""
        return self._calibrate(self._core, texts, method, batch_size, max_length, nbins, momentum, percentile,
                               show_progress_bar)

    def _calibrate(self, core, texts, method, batch_size, max_length, nbins, momentum, percentile, show_progress_bar):
        texts = self._check_texts(texts)
        ml = self.max_length if max_length is None else self._check_max_length(max_length, self.config)
        sites = self.site_names
        observers = [_core.Observer(nbins, momentum) for _ in sites]
        encs = self._encode_tokens(texts, ml)
        order = np.argsort([-len(e.ids) for e in encs], kind="stable")
        starts = range(0, len(texts), batch_size)
        if show_progress_bar is None:
            show_progress_bar = len(starts) >= 8
        if show_progress_bar:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc="calibrate", unit="batch")
        for s in starts:
            idx = order[s: s + batch_size]
            ids, mask, tt = self._pad([encs[i].ids for i in idx], [encs[i].type_ids for i in idx])
            core.forward(ids, mask, tt, hidden=False, observers=observers)
        return Calibration(sites=sites, observers=observers, n_texts=len(texts), method=method, percentile=percentile)

    # ------------------------------------------------------------------------------------------ quantization
    def quantize(self, scheme, calibration_texts: Optional[Sequence[str]] = None,
                 calibration: Optional[Calibration] = None, batch_size: int = 32,
                 show_progress_bar: Optional[bool] = None) -> "Encoder":
        """A new Encoder quantized under ``scheme`` (a preset name, dict or QuantScheme); this one is untouched.

        Static int8 schemes need calibration: pass ``calibration_texts`` (a few hundred representative texts) or a
        ``calibration`` from :meth:`calibrate`. SmoothQuant needs ``calibration_texts`` (its ranges are measured
        after smoothing).
        """
        scheme = get_scheme(scheme)
        if self._fp32 is None:
            raise ValueError("quantize() starts from fp32 weights; this encoder was loaded quantized. Load the fp32 "
                             "checkpoint and quantize that.")
        cfg = self.config
        names = self.site_names
        kinds = {n: scheme.site_kind(n) for n in names}
        int8_sites = [n for n in names if kinds[n] == "int8"]
        if calibration_texts is not None:
            calibration_texts = self._check_texts(calibration_texts)
        need_calib = scheme.needs_calibration and bool(int8_sites)
        if need_calib and calibration is None and calibration_texts is None:
            raise ValueError(f"scheme {scheme.name!r} needs calibration: pass calibration_texts=[...] or "
                             "calibration=encoder.calibrate(texts)")
        if calibration is not None and not isinstance(calibration, Calibration):
            raise TypeError("calibration must be a medquant Calibration (from Encoder.calibrate)")
        if calibration is not None and calibration.sites != names:
            raise ValueError("calibration was gathered on a model with different sites")

        act_mul: Dict[str, np.ndarray] = {}
        if scheme.smoothquant_alpha is not None and int8_sites:
            if calibration_texts is None:
                raise ValueError("SmoothQuant needs calibration_texts: ranges are measured after smoothing")
            base = calibration or self.calibrate(calibration_texts, method=scheme.calibration,
                                                 batch_size=batch_size, momentum=scheme.momentum,
                                                 percentile=scheme.percentile, show_progress_bar=show_progress_bar)
            act_mul = self._smoothquant_factors(base, int8_sites, scheme.smoothquant_alpha)
            # ranges of the smoothed activations: calibrate an fp32 encoder that applies the smoothing
            smooth_storage, smooth_sites = self._float_storage(self._fp32, cfg, get_scheme("fp32"), act_mul)
            tmp = Encoder(config=cfg, tokenizer=self.tokenizer, storage=smooth_storage, sites=smooth_sites,
                          scheme=get_scheme("fp32"), max_length=self.max_length, model_dir=self.model_dir,
                          name=self.name, n_threads=self.n_threads)
            calibration = tmp.calibrate(calibration_texts, method=scheme.calibration, batch_size=batch_size,
                                        momentum=scheme.momentum, percentile=scheme.percentile,
                                        show_progress_bar=show_progress_bar)
            calibration.act_mul = act_mul
        elif need_calib and calibration is None:
            calibration = self.calibrate(calibration_texts, method=scheme.calibration, batch_size=batch_size,
                                         momentum=scheme.momentum, percentile=scheme.percentile,
                                         show_progress_bar=show_progress_bar)

        storage, sites = self._quantized_storage(scheme, kinds, act_mul, calibration)
        return Encoder(config=cfg, tokenizer=self.tokenizer, storage=storage, sites=sites, scheme=scheme,
                       max_length=self.max_length, model_dir=self.model_dir, name=self.name, fp32=self._fp32,
                       reference=self, n_threads=self.n_threads)

    def _smoothquant_factors(self, calib: Calibration, sites, alpha: float) -> Dict[str, np.ndarray]:
        """SmoothQuant: s_j = max|X_j|^alpha / max|W_j|^(1-alpha); activations are multiplied by 1/s, weights by s."""
        fp32_sites = _fp32_sites(self._fp32, self.config)
        out = {}
        for n in sites:
            ax = calib.column_absmax(n).astype(np.float64)
            wx = np.abs(fp32_sites[n][0]).max(axis=0).astype(np.float64)
            s = np.power(np.maximum(ax, 1e-5), alpha) / np.power(np.maximum(wx, 1e-5), 1.0 - alpha)
            s = np.clip(s, 1e-4, 1e4)
            out[n] = (1.0 / s).astype(np.float32)
        return out

    def _quantized_storage(self, scheme: QuantScheme, kinds, act_mul, calibration):
        cfg = self.config
        params = self._fp32
        storage, _ = self._float_storage(params, cfg, get_scheme("fp32"))
        if scheme.embeddings == "int8":
            q, s = _core.quantize_rows_s8(params["embeddings.word_embeddings.weight"])
            storage["embeddings.word_embeddings.weight"] = q
            storage["embeddings.word_embeddings.weight_scale"] = s
        per_channel = scheme.weight_granularity == "per-channel"
        sites = {}
        for name, (w, b) in _fp32_sites(params, cfg).items():
            kind = kinds[name]
            spec: Dict = {"kind": kind}
            storage[name + ".bias"] = b
            if kind in ("fp32", "bf16"):
                storage[name + ".weight"] = w
            elif kind in ("int8", "w8"):
                mul = act_mul.get(name)
                if mul is not None:
                    w = np.ascontiguousarray(w / mul[None, :], dtype=np.float32)
                    storage[name + ".act_mul"] = mul
                q, s = _core.quantize_weight_s8(w, per_channel)
                storage[name + ".weight"] = q
                storage[name + ".weight_scale"] = s
                spec["w_per_channel"] = per_channel
                if kind == "int8":
                    spec["act_mode"] = scheme.mode
                    spec["act_symmetric"] = bool(scheme.act_symmetric)
                    if scheme.mode == "static":
                        lo, hi = calibration.range(name, scheme.calibration, scheme.act_symmetric, scheme.percentile)
                        scale, zp = qparams(lo, hi, scheme.act_symmetric)
                        spec["act_scale"] = float(scale)
                        spec["act_zero_point"] = int(zp)
                        spec["act_range"] = [lo, hi]
            elif kind == "w4":
                q, s = _core.quantize_weight_s4(w, int(scheme.group_size))
                storage[name + ".weight"] = q
                storage[name + ".weight_scale"] = s
                spec["group_size"] = int(scheme.group_size)
            sites[name] = spec
        return storage, sites

    # ------------------------------------------------------------------------------------------ reports
    def quant_report(self, texts: Sequence[str], reference: Optional["Encoder"] = None, batch_size: int = 16,
                     max_length: Optional[int] = None) -> pd.DataFrame:
        """Per-site error of this encoder against an fp32 reference on ``texts``.

        For every linear layer output (after its fused epilogue: GELU, or the residual add): SQNR in dB
        (10 log10 ||ref||^2 / ||ref - q||^2) and relative error ||ref - q|| / ||ref||, accumulated over all real
        tokens; plus a final row with the mean and minimum cosine of the pooled, normalized embeddings.
        Where a static int8 layer's input is quantized by its producer (intermediate.dense writes output.dense's
        u8 input), that producer's output is reported as the consumer sees it: dequantized from u8.
        """
        ref = reference or self.reference
        if ref is None:
            raise ValueError("quant_report needs an fp32 reference: pass reference=Encoder.from_pretrained(...)")
        if ref.config != self.config:
            raise ValueError("reference has a different architecture")
        texts = self._check_texts(texts)
        ml = self.max_length if max_length is None else self._check_max_length(max_length, self.config)
        encs = self._encode_tokens(texts, ml)
        names = self.site_names
        sig = np.zeros(len(names))
        err = np.zeros(len(names))
        cos = []
        for s in range(0, len(texts), batch_size):
            chunk = encs[s: s + batch_size]
            ids, mask, tt = self._pad([e.ids for e in chunk], [e.type_ids for e in chunk])
            _, pr, tr = ref._core.forward(ids, mask, tt, pooling=_core.POOL_MEAN, normalize=True, hidden=False, taps=True)
            _, pq, tq = self._core.forward(ids, mask, tt, pooling=_core.POOL_MEAN, normalize=True, hidden=False, taps=True)
            for i, (a, b) in enumerate(zip(tr, tq)):
                a64 = a.astype(np.float64)
                sig[i] += np.sum(a64 * a64)
                d = a64 - b
                err[i] += np.sum(d * d)
            cos.append(np.sum(pr * pq, axis=1))
        cos = np.concatenate(cos)
        kinds = self.site_kinds()
        rows = []
        for i, n in enumerate(names):
            rows.append({
                "site": n, "layer": int(n.split(".")[2]), "module": n.split(".", 3)[3], "kind": kinds[n],
                "sqnr_db": float(10 * np.log10(sig[i] / err[i])) if err[i] > 0 else float("inf"),
                "rel_error": float(np.sqrt(err[i] / sig[i])) if sig[i] > 0 else float("nan"),
            })
        rows.append({"site": "embedding", "layer": self.config.num_hidden_layers, "module": "pooled", "kind": "",
                     "sqnr_db": float("nan"), "rel_error": float(1 - cos.mean()),
                     "cosine_mean": float(cos.mean()), "cosine_min": float(cos.min())})
        return pd.DataFrame(rows)

    # ------------------------------------------------------------------------------------------ saving
    def save_pretrained(self, directory: Union[str, os.PathLike]) -> Path:
        """Write the encoder as a model directory that :meth:`from_pretrained` (and, for fp32, Hugging Face) loads.

        fp32: a standard Hugging Face BERT checkpoint. Quantized: model.safetensors with int8/int4 weights, scales,
        zero points and the scheme as metadata (loading needs no calibration data). Tokenizer files are copied.
        """
        from safetensors.numpy import save_file

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        if self.scheme.name == "fp32" and self._fp32 is not None and all(
                v["kind"] == "fp32" for v in self._sites.values()):
            save_file(dict(self._fp32), str(out / "model.safetensors"), metadata={"format": "pt"})
        else:
            meta = {"format": FORMAT, "scheme": self.scheme.to_json(), "sites": json.dumps(self._sites, sort_keys=True)}
            save_file({k: np.ascontiguousarray(v) for k, v in self._storage.items()}, str(out / "model.safetensors"),
                      metadata=meta)
        with open(out / "config.json", "w", encoding="utf-8") as f:
            json.dump(self.config.to_hf(), f, indent=2)
        if self.model_dir is not None:
            for fn in _TOKENIZER_FILES:
                src = Path(self.model_dir) / fn
                if src.exists() and src.resolve() != (out / fn).resolve():
                    shutil.copyfile(src, out / fn)
        if not (out / "tokenizer.json").exists() and not (out / "vocab.txt").exists():
            self.tokenizer.save(str(out / "tokenizer.json"))
        return out

    @staticmethod
    def _read_quantized(meta, state, cfg: BertConfig):
        try:
            scheme = QuantScheme.from_dict(json.loads(meta["scheme"]))
            sites = json.loads(meta["sites"])
        except (KeyError, ValueError, TypeError) as e:
            raise CheckpointError(f"quantized checkpoint metadata is corrupt: {e}") from None
        expected = [site_name(i, s) for i in range(cfg.num_hidden_layers) for s in range(len(SITE_SUFFIXES))]
        if not isinstance(sites, dict) or sorted(sites) != sorted(expected):
            raise CheckpointError("quantized checkpoint sites do not match config.json")
        for n, spec in sites.items():
            if not isinstance(spec, dict) or spec.get("kind") not in KIND_CODES:
                raise CheckpointError(f"quantized checkpoint: bad site spec for {n}: {spec!r}")
            if spec["kind"] == "int8" and spec.get("act_mode") not in MODE_CODES:
                raise CheckpointError(f"quantized checkpoint: bad activation mode for {n}")
        storage = {k: np.ascontiguousarray(v) for k, v in state.items()}
        for k, v in storage.items():
            if v.dtype.kind == "f" and v.dtype != np.float32:
                storage[k] = v.astype(np.float32)
            if storage[k].dtype == np.float32 and not np.isfinite(storage[k]).all():
                raise CheckpointError(f"tensor {k} contains NaN or Inf")
        return scheme, {n: sites[n] for n in expected}, storage
