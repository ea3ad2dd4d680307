/* moments.h - first and second moments of the rows of an activation matrix: the statistics behind training-free
 * recovery of quantized linear layers.
 *
 * For the inputs x [rows, cols] of a linear layer, over every row seen:
 *   col_sum[j]       = sum_r x[r, j]                      (bias correction: E[x])
 *   grid_col_sum[j]  = sum_r fq(x[r, j])                  (bias correction: E[fq(x)], the input the int8 layer sees)
 *   gram[i, j]       = sum_r x[r, i] x[r, j]              (GPTQ: the layer's Hessian H = 2 X^T X / rows)
 * fq is the u8 activation grid of qparams.h: fq(x) = (clamp(rint(x * (1 / scale)) + zp, 0, 255) - zp) * scale,
 * exactly what the core's static int8 layers compute with. The sums are kept in double; the Gram matrix of one
 * update is computed by oneDNN's sgemm (f32, one batch at a time) and added in double.
 *
 * An update is staged then committed: mq_moments_stage computes one batch's sums into the struct's scratch (it can
 * fail: allocation, oneDNN) and leaves the totals untouched; mq_moments_commit adds them (it cannot fail). A caller
 * that updates other statistics from the same batch stages first and commits once nothing else can fail.
 *
 * Ownership: a mq_moments owns its buffers; the pointers of mq_moments_view stay valid until the next stage,
 * commit, reset or destroy. Not for concurrent use.
 */
#ifndef MQ_MOMENTS_H
#define MQ_MOMENTS_H

#include <stddef.h>
#include <stdint.h>

#include "status.h"

typedef struct mq_moments mq_moments;

typedef struct {
    size_t cols;                /* 0 before the first row */
    uint64_t rows;
    const double *col_sum;      /* [cols] */
    const double *grid_col_sum; /* [cols], NULL without a grid */
    const double *gram;         /* [cols, cols] row-major (symmetric), NULL unless created with gram */
} mq_moments_view;

/* gram != 0: also keep the Gram matrix X^T X (cols^2 doubles plus cols^2 floats of scratch). */
mq_status mq_moments_create(mq_moments **out, int gram);
void mq_moments_destroy(mq_moments *m); /* NULL-safe */
/* Forgets the sums and the column count; keeps the gram flag and the grid. */
void mq_moments_reset(mq_moments *m);
/* The u8 grid of grid_col_sum: scale > 0 and finite, zp in [0, 255]. Only before the first stage (MQ_ERR_STATE after,
   until a reset: the sums would mix grids). */
mq_status mq_moments_set_grid(mq_moments *m, float scale, int32_t zp);
/* Stages x [rows, cols] row-major (finite; the caller checks). cols > 0 and the same on every call (MQ_ERR_ARG),
   rows > 0. */
mq_status mq_moments_stage(mq_moments *m, const float *x, size_t rows, size_t cols);
/* Adds the staged batch to the totals (no-op if nothing is staged). */
void mq_moments_commit(mq_moments *m);
/* The totals. */
void mq_moments_get(const mq_moments *m, mq_moments_view *view);

#endif
