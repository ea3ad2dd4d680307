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
    dnnl_memory_t q, k, v, scores, mask, ctx, scratch;
} mq_attn_mems;

/* Primitives for one length bucket, and per-thread memory views (created on first use by that thread). */
typedef struct {
    dnnl_primitive_t qk, softmax, pv;
    size_t scratch_bytes;
    dnnl_memory_desc_t md[7]; /* q, k, v, scores, mask, ctx, scratch */
    mq_attn_mems mems[MQ_ATTN_MAX_THREADS];
} mq_attn_prim;

/* Per-thread scratch: scores [heads, L, L], mask [L], context rows [L, H], oneDNN scratchpad, and the sequence's
   queries [heads, L, d] and transposed keys [heads, d, L] copied dense (see one_sequence). */
typedef struct {
    mq_buffer scores, mask, ctx, scratch, q, kt;
    dnnl_stream_t stream; /* streams are not shared between threads */
} mq_attn_thread;

struct mq_attention {
    mq_engine *eng; /* borrowed */
    int n_heads;
    int64_t head_dim, max_len;
    float scale;
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
    dnnl_memory_t mems[7] = {m->q, m->k, m->v, m->scores, m->mask, m->ctx, m->scratch};
    for (int i = 0; i < 7; i++) if (mems[i]) dnnl_memory_destroy(mems[i]);
    memset(m, 0, sizeof *m);
}

static void free_prim(void *entry) {
    mq_attn_prim *p = entry;
    dnnl_primitive_t prims[3] = {p->qk, p->softmax, p->pv};
    for (int i = 0; i < 3; i++) if (prims[i]) dnnl_primitive_destroy(prims[i]);
    for (int i = 0; i < 7; i++) dnnl_memory_desc_destroy(p->md[i]);
    for (int t = 0; t < MQ_ATTN_MAX_THREADS; t++) destroy_mems(&p->mems[t]);
    memset(p, 0, sizeof *p);
}

void mq_attention_reset(mq_attention *a) {
    if (a) mq_prim_cache_clear(&a->prims);
}

/* A thread's buffers, in one list for sizing and releasing. */
#define MQ_ATTN_BUFFERS(th) {&(th)->scores, &(th)->mask, &(th)->ctx, &(th)->scratch, &(th)->q, &(th)->kt}

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
    const double per_thread = ((double)a->n_heads * L * L + L + 3.0 * L * H) * sizeof(float);
    const double total = per_thread * forward_threads(a, batch);
    return total >= (double)SIZE_MAX ? SIZE_MAX : (size_t)total;
}

static mq_status md3(dnnl_memory_desc_t *md, int64_t d0, int64_t d1, int64_t d2, int64_t s0, int64_t s1, int64_t s2) {
    dnnl_dims_t dims = {d0, d1, d2}, strides = {s0, s1, s2};
    MQ_DNNL(dnnl_memory_desc_create_with_strides(md, 3, dims, dnnl_f32, strides));
    return MQ_OK;
}

