/* layernorm.h - LayerNorm over the rows of a packed [T, hidden] f32 activation, in C (no oneDNN primitive, no row
 * buckets: exactly T rows), optionally writing the next layer's u8 input in the same pass. gamma and beta are passed
 * per call, so one object serves every LayerNorm of an encoder.
 *
 * Per row, in f32: mean = sum(x) / H, var = sum((x - mean)^2) / H (two passes over the row, each summed in 32
 * partial sums in an order fixed by the code), then y = (x - mean) * (1 / sqrt(var + eps)) * gamma + beta; with a u8
 * output also q = mq_quantize_u8_value(y * (1 / scale), zp) as each y is written: the per-value quantizer of
 * mq_quantize_u8 (qparams.h), so a static int8 layer fed q computes exactly what it computes when it quantizes y
 * itself. Rows are split over the engine's threads; each row is computed by one thread in that fixed order, so the
 * result depends neither on the thread count nor on the ISA (AVX-512, AVX2 and baseline clones give the same bits). */
#ifndef MQ_LAYERNORM_H
#define MQ_LAYERNORM_H

#include "engine.h"

typedef struct mq_layernorm mq_layernorm;

mq_status mq_layernorm_create(mq_layernorm **out, mq_engine *eng, int64_t hidden, float eps);
void mq_layernorm_destroy(mq_layernorm *ln);
/* dst[T, hidden] = LayerNorm(src) per row (src and dst T rows, not aliasing; nothing past them is touched); when q is
 * non-NULL, also q[T, hidden] = clamp(rint(dst * (1 / q_scale)) + q_zp, 0, 255). MQ_ERR_ARG for a bad q_scale /
 * q_zp. */
mq_status mq_layernorm_forward(mq_layernorm *ln, int64_t T, const float *src, float *dst, const float *gamma,
                               const float *beta, uint8_t *q, float q_scale, int32_t q_zp);

#endif
