/* module.c - the CPython / NumPy binding of the medquant core: parse, validate, convert, release the GIL, delegate.
 * No math here. Arrays must already have the exact dtype, shape and C-contiguity (the Python layer converts);
 * anything else raises TypeError / ValueError naming the argument. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <numpy/arrayobject.h>

#include "encoder.h"
#include "observer.h"
#include "qparams.h"

/* Module state: the module's own Observer type, against which Encoder's observer_type is checked. */
typedef struct {
    PyTypeObject *observer_type;
} module_state;

static PyObject *raise_status(mq_status st) {
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

/* Checks that obj is an ndarray of `type`, `ndim` dims (dims[i] < 0: any), C-contiguous and aligned. Borrowed. */
static PyArrayObject *as_array(PyObject *obj, int type, int ndim, const npy_intp *dims, const char *name) {
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
        PyErr_Format(PyExc_ValueError, "%s must be C-contiguous and aligned (use numpy.ascontiguousarray)", name);
        return NULL;
    }
    return a;
}

static PyArrayObject *opt_array(PyObject *obj, int type, int ndim, const npy_intp *dims, const char *name, int *ok) {
    *ok = 1;
    if (obj == NULL || obj == Py_None) return NULL;
    PyArrayObject *a = as_array(obj, type, ndim, dims, name);
    if (!a) *ok = 0;
    return a;
}

/* ------------------------------------------------------------------ Observer */

/* An observer is not for concurrent use (observer.h).  Calls that release the GIL while using `obs` (update,
 * compute_range, an Encoder.forward that feeds it) mark it busy first; every method refuses a busy observer with
 * RuntimeError instead of racing on (or freeing) its buffers.  `busy` is only read and written with the GIL held. */
typedef struct {
    PyObject_HEAD
    mq_observer *obs;
    int busy;
} ObserverObject;

static int observer_busy_error(void) {
    PyErr_SetString(PyExc_RuntimeError,
                    "Observer is in use by another thread (an Observer must not be used concurrently)");
    return 0;
}

static int Observer_init(ObserverObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"nbins", "momentum", NULL};
    int nbins = 2048;
    float momentum = 0.f;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|if", kwlist, &nbins, &momentum)) return -1;
    if (self->busy) return observer_busy_error(), -1;
    if (self->obs) { mq_observer_destroy(self->obs); self->obs = NULL; }
    mq_status st = mq_observer_create(&self->obs, nbins, momentum);
    if (st != MQ_OK) { raise_status(st); return -1; }
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
    if (self->busy) return observer_busy_error();
    return 1;
}

static PyObject *Observer_update(ObserverObject *self, PyObject *arg) {
    if (!observer_ready(self)) return NULL;
    if (!PyArray_Check(arg)) return PyErr_Format(PyExc_TypeError, "x must be a numpy array");
    PyArrayObject *a = (PyArrayObject *)arg;
    int nd = PyArray_NDIM(a);
    if (nd != 1 && nd != 2) return PyErr_Format(PyExc_ValueError, "x must be 1- or 2-dimensional");
    if (!as_array(arg, NPY_FLOAT32, nd, NULL, "x")) return NULL;
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
    if (st != MQ_OK) return raise_status(st);
    Py_RETURN_NONE;
}

static PyObject *Observer_minmax(ObserverObject *self, PyObject *Py_UNUSED(ignored)) {
    if (!observer_ready(self)) return NULL;
    float lo, hi;
    mq_status st = mq_observer_minmax(self->obs, &lo, &hi);
    if (st != MQ_OK) return raise_status(st);
    return Py_BuildValue("(ff)", lo, hi);
}

static PyObject *Observer_moving_minmax(ObserverObject *self, PyObject *Py_UNUSED(ignored)) {
    if (!observer_ready(self)) return NULL;
    float lo, hi;
    mq_status st = mq_observer_moving_minmax(self->obs, &lo, &hi);
    if (st != MQ_OK) return raise_status(st);
    return Py_BuildValue("(ff)", lo, hi);
}

static PyObject *Observer_count(ObserverObject *self, PyObject *Py_UNUSED(ignored)) {
    if (!observer_ready(self)) return NULL;
    return PyLong_FromUnsignedLongLong((unsigned long long)mq_observer_count(self->obs));
}

static PyObject *Observer_reset(ObserverObject *self, PyObject *Py_UNUSED(ignored)) {
    if (!observer_ready(self)) return NULL;
    mq_status st = mq_observer_reset(self->obs);
    if (st != MQ_OK) return raise_status(st);
    Py_RETURN_NONE;
}

