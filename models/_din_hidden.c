/* A hidden layer of DIN's attention MLP after the first (models/din_ops.py, _AttentionFn):
 * Dice on the previous layer's s_in [N, Hi] (batch statistics given), then a linear layer to
 * s_out [N, Ho], row block by row block, so that Dice's output y never leaves the cache:
 *   forward:  p = sigmoid((s_in - mean) rstd) (written: the backward reads it),
 *             y = s_in (alpha + p (1 - alpha)),  s_out = y W^T + bias,
 *             and the column sums of s_out and s_out^2 (the next Dice's statistics);
 *   backward: from g_out [N, Ho]: g_y = g_out W (written), g_W += g_out^T y (y again from
 *             s_in and p), the bias's (sums of g_out) and Dice's first backward pass, the
 *             sums of g_y s_in (1 - p), g_z = g_y s_in (1 - alpha) p (1 - p) and g_z z
 *             (z = (s_in - mean) rstd).  Where the layer is the last before a Dice fused
 *             with a Linear(Ho, 1) head, g_out is made a block at a time from the head's
 *             gradient [N] (that Dice's second backward pass: no [N, Ho] g_out).
 * In place of Dice's two passes over [N, Hi] and torch's three GEMMs, one pass each way.
 * Rows are split in halves over two threads as in _din.c; sums per thread, in double (g_W in
 * float), added once both are done: deterministic for a thread count. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "_din.h"

enum { RB = 64 }; /* rows a block: y [RB, Hip] in scratch stays in L1 */

typedef struct {
    const float *s, *m, *r, *al; /* s_in [N, Hi]; Dice's mean, rstd, alpha [Hi] */
    const float *W, *bias;       /* forward: W^T [Hi, Hop], bias [Hop]; backward: W [Ho, Hip] */
    const float *g;              /* backward: g_out [N, Ho] */
    float *p;                    /* [N, Hi]: written forward, read backward */
    float *out;                  /* forward: s_out [N, Ho]; backward: g_y [N, Hi] */
    double *sums;                /* forward: [2, Hop] of s_out; backward: [3 Hip + Hop] (g_alpha, g_z,
                                    g_z z; g_out's column sums) */
    float *gW;                   /* backward: this part's [Ho, Hip] block (run's, zeroed) */
    float *y, *gb;               /* scratch [RB, Hip], columns from Hi zero; [RB, Ho] (g_out's rows) */
    const float *hs, *hp, *hm, *hr, *hal, *hv, *hmg; /* backward, or NULL: the next Dice's s, p [N, Ho], mean,
                                                        rstd, alpha, the head's v [Ho], mg [2, Ho] */
    int local;                   /* backward: g_y's rows hold Dice's local part of g_s instead */
    int64_t Hi, Ho, lo, hi;
} Job;

DIN_CLONES static void forward_part(Job *j) {
    const int64_t Hi = j->Hi, Ho = j->Ho, Hip = up16(Hi), Hop = up16(Ho);
    double *restrict sum = j->sums, *restrict sq = j->sums + Hop;
    const float *restrict m = j->m, *restrict r = j->r, *restrict al = j->al;
    for (int64_t r0 = j->lo; r0 < j->hi; r0 += RB) {
        const int64_t R = j->hi - r0 < RB ? j->hi - r0 : RB;
        for (int64_t n = 0; n < R; n++) {
            const float *restrict s = j->s + (r0 + n) * Hi;
            float *restrict p = j->p + (r0 + n) * Hi, *restrict y = j->y + n * Hip;
            for (int64_t h = 0; h < Hi; h++) {
                p[h] = sigmoid_f((s[h] - m[h]) * r[h]);
                y[h] = dice_y(s[h], p[h], al[h]);
            }
        }
        float *o = j->out + r0 * Ho;
        product(j->y, Hip, 1, R, Hi, j->W, Hop, j->bias, 0, o, Ho, Ho);
        for (int64_t n = 0; n < R; n++) {
            const float *restrict on = o + n * Ho;
            for (int64_t h = 0; h < Ho; h++) {
                const double x = on[h];
                sum[h] += x;
                sq[h] += x * x;
            }
        }
    }
}

/* Dice's sums of g_y s (1 - p), g_z and g_z z over one row (len values); with local, g_y
 * replaced by Dice's local part of g_s (loc: see dice_finish, models/_din.h) */
ALWAYS void dice_sums(const float *restrict s, const float *restrict p, float *restrict gy, const float *restrict m,
                      const float *restrict r, const float *restrict al, double *restrict ga, double *restrict gz,
                      double *restrict gzz, int64_t len, const int local) {
    for (int64_t h = 0; h < len; h++) {
        const float gsp = gy[h] * s[h] * (1.0f - p[h]), g_z = gsp * (1.0f - al[h]) * p[h];
        ga[h] += gsp;
        gz[h] += g_z;
        gzz[h] += (double)g_z * ((s[h] - m[h]) * r[h]);
        if (local) gy[h] = gy[h] * (al[h] + p[h] * (1.0f - al[h])) + r[h] * g_z;
    }
}

