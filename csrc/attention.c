/* attention.c - the fused attention kernel (attention.h): a task is a sequence, or a (sequence, head) pair when the
 * batch has fewer than two sequences per thread (make_plan).
 *
 * Per head of a task, in per-thread scratch: q [len, d] and v [len, dv] dense (dv = d rounded up to 16, zero columns
 * past d), kt [d, ldk] the keys transposed (ldk = len rounded up to 16, zero columns past len); per tile of query
 * rows, s [rows, ldk] the scores (in base 2: log2 e is folded into their scale), then in place 2^(score - max) (or,
 * for BF16, the rounded probabilities), and c [rows, dv] the context. The AVX-512 and AVX2 paths stage the keys
 * through in-register transposes (16 x 16 and 8 x 8 blocks).
 *
 * Three paths, picked by mq_vec_isa_effective (so ONEDNN_MAX_CPU_ISA caps them): AVX-512 (tiles of 8 query rows x
 * 16 columns, one zmm each) and AVX2 + FMA (6 rows x 16 columns, two ymm each), both attention_kernel.inc, and
 * portable C, one row at a time with fmaf. All do the same IEEE operations in the same order - an fma chain per
 * score over the head dimension, the 2^z of exp2_nonpos, the softmax sum in 16 partial sums added in a fixed tree, an
 * fma chain per context value over the keys - so they give the same bits, and a row's result depends on nothing but
 * its sequence and head. BF16 (operands rounded to bf16) has a fourth path where the CPU has avx512_bf16 and the cap
 * allows it (mq_vec_bf16_dot): vdpbf16ps on bf16 pairs staged by stage_bf16_avx512, which does the f32 paths'
 * operations in their order too (see attention_head_bf16dot), with denormals flushed on every path. INT8 has three
 * paths of its own, exact in their integer products and alike in their float operations (see the INT8 section):
 * vpdpbusd (avx512_vnni), f32 FMAs on integer values (AVX2, AVX-512 without VNNI) and portable C.
 */
#include "attention.h"

#include <float.h>
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "qparams.h"
#include "vecmath.h"

#define MQ_ATTN_MAX_THREADS 64
#define VEC 16       /* ldk and dv are multiples of this */
#define ROWS_AVX2 6   /* query rows per tile of the AVX2 path: 6 x 2 ymm accumulators */
#define ROWS_AVX512 8 /* of the AVX-512 path: 8 zmm accumulators */
#define ROWS_MAX 8
#define AI inline __attribute__((always_inline))

struct mq_attention {
    mq_engine *eng; /* borrowed: its thread count */
    int n_heads;
    int64_t head_dim, max_len;
    float scale;
    mq_attn_precision precision;
    mq_vec_isa isa;
    int bf16_dot; /* BF16 runs on vdpbf16ps (mq_vec_bf16_dot) */
    int int8_dot; /* INT8 runs on vpdpbusd (mq_vec_int8_dot) */
    char impl[48];
    mq_buffer scratch[MQ_ATTN_MAX_THREADS];
};

/* Where a forward writes the context: f32 rows, or u8 rows quantized with (1 / scale, zero point). */
typedef struct {
    float *ctx;
    uint8_t *ctx_q;
    float inv_scale;
    int32_t zp;
} mq_attn_out;

/* What every task of one forward shares. */
typedef struct {
    const float *qkv;
    int64_t H, d, dv;
    float scale_log2e; /* 1/sqrt(d) x log2(e): every precision's scores come out in base 2 (INT8: in the queries'
                          scales), so the softmax takes 2^(s - max) */
    int round; /* BF16: operands rounded to bf16 */
    int dot;   /* BF16 on vdpbf16ps: bf16 pair staging (stage_bf16_avx512) */
    int i8;           /* INT8 */
    int n_heads_task; /* heads a task stages one after the other: the next head's rows are prefetched while one is
                         computed (1: no prefetch) */
    mq_attn_out out;
} mq_attn_job;

static int64_t round16(int64_t n) { return (n + VEC - 1) / VEC * VEC; }
static int64_t round8(int64_t n) { return (n + 7) / 8 * 8; }

mq_status mq_attention_create(mq_attention **out, mq_engine *eng, int n_heads, int64_t head_dim, int64_t max_len) {
    if (!out || !eng) return mq_set_error(MQ_ERR_ARG, "attention: NULL argument");
    *out = NULL;
    if (n_heads <= 0 || head_dim <= 0 || max_len <= 0 || max_len > 65536 || head_dim > 65536 || n_heads > 4096)
        return mq_set_error(MQ_ERR_ARG, "attention: bad shape heads=%d head_dim=%lld max_len=%lld", n_heads,
                            (long long)head_dim, (long long)max_len);
    mq_attention *a = calloc(1, sizeof *a);
    if (!a) return mq_set_error(MQ_ERR_NOMEM, "attention: out of memory");
    a->eng = eng;
    a->n_heads = n_heads;
    a->head_dim = head_dim;
    a->max_len = max_len;
    a->scale = 1.f / sqrtf((float)head_dim);
    a->isa = mq_vec_isa_effective();
    a->bf16_dot = a->isa == MQ_VEC_AVX512 && mq_vec_bf16_dot();
    a->int8_dot = a->isa == MQ_VEC_AVX512 && mq_vec_int8_dot();
    *out = a;
    return mq_attention_set_precision(a, MQ_ATTN_F32); /* and its kernel's name */
}

void mq_attention_release_scratch(mq_attention *a) {
    for (int t = 0; t < MQ_ATTN_MAX_THREADS; t++) mq_buffer_release(&a->scratch[t]);
}

size_t mq_attention_scratch_bytes(mq_attention *a) {
    size_t n = 0;
    for (int t = 0; t < MQ_ATTN_MAX_THREADS; t++) n += a->scratch[t].bytes;
    return n;
}

void mq_attention_destroy(mq_attention *a) {
    if (!a) return;
    mq_attention_release_scratch(a);
    free(a);
}

mq_status mq_attention_set_precision(mq_attention *a, mq_attn_precision precision) {
    if (!a) return mq_set_error(MQ_ERR_ARG, "attention: NULL");
    if ((int)precision < 0 || precision >= MQ_ATTN_PRECISION_COUNT)
        return mq_set_error(MQ_ERR_ARG, "attention: unknown precision %d", (int)precision);
    a->precision = precision;
    const int dot = precision == MQ_ATTN_BF16 && a->bf16_dot;
    if (precision == MQ_ATTN_INT8)
        snprintf(a->impl, sizeof a->impl, "medquant:attention_int8_%s",
                 a->int8_dot ? "vnni" : a->isa != MQ_VEC_C ? "avx2" : "c");
    else
        snprintf(a->impl, sizeof a->impl, "medquant:attention_%s%s", mq_vec_isa_name(a->isa), dot ? "_bf16dot" : "");
    return MQ_OK;
}

mq_attn_precision mq_attention_precision(const mq_attention *a) { return a->precision; }

const char *mq_attention_impl(const mq_attention *a) { return a->impl; }

/* How a forward splits its work: with at least two sequences per thread, a task is a sequence (its heads one after
   the other); with fewer, a task is a (sequence, head) pair, so the heads of even one sequence spread over the
   threads. */
typedef struct {
    int nthr;          /* threads */
    int heads_per_task; /* n_heads or 1 */
    int64_t tasks;
} mq_attn_plan;

static mq_attn_plan make_plan(const mq_attention *a, int64_t batch) {
    int nthr = mq_engine_threads(a->eng);
    if (nthr > MQ_ATTN_MAX_THREADS) nthr = MQ_ATTN_MAX_THREADS;
    mq_attn_plan p = {nthr, a->n_heads, batch};
    if (nthr > 1 && batch < 2 * (int64_t)nthr) {
        p.heads_per_task = 1;
        p.tasks = batch * a->n_heads;
    }
    if (p.tasks < p.nthr) p.nthr = p.tasks < 1 ? 1 : (int)p.tasks;
    return p;
}

#define I8_MAX_D 256 /* the vector staging's widest head (stage_int8_avx512); wider heads take stage_head_int8 */

/* Words of one head's staged int8 blocks (mq_attn_i8). */
static int64_t i8_floats(int64_t L, int64_t d) {
    const int64_t d4 = (d + 3) / 4, ldk = round16(L);
    return round16(L * d4) + round16(L) + d4 * ldk + 2 * ldk + ldk / 4 * round16(d) + round16(d);
}

/* Words of one head's bf16 pair blocks (stage_bf16_avx512): d2 = ceil(d / 2) pairs per query and key, ldk / 2 pairs
   of keys per value column. */
static int64_t pairs_floats(int64_t L, int64_t d) {
    const int64_t d2 = (d + 1) / 2;
    return round16(L * d2) + d2 * round16(L) + round16(L) / 2 * round16(d);
}

/* Floats (4-byte words) of one head's staged q, kt and v for a sequence of L tokens, each part a multiple of 16:
   f32 values, bf16 pairs or int8 blocks, the most of the three. */
static int64_t head_floats(int64_t L, int64_t d) {
    const int64_t f32 = round16(L * d) + d * round16(L) + L * round16(d), pairs = pairs_floats(L, d);
    const int64_t i8 = i8_floats(L, d), most = f32 > pairs ? f32 : pairs;
    return most > i8 ? most : i8;
}

/* Staging heads together. A head's queries, keys and values are three pieces of 4 d bytes in each 12 H-byte row of
   the QKV output, which the hardware prefetchers do not follow from row to row: staged one head at a time, most
   pieces come from memory (the encoder's QKV output is larger than a core's cache). Where the staged blocks are
   small (int8, or bf16 pairs: stage_int8_avx512, stage_bf16_avx512), a task that is a whole sequence stages its
   heads in as few groups as keep their blocks within GROUP_WORDS, each group's rows read once, in order. */
#define GROUP_WORDS (128 * 1024) /* 512 KB: stays in a core's L2 cache */

