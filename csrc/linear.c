/* linear.c - one linear layer in one precision kind on a oneDNN matmul (linear.h).
 *
 * Owns the precision-kind traits table (KINDS, one row per kind: its traits and its input, weight and dequantize
 * functions) and the matmul built from it: weights prepacked (or stored, weight-only) at creation, fixed-shape
 * primitives per piece of the row plan (mq_piece_rows) in a primitive cache, the epilogue as post-ops, and the
 * emulation of int8 / bf16 where the CPU has no exact kernel. Nothing outside this file switches on a kind: the
 * binding reads mq_linear_kind_traits and mq_linear_weight_layout.
 */
#include "linear.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "qparams.h"
#include "wo_matmul.h"

#define MQ_MAX_ARGS 16

/* One matmul primitive built for a piece of `rows` rows, with the memory objects whose handles are set per piece. */
typedef struct {
    dnnl_primitive_t prim, epi; /* epi: the per-token epilogue (binary primitive), else NULL */
    size_t scratch_bytes;
    dnnl_memory_t src, dst, scratch, residual, row_scale;
} mq_lin_prim;

typedef struct mq_kind_row mq_kind_row;

struct mq_linear {
    mq_engine *eng; /* borrowed */
    const mq_kind_row *kind;
    int64_t K, N;
    mq_linear_spec spec;
    dnnl_memory_desc_t w_md; /* prepacked weights as the primitives take them */
    dnnl_memory_t w_mem;     /* prepacked weights (owns its buffer) */
    mq_wo_matrix *wo;        /* the weights in medquant's panels (wo_matmul.h), no oneDNN matmul: weight-only kinds,
                                and layers computed in f32 where oneDNN's rows vary (uses_panels) */
    float *w_scales;
    int64_t n_wscales;
    float *bias;
    float *act_mul;
    dnnl_memory_t bias_mem, bias_po_mem, w_scale_mem, src_scale_mem, zp_mem, dst_scale_mem, dst_zp_mem;
    float src_scale;
    int32_t src_zp;
    int out_u8;        /* mq_linear_set_output_u8: dst is u8 with (dst_scale, dst_zp) */
    float dst_scale;
    int32_t dst_zp;
    mq_prim_cache prims; /* mq_lin_prim per piece row count */
    int emulated; /* INT8/BF16 run as an f32 matmul on the same rounded operands (mq_linear_emulated) */
    int uniform;  /* the uniform row plan (workspace.h), where row results depend on the row count (engine.h) */
    char impl[160];
};

/* ------------------------------------------------------------------ the precision kinds */

/* The matmul source for x [M, K]: x itself or a converted copy in scratch (all M rows, once per call). */
typedef mq_status (*mq_input_fn)(mq_linear *l, mq_linear_scratch *s, const float *x, int64_t M, const void **src);
/* Takes the user's weights: prepacks them for the matmul, or stores them quantized (weight-only). */
typedef mq_status (*mq_weights_fn)(mq_linear *l, const void *weight);
/* Emulation: the values the native kernel would multiply, as f32 [N, K]. */
typedef void (*mq_widen_fn)(const mq_linear *l, const void *weight, float *w);

struct mq_kind_row {
    mq_linear_traits traits;
    mq_input_fn input;
    mq_weights_fn weights;
    mq_widen_fn widen; /* kinds that may be emulated */
};

static mq_status input_f32(mq_linear *l, mq_linear_scratch *s, const float *x, int64_t M, const void **src);
static mq_status input_bf16(mq_linear *l, mq_linear_scratch *s, const float *x, int64_t M, const void **src);
static mq_status input_u8(mq_linear *l, mq_linear_scratch *s, const float *x, int64_t M, const void **src);
static mq_status weights_prepacked(mq_linear *l, const void *weight);
static mq_status weights_stored(mq_linear *l, const void *weight);
static void widen_bf16(const mq_linear *l, const void *weight, float *w);
static void widen_s8(const mq_linear *l, const void *weight, float *w);

static const mq_kind_row KINDS[] = {
    [MQ_LINEAR_F32] = {{"f32", MQ_WEIGHTS_F32, MQ_WSCALES_NONE, dnnl_f32, dnnl_f32, 0, 0, MQ_EMULATE_NEVER},
                       input_f32, weights_prepacked, NULL},
    [MQ_LINEAR_BF16] = {{"bf16", MQ_WEIGHTS_F32, MQ_WSCALES_NONE, dnnl_bf16, dnnl_bf16, 0, 0, MQ_EMULATE_WITHOUT_KERNEL},
                        input_bf16, weights_prepacked, widen_bf16},
    [MQ_LINEAR_INT8] = {{"int8", MQ_WEIGHTS_S8, MQ_WSCALES_CHANNEL, dnnl_u8, dnnl_s8, 1, 0, MQ_EMULATE_UNLESS_INT8_EXACT},
                        input_u8, weights_prepacked, widen_s8},
    [MQ_LINEAR_W8] = {{"w8", MQ_WEIGHTS_S8, MQ_WSCALES_CHANNEL, dnnl_f32, dnnl_f32, 0, 1, MQ_EMULATE_NEVER},
                      input_f32, weights_stored, NULL},
    [MQ_LINEAR_W4] = {{"w4", MQ_WEIGHTS_S4_PACKED, MQ_WSCALES_GROUP, dnnl_f32, dnnl_f32, 0, 1, MQ_EMULATE_NEVER},
                      input_f32, weights_stored, NULL},
};
_Static_assert(sizeof KINDS / sizeof KINDS[0] == MQ_LINEAR_KIND_COUNT, "one KINDS row per mq_linear_kind");

const mq_linear_traits *mq_linear_kind_traits(int kind) {
    return kind >= 0 && kind < MQ_LINEAR_KIND_COUNT ? &KINDS[kind].traits : NULL;
}

mq_status mq_linear_weight_layout(int kind, int64_t K, int64_t N, int w_per_channel, int64_t group_size,
                                  int64_t *cols, int64_t *n_scales) {
    const mq_linear_traits *t = mq_linear_kind_traits(kind);
    if (!t) return mq_set_error(MQ_ERR_ARG, "linear: unknown kind %d", kind);
    *cols = t->weight_format == MQ_WEIGHTS_S4_PACKED ? K / 2 : K;
    switch (t->w_scales) {
        case MQ_WSCALES_CHANNEL: *n_scales = w_per_channel ? N : 1; break;
        case MQ_WSCALES_GROUP:
            if (group_size <= 0 || group_size % 2 || K % group_size)
                return mq_set_error(MQ_ERR_ARG, "linear: int4 group size %lld must be even and divide in_features %lld",
                                    (long long)group_size, (long long)K);
            *n_scales = N * (K / group_size);
            break;
        default: *n_scales = 0; break;
    }
    return MQ_OK;
}

