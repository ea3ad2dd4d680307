"""Build the medquant C core (csrc/) against oneDNN taken from its PyPI wheels.

The headers come from ``onednn-devel-cpu-gomp`` (a build requirement, see pyproject.toml) and the library from
``onednn-cpu-gomp`` (a runtime requirement).  Both wheels put their files under the environment prefix, which in an
isolated pip build is a temporary overlay, so the files are located through the installed distributions' RECORD
rather than guessed from ``sys.prefix``.  At import time ``medquant._native`` preloads ``libdnnl.so.3`` from the
runtime wheel, so no rpath into the (possibly deleted) build environment is needed.

Environment switches:
  MEDQUANT_STRICT=1    add -Werror (CI builds use it)
  MEDQUANT_SANITIZE=1  build with AddressSanitizer + UndefinedBehaviorSanitizer (see README, "Reliability", and .ci/sanitize.sh)
  MEDQUANT_DEBUG=1     -O0 -g
"""
import glob
import os
import sys
from importlib import metadata

import numpy
from setuptools import Extension, setup


def _onednn_file(dist_names, filename):
    for dist_name in dist_names:
        try:
            dist = metadata.distribution(dist_name)
        except metadata.PackageNotFoundError:
            continue
        for f in dist.files or []:
            if f.name == filename:
                path = os.path.realpath(str(f.locate()))
                if os.path.exists(path):
                    return path
    return None


def _onednn_paths():
    header = _onednn_file(["onednn-devel-cpu-gomp", "onednn-devel"], "dnnl.h")
    lib = _onednn_file(["onednn-cpu-gomp", "onednn"], "libdnnl.so.3") or _onednn_file(
        ["onednn-cpu-gomp", "onednn"], "libdnnl.so"
    )
    if header is None or lib is None:
        raise RuntimeError(
            "medquant needs oneDNN v3 from PyPI to build: pip install onednn-devel-cpu-gomp==2023.2.0 "
            f"(found header={header}, library={lib})"
        )
    # header is <prefix>/include/oneapi/dnnl/dnnl.h or <prefix>/include/dnnl.h
    inc = os.path.dirname(header)
    while os.path.basename(inc) in ("dnnl", "oneapi"):
        inc = os.path.dirname(inc)
    return inc, os.path.dirname(lib)


def _flags():
    cflags = ["-std=c11", "-O3", "-Wall", "-Wextra", "-fvisibility=hidden", "-fopenmp"]
    ldflags = ["-fopenmp"]
    if os.environ.get("MEDQUANT_STRICT") == "1":
        cflags.append("-Werror")
    if os.environ.get("MEDQUANT_DEBUG") == "1":
        cflags += ["-O0", "-g"]
    if os.environ.get("MEDQUANT_SANITIZE") == "1":
        san = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-fno-sanitize-recover=undefined", "-g"]
        cflags += san
        ldflags += san
    return cflags, ldflags


inc_dir, lib_dir = _onednn_paths()
cflags, ldflags = _flags()

core = Extension(
    "medquant._core",
    sources=sorted(glob.glob(os.path.join("csrc", "*.c"))),
    depends=sorted(glob.glob(os.path.join("csrc", "*.h")) + glob.glob(os.path.join("csrc", "*.inc"))),
    include_dirs=["csrc", inc_dir, numpy.get_include()],
    library_dirs=[lib_dir],
    # link against the soname so the runtime wheel's libdnnl.so.3 satisfies it
    extra_link_args=ldflags + [os.path.join(lib_dir, "libdnnl.so.3") if os.path.exists(os.path.join(lib_dir, "libdnnl.so.3")) else "-ldnnl"],
    extra_compile_args=cflags,
    define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_22_API_VERSION"), ("_GNU_SOURCE", "1")],
)

setup(ext_modules=[core])
