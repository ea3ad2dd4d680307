/* encoder.h - a BERT encoder: embeddings + LayerNorm, N transformer layers, pooling; one call runs everything.
 *
 * Tokens are processed packed: the rows of all sequences of a batch are stacked ([T, H], T = sum of lengths), so
 * the linear layers never compute padding; attention runs fused per sequence or (sequence, head) (attention.h).
 *
 * Static int8 layers take their input quantization from the producer where one exists: the LayerNorm before QKV
 * and FFN_IN writes their u8 input in the same pass as its f32 output (kept for the residual), FFN_IN writes
 * FFN_OUT's u8 input in its matmul epilogue (oneDNN dst scale + zero point after GELU), and attention quantizes its
 * per-sequence output rows for ATTN_OUT (set up at finalize; see fuse_inputs in encoder.c). A site hook at those
 * points then sees the u8 values dequantized, i.e. exactly what the consuming layer computes with.
 *
 * The encoder owns its parts: embeddings (embeddings.h), LayerNorm (layernorm.h), the linear layers (linear.h),
 * attention (attention.h) and pooling (pooling.h). Observation is one per-site hook (mq_site_hook) passed with a
 * forward: calibration and per-layer reports register it (probe.h); the inference path carries nothing else.
 *
 * Parameters are handed over once (copied, or prepacked into the layout oneDNN prefers), then mq_encoder_finalize
 * checks that everything is present. An encoder serialises its own forward calls with a lock, so one encoder can be
 * shared by many threads; different encoders run concurrently. fork() waits for the forward calls in flight to end
 * (a pthread_atfork handler takes every live encoder's lock), so a child never inherits a lock held by a thread it
 * does not have; with mq_threads_fork_safe (engine.h) the child's encoders work like the parent's.
 */
#ifndef MQ_ENCODER_H
#define MQ_ENCODER_H

#include "linear.h"
#include "pooling.h"

typedef struct {
    int64_t vocab_size, hidden, n_layers, n_heads, intermediate, max_position, type_vocab;
    float ln_eps;
} mq_bert_config;

/* The quantizable sites (linear layers) of a layer, in execution order. */
enum { MQ_SITE_QKV = 0, MQ_SITE_ATTN_OUT = 1, MQ_SITE_FFN_IN = 2, MQ_SITE_FFN_OUT = 3, MQ_SITES_PER_LAYER = 4 };

/* The points of a site a hook can see. */
typedef enum { MQ_SITE_INPUT = 1, MQ_SITE_OUTPUT = 2 } mq_site_point;
/* Called during a forward, for every site and every point in the hook's `points` mask, with x [rows, cols]
 * row-major f32 (rows: all tokens of the batch, packed):
 *   MQ_SITE_INPUT   what the site's matmul computes with: its input times its SmoothQuant multiplier, or, for an
 *                   input its producer quantized (fuse_inputs), those u8 values dequantized;
 *   MQ_SITE_OUTPUT  the site's result after its epilogue: QKV [T, 3H]; ATTN_OUT and FFN_OUT after the residual add;
 *                   FFN_IN after GELU (dequantized where FFN_IN writes FFN_OUT's u8 input).
 * x is valid during the call only. A non-OK return stops the forward with that status. Like llama.cpp's eval
 * callback: the forward knows nothing of what the hook does. */
typedef mq_status (*mq_site_fn)(void *user, int layer, int site, mq_site_point point, const float *x, int64_t rows,
                                int64_t cols);
typedef struct {
    mq_site_fn fn;   /* NULL: no hook */
    void *user;
    unsigned points; /* MQ_SITE_INPUT | MQ_SITE_OUTPUT */
} mq_site_hook;

typedef struct mq_encoder mq_encoder;

mq_status mq_encoder_create(mq_encoder **out, const mq_bert_config *cfg, int n_threads);
void mq_encoder_destroy(mq_encoder *enc);

/* Word table: f32 [vocab, hidden], or s8 with one scale per row. */
mq_status mq_encoder_set_word_embeddings(mq_encoder *enc, const float *table);
mq_status mq_encoder_set_word_embeddings_s8(mq_encoder *enc, const int8_t *table, const float *row_scales);
/* Position [max_position, hidden] and token-type [type_vocab, hidden] tables. */
mq_status mq_encoder_set_position_type_embeddings(mq_encoder *enc, const float *position, const float *token_type);
/* layer -1: the embedding LayerNorm; which 0: after attention, 1: after the FFN. gamma, beta: [hidden]. */
mq_status mq_encoder_set_layernorm(mq_encoder *enc, int layer, int which, const float *gamma, const float *beta);
/* A site's shape, in_features -> out_features: QKV hidden -> 3*hidden (rows Q, K, V), ATTN_OUT hidden -> hidden,
   FFN_IN hidden -> intermediate (GELU), FFN_OUT intermediate -> hidden. MQ_ERR_ARG for an unknown site. */