static const mq_linear_traits *traits(const mq_linear *l) { return &l->kind->traits; }

static int per_token(const mq_linear *l) {
    return traits(l)->quantized_input && l->spec.act_mode == MQ_ACT_DYNAMIC_TOKEN;
}

/* ------------------------------------------------------------------ oneDNN descriptors and memories */

static mq_status make_md(dnnl_memory_desc_t *md, int64_t d0, int64_t d1, dnnl_data_type_t dt, dnnl_format_tag_t tag) {
    dnnl_dims_t dims = {d0, d1};
    MQ_DNNL(dnnl_memory_desc_create_with_tag(md, 2, dims, dt, tag));
    return MQ_OK;
}

static mq_status make_mem(dnnl_memory_t *mem, const mq_linear *l, int64_t d0, int64_t d1, dnnl_data_type_t dt,
                          void *handle) {
    dnnl_memory_desc_t md;
    MQ_TRY(make_md(&md, d0, d1, dt, dnnl_ab));
    mq_status st = MQ_DNNL_STATUS(dnnl_memory_create(mem, md, mq_engine_dnnl(l->eng), handle));
    dnnl_memory_desc_destroy(md);
    return st;
}

/* A 1-D memory of n values over `handle` (scales and zero points passed at execution). */
static mq_status vector_mem(dnnl_memory_t *mem, const mq_linear *l, int64_t n, dnnl_data_type_t dt, void *handle) {
    dnnl_memory_desc_t md = NULL;
    dnnl_dims_t dims = {n};
    MQ_DNNL(dnnl_memory_desc_create_with_tag(&md, 1, dims, dt, dnnl_a));
    mq_status st = MQ_DNNL_STATUS(dnnl_memory_create(mem, md, mq_engine_dnnl(l->eng), handle));
    dnnl_memory_desc_destroy(md);
    return st;
}

/* Appends a binary add of an f32 [d0, N] operand to po. */
static mq_status append_add(const mq_linear *l, int64_t d0, dnnl_post_ops_t po) {
    dnnl_memory_desc_t md = NULL;
    MQ_TRY(make_md(&md, d0, l->N, dnnl_f32, dnnl_ab));
    mq_status st = MQ_DNNL_STATUS(dnnl_post_ops_append_binary(po, dnnl_binary_add, md));
    dnnl_memory_desc_destroy(md);
    return st;
}

/* Appends [bias add] + GELU or residual add to po. */
static mq_status append_epilogue(const mq_linear *l, int64_t rows, dnnl_post_ops_t po, int with_bias) {
    if (with_bias) MQ_TRY(append_add(l, 1, po));
    if (l->spec.epilogue == MQ_EPI_GELU) MQ_DNNL(dnnl_post_ops_append_eltwise(po, dnnl_eltwise_gelu_erf, 0.f, 0.f));
    if (l->spec.epilogue == MQ_EPI_RESIDUAL) MQ_TRY(append_add(l, rows, po));
    return MQ_OK;
}

static dnnl_data_type_t src_dtype(const mq_linear *l) { return l->emulated ? dnnl_f32 : traits(l)->src_dt; }

/* The quantization attributes: source / weight scales and source zero point of a quantized-input kind (an emulated
   layer subtracts the zero point itself), destination scale and zero point of a u8 output. */
static mq_status set_quant_attrs(const mq_linear *l, dnnl_primitive_attr_t attr) {
    if (traits(l)->quantized_input) {
        if (!per_token(l)) MQ_DNNL(dnnl_primitive_attr_set_scales_mask(attr, DNNL_ARG_SRC, 0));
        MQ_DNNL(dnnl_primitive_attr_set_scales_mask(attr, DNNL_ARG_WEIGHTS, l->spec.w_per_channel ? (1 << 1) : 0));
        if (!l->emulated) MQ_DNNL(dnnl_primitive_attr_set_zero_points_mask(attr, DNNL_ARG_SRC, 0));
    }
    if (l->out_u8) { /* after the post-ops: dst = saturate(rint(result / dst_scale) + dst_zp) */
        MQ_DNNL(dnnl_primitive_attr_set_scales_mask(attr, DNNL_ARG_DST, 0));
        MQ_DNNL(dnnl_primitive_attr_set_zero_points_mask(attr, DNNL_ARG_DST, 0));
    }
    return MQ_OK;
}

/* Builds the matmul descriptor for `rows` rows; weights md is `wmd` (format any on the first call). */
static mq_status build_pd(const mq_linear *l, int64_t rows, const_dnnl_memory_desc_t wmd, dnnl_primitive_desc_t *pd) {
    mq_status st = MQ_OK;
    dnnl_memory_desc_t src_md = NULL, dst_md = NULL, bias_md = NULL;
    dnnl_primitive_attr_t attr = NULL;
    dnnl_post_ops_t po = NULL;
    MQ_TRY_GOTO(st, make_md(&src_md, rows, l->K, src_dtype(l), dnnl_ab), done);
    MQ_TRY_GOTO(st, make_md(&dst_md, rows, l->N, l->out_u8 ? dnnl_u8 : dnnl_f32, dnnl_ab), done);
    if (l->bias && !per_token(l)) MQ_TRY_GOTO(st, make_md(&bias_md, 1, l->N, dnnl_f32, dnnl_ab), done);
    MQ_TRY_GOTO(st, mq_attr_create(&attr), done);
    MQ_TRY_GOTO(st, MQ_DNNL_STATUS(dnnl_post_ops_create(&po)), done);
    MQ_TRY_GOTO(st, set_quant_attrs(l, attr), done);
    if (!per_token(l)) MQ_TRY_GOTO(st, append_epilogue(l, rows, po, 0), done);
    MQ_TRY_GOTO(st, MQ_DNNL_STATUS(dnnl_primitive_attr_set_post_ops(attr, po)), done);
    MQ_TRY_GOTO(st, MQ_DNNL_STATUS(dnnl_matmul_primitive_desc_create(pd, mq_engine_dnnl(l->eng), src_md, wmd, bias_md,
                                                                     dst_md, attr)), done);
done:
    if (po) dnnl_post_ops_destroy(po);
    if (attr) dnnl_primitive_attr_destroy(attr);
    dnnl_memory_desc_destroy(src_md);
    dnnl_memory_desc_destroy(dst_md);
    dnnl_memory_desc_destroy(bias_md);
    return st;
}

/* Per-token path: y = epilogue(y * row_scale[m] (+ bias)) as one binary primitive, in place on the matmul output
   (the per-row multiply is not a post-op the optimized matmul kernels of oneDNN 3.2 take). */
