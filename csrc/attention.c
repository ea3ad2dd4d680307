/* attention.c - scaled dot-product self-attention per sequence over packed rows (attention.h): primitives per length
 * bucket in a primitive cache, built before the parallel region so the threads only look them up. */
#include "attention.h"

#include "qparams.h"

#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MQ_ATTN_MAX_THREADS 64

/* Memory views one thread uses with a bucket's primitives (handles are set per sequence). */
typedef struct {
    dnnl_memory_t q, k, v, scores, probs, mask, ctx, scratch;
} mq_attn_mems;
#define MQ_ATTN_MDS 8 /* q, k, v, scores, probs, mask, ctx, scratch */

/* Primitives for one length bucket, and per-thread memory views (created on first use by that thread). */
typedef struct {
    dnnl_primitive_t qk, softmax, pv;
    int lp;    /* operands stored as bf16 for oneDNN's bf16 kernels (BF16 precision, native) */
    int round; /* operands stored as f32 rounded to bf16 (BF16 precision emulated: no bf16 kernel on this CPU) */
    size_t scratch_bytes;
    dnnl_memory_desc_t md[MQ_ATTN_MDS];
    mq_attn_mems mems[MQ_ATTN_MAX_THREADS];
} mq_attn_prim;

/* Per-thread scratch: scores [heads, L, L] (f32), probabilities [heads, L, L] (bf16, native BF16 only), mask [L],
   context rows [L, H], oneDNN scratchpad, and the sequence's queries [heads, L, d], transposed keys [heads, d, L]
   and values [heads, L, d] copied dense (stage_qkv). */
typedef struct {
    mq_buffer scores, probs, mask, ctx, scratch, q, kt, v;
    dnnl_stream_t stream; /* streams are not shared between threads */
} mq_attn_thread;

struct mq_attention {
    mq_engine *eng; /* borrowed */
    int n_heads;
    int64_t head_dim, max_len;
    float scale;
    mq_attn_precision precision;
    mq_prim_cache prims; /* mq_attn_prim per length bucket (a multiple of MQ_ATTN_BUCKET) */
    mq_attn_thread threads[MQ_ATTN_MAX_THREADS];
};

static mq_status build_prim(void *owner, int64_t L, void *entry);
static void free_prim(void *entry);

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
    mq_prim_cache_init(&a->prims, sizeof(mq_attn_prim), build_prim, free_prim);
    *out = a;
    return MQ_OK;
}

static void destroy_mems(mq_attn_mems *m) {
    dnnl_memory_t mems[MQ_ATTN_MDS] = {m->q, m->k, m->v, m->scores, m->probs, m->mask, m->ctx, m->scratch};
    for (int i = 0; i < MQ_ATTN_MDS; i++) if (mems[i]) dnnl_memory_destroy(mems[i]);
    memset(m, 0, sizeof *m);
}

static void free_prim(void *entry) {
    mq_attn_prim *p = entry;
    dnnl_primitive_t prims[3] = {p->qk, p->softmax, p->pv};
    for (int i = 0; i < 3; i++) if (prims[i]) dnnl_primitive_destroy(prims[i]);
    for (int i = 0; i < MQ_ATTN_MDS; i++) dnnl_memory_desc_destroy(p->md[i]);
    for (int t = 0; t < MQ_ATTN_MAX_THREADS; t++) destroy_mems(&p->mems[t]);
    memset(p, 0, sizeof *p);
}

void mq_attention_reset(mq_attention *a) {
    if (a) mq_prim_cache_clear(&a->prims);
}

mq_status mq_attention_set_precision(mq_attention *a, mq_attn_precision precision) {
    if (!a) return mq_set_error(MQ_ERR_ARG, "attention: NULL");
    if ((int)precision < 0 || precision >= MQ_ATTN_PRECISION_COUNT)
        return mq_set_error(MQ_ERR_ARG, "attention: unknown precision %d", (int)precision);
    if (precision != a->precision) mq_attention_reset(a);
    a->precision = precision;
    return MQ_OK;
}

mq_attn_precision mq_attention_precision(const mq_attention *a) { return a->precision; }

int mq_attention_emulated(mq_attention *a) {
    if (a->precision != MQ_ATTN_BF16) return 0;
    void *entry = NULL;
    if (mq_prim_cache_get(&a->prims, a, MQ_ATTN_BUCKET, &entry) != MQ_OK) return -1;
    return ((const mq_attn_prim *)entry)->round;
}

