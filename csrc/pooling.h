/* pooling.h - sentence vectors from the packed last hidden state: the CLS row or the mean of a sequence's rows,
 * optionally L2-normalised. */
#ifndef MQ_POOLING_H
#define MQ_POOLING_H

#include "status.h"

typedef enum { MQ_POOL_NONE, MQ_POOL_CLS, MQ_POOL_MEAN, MQ_POOL_COUNT } mq_pooling;

/* pooled[b, :] for the rows [offsets[b], offsets[b] + lengths[b]) of x [T, hidden]; MQ_ERR_ARG for an unknown
 * pooling (MQ_POOL_NONE writes nothing), MQ_ERR_NUMERIC if a float sum overflowed (finite but extreme inputs). */
mq_status mq_pool_rows(const float *x, int64_t hidden, const int64_t *offsets, const int32_t *lengths, int64_t batch,
                       int pooling, int normalize, float *pooled);

#endif
