/* DIN's first attention layer without the pairs (models/din_ops.py, _QueryLayerFn).
 *
 * The layer scores [q, k, q - k, q k] (q_b the sample's query, k_n a history key, both [D])
 * with weights W = [W1 W2 W3 W4] [H, 4 D] and a bias.  Regrouped:
 *   s_n = c_b + M_b k_n,  c_b = bias + (W1 + W3) q_b  (per sample, by the caller),
 *   M_b = A + C diag(q_b),  A = W2 - W3,  C = W4  [H, D],
 * so each key costs D H multiply-adds instead of the 2 D H of a GEMM on [k, q k], and the
 * [N, 2 D] pairs are never built.  Backward, per sample:
 *   g_k_n = M_b^T g_s_n,  g_M_b = sum_n g_s_n k_n^T,  g_c_b = sum_n g_s_n,
 *   g_A += g_M_b,  g_C += g_M_b diag(q_b),  g_q_b = column sums of C o g_M_b.
 * Keys n of sample b: rows off[b] .. off[b+1]-1 of the keys; e [B + N, D] holds the B
 * queries, then the N keys.  Samples are split over two threads as in _din.c; the weight
 * gradients are summed per thread, then added (deterministic for a thread count).
 * Where Dice follows in training (models/din_ops.py _AttentionFn), the forward also sums its batch
 * statistics while each sample's rows of s are in cache, and the backward takes Dice's local
 * part of g_s (from the next layer's backward) and finishes each sample's g_s rows into
 * scratch before the products: neither pass reads or writes [N, H] on its own, and the
 * backward reads neither Dice's p nor the gradient of its output. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "_din.h"

typedef struct {
    const float *e, *A, *C, *c, *gs; /* A, C: [D, Hp] transposed and padded (forward), [H, Dp] padded (backward) */
    const int64_t *off;
    float *s, *ge, *gc, *gA, *gC; /* gA, gC: this part's [H, Dp] sums */
    double *sums;                 /* forward, or NULL: this part's column sums of s and s^2 [2, Hp] */
    const float *ds, *dm, *dr, *dmg; /* backward through Dice, or NULL: its s, mean, rstd, mg */
    const float *pw, *pgp;           /* backward, or NULL: the keys' pooling weights [N] and g_pooled [B, D] */
    float *scratch;               /* this part's (see forward_part, backward_part) */
    int64_t B, D, H, b0, b1, maxlen;
} Job;

/* s rows of samples [b0, b1): M_b [D, Hp] = A^T + q_b[d] C^T row by row, then s = c_b + k M_b */
DIN_CLONES static void forward_part(Job *j) {
    const int64_t D = j->D, H = j->H, Hp = up16(H);
    float *M = j->scratch, *c = M + D * Hp; /* D Hp + Hp floats */
    memset(c, 0, (size_t)Hp * sizeof(float));
    for (int64_t b = j->b0; b < j->b1; b++) {
        const int64_t lo = j->off[b], hi = j->off[b + 1];
        if (lo == hi) continue;
        const float *q = j->e + b * D;
        for (int64_t d = 0; d < D; d++)
            for (int64_t h = 0; h < Hp; h++) M[d * Hp + h] = j->A[d * Hp + h] + q[d] * j->C[d * Hp + h];
        memcpy(c, j->c + b * H, (size_t)H * sizeof(float));
        product(j->e + (j->B + lo) * D, D, 1, hi - lo, D, M, Hp, c, 0, j->s + lo * H, H, H);
        if (j->sums) { /* Dice's batch statistics, while the rows are in cache */
            double *restrict sum = j->sums, *restrict sq = j->sums + Hp;
            const float *restrict sr = j->s + lo * H;
            for (int64_t n = 0; n < hi - lo; n++)
                for (int64_t h = 0; h < H; h++) {
                    const double x = sr[n * H + h];
                    sum[h] += x;
                    sq[h] += x * x;
                }
        }
    }
}

/* the gradients of samples [b0, b1): g_k rows into ge, g_q into ge's query rows, g_c, and
 * this part's g_A, g_C; through Dice, each sample's g_s rows first (from g_y = gs) */
