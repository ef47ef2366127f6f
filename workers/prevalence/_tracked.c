/* The C implementation of workers.prevalence.tracked (change-tracked state).
 *
 * The specification is the pure-Python module `_tracked_py.py`: every function here does
 * what its namesake there does, in the same order (what is checked before anything is
 * logged, which entry is logged, what is left pending for conversion), so that the same
 * changes log the same undo entries and undo to the same state. `_tracked_c.py` wires
 * this module up (`_setup`: the shared exception classes, the immutable types, the
 * limits; `_set_struct_base`: the tracked `Struct` class) and `tracked.py` chooses it.
 *
 * What is C here and why:
 *   - TDict / TList: static subtypes of dict / list with the same layout (no extra field,
 *     no __dict__: the `__slots__ = ()` of the Python classes). Their mutators append an
 *     undo entry, a tuple `(undo_function, *args)` whose function is one of the
 *     `_undo_*` builtins below, to the current log, then change the container.
 *   - The current log is a C thread-local (`current_log`), set by begin_record and
 *     cleared by end_record: one per thread, like the `threading.local` of the Python one.
 *   - UndoLog, with undo_to in C (entries are called through vectorcall, no argument
 *     tuple is built).
 *   - convert: a dict is copied with PyDict_Copy (a memcpy of its table for the dicts a
 *     decoder makes) and the copy, new and unshared, becomes a TDict by changing its type
 *     (same layout, static type: no reference to the type to take); a list likewise.
 *     Nesting is bounded (MAX_DEPTH, given by `_setup`) so a deep value is refused
 *     cleanly rather than overflowing the C stack.
 *
 * Targets CPython 3.11+ through the public and "cpython/" headers only (no internal
 * header), with one version switch (list extend).
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>

#ifndef TRACKED_SOURCE_SHA256
#define TRACKED_SOURCE_SHA256 ""  /* built without setup.py: no stale-build check */
#endif

/* -- configuration (set by _setup) ---------------------------------------------------- */

static PyObject *MutationOutsideTransaction; /* the exception classes (shared with _tracked_py) */
static PyObject *UntrackableValue;
static PyTypeObject *MsgspecStruct;          /* msgspec.Struct */
static PyTypeObject *EnumBase;               /* enum.Enum */
static PyTypeObject *StructBase;             /* the tracked Struct of _tracked_c */
static setattrofunc msgspec_setattro;        /* msgspec.Struct.__setattr__, below our override */
static long max_depth = 500;

#define MAX_ATOMS 32
static PyTypeObject *atoms[MAX_ATOMS];        /* _PLAIN_ATOMS: read back as themselves anywhere */
static int n_atoms;
static PyTypeObject *typed_atoms[MAX_ATOMS];  /* _TYPED_ATOMS: only where their type is known */
static int n_typed_atoms;
static PyTypeObject *DatetimeType;            /* datetime.datetime (a UTC one is plain) */

/* -- module objects ------------------------------------------------------------------- */

static PyObject *MISSING;          /* "the key was not there" (undo of a dict set) */
static PyObject *END;              /* "the deleted key was the last one" */
static PyObject *list_index;       /* list.index */
static PyObject *dict_popitem;     /* dict.popitem */
static PyObject *list_sort;        /* list.sort */
static PyObject *undo_dict_set_fn, *undo_dict_delete_fn, *undo_dict_restore_fn,
    *undo_list_append_fn, *undo_list_truncate_fn, *undo_list_set_fn, *undo_list_restore_fn,
    *undo_list_pop_end_fn, *undo_struct_set_fn;

static PyTypeObject TDictType;
static PyTypeObject TListType;
static PyTypeObject UndoLogType;

typedef struct {
    PyObject_HEAD
    PyObject *entries;   /* list of undo entries, oldest first */
    PyObject *pending;   /* list of (container, key, value) stored this record, to convert */
    Py_ssize_t base;     /* absolute position of entries[0] */
} UndoLogObject;

/* The log of the record being applied in this thread (a strong reference), or NULL. */
static _Thread_local PyObject *current_log;

static const char OUTSIDE_MSG[] =
    "tracked state changed outside a transaction: the state changes only inside a "
    "transaction (a query, or a value returned by execute/query, must not be mutated; "
    "copy it first)";

/* -- small helpers ---------------------------------------------------------------------- */

static inline UndoLogObject *
get_log(void)
{
    PyObject *log = current_log;
    if (log == NULL) {
        PyErr_SetString(MutationOutsideTransaction, OUTSIDE_MSG);
        return NULL;
    }
    return (UndoLogObject *)log;
}

static inline PyObject *
pack2(PyObject *a, PyObject *b)
{
    PyObject *t = PyTuple_New(2);
    if (t == NULL) return NULL;
    Py_INCREF(a); PyTuple_SET_ITEM(t, 0, a);
    Py_INCREF(b); PyTuple_SET_ITEM(t, 1, b);
    return t;
}

static inline PyObject *
pack3(PyObject *a, PyObject *b, PyObject *c)
{
    PyObject *t = PyTuple_New(3);
    if (t == NULL) return NULL;
    Py_INCREF(a); PyTuple_SET_ITEM(t, 0, a);
    Py_INCREF(b); PyTuple_SET_ITEM(t, 1, b);
    Py_INCREF(c); PyTuple_SET_ITEM(t, 2, c);
    return t;
}

static inline PyObject *
pack4(PyObject *a, PyObject *b, PyObject *c, PyObject *d)
{
    PyObject *t = PyTuple_New(4);
    if (t == NULL) return NULL;
    Py_INCREF(a); PyTuple_SET_ITEM(t, 0, a);
    Py_INCREF(b); PyTuple_SET_ITEM(t, 1, b);
    Py_INCREF(c); PyTuple_SET_ITEM(t, 2, c);
    Py_INCREF(d); PyTuple_SET_ITEM(t, 3, d);
    return t;
}

static inline PyObject *
pack5(PyObject *a, PyObject *b, PyObject *c, PyObject *d, PyObject *e)
{
    PyObject *t = PyTuple_New(5);
    if (t == NULL) return NULL;
    Py_INCREF(a); PyTuple_SET_ITEM(t, 0, a);
    Py_INCREF(b); PyTuple_SET_ITEM(t, 1, b);
    Py_INCREF(c); PyTuple_SET_ITEM(t, 2, c);
    Py_INCREF(d); PyTuple_SET_ITEM(t, 3, d);
    Py_INCREF(e); PyTuple_SET_ITEM(t, 4, e);
    return t;
}

/* Append `item` (a new reference, stolen; NULL = an error already set) to `list`.
 * Returns the item (borrowed: the list holds it) or NULL.
 *
 * The items are undo entries and pending conversions: tuples only a log holds, which no
 * reference cycle can go through (the state never refers to a log), so they are taken
 * out of the cyclic GC's sight. A window of thousands of entries then costs the
 * collector nothing, as the Python implementation's tuples would at every collection. */
static inline PyObject *
append_new(PyObject *list, PyObject *item)
{
    if (item == NULL) return NULL;
    PyObject_GC_UnTrack(item);
    int r = PyList_Append(list, item);
    Py_DECREF(item);
    return r < 0 ? NULL : item;
}

/* The change logged as `entry` did not happen (it raised): forget the entry, keeping the
 * exception that is being raised. Only the newest entry, and only if it is that one. */
static void
log_drop(UndoLogObject *log, PyObject *entry)
{
    PyObject *entries = log->entries;
    Py_ssize_t n = PyList_GET_SIZE(entries);
    if (n && PyList_GET_ITEM(entries, n - 1) == entry) {
        PyObject *type, *value, *tb;
        PyErr_Fetch(&type, &value, &tb);
        if (PyList_SetSlice(entries, n - 1, n, NULL) < 0) PyErr_Clear();
        PyErr_Restore(type, value, tb);
    }
}

static inline int
is_plain_atom(PyTypeObject *t)
{
    for (int i = 0; i < n_atoms; i++) {
        if (atoms[i] == t) return 1;
    }
    return 0;
}

static inline int
is_typed_atom(PyTypeObject *t)
{
    for (int i = 0; i < n_typed_atoms; i++) {
        if (typed_atoms[i] == t) return 1;
    }
    return 0;
}

/* An exact int or bool within MessagePack's range (INT_MIN..INT_MAX). Never fails. */
static int
int_in_range(PyObject *v)
{
    int overflow;
    long long x = PyLong_AsLongLongAndOverflow(v, &overflow);
    if (overflow == 0) {
        if (x == -1 && PyErr_Occurred()) { PyErr_Clear(); return 0; }
        return 1;
    }
    if (overflow < 0) return 0;
    unsigned long long u = PyLong_AsUnsignedLongLong(v);
    if (u == (unsigned long long)-1 && PyErr_Occurred()) { PyErr_Clear(); return 0; }
    return 1;
}

/* _needs_conversion (`loose`: stored into a TDict or TList) and _field_needs_conversion
 * (not `loose`: stored into a Struct's field): whether a stored value must go through
 * convert when the record ends. */
static inline int
needs_conversion(PyObject *v, int loose)
{
    PyTypeObject *t = Py_TYPE(v);
    if (t == &PyUnicode_Type || t == &TDictType || t == &TListType || t == &PyFloat_Type
        || t == &PyBool_Type || v == Py_None)
        return 0;
    if (t == &PyLong_Type) return !int_in_range(v);
    if (is_plain_atom(t)) return 0;
    return loose || !is_typed_atom(t);
}

/* Raise `exc` with `fmt`, whose one %U is the __name__ of `t`. */
static void
raise_with_name(PyObject *exc, const char *fmt, PyTypeObject *t)
{
    PyObject *name = PyType_GetName(t);
    if (name == NULL) return;
    PyErr_Format(exc, fmt, name);
    Py_DECREF(name);
}

static void
raise_too_deep(void)
{
    PyErr_Format(UntrackableValue,
                 "a value nested deeper than %ld levels cannot be stored in the state "
                 "(dicts, lists, tuples and Structs inside each other)", max_depth);
}

/* _untyped: refuse a tuple, a typed atom or an Enum member stored in a plain dict or list. */
static void
raise_untyped(PyObject *v)
{
    PyTypeObject *t = Py_TYPE(v);
    if (t == &PyTuple_Type) {
        PyErr_SetString(UntrackableValue,
                        "a tuple cannot be stored in a plain dict or list in the state: a snapshot "
                        "would read it back as a list (use a list, or a Struct field annotated "
                        "with its type)");
        return;
    }
    if (EnumBase && PyType_IsSubtype(t, EnumBase)) {
        PyObject *name = PyType_GetName(t);
        PyObject *value = name == NULL ? NULL : PyObject_GetAttrString(v, "value");
        if (value != NULL) {
            PyErr_Format(UntrackableValue,
                         "a %U member cannot be stored in a plain dict or list in the state: a snapshot "
                         "would read it back as its value %R (store the value, or the member in a Struct "
                         "field annotated %U)", name, value, name);
        }
        Py_XDECREF(value);
        Py_XDECREF(name);
        return;
    }
    if (t == DatetimeType) {
        PyErr_SetString(UntrackableValue,
                        "a datetime that is naive or not in UTC cannot be stored in a plain dict or "
                        "list in the state: a snapshot would read it back as a str or in UTC (store "
                        "it converted to UTC with tzinfo=datetime.timezone.utc, in a Struct field "
                        "annotated datetime, or as str/int)");
        return;
    }
    PyObject *name = PyType_GetName(t);
    if (name == NULL) return;
    PyErr_Format(UntrackableValue,
                 "a %U cannot be stored in a plain dict or list in the state: a snapshot would read "
                 "it back as a str (store it in a Struct field annotated %U, or as str/int)", name, name);
    Py_DECREF(name);
}

/* Whether `v` is an aware datetime whose UTC offset is 0 (read back as itself anywhere):
 * 1, 0, or -1 with an exception set. */
static int
is_utc_datetime(PyObject *v)
{
    if (Py_TYPE(v) != DatetimeType) return 0;
    PyObject *offset = PyObject_CallMethod(v, "utcoffset", NULL);
    if (offset == NULL) return -1;
    int nonzero = offset == Py_None ? 1 : PyObject_IsTrue(offset);
    Py_DECREF(offset);
    return nonzero < 0 ? -1 : !nonzero;
}

/* _check_untyped_atom: a typed atom stored in a plain dict or list is refused unless it
 * is an aware datetime whose UTC offset is 0. Returns 0, or -1 with an exception set. */
static int
check_untyped_atom(PyObject *v)
{
    int utc = is_utc_datetime(v);
    if (utc) return utc > 0 ? 0 : -1;
    raise_untyped(v);
    return -1;
}

static void
set_key_error(PyObject *key)
{
    PyObject *t = PyTuple_Pack(1, key);
    if (t != NULL) {
        PyErr_SetObject(PyExc_KeyError, t);
        Py_DECREF(t);
    }
}

static int
list_extend(PyObject *list, PyObject *iterable)
{
#if PY_VERSION_HEX >= 0x030D0000
    return PyList_Extend(list, iterable);
#else
    PyObject *r = _PyList_Extend((PyListObject *)list, iterable);
    if (r == NULL) return -1;
    Py_DECREF(r);
    return 0;
#endif
}

