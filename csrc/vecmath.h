/* vecmath.h - what medquant's own vectorized loops share: GCC vector types, a fixed-order lane sum, an exp that
 * vectorizes, and the vector ISA the hand-dispatched kernels run on.
 *
 * Vector types are GCC vector extensions: the code fixes the order of every operation, the vector width only how
 * many lanes a register holds, so a loop written on them gives the same bits on every ISA it is compiled for (as
 * long as the same multiply-adds are fused). Vectors are never passed to or returned from functions by value (that
 * would change the ABI between target clones); helpers take pointers. */
#ifndef MQ_VECMATH_H
#define MQ_VECMATH_H

#include <stdint.h>
#include <math.h>
#include <string.h>

typedef float mq_v16 __attribute__((vector_size(64)));
typedef float mq_v8 __attribute__((vector_size(32)));
typedef float mq_v4 __attribute__((vector_size(16)));

#define MQ_INLINE inline __attribute__((always_inline))

/* The sum of the 16 lanes of *a: halves first, then quarters, then (0 + 2) + (1 + 3). */
static MQ_INLINE float mq_v16_sum(const mq_v16 *a) {
    const mq_v8 h = __builtin_shufflevector(*a, *a, 0, 1, 2, 3, 4, 5, 6, 7) +
                    __builtin_shufflevector(*a, *a, 8, 9, 10, 11, 12, 13, 14, 15);
    const mq_v4 q = __builtin_shufflevector(h, h, 0, 1, 2, 3) + __builtin_shufflevector(h, h, 4, 5, 6, 7);
    return (q[0] + q[2]) + (q[1] + q[3]);
}

/* exp(-s) for s >= 0 (clamped at exp(-87); NaN stays NaN): Cody-Waite reduction by ln 2 and a degree-6 Taylor
   polynomial on |r| <= ln2 / 2 (relative error below 2e-8 before rounding); no libm call, so it vectorizes. */
static MQ_INLINE float mq_exp_neg(float s) {
    float z = -s;
    if (z < -87.f) z = -87.f;
    const float shifted = z * 1.44269504088896341f + 12582912.f; /* round to nearest integer: 1.5 * 2^23 */
    const float fn = shifted - 12582912.f;
    int32_t bits;
    memcpy(&bits, &shifted, sizeof bits);
    const int32_t n = bits - 0x4B400000; /* in [-126, 0] (any value for NaN, whose result stays NaN) */
    float r = z - fn * 0.693359375f;
    r = r - fn * -2.12194440e-4f;
    const float p =
        1.f + r * (1.f + r * (0.5f + r * (1.f / 6.f + r * (1.f / 24.f + r * (1.f / 120.f + r * (1.f / 720.f))))));
    const uint32_t eb = (uint32_t)(n + 127) << 23;
    float scale;
    memcpy(&scale, &eb, sizeof scale);
    return p * scale;
}

typedef int32_t mq_v8i __attribute__((vector_size(32)));
typedef int32_t mq_v16i __attribute__((vector_size(64)));

/* mq_exp_neg on the lanes of *v, in place, operation for operation (the same bits; inlined into a function compiled
   for AVX2 / AVX-512 it is one ymm / zmm instruction per operation): one body for mq_exp_neg_v8 and mq_exp_neg_v16. */
#define MQ_DEFINE_EXP_NEG(name, vf, vi)                                                                                \
    static MQ_INLINE void name(vf *v) {                                                                                \
        const vf zero = {0}, floor87 = zero - 87.f;                                                                    \
        vf z = -*v;                                                                                                    \
        const vi low = z < floor87; /* false for NaN: NaN stays NaN */                                                 \
        z = (vf)(((vi)z & ~low) | ((vi)floor87 & low));                                                                \
        const vf shifted = z * 1.44269504088896341f + 12582912.f;                                                      \
        const vf fn = shifted - 12582912.f;                                                                            \
        const vi n = (vi)shifted - 0x4B400000;                                                                         \
        vf r = z - fn * 0.693359375f;                                                                                  \
        r = r - fn * -2.12194440e-4f;                                                                                  \
        const vf p =                                                                                                   \
            1.f + r * (1.f + r * (0.5f + r * (1.f / 6.f + r * (1.f / 24.f + r * (1.f / 120.f + r * (1.f / 720.f)))))); \
        *v = p * (vf)((n + 127) << 23);                                                                                \
    }
MQ_DEFINE_EXP_NEG(mq_exp_neg_v8, mq_v8, mq_v8i)
MQ_DEFINE_EXP_NEG(mq_exp_neg_v16, mq_v16, mq_v16i)

/* The widest vector ISA medquant's hand-dispatched kernels use on this CPU, capped like oneDNN's own
   (ONEDNN_MAX_CPU_ISA), so tests can run the narrower paths on a wider CPU. */
typedef enum { MQ_VEC_C = 0, MQ_VEC_AVX2 = 1, MQ_VEC_AVX512 = 2 } mq_vec_isa;
mq_vec_isa mq_vec_isa_effective(void);
/* "c", "avx2" or "avx512" */
const char *mq_vec_isa_name(mq_vec_isa isa);

/* Whether this CPU multiplies bf16 pairs (avx512_bf16: vdpbf16ps, with avx512vl) and oneDNN's ISA cap allows it. */
int mq_vec_bf16_dot(void);
/* Whether this CPU multiplies u8 x s8 quadruples into int32 (avx512_vnni: vpdpbusd, with avx512bw) and oneDNN's ISA
   cap allows it. */
int mq_vec_int8_dot(void);

#define MQ_TARGET_AVX512 __attribute__((target("avx512f,fma")))
#define MQ_TARGET_AVX512_BF16 __attribute__((target("avx512f,avx512vl,avx512bf16,fma")))
#define MQ_TARGET_AVX512_VNNI __attribute__((target("avx512f,avx512bw,avx512vnni,fma")))
#define MQ_TARGET_AVX2 __attribute__((target("avx2,fma")))

#endif
