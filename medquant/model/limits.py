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


# ---------------------------------------------------------------------------------------------------- added checks
def positive_int_or_none(value, name: str):
    """None, or ``value`` as an int >= 1 (see :func:`positive_int`)."""
    return None if value is None else positive_int(value, name)


def finite_float(value, name: str, low: float, high: float, *, low_open: bool = False,
                 high_open: bool = False) -> float:
    """``value`` as a float if it is a finite real number in the interval [low, high] (an end is excluded when
    ``low_open`` / ``high_open``), else TypeError / ValueError naming ``name`` and the interval."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    v = float(value)
    lo_ok = v > low if low_open else v >= low
    hi_ok = v < high if high_open else v <= high
    if not (np.isfinite(v) and lo_ok and hi_ok):
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be in {interval}, got {value!r}")
    return v


def flag(value, name: str) -> bool:
    """A boolean switch: True/False (numpy bools and the ints 0/1 too); anything else is a TypeError, so that e.g.
    ``normalize="no"`` is not read as True."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)) and value in (0, 1):
        return bool(value)
    raise TypeError(f"{name} must be True or False, got {value!r}")


def regular_file(path, what: str, error=ValueError, max_bytes: int = 0) -> os.stat_result:
    """Refuse, before anything opens it, a path that is not a regular file (a FIFO, socket, device such as
    /dev/zero or a directory would block a reader forever or feed it endless data) and, when ``max_bytes`` > 0, a
    file larger than that. Raises ``error`` (FileNotFoundError when the path does not exist) naming ``what`` and
    the path; returns the file's ``os.stat`` result."""
    import stat as _stat

    try:
        st = os.stat(path)  # follows symlinks: a link to a regular file is fine
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} not found: {path}") from None
    except OSError as e:
        raise error(f"{what} {path} cannot be read: {e.strerror or e}") from None
    if not _stat.S_ISREG(st.st_mode):
        kind = ("a directory" if _stat.S_ISDIR(st.st_mode) else "a FIFO (named pipe)" if _stat.S_ISFIFO(st.st_mode)
                else "a socket" if _stat.S_ISSOCK(st.st_mode)
                else "a device" if _stat.S_ISCHR(st.st_mode) or _stat.S_ISBLK(st.st_mode) else "not a regular file")
        raise error(f"{what} {path} is {kind}; medquant reads it only from a regular file (copy the data to a file)")
    if max_bytes and st.st_size > max_bytes:
        raise error(f"{what} {path} is {st.st_size} bytes, more than the {max_bytes} bytes such a file can "
                    f"reasonably hold; refusing to read it")
    return st


def seed(value, name: str = "seed") -> int:
    """A random seed: an int >= 0 (what numpy.random.default_rng accepts), else ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    return int(value)


__all__ += ["finite_float", "flag", "positive_int_or_none", "regular_file", "seed"]
