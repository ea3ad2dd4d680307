/* observer.h - calibration observers: running statistics of an activation tensor, used to choose the int8
 * clipping range [lo, hi] of a static quantization.
 *
 * An observer keeps: the running (global) min/max, a moving-average min/max, the number of values seen, a
 * signed histogram of all values, and (after update_matrix) the running per-column max |x| for SmoothQuant.
 *
 * Histogram design
 *   nbins bins of equal width w, anchored at 0: with c = nbins / 2 (rounded down), bin k covers
 *   [(k - c) * w, (k - c + 1) * w), so the histogram range is [-c * w, (nbins - c) * w] and 0 is always a bin
 *   edge (the |x| histogram is an exact fold: |x|-bin j = bin c + j plus bin c - 1 - j).  The first batch with
 *   data sets w = absmax / c (at least FLT_MIN, so an all-zero batch works).  When a later batch does not fit,
 *   w is doubled k times (the smallest k that fits) and the counts are merged in place: old bin i goes to
 *   c + floor((i - c) / 2^k).  Merging is exact (no count is lost or split), and since w only doubles, a merged
 *   histogram equals the one direct binning with the final w would give (but for values that sat exactly on
 *   the old top edge).  A value on the top edge of the range goes to the last bin.  Counts are doubles (exact to
 *   2^53).  Each update is O(n + nbins): one pass for min/max/finiteness, one computing bin indices
 *   (vectorised), scatter-adds; with OpenMP into per-thread uint32 histograms when n >= 65536 and n >= 8 nbins.
 *
 * Thread safety: an observer may be used by one thread at a time (update uses OpenMP internally).
 * Ownership: obs owns everything it allocates; pointers it returns stay valid until the next update, reset or
 * destroy of that observer.
 */
#ifndef MQ_OBSERVER_H
#define MQ_OBSERVER_H

#include <stddef.h>
#include <stdint.h>

#include "moments.h"
#include "status.h"

typedef struct mq_observer mq_observer;
typedef enum {
    MQ_RANGE_MINMAX,
    MQ_RANGE_MOVING_AVERAGE,
    MQ_RANGE_PERCENTILE,
    MQ_RANGE_ENTROPY,
    MQ_RANGE_MSE,
    MQ_RANGE_COUNT
} mq_range_method;
/* The method's name as users write it ("minmax", "moving-average", "percentile", "entropy", "mse"), or NULL outside
   [0, MQ_RANGE_COUNT). */
const char *mq_range_method_name(int method);

/* nbins in [16, 1 << 20] (any value, odd is fine); momentum in [0, 1): 0 = plain running min/max, > 0 = moving
   average min/max per update call (avg = momentum * avg + (1 - momentum) * batch_min; the first batch
   initialises).  *out is NULL on failure. */
mq_status mq_observer_create(mq_observer **out, int nbins, float momentum);
void mq_observer_destroy(mq_observer *obs); /* NULL-safe */
/* Forgets all data, including the column count of update_matrix. */
mq_status mq_observer_reset(mq_observer *obs);
/* x: n floats.  NaN or Inf -> MQ_ERR_NUMERIC (state unchanged).  n == 0 is a no-op (x may then be NULL). */
mq_status mq_observer_update(mq_observer *obs, const float *x, size_t n);
/* x: row-major [rows, cols]; also keeps the per-column max |x|.  cols > 0 and the same on every call
   (MQ_ERR_ARG otherwise; reset forgets it).  rows == 0 is a no-op. */
mq_status mq_observer_update_matrix(mq_observer *obs, const float *x, size_t rows, size_t cols);
/* Also keep the moments (moments.h) of every update_matrix input: column sums, column sums on a u8 grid once one
   is set (mq_moments_set_grid on mq_observer_moments), and with gram != 0 the Gram matrix X^T X.  Before the first
   update (MQ_ERR_STATE after; reset forgets the sums but keeps tracking).  1-D updates do not feed the moments. */