static PyObject *Observer_histogram(ObserverObject *self, PyObject *Py_UNUSED(ignored)) {
    if (!observer_ready(self)) return NULL;
    const double *counts;
    int nbins;
    float lo, hi;
    mq_status st = mq_observer_histogram(self->obs, &counts, &nbins, &lo, &hi);
    if (st != MQ_OK) return raise_status(st);
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
    if (st != MQ_OK) return raise_status(st);
    npy_intp d = (npy_intp)cols;
    PyObject *arr = PyArray_SimpleNew(1, &d, NPY_FLOAT32);
    if (!arr) return NULL;
    memcpy(PyArray_DATA((PyArrayObject *)arr), am, cols * sizeof(float));
    return arr;
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
    if (st != MQ_OK) return raise_status(st);
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

static PyType_Spec Observer_spec = {"medquant._core.Observer", sizeof(ObserverObject), 0,
                                    Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE, Observer_slots};

/* ------------------------------------------------------------------ Encoder */

typedef struct {
    PyObject_HEAD
    mq_encoder *enc;
    PyTypeObject *observer_type; /* strong ref */
} EncoderObject;

static int get_i64(PyObject *d, const char *key, int64_t *out) {
    PyObject *v = PyDict_GetItemString(d, key); /* borrowed */
    if (!v) { PyErr_Format(PyExc_KeyError, "config is missing '%s'", key); return 0; }
    long long x = PyLong_AsLongLong(v);
    if (x == -1 && PyErr_Occurred()) { PyErr_Format(PyExc_TypeError, "config['%s'] must be an int", key); return 0; }
    *out = (int64_t)x;
    return 1;
}

static int Encoder_init(EncoderObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"config", "n_threads", "observer_type", NULL};
    PyObject *cfgd, *otype;
    int n_threads = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O!iO", kwlist, &PyDict_Type, &cfgd, &n_threads, &otype)) return -1;
    /* re-initialising would free the C encoder under a forward running in another thread */
    if (self->enc) return PyErr_SetString(PyExc_RuntimeError, "Encoder is already initialised"), -1;
    /* forward() reads observers as ObserverObject: only the module's Observer (or a subclass) will do */
    PyObject *mod = PyType_GetModule(Py_TYPE(self));
    module_state *ms = mod ? PyModule_GetState(mod) : NULL;
    if (!ms) return -1;
    if (!PyType_Check(otype) || !PyType_IsSubtype((PyTypeObject *)otype, ms->observer_type))
        return PyErr_SetString(PyExc_TypeError, "observer_type must be medquant._core.Observer or a subclass"), -1;
    mq_bert_config c;
    if (!get_i64(cfgd, "vocab_size", &c.vocab_size) || !get_i64(cfgd, "hidden_size", &c.hidden) ||
        !get_i64(cfgd, "num_hidden_layers", &c.n_layers) || !get_i64(cfgd, "num_attention_heads", &c.n_heads) ||
        !get_i64(cfgd, "intermediate_size", &c.intermediate) ||
        !get_i64(cfgd, "max_position_embeddings", &c.max_position) || !get_i64(cfgd, "type_vocab_size", &c.type_vocab))
        return -1;
    PyObject *eps = PyDict_GetItemString(cfgd, "layer_norm_eps");
    c.ln_eps = eps ? (float)PyFloat_AsDouble(eps) : 1e-12f;
    if (PyErr_Occurred()) return -1;
    mq_status st = mq_encoder_create(&self->enc, &c, n_threads);
    if (st != MQ_OK) { raise_status(st); return -1; }
    Py_INCREF(otype);
    Py_XDECREF(self->observer_type);
    self->observer_type = (PyTypeObject *)otype;
    return 0;
}