static mq_status build_epilogue_pd(const mq_linear *l, int64_t rows, dnnl_primitive_desc_t *pd) {
    mq_status st = MQ_OK;
    dnnl_memory_desc_t y_md = NULL, rs_md = NULL;
    dnnl_primitive_attr_t attr = NULL;
    dnnl_post_ops_t po = NULL;
    MQ_TRY_GOTO(st, make_md(&y_md, rows, l->N, dnnl_f32, dnnl_ab), done);
    MQ_TRY_GOTO(st, make_md(&rs_md, rows, 1, dnnl_f32, dnnl_ab), done);
    MQ_TRY_GOTO(st, mq_attr_create(&attr), done);
    MQ_TRY_GOTO(st, MQ_DNNL_STATUS(dnnl_post_ops_create(&po)), done);
    MQ_TRY_GOTO(st, append_epilogue(l, rows, po, l->bias != NULL), done);
    MQ_TRY_GOTO(st, MQ_DNNL_STATUS(dnnl_primitive_attr_set_post_ops(attr, po)), done);
    MQ_TRY_GOTO(st, MQ_DNNL_STATUS(dnnl_binary_primitive_desc_create(pd, mq_engine_dnnl(l->eng), dnnl_binary_mul, y_md,
                                                                     rs_md, y_md, attr)), done);
done:
    if (po) dnnl_post_ops_destroy(po);
    if (attr) dnnl_primitive_attr_destroy(attr);
    dnnl_memory_desc_destroy(y_md);
    dnnl_memory_desc_destroy(rs_md);
    return st;
}

/* Runs the reorder of user weights (plain [N, K] row-major, i.e. {K, N} "ba") into l->w_mem. */
static mq_status run_reorder(mq_linear *l, dnnl_memory_t umem, const_dnnl_memory_desc_t umd) {
    mq_status st = MQ_OK;
    dnnl_engine_t eng = mq_engine_dnnl(l->eng);
    dnnl_primitive_desc_t rpd = NULL;
    dnnl_primitive_t rprim = NULL;
    dnnl_primitive_attr_t rattr = NULL;
    dnnl_memory_t smem = NULL;
    void *scratch = NULL;
    size_t sbytes = 0;
    MQ_TRY_GOTO(st, mq_attr_create(&rattr), done);
    MQ_TRY_GOTO(st, MQ_DNNL_STATUS(dnnl_reorder_primitive_desc_create(&rpd, umd, eng, l->w_md, eng, rattr)), done);
    st = mq_primitive_from_pd(rpd, &rprim, &sbytes);
    rpd = NULL;
    if (st != MQ_OK) goto done;
    scratch = mq_alloc(sbytes ? sbytes : 1, 1);
    if (!scratch) { st = mq_set_error(MQ_ERR_NOMEM, "linear: out of memory for the prepack scratchpad"); goto done; }
    MQ_TRY_GOTO(st, make_mem(&smem, l, 1, (int64_t)(sbytes ? sbytes : 1), dnnl_u8, scratch), done);
    dnnl_exec_arg_t args[3] = {{DNNL_ARG_FROM, umem}, {DNNL_ARG_TO, l->w_mem}, {DNNL_ARG_SCRATCHPAD, smem}};
    MQ_TRY_GOTO(st, MQ_DNNL_STATUS(dnnl_primitive_execute(rprim, mq_engine_stream(l->eng), 3, args)), done);
    MQ_TRY_GOTO(st, MQ_DNNL_STATUS(dnnl_stream_wait(mq_engine_stream(l->eng))), done);
done:
    if (smem) dnnl_memory_destroy(smem);
    mq_free(scratch);
    if (rprim) dnnl_primitive_destroy(rprim);
    if (rpd) dnnl_primitive_desc_destroy(rpd);
    if (rattr) dnnl_primitive_attr_destroy(rattr);
    return st;
}

/* Reorders user weights of type user_dt into the primitive's preferred layout l->w_md (allocated in l->w_mem). */
static mq_status prepack(mq_linear *l, const void *user, dnnl_data_type_t user_dt) {
    dnnl_memory_desc_t umd = NULL;
    dnnl_memory_t umem = NULL;
    mq_status st = MQ_OK;
    MQ_TRY(make_md(&umd, l->K, l->N, user_dt, dnnl_ba));
    MQ_TRY_GOTO(st, MQ_DNNL_STATUS(dnnl_memory_create(&umem, umd, mq_engine_dnnl(l->eng), (void *)user)), done);
    MQ_TRY_GOTO(st, MQ_DNNL_STATUS(dnnl_memory_create(&l->w_mem, l->w_md, mq_engine_dnnl(l->eng), DNNL_MEMORY_ALLOCATE)),
                done);
    st = run_reorder(l, umem, umd);
done:
    if (umem) dnnl_memory_destroy(umem);
    dnnl_memory_desc_destroy(umd);
    return st;
}

/* ------------------------------------------------------------------ the kinds' functions */

static mq_status input_f32(mq_linear *l, mq_linear_scratch *s, const float *x, int64_t M, const void **src) {
    *src = x;
    if (!l->act_mul) return MQ_OK;
    MQ_TRY(mq_buffer_reserve(&s->act_lp, (size_t)M * (size_t)l->K, sizeof(float)));
    mq_scale_columns(x, M, l->K, l->K, l->act_mul, s->act_lp.ptr);
    *src = s->act_lp.ptr;
    return MQ_OK;
}

static mq_status input_bf16(mq_linear *l, mq_linear_scratch *s, const float *x, int64_t M, const void **src) {
    const size_t n = (size_t)M * (size_t)l->K;
    if (l->emulated) {
        MQ_TRY(mq_buffer_reserve(&s->act_lp, n, sizeof(float)));
        mq_round_f32_bf16(x, M, l->K, l->K, l->act_mul, s->act_lp.ptr);
    } else {
        MQ_TRY(mq_buffer_reserve(&s->act_lp, n, sizeof(uint16_t)));
        mq_convert_f32_bf16(x, M, l->K, l->K, l->act_mul, s->act_lp.ptr);
    }
    *src = s->act_lp.ptr;
    return MQ_OK;
}

/* Emulated INT8: the quantized input as the exact integers q - zero point in f32 (scales stay matmul attributes). */
static mq_status centered_f32(const mq_linear *l, mq_linear_scratch *s, const uint8_t *q, int64_t M, const void **src) {
    MQ_TRY(mq_buffer_reserve(&s->act_lp, (size_t)M * (size_t)l->K, sizeof(float)));
    mq_dequantize_u8(q, M, l->K, 1.f, per_token(l) ? 128 : l->src_zp, s->act_lp.ptr);
    *src = s->act_lp.ptr;
    return MQ_OK;
}

