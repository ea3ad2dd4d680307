/* wo_matmul.c - the weight-only matmul (wo_matmul.h).
 *
 * Storage: panel p holds output columns [32 p, 32 p + 32), k-major: S8 as 32 int8 per k; S4 as 16 bytes per k, byte
 * j holding column j (low nibble) and column j + 16 (high nibble); F32 as 32 floats per k; scales as [panel][scale
 * row][32] (one scale row for S8, K / group_size for S4, none for F32). Columns past N are zero weights with zero
 * scales. On the exact path, per k quad: S8 128 int8, column c's four k at 4 c (K padded to quads with zeros); S4 64
 * bytes, columns c and c + 16's four k at 4 c (low and high nibbles); and per scale row 128 x each column's sum of
 * weights.
 *
 * Kernels: a tile is mr rows x 32 columns, accumulated in registers over k (AVX-512: up to 12 rows x 2 zmm; AVX2:
 * up to 3 rows x 4 ymm; portable C: up to 4 rows with fmaf), its B operand read from an f32 slice buffer or converted
 * in registers from the stored weights, then finished (column scale, bias, epilogue) straight into y (AVX-512) or
 * through finish_tile. The conversion (cvt_*) is shared by both paths of an ISA, and every path does the same IEEE
 * operations in the same order, hence the same bits (wo_matmul.h). The exact path (S8, S4 on avx512_vnni) has
 * tiles of its own (4 rows x 32 columns x 3 byte planes, int32) over rows of x quantized per task (xq_row), and the
 * same AVX-512 finish.
 */
#include "wo_matmul.h"

#include <immintrin.h>
#include <float.h>
#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "qparams.h"
#include "vecmath.h"

#define NR MQ_WO_PANEL
#define MR_AVX512 12
#define MR_AVX2 3
#define MR_C 4
#define MR_MAX 12
#define MR_DIRECT 8 /* AVX-512 rows per tile reading x in place (12 rows' offsets in registers spilled; 6-10 measured
                       alike) */
#define CHUNK_ROWS 240 /* at most this many rows per task */
#define FUSED_BLOCKS 3 /* up to this many row blocks, each converts the stored weights in registers (measured: at
                          M = 13..36 faster than converting a panel once and reading it back) */
#define KC 256         /* k per block of the converted-panel path (a 32 KB slice of a panel) when K > KC_ONE */
#define KC_ONE 512     /* up to this K, one block (a panel of at most 64 KB; measured faster than 256 + 128) */
#define APACK_LD (KC + 16) /* row stride of a chunk's k block of x, copied: not a multiple of 4 KB, and a constant
                               (the AVX-512 tiles address its rows by immediates) */
#define GROUP_PANELS 64    /* at most this many panels per task (bounds its partial sums at 1.9 MB) */
#define XQ_MR 4           /* exact path: rows per tile (4 rows x 3 planes x 2 zmm: 24 int32 accumulators) */
#define XQ_QUAD (3 * XQ_MR) /* exact path: int32 per k quad of a packed tile of x (XQ_MR rows x 3 byte planes) */
#define XQ_CHUNK_BYTES (512 * 1024) /* exact path: a row chunk's packed x, at most this (or one tile) */
#define XQ_MAX_K 65536    /* exact path: up to this K, 255 x 128 x K fits the int32 accumulators */
#define XQ_ONE 8388607.f  /* exact path: a row's largest |x| becomes this integer (2^23 - 1) */

#define AI inline __attribute__((always_inline))
#define AVX512 MQ_TARGET_AVX512
#define AVX2 MQ_TARGET_AVX2

static const int ISA_TILE_ROWS[] = {[MQ_VEC_C] = MR_C, [MQ_VEC_AVX2] = MR_AVX2, [MQ_VEC_AVX512] = MR_AVX512};
typedef enum { SRC_F32, SRC_S8, SRC_S4 } wo_src; /* where a tile's B operand comes from */

/* The k range a tile kernel multiplies: [k0, k1), B from the converted slice `panel` (row k at panel + (k - k0) * NR;
   SRC_F32; the stored-weight sources take all of K), the tile's rows of x at a (column k at a[r * lda + k - k0]).
   A range after the first starts from the tile's partial sums in `part` [mr, NR]; a range that is not the last
   leaves its sums there (the kernel's `o` is NULL) instead of finishing the tile. */
typedef struct {
    const float *panel;
    int64_t k0, k1, lda;
    float *part;
} wo_span;

/* Where a finished tile goes, every pointer at the tile's first row and column: y = acc (* colscale, S8) (* alpha
   unless 1) (* rs[r]) (+ bias), then + residual or GELU (mq_wo_output); ncols valid columns of the 32. */
typedef struct {
    const float *colscale, *rs, *bias, *res;
    float alpha;
    mq_epilogue epi;
    float *y;
    int64_t ldy;
    int ncols;
} wo_out;

struct mq_wo_matrix {
    mq_wo_layout lay;
    int64_t P;          /* panels, ceil(N / NR) */
    int64_t group;      /* k per scale row: K (S8) or group_size (S4) */
    int64_t n_groups;   /* scale rows per panel */
    size_t panel_bytes; /* stored bytes per panel */
    uint8_t *q;
    float *scales;
    int32_t *colsum128; /* exact path: [P][scale row][NR], 128 x the sum of a column's int8 (S4: nibble - 8) weights
                           over the scale row's k (S8: all of K) */
    int64_t K4;         /* exact path: k quads, ceil(K / 4) */
    mq_vec_isa isa;
    int exact; /* S8, S4 on avx512_vnni: the exact integer path (wo_matmul.h) */
    int mr;    /* rows per tile: ISA_TILE_ROWS[isa] */
    char impl[48];
};

/* The stored weights of panel p and the scale row g of it (k in [g group, (g + 1) group)). */
static inline const uint8_t *panel_weights(const mq_wo_matrix *w, int64_t p) { return w->q + (size_t)p * w->panel_bytes; }
static inline const float *panel_scales(const mq_wo_matrix *w, int64_t p, int64_t g) {
    return w->scales + ((size_t)p * (size_t)w->n_groups + (size_t)g) * NR;
}
/* The end of k's scale row, at most k1. */
static inline int64_t scale_row_end(const mq_wo_matrix *w, int64_t k, int64_t k1) {
    const int64_t end = (k / w->group + 1) * w->group;
    return end < k1 ? end : k1;
}
static inline wo_src stored_src(const mq_wo_matrix *w) {
    return w->lay.format == MQ_WO_S8 ? SRC_S8 : w->lay.format == MQ_WO_S4 ? SRC_S4 : SRC_F32;
}
/* F32: panel p's weights from k0 on, read in place (no conversion). */
static inline const float *panel_f32(const mq_wo_matrix *w, int64_t p, int64_t k0) {
    return (const float *)panel_weights(w, p) + k0 * NR;
}
static inline size_t bytes_per_k(wo_src src) { return src == SRC_S4 ? NR / 2 : NR; }

/* ------------------------------------------------------------------ epilogue */