static mq_status build_prim(void *owner, int64_t L, void *entry) {
    mq_attention *a = owner;
    mq_attn_prim *p = entry;
    const int64_t Hh = a->n_heads, d = a->head_dim, H = Hh * d, ld = 3 * H;
    dnnl_engine_t eng = mq_engine_dnnl(a->eng);
    mq_status st = MQ_OK;
    dnnl_memory_desc_t q_md = NULL, k_md = NULL, v_md = NULL, s_md = NULL, m_md = NULL, c_md = NULL;
    dnnl_primitive_attr_t attr = NULL, sattr = NULL, pattr = NULL;
    dnnl_post_ops_t po = NULL;
    dnnl_primitive_desc_t pd = NULL;
    /* Q and K^T are dense copies (one_sequence): on dense operands oneDNN picks its brgemm kernel, which applies the
       scale and mask post-ops in registers; on strided views of the packed rows it falls back to gemm:jit plus a
       separate post-processing pass over the scores (2-4x slower for this matmul). */
    if ((st = md3(&q_md, Hh, L, d, L * d, d, 1)) != MQ_OK) goto done;
    if ((st = md3(&k_md, Hh, d, L, d * L, L, 1)) != MQ_OK) goto done;
    if ((st = md3(&v_md, Hh, L, d, d, ld, 1)) != MQ_OK) goto done;
    if ((st = md3(&s_md, Hh, L, L, L * L, L, 1)) != MQ_OK) goto done;
    if ((st = md3(&m_md, 1, 1, L, L, L, 1)) != MQ_OK) goto done;
    if ((st = md3(&c_md, Hh, L, d, d, H, 1)) != MQ_OK) goto done;
    if ((st = mq_attr_create(&attr)) != MQ_OK) goto done;
    MQ_TRY_GOTO(st, MQ_DNNL_STATUS(dnnl_post_ops_create(&po)), done);
    MQ_TRY_GOTO(st, MQ_DNNL_STATUS(dnnl_post_ops_append_eltwise(po, dnnl_eltwise_linear, a->scale, 0.f)), done);
    MQ_TRY_GOTO(st, MQ_DNNL_STATUS(dnnl_post_ops_append_binary(po, dnnl_binary_add, m_md)), done);
    MQ_TRY_GOTO(st, MQ_DNNL_STATUS(dnnl_primitive_attr_set_post_ops(attr, po)), done);
    MQ_TRY_GOTO(st, MQ_DNNL_STATUS(dnnl_matmul_primitive_desc_create(&pd, eng, q_md, k_md, NULL, s_md, attr)), done);
    if ((st = mq_primitive_from_pd(pd, &p->qk, &p->scratch_bytes)) != MQ_OK) { pd = NULL; goto done; }
    pd = NULL;
    if ((st = mq_attr_create(&sattr)) != MQ_OK) goto done;
    MQ_TRY_GOTO(st, MQ_DNNL_STATUS(dnnl_softmax_forward_primitive_desc_create(&pd, eng, dnnl_forward_inference, dnnl_softmax_accurate, s_md, s_md,
                                                  2, sattr)), done);
    if ((st = mq_primitive_from_pd(pd, &p->softmax, &p->scratch_bytes)) != MQ_OK) { pd = NULL; goto done; }
    pd = NULL;
    if ((st = mq_attr_create(&pattr)) != MQ_OK) goto done;
    MQ_TRY_GOTO(st, MQ_DNNL_STATUS(dnnl_matmul_primitive_desc_create(&pd, eng, s_md, v_md, NULL, c_md, pattr)), done);
    if ((st = mq_primitive_from_pd(pd, &p->pv, &p->scratch_bytes)) != MQ_OK) { pd = NULL; goto done; }
    pd = NULL;
    {
        dnnl_memory_desc_t sp = NULL;
        dnnl_dims_t sd = {(int64_t)(p->scratch_bytes ? p->scratch_bytes : 1)};
        MQ_TRY_GOTO(st, MQ_DNNL_STATUS(dnnl_memory_desc_create_with_tag(&sp, 1, sd, dnnl_u8, dnnl_a)), done);
        p->md[6] = sp;
    }
    {
        const_dnnl_memory_desc_t src[6] = {q_md, k_md, v_md, s_md, m_md, c_md};
        for (int i = 0; i < 6; i++) MQ_TRY_GOTO(st, MQ_DNNL_STATUS(dnnl_memory_desc_clone(&p->md[i], src[i])), done);
    }
done:
    if (pd) dnnl_primitive_desc_destroy(pd);
    if (po) dnnl_post_ops_destroy(po);
    if (attr) dnnl_primitive_attr_destroy(attr);
    if (sattr) dnnl_primitive_attr_destroy(sattr);
    if (pattr) dnnl_primitive_attr_destroy(pattr);
    dnnl_memory_desc_t mds[6] = {q_md, k_md, v_md, s_md, m_md, c_md};
    for (int i = 0; i < 6; i++) dnnl_memory_desc_destroy(mds[i]);
    return st; /* on failure the cache frees the partly built entry */
}

