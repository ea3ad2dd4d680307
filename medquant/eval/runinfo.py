"""What a throughput figure was measured on: the machine, its load, and whether the timed sample means anything.

Rule for throughput figures (``corpus_texts_per_s``, ``query_texts_per_s``): a figure is flagged as *unreliable*
when it was timed over fewer than :data:`MIN_TIMED_TEXTS` texts or less than :data:`MIN_TIMED_SECONDS` seconds of
wall-clock time. Below that, start-up effects (thread-pool spin-up, caches, frequency scaling) and a single
scheduling hiccup on a shared machine move the figure by tens of percent.
"""
from __future__ import annotations

import os
import platform
from typing import Any, Dict, List, Mapping, Optional, Sequence

from ..model.limits import available_cpus

MIN_TIMED_TEXTS = 100
MIN_TIMED_SECONDS = 2.0


class ThroughputWarning(UserWarning):
    """A throughput figure comes from a sample too small to mean much (see :mod:`medquant.eval.runinfo`)."""


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; elsewhere :func:`platform.processor`), or ``"unknown"``."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model", "cpu model") and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average() -> Optional[List[float]]:
    """The 1, 5 and 15 minute load averages (None where the OS has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):  # pragma: no cover - Windows
        return None


def machine_info() -> Dict[str, Any]:
    """CPU model, CPU counts (logical, and those this process may run on), oneDNN's ISA and kernels, versions."""
    from .. import __version__, runtime_info

    rt = runtime_info()
    return {"medquant_version": __version__, "cpu_model": cpu_model(), "cpu_count": os.cpu_count(),
            "cpus_available": available_cpus(), "onednn_version": rt.get("onednn_version"),
            "cpu_isa": rt.get("cpu_isa"), "int8_exact": rt.get("int8_exact"), "bf16_native": rt.get("bf16_native"),
            "platform": platform.platform(), "python": platform.python_version()}


def throughput_warnings(rows: Sequence[Mapping[str, Any]], n_corpus: int, n_queries: int) -> List[Dict[str, Any]]:
    """One entry per throughput figure of a model row (index rows repeat fp32's) timed on too small a sample."""
    out = []
    for row in rows:
        if row.get("index") != "float32":
            continue
        for figure, n, seconds in (("corpus_texts_per_s", n_corpus, row["encode_corpus_s"]),
                                   ("query_texts_per_s", n_queries, row["encode_queries_s"])):
            reasons = []
            if n < MIN_TIMED_TEXTS:
                reasons.append(f"{n} < {MIN_TIMED_TEXTS} texts")
            if not seconds >= MIN_TIMED_SECONDS:
                reasons.append(f"{seconds:.2f} s < {MIN_TIMED_SECONDS:g} s")
            if reasons:
                out.append({"scheme": row["scheme"], "figure": figure, "n_texts": int(n),
                            "seconds": float(seconds), "reason": ", ".join(reasons)})
    return out


def describe_warnings(warns: Sequence[Mapping[str, Any]]) -> str:
    """The throughput warnings as one message."""
    items = "; ".join(f"{w['scheme']} {w['figure']} ({w['reason']})" for w in warns)
    return (f"{len(warns)} throughput figure(s) come from a sample too small to mean much (rule: at least "
            f"{MIN_TIMED_TEXTS} texts and {MIN_TIMED_SECONDS:g} s timed): {items}. Treat them as rough; evaluate "
            "more texts (e.g. --full) for speed claims.")


__all__ = ["MIN_TIMED_SECONDS", "MIN_TIMED_TEXTS", "ThroughputWarning", "cpu_model", "describe_warnings",
           "load_average", "machine_info", "throughput_warnings"]
