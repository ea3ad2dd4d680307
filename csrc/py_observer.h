/* py_observer.h - the Observer type (calibration statistics of one activation site), shared with Encoder.forward,
 * which feeds observers while the GIL is released. */
#ifndef MQ_PY_OBSERVER_H
#define MQ_PY_OBSERVER_H

#include "py_common.h"
#include "observer.h"

/* An observer is not for concurrent use (observer.h).  Calls that release the GIL while using `obs` (update,
 * compute_range, an Encoder.forward that feeds it) mark it busy first; every method refuses a busy observer with
 * RuntimeError instead of racing on (or freeing) its buffers.  `busy` is only read and written with the GIL held. */
typedef struct {
    PyObject_HEAD
    mq_observer *obs;
    int busy;
} ObserverObject;

/* Raises RuntimeError: the observer is busy in another call; returns 0. */
int mq_py_observer_busy_error(void);

#endif