/* GELU-erf of one value; every ISA's loop below inlines it, so the same operations vectorize at each width (no
   fused multiply-adds: -std=c11 keeps contraction off), and give the same bits. */
static MQ_INLINE float gelu_erf_one(float x) {
    const float z = x * 0.70710678118654752f;
    const float az = fabsf(z);
    const float t = 1.f / (1.f + 0.3275911f * az);
    const float poly = ((((1.061405429f * t - 1.453152027f) * t + 1.421413741f) * t - 0.284496736f) * t + 0.254829592f) * t;
    const float erf_abs = 1.f - poly * mq_exp_neg(az * az);
    return 0.5f * x * (1.f + (z < 0.f ? -erf_abs : erf_abs));
}

MQ_HOT void mq_gelu_erf_inplace(float *v, int64_t n) {
#pragma omp simd
    for (int64_t i = 0; i < n; i++) v[i] = gelu_erf_one(v[i]);
}

/* gelu_erf_one on the lanes of *v in place, operation for operation (the same bits): gelu_v8 (AVX2's ymm) and
   gelu_v16 (AVX-512's zmm) from one body. */
#define DEFINE_GELU(name, vf, vi, exp_neg, target)                                                                     \
    static AI target void name(vf *v) {                                                                                \
        const vf zero = {0}, x = *v;                                                                                   \
        const vf z = x * 0.70710678118654752f;                                                                         \
        const vf az = (vf)((vi)z & 0x7fffffff);                                                                        \
        const vf t = 1.f / (1.f + 0.3275911f * az);                                                                    \
        const vf poly = ((((1.061405429f * t - 1.453152027f) * t + 1.421413741f) * t - 0.284496736f) * t +            \
                         0.254829592f) * t;                                                                            \
        vf e = az * az;                                                                                                \
        exp_neg(&e);                                                                                                   \
        const vf erf_abs = 1.f - poly * e;                                                                             \
        const vi neg = z < zero;                                                                                       \
        const vf erf = (vf)(((vi)erf_abs & ~neg) | ((vi)(-erf_abs) & neg));                                            \
        *v = 0.5f * x * (1.f + erf);                                                                                   \
    }
DEFINE_GELU(gelu_v8, mq_v8, mq_v8i, mq_exp_neg_v8, AVX2)
DEFINE_GELU(gelu_v16, mq_v16, mq_v16i, mq_exp_neg_v16, AVX512)

/* The finish of a tile from its sums in `tile` (the portable path; AVX-512 and AVX2 do the same from registers). */
static void finish_tile(const float *tile, int mr, const wo_out *o) {
    for (int r = 0; r < mr; r++) {
        const float *t = tile + r * NR, *res = o->res ? o->res + r * o->ldy : NULL;
        float *y = o->y + r * o->ldy;
#pragma omp simd
        for (int c = 0; c < o->ncols; c++) {
            float v = o->colscale ? t[c] * o->colscale[c] : t[c];
            if (o->alpha != 1.f) v *= o->alpha;
            if (o->rs) v *= o->rs[r];
            if (o->bias) v += o->bias[c];
            if (res) v += res[c];
            y[c] = v;
        }
        if (o->epi == MQ_EPI_GELU) mq_gelu_erf_inplace(y, o->ncols);
    }
}

/* ------------------------------------------------------------------ AVX-512 */

static AI AVX512 __m512 gelu_zmm(__m512 v) {
    mq_v16 g = (mq_v16)v;
    gelu_v16(&g);
    return (__m512)g;
}

/* The finish of a tile (finish_tile) from its sums in registers, times xs[r] 2^xe[r] after the column scale where xs
   is given (the exact path's row scales: the product rounded once, also where it is denormal); GELU in registers
   (re-reading a stored row would stall). */
static AI AVX512 void finish_avx512(const __m512 acc[][2], const int mr, const wo_out *o, const float *xs,
                                    const float *xe) {
    const int c0 = o->ncols < 16 ? o->ncols : 16, c1 = o->ncols - c0;
    const __mmask16 m[2] = {(__mmask16)((1u << c0) - 1u), (__mmask16)((1u << c1) - 1u)};
    __m512 cs[2], b[2];
    for (int h = 0; h < 2; h++) {
        cs[h] = o->colscale ? _mm512_maskz_loadu_ps(m[h], o->colscale + 16 * h) : _mm512_setzero_ps();
        b[h] = o->bias ? _mm512_maskz_loadu_ps(m[h], o->bias + 16 * h) : _mm512_setzero_ps();
    }
#pragma GCC unroll 12
    for (int r = 0; r < mr; r++)
        for (int h = 0; h < 2; h++) {
            __m512 v = acc[r][h];
            if (o->colscale) v = _mm512_mul_ps(v, cs[h]);
            if (xs) v = _mm512_scalef_ps(_mm512_mul_ps(v, _mm512_set1_ps(xs[r])), _mm512_set1_ps(xe[r]));
            if (o->alpha != 1.f) v = _mm512_mul_ps(v, _mm512_set1_ps(o->alpha));
            if (o->rs) v = _mm512_mul_ps(v, _mm512_set1_ps(o->rs[r]));
            if (o->bias) v = _mm512_add_ps(v, b[h]);
            if (o->res) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m[h], o->res + r * o->ldy + 16 * h));
            if (o->epi == MQ_EPI_GELU) v = gelu_zmm(v);
            _mm512_mask_storeu_ps(o->y + r * o->ldy + 16 * h, m[h], v);
        }
}

static AI AVX512 void cvt_avx512(wo_src src, const uint8_t *q, __m512 s0, __m512 s1, __m512 *b0, __m512 *b1) {
    __m512i i0, i1;
    if (src == SRC_S8) {
        i0 = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)q));
        i1 = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(q + 16)));
    } else {
        const __m128i v = _mm_loadu_si128((const __m128i *)q), m = _mm_set1_epi8(15);
        const __m512i eight = _mm512_set1_epi32(8);
        i0 = _mm512_sub_epi32(_mm512_cvtepu8_epi32(_mm_and_si128(v, m)), eight);
        i1 = _mm512_sub_epi32(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(v, 4), m)), eight);
    }
    *b0 = _mm512_cvtepi32_ps(i0);
    *b1 = _mm512_cvtepi32_ps(i1);
    if (src == SRC_S4) {
        *b0 = _mm512_mul_ps(*b0, s0);
        *b1 = _mm512_mul_ps(*b1, s1);
    }
}

/* lda is sp->lda, or the constant APACK_LD for a chunk's copied rows: then each row's x is an immediate offset from
   one pointer (12 row offsets in registers left too few for the loop, and it spilled; with x in place, tiles of
   the row chunks have at most MR_DIRECT rows). */
