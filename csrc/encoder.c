/* encoder.c - the BERT encoder (encoder.h): owns the embeddings, LayerNorm, attention and the four linear sites of
 * every layer, decides which static int8 inputs their producers quantize (fuse_inputs), and runs the forward over
 * packed tokens, calling the site hook where one is passed. */
#include "encoder.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "attention.h"
#include "embeddings.h"
#include "layernorm.h"
#include "qparams.h"
#include "wo_matmul.h"

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
    mq_u8_input qkv_q; /* QKV's input, quantized by the LayerNorm before it (the embeddings' or the previous layer's) */
    mq_u8_input in_q;  /* FFN_IN's input, quantized by the attention block's LayerNorm */
} mq_layer;

struct mq_encoder {
    mq_bert_config cfg;
    mq_engine *eng;
    pthread_mutex_t lock;
    int finalized;
    mq_embeddings *emb;
    float *emb_gamma, *emb_beta;
    mq_layer *layers;
    mq_attention *attn;
    mq_layernorm *ln;
    /* workspace, reused across calls */
    mq_linear_scratch scratch;
    mq_buffer x, qkv, ctx, tmp, ffn, deq, offsets, xq; /* xq: the u8 input a LayerNorm wrote for QKV / FFN_IN */
    size_t max_bytes, keep_bytes; /* mq_encoder_set_memory_limits */
    _Atomic size_t scratchpad_seen; /* the oneDNN scratchpad after the last forward: read by mq_encoder_call_bytes
                                       without the lock, while a forward may be running */
    mq_encoder *prev_live, *next_live; /* the list of live encoders (see "fork" below), under live_lock */
    uint64_t stage_ns[MQ_STAGE_COUNT];  /* mq_encoder_stage_seconds, under the lock */
};

static uint64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

const char *mq_stage_name(int stage) {
    static const char *const names[MQ_STAGE_COUNT] = {"forward", "embeddings", "layernorm", "attention", "pooling"};
    return stage >= 0 && stage < MQ_STAGE_COUNT ? names[stage] : "?";
}

void mq_encoder_stage_seconds(mq_encoder *e, double *out, int reset) {
    pthread_mutex_lock(&e->lock);
    for (int s = 0; s < MQ_STAGE_COUNT; s++) {
        out[s] = (double)e->stage_ns[s] * 1e-9;
        if (reset) e->stage_ns[s] = 0;
    }
    pthread_mutex_unlock(&e->lock);
}

/* The encoder's own workspace buffers, in one list for sizing and releasing. */
#define MQ_ENCODER_BUFFERS(e) {&(e)->x, &(e)->qkv, &(e)->ctx, &(e)->tmp, &(e)->ffn, &(e)->deq, &(e)->offsets, &(e)->xq}

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

/* ------------------------------------------------------------------ fork
 * A fork() while another thread runs a forward would give the child that encoder's lock held by a thread the child
 * does not have, and the child's first call would wait forever. So every live encoder is on one process-wide list,
 * and around fork() (pthread_atfork) the forking thread takes the list's lock and then every encoder's lock: the
 * fork waits for the calls in flight to end, and parent and child each release the locks afterwards. (Process-wide
 * by nature, like fork itself; nothing else reads the list.) */
static pthread_mutex_t live_lock = PTHREAD_MUTEX_INITIALIZER;
static mq_encoder *live_head;
static pthread_once_t live_once = PTHREAD_ONCE_INIT;
static int live_atfork_status;

static void lock_all_before_fork(void) {
    pthread_mutex_lock(&live_lock);
    for (mq_encoder *e = live_head; e; e = e->next_live) pthread_mutex_lock(&e->lock);
}

static void unlock_all_after_fork(void) {
    for (mq_encoder *e = live_head; e; e = e->next_live) pthread_mutex_unlock(&e->lock);
    pthread_mutex_unlock(&live_lock);
}

static void register_fork_handlers(void) {
    live_atfork_status = pthread_atfork(lock_all_before_fork, unlock_all_after_fork, unlock_all_after_fork);
}

