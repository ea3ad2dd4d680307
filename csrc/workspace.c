/* workspace.c - grow-only scratch buffers and the row plan of linear layers (workspace.h). */
#include "workspace.h"

mq_status mq_buffer_reserve(mq_buffer *b, size_t count, size_t elem_size) {
    size_t need;
    if (!mq_size_mul(count, elem_size, &need))
        return mq_set_error(MQ_ERR_NOMEM, "workspace: size overflow (%zu x %zu)", count, elem_size);
    if (need <= b->bytes && b->ptr) return MQ_OK;
    void *p = mq_alloc_uninit(need);
    if (!p) return mq_set_error(MQ_ERR_NOMEM, "workspace: cannot allocate %zu bytes", need);
    mq_free(b->ptr);
    b->ptr = p;
    b->bytes = need;
    return MQ_OK;
}

void mq_buffer_release(mq_buffer *b) {
    mq_free(b->ptr);
    b->ptr = NULL;
    b->bytes = 0;
}

void mq_linear_scratch_release(mq_linear_scratch *s) {
    mq_buffer_release(&s->act_q);
    mq_buffer_release(&s->act_lp);
    mq_buffer_release(&s->act_in);
    mq_buffer_release(&s->row_scale);
    mq_buffer_release(&s->wo_panels);
    mq_buffer_release(&s->scratchpad);
    mq_buffer_release(&s->tail);
}

size_t mq_linear_scratch_bytes(const mq_linear_scratch *s) {
    return s->act_q.bytes + s->act_lp.bytes + s->act_in.bytes + s->row_scale.bytes + s->wo_panels.bytes +
           s->scratchpad.bytes + s->tail.bytes;
}

_Static_assert(MQ_ROW_CHUNK >= 64 && MQ_ROW_CHUNK % 64 == 0, "MQ_ROW_CHUNK is a multiple of 64");

int64_t mq_piece_rows(int64_t remaining) {
    if (remaining >= MQ_ROW_CHUNK) return MQ_ROW_CHUNK;
    return remaining >= 64 ? remaining / 64 * 64 : remaining;
}

int64_t mq_uniform_piece_rows(int64_t remaining) {
    (void)remaining;
    return MQ_ROW_UNIT;
}

size_t mq_uniform_tail_bytes(int64_t K, int64_t N, int residual) {
    return (size_t)MQ_ROW_UNIT * ((size_t)K + (residual ? 2 : 1) * (size_t)N + 1) * sizeof(float);
}
