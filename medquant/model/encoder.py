"""medquant.Encoder: a BERT encoder run by the C core: load, tokenize, encode, calibrate; quantizing, the per-site
error report and saving are delegated to :mod:`medquant.quant.quantize`, :mod:`medquant.quant.report` and
:mod:`medquant.model.storage`."""
from __future__ import annotations

import copy
import os
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
from .architectures import WORD_EMBEDDING_SCALES, WORD_EMBEDDINGS, BertConfig, parse_site
from .sentence import SentenceConfig, check_pooling, read_sentence_config
from .tokenization import TruncatingTokenizers
from .checkpoint import (
    DEFAULT_MODEL, default_max_length, fp32_params, load_config, load_state_dict, load_tokenizer, resolve_model_path,
)

#: sentence-transformers' ``precision`` values of :meth:`Encoder.encode`
PRECISIONS = ("float32", "int8", "uint8", "binary", "ubinary")
Batch = Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


class Encoder:
    """A BERT encoder whose forward pass runs in the medquant C core (oneDNN), in fp32 or quantized.

    Create with :meth:`from_pretrained`; derive quantized encoders with :meth:`quantize` (the original is untouched).
    """

    def __init__(self, *, config: BertConfig, tokenizer, storage: Dict[str, np.ndarray], sites: Dict[str, Dict],
                 scheme: QuantScheme, max_length: int, model_dir: Optional[Path], name: str,
                 fp32: Optional[Dict[str, np.ndarray]] = None, reference: Optional["Encoder"] = None,
                 n_threads: Optional[int] = None, memory_limit=None, keep_bytes=None,
                 tokenizers: Optional[TruncatingTokenizers] = None, sentence: Optional[SentenceConfig] = None):
        self.config = config
        self.sentence_config = sentence if sentence is not None else SentenceConfig()
        self.tokenizer = tokenizer
        self._tokenizers = tokenizers if tokenizers is not None else TruncatingTokenizers(tokenizer)
        self.max_length = int(max_length)
        self.scheme = scheme
        self.name = name
        self.model_dir = model_dir
        self._storage = storage
        self._sites = sites
        self._fp32 = fp32
        self.reference = reference
        self._core = _storage.build_core(config, storage, sites, limits.threads(n_threads), scheme.attention)
        self.set_memory_limit(memory_limit, keep_bytes)

    # ------------------------------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, name_or_path: Union[str, os.PathLike] = DEFAULT_MODEL, *, max_length: Optional[int] = None,
                        n_threads: Optional[int] = None, allow_pickle: bool = False, memory_limit=None,
                        keep_bytes=None) -> "Encoder":
        """Load a Hugging Face BERT directory, a medquant quantized directory, a packaged model by name, or a model
        name found in the local Hugging Face cache (never downloaded).

        A sentence-transformers directory's pooling, normalisation, prompts and similarity are read into
        :attr:`sentence_config` and used by :meth:`encode` (see :mod:`medquant.model.sentence`).

        n_threads: oneDNN threads (default ``$MEDQUANT_NUM_THREADS`` or every CPU this process may use).
        memory_limit, keep_bytes: see :meth:`set_memory_limit`.
        """
        n_threads = limits.threads(n_threads)
        memory_limit = limits.memory_limit(memory_limit)
        model_dir = resolve_model_path(name_or_path)
        cfg = load_config(model_dir)
        tokenizer = load_tokenizer(model_dir)
        sentence = read_sentence_config(model_dir)
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
                   model_dir=model_dir, name=str(name_or_path), fp32=params, n_threads=n_threads,
                   memory_limit=memory_limit, keep_bytes=keep_bytes, sentence=sentence)

    def with_storage(self, storage: Dict[str, np.ndarray], sites: Dict[str, Dict], scheme: QuantScheme, *,
                     fp32: Optional[Dict[str, np.ndarray]] = None, reference: Optional["Encoder"] = None) -> "Encoder":
        """A new encoder of the same model (config, tokenizer, max_length, threads, memory limits) holding other
        tensors."""
        return Encoder(config=self.config, tokenizer=self.tokenizer, storage=storage, sites=sites, scheme=scheme,
                       max_length=self.max_length, model_dir=self.model_dir, name=self.name, fp32=fp32,
                       reference=reference, n_threads=self.n_threads, memory_limit=self.memory_limit,
                       keep_bytes=self._keep_bytes, tokenizers=self._tokenizers, sentence=self.sentence_config)

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
        """Threads used by oneDNN for this encoder's forward passes (capped, with a warning, to the CPUs this
        process may run on)."""
        self._core.set_threads(limits.threads(n_threads))

    @property
    def memory_limit(self) -> int:
        """Bytes one call into the C core may allocate (workspace and outputs); see :meth:`set_memory_limit`."""
        return self._memory_limit

    def set_memory_limit(self, max_bytes=None, keep_bytes=None) -> None:
        """Bound what one call into the C core may allocate, and what its workspace keeps between calls.

        max_bytes: an int or a string such as ``"2GiB"``; default ``$MEDQUANT_MEMORY_LIMIT``, else a quarter of
        the RAM, at most 2 GiB. The bytes of a call follow from its shape and the config; they are computed before
        anything is allocated. :meth:`encode`, :meth:`calibrate` and the other batched methods split a batch that
        would not fit; :meth:`forward` raises ``MemoryError``. ``MemoryError`` also when one sequence of
        ``max_length`` tokens does not fit (a config whose sizes multiply out of bounds).
        keep_bytes: after a call, a workspace larger than this is released (default 512 MiB, at most max_bytes),
        so one outsized call does not keep its memory until the encoder is deleted.
        """
        limit = limits.memory_limit(max_bytes)
        keep = limits.keep_bytes(keep_bytes, limit)
        one = self._core.call_bytes(1, self.max_length, self.max_length)
        if one > limit:
            raise MemoryError(
                f"{self.name}: one sequence of max_length={self.max_length} tokens needs {one / 2**20:.1f} MiB "
                f"(hidden {self.config.hidden_size}, intermediate {self.config.intermediate_size}, "
                f"{self.config.num_attention_heads} heads), above the memory limit of {limit / 2**20:.1f} MiB; "
                "raise it with memory_limit= / $MEDQUANT_MEMORY_LIMIT or lower max_length")
        self._core.set_memory_limits(limit, keep)
        self._memory_limit, self._keep_bytes = limit, keep

    def workspace_bytes(self) -> int:
        """Bytes the C core's workspace holds between calls (released after a call above ``keep_bytes``)."""
        return int(self._core.workspace_bytes())

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def site_names(self) -> List[str]:
        return list(self._sites)

    def site_kinds(self) -> Dict[str, str]:
        return {k: v["kind"] for k, v in self._sites.items()}

    def site_specs(self) -> Dict[str, Dict]:
        """Per site its spec as the core was given it: ``kind`` and the kind's weight and activation parameters
        (a copy)."""
        return copy.deepcopy(self._sites)

    def storage_tensors(self, site: Optional[str] = None) -> Dict[str, np.ndarray]:
        """The stored tensors by storage name: all of them (``site=None``), one site's (``<site>.weight``,
        ``.bias`` and, where its kind and scheme have them, ``.weight_scale`` / ``.act_mul``), or with
        ``site="embeddings"`` the word-embedding table (and its int8 row scales). A new dict holding the arrays
        themselves, not copies: treat them as read-only (see :meth:`with_storage` to build from them)."""
        if site is None:
            return dict(self._storage)
        if site == "embeddings":
            keys = [WORD_EMBEDDINGS, WORD_EMBEDDING_SCALES]
        elif site in self._sites:
            keys = [f"{site}.{suffix}" for suffix in _storage.SITE_TENSOR_SUFFIXES]
        else:
            raise KeyError(f"no site {site!r} (sites are named like {self.site_names[0]!r}; or 'embeddings')")
        return {k: self._storage[k] for k in keys if k in self._storage}

    def site_impl(self, site: str) -> str:
        """The oneDNN implementation that ran a site's matmul (e.g. 'brg:avx512_core_vnni'), '' before it ran."""
        return self._core.site_impl(*parse_site(site))

    def attention_info(self) -> Dict[str, object]:
        """The precision attention computes in (the scheme's ``attention``; bf16 multiplies bf16-rounded Q, K, V and
        probabilities with f32 accumulation) and the kernel that runs it: medquant's fused attention,
        ``'medquant:attention_avx512'``, ``'medquant:attention_avx2'`` or ``'medquant:attention_c'`` (by the ISA
        oneDNN reports, so ``ONEDNN_MAX_CPU_ISA`` caps it), and for bf16 on CPUs with avx512_bf16
        ``'medquant:attention_avx512_bf16dot'`` (vdpbf16ps); for int8 ``'medquant:attention_int8_vnni'`` (vpdpbusd,
        CPUs with avx512_vnni), ``'medquant:attention_int8_avx2'`` (exact integer products on f32 FMAs; slower than
        fp32 attention) or ``'medquant:attention_int8_c'``. For a precision, all give the same bits."""
        precision, kernel = self._core.attention_info()
        names = {v: k for k, v in _storage.ATTENTION_PRECISION.items()}
        return {"precision": names[precision], "kernel": kernel}

    def stage_seconds(self, reset: bool = False) -> Dict[str, float]:
        """Where the forwards' time went, in wall seconds summed over the forwards since the encoder was made (or the
        last ``reset=True``): ``forward`` (each whole call into the core), the core's own stages inside it -
        ``embeddings``, ``layernorm`` (with its fused u8 output), ``attention`` (the fused kernel), ``pooling`` - and
        ``linear`` = forward minus those stages: the linear layers with their activation quantization (plus the site
        hooks of a calibration pass). Tokenization and Python are outside ``forward``."""
        s = self._core.stage_seconds(reset=reset)
        s["linear"] = max(0.0, s["forward"] - sum(v for k, v in s.items() if k != "forward"))
        return s

    def size_bytes(self) -> int:
        """Bytes the encoder's parameters take in memory (prepacked weights, scales, embeddings)."""
        return int(self._core.nbytes())

    def __repr__(self) -> str:
        return (f"Encoder({self.name!r}, scheme={self.scheme.name!r}, layers={self.config.num_hidden_layers}, "
                f"hidden={self.config.hidden_size}, max_length={self.max_length}, threads={self.n_threads}, "
                f"pooling={self.sentence_config.pooling!r})")

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
        return self._tokenizers.encode_batch(texts, max_length)

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
                desc: str = "", hook: bool = False, taps: bool = False) -> Iterator[Batch]:
        """(positions in ``texts``, input ids, attention mask, token type ids) per batch of tokenized texts.

        by_length: batch the texts longest first, so little padding is computed (else in input order).
        A batch whose call would exceed :attr:`memory_limit` is split (fp32, bf16 and static int8 embeddings do
        not depend on the batching; dynamic int8 takes its activation ranges per call).
        hook, taps: the batches will run with observers / with per-site output copies (which need more memory).
        show_progress_bar: a tqdm bar; None: one when there are at least ``auto_progress`` batches.
        """
        texts = limits.texts(texts)  # checked and tokenized now, not at the first next()
        batch_size = limits.batch_size(batch_size)
        auto_progress = limits.positive_int(auto_progress, "auto_progress")
        encs = self._encode_tokens(texts, self._max_length(max_length))
        lengths = np.array([len(e.ids) for e in encs], np.int64)
        order = np.argsort(-lengths, kind="stable") if by_length else np.arange(len(encs))
        starts = range(0, len(texts), batch_size)
        if show_progress_bar is None:
            show_progress_bar = len(starts) >= auto_progress
        if show_progress_bar:
            from .._progress import tqdm

            starts = tqdm(starts, desc=desc, unit="batch")

        def padded() -> Iterator[Batch]:
            for s in starts:
                for idx in self._fit_memory(order[s: s + batch_size], lengths, hook=hook or taps, taps=taps):
                    yield (idx, *self._pad([encs[i].ids for i in idx], [encs[i].type_ids for i in idx]))

        return padded()

    def _fit_memory(self, idx: np.ndarray, lengths: np.ndarray, hook: bool, taps: bool) -> Iterator[np.ndarray]:
        """``idx`` as one batch, or split in halves until each part fits the memory limit."""
        lens = lengths[idx]
        need = self._core.call_bytes(len(idx), int(lens.max()), int(lens.sum()), hook=hook, taps=taps)
        if need <= self._memory_limit:
            yield idx
        elif len(idx) == 1:  # set_memory_limit made sure one max_length sequence fits: only a hook can get here
            raise MemoryError(f"one sequence of {int(lens[0])} tokens does not fit the memory limit of "
                              f"{self._memory_limit / 2**20:.1f} MiB with per-site observers or copies")
        else:
            half = len(idx) // 2
            yield from self._fit_memory(idx[:half], lengths, hook, taps)
            yield from self._fit_memory(idx[half:], lengths, hook, taps)

    @staticmethod
    def _as_int32(a, name: str, shape=None) -> np.ndarray:
        """``a`` as a C-contiguous, aligned, native-endian int32 array for the core: a converted copy whenever ``a``
        is not already exactly that (misaligned views into a buffer, strided or Fortran-ordered arrays, big-endian
        '>i4', other integer dtypes); the caller's array is never modified."""
        try:
            arr = np.asarray(a)
        except (TypeError, ValueError) as e:  # ragged nested lists, objects numpy cannot hold
            raise TypeError(f"{name} must be a 2-D array of token ids [batch, seq] (e.g. from Encoder.tokenize), "
                            f"got {type(a).__name__} numpy cannot convert: {e}") from None
        if arr.dtype.kind not in "iub":
            raise TypeError(f"{name} must hold integers, got dtype {arr.dtype}")
        if arr.ndim != 2:
            raise ValueError(f"{name} must be 2-D [batch, seq], got shape {arr.shape}")
        if shape is not None and arr.shape != shape:
            raise ValueError(f"{name} has shape {arr.shape}, expected {shape} (like input_ids)")
        if arr.size and (arr.min() < np.iinfo(np.int32).min or arr.max() > np.iinfo(np.int32).max):
            raise ValueError(f"{name} has values outside the int32 range")
        # np.require copies unless the array is already int32, C-contiguous and aligned ('CA');
        # np.ascontiguousarray alone would hand back a misaligned array unchanged
        return np.require(arr, dtype=np.int32, requirements="CA")  # np.int32: native byte order

    def forward(self, input_ids, attention_mask=None, token_type_ids=None) -> np.ndarray:
        """Last hidden state [batch, seq, hidden] (float32) for right-padded inputs; padding positions are zero."""
        ids = self._as_int32(input_ids, "input_ids")
        if ids.shape[0] == 0 or ids.shape[1] == 0:
            raise ValueError(f"input_ids is empty (shape {ids.shape})")
        mask = np.ones_like(ids) if attention_mask is None else self._as_int32(attention_mask, "attention_mask", ids.shape)
        tt = None if token_type_ids is None else self._as_int32(token_type_ids, "token_type_ids", ids.shape)
        hidden, _, _ = self._core.forward(ids, mask, tt, hidden=True)
        return hidden

    def encode(self, texts: Union[str, Iterable[str]], batch_size: int = 32, max_length: Optional[int] = None,
               pooling: Optional[str] = None, normalize: Optional[bool] = None,
               show_progress_bar: Optional[bool] = None, *, prompt_name: Optional[str] = None,
               prompt: Optional[str] = None, normalize_embeddings: Optional[bool] = None,
               precision: str = "float32", output_value: str = "sentence_embedding", convert_to_numpy: bool = True,
               convert_to_tensor: bool = False, device: Optional[str] = None):
        """Sentence embeddings [len(texts), hidden] (float32) in input order; a single string gives one vector.

        Pooling, normalisation, prompts and lower-casing follow the model's own configuration
        (:attr:`sentence_config`, read from its sentence-transformers files); ``pooling`` (one of
        :data:`medquant.model.sentence.POOLING_MODES`) and ``normalize`` override it. sentence-transformers'
        names work as well: ``normalize_embeddings`` (= normalize), ``prompt_name`` / ``prompt`` (prepended to every
        text; default the model's default prompt), ``precision`` ("float32", or "int8" / "uint8" / "binary" /
        "ubinary" quantized embeddings, see :func:`medquant.eval.retrieval.quantize_embeddings`),
        ``output_value="token_embeddings"`` (a list of [tokens, hidden] arrays), ``convert_to_numpy=False`` (a
        list of vectors), ``convert_to_tensor=True`` (a torch tensor; needs torch), ``device`` (only "cpu").

        Texts are tokenized (truncated to max_length, default the model's), sorted by length and batched so little
        padding is computed; each batch is one call into the C core (all layers, GIL released).
        """
        single = isinstance(texts, str)
        texts = limits.texts([texts] if single else texts)
        batch_size = limits.batch_size(batch_size)
        cfg = self.sentence_config.override(None if pooling is None else check_pooling(pooling),
                                            _one_flag(normalize, normalize_embeddings))
        _check_st_options(precision, output_value, device)
        inputs = cfg.inputs(texts, cfg.prompt_text(prompt_name, prompt))
        self._max_length(max_length)
        if output_value == "token_embeddings":
            out = self._token_embeddings(inputs, batch_size, max_length, show_progress_bar)
            return out[0] if single else out
        out = np.empty((len(inputs), self.config.hidden_size), np.float32)
        for idx, ids, mask, tt in self.batches(inputs, batch_size, max_length, show_progress_bar=show_progress_bar,
                                               desc=f"encode [{self.scheme.name}]"):
            _, pooled, _ = self._core.forward(ids, mask, tt, pooling=cfg.pooling_code, normalize=cfg.normalize,
                                              hidden=False)
            out[idx] = pooled
        if precision != "float32":
            from ..eval.retrieval import quantize_embeddings

            out = quantize_embeddings(out, precision)
        return _convert(out, single, convert_to_numpy, convert_to_tensor)

    def _token_embeddings(self, texts: List[str], batch_size: int, max_length: Optional[int],
                          show_progress_bar: Optional[bool]) -> List[np.ndarray]:
        """Per text its last hidden state without padding, [tokens, hidden]."""
        out: List[Optional[np.ndarray]] = [None] * len(texts)
        for idx, ids, mask, tt in self.batches(texts, batch_size, max_length, show_progress_bar=show_progress_bar,
                                               desc=f"encode [{self.scheme.name}]"):
            hidden, _, _ = self._core.forward(ids, mask, tt, hidden=True)
            for row, i in enumerate(idx):
                out[i] = hidden[row, : int(mask[row].sum())].copy()
        return out

    def encode_query(self, texts: Union[str, Iterable[str]], **kwargs):
        """:meth:`encode` with the model's query prompt (sentence-transformers' ``encode_query``)."""
        kwargs.setdefault("prompt_name", None if "prompt" in kwargs else self.sentence_config.query_prompt_name())
        return self.encode(texts, **kwargs)

    def encode_document(self, texts: Union[str, Iterable[str]], **kwargs):
        """:meth:`encode` with the model's document prompt (document, passage or corpus; sentence-transformers'
        ``encode_document``)."""
        kwargs.setdefault("prompt_name", None if "prompt" in kwargs else self.sentence_config.document_prompt_name())
        return self.encode(texts, **kwargs)

    def encode_queries(self, queries: Sequence[str], batch_size: int = 32, **kwargs) -> np.ndarray:
        """The BEIR / MTEB model protocol: query embeddings (query prompt). Keywords :meth:`encode` does not take
        (e.g. an evaluator's ``convert_to_tensor`` or task names) are ignored."""
        return self.encode_query(list(queries), batch_size=batch_size, **_encode_kwargs(kwargs))

    def encode_corpus(self, corpus, batch_size: int = 32, sep: str = " ", **kwargs) -> np.ndarray:
        """The BEIR / MTEB model protocol: document embeddings (document prompt) of a corpus given as a list of
        ``{"title": ..., "text": ...}`` dicts, a dict of lists with those keys, or a list of strings; title and
        text are joined with ``sep`` (as BEIR's sentence-transformers wrapper does)."""
        return self.encode_document(corpus_texts(corpus, sep), batch_size=batch_size, **_encode_kwargs(kwargs))

    def forward_taps(self, ids: np.ndarray, mask: np.ndarray, token_type_ids: np.ndarray):
        """(pooled normalized embeddings, per-site output taps) of one padded batch (see quant_report)."""
        _, pooled, taps = self._core.forward(ids, mask, token_type_ids, pooling=self.sentence_config.pooling_code,
                                             normalize=True,
                                             hidden=False, taps=True)
        return pooled, taps

    def encode_to(self, texts: Iterable[str], out, chunk_size: int = 2048, **encode_kwargs) -> int:
        """Stream texts (any iterable, e.g. a generator) into ``out`` (an array-like of shape [n, hidden], such as a
        numpy memmap) chunk by chunk, so memory stays bounded by one chunk. Returns the number of texts encoded.

        ``out`` must be a writable 2-D float array-like with ``hidden_size`` columns. If the texts outrun its rows,
        the rows it has are filled (row ``i`` holds text ``i``) and a ValueError says how many were written."""
        if isinstance(texts, (str, bytes)) or texts is None:
            raise TypeError("texts must be an iterable of strings, not a single string or None (wrap it: [text])")
        chunk_size = limits.positive_int(chunk_size, "chunk_size")
        rows = self._check_out(out)
        n = 0
        chunk: List[str] = []

        def flush(chunk: List[str]) -> int:
            room = rows - n
            fits = chunk[:room]
            if fits:
                out[n: n + len(fits)] = self.encode(fits, **encode_kwargs)
            if len(chunk) > room:
                raise ValueError(f"out has {rows} rows but more texts were given: rows 0..{rows - 1} hold the "
                                 f"first {rows} texts, the rest were not encoded (allocate out with one row per "
                                 f"text)")
            return len(fits)

        for t in texts:
            chunk.append(t)
            if len(chunk) == chunk_size:
                n += flush(chunk)
                chunk = []
        if chunk:
            n += flush(chunk)
        return n

    def _check_out(self, out) -> int:
        """The number of rows of ``out``, a writable 2-D float array-like with hidden_size columns."""
        shape = getattr(out, "shape", None)
        if shape is None or not hasattr(out, "__setitem__"):
            raise TypeError(f"out must be a writable array-like with a shape, such as np.empty((n, "
                            f"{self.hidden_size}), np.float32) or a numpy memmap; got {type(out).__name__}")
        shape = tuple(shape)
        if len(shape) != 2 or shape[1] != self.hidden_size:
            raise ValueError(f"out must have shape (n, {self.hidden_size}) (one row of hidden_size floats per "
                             f"text), got {shape}")
        dtype = getattr(out, "dtype", None)
        if dtype is not None and np.dtype(dtype).kind != "f":
            raise TypeError(f"out must hold floats (embeddings would be cast to {np.dtype(dtype)}), got dtype "
                            f"{np.dtype(dtype)}")
        flags = getattr(out, "flags", None)
        if flags is not None and not getattr(flags, "writeable", True):
            raise ValueError("out is read-only (e.g. a memmap opened with mode='r'); open it with mode='r+' or 'w+'")
        return int(shape[0])

    # ------------------------------------------------------------------------------------------ calibration
    def calibrate(self, texts: Sequence[str], method: str = "minmax", batch_size: int = 32,
                  max_length: Optional[int] = None, nbins: int = 2048, momentum: float = 0.9,
                  percentile: float = 99.99, show_progress_bar: Optional[bool] = None) -> Calibration:
        """Observe every linear layer's input over ``texts`` (C observers) and return the statistics."""
        from ..quant.calibration import CALIBRATION_METHODS

        texts = limits.texts(texts)
        if not isinstance(method, str) or method not in CALIBRATION_METHODS:
            raise ValueError(f"method must be one of {', '.join(CALIBRATION_METHODS)}, got {method!r}")
        batch_size = limits.batch_size(batch_size)
        nbins = limits.positive_int(nbins, "nbins")
        momentum = limits.finite_float(momentum, "momentum", 0.0, 1.0, high_open=True)
        percentile = limits.finite_float(percentile, "percentile", 0.0, 100.0, low_open=True)
        self._max_length(max_length)
        sites = self.site_names
        observers = [_core.Observer(nbins, momentum) for _ in sites]
        for _, ids, mask, tt in self.batches(texts, batch_size, max_length, show_progress_bar=show_progress_bar,
                                             auto_progress=8, desc="calibrate", hook=True):
            self._core.forward(ids, mask, tt, hidden=False, observers=observers)
        return Calibration(sites=sites, observers=observers, n_texts=len(texts), method=method, percentile=percentile)

    def collect_moments(self, texts: Sequence[str], sites: Sequence[str], *, gram_sites: Sequence[str] = (),
                        grids: Optional[Dict[str, Tuple[float, int]]] = None, batch_size: int = 32,
                        max_length: Optional[int] = None, show_progress_bar: Optional[bool] = None) -> Dict[str, Dict]:
        """The moments of the inputs of ``sites`` over ``texts``, gathered in the C core (csrc/moments.h): per site
        ``{"rows", "column_sum", "grid_column_sum", "gram"}`` (float64): column sums over every real token, the
        Gram matrix X^T X for ``gram_sites``, and the column sums on the u8 grid ``grids[site] = (scale,
        zero_point)`` (None elsewhere). For GPTQ rounding and bias correction (:mod:`medquant.quant.recovery`)."""
        texts = limits.texts(texts)
        batch_size = limits.batch_size(batch_size)
        self._max_length(max_length)
        grids = dict(grids or {})
        names = self.site_names
        unknown = sorted((set(sites) | set(gram_sites) | set(grids)) - set(names))
        if unknown:
            raise ValueError(f"unknown site(s) {unknown}; this model's sites: {names[0]} ... {names[-1]}")
        if not set(gram_sites) <= set(sites) or not set(grids) <= set(sites):
            raise ValueError("gram_sites and grids must name sites listed in sites")
        observers = [None] * len(names)
        for name in sites:
            obs = _core.Observer(16, 0.0)  # the histogram is not used: the fewest bins
            obs.track_moments(gram=name in gram_sites)
            if name in grids:
                obs.set_grid(float(grids[name][0]), int(grids[name][1]))
            observers[names.index(name)] = obs
        for _, ids, mask, tt in self.batches(texts, batch_size, max_length, show_progress_bar=show_progress_bar,
                                             auto_progress=8, desc="moments", hook=True):
            self._core.forward(ids, mask, tt, hidden=False, observers=observers)
        return {name: observers[names.index(name)].moments() for name in sites}

    # ------------------------------------------------------------------------------------------ delegated
    def quantize(self, scheme, calibration_texts: Optional[Sequence[str]] = None,
                 calibration: Optional[Calibration] = None, batch_size: int = 32,
                 show_progress_bar: Optional[bool] = None) -> "Encoder":
        """A new Encoder quantized under ``scheme`` (see :func:`medquant.quant.quantize.quantize`); ``scheme`` may
        also be a :class:`~medquant.quant.params.QuantParams` (from :meth:`quant_params` or ``QuantParams.load``):
        then this encoder's weights are quantized with those parameters, nothing is calibrated."""
        batch_size = limits.batch_size(batch_size)
        return _quantize.quantize(self, scheme, calibration_texts=calibration_texts, calibration=calibration,
                                  batch_size=batch_size, show_progress_bar=show_progress_bar)

    def quant_params(self):
        """This encoder's quantization parameters (:class:`~medquant.quant.params.QuantParams`: per-site scales,
        zero points, ranges, SmoothQuant factors, embedding scales), to inspect (``.table()``), save (``.save(dir)``)
        and apply to an fp32 encoder (``fp32.quantize(params)``)."""
        from ..quant.params import QuantParams

        return QuantParams.from_encoder(self)

    def quant_report(self, texts: Sequence[str], reference: Optional["Encoder"] = None, batch_size: int = 16,
                     max_length: Optional[int] = None) -> pd.DataFrame:
        """Per-site error against an fp32 reference (see :func:`medquant.quant.report.quant_report`)."""
        batch_size = limits.batch_size(batch_size)
        self._max_length(max_length)
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

    def export_onnx(self, path: Union[str, os.PathLike], *, pooling: Optional[str] = None,
                    normalize: Optional[bool] = None, overwrite: bool = False) -> Path:
        """Write this encoder as an ONNX model (see :func:`medquant.model.onnx_export.export_onnx`): fp32 as a plain
        graph, quantized as a QDQ graph with medquant's own scales and zero points. Needs the ``onnx`` package."""
        from .onnx_export import export_onnx

        return export_onnx(self, path, pooling=pooling, normalize=normalize, overwrite=overwrite)


