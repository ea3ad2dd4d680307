/* pooling.h - sentence vectors from the packed last hidden state, optionally L2-normalised: the pooling modes of
 * sentence-transformers' Pooling module over a sequence's n real rows x_0 .. x_{n-1}:
 *   CLS            x_0
 *   MEAN           sum_j x_j / n
 *   MAX            the elementwise max over j
 *   MEAN_SQRT_LEN  sum_j x_j / sqrt(n)
 *   WEIGHTED_MEAN  sum_j (j + 1) x_j / sum_j (j + 1)   (later positions weigh more)
 *   LAST           x_{n-1}                              (the last real token) */
#ifndef MQ_POOLING_H
#define MQ_POOLING_H

#include "status.h"

typedef enum {
    MQ_POOL_NONE,
    MQ_POOL_CLS,
    MQ_POOL_MEAN,
    MQ_POOL_MAX,
    MQ_POOL_MEAN_SQRT_LEN,
    MQ_POOL_WEIGHTED_MEAN,
    MQ_POOL_LAST,
    MQ_POOL_COUNT
} mq_pooling;

/* pooled[b, :] for the rows [offsets[b], offsets[b] + lengths[b]) of x [T, hidden]; MQ_ERR_ARG for an unknown
 * pooling (MQ_POOL_NONE writes nothing), MQ_ERR_NUMERIC if a float sum overflowed (finite but extreme inputs). */
mq_status mq_pool_rows(const float *x, int64_t hidden, const int64_t *offsets, const int32_t *lengths, int64_t batch,
                       int pooling, int normalize, float *pooled);

#endif