mq_status mq_observer_track_moments(mq_observer *obs, int gram);
/* The observer's moments (owned by obs), NULL unless tracked. */
mq_moments *mq_observer_moments(mq_observer *obs);
/* Running min/max.  MQ_ERR_STATE if no value was seen. */
mq_status mq_observer_minmax(const mq_observer *obs, float *min, float *max);
/* Moving-average min/max (== minmax when momentum is 0).  MQ_ERR_STATE if no value was seen. */
mq_status mq_observer_moving_minmax(const mq_observer *obs, float *min, float *max);
uint64_t mq_observer_count(const mq_observer *obs); /* values seen; 0 for NULL */
/* Bin counts (owned by obs) and the histogram's range [lo, hi] (bin edges: linspace(lo, hi, nbins + 1)).
   MQ_ERR_STATE if no value was seen. */
mq_status mq_observer_histogram(const mq_observer *obs, const double **counts, int *nbins, float *lo, float *hi);
/* Per-column max |x| (owned by obs).  MQ_ERR_STATE before the first update_matrix with rows > 0. */
mq_status mq_observer_column_absmax(const mq_observer *obs, const float **absmax, size_t *cols);

/* Chooses the clipping range [*lo, *hi] (lo < hi always; a degenerate range is widened by max(1e-6 |x|, 1e-8))
   for quantization to `levels` integer levels, levels in [4, 1 << 24] (256 for 8 bit).  symmetric != 0 gives
   lo == -hi.  The result lies inside the observed [min, max] (symmetric: [-absmax, absmax]) except for
   MSE asymmetric (see below).  PERCENTILE, ENTROPY and MSE use the whole histogram (momentum plays no part).
   MINMAX      running min/max.  Symmetric: absmax of those.
   MOVING_AVERAGE  the moving-average min/max (== MINMAX when momentum is 0).  Symmetric: absmax of those.
   PERCENTILE  param = p in (50, 100].  Asymmetric: lo = (100 - p)-th, hi = p-th percentile of x; symmetric:
               hi = p-th percentile of |x|.  Linear interpolation inside a bin, clamped to the observed range.
   ENTROPY     TensorRT KL calibration on the |x| histogram (trailing empty bins dropped; if it has more than
               4096 bins, groups of adjacent bins are merged first to keep the search O(4096^2)).  For each
               candidate i in [levels/2, nbins_abs]: P = bins 0..i-1 with the mass beyond added to bin i-1;
               Q = bins 0..i-1 (without the outliers, as TensorRT) merged into levels/2 buckets and expanded back
               evenly over the bins where P is non-zero; both smoothed as counts (zero bins get 1e-4, taken from
               the non-zero ones), then normalised; t = i * w_abs for the i minimising KL(P||Q) (clamped to absmax).
               Symmetric [-t, t]; asymmetric [max(min, -t), min(max, t)].  If nbins_abs < levels/2: t = absmax.
   MSE         minimises the expected squared quantization error over the histogram (merged to <= 8192 bins),
               values taken uniform inside each bin: clipping error (exact integral of (x - end)^2 over the part
               beyond a range end) plus rounding error (exact integral of the squared distance to the nearest grid
               point over the part inside).  The grid is the one qparams uses: multiples of the step s, i.e. 0 is
               exact.  Symmetric: hi = t * absmax, s = hi / (levels/2 - 1), t = k / G, k = 1..G (G = 200).
               Asymmetric (jointly): s = t * (max(max,0) - min(min,0)) / (levels - 1), t = k / G, k = 1..G, and for
               each s every zero point z in [0, levels - 1] (at most 1025 evenly spread ones): range
               [-z s, (levels - 1 - z) s] -- exactly the ranges asymmetric u8 qparams can represent, so the result
               contains 0 and may extend beyond the data by < s/2.  Then two refinement rounds of 20 steps of t
               over +-1 previous step around the best t (t <= 1).  Cost O(242 * (bins + levels)).
   Errors: MQ_ERR_ARG for bad arguments, MQ_ERR_STATE if no value was seen, MQ_ERR_NOMEM. */
mq_status mq_observer_compute_range(const mq_observer *obs, mq_range_method method, double param, int symmetric,
                                    int levels, float *lo, float *hi);

#endif
