/* A compiled reader for flat Avro records (schemas/codec.py `flat_reader`): stage 1 decodes every usage
 * event with it. fastavro interprets the schema for each record (~12 us a usage event); this walks a
 * program of field kinds made once per schema (~2 us). It reads exactly what fastavro reads for these
 * kinds, including its leniencies (any non-zero boolean byte is true, a union index of -1/-2 counts from
 * the end, varint bits past 64 are dropped); tests/schemas/test_flat_avro.py compares the two on random
 * records and random bytes. Any other schema shape stays with fastavro. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <datetime.h>
#include <stdint.h>

enum kind {
    K_STRING = 1,
    K_LONG = 2,
    K_TIMESTAMP_MICROS = 3,
    K_OPTIONAL_STRING = 4,
    K_OPTIONAL_LONG = 5,
    K_BOOLEAN = 6,
    K_MAP_STRING = 7,
    K_MAP_LONG = 8,
};

typedef struct {
    const unsigned char *p;
    const unsigned char *end;
} cursor;

static PyObject *epoch_utc; /* datetime(1970, 1, 1, tzinfo=UTC) */

static int corrupt(const char *what) {
    PyErr_SetString(PyExc_ValueError, what);
    return -1;
}

static int read_long(cursor *c, int64_t *out) {
    uint64_t acc = 0;
    unsigned shift = 0;
    for (;;) {
        if (c->p >= c->end) return corrupt("truncated long");
        unsigned char b = *c->p++;
        if (shift < 64) acc |= (uint64_t)(b & 0x7F) << shift;
        shift += 7;
        if (!(b & 0x80)) break;
    }
    *out = (int64_t)((acc >> 1) ^ (~(acc & 1) + 1));
    return 0;
}

static PyObject *read_string(cursor *c) {
    int64_t n;
    if (read_long(c, &n) < 0) return NULL;
    if (n < 0 || n > (int64_t)(c->end - c->p)) {
        corrupt("string length out of range");
        return NULL;
    }
    PyObject *s = PyUnicode_DecodeUTF8((const char *)c->p, (Py_ssize_t)n, "strict");
    c->p += n;
    return s;
}

static PyObject *read_timestamp_micros(cursor *c) {
    int64_t v;
    if (read_long(c, &v) < 0) return NULL;
    const int64_t per_day = 86400000000LL;
    int64_t days = v / per_day, rem = v % per_day;
    if (rem < 0) {
        rem += per_day;
        days -= 1;
    }
    PyObject *delta = PyDelta_FromDSU((int)days, (int)(rem / 1000000), (int)(rem % 1000000));
    if (delta == NULL) return NULL;
    PyObject *at = PyNumber_Add(epoch_utc, delta);
    Py_DECREF(delta);
    return at;
}

/* 1 if the union's second branch follows, 0 for null, -1 on error (fastavro indexes a Python list). */
static int union_branch(cursor *c) {
    int64_t index;
    if (read_long(c, &index) < 0) return -1;
    if (index == 0 || index == -2) return 0;
    if (index == 1 || index == -1) return 1;
    return corrupt("union index out of range");
}

static PyObject *read_map(cursor *c, int long_values) {
    PyObject *map = PyDict_New();
    if (map == NULL) return NULL;
    for (;;) {
        int64_t count;
        if (read_long(c, &count) < 0) goto fail;
        if (count == 0) return map;
        if (count < 0) {
            int64_t block_bytes;
            if (read_long(c, &block_bytes) < 0) goto fail;
            if (count == INT64_MIN) { /* -count would overflow; no buffer holds that many entries anyway */
                corrupt("map block count out of range");
                goto fail;
            }
            count = -count;
        }
        for (int64_t i = 0; i < count; i++) {
            PyObject *key = read_string(c);
            if (key == NULL) goto fail;
            PyObject *value;
            if (long_values) {
                int64_t n;
                value = read_long(c, &n) < 0 ? NULL : PyLong_FromLongLong(n);
            } else {
                value = read_string(c);
            }
            if (value == NULL || PyDict_SetItem(map, key, value) < 0) {
                Py_DECREF(key);
                Py_XDECREF(value);
                goto fail;
            }
            Py_DECREF(key);
            Py_DECREF(value);
        }
    }
fail:
    Py_DECREF(map);
    return NULL;
}

