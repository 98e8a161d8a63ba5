/* Kernels of DIN (Zhou et al., "Deep Interest Network for Click-Through Rate Prediction",
 * KDD 2018; models/din_ops.py, whose torch functions give the same values and are the fallback).
 *
 * Dice over a [N, H] pre-activation s, forward and backward in two passes each:
 *   forward:  p = sigmoid((s - mean) rstd),  y = s (alpha + p (1 - alpha)),
 *             with batch statistics (mean, biased var over the N rows) from pass 1;
 *   backward: g_alpha = sum g s (1 - p),  g_z = g s (1 - alpha) p (1 - p),
 *             g_s = g (alpha + p (1 - alpha)) + rstd (g_z - mean(g_z) - z mean(g_z z))
 *             (batch statistics) or + rstd g_z (fixed statistics).
 * with the forward's p (kept: recomputing it in both backward passes cost more than
 * writing it and reading it back).  Optionally a head, a linear layer to one output,
 * follows: out_n = bias + <y_n, v>, and y is never stored; its backward takes g_out [N]
 * (g = g_out v) and also gives g_v = sum g_out y.  Torch's eager ops make ~5 passes over
 * [N, H] each way, and its column reductions are slow; this is two.
 * Pool: p_b = sum over the segment of w_n k_n (e [B + N, D]: the B queries, then the N keys,
 * key n in segment b: rows off[b] .. off[b+1]-1), backward de[B + n] = w_n gp_b, de[b] = 0,
 * gw_n = <gp_b, k_n>.
 * Rows are split over two threads (at a segment boundary where there are segments): torch's
 * OpenMP workers, not threads of our own (see rectables/_evict.c); where torch runs one
 * thread, the caller's.  Dice's sums are accumulated in double per thread; a call is
 * deterministic for a thread count. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "_din.h"

typedef struct {
    const float *g, *src, *gh;  /* g [N, H] (or, with a head, gh [N]); src = s [N, H] (pool: e) */
    const float *tm, *tr, *ta, *tv, *tmg; /* mean, rstd, alpha, head weights tiled to W; (mean g_z, mean g_z z) */
    float *y, *gs, *out, *tmp; /* y [N, H] or out [N] with a head; gs [N, H]; tmp: 2 W floats of this part's */
    float *p;                  /* [N, H]: written by the forward, read by the backward */
    const float *bias;         /* the head's [1] */
    const int64_t *off;
    double *acc; /* this part's sums: 2 W (forward), 4 W (backward) */
    int64_t H, W, lo, hi, b0, b1; /* W = k H, k rows a multiple of 16 values; rows [lo, hi), segments [b0, b1) */
    int64_t nq;                   /* pool: the query rows before the keys in src */
    const float *w;               /* pool: the weight of each key */
    float *gw;
} Job;

/* The element-wise passes run over k rows at a time (k H values, a multiple of the vector
 * width, with the per-column values tiled to match), so that no value takes a scalar path:
 * H = 40 in rows of 40 left 8 of every 40 to scalar code, 3x slower. */

/* pass 1 of the forward: sums of s and s^2 per tiled column */
DIN_CLONES static void fwd_stats(Job *j) {
    const int64_t W = j->W;
    double *restrict sum = j->acc, *restrict sq = j->acc + W;
    for (int64_t i0 = j->lo * j->H, end = j->hi * j->H; i0 < end; i0 += W) {
        const int64_t len = end - i0 < W ? end - i0 : W;
        const float *restrict s = j->src + i0;
        for (int64_t i = 0; i < len; i++) {
            sum[i] += s[i];
            sq[i] += (double)s[i] * s[i];
        }
    }
}

