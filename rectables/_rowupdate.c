/* The fused sparse update of a storage's rows (rectables/storage.py, FusedStorage.row_update):
 * SGD, Adagrad, row-wise Adagrad and row-wise Adam applied to the rows a lookup read, in
 * place, from the gradient of the lookup's output.  fbgemm's CPU backward does the same (not
 * Adam) but spends about 1 us per distinct row (a Criteo-size step with row-wise Adagrad,
 * profiled: 42 ms of backward in a 46 ms step); this takes one pass over the ids and a small
 * hash table per run of lanes that read one table.
 *
 * Inputs (addresses of contiguous tensors the caller keeps alive):
 *   w     float [*]     every table's rows, flat (fbgemm's weights_host);
 *   m     float [*]     the optimizer state, flat (momentum1_host; Adam: exp_avg_sq, one
 *                       per row), unused for SGD;
 *   m2    float [*]     Adam's exp_avg, flat, at the rows' offsets in w (else 0);
 *   idx   int64 [N]     row of each id in its lane's table;
 *   off   int64 [T*B+1] bag offsets, lane-major;
 *   psw   float [N]     per-id weights, or 0 for none;
 *   g     float [B, C]  gradient of the lookup's output;
 *   lane_w, lane_p, lane_m, lane_c  int64 [T]: per lane, the table's offset in w, its row
 *                       width P, its offset in m, and the lane's first column in g.
 * Per distinct row r (table and row): G = sum over its ids of psw * g[bag, lane cols];
 *   sgd:              w_r -= lr G
 *   adagrad:          m_r += G^2 (per value);     w_r -= lr G / (sqrt(m_r) + eps)
 *   rowwise adagrad:  m_r += sum(G^2) / P (one);   w_r -= lr G / (sqrt(m_r) + eps)
 *   rowwise adam:     m2_r = b1 m2_r + (1 - b1) G;  m_r = b2 m_r + (1 - b2) sum(G^2) / P (one);
 *                     w_r -= lr m2_r / (sqrt(m_r / bias2) + eps)  (lr: the caller's / bias1)
 * Ids are summed in their order in idx, so a call is deterministic.  Rows are split over
 * two threads by a bit of their hash (each thread reads all ids, keeps its own rows): torch's
 * OpenMP workers, not threads of our own, which would compete with them for the cores (see
 * rectables/_evict.c); where torch runs one thread, all on the caller's.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <omp.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { SGD = 0, ADAGRAD = 1, ROWWISE = 2, ADAM = 3 };
enum { AHEAD = 16 }; /* ids ahead whose probe slot is fetched */

typedef struct {
    float *w, *m, *m2;
    const int64_t *idx, *off, *lane_w, *lane_p, *lane_m, *lane_c;
    const float *psw, *g;
    int64_t T, B, C, N, pmax;
    float lr, eps, beta1, beta2, bias2;
    int kind, part, parts, failed;
} Job;

static inline uint64_t mix(uint64_t k) {
    k ^= k >> 33;
    k *= 0xff51afd7ed558ccdULL;
    k ^= k >> 33;
    return k;
}

/* Scratch of each part, kept between calls (fresh pages cost more than the work: the
 * [N, P] sums are ~7 MB at Criteo size); a lock per part for concurrent callers. */
typedef struct {
    pthread_mutex_t lock;
    int64_t *keys, *slot_key, *slot_m;
    int64_t *mine; /* [2 n]: this part's ids of a run, as (id position j, its gradient row's offset in g) */
    int32_t *slot_of;
    float *acc;
    int64_t cap, n, width;
} Scratch;

static Scratch scratch[2] = {{PTHREAD_MUTEX_INITIALIZER}, {PTHREAD_MUTEX_INITIALIZER}};