static mq_status input_u8(mq_linear *l, mq_linear_scratch *s, const float *x, int64_t M, const void **src) {
    const int64_t K = l->K;
    MQ_TRY(mq_buffer_reserve(&s->act_q, (size_t)M * (size_t)K, 1));
    uint8_t *q = s->act_q.ptr;
    if (l->spec.act_mode == MQ_ACT_DYNAMIC_TOKEN) {
        MQ_TRY(mq_buffer_reserve(&s->row_scale, (size_t)M, sizeof(float)));
        mq_quantize_u8_per_row(x, M, K, K, l->act_mul, q, s->row_scale.ptr);
    } else {
        if (l->spec.act_mode == MQ_ACT_DYNAMIC) {
            float mn, mx;
            mq_minmax_rows(x, M, K, K, l->act_mul, &mn, &mx);
            if (!(mn >= -3.4e38f && mx <= 3.4e38f))
                return mq_set_error(MQ_ERR_NUMERIC, "linear: non-finite activations reached an int8 layer");
            mq_qparams qp = l->spec.act_symmetric ? mq_qparams_sym_u8(mn, mx) : mq_qparams_asym_u8(mn, mx);
            l->src_scale = qp.scale;
            l->src_zp = qp.zero_point;
        }
        mq_quantize_u8(x, M, K, K, l->act_mul, 1.f / l->src_scale, l->src_zp, q);
    }
    *src = q;
    return l->emulated ? centered_f32(l, s, q, M, src) : MQ_OK;
}

static void widen_bf16(const mq_linear *l, const void *weight, float *w) {
    mq_round_f32_bf16(weight, l->N, l->K, l->K, NULL, w);
}

static void widen_s8(const mq_linear *l, const void *weight, float *w) {
    const int8_t *q = weight;
    const size_t n = (size_t)l->N * (size_t)l->K;
    for (size_t i = 0; i < n; i++) w[i] = (float)q[i];
}

/* The weight layout oneDNN prefers for this layer (its format-any choice for a full MQ_ROW_CHUNK-row piece) into
   l->w_md; every piece's primitive is then built for exactly that layout (build_prim). A kind that may be emulated
   where it has no kernel refuses oneDNN's reference matmul (so the caller falls back). */
static mq_status choose_weight_layout(mq_linear *l) {
    dnnl_memory_desc_t any = NULL;
    dnnl_primitive_desc_t pd = NULL;
    MQ_TRY(make_md(&any, l->K, l->N, l->emulated ? dnnl_f32 : traits(l)->weight_dt, dnnl_format_tag_any));
    mq_status st = build_pd(l, MQ_ROW_CHUNK, any, &pd);
    dnnl_memory_desc_destroy(any);
    if (st != MQ_OK) return st;
    if (traits(l)->emulation == MQ_EMULATE_WITHOUT_KERNEL && !l->emulated && strncmp(mq_pd_impl_name(pd), "ref", 3) == 0)
        st = mq_set_error(MQ_ERR_DNNL, "linear: oneDNN has only its reference %s matmul on this CPU", traits(l)->name);
    if (st == MQ_OK) st = MQ_DNNL_STATUS(dnnl_memory_desc_clone(&l->w_md, dnnl_primitive_desc_query_md(pd, dnnl_query_weights_md, 0)));
    dnnl_primitive_desc_destroy(pd);
    return st;
}

/* The values the native kernel would multiply, as f32 [N, K] in a new buffer *out (the kind's widen function); the
   caller frees it. */
static mq_status widened_weights(const mq_linear *l, const void *weight, float **out) {
    *out = mq_alloc((size_t)l->N * (size_t)l->K, sizeof(float));
    if (!*out) return mq_set_error(MQ_ERR_NOMEM, "linear: out of memory for the weights");
    l->kind->widen(l, weight, *out);
    return MQ_OK;
}

/* Whether the layer runs on medquant's panel matmul instead of oneDNN's: weight-only kinds, and layers computed in f32
   (F32, emulated INT8 / BF16) where oneDNN's rows vary (there a row's bits would depend on the call's row count, so
   oneDNN ran uniform 64-row pieces: a one-row call cost 64 rows; the panel kernel's rows never vary). */
static int uses_panels(const mq_linear *l) {
    return traits(l)->weight_only || (l->uniform && (l->emulated || l->spec.kind == MQ_LINEAR_F32));
}

/* Prepacks the user's weights; an emulated layer prepacks, as f32, exactly the values the native kernel would
   multiply (the kind's widen function). Layers on the panel matmul store them there instead. */
static mq_status weights_prepacked(mq_linear *l, const void *weight) {
    if (uses_panels(l)) return weights_stored(l, weight);
    MQ_TRY(choose_weight_layout(l));
    if (!l->emulated)
        return prepack(l, weight, traits(l)->weight_format == MQ_WEIGHTS_S8 ? dnnl_s8 : dnnl_f32);
    float *tmp = NULL;
    MQ_TRY(widened_weights(l, weight, &tmp));
    mq_status st = prepack(l, tmp, dnnl_f32);
    mq_free(tmp);
    return st;
}

/* The panel matmul's copy of the weights (which holds its own copy of the scales): quantized as they are (S8 also for
   emulated INT8, whose f32 inputs are the integers q - zero point), f32 as they are, and for emulated BF16 the
   bf16-rounded values; no oneDNN matmul. */
static mq_status weights_stored(mq_linear *l, const void *weight) {
    const mq_weight_format f = traits(l)->weight_format;
    const mq_wo_layout lay = {f == MQ_WEIGHTS_S8 ? MQ_WO_S8 : f == MQ_WEIGHTS_S4_PACKED ? MQ_WO_S4 : MQ_WO_F32, l->K,
                              l->N, l->spec.w_per_channel, l->spec.group_size};
    float *widened = NULL;
    if (lay.format == MQ_WO_F32 && l->emulated) {
        MQ_TRY(widened_weights(l, weight, &widened));
        weight = widened;
    }
    const mq_status st = mq_wo_matrix_create(&l->wo, &lay, weight, l->w_scales);
    mq_free(widened);
    MQ_TRY(st);
    mq_free(l->w_scales);
    l->w_scales = NULL;
    l->n_wscales = 0;
    snprintf(l->impl, sizeof l->impl, "%s%s", mq_wo_matrix_impl(l->wo), l->emulated ? " (emulated in f32)" : "");
    return MQ_OK;
}

/* ------------------------------------------------------------------ creation */

