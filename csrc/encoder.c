#include "encoder.h"

#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "attention.h"
#include "qparams.h"

/* The u8 input of a static int8 site, written by its producer (decided at finalize, see fuse_inputs). */
typedef struct {
    int on;
    float scale;
    int32_t zp;
} mq_u8_input;

typedef struct {
    mq_linear *site[MQ_SITES_PER_LAYER];
    float *ln_gamma[2], *ln_beta[2];
    mq_u8_input ctx_q; /* ATTN_OUT's input, quantized by attention's copy-out */
    mq_u8_input ffn_q; /* FFN_OUT's input, written as u8 by FFN_IN's matmul epilogue */
} mq_layer;

/* LayerNorm primitive for one row bucket; gamma/beta memories are handle-swapped per layer. */
typedef struct {
    int64_t rows;
    dnnl_primitive_t prim;
    size_t scratch_bytes;
    dnnl_memory_t src, dst, gamma, beta, mean, var, scratch;
} mq_ln_prim;

struct mq_encoder {
    mq_bert_config cfg;
    mq_engine *eng;
    pthread_mutex_t lock;
    int finalized;
    /* embeddings */
    float *word_f32;
    int8_t *word_s8;
    float *word_scales;
    float *pos, *type;
    float *emb_gamma, *emb_beta;
    mq_layer *layers;
    mq_attention *attn;
    mq_ln_prim *ln;
    int n_ln, cap_ln;
    /* workspace, reused across calls */
    mq_linear_scratch scratch;
    mq_buffer x, qkv, ctx, tmp, ffn, deq, offsets, stats;
};

static mq_status check_config(const mq_bert_config *c) {
    if (!c) return mq_set_error(MQ_ERR_ARG, "config is NULL");
#define RANGE(v, lo, hi)                                                                                        \
    if ((v) < (lo) || (v) > (hi))                                                                               \
        return mq_set_error(MQ_ERR_ARG, "config: %s = %lld outside [%lld, %lld]", #v, (long long)(v), (long long)(lo), \
                            (long long)(hi));
    RANGE(c->vocab_size, 1, 1 << 22);
    RANGE(c->hidden, 1, 1 << 14);
    RANGE(c->n_layers, 1, 256);
    RANGE(c->n_heads, 1, 1024);
    RANGE(c->intermediate, 1, 1 << 16);
    RANGE(c->max_position, 1, 1 << 14);
    RANGE(c->type_vocab, 1, 1 << 10);
#undef RANGE
    if (c->hidden % c->n_heads)
        return mq_set_error(MQ_ERR_ARG, "config: hidden_size %lld is not a multiple of num_attention_heads %lld",
                            (long long)c->hidden, (long long)c->n_heads);
    if (!(c->ln_eps > 0.f) || !(c->ln_eps < 1.f))
        return mq_set_error(MQ_ERR_ARG, "config: layer_norm_eps %g must be in (0, 1)", (double)c->ln_eps);
    size_t n;
    if (!mq_size_mul3((size_t)c->vocab_size, (size_t)c->hidden, sizeof(float), &n))
        return mq_set_error(MQ_ERR_NOMEM, "config: word embedding table size overflows");
    return MQ_OK;
}

mq_status mq_encoder_create(mq_encoder **out, const mq_bert_config *cfg, int n_threads) {
    if (!out) return mq_set_error(MQ_ERR_ARG, "encoder: out is NULL");
    *out = NULL;
    MQ_TRY(check_config(cfg));
    mq_encoder *e = calloc(1, sizeof *e);
    if (!e) return mq_set_error(MQ_ERR_NOMEM, "encoder: out of memory");
    e->cfg = *cfg;
    if (pthread_mutex_init(&e->lock, NULL) != 0) { free(e); return mq_set_error(MQ_ERR_STATE, "encoder: cannot create lock"); }
    mq_status st = mq_engine_create(&e->eng, n_threads);
    if (st == MQ_OK) {
        e->layers = calloc((size_t)cfg->n_layers, sizeof *e->layers);
        if (!e->layers) st = mq_set_error(MQ_ERR_NOMEM, "encoder: out of memory");
    }
    if (st == MQ_OK)
        st = mq_attention_create(&e->attn, e->eng, (int)cfg->n_heads, cfg->hidden / cfg->n_heads, cfg->max_position);
    if (st != MQ_OK) { mq_encoder_destroy(e); return st; }
    *out = e;
    return MQ_OK;
}

