/* linear.h - one linear layer y = epilogue(x W^T + b) in one precision, on oneDNN matmul.
 *
 * The only place that knows how a quantization scheme maps to oneDNN. Each precision kind is one row of the traits
 * table in linear.c (mq_linear_traits plus its input, weight and dequantize functions); adding a kind (e.g. W4A8,
 * fp8) is a row there, its kernel functions, and a scheme entry in Python. The kinds today:
 *   F32   f32 x f32, weights prepacked (format_tag_any + reorder at creation)
 *   BF16  bf16 x bf16 -> f32, activations converted per call, weights prepacked as bf16
 *   INT8  u8 x s8 -> f32 on the VNNI kernels; weights s8 (per tensor or per output channel) prepacked with the
 *         source zero-point compensation; activations u8 with a common zero point (128 when symmetric):
 *           DYNAMIC        scale (and zero point) from each call's min/max
 *           DYNAMIC_TOKEN  one symmetric scale per row (token), applied as a per-row multiply post-op
 *           STATIC         scale and zero point fixed by calibration
 *   W8    weight-only: s8 weights (per tensor or per output channel) with f32 activations, on medquant's own
 *         panel matmul (wo_matmul.h: weights dequantized in registers or one panel slice at a time, never a whole
 *         matrix; oneDNN 3.2 has no weight decompression); no oneDNN matmul, no row plan
 *   W4    weight-only: int4 weights with group-wise scales, on the same weight-only matmul
 * Emulation on CPUs without the kernels (decided at creation; the numbers stay those of the scheme):
 *   INT8  oneDNN's int8 kernels without VNNI/AMX add pairs of u8*s8 products in saturating 16-bit arithmetic
 *         (vpmaddubsw), which a check run once per engine detects; an int8 layer there runs an f32 matmul on the
 *         same integers, s8 weights and (q - zero point) activations, with the same scales: the same quantization,
 *         the same results up to f32 summation order.
 *   BF16  no bf16 matmul on this CPU (oneDNN 3.2 needs avx512_core): an f32 matmul on bf16-rounded operands.
 *   Emulated layers run at f32 speed and take no u8 output (mq_linear_set_output_u8).
 * Where oneDNN's rows vary (below avx512_core, mq_engine_rows_vary: its kernels round a row differently by the call's
 * row count), every layer computed in f32 - F32, and the emulated INT8 / BF16 - runs on the panel matmul of the
 * weight-only kinds instead (wo_matmul.h: emulated INT8 keeps its s8 weights there, the input's and the weights'
 * scales applied to each sum; BF16 its bf16-rounded weights as f32), whose rows never vary: no row plan, a one-row
 * call computes one row. Elsewhere emulated layers are oneDNN f32 matmuls holding f32 weights (scales as attributes).
 * Epilogues (bias, GELU-erf, residual add) are matmul post-ops (on the panel matmul: applied by its kernel); all
 * scratch comes from the caller's mq_linear_scratch.
 *
 * Row plan: a call computes exactly its M rows, never padding. oneDNN primitives have fixed shapes (runtime dims,
 * DNNL_RUNTIME_DIM_VAL, fall back from brgemm to a ~2x slower gemm:jit) and cost JIT time to create, so a call runs
 * as consecutive pieces (mq_piece_rows, workspace.h): MQ_ROW_CHUNK (1024) rows while that many remain, then the
 * largest multiple of 64 left, then the last M % 64 rows exactly. Each piece row count gets its primitive on first
 * use (at most 1 + 15 + 63 per layer, and oneDNN's own primitive cache shares the JIT code across layers of one
 * shape); the src / dst / residual / row-scale handles are moved to the piece's first row. Everything computed over
 * the whole call (dynamic scale and zero point, input quantization or bf16 conversion, weight-only dequantization)
 * is done once before the pieces, so a row's result depends on the other rows of the call only through the scheme
 * itself (the per-call dynamic scale). Where oneDNN's kernels round a row differently by row count or position
 * (below avx512_core, mq_engine_rows_vary) and a oneDNN matmul still runs (native INT8 on AVX-VNNI CPUs), the plan is
 * uniform instead: pieces of MQ_ROW_UNIT (64) rows, the last one zero-padded, so results do not depend on the batch
 * there either. The weights are prepacked once in the layout oneDNN picks for a MQ_ROW_CHUNK-row matmul, and every
 * piece's primitive is created for that layout (not format any).
 */
