/* Kernels of DIN (Zhou et al., "Deep Interest Network for Click-Through Rate Prediction",
 * KDD 2018; models/din.py, whose torch functions give the same values and are the fallback).
 *
 * Pairs: from the embeddings e [B + N, De] (rows 0..B-1 the queries q_b, then the N history
 * keys k_n, key n in segment b), X [N, 2 De] = [k_n, q_b * k_n] (the attention's inputs
 * besides q_b's own term), and its backward in one pass: de[B + n] = dX1 + dX2 * q_b,
 * de[b] = gq_b + sum over the segment of dX2 * k_n (gq: the gradient of q used elsewhere).
 * Pool: p_b = sum over the segment of w_n k_n, backward de[B + n] = w_n gp_b, de[b] = 0,
 * gw_n = <gp_b, k_n>.
 *
 * Dice forward and backward over a [N, H] pre-activation s in two passes each:
 *   forward:  p = sigmoid((s - mean) rstd),  y = s (alpha + p (1 - alpha)),
 *             with batch statistics (mean, biased var over the N rows) from pass 1;
 *   backward: g_alpha = sum g s (1 - p),  g_z = g s (1 - alpha) p (1 - p),
 *             g_s = g (alpha + p (1 - alpha)) + rstd (g_z - mean(g_z) - z mean(g_z z))
 *             (batch statistics) or + rstd g_z (fixed statistics), with the forward's p.
 * Optionally pass 1 first adds a per-segment row, s[n] = x[n] + add[b] for the rows n of
 * segment b (DIN's query term; rows off[b] .. off[b+1] - 1), and the backward returns the
 * segment sums of g_s as that row's gradient.  Torch's eager ops make ~5 passes over [N, H]
 * each way, and its column reductions are slow; this is two.
 * Rows are split over two threads (at a segment boundary): torch's OpenMP workers, not
 * threads of our own (see rectables/_evict.c); where torch runs one thread, the caller's.
 * Dice's sums are accumulated in double per thread; a call is deterministic for a thread count. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    const float *g, *add, *src;
    const float *tm, *tr, *ta, *tmg; /* mean, rstd, alpha, (mean g_z, mean g_z z) tiled to W (2 W) */
    float *s, *y, *gs, *gadd, *p; /* p: written by the forward, read by the backward */
    const int64_t *off;
    double *acc; /* this part's sums: 2 H (forward), 3 W (backward) */
    int64_t H, W, lo, hi, b0, b1; /* W = k H, k rows a multiple of 16 values; rows [lo, hi), segments [b0, b1) */
    int64_t nq;                   /* pairs, pool: the query rows before the keys in src */
    const float *w;               /* pool: the weight of each key */
    float *gw;
} Job;

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

#if defined(__x86_64__) && defined(__GNUC__)
#define CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CLONES
#endif

/* The element-wise passes run over k rows at a time (k H values, a multiple of the vector
 * width, with the per-column values tiled to match), so that no value takes a scalar path:
 * H = 40 in rows of 40 left 8 of every 40 to scalar code, 3x slower. */

/* pass 1 of the forward: s = src + the segment's row (with add), sums of s and s^2 per column */
CLONES static void fwd_stats(Job *j) {
    const int64_t H = j->H;
    double *restrict sum = j->acc, *restrict sq = j->acc + H;
    for (int64_t b = j->b0; b < j->b1 || (!j->off && b == j->b0); b++) {
        const int64_t lo = j->off ? j->off[b] : j->lo, hi = j->off ? j->off[b + 1] : j->hi;
        const float *restrict a = j->add ? j->add + b * H : NULL;
        for (int64_t n = lo; n < hi; n++) {
            float *restrict s = j->s + n * H;
            if (a)
                for (int64_t d = 0; d < H; d++) s[d] = j->src[n * H + d] + a[d];
            for (int64_t d = 0; d < H; d++) {
                sum[d] += s[d];
                sq[d] += (double)s[d] * s[d];
            }
        }
    }
}

