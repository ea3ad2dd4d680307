/* moments.c - column sums, column sums on the u8 grid and the Gram matrix of activation rows (design in moments.h). */
#include "moments.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

struct mq_moments {
    int want_gram, has_grid, staged;
    float inv_scale, scale;
    int32_t zp;
    size_t cols;
    uint64_t rows, staged_rows;
    double *col_sum, *grid_col_sum, *gram;  /* totals */
    double *batch_sum, *batch_grid_sum;     /* staged */
    float *batch_gram;                      /* staged [cols, cols] */
};

mq_status mq_moments_create(mq_moments **out, int gram) {
    if (!out) return mq_set_error(MQ_ERR_ARG, "moments: out is NULL");
    *out = calloc(1, sizeof **out);
    if (!*out) return mq_set_error(MQ_ERR_NOMEM, "moments: out of memory");
    (*out)->want_gram = gram != 0;
    return MQ_OK;
}

static void free_buffers(mq_moments *m) {
    mq_free(m->col_sum);
    mq_free(m->grid_col_sum);
    mq_free(m->gram);
    mq_free(m->batch_sum);
    mq_free(m->batch_grid_sum);
    mq_free(m->batch_gram);
    m->col_sum = m->grid_col_sum = m->gram = m->batch_sum = m->batch_grid_sum = NULL;
    m->batch_gram = NULL;
}

void mq_moments_destroy(mq_moments *m) {
    if (!m) return;
    free_buffers(m);
    free(m);
}

void mq_moments_reset(mq_moments *m) {
    if (!m) return;
    free_buffers(m);
    m->cols = 0;
    m->rows = m->staged_rows = 0;
    m->staged = 0;
}

mq_status mq_moments_set_grid(mq_moments *m, float scale, int32_t zp) {
    if (!m) return mq_set_error(MQ_ERR_ARG, "moments: NULL");
    if (!(isfinite(scale) && scale > 0.f)) return mq_set_error(MQ_ERR_ARG, "moments: grid scale must be > 0, got %g", (double)scale);
    if (zp < 0 || zp > 255) return mq_set_error(MQ_ERR_ARG, "moments: grid zero point must be in [0, 255], got %d", (int)zp);
    if (m->cols) return mq_set_error(MQ_ERR_STATE, "moments: the grid is set before the first update (or after a reset)");
    m->has_grid = 1;
    m->scale = scale;
    m->inv_scale = 1.f / scale; /* as the core's static quantization: x * (1 / scale) */
    m->zp = zp;
    return MQ_OK;
}

/* Allocates the totals and the staging buffers for `cols` columns (all or nothing). */
static mq_status allocate(mq_moments *m, size_t cols) {
    size_t cc = 0;
    if (m->want_gram && !mq_size_mul(cols, cols, &cc))
        return mq_set_error(MQ_ERR_NOMEM, "moments: a %zu x %zu Gram matrix overflows", cols, cols);
    m->col_sum = mq_alloc(cols, sizeof(double));
    m->batch_sum = mq_alloc(cols, sizeof(double));
    int ok = m->col_sum && m->batch_sum;
    if (m->has_grid) {
        m->grid_col_sum = mq_alloc(cols, sizeof(double));
        m->batch_grid_sum = mq_alloc(cols, sizeof(double));
        ok = ok && m->grid_col_sum && m->batch_grid_sum;
    }
    if (m->want_gram) {
        m->gram = mq_alloc(cc, sizeof(double));
        m->batch_gram = mq_alloc(cc, sizeof(float));
        ok = ok && m->gram && m->batch_gram;
    }
    if (!ok) {
        free_buffers(m);
        return mq_set_error(MQ_ERR_NOMEM, "moments: out of memory for %zu columns%s", cols,
                            m->want_gram ? " (with a Gram matrix)" : "");
    }
    m->cols = cols;
    return MQ_OK;
}

static double grid_value(const mq_moments *m, float v) {
    float q = rintf(v * m->inv_scale) + (float)m->zp;
    q = q < 0.f ? 0.f : q;
    q = q > 255.f ? 255.f : q;
    return ((double)q - (double)m->zp) * (double)m->scale;
}

mq_status mq_moments_stage(mq_moments *m, const float *x, size_t rows, size_t cols) {
    if (!m || !x) return mq_set_error(MQ_ERR_ARG, "moments: NULL argument");
    if (rows == 0 || cols == 0) return mq_set_error(MQ_ERR_ARG, "moments: empty matrix %zu x %zu", rows, cols);
    if (m->cols && cols != m->cols) return mq_set_error(MQ_ERR_ARG, "moments: cols must stay %zu, got %zu", m->cols, cols);
    if (rows > (size_t)INT64_MAX / cols) return mq_set_error(MQ_ERR_ARG, "moments: %zu x %zu overflows", rows, cols);
    if (!m->cols) MQ_TRY(allocate(m, cols));
    if (m->want_gram) /* batch_gram = x^T x, [cols, cols] */
        MQ_DNNL(dnnl_sgemm('T', 'N', (dnnl_dim_t)cols, (dnnl_dim_t)cols, (dnnl_dim_t)rows, 1.f, x, (dnnl_dim_t)cols, x,
                           (dnnl_dim_t)cols, 0.f, m->batch_gram, (dnnl_dim_t)cols));
    memset(m->batch_sum, 0, cols * sizeof(double));
    for (size_t r = 0; r < rows; r++) {
        const float *xr = x + r * cols;
        for (size_t j = 0; j < cols; j++) m->batch_sum[j] += (double)xr[j];
    }
    if (m->has_grid) {
        memset(m->batch_grid_sum, 0, cols * sizeof(double));
        for (size_t r = 0; r < rows; r++) {
            const float *xr = x + r * cols;
            for (size_t j = 0; j < cols; j++) m->batch_grid_sum[j] += grid_value(m, xr[j]);
        }
    }
    m->staged = 1;
    m->staged_rows = rows;
    return MQ_OK;
}

void mq_moments_commit(mq_moments *m) {
    if (!m || !m->staged) return;
    const size_t n = m->cols;
    for (size_t j = 0; j < n; j++) m->col_sum[j] += m->batch_sum[j];
    if (m->has_grid)
        for (size_t j = 0; j < n; j++) m->grid_col_sum[j] += m->batch_grid_sum[j];
    if (m->want_gram)
        for (size_t i = 0; i < n * n; i++) m->gram[i] += (double)m->batch_gram[i];
    m->rows += m->staged_rows;
    m->staged = 0;
    m->staged_rows = 0;
}

void mq_moments_get(const mq_moments *m, mq_moments_view *v) {
    if (!v) return;
    memset(v, 0, sizeof *v);
    if (!m || !m->rows) return;
    v->cols = m->cols;
    v->rows = m->rows;
    v->col_sum = m->col_sum;
    v->grid_col_sum = m->has_grid ? m->grid_col_sum : NULL;
    v->gram = m->want_gram ? m->gram : NULL;
}
