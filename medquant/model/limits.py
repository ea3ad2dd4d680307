"""Run-setting and input limits, each checked here and only here: token lengths, thread counts, batch sizes and
other counts, and the texts handed to an encoder.

The encoder, :class:`medquant.eval.evaluate.EvalConfig` and the command line all call these, so one setting gets
one rule and one message wherever it is given.
"""
from __future__ import annotations

import os
from typing import List

import numpy as np


def positive_int(value, name: str) -> int:
    """``value`` as an int if it is an integer >= 1, else ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def max_length(value, max_position_embeddings: int) -> int:
    """A token truncation length: an int in [2, the model's max_position_embeddings]."""
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
        raise TypeError(f"max_length must be an int, got {type(value).__name__}")
    if not (2 <= value <= max_position_embeddings):
        raise ValueError(f"max_length must be in [2, {max_position_embeddings}], got {value}")
    return int(value)


def texts(value) -> List[str]:
    """A non-empty list of str (any iterable of str; a single string is refused)."""
    if isinstance(value, (str, bytes)):
        raise TypeError("texts must be a list of strings, not a single string (wrap it: [text])")
    if value is None:
        raise TypeError("texts must be a list of strings, got None")
    value = list(value)
    if not value:
        raise ValueError("texts is empty: nothing to encode")
    for i, t in enumerate(value):
        if not isinstance(t, str):
            raise TypeError(f"texts[{i}] is {type(t).__name__}, expected str")
    return value


def default_threads() -> int:
    """``$MEDQUANT_NUM_THREADS``, else the CPUs this process may run on."""
    env = os.environ.get("MEDQUANT_NUM_THREADS")
    if env:
        return int(env)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        return os.cpu_count() or 1


__all__ = ["default_threads", "max_length", "positive_int", "texts"]
