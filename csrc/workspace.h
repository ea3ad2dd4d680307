/* workspace.h - grow-only scratch buffers reused across forward calls (no allocation in the steady state). */
#ifndef MQ_WORKSPACE_H
#define MQ_WORKSPACE_H

#include "status.h"

typedef struct {
    void *ptr;
    size_t bytes;
} mq_buffer;

/* Ensures b holds at least count * elem_size bytes; keeps the old buffer on failure. A grown buffer is NOT zeroed
   (its contents are undefined): every user writes what it reads, so untouched pages cost no memory. */
mq_status mq_buffer_reserve(mq_buffer *b, size_t count, size_t elem_size);
void mq_buffer_release(mq_buffer *b);

/* Scratch shared by every linear layer of one encoder; used under the encoder's lock. */
typedef struct {
    mq_buffer act_q;      /* u8 quantized activations */
    mq_buffer act_lp;     /* the matmul's source when it is not x: bf16 activations, or f32 ones (smoothed, bf16-rounded
                             or centred u8 of an emulated layer) */
    mq_buffer act_in;     /* a layer's effective input shown to a site hook (mq_linear_effective_input) */
    mq_buffer row_scale;  /* per-row activation scales */
    mq_buffer wo_panels;  /* weight-only layers' per-thread buffers (mq_wo_scratch_floats, wo_matmul.h) */
    mq_buffer scratchpad; /* oneDNN user scratchpad */
    mq_buffer tail;       /* the padded last piece of a uniform row plan: src, dst, residual, row scales (linear.c) */
} mq_linear_scratch;

void mq_linear_scratch_release(mq_linear_scratch *s);
/* Bytes the scratch buffers hold. */
size_t mq_linear_scratch_bytes(const mq_linear_scratch *s);

/* The row plan of a linear layer (linear.h): a call of M rows runs as consecutive pieces of fixed-shape primitives
   that together cover exactly the M rows, no padding. The piece starting where `remaining` rows are left has
   MQ_ROW_CHUNK rows while at least that many remain, then 64 * floor(remaining / 64) rows if that is > 0, then the
   last remaining % 64 rows exactly. So M <= 64 is one piece of M rows, a call has at most M / MQ_ROW_CHUNK + 2
   pieces, and a layer builds at most 1 + 15 + 63 distinct shapes (MQ_ROW_CHUNK, the multiples of 64 below it, 1..63). */
#ifndef MQ_ROW_CHUNK
#define MQ_ROW_CHUNK 1024
#endif
int64_t mq_piece_rows(int64_t remaining);

/* The uniform row plan, for CPUs whose matmul kernels round a row differently depending on the row count of the
   call and on its position in it (engine.h): every piece is one primitive of MQ_ROW_UNIT rows, the last one padded
   with zero rows whose results are dropped. oneDNN's kernels compute a row of such a primitive the same at any
   position (measured: rows rolled within 64-, 128- and 256-row calls give the same bits), so a row's result does
   not depend on which other rows share its call. Padding costs at most MQ_ROW_UNIT - 1 rows per layer call. */
#define MQ_ROW_UNIT 64
/* Rows computed for the piece starting where `remaining` rows are left: always MQ_ROW_UNIT. */
int64_t mq_uniform_piece_rows(int64_t remaining);
/* Bytes of mq_linear_scratch.tail for a layer of K inputs and N outputs (f32 at most per element): the padded
   source, destination, residual (if the layer adds one) and row scales of one MQ_ROW_UNIT-row piece. */
size_t mq_uniform_tail_bytes(int64_t K, int64_t N, int residual);

#endif
