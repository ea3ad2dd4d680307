/* status.c - the thread-local last-error message, status names, checked size arithmetic and aligned allocation. */
#include "status.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static _Thread_local char mq_errmsg[1024];

mq_status mq_set_error(mq_status code, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(mq_errmsg, sizeof mq_errmsg, fmt, ap);
    va_end(ap);
    return code;
}

const char *mq_last_error(void) { return mq_errmsg; }

const char *mq_status_name(mq_status code) {
    switch (code) {
        case MQ_OK: return "ok";
        case MQ_ERR_ARG: return "invalid argument";
        case MQ_ERR_NOMEM: return "out of memory";
        case MQ_ERR_DNNL: return "oneDNN error";
        case MQ_ERR_STATE: return "invalid state";
        case MQ_ERR_NUMERIC: return "non-finite value";
    }
    return "unknown";
}

const char *mq_dnnl_status_name(dnnl_status_t st) {
    switch (st) {
        case dnnl_success: return "success";
        case dnnl_out_of_memory: return "out of memory";
        case dnnl_invalid_arguments: return "invalid arguments";
        case dnnl_unimplemented: return "unimplemented";
        case dnnl_last_impl_reached: return "last implementation reached";
        case dnnl_runtime_error: return "runtime error";
        case dnnl_not_required: return "not required";
        default: return "other";
    }
}

int mq_size_mul(size_t a, size_t b, size_t *out) {
    if (a != 0 && b > SIZE_MAX / a) return 0;
    *out = a * b;
    return 1;
}

int mq_size_mul3(size_t a, size_t b, size_t c, size_t *out) {
    size_t ab;
    return mq_size_mul(a, b, &ab) && mq_size_mul(ab, c, out);
}

void *mq_alloc_uninit(size_t bytes) {
    if (bytes == 0) bytes = 64;
    if (bytes > SIZE_MAX - 63) return NULL;
    return aligned_alloc(64, (bytes + 63) & ~(size_t)63);
}

void *mq_alloc(size_t count, size_t elem_size) {
    size_t bytes;
    if (!mq_size_mul(count, elem_size, &bytes)) return NULL;
    void *p = mq_alloc_uninit(bytes);
    if (p) memset(p, 0, bytes ? bytes : 1);
    return p;
}

void mq_free(void *p) { free(p); }

mq_status mq_dnnl_check(dnnl_status_t st, const char *call, const char *file, int line) {
    if (st == dnnl_success) return MQ_OK;
    return mq_set_error(MQ_ERR_DNNL, "oneDNN error %d (%s) in %s at %s:%d", (int)st, mq_dnnl_status_name(st), call,
                        file, line);
}
