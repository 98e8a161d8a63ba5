/* The small work around DIN's attention op (models/din_ops.py, _AttentionFn), in C so that
 * the op makes a handful of torch calls a step instead of ~70 (each a few microseconds, more
 * after the kernels' streams have left the caches cold):
 *   query_prep:   the first layer's weight blocks and the queries' part c of its output;
 *   query_finish: the queries' and the first layer's gradients from the kernel's g_c, g_A, g_C;
 *   pad_matrix:   a matrix copied (or transposed) into zero-padded rows, as the kernels read.
 * The first layer scores [q, k, q - k, q k] with W = [W1 W2 W3 W4] [H, 4 D]; regrouped (see
 * models/_din_query.c) A = W2 - W3, C = W4, Wq = W1 + W3, c = bias + q Wq^T. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "_din.h"

/* dst [R, ld] (R = cols with transpose, else rows) = src [rows, cols] or its transpose, each
 * row zero beyond its values */
static void pad_into(const float *src, int64_t rows, int64_t cols, int transpose, float *dst, int64_t ld) {
    const int64_t R = transpose ? cols : rows, C = transpose ? rows : cols;
    for (int64_t r = 0; r < R; r++) {
        float *d = dst + r * ld;
        for (int64_t c = 0; c < C; c++) d[c] = transpose ? src[c * cols + r] : src[r * cols + c];
        memset(d + C, 0, (size_t)(ld - C) * sizeof(float));
    }
}

/* pad_matrix(src, rows, cols, transpose, dst, ld) */
PyObject *din_pad_matrix(PyObject *self, PyObject *args) {
    unsigned long long ps, pd;
    long long rows, cols, ld;
    int transpose;
    if (!PyArg_ParseTuple(args, "KLLpKL", &ps, &rows, &cols, &transpose, &pd, &ld)) return NULL;
    pad_into((const float *)ps, rows, cols, transpose, (float *)pd, ld);
    Py_RETURN_NONE;
}

/* query_prep(W, bias, e, B, D, H, At, Ct, Ap, Cp, Wq, c): At, Ct [D, Hp] (A, C transposed, for
 * the forward), Ap, Cp, Wq [H, Dp] (for the backward), all zero-padded, and c [B, H] */
PyObject *din_query_prep(PyObject *self, PyObject *args) {
    unsigned long long pW, pb, pe, pAt, pCt, pAp, pCp, pWq, pc;
    long long B, D, H;
    if (!PyArg_ParseTuple(args, "KKKLLLKKKKKK", &pW, &pb, &pe, &B, &D, &H, &pAt, &pCt, &pAp, &pCp, &pWq, &pc))
        return NULL;
    const float *W = (const float *)pW, *q = (const float *)pe;
    const int64_t Hp = up16(H), Dp = up16(D);
    float *Ap = (float *)pAp, *Cp = (float *)pCp, *Wq = (float *)pWq, *At = (float *)pAt, *Ct = (float *)pCt;
    float *WqT = malloc((size_t)(D * Hp + Hp) * sizeof(float)), *bias = WqT ? WqT + D * Hp : NULL;
    if (!WqT) return PyErr_NoMemory();
    for (int64_t h = 0; h < H; h++) {
        const float *w = W + h * 4 * D;
        for (int64_t d = 0; d < Dp; d++) {
            Ap[h * Dp + d] = d < D ? w[D + d] - w[2 * D + d] : 0.0f;
            Cp[h * Dp + d] = d < D ? w[3 * D + d] : 0.0f;
            Wq[h * Dp + d] = d < D ? w[d] + w[2 * D + d] : 0.0f;
        }
    }
    for (int64_t d = 0; d < D; d++)
        for (int64_t h = 0; h < Hp; h++) {
            At[d * Hp + h] = h < H ? Ap[h * Dp + d] : 0.0f;
            Ct[d * Hp + h] = h < H ? Cp[h * Dp + d] : 0.0f;
            WqT[d * Hp + h] = h < H ? Wq[h * Dp + d] : 0.0f;
        }
    memcpy(bias, (const float *)pb, (size_t)H * sizeof(float));
    memset(bias + H, 0, (size_t)(Hp - H) * sizeof(float));
    product(q, D, 1, B, D, WqT, Hp, bias, 0, (float *)pc, H, H); /* c = bias + q Wq^T */
    free(WqT);
    Py_RETURN_NONE;
}

/* query_finish(gc, e, B, D, H, Wq, gq, ge, gA, gC, gW, gb): with the kernel's g_c [B, H] and
 * g_A, g_C [H, D], and Wq [H, Dp] (query_prep's): ge[:B] (the kernel's g_q) += g_c Wq (+ gq
 * [B, D], else 0), the layer's gW [H, 4 D] = [g_Wq, g_A, g_Wq - g_A, g_C] with g_Wq = g_c^T q,
 * and gb [H] = the column sums of g_c (in double) */
PyObject *din_query_finish(PyObject *self, PyObject *args) {
    unsigned long long pgc, pe, pWq, pgq, pge, pgA, pgC, pgW, pgb;
    long long B, D, H;
    if (!PyArg_ParseTuple(args, "KKLLLKKKKKKK", &pgc, &pe, &B, &D, &H, &pWq, &pgq, &pge, &pgA, &pgC, &pgW, &pgb))
        return NULL;
    const float *gc = (const float *)pgc, *q = (const float *)pe, *gq = (const float *)pgq;
    const float *gA = (const float *)pgA, *gC = (const float *)pgC;
    float *ge = (float *)pge, *gW = (float *)pgW, *gb = (float *)pgb;
    const int64_t Dp = up16(D);
    float *tmp = malloc((size_t)(2 * B * Dp + H * Dp) * sizeof(float)), *qp = tmp ? tmp + B * Dp : NULL;
    float *gWq = tmp ? qp + B * Dp : NULL;
    if (!tmp) return PyErr_NoMemory();
    pad_into(q, B, D, 0, qp, Dp);
    product(gc, H, 1, B, H, (const float *)pWq, Dp, NULL, 0, tmp, Dp, Dp); /* g_c Wq */
    product(gc, 1, H, H, B, qp, Dp, NULL, 0, gWq, Dp, Dp);                 /* g_Wq = g_c^T q */
    for (int64_t b = 0; b < B; b++)
        for (int64_t d = 0; d < D; d++) ge[b * D + d] += tmp[b * Dp + d] + (gq ? gq[b * D + d] : 0.0f);
    for (int64_t h = 0; h < H; h++) {
        float *w = gW + h * 4 * D;
        for (int64_t d = 0; d < D; d++) {
            const float g = gWq[h * Dp + d], a = gA[h * D + d];
            w[d] = g, w[D + d] = a, w[2 * D + d] = g - a, w[3 * D + d] = gC[h * D + d];
        }
    }
    for (int64_t h = 0; h < H; h++) {
        double t = 0;
        for (int64_t b = 0; b < B; b++) t += gc[b * H + h];
        gb[h] = (float)t;
    }
    free(tmp);
    Py_RETURN_NONE;
}
