/* layernorm.c - LayerNorm on oneDNN with primitives per row bucket (layernorm.h). */
#include "layernorm.h"

#include <stdlib.h>
#include <string.h>

/* The primitive for one row bucket; all memory handles are set per call. */
typedef struct {
    dnnl_primitive_t prim;
    size_t scratch_bytes;
    dnnl_memory_t src, dst, gamma, beta, mean, var, scratch;
} mq_ln_prim;

struct mq_layernorm {
    mq_engine *eng; /* borrowed */
    int64_t hidden;
    float eps;
    mq_prim_cache prims;
    mq_buffer stats; /* mean and variance of the rows (oneDNN wants them as outputs) */
};

static void free_prim(void *entry) {
    mq_ln_prim *p = entry;
    if (p->prim) dnnl_primitive_destroy(p->prim);
    dnnl_memory_t mems[7] = {p->src, p->dst, p->gamma, p->beta, p->mean, p->var, p->scratch};
    for (int j = 0; j < 7; j++)
        if (mems[j]) dnnl_memory_destroy(mems[j]);
    memset(p, 0, sizeof *p);
}

/* Handle-less memories for every argument of the primitive pd (md: the [rows, hidden] rows, smd: gamma / beta). */
static mq_status create_memories(mq_ln_prim *p, dnnl_engine_t eng, const_dnnl_primitive_desc_t pd,
                                 const_dnnl_memory_desc_t md, const_dnnl_memory_desc_t smd) {
    const_dnnl_memory_desc_t mmd = dnnl_primitive_desc_query_md(pd, dnnl_query_exec_arg_md, DNNL_ARG_MEAN);
    const_dnnl_memory_desc_t vmd = dnnl_primitive_desc_query_md(pd, dnnl_query_exec_arg_md, DNNL_ARG_VARIANCE);
    MQ_DNNL(dnnl_memory_create(&p->src, md, eng, DNNL_MEMORY_NONE));
    MQ_DNNL(dnnl_memory_create(&p->dst, md, eng, DNNL_MEMORY_NONE));
    MQ_DNNL(dnnl_memory_create(&p->gamma, smd, eng, DNNL_MEMORY_NONE));
    MQ_DNNL(dnnl_memory_create(&p->beta, smd, eng, DNNL_MEMORY_NONE));
    if (mmd && dnnl_memory_desc_get_size(mmd)) MQ_DNNL(dnnl_memory_create(&p->mean, mmd, eng, DNNL_MEMORY_NONE));
    if (vmd && dnnl_memory_desc_get_size(vmd)) MQ_DNNL(dnnl_memory_create(&p->var, vmd, eng, DNNL_MEMORY_NONE));
    MQ_DNNL(dnnl_memory_create(&p->scratch, dnnl_primitive_desc_query_md(pd, dnnl_query_scratchpad_md, 0), eng,
                               DNNL_MEMORY_NONE));
    return MQ_OK;
}

static mq_status build_prim(void *owner, int64_t rows, void *entry) {
    mq_layernorm *ln = owner;
    mq_ln_prim *p = entry;
    dnnl_engine_t eng = mq_engine_dnnl(ln->eng);
    dnnl_memory_desc_t md = NULL, smd = NULL;
    dnnl_primitive_attr_t attr = NULL;
    dnnl_primitive_desc_t pd = NULL;
    dnnl_dims_t dims = {rows, ln->hidden}, sdims = {ln->hidden};
    mq_status st = MQ_OK;
    MQ_TRY_GOTO(st, mq_attr_create(&attr), done);
    MQ_TRY_GOTO(st, MQ_DNNL_STATUS(dnnl_memory_desc_create_with_tag(&md, 2, dims, dnnl_f32, dnnl_ab)), done);
    MQ_TRY_GOTO(st, MQ_DNNL_STATUS(dnnl_memory_desc_create_with_tag(&smd, 1, sdims, dnnl_f32, dnnl_a)), done);
    MQ_TRY_GOTO(st, MQ_DNNL_STATUS(dnnl_layer_normalization_forward_primitive_desc_create(
                        &pd, eng, dnnl_forward_inference, md, md, NULL, ln->eps, dnnl_use_scale | dnnl_use_shift, attr)),
                done);
    st = create_memories(p, eng, pd, md, smd);
    mq_status st2 = mq_primitive_from_pd(pd, &p->prim, &p->scratch_bytes); /* destroys pd */
    if (st == MQ_OK) st = st2;
done:
    if (attr) dnnl_primitive_attr_destroy(attr);
    dnnl_memory_desc_destroy(md);
    dnnl_memory_desc_destroy(smd);
    return st;
}

