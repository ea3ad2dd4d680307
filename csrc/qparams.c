/* qparams.c - scale / zero-point math and the quantize, dequantize, convert and finiteness kernels (qparams.h). */
/* The activation loops clamp with float compares; without trapping math GCC turns them into vector selects on every
   ISA (otherwise only AVX-512BW masks allow it). Nothing here reads FP exception flags, so results are unchanged.
   Set before every function of the file, the inline ones of qparams.h included: GCC does not inline across different
   optimize settings. */
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif

#include "qparams.h"

#include <float.h>
#include <math.h>
#include <string.h>

static inline float clampf(float v, float lo, float hi) { return !(v >= lo) ? lo : (v > hi ? hi : v); } /* NaN -> lo */

mq_qparams mq_qparams_asym_u8(float lo, float hi) {
    mq_qparams p;
    if (lo > 0.f) lo = 0.f;
    if (hi < 0.f) hi = 0.f;
    float span = hi - lo;
    if (!(span > 1e-30f)) span = 1e-30f;
    p.scale = span / 255.f;
    float zp = nearbyintf(-lo / p.scale);
    p.zero_point = (int32_t)clampf(zp, 0.f, 255.f);
    return p;
}

mq_qparams mq_qparams_sym_u8(float lo, float hi) {
    mq_qparams p;
    float a = fmaxf(fabsf(lo), fabsf(hi));
    if (!(a > 1e-30f)) a = 1e-30f;
    p.scale = a / 127.f;
    p.zero_point = 128;
    return p;
}

/* Activation kernels: rows are split across the encoder's OpenMP threads once a call has enough elements (the
   caller's omp_set_num_threads decides how many), and the inner loops are written so GCC vectorises them
   (restrict pointers, no branch inside, omp simd reductions). Results do not depend on the split. */
#define MQ_Q_PAR_MIN ((int64_t)1 << 15) /* elements; below this one thread is faster than waking the others */


static inline __attribute__((always_inline)) void minmax_row(const float *restrict xr, int64_t cols, const float *restrict col_mul, float *lo, float *hi) {
    float mn = *lo, mx = *hi;
    if (col_mul) {
#pragma omp simd reduction(min : mn) reduction(max : mx)
        for (int64_t c = 0; c < cols; c++) {
            float v = xr[c] * col_mul[c];
            mn = v < mn ? v : mn; /* NaN never replaces a value (as before) */
            mx = v > mx ? v : mx;
        }
    } else {
#pragma omp simd reduction(min : mn) reduction(max : mx)
        for (int64_t c = 0; c < cols; c++) {
            mn = xr[c] < mn ? xr[c] : mn;
            mx = xr[c] > mx ? xr[c] : mx;
        }
    }
    *lo = mn;
    *hi = mx;
}

MQ_HOT void mq_minmax_rows(const float *x, int64_t rows, int64_t cols, int64_t ld, const float *col_mul, float *mn,
                    float *mx) {
    float lo = INFINITY, hi = -INFINITY;
#pragma omp parallel for schedule(static) reduction(min : lo) reduction(max : hi) if (rows * cols >= MQ_Q_PAR_MIN)
    for (int64_t r = 0; r < rows; r++) {
        float a = INFINITY, b = -INFINITY;
        minmax_row(x + r * ld, cols, col_mul, &a, &b);
        lo = a < lo ? a : lo;
        hi = b > hi ? b : hi;
    }
    if (rows <= 0 || cols <= 0) lo = hi = 0.f;
    *mn = lo;
    *mx = hi;
}

/* One row: q = mq_quantize_u8_value(x * col_mul * inv_scale, zp). */
static inline __attribute__((always_inline)) void quantize_row(const float *restrict xr, int64_t cols, const float *restrict col_mul, float inv_scale,
                                float fzp, uint8_t *restrict qr) {
    if (col_mul) {
#pragma omp simd
        for (int64_t c = 0; c < cols; c++) qr[c] = mq_quantize_u8_value(xr[c] * col_mul[c] * inv_scale, fzp);
    } else {
#pragma omp simd
        for (int64_t c = 0; c < cols; c++) qr[c] = mq_quantize_u8_value(xr[c] * inv_scale, fzp);
    }
}

MQ_HOT void mq_quantize_u8(const float *x, int64_t rows, int64_t cols, int64_t ld, const float *col_mul, float inv_scale,
                    int32_t zp, uint8_t *q) {
    const float fzp = (float)zp;
#pragma omp parallel for schedule(static) if (rows * cols >= MQ_Q_PAR_MIN)
    for (int64_t r = 0; r < rows; r++) quantize_row(x + r * ld, cols, col_mul, inv_scale, fzp, q + r * cols);
}

MQ_HOT void mq_quantize_row_u8(const float *x, int64_t n, float inv_scale, int32_t zp, uint8_t *q) {
    quantize_row(x, n, NULL, inv_scale, (float)zp, q);
}

