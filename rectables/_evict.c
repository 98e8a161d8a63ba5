/* Eviction of rectables/idmap.py's map: which k keys a full dynamic table gives up.
 * Slots as in rectables/_idmap.c: (id, meta) in `slots`, meta >= 0 for a key; the key's use
 * (count << 32) | last step in `use`, -1 for a vacant slot. */
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "_idmap.h"

/* On the OpenMP runtime torch loaded (the same soname, so the same library): its worker
 * threads, which spin a while after each of torch's parallel ops, take this work instead of
 * competing with threads of our own for the cores (with pthreads of our own the remap took
 * 2.6 ms a batch on 2 cores, 1.4 ms once torch's workers slept; measured interleaved).  If
 * the runtime gives fewer threads than asked for (nested), each runs several t. */
void run_threads(void (*fn)(void *, int), void *arg, int threads) {
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads <= 1) {
        fn(arg, 0);
        return;
    }
#pragma omp parallel num_threads(threads)
    {
        int got = omp_get_num_threads();
        for (int t = omp_get_thread_num(); t < threads; t += got) fn(arg, t);
    }
}

/* select(slots, use, C, step, lfu, k, out) -> m: the slots [m] (m = min(k, candidates)) of the
 * k smallest candidates (keys whose last step < step) in the order (last, row), or with lfu
 * (count, last, row) = (use, row); rows are unique, so the set is exact.  Eviction on a full
 * table calls it every few batches, so its passes over the slots are a large part of the
 * remap's mean time: select_sampled makes one, over `use` alone (8 bytes a slot; ~12 MB at
 * 2^20 rows, against 48 MB when use lived in the slots: 7 -> ~2 ms a pick), split over
 * threads; select_c, its fallback, a histogram of the primary key and a quickselect of the
 * candidates up to the k-th one's bucket. */
typedef struct { uint64_t a; int64_t b, slot; } cand_t;  /* (primary key, row, slot) */

