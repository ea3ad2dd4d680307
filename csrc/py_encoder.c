/* py_encoder.c - the Python type medquant._core.Encoder over mq_encoder (encoder.h): parameters in, forward out;
 * observers and site outputs through the site probe (probe.h). */
#include "py_observer.h"

#include "attention.h"
#include "encoder.h"
#include "probe.h"

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
    mq_py_state *ms = mod ? PyModule_GetState(mod) : NULL;
    if (!ms) return -1;
    if (!PyType_Check(otype) || !PyType_IsSubtype((PyTypeObject *)otype, ms->observer_type))
        return PyErr_SetString(PyExc_TypeError, "observer_type must be medquant._core.Observer or a subclass"), -1;
    mq_bert_config c;
    if (!get_i64(cfgd, "vocab_size", &c.vocab_size) || !get_i64(cfgd, "hidden", &c.hidden) ||
        !get_i64(cfgd, "n_layers", &c.n_layers) || !get_i64(cfgd, "n_heads", &c.n_heads) ||
        !get_i64(cfgd, "intermediate", &c.intermediate) || !get_i64(cfgd, "max_position", &c.max_position) ||
        !get_i64(cfgd, "type_vocab", &c.type_vocab))
        return -1;
    PyObject *eps = PyDict_GetItemString(cfgd, "ln_eps");
    c.ln_eps = eps ? (float)PyFloat_AsDouble(eps) : 1e-12f;
    if (PyErr_Occurred()) return -1;
    mq_status st = mq_encoder_create(&self->enc, &c, n_threads);
    if (st != MQ_OK) { mq_py_raise(st); return -1; }
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
        PyArrayObject *a = mq_py_array(t, NPY_FLOAT32, 2, d, "word_embeddings");
        if (!a) return NULL;
        st = mq_encoder_set_word_embeddings(self->enc, PyArray_DATA(a));
    } else {
        PyArrayObject *a = mq_py_array(t, NPY_INT8, 2, d, "word_embeddings (int8)");
        PyArrayObject *b = a ? mq_py_array(s, NPY_FLOAT32, 1, dv, "word_embedding_scales") : NULL;
        if (!b) return NULL;
        st = mq_encoder_set_word_embeddings_s8(self->enc, PyArray_DATA(a), PyArray_DATA(b));
    }
    if (st != MQ_OK) return mq_py_raise(st);
    Py_RETURN_NONE;
}

static PyObject *Encoder_set_position_type_embeddings(EncoderObject *self, PyObject *args) {
    const mq_bert_config *c = enc_cfg(self);
    PyObject *p, *t;
    if (!c || !PyArg_ParseTuple(args, "OO", &p, &t)) return NULL;
    npy_intp dp[2] = {c->max_position, c->hidden}, dt[2] = {c->type_vocab, c->hidden};
    PyArrayObject *a = mq_py_array(p, NPY_FLOAT32, 2, dp, "position_embeddings");
    PyArrayObject *b = a ? mq_py_array(t, NPY_FLOAT32, 2, dt, "token_type_embeddings") : NULL;
    if (!b) return NULL;
    mq_status st = mq_encoder_set_position_type_embeddings(self->enc, PyArray_DATA(a), PyArray_DATA(b));
    if (st != MQ_OK) return mq_py_raise(st);
    Py_RETURN_NONE;
}

