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
#include <stdlib.h>
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

/* find(slots, C, key, ids, f, n, rows, step, touch, new, scratch, mask) -> U
 * new: int64 [4, n], rows new_ids, new_f, new_cnt, (new_row for settle).  rows[i] = row of key i, or (touch) -(j + 2) for the j-th distinct missing key in order of
 * first occurrence (new_ids/new_f/new_cnt[j]: its id, feature and occurrences), or
 * (no touch) -1.  touch: a hit sets last = step and adds one to count.  f == 0: all in
 * feature 0.  scratch: int64 [mask + 1], mask + 1 a power of two >= 2n.
 * Keys are probed in blocks of BLOCK whose home slots are prefetched first (the slots of a
 * large map are cache misses); hits are touched in a second pass over the block, so the
 * probe loop has no read-modify-write of slots a later key may load. */
#define BLOCK 16
static int64_t find_c(int64_t *restrict slots, int64_t C, uint64_t key, const int64_t *restrict ids,
                      const int64_t *restrict fs, int64_t n, int64_t *restrict rows, int64_t step, int touch,
                      int64_t *restrict new_ids, int64_t *restrict new_f, int64_t *restrict new_cnt,
                      int64_t *restrict scratch, int64_t mask) {
    int64_t U = 0;
    if (touch) memset(scratch, 0xff, (size_t)(mask + 1) * sizeof(int64_t));
    uint64_t hs[BLOCK];
    int64_t home[BLOCK], hit[BLOCK];
    for (int64_t b = 0; b < n; b += BLOCK) {
        int64_t m = n - b < BLOCK ? n - b : BLOCK;
        for (int64_t k = 0; k < m; k++) {
            hs[k] = h63(ids[b + k], fs ? fs[b + k] : 0, key);
            home[k] = range_of(hs[k], C);
            __builtin_prefetch(slots + 4 * home[k]);
        }
        for (int64_t k = 0; k < m; k++) {
            int64_t i = b + k, id = ids[i], f = fs ? fs[i] : 0, s = home[k], row = -1;
            hit[k] = -1;
            for (;;) {
                const int64_t *e = slots + 4 * s, meta = e[1];
                if (meta == -1) break;
                if (meta >= 0 && e[0] == id && (meta >> 32) == f) { row = meta & 0xffffffffLL; hit[k] = s; break; }
                if (++s == C) s = 0;
            }
            if (row >= 0 || !touch) { rows[i] = row; continue; }
            for (int64_t p = (int64_t)(hs[k] & (uint64_t)mask);; p = (p + 1) & mask) {
                int64_t j = scratch[p];
                if (j < 0) {
                    scratch[p] = U; new_ids[U] = id; new_f[U] = f; new_cnt[U] = 1; rows[i] = -(U + 2); U++;
                    break;
                }
                if (new_ids[j] == id && new_f[j] == f) { new_cnt[j] += 1; rows[i] = -(j + 2); break; }
            }
        }
        if (touch)
            for (int64_t k = 0; k < m; k++)
                if (hit[k] >= 0) { slots[4 * hit[k] + 2] = step; slots[4 * hit[k] + 3] += 1; }
    }
    return U;
}

