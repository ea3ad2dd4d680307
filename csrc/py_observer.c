/* py_observer.c - the Python type medquant._core.Observer over mq_observer (observer.h). */
#include "py_observer.h"

int mq_py_observer_busy_error(void) {
    PyErr_SetString(PyExc_RuntimeError,
                    "Observer is in use by another thread (an Observer must not be used concurrently)");
    return 0;
}

static int Observer_init(ObserverObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"nbins", "momentum", NULL};
    int nbins = 2048;
    float momentum = 0.f;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|if", kwlist, &nbins, &momentum)) return -1;
    if (self->busy) return mq_py_observer_busy_error(), -1;
    if (self->obs) { mq_observer_destroy(self->obs); self->obs = NULL; }
    mq_status st = mq_observer_create(&self->obs, nbins, momentum);
    if (st != MQ_OK) { mq_py_raise(st); return -1; }
    return 0;
}

static void Observer_dealloc(ObserverObject *self) {
    PyTypeObject *tp = Py_TYPE(self);
    mq_observer_destroy(self->obs);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

static int observer_ready(ObserverObject *self) {
    if (!self->obs) { PyErr_SetString(PyExc_RuntimeError, "Observer is not initialised"); return 0; }
    if (self->busy) return mq_py_observer_busy_error();
    return 1;
}

static PyObject *Observer_update(ObserverObject *self, PyObject *arg) {
    if (!observer_ready(self)) return NULL;
    if (!PyArray_Check(arg)) return PyErr_Format(PyExc_TypeError, "x must be a numpy array");
    PyArrayObject *a = (PyArrayObject *)arg;
    int nd = PyArray_NDIM(a);
    if (nd != 1 && nd != 2) return PyErr_Format(PyExc_ValueError, "x must be 1- or 2-dimensional");
    if (!mq_py_array(arg, NPY_FLOAT32, nd, NULL, "x")) return NULL;
    mq_status st;
    const float *p = PyArray_DATA(a);
    self->busy = 1;
    if (nd == 2) {
        size_t r = (size_t)PyArray_DIM(a, 0), c = (size_t)PyArray_DIM(a, 1);
        Py_BEGIN_ALLOW_THREADS
        st = mq_observer_update_matrix(self->obs, p, r, c);
        Py_END_ALLOW_THREADS
    } else {
        size_t n = (size_t)PyArray_DIM(a, 0);
        Py_BEGIN_ALLOW_THREADS
        st = mq_observer_update(self->obs, p, n);
        Py_END_ALLOW_THREADS
    }
    self->busy = 0;
    if (st != MQ_OK) return mq_py_raise(st);
    Py_RETURN_NONE;
}

static PyObject *Observer_minmax(ObserverObject *self, PyObject *Py_UNUSED(ignored)) {
    if (!observer_ready(self)) return NULL;
    float lo, hi;
    mq_status st = mq_observer_minmax(self->obs, &lo, &hi);
    if (st != MQ_OK) return mq_py_raise(st);
    return Py_BuildValue("(ff)", lo, hi);
}

static PyObject *Observer_moving_minmax(ObserverObject *self, PyObject *Py_UNUSED(ignored)) {
    if (!observer_ready(self)) return NULL;
    float lo, hi;
    mq_status st = mq_observer_moving_minmax(self->obs, &lo, &hi);
    if (st != MQ_OK) return mq_py_raise(st);
    return Py_BuildValue("(ff)", lo, hi);
}

static PyObject *Observer_count(ObserverObject *self, PyObject *Py_UNUSED(ignored)) {
    if (!observer_ready(self)) return NULL;
    return PyLong_FromUnsignedLongLong((unsigned long long)mq_observer_count(self->obs));
}

static PyObject *Observer_reset(ObserverObject *self, PyObject *Py_UNUSED(ignored)) {
    if (!observer_ready(self)) return NULL;
    mq_status st = mq_observer_reset(self->obs);
    if (st != MQ_OK) return mq_py_raise(st);
    Py_RETURN_NONE;
}

static PyObject *Observer_histogram(ObserverObject *self, PyObject *Py_UNUSED(ignored)) {
    if (!observer_ready(self)) return NULL;
    const double *counts;
    int nbins;
    float lo, hi;
    mq_status st = mq_observer_histogram(self->obs, &counts, &nbins, &lo, &hi);
    if (st != MQ_OK) return mq_py_raise(st);
    npy_intp d = nbins;
    PyObject *arr = PyArray_SimpleNew(1, &d, NPY_FLOAT64);
    if (!arr) return NULL;
    memcpy(PyArray_DATA((PyArrayObject *)arr), counts, (size_t)nbins * sizeof(double));
    return Py_BuildValue("(Nff)", arr, lo, hi);
}

static PyObject *Observer_column_absmax(ObserverObject *self, PyObject *Py_UNUSED(ignored)) {
    if (!observer_ready(self)) return NULL;
    const float *am;
    size_t cols;
    mq_status st = mq_observer_column_absmax(self->obs, &am, &cols);
    if (st != MQ_OK) return mq_py_raise(st);
    npy_intp d = (npy_intp)cols;
    PyObject *arr = PyArray_SimpleNew(1, &d, NPY_FLOAT32);
    if (!arr) return NULL;
    memcpy(PyArray_DATA((PyArrayObject *)arr), am, cols * sizeof(float));
    return arr;
}

static PyObject *Observer_track_moments(ObserverObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"gram", NULL};
    int gram = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|p", kwlist, &gram)) return NULL;
    if (!observer_ready(self)) return NULL;
    mq_status st = mq_observer_track_moments(self->obs, gram);
    if (st != MQ_OK) return mq_py_raise(st);
    Py_RETURN_NONE;
}