static PyObject *Encoder_set_layernorm(EncoderObject *self, PyObject *args) {
    const mq_bert_config *c = enc_cfg(self);
    int layer, which;
    PyObject *g, *b;
    if (!c || !PyArg_ParseTuple(args, "iiOO", &layer, &which, &g, &b)) return NULL;
    npy_intp d[1] = {c->hidden};
    PyArrayObject *ga = mq_py_array(g, NPY_FLOAT32, 1, d, "layernorm weight");
    PyArrayObject *ba = ga ? mq_py_array(b, NPY_FLOAT32, 1, d, "layernorm bias") : NULL;
    if (!ba) return NULL;
    mq_status st = mq_encoder_set_layernorm(self->enc, layer, which, PyArray_DATA(ga), PyArray_DATA(ba));
    if (st != MQ_OK) return mq_py_raise(st);
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
    int64_t K = 0, N = 0, cols = 0, nscales = 0;
    mq_status st = mq_encoder_site_shape(self->enc, site, &K, &N);
    if (st == MQ_OK) st = mq_linear_weight_layout(kind, K, N, per_ch, group, &cols, &nscales);
    if (st != MQ_OK) return mq_py_raise(st);
    const mq_linear_traits *t = mq_linear_kind_traits(kind);
    npy_intp dw[2] = {N, cols}, dn[1] = {N}, dk[1] = {K}, dsc[1] = {nscales};
    PyArrayObject *wa = mq_py_array(w, mq_py_weight_npy_type(t->weight_format), 2, dw, "weight");
    if (!wa) return NULL;
    int ok;
    PyArrayObject *wsa = mq_py_opt_array(ws, NPY_FLOAT32, 1, dsc, "w_scales", &ok);
    if (!ok) return NULL;
    if (nscales && !wsa) return PyErr_Format(PyExc_ValueError, "w_scales are required for quantized weights");
    PyArrayObject *ba = mq_py_opt_array(bias, NPY_FLOAT32, 1, dn, "bias", &ok);
    if (!ok) return NULL;
    PyArrayObject *ma = mq_py_opt_array(mul, NPY_FLOAT32, 1, dk, "act_mul", &ok);
    if (!ok) return NULL;
    mq_linear_spec spec = {(mq_linear_kind)kind, (mq_act_mode)act_mode, act_sym, act_scale, act_zp, per_ch, group, MQ_EPI_NONE};
    mq_linear_weights lw = {PyArray_DATA(wa), wsa ? PyArray_DATA(wsa) : NULL, ba ? PyArray_DATA(ba) : NULL,
                            ma ? PyArray_DATA(ma) : NULL};
    Py_BEGIN_ALLOW_THREADS
    st = mq_encoder_set_linear(self->enc, layer, site, &spec, &lw);
    Py_END_ALLOW_THREADS
    if (st != MQ_OK) return mq_py_raise(st);
    Py_RETURN_NONE;
}

static PyObject *Encoder_finalize(EncoderObject *self, PyObject *Py_UNUSED(ignored)) {
    if (!enc_cfg(self)) return NULL;
    mq_status st = mq_encoder_finalize(self->enc);
    if (st != MQ_OK) return mq_py_raise(st);
    Py_RETURN_NONE;
}

/* Checks the observers argument (any iterable of layers x 4 Observers or None) and keeps it as a tuple, which holds
   its own references, so another thread cannot drop an Observer from under the call. */
static PyObject *observer_tuple(EncoderObject *self, PyObject *obs_o, int nsites) {
    PyObject *t = PySequence_Tuple(obs_o);
    if (!t) return NULL;
    if (PyTuple_GET_SIZE(t) != nsites) {
        Py_DECREF(t);
        return PyErr_Format(PyExc_ValueError, "observers must have %d entries (layers x 4 sites)", nsites);
    }
    for (int i = 0; i < nsites; i++) {
        PyObject *o = PyTuple_GET_ITEM(t, i);
        if (o != Py_None && !PyObject_TypeCheck(o, self->observer_type)) {
            Py_DECREF(t);
            return PyErr_Format(PyExc_TypeError, "observers[%d] must be an Observer or None", i);
        }
    }
    return t;
}

/* Reads, checks and marks busy the observers right before the GIL is released: no Python code runs in between (the
   array copies before it may run an ndarray subclass's __array_finalize__). 0 with an exception set on failure. */
