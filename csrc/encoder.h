/* encoder.h - a BERT encoder: embeddings + LayerNorm, N transformer layers, pooling; one call runs everything.
 *
 * Tokens are processed packed: the rows of all sequences of a batch are stacked ([T, H], T = sum of lengths), so
 * the linear layers never compute padding; attention runs per sequence (attention.h).
 *
 * Static int8 layers take their input quantization from the producer where one exists: FFN_IN writes FFN_OUT's
 * u8 input in its matmul epilogue (oneDNN dst scale + zero point after GELU), and attention quantizes its
 * per-sequence output rows for ATTN_OUT (set up at finalize; see fuse_inputs in encoder.c). Observers and taps at those
 * points then see the u8 values dequantized, i.e. exactly what the consuming layer computes with.
 *
 * Parameters are handed over once (copied, or prepacked into the layout oneDNN prefers), then mq_encoder_finalize
 * checks that everything is present. An encoder serialises its own forward calls with a lock, so one encoder can be
 * shared by many threads; different encoders run concurrently.
 */
#ifndef MQ_ENCODER_H
#define MQ_ENCODER_H

#include "linear.h"
#include "observer.h"

typedef struct {
    int64_t vocab_size, hidden, n_layers, n_heads, intermediate, max_position, type_vocab;
    float ln_eps;
} mq_bert_config;

/* The quantizable sites (linear layers) of a layer, in execution order. */
enum { MQ_SITE_QKV = 0, MQ_SITE_ATTN_OUT = 1, MQ_SITE_FFN_IN = 2, MQ_SITE_FFN_OUT = 3, MQ_SITES_PER_LAYER = 4 };
enum { MQ_POOL_NONE = 0, MQ_POOL_CLS = 1, MQ_POOL_MEAN = 2 };

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
/* The site's expected shape: QKV hidden -> 3*hidden (rows Q, K, V), ATTN_OUT hidden -> hidden,
   FFN_IN hidden -> intermediate (GELU), FFN_OUT intermediate -> hidden. The epilogue is set by the site. */
mq_status mq_encoder_set_linear(mq_encoder *enc, int layer, int site, const mq_linear_spec *spec,
                                const mq_linear_weights *w);
mq_status mq_encoder_finalize(mq_encoder *enc);

mq_status mq_encoder_set_threads(mq_encoder *enc, int n_threads);
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
    mq_observer **observers; /* n_layers * MQ_SITES_PER_LAYER (entries may be NULL), or NULL */
    float **taps;            /* n_layers * MQ_SITES_PER_LAYER outputs [T, out_features] (entries may be NULL), or NULL */
} mq_forward_args;

mq_status mq_encoder_forward(mq_encoder *enc, const mq_forward_args *args);

#endif