/* INT8 on vpdpbusd, its head small enough for stage_int8_avx512. */
static int stages_int8_avx512(const mq_attention *a) {
    return a->precision == MQ_ATTN_INT8 && a->int8_dot && a->head_dim <= I8_MAX_D;
}

/* Words of one head's blocks on a path that stages heads together; 0 on the others (heads one at a time). */
static int64_t group_head_floats(const mq_attention *a, int64_t L) {
    if (stages_int8_avx512(a)) return i8_floats(L, a->head_dim);
    if (a->precision == MQ_ATTN_BF16 && a->bf16_dot) return pairs_floats(L, a->head_dim);
    return 0;
}

/* Words of the staging's own scratch per head staged together: 16 keys' bytes or pairs before their transpose (rows
   of d8 = ceil(ceil(d / 4) / 8) x 8 or d2r = ceil(ceil(d / 2) / 8) x 8 dwords), and for int8 the columns' running
   absmax (dv floats). */
static int64_t group_scratch_floats(const mq_attention *a) {
    const int64_t d = a->head_dim;
    if (a->precision == MQ_ATTN_INT8) return 16 * round8((d + 3) / 4) + round16(d);
    return 16 * round8((d + 1) / 2);
}

/* How many of a task's `heads` heads are staged together, given one head's block words: as many as GROUP_WORDS
   holds, in groups of equal size (int8: all 12 heads of MiniLM up to 400 tokens, of BERT-base up to 208; bf16: up to
   224 and 112 tokens); 1 when two do not fit. */
static int64_t stage_group(int64_t block, int64_t heads) {
    const int64_t fit = block > 0 ? GROUP_WORDS / block : 0;
    if (fit >= heads) return heads;
    if (fit <= 1) return 1;
    const int64_t groups = (heads + fit - 1) / fit;
    return (heads + groups - 1) / groups;
}

/* Floats of a task's scratch before task_bufs' `stage`, for a sequence of L tokens: one head's q, kt, v (a task
   stages its heads one after the other, so the blocks stay in the core's cache), then one tile's s, the bf16 pairs
   of its probabilities (vdpbf16ps path) and c, the query/key/column scales of int8 on f32 arithmetic. */
static int64_t tile_floats(int64_t L, int64_t d) {
    return head_floats(L, d) + ROWS_MAX * (round16(L) + round16(L) / 2 + round16(d)) + 2 * round16(L) + round16(d);
}

/* Floats of one thread's scratch for sequences of at most L tokens and tasks of `heads` heads: tile_floats, then
   what staging heads together needs, on the paths that do. */
static size_t scratch_floats(const mq_attention *a, int64_t L, int heads) {
    const int64_t block = group_head_floats(a, L) * heads;
    const int64_t group = block ? group_scratch_floats(a) * heads + (block < GROUP_WORDS ? block : GROUP_WORDS) : 0;
    return (size_t)(tile_floats(L, a->head_dim) + group);
}

size_t mq_attention_scratch_need(const mq_attention *a, int64_t max_len, int64_t batch) {
    const mq_attn_plan p = make_plan(a, batch);
    const double per_thread = (double)scratch_floats(a, max_len, p.heads_per_task) * sizeof(float) + 64.0;
    const double total = per_thread * p.nthr;
    return total >= (double)SIZE_MAX ? SIZE_MAX : (size_t)total;
}

/* ------------------------------------------------------------------ the kernel */

static MQ_INLINE float maybe_round(float x, int round) { return round ? mq_bf16_to_f32(mq_f32_to_bf16(x)) : x; }

typedef uint32_t mq_v16u __attribute__((vector_size(64)));

/* maybe_round(x, 1) on the f32 bits of 16 lanes: the integer operations of mq_f32_to_bf16 (the same bits; GCC lowers
   them to the caller's vector ISA), in place, the result's low 16 bits zero. */
static MQ_INLINE void round_bf16_bits(mq_v16u *v) {
    const mq_v16u u = *v, r = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
    const mq_v16u nan = (u & 0x7fffffffu) > 0x7f800000u; /* all ones where NaN: kept, quiet */
    *v = (r & ~nan) | (((u & 0xffff0000u) | 0x400000u) & nan);
}

/* x[j] = maybe_round(x[j] * f, 1) for j < n: 16 lanes at a time, the rest one by one. */
static MQ_INLINE void scale_round_bf16(float *x, int64_t n, float f) {
    int64_t j = 0;
    for (; j + 16 <= n; j += 16) {
        mq_v16 v;
        memcpy(&v, x + j, sizeof v);
        v *= f;
        mq_v16u u;
        memcpy(&u, &v, sizeof u);
        round_bf16_bits(&u);
        memcpy(x + j, &u, sizeof u);
    }
    for (; j < n; j++) x[j] = maybe_round(x[j] * f, 1);
}

/* One head's staged blocks and the tile buffers of a task (this file's header); on the vdpbf16ps path q, kt and v
   hold bf16 pairs (stage_bf16_avx512) and p the probabilities' pairs. */
typedef struct {
    float *q, *kt, *v, *s, *c;
    uint32_t *p;
    float *x;     /* INT8 on f32 arithmetic: the query, key and column scales */
    float *stage; /* staging heads together (GROUP_WORDS): the staging's scratch, then the heads' blocks */
    int64_t ldk;
} mq_attn_bufs;

/* q, kt and v of a head's bf16 pair blocks (pairs_floats words) from `at`. */
static MQ_INLINE void place_pairs(mq_attn_bufs *b, float *at, int64_t len, int64_t d) {
    const int64_t d2 = (d + 1) / 2;
    b->q = at;
    b->kt = b->q + round16(len * d2);
    b->v = b->kt + d2 * b->ldk;
}

/* The staged head and the tile buffers of a sequence of len tokens, in buf. */
static MQ_INLINE mq_attn_bufs task_bufs(const mq_attn_job *job, int64_t len, float *buf) {
    mq_attn_bufs b;
    b.ldk = round16(len);
    b.q = buf;
    b.kt = b.q + round16(len * job->d);
    b.v = b.kt + job->d * b.ldk;
    if (job->dot) place_pairs(&b, buf, len, job->d);
    b.s = buf + head_floats(len, job->d);
    b.p = (uint32_t *)(b.s + ROWS_MAX * b.ldk);
    b.c = b.s + ROWS_MAX * (b.ldk + b.ldk / 2);
    b.x = b.c + ROWS_MAX * job->dv;
    b.stage = buf + tile_floats(len, job->d);
    return b;
}

/* Head h of the sequence at rows offset.. into its q, kt and v blocks (bf16-rounded for BF16), zero past the
   sequence and past d. */
static void stage_head(const mq_attn_job *job, int64_t offset, int64_t len, int64_t h, const mq_attn_bufs *b) {
    const int64_t d = job->d, dv = job->dv, H = job->H, ld = 3 * H;
    const int round = job->round;
    const float *rows = job->qkv + offset * ld + h * d;
    for (int64_t j = 0; j < len; j++) {
        const float *qs = rows + j * ld, *vs = qs + 2 * H;
        for (int64_t c = 0; c < d; c++) b->q[j * d + c] = maybe_round(qs[c], round);
        for (int64_t c = 0; c < d; c++) b->v[j * dv + c] = maybe_round(vs[c], round);
        for (int64_t c = d; c < dv; c++) b->v[j * dv + c] = 0.f;
    }
    for (int64_t j0 = 0; j0 < b->ldk; j0 += 16) /* 16 keys at a time: the transposed writes fill whole lines */
        for (int64_t c = 0; c < d; c++)
            for (int64_t j = j0; j < j0 + 16; j++)
                b->kt[c * b->ldk + j] = j < len ? maybe_round(rows[j * ld + H + c], round) : 0.f;
}

/* stage_head on AVX2 for F32 (the same values): the keys transposed in 8 x 8 blocks. */
static MQ_TARGET_AVX2 void stage_head_avx2(const mq_attn_job *job, int64_t offset, int64_t len, int64_t h,
                                           const mq_attn_bufs *b) {
    const int64_t d = job->d, dv = job->dv, H = job->H, ld = 3 * H;
    const float *rows = job->qkv + offset * ld + h * d;
    for (int64_t j = 0; j < len; j++) {
        memcpy(b->q + j * d, rows + j * ld, (size_t)d * sizeof(float));
        memcpy(b->v + j * dv, rows + j * ld + 2 * H, (size_t)d * sizeof(float));
        memset(b->v + j * dv + d, 0, (size_t)(dv - d) * sizeof(float));
    }
    __m256 r[8], t[8], u[8];
    for (int64_t j0 = 0; j0 < b->ldk; j0 += 8)
        for (int64_t c = 0; c < d; c += 8) {
            const int n = d - c < 8 ? (int)(d - c) : 8;
            for (int i = 0; i < 8; i++) {
                const float *src = rows + (j0 + i) * ld + H + c;
                if (j0 + i >= len)
                    r[i] = _mm256_setzero_ps();
                else if (n == 8)
                    r[i] = _mm256_loadu_ps(src);
                else {
                    float tmp[8] = {0};
                    memcpy(tmp, src, (size_t)n * sizeof(float));
                    r[i] = _mm256_loadu_ps(tmp);
                }
            }
            for (int i = 0; i < 4; i++) {
                t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
                t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
            }
            for (int g = 0; g < 2; g++) {
                u[4 * g + 0] = _mm256_shuffle_ps(t[4 * g], t[4 * g + 2], _MM_SHUFFLE(1, 0, 1, 0));
                u[4 * g + 1] = _mm256_shuffle_ps(t[4 * g], t[4 * g + 2], _MM_SHUFFLE(3, 2, 3, 2));
                u[4 * g + 2] = _mm256_shuffle_ps(t[4 * g + 1], t[4 * g + 3], _MM_SHUFFLE(1, 0, 1, 0));
                u[4 * g + 3] = _mm256_shuffle_ps(t[4 * g + 1], t[4 * g + 3], _MM_SHUFFLE(3, 2, 3, 2));
            }
            for (int m = 0; m < 4; m++) { /* column m: the low lanes of u[m] and u[4 + m]; column 4 + m the high */
                r[m] = _mm256_permute2f128_ps(u[m], u[4 + m], 0x20);
                r[4 + m] = _mm256_permute2f128_ps(u[m], u[4 + m], 0x31);
            }
            for (int i = 0; i < n; i++) _mm256_storeu_ps(b->kt + (c + i) * b->ldk + j0, r[i]);
        }
}

