/* Shared by models/_din.c, models/_din_query.c and models/_din_hidden.c (one extension,
 * models._din). */
#ifndef DIN_H
#define DIN_H
#include <Python.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

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

/* e^x in float (Cody-Waite reduction, degree-6 polynomial; < 2 ulp on [-87, 88]), written so
 * that the loops around it vectorise (libm's expf does not without -ffast-math); NaN stays NaN */
static inline float exp_f(float x) {
    x = x < -87.0f ? -87.0f : x;
    x = x > 88.0f ? 88.0f : x;
    const float n = __builtin_rintf(x * 1.44269504088896341f);
    const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    union { int32_t i; float f; } scale = {.i = ((int32_t)n + 127) << 23};
    return p * scale.f;
}

static inline float sigmoid_f(float z) { return 1.0f / (1.0f + exp_f(-z)); }

typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4))); /* unaligned loads and stores */

#define ALWAYS static inline __attribute__((always_inline))

/* a function compiled for AVX-512, for AVX2 with FMA (the tiles' multiply-adds need it) and
 * for any x86-64; the loader picks the one for the machine */
#if defined(__x86_64__) && defined(__GNUC__)
#define DIN_CLONES __attribute__((target_clones("avx512f", "arch=haswell", "default")))
#else
#define DIN_CLONES
#endif

static inline int64_t up16(int64_t n) { return (n + 15) / 16 * 16; }

/* out[r][0 .. w) = init[r] + sum over t < K of a[r ars + t ats] Bm[t ldb + 0 .. w), r < R,
 * w <= 16 CG; Bm rows hold 16 CG readable values, init rows 16 CG, ldi apart (ldi 0: one
 * row for all; init NULL: 0; init may be out, to accumulate); out rows are ldo apart.  The
 * R CG <= 20 vector accumulators stay in registers. */
ALWAYS void tile(const int R, const int CG, const float *a, int64_t ars, int64_t ats, int64_t K, const float *Bm,
                 int64_t ldb, const float *init, int64_t ldi, float *out, int64_t ldo, int64_t w) {
    v16 acc[8][5];
    for (int r = 0; r < R; r++)
        for (int g = 0; g < CG; g++) acc[r][g] = init ? *(const v16u *)(init + r * ldi + 16 * g) : (v16){0};
    for (int64_t t = 0; t < K; t++) {
        v16 m[5];
        for (int g = 0; g < CG; g++) m[g] = *(const v16u *)(Bm + t * ldb + 16 * g);
        for (int r = 0; r < R; r++) {
            const float x = a[r * ars + t * ats]; /* broadcast (as x + (v16){0} would add in scalar first) */
            for (int g = 0; g < CG; g++) acc[r][g] += x * m[g];
        }
    }
    for (int r = 0; r < R; r++)
        for (int g = 0; g < CG; g++) {
            float *o = out + r * ldo + 16 * g;
            if (w >= 16 * (g + 1)) {
                *(v16u *)o = acc[r][g];
            } else if (w > 16 * g) {
                for (int64_t i = 0; i < w - 16 * g; i++) o[i] = acc[r][g][i]; /* (memcpy: a call a row) */
            }
        }
}

#define TILE(R, CG) \
    case R * 8 + CG:                                                                                                \
        tile(R, CG, a + r0 * ars, ars, ats, K, Bm + j, ldb, init ? init + r0 * ldi + j : NULL, ldi, out + r0 * ldo + j, \
             ldo, w);                                                                                               \
        break;

/* out [rows, W] = init + a [rows, K] Bm [K, Wp] (Wp = W rounded up to 16; init as in tile),
 * in tiles of 64 columns by 4 rows, or 8 where the tile is 32 columns or fewer; where 80
 * columns are left, one tile of 80 by 4 (DIN's 80-wide layers: 64 + 16 ran the last 16 at
 * 8 multiply-adds to 9 loads; 97 against 85 GFLOP/s for the first layer's product, 127
 * against 101 for the hidden layer's g_y, one core).  Compiled
 * once a file and vector width, not inlined: its tiles (24 then) inlined at each call took gcc
 * 2.5 min (no step time measurably lost) */