static int borrow_observers(PyObject *obs_list, mq_observer **observers, int nsites) {
    for (int i = 0; i < nsites; i++) {
        PyObject *o = PyTuple_GET_ITEM(obs_list, i);
        if (o == Py_None) continue;
        ObserverObject *ob = (ObserverObject *)o;
        if (!ob->obs) return PyErr_Format(PyExc_TypeError, "observers[%d] is not an initialised Observer", i), 0;
        if (ob->busy) return mq_py_observer_busy_error();
        observers[i] = ob->obs;
    }
    for (int i = 0; i < nsites; i++)
        if (observers[i]) ((ObserverObject *)PyTuple_GET_ITEM(obs_list, i))->busy = 1;
    return 1;
}

static void return_observers(PyObject *obs_list, mq_observer **observers, int nsites) {
    for (int i = 0; i < nsites; i++)
        if (observers[i]) ((ObserverObject *)PyTuple_GET_ITEM(obs_list, i))->busy = 0;
}

/* One f32 array [T, out_features of the site] per site, for the site outputs; their data pointers in ptrs. */
static PyObject *output_arrays(EncoderObject *self, const int32_t *lengths, npy_intp B, int nsites, float **ptrs) {
    int64_t T = 0;
    for (npy_intp b = 0; b < B; b++) T += lengths[b];
    PyObject *list = PyList_New(nsites);
    if (!list) return NULL;
    for (int i = 0; i < nsites; i++) {
        int64_t K = 0, N = 0;
        mq_status st = mq_encoder_site_shape(self->enc, i % MQ_SITES_PER_LAYER, &K, &N);
        if (st != MQ_OK) { Py_DECREF(list); return mq_py_raise(st); }
        npy_intp dt[2] = {T, N};
        PyObject *t = PyArray_SimpleNew(2, dt, NPY_FLOAT32);
        if (!t) { Py_DECREF(list); return NULL; }
        PyList_SET_ITEM(list, i, t);
        ptrs[i] = PyArray_DATA((PyArrayObject *)t);
    }
    return list;
}

/* The forward's arrays: private copies of the ids (the C core validates them once and then indexes tables with
   them, so another thread must not change them in between; the caller's arrays stay shared and writable while the
   GIL is out), lengths from the mask, and the outputs. */
typedef struct {
    PyObject *ids, *tt, *lengths, *hidden, *pooled, *taps, *obs_list;
    mq_observer **observers;
    float **tap_ptrs;
} forward_arrays;

static void release_arrays(forward_arrays *f) {
    PyObject *objs[7] = {f->ids, f->tt, f->lengths, f->hidden, f->pooled, f->taps, f->obs_list};
    for (int i = 0; i < 7; i++) Py_XDECREF(objs[i]);
    PyMem_Free(f->observers);
    PyMem_Free(f->tap_ptrs);
}

static int make_arrays(EncoderObject *self, forward_arrays *f, PyArrayObject *ids_in, PyArrayObject *mask,
                       PyArrayObject *tt_in, int pooling, int want_hidden, int want_taps, int nsites) {
    const mq_bert_config *c = mq_encoder_config(self->enc);
    npy_intp B = PyArray_DIM(ids_in, 0), S = PyArray_DIM(ids_in, 1), db[1] = {B};
    if (!(f->ids = PyArray_NewCopy(ids_in, NPY_CORDER))) return 0;
    if (tt_in && !(f->tt = PyArray_NewCopy(tt_in, NPY_CORDER))) return 0;
    if (!(f->lengths = PyArray_SimpleNew(1, db, NPY_INT32))) return 0;
    int32_t *len = PyArray_DATA((PyArrayObject *)f->lengths);
    mq_status st = mq_lengths_from_mask(PyArray_DATA(mask), B, S, len);
    int64_t tokens = 0;
    for (npy_intp b = 0; st == MQ_OK && b < B; b++) tokens += len[b];
    /* the bound covers the outputs allocated here too: check it before allocating them */
    const mq_call_shape shape = {B, S, tokens, want_hidden, want_taps, f->observers != NULL || want_taps};
    if (st == MQ_OK) st = mq_encoder_check_call(self->enc, &shape);
    if (st != MQ_OK) return mq_py_raise(st), 0;
    npy_intp dh[3] = {B, S, c->hidden}, dp[2] = {B, c->hidden};
    if (want_hidden && !(f->hidden = PyArray_SimpleNew(3, dh, NPY_FLOAT32))) return 0;
    if (pooling != MQ_POOL_NONE && !(f->pooled = PyArray_SimpleNew(2, dp, NPY_FLOAT32))) return 0;
    if (!want_taps) return 1;
    if (!(f->tap_ptrs = PyMem_Calloc((size_t)nsites, sizeof *f->tap_ptrs))) return PyErr_NoMemory(), 0;
    return (f->taps = output_arrays(self, len, B, nsites, f->tap_ptrs)) != NULL;
}

