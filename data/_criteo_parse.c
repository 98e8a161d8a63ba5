/* Fast path of the Criteo TSV reader (data/criteo.py): one pass over a block of whole
 * lines, straight into the output arrays.  It accepts exactly the language of the
 * reference parser ``data.criteo.parse_line``: lines end in '\n' (one '\r' before it is
 * dropped); label "0" or "1"; 13 fields empty or [+-]?[0-9]+ within int64; 26 fields
 * empty or 8 hex digits; tabs between, nothing else.  It stops at the first line that is
 * not well formed and says where; the caller lets the reference parser name the column
 * (or skip the line) and calls again after it.
 *
 *   count_lines(block) -> number of '\n'
 *   parse(block, labelled, labels f32[R], dense f32[R*13], sparse i64[R*26])
 *       -> (rows parsed, byte offset of the first bad line or -1)
 *
 * The GIL is released while parsing, so two threads can parse two halves of a block.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define NUM_DENSE 13
#define NUM_SPARSE 26
#define MISSING_ID (-1)

static signed char HEX[256];  /* value of a hex digit, -1 for any other byte */

static void init_hex(void) {
    memset(HEX, -1, sizeof HEX);
    for (int c = 0; c < 10; c++) HEX['0' + c] = (signed char)c;
    for (int c = 0; c < 6; c++) HEX['a' + c] = HEX['A' + c] = (signed char)(10 + c);
}

/* One line [p, end) without its '\n'; 0 if well formed. */
static int parse_line(const char *p, const char *end, int labelled, float *label, float *dense, int64_t *sparse) {
    if (labelled) {
        if (end - p < 2 || (p[0] != '0' && p[0] != '1') || p[1] != '\t') return -1;
        *label = (float)(p[0] - '0');
        p += 2;
    }
    for (int j = 0; j < NUM_DENSE; j++) {
        uint64_t v = 0;
        int neg = 0, sign = 0, digits = 0;
        if (p < end && (*p == '-' || *p == '+')) { neg = *p == '-'; sign = 1; p++; }
        while (p < end && *p >= '0' && *p <= '9') {
            uint64_t d = (uint64_t)(*p++ - '0');
            if (v > (UINT64_MAX - d) / 10) return -1;
            v = v * 10 + d;
            digits++;
        }
        if (v > (uint64_t)INT64_MAX + (uint64_t)neg) return -1;  /* outside int64 */
        if (sign && !digits) return -1;
        if (p >= end || *p != '\t') return -1;
        p++;
        dense[j] = (float)(neg && v ? -(double)v : (double)v);  /* as Python: float(int(text)) */
    }
    for (int j = 0; j < NUM_SPARSE; j++) {
        if (p == end || *p == '\t') {
            sparse[j] = MISSING_ID;
        } else {
            if (end - p < 8) return -1;
            int64_t v = 0;
            int bad = 0;
            for (int k = 0; k < 8; k++) {
                int h = HEX[(unsigned char)p[k]];
                bad |= h;  /* -1 sets every bit */
                v = (v << 4) | (h & 15);
            }
            if (bad < 0) return -1;
            sparse[j] = v;
            p += 8;
        }
        if (j < NUM_SPARSE - 1) {
            if (p == end || *p != '\t') return -1;  /* too few columns, or more than 8 digits */
            p++;
        } else if (p != end) {
            return -1;  /* too many columns, or more than 8 digits */
        }
    }
    return 0;
}

static PyObject *count_lines(PyObject *self, PyObject *args) {
    Py_buffer buf;
    if (!PyArg_ParseTuple(args, "y*", &buf)) return NULL;
    Py_ssize_t n = 0;
    const char *p = buf.buf, *end = p + buf.len;
    Py_BEGIN_ALLOW_THREADS
    while ((p = memchr(p, '\n', end - p)) != NULL) { n++; p++; }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&buf);
    return PyLong_FromSsize_t(n);
}

static PyObject *parse(PyObject *self, PyObject *args) {
    Py_buffer buf, labels, dense, sparse;
    int labelled;
    if (!PyArg_ParseTuple(args, "y*pw*w*w*", &buf, &labelled, &labels, &dense, &sparse)) return NULL;
    Py_ssize_t rows = labels.len / (Py_ssize_t)sizeof(float);
    Py_ssize_t i = 0, bad = -1;
    int small = dense.len < rows * NUM_DENSE * (Py_ssize_t)sizeof(float) ||
                sparse.len < rows * NUM_SPARSE * (Py_ssize_t)sizeof(int64_t);
    if (!small) {
        const char *start = buf.buf, *p = start, *end = p + buf.len;
        Py_BEGIN_ALLOW_THREADS
        while (p < end) {
            const char *nl = memchr(p, '\n', end - p);
            const char *stop = nl != NULL && nl > p && nl[-1] == '\r' ? nl - 1 : nl;
            if (nl == NULL || i >= rows ||
                parse_line(p, stop, labelled, (float *)labels.buf + i, (float *)dense.buf + i * NUM_DENSE,
                           (int64_t *)sparse.buf + i * NUM_SPARSE)) {
                bad = p - start;
                break;
            }
            p = nl + 1;
            i++;
        }
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&buf);
    PyBuffer_Release(&labels);
    PyBuffer_Release(&dense);
    PyBuffer_Release(&sparse);
    if (small) {
        PyErr_SetString(PyExc_ValueError, "output arrays are too small for the rows");
        return NULL;
    }
    return Py_BuildValue("(nn)", i, bad);
}

static PyMethodDef methods[] = {
    {"count_lines", count_lines, METH_VARARGS, "Number of newlines in a bytes-like block."},
    {"parse", parse, METH_VARARGS, "Parse Criteo lines into the output arrays; (rows, offset of the first bad line or -1)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_criteo_parse", NULL, -1, methods};

PyMODINIT_FUNC PyInit__criteo_parse(void) {
    init_hex();
    return PyModule_Create(&module);
}
