/* observer.c - calibration observers: running min/max, moving average, signed histogram, per-column absmax, and
 * the range choosers (minmax, moving average, percentile, entropy, MSE) and their names.  Design notes in observer.h. */
#include "observer.h"

#include "moments.h"

#include <float.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define OBS_MIN_BINS 16
#define OBS_MAX_BINS (1 << 20)
#define OBS_MAX_LEVELS (1 << 24)
#define OBS_PAR_MIN ((size_t)1 << 16) /* below this many values an update runs serially */
#define OBS_BLOCK 256                 /* bin indices computed per block, then scattered */
#define OBS_PASS ((size_t)1 << 30)    /* values per parallel pass: per-thread uint32 counts cannot overflow */
#define OBS_ENTROPY_MAX 4096          /* |x| bins the KL search runs on at most */
#define OBS_MSE_BINS 8192             /* the MSE search merges the histogram to at most this many bins */
#define OBS_MSE_ZP 1024               /* zero points tried per step (asymmetric) at most */
#define OBS_MSE_GRID 200
#define OBS_MSE_REFINE 20
#define OBS_MSE_ROUNDS 3

struct mq_observer {
    int nbins, center;       /* c = nbins / 2: bin k covers [(k - c) w, (k - c + 1) w) */
    float momentum;
    uint64_t count;
    float min, max;          /* running */
    double mov_min, mov_max; /* moving average */
    double width;            /* w; 0 until the first value */
    double *counts;          /* nbins */
    float *col_absmax;       /* cols, after update_matrix */
    size_t cols;
    uint32_t *scratch;       /* scratch_threads * nbins per-thread counts, all zero between updates */
    int scratch_threads;
    mq_moments *moments;     /* NULL unless tracked (mq_observer_track_moments) */
};

mq_status mq_observer_create(mq_observer **out, int nbins, float momentum) {
    if (!out) return mq_set_error(MQ_ERR_ARG, "observer: out is NULL");
    *out = NULL;
    if (nbins < OBS_MIN_BINS || nbins > OBS_MAX_BINS)
        return mq_set_error(MQ_ERR_ARG, "observer: nbins must be in [16, 1<<20], got %d", nbins);
    if (!(momentum >= 0.f && momentum < 1.f))
        return mq_set_error(MQ_ERR_ARG, "observer: momentum must be in [0, 1), got %g", (double)momentum);
    mq_observer *o = calloc(1, sizeof *o);
    if (!o) return mq_set_error(MQ_ERR_NOMEM, "observer: out of memory");
    o->counts = calloc((size_t)nbins, sizeof *o->counts);
    if (!o->counts) {
        free(o);
        return mq_set_error(MQ_ERR_NOMEM, "observer: out of memory for %d bins", nbins);
    }
    o->nbins = nbins;
    o->center = nbins / 2;
    o->momentum = momentum;
    *out = o;
    return MQ_OK;
}

void mq_observer_destroy(mq_observer *obs) {
    if (!obs) return;
    free(obs->counts);
    free(obs->col_absmax);
    free(obs->scratch);
    mq_moments_destroy(obs->moments);
    free(obs);
}

mq_status mq_observer_reset(mq_observer *obs) {
    if (!obs) return mq_set_error(MQ_ERR_ARG, "observer: obs is NULL");
    memset(obs->counts, 0, (size_t)obs->nbins * sizeof *obs->counts);
    free(obs->col_absmax);
    obs->col_absmax = NULL;
    obs->cols = 0;
    mq_moments_reset(obs->moments);
    obs->count = 0;
    obs->width = 0.0;
    obs->min = obs->max = 0.f;
    obs->mov_min = obs->mov_max = 0.0;
    return MQ_OK;
}

/* ---- update ---------------------------------------------------------------------------------------------- */

