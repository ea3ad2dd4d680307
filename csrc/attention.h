/* attention.h - scaled dot-product self-attention over packed sequences.
 *
 * The fused QKV projection writes one row per real token: [T, 3H] = [Q | K | V], heads contiguous inside each.
 * Each sequence occupies rows [offset, offset + length); attention runs per sequence with oneDNN batched matmuls
 * over the heads: the sequence's Q and K^T are first copied into dense per-head blocks (so oneDNN runs brgemm with
 * the scale and mask fused), S = (Q K^T) * 1/sqrt(d) + mask, softmax in place, context = P V (V read as a strided
 * view of the packed rows), then the real rows are copied into the packed [T, H] context. Primitives are built per length bucket
 * (multiples of MQ_ATTN_BUCKET tokens) and reused; keys past a sequence's length are masked with -1e30, so the
 * packed buffers need MQ_ATTN_BUCKET slack rows after the last token, finite (zeroed by the caller: the masked
 * keys' values still meet a zero weight, and 0 * Inf would be NaN).
 */
#ifndef MQ_ATTENTION_H
#define MQ_ATTENTION_H

#include "engine.h"
#include "primcache.h"
#include "workspace.h"

#define MQ_ATTN_BUCKET 16

typedef struct mq_attention mq_attention;

mq_status mq_attention_create(mq_attention **out, mq_engine *eng, int n_heads, int64_t head_dim, int64_t max_len);
void mq_attention_destroy(mq_attention *a);
void mq_attention_reset(mq_attention *a);

/* Bytes of per-thread scratch a forward over `batch` sequences of at most `max_len` tokens allocates (an upper bound,
   without oneDNN's scratchpads), the bytes held now, and releasing them (the next forward allocates again). */
size_t mq_attention_scratch_need(const mq_attention *a, int64_t max_len, int64_t batch);
size_t mq_attention_scratch_bytes(mq_attention *a);
void mq_attention_release_scratch(mq_attention *a);

/* Writes the context to ctx [T, H] (f32), or, when ctx_q is non-NULL, quantized to u8 into ctx_q [T, H] with
 * q = clamp(rint(x / q_scale) + q_zp, 0, 255) (the static input quantization of the output projection, fused into
 * the copy-out of each sequence; ctx is then not written). */
mq_status mq_attention_forward(mq_attention *a, const float *qkv, float *ctx, uint8_t *ctx_q, float q_scale,
                               int32_t q_zp, const int64_t *offsets, const int32_t *lengths, int64_t batch);

#endif
