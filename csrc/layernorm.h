/* layernorm.h - LayerNorm over the rows of a packed [T, hidden] f32 activation (oneDNN layer normalization,
 * inference, scale and shift), one primitive per row bucket; gamma and beta are passed per call, so one object
 * serves every LayerNorm of an encoder. */
#ifndef MQ_LAYERNORM_H
#define MQ_LAYERNORM_H

#include "engine.h"
#include "primcache.h"
#include "workspace.h"

typedef struct mq_layernorm mq_layernorm;

mq_status mq_layernorm_create(mq_layernorm **out, mq_engine *eng, int64_t hidden, float eps);
void mq_layernorm_destroy(mq_layernorm *ln);
/* Drops the cached primitives (after a thread-count change); they are rebuilt on next use. */
void mq_layernorm_reset(mq_layernorm *ln);
/* Bytes of the row statistics buffer it holds, and releasing it (the next forward allocates again). */
size_t mq_layernorm_scratch_bytes(const mq_layernorm *ln);
void mq_layernorm_release_scratch(mq_layernorm *ln);
/* dst[T, hidden] = (src - mean) / sqrt(var + eps) * gamma + beta per row; src and dst are allocated up to
 * mq_bucket_rows(T) rows (they may not alias). The oneDNN scratchpad comes from scratch. */
mq_status mq_layernorm_forward(mq_layernorm *ln, mq_linear_scratch *scratch, int64_t T, const float *src, float *dst,
                               const float *gamma, const float *beta);

#endif
