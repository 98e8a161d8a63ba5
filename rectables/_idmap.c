/* Compiled kernels of rectables/idmap.py: the same results as its pure-torch path.
 *
 * The map is open addressing with linear probing over C slots; a slot is four int64
 * (id, meta, last step, count), meta = (feature << 32) | row for a key, -1 when empty,
 * -2 for a deleted key.  Keys are hashed as in idmap.py:
 *   h(id, f, key) = mix((id XOR f * GOLDEN) XOR key) >> 1       (63 bits; mix = SplitMix64)
 *   range(h, n)   = ((h >> 32) * n) >> 31                         (in [0, n), exact in int64)
 * Arrays come as addresses of contiguous tensors (the caller keeps them alive).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define GOLDEN 0x9E3779B97F4A7C15ULL
#define CAP ((int32_t)1 << 30) /* sketch counters saturate here */

static inline uint64_t mix(uint64_t x) {
    x ^= x >> 30;
    x *= 0xBF58476D1CE4E5B9ULL;
    x ^= x >> 27;
    x *= 0x94D049BB133111EBULL;
    return x ^ (x >> 31);
}

static inline uint64_t h63(int64_t id, int64_t f, uint64_t key) {
    return mix(((uint64_t)id ^ ((uint64_t)f * GOLDEN)) ^ key) >> 1;
}

static inline int64_t range_of(uint64_t h, int64_t n) { return (int64_t)(((h >> 32) * (uint64_t)n) >> 31); }

/* find(slots, C, key, ids, f, n, rows, step, touch, new_ids, new_f, new_cnt, scratch, mask) -> U
 * rows[i] = row of key i, or (touch) -(j + 2) for the j-th distinct missing key in order of
 * first occurrence (new_ids/new_f/new_cnt[j]: its id, feature and occurrences), or
 * (no touch) -1.  touch: a hit sets last = step and adds one to count.  f == 0: all in
 * feature 0.  scratch: int64 [mask + 1], mask + 1 a power of two >= 2n. */
static PyObject *find(PyObject *self, PyObject *args) {
    unsigned long long ps, pk, pi, pf, pr, pni, pnf, pnc, psc;
    long long C, n, step, mask;
    int touch;
    if (!PyArg_ParseTuple(args, "KLKKKLKLpKKKKL", &ps, &C, &pk, &pi, &pf, &n, &pr, &step, &touch, &pni, &pnf,
                          &pnc, &psc, &mask))
        return NULL;
    int64_t *slots = (int64_t *)ps, *ids = (int64_t *)pi, *fs = (int64_t *)pf, *rows = (int64_t *)pr;
    int64_t *new_ids = (int64_t *)pni, *new_f = (int64_t *)pnf, *new_cnt = (int64_t *)pnc, *scratch = (int64_t *)psc;
    uint64_t key = (uint64_t)pk;
    int64_t U = 0;
    Py_BEGIN_ALLOW_THREADS
    if (touch) memset(scratch, 0xff, (size_t)(mask + 1) * sizeof(int64_t));
    for (int64_t i = 0; i < n; i++) {
        int64_t id = ids[i], f = fs ? fs[i] : 0;
        uint64_t h = h63(id, f, key);
        int64_t s = range_of(h, C), row = -1;
        for (;;) {
            int64_t *e = slots + 4 * s, meta = e[1];
            if (meta == -1) break;
            if (meta >= 0 && e[0] == id && (meta >> 32) == f) {
                row = meta & 0xffffffffLL;
                if (touch) { e[2] = step; e[3] += 1; }
                break;
            }
            if (++s == C) s = 0;
        }
        if (row >= 0 || !touch) { rows[i] = row; continue; }
        for (int64_t p = (int64_t)(h & (uint64_t)mask);; p = (p + 1) & mask) {
            int64_t j = scratch[p];
            if (j < 0) {
                scratch[p] = U; new_ids[U] = id; new_f[U] = f; new_cnt[U] = 1; rows[i] = -(U + 2); U++;
                break;
            }
            if (new_ids[j] == id && new_f[j] == f) { new_cnt[j] += 1; rows[i] = -(j + 2); break; }
        }
    }
    Py_END_ALLOW_THREADS
    return PyLong_FromLongLong(U);
}