static AI AVX512 void tile_avx512_n(const int mr, const wo_src src, const int64_t lda, const mq_wo_matrix *w,
                                    int64_t p, const wo_span *sp, const float *a, const wo_out *o) {
    const int64_t K = w->lay.K;
    __m512 acc[MR_AVX512][2];
#pragma GCC unroll 12
    for (int r = 0; r < mr; r++) {
        acc[r][0] = sp->k0 ? _mm512_loadu_ps(sp->part + r * NR) : _mm512_setzero_ps();
        acc[r][1] = sp->k0 ? _mm512_loadu_ps(sp->part + r * NR + 16) : _mm512_setzero_ps();
    }
    if (src == SRC_F32) {
        for (int64_t k = sp->k0; k < sp->k1; k++) {
            const float *bk = sp->panel + (k - sp->k0) * NR;
            const __m512 b0 = _mm512_loadu_ps(bk), b1 = _mm512_loadu_ps(bk + 16);
#pragma GCC unroll 12
            for (int r = 0; r < mr; r++) {
                const __m512 ar = _mm512_set1_ps(a[r * lda + (k - sp->k0)]);
                acc[r][0] = _mm512_fmadd_ps(ar, b0, acc[r][0]);
                acc[r][1] = _mm512_fmadd_ps(ar, b1, acc[r][1]);
            }
        }
    } else {
        const size_t kb = bytes_per_k(src);
        const uint8_t *q = panel_weights(w, p);
        const float *sc = panel_scales(w, p, 0);
        for (int64_t k0 = 0; k0 < K; k0 += w->group, sc += NR) {
            const __m512 s0 = _mm512_loadu_ps(sc), s1 = _mm512_loadu_ps(sc + 16);
            for (int64_t k = k0; k < k0 + w->group; k++) {
                __m512 b0, b1;
                cvt_avx512(src, q + (size_t)k * kb, s0, s1, &b0, &b1);
#pragma GCC unroll 12
                for (int r = 0; r < mr; r++) {
                    const __m512 ar = _mm512_set1_ps(a[r * lda + (k - sp->k0)]);
                    acc[r][0] = _mm512_fmadd_ps(ar, b0, acc[r][0]);
                    acc[r][1] = _mm512_fmadd_ps(ar, b1, acc[r][1]);
                }
            }
        }
    }
    if (!o) {
#pragma GCC unroll 12
        for (int r = 0; r < mr; r++) {
            _mm512_storeu_ps(sp->part + r * NR, acc[r][0]);
            _mm512_storeu_ps(sp->part + r * NR + 16, acc[r][1]);
        }
        return;
    }
    finish_avx512(acc, mr, o, NULL, NULL);
}

#define TILE_CASE(isa, n)                                                                                              \
    case n:                                                                                                            \
        if (src == SRC_F32)                                                                                            \
            tile_##isa##_n(n, SRC_F32, sp->lda, w, p, sp, a, o);                                                       \
        else if (src == SRC_S8)                                                                                        \
            tile_##isa##_n(n, SRC_S8, sp->lda, w, p, sp, a, o);                                                        \
        else                                                                                                           \
            tile_##isa##_n(n, SRC_S4, sp->lda, w, p, sp, a, o);                                                        \
        break;
#define PACKED_CASE(isa, n)                                                                                            \
    case n: tile_##isa##_n(n, SRC_F32, APACK_LD, w, p, sp, a, o); break;

static AVX512 void tile_avx512(int mr, wo_src src, const mq_wo_matrix *w, int64_t p, const wo_span *sp,
                               const float *a, const wo_out *o) {
    if (src == SRC_F32 && sp->lda == APACK_LD) {
        switch (mr) {
            PACKED_CASE(avx512, 1) PACKED_CASE(avx512, 2) PACKED_CASE(avx512, 3) PACKED_CASE(avx512, 4)
            PACKED_CASE(avx512, 5) PACKED_CASE(avx512, 6) PACKED_CASE(avx512, 7) PACKED_CASE(avx512, 8)
            PACKED_CASE(avx512, 9) PACKED_CASE(avx512, 10) PACKED_CASE(avx512, 11) PACKED_CASE(avx512, 12)
            default: break;
        }
        return;
    }
    switch (mr) {
        TILE_CASE(avx512, 1) TILE_CASE(avx512, 2) TILE_CASE(avx512, 3) TILE_CASE(avx512, 4)
        TILE_CASE(avx512, 5) TILE_CASE(avx512, 6) TILE_CASE(avx512, 7) TILE_CASE(avx512, 8)
        TILE_CASE(avx512, 9) TILE_CASE(avx512, 10) TILE_CASE(avx512, 11) TILE_CASE(avx512, 12)
        default: break;
    }
}

static AVX512 void slice_avx512(const mq_wo_matrix *w, int64_t p, int64_t k0, int64_t k1, float *slice) {
    const wo_src src = stored_src(w);
    const uint8_t *q = panel_weights(w, p);
    for (int64_t k = k0; k < k1;) {
        const float *sc = panel_scales(w, p, k / w->group);
        const __m512 s0 = _mm512_loadu_ps(sc), s1 = _mm512_loadu_ps(sc + 16);
        for (const int64_t kend = scale_row_end(w, k, k1); k < kend; k++) {
            __m512 b0, b1;
            cvt_avx512(src, q + (size_t)k * bytes_per_k(src), s0, s1, &b0, &b1);
            _mm512_storeu_ps(slice + (k - k0) * NR, b0);
            _mm512_storeu_ps(slice + (k - k0) * NR + 16, b1);
        }
    }
}

/* ------------------------------------------------------------------ AVX-512 VNNI: the exact path (S8, S4) */

#define VNNI MQ_TARGET_AVX512_VNNI

/* Row x[0, K) as 24-bit integers: q = round-to-even(x * (XQ_ONE / max|x|)), clamped to +-XQ_ONE, offset to
   u = q + 2^23 in [1, 2^24) and split into three byte planes; a k quad of plane j is the int32 of the bytes j of
   u[4 quad .. 4 quad + 3], written at dst[quad * XQ_QUAD + j] (dst: the row's place in its packed tile). Returns the
   row's scale max|x| / XQ_ONE (x = scale q up to rounding) as m / XQ_ONE times 2^*e (m = frexp(max|x|, e)), so that
   it does not underflow: 0 for a row of zeros, NaN where x has a NaN or an infinity (its outputs are then NaN). */
/* The first min(n, 16) of 16 lanes. */
static inline __mmask16 lanes16(int64_t n) { return n >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << n) - 1u); }