static inline int
pend(UndoLogObject *log, PyObject *container, PyObject *key, PyObject *value)
{
    return append_new(log->pending, pack3(container, key, value)) == NULL ? -1 : 0;
}

/* -- _check_key ------------------------------------------------------------------------- */

/* _bad_key: refuse a dict key a snapshot would not read back as itself (every dict of the
 * state is decoded untyped: keys are plain atoms, UTC datetimes and tuples of them). */
static void
raise_bad_key(PyObject *key)
{
    PyTypeObject *t = Py_TYPE(key);
    PyObject *name = PyType_GetName(t);
    if (name == NULL) return;
    if (EnumBase && PyType_IsSubtype(t, EnumBase)) {
        PyObject *value = PyObject_GetAttrString(key, "value");
        if (value != NULL) {
            PyErr_Format(UntrackableValue,
                         "a %U member cannot be a key in the state: a snapshot would read it back as its "
                         "value %R (use the value as the key)", name, value);
            Py_DECREF(value);
        }
    }
    else if (t == DatetimeType) {
        PyErr_SetString(UntrackableValue,
                        "a datetime that is naive or not in UTC cannot be a key in the state: a snapshot "
                        "would read it back as a str or in UTC (convert it to UTC with "
                        "tzinfo=datetime.timezone.utc, or use a str or int key)");
    }
    else if (is_typed_atom(t)) {
        PyErr_Format(UntrackableValue,
                     "a %U cannot be a key in the state: a snapshot would read it back as a str "
                     "(use a str or int key)", name);
    }
    else if (MsgspecStruct && PyType_IsSubtype(t, MsgspecStruct)) {
        PyErr_Format(UntrackableValue,
                     "a %U cannot be a key in the state: a snapshot would read it back as a dict, "
                     "which cannot be a key (use a str, int or tuple key)", name);
    }
    else {
        PyErr_Format(UntrackableValue, "a %U cannot be a key in the state", name);
    }
    Py_DECREF(name);
}

/* _check_key: a dict key a snapshot reads back as itself (a str is the caller's fast path):
 * an int or bool in range, a float, None, bytes, a datetime in UTC, or a tuple of these.
 * Returns 0, or -1 with UntrackableValue set. */
static int
check_key(PyObject *key, long depth)
{
    PyTypeObject *t = Py_TYPE(key);
    if (t == &PyTuple_Type) {
        if (depth > max_depth) { raise_too_deep(); return -1; }
        Py_ssize_t n = PyTuple_GET_SIZE(key);
        for (Py_ssize_t i = 0; i < n; i++) {
            if (check_key(PyTuple_GET_ITEM(key, i), depth + 1) < 0) return -1;
        }
        return 0;
    }
    if (t == &PyLong_Type || t == &PyBool_Type) {
        if (!int_in_range(key)) {
            PyErr_Format(UntrackableValue, "integer key %S is out of the range a snapshot can hold", key);
            return -1;
        }
        return 0;
    }
    if (is_plain_atom(t)) return 0;
    int utc = is_utc_datetime(key);
    if (utc) return utc > 0 ? 0 : -1;
    raise_bad_key(key);
    return -1;
}

/* -- convert ---------------------------------------------------------------------------- */

static PyObject *convert_value(PyObject *v, long depth, int own, int loose);

/* Ownership (`own`): a plain dict or list that nothing but its one parent refers to is
 * retyped in place instead of copied. Its parent is either changed in place (a TDict or
 * TList being built or retyped, a Struct, a container a record stored it in) or a fresh
 * copy, and then the child has two references and is copied. Retyping the only reference
 * is indistinguishable from copying and dropping the original, and allocates nothing:
 * that is what makes converting a freshly decoded snapshot cheap. The value given to
 * convert itself is owned only when its caller says so (adopt=True). */

static PyObject *
convert_dict(PyObject *d, long depth, int own)
{
    PyObject *out = own ? Py_NewRef(d) : PyDict_Copy(d);  /* a copy: new, exact, unshared */
    if (out == NULL) return NULL;
    Py_SET_TYPE(out, &TDictType);
    Py_ssize_t pos = 0;
    PyObject *k, *v;
    while (PyDict_Next(out, &pos, &k, &v)) {
        if (!PyUnicode_CheckExact(k) && check_key(k, depth) < 0) goto fail;
        PyTypeObject *vt = Py_TYPE(v);
        if (vt == &PyUnicode_Type || vt == &TDictType || vt == &TListType) continue;
        PyObject *cv = convert_value(v, depth, Py_REFCNT(v) == 1, 1);
        if (cv == NULL) goto fail;
        if (cv != v) {
            /* Same key: the value is replaced in place, the iteration is not disturbed. */
            Py_INCREF(k);
            int r = PyDict_SetItem(out, k, cv);
            Py_DECREF(k);
            if (r < 0) { Py_DECREF(cv); goto fail; }
        }
        Py_DECREF(cv);
    }
    return out;
fail:
    Py_DECREF(out);
    return NULL;
}

static PyObject *
convert_list(PyObject *l, long depth, int own)
{
    PyObject *out = own ? Py_NewRef(l) : PyList_GetSlice(l, 0, PyList_GET_SIZE(l));
    if (out == NULL) return NULL;
    Py_SET_TYPE(out, &TListType);
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(out); i++) {
        PyObject *x = PyList_GET_ITEM(out, i);
        if (Py_IS_TYPE(x, &PyUnicode_Type)) continue;
        PyObject *cx = convert_value(x, depth, Py_REFCNT(x) == 1, 1);
        if (cx == NULL) { Py_DECREF(out); return NULL; }
        if (cx != x) {
            PyList_SET_ITEM(out, i, cx);
            Py_DECREF(x);
        }
        else {
            Py_DECREF(cx);
        }
    }
    return out;
}

static PyObject *
convert_tuple(PyObject *value, long depth)
{
    Py_ssize_t n = PyTuple_GET_SIZE(value);
    PyObject *items = PyTuple_New(n);
    if (items == NULL) return NULL;
    int same = 1;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *x = PyTuple_GET_ITEM(value, i);
        PyObject *cx = convert_value(x, depth, 0, 0);  /* a tuple is never changed in place */
        if (cx == NULL) { Py_DECREF(items); return NULL; }
        if (cx != x) same = 0;
        PyTuple_SET_ITEM(items, i, cx);
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *x = PyTuple_GET_ITEM(items, i);
        PyTypeObject *t = Py_TYPE(x);
        if (t == &TDictType || t == &TListType || (StructBase && PyType_IsSubtype(t, StructBase))) {
            raise_with_name(UntrackableValue,
                            "a tuple holding a mutable %U cannot be tracked (a tuple cannot be "
                            "changed, its contents could): use a list", t);
            Py_DECREF(items);
            return NULL;
        }
    }
    if (same) {
        Py_DECREF(items);
        return Py_NewRef(value);
    }
    return items;
}

static PyObject *
convert_struct(PyObject *value, long depth)
{
    PyObject *fields = PyObject_GetAttrString(value, "__struct_fields__");
    if (fields == NULL) return NULL;
    PyObject *seq = PySequence_Fast(fields, "__struct_fields__ must be a sequence");
    Py_DECREF(fields);
    if (seq == NULL) return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *name = PySequence_Fast_GET_ITEM(seq, i);
        PyObject *field = PyObject_GetAttr(value, name);
        if (field == NULL) goto fail;
        /* converted in place: a field only the Struct refers to (and `field`) is owned */
        PyObject *cf = convert_value(field, depth, Py_REFCNT(field) == 2, 0);
        if (cf == NULL) { Py_DECREF(field); goto fail; }
        int r = 0;
        if (cf != field) r = msgspec_setattro(value, name, cf);
        Py_DECREF(cf);
        Py_DECREF(field);
        if (r < 0) goto fail;
    }
    Py_DECREF(seq);
    return Py_NewRef(value);
fail:
    Py_DECREF(seq);
    return NULL;
}

static PyObject *
convert_frozen(PyObject *value, long depth)
{
    PyTypeObject *cls = Py_TYPE(value);
    PyObject *config = PyObject_GetAttrString(value, "__struct_config__");
    if (config == NULL) return NULL;
    PyObject *frozen_obj = PyObject_GetAttrString(config, "frozen");
    Py_DECREF(config);
    if (frozen_obj == NULL) return NULL;
    int frozen = PyObject_IsTrue(frozen_obj);
    Py_DECREF(frozen_obj);
    if (frozen < 0) return NULL;
    if (!frozen) {
        raise_with_name(UntrackableValue,
                        "a mutable msgspec Struct %U cannot be tracked: derive it from "
                        "workers.prevalence.Struct (or make it frozen=True)", cls);
        return NULL;
    }
    PyObject *fields = PyObject_GetAttrString(value, "__struct_fields__");
    if (fields == NULL) return NULL;
    PyObject *seq = PySequence_Fast(fields, "__struct_fields__ must be a sequence");
    Py_DECREF(fields);
    if (seq == NULL) return NULL;
    PyObject *cls_name = PyType_GetName(cls);
    if (cls_name == NULL) { Py_DECREF(seq); return NULL; }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *name = PySequence_Fast_GET_ITEM(seq, i);
        PyObject *field = PyObject_GetAttr(value, name);
        if (field == NULL) goto fail;
        PyObject *cf = convert_value(field, depth, 0, 0);  /* a frozen Struct is never changed */
        if (cf == NULL) {
            Py_DECREF(field);
            if (PyErr_ExceptionMatches(UntrackableValue)) {
                PyObject *type, *exc, *tb;
                PyErr_Fetch(&type, &exc, &tb);
                PyErr_NormalizeException(&type, &exc, &tb);
                PyObject *text = exc ? PyObject_Str(exc) : NULL;
                Py_XDECREF(type); Py_XDECREF(exc); Py_XDECREF(tb);
                if (text != NULL) {
                    PyErr_Format(UntrackableValue, "frozen Struct %U, field %R: %U", cls_name, name, text);
                    Py_DECREF(text);
                }
            }
            goto fail;
        }
        int same = cf == field;
        Py_DECREF(cf);
        if (!same) {
            PyObject *fname = PyType_GetName(Py_TYPE(field));
            if (fname != NULL) {
                PyErr_Format(UntrackableValue, "frozen Struct %U holds a mutable %U in field %R: it "
                             "could change untracked", cls_name, fname, name);
                Py_DECREF(fname);
            }
            Py_DECREF(field);
            goto fail;
        }
        Py_DECREF(field);
    }
    Py_DECREF(cls_name);
    Py_DECREF(seq);
    return Py_NewRef(value);
fail:
    Py_DECREF(cls_name);
    Py_DECREF(seq);
    return NULL;
}

/* convert() of a value at nesting level `depth` (the value given to convert is at 1);
 * `loose` when it is stored in a plain dict or list (or a TDict or TList), which a
 * snapshot decodes untyped: tuples and typed atoms (but a UTC datetime) are refused. */
static PyObject *
convert_value(PyObject *v, long depth, int own, int loose)
{
    PyTypeObject *t = Py_TYPE(v);
    if (t == &PyUnicode_Type || t == &TDictType || t == &TListType) return Py_NewRef(v);
    if (t == &PyLong_Type || t == &PyBool_Type) {
        if (!int_in_range(v)) {
            PyErr_Format(UntrackableValue, "integer %S is out of the range a snapshot can hold "
                         "(-9223372036854775808..18446744073709551615)", v);
            return NULL;
        }
        return Py_NewRef(v);
    }
    int is_struct = 0;
    if (t != &PyDict_Type && t != &PyList_Type && t != &PyTuple_Type) {
        if (is_plain_atom(t)) return Py_NewRef(v);
        if (is_typed_atom(t)) {
            if (loose && check_untyped_atom(v) < 0) return NULL;
            return Py_NewRef(v);
        }
        is_struct = MsgspecStruct != NULL && PyType_IsSubtype(t, MsgspecStruct);
        if (!is_struct) {
            if (EnumBase && PyType_IsSubtype(t, EnumBase)) {
                if (loose) { raise_untyped(v); return NULL; }  /* read back as its value */
                return Py_NewRef(v);
            }
            raise_with_name(UntrackableValue,
                            "a %U cannot be stored in the state: its changes could not be tracked "
                            "(use dicts, lists, str, int, float, bool, None, bytes, and Structs "
                            "derived from workers.prevalence.Struct, whose typed fields may also hold "
                            "tuples, dates, datetimes, times, timedeltas, Decimals and UUIDs)", t);
            return NULL;
        }
    }
    if (depth > max_depth) { raise_too_deep(); return NULL; }
    depth++;
    if (t == &PyDict_Type) return convert_dict(v, depth, own);
    if (t == &PyList_Type) return convert_list(v, depth, own);
    if (t == &PyTuple_Type) {
        if (loose) { raise_untyped(v); return NULL; }
        return convert_tuple(v, depth);
    }
    if (StructBase && PyType_IsSubtype(t, StructBase)) return convert_struct(v, depth);
    return convert_frozen(v, depth);
}

static PyObject *
tracked_convert(PyObject *module, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"value", "adopt", NULL};
    PyObject *value;
    int adopt = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O|$p:convert", kwlist, &value, &adopt)) return NULL;
    return convert_value(value, 1, adopt, 0);
}