static mq_status check_spec(const mq_linear_spec *s, int64_t K, int64_t N, const mq_linear_weights *w) {
    if (K <= 0 || N <= 0 || K > (1 << 20) || N > (1 << 20))
        return mq_set_error(MQ_ERR_ARG, "linear: bad shape in=%lld out=%lld", (long long)K, (long long)N);
    if (!w || !w->weight) return mq_set_error(MQ_ERR_ARG, "linear: weights are missing");
    const mq_linear_traits *t = mq_linear_kind_traits((int)s->kind);
    if (!t) return mq_set_error(MQ_ERR_ARG, "linear: unknown kind %d", (int)s->kind);
    if ((int)s->epilogue < 0 || (int)s->epilogue >= MQ_EPI_COUNT)
        return mq_set_error(MQ_ERR_ARG, "linear: unknown epilogue %d", (int)s->epilogue);
    if (t->quantized_input) {
        if ((int)s->act_mode < 0 || (int)s->act_mode >= MQ_ACT_MODE_COUNT)
            return mq_set_error(MQ_ERR_ARG, "linear: unknown activation mode %d", (int)s->act_mode);
        if (s->act_mode == MQ_ACT_DYNAMIC_TOKEN && !s->act_symmetric)
            return mq_set_error(MQ_ERR_ARG,
                                "linear: per-token activation quantization is symmetric only (oneDNN takes one common "
                                "source zero point)");
        if (s->act_mode == MQ_ACT_STATIC) {
            if (!(s->act_scale > 0.f) || !(s->act_scale < 1e30f))
                return mq_set_error(MQ_ERR_ARG, "linear: static activation scale must be positive and finite, got %g",
                                    (double)s->act_scale);
            if (s->act_zero_point < 0 || s->act_zero_point > 255)
                return mq_set_error(MQ_ERR_ARG, "linear: activation zero point %d outside [0, 255]", s->act_zero_point);
        }
    }
    if (t->w_scales != MQ_WSCALES_NONE && !w->w_scales)
        return mq_set_error(MQ_ERR_ARG, "linear: quantized weights need their scales");
    int64_t cols = 0, n_scales = 0;
    return mq_linear_weight_layout((int)s->kind, K, N, s->w_per_channel, s->group_size, &cols, &n_scales);
}

/* Copies the weight scales (all positive), bias and activation multiplier. */
static mq_status take_vectors(mq_linear *l, const mq_linear_weights *w) {
    int64_t cols = 0;
    MQ_TRY(mq_linear_weight_layout((int)l->spec.kind, l->K, l->N, l->spec.w_per_channel, l->spec.group_size, &cols,
                                   &l->n_wscales));
    if (l->n_wscales) {
        MQ_TRY(mq_take_floats(&l->w_scales, w->w_scales, (size_t)l->n_wscales, "weight scales"));
        for (int64_t i = 0; i < l->n_wscales; i++)
            if (!(l->w_scales[i] > 0.f))
                return mq_set_error(MQ_ERR_ARG, "linear: weight scale %lld is not positive", (long long)i);
    }
    if (w->bias) MQ_TRY(mq_take_floats(&l->bias, w->bias, (size_t)l->N, "bias"));
    if (w->act_mul) MQ_TRY(mq_take_floats(&l->act_mul, w->act_mul, (size_t)l->K, "activation multiplier"));
    return MQ_OK;
}

/* Memories of the attribute arguments; their handles point into this struct and its arrays. */
static mq_status attr_memories(mq_linear *l) {
    if (traits(l)->quantized_input) {
        l->src_scale = l->spec.act_scale;
        l->src_zp = l->spec.act_symmetric ? 128 : l->spec.act_zero_point;
    }
    if (l->wo) return MQ_OK; /* no oneDNN matmul */
    if (l->bias) MQ_TRY(make_mem(per_token(l) ? &l->bias_po_mem : &l->bias_mem, l, 1, l->N, dnnl_f32, l->bias));
    if (!traits(l)->quantized_input) return MQ_OK;
    MQ_TRY(vector_mem(&l->w_scale_mem, l, l->n_wscales, dnnl_f32, l->w_scales));
    MQ_TRY(vector_mem(&l->src_scale_mem, l, 1, dnnl_f32, &l->src_scale));
    MQ_TRY(vector_mem(&l->zp_mem, l, 1, dnnl_s32, &l->src_zp));
    return MQ_OK;
}

static mq_status build_prim(void *owner, int64_t rows, void *entry);
static void free_prim(void *entry);

static mq_status linear_create(mq_linear **out, mq_engine *eng, int64_t K, int64_t N, const mq_linear_spec *spec,
                               const mq_linear_weights *w, int emulated) {
    *out = NULL;
    MQ_TRY(check_spec(spec, K, N, w));
    mq_linear *l = calloc(1, sizeof *l);
    if (!l) return mq_set_error(MQ_ERR_NOMEM, "linear: out of memory");
    l->eng = eng;
    l->kind = &KINDS[spec->kind];
    l->K = K;
    l->N = N;
    l->spec = *spec;
    l->emulated = emulated && traits(l)->emulation != MQ_EMULATE_NEVER;
    l->uniform = mq_engine_rows_vary(eng);
    mq_prim_cache_init(&l->prims, sizeof(mq_lin_prim), build_prim, free_prim);
    mq_status st = take_vectors(l, w);
    if (st == MQ_OK && traits(l)->weight_format == MQ_WEIGHTS_F32)
        st = mq_check_finite((const float *)w->weight, (size_t)N * (size_t)K, "weight");
    if (st == MQ_OK) st = l->kind->weights(l, w->weight);
    if (st == MQ_OK) st = attr_memories(l);
    if (st != MQ_OK) {
        mq_linear_destroy(l);
        return st;
    }
    *out = l;
    return MQ_OK;
}

/* Measures, once per engine, whether the int8 matmul kernels oneDNN picks on this CPU compute u8 x s8 exactly. Kernels
   without VNNI or AMX add pairs of u8 * s8 products in saturating 16-bit arithmetic (vpmaddubsw): 255 * 127 * 2
   exceeds 32767. A layer built like every int8 layer multiplies u8 255 by s8 127 over K = 256 inputs; an exact
   kernel gives 255 * 127 * 256 (exact in f32), a saturating one about half of it. */