def _one_flag(normalize, normalize_embeddings) -> Optional[bool]:
    """normalize and its sentence-transformers name: at most one value (None: the model's)."""
    vals = {limits.flag(v, n) for v, n in ((normalize, "normalize"), (normalize_embeddings, "normalize_embeddings"))
            if v is not None}
    if len(vals) > 1:
        raise ValueError(f"normalize={normalize} and normalize_embeddings={normalize_embeddings} disagree")
    return vals.pop() if vals else None


def _check_st_options(precision, output_value, device) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if output_value not in ("sentence_embedding", "token_embeddings"):
        raise ValueError(f"output_value must be 'sentence_embedding' or 'token_embeddings', got {output_value!r}")
    if output_value == "token_embeddings" and precision != "float32":
        raise ValueError("precision applies to sentence embeddings, not token_embeddings")
    if device is not None and str(device) != "cpu":
        raise ValueError(f"medquant runs on the CPU; device={device!r} is not available")


def _convert(out: np.ndarray, single: bool, convert_to_numpy: bool, convert_to_tensor: bool):
    if convert_to_tensor:
        try:
            import torch
        except ImportError:
            raise ImportError("convert_to_tensor=True needs torch (pip install torch==2.13.0)") from None
        t = torch.from_numpy(out)
        return t[0] if single else t
    if single:
        return out[0]
    return out if limits.flag(convert_to_numpy, "convert_to_numpy") else list(out)