static void reset_ln(mq_encoder *e) {
    for (int i = 0; i < e->n_ln; i++) {
        mq_ln_prim *p = &e->ln[i];
        if (p->prim) dnnl_primitive_destroy(p->prim);
        dnnl_memory_t mems[7] = {p->src, p->dst, p->gamma, p->beta, p->mean, p->var, p->scratch};
        for (int j = 0; j < 7; j++) if (mems[j]) dnnl_memory_destroy(mems[j]);
    }
    e->n_ln = 0;
}

void mq_encoder_destroy(mq_encoder *e) {
    if (!e) return;
    reset_ln(e);
    free(e->ln);
    if (e->layers) {
        for (int64_t l = 0; l < e->cfg.n_layers; l++) {
            for (int s = 0; s < MQ_SITES_PER_LAYER; s++) mq_linear_destroy(e->layers[l].site[s]);
            for (int k = 0; k < 2; k++) { mq_free(e->layers[l].ln_gamma[k]); mq_free(e->layers[l].ln_beta[k]); }
        }
        free(e->layers);
    }
    mq_attention_destroy(e->attn);
    mq_free(e->word_f32);
    mq_free(e->word_s8);
    mq_free(e->word_scales);
    mq_free(e->pos);
    mq_free(e->type);
    mq_free(e->emb_gamma);
    mq_free(e->emb_beta);
    mq_linear_scratch_release(&e->scratch);
    mq_buffer bufs[8] = {e->x, e->qkv, e->ctx, e->tmp, e->ffn, e->deq, e->offsets, e->stats};
    for (int i = 0; i < 8; i++) mq_buffer_release(&bufs[i]);
    mq_engine_destroy(e->eng);
    pthread_mutex_destroy(&e->lock);
    free(e);
}

/* Copies n floats after checking they are finite; replaces *dst. */
static mq_status take_floats(float **dst, const float *src, size_t n, const char *what) {
    if (!src) return mq_set_error(MQ_ERR_ARG, "%s is missing", what);
    MQ_TRY(mq_check_finite(src, n, what));
    float *p = mq_alloc(n, sizeof(float));
    if (!p) return mq_set_error(MQ_ERR_NOMEM, "out of memory for %s", what);
    memcpy(p, src, n * sizeof(float));
    mq_free(*dst);
    *dst = p;
    return MQ_OK;
}

static mq_status not_final(const mq_encoder *e) {
    if (!e) return mq_set_error(MQ_ERR_ARG, "encoder is NULL");
    if (e->finalized) return mq_set_error(MQ_ERR_STATE, "encoder is finalized; parameters can no longer change");
    return MQ_OK;
}

mq_status mq_encoder_set_word_embeddings(mq_encoder *e, const float *table) {
    MQ_TRY(not_final(e));
    MQ_TRY(take_floats(&e->word_f32, table, (size_t)e->cfg.vocab_size * (size_t)e->cfg.hidden, "word embeddings"));
    mq_free(e->word_s8);
    mq_free(e->word_scales);
    e->word_s8 = NULL;
    e->word_scales = NULL;
    return MQ_OK;
}

mq_status mq_encoder_set_word_embeddings_s8(mq_encoder *e, const int8_t *table, const float *row_scales) {
    MQ_TRY(not_final(e));
    if (!table) return mq_set_error(MQ_ERR_ARG, "word embeddings (int8) are missing");
    const size_t n = (size_t)e->cfg.vocab_size * (size_t)e->cfg.hidden;
    MQ_TRY(take_floats(&e->word_scales, row_scales, (size_t)e->cfg.vocab_size, "word embedding row scales"));
    int8_t *p = mq_alloc(n, 1);
    if (!p) return mq_set_error(MQ_ERR_NOMEM, "out of memory for word embeddings");
    memcpy(p, table, n);
    mq_free(e->word_s8);
    e->word_s8 = p;
    mq_free(e->word_f32);
    e->word_f32 = NULL;
    return MQ_OK;
}

mq_status mq_encoder_set_position_type_embeddings(mq_encoder *e, const float *position, const float *token_type) {
    MQ_TRY(not_final(e));
    MQ_TRY(take_floats(&e->pos, position, (size_t)e->cfg.max_position * (size_t)e->cfg.hidden, "position embeddings"));
    MQ_TRY(take_floats(&e->type, token_type, (size_t)e->cfg.type_vocab * (size_t)e->cfg.hidden, "token type embeddings"));
    return MQ_OK;
}

