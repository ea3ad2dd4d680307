/* py_common.h - what every file of the CPython / NumPy binding shares: array checks, status -> exception, the
 * module state, and each Python type's spec. The binding parses, validates, converts, releases the GIL and
 * delegates to the core; it computes nothing. */
#ifndef MQ_PY_COMMON_H
#define MQ_PY_COMMON_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

/* one NumPy C-API table for the whole extension, imported by py_module.c */
#define PY_ARRAY_UNIQUE_SYMBOL mq_numpy_api
#ifndef MQ_PY_MODULE_MAIN
#define NO_IMPORT_ARRAY
#endif
#include <numpy/arrayobject.h>

#include "status.h"

/* Module state: the module's own Observer type, against which Encoder's observer_type is checked. */
typedef struct {
    PyTypeObject *observer_type;
} mq_py_state;

/* Raises the Python exception for a core status (ValueError for bad arguments and non-finite values,
 * MemoryError, RuntimeError otherwise) with the core's message; returns NULL. */
PyObject *mq_py_raise(mq_status st);
/* obj as an ndarray of `type`, `ndim` dims (dims[i] < 0: any size), C-contiguous and aligned; else NULL with
 * TypeError / ValueError naming `name`. Borrowed. */
PyArrayObject *mq_py_array(PyObject *obj, int type, int ndim, const npy_intp *dims, const char *name);
/* Like mq_py_array, but None (or NULL) gives NULL with *ok = 1; *ok = 0 on error. */
PyArrayObject *mq_py_opt_array(PyObject *obj, int type, int ndim, const npy_intp *dims, const char *name, int *ok);
/* The NumPy type of a core weight format (mq_weight_format). */
int mq_py_weight_npy_type(int weight_format);

extern PyType_Spec mq_py_observer_spec; /* py_observer.c */
extern PyType_Spec mq_py_encoder_spec;  /* py_encoder.c */
extern PyType_Spec mq_py_linear_spec;   /* py_linear.c */

#endif