static VNNI float xq_row(const float *x, int64_t K, int64_t K4, int32_t *dst, float *e) {
    __m512 amax = _mm512_setzero_ps();
    __mmask16 bad = 0;
    for (int64_t k = 0; k < K; k += 16) {
        const __m512 v = _mm512_maskz_loadu_ps(lanes16(K - k), x + k);
        bad |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
        amax = _mm512_max_ps(amax, _mm512_abs_ps(v));
    }
    const float top = _mm512_reduce_max_ps(amax);
    *e = 0.f;
    if (bad || !(top <= FLT_MAX)) {
        for (int64_t q = 0; q < K4; q++) dst[q * XQ_QUAD] = dst[q * XQ_QUAD + 1] = dst[q * XQ_QUAD + 2] = 0;
        return NAN;
    }
    /* a row whose largest |x| is below 2^-100 is first scaled by 2^64 (exact), so XQ_ONE / top stays finite down to
       the smallest denormal (x * 1 is x: other rows take the operations of the tests' numpy model) */
    const float pre = top < 0x1p-100f ? 0x1p64f : 1.f;
    const __m512 scale = _mm512_set1_ps(pre), inv = _mm512_set1_ps(top > 0.f ? XQ_ONE / (top * pre) : 0.f);
    const __m512i lim = _mm512_set1_epi32(8388607), offset = _mm512_set1_epi32(8388608);
    /* per 128-bit lane (one quad): bytes 0, 1, 2 of its four int32, as planes 0, 1, 2 */
    const __m512i planes = _mm512_broadcast_i32x4(_mm_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, -1, -1, -1, -1));
    int32_t tmp[16];
    for (int64_t k = 0; k < K; k += 16) {
        const __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(lanes16(K - k), x + k), scale);
        __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(v, inv));
        q = _mm512_add_epi32(_mm512_min_epi32(_mm512_max_epi32(q, _mm512_sub_epi32(_mm512_setzero_si512(), lim)), lim),
                             offset);
        _mm512_storeu_si512(tmp, _mm512_shuffle_epi8(q, planes));
        for (int64_t j = 0, quad = k / 4; j < 4 && quad < K4; j++, quad++) memcpy(dst + quad * XQ_QUAD, tmp + 4 * j, 12);
    }
    int ex = 0;
    const float m = frexpf(top, &ex);
    *e = (float)ex;
    return m / XQ_ONE;
}

/* *acc += the int32 sums of u8 x s8 quadruples (vpdpbusd). In asm: GCC's builtin keeps the accumulator's input and
   output in different registers and copies every accumulator once per k quad (measured 1.5x slower). */
static AI VNNI void dpbusd(__m512i *acc, __m512i u8, __m512i s8) {
    __asm__("vpdpbusd %2, %1, %0" : "+v"(*acc) : "v"(u8), "v"(s8));
}

/* A tile's int32 sums: [row][byte plane][columns 0-15, 16-31]. */
typedef __m512i xq_acc[XQ_MR][3][2];

static AI VNNI void xq_zero(const int mr, xq_acc acc) {
#pragma GCC unroll 4
    for (int r = 0; r < mr; r++)
#pragma GCC unroll 3
        for (int j = 0; j < 3; j++) acc[r][j][0] = acc[r][j][1] = _mm512_setzero_si512();
}

/* One k quad: each row's 3 byte planes (a, the tile's packed x at this quad) times the columns' int8 weights b0, b1. */
static AI VNNI void xq_quad(const int mr, xq_acc acc, const int32_t *a, __m512i b0, __m512i b1) {
#pragma GCC unroll 4
    for (int r = 0; r < mr; r++)
#pragma GCC unroll 3
        for (int j = 0; j < 3; j++) {
            const __m512i av = _mm512_set1_epi32(a[3 * r + j]);
            dpbusd(&acc[r][j][0], av, b0);
            dpbusd(&acc[r][j][1], av, b1);
        }
}

/* mr rows x 32 columns of panel p over all of K: per k quad, the panel's 2 x 64 int8 weights (columns 0-15, 16-31;
   4 k each) times each row's 3 byte planes (vpdpbusd: u8 x s8, exact in int32), then per output
   T = sum q w = 65536 (acc2 - 128 colsum) + 256 acc1 + acc0 in f32 (two fmas on the converted sums), times the
   column scale and the row's scale, and the common finish. a: the tile's packed x. */
static AI VNNI void tile_exact_n(const int mr, const mq_wo_matrix *w, int64_t p, const int32_t *a, const float *xs,
                                 const float *xe, const wo_out *o) {
    const __m512i *b = (const __m512i *)panel_weights(w, p);
    xq_acc acc;
    xq_zero(mr, acc);
    for (int64_t q = 0; q < w->K4; q++, a += XQ_QUAD)
        xq_quad(mr, acc, a, _mm512_loadu_si512(b + 2 * q), _mm512_loadu_si512(b + 2 * q + 1));
    const int32_t *cs = w->colsum128 + p * NR;
    const __m512 s256 = _mm512_set1_ps(256.f), s65536 = _mm512_set1_ps(65536.f);
    __m512 f[XQ_MR][2];
#pragma GCC unroll 4
    for (int r = 0; r < mr; r++)
        for (int h = 0; h < 2; h++) {
            const __m512i hi = _mm512_sub_epi32(acc[r][2][h], _mm512_loadu_si512(cs + 16 * h));
            const __m512 lo = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[r][1][h]), s256, _mm512_cvtepi32_ps(acc[r][0][h]));
            f[r][h] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(hi), s65536, lo);
        }
    finish_avx512(f, mr, o, xs, xe);
}

/* The same for S4, a scale row (group) at a time: per k quad the panel's 64 bytes give the columns 0-15 (low
   nibbles) and 16-31 (high nibbles) as int8 nibble - 8; per group g, T_g = 65536 (acc2 - 128 colsum_g) +
   (acc0 + 256 acc1) (the second term exact in int32, group_size <= 4096) in f32 with one fma, and the output's sum
   y = y + T_g scale_g (a multiply, then an add), groups in order from y = 0. */
static AI VNNI void tile_exact_s4_n(const int mr, const mq_wo_matrix *w, int64_t p, const int32_t *a,
                                    const float *xs, const float *xe, const wo_out *o) {
    const uint8_t *b = panel_weights(w, p);
    const int64_t g4 = w->group / 4;
    const __m512i nib = _mm512_set1_epi8(15), eight = _mm512_set1_epi8(8);
    const __m512 s65536 = _mm512_set1_ps(65536.f);
    __m512 y[XQ_MR][2];
#pragma GCC unroll 4
    for (int r = 0; r < mr; r++) y[r][0] = y[r][1] = _mm512_setzero_ps();
    for (int64_t g = 0; g < w->n_groups; g++) {
        xq_acc acc;
        xq_zero(mr, acc);
        for (int64_t q = g * g4; q < (g + 1) * g4; q++, a += XQ_QUAD) {
            const __m512i v = _mm512_loadu_si512(b + 64 * q);
            xq_quad(mr, acc, a, _mm512_sub_epi8(_mm512_and_si512(v, nib), eight),
                    _mm512_sub_epi8(_mm512_and_si512(_mm512_srli_epi16(v, 4), nib), eight));
        }
        const int32_t *cs = w->colsum128 + (p * w->n_groups + g) * NR;
        const float *sc = panel_scales(w, p, g);
#pragma GCC unroll 4
        for (int r = 0; r < mr; r++)
            for (int h = 0; h < 2; h++) {
                const __m512i hi = _mm512_sub_epi32(acc[r][2][h], _mm512_loadu_si512(cs + 16 * h));
                const __m512i lo = _mm512_add_epi32(acc[r][0][h], _mm512_slli_epi32(acc[r][1][h], 8));
                const __m512 t = _mm512_fmadd_ps(_mm512_cvtepi32_ps(hi), s65536, _mm512_cvtepi32_ps(lo));
                y[r][h] = _mm512_add_ps(y[r][h], _mm512_mul_ps(t, _mm512_loadu_ps(sc + 16 * h)));
            }
    }
    finish_avx512(y, mr, o, xs, xe);
}