mq_status mq_encoder_set_layernorm(mq_encoder *e, int layer, int which, const float *gamma, const float *beta) {
    MQ_TRY(not_final(e));
    const size_t H = (size_t)e->cfg.hidden;
    if (layer == -1) {
        MQ_TRY(take_floats(&e->emb_gamma, gamma, H, "embedding LayerNorm weight"));
        return take_floats(&e->emb_beta, beta, H, "embedding LayerNorm bias");
    }
    if (layer < 0 || layer >= e->cfg.n_layers || (which != 0 && which != 1))
        return mq_set_error(MQ_ERR_ARG, "layernorm: bad layer %d / which %d", layer, which);
    MQ_TRY(take_floats(&e->layers[layer].ln_gamma[which], gamma, H, "LayerNorm weight"));
    return take_floats(&e->layers[layer].ln_beta[which], beta, H, "LayerNorm bias");
}

static void site_shape(const mq_bert_config *c, int site, int64_t *K, int64_t *N, mq_epilogue *epi) {
    switch (site) {
        case MQ_SITE_QKV: *K = c->hidden; *N = 3 * c->hidden; *epi = MQ_EPI_NONE; break;
        case MQ_SITE_ATTN_OUT: *K = c->hidden; *N = c->hidden; *epi = MQ_EPI_RESIDUAL; break;
        case MQ_SITE_FFN_IN: *K = c->hidden; *N = c->intermediate; *epi = MQ_EPI_GELU; break;
        default: *K = c->intermediate; *N = c->hidden; *epi = MQ_EPI_RESIDUAL; break;
    }
}

mq_status mq_encoder_set_linear(mq_encoder *e, int layer, int site, const mq_linear_spec *spec,
                                const mq_linear_weights *w) {
    MQ_TRY(not_final(e));
    if (layer < 0 || layer >= e->cfg.n_layers || site < 0 || site >= MQ_SITES_PER_LAYER || !spec)
        return mq_set_error(MQ_ERR_ARG, "set_linear: bad layer %d / site %d", layer, site);
    int64_t K, N;
    mq_linear_spec s = *spec;
    site_shape(&e->cfg, site, &K, &N, &s.epilogue);
    mq_linear *lin;
    MQ_TRY(mq_linear_create(&lin, e->eng, K, N, &s, w)); /* slow (prepacking): outside the lock */
    /* the swap under the lock: the binding runs this without the GIL, so a finalize + forward in another thread
       must not see the old layer freed under it */
    pthread_mutex_lock(&e->lock);
    mq_status st = not_final(e);
    mq_linear *old = NULL;
    if (st == MQ_OK) {
        old = e->layers[layer].site[site];
        e->layers[layer].site[site] = lin;
        lin = NULL;
    }
    pthread_mutex_unlock(&e->lock);
    mq_linear_destroy(old);
    mq_linear_destroy(lin);
    return st;
}

/* A static int8 site (INT8 STATIC, no SmoothQuant multiplier) takes its u8 input from the producer instead of
   quantizing an f32 copy in a pass of its own: attention quantizes its output rows for ATTN_OUT as it copies them
   out, and FFN_IN applies FFN_OUT's scale and zero point in its matmul epilogue (after GELU), so the
   [T, intermediate] f32 activation, the widest of the layer, is never written at all. */
static void fuse_inputs(mq_layer *L) {
    mq_u8_input *c = &L->ctx_q, *f = &L->ffn_q;
    c->on = mq_linear_static_input(L->site[MQ_SITE_ATTN_OUT], &c->scale, &c->zp);
    f->on = mq_linear_static_input(L->site[MQ_SITE_FFN_OUT], &f->scale, &f->zp) &&
            mq_linear_set_output_u8(L->site[MQ_SITE_FFN_IN], f->scale, f->zp) == MQ_OK; /* else FFN_IN stays f32 */
}

static mq_status finalize_locked(mq_encoder *e) {
    MQ_TRY(not_final(e));
    if (!e->word_f32 && !e->word_s8) return mq_set_error(MQ_ERR_STATE, "encoder: word embeddings not set");
    if (!e->pos || !e->type) return mq_set_error(MQ_ERR_STATE, "encoder: position/token type embeddings not set");
    if (!e->emb_gamma) return mq_set_error(MQ_ERR_STATE, "encoder: embedding LayerNorm not set");
    for (int64_t l = 0; l < e->cfg.n_layers; l++) {
        for (int s = 0; s < MQ_SITES_PER_LAYER; s++)
            if (!e->layers[l].site[s]) return mq_set_error(MQ_ERR_STATE, "encoder: layer %lld linear %d not set", (long long)l, s);
        if (!e->layers[l].ln_gamma[0] || !e->layers[l].ln_gamma[1])
            return mq_set_error(MQ_ERR_STATE, "encoder: layer %lld LayerNorm not set", (long long)l);
    }
    for (int64_t l = 0; l < e->cfg.n_layers; l++) fuse_inputs(&e->layers[l]);
    e->finalized = 1;
    return MQ_OK;
}

