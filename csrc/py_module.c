/* py_module.c - the module medquant._core: its functions (runtime facts, weight quantization, qparams), its
 * constants, and the multi-phase init that adds the Observer, Encoder and Linear types. */
#define MQ_PY_MODULE_MAIN /* this file imports the NumPy C API for the extension (py_common.h) */
#include "py_common.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

#include "attention.h"
#include "encoder.h"
#include "linear.h"
#include "observer.h"
#include "qparams.h"
#include "wo_matmul.h"

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
    if (st != MQ_OK) return mq_py_raise(st);
    return Py_BuildValue("{s:O,s:O}", "int8_exact", int8_exact ? Py_True : Py_False, "bf16_native",
                         bf16_native ? Py_True : Py_False);
}

/* The weight quantizers return (codes, scales): with scales=None they choose the scales; given scales (a float32
   array of the scales' shape) they round with those, and the scales returned are a copy of them. */
static PyObject *scales_out(PyObject *given, npy_intp n, const char *what, int *ok) {
    npy_intp dims[1] = {n};
    PyArrayObject *g = mq_py_opt_array(given, NPY_FLOAT32, 1, dims, what, ok);
    if (!*ok) return NULL;
    PyObject *s = PyArray_SimpleNew(1, dims, NPY_FLOAT32);
    if (!s) { *ok = 0; return NULL; }
    if (g) memcpy(PyArray_DATA((PyArrayObject *)s), PyArray_DATA(g), (size_t)n * sizeof(float));
    return s;
}

static PyObject *py_quantize_weight_s8(PyObject *Py_UNUSED(m), PyObject *args, PyObject *kwargs) {
    static char *kw[] = {"w", "per_channel", "scales", NULL};
    PyObject *w, *given = Py_None;
    int per_channel = 1, ok;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O|pO", kw, &w, &per_channel, &given)) return NULL;
    PyArrayObject *a = mq_py_array(w, NPY_FLOAT32, 2, NULL, "weight");
    if (!a) return NULL;
    npy_intp N = PyArray_DIM(a, 0), K = PyArray_DIM(a, 1);
    if (N == 0 || K == 0) return PyErr_Format(PyExc_ValueError, "weight is empty");
    PyObject *s = scales_out(given, per_channel ? N : 1, "scales", &ok);
    if (!ok) return NULL;
    PyObject *q = PyArray_SimpleNew(2, PyArray_DIMS(a), NPY_INT8);
    if (!q) { Py_DECREF(s); return NULL; }
    const int fixed = given != Py_None;
    int8_t *qd = PyArray_DATA((PyArrayObject *)q);
    float *sd = PyArray_DATA((PyArrayObject *)s);
    mq_status st;
    Py_BEGIN_ALLOW_THREADS
    st = fixed ? mq_round_weight_s8(PyArray_DATA(a), N, K, per_channel, sd, qd)
               : mq_quantize_weight_s8(PyArray_DATA(a), N, K, per_channel, qd, sd);
    Py_END_ALLOW_THREADS
    if (st != MQ_OK) { Py_DECREF(q); Py_DECREF(s); return mq_py_raise(st); }
    return Py_BuildValue("(NN)", q, s);
}

static PyObject *py_quantize_weight_s4(PyObject *Py_UNUSED(m), PyObject *args, PyObject *kwargs) {
    static char *kw[] = {"w", "group", "scales", NULL};
    PyObject *w, *given = Py_None;
    long long group;
    int ok;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OL|O", kw, &w, &group, &given)) return NULL;
    PyArrayObject *a = mq_py_array(w, NPY_FLOAT32, 2, NULL, "weight");
    if (!a) return NULL;
    npy_intp N = PyArray_DIM(a, 0), K = PyArray_DIM(a, 1);
    if (N == 0 || K == 0 || group <= 0 || group % 2 || K % group)
        return PyErr_Format(PyExc_ValueError, "int4 needs an even group size dividing in_features (group=%lld, in=%zd)", group, (Py_ssize_t)K);
    npy_intp dq[2] = {N, K / 2};
    PyObject *s = scales_out(given, N * (K / (npy_intp)group), "scales", &ok);
    if (!ok) return NULL;
    PyObject *q = PyArray_SimpleNew(2, dq, NPY_UINT8);
    if (!q) { Py_DECREF(s); return NULL; }
    const int fixed = given != Py_None;
    uint8_t *qd = PyArray_DATA((PyArrayObject *)q);
    float *sd = PyArray_DATA((PyArrayObject *)s);
    mq_status st;
    Py_BEGIN_ALLOW_THREADS
    st = fixed ? mq_round_weight_s4(PyArray_DATA(a), N, K, group, sd, qd) : mq_quantize_weight_s4(PyArray_DATA(a), N, K, group, qd, sd);
    Py_END_ALLOW_THREADS
    if (st != MQ_OK) { Py_DECREF(q); Py_DECREF(s); return mq_py_raise(st); }
    return Py_BuildValue("(NN)", q, s);
}