CLONES static void fwd_apply(Job *j) {
    const int64_t W = j->W;
    const float *restrict m = j->tm, *restrict r = j->tr, *restrict al = j->ta;
    for (int64_t i0 = j->lo * j->H, end = j->hi * j->H; i0 < end; i0 += W) {
        const int64_t len = end - i0 < W ? end - i0 : W;
        const float *restrict s = j->s + i0;
        float *restrict y = j->y + i0, *restrict pp = j->p + i0;
        for (int64_t i = 0; i < len; i++) {
            const float p = sigmoid_f((s[i] - m[i]) * r[i]);
            y[i] = s[i] * (al[i] + p * (1.0f - al[i]));
            pp[i] = p;
        }
    }
}

/* pass 1 of the backward: sums of g s (1 - p), g_z and g_z z, tiled (folded by the caller) */
CLONES static void bwd_sums(Job *j) {
    const int64_t W = j->W;
    const float *restrict m = j->tm, *restrict r = j->tr, *restrict al = j->ta;
    double *restrict ga = j->acc, *restrict gz = j->acc + W, *restrict gzz = j->acc + 2 * W;
    for (int64_t i0 = j->lo * j->H, end = j->hi * j->H; i0 < end; i0 += W) {
        const int64_t len = end - i0 < W ? end - i0 : W;
        const float *restrict s = j->s + i0, *restrict g = j->g + i0, *restrict pp = j->p + i0;
        for (int64_t i = 0; i < len; i++) {
            const float z = (s[i] - m[i]) * r[i], p = pp[i];
            const float gsp = g[i] * s[i] * (1.0f - p);
            const float g_z = gsp * (1.0f - al[i]) * p;
            ga[i] += gsp;
            gz[i] += g_z;
            gzz[i] += (double)g_z * z;
        }
    }
}

/* pass 2 of the backward: g_s, then the segment sums of g_s */
CLONES static void bwd_apply(Job *j) {
    const int64_t W = j->W, H = j->H;
    const float *restrict m = j->tm, *restrict r = j->tr, *restrict al = j->ta, *restrict mg = j->tmg;
    for (int64_t i0 = j->lo * H, end = j->hi * H; i0 < end; i0 += W) {
        const int64_t len = end - i0 < W ? end - i0 : W;
        const float *restrict s = j->s + i0, *restrict g = j->g + i0, *restrict pp = j->p + i0;
        float *restrict out = j->gs + i0;
        for (int64_t i = 0; i < len; i++) {
            const float z = (s[i] - m[i]) * r[i], p = pp[i];
            const float g_z = g[i] * s[i] * (1.0f - al[i]) * p * (1.0f - p);
            out[i] = g[i] * (al[i] + p * (1.0f - al[i])) + r[i] * (g_z - mg[i] - z * mg[W + i]);
        }
    }
    if (!j->gadd) return;
    for (int64_t b = j->b0; b < j->b1; b++) {
        float *restrict ga = j->gadd + b * H;
        memset(ga, 0, H * sizeof(float));
        for (int64_t n = j->off[b]; n < j->off[b + 1]; n++)
            for (int64_t d = 0; d < H; d++) ga[d] += j->gs[n * H + d];
    }
}

/* pairs: X = [k, q k] for the segments of this part (src = e, y = X) */
CLONES static void pairs_fwd(Job *j) {
    const int64_t D = j->H;
    for (int64_t b = j->b0; b < j->b1; b++) {
        const float *restrict q = j->src + b * D;
        for (int64_t n = j->off[b]; n < j->off[b + 1]; n++) {
            const float *restrict k = j->src + (j->nq + n) * D;
            float *restrict x = j->y + n * 2 * D;
            for (int64_t d = 0; d < D; d++) {
                x[d] = k[d];
                x[D + d] = q[d] * k[d];
            }
        }
    }
}