/* Min and max of x; returns nonzero if x holds a NaN or Inf (v - v is NaN exactly for those). */
static int stats_block(const float *x, size_t n, float *pmn, float *pmx) {
    float mn = *pmn, mx = *pmx;
    int bad = 0;
#pragma omp simd reduction(min : mn) reduction(max : mx) reduction(| : bad)
    for (size_t i = 0; i < n; i++) {
        float v = x[i];
        bad |= (v - v != 0.0f);
        mn = v < mn ? v : mn;
        mx = v > mx ? v : mx;
    }
    *pmn = mn;
    *pmx = mx;
    return bad;
}

static int batch_stats(const float *x, size_t n, float *pmn, float *pmx) {
    const size_t blk = 8192, nblk = (n + blk - 1) / blk;
    float mn = FLT_MAX, mx = -FLT_MAX;
    int bad = 0;
#pragma omp parallel for schedule(static) reduction(min : mn) reduction(max : mx) reduction(| : bad) \
    if (n >= OBS_PAR_MIN)
    for (size_t b = 0; b < nblk; b++) {
        float lmn = FLT_MAX, lmx = -FLT_MAX;
        bad |= stats_block(x + b * blk, n - b * blk < blk ? n - b * blk : blk, &lmn, &lmx);
        mn = lmn < mn ? lmn : mn;
        mx = lmx > mx ? lmx : mx;
    }
    *pmn = mn;
    *pmx = mx;
    return bad;
}

/* floor(v / 2^k) */
static int64_t floor_shift(int64_t v, int k) {
    if (k >= 62) return v < 0 ? -1 : 0;
    return v >= 0 ? v >> k : -((-v - 1) >> k) - 1;
}

/* Merges the counts in place for a width multiplied by 2^k: bin i goes to c + floor((i - c) / 2^k).  The
   positive side goes up from c, the negative side down from c - 1: each target bin is one already visited. */
static void merge_bins(double *h, int n, int c, int k) {
    for (int t = 0; t < n; t++) {
        const int i = t < n - c ? c + t : n - 1 - t, j = c + (int)floor_shift(i - c, k);
        if (j != i) {
            h[j] += h[i];
            h[i] = 0.0;
        }
    }
}

/* Bin indices of m <= OBS_BLOCK values: floor(x / w) + c clamped to [0, n - 1]; branch-free for vectorisation. */
static void bin_index(const float *x, size_t m, float inv, int n, int c, int *idx) {
    const float ylo = (float)-c, yhi = (float)(n - c);
    for (size_t j = 0; j < m; j++) {
        float y = x[j] * inv;
        y = y >= ylo ? y : ylo; /* written so that a NaN (a value changed after the finiteness check) lands in bin 0 */
        y = y > yhi ? yhi : y;
        int t = (int)y;        /* truncation ... */
        t -= (y < (float)t);   /* ... made floor */
        t += c;
        idx[j] = t < n ? t : n - 1;
    }
}

#define OBS_BIN_ALL(x, len, inv, n, c, h, one)                              \
    do {                                                                    \
        int idx_[OBS_BLOCK];                                                \
        for (size_t i0_ = 0; i0_ < (len); i0_ += OBS_BLOCK) {               \
            size_t m_ = (len) - i0_ < OBS_BLOCK ? (len) - i0_ : OBS_BLOCK; \
            bin_index((x) + i0_, m_, inv, n, c, idx_);                      \
            for (size_t j_ = 0; j_ < m_; j_++) (h)[idx_[j_]] += (one);      \
        }                                                                   \
    } while (0)

static void bin_double(const float *x, size_t n_, float inv, int n, int c, double *h) {
    OBS_BIN_ALL(x, n_, inv, n, c, h, 1.0);
}
static void bin_u32(const float *x, size_t n_, float inv, int n, int c, uint32_t *h) {
    OBS_BIN_ALL(x, n_, inv, n, c, h, 1u);
}

/* Threads for binning n values: parallel only if the per-thread histograms cost at most n / 4 to merge and the
   scratch can be had.  Never fails (falls back to 1). */