/* The softmax's sum: 16 partial sums (element j into partial j % 16, in order of j), added by mq_v16_sum. */
static MQ_INLINE float sum16(const float *part) {
    mq_v16 a;
    memcpy(&a, part, sizeof a);
    return mq_v16_sum(&a);
}

/* Row `row` of the packed output, head h, from the d context values at src; and a prefetch of the row's queries,
   keys and values of head h + 1 into the core's cache when the task goes on with that head (its staging then reads
   from cache, not memory: a row's heads are 4 d bytes apart, its rows 12 H bytes, so the hardware prefetchers, which
   stay inside a page, see no stream). */
static MQ_INLINE void write_row(const mq_attn_job *job, const float *src, int64_t row, int64_t h) {
    if (h % job->n_heads_task != job->n_heads_task - 1) {
        const float *next = job->qkv + row * 3 * job->H + (h + 1) * job->d;
        for (int part = 0; part < 3; part++)
            for (int64_t c = 0; c < job->d; c += 16) _mm_prefetch((const char *)(next + part * job->H + c), _MM_HINT_T0);
    }
    const mq_attn_out *o = &job->out;
    const size_t at = (size_t)(row * job->H + h * job->d);
    if (o->ctx_q)
        mq_quantize_row_u8(src, job->d, o->inv_scale, o->zp, o->ctx_q + at);
    else
        memcpy(o->ctx + at, src, (size_t)job->d * sizeof(float));
}

/* ---- portable path: one query row at a time, fmaf chains (the operations of the vector paths, so the same bits) */

/* 2^z for z <= 0 (the F32 and BF16 probabilities, from scores in base 2), clamped at 2^-126 (NaN stays NaN):
   z = n + r with n = rint(z) (the 1.5 x 2^23 rounding trick), |r| <= 1/2, 2^r by a degree-5 minimax polynomial
   (1 exact at r = 0, relative error below 1.7e-7 evaluated in f32), times 2^n built in the exponent bits (normal:
   n >= -126). Fused multiply-adds; the vector paths do the same operations (attention_kernel.inc). */
#define EXP2_C5 0.0013264701701700687f
#define EXP2_C4 0.009671504609286785f
#define EXP2_C3 0.05550733581185341f
#define EXP2_C2 0.24022242426872253f
#define EXP2_C1 0.6931470036506653f
static MQ_INLINE float exp2_nonpos(float z) {
    z = z < -126.f ? -126.f : z;
    const float shifted = z + 12582912.f;
    const float n = shifted - 12582912.f, r = z - n;
    int32_t bits;
    memcpy(&bits, &shifted, sizeof bits);
    float p = fmaf(EXP2_C5, r, EXP2_C4);
    p = fmaf(p, r, EXP2_C3);
    p = fmaf(p, r, EXP2_C2);
    p = fmaf(p, r, EXP2_C1);
    p = fmaf(p, r, 1.f);
    const uint32_t eb = ((uint32_t)bits - 0x4B400000u + 127u) << 23; /* n + 127 in [1, 127] (any bits for NaN) */
    float scale;
    memcpy(&scale, &eb, sizeof scale);
    return p * scale;
}

/* Scores of one query row in s[0, len), in base 2, into e = 2^(s - max) in place (s[len, ldk) zero); returns
   1 / sum(e), the factor the context is multiplied with. With round (BF16), the probabilities e / sum themselves,
   rounded to bf16, are left in s and the factor is 1. A NaN score, or one of +inf, makes the row NaN, as the formula
   does. */
static float softmax_row_c(float *s, int64_t len, int64_t ldk, int round) {
    float mx = s[0];
    for (int64_t j = 1; j < len; j++) mx = s[j] > mx ? s[j] : mx;
    for (int64_t j = 0; j < len; j++) s[j] = exp2_nonpos(s[j] - mx);
    for (int64_t j = len; j < ldk; j++) s[j] = 0.f;
    float part[16] = {0};
    for (int64_t j = 0; j < ldk; j++) part[j % 16] += s[j];
    const float inv = 1.f / sum16(part);
    if (!round) return inv;
    for (int64_t j = 0; j < len; j++) s[j] = maybe_round(s[j] * inv, 1);
    return 1.f;
}

/* Head h of the sequence at rows offset.., staged in b. */
static void attention_head_c(const mq_attn_job *job, const mq_attn_bufs *pb, int64_t offset, int64_t len, int64_t h) {
    const int64_t d = job->d, dv = job->dv;
    const mq_attn_bufs b = *pb;
    for (int64_t i = 0; i < len; i++) {
        const float *qi = b.q + i * d;
        for (int64_t j = 0; j < len; j++) {
            float acc = 0.f;
            for (int64_t c = 0; c < d; c++) acc = fmaf(qi[c], b.kt[c * b.ldk + j], acc);
            b.s[j] = acc * job->scale_log2e;
        }
        const float f = softmax_row_c(b.s, len, b.ldk, job->round);
        for (int64_t c = 0; c < d; c++) {
            float acc = 0.f;
            for (int64_t j = 0; j < len; j++) acc = fmaf(b.s[j], b.v[j * dv + c], acc);
            b.c[c] = acc * f;
        }
        write_row(job, b.c, offset + i, h);
    }
}

/* ---- vector paths: attention_kernel.inc once per ISA (it undefines its parameters at its end) */

#define TARGET MQ_TARGET_AVX2
#define SFX avx2
#define VF __m256
#define VI __m256i
#define VW 8
#define NV 2
#define ROWS ROWS_AVX2
#define V_LOAD _mm256_loadu_ps
#define V_STORE _mm256_storeu_ps
#define V_SET1 _mm256_set1_ps
#define V_SET1I _mm256_set1_epi32
#define V_ZERO _mm256_setzero_ps
#define V_FMA _mm256_fmadd_ps
#define V_MUL _mm256_mul_ps
#define V_ADD _mm256_add_ps
#define V_SUB _mm256_sub_ps
#define V_MAX _mm256_max_ps
#define V_ADDI _mm256_add_epi32
#define V_SLLI _mm256_slli_epi32
#define V_F2I _mm256_castps_si256
#define V_I2F _mm256_castsi256_ps
#include "attention_kernel.inc"

#define TARGET MQ_TARGET_AVX512
#define SFX avx512
#define VF __m512
#define VI __m512i
#define VW 16
#define NV 1
#define ROWS ROWS_AVX512
#define V_LOAD _mm512_loadu_ps
#define V_STORE _mm512_storeu_ps
#define V_SET1 _mm512_set1_ps
#define V_SET1I _mm512_set1_epi32
#define V_ZERO _mm512_setzero_ps
#define V_FMA _mm512_fmadd_ps
#define V_MUL _mm512_mul_ps
#define V_ADD _mm512_add_ps
#define V_SUB _mm512_sub_ps
#define V_MAX _mm512_max_ps
#define V_ADDI _mm512_add_epi32
#define V_SLLI _mm512_slli_epi32
#define V_F2I _mm512_castps_si512
#define V_I2F _mm512_castsi512_ps
#include "attention_kernel.inc"

/* ---- AVX-512 staging: the keys transposed in registers, 16 keys x 16 dwords at a time */

/* round_bf16_bits of a zmm: each lane's bf16 in its high 16 bits. */
static AI MQ_TARGET_AVX512 __m512i round_bf16(__m512 x) {
    mq_v16u u = (mq_v16u)_mm512_castps_si512(x);
    round_bf16_bits(&u);
    return (__m512i)u;
}

/* Pairs (x[2m], x[2m + 1]) of the rounded lanes as 8 dwords, x[2m] in the high half: vdpbf16ps adds the product of a
   pair's high half first, then of its low half, so the products are accumulated in the order of the f32 paths. */
static AI MQ_TARGET_AVX512 __m256i pair_lanes(__m512i r) {
    const __m512i x = _mm512_or_si512(_mm512_and_si512(r, _mm512_set1_epi64(0xffff0000)), _mm512_srli_epi64(r, 48));
    return _mm512_cvtepi64_epi32(x);
}

/* In place, each 256-bit half of the 8 vectors r[0..7] taken as an 8 x 8 matrix of dwords (row i = the half of
   r[i]) is transposed: afterwards the half of r[m] holds column m. */
