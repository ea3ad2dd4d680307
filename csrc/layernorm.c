/* layernorm.c - LayerNorm in C, with the next layer's input quantization fused (layernorm.h). */
/* as in qparams.c, before its inline quantizer is included: the clamps vectorise; results are unchanged */
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif

#include "layernorm.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "qparams.h"
#include "vecmath.h"

struct mq_layernorm {
    mq_engine *eng; /* borrowed: its thread count */
    int64_t hidden;
    float eps;
};

mq_status mq_layernorm_create(mq_layernorm **out, mq_engine *eng, int64_t hidden, float eps) {
    if (!out || !eng) return mq_set_error(MQ_ERR_ARG, "layernorm: NULL argument");
    *out = NULL;
    if (hidden <= 0 || !(eps > 0.f)) return mq_set_error(MQ_ERR_ARG, "layernorm: bad hidden %lld / eps %g",
                                                         (long long)hidden, (double)eps);
    mq_layernorm *ln = calloc(1, sizeof *ln);
    if (!ln) return mq_set_error(MQ_ERR_NOMEM, "layernorm: out of memory");
    ln->eng = eng;
    ln->hidden = hidden;
    ln->eps = eps;
    *out = ln;
    return MQ_OK;
}

void mq_layernorm_destroy(mq_layernorm *ln) { free(ln); }

/* Row sums in 32 partial sums (element c into partial c % 32, two 16-float vectors), then added pairwise, halves
   first (vecmath.h: the summation order is fixed by the code, not by the vector width, so every ISA clone - zmm on
   AVX-512, ymm pairs on AVX2, xmm below - gives the same bits), and the two chains keep the adders busy.
   The sum of (x[c] - shift) (square = 0) or of (x[c] - shift)^2 (square = 1) over the row */
static inline __attribute__((always_inline)) float row_sum(const float *restrict x, int64_t H, float shift, int square) {
    mq_v16 a0 = {0}, a1 = {0}, d0, d1;
    float tail[32] = {0};
    int64_t c = 0;
    for (; c + 32 <= H; c += 32) {
        memcpy(&d0, x + c, sizeof d0);
        memcpy(&d1, x + c + 16, sizeof d1);
        d0 -= shift;
        d1 -= shift;
        a0 += square ? d0 * d0 : d0;
        a1 += square ? d1 * d1 : d1;
    }
    for (int j = 0; c + j < H; j++) {
        const float d = x[c + j] - shift;
        tail[j] = square ? d * d : d;
    }
    memcpy(&d0, tail, sizeof d0);
    memcpy(&d1, tail + 16, sizeof d1);
    a0 += d0;
    a1 += d1;
    a0 += a1;
    return mq_v16_sum(&a0);
}

/* One row: y = (x - mean) * (1 / sqrt(var + eps)) * g + b, mean and variance in two f32 passes; with q, also
   q = mq_quantize_u8_value(y * inv_scale, zp) in the same loop. */
static inline __attribute__((always_inline)) void normalize_row(const float *restrict x, int64_t H, float eps,
                                                                const float *restrict g, const float *restrict b,
                                                                float *restrict y, uint8_t *restrict q,
                                                                float inv_scale, float fzp) {
    const float mean = row_sum(x, H, 0.f, 0) / (float)H;
    const float inv = 1.f / sqrtf(row_sum(x, H, mean, 1) / (float)H + eps);
    if (!q) {
        for (int64_t c = 0; c < H; c++) y[c] = (x[c] - mean) * inv * g[c] + b[c];
        return;
    }
    for (int64_t c = 0; c < H; c++) {
        const float v = (x[c] - mean) * inv * g[c] + b[c];
        y[c] = v;
        q[c] = mq_quantize_u8_value(v * inv_scale, fzp);
    }
}

#define MQ_LN_PAR_MIN ((int64_t)1 << 15) /* elements; below this one thread is faster than waking the others */

static MQ_HOT void layernorm_rows(const float *src, float *dst, int64_t T, int64_t H, float eps, const float *g,
                                  const float *b, uint8_t *q, float inv_scale, int32_t zp, int nthr) {
#pragma omp parallel for schedule(static) num_threads(nthr) if (T * H >= MQ_LN_PAR_MIN)
    for (int64_t r = 0; r < T; r++)
        normalize_row(src + r * H, H, eps, g, b, dst + r * H, q ? q + r * H : NULL, inv_scale, (float)zp);
}

mq_status mq_layernorm_forward(mq_layernorm *ln, int64_t T, const float *src, float *dst, const float *gamma,
                               const float *beta, uint8_t *q, float q_scale, int32_t q_zp) {
    if (!ln || T < 0 || !src || !dst || !gamma || !beta) return mq_set_error(MQ_ERR_ARG, "layernorm: bad arguments");
    if (q && (!(q_scale > 0.f) || !(q_scale < 1e30f) || q_zp < 0 || q_zp > 255))
        return mq_set_error(MQ_ERR_ARG, "layernorm: bad output quantization (scale %g, zero point %d)", (double)q_scale,
                            q_zp);
    layernorm_rows(src, dst, T, ln->hidden, ln->eps, gamma, beta, q, q ? 1.f / q_scale : 0.f, q_zp,
                   mq_engine_threads(ln->eng));
    return MQ_OK;
}