static mq_status thread_mems(mq_attention *a, mq_attn_prim *p, int t, mq_attn_mems **out) {
    mq_attn_mems *m = &p->mems[t];
    if (!m->q) {
        dnnl_memory_t *dst[7] = {&m->q, &m->k, &m->v, &m->scores, &m->mask, &m->ctx, &m->scratch};
        for (int i = 0; i < 7; i++) {
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

/* Copies one sequence's queries to q [heads, L, d] and its keys, transposed, to kt [heads, d, L]; rows / columns
   from len to L are zero (masked keys then score exactly -1e30 * 1; padded query rows are discarded). */
static void stage_qk(const float *base, int64_t len, int64_t L, int64_t Hh, int64_t d, float *q, float *kt) {
    const int64_t H = Hh * d, ld = 3 * H;
    for (int64_t h = 0; h < Hh; h++) {
        float *qh = q + h * L * d;
        for (int64_t j = 0; j < len; j++) memcpy(qh + j * d, base + j * ld + h * d, (size_t)d * sizeof(float));
        memset(qh + len * d, 0, (size_t)((L - len) * d) * sizeof(float));
        float *kh = kt + h * d * L;
        const float *ksrc = base + H + h * d;
        for (int64_t j0 = 0; j0 < len; j0 += 16) { /* 16 keys at a time: reads and writes stay in a few lines */
            const int64_t j1 = j0 + 16 < len ? j0 + 16 : len;
            for (int64_t c = 0; c < d; c++)
                for (int64_t j = j0; j < j1; j++) kh[c * L + j] = ksrc[j * ld + c];
        }
        if (len < L)
            for (int64_t c = 0; c < d; c++) memset(kh + c * L + len, 0, (size_t)(L - len) * sizeof(float));
    }
}

/* Where a forward writes the context: f32 rows, or u8 rows quantized with (1 / scale, zero point). */
typedef struct {
    float *ctx;
    uint8_t *ctx_q;
    float inv_scale;
    int32_t zp;
} mq_attn_out;

/* One sequence on thread t: scores, softmax and context into the thread's buffer, then its real rows into out. */

static mq_status one_sequence(mq_attention *a, int t, const float *qkv, const mq_attn_out *out, int64_t offset,
                              int64_t len) {
    const int64_t H = (int64_t)a->n_heads * a->head_dim;
    const int64_t L = bucket_len(len);
    mq_attn_prim *p = mq_prim_cache_find(&a->prims, L); /* built by mq_attention_forward */
    mq_attn_thread *th = &a->threads[t];
    mq_attn_mems *m = NULL;
    MQ_TRY(thread_mems(a, p, t, &m));
    MQ_TRY(mq_buffer_reserve(&th->scores, (size_t)a->n_heads * (size_t)L * (size_t)L, sizeof(float)));
    MQ_TRY(mq_buffer_reserve(&th->mask, (size_t)L, sizeof(float)));
    MQ_TRY(mq_buffer_reserve(&th->ctx, (size_t)L * (size_t)H, sizeof(float)));
    MQ_TRY(mq_buffer_reserve(&th->scratch, p->scratch_bytes ? p->scratch_bytes : 1, 1));
    MQ_TRY(mq_buffer_reserve(&th->q, (size_t)L * (size_t)H, sizeof(float)));
    MQ_TRY(mq_buffer_reserve(&th->kt, (size_t)L * (size_t)H, sizeof(float)));
    float *mask = th->mask.ptr;
    for (int64_t j = 0; j < L; j++) mask[j] = j < len ? 0.f : -1e30f;
    const float *base = qkv + offset * 3 * H;
    stage_qk(base, len, L, a->n_heads, a->head_dim, th->q.ptr, th->kt.ptr);
    SET(m->q, th->q.ptr);
    SET(m->k, th->kt.ptr);
    SET(m->v, base + 2 * H);
    SET(m->scores, th->scores.ptr);
    SET(m->mask, mask);
    SET(m->ctx, th->ctx.ptr);
    SET(m->scratch, th->scratch.ptr);
    if (!th->stream) MQ_DNNL(dnnl_stream_create(&th->stream, mq_engine_dnnl(a->eng), dnnl_stream_default_flags));
    dnnl_stream_t stream = th->stream;
    dnnl_exec_arg_t qk_args[5] = {{DNNL_ARG_SRC, m->q}, {DNNL_ARG_WEIGHTS, m->k}, {DNNL_ARG_DST, m->scores},
                                  {DNNL_ARG_SCRATCHPAD, m->scratch},
                                  {DNNL_ARG_ATTR_MULTIPLE_POST_OP(1) | DNNL_ARG_SRC_1, m->mask}};
    MQ_DNNL(dnnl_primitive_execute(p->qk, stream, 5, qk_args));
    dnnl_exec_arg_t sm_args[3] = {{DNNL_ARG_SRC, m->scores}, {DNNL_ARG_DST, m->scores}, {DNNL_ARG_SCRATCHPAD, m->scratch}};
    MQ_DNNL(dnnl_primitive_execute(p->softmax, stream, 3, sm_args));
    dnnl_exec_arg_t pv_args[4] = {{DNNL_ARG_SRC, m->scores}, {DNNL_ARG_WEIGHTS, m->v}, {DNNL_ARG_DST, m->ctx},
                                  {DNNL_ARG_SCRATCHPAD, m->scratch}};
    MQ_DNNL(dnnl_primitive_execute(p->pv, stream, 4, pv_args));
    MQ_DNNL(dnnl_stream_wait(stream));
    if (out->ctx_q)
        mq_quantize_u8(th->ctx.ptr, len, H, H, NULL, out->inv_scale, out->zp, out->ctx_q + offset * H);
    else
        memcpy(out->ctx + offset * H, th->ctx.ptr, (size_t)len * (size_t)H * sizeof(float));
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