static void Encoder_dealloc(EncoderObject *self) {
    PyTypeObject *tp = Py_TYPE(self);
    mq_encoder_destroy(self->enc);
    Py_XDECREF(self->observer_type);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

static const mq_bert_config *enc_cfg(EncoderObject *self) {
    if (!self->enc) { PyErr_SetString(PyExc_RuntimeError, "Encoder is not initialised"); return NULL; }
    return mq_encoder_config(self->enc);
}

static PyObject *Encoder_set_word_embeddings(EncoderObject *self, PyObject *args) {
    const mq_bert_config *c = enc_cfg(self);
    PyObject *t, *s = Py_None;
    if (!c || !PyArg_ParseTuple(args, "O|O", &t, &s)) return NULL;
    npy_intp d[2] = {c->vocab_size, c->hidden}, dv[1] = {c->vocab_size};
    mq_status st;
    if (s == Py_None) {
        PyArrayObject *a = as_array(t, NPY_FLOAT32, 2, d, "word_embeddings");
        if (!a) return NULL;
        st = mq_encoder_set_word_embeddings(self->enc, PyArray_DATA(a));
    } else {
        PyArrayObject *a = as_array(t, NPY_INT8, 2, d, "word_embeddings (int8)");
        PyArrayObject *b = a ? as_array(s, NPY_FLOAT32, 1, dv, "word_embedding_scales") : NULL;
        if (!b) return NULL;
        st = mq_encoder_set_word_embeddings_s8(self->enc, PyArray_DATA(a), PyArray_DATA(b));
    }
    if (st != MQ_OK) return raise_status(st);
    Py_RETURN_NONE;
}

static PyObject *Encoder_set_position_type_embeddings(EncoderObject *self, PyObject *args) {
    const mq_bert_config *c = enc_cfg(self);
    PyObject *p, *t;
    if (!c || !PyArg_ParseTuple(args, "OO", &p, &t)) return NULL;
    npy_intp dp[2] = {c->max_position, c->hidden}, dt[2] = {c->type_vocab, c->hidden};
    PyArrayObject *a = as_array(p, NPY_FLOAT32, 2, dp, "position_embeddings");
    PyArrayObject *b = a ? as_array(t, NPY_FLOAT32, 2, dt, "token_type_embeddings") : NULL;
    if (!b) return NULL;
    mq_status st = mq_encoder_set_position_type_embeddings(self->enc, PyArray_DATA(a), PyArray_DATA(b));
    if (st != MQ_OK) return raise_status(st);
    Py_RETURN_NONE;
}

static PyObject *Encoder_set_layernorm(EncoderObject *self, PyObject *args) {
    const mq_bert_config *c = enc_cfg(self);
    int layer, which;
    PyObject *g, *b;
    if (!c || !PyArg_ParseTuple(args, "iiOO", &layer, &which, &g, &b)) return NULL;
    npy_intp d[1] = {c->hidden};
    PyArrayObject *ga = as_array(g, NPY_FLOAT32, 1, d, "layernorm weight");
    PyArrayObject *ba = ga ? as_array(b, NPY_FLOAT32, 1, d, "layernorm bias") : NULL;
    if (!ba) return NULL;
    mq_status st = mq_encoder_set_layernorm(self->enc, layer, which, PyArray_DATA(ga), PyArray_DATA(ba));
    if (st != MQ_OK) return raise_status(st);
    Py_RETURN_NONE;
}

static PyObject *Encoder_set_linear(EncoderObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"layer", "site", "kind", "weight", "w_scales", "bias", "act_mul", "act_mode",
                             "act_symmetric", "act_scale", "act_zero_point", "w_per_channel", "group_size", NULL};
    const mq_bert_config *c = enc_cfg(self);
    int layer, site, kind, act_mode = 0, act_sym = 1, act_zp = 0, per_ch = 1;
    long long group = 0;
    float act_scale = 1.f;
    PyObject *w, *ws = Py_None, *bias = Py_None, *mul = Py_None;
    if (!c || !PyArg_ParseTupleAndKeywords(args, kw, "iiiO|OOOipfipL", kwlist, &layer, &site, &kind, &w, &ws, &bias,
                                           &mul, &act_mode, &act_sym, &act_scale, &act_zp, &per_ch, &group))
        return NULL;
    if (site < 0 || site >= MQ_SITES_PER_LAYER) return PyErr_Format(PyExc_ValueError, "site %d outside [0, 4)", site);
    int64_t K = site == MQ_SITE_FFN_OUT ? c->intermediate : c->hidden;
    int64_t N = site == MQ_SITE_QKV ? 3 * c->hidden : (site == MQ_SITE_FFN_IN ? c->intermediate : c->hidden);
    npy_intp dw[2] = {N, K}, dn[1] = {N}, dk[1] = {K};
    PyArrayObject *wa;
    int nscales = 0;
    switch (kind) {
        case MQ_LINEAR_F32:
        case MQ_LINEAR_BF16: wa = as_array(w, NPY_FLOAT32, 2, dw, "weight"); break;
        case MQ_LINEAR_INT8:
        case MQ_LINEAR_W8: wa = as_array(w, NPY_INT8, 2, dw, "weight (int8)"); nscales = per_ch ? (int)N : 1; break;
        case MQ_LINEAR_W4:
            if (group <= 0 || K % group) return PyErr_Format(PyExc_ValueError, "group_size %lld must divide %lld", group, (long long)K);
            dw[1] = K / 2;
            wa = as_array(w, NPY_UINT8, 2, dw, "weight (packed int4)");
            nscales = (int)(N * (K / group));
            break;
        default: return PyErr_Format(PyExc_ValueError, "unknown linear kind %d", kind);
    }
    if (!wa) return NULL;
    int ok;
    npy_intp dsc[1] = {nscales};
    PyArrayObject *wsa = opt_array(ws, NPY_FLOAT32, 1, dsc, "w_scales", &ok);
    if (!ok) return NULL;
    if (nscales && !wsa) return PyErr_Format(PyExc_ValueError, "w_scales are required for quantized weights");
    PyArrayObject *ba = opt_array(bias, NPY_FLOAT32, 1, dn, "bias", &ok);
    if (!ok) return NULL;
    PyArrayObject *ma = opt_array(mul, NPY_FLOAT32, 1, dk, "act_mul", &ok);
    if (!ok) return NULL;
    mq_linear_spec spec = {(mq_linear_kind)kind, (mq_act_mode)act_mode, act_sym, act_scale, act_zp, per_ch, group, MQ_EPI_NONE};
    mq_linear_weights lw = {PyArray_DATA(wa), wsa ? PyArray_DATA(wsa) : NULL, ba ? PyArray_DATA(ba) : NULL,
                            ma ? PyArray_DATA(ma) : NULL};
    mq_status st;
    Py_BEGIN_ALLOW_THREADS
    st = mq_encoder_set_linear(self->enc, layer, site, &spec, &lw);
    Py_END_ALLOW_THREADS
    if (st != MQ_OK) return raise_status(st);
    Py_RETURN_NONE;
}

static PyObject *Encoder_finalize(EncoderObject *self, PyObject *Py_UNUSED(ignored)) {
    if (!enc_cfg(self)) return NULL;
    mq_status st = mq_encoder_finalize(self->enc);
    if (st != MQ_OK) return raise_status(st);
    Py_RETURN_NONE;
}

