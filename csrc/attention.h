/* attention.h - scaled dot-product self-attention over packed sequences.
 *
 * The fused QKV projection writes one row per real token: [T, 3H] = [Q | K | V], heads contiguous inside each.
 * Each sequence occupies rows [offset, offset + length); attention runs per sequence with oneDNN batched matmuls
 * over the heads: the sequence's Q, K^T and V are first copied into dense per-head blocks (so oneDNN runs its brgemm
 * kernels, with the scale and mask fused into Q K^T), S = (Q K^T) * 1/sqrt(d) + mask, P = softmax(S), context = P V,
 * then the real rows are copied into the packed [T, H] context (or quantized for the next layer). Primitives are
 * built per length bucket (multiples of MQ_ATTN_BUCKET tokens) and reused; keys past a sequence's length are masked
 * with -1e30 and their staged values are zero, so nothing past a sequence's rows is read.
 *
 * Precision: F32 computes in f32. BF16 stores Q, K, V and P as bf16 (round to nearest even) and accumulates in
 * f32 (scores, softmax and context in f32), on oneDNN's bf16 kernels where this CPU has optimized ones, else on f32
 * kernels fed the same bf16-rounded values (mq_attention_emulated): the same products either way.
 */
#ifndef MQ_ATTENTION_H
#define MQ_ATTENTION_H

#include "engine.h"
#include "primcache.h"
#include "workspace.h"

#define MQ_ATTN_BUCKET 16

typedef struct mq_attention mq_attention;
typedef enum { MQ_ATTN_F32 = 0, MQ_ATTN_BF16 = 1, MQ_ATTN_PRECISION_COUNT } mq_attn_precision;

mq_status mq_attention_create(mq_attention **out, mq_engine *eng, int n_heads, int64_t head_dim, int64_t max_len);
void mq_attention_destroy(mq_attention *a);
void mq_attention_reset(mq_attention *a);
/* The precision the next forwards compute in (F32 after create); drops the cached primitives when it changes. */
mq_status mq_attention_set_precision(mq_attention *a, mq_attn_precision precision);
mq_attn_precision mq_attention_precision(const mq_attention *a);
/* 1 if BF16 precision runs emulated in f32 on this CPU (no optimized bf16 kernel), 0 if not or F32, -1 (error set)
   if the primitives could not be built. */
int mq_attention_emulated(mq_attention *a);

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