static mq_status probe_int8_exact(mq_engine *eng) {
    enum { PK = 256, PN = 64, PM = 64 };
    const int64_t rows = PM;
    const float one = 1.f, expect = 255.f * 127.f * (float)PK;
    mq_linear *l = NULL;
    mq_linear_scratch s;
    memset(&s, 0, sizeof s);
    int8_t *w = mq_alloc((size_t)PN * PK, 1);
    float *x = mq_alloc((size_t)rows * PK, sizeof(float)), *y = mq_alloc((size_t)rows * PN, sizeof(float));
    mq_status st = MQ_OK;
    if (!w || !x || !y) st = mq_set_error(MQ_ERR_NOMEM, "linear: out of memory for the int8 kernel check");
    if (st == MQ_OK) {
        memset(w, 127, (size_t)PN * PK);
        for (int64_t i = 0; i < rows * PK; i++) x[i] = 255.f;
        const mq_linear_spec spec = {.kind = MQ_LINEAR_INT8, .act_mode = MQ_ACT_STATIC, .act_symmetric = 0,
                                     .act_scale = 1.f, .act_zero_point = 0, .w_per_channel = 0, .epilogue = MQ_EPI_NONE};
        const mq_linear_weights lw = {w, &one, NULL, NULL};
        st = linear_create(&l, eng, PK, PN, &spec, &lw, 0);
    }
    if (st == MQ_OK) st = mq_linear_forward(l, &s, x, PM, NULL, y);
    if (st == MQ_OK) {
        int exact = 1;
        for (int64_t i = 0; i < (int64_t)PM * PN; i++) exact &= y[i] == expect;
        mq_engine_set_int8_exact(eng, exact);
    }
    mq_linear_destroy(l);
    mq_linear_scratch_release(&s);
    mq_free(w);
    mq_free(x);
    mq_free(y);
    return st;
}

mq_status mq_linear_create(mq_linear **out, mq_engine *eng, int64_t K, int64_t N, const mq_linear_spec *spec,
                           const mq_linear_weights *w) {
    if (!out || !eng || !spec) return mq_set_error(MQ_ERR_ARG, "linear: NULL argument");
    *out = NULL;
    MQ_TRY(check_spec(spec, K, N, w));
    switch (KINDS[spec->kind].traits.emulation) {
        case MQ_EMULATE_UNLESS_INT8_EXACT:
            if (mq_engine_int8_exact(eng) < 0) MQ_TRY(probe_int8_exact(eng));
            return linear_create(out, eng, K, N, spec, w, !mq_engine_int8_exact(eng));
        case MQ_EMULATE_WITHOUT_KERNEL: { /* e.g. no bf16 matmul on this CPU (oneDNN 3.2 needs avx512_core) */
            mq_status st = linear_create(out, eng, K, N, spec, w, 0);
            return st == MQ_ERR_DNNL ? linear_create(out, eng, K, N, spec, w, 1) : st;
        }
        default: return linear_create(out, eng, K, N, spec, w, 0);
    }
}

static void free_prim(void *entry) {
    mq_lin_prim *p = entry;
    if (p->prim) dnnl_primitive_destroy(p->prim);
    if (p->epi) dnnl_primitive_destroy(p->epi);
    dnnl_memory_t mems[5] = {p->src, p->dst, p->scratch, p->residual, p->row_scale};
    for (int i = 0; i < 5; i++)
        if (mems[i]) dnnl_memory_destroy(mems[i]);
    memset(p, 0, sizeof *p);
}

void mq_linear_reset(mq_linear *l) {
    if (l) mq_prim_cache_clear(&l->prims);
}

void mq_linear_destroy(mq_linear *l) {
    if (!l) return;
    mq_prim_cache_release(&l->prims);
    dnnl_memory_t mems[8] = {l->w_mem, l->bias_mem, l->bias_po_mem, l->w_scale_mem,
                             l->src_scale_mem, l->zp_mem, l->dst_scale_mem, l->dst_zp_mem};
    for (int i = 0; i < 8; i++)
        if (mems[i]) dnnl_memory_destroy(mems[i]);
    dnnl_memory_desc_destroy(l->w_md);
    mq_wo_matrix_destroy(l->wo);
    mq_free(l->w_scales);
    mq_free(l->bias);
    mq_free(l->act_mul);
    free(l);
}

/* The primitive cache's build function: the matmul (and per-token epilogue) for a piece of `rows` rows and its
   memories, taking the prepacked weight layout l->w_md. */
static mq_status build_prim(void *owner, int64_t rows, void *entry) {
    mq_linear *l = owner;
    mq_lin_prim *p = entry;
    dnnl_primitive_desc_t pd = NULL;
    MQ_TRY(build_pd(l, rows, l->w_md, &pd));
    if (!dnnl_memory_desc_equal(dnnl_primitive_desc_query_md(pd, dnnl_query_weights_md, 0), l->w_md)) {
        dnnl_primitive_desc_destroy(pd);
        return mq_set_error(MQ_ERR_DNNL, "linear: oneDNN chose another weight layout for %lld rows", (long long)rows);
    }
    snprintf(l->impl, sizeof l->impl, "%s%s", mq_pd_impl_name(pd), l->emulated ? " (emulated in f32)" : "");
    const_dnnl_memory_desc_t smd = dnnl_primitive_desc_query_md(pd, dnnl_query_scratchpad_md, 0);
    mq_status st = MQ_DNNL_STATUS(dnnl_memory_create(&p->scratch, smd, mq_engine_dnnl(l->eng), DNNL_MEMORY_NONE));
    mq_status st2 = mq_primitive_from_pd(pd, &p->prim, &p->scratch_bytes);
    MQ_TRY(st);
    MQ_TRY(st2);
    MQ_TRY(make_mem(&p->src, l, rows, l->K, src_dtype(l), DNNL_MEMORY_NONE));
    MQ_TRY(make_mem(&p->dst, l, rows, l->N, l->out_u8 ? dnnl_u8 : dnnl_f32, DNNL_MEMORY_NONE));
    if (l->spec.epilogue == MQ_EPI_RESIDUAL) MQ_TRY(make_mem(&p->residual, l, rows, l->N, dnnl_f32, DNNL_MEMORY_NONE));
    if (!per_token(l)) return MQ_OK;
    MQ_TRY(make_mem(&p->row_scale, l, rows, 1, dnnl_f32, DNNL_MEMORY_NONE));
    dnnl_primitive_desc_t epd = NULL;
    MQ_TRY(build_epilogue_pd(l, rows, &epd));
    return mq_primitive_from_pd(epd, &p->epi, &p->scratch_bytes);
}

/* ------------------------------------------------------------------ forward */

#define SET(mem, ptr) MQ_DNNL(dnnl_memory_set_data_handle((mem), (void *)(ptr)))

/* The per-token epilogue of a piece: y = epilogue(y * row_scale (+ bias)) in place. */
static mq_status execute_epilogue(mq_linear *l, mq_lin_prim *p, const float *row_scale) {
    dnnl_exec_arg_t args[6];
    int n = 0, po = 0;
    SET(p->row_scale, row_scale);
    args[n++] = (dnnl_exec_arg_t){DNNL_ARG_SRC_0, p->dst};
    args[n++] = (dnnl_exec_arg_t){DNNL_ARG_SRC_1, p->row_scale};
    args[n++] = (dnnl_exec_arg_t){DNNL_ARG_DST, p->dst};
    args[n++] = (dnnl_exec_arg_t){DNNL_ARG_SCRATCHPAD, p->scratch};
    if (l->bias_po_mem) args[n++] = (dnnl_exec_arg_t){DNNL_ARG_ATTR_MULTIPLE_POST_OP(po++) | DNNL_ARG_SRC_1, l->bias_po_mem};
    if (l->spec.epilogue == MQ_EPI_RESIDUAL)
        args[n++] = (dnnl_exec_arg_t){DNNL_ARG_ATTR_MULTIPLE_POST_OP(po) | DNNL_ARG_SRC_1, p->residual};
    MQ_DNNL(dnnl_primitive_execute(p->epi, mq_engine_stream(l->eng), n, args));
    return MQ_OK;
}

