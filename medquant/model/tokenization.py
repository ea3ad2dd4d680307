"""Tokenizers that are never changed after they are made, so any number of threads and encoders can share them.

A `tokenizers.Tokenizer` keeps truncation as mutable state. Switching it on and off around each call (as medquant
once did) lets two threads that share the object undo each other: one thread's texts come back cut at the other's
``max_length``, or not cut at all. :class:`TruncatingTokenizers` instead keeps one copy of the source tokenizer per
``max_length``, configured once when it is made and only read afterwards; an encoder and the encoders derived from it
(``quantize``) share one of these objects.
"""
from __future__ import annotations

from typing import Dict, List

from .checkpoint import tokenizer_call


class TruncatingTokenizers:
    """Per-``max_length`` copies of one tokenizer (truncation set once, padding off), made on first use.

    The source's state is captured when this object is made: later changes to the source tokenizer do not reach the
    copies. ``capacity`` bounds how many lengths are kept (past it, the copies are dropped and made again as needed).
    No lock: each step is one dict operation, atomic under the GIL, so neither a thread nor a fork can leave one
    held (a lock held by another thread at fork() would stay held in the child forever).
    """

    def __init__(self, tokenizer, capacity: int = 8):
        from tokenizers import Tokenizer

        self._json = tokenizer.to_str()
        self._from_str = Tokenizer.from_str
        self._capacity = int(capacity)
        self._by_length: Dict[int, object] = {}

    def for_length(self, max_length: int):
        """The copy that truncates to ``max_length`` tokens (special tokens included)."""
        tok = self._by_length.get(max_length)
        if tok is not None:
            return tok
        tok = tokenizer_call(self._from_str, self._json)  # a few ms for a BERT vocabulary
        tok.no_padding()
        tok.enable_truncation(max_length)  # before anyone else can see it: never changed afterwards
        if len(self._by_length) >= self._capacity:
            self._by_length.clear()  # rare (a handful of lengths is usual); copies in use stay valid
        return self._by_length.setdefault(max_length, tok)

    def encode_batch(self, texts: List[str], max_length: int):
        """``tokenizers`` encodings of ``texts``, each truncated to ``max_length`` tokens (a Rust panic inside the
        library becomes CheckpointError)."""
        return tokenizer_call(self.for_length(max_length).encode_batch, texts)


__all__ = ["TruncatingTokenizers"]