/* A thread's buffers, in one list for sizing and releasing. */
#define MQ_ATTN_BUFFERS(th) \
    {&(th)->scores, &(th)->probs, &(th)->mask, &(th)->ctx, &(th)->scratch, &(th)->q, &(th)->kt, &(th)->v}

void mq_attention_release_scratch(mq_attention *a) {
    for (int t = 0; t < MQ_ATTN_MAX_THREADS; t++) {
        mq_buffer *bufs[] = MQ_ATTN_BUFFERS(&a->threads[t]);
        for (size_t i = 0; i < sizeof bufs / sizeof *bufs; i++) mq_buffer_release(bufs[i]);
    }
}

size_t mq_attention_scratch_bytes(mq_attention *a) {
    size_t n = 0;
    for (int t = 0; t < MQ_ATTN_MAX_THREADS; t++) {
        mq_buffer *bufs[] = MQ_ATTN_BUFFERS(&a->threads[t]);
        for (size_t i = 0; i < sizeof bufs / sizeof *bufs; i++) n += bufs[i]->bytes;
    }
    return n;
}

void mq_attention_destroy(mq_attention *a) {
    if (!a) return;
    mq_prim_cache_release(&a->prims);
    mq_attention_release_scratch(a);
    for (int t = 0; t < MQ_ATTN_MAX_THREADS; t++)
        if (a->threads[t].stream) dnnl_stream_destroy(a->threads[t].stream);
    free(a);
}

/* The padded length a sequence of len tokens runs at. */
static int64_t bucket_len(int64_t len) { return (len + MQ_ATTN_BUCKET - 1) / MQ_ATTN_BUCKET * MQ_ATTN_BUCKET; }

/* Threads mq_attention_forward runs sequences on. */
static int forward_threads(const mq_attention *a, int64_t batch) {
    int nthr = mq_engine_threads(a->eng);
    if (nthr > MQ_ATTN_MAX_THREADS) nthr = MQ_ATTN_MAX_THREADS;
    return batch < 2 || nthr < 2 ? 1 : (batch < nthr ? (int)batch : nthr);
}

size_t mq_attention_scratch_need(const mq_attention *a, int64_t max_len, int64_t batch) {
    const double L = (double)bucket_len(max_len), H = (double)a->n_heads * (double)a->head_dim;
    /* scores f32 + probabilities bf16, mask, context, and Q, K^T, V (f32 at most) */
    const double per_thread = (double)a->n_heads * L * L * 6.0 + (L + 4.0 * L * H) * sizeof(float);
    const double total = per_thread * forward_threads(a, batch);
    return total >= (double)SIZE_MAX ? SIZE_MAX : (size_t)total;
}

static mq_status md3(dnnl_memory_desc_t *md, int64_t d0, int64_t d1, int64_t d2, int64_t s0, int64_t s1, int64_t s2,
                     dnnl_data_type_t dt) {
    dnnl_dims_t dims = {d0, d1, d2}, strides = {s0, s1, s2};
    MQ_DNNL(dnnl_memory_desc_create_with_strides(md, 3, dims, dt, strides));
    return MQ_OK;
}

/* The primitive of pd into *prim (pd consumed); with `optimized`, MQ_ERR_DNNL if oneDNN offers only its reference
   implementation (then the caller emulates bf16 in f32). */
static mq_status make_prim(dnnl_primitive_desc_t pd, int optimized, dnnl_primitive_t *prim, size_t *scratch_bytes) {
    if (optimized && strncmp(mq_pd_impl_name(pd), "ref", 3) == 0) {
        dnnl_primitive_desc_destroy(pd);
        return mq_set_error(MQ_ERR_DNNL, "attention: oneDNN has only its reference bf16 kernel on this CPU");
    }
    return mq_primitive_from_pd(pd, prim, scratch_bytes);
}

/* The three primitives of a bucket of L tokens, operands in dt (f32, or bf16 when lp) and f32 scores:
   S = (Q K^T) * 1/sqrt(d) + mask, softmax(S) in place (f32), P in dt, C = P V (head-major: a dense destination keeps oneDNN on brgemm). */