static int bin_threads(mq_observer *o, size_t n) {
    int nt = 1;
#ifdef _OPENMP
    if (n >= OBS_PAR_MIN && !omp_in_parallel()) {
        size_t cap = n / (4 * (size_t)o->nbins);
        int mt = omp_get_max_threads();
        nt = (size_t)mt < cap ? mt : (int)cap;
    }
#endif
    if (nt <= 1) return 1;
    if (o->scratch_threads >= nt) return nt;
    if ((size_t)nt > SIZE_MAX / sizeof(uint32_t) / (size_t)o->nbins) return 1;
    uint32_t *s = calloc((size_t)nt * (size_t)o->nbins, sizeof *s);
    if (!s) return 1;
    free(o->scratch);
    o->scratch = s;
    o->scratch_threads = nt;
    return nt;
}

static void bin_all(mq_observer *o, const float *x, size_t n, float inv) {
    const int nb = o->nbins, c = o->center;
    int nt = bin_threads(o, n);
    if (nt <= 1) {
        bin_double(x, n, inv, nb, c, o->counts);
        return;
    }
    for (size_t p0 = 0; p0 < n; p0 += OBS_PASS) {
        size_t pn = n - p0 < OBS_PASS ? n - p0 : OBS_PASS;
        const float *xp = x + p0;
        uint32_t *scratch = o->scratch;
#pragma omp parallel num_threads(nt)
        {
            int t = 0, tn = 1;
#ifdef _OPENMP
            t = omp_get_thread_num();
            tn = omp_get_num_threads();
#endif
            size_t chunk = (pn + (size_t)tn - 1) / (size_t)tn;
            size_t a = chunk * (size_t)t < pn ? chunk * (size_t)t : pn;
            size_t b = pn - a < chunk ? pn : a + chunk;
            bin_u32(xp + a, b - a, inv, nb, c, scratch + (size_t)t * (size_t)nb);
        }
        for (int t = 0; t < nt; t++) {
            uint32_t *s = o->scratch + (size_t)t * (size_t)nb;
            for (int k = 0; k < nb; k++) o->counts[k] += (double)s[k];
            memset(s, 0, (size_t)nb * sizeof *s);
        }
    }
}

static void col_absmax_update(float *ca, const float *x, size_t rows, size_t cols) {
    const size_t blk = 64, nblk = (cols + blk - 1) / blk;
#pragma omp parallel for schedule(static) if (rows * cols >= OBS_PAR_MIN && nblk >= 2)
    for (size_t b = 0; b < nblk; b++) {
        size_t j0 = b * blk, j1 = j0 + blk < cols ? j0 + blk : cols;
        for (size_t r = 0; r < rows; r++) {
            const float *xr = x + r * cols;
            for (size_t j = j0; j < j1; j++) {
                float a = fabsf(xr[j]);
                ca[j] = a > ca[j] ? a : ca[j];
            }
        }
    }
}

/* Validated input (x != NULL, n > 0, cols == 0 or n == rows * cols with cols consistent). */
static mq_status observe(mq_observer *o, const float *x, size_t n, size_t rows, size_t cols) {
    float mn, mx;
    if (batch_stats(x, n, &mn, &mx)) {
        size_t i = 0;
        while (i < n && isfinite(x[i])) i++;
        return mq_set_error(MQ_ERR_NUMERIC, "observer: non-finite value (%s) at index %zu of %zu",
                            isnan(x[i]) ? "NaN" : "Inf", i, n);
    }
    float *ca = NULL;
    if (cols && !o->col_absmax) {
        ca = calloc(cols, sizeof *ca);
        if (!ca) return mq_set_error(MQ_ERR_NOMEM, "observer: out of memory for %zu column maxima", cols);
    }
    if (cols && o->moments) {
        mq_status st = mq_moments_stage(o->moments, x, rows, cols);
        if (st != MQ_OK) {
            free(ca);
            return st;
        }
    }
    /* nothing fails from here on */
    const int nb = o->nbins, c = o->center;
    const double neg = -(double)mn, pos = (double)mx;
    if (o->width == 0.0) {
        double absmax = neg > pos ? neg : pos, w = absmax / c;
        if (w < FLT_MIN) w = FLT_MIN;
        while (w * c < absmax) w = nextafter(w, INFINITY);
        o->width = w;
    } else {
        int k = 0;
        double w = o->width;
        while (neg > c * w || pos > (nb - c) * w) {
            w *= 2.0;
            k++;
        }
        if (k) {
            merge_bins(o->counts, nb, c, k);
            o->width = w;
        }
    }
    bin_all(o, x, n, (float)(1.0 / o->width));
    if (cols) {
        if (ca) {
            o->col_absmax = ca;
            o->cols = cols;
        }
        col_absmax_update(o->col_absmax, x, rows, cols);
    }
    const double m = o->count ? o->momentum : 0.0; /* the first batch initialises */
    o->min = o->count && o->min < mn ? o->min : mn;
    o->max = o->count && o->max > mx ? o->max : mx;
    o->mov_min = m * o->mov_min + (1.0 - m) * mn;
    o->mov_max = m * o->mov_max + (1.0 - m) * mx;
    o->count += (uint64_t)n;
    if (cols && o->moments) mq_moments_commit(o->moments);
    return MQ_OK;
}

