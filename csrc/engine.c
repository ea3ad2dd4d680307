/* engine.c - the oneDNN CPU engine and stream, thread count, primitive creation helpers and runtime facts (engine.h). */
#include "engine.h"

#include <omp.h>
#include <pthread.h>
#include <stdlib.h>

struct mq_engine {
    dnnl_engine_t engine;
    dnnl_stream_t stream;
    int n_threads;
    int int8_exact; /* -1 until linear.c has measured it */
};

mq_status mq_engine_create(mq_engine **out, int n_threads) {
    if (!out) return mq_set_error(MQ_ERR_ARG, "engine: out is NULL");
    *out = NULL;
    mq_engine *eng = calloc(1, sizeof *eng);
    if (!eng) return mq_set_error(MQ_ERR_NOMEM, "engine: out of memory");
    eng->int8_exact = -1;
    mq_status st = mq_engine_set_threads(eng, n_threads);
    if (st != MQ_OK) { free(eng); return st; }
    st = MQ_DNNL_STATUS(dnnl_engine_create(&eng->engine, dnnl_cpu, 0));
    if (st == MQ_OK) st = MQ_DNNL_STATUS(dnnl_stream_create(&eng->stream, eng->engine, dnnl_stream_default_flags));
    if (st != MQ_OK) {
        mq_engine_destroy(eng);
        return st;
    }
    *out = eng;
    return MQ_OK;
}

void mq_engine_destroy(mq_engine *eng) {
    if (!eng) return;
    if (eng->stream) dnnl_stream_destroy(eng->stream);
    if (eng->engine) dnnl_engine_destroy(eng->engine);
    free(eng);
}

dnnl_engine_t mq_engine_dnnl(const mq_engine *eng) { return eng->engine; }
dnnl_stream_t mq_engine_stream(const mq_engine *eng) { return eng->stream; }
int mq_engine_threads(const mq_engine *eng) { return eng->n_threads; }

mq_status mq_engine_set_threads(mq_engine *eng, int n_threads) {
    const int avail = omp_get_num_procs() > 0 ? omp_get_num_procs() : 1;
    if (n_threads > avail)
        return mq_set_error(MQ_ERR_ARG, "n_threads %d exceeds the %d CPUs this process can run on", n_threads, avail);
    eng->n_threads = n_threads > 0 ? n_threads : avail;
    return MQ_OK;
}

void mq_engine_enter(const mq_engine *eng) { omp_set_num_threads(eng->n_threads); }

static void release_pool_before_fork(void) { (void)omp_pause_resource_all(omp_pause_soft); }

static pthread_once_t fork_safe_once = PTHREAD_ONCE_INIT;
static int fork_safe_status; /* pthread_atfork's result, written once under fork_safe_once */

static void register_fork_handler(void) { fork_safe_status = pthread_atfork(release_pool_before_fork, NULL, NULL); }

mq_status mq_threads_fork_safe(void) {
    if (pthread_once(&fork_safe_once, register_fork_handler) != 0 || fork_safe_status != 0)
        return mq_set_error(MQ_ERR_STATE, "cannot register the fork handler of the OpenMP runtime");
    return MQ_OK;
}

int mq_engine_int8_exact(const mq_engine *eng) { return eng->int8_exact; }
void mq_engine_set_int8_exact(mq_engine *eng, int exact) { eng->int8_exact = exact ? 1 : 0; }

int mq_engine_rows_vary(const mq_engine *eng) {
    (void)eng; /* a property of the process's oneDNN (its effective ISA, fixed at its first use), kept per engine */
    const unsigned isa = (unsigned)dnnl_get_effective_cpu_isa();
    return (isa & (unsigned)dnnl_cpu_isa_avx512_core) != (unsigned)dnnl_cpu_isa_avx512_core;
}

mq_status mq_attr_create(dnnl_primitive_attr_t *attr) {
    MQ_DNNL(dnnl_primitive_attr_create(attr));
    mq_status st = MQ_DNNL_STATUS(dnnl_primitive_attr_set_scratchpad_mode(*attr, dnnl_scratchpad_mode_user));
    if (st != MQ_OK) {
        dnnl_primitive_attr_destroy(*attr);
        *attr = NULL;
    }
    return st;
}

mq_status mq_primitive_from_pd(dnnl_primitive_desc_t pd, dnnl_primitive_t *prim, size_t *scratch_bytes) {
    const_dnnl_memory_desc_t smd = dnnl_primitive_desc_query_md(pd, dnnl_query_scratchpad_md, 0);
    size_t need = smd ? dnnl_memory_desc_get_size(smd) : 0;
    mq_status st = MQ_DNNL_STATUS(dnnl_primitive_create(prim, pd));
    dnnl_primitive_desc_destroy(pd);
    MQ_TRY(st);
    if (scratch_bytes && need > *scratch_bytes) *scratch_bytes = need;
    return MQ_OK;
}

const char *mq_pd_impl_name(const_dnnl_primitive_desc_t pd) {
    const char *name = NULL;
    if (dnnl_primitive_desc_query(pd, dnnl_query_impl_info_str, 0, &name) != dnnl_success || !name) return "?";
    return name;
}

static const char *isa_name(dnnl_cpu_isa_t isa) {
    switch (isa) {
        case dnnl_cpu_isa_sse41: return "sse41";
        case dnnl_cpu_isa_avx: return "avx";
        case dnnl_cpu_isa_avx2: return "avx2";
        case dnnl_cpu_isa_avx2_vnni: return "avx2_vnni";
        case dnnl_cpu_isa_avx2_vnni_2: return "avx2_vnni_2";
        case dnnl_cpu_isa_avx512_core: return "avx512_core";
        case dnnl_cpu_isa_avx512_core_vnni: return "avx512_core_vnni";
        case dnnl_cpu_isa_avx512_core_bf16: return "avx512_core_bf16";
        case dnnl_cpu_isa_avx512_core_amx: return "avx512_core_amx";
        case dnnl_cpu_isa_avx512_core_amx_fp16: return "avx512_core_amx_fp16";
        case dnnl_cpu_isa_avx512_core_fp16: return "avx512_core_fp16";
        case dnnl_cpu_isa_default: return "default";
        default: return "other";
    }
}

static const char *runtime_name(unsigned rt) {
    switch (rt) {
        case DNNL_RUNTIME_OMP: return "OpenMP";
        case DNNL_RUNTIME_TBB: return "TBB";
        case DNNL_RUNTIME_SEQ: return "sequential";
        case DNNL_RUNTIME_THREADPOOL: return "threadpool";
        default: return "other";
    }
}

void mq_runtime_info_get(mq_runtime_info *info) {
    const dnnl_version_t *v = dnnl_version();
    info->version_major = v->major;
    info->version_minor = v->minor;
    info->version_patch = v->patch;
    info->version_hash = v->hash;
    info->cpu_runtime = runtime_name(v->cpu_runtime);
    info->cpu_isa = isa_name(dnnl_get_effective_cpu_isa());
    info->max_threads = omp_get_max_threads();
}