mq_status mq_encoder_finalize(mq_encoder *e) {
    if (!e) return mq_set_error(MQ_ERR_ARG, "encoder is NULL");
    pthread_mutex_lock(&e->lock);
    mq_status st = finalize_locked(e);
    pthread_mutex_unlock(&e->lock);
    return st;
}

static void reset_all(mq_encoder *e) {
    reset_ln(e);
    mq_attention_reset(e->attn);
    for (int64_t l = 0; l < e->cfg.n_layers; l++)
        for (int s = 0; s < MQ_SITES_PER_LAYER; s++) mq_linear_reset(e->layers[l].site[s]);
}

mq_status mq_encoder_set_threads(mq_encoder *e, int n_threads) {
    if (!e) return mq_set_error(MQ_ERR_ARG, "encoder is NULL");
    pthread_mutex_lock(&e->lock);
    mq_status st = mq_engine_set_threads(e->eng, n_threads);
    if (st == MQ_OK) reset_all(e);
    pthread_mutex_unlock(&e->lock);
    return st;
}

int mq_encoder_threads(const mq_encoder *e) { return mq_engine_threads(e->eng); }
const mq_bert_config *mq_encoder_config(const mq_encoder *e) { return &e->cfg; }

size_t mq_encoder_nbytes(const mq_encoder *e) {
    const mq_bert_config *c = &e->cfg;
    size_t H = (size_t)c->hidden, b = 0;
    if (e->word_s8) b += (size_t)c->vocab_size * H + (size_t)c->vocab_size * sizeof(float);
    else b += (size_t)c->vocab_size * H * sizeof(float);
    b += ((size_t)c->max_position + (size_t)c->type_vocab) * H * sizeof(float);
    b += 2 * H * sizeof(float) * (1 + 2 * (size_t)c->n_layers);
    for (int64_t l = 0; l < c->n_layers; l++)
        for (int s = 0; s < MQ_SITES_PER_LAYER; s++)
            if (e->layers[l].site[s]) b += mq_linear_nbytes(e->layers[l].site[s]);
    return b;
}

const char *mq_encoder_site_impl(const mq_encoder *e, int layer, int site) {
    if (!e || layer < 0 || layer >= e->cfg.n_layers || site < 0 || site >= MQ_SITES_PER_LAYER || !e->layers[layer].site[site])
        return "";
    return mq_linear_impl(e->layers[layer].site[site]);
}

mq_status mq_lengths_from_mask(const int32_t *mask, int64_t batch, int64_t seq, int32_t *lengths) {
    for (int64_t b = 0; b < batch; b++) {
        const int32_t *m = mask + b * seq;
        int64_t len = 0;
        while (len < seq && m[len] == 1) len++;
        for (int64_t j = len; j < seq; j++)
            if (m[j] != 0)
                return mq_set_error(MQ_ERR_ARG,
                                    "attention_mask row %lld is not right-padded ones-then-zeros (value %d at position %lld)",
                                    (long long)b, m[j], (long long)j);
        if (len == 0) return mq_set_error(MQ_ERR_ARG, "attention_mask row %lld has no tokens", (long long)b);
        lengths[b] = (int32_t)len;
    }
    return MQ_OK;
}