/* One piece: the piece's primitive on its rows (src, residual, y and row_scale already point at its first row). */
static mq_status execute_piece(mq_linear *l, mq_linear_scratch *s, mq_lin_prim *p, const void *src,
                               const float *residual, void *y, const float *row_scale) {
    SET(p->src, src);
    SET(p->dst, y);
    SET(p->scratch, s->scratchpad.ptr);
    dnnl_exec_arg_t args[MQ_MAX_ARGS];
    int n = 0;
    args[n++] = (dnnl_exec_arg_t){DNNL_ARG_SRC, p->src};
    args[n++] = (dnnl_exec_arg_t){DNNL_ARG_WEIGHTS, l->w_mem};
    args[n++] = (dnnl_exec_arg_t){DNNL_ARG_DST, p->dst};
    args[n++] = (dnnl_exec_arg_t){DNNL_ARG_SCRATCHPAD, p->scratch};
    if (l->bias_mem) args[n++] = (dnnl_exec_arg_t){DNNL_ARG_BIAS, l->bias_mem};
    if (traits(l)->quantized_input) {
        if (!per_token(l)) args[n++] = (dnnl_exec_arg_t){DNNL_ARG_ATTR_SCALES | DNNL_ARG_SRC, l->src_scale_mem};
        args[n++] = (dnnl_exec_arg_t){DNNL_ARG_ATTR_SCALES | DNNL_ARG_WEIGHTS, l->w_scale_mem};
        if (!l->emulated) args[n++] = (dnnl_exec_arg_t){DNNL_ARG_ATTR_ZERO_POINTS | DNNL_ARG_SRC, l->zp_mem};
    }
    if (l->out_u8) {
        args[n++] = (dnnl_exec_arg_t){DNNL_ARG_ATTR_SCALES | DNNL_ARG_DST, l->dst_scale_mem};
        args[n++] = (dnnl_exec_arg_t){DNNL_ARG_ATTR_ZERO_POINTS | DNNL_ARG_DST, l->dst_zp_mem};
    }
    if (l->spec.epilogue == MQ_EPI_RESIDUAL) SET(p->residual, residual);
    if (!per_token(l) && l->spec.epilogue == MQ_EPI_RESIDUAL) {
        const int po = 0; /* GELU and residual never both: the residual is post-op 0 */
        args[n++] = (dnnl_exec_arg_t){DNNL_ARG_ATTR_MULTIPLE_POST_OP(po) | DNNL_ARG_SRC_1, p->residual};
    }
    MQ_DNNL(dnnl_primitive_execute(p->prim, mq_engine_stream(l->eng), n, args));
    if (p->epi) MQ_TRY(execute_epilogue(l, p, row_scale));
    return MQ_OK;
}

/* Runs the matmul on src [M, K] (the layer's source type) as the pieces of the row plan: their primitives looked up
   (built on first use) and the scratchpad sized for the largest before any runs, then each piece on its rows. What
   the whole call shares (the weight-only dequantization, the input conversion and its scales) is done once, before. */
static mq_status execute(mq_linear *l, mq_linear_scratch *s, const void *src, int64_t M, const float *residual,
                         void *y) {
    if (l->wo) { /* the panel matmul: INT8's scales (input's, or per row, times the weights' per column) are its output's */
        const int nthr = mq_engine_threads(l->eng);
        const int q = traits(l)->quantized_input;
        const mq_wo_output out = {q && !per_token(l) ? l->src_scale : 1.f, q && per_token(l) ? s->row_scale.ptr : NULL,
                                  l->bias, l->spec.epilogue, residual};
        MQ_TRY(mq_buffer_reserve(&s->wo_panels, mq_wo_scratch_floats(l->K, l->N, nthr), sizeof(float)));
        return mq_wo_matmul(l->wo, src, M, &out, y, s->wo_panels.ptr, nthr);
    }
    size_t scratch_bytes = 1;
    for (int64_t off = 0, n; off < M; off += n) {
        const int64_t rows = l->uniform ? mq_uniform_piece_rows(M - off) : mq_piece_rows(M - off);
        n = rows < M - off ? rows : M - off;
        void *entry = NULL;
        MQ_TRY(mq_prim_cache_get(&l->prims, l, rows, &entry));
        const mq_lin_prim *p = entry;
        if (p->scratch_bytes > scratch_bytes) scratch_bytes = p->scratch_bytes;
    }
    MQ_TRY(mq_buffer_reserve(&s->scratchpad, scratch_bytes, 1));
    const size_t src_row = (size_t)l->K * dnnl_data_type_size(src_dtype(l));
    const size_t dst_row = (size_t)l->N * (l->out_u8 ? sizeof(uint8_t) : sizeof(float));
    const float *row_scale = per_token(l) ? s->row_scale.ptr : NULL;
    for (int64_t off = 0, n; off < M; off += n) {
        const int64_t rows = l->uniform ? mq_uniform_piece_rows(M - off) : mq_piece_rows(M - off);
        n = rows < M - off ? rows : M - off;
        mq_lin_prim *p = mq_prim_cache_find(&l->prims, rows);
        const char *xs = (const char *)src + (size_t)off * src_row;
        const float *res = residual ? residual + off * l->N : NULL, *rs = row_scale ? row_scale + off : NULL;
        char *ys = (char *)y + (size_t)off * dst_row;
        if (n == rows) {
            MQ_TRY(execute_piece(l, s, p, xs, res, ys, rs));
            continue;
        }
        /* the padded last piece of the uniform plan: its n rows copied into `rows` zero-padded rows */
        MQ_TRY(mq_buffer_reserve(&s->tail, mq_uniform_tail_bytes(l->K, l->N, res != NULL), 1));
        char *t_src = s->tail.ptr, *t_dst = t_src + (size_t)rows * (size_t)l->K * sizeof(float);
        float *t_res = (float *)(t_dst + (size_t)rows * (size_t)l->N * sizeof(float));
        float *t_rs = t_res + (res ? rows * l->N : 0);
        memset(t_src, 0, (size_t)rows * src_row);
        memcpy(t_src, xs, (size_t)n * src_row);
        if (res) {
            memset(t_res, 0, (size_t)rows * (size_t)l->N * sizeof(float));
            memcpy(t_res, res, (size_t)n * (size_t)l->N * sizeof(float));
        }
        if (rs)
            for (int64_t r = 0; r < rows; r++) t_rs[r] = r < n ? rs[r] : 1.f;
        MQ_TRY(execute_piece(l, s, p, t_src, res ? t_res : NULL, t_dst, rs ? t_rs : NULL));
        MQ_DNNL(dnnl_stream_wait(mq_engine_stream(l->eng)));
        memcpy(ys, t_dst, (size_t)n * dst_row);
    }
    MQ_DNNL(dnnl_stream_wait(mq_engine_stream(l->eng)));
    return MQ_OK;
}