mq_status mq_layernorm_create(mq_layernorm **out, mq_engine *eng, int64_t hidden, float eps) {
    if (!out || !eng) return mq_set_error(MQ_ERR_ARG, "layernorm: NULL argument");
    *out = NULL;
    if (hidden <= 0 || !(eps > 0.f)) return mq_set_error(MQ_ERR_ARG, "layernorm: bad hidden %lld / eps %g",
                                                         (long long)hidden, (double)eps);
    mq_layernorm *ln = calloc(1, sizeof *ln);
    if (!ln) return mq_set_error(MQ_ERR_NOMEM, "layernorm: out of memory");
    ln->eng = eng;
    ln->hidden = hidden;
    ln->eps = eps;
    mq_prim_cache_init(&ln->prims, sizeof(mq_ln_prim), build_prim, free_prim);
    *out = ln;
    return MQ_OK;
}

void mq_layernorm_reset(mq_layernorm *ln) {
    if (ln) mq_prim_cache_clear(&ln->prims);
}

size_t mq_layernorm_scratch_bytes(const mq_layernorm *ln) { return ln->stats.bytes; }
void mq_layernorm_release_scratch(mq_layernorm *ln) { mq_buffer_release(&ln->stats); }

void mq_layernorm_destroy(mq_layernorm *ln) {
    if (!ln) return;
    mq_prim_cache_release(&ln->prims);
    mq_buffer_release(&ln->stats);
    free(ln);
}

#define SET(mem, ptr) MQ_DNNL(dnnl_memory_set_data_handle((mem), (void *)(ptr)))

mq_status mq_layernorm_forward(mq_layernorm *ln, mq_linear_scratch *s, int64_t T, const float *src, float *dst,
                               const float *gamma, const float *beta) {
    const int64_t rows = mq_bucket_rows(T);
    void *entry = NULL;
    MQ_TRY(mq_prim_cache_get(&ln->prims, ln, rows, &entry));
    mq_ln_prim *p = entry;
    MQ_TRY(mq_buffer_reserve(&s->scratchpad, p->scratch_bytes ? p->scratch_bytes : 1, 1));
    MQ_TRY(mq_buffer_reserve(&ln->stats, 2 * (size_t)rows, sizeof(float)));
    SET(p->src, src);
    SET(p->dst, dst);
    SET(p->gamma, gamma);
    SET(p->beta, beta);
    SET(p->scratch, s->scratchpad.ptr);
    dnnl_exec_arg_t args[7] = {{DNNL_ARG_SRC, p->src}, {DNNL_ARG_DST, p->dst}, {DNNL_ARG_SCALE, p->gamma},
                               {DNNL_ARG_SHIFT, p->beta}, {DNNL_ARG_SCRATCHPAD, p->scratch}};
    int n = 5;
    if (p->mean) {
        SET(p->mean, ln->stats.ptr);
        args[n++] = (dnnl_exec_arg_t){DNNL_ARG_MEAN, p->mean};
    }
    if (p->var) {
        SET(p->var, (float *)ln->stats.ptr + rows);
        args[n++] = (dnnl_exec_arg_t){DNNL_ARG_VARIANCE, p->var};
    }
    MQ_DNNL(dnnl_primitive_execute(p->prim, mq_engine_stream(ln->eng), n, args));
    MQ_DNNL(dnnl_stream_wait(mq_engine_stream(ln->eng)));
    return MQ_OK;
}