static PyObject *read_field(cursor *c, long kind) {
    int64_t n;
    int branch;
    switch (kind) {
        case K_STRING:
            return read_string(c);
        case K_LONG:
            return read_long(c, &n) < 0 ? NULL : PyLong_FromLongLong(n);
        case K_TIMESTAMP_MICROS:
            return read_timestamp_micros(c);
        case K_OPTIONAL_STRING:
        case K_OPTIONAL_LONG:
            branch = union_branch(c);
            if (branch < 0) return NULL;
            if (branch == 0) Py_RETURN_NONE;
            return kind == K_OPTIONAL_STRING ? read_string(c) : (read_long(c, &n) < 0 ? NULL : PyLong_FromLongLong(n));
        case K_BOOLEAN:
            if (c->p >= c->end) {
                corrupt("truncated boolean");
                return NULL;
            }
            return PyBool_FromLong(*c->p++ != 0);
        case K_MAP_STRING:
            return read_map(c, 0);
        case K_MAP_LONG:
            return read_map(c, 1);
        default:
            PyErr_SetString(PyExc_SystemError, "unknown field kind");
            return NULL;
    }
}

/* read(data, offset, names, kinds) -> (record, end offset). names: tuple of str; kinds: tuple of int. */
static PyObject *flat_read(PyObject *self, PyObject *args) {
    Py_buffer data;
    Py_ssize_t offset;
    PyObject *names, *kinds;
    if (!PyArg_ParseTuple(args, "y*nO!O!", &data, &offset, &PyTuple_Type, &names, &PyTuple_Type, &kinds)) return NULL;
    Py_ssize_t fields = PyTuple_GET_SIZE(names);
    if (fields != PyTuple_GET_SIZE(kinds) || offset < 0 || offset > data.len) {
        PyBuffer_Release(&data);
        PyErr_SetString(PyExc_ValueError, "bad arguments");
        return NULL;
    }
    cursor c = {(const unsigned char *)data.buf + offset, (const unsigned char *)data.buf + data.len};
    PyObject *record = _PyDict_NewPresized(fields);
    if (record == NULL) goto fail;
    for (Py_ssize_t i = 0; i < fields; i++) {
        PyObject *value = read_field(&c, PyLong_AsLong(PyTuple_GET_ITEM(kinds, i)));
        if (value == NULL || PyDict_SetItem(record, PyTuple_GET_ITEM(names, i), value) < 0) {
            Py_XDECREF(value);
            goto fail;
        }
        Py_DECREF(value);
    }
    Py_ssize_t end = (Py_ssize_t)(c.p - (const unsigned char *)data.buf);
    PyBuffer_Release(&data);
    PyObject *result = Py_BuildValue("(Nn)", record, end);
    return result;
fail:
    Py_XDECREF(record);
    PyBuffer_Release(&data);
    return NULL;
}

static PyMethodDef methods[] = {
    {"read", flat_read, METH_VARARGS, "read(data, offset, names, kinds) -> (record, end offset)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_flat_avro", NULL, -1, methods};

PyMODINIT_FUNC PyInit__flat_avro(void) {
    PyDateTime_IMPORT;
    if (PyDateTimeAPI == NULL) return NULL;
    PyObject *utc = PyDateTime_TimeZone_UTC;
    epoch_utc = PyDateTimeAPI->DateTime_FromDateAndTime(1970, 1, 1, 0, 0, 0, 0, utc, PyDateTimeAPI->DateTimeType);
    if (epoch_utc == NULL) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    if (PyModule_AddIntConstant(m, "VERSION", 1) < 0) return NULL;
    return m;
}