MQ_HOT void mq_quantize_u8_per_row(const float *x, int64_t rows, int64_t cols, int64_t ld, const float *col_mul, uint8_t *q,
                            float *row_scale) {
#pragma omp parallel for schedule(static) if (rows * cols >= MQ_Q_PAR_MIN)
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * ld;
        float mn = INFINITY, mx = -INFINITY;
        minmax_row(xr, cols, col_mul, &mn, &mx);
        /* max |v| over the row; NaN never counts (as before); an all-NaN row has mn = inf, mx = -inf -> a = 0 */
        float a = fmaxf(mx, -mn);
        a = a > 0.f ? a : 0.f;
        float scale = a > 1e-30f ? a / 127.f : 1e-30f;
        row_scale[r] = scale;
        quantize_row(xr, cols, col_mul, 1.f / scale, 128.f, q + r * cols);
    }
}

MQ_HOT void mq_dequantize_u8(const uint8_t *q, int64_t rows, int64_t cols, float scale, int32_t zp, float *x) {
    const float fzp = (float)zp;
#pragma omp parallel for schedule(static) if (rows * cols >= MQ_Q_PAR_MIN)
    for (int64_t r = 0; r < rows; r++) {
        const uint8_t *restrict qr = q + r * cols;
        float *restrict xr = x + r * cols;
#pragma omp simd
        for (int64_t c = 0; c < cols; c++) xr[c] = ((float)qr[c] - fzp) * scale;
    }
}

MQ_HOT void mq_scale_columns(const float *x, int64_t rows, int64_t cols, int64_t ld, const float *col_mul, float *y) {
#pragma omp parallel for schedule(static) if (rows * cols >= MQ_Q_PAR_MIN)
    for (int64_t r = 0; r < rows; r++) {
        const float *restrict xr = x + r * ld;
        float *restrict yr = y + r * cols;
#pragma omp simd
        for (int64_t c = 0; c < cols; c++) yr[c] = xr[c] * col_mul[c];
    }
}

MQ_HOT void mq_convert_f32_bf16(const float *x, int64_t rows, int64_t cols, int64_t ld, const float *col_mul, uint16_t *y) {
#pragma omp parallel for schedule(static) if (rows * cols >= MQ_Q_PAR_MIN)
    for (int64_t r = 0; r < rows; r++) {
        const float *restrict xr = x + r * ld;
        uint16_t *restrict yr = y + r * cols;
        if (col_mul) {
            for (int64_t c = 0; c < cols; c++) yr[c] = mq_f32_to_bf16(xr[c] * col_mul[c]);
        } else {
            for (int64_t c = 0; c < cols; c++) yr[c] = mq_f32_to_bf16(xr[c]);
        }
    }
}

MQ_HOT void mq_round_f32_bf16(const float *x, int64_t rows, int64_t cols, int64_t ld, const float *col_mul, float *y) {
#pragma omp parallel for schedule(static) if (rows * cols >= MQ_Q_PAR_MIN)
    for (int64_t r = 0; r < rows; r++) {
        const float *restrict xr = x + r * ld;
        float *restrict yr = y + r * cols;
        if (col_mul) {
            for (int64_t c = 0; c < cols; c++) yr[c] = mq_bf16_to_f32(mq_f32_to_bf16(xr[c] * col_mul[c]));
        } else {
            for (int64_t c = 0; c < cols; c++) yr[c] = mq_bf16_to_f32(mq_f32_to_bf16(xr[c]));
        }
    }
}

static float absmax(const float *x, int64_t n) {
    float a = 0.f;
    for (int64_t i = 0; i < n; i++) a = fmaxf(a, fabsf(x[i]));
    return a;
}

/* Symmetric scale absmax / qmax, kept a positive normal float: an all-zero group gets 1 (every q is 0), and a group of
   denormals, whose absmax / qmax would underflow to 0 (and divide by zero), gets FLT_MIN. */
static inline float sym_scale(float absmax, float qmax) {
    const float s = absmax / qmax;
    return s >= FLT_MIN ? s : (absmax > 0.f ? FLT_MIN : 1.f);
}

static mq_status check_scales(const float *scales, int64_t n, const char *what) {
    for (int64_t i = 0; i < n; i++)
        if (!(isfinite(scales[i]) && scales[i] >= FLT_MIN))
            return mq_set_error(MQ_ERR_ARG, "%s: scale %lld is %g; scales must be positive normal floats", what, (long long)i,
                                (double)scales[i]);
    return MQ_OK;
}

mq_status mq_round_weight_s8(const float *w, int64_t N, int64_t K, int per_channel, const float *scales, int8_t *q) {
    if (N <= 0 || K <= 0) return mq_set_error(MQ_ERR_ARG, "round_weight_s8: bad shape [%lld, %lld]", (long long)N, (long long)K);
    MQ_TRY(mq_check_finite(w, (size_t)N * (size_t)K, "weight"));
    MQ_TRY(check_scales(scales, per_channel ? N : 1, "round_weight_s8"));
    for (int64_t n = 0; n < N; n++) {
        const float *wr = w + n * K;
        const float s = scales[per_channel ? n : 0];
        for (int64_t k = 0; k < K; k++) q[n * K + k] = (int8_t)clampf(nearbyintf(wr[k] / s), -127.f, 127.f);
    }
    return MQ_OK;
}