#ifndef MQ_LINEAR_H
#define MQ_LINEAR_H

#include "engine.h"
#include "primcache.h"
#include "workspace.h"

typedef enum { MQ_LINEAR_F32, MQ_LINEAR_BF16, MQ_LINEAR_INT8, MQ_LINEAR_W8, MQ_LINEAR_W4, MQ_LINEAR_KIND_COUNT } mq_linear_kind;
typedef enum { MQ_ACT_DYNAMIC, MQ_ACT_DYNAMIC_TOKEN, MQ_ACT_STATIC, MQ_ACT_MODE_COUNT } mq_act_mode;
typedef enum { MQ_EPI_NONE, MQ_EPI_GELU, MQ_EPI_RESIDUAL, MQ_EPI_COUNT } mq_epilogue;

/* What mq_linear_weights.weight holds for a kind. */
typedef enum {
    MQ_WEIGHTS_F32,       /* float [N, K] */
    MQ_WEIGHTS_S8,        /* int8 [N, K] */
    MQ_WEIGHTS_S4_PACKED, /* uint8 [N, K/2]: two int4 values per byte (qparams.h) */
    MQ_WEIGHT_FORMAT_COUNT
} mq_weight_format;
/* How many weight scales a kind takes. */
typedef enum {
    MQ_WSCALES_NONE,
    MQ_WSCALES_CHANNEL, /* N per output channel, or 1 per tensor (mq_linear_spec.w_per_channel) */
    MQ_WSCALES_GROUP,   /* N * K / group_size */
    MQ_WSCALES_COUNT
} mq_wscale_layout;
/* When a kind runs as an f32 matmul on the same rounded operands instead of its native kernel. */
typedef enum {
    MQ_EMULATE_NEVER,
    MQ_EMULATE_UNLESS_INT8_EXACT, /* when the engine's int8 kernel check fails (mq_engine_int8_exact) */
    MQ_EMULATE_WITHOUT_KERNEL,    /* when oneDNN has no optimized matmul for the kind on this CPU */
    MQ_EMULATION_COUNT
} mq_emulation;

/* The traits of a precision kind: everything the core, the binding and its callers need to know about it. One row
 * per kind in linear.c (with the kind's input, weight and dequantize functions); nothing else switches on kinds. */
typedef struct {
    const char *name;
    mq_weight_format weight_format;
    mq_wscale_layout w_scales;
    dnnl_data_type_t src_dt;    /* the native matmul's activation type */
    dnnl_data_type_t weight_dt; /* the native matmul's (prepacked) weight type */
    int quantized_input;        /* activations quantized to u8 by act_mode / act_scale / act_zero_point */
    int weight_only;            /* weights kept quantized, multiplied by wo_matmul.h (f32 activations) */
    mq_emulation emulation;
} mq_linear_traits;

/* The traits of `kind`, or NULL for a value outside [0, MQ_LINEAR_KIND_COUNT). */
const mq_linear_traits *mq_linear_kind_traits(int kind);
/* The weight array a kind takes for in_features K and out_features N: [N, *cols] of the kind's weight format, and
 * *n_scales weight scales. MQ_ERR_ARG (with a message) for an unknown kind or a bad group size. */
mq_status mq_linear_weight_layout(int kind, int64_t K, int64_t N, int w_per_channel, int64_t group_size,
                                  int64_t *cols, int64_t *n_scales);

typedef struct {
    mq_linear_kind kind;
    mq_act_mode act_mode;    /* INT8 */
    int act_symmetric;       /* INT8: 1 symmetric (zp 128), 0 asymmetric u8 */
    float act_scale;         /* INT8 STATIC */
    int32_t act_zero_point;  /* INT8 STATIC, in [0, 255] */
    int w_per_channel;       /* INT8, W8 */
    int64_t group_size;      /* W4 */
    mq_epilogue epilogue;
} mq_linear_spec;