static AI MQ_TARGET_AVX512 void transpose_8x8_halves(__m512i r[8]) {
    __m512i t[8], u[8];
    for (int i = 0; i < 4; i++) {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    /* per 128-bit lane: u[m] and u[4 + m] (m < 4) hold element m of rows 0-3 and 4-7 (lanes 0 and 2) and element
       4 + m (lanes 1 and 3) */
    for (int g = 0; g < 2; g++) {
        u[4 * g + 0] = _mm512_unpacklo_epi64(t[4 * g], t[4 * g + 2]);
        u[4 * g + 1] = _mm512_unpackhi_epi64(t[4 * g], t[4 * g + 2]);
        u[4 * g + 2] = _mm512_unpacklo_epi64(t[4 * g + 1], t[4 * g + 3]);
        u[4 * g + 3] = _mm512_unpackhi_epi64(t[4 * g + 1], t[4 * g + 3]);
    }
    for (int m = 0; m < 4; m++) {
        const __m512i x = _mm512_shuffle_i32x4(u[m], u[4 + m], _MM_SHUFFLE(2, 0, 2, 0));
        const __m512i y = _mm512_shuffle_i32x4(u[m], u[4 + m], _MM_SHUFFLE(3, 1, 3, 1));
        r[m] = _mm512_shuffle_i32x4(x, x, _MM_SHUFFLE(3, 1, 2, 0));
        r[4 + m] = _mm512_shuffle_i32x4(y, y, _MM_SHUFFLE(3, 1, 2, 0));
    }
}

/* 16 x 16 dwords transposed: r[i] row i in, column i out. */
static AI MQ_TARGET_AVX512 void transpose_16x16(__m512i r[16]) {
    __m512i lo[8], hi[8]; /* lo[j] = columns 0-7 of rows j and 8 + j, hi[j] columns 8-15 */
    for (int j = 0; j < 8; j++) {
        lo[j] = _mm512_shuffle_i32x4(r[j], r[8 + j], _MM_SHUFFLE(1, 0, 1, 0));
        hi[j] = _mm512_shuffle_i32x4(r[j], r[8 + j], _MM_SHUFFLE(3, 2, 3, 2));
    }
    transpose_8x8_halves(lo);
    transpose_8x8_halves(hi);
    for (int j = 0; j < 8; j++) {
        r[j] = lo[j];
        r[8 + j] = hi[j];
    }
}

/* Mask of the first n lanes (none for n <= 0, all 16 for n >= 16). */
static AI __mmask16 first_lanes(int64_t n) {
    return n >= 16 ? (__mmask16)0xffff : n <= 0 ? (__mmask16)0 : (__mmask16)((1u << n) - 1u);
}

/* stage_head on AVX-512 (the same values): rows copied 16 floats at a time, the keys transposed in 16 x 16
   blocks. */
static MQ_TARGET_AVX512 void stage_head_avx512(const mq_attn_job *job, int64_t offset, int64_t len, int64_t h,
                                               const mq_attn_bufs *b) {
    const int64_t d = job->d, dv = job->dv, H = job->H, ld = 3 * H;
    const int round = job->round;
    const float *rows = job->qkv + offset * ld + h * d;
#define MQ_LOAD(m, p) (round ? round_bf16(_mm512_maskz_loadu_ps(m, p)) : _mm512_castps_si512(_mm512_maskz_loadu_ps(m, p)))
    for (int64_t j = 0; j < len; j++) {
        const float *qs = rows + j * ld, *vs = qs + 2 * H;
        for (int64_t c = 0; c < dv; c += 16) {
            const __mmask16 m = first_lanes(d - c);
            _mm512_mask_storeu_epi32(b->q + j * d + c, m, MQ_LOAD(m, qs + c));
            _mm512_storeu_si512(b->v + j * dv + c, MQ_LOAD(m, vs + c));
        }
    }
    __m512i r[16];
    for (int64_t j0 = 0; j0 < b->ldk; j0 += 16)
        for (int64_t c = 0; c < d; c += 16) {
            const __mmask16 m = first_lanes(d - c);
            for (int i = 0; i < 16; i++)
                r[i] = j0 + i < len ? MQ_LOAD(m, rows + (j0 + i) * ld + H + c) : _mm512_setzero_si512();
            transpose_16x16(r);
            for (int i = 0; i < 16 && c + i < d; i++) _mm512_storeu_si512(b->kt + (c + i) * b->ldk + j0, r[i]);
        }
#undef MQ_LOAD
}

/* ---- AVX-512 with vdpbf16ps (BF16): the AVX-512 tile on bf16 pairs, half the multiply instructions. Each
   vdpbf16ps lane does acc += hi * hi', then acc += lo * lo' (fused, denormals flushed in and out), which is what the
   f32 paths do on the same bf16 values in the pairs' order under FTZ / DAZ (run_task sets them for BF16): the same
   bits, measured against the AVX2 and portable paths by the tests. */

/* Dwords pairing the lanes of a (high half, added first) with those of b: pairs of two rows' values per column. */
static AI MQ_TARGET_AVX512_BF16 __m512i pair_rows(__m512i a, __m512i b) {
    return _mm512_or_si512(_mm512_and_si512(a, _mm512_set1_epi32((int)0xffff0000)), _mm512_srli_epi32(b, 16));
}

/* The n dword columns of 16 keys' rows (row i at t + i x ld, n rounded up to 8 readable) transposed: column m of
   the 16 keys to kt + m x ldk, 8 columns at a time through transpose_8x8_halves (keys i and 8 + i in the halves of
   r[i]). The keys of stage_bf16_avx512 (pairs) and stage_int8_avx512 (quadruples). */
static AI MQ_TARGET_AVX512 void transpose_keys(const uint32_t *t, int64_t ld, int64_t n, uint32_t *kt, int64_t ldk) {
    for (int64_t m0 = 0; m0 < n; m0 += 8) {
        __m512i r[8];
        for (int i = 0; i < 8; i++)
            r[i] = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(t + i * ld + m0))),
                                      _mm256_loadu_si256((const __m256i *)(t + (8 + i) * ld + m0)), 1);
        transpose_8x8_halves(r);
        for (int m = 0; m < 8 && m0 + m < n; m++) _mm512_storeu_si512(kt + (m0 + m) * ldk, r[m]);
    }
}

/* stage_head for the vdpbf16ps path, heads h0 .. h0 + nh - 1 together (see GROUP_WORDS): per head q as [len, d2]
   pairs of dimensions (2m, 2m + 1), kt as [d2, ldk] the keys' pairs (zero past len), v as [ceil(len / 2), dv] pairs
   of keys (2m, 2m + 1) per column (zero past len and d); d2 = ceil(d / 2), a missing dimension zero; head h0 + k's
   blocks at q, kt and v moved by k x hs words. Values rounded as maybe_round rounds them. The rows are read once, in
   order: keys 16 at a time through t [16, nh, d2r] (d2r = d2 rounded up to 8) and transpose_keys, values two rows at
   a time. */
static MQ_TARGET_AVX512_BF16 void stage_bf16_avx512(const mq_attn_job *job, int64_t offset, int64_t len, int64_t h0,
                                                    int64_t nh, uint32_t *q, uint32_t *kt, uint32_t *v, int64_t hs,
                                                    uint32_t *t) {
    const int64_t d = job->d, dv = job->dv, H = job->H, ld = 3 * H, d2 = (d + 1) / 2, d2r = round8(d2);
    const int64_t ldk = round16(len);
    const float *rows = job->qkv + offset * ld + h0 * d;
    for (int64_t j0 = 0; j0 < ldk; j0 += 16) {
        for (int i = 0; i < 16; i++) {
            const int64_t j = j0 + i;
            const float *x = rows + (j < len ? j : 0) * ld; /* read only while j < len */
            for (int64_t k = 0; k < nh; k++) /* 8 pairs (16 dimensions) at a time; keys into row i of t */
                for (int64_t c = 0; c < 2 * d2r; c += 16) {
                    __m256i key = _mm256_setzero_si256();
                    if (j < len && c < d) {
                        const __mmask16 m = first_lanes(d - c);
                        _mm256_mask_storeu_epi32(q + k * hs + j * d2 + c / 2, (__mmask8)first_lanes((d - c + 1) / 2),
                                                 pair_lanes(round_bf16(_mm512_maskz_loadu_ps(m, x + k * d + c))));
                        key = pair_lanes(round_bf16(_mm512_maskz_loadu_ps(m, x + H + k * d + c)));
                    }
                    _mm256_storeu_si256((__m256i *)(t + (i * nh + k) * d2r + c / 2), key);
                }
            if (j < len && (j % 2 == 1 || j == len - 1)) { /* values: pair row j / 2, rows j - 1 and j or j alone */
                const float *v0 = rows + (j - j % 2) * ld + 2 * H, *v1 = j % 2 ? v0 + ld : NULL;
                for (int64_t k = 0; k < nh; k++)
                    for (int64_t c = 0; c < dv; c += 16) {
                        const __mmask16 m = first_lanes(d - c);
                        const __m512i r0 = round_bf16(_mm512_maskz_loadu_ps(m, v0 + k * d + c));
                        const __m512i r1 =
                            v1 ? round_bf16(_mm512_maskz_loadu_ps(m, v1 + k * d + c)) : _mm512_setzero_si512();
                        _mm512_storeu_si512(v + k * hs + j / 2 * dv + c, _mm512_maskz_mov_epi32(m, pair_rows(r0, r1)));
                    }
            }
        }
        for (int64_t k = 0; k < nh; k++) transpose_keys(t + k * d2r, nh * d2r, d2, kt + k * hs + j0, ldk);
    }
}

/* y[r, 16 i + c] = f[r] * sum_m dot(a[r][m], b[m ldb + 16 i + c]) for the ROWS_AVX512 pair rows a[r] (n pairs each),
   i < nb blocks of 16 columns of b (16 accumulators for two: each broadcast pair then feeds two vdpbf16ps). The
   scores (a: queries, b: the keys' pairs) and the context (a: probabilities, b: the values' pairs) both. */
static AI MQ_TARGET_AVX512_BF16 void dots_bf16(const int nb, const uint32_t *const *a, const uint32_t *b, int64_t ldb,
                                               int64_t n, const float *f, float *y, int64_t ldy) {
    __m512 acc[ROWS_AVX512][2];
    for (int r = 0; r < ROWS_AVX512; r++)
        for (int i = 0; i < nb; i++) acc[r][i] = _mm512_setzero_ps();
    for (int64_t m = 0; m < n; m++)
        for (int r = 0; r < ROWS_AVX512; r++) {
            const __m512bh ar = (__m512bh)_mm512_set1_epi32((int)a[r][m]);
            for (int i = 0; i < nb; i++)
                acc[r][i] = _mm512_dpbf16_ps(acc[r][i], ar, (__m512bh)_mm512_loadu_si512(b + m * ldb + 16 * i));
        }
    for (int r = 0; r < ROWS_AVX512; r++)
        for (int i = 0; i < nb; i++)
            _mm512_storeu_ps(y + r * ldy + 16 * i, _mm512_mul_ps(acc[r][i], _mm512_set1_ps(f[r])));
}