static PyObject *find(PyObject *self, PyObject *args) {
    unsigned long long ps, pk, pi, pf, pr, pn, psc;
    long long C, n, step, mask;
    int touch;
    if (!PyArg_ParseTuple(args, "KLKKKLKLpKKL", &ps, &C, &pk, &pi, &pf, &n, &pr, &step, &touch, &pn, &psc, &mask))
        return NULL;
    int64_t U, *nw = (int64_t *)pn;
    Py_BEGIN_ALLOW_THREADS
    U = find_c((int64_t *)ps, C, pk, (int64_t *)pi, (int64_t *)pf, n, (int64_t *)pr, step, touch, nw, nw + n,
               nw + 2 * n, (int64_t *)psc, mask);
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

/* admit(ids, f, cnt, n, sketch, depth, width, sketch_keys, min_count, threshold, prob_key, out) -> admitted
 * out[j] = 1 if key j may take a row: (min_count > 1) every key's occurrences are added to
 * its depth counters (saturating), then its estimate (the least of them) must reach
 * min_count; (threshold < 2^24) the top 24 bits of h(id, f, prob_key) must lie below it. */
static int64_t admit_c(const int64_t *ids, const int64_t *fs, const int64_t *cnt, int64_t n, int32_t *sk,
                       int64_t depth, int64_t width, const int64_t *keys, int64_t min_count, int64_t thr,
                       uint64_t pkey, uint8_t *out, int64_t *idx) {
    int64_t admitted = 0;
    for (int64_t j = 0; j < n; j++) out[j] = 1;
    if (min_count > 1) {
        for (int64_t j = 0; j < n; j++)  /* counters first, fetched ahead (a large sketch misses cache) */
            for (int64_t d = 0; d < depth; d++) {
                int64_t at = d * width + range_of(h63(ids[j], fs[j], (uint64_t)keys[d]), width);
                idx[j * depth + d] = at;
                __builtin_prefetch(sk + at, 1);
            }
        for (int64_t j = 0; j < n; j++)
            for (int64_t d = 0; d < depth; d++) {
                int64_t v = (int64_t)sk[idx[j * depth + d]] + cnt[j];
                sk[idx[j * depth + d]] = v > CAP ? CAP : (int32_t)v;
            }
        for (int64_t j = 0; j < n; j++) {
            int32_t est = CAP;
            for (int64_t d = 0; d < depth; d++) {
                int32_t v = sk[idx[j * depth + d]];
                if (v < est) est = v;
            }
            out[j] = est >= min_count;
        }
    }
    if (thr < (1LL << 24))
        for (int64_t j = 0; j < n; j++)
            if ((int64_t)(h63(ids[j], fs[j], pkey) >> 39) >= thr) out[j] = 0;
    for (int64_t j = 0; j < n; j++) admitted += out[j];
    return admitted;
}

static PyObject *admit(PyObject *self, PyObject *args) {
    unsigned long long pi, pf, pc, psk, pkeys, pkey, po;
    long long n, depth, width, min_count, thr;
    if (!PyArg_ParseTuple(args, "KKKLKLLKLLKK", &pi, &pf, &pc, &n, &psk, &depth, &width, &pkeys, &min_count, &thr,
                          &pkey, &po))
        return NULL;
    int64_t *idx = malloc(sizeof(int64_t) * (size_t)(n * depth + 1)), admitted;
    if (!idx) return PyErr_NoMemory();
    Py_BEGIN_ALLOW_THREADS
    admitted = admit_c((int64_t *)pi, (int64_t *)pf, (int64_t *)pc, n, (int32_t *)psk, depth, width, (int64_t *)pkeys,
                       min_count, thr, pkey, (uint8_t *)po, idx);
    Py_END_ALLOW_THREADS
    free(idx);
    return PyLong_FromLongLong(admitted);
}

/* settle(slots, C, key, new_ids, new_f, new_cnt, new_row, U, admitted, free, num_free, rows, n, default_row,
 *        step) -> taken
 * Admitted keys, in order, take the free rows from the top of the stack while there are
 * any (placed with last = step, count = their occurrences); the others read default_row.
 * Then each missing id's rows[i] = -(j + 2) becomes its key's row. */
static int64_t settle_c(int64_t *slots, int64_t C, uint64_t key, const int64_t *ids, const int64_t *fs,
                        const int64_t *cnt, int64_t *newrow, int64_t U, const uint8_t *adm, const int64_t *freest,
                        int64_t nfree, int64_t *rows, int64_t n, int64_t dflt, int64_t step) {
    int64_t taken = 0;
    for (int64_t j = 0; j < U; j++) {
        if (!adm[j] || taken == nfree) { newrow[j] = dflt; continue; }
        int64_t row = freest[nfree - 1 - taken++], s = range_of(h63(ids[j], fs[j], key), C);
        while (slots[4 * s + 1] >= 0)
            if (++s == C) s = 0;
        int64_t *e = slots + 4 * s;
        e[0] = ids[j]; e[1] = (fs[j] << 32) | row; e[2] = step; e[3] = cnt[j];
        newrow[j] = row;
    }
    for (int64_t i = 0; i < n; i++)
        if (rows[i] < 0) rows[i] = newrow[-rows[i] - 2];
    return taken;
}

/* settle(slots, C, key, new, U, stride, admitted, free, num_free_ptr, rows, n, default_row, step, counters) -> taken
 * also lowers *num_free by taken and (counters != 0) adds taken and U - taken to counters[0..1]. */
static PyObject *settle(PyObject *self, PyObject *args) {
    unsigned long long ps, pk, pn, pa, pfree, pnf, pr, pcnt;
    long long C, U, stride, n, dflt, step;
    if (!PyArg_ParseTuple(args, "KLKKLLKKKKLLLK", &ps, &C, &pk, &pn, &U, &stride, &pa, &pfree, &pnf, &pr, &n, &dflt,
                          &step, &pcnt))
        return NULL;
    int64_t *nw = (int64_t *)pn, *nf = (int64_t *)pnf, *counters = (int64_t *)pcnt, taken;
    Py_BEGIN_ALLOW_THREADS
    taken = settle_c((int64_t *)ps, C, pk, nw, nw + stride, nw + 2 * stride, nw + 3 * stride, U, (uint8_t *)pa,
                     (int64_t *)pfree, *nf, (int64_t *)pr, n, dflt, step);
    *nf -= taken;
    if (counters) { counters[0] += taken; counters[1] += U - taken; }
    Py_END_ALLOW_THREADS
    return PyLong_FromLongLong(taken);
}

/* train(slots, C, key, ids, f, n, rows, step_ptr, new, scratch, mask, sketch, depth, width, sketch_keys,
 *       min_count, threshold, prob_key, admitted, free, num_free_ptr, counters, default_row)
 *       -> (U, admitted, settled)
 * One training lookup: *step += 1; find with touch; admission of the U missing keys; and,
 * if there are rows enough for the admitted ones, settle (else settled = 0: the caller
 * evicts first, then calls settle). */
static PyObject *train(PyObject *self, PyObject *args) {
    unsigned long long ps, pk, pi, pf, pr, pst, pn, psc, psk, pkeys, pkey, pa, pfree, pnf, pcnt;
    long long C, n, mask, depth, width, min_count, thr, dflt;
    if (!PyArg_ParseTuple(args, "KLKKKLKKKKLKLLKLLKKKKKL", &ps, &C, &pk, &pi, &pf, &n, &pr, &pst, &pn, &psc, &mask,
                          &psk, &depth, &width, &pkeys, &min_count, &thr, &pkey, &pa, &pfree, &pnf, &pcnt, &dflt))
        return NULL;
    int64_t *nw = (int64_t *)pn, *nf = (int64_t *)pnf, *counters = (int64_t *)pcnt, *step = (int64_t *)pst;
    int64_t U, adm = 0, settled = 1;
    int64_t *idx = min_count > 1 ? malloc(sizeof(int64_t) * (size_t)(n * depth + 1)) : NULL;
    if (min_count > 1 && !idx) return PyErr_NoMemory();
    Py_BEGIN_ALLOW_THREADS
    *step += 1;
    U = find_c((int64_t *)ps, C, pk, (int64_t *)pi, (int64_t *)pf, n, (int64_t *)pr, *step, 1, nw, nw + n, nw + 2 * n,
               (int64_t *)psc, mask);
    if (U) {
        adm = admit_c(nw, nw + n, nw + 2 * n, U, (int32_t *)psk, depth, width, (int64_t *)pkeys, min_count, thr, pkey,
                      (uint8_t *)pa, idx);
        if (adm <= *nf) {
            int64_t taken = settle_c((int64_t *)ps, C, pk, nw, nw + n, nw + 2 * n, nw + 3 * n, U, (uint8_t *)pa,
                                     (int64_t *)pfree, *nf, (int64_t *)pr, n, dflt, *step);
            *nf -= taken;
            counters[0] += taken;
            counters[1] += U - taken;
        } else {
            settled = 0;
        }
    }
    Py_END_ALLOW_THREADS
    free(idx);
    return Py_BuildValue("LLL", (long long)U, (long long)adm, (long long)settled);
}

/* select(slots, C, step, lfu, k, out) -> m: the slots [m] (m = min(k, candidates)) of the k
 * smallest candidates (keys whose last step < step) in the order (last, row), or with lfu
 * (count, last, row); rows are unique, so the set is exact.  Eviction on a full table
 * calls it every few batches, so its passes over the slots (~48 MB at 2^20 rows) are most
 * of the remap's mean time: select_sampled makes one; select_c, its fallback, three and a
 * quickselect of the candidates up to the k-th one's primary key. */
typedef struct { int64_t a, b, c, slot; } cand_t;

static inline int cand_less(const cand_t *x, const cand_t *y) {
    if (x->a != y->a) return x->a < y->a;
    if (x->b != y->b) return x->b < y->b;
    return x->c < y->c;
}

static void quickselect(cand_t *v, int64_t n, int64_t k) {  /* v[0..k) become the k smallest */
    int64_t lo = 0, hi = n - 1;
    while (lo < hi) {
        int64_t mid = lo + (hi - lo) / 2;
        cand_t t, pivot;
        if (cand_less(&v[mid], &v[lo])) { t = v[mid]; v[mid] = v[lo]; v[lo] = t; }
        if (cand_less(&v[hi], &v[lo])) { t = v[hi]; v[hi] = v[lo]; v[lo] = t; }
        if (cand_less(&v[hi], &v[mid])) { t = v[hi]; v[hi] = v[mid]; v[mid] = t; }
        pivot = v[mid];
        int64_t i = lo, j = hi;
        while (i <= j) {
            while (cand_less(&v[i], &pivot)) i++;
            while (cand_less(&pivot, &v[j])) j--;
            if (i <= j) { t = v[i]; v[i] = v[j]; v[j] = t; i++; j--; }
        }
        if (k - 1 <= j) hi = j;
        else if (k - 1 >= i) lo = i;
        else break;
    }
}

/* Keys of slot e in the policy's order: (a, b, c) = (count, last, row) or (last, row, 0). */
static inline cand_t cand_of(const int64_t *e, int64_t s, int lfu) {
    cand_t v;
    int64_t row = e[1] & 0xffffffffLL;
    v.a = lfu ? e[3] : e[2]; v.b = lfu ? e[2] : row; v.c = lfu ? row : 0; v.slot = s;
    return v;
}

#define CAND(e, step) ((e)[1] >= 0 && (e)[2] < (step))  /* a key not read at step */
#define SAMPLE 65536  /* = rectables.idmap.SAMPLE */
/* The same k smallest in one pass when a sample predicts them: the slots are in hash order,
 * so the first SAMPLE of them hold a uniform sample of the keys.  The sample's candidate of
 * rank ~1.25 k S / C plus a margin is a bound that the k smallest very likely lie under;
 * one pass collects every candidate up to it, and if there are at least k the quickselect
 * of those is exact (every candidate not collected is above the bound, so above all k).
 * Returns -2 where the map is too small to sample or the bound is too low (fewer than k
 * under it) or too high (more than the buffer): the caller falls back. */
static int64_t select_sampled(const int64_t *slots, int64_t C, int64_t step, int lfu, int64_t k, int64_t *out) {
    int64_t S = C < SAMPLE ? C : SAMPLE, ns = 0, m = 0, cap = S + 4 * k + 64;
    if (S == C) return -2;
    cand_t *v = malloc(sizeof(cand_t) * (size_t)cap);
    if (!v) return -1;
    for (int64_t s = 0; s < S; s++)
        if (CAND(slots + 4 * s, step)) v[ns++] = cand_of(slots + 4 * s, s, lfu);
    int64_t want = (int64_t)((double)k * (double)S / (double)C * 1.25) + 32, ok = 0;
    if (want < ns) {
        quickselect(v, ns, want);
        cand_t bound = v[0];
        for (int64_t i = 1; i < want; i++) if (cand_less(&bound, &v[i])) bound = v[i];
        for (int64_t s = 0; s < C && m <= cap; s++) {
            const int64_t *e = slots + 4 * s;
            if (!CAND(e, step)) continue;
            cand_t c = cand_of(e, s, lfu);
            if (!cand_less(&bound, &c) && m++ < cap) v[m - 1] = c;
        }
        ok = k <= m && m <= cap;
    }
    if (ok) {
        if (k < m) quickselect(v, m, k);
        for (int64_t i = 0; i < k; i++) out[i] = v[i].slot;
    }
    free(v);
    return ok ? k : -2;
}

#define HIST 65536
static int64_t select_c(const int64_t *slots, int64_t C, int64_t step, int lfu, int64_t k, int64_t *out) {
    int64_t n = 0, pmin = INT64_MAX;
    int64_t *hist = calloc(HIST, sizeof(int64_t));
    if (!hist) return -1;
    /* the primary key's least value, then a histogram of (primary - least), capped: only
     * candidates up to the bucket that holds the k-th smallest go to the quickselect */
    if (lfu) pmin = 0;  /* counts are small: no pass for the least one */
    else
        for (int64_t s = 0; s < C; s++) {
            const int64_t *e = slots + 4 * s;
            if (CAND(e, step) && e[2] < pmin) pmin = e[2];
        }
    for (int64_t s = 0; s < C; s++) {
        const int64_t *e = slots + 4 * s;
        if (!CAND(e, step)) continue;
        uint64_t d = (uint64_t)((lfu ? e[3] : e[2]) - pmin);
        hist[d < HIST - 1 ? d : HIST - 1]++;
        n++;
    }
    int64_t top = HIST - 1, seen = 0;
    for (int64_t t = 0; t < HIST; t++) { seen += hist[t]; if (seen >= k) { top = t; break; } }
    int64_t m = top < HIST - 1 ? seen : n;
    cand_t *v = malloc(sizeof(cand_t) * (size_t)(m + 1));
    if (v) {
        m = 0;
        for (int64_t s = 0; s < C; s++) {
            const int64_t *e = slots + 4 * s;
            if (!CAND(e, step)) continue;
            uint64_t d = (uint64_t)((lfu ? e[3] : e[2]) - pmin);
            if ((int64_t)(d < HIST - 1 ? d : HIST - 1) > top) continue;
            v[m++] = cand_of(e, s, lfu);
        }
        if (k < m) quickselect(v, m, k);
        else k = m;
        for (int64_t i = 0; i < k; i++) out[i] = v[i].slot;
    }
    free(hist);
    if (!v) return -1;
    free(v);
    return k;
}

static PyObject *select_rows(PyObject *self, PyObject *args) {
    unsigned long long ps, po;
    long long C, step, k;
    int lfu;
    if (!PyArg_ParseTuple(args, "KLLpLK", &ps, &C, &step, &lfu, &k, &po)) return NULL;
    int64_t got;
    Py_BEGIN_ALLOW_THREADS
    got = select_sampled((const int64_t *)ps, C, step, lfu, k, (int64_t *)po);
    if (got == -2) got = select_c((const int64_t *)ps, C, step, lfu, k, (int64_t *)po);
    Py_END_ALLOW_THREADS
    if (got < 0) return PyErr_NoMemory();
    return PyLong_FromLongLong(got);
}

static PyMethodDef methods[] = {
    {"find", find, METH_VARARGS, "probe keys; touch hits; list missing keys"},
    {"insert", insert, METH_VARARGS, "place absent keys"},
    {"admit", admit, METH_VARARGS, "count-min sketch and probabilistic admission"},
    {"settle", settle, METH_VARARGS, "rows for admitted keys; every missing id's row"},
    {"train", train, METH_VARARGS, "one training lookup: find, admit, settle"},
    {"select", select_rows, METH_VARARGS, "the k least recently / frequently read keys"},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_idmap", "kernels of rectables.idmap", -1, methods};

PyMODINIT_FUNC PyInit__idmap(void) { return PyModule_Create(&module); }