static void *data_or_null(PyObject *a) { return a ? PyArray_DATA((PyArrayObject *)a) : NULL; }

static PyObject *Encoder_forward(EncoderObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"input_ids", "attention_mask", "token_type_ids", "pooling", "normalize", "hidden",
                             "observers", "taps", NULL};
    const mq_bert_config *c = enc_cfg(self);
    PyObject *ids_o, *mask_o, *tt_o = Py_None, *obs_o = Py_None;
    int pooling = MQ_POOL_NONE, normalize = 0, want_hidden = 1, want_taps = 0;
    if (!c || !PyArg_ParseTupleAndKeywords(args, kw, "OO|OippOp", kwlist, &ids_o, &mask_o, &tt_o, &pooling, &normalize,
                                           &want_hidden, &obs_o, &want_taps))
        return NULL;
    PyArrayObject *ids_in = mq_py_array(ids_o, NPY_INT32, 2, NULL, "input_ids");
    if (!ids_in) return NULL;
    npy_intp B = PyArray_DIM(ids_in, 0), S = PyArray_DIM(ids_in, 1);
    if (B == 0 || S == 0) return PyErr_Format(PyExc_ValueError, "input_ids is empty (shape %zd x %zd)", (Py_ssize_t)B, (Py_ssize_t)S);
    if (S > c->max_position)
        return PyErr_Format(PyExc_ValueError, "sequence length %zd exceeds max_position_embeddings %lld", (Py_ssize_t)S,
                            (long long)c->max_position);
    npy_intp d2[2] = {B, S};
    PyArrayObject *mask = mq_py_array(mask_o, NPY_INT32, 2, d2, "attention_mask");
    if (!mask) return NULL;
    int ok;
    PyArrayObject *tt_in = mq_py_opt_array(tt_o, NPY_INT32, 2, d2, "token_type_ids", &ok);
    if (!ok) return NULL;
    if (pooling < 0 || pooling >= MQ_POOL_COUNT) return PyErr_Format(PyExc_ValueError, "unknown pooling %d", pooling);
    const int nsites = (int)(c->n_layers * MQ_SITES_PER_LAYER);
    forward_arrays f = {0};
    PyObject *result = NULL;
    int marked = 0;
    if (obs_o != Py_None) {
        if (!(f.obs_list = observer_tuple(self, obs_o, nsites))) goto done;
        if (!(f.observers = PyMem_Calloc((size_t)nsites, sizeof *f.observers))) { PyErr_NoMemory(); goto done; }
    }
    if (!make_arrays(self, &f, ids_in, mask, tt_in, pooling, want_hidden, want_taps, nsites)) goto done;
    mq_site_probe probe = {f.observers, f.tap_ptrs};
    mq_forward_args fa = {data_or_null(f.ids), data_or_null(f.tt), data_or_null(f.lengths), B, S,
                          data_or_null(f.hidden), pooling, normalize, data_or_null(f.pooled), mq_site_probe_hook(&probe)};
    if (f.obs_list && !(marked = borrow_observers(f.obs_list, f.observers, nsites))) goto done;
    mq_status st;
    Py_BEGIN_ALLOW_THREADS
    st = mq_encoder_forward(self->enc, &fa);
    Py_END_ALLOW_THREADS
    if (st != MQ_OK) { mq_py_raise(st); goto done; }
    result = Py_BuildValue("(OOO)", f.hidden ? f.hidden : Py_None, f.pooled ? f.pooled : Py_None,
                           f.taps ? f.taps : Py_None);