/* s[r, j] = (q_r . k_j) * scale for the pair rows qr[r] (d2 pairs), j < ldk. */
static AI MQ_TARGET_AVX512_BF16 void scores_tile_bf16(const uint32_t *const *qr, const uint32_t *kt, int64_t d2,
                                                      int64_t ldk, float scale, float *s) {
    float f[ROWS_AVX512];
    for (int r = 0; r < ROWS_AVX512; r++) f[r] = scale;
    int64_t j0 = 0;
    for (; j0 + 32 <= ldk; j0 += 32) dots_bf16(2, qr, kt + j0, ldk, d2, f, s + j0, ldk);
    if (j0 < ldk) dots_bf16(1, qr, kt + j0, ldk, d2, f, s + j0, ldk);
}

/* The probabilities s[j] * inv of a row (zero past its length), rounded to bf16 as maybe_round rounds them, as
   ldk / 2 pairs (2m, 2m + 1) laid out as pair_lanes lays them out: vcvtneps2bf16 rounds to nearest even and quiets a
   NaN as mq_f32_to_bf16 does, and the products it takes are never denormal (run_task sets FTZ for BF16, and
   vcvtneps2bf16's flushing of denormal inputs would differ); it puts x[2m] in the low half, the rotate swaps. */
static AI MQ_TARGET_AVX512_BF16 void pair_row(const float *s, int64_t ldk, float inv, uint32_t *p) {
    const __m512 f = _mm512_set1_ps(inv);
    for (int64_t j = 0; j < ldk; j += 16) {
        const __m256i h = (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(s + j), f));
        _mm256_storeu_si256((__m256i *)(p + j / 2), _mm256_rol_epi32(h, 16));
    }
}

/* c[r, :] = (sum_j pr[r][j] v[j, :]) * f[r] over the pair rows pr[r] (np pairs of keys). */
static AI MQ_TARGET_AVX512_BF16 void context_tile_bf16(const uint32_t *const *pr, const float *f, const uint32_t *v,
                                                       int64_t np, int64_t dv, float *c) {
    int64_t c0 = 0;
    for (; c0 + 32 <= dv; c0 += 32) dots_bf16(2, pr, v + c0, dv, np, f, c + c0, dv);
    if (c0 < dv) dots_bf16(1, pr, v + c0, dv, np, f, c + c0, dv);
}

static MQ_TARGET_AVX512_BF16 void attention_head_bf16dot(const mq_attn_job *job, const mq_attn_bufs *pb,
                                                         int64_t offset, int64_t len, int64_t h) {
    const int64_t d2 = (job->d + 1) / 2, dv = job->dv;
    const mq_attn_bufs b = *pb;
    const uint32_t *q = (const uint32_t *)b.q;
    for (int64_t i0 = 0; i0 < len; i0 += ROWS_AVX512) {
        const int nr = len - i0 < ROWS_AVX512 ? (int)(len - i0) : ROWS_AVX512;
        _Static_assert(ROWS_AVX512 == 8, "ones[] lists ROWS_AVX512 values");
        static const float ones[ROWS_AVX512] = {1.f, 1.f, 1.f, 1.f, 1.f, 1.f, 1.f, 1.f}; /* pair_row scales */
        const uint32_t *qr[ROWS_AVX512], *pr[ROWS_AVX512];
        for (int r = 0; r < ROWS_AVX512; r++) { /* rows past the sequence repeat its last row, dropped */
            qr[r] = q + (i0 + (r < nr ? r : nr - 1)) * d2;
            pr[r] = b.p + (r < nr ? r : nr - 1) * (b.ldk / 2);
        }
        scores_tile_bf16(qr, (const uint32_t *)b.kt, d2, b.ldk, job->scale_log2e, b.s);
        for (int r = 0; r < nr; r++) {
            const float inv = softmax_row_avx512(b.s + r * b.ldk, len, b.ldk, 2);
            pair_row(b.s + r * b.ldk, b.ldk, inv, b.p + r * (b.ldk / 2));
        }
        context_tile_bf16(pr, ones, (const uint32_t *)b.v, (len + 1) / 2, dv, b.c);
        for (int r = 0; r < nr; r++) write_row(job, b.c + r * dv, offset + i0 + r, h);
    }
}

/* ---- INT8: Q and K quantized per token, V per column, symmetric int8 with scales from the values themselves
   (absmax / 127, per sequence and head), the probabilities as u8 (255 for the row's maximum); Q K^T and P V in
   exact int32 arithmetic, the softmax in f32. Every path does the integer products exactly and the float
   operations of attention_head_int8_c in its order, so the paths give the same bits: vpdpbusd where the CPU has
   avx512_vnni (the queries offset by 128 to make them unsigned, the offset taken back per key), f32 FMAs on the
   integer values elsewhere (attention_head_int8_avx2, within its exact range), else plain C (run_head_int8). */

/* One head's staged int8 blocks (buf's words, in this order). */
typedef struct {
    uint32_t *q8;  /* [len, d4]: q + 128 as u8, dimensions 4m .. 4m + 3 (128 past d) */
    float *qs;     /* [len] the queries' scales times 1/sqrt(d) */
    uint32_t *kt8; /* [d4, ldk]: s8 dimensions 4m .. 4m + 3 of key j (0 past len and d) */
    float *ks;     /* [ldk] the keys' scales (0 past len) */
    int32_t *kc;   /* [ldk] 128 x the sum of key j's s8 values */
    uint32_t *v8;  /* [ldk / 4, dv]: s8 values of keys 4m .. 4m + 3 in column c (0 past len and d) */
    float *vs;     /* [dv] the columns' scales (0 past d) */
    int64_t d4, ldk;
} mq_attn_i8;

static MQ_INLINE mq_attn_i8 i8_bufs(const mq_attn_job *job, int64_t len, float *buf) {
    mq_attn_i8 b;
    b.d4 = (job->d + 3) / 4;
    b.ldk = round16(len);
    b.q8 = (uint32_t *)buf;
    b.qs = (float *)(b.q8 + round16(len * b.d4));
    b.kt8 = (uint32_t *)(b.qs + round16(len));
    b.ks = (float *)(b.kt8 + b.d4 * b.ldk);
    b.kc = (int32_t *)(b.ks + b.ldk);
    b.v8 = (uint32_t *)(b.kc + b.ldk);
    b.vs = (float *)(b.v8 + b.ldk / 4 * job->dv);
    return b;
}

/* The largest |x[i * stride]| of n values; NaN (the default quiet NaN) if one is NaN. */
static float absmax_strided(const float *x, int64_t n, int64_t stride) {
    float m = 0.f;
    int nan = 0;
    for (int64_t i = 0; i < n; i++) {
        const float a = fabsf(x[i * stride]);
        nan |= a != a;
        m = a > m ? a : m;
    }
    return nan ? NAN : m;
}

/* 127 / absmax, or 0 when absmax is 0 or not finite (every value then quantizes to 0; the scale absmax / 127 is
   0, inf or NaN and carries that into the results). */
static MQ_INLINE float inv_scale_s8(float absmax) { return absmax > 0.f && absmax <= FLT_MAX ? 127.f / absmax : 0.f; }

static MQ_INLINE int8_t quant_s8(float x, float inv) {
    if (inv == 0.f) return 0;
    float r = rintf(x * inv);
    r = r > 127.f ? 127.f : r < -127.f ? -127.f : r;
    return (int8_t)r;
}

/* Head h of the sequence at rows offset.. into its int8 blocks. */
static void stage_head_int8(const mq_attn_job *job, int64_t offset, int64_t len, int64_t h, const mq_attn_i8 *b) {
    const int64_t d = job->d, dv = job->dv, H = job->H, ld = 3 * H, d4 = b->d4, ldk = b->ldk;
    const float *rows = job->qkv + offset * ld + h * d;
    for (int64_t j = 0; j < len; j++) {
        const float *x = rows + j * ld, am = absmax_strided(x, d, 1), inv = inv_scale_s8(am);
        uint8_t *q = (uint8_t *)(b->q8 + j * d4);
        for (int64_t c = 0; c < 4 * d4; c++) q[c] = (uint8_t)(c < d ? quant_s8(x[c], inv) + 128 : 128);
        b->qs[j] = am / 127.f * job->scale_log2e;
    }
    for (int64_t j = 0; j < ldk; j++) {
        const float *x = rows + j * ld + H;
        const float am = j < len ? absmax_strided(x, d, 1) : 0.f, inv = inv_scale_s8(am);
        int32_t sum = 0;
        for (int64_t c = 0; c < 4 * d4; c++) {
            const int8_t v = j < len && c < d ? quant_s8(x[c], inv) : 0;
            ((int8_t *)(b->kt8 + c / 4 * ldk + j))[c % 4] = v;
            sum += v;
        }
        b->ks[j] = am / 127.f;
        b->kc[j] = 128 * sum;
    }
    for (int64_t c = 0; c < dv; c++) { /* a column at a time: one scale each */
        const float *x = rows + 2 * H + c;
        const float am = c < d ? absmax_strided(x, len, ld) : 0.f, inv = inv_scale_s8(am);
        for (int64_t j = 0; j < ldk; j++)
            ((int8_t *)(b->v8 + j / 4 * dv + c))[j % 4] = j < len && c < d ? quant_s8(x[j * ld], inv) : 0;
        b->vs[c] = am / 127.f;
    }
}

/* ---- stage_head_int8 on AVX-512 (the same bytes and scales) */

/* |x| into the running maximum / NaN lanes of absmax_strided, 16 lanes. */
static AI MQ_TARGET_AVX512_VNNI void absmax_step(__m512 x, __m512 *m, __mmask16 *nan) {
    const __m512 a = _mm512_abs_ps(x);
    *m = _mm512_max_ps(a, *m); /* a NaN lane of a keeps *m */
    *nan |= _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q);
}