mq_status mq_observer_track_moments(mq_observer *obs, int gram) {
    if (!obs) return mq_set_error(MQ_ERR_ARG, "observer: obs is NULL");
    if (obs->count) return mq_set_error(MQ_ERR_STATE, "observer: moments are tracked from the first update (reset first)");
    mq_moments *m = NULL;
    MQ_TRY(mq_moments_create(&m, gram));
    mq_moments_destroy(obs->moments);
    obs->moments = m;
    return MQ_OK;
}

mq_moments *mq_observer_moments(mq_observer *obs) { return obs ? obs->moments : NULL; }

mq_status mq_observer_update(mq_observer *obs, const float *x, size_t n) {
    if (!obs) return mq_set_error(MQ_ERR_ARG, "observer: obs is NULL");
    if (n == 0) return MQ_OK;
    if (!x) return mq_set_error(MQ_ERR_ARG, "observer: x is NULL with n = %zu", n);
    return observe(obs, x, n, 0, 0);
}

mq_status mq_observer_update_matrix(mq_observer *obs, const float *x, size_t rows, size_t cols) {
    if (!obs) return mq_set_error(MQ_ERR_ARG, "observer: obs is NULL");
    if (cols == 0) return mq_set_error(MQ_ERR_ARG, "observer: cols must be > 0");
    if (obs->cols && cols != obs->cols)
        return mq_set_error(MQ_ERR_ARG, "observer: cols must stay %zu, got %zu", obs->cols, cols);
    if (rows == 0) return MQ_OK;
    if (rows > SIZE_MAX / cols)
        return mq_set_error(MQ_ERR_ARG, "observer: matrix size %zu x %zu overflows", rows, cols);
    if (!x) return mq_set_error(MQ_ERR_ARG, "observer: x is NULL for a %zu x %zu matrix", rows, cols);
    return observe(obs, x, rows * cols, rows, cols);
}

/* ---- accessors ------------------------------------------------------------------------------------------- */

static float clampf(double v) {
    if (v > FLT_MAX) return FLT_MAX;
    if (v < -FLT_MAX) return -FLT_MAX;
    return (float)v;
}

mq_status mq_observer_minmax(const mq_observer *obs, float *min, float *max) {
    if (!obs || !min || !max) return mq_set_error(MQ_ERR_ARG, "observer: NULL argument to minmax");
    if (obs->count == 0) return mq_set_error(MQ_ERR_STATE, "observer: no values observed");
    *min = obs->min;
    *max = obs->max;
    return MQ_OK;
}

mq_status mq_observer_moving_minmax(const mq_observer *obs, float *min, float *max) {
    if (!obs || !min || !max) return mq_set_error(MQ_ERR_ARG, "observer: NULL argument to moving_minmax");
    if (obs->count == 0) return mq_set_error(MQ_ERR_STATE, "observer: no values observed");
    if (obs->momentum == 0.f) {
        *min = obs->min;
        *max = obs->max;
    } else {
        *min = clampf(obs->mov_min);
        *max = clampf(obs->mov_max);
    }
    return MQ_OK;
}

uint64_t mq_observer_count(const mq_observer *obs) { return obs ? obs->count : 0; }

