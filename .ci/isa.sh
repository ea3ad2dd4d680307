#!/usr/bin/env bash
# Runs the quantization and encoder tests with oneDNN's ISA capped (ONEDNN_MAX_CPU_ISA), so that the kernels other
# CPUs take are exercised on this one:
#   AVX2              no AVX-512, VNNI or AMX: int8 layers are emulated in f32 (oneDNN's non-VNNI int8 kernels
#                     saturate u8*s8 pair sums in 16 bits), bf16 layers too (no bf16 matmul below avx512_core)
#   AVX512_CORE_VNNI  exact int8 on VNNI without AMX, bf16 on avx512_core without native bf16 instructions;
#                     only where the CPU has avx512_vnni (a cap above the CPU changes nothing, so it is skipped)
# The tests assert no kernel names, only that an optimized kernel ran and whether it is emulated, which
# medquant measures itself (medquant.runtime_info()["int8_exact"], ["bf16_native"]).
set -euo pipefail
cd "$(dirname "$0")/.."
TESTS=(tests/test_quantization.py tests/test_quantize_model.py tests/test_encoder.py tests/test_bit_identical.py tests/test_attention.py)
run_capped() {
    echo "== isa: ONEDNN_MAX_CPU_ISA=$1"
    ONEDNN_MAX_CPU_ISA="$1" python -c 'import medquant, json; i = medquant.runtime_info(); print(json.dumps({k: i[k] for k in ("cpu_isa", "int8_exact", "bf16_native")}))'
    ONEDNN_MAX_CPU_ISA="$1" python -m pytest -q -p no:cacheprovider -m "not slow" "${TESTS[@]}"
}
native="$(python -c 'import medquant; print(medquant.runtime_info()["cpu_isa"])')"
if [[ "$native" == avx2 || "$native" == avx || "$native" == sse41 ]]; then
    echo "== isa: AVX2 cap skipped: this CPU's own ISA is $native, so the main test run already took those paths"
else
    run_capped AVX2
fi
if grep -qw avx512_vnni /proc/cpuinfo; then
    run_capped AVX512_CORE_VNNI
else
    echo "== isa: AVX512_CORE_VNNI skipped: this CPU has no avx512_vnni ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs))"
fi