static mq_status get_ln(mq_encoder *e, int64_t rows, mq_ln_prim **out) {
    for (int i = 0; i < e->n_ln; i++)
        if (e->ln[i].rows == rows) { *out = &e->ln[i]; return MQ_OK; }
    if (e->n_ln == e->cap_ln) {
        int cap = e->cap_ln ? 2 * e->cap_ln : 8;
        mq_ln_prim *np = realloc(e->ln, (size_t)cap * sizeof *np);
        if (!np) return mq_set_error(MQ_ERR_NOMEM, "encoder: out of memory");
        e->ln = np;
        e->cap_ln = cap;
    }
    mq_ln_prim p;
    memset(&p, 0, sizeof p);
    p.rows = rows;
    dnnl_engine_t eng = mq_engine_dnnl(e->eng);
    dnnl_memory_desc_t md = NULL, smd = NULL;
    dnnl_primitive_attr_t attr = NULL;
    dnnl_primitive_desc_t pd = NULL;
    dnnl_dims_t dims = {rows, e->cfg.hidden}, sdims = {e->cfg.hidden};
    mq_status st = mq_attr_create(&attr);
    dnnl_status_t ds = dnnl_success;
    if (st == MQ_OK) ds = dnnl_memory_desc_create_with_tag(&md, 2, dims, dnnl_f32, dnnl_ab);
    if (st == MQ_OK && ds == dnnl_success) ds = dnnl_memory_desc_create_with_tag(&smd, 1, sdims, dnnl_f32, dnnl_a);
    if (st == MQ_OK && ds == dnnl_success)
        ds = dnnl_layer_normalization_forward_primitive_desc_create(&pd, eng, dnnl_forward_inference, md, md, NULL,
                                                                    e->cfg.ln_eps, dnnl_use_scale | dnnl_use_shift, attr);
    if (st == MQ_OK && ds != dnnl_success) st = mq_set_error(MQ_ERR_DNNL, "layernorm: oneDNN error %d creating the primitive", (int)ds);
    if (st == MQ_OK) {
        const_dnnl_memory_desc_t mmd = dnnl_primitive_desc_query_md(pd, dnnl_query_exec_arg_md, DNNL_ARG_MEAN);
        const_dnnl_memory_desc_t vmd = dnnl_primitive_desc_query_md(pd, dnnl_query_exec_arg_md, DNNL_ARG_VARIANCE);
        const_dnnl_memory_desc_t spd = dnnl_primitive_desc_query_md(pd, dnnl_query_scratchpad_md, 0);
        ds = dnnl_memory_create(&p.src, md, eng, DNNL_MEMORY_NONE);
        if (ds == dnnl_success) ds = dnnl_memory_create(&p.dst, md, eng, DNNL_MEMORY_NONE);
        if (ds == dnnl_success) ds = dnnl_memory_create(&p.gamma, smd, eng, DNNL_MEMORY_NONE);
        if (ds == dnnl_success) ds = dnnl_memory_create(&p.beta, smd, eng, DNNL_MEMORY_NONE);
        if (ds == dnnl_success && mmd && dnnl_memory_desc_get_size(mmd)) ds = dnnl_memory_create(&p.mean, mmd, eng, DNNL_MEMORY_NONE);
        if (ds == dnnl_success && vmd && dnnl_memory_desc_get_size(vmd)) ds = dnnl_memory_create(&p.var, vmd, eng, DNNL_MEMORY_NONE);
        if (ds == dnnl_success) ds = dnnl_memory_create(&p.scratch, spd, eng, DNNL_MEMORY_NONE);
        if (ds != dnnl_success) st = mq_set_error(MQ_ERR_DNNL, "layernorm: oneDNN error %d creating memories", (int)ds);
        mq_status st2 = mq_primitive_from_pd(pd, &p.prim, &p.scratch_bytes);
        if (st == MQ_OK) st = st2;
    }
    if (attr) dnnl_primitive_attr_destroy(attr);
    dnnl_memory_desc_destroy(md);
    dnnl_memory_desc_destroy(smd);
    if (st != MQ_OK) {
        if (p.prim) dnnl_primitive_destroy(p.prim);
        dnnl_memory_t mems[7] = {p.src, p.dst, p.gamma, p.beta, p.mean, p.var, p.scratch};
        for (int j = 0; j < 7; j++) if (mems[j]) dnnl_memory_destroy(mems[j]);
        return st;
    }
    e->ln[e->n_ln] = p;
    *out = &e->ln[e->n_ln++];
    return MQ_OK;
}

#define SET(mem, ptr)                                                                   \
    do {                                                                                \
        if (dnnl_memory_set_data_handle((mem), (void *)(ptr)) != dnnl_success)          \
            return mq_set_error(MQ_ERR_DNNL, "encoder: cannot set a memory handle");    \
    } while (0)

