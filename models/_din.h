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

/* y = s (al + p (1 - al)) */
static inline float dice_y(float s, float p, float al) { return s * (al + p * (1.0f - al)); }

/* pass 2 of Dice's backward (models/_din.c), g_s of len values; in the query layer's
 * backward (models/_din_query.c) too, where it runs on each sample's rows */
static inline __attribute__((always_inline)) void dice_grad(const float *restrict s, const float *restrict pp,
                                                         const float *restrict g, float go, const float *restrict m,
                                                         const float *restrict r, const float *restrict al,
                                                         const float *restrict v, const float *restrict mg,
                                                         const float *restrict mg2, float *restrict out, int64_t len,
                                                         const int head) {
    for (int64_t i = 0; i < len; i++) {
        const float z = (s[i] - m[i]) * r[i], p = pp[i], gi = head ? go * v[i] : g[i];
        const float g_z = gi * s[i] * (1.0f - al[i]) * p * (1.0f - p);
        out[i] = gi * (al[i] + p * (1.0f - al[i])) + r[i] * (g_z - mg[i] - z * mg2[i]);
    }
}

PyObject *din_query_forward(PyObject *self, PyObject *args);
PyObject *din_query_backward(PyObject *self, PyObject *args);
#endif