static int reserve(Scratch *s, int64_t cap, int64_t n, int64_t width) {
    if (cap > s->cap) {
        free(s->keys);
        free(s->slot_of);
        s->keys = malloc(cap * sizeof(int64_t));
        s->slot_of = malloc(cap * sizeof(int32_t));
        s->cap = s->keys && s->slot_of ? cap : 0;
        if (!s->cap) return 0;
    }
    if (n > s->n || n * width > s->n * s->width) {
        free(s->slot_key);
        free(s->slot_m);
        free(s->mine);
        free(s->acc);
        s->slot_key = malloc(n * sizeof(int64_t));
        s->slot_m = malloc(n * sizeof(int64_t));
        s->mine = malloc(2 * n * sizeof(int64_t));
        s->acc = malloc(n * width * sizeof(float));
        s->n = s->slot_key && s->slot_m && s->mine && s->acc ? n : 0;
        s->width = width;
        if (!s->n) return 0;
    }
    return 1;
}

/* Lanes l0 and l1 read one table (an empty table may share its offsets with the next) */
static inline int same_table(const Job *a, int64_t l0, int64_t l1) {
    return a->lane_w[l1] == a->lane_w[l0] && a->lane_p[l1] == a->lane_p[l0] && a->lane_m[l1] == a->lane_m[l0];
}

/* Apply the update to the used slots, rows of width P (scattered: fetch ahead). */
static void apply(const Job *a, const Scratch *sc, int64_t used, int64_t P) {
    for (int64_t s = 0; s < used; s++) {
        if (s + 8 < used) {
            __builtin_prefetch(a->w + sc->slot_key[s + 8], 1);
            if (a->kind != SGD) __builtin_prefetch(a->m + sc->slot_m[s + 8], 1);
            if (a->kind == ADAM) __builtin_prefetch(a->m2 + sc->slot_key[s + 8], 1);
        }
        const float *G = sc->acc + s * a->pmax;
        float *w = a->w + sc->slot_key[s];
        if (a->kind == SGD) {
            for (int64_t d = 0; d < P; d++) w[d] -= a->lr * G[d];
        } else if (a->kind == ADAGRAD) {
            float *m = a->m + sc->slot_m[s];
            for (int64_t d = 0; d < P; d++) {
                m[d] += G[d] * G[d];
                w[d] -= a->lr * G[d] / (sqrtf(m[d]) + a->eps);
            }
        } else {
            float sq = 0.0f;
            for (int64_t d = 0; d < P; d++) sq += G[d] * G[d];
            float *m = a->m + sc->slot_m[s];
            if (a->kind == ROWWISE) {
                *m += sq / (float)P;
                const float c = a->lr / (sqrtf(*m) + a->eps);
                for (int64_t d = 0; d < P; d++) w[d] -= c * G[d];
            } else { /* ADAM */
                *m = a->beta2 * *m + (1.0f - a->beta2) * (sq / (float)P);
                const float denom = sqrtf(*m / a->bias2) + a->eps;
                float *m2 = a->m2 + sc->slot_key[s];
                for (int64_t d = 0; d < P; d++) {
                    m2[d] = a->beta1 * m2[d] + (1.0f - a->beta1) * G[d];
                    w[d] -= a->lr * (m2[d] / denom);
                }
            }
        }
    }
}

/* Lanes come grouped by table (fbgemm's order): each run of lanes of one table gets its
 * own hash table, sized to the run's ids (small enough to stay in cache). */
