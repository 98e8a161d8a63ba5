/* Compiled kernels of rectables/idmap.py: the same results as its pure-torch path.
 *
 * The map is open addressing with linear probing over C slots; a slot is two int64
 * (id, meta) in `slots`, meta = (feature << 32) | row for a key, -1 when empty, -2 for a
 * deleted key, and one in `use`: (count << 32) | last step for a key, -1 when vacant.
 * Keys are hashed as in idmap.py:
 *   h(id, f, key) = mix((id XOR f * GOLDEN) XOR key) >> 1       (63 bits; mix = SplitMix64)
 *   range(h, n)   = ((h >> 32) * n) >> 31                         (in [0, n), exact in int64)
 * Arrays come as addresses of contiguous tensors (the caller keeps them alive).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/mman.h>

#include "_idmap.h"

#define GOLDEN 0x9E3779B97F4A7C15ULL
#define CAP ((int32_t)1 << 30) /* sketch counters saturate here */
#define COUNT_MAX 0x7fffffffLL /* a key's count saturates here (its use stays >= 0) */

static inline int64_t pack(int64_t count, int64_t last) {
    return ((count < COUNT_MAX ? count : COUNT_MAX) << 32) | last;
}

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

/* Puts key (id, f), known to be absent, on row with use u, in the first vacant (empty or
 * deleted) slot of its probe path; *tombs loses the deleted slot taken. */
static inline void place_key(int64_t *slots, int64_t *use, int64_t C, uint64_t key, int64_t id, int64_t f, int64_t row,
                             int64_t u, int64_t *tombs) {
    int64_t s = range_of(h63(id, f, key), C);
    while (slots[2 * s + 1] >= 0)
        if (++s == C) s = 0;
    *tombs -= slots[2 * s + 1] == -2;
    slots[2 * s] = id;
    slots[2 * s + 1] = (f << 32) | row;
    use[s] = u;
}

/* find(slots, use, C, key, ids, f, n, rows, step, touch, new, scratch, mask) -> U
 * new: int64 [4, n], rows new_ids, new_f, new_cnt and a fourth (new_at here, new_row in
 * settle).  rows[i] = row of key i, or (touch) -(j + 2) for the j-th distinct missing key
 * in order of first occurrence (new_ids/new_f/new_cnt[j]: its id, feature and occurrences), or
 * (no touch) -1.  touch: a hit sets last = step and adds one to count.  f == 0: all in
 * feature 0.  scratch: int64 [mask + 1], mask + 1 a power of two >= 2n, all -1 (and left so:
 * the entries taken, their places kept in the fourth row of new, are cleared at the end;
 * clearing it all took ~10 us a table a batch).
 * The home slot of the key AHEAD places on is fetched while this one is probed (the slots of
 * a large map are cache misses): 5% less time than fetching blocks of 16 keys first,
 * measured interleaved. */
#define AHEAD 16 /* keys whose home slot is fetched ahead (a power of two) */
static int64_t find_c(int64_t *restrict slots, int64_t *restrict use, int64_t C, uint64_t key,
                      const int64_t *restrict ids, const int64_t *restrict fs, int64_t n, int64_t *restrict rows,
                      int64_t step, int touch,
                      int64_t *restrict new_ids, int64_t *restrict new_f, int64_t *restrict new_cnt,
                      int64_t *restrict new_at, int64_t *restrict scratch, int64_t mask) {
    int64_t U = 0;
    uint64_t hs[AHEAD];
    int64_t home[AHEAD];
    for (int64_t k = 0; k < AHEAD && k < n; k++) {
        hs[k] = h63(ids[k], fs ? fs[k] : 0, key);
        home[k] = range_of(hs[k], C);
        __builtin_prefetch(slots + 2 * home[k], 0);
        if (touch) __builtin_prefetch(use + home[k], 1);
    }
    for (int64_t i = 0; i < n; i++) {
        int r = (int)(i & (AHEAD - 1));
        uint64_t h = hs[r];
        int64_t id = ids[i], f = fs ? fs[i] : 0, s = home[r], row = -1;
        if (i + AHEAD < n) {
            hs[r] = h63(ids[i + AHEAD], fs ? fs[i + AHEAD] : 0, key);
            home[r] = range_of(hs[r], C);
            __builtin_prefetch(slots + 2 * home[r], 0);
            if (touch) __builtin_prefetch(use + home[r], 1);
        }
        for (;;) {
            const int64_t *e = slots + 2 * s;
            int64_t meta = e[1];
            if (meta == -1) break;
            if (meta >= 0 && e[0] == id && (meta >> 32) == f) {
                row = meta & 0xffffffffLL;
                if (touch) use[s] = pack((use[s] >> 32) + 1, step);
                break;
            }
            if (++s == C) s = 0;
        }
        if (row >= 0 || !touch) { rows[i] = row; continue; }
        for (int64_t p = (int64_t)(h & (uint64_t)mask);; p = (p + 1) & mask) {
            int64_t j = scratch[p];
            if (j < 0) {
                scratch[p] = U; new_at[U] = p;
                new_ids[U] = id; new_f[U] = f; new_cnt[U] = 1; rows[i] = -(U + 2); U++;
                break;
            }
            if (new_ids[j] == id && new_f[j] == f) { new_cnt[j] += 1; rows[i] = -(j + 2); break; }
        }
    }
    for (int64_t j = 0; j < U; j++) scratch[new_at[j]] = -1;
    return U;
}

