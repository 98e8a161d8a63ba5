/* The graph models' kernels (models/ngcf.py): NGCF (Wang et al., SIGIR 2019) and LightGCN
 * (He et al., SIGIR 2020).
 *
 * spmm: y = A x for a sparse CSR A [N, N] and x [N, D] (_SymmetricSpMM), their propagation.
 *
 * Each row of y is summed in registers over its nonzeros in CSR order, one fused multiply-add
 * each (torch's values up to float rounding), fetching the x rows of the nonzeros a few ahead
 * (they are scattered).  Rows are split over two of torch's OpenMP workers at half the
 * nonzeros (see rectables/_evict.c on why not threads of our own).  On Gowalla (71k nodes,
 * 1.6M nonzeros, D 64) this took 10.5-11.3 ms against torch's 12.8-14.1 ms a product (it is
 * bound by fetching the scattered rows); in interleaved steps LightGCN went 180 -> 154 ms and
 * NGCF 415 -> 397 ms (medians).
 *
 * dropout: NGCF's LeakyReLU and message dropout in one pass, forward and backward, with a
 * mask hashed from a seed and the element's index (drawn again, not stored; see drop). */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <omp.h>
#include <stdint.h>

typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4))); /* unaligned loads and stores */

#if defined(__x86_64__) && defined(__GNUC__)
#define CLONES __attribute__((target_clones("avx512f", "arch=haswell", "default")))
#else
#define CLONES
#endif

enum { AHEAD = 8, MAXG = 8 }; /* nonzeros fetched ahead; D up to 16 MAXG */

/* rows [r0, r1) of y; D = 16 G */
CLONES static void rows(const int64_t *crow, const int64_t *col, const float *val, const float *x, int G, float *y,
                        int64_t r0, int64_t r1) {
    const int64_t D = 16 * G, end = crow[r1];
    for (int64_t i = r0; i < r1; i++) {
        v16 acc[MAXG];
        for (int g = 0; g < G; g++) acc[g] = (v16){0};
        for (int64_t k = crow[i]; k < crow[i + 1]; k++) {
            if (k + AHEAD < end) {
                const char *ahead = (const char *)(x + col[k + AHEAD] * D);
                for (int g = 0; g < G; g++) __builtin_prefetch(ahead + 64 * g);
            }
            const float a = val[k], *xr = x + col[k] * D;
            for (int g = 0; g < G; g++) acc[g] += a * *(const v16u *)(xr + 16 * g);
        }
        for (int g = 0; g < G; g++) *(v16u *)(y + i * D + 16 * g) = acc[g];
    }
}

/* spmm(crow, col, val, N, x, D, y): crow int64 [N + 1], col int64 [nnz] (each in [0, N)),
 * val float [nnz], x and y float [N, D] contiguous, D a multiple of 16 up to 128; y written */