done:
    if (marked) return_observers(f.obs_list, f.observers, nsites);
    release_arrays(&f);
    return result;
}

static PyObject *Encoder_set_threads(EncoderObject *self, PyObject *arg) {
    if (!enc_cfg(self)) return NULL;
    long v = PyLong_AsLong(arg);
    if (v == -1 && PyErr_Occurred()) return NULL;
    if (v < 0 || v > INT_MAX) return PyErr_Format(PyExc_ValueError, "n_threads %ld must be >= 0 (0: all available)", v);
    int n = (int)v; /* the core refuses more threads than CPUs */
    mq_status st;
    Py_BEGIN_ALLOW_THREADS
    st = mq_encoder_set_threads(self->enc, n);
    Py_END_ALLOW_THREADS
    if (st != MQ_OK) return mq_py_raise(st);
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

static PyObject *Encoder_set_memory_limits(EncoderObject *self, PyObject *args) {
    unsigned long long max_bytes, keep_bytes;
    if (!enc_cfg(self) || !PyArg_ParseTuple(args, "KK", &max_bytes, &keep_bytes)) return NULL;
    if (max_bytes > SIZE_MAX || keep_bytes > SIZE_MAX) return PyErr_Format(PyExc_OverflowError, "limit exceeds size_t");
    mq_status st = mq_encoder_set_memory_limits(self->enc, (size_t)max_bytes, (size_t)keep_bytes);
    if (st != MQ_OK) return mq_py_raise(st);
    Py_RETURN_NONE;
}

static PyObject *Encoder_call_bytes(EncoderObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"batch", "seq", "tokens", "hidden", "taps", "hook", NULL};
    mq_call_shape c = {0};
    long long batch, seq, tokens;
    if (!enc_cfg(self) || !PyArg_ParseTupleAndKeywords(args, kw, "LLL|ppp", kwlist, &batch, &seq, &tokens, &c.hidden_out,
                                                       &c.taps, &c.hook))
        return NULL;
    if (batch <= 0 || seq <= 0 || tokens <= 0 || tokens > batch * seq || batch > INT64_MAX / seq)
        return PyErr_Format(PyExc_ValueError, "bad call shape (batch %lld, seq %lld, tokens %lld)", batch, seq, tokens);
    c.batch = batch, c.seq = seq, c.tokens = tokens;
    return PyLong_FromSize_t(mq_encoder_call_bytes(self->enc, &c));
}

static PyObject *Encoder_workspace_bytes(EncoderObject *self, PyObject *Py_UNUSED(ignored)) {
    if (!enc_cfg(self)) return NULL;
    size_t n;
    Py_BEGIN_ALLOW_THREADS /* waits for a forward running in another thread */
    n = mq_encoder_workspace_bytes(self->enc);
    Py_END_ALLOW_THREADS
    return PyLong_FromSize_t(n);
}

/* stage_seconds(reset=False) -> {stage: seconds} (mq_encoder_stage_seconds) */
static PyObject *Encoder_stage_seconds(EncoderObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"reset", NULL};
    int reset = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|p", kwlist, &reset)) return NULL;
    if (!enc_cfg(self)) return NULL;
    double s[MQ_STAGE_COUNT];
    Py_BEGIN_ALLOW_THREADS /* waits for a forward running in another thread */
    mq_encoder_stage_seconds(self->enc, s, reset);
    Py_END_ALLOW_THREADS
    PyObject *d = PyDict_New();
    for (int i = 0; d && i < MQ_STAGE_COUNT; i++) {
        PyObject *v = PyFloat_FromDouble(s[i]);
        if (!v || PyDict_SetItemString(d, mq_stage_name(i), v) < 0) { Py_XDECREF(v); Py_CLEAR(d); break; }
        Py_DECREF(v);
    }
    return d;
}

