"""medquant.Encoder: a BERT encoder run by the C core: load, tokenize, encode, calibrate; quantizing, the per-site
error report and saving are delegated to :mod:`medquant.quant.quantize`, :mod:`medquant.quant.report` and
:mod:`medquant.model.storage`."""
from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd

from .._native import _core
from ..quant import quantize as _quantize
from ..quant import report as _report
from ..quant.calibration import Calibration
from ..quant.schemes import QuantScheme, get_scheme
from . import limits, storage as _storage
from .architectures import WORD_EMBEDDING_SCALES, BertConfig, parse_site
from .checkpoint import (
    DEFAULT_MODEL, default_max_length, fp32_params, load_config, load_state_dict, load_tokenizer, resolve_model_path,
)

_POOLING = {"mean": _core.POOL_MEAN, "cls": _core.POOL_CLS}
Batch = Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


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
        self._core = _storage.build_core(config, storage, sites,
                                         n_threads if n_threads is not None else limits.default_threads())

    # ------------------------------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, name_or_path: Union[str, os.PathLike] = DEFAULT_MODEL, *, max_length: Optional[int] = None,
                        n_threads: Optional[int] = None, allow_pickle: bool = False) -> "Encoder":
        """Load a Hugging Face BERT directory, a medquant quantized directory, or a packaged model by name."""
        model_dir = resolve_model_path(name_or_path)
        cfg = load_config(model_dir)
        tokenizer = load_tokenizer(model_dir)
        ml = (default_max_length(model_dir, cfg) if max_length is None
              else limits.max_length(max_length, cfg.max_position_embeddings))
        state, meta = load_state_dict(model_dir, allow_pickle=allow_pickle)
        if _storage.is_quantized(meta):
            params = None
            scheme, sites, tensors = _storage.read_quantized(meta, state, cfg)
        else:
            params = fp32_params(state, cfg)
            scheme = get_scheme("fp32")
            tensors, sites = _storage.float_storage(params, cfg, scheme)
        return cls(config=cfg, tokenizer=tokenizer, storage=tensors, sites=sites, scheme=scheme, max_length=ml,
                   model_dir=model_dir, name=str(name_or_path), fp32=params, n_threads=n_threads)

    def with_storage(self, storage: Dict[str, np.ndarray], sites: Dict[str, Dict], scheme: QuantScheme, *,
                     fp32: Optional[Dict[str, np.ndarray]] = None, reference: Optional["Encoder"] = None) -> "Encoder":
        """A new encoder of the same model (config, tokenizer, max_length, threads) holding other tensors."""
        return Encoder(config=self.config, tokenizer=self.tokenizer, storage=storage, sites=sites, scheme=scheme,
                       max_length=self.max_length, model_dir=self.model_dir, name=self.name, fp32=fp32,
                       reference=reference, n_threads=self.n_threads)

    # ------------------------------------------------------------------------------------------ properties
    @property
    def fp32_params(self) -> Optional[Dict[str, np.ndarray]]:
        """The fp32 checkpoint parameters this encoder was made from (None if it was loaded quantized)."""
        return self._fp32

    @property
    def is_fp32(self) -> bool:
        """Every site and the embedding table in fp32."""
        return (self.scheme.embeddings == "fp32" and all(k == "fp32" for k in self.site_kinds().values())
                and WORD_EMBEDDING_SCALES not in self._storage)

    @property
    def n_threads(self) -> int:
        return self._core.threads()

    def set_threads(self, n_threads: int) -> None:
        """Threads used by oneDNN for this encoder's forward passes."""
        self._core.set_threads(limits.positive_int(n_threads, "n_threads"))

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
        return self._core.site_impl(*parse_site(site))

    def size_bytes(self) -> int:
        """Bytes the encoder's parameters take in memory (prepacked weights, scales, embeddings)."""
        return int(self._core.nbytes())

    def __repr__(self) -> str:
        return (f"Encoder({self.name!r}, scheme={self.scheme.name!r}, layers={self.config.num_hidden_layers}, "
                f"hidden={self.config.hidden_size}, max_length={self.max_length}, threads={self.n_threads})")

    # ------------------------------------------------------------------------------------------ running
    def tokenize(self, texts: Sequence[str], max_length: Optional[int] = None):
        """Token ids, attention mask and token type ids (int32, right-padded) for a list of texts."""
        texts = limits.texts(texts)
        encs = self._encode_tokens(texts, self._max_length(max_length))
        return self._pad([e.ids for e in encs], [e.type_ids for e in encs])

    def _max_length(self, max_length: Optional[int]) -> int:
        return self.max_length if max_length is None else limits.max_length(max_length,
                                                                            self.config.max_position_embeddings)

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

    def batches(self, texts: Sequence[str], batch_size: int = 32, max_length: Optional[int] = None, *,
                by_length: bool = True, show_progress_bar: Optional[bool] = False, auto_progress: int = 32,
                desc: str = "") -> Iterator[Batch]:
        """(positions in ``texts``, input ids, attention mask, token type ids) per batch of tokenized texts.

        by_length: batch the texts longest first, so little padding is computed (else in input order).
        show_progress_bar: a tqdm bar; None: one when there are at least ``auto_progress`` batches.
        """
        texts = limits.texts(texts)
        batch_size = limits.positive_int(batch_size, "batch_size")
        encs = self._encode_tokens(texts, self._max_length(max_length))
        order = np.argsort([-len(e.ids) for e in encs], kind="stable") if by_length else np.arange(len(encs))
        starts = range(0, len(texts), batch_size)
        if show_progress_bar is None:
            show_progress_bar = len(starts) >= auto_progress
        if show_progress_bar:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc=desc, unit="batch")
        for s in starts:
            idx = order[s: s + batch_size]
            yield (idx, *self._pad([encs[i].ids for i in idx], [encs[i].type_ids for i in idx]))

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
        texts = limits.texts(texts)
        if pooling not in _POOLING:
            raise ValueError(f"pooling must be one of {', '.join(_POOLING)}, got {pooling!r}")
        out = np.empty((len(texts), self.config.hidden_size), np.float32)
        for idx, ids, mask, tt in self.batches(texts, batch_size, max_length, show_progress_bar=show_progress_bar,
                                               desc=f"encode [{self.scheme.name}]"):
            _, pooled, _ = self._core.forward(ids, mask, tt, pooling=_POOLING[pooling], normalize=bool(normalize),
                                              hidden=False)
            out[idx] = pooled
        return out

    def forward_taps(self, ids: np.ndarray, mask: np.ndarray, token_type_ids: np.ndarray):
        """(mean-pooled normalized embeddings, per-site output taps) of one padded batch (see quant_report)."""
        _, pooled, taps = self._core.forward(ids, mask, token_type_ids, pooling=_core.POOL_MEAN, normalize=True,
                                             hidden=False, taps=True)
        return pooled, taps

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
        texts = limits.texts(texts)
        sites = self.site_names
        observers = [_core.Observer(nbins, momentum) for _ in sites]
        for _, ids, mask, tt in self.batches(texts, batch_size, max_length, show_progress_bar=show_progress_bar,
                                             auto_progress=8, desc="calibrate"):
            self._core.forward(ids, mask, tt, hidden=False, observers=observers)
        return Calibration(sites=sites, observers=observers, n_texts=len(texts), method=method, percentile=percentile)

    # ------------------------------------------------------------------------------------------ delegated
    def quantize(self, scheme, calibration_texts: Optional[Sequence[str]] = None,
                 calibration: Optional[Calibration] = None, batch_size: int = 32,
                 show_progress_bar: Optional[bool] = None) -> "Encoder":
        """A new Encoder quantized under ``scheme`` (see :func:`medquant.quant.quantize.quantize`)."""
        return _quantize.quantize(self, scheme, calibration_texts=calibration_texts, calibration=calibration,
                                  batch_size=batch_size, show_progress_bar=show_progress_bar)

    def quant_report(self, texts: Sequence[str], reference: Optional["Encoder"] = None, batch_size: int = 16,
                     max_length: Optional[int] = None) -> pd.DataFrame:
        """Per-site error against an fp32 reference (see :func:`medquant.quant.report.quant_report`)."""
        return _report.quant_report(self, texts, reference=reference, batch_size=batch_size, max_length=max_length)

    def save_pretrained(self, directory: Union[str, os.PathLike], *, overwrite: bool = False) -> Path:
        """Write the encoder as a model directory that :meth:`from_pretrained` (and, for fp32, Hugging Face) loads.

        fp32: a standard Hugging Face BERT checkpoint. Quantized: model.safetensors with int8/int4 weights, scales,
        zero points and the scheme as metadata (loading needs no calibration data). Tokenizer files are copied, and
        a ``medquant.json`` marker lists the files. The directory is written next to ``directory`` and renamed into
        place: afterwards it holds exactly this save, and a failure leaves it as it was. ``directory`` may be new,
        empty, or a previous medquant save; another non-empty directory is refused (FileExistsError) unless
        ``overwrite=True`` (which replaces it with everything in it). The directory this encoder was loaded from
        is never written (ValueError).
        """
        return _storage.write(Path(directory), config=self.config, tokenizer=self.tokenizer, scheme=self.scheme,
                              storage=self._storage, sites=self._sites, fp32=self._fp32, model_dir=self.model_dir,
                              overwrite=overwrite)