static mq_status layer_norm(mq_encoder *e, int64_t T, const float *src, float *dst, const float *gamma, const float *beta) {
    const int64_t rows = mq_bucket_rows(T);
    mq_ln_prim *p = NULL;
    MQ_TRY(get_ln(e, rows, &p));
    MQ_TRY(mq_buffer_reserve(&e->scratch.scratchpad, p->scratch_bytes ? p->scratch_bytes : 1, 1));
    MQ_TRY(mq_buffer_reserve(&e->stats, 2 * (size_t)rows, sizeof(float)));
    SET(p->src, src);
    SET(p->dst, dst);
    SET(p->gamma, gamma);
    SET(p->beta, beta);
    SET(p->scratch, e->scratch.scratchpad.ptr);
    dnnl_exec_arg_t args[7] = {{DNNL_ARG_SRC, p->src}, {DNNL_ARG_DST, p->dst}, {DNNL_ARG_SCALE, p->gamma},
                               {DNNL_ARG_SHIFT, p->beta}, {DNNL_ARG_SCRATCHPAD, p->scratch}};
    int n = 5;
    if (p->mean) { SET(p->mean, e->stats.ptr); args[n++] = (dnnl_exec_arg_t){DNNL_ARG_MEAN, p->mean}; }
    if (p->var) { SET(p->var, (float *)e->stats.ptr + rows); args[n++] = (dnnl_exec_arg_t){DNNL_ARG_VARIANCE, p->var}; }
    MQ_DNNL(dnnl_primitive_execute(p->prim, mq_engine_stream(e->eng), n, args));
    MQ_DNNL(dnnl_stream_wait(mq_engine_stream(e->eng)));
    return MQ_OK;
}

static void embed(const mq_encoder *e, const mq_forward_args *a, const int64_t *off, float *x) {
    const int64_t H = e->cfg.hidden;
    for (int64_t b = 0; b < a->batch; b++) {
        for (int64_t j = 0; j < a->lengths[b]; j++) {
            const int32_t id = a->ids[b * a->seq + j];
            const int32_t tt = a->type_ids ? a->type_ids[b * a->seq + j] : 0;
            float *xr = x + (off[b] + j) * H;
            const float *pr = e->pos + j * H, *tr = e->type + (int64_t)tt * H;
            if (e->word_s8) {
                const int8_t *wr = e->word_s8 + (int64_t)id * H;
                const float s = e->word_scales[id];
                for (int64_t h = 0; h < H; h++) xr[h] = (float)wr[h] * s + pr[h] + tr[h];
            } else {
                const float *wr = e->word_f32 + (int64_t)id * H;
                for (int64_t h = 0; h < H; h++) xr[h] = wr[h] + pr[h] + tr[h];
            }
        }
    }
}

static mq_status check_inputs(const mq_encoder *e, const mq_forward_args *a) {
    if (!a || !a->ids || !a->lengths) return mq_set_error(MQ_ERR_ARG, "forward: ids and lengths are required");
    if (a->batch <= 0 || a->seq <= 0) return mq_set_error(MQ_ERR_ARG, "forward: empty batch (%lld x %lld)", (long long)a->batch, (long long)a->seq);
    if (a->seq > e->cfg.max_position)
        return mq_set_error(MQ_ERR_ARG, "forward: sequence length %lld exceeds max_position_embeddings %lld",
                            (long long)a->seq, (long long)e->cfg.max_position);
    if (a->pooling < MQ_POOL_NONE || a->pooling > MQ_POOL_MEAN) return mq_set_error(MQ_ERR_ARG, "forward: unknown pooling %d", a->pooling);
    if (a->pooling != MQ_POOL_NONE && !a->pooled) return mq_set_error(MQ_ERR_ARG, "forward: pooled output missing");
    for (int64_t b = 0; b < a->batch; b++) {
        if (a->lengths[b] < 1 || a->lengths[b] > a->seq)
            return mq_set_error(MQ_ERR_ARG, "forward: length %d of row %lld outside [1, %lld]", a->lengths[b], (long long)b, (long long)a->seq);
        for (int64_t j = 0; j < a->lengths[b]; j++) {
            int32_t id = a->ids[b * a->seq + j];
            if (id < 0 || id >= e->cfg.vocab_size)
                return mq_set_error(MQ_ERR_ARG, "forward: token id %d at [%lld, %lld] outside the vocabulary [0, %lld)", id,
                                    (long long)b, (long long)j, (long long)e->cfg.vocab_size);
            if (a->type_ids) {
                int32_t t = a->type_ids[b * a->seq + j];
                if (t < 0 || t >= e->cfg.type_vocab)
                    return mq_set_error(MQ_ERR_ARG, "forward: token type id %d at [%lld, %lld] outside [0, %lld)", t,
                                        (long long)b, (long long)j, (long long)e->cfg.type_vocab);
            }
        }
    }
    return MQ_OK;
}