static mq_status build_set(mq_attention *a, int64_t L, int lp, mq_attn_prim *p) {
    const int64_t Hh = a->n_heads, d = a->head_dim;
    const dnnl_data_type_t dt = lp ? dnnl_bf16 : dnnl_f32;
    dnnl_engine_t eng = mq_engine_dnnl(a->eng);
    mq_status st = MQ_OK;
    dnnl_memory_desc_t *q_md = &p->md[0], *k_md = &p->md[1], *v_md = &p->md[2], *s_md = &p->md[3],
                       *p_md = &p->md[4], *m_md = &p->md[5], *c_md = &p->md[6];
    dnnl_primitive_attr_t attr = NULL, sattr = NULL, pattr = NULL;
    dnnl_post_ops_t po = NULL;
    dnnl_primitive_desc_t pd = NULL;
    /* every operand dense (stage_qkv): on dense operands oneDNN picks its brgemm kernels, which apply the scale and
       mask post-ops in registers; strided views of the packed rows fall back to gemm:jit (2-4x slower here) */
    MQ_TRY_GOTO(st, md3(q_md, Hh, L, d, L * d, d, 1, dt), done);
    MQ_TRY_GOTO(st, md3(k_md, Hh, d, L, d * L, L, 1, dt), done);
    MQ_TRY_GOTO(st, md3(v_md, Hh, L, d, L * d, d, 1, dt), done);
    MQ_TRY_GOTO(st, md3(s_md, Hh, L, L, L * L, L, 1, dnnl_f32), done);
    MQ_TRY_GOTO(st, md3(p_md, Hh, L, L, L * L, L, 1, dt), done);
    MQ_TRY_GOTO(st, md3(m_md, 1, 1, L, L, L, 1, dnnl_f32), done);
    MQ_TRY_GOTO(st, md3(c_md, Hh, L, d, L * d, d, 1, dnnl_f32), done);
    MQ_TRY_GOTO(st, mq_attr_create(&attr), done);
    MQ_TRY_GOTO(st, MQ_DNNL_STATUS(dnnl_post_ops_create(&po)), done);
    MQ_TRY_GOTO(st, MQ_DNNL_STATUS(dnnl_post_ops_append_eltwise(po, dnnl_eltwise_linear, a->scale, 0.f)), done);
    MQ_TRY_GOTO(st, MQ_DNNL_STATUS(dnnl_post_ops_append_binary(po, dnnl_binary_add, *m_md)), done);
    MQ_TRY_GOTO(st, MQ_DNNL_STATUS(dnnl_primitive_attr_set_post_ops(attr, po)), done);
    MQ_TRY_GOTO(st, MQ_DNNL_STATUS(dnnl_matmul_primitive_desc_create(&pd, eng, *q_md, *k_md, NULL, *s_md, attr)), done);
    st = make_prim(pd, lp, &p->qk, &p->scratch_bytes);
    pd = NULL;
    if (st != MQ_OK) goto done;
    MQ_TRY_GOTO(st, mq_attr_create(&sattr), done);
    MQ_TRY_GOTO(st, MQ_DNNL_STATUS(dnnl_softmax_forward_primitive_desc_create(&pd, eng, dnnl_forward_inference,
                                                                              dnnl_softmax_accurate, *s_md, *s_md, 2,
                                                                              sattr)), done);
    st = make_prim(pd, lp, &p->softmax, &p->scratch_bytes);
    pd = NULL;
    if (st != MQ_OK) goto done;
    MQ_TRY_GOTO(st, mq_attr_create(&pattr), done);
    MQ_TRY_GOTO(st, MQ_DNNL_STATUS(dnnl_matmul_primitive_desc_create(&pd, eng, *p_md, *v_md, NULL, *c_md, pattr)), done);
    st = make_prim(pd, lp, &p->pv, &p->scratch_bytes);
    pd = NULL;
    if (st != MQ_OK) goto done;
    {
        dnnl_dims_t sd = {(int64_t)(p->scratch_bytes ? p->scratch_bytes : 1)};
        MQ_TRY_GOTO(st, MQ_DNNL_STATUS(dnnl_memory_desc_create_with_tag(&p->md[7], 1, sd, dnnl_u8, dnnl_a)), done);
    }
    p->lp = lp;
done:
    if (pd) dnnl_primitive_desc_destroy(pd);
    if (po) dnnl_post_ops_destroy(po);
    if (attr) dnnl_primitive_attr_destroy(attr);
    if (sattr) dnnl_primitive_attr_destroy(sattr);
    if (pattr) dnnl_primitive_attr_destroy(pattr);
    return st; /* on failure the cache (or build_prim) frees the partly built entry */
}

/* The primitive cache's build function. BF16 precision takes oneDNN's bf16 kernels where it has optimized ones,
   else f32 kernels on operands rounded to bf16 (the same products, f32 accumulation either way). */