static mq_status add_live(mq_encoder *e) {
    if (pthread_once(&live_once, register_fork_handlers) != 0 || live_atfork_status != 0)
        return mq_set_error(MQ_ERR_STATE, "encoder: cannot register its fork handlers");
    pthread_mutex_lock(&live_lock);
    e->next_live = live_head;
    if (live_head) live_head->prev_live = e;
    live_head = e;
    pthread_mutex_unlock(&live_lock);
    return MQ_OK;
}

static void remove_live(mq_encoder *e) {
    pthread_mutex_lock(&live_lock);
    if (e->prev_live) e->prev_live->next_live = e->next_live;
    else if (live_head == e) live_head = e->next_live;
    if (e->next_live) e->next_live->prev_live = e->prev_live;
    e->prev_live = e->next_live = NULL;
    pthread_mutex_unlock(&live_lock);
}

mq_status mq_encoder_create(mq_encoder **out, const mq_bert_config *cfg, int n_threads) {
    if (!out) return mq_set_error(MQ_ERR_ARG, "encoder: out is NULL");
    *out = NULL;
    MQ_TRY(check_config(cfg));
    mq_encoder *e = calloc(1, sizeof *e);
    if (!e) return mq_set_error(MQ_ERR_NOMEM, "encoder: out of memory");
    e->cfg = *cfg;
    e->keep_bytes = SIZE_MAX;
    atomic_init(&e->scratchpad_seen, 0);
    if (pthread_mutex_init(&e->lock, NULL) != 0) { free(e); return mq_set_error(MQ_ERR_STATE, "encoder: cannot create lock"); }
    mq_status st = add_live(e);
    if (st != MQ_OK) { pthread_mutex_destroy(&e->lock); free(e); return st; }
    st = mq_engine_create(&e->eng, n_threads);
    if (st == MQ_OK) {
        e->layers = calloc((size_t)cfg->n_layers, sizeof *e->layers);
        if (!e->layers) st = mq_set_error(MQ_ERR_NOMEM, "encoder: out of memory");
    }
    if (st == MQ_OK)
        st = mq_embeddings_create(&e->emb, cfg->vocab_size, cfg->hidden, cfg->max_position, cfg->type_vocab);
    if (st == MQ_OK) st = mq_layernorm_create(&e->ln, e->eng, cfg->hidden, cfg->ln_eps);
    if (st == MQ_OK)
        st = mq_attention_create(&e->attn, e->eng, (int)cfg->n_heads, cfg->hidden / cfg->n_heads, cfg->max_position);
    if (st != MQ_OK) { mq_encoder_destroy(e); return st; }
    *out = e;
    return MQ_OK;
}

static void release_workspace(mq_encoder *e) {
    mq_buffer *bufs[] = MQ_ENCODER_BUFFERS(e);
    for (size_t i = 0; i < sizeof bufs / sizeof *bufs; i++) mq_buffer_release(bufs[i]);
    mq_linear_scratch_release(&e->scratch);
    if (e->attn) mq_attention_release_scratch(e->attn);
}

static size_t workspace_bytes(mq_encoder *e) {
    mq_buffer *bufs[] = MQ_ENCODER_BUFFERS(e);
    size_t n = mq_linear_scratch_bytes(&e->scratch) + mq_attention_scratch_bytes(e->attn);
    for (size_t i = 0; i < sizeof bufs / sizeof *bufs; i++) n += bufs[i]->bytes;
    return n;
}

void mq_encoder_destroy(mq_encoder *e) {
    if (!e) return;
    release_workspace(e); /* before the attention and LayerNorm that hold part of it */
    if (e->layers) {
        for (int64_t l = 0; l < e->cfg.n_layers; l++) {
            for (int s = 0; s < MQ_SITES_PER_LAYER; s++) mq_linear_destroy(e->layers[l].site[s]);
            for (int k = 0; k < 2; k++) { mq_free(e->layers[l].ln_gamma[k]); mq_free(e->layers[l].ln_beta[k]); }
        }
        free(e->layers);
    }
    mq_attention_destroy(e->attn);
    mq_layernorm_destroy(e->ln);
    mq_embeddings_destroy(e->emb);
    mq_free(e->emb_gamma);
    mq_free(e->emb_beta);
    mq_engine_destroy(e->eng);
    remove_live(e);
    pthread_mutex_destroy(&e->lock);
    free(e);
}

