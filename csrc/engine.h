/* engine.h - the oneDNN CPU engine and stream an encoder runs on, its thread count, and runtime facts. */
#ifndef MQ_ENGINE_H
#define MQ_ENGINE_H

#include "status.h"

typedef struct mq_engine mq_engine;

/* n_threads <= 0 means "all available": the CPUs this process may run on (omp_get_num_procs()). More threads than
   that is refused (MQ_ERR_ARG): they only add contention, and when creating them fails GNU OpenMP ends the process. */
mq_status mq_engine_create(mq_engine **out, int n_threads);
void mq_engine_destroy(mq_engine *eng);

dnnl_engine_t mq_engine_dnnl(const mq_engine *eng);
dnnl_stream_t mq_engine_stream(const mq_engine *eng);
int mq_engine_threads(const mq_engine *eng);
mq_status mq_engine_set_threads(mq_engine *eng, int n_threads);
/* Applies the engine's thread count to the calling thread (OpenMP ICVs are per thread). */
void mq_engine_enter(const mq_engine *eng);

/* Makes fork() safe for the OpenMP runtime, once per process (later calls do nothing). GNU OpenMP keeps a pool of
   worker threads per thread that ran a parallel region; a child process inherits the forking thread's pool but not
   its threads, so the child's first parallel region from that thread waits for them forever. This registers a
   pthread_atfork handler that, just before any fork, releases the forking thread's pool (omp_pause_resource_all):
   the child, and the parent's next parallel region, start fresh threads. Process-wide by nature: the pool belongs
   to the OpenMP runtime, not to an engine. */
mq_status mq_threads_fork_safe(void);

/* Whether oneDNN's int8 matmul computes u8 x s8 products exactly on this CPU: 1 yes, 0 no (kernels without VNNI/AMX
   add pairs of products in saturating 16-bit arithmetic), -1 not measured yet. linear.c measures it on the first int8
   layer and records it here, once per engine. */
int mq_engine_int8_exact(const mq_engine *eng);
void mq_engine_set_int8_exact(mq_engine *eng, int exact);

/* Whether oneDNN's matmul kernels on this CPU may round a row differently depending on the row count of the call:
   1 below avx512_core (measured on AVX2: the f32 kernels for 1-15 rows, for several hundred rows at large K x N,
   and the last rows of a 32-row call accumulate in another order than a 64-row call), 0 from avx512_core on. Linear layers then use the uniform
   row plan (workspace.h), so results do not depend on the batch. */
int mq_engine_rows_vary(const mq_engine *eng);

/* Creates a primitive from a descriptor with the user-managed scratchpad the caller provides at execution.
   Grows *scratch_bytes to the largest scratchpad seen. Destroys pd. */
mq_status mq_primitive_from_pd(dnnl_primitive_desc_t pd, dnnl_primitive_t *prim, size_t *scratch_bytes);
/* A primitive attribute with user scratchpad mode set; caller destroys it. */
mq_status mq_attr_create(dnnl_primitive_attr_t *attr);
/* Name of the implementation a primitive descriptor selected (e.g. "brg:avx512_core_vnni"). */
const char *mq_pd_impl_name(const_dnnl_primitive_desc_t pd);

typedef struct {
    int version_major, version_minor, version_patch;
    const char *version_hash;
    const char *cpu_runtime;   /* "OpenMP", "TBB", "sequential", ... */
    const char *cpu_isa;       /* effective ISA name */
    int max_threads;
} mq_runtime_info;

void mq_runtime_info_get(mq_runtime_info *info);

#endif