static PyObject *Encoder_site_impl(EncoderObject *self, PyObject *args) {
    int layer, site;
    if (!enc_cfg(self) || !PyArg_ParseTuple(args, "ii", &layer, &site)) return NULL;
    return PyUnicode_FromString(mq_encoder_site_impl(self->enc, layer, site));
}

static PyObject *Encoder_set_attention_precision(EncoderObject *self, PyObject *arg) {
    if (!enc_cfg(self)) return NULL;
    long v = PyLong_AsLong(arg);
    if (v == -1 && PyErr_Occurred()) return NULL;
    if (v < 0 || v >= MQ_ATTN_PRECISION_COUNT)
        return PyErr_Format(PyExc_ValueError, "unknown attention precision %ld (ATTN_F32, ATTN_BF16 or ATTN_INT8)", v);
    mq_status st;
    Py_BEGIN_ALLOW_THREADS /* waits for a forward running in another thread */
    st = mq_encoder_set_attention_precision(self->enc, (int)v);
    Py_END_ALLOW_THREADS
    if (st != MQ_OK) return mq_py_raise(st);
    Py_RETURN_NONE;
}

/* (precision, kernel): the attention precision and the kernel that computes it. */
static PyObject *Encoder_attention_info(EncoderObject *self, PyObject *Py_UNUSED(ignored)) {
    if (!enc_cfg(self)) return NULL;
    return Py_BuildValue("(is)", mq_encoder_attention_precision(self->enc), mq_encoder_attention_impl(self->enc));
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
    {"set_attention_precision", (PyCFunction)Encoder_set_attention_precision, METH_O,
     "the precision attention computes in: ATTN_F32, ATTN_BF16 or ATTN_INT8"},
    {"attention_info", (PyCFunction)Encoder_attention_info, METH_NOARGS,
     "(precision, kernel): the attention precision and the kernel that computes it"},
    {"nbytes", (PyCFunction)Encoder_nbytes, METH_NOARGS, "bytes held by the parameters"},
    {"site_impl", (PyCFunction)Encoder_site_impl, METH_VARARGS, "oneDNN implementation of a site's matmul"},
    {"set_memory_limits", (PyCFunction)Encoder_set_memory_limits, METH_VARARGS,
     "(max_bytes, keep_bytes): bound on a forward call's bytes (0: none); workspace kept after a call"},
    {"call_bytes", (PyCFunction)(void (*)(void))Encoder_call_bytes, METH_VARARGS | METH_KEYWORDS,
     "call_bytes(batch, seq, tokens, hidden=False, taps=False, hook=False) -> bytes a forward of that shape allocates"},
    {"workspace_bytes", (PyCFunction)Encoder_workspace_bytes, METH_NOARGS, "bytes the workspace holds now"},
    {"stage_seconds", (PyCFunction)(void (*)(void))Encoder_stage_seconds, METH_VARARGS | METH_KEYWORDS,
     "stage_seconds(reset=False) -> {stage: seconds} summed over the forwards since creation or the last reset"},
    {NULL, NULL, 0, NULL}};

static PyType_Slot Encoder_slots[] = {
    {Py_tp_init, Encoder_init},
    {Py_tp_dealloc, Encoder_dealloc},
    {Py_tp_methods, Encoder_methods},
    {Py_tp_new, PyType_GenericNew},
    {Py_tp_doc, "Encoder(config, n_threads, observer_type): the C BERT encoder. Use medquant.Encoder instead."},
    {0, NULL}};

PyType_Spec mq_py_encoder_spec = {"medquant._core.Encoder", sizeof(EncoderObject), 0, Py_TPFLAGS_DEFAULT, Encoder_slots};