static PyObject *py_dequantize_weight_s4(PyObject *Py_UNUSED(m), PyObject *args) {
    PyObject *qo, *so;
    long long group;
    if (!PyArg_ParseTuple(args, "OOL", &qo, &so, &group)) return NULL;
    PyArrayObject *q = mq_py_array(qo, NPY_UINT8, 2, NULL, "packed");
    if (!q) return NULL;
    npy_intp N = PyArray_DIM(q, 0), K = 2 * PyArray_DIM(q, 1);
    if (N == 0 || K == 0 || group <= 0 || group % 2 || K % group) return PyErr_Format(PyExc_ValueError, "bad int4 group size %lld", group);
    npy_intp ds[1] = {N * (K / (npy_intp)group)}, dw[2] = {N, K};
    PyArrayObject *s = mq_py_array(so, NPY_FLOAT32, 1, ds, "scales");
    if (!s) return NULL;
    PyObject *w = PyArray_SimpleNew(2, dw, NPY_FLOAT32);
    if (!w) return NULL;
    mq_dequantize_weight_s4(PyArray_DATA(q), N, K, group, PyArray_DATA(s), PyArray_DATA((PyArrayObject *)w));
    return w;
}

static PyObject *py_quantize_rows_s8(PyObject *Py_UNUSED(m), PyObject *args, PyObject *kwargs) {
    static char *kw[] = {"table", "scales", NULL};
    PyObject *x, *given = Py_None;
    int ok;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O|O", kw, &x, &given)) return NULL;
    PyArrayObject *a = mq_py_array(x, NPY_FLOAT32, 2, NULL, "table");
    if (!a) return NULL;
    npy_intp R = PyArray_DIM(a, 0), C = PyArray_DIM(a, 1);
    if (R == 0 || C == 0) return PyErr_Format(PyExc_ValueError, "table is empty");
    PyObject *s = scales_out(given, R, "scales", &ok);
    if (!ok) return NULL;
    PyObject *q = PyArray_SimpleNew(2, PyArray_DIMS(a), NPY_INT8);
    if (!q) { Py_DECREF(s); return NULL; }
    const int fixed = given != Py_None;
    int8_t *qd = PyArray_DATA((PyArrayObject *)q);
    float *sd = PyArray_DATA((PyArrayObject *)s);
    mq_status st;
    Py_BEGIN_ALLOW_THREADS
    st = fixed ? mq_round_weight_s8(PyArray_DATA(a), R, C, 1, sd, qd) : mq_quantize_rows_s8(PyArray_DATA(a), R, C, qd, sd);
    Py_END_ALLOW_THREADS
    if (st != MQ_OK) { Py_DECREF(q); Py_DECREF(s); return mq_py_raise(st); }
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

/* attention(qkv [T, 3H] f32, lengths [B] int32, n_heads, bf16=False, n_threads=1, int8=False) -> context [T, H] f32: the
   encoder's attention kernel alone, over sequences packed back to back (for tests and benchmarks). */
static PyObject *py_attention(PyObject *Py_UNUSED(m), PyObject *args, PyObject *kwargs) {
    static char *kw[] = {"qkv", "lengths", "n_heads", "bf16", "n_threads", "int8", NULL};
    PyObject *qo, *lo;
    int heads, bf16 = 0, nthr = 1, int8 = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOi|pip", kw, &qo, &lo, &heads, &bf16, &nthr, &int8)) return NULL;
    if (bf16 && int8) return PyErr_Format(PyExc_ValueError, "attention: bf16 or int8, not both");
    PyArrayObject *q = mq_py_array(qo, NPY_FLOAT32, 2, NULL, "qkv");
    PyArrayObject *l = q ? mq_py_array(lo, NPY_INT32, 1, NULL, "lengths") : NULL;
    if (!l) return NULL;
    const npy_intp T = PyArray_DIM(q, 0), H3 = PyArray_DIM(q, 1), B = PyArray_DIM(l, 0);
    if (heads <= 0 || H3 % (3 * (npy_intp)heads) != 0 || H3 == 0)
        return PyErr_Format(PyExc_ValueError, "qkv has %zd columns: not 3 x n_heads (%d) x head_dim", (Py_ssize_t)H3, heads);
    const int32_t *len = PyArray_DATA(l);
    int64_t *off = PyMem_Malloc((size_t)(B ? B : 1) * sizeof *off), total = 0, max_len = 1;
    if (!off) return PyErr_NoMemory();
    for (npy_intp b = 0; b < B; b++) {
        off[b] = total;
        total += len[b] > 0 ? len[b] : 0;
        if (len[b] > max_len) max_len = len[b];
    }
    if (total != T) {
        PyMem_Free(off);
        return PyErr_Format(PyExc_ValueError, "lengths add up to %lld rows, qkv has %zd", (long long)total, (Py_ssize_t)T);
    }
    npy_intp dims[2] = {T, H3 / 3};
    PyObject *ctx = PyArray_ZEROS(2, dims, NPY_FLOAT32, 0);
    if (!ctx) { PyMem_Free(off); return NULL; }
    mq_engine *eng = NULL;
    mq_attention *att = NULL;
    mq_status st;
    Py_BEGIN_ALLOW_THREADS
    st = mq_engine_create(&eng, nthr);
    if (st == MQ_OK) st = mq_attention_create(&att, eng, heads, H3 / 3 / heads, max_len);
    if (st == MQ_OK) st = mq_attention_set_precision(att, bf16 ? MQ_ATTN_BF16 : int8 ? MQ_ATTN_INT8 : MQ_ATTN_F32);
    if (st == MQ_OK)
        st = mq_attention_forward(att, PyArray_DATA(q), PyArray_DATA((PyArrayObject *)ctx), NULL, 0.f, 0, off, len, B);
    mq_attention_destroy(att);
    mq_engine_destroy(eng);
    Py_END_ALLOW_THREADS
    PyMem_Free(off);
    if (st != MQ_OK) { Py_DECREF(ctx); return mq_py_raise(st); }
    return ctx;
}

/* panel_matmul(w, x, scales=None, alpha=1.0, row_scale=None, bias=None, epilogue=EPI_NONE, residual=None,
   n_threads=1) -> y [M, N] f32: medquant's panel matmul (wo_matmul.h) alone, for tests and benchmarks, on any CPU
   (Linear uses it only for some kinds on some CPUs): w f32 [N, K] (F32 panels) or int8 [N, K] with per-column
   scales [N] (S8); x f32 [M, K]; row_scale [M], bias [N], residual [M, N] as in mq_wo_output. */
static PyObject *py_panel_matmul(PyObject *Py_UNUSED(m), PyObject *args, PyObject *kwargs) {
    static char *kw[] = {"w", "x", "scales", "alpha", "row_scale", "bias", "epilogue", "residual", "n_threads", NULL};
    PyObject *wo, *xo, *so = Py_None, *ro = Py_None, *bo = Py_None, *reso = Py_None;
    float alpha = 1.f;
    int epi = MQ_EPI_NONE, nthr = 1, ok = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OO|OfOOiOi", kw, &wo, &xo, &so, &alpha, &ro, &bo, &epi, &reso, &nthr))
        return NULL;
    const int s8 = PyArray_Check(wo) && PyArray_TYPE((PyArrayObject *)wo) == NPY_INT8;
    PyArrayObject *w = mq_py_array(wo, s8 ? NPY_INT8 : NPY_FLOAT32, 2, NULL, "w");
    if (!w) return NULL;
    const npy_intp N = PyArray_DIM(w, 0), K = PyArray_DIM(w, 1), xd[2] = {-1, K};
    PyArrayObject *x = mq_py_array(xo, NPY_FLOAT32, 2, xd, "x");
    if (!x) return NULL;
    const npy_intp M = PyArray_DIM(x, 0), nd[1] = {N}, md[1] = {M}, yd[2] = {M, N};
    PyArrayObject *sc = mq_py_opt_array(so, NPY_FLOAT32, 1, nd, "scales", &ok);
    PyArrayObject *rs = ok ? mq_py_opt_array(ro, NPY_FLOAT32, 1, md, "row_scale", &ok) : NULL;
    PyArrayObject *b = ok ? mq_py_opt_array(bo, NPY_FLOAT32, 1, nd, "bias", &ok) : NULL;
    PyArrayObject *res = ok ? mq_py_opt_array(reso, NPY_FLOAT32, 2, yd, "residual", &ok) : NULL;
    if (!ok) return NULL;
    if (s8 != (sc != NULL)) return PyErr_Format(PyExc_ValueError, "panel_matmul: scales go with int8 weights, only");
    if (epi < 0 || epi >= MQ_EPI_COUNT || (epi == MQ_EPI_RESIDUAL) != (res != NULL))
        return PyErr_Format(PyExc_ValueError, "panel_matmul: epilogue %d and residual do not match", epi);
    if (nthr < 1 || M < 1) return PyErr_Format(PyExc_ValueError, "panel_matmul: need rows and n_threads >= 1");
    PyObject *y = PyArray_ZEROS(2, yd, NPY_FLOAT32, 0);
    if (!y) return NULL;
    const mq_wo_layout lay = {s8 ? MQ_WO_S8 : MQ_WO_F32, K, N, 1, 0};
    const mq_wo_output out = {alpha, rs ? PyArray_DATA(rs) : NULL, b ? PyArray_DATA(b) : NULL, (mq_epilogue)epi,
                              res ? PyArray_DATA(res) : NULL};
    mq_wo_matrix *mat = NULL;
    float *scratch = NULL;
    mq_status st;
    Py_BEGIN_ALLOW_THREADS
    st = mq_wo_matrix_create(&mat, &lay, PyArray_DATA(w), sc ? PyArray_DATA(sc) : NULL);
    if (st == MQ_OK && !(scratch = mq_alloc(mq_wo_scratch_floats(K, N, nthr), sizeof(float))))
        st = mq_set_error(MQ_ERR_NOMEM, "panel_matmul: out of memory for the scratch");
    if (st == MQ_OK) st = mq_wo_matmul(mat, PyArray_DATA(x), M, &out, PyArray_DATA((PyArrayObject *)y), scratch, nthr);
    mq_free(scratch);
    mq_wo_matrix_destroy(mat);
    Py_END_ALLOW_THREADS
    if (st != MQ_OK) { Py_DECREF(y); return mq_py_raise(st); }
    return y;
}

static PyMethodDef module_methods[] = {
    {"runtime_info", py_runtime_info, METH_NOARGS, "oneDNN version, threading runtime, effective ISA, threads"},
    {"kernel_support", py_kernel_support, METH_NOARGS,
     "{int8_exact, bf16_native}: whether int8 / bf16 layers run native oneDNN kernels here (else emulated in f32)"},
    {"quantize_weight_s8", (PyCFunction)(void (*)(void))py_quantize_weight_s8, METH_VARARGS | METH_KEYWORDS,
     "(w f32[N,K], per_channel=True, scales=None) -> (q i8[N,K], scales): scales chosen, or given and rounded with"},
    {"quantize_weight_s4", (PyCFunction)(void (*)(void))py_quantize_weight_s4, METH_VARARGS | METH_KEYWORDS,
     "(w f32[N,K], group, scales=None) -> (packed u8[N,K/2], scales): scales chosen, or given and rounded with"},
    {"dequantize_weight_s4", py_dequantize_weight_s4, METH_VARARGS, "(packed, scales, group) -> w f32[N,K]"},
    {"quantize_rows_s8", (PyCFunction)(void (*)(void))py_quantize_rows_s8, METH_VARARGS | METH_KEYWORDS,
     "(table f32[R,C], scales=None) -> (q i8[R,C], row scales): scales chosen, or given and rounded with"},
    {"attention", (PyCFunction)(void (*)(void))py_attention, METH_VARARGS | METH_KEYWORDS,
     "attention(qkv, lengths, n_heads, bf16=False, n_threads=1, int8=False) -> context: the encoder's attention kernel alone"},
    {"panel_matmul", (PyCFunction)(void (*)(void))py_panel_matmul, METH_VARARGS | METH_KEYWORDS,
     "panel_matmul(w, x, scales=None, alpha=1.0, row_scale=None, bias=None, epilogue=EPI_NONE, residual=None, "
     "n_threads=1) -> y: medquant's panel matmul alone (f32 or int8 weights)"},
    {"qparams", py_qparams, METH_VARARGS, "(lo, hi, symmetric) -> (scale, zero_point) of the u8 activation grid"},
    {NULL, NULL, 0, NULL}};

static const char *kind_name(int kind) { return mq_linear_kind_traits(kind)->name; }

/* A core enumeration from its name function: `table` = {name: code}, and a constant PREFIX_NAME per value (names
   upper-cased, '-' as '_'). */
static int add_enum(PyObject *m, const char *prefix, const char *table, const char *(*name_of)(int), int count) {
    PyObject *d = PyDict_New();
    if (!d) return -1;
    for (int i = 0; i < count; i++) {
        char name[48];
        int n = snprintf(name, sizeof name, "%s%s", prefix, name_of(i));
        for (int j = (int)strlen(prefix); j < n && j < (int)sizeof name; j++)
            name[j] = name[j] == '-' ? '_' : (char)(name[j] >= 'a' && name[j] <= 'z' ? name[j] - 'a' + 'A' : name[j]);
        PyObject *v = PyLong_FromLong(i);
        int bad = !v || PyDict_SetItemString(d, name_of(i), v) < 0 || PyModule_AddIntConstant(m, name, i) < 0;
        Py_XDECREF(v);
        if (bad) { Py_DECREF(d); return -1; }
    }
    int rc = PyModule_AddObjectRef(m, table, d);
    Py_DECREF(d);
    return rc;
}

/* The integer codes the Python layer passes back: precision kinds (LINEAR_KINDS and LINEAR_<NAME>), range methods
   (RANGE_METHODS and RANGE_<NAME>), activation modes, epilogues, pooling, sites per layer. Kinds and range methods
   come from the core's own tables, so a new one needs no change here. */
static int add_constants(PyObject *m) {
    static const struct {
        const char *name;
        int value;
    } constants[] = {
        {"ACT_DYNAMIC", MQ_ACT_DYNAMIC}, {"ACT_DYNAMIC_TOKEN", MQ_ACT_DYNAMIC_TOKEN}, {"ACT_STATIC", MQ_ACT_STATIC},
        {"EPI_NONE", MQ_EPI_NONE}, {"EPI_GELU", MQ_EPI_GELU}, {"EPI_RESIDUAL", MQ_EPI_RESIDUAL},
        {"POOL_NONE", MQ_POOL_NONE}, {"POOL_CLS", MQ_POOL_CLS}, {"POOL_MEAN", MQ_POOL_MEAN},
        {"POOL_MAX", MQ_POOL_MAX}, {"POOL_MEAN_SQRT_LEN", MQ_POOL_MEAN_SQRT_LEN},
        {"POOL_WEIGHTED_MEAN", MQ_POOL_WEIGHTED_MEAN}, {"POOL_LAST", MQ_POOL_LAST},
        {"SITES_PER_LAYER", MQ_SITES_PER_LAYER}, {"ATTN_F32", MQ_ATTN_F32}, {"ATTN_BF16", MQ_ATTN_BF16},
        {"ATTN_INT8", MQ_ATTN_INT8},
    };
    for (size_t i = 0; i < sizeof constants / sizeof constants[0]; i++)
        if (PyModule_AddIntConstant(m, constants[i].name, constants[i].value)) return -1;
    if (add_enum(m, "LINEAR_", "LINEAR_KINDS", kind_name, MQ_LINEAR_KIND_COUNT) < 0) return -1;
    return add_enum(m, "RANGE_", "RANGE_METHODS", mq_range_method_name, MQ_RANGE_COUNT);
}

/* Adds a type made from spec as `name`; returns it (borrowed from the module) or NULL. */
static PyObject *add_type(PyObject *m, PyType_Spec *spec, const char *name) {
    PyObject *t = PyType_FromModuleAndSpec(m, spec, NULL);
    if (!t) return NULL;
    int rc = PyModule_AddObjectRef(m, name, t);
    Py_DECREF(t);
    return rc < 0 ? NULL : t;
}

static int module_exec(PyObject *m) {
    import_array1(-1);
    if (mq_threads_fork_safe() != MQ_OK) return mq_py_raise(MQ_ERR_STATE), -1;
    PyObject *ot = add_type(m, &mq_py_observer_spec, "Observer");
    if (!ot) return -1;
    Py_INCREF(ot);
    ((mq_py_state *)PyModule_GetState(m))->observer_type = (PyTypeObject *)ot;
    if (!add_type(m, &mq_py_encoder_spec, "Encoder") || !add_type(m, &mq_py_linear_spec, "Linear")) return -1;
    return add_constants(m);
}

static int module_traverse(PyObject *m, visitproc visit, void *arg) {
    mq_py_state *ms = PyModule_GetState(m);
    if (ms) Py_VISIT(ms->observer_type);
    return 0;
}

static int module_clear(PyObject *m) {
    mq_py_state *ms = PyModule_GetState(m);
    if (ms) Py_CLEAR(ms->observer_type);
    return 0;
}

static void module_free(void *m) { module_clear((PyObject *)m); }

static PyModuleDef_Slot module_slots[] = {{Py_mod_exec, module_exec}, {0, NULL}};

static struct PyModuleDef core_module = {PyModuleDef_HEAD_INIT, "_core",
                                         "medquant C core: BERT encoder, quantized linear layers and observers on oneDNN",
                                         sizeof(mq_py_state), module_methods, module_slots, module_traverse,
                                         module_clear, module_free};

PyMODINIT_FUNC PyInit__core(void) { return PyModuleDef_Init(&core_module); }
