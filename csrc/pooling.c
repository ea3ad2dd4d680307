/* pooling.c - the pooling modes and L2 normalisation of packed hidden rows (pooling.h). */
#include "pooling.h"

#include <math.h>
#include <string.h>

#include "qparams.h"

/* p = sum_j w_j x_j over the n rows of src, with w_j = 1 (weighted = 0) or j + 1 */
static void pool_sum(const float *src, int64_t n, int64_t H, int weighted, float *p) {
    memset(p, 0, (size_t)H * sizeof(float));
    for (int64_t j = 0; j < n; j++) {
        const float w = weighted ? (float)(j + 1) : 1.f;
        for (int64_t h = 0; h < H; h++) p[h] += w * src[j * H + h];
    }
}

static void pool_max(const float *src, int64_t n, int64_t H, float *p) {
    memcpy(p, src, (size_t)H * sizeof(float));
    for (int64_t j = 1; j < n; j++)
        for (int64_t h = 0; h < H; h++) p[h] = fmaxf(p[h], src[j * H + h]);
}

static void scale_rows(float *p, int64_t H, float s) {
    for (int64_t h = 0; h < H; h++) p[h] *= s;
}

static void pool_one(const float *src, int64_t n, int64_t H, int pooling, int normalize, float *p) {
    switch (pooling) {
    case MQ_POOL_CLS: memcpy(p, src, (size_t)H * sizeof(float)); break;
    case MQ_POOL_LAST: memcpy(p, src + (n - 1) * H, (size_t)H * sizeof(float)); break;
    case MQ_POOL_MAX: pool_max(src, n, H, p); break;
    case MQ_POOL_MEAN_SQRT_LEN: pool_sum(src, n, H, 0, p); scale_rows(p, H, 1.f / sqrtf((float)n)); break;
    case MQ_POOL_WEIGHTED_MEAN: pool_sum(src, n, H, 1, p); scale_rows(p, H, 2.f / ((float)n * (float)(n + 1))); break;
    default: pool_sum(src, n, H, 0, p); scale_rows(p, H, 1.f / (float)n); break; /* MQ_POOL_MEAN */
    }
    if (normalize) {
        double ss = 0.0;
        for (int64_t h = 0; h < H; h++) ss += (double)p[h] * p[h];
        scale_rows(p, H, 1.f / (float)fmax(sqrt(ss), 1e-12));
    }
}

mq_status mq_pool_rows(const float *x, int64_t hidden, const int64_t *offsets, const int32_t *lengths, int64_t batch,
                       int pooling, int normalize, float *pooled) {
    if (pooling < 0 || pooling >= MQ_POOL_COUNT) return mq_set_error(MQ_ERR_ARG, "pooling: unknown pooling %d", pooling);
    if (pooling == MQ_POOL_NONE) return MQ_OK;
    for (int64_t b = 0; b < batch; b++)
        pool_one(x + offsets[b] * hidden, lengths[b], hidden, pooling, normalize, pooled + b * hidden);
    /* finite hidden states of extreme size can still overflow the float sums of mean pooling */
    if (mq_any_nonfinite(pooled, (size_t)batch * (size_t)hidden))
        return mq_set_error(MQ_ERR_NUMERIC, "forward: pooling produced non-finite activations (float32 overflow: "
                                            "finite but extreme weights?)");
    return MQ_OK;
}