/* -- dict order: the key after `key` -------------------------------------------------- */

/* The newest key of `d` (borrowed), NULL if it is empty. Like reversed(d), it skips the
 * holes deletions left at the end of the entries, without making an iterator: the
 * position PyDict_Next takes is an index into the entries (in insertion order, holes
 * included), and the last of `n` live entries is at index n - 1 or after. */
static PyObject *
last_key(PyObject *d)
{
    Py_ssize_t pos = PyDict_GET_SIZE(d) - 1;
    PyObject *k, *v, *last = NULL;
    if (pos < 0) return NULL;
    while (PyDict_Next(d, &pos, &k, &v)) last = k;
    return last;
}

/* The key after `key` in `d`'s order (new reference), END if it is the last; NULL on error.
 * O(1) for the newest key, as _successor. */
static PyObject *
successor(PyObject *d, PyObject *key)
{
    PyObject *last = last_key(d);
    if (last != NULL) {
        Py_INCREF(last);
        int eq = PyObject_RichCompareBool(last, key, Py_EQ);
        Py_DECREF(last);
        if (eq < 0) return NULL;
        if (eq) return Py_NewRef(END);
    }
    Py_ssize_t pos = 0;
    PyObject *k, *v;
    while (PyDict_Next(d, &pos, &k, &v)) {
        Py_INCREF(k);
        int eq = PyObject_RichCompareBool(k, key, Py_EQ);
        Py_DECREF(k);
        if (eq < 0) return NULL;
        if (eq) {
            if (PyDict_Next(d, &pos, &k, &v)) return Py_NewRef(k);
            return Py_NewRef(END);
        }
    }
    return Py_NewRef(END);
}

/* -- undo functions ----------------------------------------------------------------------- */

#define CHECK_NARGS(name, want)                                                            \
    if (nargs != (want)) {                                                                 \
        PyErr_Format(PyExc_TypeError, name "() takes %d arguments (%zd given)", (want), nargs); \
        return NULL;                                                                       \
    }
#define CHECK_DICT(name, obj)                                                              \
    if (!PyDict_Check(obj)) {                                                              \
        PyErr_SetString(PyExc_TypeError, name "(): not a dict");                           \
        return NULL;                                                                       \
    }
#define CHECK_LIST(name, obj)                                                              \
    if (!PyList_Check(obj)) {                                                              \
        PyErr_SetString(PyExc_TypeError, name "(): not a list");                           \
        return NULL;                                                                       \
    }

static PyObject *
undo_dict_set(PyObject *m, PyObject *const *args, Py_ssize_t nargs)
{
    CHECK_NARGS("_undo_dict_set", 3);
    CHECK_DICT("_undo_dict_set", args[0]);
    int r = args[2] == MISSING ? PyDict_DelItem(args[0], args[1])
                               : PyDict_SetItem(args[0], args[1], args[2]);
    if (r < 0) return NULL;
    Py_RETURN_NONE;
}

static PyObject *
undo_dict_delete(PyObject *m, PyObject *const *args, Py_ssize_t nargs)
{
    CHECK_NARGS("_undo_dict_delete", 4);
    CHECK_DICT("_undo_dict_delete", args[0]);
    PyObject *d = args[0], *successor_key = args[3];
    if (PyDict_SetItem(d, args[1], args[2]) < 0) return NULL;  /* back at the end */
    if (successor_key == END) Py_RETURN_NONE;
    /* Move every key that followed it (from `successor` on) back behind it. */
    PyObject *keys = PyDict_Keys(d);
    if (keys == NULL) return NULL;
    Py_ssize_t start = PySequence_Index(keys, successor_key);
    if (start < 0) { Py_DECREF(keys); return NULL; }
    Py_ssize_t n = PyList_GET_SIZE(keys);
    for (Py_ssize_t i = start; i < n - 1; i++) {
        PyObject *k = PyList_GET_ITEM(keys, i);
        PyObject *v = PyDict_GetItemWithError(d, k);
        if (v == NULL) {
            if (!PyErr_Occurred()) set_key_error(k);
            Py_DECREF(keys);
            return NULL;
        }
        Py_INCREF(v);
        int r = PyDict_DelItem(d, k);
        if (r == 0) r = PyDict_SetItem(d, k, v);
        Py_DECREF(v);
        if (r < 0) { Py_DECREF(keys); return NULL; }
    }
    Py_DECREF(keys);
    Py_RETURN_NONE;
}

static PyObject *
undo_dict_restore(PyObject *m, PyObject *const *args, Py_ssize_t nargs)
{
    CHECK_NARGS("_undo_dict_restore", 2);
    CHECK_DICT("_undo_dict_restore", args[0]);
    PyDict_Clear(args[0]);
    if (PyDict_MergeFromSeq2(args[0], args[1], 1) < 0) return NULL;
    Py_RETURN_NONE;
}

static PyObject *
undo_list_append(PyObject *m, PyObject *const *args, Py_ssize_t nargs)
{
    CHECK_NARGS("_undo_list_append", 1);
    CHECK_LIST("_undo_list_append", args[0]);
    Py_ssize_t n = PyList_GET_SIZE(args[0]);
    if (n == 0) {
        PyErr_SetString(PyExc_IndexError, "pop from empty list");
        return NULL;
    }
    if (PyList_SetSlice(args[0], n - 1, n, NULL) < 0) return NULL;
    Py_RETURN_NONE;
}

static PyObject *
undo_list_truncate(PyObject *m, PyObject *const *args, Py_ssize_t nargs)
{
    CHECK_NARGS("_undo_list_truncate", 2);
    CHECK_LIST("_undo_list_truncate", args[0]);
    Py_ssize_t n = PyNumber_AsSsize_t(args[1], PyExc_IndexError);
    if (n == -1 && PyErr_Occurred()) return NULL;
    if (PyList_SetSlice(args[0], n, PY_SSIZE_T_MAX, NULL) < 0) return NULL;
    Py_RETURN_NONE;
}

static PyObject *
undo_list_set(PyObject *m, PyObject *const *args, Py_ssize_t nargs)
{
    CHECK_NARGS("_undo_list_set", 3);
    CHECK_LIST("_undo_list_set", args[0]);
    if (PyList_Type.tp_as_mapping->mp_ass_subscript(args[0], args[1], args[2]) < 0) return NULL;
    Py_RETURN_NONE;
}

static PyObject *
undo_list_restore(PyObject *m, PyObject *const *args, Py_ssize_t nargs)
{
    CHECK_NARGS("_undo_list_restore", 2);
    CHECK_LIST("_undo_list_restore", args[0]);
    if (PyList_SetSlice(args[0], 0, PY_SSIZE_T_MAX, args[1]) < 0) return NULL;
    Py_RETURN_NONE;
}

static PyObject *
undo_list_pop_end(PyObject *m, PyObject *const *args, Py_ssize_t nargs)
{
    CHECK_NARGS("_undo_list_pop_end", 2);
    CHECK_LIST("_undo_list_pop_end", args[0]);
    if (PyList_Append(args[0], args[1]) < 0) return NULL;
    Py_RETURN_NONE;
}

static PyObject *
undo_struct_set(PyObject *m, PyObject *const *args, Py_ssize_t nargs)
{
    CHECK_NARGS("_undo_struct_set", 3);
    if (msgspec_setattro == NULL || !PyObject_TypeCheck(args[0], MsgspecStruct)) {
        PyErr_SetString(PyExc_TypeError, "_undo_struct_set(): not a msgspec Struct");
        return NULL;
    }
    if (msgspec_setattro(args[0], args[1], args[2]) < 0) return NULL;
    Py_RETURN_NONE;
}

/* -- TDict ---------------------------------------------------------------------------------- */

static int
tdict_set(PyObject *self, PyObject *key, PyObject *value)
{
    UndoLogObject *log = get_log();
    if (log == NULL) return -1;
    if (!PyUnicode_CheckExact(key) && check_key(key, 1) < 0) return -1;
    PyObject *old = PyDict_GetItemWithError(self, key);
    if (old == NULL && PyErr_Occurred()) return -1;
    Py_XINCREF(old);
    PyObject *entry = append_new(log->entries, pack4(undo_dict_set_fn, self, key, old ? old : MISSING));
    Py_XDECREF(old);
    if (entry == NULL) return -1;
    if (PyDict_SetItem(self, key, value) < 0) {
        log_drop(log, entry);
        return -1;
    }
    if (needs_conversion(value, 1)) return pend(log, self, key, value);
    return 0;
}

/* Delete `key` from `d`; `succ` is its successor (END: it is the newest key). The newest
 * goes through dict.popitem, which also drops the holes deletions left at the end of the
 * entries, so deleting newest keys one after the other stays O(1) each. */
static int
delete_key(PyObject *d, PyObject *key, PyObject *succ)
{
    if (succ != END) return PyDict_DelItem(d, key);  /* never through a TDict's own slot */
    PyObject *pair = PyObject_CallOneArg(dict_popitem, d);
    if (pair == NULL) return -1;
    Py_DECREF(pair);
    return 0;
}

/* `del self[key]`, its value `old` (a new reference, released here) looked up already. */
static int
tdict_del_known(PyObject *self, PyObject *key, PyObject *old)
{
    UndoLogObject *log = get_log();
    if (log == NULL) { Py_DECREF(old); return -1; }
    PyObject *succ = successor(self, key);
    if (succ == NULL) { Py_DECREF(old); return -1; }
    PyObject *entry = append_new(log->entries, pack5(undo_dict_delete_fn, self, key, old, succ));
    Py_DECREF(old);
    if (entry == NULL) { Py_DECREF(succ); return -1; }
    int r = delete_key(self, key, succ);
    Py_DECREF(succ);
    if (r < 0) {
        log_drop(log, entry);
        return -1;
    }
    return 0;
}

static int
tdict_del(PyObject *self, PyObject *key)
{
    UndoLogObject *log = get_log();
    if (log == NULL) return -1;
    PyObject *old = PyDict_GetItemWithError(self, key);
    if (old == NULL) {
        if (!PyErr_Occurred()) set_key_error(key);
        return -1;
    }
    return tdict_del_known(self, key, Py_NewRef(old));
}

static int
tdict_ass_sub(PyObject *self, PyObject *key, PyObject *value)
{
    return value == NULL ? tdict_del(self, key) : tdict_set(self, key, value);
}

static PyObject *
tdict_pop(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs > 2) {
        PyErr_Format(PyExc_TypeError, "pop expected at most 2 arguments, got %zd", nargs);
        return NULL;
    }
    if (nargs < 1) {
        PyErr_SetString(PyExc_TypeError, "pop expected at least 1 argument, got 0");
        return NULL;
    }
    PyObject *key = args[0];
    PyObject *value = PyDict_GetItemWithError(self, key);
    if (value == NULL) {
        if (PyErr_Occurred()) return NULL;
        if (nargs == 2) return Py_NewRef(args[1]);
        set_key_error(key);
        return NULL;
    }
    Py_INCREF(value);
    if (tdict_del_known(self, key, Py_NewRef(value)) < 0) { Py_DECREF(value); return NULL; }
    return value;
}

static PyObject *
tdict_popitem(PyObject *self, PyObject *unused)
{
    if (PyDict_GET_SIZE(self) == 0) {
        PyErr_SetString(PyExc_KeyError, "popitem(): dictionary is empty");
        return NULL;
    }
    PyObject *key = Py_XNewRef(last_key(self));
    if (key == NULL) {
        PyErr_SetString(PyExc_KeyError, "popitem(): dictionary is empty");
        return NULL;
    }
    PyObject *value = PyDict_GetItemWithError(self, key);
    if (value == NULL) {
        if (!PyErr_Occurred()) set_key_error(key);
        Py_DECREF(key);
        return NULL;
    }
    PyObject *result = pack2(key, value);
    Py_DECREF(key);
    if (result == NULL) return NULL;
    key = PyTuple_GET_ITEM(result, 0);
    value = PyTuple_GET_ITEM(result, 1);
    UndoLogObject *log = get_log();
    if (log == NULL) { Py_DECREF(result); return NULL; }
    PyObject *entry = append_new(log->entries, pack5(undo_dict_delete_fn, self, key, value, END));
    if (entry == NULL) { Py_DECREF(result); return NULL; }
    if (delete_key(self, key, END) < 0) {
        log_drop(log, entry);
        Py_DECREF(result);
        return NULL;
    }
    return result;
}

static PyObject *
tdict_setdefault(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 1 || nargs > 2) {
        PyErr_Format(PyExc_TypeError, "setdefault expected 1 or 2 arguments, got %zd", nargs);
        return NULL;
    }
    PyObject *key = args[0], *dflt = nargs == 2 ? args[1] : Py_None;
    PyObject *v = PyDict_GetItemWithError(self, key);
    if (v != NULL) return Py_NewRef(v);
    if (PyErr_Occurred()) return NULL;
    if (tdict_set(self, key, dflt) < 0) return NULL;
    v = PyDict_GetItemWithError(self, key);
    if (v == NULL) {
        if (!PyErr_Occurred()) set_key_error(key);
        return NULL;
    }
    return Py_NewRef(v);
}