static mq_moments *tracked_moments(ObserverObject *self) {
    if (!observer_ready(self)) return NULL;
    mq_moments *m = mq_observer_moments(self->obs);
    if (!m) PyErr_SetString(PyExc_ValueError, "this Observer does not track moments (call track_moments() first)");
    return m;
}

static PyObject *Observer_set_grid(ObserverObject *self, PyObject *args) {
    float scale;
    int zp;
    if (!PyArg_ParseTuple(args, "fi", &scale, &zp)) return NULL;
    mq_moments *m = tracked_moments(self);
    if (!m) return NULL;
    mq_status st = mq_moments_set_grid(m, scale, (int32_t)zp);
    if (st != MQ_OK) return mq_py_raise(st);
    Py_RETURN_NONE;
}

/* A new float64 array [n] or [n, n] holding a copy of src (None if src is NULL). */
static PyObject *doubles_or_none(const double *src, size_t n, int square) {
    if (!src) Py_RETURN_NONE;
    npy_intp d[2] = {(npy_intp)n, (npy_intp)n};
    PyObject *arr = PyArray_SimpleNew(square ? 2 : 1, d, NPY_FLOAT64);
    if (!arr) return NULL;
    memcpy(PyArray_DATA((PyArrayObject *)arr), src, (square ? n * n : n) * sizeof(double));
    return arr;
}

static PyObject *Observer_moments(ObserverObject *self, PyObject *Py_UNUSED(ignored)) {
    mq_moments *m = tracked_moments(self);
    if (!m) return NULL;
    mq_moments_view v;
    mq_moments_get(m, &v);
    if (!v.rows) return PyErr_Format(PyExc_ValueError, "the Observer has seen no matrix rows yet");
    PyObject *cs = doubles_or_none(v.col_sum, v.cols, 0);
    PyObject *gs = cs ? doubles_or_none(v.grid_col_sum, v.cols, 0) : NULL;
    PyObject *g = gs ? doubles_or_none(v.gram, v.cols, 1) : NULL;
    if (!g) {
        Py_XDECREF(cs);
        Py_XDECREF(gs);
        return NULL;
    }
    return Py_BuildValue("{s:K,s:N,s:N,s:N}", "rows", (unsigned long long)v.rows, "column_sum", cs,
                         "grid_column_sum", gs, "gram", g);
}

static PyObject *Observer_compute_range(ObserverObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"method", "param", "symmetric", "levels", NULL};
    int method, symmetric = 0, levels = 256;
    double param = 0.0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "i|dpi", kwlist, &method, &param, &symmetric, &levels)) return NULL;
    if (!observer_ready(self)) return NULL;
    float lo, hi;
    mq_status st;
    self->busy = 1;
    Py_BEGIN_ALLOW_THREADS
    st = mq_observer_compute_range(self->obs, (mq_range_method)method, param, symmetric, levels, &lo, &hi);
    Py_END_ALLOW_THREADS
    self->busy = 0;
    if (st != MQ_OK) return mq_py_raise(st);
    return Py_BuildValue("(ff)", lo, hi);
}

static PyMethodDef Observer_methods[] = {
    {"update", (PyCFunction)Observer_update, METH_O, "update(x): observe a float32 array (2-D also tracks per-column absmax)"},
    {"minmax", (PyCFunction)Observer_minmax, METH_NOARGS, "running (min, max)"},
    {"moving_minmax", (PyCFunction)Observer_moving_minmax, METH_NOARGS, "moving-average (min, max)"},
    {"count", (PyCFunction)Observer_count, METH_NOARGS, "number of values observed"},
    {"reset", (PyCFunction)Observer_reset, METH_NOARGS, "forget everything observed"},
    {"histogram", (PyCFunction)Observer_histogram, METH_NOARGS, "(counts float64[nbins], lo, hi)"},
    {"column_absmax", (PyCFunction)Observer_column_absmax, METH_NOARGS, "per-column max |x| (2-D updates only)"},
    {"track_moments", (PyCFunction)(void (*)(void))Observer_track_moments, METH_VARARGS | METH_KEYWORDS,
     "track_moments(gram=False): also keep column sums (and the Gram matrix X^T X) of every 2-D input, from the start"},
    {"set_grid", (PyCFunction)Observer_set_grid, METH_VARARGS,
     "set_grid(scale, zero_point): also sum the inputs as the u8 grid quantizes them (before the first update)"},
    {"moments", (PyCFunction)Observer_moments, METH_NOARGS,
     "{'rows', 'column_sum', 'grid_column_sum' (None without a grid), 'gram' (None unless tracked)} as float64"},
    {"compute_range", (PyCFunction)(void (*)(void))Observer_compute_range, METH_VARARGS | METH_KEYWORDS,
     "compute_range(method, param=0, symmetric=False, levels=256) -> (lo, hi)"},
    {NULL, NULL, 0, NULL}};

static PyType_Slot Observer_slots[] = {
    {Py_tp_init, Observer_init},
    {Py_tp_dealloc, Observer_dealloc},
    {Py_tp_methods, Observer_methods},
    {Py_tp_new, PyType_GenericNew},
    {Py_tp_doc, "Observer(nbins=2048, momentum=0.0): calibration statistics of one activation site (C core)."},
    {0, NULL}};

PyType_Spec mq_py_observer_spec = {"medquant._core.Observer", sizeof(ObserverObject), 0,
                                    Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE, Observer_slots};