/* pass 2 of the forward: y, or the head's out */
DIN_CLONES static void fwd_apply(Job *j) {
    const int64_t W = j->W, H = j->H;
    const float *restrict m = j->tm, *restrict r = j->tr, *restrict al = j->ta, *restrict v = j->tv;
    float *restrict t = j->tmp;
    for (int64_t i0 = j->lo * H, end = j->hi * H; i0 < end; i0 += W) {
        const int64_t len = end - i0 < W ? end - i0 : W;
        const float *restrict s = j->src + i0;
        float *restrict pp = j->p + i0, *restrict y = v ? t : j->y + i0;
        for (int64_t i = 0; i < len; i++) {
            pp[i] = sigmoid_f((s[i] - m[i]) * r[i]);
            y[i] = dice_y(s[i], pp[i], al[i]);
        }
        for (int64_t q = 0; v && q < len / H; q++) { /* in 8 lanes: one chain of H adds was 2x slower */
            float acc[8] = {0}, *restrict yq = y + q * H;
            const float *restrict vq = v + q * H;
            int64_t h = 0;
            for (; h + 8 <= H; h += 8)
                for (int l = 0; l < 8; l++) acc[l] += yq[h + l] * vq[h + l];
            for (; h < H; h++) acc[0] += yq[h] * vq[h];
            j->out[i0 / H + q] = *j->bias + (((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7])));
        }
    }
}

/* The backward passes take g [N, H], or with a head g_out [N] (g = g_out v): then they run
 * row by row (a tiled g_out, stored as scalars and loaded as vectors, stalled store
 * forwarding: 2x slower; a gather, 3x). */

/* pass 1 of the backward: sums of g s (1 - p), g_z and g_z z (and with a head g_out y),
 * tiled (folded by the caller) */
static inline __attribute__((always_inline)) void sums_(const float *restrict s, const float *restrict pp,
                                                        const float *restrict g, float go, const float *restrict m,
                                                        const float *restrict r, const float *restrict al,
                                                        const float *restrict v, double *restrict ga,
                                                        double *restrict gz, double *restrict gzz,
                                                        double *restrict gv, int64_t len, const int head) {
    for (int64_t i = 0; i < len; i++) {
        const float z = (s[i] - m[i]) * r[i], p = pp[i], gi = head ? go * v[i] : g[i];
        const float gsp = gi * s[i] * (1.0f - p), g_z = gsp * (1.0f - al[i]) * p;
        ga[i] += gsp;
        gz[i] += g_z;
        gzz[i] += (double)g_z * z;
        if (head) gv[i] += go * dice_y(s[i], p, al[i]);
    }
}

DIN_CLONES static void bwd_sums(Job *j) {
    const int64_t W = j->W, H = j->H;
    double *ga = j->acc, *gz = j->acc + W, *gzz = j->acc + 2 * W, *gv = j->acc + 3 * W;
    if (j->gh) {
        for (int64_t n = j->lo; n < j->hi; n++)
            sums_(j->src + n * H, j->p + n * H, NULL, j->gh[n], j->tm, j->tr, j->ta, j->tv, ga, gz, gzz, gv, H, 1);
        return;
    }
    for (int64_t i0 = j->lo * H, end = j->hi * H; i0 < end; i0 += W)
        sums_(j->src + i0, j->p + i0, j->g + i0, 0.0f, j->tm, j->tr, j->ta, NULL, ga, gz, gzz, NULL,
              end - i0 < W ? end - i0 : W, 0);
}

/* pass 2 of the backward: g_s (dice_grad, in _din.h) */
DIN_CLONES static void bwd_apply(Job *j) {
    const int64_t W = j->W, H = j->H;
    if (j->gh) {
        for (int64_t n = j->lo; n < j->hi; n++)
            dice_grad(j->src + n * H, j->p + n * H, NULL, j->gh[n], j->tm, j->tr, j->ta, j->tv, j->tmg, j->tmg + W,
                      j->gs + n * H, H, 1);
        return;
    }
    for (int64_t i0 = j->lo * H, end = j->hi * H; i0 < end; i0 += W)
        dice_grad(j->src + i0, j->p + i0, j->g + i0, 0.0f, j->tm, j->tr, j->ta, NULL, j->tmg, j->tmg + W, j->gs + i0,
                  end - i0 < W ? end - i0 : W, 0);
}

