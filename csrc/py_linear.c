/* py_linear.c - the Python type medquant._core.Linear: one linear layer of the core (linear.h) on its own engine,
 * for tests and research. */
#include "py_common.h"

#include "linear.h"

typedef struct {
    PyObject_HEAD
    mq_engine *eng;
    mq_linear *lin;
    mq_linear_scratch scratch;
} LinearObject;

static int Linear_init(LinearObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"kind", "weight", "w_scales", "bias", "act_mul", "act_mode", "act_symmetric", "act_scale",
                             "act_zero_point", "w_per_channel", "group_size", "epilogue", "n_threads", NULL};
    int kind, act_mode = 0, act_sym = 1, act_zp = 0, per_ch = 1, epilogue = 0, n_threads = 0;
    long long group = 0;
    float act_scale = 1.f;
    PyObject *w, *ws = Py_None, *bias = Py_None, *mul = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "iO|OOOipfipLii", kwlist, &kind, &w, &ws, &bias, &mul, &act_mode,
                                     &act_sym, &act_scale, &act_zp, &per_ch, &group, &epilogue, &n_threads))
        return -1;
    if (self->lin) return PyErr_SetString(PyExc_RuntimeError, "Linear already initialised"), -1;
    const mq_linear_traits *t = mq_linear_kind_traits(kind);
    if (!t) return PyErr_Format(PyExc_ValueError, "unknown linear kind %d", kind), -1;
    PyArrayObject *wa = mq_py_array(w, mq_py_weight_npy_type(t->weight_format), 2, NULL, "weight");
    if (!wa) return -1;
    const int per_byte = t->weight_format == MQ_WEIGHTS_S4_PACKED ? 2 : 1;
    npy_intp N = PyArray_DIM(wa, 0), K = PyArray_DIM(wa, 1) * per_byte;
    if (N == 0 || K == 0) return PyErr_SetString(PyExc_ValueError, "weight is empty"), -1;
    int64_t cols = 0, need = 0;
    mq_status st = mq_linear_weight_layout(kind, K, N, per_ch, group, &cols, &need);
    if (st != MQ_OK) return mq_py_raise(st), -1;
    npy_intp dn[1] = {N}, dk[1] = {K}, dsc[1] = {-1};
    int ok;
    PyArrayObject *wsa = mq_py_opt_array(ws, NPY_FLOAT32, 1, dsc, "w_scales", &ok);
    if (!ok) return -1;
    if (need && (!wsa || PyArray_DIM(wsa, 0) != need))
        return PyErr_Format(PyExc_ValueError, "w_scales must have %zd entries", (Py_ssize_t)need), -1;
    PyArrayObject *ba = mq_py_opt_array(bias, NPY_FLOAT32, 1, dn, "bias", &ok);
    if (!ok) return -1;
    PyArrayObject *ma = mq_py_opt_array(mul, NPY_FLOAT32, 1, dk, "act_mul", &ok);
    if (!ok) return -1;
    mq_linear_spec spec = {(mq_linear_kind)kind, (mq_act_mode)act_mode, act_sym, act_scale, act_zp, per_ch, group,
                           (mq_epilogue)epilogue};
    mq_linear_weights lw = {PyArray_DATA(wa), wsa ? PyArray_DATA(wsa) : NULL, ba ? PyArray_DATA(ba) : NULL,
                            ma ? PyArray_DATA(ma) : NULL};
    st = self->eng ? MQ_OK : mq_engine_create(&self->eng, n_threads);
    if (st == MQ_OK) st = mq_linear_create(&self->lin, self->eng, K, N, &spec, &lw);
    if (st != MQ_OK) {
        mq_py_raise(st);
        mq_engine_destroy(self->eng); /* a later __init__ creates it again */
        self->eng = NULL;
        return -1;
    }
    return 0;
}

static void Linear_dealloc(LinearObject *self) {
    PyTypeObject *tp = Py_TYPE(self);
    mq_linear_destroy(self->lin);
    mq_linear_scratch_release(&self->scratch);
    mq_engine_destroy(self->eng);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

static PyObject *Linear_forward(LinearObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"x", "residual", NULL};
    PyObject *xo, *ro = Py_None;
    if (!self->lin) return PyErr_Format(PyExc_RuntimeError, "Linear is not initialised");
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|O", kwlist, &xo, &ro)) return NULL;
    npy_intp K = mq_linear_in(self->lin), N = mq_linear_out(self->lin), dx[2] = {-1, K};
    PyArrayObject *x = mq_py_array(xo, NPY_FLOAT32, 2, dx, "x");
    if (!x) return NULL;
    npy_intp M = PyArray_DIM(x, 0);
    if (M == 0) return PyErr_Format(PyExc_ValueError, "x has no rows");
    npy_intp dy[2] = {M, N};
    int ok;
    PyArrayObject *r = mq_py_opt_array(ro, NPY_FLOAT32, 2, dy, "residual", &ok);
    if (!ok) return NULL;
    PyObject *y = PyArray_SimpleNew(2, dy, mq_linear_output_u8(self->lin) ? NPY_UINT8 : NPY_FLOAT32);
    if (!y) return NULL;
    mq_status st = mq_linear_forward(self->lin, &self->scratch, PyArray_DATA(x), M, r ? PyArray_DATA(r) : NULL,
                                     PyArray_DATA((PyArrayObject *)y));
    if (st != MQ_OK) { Py_DECREF(y); return mq_py_raise(st); }
    return y;
}

