/* py_common.c - array checks and status -> exception for the binding (py_common.h). */
#include "py_common.h"

#include "linear.h"

PyObject *mq_py_raise(mq_status st) {
    PyObject *exc = PyExc_RuntimeError;
    switch (st) {
        case MQ_ERR_ARG: exc = PyExc_ValueError; break;
        case MQ_ERR_NOMEM: exc = PyExc_MemoryError; break;
        case MQ_ERR_NUMERIC: exc = PyExc_ValueError; break;
        default: break;
    }
    const char *msg = mq_last_error();
    PyErr_SetString(exc, msg && msg[0] ? msg : mq_status_name(st));
    return NULL;
}

PyArrayObject *mq_py_array(PyObject *obj, int type, int ndim, const npy_intp *dims, const char *name) {
    if (!PyArray_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s must be a numpy array, got %s", name, Py_TYPE(obj)->tp_name);
        return NULL;
    }
    PyArrayObject *a = (PyArrayObject *)obj;
    if (PyArray_TYPE(a) != type) {
        PyArray_Descr *want = PyArray_DescrFromType(type);
        PyErr_Format(PyExc_TypeError, "%s must have dtype %S, got %S", name, (PyObject *)want, (PyObject *)PyArray_DESCR(a));
        Py_XDECREF(want);
        return NULL;
    }
    if (PyArray_ISBYTESWAPPED(a)) {
        PyErr_Format(PyExc_ValueError, "%s must be in the machine's byte order, got %S: pass a.astype(a.dtype.newbyteorder('='))",
                     name, (PyObject *)PyArray_DESCR(a));
        return NULL;
    }
    if (PyArray_NDIM(a) != ndim) {
        PyErr_Format(PyExc_ValueError, "%s must be %d-dimensional, got %d dimensions", name, ndim, PyArray_NDIM(a));
        return NULL;
    }
    for (int i = 0; i < ndim; i++)
        if (dims && dims[i] >= 0 && PyArray_DIM(a, i) != dims[i]) {
            PyErr_Format(PyExc_ValueError, "%s has size %zd in dimension %d, expected %zd", name,
                         (Py_ssize_t)PyArray_DIM(a, i), i, (Py_ssize_t)dims[i]);
            return NULL;
        }
    if (!PyArray_IS_C_CONTIGUOUS(a) || !PyArray_ISALIGNED(a)) {
        PyErr_Format(PyExc_ValueError,
                     "%s must be C-contiguous and aligned: pass numpy.require(a, requirements='CA') or a.copy() "
                     "(numpy.ascontiguousarray returns a misaligned array unchanged)", name);
        return NULL;
    }
    return a;
}

PyArrayObject *mq_py_opt_array(PyObject *obj, int type, int ndim, const npy_intp *dims, const char *name, int *ok) {
    *ok = 1;
    if (obj == NULL || obj == Py_None) return NULL;
    PyArrayObject *a = mq_py_array(obj, type, ndim, dims, name);
    if (!a) *ok = 0;
    return a;
}

int mq_py_weight_npy_type(int weight_format) {
    static const int types[MQ_WEIGHT_FORMAT_COUNT] = {
        [MQ_WEIGHTS_F32] = NPY_FLOAT32, [MQ_WEIGHTS_S8] = NPY_INT8, [MQ_WEIGHTS_S4_PACKED] = NPY_UINT8};
    return types[weight_format];
}