static PyObject *Encoder_forward(EncoderObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"input_ids", "attention_mask", "token_type_ids", "pooling", "normalize", "hidden",
                             "observers", "taps", NULL};
    const mq_bert_config *c = enc_cfg(self);
    PyObject *ids_o, *mask_o, *tt_o = Py_None, *obs_o = Py_None;
    int pooling = MQ_POOL_NONE, normalize = 0, want_hidden = 1, want_taps = 0;
    if (!c || !PyArg_ParseTupleAndKeywords(args, kw, "OO|OippOp", kwlist, &ids_o, &mask_o, &tt_o, &pooling, &normalize,
                                           &want_hidden, &obs_o, &want_taps))
        return NULL;
    PyArrayObject *ids_in = as_array(ids_o, NPY_INT32, 2, NULL, "input_ids");
    if (!ids_in) return NULL;
    npy_intp B = PyArray_DIM(ids_in, 0), S = PyArray_DIM(ids_in, 1);
    if (B == 0 || S == 0) return PyErr_Format(PyExc_ValueError, "input_ids is empty (shape %zd x %zd)", (Py_ssize_t)B, (Py_ssize_t)S);
    if (S > c->max_position)
        return PyErr_Format(PyExc_ValueError, "sequence length %zd exceeds max_position_embeddings %lld", (Py_ssize_t)S,
                            (long long)c->max_position);
    npy_intp d2[2] = {B, S};
    PyArrayObject *mask = as_array(mask_o, NPY_INT32, 2, d2, "attention_mask");
    if (!mask) return NULL;
    int ok;
    PyArrayObject *tt_in = opt_array(tt_o, NPY_INT32, 2, d2, "token_type_ids", &ok);
    if (!ok) return NULL;
    if (pooling < MQ_POOL_NONE || pooling > MQ_POOL_MEAN) return PyErr_Format(PyExc_ValueError, "unknown pooling %d", pooling);
    const int nsites = (int)(c->n_layers * MQ_SITES_PER_LAYER);
    mq_observer **observers = NULL;
    PyObject *obs_list = NULL, *lengths = NULL, *hidden = NULL, *pooled = NULL, *taps = NULL, *result = NULL;
    PyObject *ids = NULL, *tt = NULL;
    float **tap_ptrs = NULL;
    int marked = 0; /* observers marked busy */
    if (obs_o != Py_None) {
        /* a tuple: holds its own references, so another thread cannot drop an Observer from under the call */
        obs_list = PySequence_Tuple(obs_o);
        if (!obs_list) return NULL;
        if (PyTuple_GET_SIZE(obs_list) != nsites) {
            PyErr_Format(PyExc_ValueError, "observers must have %d entries (layers x 4 sites)", nsites);
            goto done;
        }
        observers = PyMem_Calloc((size_t)nsites, sizeof *observers);
        if (!observers) { PyErr_NoMemory(); goto done; }
        for (int i = 0; i < nsites; i++) {
            PyObject *o = PyTuple_GET_ITEM(obs_list, i);
            if (o == Py_None) continue;
            if (!PyObject_TypeCheck(o, self->observer_type)) {
                PyErr_Format(PyExc_TypeError, "observers[%d] must be an Observer or None", i);
                goto done;
            }
        }
    }
    /* private copies: the C core validates ids once and then indexes tables with them, so another thread must
       not be able to change them in between (the caller's arrays stay shared and writable while the GIL is out) */
    ids = PyArray_NewCopy(ids_in, NPY_CORDER);
    if (!ids) goto done;
    if (tt_in && !(tt = PyArray_NewCopy(tt_in, NPY_CORDER))) goto done;
    npy_intp db[1] = {B};
    lengths = PyArray_SimpleNew(1, db, NPY_INT32);
    if (!lengths) goto done;
    mq_status st = mq_lengths_from_mask(PyArray_DATA(mask), B, S, PyArray_DATA((PyArrayObject *)lengths));
    if (st != MQ_OK) { raise_status(st); goto done; }
    if (want_hidden) {
        npy_intp dh[3] = {B, S, c->hidden};
        hidden = PyArray_SimpleNew(3, dh, NPY_FLOAT32);
        if (!hidden) goto done;
    }
    if (pooling != MQ_POOL_NONE) {
        npy_intp dp[2] = {B, c->hidden};
        pooled = PyArray_SimpleNew(2, dp, NPY_FLOAT32);
        if (!pooled) goto done;
    }
    if (want_taps) {
        int64_t T = 0;
        const int32_t *len = PyArray_DATA((PyArrayObject *)lengths);
        for (npy_intp b = 0; b < B; b++) T += len[b];
        taps = PyList_New(nsites);
        tap_ptrs = PyMem_Calloc((size_t)nsites, sizeof *tap_ptrs);
        if (!taps || !tap_ptrs) { if (!PyErr_Occurred()) PyErr_NoMemory(); goto done; }
        for (int i = 0; i < nsites; i++) {
            int site = i % MQ_SITES_PER_LAYER;
            npy_intp dt[2] = {T, site == MQ_SITE_QKV ? 3 * c->hidden : (site == MQ_SITE_FFN_IN ? c->intermediate : c->hidden)};
            PyObject *t = PyArray_SimpleNew(2, dt, NPY_FLOAT32);
            if (!t) goto done;
            PyList_SET_ITEM(taps, i, t);
            tap_ptrs[i] = PyArray_DATA((PyArrayObject *)t);
        }
    }
    mq_forward_args fa = {PyArray_DATA((PyArrayObject *)ids), tt ? PyArray_DATA((PyArrayObject *)tt) : NULL,
                          PyArray_DATA((PyArrayObject *)lengths), B, S,
                          hidden ? PyArray_DATA((PyArrayObject *)hidden) : NULL, pooling, normalize,
                          pooled ? PyArray_DATA((PyArrayObject *)pooled) : NULL, observers, tap_ptrs};
    if (obs_list) {
        /* read, checked and marked together right before the GIL is released: no Python code runs in between
           (the copies above may run an ndarray subclass's __array_finalize__) */
        for (int i = 0; i < nsites; i++) {
            PyObject *o = PyTuple_GET_ITEM(obs_list, i);
            if (o == Py_None) continue;
            ObserverObject *ob = (ObserverObject *)o;
            if (!ob->obs) { PyErr_Format(PyExc_TypeError, "observers[%d] is not an initialised Observer", i); goto done; }
            if (ob->busy) { observer_busy_error(); goto done; }
            observers[i] = ob->obs;
        }
        for (int i = 0; i < nsites; i++)
            if (observers[i]) ((ObserverObject *)PyTuple_GET_ITEM(obs_list, i))->busy = 1;
        marked = 1;
    }
    Py_BEGIN_ALLOW_THREADS
    st = mq_encoder_forward(self->enc, &fa);
    Py_END_ALLOW_THREADS
    if (st != MQ_OK) { raise_status(st); goto done; }
    result = Py_BuildValue("(OOO)", hidden ? hidden : Py_None, pooled ? pooled : Py_None, taps ? taps : Py_None);
done:
    if (marked)
        for (int i = 0; i < nsites; i++)
            if (observers[i]) ((ObserverObject *)PyTuple_GET_ITEM(obs_list, i))->busy = 0;
    Py_XDECREF(ids);
    Py_XDECREF(tt);
    Py_XDECREF(obs_list);
    Py_XDECREF(lengths);
    Py_XDECREF(hidden);
    Py_XDECREF(pooled);
    Py_XDECREF(taps);
    PyMem_Free(observers);
    PyMem_Free(tap_ptrs);
    return result;
}