mq_status mq_observer_histogram(const mq_observer *obs, const double **counts, int *nbins, float *lo, float *hi) {
    if (!obs || !counts || !nbins || !lo || !hi)
        return mq_set_error(MQ_ERR_ARG, "observer: NULL argument to histogram");
    if (obs->count == 0) return mq_set_error(MQ_ERR_STATE, "observer: no values observed");
    *counts = obs->counts;
    *nbins = obs->nbins;
    *lo = clampf(-obs->center * obs->width);
    *hi = clampf((obs->nbins - obs->center) * obs->width);
    return MQ_OK;
}

mq_status mq_observer_column_absmax(const mq_observer *obs, const float **absmax, size_t *cols) {
    if (!obs || !absmax || !cols) return mq_set_error(MQ_ERR_ARG, "observer: NULL argument to column_absmax");
    if (!obs->col_absmax) return mq_set_error(MQ_ERR_STATE, "observer: no matrix observed (use update_matrix)");
    *absmax = obs->col_absmax;
    *cols = obs->cols;
    return MQ_OK;
}

/* ---- ranges ---------------------------------------------------------------------------------------------- */

/* |x| histogram, bin j = [j w, (j + 1) w); *na = its length without trailing empty bins (>= 1 given data). */
static double *abs_hist(const mq_observer *o, int *na) {
    const int c = o->center, a = o->nbins - c;
    double *h = malloc((size_t)a * sizeof *h);
    if (!h) return NULL;
    for (int j = 0; j < a; j++) h[j] = o->counts[c + j] + (c - 1 - j >= 0 ? o->counts[c - 1 - j] : 0.0);
    int n = a;
    while (n > 1 && h[n - 1] == 0.0) n--;
    *na = n;
    return h;
}

/* q-quantile (q in [0, 1]) of a histogram of m bins of width w starting at e0, linear inside a bin. */
static double hist_quantile(const double *h, int m, double e0, double w, double q) {
    double total = 0.0, cum = 0.0;
    for (int k = 0; k < m; k++) total += h[k];
    const double target = q * total;
    for (int k = 0; k < m; k++) {
        if (h[k] > 0.0 && cum + h[k] >= target) {
            double f = (target - cum) / h[k];
            f = f < 0.0 ? 0.0 : (f > 1.0 ? 1.0 : f);
            return e0 + w * (k + f);
        }
        cum += h[k];
    }
    return e0 + w * m;
}

/* TensorRT-style smoothing of counts: zero bins get eps, taken evenly from the non-zero ones (eps reduced so
   none drops below half its value).  Returns 0 if all bins are zero. */
static int smooth(double *p, int n) {
    int nz = 0;
    double minnz = INFINITY;
    for (int k = 0; k < n; k++) {
        if (p[k] == 0.0) nz++;
        else if (p[k] < minnz) minnz = p[k];
    }
    if (nz == n) return 0;
    if (nz == 0) return 1;
    double eps = 1e-4, eps1 = eps * nz / (n - nz);
    if (eps1 > 0.5 * minnz) {
        eps1 = 0.5 * minnz;
        eps = eps1 * (n - nz) / nz;
    }
    for (int k = 0; k < n; k++) p[k] = p[k] == 0.0 ? eps : p[k] - eps1;
    return 1;
}