mq_status mq_encoder_site_shape(const mq_encoder *enc, int site, int64_t *in_features, int64_t *out_features);
/* Sets a site's linear layer (shape as above; the epilogue is set by the site). */
mq_status mq_encoder_set_linear(mq_encoder *enc, int layer, int site, const mq_linear_spec *spec,
                                const mq_linear_weights *w);
mq_status mq_encoder_finalize(mq_encoder *enc);

mq_status mq_encoder_set_threads(mq_encoder *enc, int n_threads);
/* The precision attention computes in (attention.h: MQ_ATTN_F32 after create, or MQ_ATTN_BF16); any time. */
mq_status mq_encoder_set_attention_precision(mq_encoder *enc, int precision);
/* The attention precision, and the attention kernel that runs (attention.h: mq_attention_impl). */
int mq_encoder_attention_precision(const mq_encoder *enc);
const char *mq_encoder_attention_impl(const mq_encoder *enc);
int mq_encoder_threads(const mq_encoder *enc);
const mq_bert_config *mq_encoder_config(const mq_encoder *enc);
size_t mq_encoder_nbytes(const mq_encoder *enc);
/* Implementation oneDNN picked for a site's matmul (after it ran once), e.g. "brg:avx512_core_vnni". */
const char *mq_encoder_site_impl(const mq_encoder *enc, int layer, int site);

/* Lengths from a right-padded attention mask [batch, seq] (ones then zeros); error for any other shape of mask. */
mq_status mq_lengths_from_mask(const int32_t *mask, int64_t batch, int64_t seq, int32_t *lengths);

typedef struct {
    const int32_t *ids;      /* [batch, seq] */
    const int32_t *type_ids; /* [batch, seq] or NULL (all 0) */
    const int32_t *lengths;  /* [batch], each in [1, seq] */
    int64_t batch, seq;
    float *hidden;           /* [batch, seq, hidden] last hidden state (padding rows set to 0), or NULL */
    int pooling;             /* MQ_POOL_* */
    int normalize;           /* L2-normalise pooled vectors */
    float *pooled;           /* [batch, hidden] or NULL */
    mq_site_hook hook;       /* {NULL}: none */
} mq_forward_args;

mq_status mq_encoder_forward(mq_encoder *enc, const mq_forward_args *args);

/* ------------------------------------------------------------------ memory
 * What a forward call allocates follows from its shape and the config alone, so it is computed before anything is
 * allocated and compared with the encoder's bound; and a workspace grown by one outsized call is given back. */
typedef struct {
    int64_t batch, seq; /* sequences, padded length */
    int64_t tokens;     /* real tokens (the sum of the lengths) */
    int hidden_out;     /* the caller allocates the last hidden state [batch, seq, hidden] */
    int taps;           /* the caller allocates a copy of every site's output [tokens, out_features] */
    int hook;           /* a site hook is passed (the inputs it is shown may need their own buffers) */
} mq_call_shape;

/* Bytes a forward of this shape allocates: the workspace (an upper bound; oneDNN's scratchpads are counted as the
   encoder holds them now, they are built once per shape and small) plus the caller's outputs (pooled, hidden, taps).
   SIZE_MAX if it does not fit in size_t. */
size_t mq_encoder_call_bytes(const mq_encoder *enc, const mq_call_shape *shape);
/* MQ_ERR_NOMEM, with the sizes in the message, when mq_encoder_call_bytes exceeds the bound; MQ_OK otherwise. */
mq_status mq_encoder_check_call(const mq_encoder *enc, const mq_call_shape *shape);
/* max_bytes: the bound on a call's bytes (0: none, the default). keep_bytes: after a forward, a workspace holding
   more than this is released, the next call allocates again (SIZE_MAX, the default: always kept). */
mq_status mq_encoder_set_memory_limits(mq_encoder *enc, size_t max_bytes, size_t keep_bytes);
/* Bytes the workspace holds now (between calls: what the last call left). */
size_t mq_encoder_workspace_bytes(mq_encoder *enc);

/* Where the forwards' time went: wall seconds summed over the forwards since the encoder was created or the last
   reset, for the whole forward (inside the encoder's lock) and for the encoder's own stages inside it. What the
   stages leave of the forward is the linear layers (with their activation quantization), plus the site hook when
   one is registered (calibration) and the final checks. */
typedef enum {
    MQ_STAGE_FORWARD = 0,
    MQ_STAGE_EMBEDDINGS, /* gather and sum */
    MQ_STAGE_LAYERNORM,  /* every LayerNorm, with its fused u8 output */
    MQ_STAGE_ATTENTION,  /* the fused attention kernel */
    MQ_STAGE_POOLING,
    MQ_STAGE_COUNT
} mq_stage;
/* out[MQ_STAGE_COUNT]; with reset, the sums start again from zero afterwards. */
void mq_encoder_stage_seconds(mq_encoder *enc, double *out, int reset);
const char *mq_stage_name(int stage);

#endif