static PyObject *Encoder_set_threads(EncoderObject *self, PyObject *arg) {
    if (!enc_cfg(self)) return NULL;
    long v = PyLong_AsLong(arg);
    if (v == -1 && PyErr_Occurred()) return NULL;
    if (v < 0 || v > 4096) return PyErr_Format(PyExc_ValueError, "n_threads %ld outside [0, 4096] (0: all available)", v);
    int n = (int)v;
    mq_status st;
    Py_BEGIN_ALLOW_THREADS
    st = mq_encoder_set_threads(self->enc, n);
    Py_END_ALLOW_THREADS
    if (st != MQ_OK) return raise_status(st);
    Py_RETURN_NONE;
}

static PyObject *Encoder_threads(EncoderObject *self, PyObject *Py_UNUSED(ignored)) {
    if (!enc_cfg(self)) return NULL;
    return PyLong_FromLong(mq_encoder_threads(self->enc));
}

static PyObject *Encoder_nbytes(EncoderObject *self, PyObject *Py_UNUSED(ignored)) {
    if (!enc_cfg(self)) return NULL;
    return PyLong_FromSize_t(mq_encoder_nbytes(self->enc));
}

static PyObject *Encoder_site_impl(EncoderObject *self, PyObject *args) {
    int layer, site;
    if (!enc_cfg(self) || !PyArg_ParseTuple(args, "ii", &layer, &site)) return NULL;
    return PyUnicode_FromString(mq_encoder_site_impl(self->enc, layer, site));
}

static PyMethodDef Encoder_methods[] = {
    {"set_word_embeddings", (PyCFunction)Encoder_set_word_embeddings, METH_VARARGS, "(table f32 | table i8, row_scales)"},
    {"set_position_type_embeddings", (PyCFunction)Encoder_set_position_type_embeddings, METH_VARARGS, "(position, token_type)"},
    {"set_layernorm", (PyCFunction)Encoder_set_layernorm, METH_VARARGS, "(layer, which, gamma, beta)"},
    {"set_linear", (PyCFunction)(void (*)(void))Encoder_set_linear, METH_VARARGS | METH_KEYWORDS, "set one linear layer"},
    {"finalize", (PyCFunction)Encoder_finalize, METH_NOARGS, "check that every parameter is set"},
    {"forward", (PyCFunction)(void (*)(void))Encoder_forward, METH_VARARGS | METH_KEYWORDS,
     "forward(input_ids, attention_mask, token_type_ids=None, pooling=0, normalize=False, hidden=True, observers=None, "
     "taps=False) -> (hidden, pooled, taps)"},
    {"set_threads", (PyCFunction)Encoder_set_threads, METH_O, "set the thread count"},
    {"threads", (PyCFunction)Encoder_threads, METH_NOARGS, "thread count"},
    {"nbytes", (PyCFunction)Encoder_nbytes, METH_NOARGS, "bytes held by the parameters"},
    {"site_impl", (PyCFunction)Encoder_site_impl, METH_VARARGS, "oneDNN implementation of a site's matmul"},
    {NULL, NULL, 0, NULL}};

static PyType_Slot Encoder_slots[] = {
    {Py_tp_init, Encoder_init},
    {Py_tp_dealloc, Encoder_dealloc},
    {Py_tp_methods, Encoder_methods},
    {Py_tp_new, PyType_GenericNew},
    {Py_tp_doc, "Encoder(config, n_threads, observer_type): the C BERT encoder. Use medquant.Encoder instead."},
    {0, NULL}};

static PyType_Spec Encoder_spec = {"medquant._core.Encoder", sizeof(EncoderObject), 0, Py_TPFLAGS_DEFAULT, Encoder_slots};