DIN_CLONES static void backward_part(Job *j) {
    const int64_t Hi = j->Hi, Ho = j->Ho, Hip = up16(Hi);
    double *restrict ga = j->sums, *restrict gz = j->sums + Hip, *restrict gzz = j->sums + 2 * Hip;
    double *restrict gbias = j->sums + 3 * Hip;
    const float *restrict m = j->m, *restrict r = j->r, *restrict al = j->al;
    for (int64_t r0 = j->lo; r0 < j->hi; r0 += RB) {
        const int64_t R = j->hi - r0 < RB ? j->hi - r0 : RB;
        for (int64_t n = 0; n < R; n++) {
            const float *restrict s = j->s + (r0 + n) * Hi, *restrict p = j->p + (r0 + n) * Hi;
            float *restrict y = j->y + n * Hip;
            for (int64_t h = 0; h < Hi; h++) y[h] = dice_y(s[h], p[h], al[h]);
        }
        const float *g = j->hs ? j->gb : j->g + r0 * Ho;
        for (int64_t n = 0; j->hs && n < R; n++) /* g_out's rows from the head's gradient (j->g [N]) */
            dice_grad(j->hs + (r0 + n) * Ho, j->hp + (r0 + n) * Ho, NULL, j->g[r0 + n], j->hm, j->hr, j->hal, j->hv,
                      j->hmg, j->hmg + Ho, j->gb + n * Ho, Ho, 1);
        for (int64_t n = 0; n < R; n++)
            for (int64_t h = 0; h < Ho; h++) gbias[h] += g[n * Ho + h];
        product(g, Ho, 1, R, Ho, j->W, Hip, NULL, 0, j->out + r0 * Hi, Hi, Hi); /* g_y = g_out W */
        product(g, 1, Ho, Ho, R, j->y, Hip, j->gW, Hip, j->gW, Hip, Hip);     /* g_W += g_out^T y */
        for (int64_t n = 0; n < R; n++) {
            const float *s = j->s + (r0 + n) * Hi, *p = j->p + (r0 + n) * Hi;
            if (j->local) /* (two calls: a flag tested in the loop kept it from vectorising) */
                dice_sums(s, p, j->out + (r0 + n) * Hi, m, r, al, ga, gz, gzz, Hi, 1);
            else
                dice_sums(s, p, j->out + (r0 + n) * Hi, m, r, al, ga, gz, gzz, Hi, 0);
        }
    }
}


/* fn over rows [0, N / 2) and [N / 2, N) (or all in one part), each part with its scratch and
 * its blocks, zeroed, of sums (`each` doubles, at jobs[0].sums) and of g_W (`gw` floats, at
 * jobs[0].gW; 0: none), which the caller folds and frees; 0, or -1 with a MemoryError set. */
static int run(Job *jobs, int64_t N, int64_t each, int64_t gw, void (*fn)(Job *)) {
    const int parts = N * jobs[0].Hi >= 65536 && omp_get_max_threads() > 1 ? 2 : 1;
    const int64_t Hip = up16(jobs[0].Hi), part = RB * (Hip + up16(jobs[0].Ho)); /* whole cache lines */
    float *y = aligned_alloc(64, (size_t)(2 * part) * sizeof(float));
    jobs[0].sums = calloc((size_t)(2 * each), sizeof(double));
    jobs[0].gW = gw ? calloc((size_t)(2 * gw), sizeof(float)) : NULL;
    if (!y || !jobs[0].sums || (gw && !jobs[0].gW)) {
        free(y), free(jobs[0].sums), free(jobs[0].gW);
        PyErr_NoMemory();
        return -1;
    }
    memset(y, 0, (size_t)(2 * part) * sizeof(float));
    jobs[1] = jobs[0];
    jobs[0].lo = 0, jobs[0].hi = parts == 2 ? N / 2 : N;
    jobs[1].lo = jobs[0].hi, jobs[1].hi = N;
    jobs[0].y = y, jobs[1].y = y + part;
    jobs[0].gb = y + RB * Hip, jobs[1].gb = jobs[1].y + RB * Hip;
    jobs[1].sums += each;
    if (gw) jobs[1].gW += gw;
    Py_BEGIN_ALLOW_THREADS
    DIN_RUN(fn, jobs, parts);
    Py_END_ALLOW_THREADS
    free(y);
    return 0;
}