/* pairs backward (g = dX, gs = de) */
CLONES static void pairs_bwd(Job *j) {
    const int64_t D = j->H;
    for (int64_t b = j->b0; b < j->b1; b++) {
        const float *restrict q = j->src + b * D;
        float *restrict gq = j->gs + b * D;
        if (j->add) memcpy(gq, j->add + b * D, D * sizeof(float));
        else memset(gq, 0, D * sizeof(float));
        for (int64_t n = j->off[b]; n < j->off[b + 1]; n++) {
            const float *restrict k = j->src + (j->nq + n) * D, *restrict gx = j->g + n * 2 * D;
            float *restrict gk = j->gs + (j->nq + n) * D;
            for (int64_t d = 0; d < D; d++) {
                gk[d] = gx[d] + gx[D + d] * q[d];
                gq[d] += gx[D + d] * k[d];
            }
        }
    }
}

/* pool forward (src = e, y = p [B, D]) */
CLONES static void pool_fwd(Job *j) {
    const int64_t D = j->H;
    for (int64_t b = j->b0; b < j->b1; b++) {
        float *restrict p = j->y + b * D;
        memset(p, 0, D * sizeof(float));
        for (int64_t n = j->off[b]; n < j->off[b + 1]; n++) {
            const float *restrict k = j->src + (j->nq + n) * D;
            const float w = j->w[n];
            for (int64_t d = 0; d < D; d++) p[d] += w * k[d];
        }
    }
}

/* pool backward (g = gp, gs = de, gw) */
CLONES static void pool_bwd(Job *j) {
    const int64_t D = j->H;
    for (int64_t b = j->b0; b < j->b1; b++) {
        const float *restrict gp = j->g + b * D;
        memset(j->gs + b * D, 0, D * sizeof(float));
        for (int64_t n = j->off[b]; n < j->off[b + 1]; n++) {
            const float *restrict k = j->src + (j->nq + n) * D;
            float *restrict gk = j->gs + (j->nq + n) * D;
            const float w = j->w[n];
            float dot = 0.0f;
            for (int64_t d = 0; d < D; d++) {
                gk[d] = w * gp[d];
                dot += gp[d] * k[d];
            }
            j->gw[n] = dot;
        }
    }
}

/* Two parts: rows split at the segment boundary nearest N / 2 (or at N / 2); inputs under
 * 2^16 values, and all where torch runs one thread, as one part on the caller's thread */
static int split(Job *jobs, int64_t N, int64_t B, const int64_t *off) {
    int64_t mid = N / 2, bm = B;
    if (off) { /* the first segment starting at or after N / 2 */
        int64_t lo = 0, hi = B;
        while (lo < hi) {
            int64_t m = (lo + hi) / 2;
            if (off[m] < N / 2) lo = m + 1; else hi = m;
        }
        bm = lo;
        mid = off[bm];
    }
    int parts = N * jobs[0].H >= 65536 && omp_get_max_threads() > 1 && mid > 0 && mid < N ? 2 : 1;
    if (parts == 1) mid = N, bm = B;
    jobs[1] = jobs[0];
    jobs[0].lo = 0, jobs[0].hi = mid, jobs[0].b0 = 0, jobs[0].b1 = bm;
    jobs[1].lo = mid, jobs[1].hi = N, jobs[1].b0 = bm, jobs[1].b1 = B;
    if (jobs[0].acc) jobs[1].acc = jobs[0].acc + 3 * jobs[0].W; /* Dice's sums, one block per part */
    return parts;
}

static void run(void (*fn)(Job *), Job *jobs, int parts) {
    if (parts < 2) {
        fn(&jobs[0]);
        return;
    }
#pragma omp parallel num_threads(2)
    {
        int got = omp_get_num_threads();
        for (int t = omp_get_thread_num(); t < 2; t += got) fn(&jobs[t]);
    }
}

/* Scratch of one call: the tiled per-column values (5 W floats) and both parts' sums (6 W doubles) */
typedef struct {
    float *tiles;
    double *acc;
    int64_t W;
} Scratch;

static int scratch(Scratch *sc, int64_t H) {
    int64_t k = 1;
    while ((k * H) % 16) k *= 2;
    sc->W = k * H;
    sc->tiles = malloc(5 * (size_t)sc->W * sizeof(float));
    sc->acc = calloc(6 * (size_t)sc->W, sizeof(double));
    if (sc->tiles && sc->acc) return 1;
    free(sc->tiles);
    free(sc->acc);
    return 0;
}