/* ------------------------------------------------------------------ Linear (one layer, for tests and research) */

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
    int wtype = kind == MQ_LINEAR_F32 || kind == MQ_LINEAR_BF16 ? NPY_FLOAT32 : (kind == MQ_LINEAR_W4 ? NPY_UINT8 : NPY_INT8);
    PyArrayObject *wa = as_array(w, wtype, 2, NULL, "weight");
    if (!wa) return -1;
    npy_intp N = PyArray_DIM(wa, 0), K = PyArray_DIM(wa, 1) * (kind == MQ_LINEAR_W4 ? 2 : 1);
    if (N == 0 || K == 0) return PyErr_SetString(PyExc_ValueError, "weight is empty"), -1;
    npy_intp dn[1] = {N}, dk[1] = {K}, dsc[1] = {-1};
    int ok;
    PyArrayObject *wsa = opt_array(ws, NPY_FLOAT32, 1, dsc, "w_scales", &ok);
    if (!ok) return -1;
    npy_intp need = kind == MQ_LINEAR_INT8 || kind == MQ_LINEAR_W8 ? (per_ch ? N : 1)
                  : (kind == MQ_LINEAR_W4 && group > 0 ? N * (K / (npy_intp)group) : 0);
    if (need && (!wsa || PyArray_DIM(wsa, 0) != need))
        return PyErr_Format(PyExc_ValueError, "w_scales must have %zd entries", (Py_ssize_t)need), -1;
    PyArrayObject *ba = opt_array(bias, NPY_FLOAT32, 1, dn, "bias", &ok);
    if (!ok) return -1;
    PyArrayObject *ma = opt_array(mul, NPY_FLOAT32, 1, dk, "act_mul", &ok);
    if (!ok) return -1;
    mq_linear_spec spec = {(mq_linear_kind)kind, (mq_act_mode)act_mode, act_sym, act_scale, act_zp, per_ch, group,
                           (mq_epilogue)epilogue};
    mq_linear_weights lw = {PyArray_DATA(wa), wsa ? PyArray_DATA(wsa) : NULL, ba ? PyArray_DATA(ba) : NULL,
                            ma ? PyArray_DATA(ma) : NULL};
    mq_status st = self->eng ? MQ_OK : mq_engine_create(&self->eng, n_threads);
    if (st == MQ_OK) st = mq_linear_create(&self->lin, self->eng, K, N, &spec, &lw);
    if (st != MQ_OK) {
        raise_status(st);
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

/* y[:M] of a bucket-padded output (a view; NULL with an exception set on failure). */
static PyObject *first_rows(PyObject *y, npy_intp M) {
    PyObject *stop = PyLong_FromSsize_t(M);
    PyObject *slice = stop ? PySlice_New(NULL, stop, NULL) : NULL;
    Py_XDECREF(stop);
    if (!slice) return NULL;
    PyObject *res = PyObject_GetItem(y, slice);
    Py_DECREF(slice);
    return res;
}

static PyObject *Linear_forward(LinearObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"x", "residual", NULL};
    PyObject *xo, *ro = Py_None;
    if (!self->lin) return PyErr_Format(PyExc_RuntimeError, "Linear is not initialised");
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|O", kwlist, &xo, &ro)) return NULL;
    npy_intp K = mq_linear_in(self->lin), N = mq_linear_out(self->lin), dx[2] = {-1, K};
    PyArrayObject *x = as_array(xo, NPY_FLOAT32, 2, dx, "x");
    if (!x) return NULL;
    npy_intp M = PyArray_DIM(x, 0), rows = mq_bucket_rows(M);
    if (M == 0) return PyErr_Format(PyExc_ValueError, "x has no rows");
    npy_intp dr[2] = {M, N};
    int ok;
    PyArrayObject *r = opt_array(ro, NPY_FLOAT32, 2, dr, "residual", &ok);
    if (!ok) return NULL;
    /* the layer reads and writes whole row buckets: pad into owned buffers */
    npy_intp dxp[2] = {rows, K}, dyp[2] = {rows, N};
    const int ytype = mq_linear_output_u8(self->lin) ? NPY_UINT8 : NPY_FLOAT32;
    PyObject *xp = PyArray_ZEROS(2, dxp, NPY_FLOAT32, 0), *yp = PyArray_ZEROS(2, dyp, ytype, 0);
    PyObject *rp = r ? PyArray_ZEROS(2, dyp, NPY_FLOAT32, 0) : NULL;
    PyObject *res = NULL;
    if (!xp || !yp || (r && !rp)) goto done;
    memcpy(PyArray_DATA((PyArrayObject *)xp), PyArray_DATA(x), (size_t)(M * K) * sizeof(float));
    if (r) memcpy(PyArray_DATA((PyArrayObject *)rp), PyArray_DATA(r), (size_t)(M * N) * sizeof(float));
    mq_status st = mq_linear_forward(self->lin, &self->scratch, PyArray_DATA((PyArrayObject *)xp), M,
                                     rp ? PyArray_DATA((PyArrayObject *)rp) : NULL, PyArray_DATA((PyArrayObject *)yp), NULL);
    if (st != MQ_OK) { raise_status(st); goto done; }
    res = first_rows(yp, M);
done:
    Py_XDECREF(xp);
    Py_XDECREF(yp);
    Py_XDECREF(rp);
    return res;
}

static PyObject *Linear_forward_u8(LinearObject *self, PyObject *args) {
    PyObject *xo;
    if (!self->lin) return PyErr_Format(PyExc_RuntimeError, "Linear is not initialised");
    if (!PyArg_ParseTuple(args, "O", &xo)) return NULL;
    npy_intp K = mq_linear_in(self->lin), N = mq_linear_out(self->lin), dx[2] = {-1, K};
    PyArrayObject *x = as_array(xo, NPY_UINT8, 2, dx, "xq");
    if (!x) return NULL;
    npy_intp M = PyArray_DIM(x, 0), rows = mq_bucket_rows(M);
    if (M == 0) return PyErr_Format(PyExc_ValueError, "xq has no rows");
    npy_intp dxp[2] = {rows, K}, dyp[2] = {rows, N};
    const int ytype = mq_linear_output_u8(self->lin) ? NPY_UINT8 : NPY_FLOAT32;
    PyObject *xp = PyArray_ZEROS(2, dxp, NPY_UINT8, 0), *yp = PyArray_ZEROS(2, dyp, ytype, 0), *res = NULL;
    if (!xp || !yp) goto done;
    memcpy(PyArray_DATA((PyArrayObject *)xp), PyArray_DATA(x), (size_t)(M * K));
    mq_status st = mq_linear_forward_u8(self->lin, &self->scratch, PyArray_DATA((PyArrayObject *)xp), M, NULL,
                                        PyArray_DATA((PyArrayObject *)yp));
    if (st != MQ_OK) { raise_status(st); goto done; }
    res = first_rows(yp, M);
done:
    Py_XDECREF(xp);
    Py_XDECREF(yp);
    return res;
}

