#include "linear.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "qparams.h"

#define MQ_MAX_ARGS 16

/* One matmul primitive built for a row bucket, with the memory objects whose handles are set per call. */
typedef struct {
    int64_t rows;
    dnnl_primitive_t prim, epi; /* epi: the per-token epilogue (binary primitive), else NULL */
    size_t scratch_bytes;
    dnnl_memory_t src, dst, scratch, residual, row_scale;
} mq_lin_prim;

struct mq_linear {
    mq_engine *eng; /* borrowed */
    int64_t K, N;
    mq_linear_spec spec;
    dnnl_memory_desc_t w_md; /* weights as the primitives take them (prepacked or plain f32 for weight-only) */
    dnnl_memory_t w_mem;     /* prepacked weights (owns its buffer), or handle-less for weight-only */
    void *w_store;           /* weight-only: the quantized weights */
    size_t w_store_bytes;
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
    mq_lin_prim *prims;
    int n_prims, cap_prims;
    int emulated; /* INT8/BF16 run as an f32 matmul on the same rounded operands (mq_linear_emulated) */
    char impl[160];
};

static dnnl_data_type_t src_dtype(const mq_linear *l) {
    if (l->emulated) return dnnl_f32;
    switch (l->spec.kind) {
        case MQ_LINEAR_BF16: return dnnl_bf16;
        case MQ_LINEAR_INT8: return dnnl_u8;
        default: return dnnl_f32;
    }
}

static int per_token(const mq_linear *l) {
    return l->spec.kind == MQ_LINEAR_INT8 && l->spec.act_mode == MQ_ACT_DYNAMIC_TOKEN;
}

static mq_status make_md(dnnl_memory_desc_t *md, int64_t d0, int64_t d1, dnnl_data_type_t dt, dnnl_format_tag_t tag) {
    dnnl_dims_t dims = {d0, d1};
    MQ_DNNL(dnnl_memory_desc_create_with_tag(md, 2, dims, dt, tag));
    return MQ_OK;
}

static mq_status make_mem(dnnl_memory_t *mem, const mq_linear *l, int64_t d0, int64_t d1, dnnl_data_type_t dt,
                          void *handle) {
    dnnl_memory_desc_t md;
    MQ_TRY(make_md(&md, d0, d1, dt, dnnl_ab));
    dnnl_status_t st = dnnl_memory_create(mem, md, mq_engine_dnnl(l->eng), handle);
    dnnl_memory_desc_destroy(md);
    if (st != dnnl_success) return mq_set_error(MQ_ERR_DNNL, "linear: oneDNN error %d creating a memory", (int)st);
    return MQ_OK;
}

/* A 1-D memory of n values over `handle` (scales and zero points passed at execution). */
static mq_status vector_mem(dnnl_memory_t *mem, const mq_linear *l, int64_t n, dnnl_data_type_t dt, void *handle) {
    dnnl_memory_desc_t md = NULL;
    dnnl_dims_t dims = {n};
    MQ_DNNL(dnnl_memory_desc_create_with_tag(&md, 1, dims, dt, dnnl_a));
    dnnl_status_t st = dnnl_memory_create(mem, md, mq_engine_dnnl(l->eng), handle);
    dnnl_memory_desc_destroy(md);
    if (st != dnnl_success) return mq_set_error(MQ_ERR_DNNL, "linear: oneDNN error %d creating a scale memory", (int)st);
    return MQ_OK;
}

/* Appends [bias add] + GELU or residual add to po. */
static mq_status append_epilogue(const mq_linear *l, int64_t rows, dnnl_post_ops_t po, int with_bias) {
    dnnl_memory_desc_t md = NULL;
    if (with_bias) {
        MQ_TRY(make_md(&md, 1, l->N, dnnl_f32, dnnl_ab));
        dnnl_status_t ds = dnnl_post_ops_append_binary(po, dnnl_binary_add, md);
        dnnl_memory_desc_destroy(md);
        if (ds != dnnl_success) return mq_set_error(MQ_ERR_DNNL, "linear: cannot append the bias post-op (%d)", (int)ds);
    }
    if (l->spec.epilogue == MQ_EPI_GELU) MQ_DNNL(dnnl_post_ops_append_eltwise(po, dnnl_eltwise_gelu_erf, 0.f, 0.f));
    if (l->spec.epilogue == MQ_EPI_RESIDUAL) {
        MQ_TRY(make_md(&md, rows, l->N, dnnl_f32, dnnl_ab));
        dnnl_status_t ds = dnnl_post_ops_append_binary(po, dnnl_binary_add, md);
        dnnl_memory_desc_destroy(md);
        if (ds != dnnl_success) return mq_set_error(MQ_ERR_DNNL, "linear: cannot append the residual post-op (%d)", (int)ds);
    }
    return MQ_OK;
}

