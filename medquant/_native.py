"""Load the C core. oneDNN comes from the ``onednn-cpu-gomp`` wheel: its ``libdnnl.so.3`` is preloaded with
RTLD_GLOBAL so the extension (linked against that soname) resolves to it without an rpath into a build directory."""
from __future__ import annotations

import ctypes
import os
from importlib import metadata


def _find_libdnnl() -> str | None:
    override = os.environ.get("MEDQUANT_LIBDNNL")
    if override:
        return override
    for dist_name in ("onednn-cpu-gomp", "onednn"):
        try:
            dist = metadata.distribution(dist_name)
        except metadata.PackageNotFoundError:
            continue
        for f in dist.files or []:
            if f.name == "libdnnl.so.3":
                path = os.path.realpath(str(f.locate()))
                if os.path.exists(path):
                    return path
    return None


_LIBDNNL_PATH = _find_libdnnl()
if _LIBDNNL_PATH is None:
    raise ImportError(
        "medquant needs oneDNN's shared library from PyPI: pip install onednn-cpu-gomp==2023.2.0 "
        "(or point MEDQUANT_LIBDNNL at a libdnnl.so.3)"
    )
_LIBDNNL = ctypes.CDLL(_LIBDNNL_PATH, mode=ctypes.RTLD_GLOBAL)

from . import _core  # noqa: E402  (after the preload on purpose)

LIBDNNL_PATH = _LIBDNNL_PATH

__all__ = ["_core", "LIBDNNL_PATH"]