/* inv_scale_s8 of 16 lanes. */
static AI MQ_TARGET_AVX512_VNNI __m512 inv_scale_s8_v(__m512 am) {
    const __mmask16 ok = _mm512_cmp_ps_mask(am, _mm512_setzero_ps(), _CMP_GT_OQ) &
                         _mm512_cmp_ps_mask(am, _mm512_set1_ps(FLT_MAX), _CMP_LE_OQ);
    return _mm512_maskz_div_ps(ok, _mm512_set1_ps(127.f), am);
}

/* quant_s8 of 16 lanes, as int32. */
static AI MQ_TARGET_AVX512_VNNI __m512i quant_s8_v(__m512 x, __m512 inv) {
    const __mmask16 on = _mm512_cmp_ps_mask(inv, _mm512_setzero_ps(), _CMP_NEQ_OQ);
    const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(x, inv));
    return _mm512_maskz_max_epi32(on, _mm512_min_epi32(q, _mm512_set1_epi32(127)), _mm512_set1_epi32(-127));
}

/* A row of d values quantized as stage_head_int8 quantizes a query or key: int32 values into q[c / 16] (0 past d);
   returns the row's absmax. */
static AI MQ_TARGET_AVX512_VNNI float quant_row_i8(const float *x, int64_t d, __m512i *q) {
    __m512 m = _mm512_setzero_ps();
    __mmask16 nan = 0;
    for (int64_t c = 0; c < d; c += 16) absmax_step(_mm512_maskz_loadu_ps(first_lanes(d - c), x + c), &m, &nan);
    const float am = nan ? NAN : _mm512_reduce_max_ps(m);
    const __m512 inv = _mm512_set1_ps(inv_scale_s8(am));
    for (int64_t c = 0; c < d; c += 16) q[c / 16] = quant_s8_v(_mm512_maskz_loadu_ps(first_lanes(d - c), x + c), inv);
    return am;
}

/* Heads h0 .. h0 + nh - 1 of the sequence at rows offset.. into their int8 blocks (see GROUP_WORDS): head h0 + k's
   block is hb's words moved by k x hs (all blocks alike), the same bytes and scales as stage_head_int8. The rows
   are read once, in order, all nh heads from each: queries and keys are quantized as each row is read, the keys 16
   at a time through t [16, nh, d8] and transpose_keys; the values' columns keep their running absmax in
   vm [nh, dv] (NaN once a value is), then the values are read again (from cache) and quantized 4 keys at a time, a
   column's 4 bytes in one dword. */
static MQ_TARGET_AVX512_VNNI void stage_int8_avx512(const mq_attn_job *job, int64_t offset, int64_t len, int64_t h0,
                                                    int64_t nh, const mq_attn_i8 *hb, int64_t hs, float *scratch) {
    const int64_t d = job->d, dv = job->dv, H = job->H, ld = 3 * H, d4 = hb->d4, ldk = hb->ldk;
    const int64_t d8 = round8(d4);
    const float *rows = job->qkv + offset * ld + h0 * d;
    uint32_t *t = (uint32_t *)scratch;
    float *vm = scratch + 16 * nh * d8;
    for (int64_t c = 0; c < nh * dv; c += 16) _mm512_storeu_ps(vm + c, _mm512_setzero_ps());
    __m512i q[I8_MAX_D / 16];
    for (int64_t j0 = 0; j0 < ldk; j0 += 16) {
        memset(t, 0, (size_t)(16 * nh * d8) * sizeof(uint32_t));
        for (int i = 0; i < 16; i++) {
            const int64_t j = j0 + i;
            const float *x = rows + (j < len ? j : 0) * ld; /* read only while j < len */
            for (int64_t k = 0; k < nh && j < len; k++) { /* queries: + 128 as u8, 128 past d */
                const float am = quant_row_i8(x + k * d, d, q);
                uint8_t *dst = (uint8_t *)(hb->q8 + k * hs + j * d4);
                for (int64_t c = 0; c < 4 * d4; c += 16)
                    _mm512_mask_cvtepi32_storeu_epi8(dst + c, first_lanes(4 * d4 - c),
                                                      _mm512_add_epi32(q[c / 16], _mm512_set1_epi32(128)));
                hb->qs[k * hs + j] = am / 127.f * job->scale_log2e;
            }
            for (int64_t k = 0; k < nh; k++) { /* keys: s8 into row i of t, and their sum */
                float am = 0.f;
                int32_t sum = 0;
                if (j < len) {
                    am = quant_row_i8(x + H + k * d, d, q);
                    for (int64_t c = 0; c < d; c += 16) {
                        sum += _mm512_reduce_add_epi32(q[c / 16]);
                        _mm512_mask_cvtepi32_storeu_epi8((uint8_t *)(t + (i * nh + k) * d8) + c, first_lanes(d - c),
                                                          q[c / 16]);
                    }
                }
                hb->ks[k * hs + j] = am / 127.f;
                hb->kc[k * hs + j] = 128 * sum;
            }
            for (int64_t k = 0; k < nh * dv && j < len; k += 16) { /* values: the columns' absmax */
                const int64_t c = k % dv;
                const __m512 a = _mm512_abs_ps(_mm512_maskz_loadu_ps(first_lanes(d - c), x + 2 * H + k / dv * d + c));
                const __m512 m = _mm512_max_ps(a, _mm512_loadu_ps(vm + k)); /* a NaN lane of a keeps vm's */
                _mm512_storeu_ps(vm + k, _mm512_mask_mov_ps(m, _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q), a));
            }
        }
        for (int64_t k = 0; k < nh; k++) transpose_keys(t + k * d8, nh * d8, d4, hb->kt8 + k * hs + j0, ldk);
    }
    for (int64_t k = 0; k < nh * dv; k += 16) { /* the columns' scales; vm then holds 127 / absmax */
        __m512 am = _mm512_loadu_ps(vm + k);
        am = _mm512_mask_mov_ps(am, _mm512_cmp_ps_mask(am, am, _CMP_UNORD_Q), _mm512_set1_ps(NAN));
        _mm512_storeu_ps(hb->vs + k / dv * hs + k % dv, _mm512_div_ps(am, _mm512_set1_ps(127.f)));
        _mm512_storeu_ps(vm + k, inv_scale_s8_v(am));
    }
    for (int64_t m4 = 0; m4 < ldk / 4; m4++)
        for (int64_t k = 0; k < nh * dv; k += 16) {
            const int64_t c = k % dv;
            const __mmask16 lanes = first_lanes(d - c);
            const __m512 inv = _mm512_loadu_ps(vm + k);
            __m512i w = _mm512_setzero_si512();
            for (int s = 0; s < 4 && 4 * m4 + s < len; s++) {
                const float *x = rows + (4 * m4 + s) * ld + 2 * H + k / dv * d + c;
                const __m512i v = quant_s8_v(_mm512_maskz_loadu_ps(lanes, x), inv);
                w = _mm512_or_si512(w, _mm512_slli_epi32(_mm512_and_si512(v, _mm512_set1_epi32(0xff)), 8 * s));
            }
            _mm512_storeu_si512(hb->v8 + k / dv * hs + m4 * dv + c, w);
        }
}


/* 255 x 2^z for z <= 0, z clamped at -127 (where the result is far below 1/2 of a u8 step): z = n + r with
   n = rint(z), |r| <= 1/2, 255 x 2^r by a degree-4 polynomial (a minimax fit with 255 exact at r = 0, within 0.0007
   of it: a u8 probability is off by one of its steps only where 255 x 2^z is that close to a tie), times 2^n exactly
   (ldexpf; vscalefps on the vector path). Never above 255: for n = 0, r <= 0 and the polynomial rises to 255 at 0;
   for n < 0 the result is at most 255 x 2^-1/2 + 0.0007. */
#define EXP2_U8_C4 2.4688870906829834f
#define EXP2_U8_C3 14.259514808654785f
#define EXP2_U8_C2 61.25615310668945f
#define EXP2_U8_C1 176.74598693847656f
static MQ_INLINE float exp2_u8(float z) {
    z = z < -127.f ? -127.f : z;
    const float n = rintf(z), r = z - n;
    float p = fmaf(EXP2_U8_C4, r, EXP2_U8_C3);
    p = fmaf(p, r, EXP2_U8_C2);
    p = fmaf(p, r, EXP2_U8_C1);
    p = fmaf(p, r, 255.f);
    return ldexpf(p, (int)n);
}

/* The u8 probabilities p[j] = rint(255 x 2^(s[j] - max)) of a row of scores s[0, len) in base 2 (the queries' scales
   carry log2(e): 2^(s - max) is exp of the natural scores' s - max), p zero up to ldk; returns 1 / sum(p), or NaN
   when a score is NaN or the maximum is not finite (the row's context is then NaN). */
static AI float softmax_row_int8_c(const float *s, int64_t len, int64_t ldk, uint8_t *p) {
    float mx = -INFINITY;
    int bad = 0;
    for (int64_t j = 0; j < len; j++) {
        mx = s[j] > mx ? s[j] : mx;
        bad |= s[j] != s[j];
    }
    memset(p, 0, (size_t)ldk);
    if (bad || !(mx - mx == 0.f)) return NAN;
    int32_t sum = 0;
    for (int64_t j = 0; j < len; j++) {
        const float r = rintf(exp2_u8(s[j] - mx));
        p[j] = (uint8_t)(r > 255.f ? 255.f : r); /* never above (exp2_u8): a guard for the conversion */
        sum += p[j];
    }
    return 1.f / (float)sum;
}

