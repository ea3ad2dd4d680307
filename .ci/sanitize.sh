#!/usr/bin/env bash
# Sanitizer run: builds the C core with AddressSanitizer + UndefinedBehaviorSanitizer (MEDQUANT_SANITIZE=1) in a
# scratch copy of the sources, runs the C-facing tests and the fuzz harnesses against that build, then a
# LeakSanitizer pass over tests/leak_check.py. Fails on any sanitizer report, test failure or leak from csrc/.
#
# The checkout is left alone: the editable build (medquant/_core*.so) is neither rebuilt nor shadowed; the
# sanitized copy is imported through PYTHONPATH from the scratch directory.
#
# Usage:   .ci/sanitize.sh                 (from anywhere; ~3-5 min on 2 cores)
# Env:     MEDQUANT_SANITIZE_DIR=<dir>     scratch directory to use and keep (default: a mktemp dir, removed)
#          MEDQUANT_FUZZ_SECONDS=<s>       seconds per fuzz harness under the sanitizers (default 15)
#          PYTEST_ADDOPTS                  extra pytest options, as usual
#
# Sanitizer settings, and why:
#   LD_PRELOAD=libasan.so libubsan.so  the Python interpreter is not instrumented, so the ASan runtime must be the
#                                      first library loaded (gcc's, matching the compiler that built _core).
#   ASAN_OPTIONS detect_leaks=0        CPython does not free everything at exit (interned strings, static types,
#                                      pymalloc arenas that LSan cannot scan): whole-process leak checking of the
#                                      test run reports hundreds of CPython "leaks". Leaks are checked separately
#                                      (below) on a script that frees all its objects, counting only leaks whose
#                                      allocation stack has a csrc/ frame (fast_unwind_on_malloc=0 so the stacks
#                                      reach through oneDNN's frames back into csrc/).
#                log_path=...          reports go to files: pytest captures fd 2, so a report printed by a dying
#                                      process would otherwise be lost; any file there fails the run, including
#                                      reports from subprocesses (the fuzz harnesses).
#   UBSAN_OPTIONS halt_on_error=1:print_stacktrace=1 (the build also has -fno-sanitize-recover=undefined).
#   oneDNN and OpenMP: no suppressions were needed. libdnnl/libgomp are not instrumented (their JIT kernels'
#   memory accesses are not checked, only the buffers medquant hands them are ASan-tracked allocations), and
#   neither produced a report with gcc 12's runtime. atheris under the gcc ASan runtime runs without coverage
#   feedback (libasan provides the coverage symbols), i.e. as a random-input driver: fine for a memory check.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-python}"
if [[ -n "${MEDQUANT_SANITIZE_DIR:-}" ]]; then
    WORK="$MEDQUANT_SANITIZE_DIR"
    mkdir -p "$WORK"
else
    WORK="$(mktemp -d "${TMPDIR:-/tmp}/medquant-sanitize.XXXXXX")"
    trap 'rm -rf "$WORK"' EXIT
fi
SRC="$WORK/src"
LOGS="$WORK/logs"
rm -rf "$SRC" "$LOGS"
mkdir -p "$SRC/medquant" "$LOGS"

echo "== sanitize: copying sources to $SRC"
cp -r "$ROOT/csrc" "$ROOT/tests" "$ROOT/setup.py" "$ROOT/pyproject.toml" "$SRC/"
cp "$ROOT"/medquant/*.py "$SRC/medquant/"
for pkg in "$ROOT"/medquant/*/; do  # the subpackages (model/, quant/, eval/), without the built extension
    [[ -f "$pkg/__init__.py" ]] && mkdir -p "$SRC/medquant/$(basename "$pkg")" && cp "$pkg"*.py "$SRC/medquant/$(basename "$pkg")/"
done
[[ -d "$ROOT/fuzz" ]] && cp -r "$ROOT/fuzz" "$SRC/"
[[ -f "$ROOT/README.md" ]] && cp "$ROOT/README.md" "$SRC/"
find "$SRC" -name "__pycache__" -prune -exec rm -rf {} +

echo "== sanitize: building the C core with ASan + UBSan"
# setup.py runs outside pip's isolated build here, so the build requirements must be in this environment
"$PY" -m pip install -q "onednn-devel-cpu-gomp==2023.2.0" "setuptools>=68" wheel >"$LOGS/pip.log" 2>&1 || {
    tail -20 "$LOGS/pip.log"; echo "sanitize: cannot install the build requirements" >&2; exit 1; }
(cd "$SRC" && MEDQUANT_SANITIZE=1 MEDQUANT_STRICT=1 "$PY" setup.py -q build_ext --inplace >"$LOGS/build.log" 2>&1) || {
    tail -50 "$LOGS/build.log"
    echo "sanitize: build failed" >&2
    exit 1
}

