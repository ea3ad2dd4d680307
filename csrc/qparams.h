/* qparams.h - scale / zero-point math and the quantize, dequantize and convert kernels shared by the core.
 *
 * Conventions (mirrored by the numpy reference in tests/quant_reference.py):
 *   activations  u8:  q = clamp(rint(x * (1/scale)) + zp, 0, 255),  x ~ (q - zp) * scale
 *                symmetric activations use zp = 128 (an s8 value shifted into u8: the fast u8 x s8 kernels)
 *                and scale = absmax / 127, so q - 128 lies in [-127, 127].
 *   weights      s8:  q = clamp(rint(w / scale), -127, 127), scale = absmax / 127 (per tensor or per output channel)
 *                s4:  q = clamp(rint(w / scale), -7, 7), scale = absmax / 7 per group of `group` input channels,
 *                     stored as (q + 8) in nibbles, low nibble = even input channel.
 *   rint is round-half-to-even (the default FP rounding mode), as numpy.rint.
 */
#ifndef MQ_QPARAMS_H
#define MQ_QPARAMS_H

#include "status.h"

#include <string.h>

/* Hot loops are compiled for AVX-512, AVX2 and the baseline, picked at load time (GCC function multi-versioning). */
#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define MQ_HOT __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define MQ_HOT
#endif

typedef struct {
    float scale;
    int32_t zero_point;
} mq_qparams;

/* Asymmetric u8 parameters for the range [lo, hi] (widened to contain 0). */
mq_qparams mq_qparams_asym_u8(float lo, float hi);
/* Symmetric parameters (zp 128 in u8) for the range [lo, hi]. */
mq_qparams mq_qparams_sym_u8(float lo, float hi);

/* min and max over rows x cols (row stride ld) of x * col_mul (col_mul may be NULL). */
void mq_minmax_rows(const float *x, int64_t rows, int64_t cols, int64_t ld, const float *col_mul, float *mn, float *mx);
/* The u8 activation quantizer for one value, v = x * inv_scale already multiplied by the caller:
   clamp(rint(clamp(v, -512, 512)) + zp, 0, 255), NaN -> 0, with fzp = (float)zp. Every u8 activation the core makes
   comes from here (mq_quantize_u8 and the producers that quantize for the next layer, e.g. LayerNorm), so they can
   never disagree. rint: round half to even by the 1.5 * 2^23 trick (exact after the clamp; vectorises, unlike
   nearbyintf). A file whose loops use it sets no-trapping-math before including this header (see qparams.c): GCC
   then vectorises the clamps as selects, and does not inline across different optimize settings. */
static inline __attribute__((always_inline)) uint8_t mq_quantize_u8_value(float v, float fzp) {
    v = v >= -512.f ? v : -512.f;
    v = v <= 512.f ? v : 512.f;
    v = (v + 12582912.f) - 12582912.f + fzp;
    v = v >= 0.f ? v : 0.f;
    v = v <= 255.f ? v : 255.f;
    return (uint8_t)(int32_t)v;
}

/* q[r, c] = mq_quantize_u8_value(x[r, c] * col_mul[c] * inv_scale, zp). */
void mq_quantize_u8(const float *x, int64_t rows, int64_t cols, int64_t ld, const float *col_mul, float inv_scale,
                    int32_t zp, uint8_t *q);
/* One row of mq_quantize_u8 without a column multiplier and without a parallel region (for callers inside one). */
void mq_quantize_row_u8(const float *x, int64_t n, float inv_scale, int32_t zp, uint8_t *q);
/* Per-row symmetric quantization to u8 with zp 128; row_scale[r] = absmax(row r) / 127. */
void mq_quantize_u8_per_row(const float *x, int64_t rows, int64_t cols, int64_t ld, const float *col_mul, uint8_t *q,
                            float *row_scale);
/* x[r, c] = (q[r, c] - zp) * scale (rows x cols, dense). */
void mq_dequantize_u8(const uint8_t *q, int64_t rows, int64_t cols, float scale, int32_t zp, float *x);
/* y = x * col_mul (col_mul non-NULL) */
void mq_scale_columns(const float *x, int64_t rows, int64_t cols, int64_t ld, const float *col_mul, float *y);
/* One value f32 -> bf16, round to nearest even (NaN kept NaN), and bf16 -> f32 (exact). */
static inline uint16_t mq_f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}
static inline float mq_bf16_to_f32(uint16_t h) {
    const uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
/* f32 -> bf16 rows, rounded as mq_f32_to_bf16. */
void mq_convert_f32_bf16(const float *x, int64_t rows, int64_t cols, int64_t ld, const float *col_mul, uint16_t *y);
/* The same rounding, the result widened back to f32 (dense rows x cols): the values a bf16 matmul multiplies. */
void mq_round_f32_bf16(const float *x, int64_t rows, int64_t cols, int64_t ld, const float *col_mul, float *y);

/* Weights [N, K] row-major (one row per output channel). The quantize_* functions choose symmetric scales
   (absmax / 127 per channel or per tensor; absmax / 7 per group of `group` inputs for int4, packed two per byte, low
   nibble first, stored as q + 8) and round with them; the round_* functions round with scales given (positive normal
   floats, else MQ_ERR_ARG): q = clamp(nearbyint(w / s), -127, 127) (int4: -7, 7). One rounding for both, so
   re-quantizing a weight with the scales it was quantized with gives the same codes. */
mq_status mq_quantize_weight_s8(const float *w, int64_t N, int64_t K, int per_channel, int8_t *q, float *scales);
mq_status mq_round_weight_s8(const float *w, int64_t N, int64_t K, int per_channel, const float *scales, int8_t *q);
mq_status mq_quantize_weight_s4(const float *w, int64_t N, int64_t K, int64_t group, uint8_t *packed, float *scales);
mq_status mq_round_weight_s4(const float *w, int64_t N, int64_t K, int64_t group, const float *scales, uint8_t *packed);
/* Dequantize int4 into f32 [N, K]; scales: N * (K / group). */
void mq_dequantize_weight_s4(const uint8_t *packed, int64_t N, int64_t K, int64_t group, const float *scales, float *w);
/* Per-row symmetric s8 (embedding tables): scales[r] = absmax(row r) / 127 (with given scales: mq_round_weight_s8
   per channel). */
mq_status mq_quantize_rows_s8(const float *x, int64_t rows, int64_t cols, int8_t *q, float *scales);

/* Returns MQ_ERR_NUMERIC naming `what` if any of the n values is NaN or Inf. */
mq_status mq_check_finite(const float *x, size_t n, const char *what);
/* Nonzero if any of the n values is NaN or Inf (branch-free: for hot paths that only need to know). */
int mq_any_nonfinite(const float *x, size_t n);
/* Replaces *dst (freed with mq_free) by a copy of n finite floats; MQ_ERR_ARG if src is NULL, MQ_ERR_NUMERIC naming
   `what` if a value is not finite; *dst unchanged on failure. */
mq_status mq_take_floats(float **dst, const float *src, size_t n, const char *what);

#endif