DIN_CLONES static void backward_part(Job *j) {
    const int64_t D = j->D, H = j->H, Dp = up16(D);
    /* 2 H Dp + 2 Dp (+ maxlen Dp where D < Dp, + maxlen H through Dice) floats */
    float *Mt = j->scratch, *gM = Mt + H * Dp, *qp = gM + H * Dp, *gq = qp + Dp, *kp = gq + Dp;
    float *gsb = kp + (D < Dp ? j->maxlen * Dp : 0);
    memset(qp, 0, (size_t)Dp * sizeof(float));
    if (D < Dp) memset(kp, 0, (size_t)(j->maxlen * Dp) * sizeof(float));
    for (int64_t b = j->b0; b < j->b1; b++) {
        const int64_t lo = j->off[b], hi = j->off[b + 1], L = hi - lo;
        float *gc = j->gc + b * H;
        memset(gc, 0, (size_t)H * sizeof(float));
        memset(gq, 0, (size_t)Dp * sizeof(float));
        if (L) {
            const float *gs = j->gs + lo * H, *k = j->e + (j->B + lo) * D;
            if (j->ds) { /* g_s of the sample's rows, in cache for the products below */
                for (int64_t n = 0; n < L; n++)
                    dice_finish(j->ds + (lo + n) * H, gs + n * H, j->dm, j->dr, j->dmg, j->dmg + H, gsb + n * H, H);
                gs = gsb;
            }
            memcpy(qp, j->e + b * D, (size_t)D * sizeof(float));
            for (int64_t i = 0; i < H * Dp; i += Dp) /* M_b^T, [H, Dp] (no i % Dp: an idiv a vector) */
                for (int64_t d = 0; d < Dp; d += 16)
                    *(v16u *)(Mt + i + d) =
                        *(const v16u *)(j->A + i + d) + *(const v16u *)(qp + d) * *(const v16u *)(j->C + i + d);
            product(gs, H, 1, L, H, Mt, Dp, NULL, 0, j->ge + (j->B + lo) * D, D, D); /* g_k = g_s M_b */
            for (int64_t n = 0; j->pw && n < L; n++) { /* + the pooling's w_n g_p_b, the rows in cache */
                float *restrict gk = j->ge + (j->B + lo + n) * D;
                const float *restrict gp = j->pgp + b * D;
                for (int64_t d = 0; d < D; d++) gk[d] += j->pw[lo + n] * gp[d];
            }
            if (D == Dp) {
                product(gs, 1, H, H, L, k, D, NULL, 0, gM, Dp, Dp); /* g_M = g_s^T k */
            } else { /* k's rows padded, so that the tile reads whole vectors */
                for (int64_t n = 0; n < L; n++) memcpy(kp + n * Dp, k + n * D, (size_t)D * sizeof(float));
                product(gs, 1, H, H, L, kp, Dp, NULL, 0, gM, Dp, Dp);
            }
            for (int64_t i = 0; i < H * Dp; i += Dp) /* (vectors: in scalars GCC feared aliasing, 4x slower) */
                for (int64_t d = 0; d < Dp; d += 16) {
                    const v16 g = *(const v16u *)(gM + i + d), q = *(const v16u *)(qp + d);
                    *(v16u *)(j->gA + i + d) += g;
                    *(v16u *)(j->gC + i + d) += g * q;
                    *(v16u *)(gq + d) += g * *(const v16u *)(j->C + i + d);
                }
            float *restrict gcr = gc;
            for (int64_t n = 0; n < L; n++)
                for (int64_t h = 0; h < H; h++) gcr[h] += gs[n * H + h];
        }
        memcpy(j->ge + b * D, gq, (size_t)D * sizeof(float));
    }
}


/* the two parts (or one): samples [0, bm) and [bm, B) */
static int halves(Job *jobs, int64_t N) {
    const int64_t bm = din_half(jobs[0].off, jobs[0].B, N);
    const int parts = N * jobs[0].H >= 65536 && omp_get_max_threads() > 1 && bm > 0 && bm < jobs[0].B ? 2 : 1;
    jobs[1] = jobs[0];
    jobs[0].b0 = 0, jobs[0].b1 = parts == 2 ? bm : jobs[0].B;
    jobs[1].b0 = bm, jobs[1].b1 = jobs[0].B;
    return parts;
}

/* fn on the parts, each with `each` floats of scratch; 0, or -1 with a MemoryError set */
static int run(Job *jobs, int parts, int64_t each, void (*fn)(Job *)) {
    float *sc = malloc((size_t)(2 * each) * sizeof(float));
    if (!sc) {
        PyErr_NoMemory();
        return -1;
    }
    jobs[0].scratch = sc, jobs[1].scratch = sc + each;
    Py_BEGIN_ALLOW_THREADS
    DIN_RUN(fn, jobs, parts);
    Py_END_ALLOW_THREADS
    free(sc);
    return 0;
}

/* query_forward(e, B, N, D, off, At, Ct, c, H, s, stats, eps): s [N, H] written; At, Ct
 * [D, Hp] (A and C transposed, rows padded with 0 to Hp = H rounded up to 16), c [B, H];
 * stats (or 0): float [3, H], written with the batch statistics of s (batch_stats, _din.h) */
