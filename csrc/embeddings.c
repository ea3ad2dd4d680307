/* embeddings.c - the input embedding tables and their per-token sum (embeddings.h). */
#include "embeddings.h"

#include <stdlib.h>
#include <string.h>

#include "qparams.h"

struct mq_embeddings {
    int64_t vocab, hidden, max_position, type_vocab;
    float *word_f32;
    int8_t *word_s8;
    float *word_scales;
    float *pos, *type;
};

mq_status mq_embeddings_create(mq_embeddings **out, int64_t vocab_size, int64_t hidden, int64_t max_position,
                               int64_t type_vocab) {
    if (!out) return mq_set_error(MQ_ERR_ARG, "embeddings: out is NULL");
    *out = NULL;
    if (vocab_size <= 0 || hidden <= 0 || max_position <= 0 || type_vocab <= 0)
        return mq_set_error(MQ_ERR_ARG, "embeddings: bad table sizes");
    mq_embeddings *e = calloc(1, sizeof *e);
    if (!e) return mq_set_error(MQ_ERR_NOMEM, "embeddings: out of memory");
    e->vocab = vocab_size;
    e->hidden = hidden;
    e->max_position = max_position;
    e->type_vocab = type_vocab;
    *out = e;
    return MQ_OK;
}

void mq_embeddings_destroy(mq_embeddings *e) {
    if (!e) return;
    mq_free(e->word_f32);
    mq_free(e->word_s8);
    mq_free(e->word_scales);
    mq_free(e->pos);
    mq_free(e->type);
    free(e);
}

mq_status mq_embeddings_set_word(mq_embeddings *e, const float *table) {
    MQ_TRY(mq_take_floats(&e->word_f32, table, (size_t)e->vocab * (size_t)e->hidden, "word embeddings"));
    mq_free(e->word_s8);
    mq_free(e->word_scales);
    e->word_s8 = NULL;
    e->word_scales = NULL;
    return MQ_OK;
}

mq_status mq_embeddings_set_word_s8(mq_embeddings *e, const int8_t *table, const float *row_scales) {
    if (!table) return mq_set_error(MQ_ERR_ARG, "word embeddings (int8) are missing");
    const size_t n = (size_t)e->vocab * (size_t)e->hidden;
    MQ_TRY(mq_take_floats(&e->word_scales, row_scales, (size_t)e->vocab, "word embedding row scales"));
    int8_t *p = mq_alloc(n, 1);
    if (!p) return mq_set_error(MQ_ERR_NOMEM, "out of memory for word embeddings");
    memcpy(p, table, n);
    mq_free(e->word_s8);
    e->word_s8 = p;
    mq_free(e->word_f32);
    e->word_f32 = NULL;
    return MQ_OK;
}

mq_status mq_embeddings_set_position_type(mq_embeddings *e, const float *position, const float *token_type) {
    MQ_TRY(mq_take_floats(&e->pos, position, (size_t)e->max_position * (size_t)e->hidden, "position embeddings"));
    MQ_TRY(mq_take_floats(&e->type, token_type, (size_t)e->type_vocab * (size_t)e->hidden, "token type embeddings"));
    return MQ_OK;
}

mq_status mq_embeddings_check_complete(const mq_embeddings *e) {
    if (!e->word_f32 && !e->word_s8) return mq_set_error(MQ_ERR_STATE, "encoder: word embeddings not set");
    if (!e->pos || !e->type) return mq_set_error(MQ_ERR_STATE, "encoder: position/token type embeddings not set");
    return MQ_OK;
}

size_t mq_embeddings_nbytes(const mq_embeddings *e) {
    const size_t H = (size_t)e->hidden, V = (size_t)e->vocab;
    size_t b = e->word_s8 ? V * H + V * sizeof(float) : V * H * sizeof(float);
    return b + ((size_t)e->max_position + (size_t)e->type_vocab) * H * sizeof(float);
}

void mq_embeddings_forward(const mq_embeddings *e, const int32_t *ids, const int32_t *type_ids,
                           const int32_t *lengths, int64_t batch, int64_t seq, const int64_t *offsets, float *x) {
    const int64_t H = e->hidden;
    for (int64_t b = 0; b < batch; b++) {
        for (int64_t j = 0; j < lengths[b]; j++) {
            const int32_t id = ids[b * seq + j];
            const int32_t tt = type_ids ? type_ids[b * seq + j] : 0;
            float *xr = x + (offsets[b] + j) * H;
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