static mq_status not_final(const mq_encoder *e) {
    if (!e) return mq_set_error(MQ_ERR_ARG, "encoder is NULL");
    if (e->finalized) return mq_set_error(MQ_ERR_STATE, "encoder is finalized; parameters can no longer change");
    return MQ_OK;
}

mq_status mq_encoder_set_word_embeddings(mq_encoder *e, const float *table) {
    MQ_TRY(not_final(e));
    return mq_embeddings_set_word(e->emb, table);
}

mq_status mq_encoder_set_word_embeddings_s8(mq_encoder *e, const int8_t *table, const float *row_scales) {
    MQ_TRY(not_final(e));
    return mq_embeddings_set_word_s8(e->emb, table, row_scales);
}

mq_status mq_encoder_set_position_type_embeddings(mq_encoder *e, const float *position, const float *token_type) {
    MQ_TRY(not_final(e));
    return mq_embeddings_set_position_type(e->emb, position, token_type);
}

mq_status mq_encoder_set_layernorm(mq_encoder *e, int layer, int which, const float *gamma, const float *beta) {
    MQ_TRY(not_final(e));
    const size_t H = (size_t)e->cfg.hidden;
    if (layer == -1) {
        MQ_TRY(mq_take_floats(&e->emb_gamma, gamma, H, "embedding LayerNorm weight"));
        return mq_take_floats(&e->emb_beta, beta, H, "embedding LayerNorm bias");
    }
    if (layer < 0 || layer >= e->cfg.n_layers || (which != 0 && which != 1))
        return mq_set_error(MQ_ERR_ARG, "layernorm: bad layer %d / which %d", layer, which);
    MQ_TRY(mq_take_floats(&e->layers[layer].ln_gamma[which], gamma, H, "LayerNorm weight"));
    return mq_take_floats(&e->layers[layer].ln_beta[which], beta, H, "LayerNorm bias");
}

static mq_epilogue site_epilogue(int site) {
    static const mq_epilogue epi[MQ_SITES_PER_LAYER] = {MQ_EPI_NONE, MQ_EPI_RESIDUAL, MQ_EPI_GELU, MQ_EPI_RESIDUAL};
    return epi[site];
}

mq_status mq_encoder_site_shape(const mq_encoder *e, int site, int64_t *K, int64_t *N) {
    if (!e || site < 0 || site >= MQ_SITES_PER_LAYER) return mq_set_error(MQ_ERR_ARG, "site %d outside [0, %d)", site,
                                                                           MQ_SITES_PER_LAYER);
    const mq_bert_config *c = &e->cfg;
    const int64_t in[MQ_SITES_PER_LAYER] = {c->hidden, c->hidden, c->hidden, c->intermediate};
    const int64_t out[MQ_SITES_PER_LAYER] = {3 * c->hidden, c->hidden, c->intermediate, c->hidden};
    *K = in[site];
    *N = out[site];
    return MQ_OK;
}