ASAN_LIB="$(gcc -print-file-name=libasan.so)"
UBSAN_LIB="$(gcc -print-file-name=libubsan.so)"
for lib in "$ASAN_LIB" "$UBSAN_LIB"; do
    [[ -f "$lib" ]] || { echo "sanitize: runtime $lib not found (gcc with libasan/libubsan needed)" >&2; exit 1; }
done

# data the tests read relative to the checkout (medquant.eval.datasets looks next to the repo, not next to the copy)
if [[ -z "${MEDQUANT_DATA:-}" && -d "$ROOT/../shared/data/medquad" ]]; then
    export MEDQUANT_DATA="$(cd "$ROOT/../shared/data/medquad" && pwd)"
fi

run_sanitized() {  # run_sanitized <asan extra options> <command...>
    local extra="$1"
    shift
    (cd "$SRC" && env PYTHONPATH="$SRC" MEDQUANT_SANITIZED=1 PYTHONDONTWRITEBYTECODE=1 \
        LD_PRELOAD="$ASAN_LIB $UBSAN_LIB" \
        ASAN_OPTIONS="log_path=$LOGS/asan:$extra" \
        UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:log_path=$LOGS/ubsan" \
        "$@")
}

# the sanitized build must be the one imported, and it must carry the ASan runtime
run_sanitized "detect_leaks=0" "$PY" - "$SRC" <<'EOF'
import sys
import medquant._core as core
assert core.__file__.startswith(sys.argv[1]), f"imported {core.__file__}, not the sanitized build"
deps = open("/proc/self/maps").read()
assert "libasan" in deps and "libubsan" in deps, "sanitizer runtimes not loaded"
print("sanitize: using", core.__file__)
EOF

status=0
echo "== sanitize: C-facing tests under ASan + UBSan"
run_sanitized "detect_leaks=0" env MEDQUANT_FUZZ_SECONDS="${MEDQUANT_FUZZ_SECONDS:-15}" \
    "$PY" -m pytest -q -p no:cacheprovider -m "not slow" \
    tests/test_quantization.py tests/test_checkpoint.py tests/test_reliability.py tests/test_runtime_safety.py \
    tests/test_fuzz_smoke.py tests/test_recovery.py tests/test_attention.py || status=1

echo "== sanitize: LeakSanitizer over tests/leak_check.py (leaks with a csrc/ frame fail)"
run_sanitized "detect_leaks=1:fast_unwind_on_malloc=0:malloc_context_size=40:exitcode=0" \
    "$PY" tests/leak_check.py 1 || status=1
# leak reports: keep the ones whose allocation stack passes through medquant's C sources
"$PY" - "$LOGS" <<'EOF' || status=1
import glob, re, sys
bad, total = [], 0
for f in glob.glob(sys.argv[1] + "/asan.*"):
    text = open(f, errors="replace").read()
    if "LeakSanitizer" not in text:
        continue
    for block in re.split(r"\n(?=(?:Direct|Indirect) leak of)", text):
        if re.match(r"(Direct|Indirect) leak of", block):
            total += 1
            # module_exec's objects (the extension's types and constant tables) live as long as the process: an
            # extension module is never unloaded, and whether CPython frees them at exit depends on what else was
            # imported (with pyarrow, which pandas imports when it is installed, they are reported)
            if "csrc/" in block and " in module_exec csrc/py_module.c" not in block:
                bad.append(block)
    open(f + ".leaks", "w").write(text)  # not a sanitizer error report: set aside
    import os; os.remove(f)
print(f"sanitize: {total} leak records in the process, {len(bad)} with csrc/ frames")
for b in bad[:10]:
    print(b[:3000])
sys.exit(1 if bad else 0)
EOF

reports=$(ls "$LOGS" | grep -E '^(asan|ubsan)\.[0-9]+$' || true)
if [[ -n "$reports" ]]; then
    echo "sanitize: sanitizer reports:" >&2
    for r in $reports; do
        echo "---- $r" >&2
        head -80 "$LOGS/$r" >&2
    done
    status=1
fi
if [[ $status -ne 0 ]]; then
    if [[ -n "${MEDQUANT_SANITIZE_DIR:-}" ]]; then
        echo "sanitize: FAILED (logs kept in $LOGS)" >&2
    else
        echo "sanitize: FAILED (rerun with MEDQUANT_SANITIZE_DIR=<dir> to keep the build and logs)" >&2
    fi
    exit 1
fi
echo "sanitize: OK (no ASan/UBSan reports, no leaks from csrc/)"