static PyObject *Linear_set_output_u8(LinearObject *self, PyObject *args) {
    float scale;
    int zp;
    if (!self->lin) return PyErr_Format(PyExc_RuntimeError, "Linear is not initialised");
    if (!PyArg_ParseTuple(args, "fi", &scale, &zp)) return NULL;
    mq_status st = mq_linear_set_output_u8(self->lin, scale, zp);
    if (st != MQ_OK) return raise_status(st);
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

static PyType_Spec Linear_spec = {"medquant._core.Linear", sizeof(LinearObject), 0, Py_TPFLAGS_DEFAULT, Linear_slots};

/* ------------------------------------------------------------------ functions */

static PyObject *py_runtime_info(PyObject *Py_UNUSED(m), PyObject *Py_UNUSED(ignored)) {
    mq_runtime_info info;
    mq_runtime_info_get(&info);
    char version[64];
    snprintf(version, sizeof version, "%d.%d.%d", info.version_major, info.version_minor, info.version_patch);
    return Py_BuildValue("{s:s,s:s,s:s,s:s,s:i}", "onednn_version", version, "onednn_hash", info.version_hash, "threading", info.cpu_runtime, "cpu_isa", info.cpu_isa,
                         "max_threads", info.max_threads);
}

static PyObject *py_kernel_support(PyObject *Py_UNUSED(m), PyObject *Py_UNUSED(ignored)) {
    int int8_exact = 0, bf16_native = 0;
    mq_status st;
    Py_BEGIN_ALLOW_THREADS
    st = mq_linear_kernel_support(&int8_exact, &bf16_native);
    Py_END_ALLOW_THREADS
    if (st != MQ_OK) return raise_status(st);
    return Py_BuildValue("{s:O,s:O}", "int8_exact", int8_exact ? Py_True : Py_False, "bf16_native",
                         bf16_native ? Py_True : Py_False);
}

static PyObject *py_quantize_weight_s8(PyObject *Py_UNUSED(m), PyObject *args) {
    PyObject *w;
    int per_channel = 1;
    if (!PyArg_ParseTuple(args, "O|p", &w, &per_channel)) return NULL;
    PyArrayObject *a = as_array(w, NPY_FLOAT32, 2, NULL, "weight");
    if (!a) return NULL;
    npy_intp N = PyArray_DIM(a, 0), K = PyArray_DIM(a, 1), dn[1] = {per_channel ? N : 1};
    if (N == 0 || K == 0) return PyErr_Format(PyExc_ValueError, "weight is empty");
    PyObject *q = PyArray_SimpleNew(2, PyArray_DIMS(a), NPY_INT8);
    PyObject *s = PyArray_SimpleNew(1, dn, NPY_FLOAT32);
    if (!q || !s) { Py_XDECREF(q); Py_XDECREF(s); return NULL; }
    mq_status st;
    Py_BEGIN_ALLOW_THREADS
    st = mq_quantize_weight_s8(PyArray_DATA(a), N, K, per_channel, PyArray_DATA((PyArrayObject *)q), PyArray_DATA((PyArrayObject *)s));
    Py_END_ALLOW_THREADS
    if (st != MQ_OK) { Py_DECREF(q); Py_DECREF(s); return raise_status(st); }
    return Py_BuildValue("(NN)", q, s);
}

static PyObject *py_quantize_weight_s4(PyObject *Py_UNUSED(m), PyObject *args) {
    PyObject *w;
    long long group;
    if (!PyArg_ParseTuple(args, "OL", &w, &group)) return NULL;
    PyArrayObject *a = as_array(w, NPY_FLOAT32, 2, NULL, "weight");
    if (!a) return NULL;
    npy_intp N = PyArray_DIM(a, 0), K = PyArray_DIM(a, 1);
    if (N == 0 || K == 0 || group <= 0 || group % 2 || K % group)
        return PyErr_Format(PyExc_ValueError, "int4 needs an even group size dividing in_features (group=%lld, in=%zd)", group, (Py_ssize_t)K);
    npy_intp dq[2] = {N, K / 2}, ds[1] = {N * (K / (npy_intp)group)};
    PyObject *q = PyArray_SimpleNew(2, dq, NPY_UINT8);
    PyObject *s = PyArray_SimpleNew(1, ds, NPY_FLOAT32);
    if (!q || !s) { Py_XDECREF(q); Py_XDECREF(s); return NULL; }
    mq_status st;
    Py_BEGIN_ALLOW_THREADS
    st = mq_quantize_weight_s4(PyArray_DATA(a), N, K, group, PyArray_DATA((PyArrayObject *)q), PyArray_DATA((PyArrayObject *)s));
    Py_END_ALLOW_THREADS
    if (st != MQ_OK) { Py_DECREF(q); Py_DECREF(s); return raise_status(st); }
    return Py_BuildValue("(NN)", q, s);
}

static PyObject *py_dequantize_weight_s4(PyObject *Py_UNUSED(m), PyObject *args) {
    PyObject *qo, *so;
    long long group;
    if (!PyArg_ParseTuple(args, "OOL", &qo, &so, &group)) return NULL;
    PyArrayObject *q = as_array(qo, NPY_UINT8, 2, NULL, "packed");
    if (!q) return NULL;
    npy_intp N = PyArray_DIM(q, 0), K = 2 * PyArray_DIM(q, 1);
    if (N == 0 || K == 0 || group <= 0 || group % 2 || K % group) return PyErr_Format(PyExc_ValueError, "bad int4 group size %lld", group);
    npy_intp ds[1] = {N * (K / (npy_intp)group)}, dw[2] = {N, K};
    PyArrayObject *s = as_array(so, NPY_FLOAT32, 1, ds, "scales");
    if (!s) return NULL;
    PyObject *w = PyArray_SimpleNew(2, dw, NPY_FLOAT32);
    if (!w) return NULL;
    mq_dequantize_weight_s4(PyArray_DATA(q), N, K, group, PyArray_DATA(s), PyArray_DATA((PyArrayObject *)w));
    return w;
}

static PyObject *py_quantize_rows_s8(PyObject *Py_UNUSED(m), PyObject *args) {
    PyObject *x;
    if (!PyArg_ParseTuple(args, "O", &x)) return NULL;
    PyArrayObject *a = as_array(x, NPY_FLOAT32, 2, NULL, "table");
    if (!a) return NULL;
    npy_intp R = PyArray_DIM(a, 0), C = PyArray_DIM(a, 1), dr[1] = {R};
    if (R == 0 || C == 0) return PyErr_Format(PyExc_ValueError, "table is empty");
    PyObject *q = PyArray_SimpleNew(2, PyArray_DIMS(a), NPY_INT8);
    PyObject *s = PyArray_SimpleNew(1, dr, NPY_FLOAT32);
    if (!q || !s) { Py_XDECREF(q); Py_XDECREF(s); return NULL; }
    mq_status st;
    Py_BEGIN_ALLOW_THREADS
    st = mq_quantize_rows_s8(PyArray_DATA(a), R, C, PyArray_DATA((PyArrayObject *)q), PyArray_DATA((PyArrayObject *)s));
    Py_END_ALLOW_THREADS
    if (st != MQ_OK) { Py_DECREF(q); Py_DECREF(s); return raise_status(st); }
    return Py_BuildValue("(NN)", q, s);
}

static PyObject *py_qparams(PyObject *Py_UNUSED(m), PyObject *args) {
    float lo, hi;
    int symmetric;
    if (!PyArg_ParseTuple(args, "ffp", &lo, &hi, &symmetric)) return NULL;
    if (!isfinite(lo) || !isfinite(hi) || lo > hi) return PyErr_Format(PyExc_ValueError, "range [%g, %g] is not a finite interval", lo, hi);
    mq_qparams q = symmetric ? mq_qparams_sym_u8(lo, hi) : mq_qparams_asym_u8(lo, hi);
    return Py_BuildValue("(fi)", q.scale, q.zero_point);
}

static PyMethodDef module_methods[] = {
    {"runtime_info", py_runtime_info, METH_NOARGS, "oneDNN version, threading runtime, effective ISA, threads"},
    {"kernel_support", py_kernel_support, METH_NOARGS,
     "{int8_exact, bf16_native}: whether int8 / bf16 layers run native oneDNN kernels here (else emulated in f32)"},
    {"quantize_weight_s8", py_quantize_weight_s8, METH_VARARGS, "(w f32[N,K], per_channel=True) -> (q i8[N,K], scales)"},
    {"quantize_weight_s4", py_quantize_weight_s4, METH_VARARGS, "(w f32[N,K], group) -> (packed u8[N,K/2], scales)"},
    {"dequantize_weight_s4", py_dequantize_weight_s4, METH_VARARGS, "(packed, scales, group) -> w f32[N,K]"},
    {"quantize_rows_s8", py_quantize_rows_s8, METH_VARARGS, "(table f32[R,C]) -> (q i8[R,C], row scales)"},
    {"qparams", py_qparams, METH_VARARGS, "(lo, hi, symmetric) -> (scale, zero_point) of the u8 activation grid"},
    {NULL, NULL, 0, NULL}};

static int module_exec(PyObject *m) {
    import_array1(-1);
    PyObject *ot = PyType_FromModuleAndSpec(m, &Observer_spec, NULL);
    if (!ot || PyModule_AddObjectRef(m, "Observer", ot) < 0) { Py_XDECREF(ot); return -1; }
    ((module_state *)PyModule_GetState(m))->observer_type = (PyTypeObject *)ot; /* keeps the reference */
    PyObject *et = PyType_FromModuleAndSpec(m, &Encoder_spec, NULL);
    if (!et || PyModule_AddObjectRef(m, "Encoder", et) < 0) { Py_XDECREF(et); return -1; }
    Py_DECREF(et);
    PyObject *lt = PyType_FromModuleAndSpec(m, &Linear_spec, NULL);
    if (!lt || PyModule_AddObjectRef(m, "Linear", lt) < 0) { Py_XDECREF(lt); return -1; }
    Py_DECREF(lt);
    if (PyModule_AddIntConstant(m, "EPI_NONE", MQ_EPI_NONE) || PyModule_AddIntConstant(m, "EPI_GELU", MQ_EPI_GELU) ||
        PyModule_AddIntConstant(m, "EPI_RESIDUAL", MQ_EPI_RESIDUAL))
        return -1;
    if (PyModule_AddIntConstant(m, "LINEAR_F32", MQ_LINEAR_F32) || PyModule_AddIntConstant(m, "LINEAR_BF16", MQ_LINEAR_BF16) ||
        PyModule_AddIntConstant(m, "LINEAR_INT8", MQ_LINEAR_INT8) || PyModule_AddIntConstant(m, "LINEAR_W8", MQ_LINEAR_W8) ||
        PyModule_AddIntConstant(m, "LINEAR_W4", MQ_LINEAR_W4) || PyModule_AddIntConstant(m, "ACT_DYNAMIC", MQ_ACT_DYNAMIC) ||
        PyModule_AddIntConstant(m, "ACT_DYNAMIC_TOKEN", MQ_ACT_DYNAMIC_TOKEN) || PyModule_AddIntConstant(m, "ACT_STATIC", MQ_ACT_STATIC) ||
        PyModule_AddIntConstant(m, "POOL_NONE", MQ_POOL_NONE) || PyModule_AddIntConstant(m, "POOL_CLS", MQ_POOL_CLS) ||
        PyModule_AddIntConstant(m, "POOL_MEAN", MQ_POOL_MEAN) || PyModule_AddIntConstant(m, "RANGE_MINMAX", MQ_RANGE_MINMAX) ||
        PyModule_AddIntConstant(m, "RANGE_PERCENTILE", MQ_RANGE_PERCENTILE) || PyModule_AddIntConstant(m, "RANGE_ENTROPY", MQ_RANGE_ENTROPY) ||
        PyModule_AddIntConstant(m, "RANGE_MSE", MQ_RANGE_MSE) || PyModule_AddIntConstant(m, "SITES_PER_LAYER", MQ_SITES_PER_LAYER))
        return -1;
    return 0;
}

static int module_traverse(PyObject *m, visitproc visit, void *arg) {
    module_state *ms = PyModule_GetState(m);
    if (ms) Py_VISIT(ms->observer_type);
    return 0;
}

static int module_clear(PyObject *m) {
    module_state *ms = PyModule_GetState(m);
    if (ms) Py_CLEAR(ms->observer_type);
    return 0;
}

static void module_free(void *m) { module_clear((PyObject *)m); }

static PyModuleDef_Slot module_slots[] = {{Py_mod_exec, module_exec}, {0, NULL}};

static struct PyModuleDef core_module = {PyModuleDef_HEAD_INIT, "_core",
                                         "medquant C core: BERT encoder, quantized linear layers and observers on oneDNN",
                                         sizeof(module_state), module_methods, module_slots, module_traverse,
                                         module_clear, module_free};

PyMODINIT_FUNC PyInit__core(void) { return PyModuleDef_Init(&core_module); }
