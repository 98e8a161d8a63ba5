/* Shared by models/_din.c and models/_din_query.c (one extension, models._din). */
#ifndef DIN_H
#define DIN_H
#include <Python.h>
#include <omp.h>
#include <stdint.h>

/* The first of the B segments (offsets off [B + 1] over N rows) starting at or after row
 * N / 2: where two threads split the work. */
static inline int64_t din_half(const int64_t *off, int64_t B, int64_t N) {
    int64_t lo = 0, hi = B;
    while (lo < hi) {
        int64_t m = (lo + hi) / 2;
        if (off[m] < N / 2) lo = m + 1; else hi = m;
    }
    return lo;
}

/* fn(&jobs[0]) and fn(&jobs[1]) on two of torch's OpenMP workers (parts == 2), or fn(&jobs[0])
 * on the caller's thread; if the runtime gives one thread (nested), it runs both. */
#define DIN_RUN(fn, jobs, parts)                                                              \
    do {                                                                                      \
        if ((parts) < 2) {                                                                    \
            (fn)(&(jobs)[0]);                                                                 \
            break;                                                                            \
        }                                                                                     \
        _Pragma("omp parallel num_threads(2)") {                                              \
            const int got_ = omp_get_num_threads();                                           \
            for (int t_ = omp_get_thread_num(); t_ < 2; t_ += got_) (fn)(&(jobs)[t_]);        \
        }                                                                                     \
    } while (0)

PyObject *din_query_forward(PyObject *self, PyObject *args);
PyObject *din_query_backward(PyObject *self, PyObject *args);
#endif