static void *run(void *arg) {
    Job *a = arg;
    Scratch *sc = &scratch[a->part];
    pthread_mutex_lock(&sc->lock);
    int64_t most = 0;
    for (int64_t l0 = 0, l1; l0 < a->T; l0 = l1) {
        for (l1 = l0 + 1; l1 < a->T && same_table(a, l0, l1); l1++) {}
        const int64_t n = a->off[l1 * a->B] - a->off[l0 * a->B];
        most = n > most ? n : most;
    }
    int64_t top = 16;
    while (top < 2 * most) top <<= 1;
    if (!reserve(sc, top, most + 1, a->pmax)) {
        a->failed = 1;
        pthread_mutex_unlock(&sc->lock);
        return NULL;
    }
    int64_t *keys = sc->keys;
    int32_t *slot_of = sc->slot_of;
    for (int64_t l0 = 0, l1; l0 < a->T; l0 = l1) {
        for (l1 = l0 + 1; l1 < a->T && same_table(a, l0, l1); l1++) {}
        const int64_t n = a->off[l1 * a->B] - a->off[l0 * a->B];
        if (n == 0) continue;
        int64_t cap = 16, used = 0;
        while (cap < 2 * n) cap <<= 1;
        memset(keys, 0xff, cap * sizeof(int64_t)); /* -1: empty */
        const int64_t P = a->lane_p[l0], wo = a->lane_w[l0], mo = a->lane_m[l0];
        const int64_t mstep = a->kind == ADAGRAD ? P : 1;
        const int64_t split = a->parts - 1; /* 1: the top bit of a row's hash picks its part */
        /* pass 1: this part's ids, without a branch on the part (half of them mispredicted) */
        int64_t *mine = sc->mine, cnt = 0;
        for (int64_t l = l0; l < l1; l++)
            for (int64_t b = 0; b < a->B; b++)
                for (int64_t j = a->off[l * a->B + b]; j < a->off[l * a->B + b + 1]; j++) {
                    mine[2 * cnt] = j;
                    mine[2 * cnt + 1] = b * a->C + a->lane_c[l];
                    cnt += !((((int64_t)(mix((uint64_t)a->idx[j]) >> 63)) ^ a->part) & split);
                }
        /* pass 2: sum each row's gradients, the probe's slot of an id AHEAD on fetched early */
        for (int64_t i = 0; i < cnt; i++) {
            if (i + AHEAD < cnt)
                __builtin_prefetch(keys + (mix((uint64_t)a->idx[mine[2 * (i + AHEAD)]]) & (uint64_t)(cap - 1)));
            const int64_t j = mine[2 * i], key = a->idx[j];
            const float *gb = a->g + mine[2 * i + 1], s = a->psw ? a->psw[j] : 1.0f;
            int64_t pos = (int64_t)(mix((uint64_t)key) & (uint64_t)(cap - 1));
            while (keys[pos] != key && keys[pos] != -1) pos = (pos + 1) & (cap - 1);
            if (keys[pos] == -1) { /* the row's first id: its sum starts here */
                keys[pos] = key;
                slot_of[pos] = (int32_t)used;
                sc->slot_key[used] = wo + key * P;
                sc->slot_m[used] = mo + key * mstep;
                float *r = sc->acc + used * a->pmax;
                for (int64_t d = 0; d < P; d++) r[d] = s * gb[d];
                used++;
            } else {
                float *r = sc->acc + (int64_t)slot_of[pos] * a->pmax;
                for (int64_t d = 0; d < P; d++) r[d] += s * gb[d];
            }
        }
        apply(a, sc, used, P);
    }
    pthread_mutex_unlock(&sc->lock);
    return NULL;
}