#define EXACT_CASE(n)                                                                                                  \
    case n:                                                                                                            \
        if (w->lay.format == MQ_WO_S4)                                                                                 \
            tile_exact_s4_n(n, w, p, a, xs, xe, o);                                                                    \
        else                                                                                                           \
            tile_exact_n(n, w, p, a, xs, xe, o);                                                                       \
        break;

static VNNI void tile_exact(int mr, const mq_wo_matrix *w, int64_t p, const int32_t *a, const float *xs,
                            const float *xe, const wo_out *o) {
    switch (mr) {
        EXACT_CASE(1) EXACT_CASE(2) EXACT_CASE(3) EXACT_CASE(4)
        default: break;
    }
}

/* ------------------------------------------------------------------ AVX2 */

static AI AVX2 void cvt_avx2(wo_src src, const uint8_t *q, const __m256 s[4], __m256 b[4]) {
    __m256i i[4];
    if (src == SRC_S8) {
        for (int j = 0; j < 4; j++) i[j] = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(q + 8 * j)));
    } else {
        const __m128i v = _mm_loadu_si128((const __m128i *)q), m = _mm_set1_epi8(15);
        const __m128i lo = _mm_and_si128(v, m), hi = _mm_and_si128(_mm_srli_epi16(v, 4), m);
        const __m256i eight = _mm256_set1_epi32(8);
        i[0] = _mm256_sub_epi32(_mm256_cvtepu8_epi32(lo), eight);
        i[1] = _mm256_sub_epi32(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)), eight);
        i[2] = _mm256_sub_epi32(_mm256_cvtepu8_epi32(hi), eight);
        i[3] = _mm256_sub_epi32(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)), eight);
    }
    for (int j = 0; j < 4; j++) b[j] = src == SRC_S4 ? _mm256_mul_ps(_mm256_cvtepi32_ps(i[j]), s[j]) : _mm256_cvtepi32_ps(i[j]);
}

/* 8 floats at p, of which the first n are read (n < 8: masked; the rest zero). */
static AI AVX2 __m256 load_avx2(const float *p, int n, __m256i mask) {
    return n >= 8 ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, mask);
}

/* finish_tile from the accumulators [mr][4 x 8 columns], GELU in registers (reading back the row just stored would
   stall on store forwarding). */
static AI AVX2 void finish_avx2(const __m256 acc[][4], int mr, const wo_out *o) {
    const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    for (int j = 0; j < 4 && 8 * j < o->ncols; j++) {
        const int n = o->ncols - 8 * j;
        const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(n), lanes);
        const __m256 cs = o->colscale ? load_avx2(o->colscale + 8 * j, n, mask) : _mm256_setzero_ps();
        const __m256 b = o->bias ? load_avx2(o->bias + 8 * j, n, mask) : _mm256_setzero_ps();
        for (int r = 0; r < mr; r++) {
            __m256 v = acc[r][j];
            if (o->colscale) v = _mm256_mul_ps(v, cs);
            if (o->alpha != 1.f) v = _mm256_mul_ps(v, _mm256_set1_ps(o->alpha));
            if (o->rs) v = _mm256_mul_ps(v, _mm256_set1_ps(o->rs[r]));
            if (o->bias) v = _mm256_add_ps(v, b);
            if (o->res) v = _mm256_add_ps(v, load_avx2(o->res + r * o->ldy + 8 * j, n, mask));
            if (o->epi == MQ_EPI_GELU) {
                mq_v8 g = (mq_v8)v;
                gelu_v8(&g);
                v = (__m256)g;
            }
            if (n >= 8)
                _mm256_storeu_ps(o->y + r * o->ldy + 8 * j, v);
            else
                _mm256_maskstore_ps(o->y + r * o->ldy + 8 * j, mask, v);
        }
    }
}

static AI AVX2 void tile_avx2_n(const int mr, const wo_src src, const int64_t lda, const mq_wo_matrix *w, int64_t p,
                                const wo_span *sp, const float *a, const wo_out *o) {
    const int64_t group = src == SRC_F32 ? sp->k1 - sp->k0 : w->group;
    const size_t kb = bytes_per_k(src);
    const uint8_t *q = panel_weights(w, p);
    const float *sc = panel_scales(w, p, 0);
    __m256 acc[MR_AVX2][4];
    for (int r = 0; r < mr; r++)
        for (int j = 0; j < 4; j++) acc[r][j] = sp->k0 ? _mm256_loadu_ps(sp->part + r * NR + 8 * j) : _mm256_setzero_ps();
    for (int64_t k0 = sp->k0; k0 < sp->k1; k0 += group, sc += NR) {
        __m256 s[4];
        for (int j = 0; j < 4; j++) s[j] = src == SRC_F32 ? _mm256_setzero_ps() : _mm256_loadu_ps(sc + 8 * j);
        for (int64_t k = k0; k < k0 + group; k++) {
            __m256 b[4];
            if (src == SRC_F32)
                for (int j = 0; j < 4; j++) b[j] = _mm256_loadu_ps(sp->panel + (k - sp->k0) * NR + 8 * j);
            else
                cvt_avx2(src, q + (size_t)k * kb, s, b);
            for (int r = 0; r < mr; r++) {
                const __m256 ar = _mm256_set1_ps(a[r * lda + (k - sp->k0)]);
                for (int j = 0; j < 4; j++) acc[r][j] = _mm256_fmadd_ps(ar, b[j], acc[r][j]);
            }
        }
    }
    if (o)
        finish_avx2(acc, mr, o);
    else
        for (int r = 0; r < mr; r++)
            for (int j = 0; j < 4; j++) _mm256_storeu_ps(sp->part + r * NR + 8 * j, acc[r][j]);
}

static AVX2 void tile_avx2(int mr, wo_src src, const mq_wo_matrix *w, int64_t p, const wo_span *sp, const float *a,
                           const wo_out *o) {
    switch (mr) {
        TILE_CASE(avx2, 1) TILE_CASE(avx2, 2) TILE_CASE(avx2, 3)
        default: break;
    }
}

static AVX2 void slice_avx2(const mq_wo_matrix *w, int64_t p, int64_t k0, int64_t k1, float *slice) {
    const wo_src src = stored_src(w);
    const uint8_t *q = panel_weights(w, p);
    for (int64_t k = k0; k < k1;) {
        const float *sc = panel_scales(w, p, k / w->group);
        __m256 s[4], b[4];
        for (int j = 0; j < 4; j++) s[j] = _mm256_loadu_ps(sc + 8 * j);
        for (const int64_t kend = scale_row_end(w, k, k1); k < kend; k++) {
            cvt_avx2(src, q + (size_t)k * bytes_per_k(src), s, b);
            for (int j = 0; j < 4; j++) _mm256_storeu_ps(slice + (k - k0) * NR + 8 * j, b[j]);
        }
    }
}