static void attention_head_int8_c(const mq_attn_job *job, const mq_attn_bufs *pb, const mq_attn_i8 *b,
                                  int64_t offset, int64_t len, int64_t h) {
    const int64_t d = job->d, dv = job->dv, d4 = b->d4, ldk = b->ldk;
    float *s = pb->s, *c = pb->c;
    uint8_t *p = (uint8_t *)pb->p;
    for (int64_t i = 0; i < len; i++) {
        const uint8_t *qi = (const uint8_t *)(b->q8 + i * d4);
        for (int64_t j = 0; j < len; j++) {
            int32_t acc = 0;
            for (int64_t m = 0; m < d4; m++) {
                const int8_t *k = (const int8_t *)(b->kt8 + m * ldk + j);
                for (int t = 0; t < 4; t++) acc += qi[4 * m + t] * k[t];
            }
            s[j] = (float)(acc - b->kc[j]) * b->ks[j] * b->qs[i];
        }
        const float f = softmax_row_int8_c(s, len, ldk, p);
        for (int64_t col = 0; col < d; col++) {
            int32_t acc = 0;
            for (int64_t m = 0; m < (len + 3) / 4; m++) {
                const int8_t *v = (const int8_t *)(b->v8 + m * dv + col);
                for (int t = 0; t < 4; t++) acc += p[4 * m + t] * v[t];
            }
            c[col] = (float)acc * b->vs[col] * f;
        }
        write_row(job, c, offset + i, h);
    }
}

/* ---- INT8 on AVX2: the int8 values held as f32, multiplied by the f32 tiles of attention_head_avx2. Every partial
   sum is an integer of at most 2^24 in magnitude (|Q K^T| <= d x 127^2, P V <= len x 255 x 127) while
   d <= I8_F32_MAX_D and len <= I8_F32_MAX_LEN, so those sums are exact: the int32 results, the same bits. */

#define I8_F32_MAX_D 1024
#define I8_F32_MAX_LEN 512

/* stage_head_int8's values as floats in the f32 layout (q [len, d], kt [d, ldk], v [len, dv]), the query, key and
   column scales in b->x: qs [round16(len)], ks [ldk], vs [dv]. */
static AI void stage_int8_f32_body(const mq_attn_job *job, int64_t offset, int64_t len, int64_t h,
                                   const mq_attn_bufs *b) {
    const int64_t d = job->d, dv = job->dv, H = job->H, ld = 3 * H, ldk = b->ldk;
    const float *rows = job->qkv + offset * ld + h * d;
    float *qs = b->x, *ks = qs + round16(len), *vs = ks + ldk;
    for (int64_t j = 0; j < len; j++) {
        const float *x = rows + j * ld, am = absmax_strided(x, d, 1), inv = inv_scale_s8(am);
        for (int64_t c = 0; c < d; c++) b->q[j * d + c] = (float)quant_s8(x[c], inv);
        qs[j] = am / 127.f * job->scale_log2e;
    }
    for (int64_t j = 0; j < ldk; j++) {
        const float *x = rows + j * ld + H;
        const float am = j < len ? absmax_strided(x, d, 1) : 0.f, inv = inv_scale_s8(am);
        for (int64_t c = 0; c < d; c++) b->kt[c * ldk + j] = j < len ? (float)quant_s8(x[c], inv) : 0.f;
        ks[j] = am / 127.f;
    }
    for (int64_t c = 0; c < dv; c++) {
        const float *x = rows + 2 * H + c;
        const float am = c < d ? absmax_strided(x, len, ld) : 0.f, inv = inv_scale_s8(am);
        for (int64_t j = 0; j < len; j++) b->v[j * dv + c] = c < d ? (float)quant_s8(x[j * ld], inv) : 0.f;
        vs[c] = am / 127.f;
    }
}

static MQ_TARGET_AVX2 void attention_head_int8_avx2(const mq_attn_job *job, const mq_attn_bufs *pb, int64_t offset,
                                                    int64_t len, int64_t h) {
    const int64_t d = job->d, dv = job->dv;
    const mq_attn_bufs b = *pb;
    const float *qs = b.x, *ks = qs + round16(len), *vs = ks + b.ldk;
    stage_int8_f32_body(job, offset, len, h, &b);
    uint8_t *p = (uint8_t *)b.p;
    static const float ones[ROWS_AVX2] = {1.f, 1.f, 1.f, 1.f, 1.f, 1.f};
    for (int64_t i0 = 0; i0 < len; i0 += ROWS_AVX2) {
        const int nr = len - i0 < ROWS_AVX2 ? (int)(len - i0) : ROWS_AVX2;
        const float *qr[ROWS_AVX2], *pr[ROWS_AVX2];
        float f[ROWS_AVX2];
        for (int r = 0; r < ROWS_AVX2; r++) { /* rows past the sequence repeat its last row; dropped */
            qr[r] = b.q + (i0 + (r < nr ? r : nr - 1)) * d;
            pr[r] = b.s + (r < nr ? r : nr - 1) * b.ldk;
        }
        scores_tile_avx2(qr, b.kt, d, b.ldk, 1.f, b.s); /* the exact integer dot products */
        for (int r = 0; r < nr; r++) {
            float *s = b.s + r * b.ldk;
            for (int64_t j = 0; j < len; j++) s[j] = s[j] * ks[j] * qs[i0 + r];
            f[r] = softmax_row_int8_c(s, len, b.ldk, p);
            for (int64_t j = 0; j < b.ldk; j++) s[j] = (float)p[j]; /* the probabilities for P V */
        }
        context_tile_avx2(pr, ones, b.v, len, dv, b.c);
        for (int r = 0; r < nr; r++) {
            float *c = b.c + r * dv;
            for (int64_t col = 0; col < d; col++) c[col] = c[col] * vs[col] * f[r];
            write_row(job, c, offset + i0 + r, h);
        }
    }
}

/* y[r, 16 i + c] = sum_m dot4(a[r][m], b[m ldb + 16 i + c]) (u8 x s8 quadruples, int32) for the ROWS_AVX512 rows
   a[r] (n quadruples each), i < nb blocks of 16 columns. */
static AI MQ_TARGET_AVX512_VNNI void dots_i8(const int nb, const uint32_t *const *a, const uint32_t *b, int64_t ldb,
                                             int64_t n, __m512i acc[ROWS_AVX512][2]) {
    for (int r = 0; r < ROWS_AVX512; r++)
        for (int i = 0; i < nb; i++) acc[r][i] = _mm512_setzero_si512();
    for (int64_t m = 0; m < n; m++)
        for (int r = 0; r < ROWS_AVX512; r++) {
            const __m512i ar = _mm512_set1_epi32((int)a[r][m]);
            for (int i = 0; i < nb; i++)
                acc[r][i] = _mm512_dpbusd_epi32(acc[r][i], ar, _mm512_loadu_si512(b + m * ldb + 16 * i));
        }
}

/* exp2_u8 on 16 lanes (the same bits). */
static AI MQ_TARGET_AVX512_VNNI __m512 exp2_u8_avx512(__m512 z) {
    z = _mm512_max_ps(z, _mm512_set1_ps(-127.f));
    const __m512 n = _mm512_roundscale_ps(z, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), r = _mm512_sub_ps(z, n);
    __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(EXP2_U8_C4), r, _mm512_set1_ps(EXP2_U8_C3));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(EXP2_U8_C2));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(EXP2_U8_C1));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(255.f));
    return _mm512_scalef_ps(p, n);
}

/* softmax_row_int8_c on 16 lanes (the same bits), given the maximum of the row's scores over the lanes that are
   not NaN (attention_head_int8_vnni keeps it as it writes the scores): a NaN is found in this pass. */
static AI MQ_TARGET_AVX512_VNNI float softmax_row_int8_vnni(const float *s, float mx, int64_t len, int64_t ldk,
                                                            uint8_t *p) {
    if (!(mx - mx == 0.f)) {
        memset(p, 0, (size_t)ldk);
        return NAN;
    }
    const __m512 vmx = _mm512_set1_ps(mx);
    __m512i sum = _mm512_setzero_si512();
    __mmask16 nan = 0;
    for (int64_t j = 0; j < ldk; j += 16) {
        const __mmask16 k = first_lanes(len - j);
        const __m512 z = _mm512_sub_ps(_mm512_loadu_ps(s + j), vmx);
        nan |= _mm512_mask_cmp_ps_mask(k, z, z, _CMP_UNORD_Q);
        const __m512i q = _mm512_maskz_cvtps_epi32(k, exp2_u8_avx512(z)); /* at most 255 (exp2_u8) */
        sum = _mm512_add_epi32(sum, q);
        _mm_storeu_si128((__m128i *)(p + j), _mm512_cvtepi32_epi8(q));
    }
    if (nan) {
        memset(p, 0, (size_t)ldk);
        return NAN;
    }
    return 1.f / (float)_mm512_reduce_add_epi32(sum);
}

/* attention_head_int8_c on vpdpbusd, in tiles of 8 query rows: the scores s[r, j] = (float)(acc - kc[j]) * ks[j] *
   qs[r], the u8 probabilities, the context ((float)acc * vs[c]) * (1 / sum p): the same operations, the same bits. */
