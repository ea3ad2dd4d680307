"""Run-setting and input limits, each checked here and only here: token lengths, thread counts, batch sizes and
other counts, memory bounds, and the texts handed to an encoder.

The encoder, :class:`medquant.eval.evaluate.EvalConfig` and the command line all call these, so one setting gets
one rule and one message wherever it is given.
"""
from __future__ import annotations

import os
import warnings
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


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover
        return os.cpu_count() or 1


def threads(value, name: str = "n_threads") -> int:
    """A thread count: None for ``$MEDQUANT_NUM_THREADS`` or else every available CPU; an int >= 1 otherwise.

    More threads than the CPUs this process may run on are capped to that number, with a warning: they only add
    contention, and when the OpenMP runtime cannot create them it ends the process.
    """
    if value is None:
        env = os.environ.get("MEDQUANT_NUM_THREADS", "").strip()
        if not env:
            return available_cpus()
        try:
            value = int(env)
        except ValueError:
            raise ValueError(f"MEDQUANT_NUM_THREADS must be a positive int, got {env!r}") from None
        name = "MEDQUANT_NUM_THREADS"
    value = positive_int(value, name)
    cpus = available_cpus()
    if value > cpus:
        warnings.warn(f"{name}={value} is more than the {cpus} CPUs this process can run on; using {cpus}",
                      RuntimeWarning, stacklevel=3)
        value = cpus
    return value


def default_threads() -> int:
    """``$MEDQUANT_NUM_THREADS``, else the CPUs this process may run on."""
    return threads(None)


MAX_BATCH_SIZE = 1 << 16


def batch_size(value, name: str = "batch_size") -> int:
    """Texts per call into the C core: an int in [1, MAX_BATCH_SIZE] (the memory limit may split a batch further)."""
    value = positive_int(value, name)
    if value > MAX_BATCH_SIZE:
        raise ValueError(f"{name} must be at most {MAX_BATCH_SIZE}, got {value}")
    return value


_UNITS = {"": 1, "B": 1, "K": 1 << 10, "KB": 1 << 10, "KIB": 1 << 10, "M": 1 << 20, "MB": 1 << 20, "MIB": 1 << 20,
          "G": 1 << 30, "GB": 1 << 30, "GIB": 1 << 30, "T": 1 << 40, "TB": 1 << 40, "TIB": 1 << 40}
MIN_MEMORY_LIMIT = 1 << 20


def physical_memory() -> int:
    """Bytes of RAM on this machine (0 if unknown)."""
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):  # pragma: no cover
        return 0


def memory_bytes(value, name: str) -> int:
    """A byte count: an int, or a string such as ``"512MiB"`` / ``"4G"`` (binary units), at least 1 MiB."""
    if isinstance(value, str):
        text = value.strip().upper().replace(" ", "")
        num = text.rstrip("KMGTIB")
        unit = text[len(num):]
        try:
            if unit not in _UNITS:
                raise ValueError
            value = float(num) * _UNITS[unit]
        except ValueError:
            raise ValueError(f"{name} must be a byte count such as 536870912, '512MiB' or '4G', got {value!r}") from None
        if not np.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value!r}")
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int or a string such as '4G', got {type(value).__name__}")
    if value < MIN_MEMORY_LIMIT or value >= 1 << 63:
        raise ValueError(f"{name} must be in [1 MiB, 2**63) bytes, got {value}")
    return int(value)


def memory_limit(value=None) -> int:
    """Bytes one forward call may allocate (workspace and outputs): ``value`` if given, else
    ``$MEDQUANT_MEMORY_LIMIT``, else a quarter of the machine's RAM, at most 2 GiB."""
    if value is None:
        env = os.environ.get("MEDQUANT_MEMORY_LIMIT", "").strip()
        if env:
            return memory_bytes(env, "MEDQUANT_MEMORY_LIMIT")
        ram = physical_memory()
        return max(MIN_MEMORY_LIMIT, min(2 << 30, ram // 4)) if ram else 2 << 30
    return memory_bytes(value, "memory_limit")


DEFAULT_KEEP_BYTES = 512 << 20


def keep_bytes(value, limit: int) -> int:
    """Workspace kept between calls (the rest is released after an outsized call): ``value``, else 512 MiB, at most
    ``limit``."""
    return min(limit, DEFAULT_KEEP_BYTES if value is None else memory_bytes(value, "keep_bytes"))


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


__all__ = ["MAX_BATCH_SIZE", "available_cpus", "batch_size", "default_threads", "finite_float", "flag", "keep_bytes",
           "max_length", "memory_bytes", "memory_limit", "physical_memory", "positive_int", "positive_int_or_none",
           "regular_file", "seed", "texts", "threads"]