/* ------------------------------------------------------------------ portable C (CPUs without AVX2 / FMA) */

static void cvt_c(wo_src src, const uint8_t *q, const float *s, float *b) {
    for (int c = 0; c < NR; c++) {
        if (src == SRC_S8)
            b[c] = (float)(int8_t)q[c];
        else
            b[c] = (float)((int)((q[c % 16] >> (c < 16 ? 0 : 4)) & 15) - 8) * s[c];
    }
}

static void tile_c(int mr, wo_src src, const mq_wo_matrix *w, int64_t p, const wo_span *sp, const float *a,
                   const wo_out *o) {
    const int64_t group = src == SRC_F32 ? sp->k1 - sp->k0 : w->group;
    const size_t kb = bytes_per_k(src);
    const uint8_t *q = panel_weights(w, p);
    const float *sc = panel_scales(w, p, 0);
    float acc[MR_C][NR], bq[NR];
    memset(acc, 0, sizeof acc);
    if (sp->k0)
        for (int r = 0; r < mr; r++) memcpy(acc[r], sp->part + r * NR, sizeof acc[r]);
    for (int64_t k0 = sp->k0; k0 < sp->k1; k0 += group, sc += NR)
        for (int64_t k = k0; k < k0 + group; k++) {
            const float *b = src == SRC_F32 ? sp->panel + (k - sp->k0) * NR : NULL;
            if (src != SRC_F32) {
                cvt_c(src, q + (size_t)k * kb, sc, bq);
                b = bq;
            }
            for (int r = 0; r < mr; r++)
                for (int c = 0; c < NR; c++) acc[r][c] = fmaf(a[r * sp->lda + (k - sp->k0)], b[c], acc[r][c]);
        }
    if (o)
        finish_tile(&acc[0][0], mr, o);
    else
        for (int r = 0; r < mr; r++) memcpy(sp->part + r * NR, acc[r], sizeof acc[r]);
}

static void slice_c(const mq_wo_matrix *w, int64_t p, int64_t k0, int64_t k1, float *slice) {
    const wo_src src = stored_src(w);
    for (int64_t k = k0; k < k1; k++)
        cvt_c(src, panel_weights(w, p) + (size_t)k * bytes_per_k(src), panel_scales(w, p, k / w->group),
              slice + (k - k0) * NR);
}

/* ------------------------------------------------------------------ the call */

/* Where the tile of panel p starting at row r0 goes (wo_out). */
static wo_out tile_out(const mq_wo_matrix *w, int64_t p, int64_t r0, const mq_wo_output *out, float *y) {
    const int64_t N = w->lay.N, n0 = p * NR;
    const wo_out o = {w->lay.format == MQ_WO_S8 ? w->scales + (size_t)p * NR : NULL,
                      out->row_scale ? out->row_scale + r0 : NULL,
                      out->bias ? out->bias + n0 : NULL,
                      out->residual ? out->residual + r0 * N + n0 : NULL,
                      out->alpha,
                      out->epilogue,
                      y + r0 * N + n0,
                      N,
                      (int)(N - n0 < NR ? N - n0 : NR)};
    return o;
}

/* Rows [m0, m0 + rows) of panel p's columns, k in [k0, k1), in tiles of nearly equal height, at most max_rows rows
   (a 12 + 4 split would waste the 4-row tile's registers); the tiles are finished into y when k1 = K, else their
   sums are left in `part` [rows, NR]. x's row m0 at column k0 is a0, its rows lda apart. B from `slice` (SRC_F32: a
   converted slice or F32 panels from k0 on) or the stored weights. */
static void run_tiles(const mq_wo_matrix *w, wo_src src, int64_t p, int64_t k0, int64_t k1, const float *slice,
                      float *part, const float *a0, int64_t lda, int64_t m0, int64_t rows, int max_rows,
                      const mq_wo_output *out, float *y) {
    const int64_t K = w->lay.K;
    const int64_t ntiles = (rows + max_rows - 1) / max_rows;
    for (int64_t i = 0, r0 = m0; i < ntiles; i++) {
        const int mr = (int)(rows / ntiles + (i < rows % ntiles));
        const float *a = a0 + (r0 - m0) * lda;
        const wo_span sp = {slice, k0, k1, lda, part ? part + (r0 - m0) * NR : NULL};
        const wo_out fin = tile_out(w, p, r0, out, y);
        const wo_out *o = k1 == K ? &fin : NULL;
        switch (w->isa) {
            case MQ_VEC_AVX512: tile_avx512(mr, src, w, p, &sp, a, o); break;
            case MQ_VEC_AVX2: tile_avx2(mr, src, w, p, &sp, a, o); break;
            default: tile_c(mr, src, w, p, &sp, a, o); break;
        }
        r0 += mr;
    }
}

static void convert_slice(const mq_wo_matrix *w, int64_t p, int64_t k0, int64_t k1, float *slice) {
    switch (w->isa) {
        case MQ_VEC_AVX512: slice_avx512(w, p, k0, k1, slice); break;
        case MQ_VEC_AVX2: slice_avx2(w, p, k0, k1, slice); break;
        default: slice_c(w, p, k0, k1, slice); break;
    }
}

/* One task: rows [m0, m0 + rows) by panels [p0, p1). k in blocks of KC (if K > KC_ONE) outermost, so the rows' KC
   columns of x stay in L2 across the panels; per block and panel, the panel's KC x 32 slice is converted once (into
   L1) and runs every tile of the rows; the partial sums of panel p wait in part + (p - p0) * CHUNK_ROWS * NR. The
   tiles read x in place (its reads from memory then overlap the multiply-adds; copying first measured 2-6% slower
   at MiniLM's shapes), except where x's row stride is a multiple of 4 KB (K = 1024, 2048, 3072 ...): there a
   tile's rows would all map to the same L1 sets (more rows than ways), so each block's columns of the rows are
   first copied to `apack` [rows, APACK_LD]. */
static void run_task(const mq_wo_matrix *w, int64_t p0, int64_t p1, float *slice, float *part, float *apack,
                     const float *x, int64_t m0, int64_t rows, const mq_wo_output *out, float *y) {
    const int64_t K = w->lay.K, kc = K <= KC_ONE ? K : KC;
    const int pack = K % 1024 == 0;
    const int max_rows = pack || w->mr < MR_DIRECT ? w->mr : MR_DIRECT;
    for (int64_t k0 = 0; k0 < K; k0 += kc) {
        const int64_t k1 = K - k0 > kc ? k0 + kc : K;
        if (pack)
            for (int64_t r = 0; r < rows; r++)
                memcpy(apack + r * APACK_LD, x + (m0 + r) * K + k0, (size_t)(k1 - k0) * sizeof(float));
        const float *a0 = pack ? apack : x + m0 * K + k0;
        for (int64_t p = p0; p < p1; p++) {
            const float *b = slice;
            if (w->lay.format == MQ_WO_F32)
                b = panel_f32(w, p, k0);
            else
                convert_slice(w, p, k0, k1, slice);
            run_tiles(w, SRC_F32, p, k0, k1, b, part + (size_t)(p - p0) * CHUNK_ROWS * NR, a0, pack ? APACK_LD : K,
                      m0, rows, max_rows, out, y);
        }
    }
}