static void tile(float *out, const float *v, int64_t H, int64_t W) {
    for (int64_t i = 0; i < W; i++) out[i] = v[i % H];
}

/* forward(src, s, N, H, add, off, B, alpha, mean, rstd, var, y, p, eps, stats): y and p
 * [N, H] written; s [N, H] is written (src + add) where add is given, else s is src; with
 * stats, mean, rstd and var (biased) [H] are written from the rows, else mean and rstd are read */
static PyObject *forward(PyObject *self, PyObject *args) {
    unsigned long long psrc, ps, padd, poff, palpha, pmean, prstd, pvar, py, pp;
    long long N, H, B;
    float eps;
    int stats;
    if (!PyArg_ParseTuple(args, "KKLLKKLKKKKKKfp", &psrc, &ps, &N, &H, &padd, &poff, &B, &palpha, &pmean, &prstd, &pvar,
                          &py, &pp, &eps, &stats))
        return NULL;
    if (padd && !poff) {
        PyErr_SetString(PyExc_ValueError, "add needs the segment offsets");
        return NULL;
    }
    Scratch sc;
    if (!scratch(&sc, H)) return PyErr_NoMemory();
    const int64_t W = sc.W;
    Job jobs[2] = {{.src = (const float *)psrc, .s = (float *)ps, .add = (const float *)padd,
                    .off = (const int64_t *)poff, .tm = sc.tiles, .tr = sc.tiles + W, .ta = sc.tiles + 2 * W,
                    .y = (float *)py, .p = (float *)pp, .acc = sc.acc, .H = H, .W = W}};
    float *mean = (float *)pmean, *rstd = (float *)prstd, *var = (float *)pvar;
    Py_BEGIN_ALLOW_THREADS
    int parts = split(jobs, N, poff ? B : 0, jobs[0].off);
    if (stats || padd) run(fwd_stats, jobs, parts);
    if (stats) {
        const double *a0 = sc.acc, *a1 = sc.acc + 3 * W;
        for (int64_t d = 0; d < H; d++) {
            const double m = (a0[d] + a1[d]) / N, v = (a0[H + d] + a1[H + d]) / N - m * m;
            mean[d] = (float)m;
            var[d] = (float)(v > 0 ? v : 0);
            rstd[d] = 1.0f / sqrtf(var[d] + eps);
        }
    }
    tile(sc.tiles, mean, H, W);
    tile(sc.tiles + W, rstd, H, W);
    tile(sc.tiles + 2 * W, (const float *)palpha, H, W);
    run(fwd_apply, jobs, parts);
    Py_END_ALLOW_THREADS
    free(sc.tiles);
    free(sc.acc);
    Py_RETURN_NONE;
}

/* backward(g, s, p, N, H, alpha, mean, rstd, stats, gs, galpha, off, B, gadd): gs [N, H],
 * galpha [H] and (with off) gadd [B, H] written; p from the forward */