static mq_status build_prim(void *owner, int64_t L, void *entry) {
    mq_attention *a = owner;
    mq_attn_prim *p = entry;
    if (a->precision != MQ_ATTN_BF16) return build_set(a, L, 0, p);
    mq_status st = build_set(a, L, 1, p);
    if (st != MQ_ERR_DNNL) return st;
    free_prim(p);
    MQ_TRY(build_set(a, L, 0, p));
    p->round = 1;
    return MQ_OK;
}

static mq_status thread_mems(mq_attention *a, mq_attn_prim *p, int t, mq_attn_mems **out) {
    mq_attn_mems *m = &p->mems[t];
    if (!m->q) {
        dnnl_memory_t *dst[MQ_ATTN_MDS] = {&m->q, &m->k, &m->v, &m->scores, &m->probs, &m->mask, &m->ctx, &m->scratch};
        for (int i = 0; i < MQ_ATTN_MDS; i++) {
            mq_status st = MQ_DNNL_STATUS(dnnl_memory_create(dst[i], p->md[i], mq_engine_dnnl(a->eng), DNNL_MEMORY_NONE));
            if (st != MQ_OK) {
                destroy_mems(m);
                return st;
            }
        }
    }
    *out = m;
    return MQ_OK;
}

#define SET(mem, ptr) MQ_DNNL(dnnl_memory_set_data_handle((mem), (void *)(ptr)))

/* How stage_qkv stores an operand: f32 as it is, f32 rounded to bf16, or bf16. */
typedef enum { MQ_STAGE_F32, MQ_STAGE_ROUND, MQ_STAGE_BF16 } mq_stage_kind;

/* dst[i] = src[i * stride] for i < n, stored as `kind` (dst is float or uint16_t). */
static inline void stage_run(const float *src, int64_t stride, int64_t n, mq_stage_kind kind, void *dst) {
    switch (kind) {
        case MQ_STAGE_F32: {
            float *y = dst;
            for (int64_t i = 0; i < n; i++) y[i] = src[i * stride];
            break;
        }
        case MQ_STAGE_ROUND: {
            float *y = dst;
            for (int64_t i = 0; i < n; i++) y[i] = mq_bf16_to_f32(mq_f32_to_bf16(src[i * stride]));
            break;
        }
        case MQ_STAGE_BF16: {
            uint16_t *y = dst;
            for (int64_t i = 0; i < n; i++) y[i] = mq_f32_to_bf16(src[i * stride]);
            break;
        }
    }
}

/* Copies one sequence's queries to q [heads, L, d], its keys, transposed, to kt [heads, d, L] and its values to
   v [heads, L, d], stored as `kind`; rows / columns from len to L are zero (masked keys then score exactly
   -1e30 * 1 and meet zero values; padded query rows are discarded). */
static void stage_qkv(const float *base, int64_t len, int64_t L, int64_t Hh, int64_t d, mq_stage_kind kind, void *q,
                      void *kt, void *v) {
    const int64_t H = Hh * d, ld = 3 * H;
    const size_t es = kind == MQ_STAGE_BF16 ? 2 : 4;
    char *qb = q, *kb = kt, *vb = v;
    for (int64_t h = 0; h < Hh; h++) {
        char *qh = qb + (size_t)(h * L * d) * es, *vh = vb + (size_t)(h * L * d) * es, *kh = kb + (size_t)(h * d * L) * es;
        for (int64_t j = 0; j < len; j++) {
            stage_run(base + j * ld + h * d, 1, d, kind, qh + (size_t)(j * d) * es);
            stage_run(base + j * ld + 2 * H + h * d, 1, d, kind, vh + (size_t)(j * d) * es);
        }
        memset(qh + (size_t)(len * d) * es, 0, (size_t)((L - len) * d) * es);
        memset(vh + (size_t)(len * d) * es, 0, (size_t)((L - len) * d) * es);
        const float *ksrc = base + H + h * d;
        for (int64_t j0 = 0; j0 < len; j0 += 16) { /* 16 keys at a time: reads and writes stay in a few lines */
            const int64_t n = j0 + 16 < len ? 16 : len - j0;
            for (int64_t c = 0; c < d; c++) stage_run(ksrc + j0 * ld + c, ld, n, kind, kh + (size_t)(c * L + j0) * es);
        }
        for (int64_t c = 0; c < d; c++) memset(kh + (size_t)(c * L + len) * es, 0, (size_t)(L - len) * es);
    }
}