PyObject *din_query_forward(PyObject *self, PyObject *args) {
    unsigned long long pe, poff, pA, pC, pc, ps, pstats;
    long long B, N, D, H;
    float eps;
    if (!PyArg_ParseTuple(args, "KLLLKKKKLKKf", &pe, &B, &N, &D, &poff, &pA, &pC, &pc, &H, &ps, &pstats, &eps))
        return NULL;
    const int64_t Hp = up16(H);
    double *sums = pstats ? calloc((size_t)(4 * Hp), sizeof(double)) : NULL; /* [2 parts, 2, Hp] */
    if (pstats && !sums) return PyErr_NoMemory();
    Job jobs[2] = {{.e = (const float *)pe, .off = (const int64_t *)poff, .A = (const float *)pA,
                    .C = (const float *)pC, .c = (const float *)pc, .s = (float *)ps, .sums = sums,
                    .B = B, .D = D, .H = H}};
    const int parts = halves(jobs, N);
    if (sums) jobs[1].sums += 2 * Hp;
    const int rc = run(jobs, parts, D * Hp + Hp, forward_part);
    if (!rc && sums) batch_stats(sums, 2 * Hp, Hp, H, N, eps, (float *)pstats);
    free(sums);
    if (rc) return NULL;
    Py_RETURN_NONE;
}

/* query_backward(gs, e, B, N, D, off, A, C, H, ge, gc, gA, gC, ds, dm, dr, dmg, pw, pgp):
 * ge [B + N, D], gc [B, H], gA and gC [H, D] written; A, C [H, Dp].  With ds (else 0) the
 * layer is followed by Dice with batch statistics: gs is then that Dice's local part of g_s
 * (dice_finish, models/_din.h: the hidden layer's backward makes it), and Dice's s [N, H],
 * mean and rstd [H] and mg [2, H] finish it.  With pw (else 0) the keys are also pooled,
 * p_b = sum of w_n k_n (pw = w [N]): g_k then includes w_n g_p_b (pgp = g_p [B, D]) */
PyObject *din_query_backward(PyObject *self, PyObject *args) {
    unsigned long long pgs, pe, poff, pA, pC, pge, pgc, pgA, pgC, pds, pdm, pdr, pdmg, ppw, ppgp;
    long long B, N, D, H;
    if (!PyArg_ParseTuple(args, "KKLLLKKKLKKKKKKKKKK", &pgs, &pe, &B, &N, &D, &poff, &pA, &pC, &H, &pge, &pgc, &pgA,
                          &pgC, &pds, &pdm, &pdr, &pdmg, &ppw, &ppgp))
        return NULL;
    const int64_t Dp = up16(D);
    const int64_t *off = (const int64_t *)poff;
    Job jobs[2] = {{.gs = (const float *)pgs, .e = (const float *)pe, .off = off, .A = (const float *)pA,
                    .C = (const float *)pC, .ge = (float *)pge, .gc = (float *)pgc, .gA = (float *)pgA,
                    .gC = (float *)pgC, .ds = (const float *)pds, .dm = (const float *)pdm,
                    .dr = (const float *)pdr, .dmg = (const float *)pdmg, .pw = (const float *)ppw,
                    .pgp = (const float *)ppgp, .B = B, .D = D, .H = H}};
    for (int64_t b = 0; b < B && (D < Dp || pds); b++)
        if (off[b + 1] - off[b] > jobs[0].maxlen) jobs[0].maxlen = off[b + 1] - off[b];
    const int parts = halves(jobs, N);
    float *blocks = calloc((size_t)(4 * H * Dp), sizeof(float)); /* g_A, g_C of each part: added below */
    if (!blocks) return PyErr_NoMemory();
    jobs[0].gA = blocks, jobs[0].gC = blocks + H * Dp;
    jobs[1].gA = blocks + 2 * H * Dp, jobs[1].gC = blocks + 3 * H * Dp;
    if (run(jobs, parts, 2 * H * Dp + 2 * Dp + jobs[0].maxlen * (Dp + H), backward_part)) {
        free(blocks);
        return NULL;
    }
    float *gA = (float *)pgA, *gC = (float *)pgC;
    for (int64_t h = 0; h < H; h++)
        for (int64_t d = 0; d < D; d++) {
            const int64_t i = h * Dp + d;
            gA[h * D + d] = blocks[i] + blocks[2 * H * Dp + i];
            gC[h * D + d] = blocks[H * Dp + i] + blocks[3 * H * Dp + i];
        }
    free(blocks);
    Py_RETURN_NONE;
}