/* insert(slots, C, key, ids, f, rows, last, count, n): keys known to be absent, each in the
 * first vacant (empty or deleted) slot on its probe path. */
static PyObject *insert(PyObject *self, PyObject *args) {
    unsigned long long ps, pk, pi, pf, pr, pl, pc;
    long long C, n;
    if (!PyArg_ParseTuple(args, "KLKKKKKKL", &ps, &C, &pk, &pi, &pf, &pr, &pl, &pc, &n)) return NULL;
    int64_t *slots = (int64_t *)ps, *ids = (int64_t *)pi, *fs = (int64_t *)pf, *rows = (int64_t *)pr;
    int64_t *last = (int64_t *)pl, *count = (int64_t *)pc;
    Py_BEGIN_ALLOW_THREADS
    for (int64_t i = 0; i < n; i++) {
        int64_t s = range_of(h63(ids[i], fs[i], (uint64_t)pk), C);
        while (slots[4 * s + 1] >= 0)
            if (++s == C) s = 0;
        int64_t *e = slots + 4 * s;
        e[0] = ids[i]; e[1] = (fs[i] << 32) | rows[i]; e[2] = last[i]; e[3] = count[i];
    }
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* admit(ids, f, cnt, n, sketch, depth, width, sketch_keys, min_count, threshold, prob_key, out):
 * out[j] = 1 if key j may take a row: (min_count > 1) every key's occurrences are added to
 * its depth counters (saturating), then its estimate (the least of them) must reach
 * min_count; (threshold < 2^24) the top 24 bits of h(id, f, prob_key) must lie below it. */
static PyObject *admit(PyObject *self, PyObject *args) {
    unsigned long long pi, pf, pc, psk, pkeys, pkey, po;
    long long n, depth, width, min_count, thr;
    if (!PyArg_ParseTuple(args, "KKKLKLLKLLKK", &pi, &pf, &pc, &n, &psk, &depth, &width, &pkeys, &min_count, &thr,
                          &pkey, &po))
        return NULL;
    int64_t *ids = (int64_t *)pi, *fs = (int64_t *)pf, *cnt = (int64_t *)pc, *keys = (int64_t *)pkeys;
    int32_t *sk = (int32_t *)psk;
    uint8_t *out = (uint8_t *)po;
    Py_BEGIN_ALLOW_THREADS
    for (int64_t j = 0; j < n; j++) out[j] = 1;
    if (min_count > 1) {
        for (int64_t j = 0; j < n; j++)
            for (int64_t d = 0; d < depth; d++) {
                int32_t *c = sk + d * width + range_of(h63(ids[j], fs[j], (uint64_t)keys[d]), width);
                int64_t v = (int64_t)*c + cnt[j];
                *c = v > CAP ? CAP : (int32_t)v;
            }
        for (int64_t j = 0; j < n; j++) {
            int32_t est = CAP;
            for (int64_t d = 0; d < depth; d++) {
                int32_t v = sk[d * width + range_of(h63(ids[j], fs[j], (uint64_t)keys[d]), width)];
                if (v < est) est = v;
            }
            out[j] = est >= min_count;
        }
    }
    if (thr < (1LL << 24))
        for (int64_t j = 0; j < n; j++)
            if ((int64_t)(h63(ids[j], fs[j], (uint64_t)pkey) >> 39) >= thr) out[j] = 0;
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"find", find, METH_VARARGS, "probe keys; touch hits; list missing keys"},
    {"insert", insert, METH_VARARGS, "place absent keys"},
    {"admit", admit, METH_VARARGS, "count-min sketch and probabilistic admission"},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_idmap", "kernels of rectables.idmap", -1, methods};

PyMODINIT_FUNC PyInit__idmap(void) { return PyModule_Create(&module); }