static mq_status range_entropy(const mq_observer *o, int levels, double absmax, double *thr) {
    int na;
    double *h = abs_hist(o, &na);
    if (!h) return mq_set_error(MQ_ERR_NOMEM, "observer: out of memory for the entropy histogram");
    double w = o->width;
    if (na > OBS_ENTROPY_MAX) { /* merge groups of f bins (in place: group j reads from j * f >= j) */
        const int f = (na + OBS_ENTROPY_MAX - 1) / OBS_ENTROPY_MAX, m = (na + f - 1) / f;
        for (int j = 0; j < m; j++) {
            double s = 0.0;
            for (int k = j * f; k < na && k < (j + 1) * f; k++) s += h[k];
            h[j] = s;
        }
        na = m;
        w *= f;
    }
    const int nq = levels / 2;
    *thr = absmax;
    if (na < nq) {
        free(h);
        return MQ_OK;
    }
    double *p = malloc(2 * (size_t)na * sizeof *p);
    if (!p) {
        free(h);
        return mq_set_error(MQ_ERR_NOMEM, "observer: out of memory for the entropy search");
    }
    double *q = p + na, total = 0.0, prefix = 0.0, best = INFINITY;
    int best_i = na;
    for (int k = 0; k < na; k++) total += h[k];
    for (int k = 0; k < nq; k++) prefix += h[k];
    for (int i = nq; i <= na; prefix += (i < na ? h[i] : 0.0), i++) {
        if (prefix <= 0.0) continue; /* Q would be empty */
        memcpy(p, h, (size_t)i * sizeof *p);
        p[i - 1] += total - prefix;
        for (int j = 0; j < nq; j++) { /* Q: bins 0..i-1 (no outliers) in nq buckets, spread over P's non-zeros */
            const int st = (int)((int64_t)j * i / nq), en = (int)((int64_t)(j + 1) * i / nq);
            double s = 0.0;
            int nz = 0;
            for (int k = st; k < en; k++) {
                s += h[k];
                nz += p[k] != 0.0;
            }
            const double v = nz ? s / nz : 0.0;
            for (int k = st; k < en; k++) q[k] = p[k] != 0.0 ? v : 0.0;
        }
        if (!smooth(p, i) || !smooth(q, i)) continue;
        double kl = 0.0; /* smoothing keeps the sums: total and prefix */
        for (int k = 0; k < i; k++) {
            const double pk = p[k] / total, qk = q[k] / prefix;
            kl += pk * log(pk / qk);
        }
        if (kl < best) best = kl, best_i = i;
    }
    const double t = best_i * w;
    *thr = t < absmax ? t : absmax;
    free(p);
    free(h);
    return MQ_OK;
}

/* MSE model, in bin units (w = 1; bin k covers [k - c, k - c + 1)), values uniform inside a bin, quantization
   grid = the multiples of the step s (0 exactly representable, as with qparams' zero points), clipped values go
   to the range ends a and b (themselves multiples of s). */
typedef struct {
    double *h, *s0, *s1, *s2, *r; /* counts; prefix sums of count, count * m, count * m^2 (m: bin centre), and of
                                     the rounding error for the current step */
    int n, c;
} mse_ctx;

/* integral over [x0, x1] of (x - nearest multiple of s)^2, from g(x) = k s^3 / 12 + u^3 / 3 (x = k s + u) */
static double saw2(double x0, double x1, double s) {
    const double k0 = rint(x0 / s), k1 = rint(x1 / s), u0 = x0 - k0 * s, u1 = x1 - k1 * s;
    return (k1 - k0) * s * s * s / 12.0 + (u1 * u1 * u1 - u0 * u0 * u0) / 3.0;
}

static double cube(double x) { return x * x * x; }

static void mse_round_prefix(mse_ctx *m, double s) {
    m->r[0] = 0.0;
    for (int k = 0; k < m->n; k++)
        m->r[k + 1] = m->r[k] + (m->h[k] > 0.0 ? m->h[k] * saw2(k - m->c, k - m->c + 1, s) : 0.0);
}