/* Nonzero if any of the n values is NaN or Inf (v - v is NaN exactly for those); branch-free, vectorises. */
static int any_nonfinite(const float *x, size_t n) {
    int bad = 0;
    for (size_t i = 0; i < n; i++) bad |= (x[i] - x[i] != 0.0f);
    return bad;
}

static float *tap_of(float **taps, int idx) { return taps ? taps[idx] : NULL; }

static void copy_tap(float **taps, int idx, const float *src, int64_t T, int64_t N) {
    if (taps && taps[idx]) memcpy(taps[idx], src, (size_t)T * (size_t)N * sizeof(float));
}

/* A producer-written u8 input, dequantized for whoever asked for its values: a tap (written in place) and the
   consuming site's observer. Nothing to do (and no pass over the data) when neither is there. */
static mq_status expose_u8(mq_encoder *e, const uint8_t *q, int64_t T, int64_t cols, const mq_u8_input *u, float *tap,
                           mq_observer *obs) {
    if (!tap && !obs) return MQ_OK;
    float *x = tap;
    if (!x) {
        MQ_TRY(mq_buffer_reserve(&e->deq, (size_t)T * (size_t)cols, sizeof(float)));
        x = e->deq.ptr;
    }
    mq_dequantize_u8(q, T, cols, u->scale, u->zp, x);
    return obs ? mq_observer_update_matrix(obs, x, (size_t)T, (size_t)cols) : MQ_OK;
}