DIN_CLONES __attribute__((unused)) static void
product(const float *a, int64_t ars, int64_t ats, int64_t rows, int64_t K, const float *Bm, int64_t ldb,
                    const float *init, int64_t ldi, float *out, int64_t ldo, int64_t W) {
    for (int64_t j = 0, w; j < W; j += w) {
        w = W - j == 80 ? 80 : W - j < 64 ? W - j : 64;
        const int64_t CG = up16(w) / 16, R = CG > 2 ? 4 : 8;
        for (int64_t r0 = 0; r0 < rows; r0 += R)
            switch ((rows - r0 < R ? rows - r0 : R) * 8 + CG) {
                TILE(1, 1) TILE(2, 1) TILE(3, 1) TILE(4, 1) TILE(5, 1) TILE(6, 1) TILE(7, 1) TILE(8, 1)
                TILE(1, 2) TILE(2, 2) TILE(3, 2) TILE(4, 2) TILE(5, 2) TILE(6, 2) TILE(7, 2) TILE(8, 2)
                TILE(1, 3) TILE(2, 3) TILE(3, 3) TILE(4, 3) TILE(1, 4) TILE(2, 4) TILE(3, 4) TILE(4, 4)
                TILE(1, 5) TILE(2, 5) TILE(3, 5) TILE(4, 5)
            }
    }
}

/* y = s (al + p (1 - al)) */
static inline float dice_y(float s, float p, float al) { return s * (al + p * (1.0f - al)); }

/* pass 2 of Dice's backward (models/_din.c), g_s of len values */
ALWAYS void dice_grad(const float *restrict s, const float *restrict pp, const float *restrict g, float go,
                      const float *restrict m, const float *restrict r, const float *restrict al,
                      const float *restrict v, const float *restrict mg, const float *restrict mg2,
                      float *restrict out, int64_t len, const int head) {
    for (int64_t i = 0; i < len; i++) {
        const float z = (s[i] - m[i]) * r[i], p = pp[i], gi = head ? go * v[i] : g[i];
        const float g_z = gi * s[i] * (1.0f - al[i]) * p * (1.0f - p);
        out[i] = gi * (al[i] + p * (1.0f - al[i])) + r[i] * (g_z - mg[i] - z * mg2[i]);
    }
}

/* Dice's g_s split at its batch statistics (z = (s - mean) rstd, g_z as in dice_grad):
 *   g_s = loc - rstd (mg + z mg2),  loc = g (alpha + p (1 - alpha)) + rstd g_z,
 * loc made where g and p are at hand (the hidden layer's backward, models/_din_hidden.c,
 * while it sums mg and mg2), finished here where only s is (the query layer's backward,
 * models/_din_query.c): Dice's p and g are read once, not twice */
ALWAYS void dice_finish(const float *restrict s, const float *restrict loc, const float *restrict m,
                        const float *restrict r, const float *restrict mg, const float *restrict mg2,
                        float *restrict out, int64_t len) {
    for (int64_t i = 0; i < len; i++) out[i] = loc[i] - r[i] * (mg[i] + (s[i] - m[i]) * r[i] * mg2[i]);
}

/* Dice's batch statistics of a column from its sum and sum of squares over N rows: mean,
 * biased var and rstd = 1 / sqrt(var + eps), in double, then float (a NaN stays NaN) */
static inline void column_stats(double sum, double sq, int64_t N, float eps, float *mean, float *var, float *rstd) {
    const double t = sum / N, v = sq / N - t * t;
    *mean = (float)t;
    *var = (float)(v < 0 ? 0 : v);
    *rstd = 1.0f / sqrtf(*var + eps);
}

/* Dice's batch statistics [3, H] (mean, biased var, rstd) over N rows from two parts' column
 * sums of s and s^2 (double [2, Hp] each, `part` apart) */
static inline void batch_stats(const double *sums, int64_t part, int64_t Hp, int64_t H, int64_t N, float eps,
                               float *stats) {
    for (int64_t h = 0; h < H; h++)
        column_stats(sums[h] + sums[part + h], sums[Hp + h] + sums[part + Hp + h], N, eps, stats + h, stats + H + h,
                     stats + 2 * H + h);
}

PyObject *din_query_forward(PyObject *self, PyObject *args);
PyObject *din_query_backward(PyObject *self, PyObject *args);
PyObject *din_hidden_forward(PyObject *self, PyObject *args);
PyObject *din_hidden_backward(PyObject *self, PyObject *args);
PyObject *din_query_prep(PyObject *self, PyObject *args);
PyObject *din_query_finish(PyObject *self, PyObject *args);
PyObject *din_pad_matrix(PyObject *self, PyObject *args);
#endif