/* What both forwards do first: check the arguments and apply this layer's thread count to the calling thread (cheap:
   an OpenMP ICV). */
static mq_status begin_forward(mq_linear *l, mq_linear_scratch *s, const void *x, int64_t M, const float *residual,
                               void *y) {
    if (!l || !s || !x || !y || M <= 0) return mq_set_error(MQ_ERR_ARG, "linear: bad forward arguments");
    if (l->spec.epilogue == MQ_EPI_RESIDUAL && !residual) return mq_set_error(MQ_ERR_ARG, "linear: residual missing");
    mq_engine_enter(l->eng);
    return MQ_OK;
}

mq_status mq_linear_forward(mq_linear *l, mq_linear_scratch *s, const float *x, int64_t M, const float *residual,
                            void *y) {
    MQ_TRY(begin_forward(l, s, x, M, residual, y));
    const void *src = NULL;
    MQ_TRY(l->kind->input(l, s, x, M, &src));
    return execute(l, s, src, M, residual, y);
}

mq_status mq_linear_effective_input(const mq_linear *l, mq_linear_scratch *s, const float *x, int64_t M,
                                    const float **xs) {
    *xs = x;
    if (!l->act_mul) return MQ_OK;
    MQ_TRY(mq_buffer_reserve(&s->act_in, (size_t)M * (size_t)l->K, sizeof(float)));
    mq_scale_columns(x, M, l->K, l->K, l->act_mul, s->act_in.ptr);
    *xs = s->act_in.ptr;
    return MQ_OK;
}

mq_status mq_linear_forward_u8(mq_linear *l, mq_linear_scratch *s, const uint8_t *xq, int64_t M, const float *residual,
                               void *y) {
    if (l && !mq_linear_static_input(l, NULL, NULL))
        return mq_set_error(MQ_ERR_ARG, "linear: a pre-quantized input needs a static int8 layer without act_mul");
    MQ_TRY(begin_forward(l, s, xq, M, residual, y));
    const void *src = xq;
    if (l->emulated) MQ_TRY(centered_f32(l, s, xq, M, &src));
    return execute(l, s, src, M, residual, y);
}

int mq_linear_static_input(const mq_linear *l, float *scale, int32_t *zero_point) {
    if (!l || !traits(l)->quantized_input || l->spec.act_mode != MQ_ACT_STATIC || l->act_mul) return 0;
    if (scale) *scale = l->src_scale;
    if (zero_point) *zero_point = l->src_zp;
    return 1;
}

int mq_linear_output_u8(const mq_linear *l) { return l && l->out_u8; }

mq_status mq_linear_set_output_u8(mq_linear *l, float scale, int32_t zero_point) {
    if (!l) return mq_set_error(MQ_ERR_ARG, "linear: NULL");
    if (!traits(l)->quantized_input)
        return mq_set_error(MQ_ERR_ARG, "linear: u8 output is for int8 layers (oneDNN 3.2 has no f32 matmul with a "
                                        "u8 destination and zero point)");
    if (per_token(l) || l->spec.epilogue == MQ_EPI_RESIDUAL)
        return mq_set_error(MQ_ERR_ARG, "linear: u8 output needs a layer without residual epilogue and per-token scales");
    if (!(scale > 0.f) || !(scale < 1e30f) || zero_point < 0 || zero_point > 255)
        return mq_set_error(MQ_ERR_ARG, "linear: bad output quantization (scale %g, zero point %d)", (double)scale,
                            zero_point);
    if (l->emulated)
        return mq_set_error(MQ_ERR_ARG, "linear: u8 output needs oneDNN's exact int8 kernels (this layer is emulated in "
                                        "f32 on this CPU)");
    mq_linear_reset(l);
    l->dst_scale = scale;
    l->dst_zp = zero_point;
    if (!l->dst_scale_mem) MQ_TRY(vector_mem(&l->dst_scale_mem, l, 1, dnnl_f32, &l->dst_scale));
    if (!l->dst_zp_mem) MQ_TRY(vector_mem(&l->dst_zp_mem, l, 1, dnnl_s32, &l->dst_zp));
    l->out_u8 = 1;
    /* the weights were prepacked for an f32 output: the u8-output primitive must take the same layout */
    void *entry = NULL;
    mq_status st = mq_prim_cache_get(&l->prims, l, MQ_ROW_CHUNK, &entry);
    if (st != MQ_OK) {
        l->out_u8 = 0;
        mq_linear_reset(l);
    }
    return st;
}

/* ------------------------------------------------------------------ queries */

int64_t mq_linear_in(const mq_linear *l) { return l->K; }
int64_t mq_linear_out(const mq_linear *l) { return l->N; }

size_t mq_linear_nbytes(const mq_linear *l) {
    size_t b = 0;
    if (l->wo)
        b += mq_wo_matrix_nbytes(l->wo);
    else if (l->w_md)
        b += dnnl_memory_desc_get_size(l->w_md);
    b += (size_t)l->n_wscales * sizeof(float);
    if (l->bias) b += (size_t)l->N * sizeof(float);
    if (l->act_mul) b += (size_t)l->K * sizeof(float);
    return b;
}

mq_status mq_linear_kernel_support(int *int8_exact, int *bf16_native) {
    mq_engine *eng = NULL;
    MQ_TRY(mq_engine_create(&eng, 0));
    mq_status st = probe_int8_exact(eng);
    if (st == MQ_OK) *int8_exact = mq_engine_int8_exact(eng);
    if (st == MQ_OK) {
        float w[16 * 16] = {0};
        const mq_linear_spec spec = {.kind = MQ_LINEAR_BF16, .epilogue = MQ_EPI_NONE};
        const mq_linear_weights lw = {w, NULL, NULL, NULL};
        mq_linear *l = NULL;
        st = mq_linear_create(&l, eng, 16, 16, &spec, &lw);
        if (st == MQ_OK) *bf16_native = !l->emulated;
        mq_linear_destroy(l);
    }
    mq_engine_destroy(eng);
    return st;
}

const char *mq_linear_impl(const mq_linear *l) { return l->impl; }
int mq_linear_emulated(const mq_linear *l) { return l->emulated; }
