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
#include <omp.h>
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

/* Loops over a row's D values are written to vectorise (sums in four interleaved
 * parts: one serial sum of 16 costs more than the rest of the row) and built for
 * AVX-512, AVX2 and plain x86-64, chosen at load time. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CLONES
#endif

#define INLINE static inline __attribute__((always_inline))

/* sum_j<n |r[j]| (dot = 0) or sum_j<n r[j] s[j], in four interleaved parts */
INLINE float row_sum(const float *r, const float *s, int64_t n, int dot) {
    float p[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    int64_t j = 0;
    for (; j + 4 <= n; j += 4)
        for (int q = 0; q < 4; q++) p[q] += dot ? r[j + q] * s[j + q] : fabsf(r[j + q]);
    for (; j < n; j++) p[0] += dot ? r[j] * s[j] : fabsf(r[j]);
    return (p[0] + p[1]) + (p[2] + p[3]);
}

INLINE void forward_row(const Job *a, int64_t i, int64_t f, const int64_t D) {
    const float *r = a->v + i * D;
    float *o = a->out + i * D;
    const float xi = row_sum(r, r, D, 0) - a->th[f];
    const int64_t k = xi > 0.0f ? a->dims[i] : 0;
    a->xo[i] = xi;
    for (int64_t j = 0; j < D; j++) o[j] = j < k ? r[j] : 0.0f;
}

INLINE float backward_row(const Job *a, int64_t i, const int64_t D) {
    const float *gr = a->g + i * D, *vr = a->v + i * D;
    float *o = a->gv + i * D, s = 0.0f;
    const int64_t d = a->dims[i], k = a->x[i] > 0.0f ? d : 0;
    const float sg = a->ste ? step_grad(a->x[i]) : 0.0f;
    if (sg != 0.0f) s = sg * row_sum(gr, vr, d, 1);
    for (int64_t j = 0; j < D; j++) o[j] = (j < k ? gr[j] : 0.0f) + sgn(vr[j]) * s;
    return s;
}

/* D = 16 (the dim OptEmbed runs at) in GCC vector types: one 16-float register per row
 * where AVX-512 is there (a plain loop compiles to 16 scalar steps and a branch per k). */
typedef float v16f __attribute__((vector_size(64), aligned(4)));
typedef int32_t v16i __attribute__((vector_size(64), aligned(4)));
typedef float v8f __attribute__((vector_size(32), aligned(4)));
static const v16i IOTA = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
static const v16f ONES = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1};

INLINE float hsum16(v16f x) {
    v8f h = __builtin_shufflevector(x, x, 0, 1, 2, 3, 4, 5, 6, 7) + __builtin_shufflevector(x, x, 8, 9, 10, 11, 12, 13, 14, 15);
    return ((h[0] + h[4]) + (h[1] + h[5])) + ((h[2] + h[6]) + (h[3] + h[7]));
}

INLINE void forward_row16(const Job *a, int64_t i, int64_t f) {
    const v16f x = *(const v16f *)(a->v + i * 16);
    const float xi = hsum16((v16f)((v16i)x & 0x7fffffff)) - a->th[f];
    const int32_t k = xi > 0.0f ? (int32_t)a->dims[i] : 0;
    a->xo[i] = xi;
    *(v16f *)(a->out + i * 16) = (v16f)((v16i)x & (IOTA < k));
}

INLINE float backward_row16(const Job *a, int64_t i) {
    const v16f g = *(const v16f *)(a->g + i * 16), v = *(const v16f *)(a->v + i * 16);
    const int32_t d = (int32_t)a->dims[i], k = a->x[i] > 0.0f ? d : 0;
    const float sg = a->ste ? step_grad(a->x[i]) : 0.0f;
    const float s = sg != 0.0f ? sg * hsum16((v16f)((v16i)(g * v) & (IOTA < d))) : 0.0f;
    const v16f st = ((v16f)((v16i)ONES & (v > 0.0f)) - (v16f)((v16i)ONES & (v < 0.0f))) * s; /* sgn(v) s */
    *(v16f *)(a->gv + i * 16) = (v16f)((v16i)g & (IOTA < k)) + st;
    return s;
}

CLONES static void *forward_rows(void *arg) {
    Job *a = arg;
    int64_t f = a->lo % a->F;
    for (int64_t i = a->lo; i < a->hi; i++) {
        if (a->D == 16) forward_row16(a, i, f);
        else forward_row(a, i, f, a->D);
        if (++f == a->F) f = 0;
    }
    return NULL;
}

CLONES static void *backward_rows(void *arg) {
    Job *a = arg;
    int64_t f = a->lo % a->F;
    for (int64_t i = a->lo; i < a->hi; i++) {
        a->acc[f] -= a->D == 16 ? backward_row16(a, i) : backward_row(a, i, a->D);
        if (++f == a->F) f = 0;
    }
    return NULL;
}

/* Rows split over two threads (memory-bound: two cores read and write faster than one),
 * torch's OpenMP workers (threads of our own would compete with them for the cores; see
 * rectables/_evict.c); small inputs, and all where torch runs one thread, on the caller's. */
static int run2(void *(*fn)(void *), Job *jobs, int64_t R, double *acc1) {
    jobs[1] = jobs[0];
    jobs[1].acc = acc1;
    jobs[0].lo = 0;
    jobs[0].hi = jobs[1].lo = R < 8192 ? R : R / 2;
    jobs[1].hi = R;
    if (jobs[1].lo == R || omp_get_max_threads() < 2) {  /* small, or torch.set_num_threads(1) */
        fn(&jobs[0]);
        if (jobs[1].lo < R) fn(&jobs[1]);
        return 0;
    }
#pragma omp parallel num_threads(2)
    {
        int got = omp_get_num_threads();
        for (int t = omp_get_thread_num(); t < 2; t += got) fn(&jobs[t]);
    }
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