static int
tdict_update_impl(PyObject *self, PyObject *args, PyObject *kwargs)
{
    PyObject *items = PyObject_Call((PyObject *)&PyDict_Type, args, kwargs);
    if (items == NULL) return -1;
    Py_ssize_t pos = 0;
    PyObject *k, *v;
    while (PyDict_Next(items, &pos, &k, &v)) {
        Py_INCREF(k);
        Py_INCREF(v);
        int r = tdict_set(self, k, v);
        Py_DECREF(k);
        Py_DECREF(v);
        if (r < 0) { Py_DECREF(items); return -1; }
    }
    Py_DECREF(items);
    return 0;
}

static PyObject *
tdict_update(PyObject *self, PyObject *args, PyObject *kwargs)
{
    if (tdict_update_impl(self, args, kwargs) < 0) return NULL;
    Py_RETURN_NONE;
}

static PyObject *
tdict_ior(PyObject *self, PyObject *other)
{
    if (!PyObject_TypeCheck(self, &TDictType)) Py_RETURN_NOTIMPLEMENTED;
    PyObject *args = PyTuple_Pack(1, other);
    if (args == NULL) return NULL;
    int r = tdict_update_impl(self, args, NULL);
    Py_DECREF(args);
    if (r < 0) return NULL;
    return Py_NewRef(self);
}

static PyObject *
tdict_clear(PyObject *self, PyObject *unused)
{
    UndoLogObject *log = get_log();
    if (log == NULL) return NULL;
    PyObject *items = PyDict_Items(self);
    if (items == NULL) return NULL;
    PyObject *entry = append_new(log->entries, pack3(undo_dict_restore_fn, self, items));
    Py_DECREF(items);
    if (entry == NULL) return NULL;
    PyDict_Clear(self);
    Py_RETURN_NONE;
}

static PyObject *
tdict_reduce(PyObject *self, PyObject *unused)
{
    /* copy/pickle give a plain dict: a copy is not part of the state */
    PyObject *copy = PyDict_Copy(self);
    if (copy == NULL) return NULL;
    return Py_BuildValue("(O(N))", (PyObject *)&PyDict_Type, copy);
}

static int
tdict_init(PyObject *self, PyObject *args, PyObject *kwargs)
{
    if (PyDict_GET_SIZE(self)) {
        PyErr_SetString(PyExc_TypeError,
                        "TDict.__init__ called again on a populated dict: that change could not be tracked");
        return -1;
    }
    PyObject *plain = PyObject_Call((PyObject *)&PyDict_Type, args, kwargs);
    if (plain == NULL) return -1;
    PyObject *converted = convert_value(plain, 1, 1, 0);  /* `plain` is ours alone */
    Py_DECREF(plain);
    if (converted == NULL) return -1;
    int r = PyDict_Update(self, converted);
    Py_DECREF(converted);
    return r;
}

static PyMethodDef tdict_methods[] = {
    {"pop", (PyCFunction)(void (*)(void))tdict_pop, METH_FASTCALL, NULL},
    {"popitem", tdict_popitem, METH_NOARGS, NULL},
    {"setdefault", (PyCFunction)(void (*)(void))tdict_setdefault, METH_FASTCALL, NULL},
    {"update", (PyCFunction)(void (*)(void))tdict_update, METH_VARARGS | METH_KEYWORDS, NULL},
    {"clear", tdict_clear, METH_NOARGS, NULL},
    {"__reduce__", tdict_reduce, METH_NOARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PyMappingMethods tdict_as_mapping = {
    .mp_ass_subscript = tdict_ass_sub,
};

static PyNumberMethods tdict_as_number = {
    .nb_inplace_or = tdict_ior,
};

static PyTypeObject TDictType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "workers.prevalence._tracked.TDict",
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_MAPPING,
    .tp_doc = PyDoc_STR("A dict whose every change is logged for undo. Reads are dict's own."),
    .tp_as_mapping = &tdict_as_mapping,
    .tp_as_number = &tdict_as_number,
    .tp_methods = tdict_methods,
    .tp_init = tdict_init,
};

/* -- TList ---------------------------------------------------------------------------------- */

/* Log the whole list (before a change that moves many items): the log, or NULL. */
static UndoLogObject *
restore_point(PyObject *self)
{
    UndoLogObject *log = get_log();
    if (log == NULL) return NULL;
    PyObject *copy = PyList_GetSlice(self, 0, PyList_GET_SIZE(self));
    if (copy == NULL) return NULL;
    PyObject *entry = append_new(log->entries, pack3(undo_list_restore_fn, self, copy));
    Py_DECREF(copy);
    return entry == NULL ? NULL : log;
}

static int
pend_from(PyObject *self, UndoLogObject *log, Py_ssize_t start)
{
    for (Py_ssize_t i = start; i < PyList_GET_SIZE(self); i++) {
        PyObject *x = PyList_GET_ITEM(self, i);
        if (needs_conversion(x, 1)) {
            PyObject *index = PyLong_FromSsize_t(i);
            if (index == NULL) return -1;
            int r = pend(log, self, index, x);
            Py_DECREF(index);
            if (r < 0) return -1;
        }
    }
    return 0;
}

static PyObject *
tlist_append(PyObject *self, PyObject *value)
{
    UndoLogObject *log = get_log();
    if (log == NULL) return NULL;
    PyObject *entry = append_new(log->entries, pack2(undo_list_append_fn, self));
    if (entry == NULL) return NULL;
    if (PyList_Append(self, value) < 0) {
        log_drop(log, entry);
        return NULL;
    }
    if (needs_conversion(value, 1)) {
        PyObject *index = PyLong_FromSsize_t(PyList_GET_SIZE(self) - 1);
        if (index == NULL) return NULL;
        int r = pend(log, self, index, value);
        Py_DECREF(index);
        if (r < 0) return NULL;
    }
    Py_RETURN_NONE;
}

static int
tlist_extend_impl(PyObject *self, PyObject *iterable)
{
    UndoLogObject *log = get_log();
    if (log == NULL) return -1;
    Py_ssize_t n = PyList_GET_SIZE(self);
    PyObject *nobj = PyLong_FromSsize_t(n);
    if (nobj == NULL) return -1;
    PyObject *entry = append_new(log->entries, pack3(undo_list_truncate_fn, self, nobj));
    Py_DECREF(nobj);
    if (entry == NULL) return -1;
    if (list_extend(self, iterable) < 0) {
        if (PyList_GET_SIZE(self) == n) log_drop(log, entry);  /* else undo truncates */
        return -1;
    }
    return pend_from(self, log, n);
}

static PyObject *
tlist_extend(PyObject *self, PyObject *iterable)
{
    if (tlist_extend_impl(self, iterable) < 0) return NULL;
    Py_RETURN_NONE;
}

static PyObject *
tlist_iadd(PyObject *self, PyObject *other)
{
    if (tlist_extend_impl(self, other) < 0) return NULL;
    return Py_NewRef(self);
}

static int
index_error(void)
{
    PyErr_SetString(PyExc_IndexError, "list index out of range");
    return -1;
}

static int
tlist_del(PyObject *self, PyObject *index)
{
    if (PyLong_CheckExact(index)) {  /* IndexError before anything is logged */
        Py_ssize_t n = PyList_GET_SIZE(self);
        Py_ssize_t i = PyNumber_AsSsize_t(index, PyExc_IndexError);
        if (i == -1 && PyErr_Occurred()) return -1;
        if (i < 0) i += n;
        if (i < 0 || i >= n) return index_error();
    }
    if (restore_point(self) == NULL) return -1;
    return PyList_Type.tp_as_mapping->mp_ass_subscript(self, index, NULL);
}

static int
tlist_ass_sub(PyObject *self, PyObject *index, PyObject *value)
{
    if (value == NULL) return tlist_del(self, index);
    if (PyLong_CheckExact(index)) {
        UndoLogObject *log = get_log();
        if (log == NULL) return -1;
        Py_ssize_t n = PyList_GET_SIZE(self);
        Py_ssize_t i = PyNumber_AsSsize_t(index, PyExc_IndexError);
        if (i == -1 && PyErr_Occurred()) return -1;
        if (i < 0) i += n;
        if (i < 0 || i >= n) return index_error();  /* before anything is logged */
        PyObject *iobj = PyLong_FromSsize_t(i);
        if (iobj == NULL) return -1;
        PyObject *old = Py_NewRef(PyList_GET_ITEM(self, i));
        PyObject *entry = append_new(log->entries, pack4(undo_list_set_fn, self, iobj, old));
        Py_DECREF(old);
        if (entry == NULL) { Py_DECREF(iobj); return -1; }
        Py_INCREF(value);
        PyList_SetItem(self, i, value);  /* in range: cannot fail; the old value is in the entry */
        int r = needs_conversion(value, 1) ? pend(log, self, iobj, value) : 0;
        Py_DECREF(iobj);
        return r;
    }
    UndoLogObject *log = restore_point(self);
    if (log == NULL) return -1;
    if (PyList_Type.tp_as_mapping->mp_ass_subscript(self, index, value) < 0) return -1;
    return pend_from(self, log, 0);
}

static int
tlist_ass_item(PyObject *self, Py_ssize_t i, PyObject *value)
{
    /* PySequence_SetItem/DelItem from C code: the same as `self[i] = value` */
    PyObject *index = PyLong_FromSsize_t(i);
    if (index == NULL) return -1;
    int r = tlist_ass_sub(self, index, value);
    Py_DECREF(index);
    return r;
}

static PyObject *
tlist_pop(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs > 1) {
        PyErr_Format(PyExc_TypeError, "pop expected at most 1 argument, got %zd", nargs);
        return NULL;
    }
    Py_ssize_t n = PyList_GET_SIZE(self);
    Py_ssize_t index = -1;
    if (nargs == 1) {
        index = PyNumber_AsSsize_t(args[0], PyExc_IndexError);
        if (index == -1 && PyErr_Occurred()) return NULL;
    }
    if (n && (index == -1 || index == n - 1)) {
        PyObject *value = Py_NewRef(PyList_GET_ITEM(self, n - 1));
        UndoLogObject *log = get_log();
        if (log == NULL) { Py_DECREF(value); return NULL; }
        PyObject *entry = append_new(log->entries, pack3(undo_list_pop_end_fn, self, value));
        if (entry == NULL || PyList_SetSlice(self, n - 1, n, NULL) < 0) {
            if (entry != NULL) log_drop(log, entry);
            Py_DECREF(value);
            return NULL;
        }
        return value;
    }
    Py_ssize_t i = index < 0 ? index + n : index;
    if (i < 0 || i >= n) { index_error(); return NULL; }  /* before anything is logged */
    PyObject *value = Py_NewRef(PyList_GET_ITEM(self, i));
    if (restore_point(self) == NULL || PyList_SetSlice(self, i, i + 1, NULL) < 0) {
        Py_DECREF(value);
        return NULL;
    }
    return value;
}

static PyObject *
tlist_insert(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError, "insert expected 2 arguments, got %zd", nargs);
        return NULL;
    }
    Py_ssize_t index = PyNumber_AsSsize_t(args[0], PyExc_OverflowError);
    if (index == -1 && PyErr_Occurred()) return NULL;
    UndoLogObject *log = restore_point(self);
    if (log == NULL) return NULL;
    if (PyList_Insert(self, index, args[1]) < 0) return NULL;
    if (needs_conversion(args[1], 1) && pend_from(self, log, 0) < 0) return NULL;
    Py_RETURN_NONE;
}

static PyObject *
tlist_remove(PyObject *self, PyObject *value)
{
    PyObject *stack[2] = {self, value};
    PyObject *found = PyObject_Vectorcall(list_index, stack, 2, NULL);  /* ValueError first */
    if (found == NULL) return NULL;
    Py_ssize_t i = PyLong_AsSsize_t(found);
    Py_DECREF(found);
    if (i == -1 && PyErr_Occurred()) return NULL;
    if (restore_point(self) == NULL) return NULL;
    if (PyList_SetSlice(self, i, i + 1, NULL) < 0) return NULL;
    Py_RETURN_NONE;
}

static PyObject *
tlist_clear(PyObject *self, PyObject *unused)
{
    if (restore_point(self) == NULL) return NULL;
    if (PyList_SetSlice(self, 0, PyList_GET_SIZE(self), NULL) < 0) return NULL;
    Py_RETURN_NONE;
}

static PyObject *
tlist_sort(PyObject *self, PyObject *args, PyObject *kwargs)
{
    if (PyTuple_GET_SIZE(args)) {
        PyErr_SetString(PyExc_TypeError, "sort() takes no positional arguments");
        return NULL;
    }
    if (kwargs != NULL) {
        Py_ssize_t pos = 0;
        PyObject *k, *v;
        while (PyDict_Next(kwargs, &pos, &k, &v)) {
            if (!PyUnicode_Check(k) || (PyUnicode_CompareWithASCIIString(k, "key") != 0
                                        && PyUnicode_CompareWithASCIIString(k, "reverse") != 0)) {
                PyErr_Format(PyExc_TypeError, "sort() got an unexpected keyword argument %R", k);
                return NULL;
            }
        }
    }
    if (restore_point(self) == NULL) return NULL;
    PyObject *self_args = PyTuple_Pack(1, self);
    if (self_args == NULL) return NULL;
    PyObject *r = PyObject_Call(list_sort, self_args, kwargs);
    Py_DECREF(self_args);
    return r;
}