static PyObject *backward(PyObject *self, PyObject *args) {
    unsigned long long pg, ps, pp, palpha, pmean, prstd, pgs, pga, poff, pgadd;
    long long N, H, B;
    int stats;
    if (!PyArg_ParseTuple(args, "KKKLLKKKpKKKLK", &pg, &ps, &pp, &N, &H, &palpha, &pmean, &prstd, &stats, &pgs, &pga,
                          &poff, &B, &pgadd))
        return NULL;
    if (pgadd && !poff) {
        PyErr_SetString(PyExc_ValueError, "gadd needs the segment offsets");
        return NULL;
    }
    Scratch sc;
    if (!scratch(&sc, H)) return PyErr_NoMemory();
    const int64_t W = sc.W;
    float *tmg = sc.tiles + 3 * W;
    Job jobs[2] = {{.g = (const float *)pg, .s = (float *)ps, .p = (float *)pp, .tm = sc.tiles, .tr = sc.tiles + W,
                    .ta = sc.tiles + 2 * W, .tmg = tmg, .gs = (float *)pgs, .off = (const int64_t *)poff,
                    .gadd = (float *)pgadd, .acc = sc.acc, .H = H, .W = W}};
    float *galpha = (float *)pga;
    Py_BEGIN_ALLOW_THREADS
    tile(sc.tiles, (const float *)pmean, H, W);
    tile(sc.tiles + W, (const float *)prstd, H, W);
    tile(sc.tiles + 2 * W, (const float *)palpha, H, W);
    int parts = split(jobs, N, poff ? B : 0, jobs[0].off);
    run(bwd_sums, jobs, parts);
    for (int64_t d = 0; d < H; d++) { /* fold both parts' tiles */
        double sa = 0, sz = 0, szz = 0;
        for (int64_t i = d; i < W; i += H)
            for (int part = 0; part < 2; part++) {
                const double *a = sc.acc + part * 3 * W;
                sa += a[i], sz += a[W + i], szz += a[2 * W + i];
            }
        galpha[d] = (float)sa;
        for (int64_t i = d; i < W; i += H) {
            tmg[i] = stats ? (float)(sz / N) : 0.0f;
            tmg[W + i] = stats ? (float)(szz / N) : 0.0f;
        }
    }
    run(bwd_apply, jobs, parts);
    Py_END_ALLOW_THREADS
    free(sc.tiles);
    free(sc.acc);
    Py_RETURN_NONE;
}

/* The segment kernels, one argument list: (in, in2, e, B, N, D, off, out, out2), 0 for what a
 * kernel does not read; e [B + N, D], off [B + 1].
 *   pairs_forward:  out = X [N, 2 D]
 *   pairs_backward: in = dX, in2 = gq [B, D] or 0, out = de [B + N, D]
 *   pool_forward:   in2 = w [N], out = p [B, D]
 *   pool_backward:  in = gp [B, D], in2 = w, out = de, out2 = gw [N] */
static PyObject *segments(PyObject *args, void (*fn)(Job *)) {
    unsigned long long pin, pin2, pe, poff, pout, pout2;
    long long B, N, D;
    if (!PyArg_ParseTuple(args, "KKKLLLKKK", &pin, &pin2, &pe, &B, &N, &D, &poff, &pout, &pout2)) return NULL;
    Job jobs[2] = {{.g = (const float *)pin, .add = (const float *)pin2, .w = (const float *)pin2,
                    .src = (const float *)pe, .off = (const int64_t *)poff, .y = (float *)pout, .gs = (float *)pout,
                    .gw = (float *)pout2, .H = D, .nq = B}};
    Py_BEGIN_ALLOW_THREADS
    run(fn, jobs, split(jobs, N, B, jobs[0].off));
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *pairs_forward(PyObject *self, PyObject *args) { return segments(args, pairs_fwd); }
static PyObject *pairs_backward(PyObject *self, PyObject *args) { return segments(args, pairs_bwd); }
static PyObject *pool_forward(PyObject *self, PyObject *args) { return segments(args, pool_fwd); }
static PyObject *pool_backward(PyObject *self, PyObject *args) { return segments(args, pool_bwd); }

static PyMethodDef methods[] = {
    {"dice_forward", forward, METH_VARARGS, "Dice forward over [N, H] rows (two passes)."},
    {"dice_backward", backward, METH_VARARGS, "Dice backward over [N, H] rows (two passes)."},
    {"pairs_forward", pairs_forward, METH_VARARGS, "DIN's attention inputs [k, q k] from the embeddings."},
    {"pairs_backward", pairs_backward, METH_VARARGS, "The gradient of pairs_forward."},
    {"pool_forward", pool_forward, METH_VARARGS, "DIN's weighted sum of each history's keys."},
    {"pool_backward", pool_backward, METH_VARARGS, "The gradient of pool_forward."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_din", NULL, -1, methods};

PyMODINIT_FUNC PyInit__din(void) { return PyModule_Create(&module); }