mq_status mq_encoder_set_linear(mq_encoder *e, int layer, int site, const mq_linear_spec *spec,
                                const mq_linear_weights *w) {
    MQ_TRY(not_final(e));
    if (layer < 0 || layer >= e->cfg.n_layers || site < 0 || site >= MQ_SITES_PER_LAYER || !spec)
        return mq_set_error(MQ_ERR_ARG, "set_linear: bad layer %d / site %d", layer, site);
    int64_t K = 0, N = 0;
    MQ_TRY(mq_encoder_site_shape(e, site, &K, &N));
    mq_linear_spec s = *spec;
    s.epilogue = site_epilogue(site);
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
   quantizing an f32 copy in a pass of its own: the LayerNorm before QKV and FFN_IN writes their u8 input next to its
   f32 output (kept for the residual), attention quantizes its output rows for ATTN_OUT as it copies them out, and
   FFN_IN applies FFN_OUT's scale and zero point in its matmul epilogue (after GELU), so the [T, intermediate] f32
   activation, the widest of the layer, is never written at all. */
static void fuse_inputs(mq_layer *L) {
    mq_u8_input *c = &L->ctx_q, *f = &L->ffn_q, *q = &L->qkv_q, *i = &L->in_q;
    q->on = mq_linear_static_input(L->site[MQ_SITE_QKV], &q->scale, &q->zp);
    i->on = mq_linear_static_input(L->site[MQ_SITE_FFN_IN], &i->scale, &i->zp);
    c->on = mq_linear_static_input(L->site[MQ_SITE_ATTN_OUT], &c->scale, &c->zp);
    f->on = mq_linear_static_input(L->site[MQ_SITE_FFN_OUT], &f->scale, &f->zp) &&
            mq_linear_set_output_u8(L->site[MQ_SITE_FFN_IN], f->scale, f->zp) == MQ_OK; /* else FFN_IN stays f32 */
}

static mq_status finalize_locked(mq_encoder *e) {
    MQ_TRY(not_final(e));
    MQ_TRY(mq_embeddings_check_complete(e->emb));
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

mq_status mq_encoder_set_attention_precision(mq_encoder *e, int precision) {
    if (!e) return mq_set_error(MQ_ERR_ARG, "encoder is NULL");
    pthread_mutex_lock(&e->lock);
    mq_status st = mq_attention_set_precision(e->attn, (mq_attn_precision)precision);
    pthread_mutex_unlock(&e->lock);
    return st;
}

int mq_encoder_attention_precision(const mq_encoder *e) { return (int)mq_attention_precision(e->attn); }

const char *mq_encoder_attention_impl(const mq_encoder *e) { return mq_attention_impl(e->attn); }
const mq_bert_config *mq_encoder_config(const mq_encoder *e) { return &e->cfg; }

size_t mq_encoder_nbytes(const mq_encoder *e) {
    const mq_bert_config *c = &e->cfg;
    size_t b = mq_embeddings_nbytes(e->emb) + 2 * (size_t)c->hidden * sizeof(float) * (1 + 2 * (size_t)c->n_layers);
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

static mq_status check_inputs(const mq_encoder *e, const mq_forward_args *a) {
    if (!a || !a->ids || !a->lengths) return mq_set_error(MQ_ERR_ARG, "forward: ids and lengths are required");
    if (a->batch <= 0 || a->seq <= 0) return mq_set_error(MQ_ERR_ARG, "forward: empty batch (%lld x %lld)", (long long)a->batch, (long long)a->seq);
    if (a->seq > e->cfg.max_position)
        return mq_set_error(MQ_ERR_ARG, "forward: sequence length %lld exceeds max_position_embeddings %lld",
                            (long long)a->seq, (long long)e->cfg.max_position);
    if (a->pooling < 0 || a->pooling >= MQ_POOL_COUNT) return mq_set_error(MQ_ERR_ARG, "forward: unknown pooling %d", a->pooling);
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

/* ------------------------------------------------------------------ memory */

/* a + b, a * b saturating at SIZE_MAX (the sizes are compared with a bound, never allocated, when they saturate) */
static size_t sat_add(size_t a, size_t b) { return a > SIZE_MAX - b ? SIZE_MAX : a + b; }
static size_t sat_mul(size_t a, size_t b) { size_t n; return mq_size_mul(a, b, &n) ? n : SIZE_MAX; }
static size_t sat_mul3(size_t a, size_t b, size_t c) { return sat_mul(sat_mul(a, b), c); }

size_t mq_encoder_call_bytes(const mq_encoder *e, const mq_call_shape *c) {
    const size_t H = (size_t)e->cfg.hidden, I = (size_t)e->cfg.intermediate, K = H > I ? H : I, f = sizeof(float);
    const size_t T = (size_t)c->tokens, B = (size_t)c->batch;
    /* reserve_pass: x, ctx, tmp [T, H], qkv [T, 3H], ffn [T, I] f32, xq [T, H] u8, offsets */
    size_t n = sat_add(sat_add(sat_mul3(T, 6 * H + I, f), sat_mul(T, H)), sat_mul(B, sizeof(int64_t)));
    /* linear scratch (the largest input over the sites): u8 and f32/bf16 copies, row scales, the weight-only kernel's
       per-thread buffers for the widest site */
    n = sat_add(n, sat_mul3(T, K, 1 + f));
    if (mq_engine_rows_vary(e->eng)) { /* the padded last piece of the uniform row plan, for the widest site */
        const int64_t h = (int64_t)H, i = (int64_t)I;
        const size_t sites[4] = {mq_uniform_tail_bytes(h, 3 * h, 0), mq_uniform_tail_bytes(h, h, 1),
                                 mq_uniform_tail_bytes(h, i, 0), mq_uniform_tail_bytes(i, h, 1)};
        size_t widest = 0;
        for (int s = 0; s < 4; s++) widest = sites[s] > widest ? sites[s] : widest;
        n = sat_add(n, widest);
    }
    n = sat_add(n, sat_add(sat_mul(T, f), sat_mul(mq_wo_scratch_floats((int64_t)(H > I ? H : I),
                                                                        (int64_t)(3 * H > I ? 3 * H : I),
                                                                        mq_engine_threads(e->eng)), f)));
    n = sat_add(n, mq_attention_scratch_need(e->attn, c->seq, c->batch));
    n = sat_add(n, atomic_load_explicit(&e->scratchpad_seen, memory_order_relaxed));
    if (c->hook) n = sat_add(n, sat_mul3(T, 2 * K, f));             /* effective inputs, dequantized u8 inputs */
    if (c->hidden_out) n = sat_add(n, sat_mul3(B * (size_t)c->seq, H, f));
    if (c->taps) n = sat_add(n, sat_mul3(sat_mul(T, (size_t)e->cfg.n_layers), 6 * H + I, f));
    return sat_add(n, sat_mul(B, H * f)); /* pooled */
}

mq_status mq_encoder_check_call(const mq_encoder *e, const mq_call_shape *c) {
    if (!e || !c) return mq_set_error(MQ_ERR_ARG, "encoder: NULL argument");
    if (c->batch <= 0 || c->seq <= 0 || c->tokens <= 0 || c->batch > INT64_MAX / c->seq || c->tokens > c->batch * c->seq)
        return mq_set_error(MQ_ERR_ARG, "encoder: bad call shape (batch %lld, seq %lld, tokens %lld)", (long long)c->batch,
                            (long long)c->seq, (long long)c->tokens);
    const size_t need = mq_encoder_call_bytes(e, c);
    if (e->max_bytes && need > e->max_bytes)
        return mq_set_error(MQ_ERR_NOMEM,
                            "a forward over %lld sequences of up to %lld tokens (%lld tokens) needs %.1f MiB, above this "
                            "encoder's memory limit of %.1f MiB: use smaller batches or shorter max_length, or raise the "
                            "limit (Encoder.set_memory_limit)",
                            (long long)c->batch, (long long)c->seq, (long long)c->tokens, (double)need / 1048576.0,
                            (double)e->max_bytes / 1048576.0);
    return MQ_OK;
}

mq_status mq_encoder_set_memory_limits(mq_encoder *e, size_t max_bytes, size_t keep_bytes) {
    if (!e) return mq_set_error(MQ_ERR_ARG, "encoder is NULL");
    pthread_mutex_lock(&e->lock);
    e->max_bytes = max_bytes;
    e->keep_bytes = keep_bytes;
    if (workspace_bytes(e) > keep_bytes) release_workspace(e);
    pthread_mutex_unlock(&e->lock);
    return MQ_OK;
}

size_t mq_encoder_workspace_bytes(mq_encoder *e) {
    if (!e) return 0;
    pthread_mutex_lock(&e->lock);
    size_t n = workspace_bytes(e);
    pthread_mutex_unlock(&e->lock);
    return n;
}

/* ------------------------------------------------------------------ forward */

/* One forward's state: the arguments, the packed token count and the sequences' row offsets. */
typedef struct {
    const mq_forward_args *a;
    int64_t T;
    const int64_t *off;
} mq_pass;

static int wants(const mq_pass *p, mq_site_point point) { return p->a->hook.fn && (p->a->hook.points & point); }

static mq_status show(const mq_pass *p, int64_t l, int site, mq_site_point point, const float *x, int64_t cols) {
    if (!wants(p, point)) return MQ_OK;
    return p->a->hook.fn(p->a->hook.user, (int)l, site, point, x, p->T, cols);
}

/* Shows a site's f32 input (after its SmoothQuant multiplier) to the hook, if it asked for inputs. */
static mq_status show_input(mq_encoder *e, const mq_pass *p, int64_t l, int site, const float *x) {
    if (!wants(p, MQ_SITE_INPUT)) return MQ_OK;
    const mq_linear *lin = e->layers[l].site[site];
    const float *xs = NULL;
    MQ_TRY(mq_linear_effective_input(lin, &e->scratch, x, p->T, &xs));
    return show(p, l, site, MQ_SITE_INPUT, xs, mq_linear_in(lin));
}

/* A producer-written u8 input, dequantized for the hook: the input of `site` and (producer >= 0) the output of the
   producer site. Nothing to do (and no pass over the data) when the hook wants neither. */
static mq_status show_u8(mq_encoder *e, const mq_pass *p, int64_t l, int producer, int site, const uint8_t *q,
                         int64_t cols, const mq_u8_input *u) {
    const int out = producer >= 0 && wants(p, MQ_SITE_OUTPUT);
    if (!out && !wants(p, MQ_SITE_INPUT)) return MQ_OK;
    MQ_TRY(mq_buffer_reserve(&e->deq, (size_t)p->T * (size_t)cols, sizeof(float)));
    mq_dequantize_u8(q, p->T, cols, u->scale, u->zp, e->deq.ptr);
    if (out) MQ_TRY(show(p, l, producer, MQ_SITE_OUTPUT, e->deq.ptr, cols));
    return show(p, l, site, MQ_SITE_INPUT, e->deq.ptr, cols);
}

/* x = LayerNorm(src) and, when u is on, the u8 input of the site it feeds (u's scale and zero point) into xq. */
static mq_status layernorm(mq_encoder *e, const mq_pass *p, const float *src, const float *gamma, const float *beta,
                           const mq_u8_input *u) {
    const int q = u && u->on;
    const uint64_t t0 = now_ns();
    const mq_status st = mq_layernorm_forward(e->ln, p->T, src, e->x.ptr, gamma, beta,
                                              q ? (uint8_t *)e->xq.ptr : NULL, q ? u->scale : 0.f, q ? u->zp : 0);
    e->stage_ns[MQ_STAGE_LAYERNORM] += now_ns() - t0;
    return st;
}

/* A site fed by a LayerNorm (QKV, FFN_IN): from the u8 input that LayerNorm wrote into xq (u on), else from x. */
static mq_status after_layernorm(mq_encoder *e, const mq_pass *p, int64_t l, int site, const mq_u8_input *u, void *y) {
    mq_linear *lin = e->layers[l].site[site];
    if (!u->on) {
        MQ_TRY(show_input(e, p, l, site, e->x.ptr));
        return mq_linear_forward(lin, &e->scratch, e->x.ptr, p->T, NULL, y);
    }
    MQ_TRY(show_u8(e, p, l, -1, site, e->xq.ptr, mq_linear_in(lin), u));
    return mq_linear_forward_u8(lin, &e->scratch, e->xq.ptr, p->T, NULL, y);
}

/* x [T, H] -> attention block -> x (residual + LayerNorm inside). */
static mq_status attention_block(mq_encoder *e, const mq_pass *p, int64_t l) {
    mq_layer *L = &e->layers[l];
    const int64_t T = p->T, H = e->cfg.hidden;
    float *x = e->x.ptr, *qkv = e->qkv.ptr, *ctx = e->ctx.ptr, *tmp = e->tmp.ptr;
    const mq_forward_args *a = p->a;
    MQ_TRY(after_layernorm(e, p, l, MQ_SITE_QKV, &L->qkv_q, qkv));
    MQ_TRY(show(p, l, MQ_SITE_QKV, MQ_SITE_OUTPUT, qkv, 3 * H));
    const uint64_t t0 = now_ns();
    const mq_status st = mq_attention_forward(e->attn, qkv, L->ctx_q.on ? NULL : ctx, L->ctx_q.on ? (uint8_t *)ctx : NULL,
                                              L->ctx_q.scale, L->ctx_q.zp, p->off, a->lengths, a->batch);
    e->stage_ns[MQ_STAGE_ATTENTION] += now_ns() - t0;
    MQ_TRY(st);
    if (L->ctx_q.on) {
        uint8_t *cq = (uint8_t *)ctx;
        MQ_TRY(show_u8(e, p, l, -1, MQ_SITE_ATTN_OUT, cq, H, &L->ctx_q));
        MQ_TRY(mq_linear_forward_u8(L->site[MQ_SITE_ATTN_OUT], &e->scratch, cq, T, x, tmp));
    } else {
        MQ_TRY(show_input(e, p, l, MQ_SITE_ATTN_OUT, ctx));
        MQ_TRY(mq_linear_forward(L->site[MQ_SITE_ATTN_OUT], &e->scratch, ctx, T, x, tmp));
    }
    MQ_TRY(show(p, l, MQ_SITE_ATTN_OUT, MQ_SITE_OUTPUT, tmp, H));
    return layernorm(e, p, tmp, L->ln_gamma[0], L->ln_beta[0], &L->in_q);
}

/* x [T, H] -> feed-forward block -> x (residual + LayerNorm inside). */
static mq_status ffn_block(mq_encoder *e, const mq_pass *p, int64_t l) {
    mq_layer *L = &e->layers[l];
    const int64_t T = p->T, H = e->cfg.hidden, I = e->cfg.intermediate;
    float *x = e->x.ptr, *tmp = e->tmp.ptr, *ffn = e->ffn.ptr;
    MQ_TRY(after_layernorm(e, p, l, MQ_SITE_FFN_IN, &L->in_q, ffn));
    if (L->ffn_q.on) { /* ffn holds FFN_OUT's u8 input */
        const uint8_t *fq = (const uint8_t *)ffn;
        MQ_TRY(show_u8(e, p, l, MQ_SITE_FFN_IN, MQ_SITE_FFN_OUT, fq, I, &L->ffn_q));
        MQ_TRY(mq_linear_forward_u8(L->site[MQ_SITE_FFN_OUT], &e->scratch, fq, T, x, tmp));
    } else {
        MQ_TRY(show(p, l, MQ_SITE_FFN_IN, MQ_SITE_OUTPUT, ffn, I));
        MQ_TRY(show_input(e, p, l, MQ_SITE_FFN_OUT, ffn));
        MQ_TRY(mq_linear_forward(L->site[MQ_SITE_FFN_OUT], &e->scratch, ffn, T, x, tmp));
    }
    MQ_TRY(show(p, l, MQ_SITE_FFN_OUT, MQ_SITE_OUTPUT, tmp, H));
    const mq_u8_input *next = l + 1 < e->cfg.n_layers ? &e->layers[l + 1].qkv_q : NULL; /* the next layer's QKV */
    return layernorm(e, p, tmp, L->ln_gamma[1], L->ln_beta[1], next);
}

/* Packs the batch: row offsets of the sequences, and every buffer sized for exactly T tokens, after checking the
   call against the memory bound. */
static mq_status reserve_pass(mq_encoder *e, const mq_forward_args *a, mq_pass *p) {
    const int64_t H = e->cfg.hidden, I = e->cfg.intermediate;
    int64_t T = 0;
    for (int64_t b = 0; b < a->batch; b++) T += a->lengths[b];
    const mq_call_shape shape = {a->batch, a->seq, T, a->hidden != NULL, 0, a->hook.fn != NULL};
    MQ_TRY(mq_encoder_check_call(e, &shape)); /* before anything is allocated */
    MQ_TRY(mq_buffer_reserve(&e->offsets, (size_t)a->batch, sizeof(int64_t)));
    int64_t *off = e->offsets.ptr;
    for (int64_t b = 0, t = 0; b < a->batch; t += a->lengths[b++]) off[b] = t;
    const size_t rows = (size_t)T;
    MQ_TRY(mq_buffer_reserve(&e->x, rows * (size_t)H, sizeof(float)));
    MQ_TRY(mq_buffer_reserve(&e->qkv, rows * 3 * (size_t)H, sizeof(float)));
    MQ_TRY(mq_buffer_reserve(&e->ctx, rows * (size_t)H, sizeof(float)));
    MQ_TRY(mq_buffer_reserve(&e->tmp, rows * (size_t)H, sizeof(float)));
    MQ_TRY(mq_buffer_reserve(&e->ffn, rows * (size_t)I, sizeof(float)));
    MQ_TRY(mq_buffer_reserve(&e->xq, rows * (size_t)H, 1));
    *p = (mq_pass){a, T, off};
    return MQ_OK;
}

static void copy_hidden(const mq_encoder *e, const mq_pass *p, float *hidden) {
    const int64_t H = e->cfg.hidden, S = p->a->seq;
    const float *x = e->x.ptr;
    for (int64_t b = 0; b < p->a->batch; b++) {
        float *dst = hidden + b * S * H;
        const int64_t n = p->a->lengths[b];
        memcpy(dst, x + p->off[b] * H, (size_t)n * (size_t)H * sizeof(float));
        memset(dst + n * H, 0, (size_t)(S - n) * (size_t)H * sizeof(float));
    }
}

static mq_status forward_locked(mq_encoder *e, const mq_forward_args *a) {
    const int64_t H = e->cfg.hidden;
    mq_pass p;
    MQ_TRY(check_inputs(e, a));
    MQ_TRY(reserve_pass(e, a, &p));
    mq_engine_enter(e->eng);
    const uint64_t t0 = now_ns();
    mq_embeddings_forward(e->emb, a->ids, a->type_ids, a->lengths, a->batch, a->seq, p.off, e->tmp.ptr);
    e->stage_ns[MQ_STAGE_EMBEDDINGS] += now_ns() - t0;
    MQ_TRY(layernorm(e, &p, e->tmp.ptr, e->emb_gamma, e->emb_beta, &e->layers[0].qkv_q));
    for (int64_t l = 0; l < e->cfg.n_layers; l++) {
        MQ_TRY(attention_block(e, &p, l));
        MQ_TRY(ffn_block(e, &p, l));
    }
    /* finite parameters can still overflow float32 on the way (e.g. a LayerNorm gain of 1e38): never return
       NaN / Inf as an embedding */
    if (mq_any_nonfinite(e->x.ptr, (size_t)p.T * (size_t)H))
        return mq_set_error(MQ_ERR_NUMERIC, "forward: the encoder produced non-finite activations (float32 overflow: "
                                            "finite but extreme weights?)");
    if (a->hidden) copy_hidden(e, &p, a->hidden);
    const uint64_t t1 = now_ns();
    const mq_status st = mq_pool_rows(e->x.ptr, H, p.off, a->lengths, a->batch, a->pooling, a->normalize, a->pooled);
    e->stage_ns[MQ_STAGE_POOLING] += now_ns() - t1;
    return st;
}

mq_status mq_encoder_forward(mq_encoder *e, const mq_forward_args *a) {
    if (!e) return mq_set_error(MQ_ERR_ARG, "encoder is NULL");
    pthread_mutex_lock(&e->lock);
    const uint64_t t0 = now_ns();
    mq_status st = e->finalized ? forward_locked(e, a) : mq_set_error(MQ_ERR_STATE, "encoder is not finalized");
    e->stage_ns[MQ_STAGE_FORWARD] += now_ns() - t0;
    atomic_store_explicit(&e->scratchpad_seen, e->scratch.scratchpad.bytes, memory_order_relaxed);
    if (workspace_bytes(e) > e->keep_bytes) release_workspace(e);
    pthread_mutex_unlock(&e->lock);
    return st;
}
