/* pooling.c - CLS / mean pooling and L2 normalisation of packed hidden rows (pooling.h). */
#include "pooling.h"

#include <math.h>
#include <string.h>

#include "qparams.h"

static void pool_one(const float *src, int64_t n, int64_t H, int pooling, int normalize, float *p) {
    if (pooling == MQ_POOL_CLS) {
        memcpy(p, src, (size_t)H * sizeof(float));
    } else {
        memset(p, 0, (size_t)H * sizeof(float));
        for (int64_t j = 0; j < n; j++)
            for (int64_t h = 0; h < H; h++) p[h] += src[j * H + h];
        const float inv_n = 1.f / (float)n;
        for (int64_t h = 0; h < H; h++) p[h] *= inv_n;
    }
    if (normalize) {
        double ss = 0.0;
        for (int64_t h = 0; h < H; h++) ss += (double)p[h] * p[h];
        const float inv = 1.f / (float)fmax(sqrt(ss), 1e-12);
        for (int64_t h = 0; h < H; h++) p[h] *= inv;
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