static PyObject *Linear_forward_u8(LinearObject *self, PyObject *args) {
    PyObject *xo;
    if (!self->lin) return PyErr_Format(PyExc_RuntimeError, "Linear is not initialised");
    if (!PyArg_ParseTuple(args, "O", &xo)) return NULL;
    npy_intp K = mq_linear_in(self->lin), N = mq_linear_out(self->lin), dx[2] = {-1, K};
    PyArrayObject *x = mq_py_array(xo, NPY_UINT8, 2, dx, "xq");
    if (!x) return NULL;
    npy_intp M = PyArray_DIM(x, 0);
    if (M == 0) return PyErr_Format(PyExc_ValueError, "xq has no rows");
    npy_intp dy[2] = {M, N};
    PyObject *y = PyArray_SimpleNew(2, dy, mq_linear_output_u8(self->lin) ? NPY_UINT8 : NPY_FLOAT32);
    if (!y) return NULL;
    mq_status st = mq_linear_forward_u8(self->lin, &self->scratch, PyArray_DATA(x), M, NULL,
                                        PyArray_DATA((PyArrayObject *)y));
    if (st != MQ_OK) { Py_DECREF(y); return mq_py_raise(st); }
    return y;
}

static PyObject *Linear_set_output_u8(LinearObject *self, PyObject *args) {
    float scale;
    int zp;
    if (!self->lin) return PyErr_Format(PyExc_RuntimeError, "Linear is not initialised");
    if (!PyArg_ParseTuple(args, "fi", &scale, &zp)) return NULL;
    mq_status st = mq_linear_set_output_u8(self->lin, scale, zp);
    if (st != MQ_OK) return mq_py_raise(st);
    Py_RETURN_NONE;
}

static PyObject *Linear_impl(LinearObject *self, PyObject *Py_UNUSED(ignored)) {
    if (!self->lin) return PyErr_Format(PyExc_RuntimeError, "Linear is not initialised");
    return PyUnicode_FromString(mq_linear_impl(self->lin));
}

static PyObject *Linear_emulated(LinearObject *self, PyObject *Py_UNUSED(ignored)) {
    if (!self->lin) return PyErr_Format(PyExc_RuntimeError, "Linear is not initialised");
    return PyBool_FromLong(mq_linear_emulated(self->lin));
}

static PyObject *Linear_nbytes(LinearObject *self, PyObject *Py_UNUSED(ignored)) {
    if (!self->lin) return PyErr_Format(PyExc_RuntimeError, "Linear is not initialised");
    return PyLong_FromSize_t(mq_linear_nbytes(self->lin));
}

static PyMethodDef Linear_methods[] = {
    {"forward", (PyCFunction)(void (*)(void))Linear_forward, METH_VARARGS | METH_KEYWORDS,
     "forward(x f32[M, K], residual=None) -> y f32[M, N] (holds the GIL; one Linear is not for concurrent use)"},
    {"forward_u8", (PyCFunction)Linear_forward_u8, METH_VARARGS,
     "forward_u8(xq u8[M, K]) -> y: a static int8 layer fed its already quantized input (no residual)"},
    {"set_output_u8", (PyCFunction)Linear_set_output_u8, METH_VARARGS,
     "set_output_u8(scale, zero_point): write u8 = sat(rint(y / scale) + zero_point) instead of f32 y"},
    {"impl", (PyCFunction)Linear_impl, METH_NOARGS, "oneDNN implementation of the last built matmul"},
    {"nbytes", (PyCFunction)Linear_nbytes, METH_NOARGS, "bytes held for weights, scales, bias"},
    {"emulated", (PyCFunction)Linear_emulated, METH_NOARGS,
     "True if this int8/bf16 layer runs as an f32 matmul (no exact int8 / no bf16 kernel on this CPU)"},
    {NULL, NULL, 0, NULL}};

static PyType_Slot Linear_slots[] = {
    {Py_tp_init, Linear_init},
    {Py_tp_dealloc, Linear_dealloc},
    {Py_tp_methods, Linear_methods},
    {Py_tp_new, PyType_GenericNew},
    {Py_tp_doc, "Linear(kind, weight, ...): one linear layer of the C core, for tests and research."},
    {0, NULL}};

PyType_Spec mq_py_linear_spec = {"medquant._core.Linear", sizeof(LinearObject), 0, Py_TPFLAGS_DEFAULT, Linear_slots};