/* Builds the matmul descriptor for `rows` rows; weights md is `wmd` (format any on the first call). */
static mq_status build_pd(const mq_linear *l, int64_t rows, const_dnnl_memory_desc_t wmd, dnnl_primitive_desc_t *pd) {
    mq_status st = MQ_OK;
    dnnl_memory_desc_t src_md = NULL, dst_md = NULL, bias_md = NULL;
    dnnl_primitive_attr_t attr = NULL;
    dnnl_post_ops_t po = NULL;
    dnnl_status_t ds;
#define CK(call)                                                                                              \
    do {                                                                                                      \
        ds = (call);                                                                                          \
        if (ds != dnnl_success) {                                                                             \
            st = mq_set_error(MQ_ERR_DNNL, "linear [%lld x %lld] -> %lld: oneDNN error %d (%s) in %s", (long long)rows, \
                              (long long)l->K, (long long)l->N, (int)ds, mq_dnnl_status_name(ds), #call);     \
            goto done;                                                                                        \
        }                                                                                                     \
    } while (0)
    if ((st = make_md(&src_md, rows, l->K, src_dtype(l), dnnl_ab)) != MQ_OK) goto done;
    if ((st = make_md(&dst_md, rows, l->N, l->out_u8 ? dnnl_u8 : dnnl_f32, dnnl_ab)) != MQ_OK) goto done;
    if (l->bias && !per_token(l) && (st = make_md(&bias_md, 1, l->N, dnnl_f32, dnnl_ab)) != MQ_OK) goto done;
    if ((st = mq_attr_create(&attr)) != MQ_OK) goto done;
    CK(dnnl_post_ops_create(&po));
    if (l->spec.kind == MQ_LINEAR_INT8) {
        if (!per_token(l)) CK(dnnl_primitive_attr_set_scales_mask(attr, DNNL_ARG_SRC, 0));
        CK(dnnl_primitive_attr_set_scales_mask(attr, DNNL_ARG_WEIGHTS, l->spec.w_per_channel ? (1 << 1) : 0));
        if (!l->emulated) CK(dnnl_primitive_attr_set_zero_points_mask(attr, DNNL_ARG_SRC, 0)); /* emulated: q - zp */
    }
    if (l->out_u8) { /* after the post-ops: dst = saturate(rint(result / dst_scale) + dst_zp) */
        CK(dnnl_primitive_attr_set_scales_mask(attr, DNNL_ARG_DST, 0));
        CK(dnnl_primitive_attr_set_zero_points_mask(attr, DNNL_ARG_DST, 0));
    }
    if (!per_token(l) && (st = append_epilogue(l, rows, po, 0)) != MQ_OK) goto done;
    CK(dnnl_primitive_attr_set_post_ops(attr, po));
    CK(dnnl_matmul_primitive_desc_create(pd, mq_engine_dnnl(l->eng), src_md, wmd, bias_md, dst_md, attr));
done:
#undef CK
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
    dnnl_status_t ds = dnnl_success;
    if ((st = make_md(&y_md, rows, l->N, dnnl_f32, dnnl_ab)) != MQ_OK) goto done;
    if ((st = make_md(&rs_md, rows, 1, dnnl_f32, dnnl_ab)) != MQ_OK) goto done;
    if ((st = mq_attr_create(&attr)) != MQ_OK) goto done;
    ds = dnnl_post_ops_create(&po);
    if (ds == dnnl_success && (st = append_epilogue(l, rows, po, l->bias != NULL)) != MQ_OK) goto done;
    if (ds == dnnl_success) ds = dnnl_primitive_attr_set_post_ops(attr, po);
    if (ds == dnnl_success)
        ds = dnnl_binary_primitive_desc_create(pd, mq_engine_dnnl(l->eng), dnnl_binary_mul, y_md, rs_md, y_md, attr);
    if (ds != dnnl_success)
        st = mq_set_error(MQ_ERR_DNNL, "linear: oneDNN error %d building the per-token epilogue", (int)ds);
done:
    if (po) dnnl_post_ops_destroy(po);
    if (attr) dnnl_primitive_attr_destroy(attr);
    dnnl_memory_desc_destroy(y_md);
    dnnl_memory_desc_destroy(rs_md);
    return st;
}

/* Reorders user weights (plain [N, K] row-major, i.e. {K, N} "ba") into the primitive's preferred layout. */
static mq_status prepack(mq_linear *l, const void *user, dnnl_data_type_t user_dt) {
    mq_status st = MQ_OK;
    dnnl_memory_desc_t umd = NULL;
    dnnl_memory_t umem = NULL;
    dnnl_primitive_desc_t rpd = NULL;
    dnnl_primitive_t rprim = NULL;
    dnnl_primitive_attr_t rattr = NULL;
    void *scratch = NULL;
    dnnl_status_t ds;
    if ((st = make_md(&umd, l->K, l->N, user_dt, dnnl_ba)) != MQ_OK) return st;
    ds = dnnl_memory_create(&umem, umd, mq_engine_dnnl(l->eng), (void *)user);
    if (ds == dnnl_success) ds = dnnl_memory_create(&l->w_mem, l->w_md, mq_engine_dnnl(l->eng), DNNL_MEMORY_ALLOCATE);
    if (ds == dnnl_success) ds = dnnl_primitive_attr_create(&rattr);
    if (ds == dnnl_success) ds = dnnl_primitive_attr_set_scratchpad_mode(rattr, dnnl_scratchpad_mode_user);
    if (ds == dnnl_success)
        ds = dnnl_reorder_primitive_desc_create(&rpd, umd, mq_engine_dnnl(l->eng), l->w_md, mq_engine_dnnl(l->eng), rattr);
    if (ds != dnnl_success) {
        st = mq_set_error(MQ_ERR_DNNL, "linear: cannot prepack weights [%lld x %lld] (oneDNN error %d)",
                          (long long)l->N, (long long)l->K, (int)ds);
        goto done;
    }
    size_t sbytes = 0;
    if ((st = mq_primitive_from_pd(rpd, &rprim, &sbytes)) != MQ_OK) goto done;
    rpd = NULL;
    scratch = mq_alloc(sbytes, 1);
    if (!scratch) { st = mq_set_error(MQ_ERR_NOMEM, "linear: out of memory for the prepack scratchpad"); goto done; }
    dnnl_memory_t smem = NULL;
    dnnl_memory_desc_t smd = NULL;
    {
        dnnl_dims_t sd = {(int64_t)(sbytes ? sbytes : 1)};
        ds = dnnl_memory_desc_create_with_tag(&smd, 1, sd, dnnl_u8, dnnl_a);
        if (ds == dnnl_success) ds = dnnl_memory_create(&smem, smd, mq_engine_dnnl(l->eng), scratch);
        dnnl_memory_desc_destroy(smd);
    }
    if (ds == dnnl_success) {
        dnnl_exec_arg_t args[3] = {{DNNL_ARG_FROM, umem}, {DNNL_ARG_TO, l->w_mem}, {DNNL_ARG_SCRATCHPAD, smem}};
        ds = dnnl_primitive_execute(rprim, mq_engine_stream(l->eng), 3, args);
        if (ds == dnnl_success) ds = dnnl_stream_wait(mq_engine_stream(l->eng));
    }
    if (smem) dnnl_memory_destroy(smem);
    if (ds != dnnl_success) st = mq_set_error(MQ_ERR_DNNL, "linear: weight reorder failed (oneDNN error %d)", (int)ds);
done:
    mq_free(scratch);
    if (rprim) dnnl_primitive_destroy(rprim);
    if (rpd) dnnl_primitive_desc_destroy(rpd);
    if (rattr) dnnl_primitive_attr_destroy(rattr);
    if (umem) dnnl_memory_destroy(umem);
    dnnl_memory_desc_destroy(umd);
    return st;
}

static mq_status check_spec(const mq_linear_spec *s, int64_t K, int64_t N, const mq_linear_weights *w) {
    if (K <= 0 || N <= 0 || K > (1 << 20) || N > (1 << 20))
        return mq_set_error(MQ_ERR_ARG, "linear: bad shape in=%lld out=%lld", (long long)K, (long long)N);
    if (!w || !w->weight) return mq_set_error(MQ_ERR_ARG, "linear: weights are missing");
    if ((int)s->kind < MQ_LINEAR_F32 || (int)s->kind > MQ_LINEAR_W4)
        return mq_set_error(MQ_ERR_ARG, "linear: unknown kind %d", (int)s->kind);
    if ((int)s->epilogue < MQ_EPI_NONE || (int)s->epilogue > MQ_EPI_RESIDUAL)
        return mq_set_error(MQ_ERR_ARG, "linear: unknown epilogue %d", (int)s->epilogue);
    if (s->kind == MQ_LINEAR_INT8) {
        if ((int)s->act_mode < MQ_ACT_DYNAMIC || (int)s->act_mode > MQ_ACT_STATIC)
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
    if ((s->kind == MQ_LINEAR_INT8 || s->kind == MQ_LINEAR_W8 || s->kind == MQ_LINEAR_W4) && !w->w_scales)
        return mq_set_error(MQ_ERR_ARG, "linear: quantized weights need their scales");
    if (s->kind == MQ_LINEAR_W4 && (s->group_size <= 0 || s->group_size % 2 || K % s->group_size))
        return mq_set_error(MQ_ERR_ARG, "linear: int4 group size %lld must be even and divide in_features %lld",
                            (long long)s->group_size, (long long)K);
    return MQ_OK;
}

static float *copy_floats(const float *src, int64_t n, const char *what, mq_status *st) {
    if (!src) return NULL;
    *st = mq_check_finite(src, (size_t)n, what);
    if (*st != MQ_OK) return NULL;
    float *p = mq_alloc((size_t)n, sizeof(float));
    if (!p) { *st = mq_set_error(MQ_ERR_NOMEM, "linear: out of memory"); return NULL; }
    memcpy(p, src, (size_t)n * sizeof(float));
    return p;
}

/* Prepacks the user's weights; an emulated layer prepacks, as f32, exactly the values the native kernel would
   multiply: the s8 integers (INT8) or the bf16-rounded weights (BF16). */
static mq_status prepack_weights(mq_linear *l, const void *weight) {
    const mq_linear_kind kind = l->spec.kind;
    if (!l->emulated) return prepack(l, weight, kind == MQ_LINEAR_INT8 ? dnnl_s8 : dnnl_f32);
    const size_t n = (size_t)l->N * (size_t)l->K;
    float *tmp = mq_alloc(n, sizeof(float));
    if (!tmp) return mq_set_error(MQ_ERR_NOMEM, "linear: out of memory for the weights");
    if (kind == MQ_LINEAR_INT8) {
        const int8_t *q = weight;
        for (size_t i = 0; i < n; i++) tmp[i] = (float)q[i];
    } else {
        mq_round_f32_bf16(weight, l->N, l->K, l->K, NULL, tmp);
    }
    mq_status st = prepack(l, tmp, dnnl_f32);
    mq_free(tmp);
    return st;
}

static mq_status linear_create(mq_linear **out, mq_engine *eng, int64_t K, int64_t N, const mq_linear_spec *spec,
                               const mq_linear_weights *w, int emulated) {
    *out = NULL;
    MQ_TRY(check_spec(spec, K, N, w));
    mq_linear *l = calloc(1, sizeof *l);
    if (!l) return mq_set_error(MQ_ERR_NOMEM, "linear: out of memory");
    l->eng = eng;
    l->K = K;
    l->N = N;
    l->spec = *spec;
    l->emulated = emulated && (spec->kind == MQ_LINEAR_INT8 || spec->kind == MQ_LINEAR_BF16);
    mq_status st = MQ_OK;
    const mq_linear_kind kind = spec->kind;
    if (kind == MQ_LINEAR_INT8 || kind == MQ_LINEAR_W8)
        l->n_wscales = spec->w_per_channel ? N : 1;
    else if (kind == MQ_LINEAR_W4)
        l->n_wscales = N * (K / spec->group_size);
    if (l->n_wscales) {
        l->w_scales = copy_floats(w->w_scales, l->n_wscales, "weight scales", &st);
        if (st != MQ_OK) goto fail;
        for (int64_t i = 0; i < l->n_wscales; i++)
            if (!(l->w_scales[i] > 0.f)) { st = mq_set_error(MQ_ERR_ARG, "linear: weight scale %lld is not positive", (long long)i); goto fail; }
    }
    l->bias = copy_floats(w->bias, N, "bias", &st);
    if (st != MQ_OK) goto fail;
    l->act_mul = copy_floats(w->act_mul, K, "activation multiplier", &st);
    if (st != MQ_OK) goto fail;

    if (kind == MQ_LINEAR_W8 || kind == MQ_LINEAR_W4) {
        l->w_store_bytes = (size_t)N * (size_t)K / (kind == MQ_LINEAR_W4 ? 2 : 1);
        l->w_store = mq_alloc(l->w_store_bytes, 1);
        if (!l->w_store) { st = mq_set_error(MQ_ERR_NOMEM, "linear: out of memory for weights"); goto fail; }
        memcpy(l->w_store, w->weight, l->w_store_bytes);
        if ((st = make_md(&l->w_md, K, N, dnnl_f32, dnnl_ba)) != MQ_OK) goto fail;
        if (dnnl_memory_create(&l->w_mem, l->w_md, mq_engine_dnnl(eng), DNNL_MEMORY_NONE) != dnnl_success) {
            st = mq_set_error(MQ_ERR_DNNL, "linear: cannot create the weights memory");
            goto fail;
        }
    } else {
        if (kind == MQ_LINEAR_F32) {
            st = mq_check_finite((const float *)w->weight, (size_t)N * (size_t)K, "weight");
            if (st != MQ_OK) goto fail;
        }
        dnnl_memory_desc_t any = NULL;
        dnnl_primitive_desc_t pd = NULL;
        dnnl_data_type_t wdt = l->emulated ? dnnl_f32
                             : (kind == MQ_LINEAR_INT8 ? dnnl_s8 : (kind == MQ_LINEAR_BF16 ? dnnl_bf16 : dnnl_f32));
        if ((st = make_md(&any, K, N, wdt, dnnl_format_tag_any)) != MQ_OK) goto fail;
        st = build_pd(l, mq_bucket_rows(256), any, &pd);
        dnnl_memory_desc_destroy(any);
        if (st != MQ_OK) goto fail;
        if (kind == MQ_LINEAR_BF16 && !l->emulated && strncmp(mq_pd_impl_name(pd), "ref", 3) == 0) {
            dnnl_primitive_desc_destroy(pd);
            st = mq_set_error(MQ_ERR_DNNL, "linear: oneDNN has only its reference bf16 matmul on this CPU");
            goto fail;
        }
        const_dnnl_memory_desc_t q = dnnl_primitive_desc_query_md(pd, dnnl_query_weights_md, 0);
        dnnl_status_t ds = dnnl_memory_desc_clone(&l->w_md, q);
        dnnl_primitive_desc_destroy(pd);
        if (ds != dnnl_success) { st = mq_set_error(MQ_ERR_DNNL, "linear: cannot clone the weights descriptor"); goto fail; }
        st = prepack_weights(l, w->weight);
        if (st != MQ_OK) goto fail;
    }
    /* attribute argument memories: handles point into this struct / its arrays */
    if (l->bias) {
        if ((st = make_mem(per_token(l) ? &l->bias_po_mem : &l->bias_mem, l, 1, N, dnnl_f32, l->bias)) != MQ_OK) goto fail;
    }
    if (kind == MQ_LINEAR_INT8) {
        if ((st = vector_mem(&l->w_scale_mem, l, l->n_wscales, dnnl_f32, l->w_scales)) != MQ_OK ||
            (st = vector_mem(&l->src_scale_mem, l, 1, dnnl_f32, &l->src_scale)) != MQ_OK ||
            (st = vector_mem(&l->zp_mem, l, 1, dnnl_s32, &l->src_zp)) != MQ_OK)
            goto fail;
        l->src_scale = spec->act_scale;
        l->src_zp = spec->act_symmetric ? 128 : spec->act_zero_point;
    }
    *out = l;
    return MQ_OK;
fail:
    mq_linear_destroy(l);
    return st;
}

/* Measures, once per engine, whether the int8 matmul kernels oneDNN picks on this CPU compute u8 x s8 exactly. Kernels
   without VNNI or AMX add pairs of u8 * s8 products in saturating 16-bit arithmetic (vpmaddubsw): 255 * 127 * 2
   exceeds 32767. A layer built like every int8 layer multiplies u8 255 by s8 127 over K = 256 inputs; an exact
   kernel gives 255 * 127 * 256 (exact in f32), a saturating one about half of it. */
static mq_status probe_int8_exact(mq_engine *eng) {
    enum { PK = 256, PN = 64, PM = 64 };
    const int64_t rows = mq_bucket_rows(PM);
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
    if (st == MQ_OK) st = mq_linear_forward(l, &s, x, PM, NULL, y, NULL);
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
    if (spec->kind == MQ_LINEAR_INT8) {
        if (mq_engine_int8_exact(eng) < 0) MQ_TRY(probe_int8_exact(eng));
        return linear_create(out, eng, K, N, spec, w, !mq_engine_int8_exact(eng));
    }
    if (spec->kind == MQ_LINEAR_BF16) { /* no bf16 matmul on this CPU (oneDNN 3.2 needs avx512_core): emulate */
        mq_status st = linear_create(out, eng, K, N, spec, w, 0);
        return st == MQ_ERR_DNNL ? linear_create(out, eng, K, N, spec, w, 1) : st;
    }
    return linear_create(out, eng, K, N, spec, w, 0);
}

static void destroy_prim(mq_lin_prim *p) {
    if (p->prim) dnnl_primitive_destroy(p->prim);
    if (p->epi) dnnl_primitive_destroy(p->epi);
    if (p->src) dnnl_memory_destroy(p->src);
    if (p->dst) dnnl_memory_destroy(p->dst);
    if (p->scratch) dnnl_memory_destroy(p->scratch);
    if (p->residual) dnnl_memory_destroy(p->residual);
    if (p->row_scale) dnnl_memory_destroy(p->row_scale);
    memset(p, 0, sizeof *p);
}

void mq_linear_reset(mq_linear *l) {
    if (!l) return;
    for (int i = 0; i < l->n_prims; i++) destroy_prim(&l->prims[i]);
    l->n_prims = 0;
}

void mq_linear_destroy(mq_linear *l) {
    if (!l) return;
    mq_linear_reset(l);
    free(l->prims);
    if (l->w_mem) dnnl_memory_destroy(l->w_mem);
    if (l->bias_mem) dnnl_memory_destroy(l->bias_mem);
    if (l->bias_po_mem) dnnl_memory_destroy(l->bias_po_mem);
    if (l->w_scale_mem) dnnl_memory_destroy(l->w_scale_mem);
    if (l->src_scale_mem) dnnl_memory_destroy(l->src_scale_mem);
    if (l->zp_mem) dnnl_memory_destroy(l->zp_mem);
    if (l->dst_scale_mem) dnnl_memory_destroy(l->dst_scale_mem);
    if (l->dst_zp_mem) dnnl_memory_destroy(l->dst_zp_mem);
    dnnl_memory_desc_destroy(l->w_md);
    mq_free(l->w_store);
    mq_free(l->w_scales);
    mq_free(l->bias);
    mq_free(l->act_mul);
    free(l);
}

static mq_status get_prim(mq_linear *l, int64_t rows, mq_lin_prim **out) {
    for (int i = 0; i < l->n_prims; i++)
        if (l->prims[i].rows == rows) { *out = &l->prims[i]; return MQ_OK; }
    if (l->n_prims == l->cap_prims) {
        int cap = l->cap_prims ? 2 * l->cap_prims : 8;
        mq_lin_prim *np = realloc(l->prims, (size_t)cap * sizeof *np);
        if (!np) return mq_set_error(MQ_ERR_NOMEM, "linear: out of memory");
        l->prims = np;
        l->cap_prims = cap;
    }
    mq_lin_prim p;
    memset(&p, 0, sizeof p);
    p.rows = rows;
    dnnl_primitive_desc_t pd = NULL;
    MQ_TRY(build_pd(l, rows, l->w_md, &pd));
    const_dnnl_memory_desc_t wq = dnnl_primitive_desc_query_md(pd, dnnl_query_weights_md, 0);
    if (!dnnl_memory_desc_equal(wq, l->w_md)) {
        dnnl_primitive_desc_destroy(pd);
        return mq_set_error(MQ_ERR_DNNL, "linear: oneDNN chose another weight layout for %lld rows", (long long)rows);
    }
    snprintf(l->impl, sizeof l->impl, "%s%s", mq_pd_impl_name(pd), l->emulated ? " (emulated in f32)" : "");
    const_dnnl_memory_desc_t smd = dnnl_primitive_desc_query_md(pd, dnnl_query_scratchpad_md, 0);
    dnnl_status_t ds = dnnl_memory_create(&p.scratch, smd, mq_engine_dnnl(l->eng), DNNL_MEMORY_NONE);
    mq_status st = mq_primitive_from_pd(pd, &p.prim, &p.scratch_bytes);
    if (st == MQ_OK && ds != dnnl_success) st = mq_set_error(MQ_ERR_DNNL, "linear: cannot create scratchpad memory");
    if (st == MQ_OK) st = make_mem(&p.src, l, rows, l->K, src_dtype(l), DNNL_MEMORY_NONE);
    if (st == MQ_OK) st = make_mem(&p.dst, l, rows, l->N, l->out_u8 ? dnnl_u8 : dnnl_f32, DNNL_MEMORY_NONE);
    if (st == MQ_OK && l->spec.epilogue == MQ_EPI_RESIDUAL) st = make_mem(&p.residual, l, rows, l->N, dnnl_f32, DNNL_MEMORY_NONE);
    if (st == MQ_OK && per_token(l)) st = make_mem(&p.row_scale, l, rows, 1, dnnl_f32, DNNL_MEMORY_NONE);
    if (st == MQ_OK && per_token(l)) {
        dnnl_primitive_desc_t epd = NULL;
        st = build_epilogue_pd(l, rows, &epd);
        if (st == MQ_OK) st = mq_primitive_from_pd(epd, &p.epi, &p.scratch_bytes);
    }
    if (st != MQ_OK) { destroy_prim(&p); return st; }
    l->prims[l->n_prims] = p;
    *out = &l->prims[l->n_prims++];
    return MQ_OK;
}

#define SET(mem, ptr)                                                                              \
    do {                                                                                           \
        if (dnnl_memory_set_data_handle((mem), (void *)(ptr)) != dnnl_success)                     \
            return mq_set_error(MQ_ERR_DNNL, "linear: cannot set a memory handle");                \
    } while (0)

static mq_status execute(mq_linear *l, mq_linear_scratch *s, mq_lin_prim *p, const void *src, const float *residual,
                         void *y);

/* Emulated INT8: the quantized input as the exact integers q - zero point in f32 (scales stay matmul attributes). */
static mq_status centered_f32(const mq_linear *l, mq_linear_scratch *s, const uint8_t *q, int64_t M, const void **src) {
    MQ_TRY(mq_buffer_reserve(&s->act_lp, (size_t)mq_bucket_rows(M) * (size_t)l->K, sizeof(float)));
    mq_dequantize_u8(q, M, l->K, 1.f, per_token(l) ? 128 : l->src_zp, s->act_lp.ptr);
    *src = s->act_lp.ptr;
    return MQ_OK;
}

mq_status mq_linear_forward(mq_linear *l, mq_linear_scratch *s, const float *x, int64_t M, const float *residual,
                            void *y, mq_observer *obs) {
    if (!l || !s || !x || !y || M <= 0) return mq_set_error(MQ_ERR_ARG, "linear: bad forward arguments");
    if (l->spec.epilogue == MQ_EPI_RESIDUAL && !residual) return mq_set_error(MQ_ERR_ARG, "linear: residual missing");
    const int64_t rows = mq_bucket_rows(M), K = l->K;
    mq_engine_enter(l->eng); /* this layer's thread count for the calling thread (cheap: an OpenMP ICV) */
    mq_lin_prim *p = NULL;
    MQ_TRY(get_prim(l, rows, &p));
    const void *src = x;
    const float *xs = x; /* the layer's effective input (after act_mul) for the observer */
    switch (l->spec.kind) {
        case MQ_LINEAR_F32:
        case MQ_LINEAR_W8:
        case MQ_LINEAR_W4:
            if (l->act_mul) {
                MQ_TRY(mq_buffer_reserve(&s->act_lp, (size_t)rows * (size_t)K, sizeof(float)));
                mq_scale_columns(x, M, K, K, l->act_mul, s->act_lp.ptr);
                src = xs = s->act_lp.ptr;
            }
            if (obs) MQ_TRY(mq_observer_update_matrix(obs, xs, (size_t)M, (size_t)K));
            break;
        case MQ_LINEAR_BF16:
            if (obs) {
                if (l->act_mul) {
                    MQ_TRY(mq_buffer_reserve(&s->w_deq, (size_t)M * (size_t)K, sizeof(float)));
                    mq_scale_columns(x, M, K, K, l->act_mul, s->w_deq.ptr);
                    xs = s->w_deq.ptr;
                }
                MQ_TRY(mq_observer_update_matrix(obs, xs, (size_t)M, (size_t)K));
            }
            if (l->emulated) {
                MQ_TRY(mq_buffer_reserve(&s->act_lp, (size_t)rows * (size_t)K, sizeof(float)));
                mq_round_f32_bf16(x, M, K, K, l->act_mul, s->act_lp.ptr);
            } else {
                MQ_TRY(mq_buffer_reserve(&s->act_lp, (size_t)rows * (size_t)K, sizeof(uint16_t)));
                mq_convert_f32_bf16(x, M, K, K, l->act_mul, s->act_lp.ptr);
            }
            src = s->act_lp.ptr;
            break;
        case MQ_LINEAR_INT8: {
            if (obs) {
                if (l->act_mul) {
                    MQ_TRY(mq_buffer_reserve(&s->act_lp, (size_t)M * (size_t)K, sizeof(float)));
                    mq_scale_columns(x, M, K, K, l->act_mul, s->act_lp.ptr);
                    xs = s->act_lp.ptr;
                }
                MQ_TRY(mq_observer_update_matrix(obs, xs, (size_t)M, (size_t)K));
            }
            MQ_TRY(mq_buffer_reserve(&s->act_q, (size_t)rows * (size_t)K, 1));
            uint8_t *q = s->act_q.ptr;
            if (l->spec.act_mode == MQ_ACT_DYNAMIC_TOKEN) {
                MQ_TRY(mq_buffer_reserve(&s->row_scale, (size_t)rows, sizeof(float)));
                mq_quantize_u8_per_row(x, M, K, K, l->act_mul, q, s->row_scale.ptr);
                SET(p->row_scale, s->row_scale.ptr);
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
            src = q;
            if (l->emulated) MQ_TRY(centered_f32(l, s, q, M, &src));
            break;
        }
    }
    return execute(l, s, p, src, residual, y);
}

mq_status mq_linear_forward_u8(mq_linear *l, mq_linear_scratch *s, const uint8_t *xq, int64_t M, const float *residual,
                               void *y) {
    if (!l || !s || !xq || !y || M <= 0) return mq_set_error(MQ_ERR_ARG, "linear: bad forward arguments");
    if (!mq_linear_static_input(l, NULL, NULL))
        return mq_set_error(MQ_ERR_ARG, "linear: a pre-quantized input needs a static int8 layer without act_mul");
    if (l->spec.epilogue == MQ_EPI_RESIDUAL && !residual) return mq_set_error(MQ_ERR_ARG, "linear: residual missing");
    mq_engine_enter(l->eng);
    mq_lin_prim *p = NULL;
    MQ_TRY(get_prim(l, mq_bucket_rows(M), &p));
    const void *src = xq;
    if (l->emulated) MQ_TRY(centered_f32(l, s, xq, M, &src));
    return execute(l, s, p, src, residual, y);
}

int mq_linear_static_input(const mq_linear *l, float *scale, int32_t *zero_point) {
    if (!l || l->spec.kind != MQ_LINEAR_INT8 || l->spec.act_mode != MQ_ACT_STATIC || l->act_mul) return 0;
    if (scale) *scale = l->src_scale;
    if (zero_point) *zero_point = l->src_zp;
    return 1;
}

int mq_linear_output_u8(const mq_linear *l) { return l && l->out_u8; }

mq_status mq_linear_set_output_u8(mq_linear *l, float scale, int32_t zero_point) {
    if (!l) return mq_set_error(MQ_ERR_ARG, "linear: NULL");
    if (l->spec.kind != MQ_LINEAR_INT8)
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
    mq_lin_prim *p = NULL;
    mq_status st = get_prim(l, mq_bucket_rows(256), &p);
    if (st != MQ_OK) {
        l->out_u8 = 0;
        mq_linear_reset(l);
    }
    return st;
}

static mq_status execute(mq_linear *l, mq_linear_scratch *s, mq_lin_prim *p, const void *src, const float *residual,
                         void *y) {
    const int64_t K = l->K;
    if (l->spec.kind == MQ_LINEAR_W8 || l->spec.kind == MQ_LINEAR_W4) {
        MQ_TRY(mq_buffer_reserve(&s->w_deq, (size_t)l->N * (size_t)K, sizeof(float)));
        if (l->spec.kind == MQ_LINEAR_W8)
            mq_dequantize_weight_s8(l->w_store, l->N, K, l->w_scales, l->spec.w_per_channel, s->w_deq.ptr);
        else
            mq_dequantize_weight_s4(l->w_store, l->N, K, l->spec.group_size, l->w_scales, s->w_deq.ptr);
        SET(l->w_mem, s->w_deq.ptr);
    }
    MQ_TRY(mq_buffer_reserve(&s->scratchpad, p->scratch_bytes ? p->scratch_bytes : 1, 1));
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
    if (l->spec.kind == MQ_LINEAR_INT8) {
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
    if (p->epi) {
        dnnl_exec_arg_t eargs[6];
        int ne = 0, po = 0;
        eargs[ne++] = (dnnl_exec_arg_t){DNNL_ARG_SRC_0, p->dst};
        eargs[ne++] = (dnnl_exec_arg_t){DNNL_ARG_SRC_1, p->row_scale};
        eargs[ne++] = (dnnl_exec_arg_t){DNNL_ARG_DST, p->dst};
        eargs[ne++] = (dnnl_exec_arg_t){DNNL_ARG_SCRATCHPAD, p->scratch};
        if (l->bias_po_mem)
            eargs[ne++] = (dnnl_exec_arg_t){DNNL_ARG_ATTR_MULTIPLE_POST_OP(po++) | DNNL_ARG_SRC_1, l->bias_po_mem};
        if (l->spec.epilogue == MQ_EPI_RESIDUAL)
            eargs[ne++] = (dnnl_exec_arg_t){DNNL_ARG_ATTR_MULTIPLE_POST_OP(po) | DNNL_ARG_SRC_1, p->residual};
        MQ_DNNL(dnnl_primitive_execute(p->epi, mq_engine_stream(l->eng), ne, eargs));
    }
    MQ_DNNL(dnnl_stream_wait(mq_engine_stream(l->eng)));
    return MQ_OK;
}

int64_t mq_linear_in(const mq_linear *l) { return l->K; }
int64_t mq_linear_out(const mq_linear *l) { return l->N; }

size_t mq_linear_nbytes(const mq_linear *l) {
    size_t b = 0;
    if (l->w_store)
        b += l->w_store_bytes;
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