static PyObject *update(PyObject *self, PyObject *args) {
    Job j;
    unsigned long long w, m, m2 = 0, idx, off, psw, g, lw, lp, lm, lc;
    int threads;
    j.beta1 = j.beta2 = j.bias2 = 1.0f;
    if (!PyArg_ParseTuple(args, "iffKKKKKKKKKKLLLLLi|Kfff", &j.kind, &j.lr, &j.eps, &w, &m, &idx, &off, &psw, &g, &lw,
                          &lp, &lm, &lc, &j.T, &j.B, &j.C, &j.N, &j.pmax, &threads, &m2, &j.beta1, &j.beta2, &j.bias2))
        return NULL;
    if (j.kind < SGD || j.kind > ADAM || (j.kind == ADAM && !m2)) {
        PyErr_SetString(PyExc_ValueError, "unknown optimizer kind, or Adam without its exp_avg");
        return NULL;
    }
    j.w = (float *)w;
    j.m = (float *)m;
    j.m2 = (float *)m2;
    j.idx = (const int64_t *)idx;
    j.off = (const int64_t *)off;
    j.psw = (const float *)psw;
    j.g = (const float *)g;
    j.lane_w = (const int64_t *)lw;
    j.lane_p = (const int64_t *)lp;
    j.lane_m = (const int64_t *)lm;
    j.lane_c = (const int64_t *)lc;
    j.failed = 0;
    j.parts = threads > 1 && omp_get_max_threads() > 1 && j.N >= 4096 ? 2 : 1;
    Job jobs[2] = {j, j};
    jobs[0].part = 0;
    jobs[1].part = 1;
    Py_BEGIN_ALLOW_THREADS
    if (j.parts == 2) {
#pragma omp parallel num_threads(2)
        {
            int got = omp_get_num_threads();  /* 1 where no second worker is free: it does both parts */
            for (int t = omp_get_thread_num(); t < 2; t += got) run(&jobs[t]);
        }
    } else {
        run(&jobs[0]);
    }
    Py_END_ALLOW_THREADS
    if (jobs[0].failed || jobs[1].failed) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* lookup(w, idx, off, lane_w, lane_p, lane_c, lane_m, T, B, C, out): where every bag holds one id
 * or none, out [B, C] (TBE's output: lane l's row of P floats at column lane_c[l]) gets each
 * bag's row (zeros for an empty bag), copied on two of torch's OpenMP workers, fetching rows
 * ahead (DIN's 56k ids of two tables: 0.38-0.45 ms against fbgemm's CPU forward's 0.53-0.61 ms);
 * returns False, writing nothing, where a bag holds several ids, or an id is not a row of its
 * lane's table (lane_m[l] rows): the caller then runs fbgemm's. */
static PyObject *lookup(PyObject *self, PyObject *args) {
    unsigned long long w, idx, off, lw, lp, lc, lm, out;
    long long T, B, C;
    if (!PyArg_ParseTuple(args, "KKKKKKKLLLK", &w, &idx, &off, &lw, &lp, &lc, &lm, &T, &B, &C, &out)) return NULL;
    const int64_t *o = (const int64_t *)off, *ix = (const int64_t *)idx;
    const int64_t *lane_w = (const int64_t *)lw, *lane_p = (const int64_t *)lp, *lane_c = (const int64_t *)lc;
    const int64_t *lane_m = (const int64_t *)lm;
    for (int64_t l = 0; l < T; l++)
        for (int64_t b = 0; b < B; b++) {
            const int64_t i = l * B + b, n = o[i + 1] - o[i];
            if (n < 0 || n > 1 || (n == 1 && (uint64_t)ix[o[i]] >= (uint64_t)lane_m[l])) Py_RETURN_FALSE;
        }
    const float *W = (const float *)w;
    float *O = (float *)out;
    Py_BEGIN_ALLOW_THREADS
#pragma omp parallel for num_threads(2) if (T * B >= 4096 && omp_get_max_threads() > 1) schedule(static)
    for (int64_t b = 0; b < B; b++)
        for (int64_t l = 0; l < T; l++) {
            const int64_t P = lane_p[l], i = l * B + b, ahead = i + 16;
            if (b + 16 < B && o[ahead + 1] > o[ahead]) __builtin_prefetch(W + lane_w[l] + ix[o[ahead]] * P); /* scattered */
            float *restrict dst = O + b * C + lane_c[l];
            if (o[i + 1] == o[i]) {
                for (int64_t d = 0; d < P; d++) dst[d] = 0.0f;
                continue;
            }
            const float *restrict src = W + lane_w[l] + ix[o[i]] * P;
            for (int64_t d = 0; d < P; d++) dst[d] = src[d];
        }
    Py_END_ALLOW_THREADS
    Py_RETURN_TRUE;
}

static PyMethodDef methods[] = {
    {"update", update, METH_VARARGS, "Fused sparse SGD, Adagrad, row-wise Adagrad, row-wise Adam on the rows read."},
    {"lookup", lookup, METH_VARARGS, "Rows of bags of one id or none into TBE's output layout (else returns False)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_rowupdate", NULL, -1, methods};

PyMODINIT_FUNC PyInit__rowupdate(void) { return PyModule_Create(&module); }
