/* status.h - status codes, the thread-local last-error message, and the macro that checks every oneDNN call. */
#ifndef MQ_STATUS_H
#define MQ_STATUS_H

#include <stddef.h>
#include <stdint.h>

#include "oneapi/dnnl/dnnl.h"

typedef enum {
    MQ_OK = 0,
    MQ_ERR_ARG = 1,     /* invalid argument: shape, dtype, range, combination */
    MQ_ERR_NOMEM = 2,   /* allocation failed or a size would overflow */
    MQ_ERR_DNNL = 3,    /* a oneDNN call failed */
    MQ_ERR_STATE = 4,   /* call made in the wrong state (e.g. encoder not finalized) */
    MQ_ERR_NUMERIC = 5  /* NaN or Inf where finite values are required */
} mq_status;

/* Records a formatted message for the calling thread and returns `code`. */
mq_status mq_set_error(mq_status code, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* The calling thread's last message ("" if none). */
const char *mq_last_error(void);
const char *mq_status_name(mq_status code);

/* The one way oneDNN statuses are checked: MQ_DNNL_STATUS(call) runs the call and converts its status, recording the
   call's text, file and line as the message on failure. MQ_DNNL returns it from the enclosing function; in a function
   with cleanup, MQ_TRY_GOTO(st, MQ_DNNL_STATUS(call), done) stores it and jumps. */
mq_status mq_dnnl_check(dnnl_status_t st, const char *call, const char *file, int line);
#define MQ_DNNL_STATUS(call) mq_dnnl_check((call), #call, __FILE__, __LINE__)
#define MQ_DNNL(call) MQ_TRY(MQ_DNNL_STATUS(call))

/* Propagates a non-OK mq_status from the enclosing function. */
#define MQ_TRY(call)                      \
    do {                                  \
        mq_status mq_st_ = (call);        \
        if (mq_st_ != MQ_OK) return mq_st_; \
    } while (0)

/* Stores a non-OK mq_status in st and jumps to label (for functions that release what they built). */
#define MQ_TRY_GOTO(st, call, label)        \
    do {                                    \
        if (((st) = (call)) != MQ_OK) goto label; \
    } while (0)

const char *mq_dnnl_status_name(dnnl_status_t st);

/* Overflow-checked size arithmetic: return 0 on overflow (and leave *out untouched). */
int mq_size_mul(size_t a, size_t b, size_t *out);
int mq_size_mul3(size_t a, size_t b, size_t c, size_t *out);

/* Allocation helpers: 64-byte aligned, zero-filled; NULL on overflow or failure. Free with mq_free. */
void *mq_alloc(size_t count, size_t elem_size);
/* 64-byte aligned, NOT zeroed (for buffers written before they are read); NULL on failure. Free with mq_free. */
void *mq_alloc_uninit(size_t bytes);
void mq_free(void *p);

#endif