/* Expected total squared error for the range [a, b] (a < b) with step s; m->r must hold step s. */
static double mse_err(const mse_ctx *m, double a, double b, double s) {
    const int n = m->n, c = m->c;
    const double xa = fmin(fmax(a, -c), n - c), xb = fmin(fmax(b, -c), n - c);
    double e = 0.0;
    int k = (int)floor(xa) + c; /* below a: bins [0, k) whole, bin k from its lower edge to xa */
    if (k < n) e += m->h[k] * (cube(a - (k - c)) - cube(a - xa)) / 3.0;
    else k = n;
    double t = m->s2[k] - 2.0 * a * m->s1[k] + a * a * m->s0[k];
    e += (t > 0.0 ? t : 0.0) + m->s0[k] / 12.0;
    k = (int)floor(xb) + c; /* above b: bin k from xb to its upper edge, bins (k, n) whole */
    if (k < n) {
        e += m->h[k] * (cube(k - c + 1 - b) - cube(xb - b)) / 3.0;
        const double c0 = m->s0[n] - m->s0[k + 1], c1 = m->s1[n] - m->s1[k + 1], c2 = m->s2[n] - m->s2[k + 1];
        t = c2 - 2.0 * b * c1 + b * b * c0;
        e += (t > 0.0 ? t : 0.0) + c0 / 12.0;
    }
    if (xa < xb) { /* inside: rounding error */
        const int ka = (int)floor(xa) + c, kb = (int)ceil(xb) + c - 1;
        if (ka >= kb) e += m->h[ka] * saw2(xa, xb, s);
        else
            e += m->h[ka] * saw2(xa, ka - c + 1, s) + m->h[kb] * saw2(kb - c, xb, s) + (m->r[kb] - m->r[ka + 1]);
    }
    return e;
}

static mq_status range_mse(const mq_observer *o, int symmetric, int levels, double mn, double mx, double *lo,
                           double *hi) {
    int sh = 0; /* merge to at most OBS_MSE_BINS bins (exact, around 0) */
    while ((o->nbins >> sh) > OBS_MSE_BINS) sh++;
    const int c = (int)-floor_shift(-o->center, sh), n = c + (int)floor_shift(o->nbins - 1 - o->center, sh) + 1;
    const double w = ldexp(o->width, sh);
    double *buf = calloc(5 * ((size_t)n + 1), sizeof *buf);
    if (!buf) return mq_set_error(MQ_ERR_NOMEM, "observer: out of memory for the MSE search");
    mse_ctx m = {buf, buf + n + 1, buf + 2 * (n + 1), buf + 3 * (n + 1), buf + 4 * (n + 1), n, c};
    for (int i = 0; i < o->nbins; i++) m.h[c + floor_shift(i - o->center, sh)] += o->counts[i];
    for (int k = 0; k < n; k++) {
        const double hk = m.h[k], ck = k - c + 0.5;
        m.s0[k + 1] = m.s0[k] + hk;
        m.s1[k + 1] = m.s1[k] + hk * ck;
        m.s2[k + 1] = m.s2[k] + hk * ck * ck;
    }
    /* symmetric: hi = t * absmax, s = hi / (levels/2 - 1); asymmetric: s = t * (h0 - l0) / (levels - 1) and every
       zero point z (range [-z s, (levels - 1 - z) s]) */
    const double l0 = fmin(mn, 0.0) / w, h0 = fmax(mx, 0.0) / w;
    const double span = symmetric ? fmax(-l0, h0) : h0 - l0, sdiv = symmetric ? levels / 2 - 1 : levels - 1;
    const int nz = symmetric ? 0 : (levels - 1 < OBS_MSE_ZP ? levels - 1 : OBS_MSE_ZP);
    double t0 = 0.0, t1 = 1.0, bt = 1.0, ba = 0.0, bb = 0.0, best = INFINITY;
    for (int round = 0, steps = OBS_MSE_GRID; round < OBS_MSE_ROUNDS && span > 0.0; round++, steps = OBS_MSE_REFINE) {
        const double dt = (t1 - t0) / steps;
        for (int it = 0; it <= steps; it++) {
            const double t = t0 + it * dt, s = t * span / sdiv;
            if (!(s > 0.0)) continue;
            mse_round_prefix(&m, s);
            for (int iz = 0; iz <= nz; iz++) {
                const double z = symmetric ? 0.5 * (levels - 2) : rint(iz * (levels - 1.0) / nz);
                const double a = symmetric ? -t * span : -z * s, b = symmetric ? t * span : (levels - 1 - z) * s;
                const double e = mse_err(&m, a, b, s);
                if (e < best) best = e, bt = t, ba = a, bb = b;
            }
        }
        t0 = fmax(0.0, bt - dt);
        t1 = fmin(1.0, bt + dt);
    }
    free(buf);
    *lo = ba * w + 0.0; /* no -0 */
    *hi = bb * w;
    return MQ_OK;
}