static PyObject *
tlist_reverse(PyObject *self, PyObject *unused)
{
    if (restore_point(self) == NULL) return NULL;
    if (PyList_Reverse(self) < 0) return NULL;
    Py_RETURN_NONE;
}

static PyObject *
tlist_imul(PyObject *self, Py_ssize_t n)
{
    UndoLogObject *log = restore_point(self);
    if (log == NULL) return NULL;
    PyObject *r = PyList_Type.tp_as_sequence->sq_inplace_repeat(self, n);
    if (r == NULL) return NULL;
    if (pend_from(self, log, 0) < 0) {  /* a plain value repeated is converted at each place */
        Py_DECREF(r);
        return NULL;
    }
    return r;
}

static PyObject *
tlist_reduce(PyObject *self, PyObject *unused)
{
    /* copy/pickle give a plain list: a copy is not part of the state */
    PyObject *copy = PyList_GetSlice(self, 0, PyList_GET_SIZE(self));
    if (copy == NULL) return NULL;
    return Py_BuildValue("(O(N))", (PyObject *)&PyList_Type, copy);
}

static int
tlist_init(PyObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"iterable", NULL};
    PyObject *iterable = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|O:TList", kwlist, &iterable)) return -1;
    if (PyList_GET_SIZE(self)) {
        PyErr_SetString(PyExc_TypeError,
                        "TList.__init__ called again on a populated list: that change could not be tracked");
        return -1;
    }
    if (iterable == NULL) return 0;
    PyObject *it = PyObject_GetIter(iterable);
    if (it == NULL) return -1;
    PyObject *items = PyList_New(0);
    if (items == NULL) { Py_DECREF(it); return -1; }
    PyObject *x;
    while ((x = PyIter_Next(it)) != NULL) {
        PyObject *cx = convert_value(x, 1, Py_REFCNT(x) == 1, 1);
        Py_DECREF(x);
        if (cx == NULL) goto fail;
        int r = PyList_Append(items, cx);  /* a container of the state: stays in the GC's sight */
        Py_DECREF(cx);
        if (r < 0) goto fail;
    }
    if (PyErr_Occurred()) goto fail;
    Py_DECREF(it);
    int r = list_extend(self, items);
    Py_DECREF(items);
    return r;
fail:
    Py_DECREF(it);
    Py_DECREF(items);
    return -1;
}

static PyMethodDef tlist_methods[] = {
    {"append", tlist_append, METH_O, NULL},
    {"extend", tlist_extend, METH_O, NULL},
    {"pop", (PyCFunction)(void (*)(void))tlist_pop, METH_FASTCALL, NULL},
    {"insert", (PyCFunction)(void (*)(void))tlist_insert, METH_FASTCALL, NULL},
    {"remove", tlist_remove, METH_O, NULL},
    {"clear", tlist_clear, METH_NOARGS, NULL},
    {"sort", (PyCFunction)(void (*)(void))tlist_sort, METH_VARARGS | METH_KEYWORDS, NULL},
    {"reverse", tlist_reverse, METH_NOARGS, NULL},
    {"__reduce__", tlist_reduce, METH_NOARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PySequenceMethods tlist_as_sequence = {
    .sq_ass_item = tlist_ass_item,
    .sq_inplace_concat = tlist_iadd,
    .sq_inplace_repeat = tlist_imul,
};

static PyMappingMethods tlist_as_mapping = {
    .mp_ass_subscript = tlist_ass_sub,
};

static PyTypeObject TListType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "workers.prevalence._tracked.TList",
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_SEQUENCE,
    .tp_doc = PyDoc_STR("A list whose every change is logged for undo. Reads are list's own."),
    .tp_as_sequence = &tlist_as_sequence,
    .tp_as_mapping = &tlist_as_mapping,
    .tp_methods = tlist_methods,
    .tp_init = tlist_init,
};

/* -- Struct.__setattr__ ------------------------------------------------------------------ */

static PyObject *
struct_setattr(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError, "__setattr__ expected 2 arguments, got %zd", nargs);
        return NULL;
    }
    PyObject *name = args[0], *value = args[1];
    UndoLogObject *log = get_log();
    if (log == NULL) return NULL;
    PyObject *old = PyObject_GetAttr(self, name);
    if (old == NULL) return NULL;
    PyObject *entry = append_new(log->entries, pack4(undo_struct_set_fn, self, name, old));
    Py_DECREF(old);
    if (entry == NULL) return NULL;
    if (msgspec_setattro(self, name, value) < 0) {
        log_drop(log, entry);  /* nothing changed (a frozen Struct, a wrong type): nothing to undo */
        return NULL;
    }
    if (needs_conversion(value, 0) && pend(log, self, name, value) < 0) return NULL;
    Py_RETURN_NONE;
}

static PyMethodDef struct_setattr_def = {
    "__setattr__", (PyCFunction)(void (*)(void))struct_setattr, METH_FASTCALL,
    PyDoc_STR("Set an attribute, logging how to undo it."),
};

/* -- UndoLog ---------------------------------------------------------------------------------- */

static PyObject *
undolog_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    if (PyTuple_GET_SIZE(args) || (kwargs && PyDict_GET_SIZE(kwargs))) {
        PyErr_SetString(PyExc_TypeError, "UndoLog() takes no arguments");
        return NULL;
    }
    UndoLogObject *self = (UndoLogObject *)type->tp_alloc(type, 0);
    if (self == NULL) return NULL;
    self->entries = PyList_New(0);
    self->pending = PyList_New(0);
    self->base = 0;
    if (self->entries == NULL || self->pending == NULL) {
        Py_DECREF(self);
        return NULL;
    }
    return (PyObject *)self;
}

static int
undolog_traverse(UndoLogObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->entries);
    Py_VISIT(self->pending);
    return 0;
}