typedef struct {
    const void *weight;      /* the kind's weight format (mq_weight_format) */
    const float *w_scales;   /* the kind's scale layout (mq_wscale_layout), or NULL for none */
    const float *bias;       /* N floats or NULL */
    const float *act_mul;    /* K floats or NULL: per-input-channel activation multiplier (SmoothQuant 1/s) */
} mq_linear_weights;

typedef struct mq_linear mq_linear;

mq_status mq_linear_create(mq_linear **out, mq_engine *eng, int64_t K, int64_t N, const mq_linear_spec *spec,
                           const mq_linear_weights *w);
void mq_linear_destroy(mq_linear *lin);

/* y[M, N] = epilogue(x[M, K] W^T + b). x, y and residual have ld K, N, N and M rows (nothing past them is read or
 * written). y is float, or uint8 after mq_linear_set_output_u8. */
mq_status mq_linear_forward(mq_linear *lin, mq_linear_scratch *scratch, const float *x, int64_t M,
                            const float *residual, void *y);
/* The input the layer's matmul computes with for x [M, K]: x itself, or x * act_mul (SmoothQuant) written to
 * scratch->act_in. For whoever observes a site's input (encoder.h, mq_site_hook); the forward does not need it. */
mq_status mq_linear_effective_input(const mq_linear *lin, mq_linear_scratch *scratch, const float *x, int64_t M,
                                    const float **xs);

/* Static quantized input: 1 (and *scale, *zero_point) if the layer is INT8 STATIC without act_mul, i.e. it quantizes
 * its input with one fixed (scale, zero point) that a producer could apply itself; else 0. */
int mq_linear_static_input(const mq_linear *lin, float *scale, int32_t *zero_point);
/* Makes the layer write u8 = saturate(rint(epilogue(x W^T + b) / scale) + zero_point) instead of f32: the input
 * quantization of the next layer fused into this matmul's epilogue (oneDNN dst scale and zero point). Only for an
 * epilogue without residual (the output is not re-used in f32), INT8 layers only (oneDNN 3.2 has no f32 matmul
 * with a u8 destination and zero point) and not DYNAMIC_TOKEN (its epilogue is a second primitive); MQ_ERR_ARG
 * otherwise, MQ_ERR_DNNL if oneDNN would want another weight layout for it. Drops cached
 * primitives. */
mq_status mq_linear_set_output_u8(mq_linear *lin, float scale, int32_t zero_point);
int mq_linear_output_u8(const mq_linear *lin);
/* Like mq_linear_forward for a layer with a static quantized input (mq_linear_static_input), fed the already
 * quantized u8 input xq [M, K] instead of x. */
mq_status mq_linear_forward_u8(mq_linear *lin, mq_linear_scratch *scratch, const uint8_t *xq, int64_t M,
                               const float *residual, void *y);

/* Drops the cached primitives (after a thread-count change); they are rebuilt on next use. */
void mq_linear_reset(mq_linear *lin);
int64_t mq_linear_in(const mq_linear *lin);
int64_t mq_linear_out(const mq_linear *lin);
/* Bytes held for the weights, scales, bias and smoothing vector (prepacked size for prepacked kinds). */
size_t mq_linear_nbytes(const mq_linear *lin);
/* oneDNN implementation of the most recently built matmul primitive ("" before the first), with " (emulated in f32)"
 * appended for an emulated layer. */
const char *mq_linear_impl(const mq_linear *lin);
/* 1 if this INT8 or BF16 layer runs as an f32 matmul because the CPU has no exact int8 / no bf16 kernel. */
int mq_linear_emulated(const mq_linear *lin);
/* What this CPU offers, measured on a temporary engine: *int8_exact as above, *bf16_native whether a bf16 layer runs
 * a native (optimized, non-reference) bf16 matmul. */
mq_status mq_linear_kernel_support(int *int8_exact, int *bf16_native);

#endif