/* Converts to float; a degenerate range is widened by max(1e-6 |x|, 1e-8) on each side. */
static void finish_range(double l, double h, int symmetric, float *olo, float *ohi) {
    if (symmetric) {
        h = fmax(fabs(l), fabs(h));
        l = -h;
    }
    float fl = clampf(l), fh = clampf(h);
    if (!(fl < fh)) {
        const double e = fmax(1e-6 * fmax(fabs(l), fabs(h)), 1e-8);
        fl = clampf(l - e);
        fh = clampf(h + e);
        if (!(fl < fh)) {
            if (fh < FLT_MAX) fh = nextafterf(fh, INFINITY);
            else fl = nextafterf(fl, -INFINITY);
        }
    }
    *olo = fl;
    *ohi = fh;
}

const char *mq_range_method_name(int method) {
    static const char *const names[MQ_RANGE_COUNT] = {
        [MQ_RANGE_MINMAX] = "minmax", [MQ_RANGE_MOVING_AVERAGE] = "moving-average", [MQ_RANGE_PERCENTILE] = "percentile",
        [MQ_RANGE_ENTROPY] = "entropy", [MQ_RANGE_MSE] = "mse"};
    return method >= 0 && method < MQ_RANGE_COUNT ? names[method] : NULL;
}

mq_status mq_observer_compute_range(const mq_observer *obs, mq_range_method method, double param, int symmetric,
                                    int levels, float *lo, float *hi) {
    if (!obs || !lo || !hi) return mq_set_error(MQ_ERR_ARG, "observer: NULL argument to compute_range");
    if ((int)method < 0 || (int)method >= (int)MQ_RANGE_COUNT)
        return mq_set_error(MQ_ERR_ARG, "observer: unknown range method %d", (int)method);
    if (levels < 4 || levels > OBS_MAX_LEVELS)
        return mq_set_error(MQ_ERR_ARG, "observer: levels must be in [4, 1<<24], got %d", levels);
    if (method == MQ_RANGE_PERCENTILE && !(param > 50.0 && param <= 100.0))
        return mq_set_error(MQ_ERR_ARG, "observer: percentile must be in (50, 100], got %g", param);
    if (obs->count == 0) return mq_set_error(MQ_ERR_STATE, "observer: no values observed");
    const double mn = obs->min, mx = obs->max, absmax = fmax(fabs(mn), fabs(mx)), w = obs->width;
    double rlo = mn, rhi = mx;
    mq_status st = MQ_OK;
    switch (method) {
    case MQ_RANGE_MINMAX: break;
    case MQ_RANGE_MOVING_AVERAGE:
        rlo = obs->mov_min;
        rhi = obs->mov_max;
        break;
    case MQ_RANGE_PERCENTILE: {
        const double p = param / 100.0;
        if (symmetric) {
            int na;
            double *h = abs_hist(obs, &na);
            if (!h) return mq_set_error(MQ_ERR_NOMEM, "observer: out of memory for the percentile histogram");
            rhi = fmin(hist_quantile(h, na, 0.0, w, p), absmax);
            rlo = -rhi;
            free(h);
        } else {
            const double e0 = -obs->center * w;
            rlo = fmin(fmax(hist_quantile(obs->counts, obs->nbins, e0, w, 1.0 - p), mn), mx);
            rhi = fmin(fmax(hist_quantile(obs->counts, obs->nbins, e0, w, p), mn), mx);
        }
        break;
    }
    case MQ_RANGE_ENTROPY: {
        double t = absmax;
        st = range_entropy(obs, levels, absmax, &t);
        rlo = symmetric ? -t : fmax(mn, -t);
        rhi = symmetric ? t : fmin(mx, t);
        break;
    }
    case MQ_RANGE_MSE:
        st = range_mse(obs, symmetric, levels, mn, mx, &rlo, &rhi);
        break;
    default: break; /* rejected above */
    }
    if (st != MQ_OK) return st;
    finish_range(rlo, rhi, symmetric, lo, hi);
    return MQ_OK;
}