static PyObject *find(PyObject *self, PyObject *args) {
    unsigned long long ps, pu, pk, pi, pf, pr, pn, psc;
    long long C, n, step, mask;
    int touch;
    if (!PyArg_ParseTuple(args, "KKLKKKLKLpKKL", &ps, &pu, &C, &pk, &pi, &pf, &n, &pr, &step, &touch, &pn, &psc,
                          &mask))
        return NULL;
    int64_t U, *nw = (int64_t *)pn;
    Py_BEGIN_ALLOW_THREADS
    U = find_c((int64_t *)ps, (int64_t *)pu, C, pk, (int64_t *)pi, (int64_t *)pf, n, (int64_t *)pr, step, touch, nw,
               nw + n, nw + 2 * n, nw + 3 * n, (int64_t *)psc, mask);
    Py_END_ALLOW_THREADS
    return PyLong_FromLongLong(U);
}

/* insert(slots, use, C, key, ids, f, rows, last, count, n, tombs): keys known to be absent
 * placed (place_key). */
static PyObject *insert(PyObject *self, PyObject *args) {
    unsigned long long ps, pu, pk, pi, pf, pr, pl, pc, pt;
    long long C, n;
    if (!PyArg_ParseTuple(args, "KKLKKKKKKLK", &ps, &pu, &C, &pk, &pi, &pf, &pr, &pl, &pc, &n, &pt)) return NULL;
    const int64_t *ids = (int64_t *)pi, *fs = (int64_t *)pf, *rows = (int64_t *)pr, *last = (int64_t *)pl,
                  *count = (int64_t *)pc;
    Py_BEGIN_ALLOW_THREADS
    for (int64_t i = 0; i < n; i++)
        place_key((int64_t *)ps, (int64_t *)pu, C, pk, ids[i], fs[i], rows[i], pack(count[i], last[i]), (int64_t *)pt);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* admit_c(ids, f, cnt, n, sketch, depth, width, sketch_keys, min_count, threshold, prob_key, out, idx) -> admitted
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

/* settle(slots, use, C, key, new_ids, new_f, new_cnt, new_row, U, admitted, free, num_free, rows, n,
 *        default_row, step, tombs) -> taken
 * Admitted keys, in order, take the free rows from the top of the stack while there are
 * any (placed with last = step, count = their occurrences; *tombs loses the deleted slots
 * taken); the others read default_row.
 * Then each missing id's rows[i] = -(j + 2) becomes its key's row. */
static int64_t settle_c(int64_t *slots, int64_t *use, int64_t C, uint64_t key, const int64_t *ids,
                        const int64_t *fs, const int64_t *cnt, int64_t *newrow, int64_t U, const uint8_t *adm,
                        const int64_t *freest, int64_t nfree, int64_t *rows, int64_t n, int64_t dflt, int64_t step,
                        int64_t *tombs) {
    int64_t taken = 0;
    for (int64_t j = 0; j < U; j++) {
        if (!adm[j] || taken == nfree) { newrow[j] = dflt; continue; }
        int64_t row = freest[nfree - 1 - taken++];
        place_key(slots, use, C, key, ids[j], fs[j], row, pack(cnt[j], step), tombs);
        newrow[j] = row;
    }
    for (int64_t i = 0; i < n; i++)
        if (rows[i] < 0) rows[i] = newrow[-rows[i] - 2];
    return taken;
}

/* settle(slots, use, C, key, new, U, stride, admitted, free, num_free_ptr, rows, n, default_row, step, counters, tombs)
 * -> taken
 * also lowers *num_free by taken and (counters != 0) adds taken and U - taken to counters[0..1]. */
static PyObject *settle(PyObject *self, PyObject *args) {
    unsigned long long ps, pu, pk, pn, pa, pfree, pnf, pr, pcnt, pt;
    long long C, U, stride, n, dflt, step;
    if (!PyArg_ParseTuple(args, "KKLKKLLKKKKLLLKK", &ps, &pu, &C, &pk, &pn, &U, &stride, &pa, &pfree, &pnf, &pr, &n,
                          &dflt, &step, &pcnt, &pt))
        return NULL;
    int64_t *nw = (int64_t *)pn, *nf = (int64_t *)pnf, *counters = (int64_t *)pcnt, taken;
    Py_BEGIN_ALLOW_THREADS
    taken = settle_c((int64_t *)ps, (int64_t *)pu, C, pk, nw, nw + stride, nw + 2 * stride, nw + 3 * stride, U,
                     (uint8_t *)pa, (int64_t *)pfree, *nf, (int64_t *)pr, n, dflt, step, (int64_t *)pt);
    *nf -= taken;
    if (counters) { counters[0] += taken; counters[1] += U - taken; }
    Py_END_ALLOW_THREADS
    return PyLong_FromLongLong(taken);
}

/* A training lookup of one table: *step += 1; find with touch; admission of the U missing
 * keys; and, if there are rows enough for the admitted ones, settle (else settled = 0: the
 * caller evicts first, then calls settle). */
typedef struct {
    int64_t *slots, *use, *ids, *fs, *rows, *step, *nw, *scratch, *keys, *freest, *nf, *counters, *tombs, *idx;
    int32_t *sk;
    uint8_t *adm_out;
    uint64_t key, pkey;
    int64_t C, n, mask, depth, width, min_count, thr, dflt, U, adm, settled;
} job_t;

static void train_c(job_t *j) {
    int64_t n = j->n, *nw = j->nw;
    j->adm = 0; j->settled = 1;
    *j->step += 1;
    j->U = find_c(j->slots, j->use, j->C, j->key, j->ids, j->fs, n, j->rows, *j->step, 1, nw, nw + n, nw + 2 * n,
                  nw + 3 * n, j->scratch, j->mask);
    if (!j->U) return;
    j->adm = admit_c(nw, nw + n, nw + 2 * n, j->U, j->sk, j->depth, j->width, j->keys, j->min_count, j->thr, j->pkey,
                     j->adm_out, j->idx);
    if (j->adm > *j->nf) { j->settled = 0; return; }
    int64_t taken = settle_c(j->slots, j->use, j->C, j->key, nw, nw + n, nw + 2 * n, nw + 3 * n, j->U, j->adm_out,
                             j->freest, *j->nf, j->rows, n, j->dflt, *j->step, j->tombs);
    *j->nf -= taken;
    j->counters[0] += taken;
    j->counters[1] += j->U - taken;
}

/* The tables of one call share nothing, so up to `threads` threads take them in turn
 * (largest first, as the caller orders them). */
typedef struct { job_t *jobs; int64_t n, next; } pool_t;

static void work(void *arg, int t) {
    pool_t *p = arg;
    for (int64_t i; (i = __atomic_fetch_add(&p->next, 1, __ATOMIC_RELAXED)) < p->n;) train_c(&p->jobs[i]);
}

/* train(jobs, threads) -> [(U, admitted, settled)], each job a tuple
 * (slots, use, C, key, ids, f, n, rows, step_ptr, new, scratch, mask, sketch, depth, width, sketch_keys,
 *  min_count, threshold, prob_key, admitted, free, num_free_ptr, counters, default_row, tombs_ptr). */
static PyObject *train(PyObject *self, PyObject *args) {
    PyObject *list, *out = NULL;
    int threads;
    if (!PyArg_ParseTuple(args, "O!i", &PyList_Type, &list, &threads)) return NULL;
    Py_ssize_t n = PyList_GET_SIZE(list);
    job_t *jobs = calloc((size_t)n + 1, sizeof(job_t));
    if (!jobs) return PyErr_NoMemory();
    for (Py_ssize_t i = 0; i < n; i++) {
        job_t *j = &jobs[i];
        unsigned long long ps, pu, pk, pi, pf, pr, pst, pn, psc, psk, pkeys, pkey, pa, pfree, pnf, pcnt, pt;
        long long C, nn, mask, depth, width, min_count, thr, dflt;
        if (!PyArg_ParseTuple(PyList_GET_ITEM(list, i), "KKLKKKLKKKKLKLLKLLKKKKKLK", &ps, &pu, &C, &pk, &pi, &pf, &nn,
                              &pr, &pst, &pn, &psc, &mask, &psk, &depth, &width, &pkeys, &min_count, &thr, &pkey, &pa,
                              &pfree, &pnf, &pcnt, &dflt, &pt))
            goto done;
        *j = (job_t){(int64_t *)ps, (int64_t *)pu, (int64_t *)pi, (int64_t *)pf, (int64_t *)pr, (int64_t *)pst,
                     (int64_t *)pn, (int64_t *)psc, (int64_t *)pkeys, (int64_t *)pfree, (int64_t *)pnf, (int64_t *)pcnt,
                     (int64_t *)pt, NULL,
                     (int32_t *)psk, (uint8_t *)pa, pk, pkey, C, nn, mask, depth, width, min_count, thr, dflt};
        if (min_count > 1 && !(j->idx = malloc(sizeof(int64_t) * (size_t)(nn * depth + 1)))) {
            PyErr_NoMemory();
            goto done;
        }
    }
    pool_t pool = {jobs, n, 0};
    Py_BEGIN_ALLOW_THREADS
    run_threads(work, &pool, threads < n ? threads : (int)n);
    Py_END_ALLOW_THREADS
    out = PyList_New(n);
    for (Py_ssize_t i = 0; out && i < n; i++)
        PyList_SET_ITEM(out, i, Py_BuildValue("LLL", (long long)jobs[i].U, (long long)jobs[i].adm,
                                              (long long)jobs[i].settled));
done:
    for (Py_ssize_t i = 0; i < n; i++) free(jobs[i].idx);
    free(jobs);
    return out;
}

static PyObject *select_rows(PyObject *self, PyObject *args) {
    unsigned long long ps, pu, po;
    long long C, step, k;
    int lfu, threads;
    if (!PyArg_ParseTuple(args, "KKLLpLKi", &ps, &pu, &C, &step, &lfu, &k, &po, &threads)) return NULL;
    int64_t got;
    Py_BEGIN_ALLOW_THREADS
    got = select_evict((const int64_t *)ps, (const int64_t *)pu, C, step, lfu, k, (int64_t *)po, threads);
    Py_END_ALLOW_THREADS
    if (got < 0) return PyErr_NoMemory();
    return PyLong_FromLongLong(got);
}

/* huge_pages(address, bytes): 2 MB pages for the aligned part of the range, if the kernel
 * gives them, before anything touches it (random probes of a large map then miss the TLB
 * less: 12% of the remap's C time at 2^20 rows, measured interleaved); else a no-op. */
static PyObject *huge_pages(PyObject *self, PyObject *args) {
    unsigned long long p;
    long long n;
    if (!PyArg_ParseTuple(args, "KL", &p, &n)) return NULL;
#ifdef MADV_HUGEPAGE
    const unsigned long long page = 2ULL << 20;
    unsigned long long lo = (p + page - 1) & ~(page - 1), hi = (p + (unsigned long long)n) & ~(page - 1);
    if (hi > lo) madvise((void *)lo, hi - lo, MADV_HUGEPAGE);
#endif
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"huge_pages", huge_pages, METH_VARARGS, "ask for 2 MB pages under a range not yet touched"},
    {"find", find, METH_VARARGS, "probe keys; touch hits; list missing keys"},
    {"insert", insert, METH_VARARGS, "place absent keys"},
    {"settle", settle, METH_VARARGS, "rows for admitted keys; every missing id's row"},
    {"train", train, METH_VARARGS, "training lookups of several tables: find, admit, settle"},
    {"select", select_rows, METH_VARARGS, "the k least recently / frequently read keys"},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_idmap", "kernels of rectables.idmap", -1, methods};

PyMODINIT_FUNC PyInit__idmap(void) { return PyModule_Create(&module); }
