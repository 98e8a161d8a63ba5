/* What the two files of rectables/_idmap share (rectables/_idmap.c, rectables/_evict.c). */
#ifndef RECTABLES_IDMAP_H
#define RECTABLES_IDMAP_H
#include <stdint.h>

#define MAX_THREADS 64

/* Runs fn(arg, t) for t in [0, threads) on OpenMP threads (torch's runtime; see
 * rectables/_evict.c); returns when all are done. */
void run_threads(void (*fn)(void *, int), void *arg, int threads);

/* The slots [m] of the k keys to evict (see rectables/_evict.c), -1 if out of memory. */
int64_t select_evict(const int64_t *slots, const int64_t *use, int64_t C, int64_t step, int lfu, int64_t k, int64_t *out, int threads);
#endif
