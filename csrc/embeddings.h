/* embeddings.h - BERT input embeddings: the word table (f32, or s8 with one scale per row), the position and
 * token-type tables, summed per token into the packed rows [T, hidden] the encoder runs on. The embedding LayerNorm
 * that follows belongs to the encoder (layernorm.h). Tables are copied in; ids are checked by the caller. */
#ifndef MQ_EMBEDDINGS_H
#define MQ_EMBEDDINGS_H

#include "status.h"

typedef struct mq_embeddings mq_embeddings;

mq_status mq_embeddings_create(mq_embeddings **out, int64_t vocab_size, int64_t hidden, int64_t max_position,
                               int64_t type_vocab);
void mq_embeddings_destroy(mq_embeddings *emb);

/* Word table f32 [vocab, hidden] (finite), replacing an s8 one. */
mq_status mq_embeddings_set_word(mq_embeddings *emb, const float *table);
/* Word table s8 [vocab, hidden] with row_scales [vocab] (word = q * scale), replacing an f32 one. */
mq_status mq_embeddings_set_word_s8(mq_embeddings *emb, const int8_t *table, const float *row_scales);
/* Position [max_position, hidden] and token-type [type_vocab, hidden] tables. */
mq_status mq_embeddings_set_position_type(mq_embeddings *emb, const float *position, const float *token_type);
/* MQ_ERR_STATE naming what is missing, else MQ_OK. */
mq_status mq_embeddings_check_complete(const mq_embeddings *emb);
size_t mq_embeddings_nbytes(const mq_embeddings *emb);

/* x[offsets[b] + j] = word[ids[b, j]] + position[j] + token_type[type_ids[b, j]] for j < lengths[b]; ids and
 * type_ids are [batch, seq] (type_ids NULL: all 0), already checked against the table sizes. */
void mq_embeddings_forward(const mq_embeddings *emb, const int32_t *ids, const int32_t *type_ids,
                           const int32_t *lengths, int64_t batch, int64_t seq, const int64_t *offsets, float *x);

#endif