/* Where a forward writes the context: f32 rows, or u8 rows quantized with (1 / scale, zero point). */
typedef struct {
    float *ctx;
    uint8_t *ctx_q;
    float inv_scale;
    int32_t zp;
} mq_attn_out;

/* The real rows of a sequence's context, head-major ctx [heads, L, d], into rows offset.. of the packed [T, H]
   output: f32, or quantized to u8 for the next layer. */
static void copy_out(const float *ctx, int64_t len, int64_t L, int64_t Hh, int64_t d, const mq_attn_out *out,
                     int64_t offset) {
    const int64_t H = Hh * d;
    for (int64_t j = 0; j < len; j++)
        for (int64_t h = 0; h < Hh; h++) {
            const float *src = ctx + (h * L + j) * d;
            if (out->ctx_q)
                mq_quantize_row_u8(src, d, out->inv_scale, out->zp, out->ctx_q + (offset + j) * H + h * d);
            else
                memcpy(out->ctx + (offset + j) * H + h * d, src, (size_t)d * sizeof(float));
        }
}

/* The softmax output as P V's bf16 operand, rounded to nearest even here rather than by oneDNN's softmax (whose bf16
   output is not the rounded f32 result): into probs (bf16) when given, else in place as f32 (emulation). */
static void probs_bf16(float *scores, size_t n, uint16_t *probs) {
    if (probs)
        for (size_t i = 0; i < n; i++) probs[i] = mq_f32_to_bf16(scores[i]);
    else
        for (size_t i = 0; i < n; i++) scores[i] = mq_bf16_to_f32(mq_f32_to_bf16(scores[i]));
}

/* Reserves thread t's buffers for a bucket of L tokens and points its memory views at them. */
static mq_status thread_buffers(mq_attention *a, mq_attn_prim *p, mq_attn_thread *th, mq_attn_mems *m, int64_t L) {
    const size_t H = (size_t)a->n_heads * (size_t)a->head_dim, LL = (size_t)a->n_heads * (size_t)L * (size_t)L;
    const size_t es = p->lp ? sizeof(uint16_t) : sizeof(float);
    MQ_TRY(mq_buffer_reserve(&th->scores, LL, sizeof(float)));
    if (p->lp) MQ_TRY(mq_buffer_reserve(&th->probs, LL, sizeof(uint16_t)));
    MQ_TRY(mq_buffer_reserve(&th->mask, (size_t)L, sizeof(float)));
    MQ_TRY(mq_buffer_reserve(&th->ctx, (size_t)L * H, sizeof(float)));
    MQ_TRY(mq_buffer_reserve(&th->scratch, p->scratch_bytes ? p->scratch_bytes : 1, 1));
    MQ_TRY(mq_buffer_reserve(&th->q, (size_t)L * H, es));
    MQ_TRY(mq_buffer_reserve(&th->kt, (size_t)L * H, es));
    MQ_TRY(mq_buffer_reserve(&th->v, (size_t)L * H, es));
    SET(m->q, th->q.ptr);
    SET(m->k, th->kt.ptr);
    SET(m->v, th->v.ptr);
    SET(m->scores, th->scores.ptr);
    SET(m->probs, p->lp ? th->probs.ptr : th->scores.ptr); /* f32: P V reads the softmax output in place */
    SET(m->mask, th->mask.ptr);
    SET(m->ctx, th->ctx.ptr);
    SET(m->scratch, th->scratch.ptr);
    if (!th->stream) MQ_DNNL(dnnl_stream_create(&th->stream, mq_engine_dnnl(a->eng), dnnl_stream_default_flags));
    return MQ_OK;
}