/* Exact path: rows per chunk, a multiple of XQ_MR with at most XQ_CHUNK_BYTES of packed x (12 bytes per row and k
   quad; at least one tile, at most CHUNK_ROWS). */
static int64_t xq_chunk_rows(int64_t K4) {
    const int64_t rows = XQ_CHUNK_BYTES / (12 * K4) / XQ_MR * XQ_MR;
    return rows < XQ_MR ? XQ_MR : rows > CHUNK_ROWS ? CHUNK_ROWS : rows;
}

/* per thread, the larger of: (panel paths) a converted slice [KC_ONE, NR], the partial sums of a task
   [min(P, GROUP_PANELS), CHUNK_ROWS, NR], a row chunk's columns of x for one k block [CHUNK_ROWS, APACK_LD];
   (exact path) a chunk's row scales and their exponents [2, CHUNK_ROWS] and packed x (xq_chunk_rows x K4 x 3 int32, 64-byte aligned) */
static size_t thread_floats(int64_t K, int64_t P) {
    const size_t panels = (size_t)(P < GROUP_PANELS ? P : GROUP_PANELS);
    const size_t f32 = (size_t)KC_ONE * NR + panels * CHUNK_ROWS * NR + (size_t)CHUNK_ROWS * APACK_LD;
    const int64_t K4 = (K + 3) / 4;
    const size_t exact = 2 * CHUNK_ROWS + 16 + (size_t)xq_chunk_rows(K4) * (size_t)K4 * 3;
    return (f32 > exact ? f32 : exact) + 16; /* 16: each thread's part starts 64-byte aligned */
}

size_t mq_wo_scratch_floats(int64_t K, int64_t N, int n_threads) {
    return (size_t)(n_threads > 0 ? n_threads : 1) * thread_floats(K > 0 ? K : 1, N > 0 ? (N + NR - 1) / NR : 1);
}

/* Exact path, one task: rows [m0, m0 + rows) by panels [p0, p1). The rows are quantized and packed into xq in tiles
   of XQ_MR rows (tile t at xq + t K4 XQ_QUAD, row r of it at + 3 r), their scales into xs [CHUNK_ROWS] and the
   scales' exponents after it; then per panel (its
   int8 weights stay in L1 / L2), every tile. */
static void run_task_exact(const mq_wo_matrix *w, int64_t p0, int64_t p1, float *xs, int32_t *xq, const float *x,
                           int64_t m0, int64_t rows, const mq_wo_output *out, float *y) {
    const int64_t K = w->lay.K, K4 = w->K4;
    float *xe = xs + CHUNK_ROWS;
    for (int64_t r = 0; r < rows; r++)
        xs[r] = xq_row(x + (m0 + r) * K, K, K4, xq + (r / XQ_MR) * K4 * XQ_QUAD + 3 * (r % XQ_MR), xe + r);
    for (int64_t p = p0; p < p1; p++)
        for (int64_t r0 = 0; r0 < rows; r0 += XQ_MR) {
            const wo_out o = tile_out(w, p, m0 + r0, out, y);
            tile_exact(rows - r0 < XQ_MR ? (int)(rows - r0) : XQ_MR, w, p, xq + (r0 / XQ_MR) * K4 * XQ_QUAD, xs + r0,
                       xe + r0, &o);
        }
}

static int64_t gcd64(int64_t a, int64_t b) {
    while (b) {
        const int64_t t = a % b;
        a = b;
        b = t;
    }
    return a;
}

/* How a call's tasks split (row chunks of at most chunk_rows rows) x (groups of panels), chunk-major, each thread a
   contiguous run of them. Rows split into chunks of nearly equal height; when there are at least as many chunks as
   threads, into a multiple of the threads' number (each thread runs whole chunks: 9 chunks on 2 threads would leave
   one thread 5 of them). Fewer chunks than threads: the panels split too, into groups of nearly equal size, as few
   as make the tasks a multiple of the threads (more row chunks would convert every panel once more per chunk; more
   groups would copy a chunk's x once more per group). Panels go into at most GROUP_PANELS per group, in a multiple
   of that many groups. */
static void split_tasks(int64_t M, int64_t chunk_rows, int64_t P, int64_t T, int64_t *chunks, int64_t *groups) {
    int64_t c = (M + chunk_rows - 1) / chunk_rows;
    if (c >= T) c = (c + T - 1) / T * T;
    int64_t g = c >= T ? 1 : T / gcd64(c, T);
    const int64_t min_groups = (P + GROUP_PANELS - 1) / GROUP_PANELS;
    if (g < min_groups) g = (min_groups + g - 1) / g * g;
    *chunks = c;
    *groups = g > P ? P : g;
}

mq_status mq_wo_matmul(const mq_wo_matrix *w, const float *x, int64_t M, const mq_wo_output *out, float *y,
                       float *scratch, int n_threads) {
    if (!w || !x || !out || !y || !scratch || M <= 0 || n_threads <= 0)
        return mq_set_error(MQ_ERR_ARG, "weight-only matmul: bad arguments");
    if (out->epilogue == MQ_EPI_RESIDUAL && !out->residual)
        return mq_set_error(MQ_ERR_ARG, "weight-only matmul: residual missing");
    const wo_src fused = stored_src(w);
    const int64_t P = w->P;
    if (!w->exact && M <= FUSED_BLOCKS * w->mr) { /* a few row blocks: dequantize in registers */
#pragma omp parallel for schedule(static) num_threads(n_threads) if (n_threads > 1 && P > 1)
        for (int64_t p = 0; p < P; p++)
            run_tiles(w, fused, p, 0, w->lay.K, fused == SRC_F32 ? panel_f32(w, p, 0) : NULL, NULL, x, w->lay.K, 0, M,
                      w->mr, out, y);
        return MQ_OK;
    }
    const int64_t chunk_rows = w->exact ? xq_chunk_rows(w->K4) : CHUNK_ROWS;
    int64_t chunks, groups;
    split_tasks(M, chunk_rows, P, n_threads, &chunks, &groups);
    const int64_t tasks = chunks * groups;
    const size_t per_thread = thread_floats(w->lay.K, P);
#pragma omp parallel num_threads(n_threads) if (n_threads > 1 && tasks > 1)
    {
        float *mine = scratch + (size_t)omp_get_thread_num() * per_thread;
        mine += (16 - ((uintptr_t)mine / sizeof(float)) % 16) % 16; /* 64-byte aligned */
        float *slice = mine, *part = slice + (size_t)KC_ONE * NR,
              *apack = part + (size_t)(P < GROUP_PANELS ? P : GROUP_PANELS) * CHUNK_ROWS * NR;
        int32_t *xq = (int32_t *)(void *)(mine + 2 * CHUNK_ROWS + 16);
#pragma omp for schedule(static)
        for (int64_t t = 0; t < tasks; t++) {
            const int64_t c = t / groups, g = t % groups;
            const int64_t m0 = c * M / chunks, rows = (c + 1) * M / chunks - m0, p0 = g * P / groups,
                          p1 = (g + 1) * P / groups;
            if (w->exact)
                run_task_exact(w, p0, p1, mine, xq, x, m0, rows, out, y);
            else
                run_task(w, p0, p1, slice, part, apack, x, m0, rows, out, y);
        }
    }
    return MQ_OK;
}

