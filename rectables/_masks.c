/* Compiled kernels of OptEmbed's row and dim masks (rectables/methods/optembed.py,
 * MaskRows): one pass over the vectors forward and one backward, where the pure-torch
 * path makes about a dozen (each a cold [N, F, D] tensor: ~3 ms at Criteo batch size).
 * The same results as the torch path up to the order of the 16-term norm sums.
 *
 * Vectors v are R = N * F rows of D floats, row i of feature i % F.  Forward:
 *   x[i] = sum_j |v[i, j]| - th[i % F];  k = x[i] > 0 ? dims[i] : 0;
 *   out[i, j] = j < k ? v[i, j] : 0.
 * Backward (ste = 1; ste = 0 leaves the straight-through terms out):
 *   s = step_grad(x[i]) * sum_{j < dims[i]} g[i, j] v[i, j]
 *   gv[i, j] = (j < k ? g[i, j] : 0) + sign(v[i, j]) * s;   gth[f] -= s.
 * Rows are split over two threads.  Arrays come as addresses of contiguous tensors (the
 * caller keeps them alive).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <pthread.h>
#include <stdlib.h>

static inline float step_grad(float x) {
    float a = fabsf(x);
    return a <= 0.4f ? 2.0f - 4.0f * a : (a <= 1.0f ? 0.4f : 0.0f);
}

static inline float sgn(float v) { return (float)((v > 0.0f) - (v < 0.0f)); }

typedef struct {
    const float *v, *th, *g, *x;
    const int64_t *dims;
    float *out, *xo, *gv;
    double *acc;
    int64_t lo, hi, D, F;
    int ste;
} Job;

static void *forward_rows(void *arg) {
    Job *a = arg;
    for (int64_t i = a->lo; i < a->hi; i++) {
        const float *r = a->v + i * a->D;
        float *o = a->out + i * a->D, norm = 0.0f;
        for (int64_t j = 0; j < a->D; j++) norm += fabsf(r[j]);
        float xi = norm - a->th[i % a->F];
        int64_t k = xi > 0.0f ? a->dims[i] : 0;
        a->xo[i] = xi;
        for (int64_t j = 0; j < a->D; j++) o[j] = j < k ? r[j] : 0.0f;
    }
    return NULL;
}

static void *backward_rows(void *arg) {
    Job *a = arg;
    for (int64_t i = a->lo; i < a->hi; i++) {
        const float *gr = a->g + i * a->D, *vr = a->v + i * a->D;
        float *o = a->gv + i * a->D, s = 0.0f;
        int64_t d = a->dims[i], k = a->x[i] > 0.0f ? d : 0;
        if (a->ste) {
            float sg = step_grad(a->x[i]);
            if (sg != 0.0f) {
                float r = 0.0f;
                for (int64_t j = 0; j < d; j++) r += gr[j] * vr[j];
                s = sg * r;
            }
        }
        for (int64_t j = 0; j < a->D; j++) o[j] = (j < k ? gr[j] : 0.0f) + sgn(vr[j]) * s;
        a->acc[i % a->F] -= s;
    }
    return NULL;
}

/* Rows split over two threads (memory-bound: two cores read and write faster than one);
 * small inputs run on the caller's thread. */
static int run2(void *(*fn)(void *), Job *jobs, int64_t R, double *acc1) {
    jobs[1] = jobs[0];
    jobs[1].acc = acc1;
    jobs[0].lo = 0;
    jobs[0].hi = jobs[1].lo = R < 8192 ? R : R / 2;
    jobs[1].hi = R;
    pthread_t t;
    int threaded = jobs[1].lo < R && pthread_create(&t, NULL, fn, &jobs[1]) == 0;
    fn(&jobs[0]);
    if (threaded) pthread_join(t, NULL);
    else if (jobs[1].lo < R) fn(&jobs[1]);
    return 0;
}

static PyObject *forward(PyObject *self, PyObject *args) {
    unsigned long long pv, pth, pd, po, px;
    long long R, D, F;
    if (!PyArg_ParseTuple(args, "KLLKLKKK", &pv, &R, &D, &pth, &F, &pd, &po, &px)) return NULL;
    Job jobs[2] = {{.v = (const float *)pv, .th = (const float *)pth, .dims = (const int64_t *)pd,
                    .out = (float *)po, .xo = (float *)px, .D = D, .F = F}};
    Py_BEGIN_ALLOW_THREADS
    run2(forward_rows, jobs, R, NULL);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *backward(PyObject *self, PyObject *args) {
    unsigned long long pg, pv, px, pd, pgv, pgth;
    long long R, D, F;
    int ste;
    if (!PyArg_ParseTuple(args, "KKKKLLLKKp", &pg, &pv, &px, &pd, &R, &D, &F, &pgv, &pgth, &ste)) return NULL;
    double *acc = calloc(2 * (size_t)F, sizeof(double));
    if (!acc) return PyErr_NoMemory();
    Job jobs[2] = {{.g = (const float *)pg, .v = (const float *)pv, .x = (const float *)px,
                    .dims = (const int64_t *)pd, .gv = (float *)pgv, .acc = acc, .D = D, .F = F, .ste = ste}};
    Py_BEGIN_ALLOW_THREADS
    run2(backward_rows, jobs, R, acc + F);
    Py_END_ALLOW_THREADS
    float *gth = (float *)pgth;
    for (int64_t f = 0; f < F; f++) gth[f] = (float)(acc[f] + acc[F + f]);
    free(acc);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"forward", forward, METH_VARARGS, "row and dim masks of OptEmbed, forward"},
    {"backward", backward, METH_VARARGS, "their backward with the straight-through step"},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_masks", "kernels of OptEmbed's masks", -1, methods};

PyMODINIT_FUNC PyInit__masks(void) { return PyModule_Create(&module); }