static void
undolog_dealloc(UndoLogObject *self)
{
    PyObject_GC_UnTrack(self);
    Py_XDECREF(self->entries);
    Py_XDECREF(self->pending);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
undolog_mark(UndoLogObject *self, PyObject *unused)
{
    return PyLong_FromSsize_t(self->base + PyList_GET_SIZE(self->entries));
}

static int
run_entry(PyObject *entry)
{
    PyObject *tuple = PyTuple_CheckExact(entry) ? Py_NewRef(entry) : PySequence_Tuple(entry);
    if (tuple == NULL) return -1;
    Py_ssize_t n = PyTuple_GET_SIZE(tuple);
    if (n < 1) {
        Py_DECREF(tuple);
        PyErr_SetString(PyExc_TypeError, "empty undo entry");
        return -1;
    }
    PyObject *r = PyObject_Vectorcall(PyTuple_GET_ITEM(tuple, 0),
                                      ((PyTupleObject *)tuple)->ob_item + 1, n - 1, NULL);
    Py_DECREF(tuple);
    if (r == NULL) return -1;
    Py_DECREF(r);
    return 0;
}

static PyObject *
undolog_undo_to(UndoLogObject *self, PyObject *arg)
{
    Py_ssize_t mark = PyLong_AsSsize_t(arg);
    if (mark == -1 && PyErr_Occurred()) return NULL;
    Py_ssize_t start = mark - self->base;
    if (start < 0) {
        PyErr_Format(PyExc_ValueError, "undo to %zd, before the oldest kept entry %zd", mark, self->base);
        return NULL;
    }
    PyObject *entries = self->entries;
    Py_ssize_t len = PyList_GET_SIZE(entries);
    for (Py_ssize_t i = len - 1; i >= start; i--) {
        if (i >= PyList_GET_SIZE(entries)) continue;
        PyObject *entry = Py_NewRef(PyList_GET_ITEM(entries, i));
        int r = run_entry(entry);
        Py_DECREF(entry);
        if (r < 0) return NULL;
    }
    if (start < PyList_GET_SIZE(entries)
        && PyList_SetSlice(entries, start, PyList_GET_SIZE(entries), NULL) < 0)
        return NULL;
    return PyLong_FromSsize_t(len - start);
}

static PyObject *
undolog_forget_before(UndoLogObject *self, PyObject *arg)
{
    Py_ssize_t mark = PyLong_AsSsize_t(arg);
    if (mark == -1 && PyErr_Occurred()) return NULL;
    Py_ssize_t drop = mark - self->base;
    if (drop > 0) {
        Py_ssize_t n = PyList_GET_SIZE(self->entries);
        if (PyList_SetSlice(self->entries, 0, drop < n ? drop : n, NULL) < 0) return NULL;
        self->base = mark;
    }
    Py_RETURN_NONE;
}

static Py_ssize_t
undolog_len(UndoLogObject *self)
{
    return PyList_GET_SIZE(self->entries);
}

static PyMethodDef undolog_methods[] = {
    {"mark", (PyCFunction)undolog_mark, METH_NOARGS,
     PyDoc_STR("The current position (absolute: valid across forget_before).")},
    {"undo_to", (PyCFunction)undolog_undo_to, METH_O,
     PyDoc_STR("Undo every entry after `mark`, newest first. Returns how many were undone.")},
    {"forget_before", (PyCFunction)undolog_forget_before, METH_O,
     PyDoc_STR("Drop the entries before `mark` (their records committed).")},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef undolog_members[] = {
    {"entries", T_OBJECT_EX, offsetof(UndoLogObject, entries), READONLY, NULL},
    {"pending", T_OBJECT_EX, offsetof(UndoLogObject, pending), READONLY, NULL},
    {"base", T_PYSSIZET, offsetof(UndoLogObject, base), READONLY, NULL},
    {NULL, 0, 0, 0, NULL},
};

static PySequenceMethods undolog_as_sequence = {
    .sq_length = (lenfunc)undolog_len,
};

static PyTypeObject UndoLogType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "workers.prevalence._tracked.UndoLog",
    .tp_basicsize = sizeof(UndoLogObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = PyDoc_STR("The undo entries of the records a replica has applied and not yet committed."),
    .tp_new = undolog_new,
    .tp_dealloc = (destructor)undolog_dealloc,
    .tp_traverse = (traverseproc)undolog_traverse,
    .tp_methods = undolog_methods,
    .tp_members = undolog_members,
    .tp_as_sequence = &undolog_as_sequence,
};

/* -- the record bracket ---------------------------------------------------------------------- */

static int
clear_list(PyObject *list)
{
    Py_ssize_t n = PyList_GET_SIZE(list);
    return n ? PyList_SetSlice(list, 0, n, NULL) : 0;
}

static PyObject *
tracked_begin_record(PyObject *module, PyObject *log)
{
    if (!PyObject_TypeCheck(log, &UndoLogType)) {
        PyErr_Format(PyExc_TypeError, "begin_record() needs an UndoLog, got %s", Py_TYPE(log)->tp_name);
        return NULL;
    }
    PyObject *previous = current_log;
    current_log = Py_NewRef(log);
    Py_XDECREF(previous);
    if (clear_list(((UndoLogObject *)log)->pending) < 0) return NULL;
    Py_RETURN_NONE;
}

static PyObject *
tracked_end_record(PyObject *module, PyObject *unused)
{
    PyObject *log = current_log;
    if (log != NULL) {
        int r = clear_list(((UndoLogObject *)log)->pending);
        current_log = NULL;
        Py_DECREF(log);
        if (r < 0) return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *
tracked_finish_record(PyObject *module, PyObject *unused)
{
    UndoLogObject *log = get_log();
    if (log == NULL) return NULL;
    PyObject *pending = Py_NewRef(log->pending);
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(pending); i++) {
        PyObject *item = Py_NewRef(PyList_GET_ITEM(pending, i));
        if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 3) {
            Py_DECREF(item);
            PyErr_SetString(PyExc_TypeError, "a pending entry is not (container, key, value)");
            goto fail;
        }
        PyObject *container = PyTuple_GET_ITEM(item, 0), *key = PyTuple_GET_ITEM(item, 1),
                 *value = PyTuple_GET_ITEM(item, 2);
        int r = 0;
        if (PyDict_Check(container)) {
            PyObject *current = PyDict_GetItemWithError(container, key);
            if (current == NULL && PyErr_Occurred()) r = -1;
            else if (current == value) {
                /* owned if only the container and this pending entry refer to it */
                PyObject *cv = convert_value(value, 1, Py_REFCNT(value) == 2, 1);
                if (cv == NULL) r = -1;
                else {
                    if (cv != value) r = PyDict_SetItem(container, key, cv);
                    Py_DECREF(cv);
                }
            }
        }
        else if (PyList_Check(container)) {
            Py_ssize_t n = PyList_GET_SIZE(container), index = -1;
            Py_ssize_t k = PyLong_AsSsize_t(key);
            if (k == -1 && PyErr_Occurred()) PyErr_Clear();
            if (0 <= k && k < n && PyList_GET_ITEM(container, k) == value) index = k;
            else {
                for (Py_ssize_t j = 0; j < n; j++) {
                    if (PyList_GET_ITEM(container, j) == value) { index = j; break; }
                }
            }
            if (index >= 0) {
                PyObject *cv = convert_value(value, 1, Py_REFCNT(value) == 2, 1);
                if (cv == NULL) r = -1;
                else if (cv != value) {
                    if (index < PyList_GET_SIZE(container)) PyList_SetItem(container, index, cv);  /* steals */
                    else Py_DECREF(cv);
                }
                else Py_DECREF(cv);
            }
        }
        else {  /* a Struct's field */
            PyObject *current = PyObject_GetAttr(container, key);
            if (current == NULL) r = -1;
            else {
                if (current == value) {  /* the Struct, this entry and `current` */
                    PyObject *cv = convert_value(value, 1, Py_REFCNT(value) == 3, 0);
                    if (cv == NULL) r = -1;
                    else {
                        if (cv != value) r = msgspec_setattro(container, key, cv);
                        Py_DECREF(cv);
                    }
                }
                Py_DECREF(current);
            }
        }
        Py_DECREF(item);
        if (r < 0) goto fail;
    }
    if (clear_list(pending) < 0) goto fail;
    Py_DECREF(pending);
    Py_RETURN_NONE;
fail:
    Py_DECREF(pending);
    return NULL;
}

/* -- engine-owned plain dicts ------------------------------------------------------------------ */

static UndoLogObject *
as_log(PyObject *log)
{
    if (!PyObject_TypeCheck(log, &UndoLogType)) {
        PyErr_Format(PyExc_TypeError, "expected an UndoLog, got %s", Py_TYPE(log)->tp_name);
        return NULL;
    }
    return (UndoLogObject *)log;
}

static PyObject *
tracked_dict_set(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    CHECK_NARGS("dict_set", 4);
    UndoLogObject *log = as_log(args[0]);
    if (log == NULL) return NULL;
    PyObject *d = args[1], *key = args[2], *value = args[3], *old;
    if (PyDict_Check(d)) {
        old = PyDict_GetItemWithError(d, key);
        if (old == NULL && PyErr_Occurred()) return NULL;
        Py_XINCREF(old);
    }
    else {
        old = PyObject_CallMethod(d, "get", "OO", key, MISSING);
        if (old == NULL) return NULL;
    }
    PyObject *entry = append_new(log->entries, pack4(undo_dict_set_fn, d, key, old ? old : MISSING));
    Py_XDECREF(old);
    if (entry == NULL) return NULL;
    if (PyObject_SetItem(d, key, value) < 0) {
        log_drop(log, entry);
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *
tracked_dict_restore_point(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    CHECK_NARGS("dict_restore_point", 2);
    UndoLogObject *log = as_log(args[0]);
    if (log == NULL) return NULL;
    CHECK_DICT("dict_restore_point", args[1]);
    PyObject *items = PyDict_Items(args[1]);
    if (items == NULL) return NULL;
    PyObject *entry = append_new(log->entries, pack3(undo_dict_restore_fn, args[1], items));
    Py_DECREF(items);
    if (entry == NULL) return NULL;
    Py_RETURN_NONE;
}

static PyObject *
tracked_dict_delete(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    CHECK_NARGS("dict_delete", 3);
    UndoLogObject *log = as_log(args[0]);
    if (log == NULL) return NULL;
    CHECK_DICT("dict_delete", args[1]);
    PyObject *d = args[1], *key = args[2];
    PyObject *old = PyObject_GetItem(d, key);
    if (old == NULL) return NULL;
    PyObject *succ = successor(d, key);
    if (succ == NULL) { Py_DECREF(old); return NULL; }
    PyObject *entry = append_new(log->entries, pack5(undo_dict_delete_fn, d, key, old, succ));
    Py_DECREF(old);
    if (entry == NULL) { Py_DECREF(succ); return NULL; }
    int r = delete_key(d, key, succ);
    Py_DECREF(succ);
    if (r < 0) {
        log_drop(log, entry);
        return NULL;
    }
    Py_RETURN_NONE;
}

/* -- setup -------------------------------------------------------------------------------------- */

static PyObject *struct_setattr_descr;

static PyObject *
tracked_setup(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    CHECK_NARGS("_setup", 8);
    /* (MutationOutsideTransaction, UntrackableValue, plain atoms, typed atoms, datetime.datetime,
     *  msgspec.Struct, enum.Enum, max_depth) */
    PyObject *mot = args[0], *uv = args[1], *atom_seq = args[2], *typed_seq = args[3],
             *dtt = args[4], *ms = args[5], *en = args[6];
    if (!PyExceptionClass_Check(mot) || !PyExceptionClass_Check(uv) || !PyType_Check(ms) || !PyType_Check(en)
        || !PyType_Check(dtt)) {
        PyErr_SetString(PyExc_TypeError, "_setup(): wrong argument types");
        return NULL;
    }
    long depth = PyLong_AsLong(args[7]);
    if (depth == -1 && PyErr_Occurred()) return NULL;
    if (depth < 1 || depth > 100000) {
        PyErr_SetString(PyExc_ValueError, "_setup(): max_depth out of range");
        return NULL;
    }
    PyObject *seq = PySequence_Fast(atom_seq, "_setup(): atoms must be a sequence of types");
    if (seq == NULL) return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    if (n > MAX_ATOMS) {
        Py_DECREF(seq);
        PyErr_SetString(PyExc_ValueError, "_setup(): too many atom types");
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        if (!PyType_Check(PySequence_Fast_GET_ITEM(seq, i))) {
            Py_DECREF(seq);
            PyErr_SetString(PyExc_TypeError, "_setup(): atoms must be types");
            return NULL;
        }
    }
    for (Py_ssize_t i = 0; i < n; i++) {  /* kept for ever: references never released */
        atoms[i] = (PyTypeObject *)Py_NewRef(PySequence_Fast_GET_ITEM(seq, i));
    }
    n_atoms = (int)n;
    Py_DECREF(seq);
    seq = PySequence_Fast(typed_seq, "_setup(): typed atoms must be a sequence of types");
    if (seq == NULL) return NULL;
    n = PySequence_Fast_GET_SIZE(seq);
    if (n > MAX_ATOMS) {
        Py_DECREF(seq);
        PyErr_SetString(PyExc_ValueError, "_setup(): too many typed atom types");
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        if (!PyType_Check(PySequence_Fast_GET_ITEM(seq, i))) {
            Py_DECREF(seq);
            PyErr_SetString(PyExc_TypeError, "_setup(): typed atoms must be types");
            return NULL;
        }
    }
    for (Py_ssize_t i = 0; i < n; i++) {  /* kept for ever: references never released */
        typed_atoms[i] = (PyTypeObject *)Py_NewRef(PySequence_Fast_GET_ITEM(seq, i));
    }
    n_typed_atoms = (int)n;
    Py_DECREF(seq);
    DatetimeType = (PyTypeObject *)Py_NewRef(dtt);
    MutationOutsideTransaction = Py_NewRef(mot);
    UntrackableValue = Py_NewRef(uv);
    MsgspecStruct = (PyTypeObject *)Py_NewRef(ms);
    msgspec_setattro = MsgspecStruct->tp_setattro;
    EnumBase = (PyTypeObject *)Py_NewRef(en);
    max_depth = depth;
    if (struct_setattr_descr == NULL) {
        struct_setattr_descr = PyDescr_NewMethod(MsgspecStruct, &struct_setattr_def);
        if (struct_setattr_descr == NULL) return NULL;
        if (PyModule_AddObjectRef(module, "struct_setattr", struct_setattr_descr) < 0) return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *
tracked_set_struct_base(PyObject *module, PyObject *cls)
{
    if (!PyType_Check(cls) || MsgspecStruct == NULL || !PyType_IsSubtype((PyTypeObject *)cls, MsgspecStruct)) {
        PyErr_SetString(PyExc_TypeError, "_set_struct_base(): needs a msgspec.Struct subclass (after _setup)");
        return NULL;
    }
    Py_XSETREF(StructBase, (PyTypeObject *)Py_NewRef(cls));
    Py_RETURN_NONE;
}

static PyObject *
tracked_current_log(PyObject *module, PyObject *unused)
{
    PyObject *log = current_log;
    return Py_NewRef(log ? log : Py_None);
}

/* run_record(log, fn, root, ctx, args): fn(root, ctx, *args) as one record of `log`, in one
 * call (the write path's bracket): changes logged; plain values stored converted when it
 * returns; if it raises (or the conversion refuses), everything it changed is undone and the
 * exception propagates. */
static PyObject *
tracked_run_record(PyObject *module, PyObject *const *argv, Py_ssize_t argc)
{
    if (argc != 5) {
        PyErr_SetString(PyExc_TypeError, "run_record(log, fn, root, ctx, args) takes 5 arguments");
        return NULL;
    }
    PyObject *log = argv[0], *fn = argv[1], *args = argv[4];
    if (!PyObject_TypeCheck(log, &UndoLogType)) {
        PyErr_Format(PyExc_TypeError, "run_record() needs an UndoLog, got %s", Py_TYPE(log)->tp_name);
        return NULL;
    }
    if (!PyTuple_Check(args)) {
        PyErr_Format(PyExc_TypeError, "run_record() needs the arguments as a tuple, got %s",
                     Py_TYPE(args)->tp_name);
        return NULL;
    }
    UndoLogObject *ul = (UndoLogObject *)log;
    Py_ssize_t mark = ul->base + PyList_GET_SIZE(ul->entries);
    PyObject *r = tracked_begin_record(module, log);
    if (r == NULL) return NULL;
    Py_DECREF(r);
    Py_ssize_t nargs = PyTuple_GET_SIZE(args), n = 2 + nargs;
    PyObject *small[8];
    PyObject **vec = n <= 8 ? small : PyMem_Malloc(n * sizeof(PyObject *));
    PyObject *value = NULL;
    if (vec == NULL) {
        PyErr_NoMemory();
    } else {
        vec[0] = argv[2];
        vec[1] = argv[3];
        for (Py_ssize_t i = 0; i < nargs; i++) vec[2 + i] = PyTuple_GET_ITEM(args, i);
        value = PyObject_Vectorcall(fn, vec, n, NULL);
        if (vec != small) PyMem_Free(vec);
    }
    if (value != NULL && PyList_GET_SIZE(ul->pending)) {
        r = tracked_finish_record(module, NULL);
        if (r == NULL) Py_CLEAR(value);
        else Py_DECREF(r);
    }
    if (value == NULL) {
        /* Undo what the record changed, with the exception set aside meanwhile. */
        PyObject *et, *ev, *tb;
        PyErr_Fetch(&et, &ev, &tb);
        PyObject *m = PyLong_FromSsize_t(mark);
        PyObject *undone = m != NULL ? undolog_undo_to(ul, m) : NULL;
        Py_XDECREF(m);
        if (undone == NULL) {  /* undo itself failed: that error wins, chained to the first */
            PyObject *e2, *v2, *t2;
            PyErr_Fetch(&e2, &v2, &t2);
            PyErr_NormalizeException(&e2, &v2, &t2);
            PyErr_NormalizeException(&et, &ev, &tb);
            if (v2 != NULL && ev != NULL) PyException_SetContext(v2, Py_NewRef(ev));
            Py_XDECREF(et); Py_XDECREF(ev); Py_XDECREF(tb);
            et = e2; ev = v2; tb = t2;
        } else {
            Py_DECREF(undone);
        }
        r = tracked_end_record(module, NULL);
        Py_XDECREF(r);
        PyErr_Restore(et, ev, tb);
        return NULL;
    }
    r = tracked_end_record(module, NULL);
    if (r == NULL) {
        Py_DECREF(value);
        return NULL;
    }
    Py_DECREF(r);
    return value;
}

/* -- apply_records: the loop that applies many records -------------------------------------
 *
 * apply_records(log, records, transactions, root, ctx, slow, watch=None, marks=None,
 * tentative=None, forget=False, kinds=None) -> list of (record, outcome) for the records of master
 * `watch`. With `forget`, the undo entries of each record are dropped once it is applied
 * (committed records: the entries are freed while still in the cache).
 * For each record, in order: its undo-log mark goes to `marks` and the record to
 * `tentative` (when given); a tick (empty tx) stops there. A record with a request id, or
 * of master `watch`, goes to ``slow(record)`` (the model's full apply: request ids,
 * outcomes), and a record of `watch` is returned with that outcome. Every other record runs
 * as `run_record(log, transactions[tx], root, ctx, record.args)` after ``ctx.record =
 * record`` and ``ctx._random = None``; its outcome is not needed, so an Exception it raises
 * (already undone by run_record) is dropped, as `Model.apply` would turn it into an outcome
 * nobody reads; anything else (KeyboardInterrupt) propagates. An unknown tx is a KeyError
 * (the caller checked the names at read time).
 * With `kinds` = (Rejected, ok, rejected, error) (the model's exception class and outcome
 * statuses), a record of `watch` without a request id runs here too and its outcome is
 * built as `Model.apply` builds it: {"status": ok, "value": v, "error": None}, or
 * {"status": rejected, "value": None, "error": str(exc)} for a Rejected, or {"status":
 * error, "value": None, "error": f"{type(exc).__name__}: {exc}"} for another Exception.
 * Same contract as `_tracked_py.apply_records`.
 */

static PyObject *str_tx, *str_rid, *str_master, *str_args, *str_record, *str__random,
                *str_status, *str_value, *str_error;

/* The outcome of a record run by `apply_records` with `kinds` (see above): `value` is the
 * transaction's return value (a new reference, stolen), or NULL with an Exception set. */
static PyObject *
make_outcome(PyObject *kinds, PyObject *value)
{
    PyObject *status, *error;
    if (value != NULL) {
        status = PyTuple_GET_ITEM(kinds, 1);
        error = Py_NewRef(Py_None);
    }
    else {
        PyObject *et, *ev, *tb;
        PyErr_Fetch(&et, &ev, &tb);
        PyErr_NormalizeException(&et, &ev, &tb);
        Py_XDECREF(tb);
        Py_XDECREF(et);
        if (ev == NULL) return NULL;
        PyObject *text = PyObject_Str(ev);
        int rejected = text == NULL ? -1 : PyObject_IsInstance(ev, PyTuple_GET_ITEM(kinds, 0));
        if (rejected < 0) {
            Py_XDECREF(text);
            Py_DECREF(ev);
            return NULL;
        }
        if (rejected) {
            status = PyTuple_GET_ITEM(kinds, 2);
            error = text;
        }
        else {
            status = PyTuple_GET_ITEM(kinds, 3);
            PyObject *name = PyType_GetName(Py_TYPE(ev));
            error = name == NULL ? NULL : PyUnicode_FromFormat("%U: %U", name, text);
            Py_XDECREF(name);
            Py_DECREF(text);
        }
        Py_DECREF(ev);
        if (error == NULL) return NULL;
        value = Py_NewRef(Py_None);
    }
    PyObject *out = PyDict_New();
    if (out == NULL || PyDict_SetItem(out, str_status, status) < 0 || PyDict_SetItem(out, str_value, value) < 0
        || PyDict_SetItem(out, str_error, error) < 0) {
        Py_CLEAR(out);
    }
    Py_DECREF(value);
    Py_DECREF(error);
    return out;
}

static PyObject *
tracked_apply_records(PyObject *module, PyObject *const *argv, Py_ssize_t argc)
{
    if (argc < 6 || argc > 11) {
        PyErr_SetString(PyExc_TypeError, "apply_records(log, records, transactions, root, ctx, slow, "
                        "watch=None, marks=None, tentative=None, forget=False, kinds=None) takes 6 to 11 arguments");
        return NULL;
    }
    PyObject *log = argv[0], *records = argv[1], *transactions = argv[2], *root = argv[3],
             *ctx = argv[4], *slow = argv[5];
    PyObject *watch = argc > 6 ? argv[6] : Py_None;
    PyObject *marks = argc > 7 ? argv[7] : Py_None;
    PyObject *tentative = argc > 8 ? argv[8] : Py_None;
    int forget = argc > 9 ? PyObject_IsTrue(argv[9]) : 0;
    if (forget < 0) return NULL;
    PyObject *kinds = argc > 10 && argv[10] != Py_None ? argv[10] : NULL;
    if (kinds != NULL && (!PyTuple_Check(kinds) || PyTuple_GET_SIZE(kinds) != 4
                          || !PyExceptionClass_Check(PyTuple_GET_ITEM(kinds, 0)))) {
        PyErr_SetString(PyExc_TypeError, "apply_records: kinds must be (Rejected, ok, rejected, error)");
        return NULL;
    }
    if (!PyObject_TypeCheck(log, &UndoLogType) || !PyDict_Check(transactions)
        || (marks != Py_None && !PyList_Check(marks)) || (tentative != Py_None && !PyList_Check(tentative))) {
        PyErr_SetString(PyExc_TypeError, "apply_records: log must be an UndoLog, transactions a dict, "
                        "marks and tentative lists or None");
        return NULL;
    }
    UndoLogObject *ul = (UndoLogObject *)log;
    /* A private copy (pointers only): the records stay alive, and a callback that changes
     * the caller's list (or a caller that passes `tentative` itself) cannot disturb the loop. */
    PyObject *seq = PySequence_List(records);
    if (seq == NULL) return NULL;
    PyObject *again = PyList_New(0);
    if (again == NULL) { Py_DECREF(seq); return NULL; }
    Py_ssize_t n = PyList_GET_SIZE(seq);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *rec = PyList_GET_ITEM(seq, i);
        Py_ssize_t held = PyList_GET_SIZE(ul->entries);
        if (forget && held) {  /* the previous record's entries: it is applied and committed */
            if (PyList_SetSlice(ul->entries, 0, held, NULL) < 0) goto fail;
            ul->base += held;
        }
        if (marks != Py_None) {
            PyObject *m = PyLong_FromSsize_t(ul->base + PyList_GET_SIZE(ul->entries));
            int r = m == NULL ? -1 : PyList_Append(marks, m);
            Py_XDECREF(m);
            if (r < 0) goto fail;
        }
        if (tentative != Py_None && PyList_Append(tentative, rec) < 0) goto fail;
        PyObject *tx = PyObject_GetAttr(rec, str_tx);
        if (tx == NULL) goto fail;
        int is_tick = PyUnicode_Check(tx) && PyUnicode_GET_LENGTH(tx) == 0;
        if (is_tick) { Py_DECREF(tx); continue; }
        PyObject *rid = PyObject_GetAttr(rec, str_rid);
        PyObject *master = rid == NULL ? NULL : PyObject_GetAttr(rec, str_master);
        if (master == NULL) { Py_XDECREF(rid); Py_DECREF(tx); goto fail; }
        int has_rid = PyObject_IsTrue(rid);
        int watched = watch == Py_None ? 0 : PyObject_RichCompareBool(master, watch, Py_EQ);
        Py_DECREF(rid);
        Py_DECREF(master);
        if (has_rid < 0 || watched < 0) { Py_DECREF(tx); goto fail; }
        if (has_rid || (watched && kinds == NULL)) {
            Py_DECREF(tx);
            PyObject *out = PyObject_CallOneArg(slow, rec);
            if (out == NULL) goto fail;
            if (watched) {
                PyObject *pair = PyTuple_Pack(2, rec, out);
                Py_DECREF(out);
                int r = pair == NULL ? -1 : PyList_Append(again, pair);
                Py_XDECREF(pair);
                if (r < 0) goto fail;
            }
            else {
                Py_DECREF(out);
            }
            continue;
        }
        PyObject *fn = PyDict_GetItemWithError(transactions, tx);  /* borrowed */
        if (fn == NULL) {
            if (!PyErr_Occurred()) set_key_error(tx);
            Py_DECREF(tx);
            goto fail;
        }
        Py_INCREF(fn);
        Py_DECREF(tx);
        PyObject *args = PyObject_GetAttr(rec, str_args);
        if (args == NULL || PyObject_SetAttr(ctx, str_record, rec) < 0
            || PyObject_SetAttr(ctx, str__random, Py_None) < 0) {
            Py_XDECREF(args);
            Py_DECREF(fn);
            goto fail;
        }
        PyObject *call[5] = {log, fn, root, ctx, args};
        PyObject *value = tracked_run_record(module, call, 5);
        Py_DECREF(args);
        Py_DECREF(fn);
        if (watched) {  /* with `kinds`: the outcome is wanted */
            if (value == NULL && !PyErr_ExceptionMatches(PyExc_Exception)) goto fail;
            PyObject *out = make_outcome(kinds, value);
            if (out == NULL) goto fail;
            PyObject *pair = PyTuple_Pack(2, rec, out);
            Py_DECREF(out);
            int r = pair == NULL ? -1 : PyList_Append(again, pair);
            Py_XDECREF(pair);
            if (r < 0) goto fail;
        }
        else if (value != NULL) {
            Py_DECREF(value);
        }
        else if (PyErr_ExceptionMatches(PyExc_Exception)) {
            PyErr_Clear();  /* the transaction refused or failed: already undone, outcome unread */
        }
        else {
            goto fail;
        }
    }
    Py_ssize_t held = PyList_GET_SIZE(ul->entries);
    if (forget && held) {
        if (PyList_SetSlice(ul->entries, 0, held, NULL) < 0) goto fail;
        ul->base += held;
    }
    Py_DECREF(seq);
    return again;
fail:
    Py_DECREF(seq);
    Py_DECREF(again);
    return NULL;
}

/* -- write_frame: the journal's commit write -------------------------------------------------
 *
 * Not change tracking either, but the other half of every commit: one record framed as
 * `journal.frame(payload, None)` builds it (header "<IBBH": length, version, flags 0, 0;
 * the payload; the CRC-32 of both, little-endian) and written with one pwrite, without the
 * Python objects of the frame in between. Same contract as `_tracked_py.write_frame`. */

static uint32_t crc_table[8][256];  /* CRC-32 (zlib's: reflected 0xEDB88320), sliced by 8 */

static void
crc_init(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = c & 1 ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        crc_table[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; i++)
        for (int t = 1; t < 8; t++)
            crc_table[t][i] = (crc_table[t - 1][i] >> 8) ^ crc_table[0][crc_table[t - 1][i] & 0xff];
}

static inline uint32_t
load_le32(const unsigned char *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static inline void
store_le32(unsigned char *p, uint32_t v)
{
    p[0] = v & 0xff; p[1] = (v >> 8) & 0xff; p[2] = (v >> 16) & 0xff; p[3] = v >> 24;
}

static uint32_t
crc32_of(const unsigned char *p, size_t n)
{
    uint32_t crc = 0xFFFFFFFFu;
    while (n >= 8) {
        uint32_t one = load_le32(p) ^ crc, two = load_le32(p + 4);
        crc = crc_table[7][one & 0xff] ^ crc_table[6][(one >> 8) & 0xff] ^ crc_table[5][(one >> 16) & 0xff]
              ^ crc_table[4][one >> 24] ^ crc_table[3][two & 0xff] ^ crc_table[2][(two >> 8) & 0xff]
              ^ crc_table[1][(two >> 16) & 0xff] ^ crc_table[0][two >> 24];
        p += 8;
        n -= 8;
    }
    while (n--) crc = (crc >> 8) ^ crc_table[0][(crc ^ *p++) & 0xff];
    return ~crc;
}

#define FRAME_HEADER_BYTES 8
#define FRAME_STACK_BYTES 4096

/* write_frame(fd, payload, offset, version) -> bytes written (os.pwrite's answer: a short
 * write is the caller's to refuse). */
static PyObject *
tracked_write_frame(PyObject *module, PyObject *const *argv, Py_ssize_t argc)
{
    if (argc != 4) {
        PyErr_SetString(PyExc_TypeError, "write_frame(fd, payload, offset, version) takes 4 arguments");
        return NULL;
    }
    if (!PyBytes_CheckExact(argv[1])) {
        PyErr_Format(PyExc_TypeError, "write_frame() needs the payload as bytes, got %s", Py_TYPE(argv[1])->tp_name);
        return NULL;
    }
    long fd = PyLong_AsLong(argv[0]);
    if (fd == -1 && PyErr_Occurred()) return NULL;
    if (fd < 0 || fd > INT_MAX) {
        PyErr_Format(PyExc_ValueError, "write_frame: %ld is not a file descriptor", fd);
        return NULL;
    }
    long long offset = PyLong_AsLongLong(argv[2]);
    if (offset == -1 && PyErr_Occurred()) return NULL;
    long version = PyLong_AsLong(argv[3]);
    if (version == -1 && PyErr_Occurred()) return NULL;
    Py_ssize_t n = PyBytes_GET_SIZE(argv[1]);
    if (n <= 0 || (unsigned long long)n > 0xFFFFFFFFull || version < 0 || version > 255 || offset < 0) {
        PyErr_Format(PyExc_ValueError, "write_frame: a payload of %zd bytes, version %ld, offset %lld is out of range",
                     n, version, offset);
        return NULL;
    }
    size_t total = FRAME_HEADER_BYTES + (size_t)n + 4;
    unsigned char small[FRAME_STACK_BYTES];
    unsigned char *buf = total <= sizeof(small) ? small : PyMem_Malloc(total);
    if (buf == NULL) return PyErr_NoMemory();
    store_le32(buf, (uint32_t)n);
    buf[4] = (unsigned char)version;
    buf[5] = buf[6] = buf[7] = 0;  /* flags, reserved */
    memcpy(buf + FRAME_HEADER_BYTES, PyBytes_AS_STRING(argv[1]), (size_t)n);
    store_le32(buf + FRAME_HEADER_BYTES + n, crc32_of(buf, FRAME_HEADER_BYTES + (size_t)n));
    ssize_t done;
    for (;;) {
        Py_BEGIN_ALLOW_THREADS
        done = pwrite((int)fd, buf, total, (off_t)offset);
        Py_END_ALLOW_THREADS
        if (done >= 0 || errno != EINTR) break;
        if (PyErr_CheckSignals() < 0) {  /* as os.pwrite (PEP 475): a handler that raises ends it */
            if (buf != small) PyMem_Free(buf);
            return NULL;
        }
    }
    int saved = errno;
    if (buf != small) PyMem_Free(buf);
    if (done < 0) {
        errno = saved;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyLong_FromSsize_t(done);
}

/* -- ReadView: a follower's lock-free read ------------------------------------------------------
 *
 * Not part of change tracking, but of the same hot path family: the state a follower
 * applies records to is read by application threads without its lock, seqlock-style.
 * `query(q, *args)` runs ``queries[q](state, *args)`` while `generation` is even, and
 * returns the value if `generation` did not move meanwhile; otherwise (an odd generation,
 * a name that is not a str key of `queries`, the query raised an Exception, or the
 * generation moved) it returns ``slow(q, *args)``, which the owner runs under its lock.
 * The follower makes `generation` odd while it changes the state and even again after
 * (`Follower._changing`). Same contract as `_tracked_py.ReadView`.
 */

typedef struct {
    PyObject_HEAD
    PyObject *state;
    PyObject *queries;
    PyObject *slow;
    Py_ssize_t generation;
} ReadViewObject;

static PyTypeObject ReadViewType;

static int
readview_init(ReadViewObject *self, PyObject *args, PyObject *kwargs)
{
    PyObject *queries, *slow;
    static char *kwlist[] = {"queries", "slow", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O!O:ReadView", kwlist, &PyDict_Type, &queries, &slow))
        return -1;
    if (!PyCallable_Check(slow)) {
        PyErr_SetString(PyExc_TypeError, "ReadView: slow must be callable");
        return -1;
    }
    Py_XSETREF(self->queries, Py_NewRef(queries));
    Py_XSETREF(self->slow, Py_NewRef(slow));
    if (self->state == NULL) self->state = Py_NewRef(Py_None);
    return 0;
}

static int
readview_traverse(ReadViewObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->state);
    Py_VISIT(self->queries);
    Py_VISIT(self->slow);
    return 0;
}

static int
readview_clear(ReadViewObject *self)
{
    Py_CLEAR(self->state);
    Py_CLEAR(self->queries);
    Py_CLEAR(self->slow);
    return 0;
}

static void
readview_dealloc(ReadViewObject *self)
{
    PyObject_GC_UnTrack(self);
    readview_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

#define READVIEW_ARGS_MAX 8

static PyObject *
readview_query(ReadViewObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 1) {
        PyErr_SetString(PyExc_TypeError, "query(q, *args) needs the query's name");
        return NULL;
    }
    if (self->slow == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "ReadView used before __init__");
        return NULL;
    }
    Py_ssize_t generation = self->generation;
    if (!(generation & 1) && nargs <= READVIEW_ARGS_MAX && self->state != NULL && PyUnicode_CheckExact(args[0])) {
        PyObject *fn = PyDict_GetItemWithError(self->queries, args[0]);
        if (fn == NULL && PyErr_Occurred()) return NULL;
        if (fn != NULL) {
            PyObject *stack[READVIEW_ARGS_MAX];
            Py_INCREF(fn);
            stack[0] = Py_NewRef(self->state);
            for (Py_ssize_t i = 1; i < nargs; i++) stack[i] = args[i];
            PyObject *value = PyObject_Vectorcall(fn, stack, nargs, NULL);
            Py_DECREF(stack[0]);
            Py_DECREF(fn);
            if (value != NULL) {
                if (self->generation == generation) return value;
                Py_DECREF(value);
            }
            else if (PyErr_ExceptionMatches(PyExc_Exception)) {
                PyErr_Clear();  /* run again under the lock, which raises it if it is real */
            }
            else {
                return NULL;  /* KeyboardInterrupt, SystemExit: not a torn read */
            }
        }
    }
    return PyObject_Vectorcall(self->slow, args, nargs, NULL);
}

static PyMethodDef readview_methods[] = {
    {"query", (PyCFunction)(void (*)(void))readview_query, METH_FASTCALL,
     PyDoc_STR("query(q, *args): queries[q](state, *args) without a lock, or slow(q, *args).")},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef readview_members[] = {
    {"state", T_OBJECT_EX, offsetof(ReadViewObject, state), 0, "the state queries run on"},
    {"generation", T_PYSSIZET, offsetof(ReadViewObject, generation), 0,
     "odd while the state changes"},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject ReadViewType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "workers.prevalence._tracked.ReadView",
    .tp_basicsize = sizeof(ReadViewObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = PyDoc_STR("ReadView(queries, slow): a follower's lock-free read (see _tracked_py.ReadView)."),
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)readview_init,
    .tp_dealloc = (destructor)readview_dealloc,
    .tp_traverse = (traverseproc)readview_traverse,
    .tp_clear = (inquiry)readview_clear,
    .tp_methods = readview_methods,
    .tp_members = readview_members,
};

static PyMethodDef module_methods[] = {
    {"convert", (PyCFunction)(void (*)(void))tracked_convert, METH_VARARGS | METH_KEYWORDS,
     PyDoc_STR("convert(value, *, adopt=False): `value` with every plain dict and list in it "
               "replaced by a tracked one (adopt: the caller hands `value` over).")},
    {"begin_record", tracked_begin_record, METH_O,
     PyDoc_STR("From now until end_record, tracked state changes in this thread go to `log`.")},
    {"finish_record", tracked_finish_record, METH_NOARGS,
     PyDoc_STR("Convert the plain values stored during this record (raises UntrackableValue).")},
    {"end_record", tracked_end_record, METH_NOARGS, PyDoc_STR("The record is over.")},
    {"apply_records", (PyCFunction)(void (*)(void))tracked_apply_records, METH_FASTCALL,
     PyDoc_STR("apply_records(log, records, transactions, root, ctx, slow, watch=None, marks=None, "
               "tentative=None, forget=False): apply many records (see _tracked_py.apply_records).")},
    {"write_frame", (PyCFunction)(void (*)(void))tracked_write_frame, METH_FASTCALL,
     PyDoc_STR("write_frame(fd, payload, offset, version): pwrite one framed record (see "
               "_tracked_py.write_frame); bytes written.")},
    {"run_record", (PyCFunction)(void (*)(void))tracked_run_record, METH_FASTCALL,
     PyDoc_STR("run_record(log, fn, root, ctx, args): fn(root, ctx, *args) as one record of "
               "`log`; undone if it raises.")},
    {"dict_set", (PyCFunction)(void (*)(void))tracked_dict_set, METH_FASTCALL,
     PyDoc_STR("dict_set(log, d, key, value): d[key] = value on a plain dict, undoably.")},
    {"dict_delete", (PyCFunction)(void (*)(void))tracked_dict_delete, METH_FASTCALL,
     PyDoc_STR("dict_delete(log, d, key): del d[key] on a plain dict, undoably.")},
    {"dict_restore_point", (PyCFunction)(void (*)(void))tracked_dict_restore_point, METH_FASTCALL,
     PyDoc_STR("dict_restore_point(log, d): log the whole contents of a plain dict.")},
    {"current_log", tracked_current_log, METH_NOARGS,
     PyDoc_STR("The log of the record being applied in this thread, or None.")},
    {"_setup", (PyCFunction)(void (*)(void))tracked_setup, METH_FASTCALL, NULL},
    {"_set_struct_base", tracked_set_struct_base, METH_O, NULL},
    {"_undo_dict_set", (PyCFunction)(void (*)(void))undo_dict_set, METH_FASTCALL, NULL},
    {"_undo_dict_delete", (PyCFunction)(void (*)(void))undo_dict_delete, METH_FASTCALL, NULL},
    {"_undo_dict_restore", (PyCFunction)(void (*)(void))undo_dict_restore, METH_FASTCALL, NULL},
    {"_undo_list_append", (PyCFunction)(void (*)(void))undo_list_append, METH_FASTCALL, NULL},
    {"_undo_list_truncate", (PyCFunction)(void (*)(void))undo_list_truncate, METH_FASTCALL, NULL},
    {"_undo_list_set", (PyCFunction)(void (*)(void))undo_list_set, METH_FASTCALL, NULL},
    {"_undo_list_restore", (PyCFunction)(void (*)(void))undo_list_restore, METH_FASTCALL, NULL},
    {"_undo_list_pop_end", (PyCFunction)(void (*)(void))undo_list_pop_end, METH_FASTCALL, NULL},
    {"_undo_struct_set", (PyCFunction)(void (*)(void))undo_struct_set, METH_FASTCALL, NULL},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef tracked_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "workers.prevalence._tracked",
    .m_doc = PyDoc_STR("C implementation of workers.prevalence.tracked (see _tracked_py, the specification)."),
    .m_size = -1,
    .m_methods = module_methods,
};

static int
get_attr(PyObject *obj, const char *name, PyObject **out)
{
    *out = PyObject_GetAttrString(obj, name);
    return *out == NULL ? -1 : 0;
}

PyMODINIT_FUNC
PyInit__tracked(void)
{
    /* Until _setup: TypeError stands in for the exception classes, builtins for _PLAIN_ATOMS
     * (and no typed atom). */
    MutationOutsideTransaction = PyExc_TypeError;
    UntrackableValue = PyExc_TypeError;
    PyTypeObject *builtin_atoms[] = {&PyUnicode_Type, &PyLong_Type, &PyFloat_Type, &PyBool_Type,
                                     Py_TYPE(Py_None), &PyBytes_Type};
    n_atoms = 6;
    for (int i = 0; i < n_atoms; i++) atoms[i] = builtin_atoms[i];

    crc_init();
    TDictType.tp_base = &PyDict_Type;
    TDictType.tp_traverse = PyDict_Type.tp_traverse;
    TDictType.tp_clear = PyDict_Type.tp_clear;
    TListType.tp_base = &PyList_Type;
    TListType.tp_traverse = PyList_Type.tp_traverse;
    TListType.tp_clear = PyList_Type.tp_clear;
    if (PyType_Ready(&TDictType) < 0 || PyType_Ready(&TListType) < 0 || PyType_Ready(&UndoLogType) < 0
        || PyType_Ready(&ReadViewType) < 0)
        return NULL;
    /* Same layout as the base (what lets convert retype a fresh copy). */
    if (TDictType.tp_basicsize != PyDict_Type.tp_basicsize || TDictType.tp_dictoffset
        || TDictType.tp_weaklistoffset || TListType.tp_basicsize != PyList_Type.tp_basicsize
        || TListType.tp_dictoffset || TListType.tp_weaklistoffset) {
        PyErr_SetString(PyExc_ImportError, "_tracked: TDict/TList layout differs from dict/list");
        return NULL;
    }

    PyObject *m = PyModule_Create(&tracked_module);
    if (m == NULL) return NULL;
    PyObject *empty = PyTuple_New(0);
    if (empty == NULL) goto fail;
    int r = PyDict_SetItemString(TDictType.tp_dict, "__slots__", empty);
    if (r == 0) r = PyDict_SetItemString(TListType.tp_dict, "__slots__", empty);
    Py_DECREF(empty);
    if (r < 0) goto fail;
    PyType_Modified(&TDictType);
    PyType_Modified(&TListType);
    if (PyModule_AddStringConstant(m, "SOURCE_SHA256", TRACKED_SOURCE_SHA256) < 0) goto fail;
    if (PyModule_AddObjectRef(m, "TDict", (PyObject *)&TDictType) < 0
        || PyModule_AddObjectRef(m, "TList", (PyObject *)&TListType) < 0
        || PyModule_AddObjectRef(m, "UndoLog", (PyObject *)&UndoLogType) < 0
        || PyModule_AddObjectRef(m, "ReadView", (PyObject *)&ReadViewType) < 0)
        goto fail;
    str_tx = PyUnicode_InternFromString("tx");
    str_rid = PyUnicode_InternFromString("rid");
    str_master = PyUnicode_InternFromString("master");
    str_args = PyUnicode_InternFromString("args");
    str_record = PyUnicode_InternFromString("record");
    str__random = PyUnicode_InternFromString("_random");
    str_status = PyUnicode_InternFromString("status");
    str_value = PyUnicode_InternFromString("value");
    str_error = PyUnicode_InternFromString("error");
    if (!str_tx || !str_rid || !str_master || !str_args || !str_record || !str__random
        || !str_status || !str_value || !str_error) goto fail;
    MISSING = PyObject_CallNoArgs((PyObject *)&PyBaseObject_Type);
    END = PyObject_CallNoArgs((PyObject *)&PyBaseObject_Type);
    if (MISSING == NULL || END == NULL) goto fail;
    if (PyModule_AddObjectRef(m, "_MISSING", MISSING) < 0 || PyModule_AddObjectRef(m, "_END", END) < 0)
        goto fail;
    if (get_attr((PyObject *)&PyList_Type, "index", &list_index) < 0
        || get_attr((PyObject *)&PyDict_Type, "popitem", &dict_popitem) < 0
        || get_attr((PyObject *)&PyList_Type, "sort", &list_sort) < 0
        || get_attr(m, "_undo_dict_set", &undo_dict_set_fn) < 0
        || get_attr(m, "_undo_dict_delete", &undo_dict_delete_fn) < 0
        || get_attr(m, "_undo_dict_restore", &undo_dict_restore_fn) < 0
        || get_attr(m, "_undo_list_append", &undo_list_append_fn) < 0
        || get_attr(m, "_undo_list_truncate", &undo_list_truncate_fn) < 0
        || get_attr(m, "_undo_list_set", &undo_list_set_fn) < 0
        || get_attr(m, "_undo_list_restore", &undo_list_restore_fn) < 0
        || get_attr(m, "_undo_list_pop_end", &undo_list_pop_end_fn) < 0
        || get_attr(m, "_undo_struct_set", &undo_struct_set_fn) < 0)
        goto fail;
    return m;
fail:
    Py_DECREF(m);
    return NULL;
}