static mq_status forward_locked(mq_encoder *e, const mq_forward_args *a) {
    const mq_bert_config *c = &e->cfg;
    const int64_t H = c->hidden, I = c->intermediate;
    MQ_TRY(check_inputs(e, a));
    MQ_TRY(mq_buffer_reserve(&e->offsets, (size_t)a->batch, sizeof(int64_t)));
    int64_t *off = e->offsets.ptr, T = 0;
    for (int64_t b = 0; b < a->batch; b++) { off[b] = T; T += a->lengths[b]; }
    const size_t rows = (size_t)mq_bucket_rows(T) + MQ_ATTN_BUCKET; /* bucket padding + attention slack */
    MQ_TRY(mq_buffer_reserve(&e->x, rows * (size_t)H, sizeof(float)));
    MQ_TRY(mq_buffer_reserve(&e->qkv, rows * 3 * (size_t)H, sizeof(float)));
    MQ_TRY(mq_buffer_reserve(&e->ctx, rows * (size_t)H, sizeof(float)));
    MQ_TRY(mq_buffer_reserve(&e->tmp, rows * (size_t)H, sizeof(float)));
    MQ_TRY(mq_buffer_reserve(&e->ffn, rows * (size_t)I, sizeof(float)));
    float *x = e->x.ptr, *qkv = e->qkv.ptr, *ctx = e->ctx.ptr, *tmp = e->tmp.ptr, *ffn = e->ffn.ptr;
    mq_engine_enter(e->eng);

    embed(e, a, off, tmp);
    MQ_TRY(layer_norm(e, T, tmp, x, e->emb_gamma, e->emb_beta));
    for (int64_t l = 0; l < c->n_layers; l++) {
        mq_layer *L = &e->layers[l];
        mq_observer **obs = a->observers ? a->observers + l * MQ_SITES_PER_LAYER : NULL;
        const int t0 = (int)(l * MQ_SITES_PER_LAYER);
#define OBS(s) (obs ? obs[s] : NULL)
        MQ_TRY(mq_linear_forward(L->site[MQ_SITE_QKV], &e->scratch, x, T, NULL, qkv, OBS(MQ_SITE_QKV)));
        copy_tap(a->taps, t0 + MQ_SITE_QKV, qkv, T, 3 * H);
        if (L->ctx_q.on) {
            uint8_t *cq = (uint8_t *)ctx;
            MQ_TRY(mq_attention_forward(e->attn, &e->scratch, qkv, NULL, cq, L->ctx_q.scale, L->ctx_q.zp, off, a->lengths,
                                        a->batch));
            MQ_TRY(expose_u8(e, cq, T, H, &L->ctx_q, NULL, OBS(MQ_SITE_ATTN_OUT)));
            MQ_TRY(mq_linear_forward_u8(L->site[MQ_SITE_ATTN_OUT], &e->scratch, cq, T, x, tmp));
        } else {
            MQ_TRY(mq_attention_forward(e->attn, &e->scratch, qkv, ctx, NULL, 0.f, 0, off, a->lengths, a->batch));
            MQ_TRY(mq_linear_forward(L->site[MQ_SITE_ATTN_OUT], &e->scratch, ctx, T, x, tmp, OBS(MQ_SITE_ATTN_OUT)));
        }
        copy_tap(a->taps, t0 + MQ_SITE_ATTN_OUT, tmp, T, H);
        MQ_TRY(layer_norm(e, T, tmp, x, L->ln_gamma[0], L->ln_beta[0]));
        MQ_TRY(mq_linear_forward(L->site[MQ_SITE_FFN_IN], &e->scratch, x, T, NULL, ffn, OBS(MQ_SITE_FFN_IN)));
        if (L->ffn_q.on) { /* ffn holds FFN_OUT's u8 input; its tap shows it dequantized (what FFN_OUT consumes) */
            const uint8_t *fq = (const uint8_t *)ffn;
            MQ_TRY(expose_u8(e, fq, T, I, &L->ffn_q, tap_of(a->taps, t0 + MQ_SITE_FFN_IN), OBS(MQ_SITE_FFN_OUT)));
            MQ_TRY(mq_linear_forward_u8(L->site[MQ_SITE_FFN_OUT], &e->scratch, fq, T, x, tmp));
        } else {
            copy_tap(a->taps, t0 + MQ_SITE_FFN_IN, ffn, T, I);
            MQ_TRY(mq_linear_forward(L->site[MQ_SITE_FFN_OUT], &e->scratch, ffn, T, x, tmp, OBS(MQ_SITE_FFN_OUT)));
        }
        copy_tap(a->taps, t0 + MQ_SITE_FFN_OUT, tmp, T, H);
        MQ_TRY(layer_norm(e, T, tmp, x, L->ln_gamma[1], L->ln_beta[1]));
#undef OBS
    }

    /* finite parameters can still overflow float32 on the way (e.g. a LayerNorm gain of 1e38): never return
       NaN / Inf as an embedding */
    if (any_nonfinite(x, (size_t)T * (size_t)H))
        return mq_set_error(MQ_ERR_NUMERIC, "forward: the encoder produced non-finite activations (float32 overflow: "
                                            "finite but extreme weights?)");
    if (a->hidden) {
        for (int64_t b = 0; b < a->batch; b++) {
            float *dst = a->hidden + b * a->seq * H;
            memcpy(dst, x + off[b] * H, (size_t)a->lengths[b] * (size_t)H * sizeof(float));
            memset(dst + (int64_t)a->lengths[b] * H, 0, (size_t)(a->seq - a->lengths[b]) * (size_t)H * sizeof(float));
        }
    }
    if (a->pooling != MQ_POOL_NONE) {
        for (int64_t b = 0; b < a->batch; b++) {
            float *p = a->pooled + b * H;
            const float *src = x + off[b] * H;
            if (a->pooling == MQ_POOL_CLS) {
                memcpy(p, src, (size_t)H * sizeof(float));
            } else {
                const int64_t n = a->lengths[b];
                memset(p, 0, (size_t)H * sizeof(float));
                for (int64_t j = 0; j < n; j++)
                    for (int64_t h = 0; h < H; h++) p[h] += src[j * H + h];
                const float inv_n = 1.f / (float)n;
                for (int64_t h = 0; h < H; h++) p[h] *= inv_n;
            }
            if (a->normalize) {
                double ss = 0.0;
                for (int64_t h = 0; h < H; h++) ss += (double)p[h] * p[h];
                const float inv = 1.f / (float)fmax(sqrt(ss), 1e-12);
                for (int64_t h = 0; h < H; h++) p[h] *= inv;
            }
        }
        /* finite hidden states of extreme size can still overflow the float sums of mean pooling */
        if (any_nonfinite(a->pooled, (size_t)a->batch * (size_t)H))
            return mq_set_error(MQ_ERR_NUMERIC, "forward: pooling produced non-finite activations (float32 overflow: "
                                                "finite but extreme weights?)");
    }
    return MQ_OK;
}

mq_status mq_encoder_forward(mq_encoder *e, const mq_forward_args *a) {
    if (!e) return mq_set_error(MQ_ERR_ARG, "encoder is NULL");
    pthread_mutex_lock(&e->lock);
    mq_status st = e->finalized ? forward_locked(e, a) : mq_set_error(MQ_ERR_STATE, "encoder is not finalized");
    pthread_mutex_unlock(&e->lock);
    return st;
}