mq_status mq_quantize_weight_s8(const float *w, int64_t N, int64_t K, int per_channel, int8_t *q, float *scales) {
    if (N <= 0 || K <= 0) return mq_set_error(MQ_ERR_ARG, "quantize_weight_s8: bad shape [%lld, %lld]", (long long)N, (long long)K);
    MQ_TRY(mq_check_finite(w, (size_t)N * (size_t)K, "weight"));
    if (per_channel)
        for (int64_t n = 0; n < N; n++) scales[n] = sym_scale(absmax(w + n * K, K), 127.f);
    else
        scales[0] = sym_scale(absmax(w, N * K), 127.f);
    return mq_round_weight_s8(w, N, K, per_channel, scales, q);
}

static mq_status check_s4_shape(int64_t N, int64_t K, int64_t group, const char *what) {
    if (N <= 0 || K <= 0 || group <= 0 || K % group != 0 || group % 2 != 0)
        return mq_set_error(MQ_ERR_ARG, "%s: K=%lld must be a multiple of an even group size (group=%lld)", what,
                            (long long)K, (long long)group);
    return MQ_OK;
}

mq_status mq_round_weight_s4(const float *w, int64_t N, int64_t K, int64_t group, const float *scales, uint8_t *packed) {
    MQ_TRY(check_s4_shape(N, K, group, "round_weight_s4"));
    MQ_TRY(mq_check_finite(w, (size_t)N * (size_t)K, "weight"));
    const int64_t ng = K / group;
    MQ_TRY(check_scales(scales, N * ng, "round_weight_s4"));
    for (int64_t n = 0; n < N; n++) {
        for (int64_t g = 0; g < ng; g++) {
            const float *wg = w + n * K + g * group;
            const float s = scales[n * ng + g];
            for (int64_t k = 0; k < group; k += 2) {
                int lo = (int)clampf(nearbyintf(wg[k] / s), -7.f, 7.f) + 8;
                int hi = (int)clampf(nearbyintf(wg[k + 1] / s), -7.f, 7.f) + 8;
                packed[(n * K + g * group + k) / 2] = (uint8_t)(lo | (hi << 4));
            }
        }
    }
    return MQ_OK;
}

mq_status mq_quantize_weight_s4(const float *w, int64_t N, int64_t K, int64_t group, uint8_t *packed, float *scales) {
    MQ_TRY(check_s4_shape(N, K, group, "quantize_weight_s4"));
    MQ_TRY(mq_check_finite(w, (size_t)N * (size_t)K, "weight"));
    const int64_t ng = K / group;
    for (int64_t n = 0; n < N; n++)
        for (int64_t g = 0; g < ng; g++) scales[n * ng + g] = sym_scale(absmax(w + n * K + g * group, group), 7.f);
    return mq_round_weight_s4(w, N, K, group, scales, packed);
}

MQ_HOT void mq_dequantize_weight_s4(const uint8_t *packed, int64_t N, int64_t K, int64_t group, const float *scales, float *w) {
    const int64_t ng = K / group;
    for (int64_t n = 0; n < N; n++)
        for (int64_t k = 0; k < K; k += 2) {
            uint8_t b = packed[(n * K + k) / 2];
            float s = scales[n * ng + k / group];
            w[n * K + k] = (float)((int)(b & 15) - 8) * s;
            w[n * K + k + 1] = (float)((int)(b >> 4) - 8) * s;
        }
}

mq_status mq_quantize_rows_s8(const float *x, int64_t rows, int64_t cols, int8_t *q, float *scales) {
    if (rows <= 0 || cols <= 0) return mq_set_error(MQ_ERR_ARG, "quantize_rows_s8: bad shape");
    MQ_TRY(mq_check_finite(x, (size_t)rows * (size_t)cols, "embedding table"));
    for (int64_t r = 0; r < rows; r++) scales[r] = sym_scale(absmax(x + r * cols, cols), 127.f);
    return mq_round_weight_s8(x, rows, cols, 1, scales, q);
}

mq_status mq_check_finite(const float *x, size_t n, const char *what) {
    for (size_t i = 0; i < n; i++)
        if (!isfinite(x[i])) return mq_set_error(MQ_ERR_NUMERIC, "%s contains a non-finite value (%g) at flat index %zu", what, (double)x[i], i);
    return MQ_OK;
}

int mq_any_nonfinite(const float *x, size_t n) {
    int bad = 0;
    for (size_t i = 0; i < n; i++) bad |= (x[i] - x[i] != 0.0f); /* NaN exactly for NaN and Inf; branch-free */
    return bad;
}

mq_status mq_take_floats(float **dst, const float *src, size_t n, const char *what) {
    if (!src) return mq_set_error(MQ_ERR_ARG, "%s is missing", what);
    MQ_TRY(mq_check_finite(src, n, what));
    float *p = mq_alloc(n, sizeof(float));
    if (!p) return mq_set_error(MQ_ERR_NOMEM, "out of memory for %s", what);
    memcpy(p, src, n * sizeof(float));
    mq_free(*dst);
    *dst = p;
    return MQ_OK;
}
