/* attention.h - scaled dot-product self-attention over packed sequences, in one fused kernel.
 *
 * The fused QKV projection writes one row per real token: [T, 3H] = [Q | K | V], heads contiguous inside each.
 * Each sequence occupies rows [offset, offset + length). The work is one task per sequence, spread over the engine's
 * threads, or one per (sequence, head) when the batch has fewer than two sequences per thread (so a single query
 * still uses every thread, up to its number of heads): a task takes its heads one at a time, copying the head's
 * queries, keys (transposed) and values into small dense blocks that stay in the core's cache (the next head's rows
 * prefetched meanwhile; int8 on vpdpbusd and bf16 on vdpbf16ps, whose blocks are small, copy a sequence's heads in
 * groups instead, reading its rows once, in order), then for each tile of query rows computes the scores
 * S = (Q K^T) * 1/sqrt(d) against exactly the sequence's keys, the softmax of each row and the context P V, all in
 * cache, and writes the tile's rows of the packed [T, H] context (f32, or quantized to u8 for the next layer). No
 * length is padded, no mask is needed and nothing of size L x L leaves the task.
 *
 * Results: every value is computed by one thread in a fixed order (one fused multiply-add chain per score over the
 * head dimension, a fixed-order sum in the softmax, one fma chain per context value over the keys of
 * exp(score - max) (as 2^(score' - max') of the scores in base 2, log2 e folded into their scale), times 1 / sum at
 * the end; for BF16 over the rounded probabilities), so the context is bit-identical for any thread count, any batch
 * composition and any kernel path (AVX-512, AVX2 or portable C).
 *
 * Precision: F32 computes in f32. BF16 rounds Q, K, V and the probabilities to bf16 (nearest even) and accumulates in
 * f32: the products a bf16 matmul with f32 accumulation computes, on f32 arithmetic. INT8 quantizes, per sequence
 * and head, Q and K to int8 with a scale per token and V with a scale per column (absmax / 127 of the values), takes
 * the probabilities exp(s - max) as u8 (x 1/255; as 2^(s' - max') of the scores in base 2, log2 e being folded
 * into the queries' scales) normalized by their integer sum, and computes Q K^T and P V exactly
 * in int32 (the softmax in f32); a NaN or infinite input makes the rows of its sequence and head (or, in V, its
 * column) NaN.
 */
#ifndef MQ_ATTENTION_H
#define MQ_ATTENTION_H

#include "engine.h"
#include "workspace.h"

typedef struct mq_attention mq_attention;
typedef enum { MQ_ATTN_F32 = 0, MQ_ATTN_BF16 = 1, MQ_ATTN_INT8 = 2, MQ_ATTN_PRECISION_COUNT } mq_attn_precision;

mq_status mq_attention_create(mq_attention **out, mq_engine *eng, int n_heads, int64_t head_dim, int64_t max_len);
void mq_attention_destroy(mq_attention *a);
/* The precision the next forwards compute in (F32 after create). */
mq_status mq_attention_set_precision(mq_attention *a, mq_attn_precision precision);
mq_attn_precision mq_attention_precision(const mq_attention *a);
/* The kernel that runs: "medquant:attention_avx512", "medquant:attention_avx2" or "medquant:attention_c", and for BF16
   on CPUs with avx512_bf16 "medquant:attention_avx512_bf16dot"; for INT8 "medquant:attention_int8_vnni" (avx512_vnni),
   "medquant:attention_int8_avx2" or "medquant:attention_int8_c". */
const char *mq_attention_impl(const mq_attention *a);

/* Bytes of per-thread scratch a forward over `batch` sequences of at most `max_len` tokens allocates (an upper bound),
   the bytes held now, and releasing them (the next forward allocates again). */
size_t mq_attention_scratch_need(const mq_attention *a, int64_t max_len, int64_t batch);
size_t mq_attention_scratch_bytes(mq_attention *a);
void mq_attention_release_scratch(mq_attention *a);

/* Writes the context to ctx [T, H] (f32), or, when ctx_q is non-NULL, quantized to u8 into ctx_q [T, H] with
 * q = clamp(rint(x / q_scale) + q_zp, 0, 255) (the static input quantization of the output projection, fused into
 * the write of each tile; ctx is then not written). */
mq_status mq_attention_forward(mq_attention *a, const float *qkv, float *ctx, uint8_t *ctx_q, float q_scale,
                               int32_t q_zp, const int64_t *offsets, const int32_t *lengths, int64_t batch);

#endif
