/* wo_matmul.h - medquant's own matmul on panels: y = epilogue(scaling(x * W^T) + bias), W kept as int8, int4 or f32.
 *
 * Two uses. Weight-only layers (W8, W4): oneDNN 3.2 has no weight decompression, and dequantizing a whole matrix per
 * call costs more than the f32 matmul it feeds (at batch 1, 30x). And layers computed in f32 where oneDNN's rows vary
 * (below avx512_core, engine.h): there oneDNN would round a row differently by the call's row count, so it ran
 * uniform 64-row pieces (a query's one row cost 64), while this kernel gives a row the same bits for any M
 * (linear.h: F32 layers, and the f32 emulation of INT8 / BF16 layers).
 * The weights are stored once in panels of MQ_WO_PANEL output columns (k-major inside a panel), and a call
 * dequantizes one panel at a time:
 *   - up to three row blocks (M <= 36 rows on AVX-512): in registers, inside the multiply loop, so the int8 / int4
 *     weights are the only weight bytes read;
 *   - more rows: tasks of (row chunk, group of panels), k in blocks of 256 outermost (K > 512); per block and panel
 *     the panel's 256 x MQ_WO_PANEL slice is converted into a per-thread f32 buffer and runs every row block of the
 *     chunk (at most one slice per thread exists at a time). F32 panels are read as they are.
 * Both paths multiply the same values in the same order: every output is one fused multiply-add chain over
 * k = 0..K-1 from 0, of x by (float)q (S8; the column scale multiplies the sum), by (float)(q - 8) * group scale
 * (S4) or by w (F32), then the output's scaling (mq_wo_output), + bias, then GELU-erf or + residual. So a row's
 * result does not depend on M, on the other rows, on the thread count or on the ISA path (AVX-512, AVX2, or portable
 * C with fmaf): the same bits.
 *
 * The exact path (S8, and S4 with group_size a multiple of 4 up to 4096, where the CPU has avx512_vnni and the cap
 * allows it; K <= 65536): each row of x is first rounded to 24-bit integers q = round(x * (2^23 - 1) / max|x_row|)
 * (the row's largest value exact, the others to 2^-24 of it, where f32 itself keeps 2^-24 of each value), and
 * sum_k q w is computed exactly in int32 (vpdpbusd on the three bytes of q + 2^23: u8 x s8, 64 multiply-adds per
 * instruction, the int8 weights used as stored and int4 nibbles only unpacked to bytes: 3 instructions where f32
 * takes 4); then in f32, that sum times the column scale (S8; S4: each group's sum times the group's scale, added
 * group after group), times the row's max|x| / (2^23 - 1), and the output's scaling as above. A row's result again
 * depends on nothing but the row: the same bits for any M and thread count, and on every CPU that takes this path
 * (they all have the same instructions); not the same bits as the f32 chain of the other paths (an AVX2-only CPU, or
 * a cap below AVX512_CORE_VNNI), which differ from it by rounding.
 *
 * The ISA path is chosen at creation from oneDNN's effective ISA (dnnl_get_effective_cpu_isa), so ONEDNN_MAX_CPU_ISA
 * caps it the same way it caps oneDNN's kernels.
 */
#ifndef MQ_WO_MATMUL_H
#define MQ_WO_MATMUL_H

#include <stddef.h>
#include <stdint.h>

#include "linear.h"
#include "status.h"

#define MQ_WO_PANEL 32 /* output columns per stored panel */

typedef enum { MQ_WO_S8, MQ_WO_S4, MQ_WO_F32 } mq_wo_format;

typedef struct {
    mq_wo_format format;
    int64_t K, N;
    int per_channel;    /* S8: one scale per output column (else one for the tensor) */
    int64_t group_size; /* S4: one scale per group_size inputs of a column; even, divides K */
} mq_wo_layout;

typedef struct mq_wo_matrix mq_wo_matrix;

/* Repacks the user's weights into panels. S8: weight int8 [N, K], scales [N] or [1]. S4: weight uint8 [N, K / 2], two
   values per byte (value = nibble - 8, even k in the low nibble), scales [N, K / group_size]. F32: weight float
   [N, K], scales NULL. Copies everything. */
mq_status mq_wo_matrix_create(mq_wo_matrix **out, const mq_wo_layout *layout, const void *weight, const float *scales);
void mq_wo_matrix_destroy(mq_wo_matrix *w);

/* f32 values of scratch a call on a matrix of K inputs and N outputs needs with n_threads threads, whatever M: per
   thread the larger of a converted panel slice + a row chunk's partial sums over the N outputs + a row chunk's
   inputs copied for one k block (at most (512 + 240 min(ceil(N / 32), 64)) 32 + 240 x 272 floats, 2.3 MB) and the
   exact path's packed row chunk (512 KB, or 48 bytes per 4 k where K > 43690). */
size_t mq_wo_scratch_floats(int64_t K, int64_t N, int n_threads);

/* What a call does to each output's sum s (S8: s already times its column scale), in this order:
   s * alpha (skipped when alpha is 1), * row_scale[m] (if given), + bias[n] (if given), then + residual[m, n]
   (MQ_EPI_RESIDUAL) or GELU-erf (MQ_EPI_GELU). */
typedef struct {
    float alpha;
    const float *row_scale; /* [M] or NULL */
    const float *bias;      /* [N] or NULL */
    mq_epilogue epilogue;
    const float *residual; /* [M, N]: MQ_EPI_RESIDUAL */
} mq_wo_output;

/* y [M, N] = out(x [M, K] * dequant(W)^T). Runs on n_threads OpenMP threads with scratch of
   mq_wo_scratch_floats(K, N, n_threads) floats. */
mq_status mq_wo_matmul(const mq_wo_matrix *w, const float *x, int64_t M, const mq_wo_output *out, float *y,
                       float *scratch, int n_threads);

/* Bytes of weights and scales held. */
size_t mq_wo_matrix_nbytes(const mq_wo_matrix *w);
/* The kernel path, e.g. "medquant:wo_s8_vnni" (the exact path), "medquant:wo_s4_avx512" or "medquant:panel_f32_avx2". */
const char *mq_wo_matrix_impl(const mq_wo_matrix *w);

/* GELU-erf in place on n values: 0.5 v (1 + erf(v / sqrt 2)), erf by Abramowitz & Stegun 7.1.26 (absolute error
   below 1.5e-7) with its own exp; the same bits on every ISA. */
void mq_gelu_erf_inplace(float *v, int64_t n);

#endif