/* hidden_forward(s, N, Hi, mean, rstd, alpha, Wt, bias, Ho, p, out, stats, eps): p [N, Hi]
 * and s_out [N, Ho] written; mean, rstd, alpha [Hi], Wt [Hi, Hop] and bias [Hop] (padded with
 * 0); stats float [3, Ho] written with the batch statistics of s_out (batch_stats, _din.h) */
PyObject *din_hidden_forward(PyObject *self, PyObject *args) {
    unsigned long long ps, pm, pr, pal, pW, pb, pp, pout, pstats;
    long long N, Hi, Ho;
    float eps;
    if (!PyArg_ParseTuple(args, "KLLKKKKKLKKKf", &ps, &N, &Hi, &pm, &pr, &pal, &pW, &pb, &Ho, &pp, &pout, &pstats,
                          &eps))
        return NULL;
    Job jobs[2] = {{.s = (const float *)ps, .m = (const float *)pm, .r = (const float *)pr, .al = (const float *)pal,
                    .W = (const float *)pW, .bias = (const float *)pb, .p = (float *)pp, .out = (float *)pout,
                    .Hi = Hi, .Ho = Ho}};
    const int64_t Hop = up16(Ho);
    if (run(jobs, N, 2 * Hop, 0, forward_part)) return NULL;
    batch_stats(jobs[0].sums, 2 * Hop, Hop, Ho, N, eps, (float *)pstats);
    free(jobs[0].sums);
    Py_RETURN_NONE;
}

/* hidden_backward(g, s, p, N, Hi, mean, rstd, alpha, W, Ho, gy, gW, galpha, mg, gbias, hs, hp,
 * hm, hr, hal, hv, hmg, local): gy [N, Hi] written (with local, Dice's local part of g_s
 * instead: see dice_finish in models/_din.h), and gW [Ho, Hi], Dice's g_alpha [Hi], its mg
 * [2, Hi] (mean g_z, mean g_z z: what its g_s needs) and the bias's gradient [Ho]; W [Ho, Hip]
 * (padded with 0).  g is g_out [N, Ho]; or, with hs (else 0: all seven), the gradient [N]
 * of a head Linear(Ho, 1) (weights hv [Ho]) after a Dice with batch statistics on s_out =
 * hs: hp its p [N, Ho], hm, hr, hal its mean, rstd, alpha [Ho], hmg [2, Ho] (dice_backward's mg) */
PyObject *din_hidden_backward(PyObject *self, PyObject *args) {
    unsigned long long pg, ps, pp, pm, pr, pal, pW, pgy, pgW, pga, pmg, pgb, hs, hp, hm, hr, hal, hv, hmg;
    long long N, Hi, Ho;
    int local;
    if (!PyArg_ParseTuple(args, "KKKLLKKKKLKKKKKKKKKKKKp", &pg, &ps, &pp, &N, &Hi, &pm, &pr, &pal, &pW, &Ho, &pgy,
                          &pgW, &pga, &pmg, &pgb, &hs, &hp, &hm, &hr, &hal, &hv, &hmg, &local))
        return NULL;
    Job jobs[2] = {{.g = (const float *)pg, .s = (const float *)ps, .p = (float *)pp, .m = (const float *)pm,
                    .r = (const float *)pr, .al = (const float *)pal, .W = (const float *)pW, .out = (float *)pgy,
                    .Hi = Hi, .Ho = Ho, .hs = (const float *)hs,
                    .hp = (const float *)hp, .hm = (const float *)hm, .hr = (const float *)hr,
                    .hal = (const float *)hal, .hv = (const float *)hv, .hmg = (const float *)hmg, .local = local}};
    const int64_t Hip = up16(Hi), each = 3 * Hip + up16(Ho);
    if (run(jobs, N, each, Ho * Hip, backward_part)) return NULL;
    const double *a = jobs[0].sums, *b = jobs[0].sums + each; /* the parts' sums, in double */
    float *gW = (float *)pgW, *ga = (float *)pga, *mg = (float *)pmg, *gb = (float *)pgb;
    for (int64_t h = 0; h < Hi; h++) {
        ga[h] = (float)(a[h] + b[h]);
        mg[h] = (float)((a[Hip + h] + b[Hip + h]) / N);
        mg[Hi + h] = (float)((a[2 * Hip + h] + b[2 * Hip + h]) / N);
    }
    for (int64_t h = 0; h < Ho; h++) gb[h] = (float)(a[3 * Hip + h] + b[3 * Hip + h]);
    for (int64_t o = 0; o < Ho; o++) /* g_W: both parts' blocks (in float, as before) */
        for (int64_t h = 0; h < Hi; h++) gW[o * Hi + h] = jobs[0].gW[o * Hip + h] + jobs[0].gW[(Ho + o) * Hip + h];
    free(jobs[0].sums);
    free(jobs[0].gW);
    Py_RETURN_NONE;
}