#: keywords evaluators pass to encode_queries / encode_corpus that :meth:`Encoder.encode` takes
_ENCODE_KEYWORDS = {"max_length", "pooling", "normalize", "show_progress_bar", "prompt_name", "prompt",
                    "normalize_embeddings", "precision", "convert_to_numpy", "convert_to_tensor", "device"}


def _encode_kwargs(kwargs) -> Dict:
    return {k: v for k, v in kwargs.items() if k in _ENCODE_KEYWORDS}


def corpus_texts(corpus, sep: str = " ") -> List[str]:
    """Texts of a BEIR-style corpus: a list of {"title", "text"} dicts, a dict of lists, or a list of strings."""
    if isinstance(corpus, dict):
        if "text" not in corpus:
            raise ValueError("a corpus given as a dict of lists needs a 'text' key")
        titles = corpus.get("title") or [""] * len(corpus["text"])
        if len(titles) != len(corpus["text"]):
            raise ValueError(f"corpus['title'] has {len(titles)} entries, corpus['text'] {len(corpus['text'])}")
        corpus = [{"title": t, "text": x} for t, x in zip(titles, corpus["text"])]
    if isinstance(corpus, str):
        raise TypeError("corpus must be a list of documents, not a single string")
    out = []
    for i, doc in enumerate(corpus):
        if isinstance(doc, str):
            out.append(doc)
        elif isinstance(doc, dict) and isinstance(doc.get("text", ""), str) \
                and isinstance(doc.get("title") or "", str):
            out.append(((doc.get("title") or "") + sep + doc.get("text", "")).strip())
        else:
            raise TypeError(f"corpus[{i}] must be a string or a dict with string 'title'/'text', got {doc!r:.80}")
    return out