/* pool forward (src = e, y = p [B, D]) */
DIN_CLONES static void pool_fwd(Job *j) {
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

/* pool backward (g = gp, gs = de or NULL, gw) */
DIN_CLONES static void pool_bwd(Job *j) {
    const int64_t D = j->H;
    for (int64_t b = j->b0; b < j->b1; b++) {
        const float *restrict gp = j->g + b * D;
        if (j->gs) memset(j->gs + b * D, 0, D * sizeof(float));
        for (int64_t n = j->off[b]; n < j->off[b + 1]; n++) {
            const float *restrict k = j->src + (j->nq + n) * D;
            float dot = 0.0f;
            for (int64_t d = 0; d < D; d++) dot += gp[d] * k[d];
            j->gw[n] = dot;
            if (j->gs) {
                float *restrict gk = j->gs + (j->nq + n) * D;
                for (int64_t d = 0; d < D; d++) gk[d] = j->w[n] * gp[d];
            }
        }
    }
}

/* Two parts: rows split at the segment boundary nearest N / 2 (or at N / 2); inputs under
 * 2^16 values, and all where torch runs one thread, as one part on the caller's thread */
static int split(Job *jobs, int64_t N, int64_t B, const int64_t *off) {
    int64_t mid = N / 2, bm = B;
    if (off) {
        bm = din_half(off, B, N);
        mid = off[bm];
    }
    int parts = N * jobs[0].H >= 65536 && omp_get_max_threads() > 1 && mid > 0 && mid < N ? 2 : 1;
    if (parts == 1) mid = N, bm = B;
    jobs[1] = jobs[0];
    jobs[0].lo = 0, jobs[0].hi = mid, jobs[0].b0 = 0, jobs[0].b1 = bm;
    jobs[1].lo = mid, jobs[1].hi = N, jobs[1].b0 = bm, jobs[1].b1 = B;
    if (jobs[0].acc) jobs[1].acc = jobs[0].acc + 4 * jobs[0].W; /* Dice's sums and block, one per part */
    if (jobs[0].tmp) jobs[1].tmp = jobs[0].tmp + 2 * jobs[0].W;
    return parts;
}

/* Scratch of one Dice call: the tiled per-column values (6 W floats), both parts' blocks
 * (4 W floats: the forward's head) and sums (8 W doubles) */
typedef struct {
    float *tiles;
    double *acc;
    int64_t W;
} Scratch;

static void free_scratch(Scratch *sc) {
    free(sc->tiles);
    free(sc->acc);
}

static int scratch(Scratch *sc, int64_t H) {
    int64_t k = 1;
    while ((k * H) % 16) k *= 2;
    sc->W = k * H;
    /* on cache lines of their own (W floats: whole lines): where the two parts' blocks shared
     * a line, the head's backward ran slower on two threads than on one */
    sc->tiles = aligned_alloc(64, 10 * (size_t)sc->W * sizeof(float));
    sc->acc = aligned_alloc(64, 8 * (size_t)sc->W * sizeof(double));
    if (sc->tiles && sc->acc) {
        memset(sc->acc, 0, 8 * (size_t)sc->W * sizeof(double));
        return 1;
    }
    free_scratch(sc);
    return 0;
}

static void tile_columns(float *out, const float *v, int64_t H, int64_t W) {
    for (int64_t i = 0; i < W; i += H) memcpy(out + i, v, (size_t)H * sizeof(float)); /* (W = k H) */
}

/* the tiles' sums of column d, both parts (block `which` of each part's sums) */
static double fold(const Scratch *sc, int64_t d, int64_t H, int which) {
    double t = 0;
    for (int64_t i = d; i < sc->W; i += H) t += sc->acc[which * sc->W + i] + sc->acc[(4 + which) * sc->W + i];
    return t;
}

/* forward(s, N, H, alpha, mean, rstd, var, out, p, v, bias, eps, stats): with stats, mean,
 * rstd and var (biased) [H] are written from the rows, else mean and rstd are read; p [N, H]
 * is written, and out: y [N, H], or with head weights v [H] and bias [1] (else 0 and 0),
 * bias + y v [N] */
static PyObject *forward(PyObject *self, PyObject *args) {
    unsigned long long ps, palpha, pmean, prstd, pvar, pout, pp, pv, pbias;
    long long N, H;
    float eps;
    int stats;
    if (!PyArg_ParseTuple(args, "KLLKKKKKKKKfp", &ps, &N, &H, &palpha, &pmean, &prstd, &pvar, &pout, &pp, &pv, &pbias,
                          &eps, &stats))
        return NULL;
    if (pv && !pbias) {
        PyErr_SetString(PyExc_ValueError, "a head needs its bias");
        return NULL;
    }
    Scratch sc;
    if (!scratch(&sc, H)) return PyErr_NoMemory();
    const int64_t W = sc.W;
    Job jobs[2] = {{.src = (const float *)ps, .tm = sc.tiles, .tr = sc.tiles + W, .ta = sc.tiles + 2 * W,
                    .tv = pv ? sc.tiles + 3 * W : NULL, .y = (float *)pout, .out = (float *)pout, .p = (float *)pp,
                    .tmp = sc.tiles + 6 * W, .bias = (const float *)pbias, .acc = sc.acc, .H = H, .W = W}};
    float *mean = (float *)pmean, *rstd = (float *)prstd, *var = (float *)pvar;
    Py_BEGIN_ALLOW_THREADS
    int parts = split(jobs, N, 0, NULL);
    if (stats) {
        DIN_RUN(fwd_stats, jobs, parts);
        for (int64_t d = 0; d < H; d++)
            column_stats(fold(&sc, d, H, 0), fold(&sc, d, H, 1), N, eps, mean + d, var + d, rstd + d);
    }
    tile_columns(sc.tiles, mean, H, W);
    tile_columns(sc.tiles + W, rstd, H, W);
    tile_columns(sc.tiles + 2 * W, (const float *)palpha, H, W);
    if (pv) tile_columns(sc.tiles + 3 * W, (const float *)pv, H, W);
    DIN_RUN(fwd_apply, jobs, parts);
    Py_END_ALLOW_THREADS
    free_scratch(&sc);
    Py_RETURN_NONE;
}

/* backward(g, s, p, N, H, alpha, mean, rstd, stats, gs, galpha, v, gv, mg): gs [N, H] and
 * galpha [H] written, p from the forward; g is g_y [N, H], or with head weights v [H]
 * (else 0) g_out [N], and then gv [H] is written too.  With gs 0, only the first pass:
 * galpha, and mg [2, H] (mean g_z, mean g_z z: what the second pass reads) */
static PyObject *backward(PyObject *self, PyObject *args) {
    unsigned long long pg, ps, pp, palpha, pmean, prstd, pgs, pga, pv, pgv, pmg;
    long long N, H;
    int stats;
    if (!PyArg_ParseTuple(args, "KKKLLKKKpKKKKK", &pg, &ps, &pp, &N, &H, &palpha, &pmean, &prstd, &stats, &pgs, &pga,
                          &pv, &pgv, &pmg))
        return NULL;
    if (!pgs && !pmg) {
        PyErr_SetString(PyExc_ValueError, "dice_backward writes gs or mg");
        return NULL;
    }
    Scratch sc;
    if (!scratch(&sc, H)) return PyErr_NoMemory();
    const int64_t W = sc.W;
    float *tmg = sc.tiles + 4 * W;
    Job jobs[2] = {{.g = pv ? NULL : (const float *)pg, .gh = pv ? (const float *)pg : NULL, .src = (const float *)ps,
                    .p = (float *)pp,
                    .tm = sc.tiles, .tr = sc.tiles + W, .ta = sc.tiles + 2 * W, .tv = pv ? sc.tiles + 3 * W : NULL,
                    .tmg = tmg, .gs = (float *)pgs, .acc = sc.acc, .H = H, .W = W}};
    float *galpha = (float *)pga, *gv = (float *)pgv;
    Py_BEGIN_ALLOW_THREADS
    tile_columns(sc.tiles, (const float *)pmean, H, W);
    tile_columns(sc.tiles + W, (const float *)prstd, H, W);
    tile_columns(sc.tiles + 2 * W, (const float *)palpha, H, W);
    if (pv) tile_columns(sc.tiles + 3 * W, (const float *)pv, H, W);
    int parts = split(jobs, N, 0, NULL);
    DIN_RUN(bwd_sums, jobs, parts);
    for (int64_t d = 0; d < H; d++) {
        galpha[d] = (float)fold(&sc, d, H, 0);
        if (pv) gv[d] = (float)fold(&sc, d, H, 3);
        const float mz = stats ? (float)(fold(&sc, d, H, 1) / N) : 0.0f, mzz = stats ? (float)(fold(&sc, d, H, 2) / N) : 0.0f;
        for (int64_t i = d; i < W; i += H) tmg[i] = mz, tmg[W + i] = mzz;
        if (pmg) ((float *)pmg)[d] = mz, ((float *)pmg)[H + d] = mzz;
    }
    if (pgs) DIN_RUN(bwd_apply, jobs, parts);
    Py_END_ALLOW_THREADS
    free_scratch(&sc);
    Py_RETURN_NONE;
}

/* The pooling kernels, one argument list: (in, in2, e, B, N, D, off, out, out2), 0 for what a
 * kernel does not read; e [B + N, D], off [B + 1].
 *   pool_forward:   in2 = w [N], out = p [B, D]
 *   pool_backward:  in = gp [B, D], in2 = w, out = de (or 0: gw only), out2 = gw [N] */
static PyObject *segments(PyObject *args, void (*fn)(Job *)) {
    unsigned long long pin, pin2, pe, poff, pout, pout2;
    long long B, N, D;
    if (!PyArg_ParseTuple(args, "KKKLLLKKK", &pin, &pin2, &pe, &B, &N, &D, &poff, &pout, &pout2)) return NULL;
    Job jobs[2] = {{.g = (const float *)pin, .w = (const float *)pin2,
                    .src = (const float *)pe, .off = (const int64_t *)poff, .y = (float *)pout, .gs = (float *)pout,
                    .gw = (float *)pout2, .H = D, .nq = B}};
    Py_BEGIN_ALLOW_THREADS
    DIN_RUN(fn, jobs, split(jobs, N, B, jobs[0].off));
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *pool_forward(PyObject *self, PyObject *args) { return segments(args, pool_fwd); }
static PyObject *pool_backward(PyObject *self, PyObject *args) { return segments(args, pool_bwd); }

static PyMethodDef methods[] = {
    {"dice_forward", forward, METH_VARARGS, "Dice (and a head to one output) forward over [N, H] rows."},
    {"dice_backward", backward, METH_VARARGS, "The gradient of dice_forward."},
    {"pool_forward", pool_forward, METH_VARARGS, "DIN's weighted sum of each history's keys."},
    {"pool_backward", pool_backward, METH_VARARGS, "The gradient of pool_forward."},
    {"query_forward", din_query_forward, METH_VARARGS, "DIN's first attention layer on the query-key pairs."},
    {"query_backward", din_query_backward, METH_VARARGS, "The gradient of query_forward."},
    {"hidden_forward", din_hidden_forward, METH_VARARGS, "Dice, then a linear layer, over [N, Hi] rows."},
    {"hidden_backward", din_hidden_backward, METH_VARARGS, "The gradient of hidden_forward."},
    {"query_prep", din_query_prep, METH_VARARGS, "The first attention layer's weight blocks and query part."},
    {"query_finish", din_query_finish, METH_VARARGS, "The first attention layer's weight and query gradients."},
    {"pad_matrix", din_pad_matrix, METH_VARARGS, "A matrix (or its transpose) in zero-padded rows."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_din", NULL, -1, methods};

PyMODINIT_FUNC PyInit__din(void) { return PyModule_Create(&module); }