static PyObject *spmm(PyObject *self, PyObject *args) {
    unsigned long long pcrow, pcol, pval, px, py;
    long long N, D;
    if (!PyArg_ParseTuple(args, "KKKLKLK", &pcrow, &pcol, &pval, &N, &px, &D, &py)) return NULL;
    if (D <= 0 || D % 16 || D > 16 * MAXG) {
        PyErr_Format(PyExc_ValueError, "spmm takes D a multiple of 16 up to %d, got %lld", 16 * MAXG, D);
        return NULL;
    }
    const int64_t *crow = (const int64_t *)pcrow, *col = (const int64_t *)pcol;
    const float *val = (const float *)pval, *x = (const float *)px;
    float *y = (float *)py;
    const int G = (int)(D / 16);
    int64_t lo = 0, hi = N; /* the first row starting at or after half the nonzeros */
    while (lo < hi) {
        const int64_t m = (lo + hi) / 2;
        if (crow[m] - crow[0] < (crow[N] - crow[0]) / 2) lo = m + 1; else hi = m;
    }
    const int64_t mid = lo;
    const int two = omp_get_max_threads() > 1 && crow[N] - crow[0] >= 65536;
    Py_BEGIN_ALLOW_THREADS
    if (two) {
#pragma omp parallel num_threads(2)
        {
            if (omp_get_num_threads() == 1) { /* no second worker free: both halves here */
                rows(crow, col, val, x, G, y, 0, N);
            } else {
                const int t = omp_get_thread_num();
                rows(crow, col, val, x, G, y, t ? mid : 0, t ? N : mid);
            }
        }
    } else {
        rows(crow, col, val, x, G, y, 0, N);
    }
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* lowbias32 (C. Wellons' 32-bit integer hash): every output bit depends on every input bit */
static inline uint32_t mix32(uint32_t x) {
    x ^= x >> 16;
    x *= 0x7feb352dU;
    x ^= x >> 15;
    x *= 0x846ca68bU;
    x ^= x >> 16;
    return x;
}

/* y[i] = (z[i] > 0 ? x[i] : slope x[i]) (with z NULL: x[i]) times scale where hash(i, seed)
 * >= t, else 0, for i in [i0, i1): the mask is a function of (seed, i) alone (counter-based),
 * so it is the same for any thread count and the backward draws it again instead of storing
 * it; in blocks of 2^32 (32-bit lanes) */
CLONES static void drop(const float *x, const float *z, float slope, float *y, int64_t i0, int64_t i1, uint64_t seed,
                        uint32_t t, float scale) {
    const uint32_t s0 = (uint32_t)seed, s1 = (uint32_t)(seed >> 32);
    for (int64_t b = i0, end; b < i1; b = end) {
        end = (int64_t)(((uint64_t)b | 0xffffffffULL) + 1);
        end = end < i1 ? end : i1;
        const uint32_t hi = (uint32_t)((uint64_t)b >> 32) ^ s1, lo = (uint32_t)b;
        const float *restrict xb = x + b, *restrict zb = z ? z + b : NULL;
        float *restrict yb = y + b;
        if (zb) {
            for (int64_t k = 0; k < end - b; k++) {
                const float v = zb[k] > 0.0f ? xb[k] : slope * xb[k];
                yb[k] = mix32(mix32((lo + (uint32_t)k) ^ s0) ^ hi) >= t ? v * scale : 0.0f;
            }
        } else {
            for (int64_t k = 0; k < end - b; k++)
                yb[k] = mix32(mix32((lo + (uint32_t)k) ^ s0) ^ hi) >= t ? xb[k] * scale : 0.0f;
        }
    }
}

/* dropout(x, n, seed, t, scale, y, z, slope): y [n] = x [n] times scale where the element's
 * hash is at least t (a share t / 2^32 dropped), else 0 (models/ngcf.py: _keep draws the same
 * mask in numpy); with z (else 0) each x[i] first times slope where z[i] <= 0: NGCF's
 * LeakyReLU then message dropout (x = z), or their backward (x = the gradient) */
static PyObject *dropout(PyObject *self, PyObject *args) {
    unsigned long long px, seed, t, py, pz;
    long long n;
    float scale, slope;
    if (!PyArg_ParseTuple(args, "KLKKfKKf", &px, &n, &seed, &t, &scale, &py, &pz, &slope)) return NULL;
    if (t > 0xffffffffULL) {
        PyErr_SetString(PyExc_ValueError, "dropout's threshold t must lie in [0, 2^32)");
        return NULL;
    }
    const float *x = (const float *)px, *z = (const float *)pz;
    float *y = (float *)py;
    Py_BEGIN_ALLOW_THREADS
#pragma omp parallel num_threads(2) if (omp_get_max_threads() > 1 && n >= 65536)
    {
        const int parts = omp_get_num_threads(), me = omp_get_thread_num();
        drop(x, z, slope, y, n * me / parts, n * (me + 1) / parts, seed, (uint32_t)t, scale);
    }
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"spmm", spmm, METH_VARARGS, "y = A x for a CSR A and dense x with D a multiple of 16."},
    {"dropout", dropout, METH_VARARGS, "(LeakyReLU and) dropout with a counter-based mask: hash(seed, i) >= t keeps i."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_graph", NULL, -1, methods};

PyMODINIT_FUNC PyInit__graph(void) { return PyModule_Create(&module); }
