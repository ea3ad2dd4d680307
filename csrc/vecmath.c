/* vecmath.c - the vector ISA medquant's own kernels dispatch on (vecmath.h). */
#include "vecmath.h"

#include "oneapi/dnnl/dnnl.h"

mq_vec_isa mq_vec_isa_effective(void) {
    const unsigned isa = (unsigned)dnnl_get_effective_cpu_isa();
    if ((isa & (unsigned)dnnl_cpu_isa_avx512_core) == (unsigned)dnnl_cpu_isa_avx512_core) return MQ_VEC_AVX512;
    if ((isa & (unsigned)dnnl_cpu_isa_avx2) == (unsigned)dnnl_cpu_isa_avx2) return MQ_VEC_AVX2;
    return MQ_VEC_C;
}

int mq_vec_bf16_dot(void) {
    const unsigned isa = (unsigned)dnnl_get_effective_cpu_isa(), bf16 = (unsigned)dnnl_cpu_isa_avx512_core_bf16;
    return (isa & bf16) == bf16 && __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512vl");
}

int mq_vec_int8_dot(void) {
    const unsigned isa = (unsigned)dnnl_get_effective_cpu_isa(), vnni = (unsigned)dnnl_cpu_isa_avx512_core_vnni;
    return (isa & vnni) == vnni && __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw");
}

const char *mq_vec_isa_name(mq_vec_isa isa) {
    static const char *const names[] = {[MQ_VEC_C] = "c", [MQ_VEC_AVX2] = "avx2", [MQ_VEC_AVX512] = "avx512"};
    return (unsigned)isa <= MQ_VEC_AVX512 ? names[isa] : "?";
}