/* ------------------------------------------------------------------ creation */

/* Copies the user's weights and scales into panels (wo_matmul.h: the user layouts; this file's header: the panels). */
static void fill_panels(mq_wo_matrix *w, const void *weight, const float *scales) {
    const int64_t K = w->lay.K, N = w->lay.N;
    for (int64_t n = 0; n < N; n++) {
        const int64_t p = n / NR, c = n % NR;
        uint8_t *q = w->q + (size_t)p * w->panel_bytes;
        float *sc = w->scales + (size_t)p * (size_t)w->n_groups * NR + c;
        if (w->lay.format == MQ_WO_F32) {
            const float *src = (const float *)weight + n * K;
            float *f = (float *)q;
            for (int64_t k = 0; k < K; k++) f[k * NR + c] = src[k];
        } else if (w->lay.format == MQ_WO_S8) {
            const int8_t *src = (const int8_t *)weight + n * K;
            int32_t sum = 0;
            for (int64_t k = 0; k < K; k++) {
                q[w->exact ? (k / 4) * (4 * NR) + 4 * c + k % 4 : k * NR + c] = (uint8_t)src[k];
                sum += src[k];
            }
            if (w->exact) w->colsum128[n] = 128 * sum;
            sc[0] = scales[w->lay.per_channel ? n : 0];
        } else {
            const uint8_t *src = (const uint8_t *)weight + n * (K / 2);
            const int shift = c < 16 ? 0 : 4;
            for (int64_t k = 0; k < K; k++) {
                const uint8_t nib = (uint8_t)((src[k / 2] >> (k % 2 ? 4 : 0)) & 15);
                uint8_t *b = q + (w->exact ? (k / 4) * (2 * NR) + 4 * (c % 16) + k % 4 : k * (NR / 2) + c % 16);
                *b = (uint8_t)((*b & ~(15 << shift)) | (nib << shift));
                if (w->exact) w->colsum128[(p * w->n_groups + k / w->group) * NR + c] += 128 * (nib - 8);
            }
            for (int64_t g = 0; g < w->n_groups; g++) sc[g * NR] = scales[n * w->n_groups + g];
        }
    }
}

mq_status mq_wo_matrix_create(mq_wo_matrix **out, const mq_wo_layout *lay, const void *weight, const float *scales) {
    if (!out || !lay || !weight || (!scales && lay->format != MQ_WO_F32))
        return mq_set_error(MQ_ERR_ARG, "weight-only matrix: NULL argument");
    *out = NULL;
    const int64_t K = lay->K, N = lay->N;
    if (K <= 0 || N <= 0 || K > (1 << 20) || N > (1 << 20))
        return mq_set_error(MQ_ERR_ARG, "weight-only matrix: bad shape in=%lld out=%lld", (long long)K, (long long)N);
    if (lay->format == MQ_WO_S4 && (lay->group_size <= 0 || lay->group_size % 2 || K % lay->group_size))
        return mq_set_error(MQ_ERR_ARG, "weight-only matrix: int4 group size %lld must be even and divide %lld",
                            (long long)lay->group_size, (long long)K);
    if (lay->format != MQ_WO_S8 && lay->format != MQ_WO_S4 && lay->format != MQ_WO_F32)
        return mq_set_error(MQ_ERR_ARG, "weight-only matrix: unknown format %d", (int)lay->format);
    mq_wo_matrix *w = calloc(1, sizeof *w);
    if (!w) return mq_set_error(MQ_ERR_NOMEM, "weight-only matrix: out of memory");
    w->lay = *lay;
    w->P = (N + NR - 1) / NR;
    w->group = lay->format == MQ_WO_S4 ? lay->group_size : K;
    w->n_groups = lay->format == MQ_WO_F32 ? 0 : K / w->group;
    w->isa = mq_vec_isa_effective();
    w->mr = ISA_TILE_ROWS[w->isa];
    w->exact = w->isa == MQ_VEC_AVX512 && mq_vec_int8_dot() && K <= XQ_MAX_K &&
               (lay->format == MQ_WO_S8 || (lay->format == MQ_WO_S4 && w->group % 4 == 0 && w->group <= 4096));
    w->K4 = (K + 3) / 4;
    /* the exact path's panels: k quads of 4 NR bytes (S8: column c's 4 k at 4 c, K padded to quads with zeros) or
       2 NR bytes (S4: columns c and c + 16 at 4 (c % 16), low and high nibble) */
    w->panel_bytes =
        (size_t)K * (lay->format == MQ_WO_F32 ? NR * sizeof(float) : lay->format == MQ_WO_S8 ? NR : NR / 2);
    if (w->exact) w->panel_bytes = (size_t)w->K4 * (lay->format == MQ_WO_S8 ? 4 * NR : 2 * NR);
    w->q = mq_alloc((size_t)w->P, w->panel_bytes);
    w->scales = mq_alloc((size_t)w->P * (size_t)w->n_groups * NR, sizeof(float)); /* zero: padding columns */
    w->colsum128 = w->exact ? mq_alloc((size_t)w->P * (size_t)w->n_groups * NR, sizeof(int32_t)) : NULL;
    if (!w->q || !w->scales || (w->exact && !w->colsum128)) {
        mq_wo_matrix_destroy(w);
        return mq_set_error(MQ_ERR_NOMEM, "weight-only matrix: out of memory for %lld x %lld weights", (long long)N,
                            (long long)K);
    }
    if (lay->format == MQ_WO_S4) memset(w->q, 0x88, (size_t)w->P * w->panel_bytes); /* padding: value 0 */
    fill_panels(w, weight, scales);
    static const char *const names[] = {[MQ_WO_S8] = "wo_s8", [MQ_WO_S4] = "wo_s4", [MQ_WO_F32] = "panel_f32"};
    snprintf(w->impl, sizeof w->impl, "medquant:%s_%s", names[lay->format], w->exact ? "vnni" : mq_vec_isa_name(w->isa));
    *out = w;
    return MQ_OK;
}

void mq_wo_matrix_destroy(mq_wo_matrix *w) {
    if (!w) return;
    mq_free(w->q);
    mq_free(w->scales);
    mq_free(w->colsum128);
    free(w);
}

size_t mq_wo_matrix_nbytes(const mq_wo_matrix *w) {
    return (size_t)w->P * w->panel_bytes + (size_t)w->P * (size_t)w->n_groups * NR * sizeof(float) +
           (w->exact ? (size_t)w->P * (size_t)w->n_groups * NR * sizeof(int32_t) : 0);
}

const char *mq_wo_matrix_impl(const mq_wo_matrix *w) { return w->impl; }