static inline int cand_less(const cand_t *x, const cand_t *y) {
    return x->a != y->a ? x->a < y->a : x->b < y->b;
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

#define LAST(u) ((uint64_t)(u) & 0xffffffffULL)
/* a key not read at step (a vacant slot's last is 2^32 - 1: never) */
#define CAND(u, step) (LAST(u) < (uint64_t)(step))
#define PRIMARY(u, lfu) ((lfu) ? (uint64_t)(u) : LAST(u))

static inline cand_t cand_of(const int64_t *slots, const int64_t *use, int64_t s, int lfu) {
    cand_t v = {PRIMARY(use[s], lfu), slots[2 * s + 1] & 0xffffffffLL, s};
    return v;
}

#define SAMPLE 65536  /* = rectables.idmap.SAMPLE */
#define BLOCK 32  /* slots tested at once: ~1% of them lie under the bound */
/* The same k smallest in one pass when a sample predicts them: the slots are in hash order,
 * so the first SAMPLE of them hold a uniform sample of the keys.  The sample's candidate of
 * rank ~1.25 k S / C plus a margin is a bound that the k smallest very likely lie under;
 * one pass collects every candidate up to it, and if there are at least k the quickselect
 * of those is exact (every candidate not collected is above the bound, so above all k).
 * Returns -2 where the map is too small to sample or the bound is too low (fewer than k
 * under it) or too high (more than the buffer): the caller falls back. */
/* One pass over the slots, split in `threads` ranges: every candidate up to `bound` into
 * the range's own buffer (m[t] = cap + 1: more than it holds, or no memory). */
typedef struct {
    const int64_t *slots, *use;
    int64_t C, step;
    int lfu;
    cand_t bound;
    int64_t cap;
    int threads;
    cand_t *v[MAX_THREADS];
    int64_t m[MAX_THREADS];
} pass_t;

/* built twice, for AVX2 (four 64-bit compares at once) and for any x86-64, the one the CPU
 * runs picked at load time: 2x less time in the pass */
#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target_clones("avx2", "default")))
#endif
static int64_t collect_range(const int64_t *restrict slots, const int64_t *restrict use, int64_t lo, int64_t hi,
                             int64_t step, const int lfu, cand_t B, cand_t *restrict v, int64_t cap) {
    int64_t m = 0;
    for (int64_t s0 = lo; s0 < hi; s0 += BLOCK) {
        int64_t n = hi - s0 < BLOCK ? hi - s0 : BLOCK;
        uint64_t any = 0;
        /* primary key at or below the bound's, for a block of slots, in a loop without
         * branches (vectorised); a vacant slot's primary key is above every bound */
        for (int64_t i = 0; i < n; i++) any |= PRIMARY(use[s0 + i], lfu) <= B.a;
        if (!any) continue;
        for (int64_t i = 0; i < n; i++) {
            uint64_t u = (uint64_t)use[s0 + i], a = PRIMARY(u, lfu);
            if (a > B.a || !CAND(u, step)) continue;
            if (a == B.a && (slots[2 * (s0 + i) + 1] & 0xffffffffLL) > B.b) continue;  /* a tie: the row decides */
            if (m == cap) return cap + 1;
            v[m++] = cand_of(slots, use, s0 + i, lfu);
        }
    }
    return m;
}

static void collect(void *arg, int t) {
    pass_t *p = arg;
    int64_t lo = p->C * t / p->threads, hi = p->C * (t + 1) / p->threads;
    /* a range holds about its share of the candidates: room for twice that (past it, the
     * caller falls back, exact all the same) */
    int64_t room = p->threads == 1 ? p->cap : p->cap / p->threads * 2 + 1024;
    room = room < p->cap ? room : p->cap;
    cand_t *v = p->v[t] = malloc(sizeof(cand_t) * (size_t)room);
    int64_t m = !v       ? room + 1
                : p->lfu ? collect_range(p->slots, p->use, lo, hi, p->step, 1, p->bound, v, room)
                         : collect_range(p->slots, p->use, lo, hi, p->step, 0, p->bound, v, room);
    p->m[t] = m > room ? p->cap + 1 : m;
}

static int64_t select_sampled(const int64_t *slots, const int64_t *use, int64_t C, int64_t step, int lfu, int64_t k,
                              int64_t *out, int threads) {
    int64_t S = C < SAMPLE ? C : SAMPLE, ns = 0, m = 0, cap = S + 4 * k + 64;
    if (threads < 1) threads = 1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (S == C) return -2;
    cand_t *v = malloc(sizeof(cand_t) * (size_t)cap);
    if (!v) return -1;
    for (int64_t s = 0; s < S; s++)
        if (CAND(use[s], step)) v[ns++] = cand_of(slots, use, s, lfu);
    int64_t want = (int64_t)((double)k * (double)S / (double)C * 1.25) + 32, ok = 0;
    if (want < ns) {
        quickselect(v, ns, want);
        cand_t bound = v[0];
        for (int64_t i = 1; i < want; i++) if (cand_less(&bound, &v[i])) bound = v[i];
        pass_t p = {slots, use, C, step, lfu, bound, cap, threads, {0}, {0}};
        run_threads(collect, &p, threads);
        for (int t = 0; t < threads; t++) m += p.m[t];
        for (int t = 0, at = 0; t < threads && m <= cap; at += p.m[t], t++) {
            memcpy(v + at, p.v[t], sizeof(cand_t) * (size_t)p.m[t]);
        }
        for (int t = 0; t < threads; t++) free(p.v[t]);
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
static inline uint64_t hist_key(int64_t u, int lfu, int64_t pmin) {
    return lfu ? (uint64_t)u >> 32 : LAST(u) - (uint64_t)pmin;
}

static int64_t select_c(const int64_t *slots, const int64_t *use, int64_t C, int64_t step, int lfu, int64_t k,
                        int64_t *out) {
    int64_t n = 0, pmin = INT64_MAX;
    int64_t *hist = calloc(HIST, sizeof(int64_t));
    if (!hist) return -1;
    /* the histogram's key (hist_key): the count (lfu) or last - the least last; only
     * candidates up to the bucket that holds the k-th smallest go to the quickselect */
    if (lfu) pmin = 0;  /* counts are small: no pass for the least one */
    else
        for (int64_t s = 0; s < C; s++)
            if (CAND(use[s], step) && (int64_t)LAST(use[s]) < pmin) pmin = (int64_t)LAST(use[s]);
    for (int64_t s = 0; s < C; s++) {
        if (!CAND(use[s], step)) continue;
        uint64_t d = hist_key(use[s], lfu, pmin);
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
            if (!CAND(use[s], step)) continue;
            uint64_t d = hist_key(use[s], lfu, pmin);
            if ((int64_t)(d < HIST - 1 ? d : HIST - 1) > top) continue;
            v[m++] = cand_of(slots, use, s, lfu);
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


int64_t select_evict(const int64_t *slots, const int64_t *use, int64_t C, int64_t step, int lfu, int64_t k,
                     int64_t *out, int threads) {
    int64_t got = select_sampled(slots, use, C, step, lfu, k, out, threads);
    return got == -2 ? select_c(slots, use, C, step, lfu, k, out) : got;
}