/* One sequence on thread t: scores, softmax and context into the thread's buffer, then its real rows into out. */
static mq_status one_sequence(mq_attention *a, int t, const float *qkv, const mq_attn_out *out, int64_t offset,
                              int64_t len) {
    const int64_t H = (int64_t)a->n_heads * a->head_dim;
    const int64_t L = bucket_len(len);
    mq_attn_prim *p = mq_prim_cache_find(&a->prims, L); /* built by mq_attention_forward */
    mq_attn_thread *th = &a->threads[t];
    mq_attn_mems *m = NULL;
    MQ_TRY(thread_mems(a, p, t, &m));
    MQ_TRY(thread_buffers(a, p, th, m, L));
    float *mask = th->mask.ptr;
    for (int64_t j = 0; j < L; j++) mask[j] = j < len ? 0.f : -1e30f;
    const mq_stage_kind kind = p->lp ? MQ_STAGE_BF16 : p->round ? MQ_STAGE_ROUND : MQ_STAGE_F32;
    stage_qkv(qkv + offset * 3 * H, len, L, a->n_heads, a->head_dim, kind, th->q.ptr, th->kt.ptr, th->v.ptr);
    dnnl_stream_t stream = th->stream;
    dnnl_exec_arg_t qk_args[5] = {{DNNL_ARG_SRC, m->q}, {DNNL_ARG_WEIGHTS, m->k}, {DNNL_ARG_DST, m->scores},
                                  {DNNL_ARG_SCRATCHPAD, m->scratch},
                                  {DNNL_ARG_ATTR_MULTIPLE_POST_OP(1) | DNNL_ARG_SRC_1, m->mask}};
    MQ_DNNL(dnnl_primitive_execute(p->qk, stream, 5, qk_args));
    dnnl_exec_arg_t sm_args[3] = {{DNNL_ARG_SRC, m->scores}, {DNNL_ARG_DST, m->scores}, {DNNL_ARG_SCRATCHPAD, m->scratch}};
    MQ_DNNL(dnnl_primitive_execute(p->softmax, stream, 3, sm_args));
    if (p->lp || p->round) {
        MQ_DNNL(dnnl_stream_wait(stream));
        probs_bf16(th->scores.ptr, (size_t)a->n_heads * (size_t)L * (size_t)L, p->lp ? th->probs.ptr : NULL);
    }
    dnnl_exec_arg_t pv_args[4] = {{DNNL_ARG_SRC, m->probs}, {DNNL_ARG_WEIGHTS, m->v}, {DNNL_ARG_DST, m->ctx},
                                  {DNNL_ARG_SCRATCHPAD, m->scratch}};
    MQ_DNNL(dnnl_primitive_execute(p->pv, stream, 4, pv_args));
    MQ_DNNL(dnnl_stream_wait(stream));
    copy_out(th->ctx.ptr, len, L, a->n_heads, a->head_dim, out, offset);
    return MQ_OK;
}

mq_status mq_attention_forward(mq_attention *a, const float *qkv, float *ctx, uint8_t *ctx_q, float q_scale,
                               int32_t q_zp, const int64_t *offsets, const int32_t *lengths, int64_t batch) {
    if (ctx_q && (!(q_scale > 0.f) || q_zp < 0 || q_zp > 255))
        return mq_set_error(MQ_ERR_ARG, "attention: bad output quantization (scale %g, zero point %d)", (double)q_scale, q_zp);
    if (!ctx_q && !ctx) return mq_set_error(MQ_ERR_ARG, "attention: no output");
    const mq_attn_out out = {ctx, ctx_q, ctx_q ? 1.f / q_scale : 0.f, q_zp};
    for (int64_t b = 0; b < batch; b++) {
        if (lengths[b] <= 0 || lengths[b] > a->max_len)
            return mq_set_error(MQ_ERR_ARG, "attention: sequence length %d outside [1, %lld]", lengths[b], (long long)a->max_len);
        void *entry = NULL;
        MQ_TRY(mq_prim_cache_get(&a->prims, a, bucket_len(lengths[b]), &entry));
    }
    const int nthr = forward_threads(a, batch);
    if (nthr < 2) {
        /* one sequence: let oneDNN parallelise inside each primitive */
        for (int64_t b = 0; b < batch; b++) MQ_TRY(one_sequence(a, 0, qkv, &out, offsets[b], lengths[b]));
    } else {
        /* several sequences: one per thread at a time; primitives called inside the parallel region run
           single-threaded, each thread with its own memory views, buffers and scratchpad */
        mq_status st[MQ_ATTN_MAX_THREADS] = {MQ_OK};
        char msg[MQ_ATTN_MAX_THREADS][256];
        #pragma omp parallel for num_threads(nthr) schedule(dynamic, 1)
        for (int64_t b = 0; b < batch; b++) {
            const int t = omp_get_thread_num();
            if (st[t] != MQ_OK) continue;
            st[t] = one_sequence(a, t, qkv, &out, offsets[b], lengths[b]);
            if (st[t] != MQ_OK) snprintf(msg[t], sizeof msg[t], "%s", mq_last_error());
        }
        for (int t = 0; t < nthr; t++)
            if (st[t] != MQ_OK) return mq_set_error(st[t], "%s", msg[t]);
    }
    return MQ_OK;
}