static MQ_TARGET_AVX512_VNNI void attention_head_int8_vnni(const mq_attn_job *job, const mq_attn_bufs *pb,
                                                           const mq_attn_i8 *b, int64_t offset, int64_t len,
                                                           int64_t h) {
    const int64_t dv = job->dv, d4 = b->d4, ldk = b->ldk, n4 = (len + 3) / 4;
    float *s = pb->s, *c = pb->c;
    uint8_t *p = (uint8_t *)pb->p;
    __m512i acc[ROWS_AVX512][2];
    for (int64_t i0 = 0; i0 < len; i0 += ROWS_AVX512) {
        const int nr = len - i0 < ROWS_AVX512 ? (int)(len - i0) : ROWS_AVX512;
        const uint32_t *qr[ROWS_AVX512], *pr[ROWS_AVX512];
        float qs[ROWS_AVX512], f[ROWS_AVX512];
        for (int r = 0; r < ROWS_AVX512; r++) { /* rows past the sequence repeat its last row, dropped */
            const int64_t i = i0 + (r < nr ? r : nr - 1);
            qr[r] = b->q8 + i * d4;
            qs[r] = b->qs[i];
            pr[r] = (const uint32_t *)(p + (r < nr ? r : nr - 1) * ldk);
        }
        __m512 mx[ROWS_AVX512]; /* each row's maximum score so far, over the sequence's keys (NaN lanes left out) */
        for (int r = 0; r < ROWS_AVX512; r++) mx[r] = _mm512_set1_ps(-INFINITY);
        for (int64_t j0 = 0; j0 < ldk; j0 += 32) {
            const int nb = ldk - j0 >= 32 ? 2 : 1;
            dots_i8(nb, qr, b->kt8 + j0, ldk, d4, acc);
            for (int i = 0; i < nb; i++) {
                const __m512i kc = _mm512_loadu_si512(b->kc + j0 + 16 * i);
                const __m512 ks = _mm512_loadu_ps(b->ks + j0 + 16 * i);
                const __mmask16 keys = first_lanes(len - j0 - 16 * i);
                for (int r = 0; r < ROWS_AVX512; r++) {
                    __m512 x = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc[r][i], kc)), ks);
                    x = _mm512_mul_ps(x, _mm512_set1_ps(qs[r]));
                    _mm512_storeu_ps(s + r * ldk + j0 + 16 * i, x);
                    mx[r] = _mm512_mask_max_ps(mx[r], keys, x, mx[r]); /* a NaN lane of x keeps mx's */
                }
            }
        }
        for (int r = 0; r < nr; r++)
            f[r] = softmax_row_int8_vnni(s + r * ldk, _mm512_reduce_max_ps(mx[r]), len, ldk, p + r * ldk);
        for (int64_t c0 = 0; c0 < dv; c0 += 32) {
            const int nb = dv - c0 >= 32 ? 2 : 1;
            dots_i8(nb, pr, b->v8 + c0, dv, n4, acc);
            for (int i = 0; i < nb; i++) {
                const __m512 vs = _mm512_loadu_ps(b->vs + c0 + 16 * i);
                for (int r = 0; r < nr; r++) {
                    const __m512 x = _mm512_mul_ps(_mm512_cvtepi32_ps(acc[r][i]), vs);
                    _mm512_storeu_ps(c + r * dv + c0 + 16 * i, _mm512_mul_ps(x, _mm512_set1_ps(f[r])));
                }
            }
        }
        for (int r = 0; r < nr; r++) write_row(job, c + r * dv, offset + i0 + r, h);
    }
}

/* ------------------------------------------------------------------ forward */

/* Head h in INT8 on the fastest exact path this CPU and head allow (heads staged one at a time). */
static void run_head_int8(const mq_attention *a, const mq_attn_job *job, const mq_attn_bufs *tb, const mq_attn_i8 *ib,
                          int64_t offset, int64_t len, int64_t h) {
    if (stages_int8_avx512(a)) {
        stage_int8_avx512(job, offset, len, h, 1, ib, 0, tb->stage);
        attention_head_int8_vnni(job, tb, ib, offset, len, h);
    } else if (a->int8_dot) {
        stage_head_int8(job, offset, len, h, ib);
        attention_head_int8_vnni(job, tb, ib, offset, len, h);
    } else if (a->isa != MQ_VEC_C && job->d <= I8_F32_MAX_D && len <= I8_F32_MAX_LEN) {
        attention_head_int8_avx2(job, tb, offset, len, h); /* stages in the f32 layout itself */
    } else {
        stage_head_int8(job, offset, len, h, ib);
        attention_head_int8_c(job, tb, ib, offset, len, h);
    }
}

/* Heads h0 .. h0 + nh - 1 (nh > 1) staged together (stage_int8_avx512, stage_bf16_avx512): the staging's scratch at
   tb's `stage`, then the heads' blocks, hs words each. INT8 on vpdpbusd: */
static void run_heads_int8_vnni(const mq_attention *a, const mq_attn_job *job, const mq_attn_bufs *tb, int64_t offset,
                                int64_t len, int64_t h0, int64_t nh) {
    const int64_t hs = i8_floats(len, job->d);
    float *blocks = tb->stage + group_scratch_floats(a) * nh;
    const mq_attn_i8 hb = i8_bufs(job, len, blocks);
    stage_int8_avx512(job, offset, len, h0, nh, &hb, hs, tb->stage);
    for (int64_t k = 0; k < nh; k++) {
        const mq_attn_i8 ib = i8_bufs(job, len, blocks + k * hs);
        attention_head_int8_vnni(job, tb, &ib, offset, len, h0 + k);
    }
}

/* BF16 on vdpbf16ps: */
static void run_heads_bf16dot(const mq_attention *a, const mq_attn_job *job, const mq_attn_bufs *tb, int64_t offset,
                              int64_t len, int64_t h0, int64_t nh) {
    const int64_t hs = pairs_floats(len, job->d);
    mq_attn_bufs hb = *tb;
    place_pairs(&hb, tb->stage + group_scratch_floats(a) * nh, len, job->d);
    stage_bf16_avx512(job, offset, len, h0, nh, (uint32_t *)hb.q, (uint32_t *)hb.kt, (uint32_t *)hb.v, hs,
                      (uint32_t *)tb->stage);
    for (int64_t k = 0; k < nh; k++) {
        attention_head_bf16dot(job, &hb, offset, len, h0 + k);
        hb.q += hs;
        hb.kt += hs;
        hb.v += hs;
    }
}

static void run_task(const mq_attention *a, const mq_attn_plan *p, const mq_attn_job *job, const int64_t *offsets,
                     const int32_t *lengths, int64_t task, float *buf) {
    const int heads = p->heads_per_task;
    const int64_t b = task / (a->n_heads / heads), h0 = task % (a->n_heads / heads) * heads;
    const int64_t offset = offsets[b], len = lengths[b];
    const mq_attn_bufs tb = task_bufs(job, len, buf);
    const mq_attn_i8 ib = i8_bufs(job, len, buf); /* the same words as tb's staged head, for INT8 */
    const int64_t group = stage_group(group_head_floats(a, len), heads);
    /* BF16 flushes denormals, in and out, on every path, as vdpbf16ps does (MXCSR is per thread) */
    const unsigned csr = _mm_getcsr();
    if (job->round) _mm_setcsr(csr | 0x8040u);
    for (int64_t h = h0; h < h0 + heads && group > 1; h += group) { /* heads staged together */
        const int64_t nh = h0 + heads - h < group ? h0 + heads - h : group;
        if (job->i8)
            run_heads_int8_vnni(a, job, &tb, offset, len, h, nh);
        else
            run_heads_bf16dot(a, job, &tb, offset, len, h, nh);
    }
    for (int64_t h = h0; h < h0 + heads && group == 1; h++) { /* one head at a time: its staged blocks stay in cache */
        if (job->i8) {
            run_head_int8(a, job, &tb, &ib, offset, len, h);
            continue;
        }
        if (job->dot) {
            stage_bf16_avx512(job, offset, len, h, 1, (uint32_t *)tb.q, (uint32_t *)tb.kt, (uint32_t *)tb.v, 0,
                              (uint32_t *)tb.stage);
            attention_head_bf16dot(job, &tb, offset, len, h);
            continue;
        }
        switch (a->isa) {
            case MQ_VEC_AVX512:
                stage_head_avx512(job, offset, len, h, &tb);
                attention_head_avx512(job, &tb, offset, len, h);
                break;
            case MQ_VEC_AVX2:
                if (job->round) /* bf16 emulated on AVX2: the portable rounding */
                    stage_head(job, offset, len, h, &tb);
                else
                    stage_head_avx2(job, offset, len, h, &tb);
                attention_head_avx2(job, &tb, offset, len, h);
                break;
            default:
                stage_head(job, offset, len, h, &tb);
                attention_head_c(job, &tb, offset, len, h);
                break;
        }
    }
    if (job->round) _mm_setcsr(csr);
}

mq_status mq_attention_forward(mq_attention *a, const float *qkv, float *ctx, uint8_t *ctx_q, float q_scale,
                               int32_t q_zp, const int64_t *offsets, const int32_t *lengths, int64_t batch) {
    if (!a || !qkv || (batch > 0 && (!offsets || !lengths)) || batch < 0)
        return mq_set_error(MQ_ERR_ARG, "attention: bad arguments");
    if (ctx_q && (!(q_scale > 0.f) || q_zp < 0 || q_zp > 255))
        return mq_set_error(MQ_ERR_ARG, "attention: bad output quantization (scale %g, zero point %d)", (double)q_scale, q_zp);
    if (!ctx_q && !ctx) return mq_set_error(MQ_ERR_ARG, "attention: no output");
    int64_t max_len = 1;
    for (int64_t b = 0; b < batch; b++) {
        if (lengths[b] <= 0 || lengths[b] > a->max_len)
            return mq_set_error(MQ_ERR_ARG, "attention: sequence length %d outside [1, %lld]", lengths[b], (long long)a->max_len);
        if (lengths[b] > max_len) max_len = lengths[b];
    }
    const mq_attn_plan p = make_plan(a, batch);
    const mq_attn_job job = {qkv, (int64_t)a->n_heads * a->head_dim, a->head_dim, round16(a->head_dim),
                             a->scale * 1.44269504088896341f,
                             a->precision == MQ_ATTN_BF16, a->precision == MQ_ATTN_BF16 && a->bf16_dot,
                             a->precision == MQ_ATTN_INT8, group_head_floats(a, 1) ? 1 : p.heads_per_task,
                             {ctx, ctx_q, ctx_q ? 1.f / q_scale : 0.f, q_zp}};
    for (int t = 0; t < p.nthr; t++) /* before the parallel region: nothing inside it can fail */
        MQ_TRY(mq_buffer_reserve(&a->scratch[t], scratch_floats(a, max_len, p.heads_per_task), sizeof(float)));
    if (p.nthr < 2) {
        for (int64_t k = 0; k < p.tasks; k++) run_task(a, &p, &job, offsets, lengths, k, a->scratch[0].ptr);
        return MQ_OK;
    }
#pragma omp parallel for num_threads(p.nthr) schedule(dynamic, 1)
    for (int64_t k = 0; k < p.tasks; k++)
        run_task(a, &p, &job, offsets, lengths, k, a->scratch[omp_get_thread_num()].ptr);
    return MQ_OK;
}
